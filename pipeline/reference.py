"""The seed's data path in plain PyTorch: PIL decoding, torchvision transforms, a DataLoader.

Never the training path. It exists as the baseline that `benchmarks/loader.py` measures DALI against and as
the reference that the parity tests compare DALI's validation output with. Batches have the same form as
`pipeline.dali.PairLoader`'s: (left, right, labels, index).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms as T

from odir_dual.pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from odir_dual.pipeline.sampling import rarity_weights


def seed_transforms(img_px: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """The seed's transforms: resize (squash) to img_px, its four augmentations when training, normalise."""
    steps = [T.Resize((img_px, img_px), antialias=True)]
    if train:
        steps += [
            T.RandomHorizontalFlip(0.5),
            T.RandomVerticalFlip(0.2),
            T.RandomApply([T.ColorJitter(brightness=0.2, contrast=0.2)], p=0.6),
            T.RandomApply([T.RandomRotation(12)], p=0.6),
        ]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class PairDataset(Dataset):
    """(left, right, labels, index) per patient, decoded with PIL."""

    def __init__(self, left, right, labels, transform):
        self.left, self.right = list(left), list(right)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.left)

    def __getitem__(self, i):
        eyes = [self.transform(Image.open(p).convert("RGB")) for p in (self.left[i], self.right[i])]
        return eyes[0], eyes[1], self.labels[i], i


def reference_loader(left, right, labels, batch_size, img_px, *, train, workers=2, seed=0) -> DataLoader:
    """A DataLoader the way the seed builds it: weighted random sampling when training, in order otherwise."""
    ds = PairDataset(left, right, labels, seed_transforms(img_px, train))
    sampler = None
    if train:
        g = torch.Generator().manual_seed(seed)
        sampler = WeightedRandomSampler(rarity_weights(labels), len(ds), replacement=True, generator=g)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      persistent_workers=workers > 0)
