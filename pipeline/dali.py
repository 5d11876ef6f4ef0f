"""NVIDIA DALI pipelines that feed both eyes: training (weighted, augmented, sharded), evaluation and inference.

All of the project's DALI code lives here. The Python side only chooses *which* files each sample reads and
*which* augmentation it gets (`PairSource`, a pure function of the sample's global position); DALI reads,
decodes, resizes, augments and normalises in its own threads, on the GPU when there is one. Because the
random draws come from the source and not from DALI's generators, a run is reproducible, a resumed run sees
exactly what an uninterrupted one would, and every DDP rank augments its own samples differently.

Outputs are `(left, right, labels, index)`: images (B, 3, H, W) in channels_last memory in the requested
dtype on the target device, labels (B, NUM_CLASSES) float32, index (B,) int64 (row in the table, -1 for padding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from odir_dual.pipeline.constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from odir_dual.pipeline.host import usable_cores
from odir_dual.pipeline.sampling import epoch_order, rank_positions, rarity_weights, steps_per_epoch


@dataclass(frozen=True)
class Augment:
    """The seed's augmentations, with their probabilities (per eye)."""

    hflip_p: float = 0.5
    vflip_p: float = 0.2
    jitter_p: float = 0.6
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b], like torchvision ColorJitter
    contrast: float = 0.2
    rotate_p: float = 0.6
    rotate_deg: float = 12.0
    same_for_both_eyes: bool = False  # independent: each eye is its own photograph, framed and exposed apart

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One eye's parameters: [hflip, vflip, brightness, contrast, angle_deg] as float32."""
        hflip = rng.random() < self.hflip_p
        vflip = rng.random() < self.vflip_p
        jitter = rng.random() < self.jitter_p
        b = rng.uniform(1 - self.brightness, 1 + self.brightness) if jitter else 1.0
        c = rng.uniform(1 - self.contrast, 1 + self.contrast) if jitter else 1.0
        angle = rng.uniform(-self.rotate_deg, self.rotate_deg) if rng.random() < self.rotate_p else 0.0
        return np.array([hflip, vflip, b, c, angle], dtype=np.float32)


def _path_bytes(path: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


class PairSource:
    """Per-sample callback for `fn.external_source(batch=False)`: global sample number → one patient's inputs.

    DALI numbers samples 0, 1, 2, ... for as long as the pipeline runs (we never end its epoch); sample g
    belongs to step g // batch_size. For training, step s is epoch s // steps_per_epoch and reads this rank's
    share of that epoch's weighted global order. For evaluation, every pass reads each patient once and pads the
    last batch with index -1.
    """

    def __init__(self, left, right, labels, batch_size, *, train, augment=None, weighted=True, seed=0,
                 rank=0, world=1, start_step=0, step_multiple=1):
        self.left = [_path_bytes(p) for p in left]
        self.right = [_path_bytes(p) for p in right]
        self.labels = np.asarray(labels, dtype=np.float32)
        self._label_rows = [row.copy() for row in self.labels]  # DALI takes dense arrays only, not strided views
        self.n, self.batch_size, self.train = len(self.left), batch_size, train
        self.augment, self.seed, self.start_step = augment, seed, start_step
        if train:
            self.weights = rarity_weights(self.labels) if weighted else None
            self.positions = rank_positions(self.n, batch_size, rank, world, step_multiple)
            self.steps = steps_per_epoch(self.n, batch_size, world, step_multiple)
        else:
            self.steps = -(-self.n // batch_size)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # prefetch may lag one epoch
            self._orders[epoch] = epoch_order(self.weights, self.n, self.seed, epoch)
        return self._orders[epoch]

    def locate(self, g: int) -> tuple[int, int, int]:
        """(epoch, position in the global order, patient row or -1) of global sample g."""
        step, k = divmod(g + self.start_step * self.batch_size, self.batch_size)
        epoch, step_in_epoch = divmod(step, self.steps)
        if not self.train:
            pos = step_in_epoch * self.batch_size + k
            return epoch, pos, pos if pos < self.n else -1
        pos = int(self.positions[step_in_epoch * self.batch_size + k])
        return epoch, pos, int(self._order(epoch)[pos])

    def __call__(self, info):
        epoch, pos, row = self.locate(info.idx_in_epoch)
        i = max(row, 0)  # padding rows read patient 0 and are marked by index -1
        out = [self.left[i], self.right[i], self._label_rows[i], np.int64(row)]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, pos, 1])
            a_left = self.augment.draw(rng)
            a_right = a_left if self.augment.same_for_both_eyes else self.augment.draw(rng)
            out += [a_left, a_right]
        return tuple(out)


def _eye_graph(path, params, *, img_px, decode_device, mean, std, dtype):
    """Read → decode → resize → (augment) → normalise one eye; HWC out."""
    from nvidia.dali import fn, types  # slow: ~1 s; importing this module (export.py, tests) must not pay it

    data = fn.io.file.read(path)
    img = fn.decoders.image(data, device=decode_device, output_type=types.RGB)
    img = fn.resize(img, resize_x=img_px, resize_y=img_px, antialias=True)  # squash, like the seed's Resize((s, s))
    if params is not None:
        img = fn.flip(img, horizontal=fn.cast(params[0], dtype=types.INT32),
                      vertical=fn.cast(params[1], dtype=types.INT32))
        img = fn.rotate(img, angle=params[4], keep_size=True, fill_value=0)
        img = fn.brightness_contrast(img, brightness=params[2], contrast=params[3],
                                     contrast_center=128.0)
    return fn.crop_mirror_normalize(img, dtype=dtype, output_layout="HWC",
                                    mean=[m * 255 for m in mean], std=[s * 255 for s in std])


def _build_pipeline(source: PairSource, *, img_px, device_id, mean, std, dtype, num_threads, seed):
    from nvidia.dali import fn, pipeline_def, types  # slow: as in _eye_graph

    # DALI has no bfloat16: half-precision pipelines emit float16 and PairLoader casts on the device.
    dali_dtype = types.FLOAT if dtype == torch.float32 else types.FLOAT16
    n_out = 6 if source.augment is not None else 4

    @pipeline_def(batch_size=source.batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pairs():
        outs = fn.external_source(source, num_outputs=n_out, batch=False)
        path_l, path_r, labels, index = outs[:4]
        params = outs[4:] if source.augment is not None else (None, None)
        decode = "mixed" if device_id is not None else "cpu"
        kw = dict(img_px=img_px, decode_device=decode, mean=mean, std=std, dtype=dali_dtype)
        return (_eye_graph(path_l, params[0], **kw), _eye_graph(path_r, params[1], **kw), labels, index)

    pipe = pairs()
    pipe.build()
    return pipe


class PairLoader:
    """`for left, right, labels, index in loader` — one pass is `len(loader)` batches.

    For training a pass is one epoch of this rank's share; passes continue the stream, so epoch e is the e-th
    pass (counting from the step the loader was started at). For evaluation a pass visits every row once.
    """

    def __init__(self, source: PairSource, *, img_px, device, dtype=torch.float32, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, num_threads=None, seed=0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # slow: as in _eye_graph

        self.device, self.dtype = torch.device(device), dtype
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.source = source
        self.pipe = _build_pipeline(source, img_px=img_px, device_id=device_id, mean=mean, std=std, dtype=dtype,
                                    num_threads=num_threads or min(usable_cores(), 8), seed=seed)
        self._it = DALIGenericIterator(self.pipe, ["left", "right", "labels", "index"], size=-1)
        self.consumed = 0  # batches handed out since start_step

    def __len__(self) -> int:
        first_pass_left = self.source.steps - self.source.start_step % self.source.steps
        return first_pass_left if self.consumed == 0 and self.source.train else self.source.steps

    def next_batch(self):
        """The next batch of the stream: left, right (B, 3, H, W) channels_last; labels (B, NUM_CLASSES); index (B,)."""
        b = next(self._it)[0]
        self.consumed += 1
        to = dict(device=self.device, non_blocking=True)
        # HWC batches permuted to NCHW are already channels_last-contiguous: no copy on the GPU path.
        left = b["left"].permute(0, 3, 1, 2).to(**to).to(self.dtype)
        right = b["right"].permute(0, 3, 1, 2).to(**to).to(self.dtype)
        return left, right, b["labels"].to(**to), b["index"].to(**to)

    def __iter__(self):
        if not self.source.train:
            while self.consumed % self.source.steps:  # a pass left half-read must not shift the next one
                self.next_batch()
        for _ in range(len(self)):
            yield self.next_batch()


def train_loader(table, batch_size, img_px, device, *, augment: Augment | None = Augment(), weighted=True,
                 seed=0, rank=0, world=1, start_step=0, step_multiple=1, dtype=torch.float32,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, num_threads=None) -> PairLoader:
    """Weighted, augmented, sharded training batches from a patient table (columns left, right, N..O)."""
    source = PairSource(table["left"], table["right"], _labels(table), batch_size, train=True, augment=augment,
                        weighted=weighted, seed=seed, rank=rank, world=world, start_step=start_step,
                        step_multiple=step_multiple)
    return PairLoader(source, img_px=img_px, device=device, dtype=dtype, mean=mean, std=std,
                      num_threads=num_threads, seed=seed + 1000 * rank)


def eval_loader(left, right, batch_size, img_px, device, *, labels=None, dtype=torch.float32,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, num_threads=None) -> PairLoader:
    """Every pair exactly once per pass, no augmentation, fixed batch shape (padding has index -1).

    Used for validation (with labels) and for inference on a folder (labels all zero).
    """
    labels = np.zeros((len(left), NUM_CLASSES), np.float32) if labels is None else labels
    source = PairSource(list(left), list(right), labels, batch_size, train=False)
    return PairLoader(source, img_px=img_px, device=device, dtype=dtype, mean=mean, std=std,
                      num_threads=num_threads)


def _labels(table) -> np.ndarray:
    return table[list(CLASSES)].to_numpy(dtype=np.float32)
