"""Data loading throughput: the DALI training pipeline against the seed's PIL + torchvision DataLoader.

Both read the SAME files, with the same augmentations (flips, brightness/contrast, rotation), resize to img_px,
normalise and deliver (left, right, labels) batches on the target device:
  (a) full-size originals: synthetic ~5 MP fundus JPEGs (2592 px wide; ODIR-5K's originals are not on this
      machine), generated once into the cache;
  (b) the prepared copy of the same patients (fundus cropped, short side img_px, JPEG q95), as train.py uses;
  (c) the real ODIR-5K 256-px subset (../shared/data/odir5k-256), prepared at img_px, when it is present.
DALI decodes on the CPU without a GPU and with nvJPEG ("mixed") on one. The reference uses `workers` processes
(2 here; every core on a GPU host). Timing: `warmup` batches are drawn first (pipeline build, worker start-up,
prefetch queues drained), then `batches` batches are timed with a CUDA synchronize at both ends. Prints one
table and writes benchmarks/results/loader.json.

    .venv/bin/python benchmarks/loader.py                 # CPU: 224 px, 16 pairs per batch, seconds
    python benchmarks/loader.py --device cuda              # GPU: 384 px, 96 pairs per batch
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (Stopwatch, add_ratios, device_memory_used_mib, header, prepared_table,  # noqa: E402
                               print_header, print_table, real_odir, synthetic_odir, usable_cores, write_results)


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:  # CPU defaults: small enough for a shared 2-core machine
    img_px: int = 224  # training image side, px
    batch_size: int = 16  # pairs per batch (2 images each)
    batches: int = 12  # timed batches per row
    full_batches: int = 5  # timed batches per full-size row (5 MP decoding: ~1 s per batch on 2 CPU cores)
    warmup: int = 3  # batches drawn before timing (the reference draws at least 2 x workers + 1)
    n_patients: int = 64  # synthetic full-size patients, generated once into the cache (files reused below)
    full_px: int = 2592  # width of the synthetic originals, px (heights 1728-2592: 3:2, 4:3, 1:1 frames)
    workers: int = 2  # reference DataLoader worker processes
    dali_threads: int = 2  # DALI CPU threads
    full_size: bool = True  # time (a) the full-size originals
    real: bool = True  # time (c) the real 256-px ODIR subset when it is present
    # pairs per batch of the full-size PIL row; 0: batch_size. Its DataLoader must first drain 2 x workers + 1
    # prefetched batches: at 96 pairs and 16 workers that is 6,336 five-MP decodes (~33 s at the 191
    # images/s) before timing starts; images/s hardly depends on the batch size
    full_reference_batch: int = 0
    seed: int = 0


GPU = dict(img_px=384, batch_size=96, batches=30, full_batches=10, warmup=5, n_patients=128,
           workers=usable_cores(), dali_threads=min(usable_cores(), 16), full_reference_batch=16)


# ----------------------------------------------------------------------------------------------- timing
def time_dali(table, s: Settings, device) -> dict:
    """images/s of pipeline.dali.train_loader (weighted sampling, augmentation), as train.py builds it."""
    import torch

    from odir_dual.pipeline.dali import Augment, train_loader

    dtype = torch.float16 if device.type == "cuda" else torch.float32  # what train.py feeds AMP / fp32
    loader = train_loader(table, s.batch_size, s.img_px, device, augment=Augment(), seed=s.seed,
                          num_threads=s.dali_threads, dtype=dtype)
    for _ in range(s.warmup):
        loader.next_batch()
    with Stopwatch(device) as t:
        for _ in range(s.batches):
            left, right, labels, index = loader.next_batch()
    assert left.shape == (s.batch_size, 3, s.img_px, s.img_px) and left.device.type == device.type
    mem = device_memory_used_mib(device)
    del loader, left, right
    return _row(s, t.seconds, mem, loader="dali", threads=s.dali_threads)


def time_reference(table, s: Settings, device) -> dict:
    """images/s of pipeline.reference.reference_loader (PIL decode + torchvision), batches moved to device."""
    from odir_dual.pipeline.odir import label_matrix
    from odir_dual.pipeline.reference import reference_loader

    warmup = max(s.warmup, 2 * s.workers + 1)  # DataLoader prefetches 2 batches per worker: drain that first
    need = s.batch_size * (warmup + s.batches)  # one epoch of the sampler must cover every batch drawn
    reps = -(-need // len(table))
    left, right = list(table["left"]) * reps, list(table["right"]) * reps
    labels = label_matrix(table).astype("float32").repeat(reps, axis=0)
    loader = reference_loader(left[:need], right[:need], labels[:need], s.batch_size, s.img_px, train=True,
                              workers=s.workers, seed=s.seed)
    it = iter(loader)
    to = dict(device=device, non_blocking=False)
    for _ in range(warmup):
        [x.to(**to) for x in next(it)[:3]]
    with Stopwatch(device) as t:
        for _ in range(s.batches):
            b = [x.to(**to) for x in next(it)[:3]]
    assert b[0].shape == (s.batch_size, 3, s.img_px, s.img_px)
    mem = device_memory_used_mib(device)
    del it, loader, b
    return _row(s, t.seconds, mem, loader="reference", workers=s.workers, warmup_batches=warmup)


def _row(s: Settings, seconds: float, mem, **extra) -> dict:
    pairs = s.batch_size * s.batches
    return {"images_per_s": round(2 * pairs / seconds, 1), "pairs_per_s": round(pairs / seconds, 1),
            "ms_per_step": round(1000 * seconds / s.batches, 1), "peak_mem_mib": mem, "batches": s.batches,
            "batch_size": s.batch_size, "seconds": round(seconds, 3), **extra}


# ----------------------------------------------------------------------------------------------- main
def data_sets(s: Settings):
    """[(key, description, table)] in the order they are timed: the prepared rows first (what training reads,
    and the GPU check's target), the slow full-size rows last, so a run cut short by its time limit has them."""
    folder = synthetic_odir(s.n_patients, s.full_px, s.full_px, seed=s.seed)
    prepared, originals = prepared_table(folder, s.img_px)
    out = [("prepared", f"prepared copy, short side {s.img_px} px", prepared)]
    real = real_odir() if s.real else None
    if real is not None:
        table, _ = prepared_table(real, s.img_px, n_patients=max(s.n_patients, s.batch_size))
        out.append(("real256", f"real ODIR-5K 256 px, prepared at {s.img_px} px", table))
    if s.full_size:
        mb = sum(os.path.getsize(p) for p in originals["left"]) / len(originals) / 1e6
        out.append(("full", f"full-size synthetic {s.full_px} px wide ({mb:.2f} MB/JPEG)", originals))
    return out


def main(argv=None) -> None:
    from benchmarks.common import settings_from_cli

    s, device = settings_from_cli(Settings, GPU, argv, __doc__)
    info = header(device)
    print_header(info, "benchmarks/loader.py: DALI training pipeline vs PIL + torchvision DataLoader")
    decode = "nvJPEG (mixed)" if device.type == "cuda" else "CPU"  # how DALI decodes on this device
    print(f"settings: {s} · device {device} · DALI decoding on {decode}")
    sets = data_sets(s)
    if real_odir() is None and s.real:
        print("(real ODIR subset not found: row (c) skipped)")
    rows = []
    for key, desc, table in sets:
        s_row = replace(s, batches=s.full_batches) if key == "full" else s
        dali = {"setting": f"{desc}: DALI {decode}, {s.dali_threads} threads", "data": key, **time_dali(table, s_row, device)}
        s_ref = replace(s_row, batch_size=s.full_reference_batch) if key == "full" and s.full_reference_batch else s_row
        ref = {"setting": f"{desc}: reference PIL, {s.workers} workers, {s_ref.batch_size} pairs/batch", "data": key,
               **time_reference(table, s_ref, device)}
        add_ratios([dali, ref], ref, key="images_per_s", out="x_reference")
        rows += [dali, ref]
        print(f"  {key}: DALI {dali['images_per_s']:.1f} img/s, reference {ref['images_per_s']:.1f} img/s", flush=True)
        path = write_results("loader", info, s, rows, device=str(device))  # after every pair: a timeout keeps them
    print()
    print_table(rows, [("setting", "setting", "{}"), ("images_per_s", "images/s", "{:.1f}"),
                       ("pairs_per_s", "pairs/s", "{:.1f}"), ("ms_per_step", "ms/batch", "{:.1f}"),
                       ("peak_mem_mib", "GPU mem in use MiB", "{:.0f}"), ("x_reference", "x reference", "{:.2f}")])
    print(f"{s.batches} timed batches ({s.full_batches} full-size) of {s.batch_size} pairs per row after warm-up; "
          "images/s counts both eyes. "
          "GPU mem: whole device (DALI + torch) after the row, '-' on CPU. x reference: DALI / reference, same files.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
