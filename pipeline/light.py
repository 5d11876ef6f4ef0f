"""The validation preprocessing in numpy and Pillow only: what `score.py` uses where DALI or torch is absent.

It reproduces `pipeline.dali.eval_loader` on prepared images: decode (RGB), squash to img_px × img_px with an
antialiased linear filter (Pillow's BILINEAR is DALI's antialiased linear resize), normalise, NCHW float.
tests/test_light.py bounds the difference to DALI; docs/DESIGN-NOTES.md and benchmarks/RESULTS.md have the figures.

    for left, right, index in pil_batches(left_paths, right_paths, 32, img_px=384, mean=..., std=...):
        ...  # left, right: (B, 3, H, W) float32 numpy; index (B,) int64, -1 for padding
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from odir_dual.pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from odir_dual.pipeline.host import usable_cores

RESAMPLE = Image.Resampling.BILINEAR  # = DALI's antialiased linear resize (see the module docstring)


def load_eye(path, img_px: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=np.float32) -> np.ndarray:
    """One prepared image → (3, img_px, img_px) normalised array, exactly as the validation pipeline makes it.

    Args:
        path: a prepared image (pipeline.prepare), any format Pillow reads.
        img_px: output side, pixels (the model's input size).
        mean, std: per-channel normalisation in [0, 1] pixel units (the model's metadata).
        dtype: output dtype (float32, or float16 for half-precision models).
    """
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (img_px, img_px):
        rgb = rgb.resize((img_px, img_px), RESAMPLE)  # rounded to uint8, like DALI's uint8 resize output
    hwc = np.asarray(rgb, dtype=np.float32)  # (H, W, 3), 0-255
    hwc = (hwc - np.float32(255) * np.asarray(mean, np.float32)) / (np.float32(255) * np.asarray(std, np.float32))
    return np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=dtype)  # (3, H, W)


def pil_batches(left, right, batch_size: int, img_px: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                dtype=np.float32, num_threads: int | None = None):
    """Every (left, right) pair once, in order, in batches of batch_size (the last one padded, index -1).

    Yields (left, right, index): (B, 3, img_px, img_px) arrays and (B,) int64 row numbers, the same contract as
    `pipeline.dali.eval_loader` without labels. Images are decoded in `num_threads` threads (Pillow releases the
    GIL while decoding and resizing; default min(cores, 8)); one batch is read ahead.
    """
    n = len(left)
    paths = list(zip(left, right))

    def load_batch(start: int):
        rows = list(range(start, min(start + batch_size, n)))
        pad = batch_size - len(rows)
        eyes = [list(pool.map(lambda i: load_eye(paths[i][e], img_px, mean, std, dtype), rows)) for e in (0, 1)]
        batch = [np.stack(eye + [np.zeros_like(eye[0])] * pad) for eye in eyes]
        return batch[0], batch[1], np.array(rows + [-1] * pad, np.int64)

    with ThreadPoolExecutor(num_threads or min(usable_cores(), 8)) as pool, ThreadPoolExecutor(1) as ahead:
        starts = list(range(0, n, batch_size))
        pending = ahead.submit(load_batch, starts[0]) if starts else None
        for k in range(len(starts)):
            batch = pending.result()
            pending = ahead.submit(load_batch, starts[k + 1]) if k + 1 < len(starts) else None
            yield batch
