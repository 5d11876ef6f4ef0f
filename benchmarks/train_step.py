"""Training step throughput of the dual-eye network: precision, memory format, compilation, seed vs fast preset.

Rows (each a fresh model unless the row before had the same set-up; the step as train.py's loop does it: autocast
forward, hybrid loss, scaled backward, gradient clipping, fused AdamW on a GPU):
  ablation at `batch_size` pairs, synthetic in-memory inputs (pure compute):
    eager fp32 (the baseline) · bf16 autocast (GPU only) · channels_last · torch.compile · all together
  presets, synthetic inputs:
    seed: 6 pairs x 2 accumulation steps, fp16 autocast + GradScaler, NCHW, eager
    fast: `fast_batch` pairs (96 on a GPU), bf16, channels_last, compiled
  presets fed by their data path from prepared JPEGs (data wait = time blocked fetching the next batch):
    seed + the seed's PIL + torchvision DataLoader · fast + the DALI training pipeline
On a CPU every row runs fp32 and compilation is off unless --compile (minutes of C++ compilation per row).
Images reach a bf16 model as DALI's fp16, cast to bf16 before the forward (see Trainer.step).
Warm-up steps (and compilation) are excluded; the timed region has a CUDA synchronize at both ends and no
host sync inside (except the seed's GradScaler, which syncs every update, as it did). Prints one table and
writes benchmarks/results/train_step.json after every row (a stage killed by a timeout keeps its rows).

    .venv/bin/python benchmarks/train_step.py                      # CPU: tiny backbone, 128 px, seconds
    python benchmarks/train_step.py --device cuda                   # GPU: ConvNeXt-Small, 384 px
    python benchmarks/train_step.py --rows eager_fp32,fast,fast_dali
"""
from __future__ import annotations

import gc
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (Stopwatch, add_ratios, header, peak_memory_mib, prepared_table,  # noqa: E402
                               print_header, print_table, real_odir, reset_peak_memory, sync, synthetic_odir,
                               usable_cores, write_results)

import torch  # noqa: E402

from pipeline.constants import NUM_CLASSES  # noqa: E402


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:  # CPU defaults: a tiny backbone so a 2-core machine finishes in about a minute
    backbone: str = "test_convnext"  # timm name; the GPU runs the real one, convnext_small
    img_px: int = 128  # image side, px
    batch_size: int = 4  # pairs per step in the ablation rows
    seed_batch: int = 6  # the seed preset's pairs per step (x seed_accum steps per update)
    seed_accum: int = 2
    fast_batch: int = 8  # the fast preset's pairs per step (96 on a GPU)
    steps: int = 8  # timed steps per row
    warmup: int = 3  # steps before timing (compilation happens here); rounded up to whole updates
    data_steps: int = 8  # timed steps of the rows fed by a data pipeline
    data_patients: int = 64  # patients read by the data rows (synthetic full-size set, shared with loader.py)
    data_src_px: int = 2592  # width of those synthetic originals (their prepared copy is what is read)
    workers: int = 2  # reference DataLoader workers (seed + PIL row)
    dali_threads: int = 0  # 0: train.py's default, min(cores, 8)
    # torch intra-op CPU threads; 0: torch's default. 1 on a CPU: with any other load on 2 cores, 2 OpenMP threads
    # ran the same step 40x slower (3.7 s vs 86 ms, test_convnext, 128 px, batch 4, load average ~3.5)
    threads: int = 1
    compile: bool = False  # torch.compile the rows that use it (off on a CPU: minutes of C++ compilation each)
    rows: str = "all"  # comma list of row keys (see ROWS), or all
    seed: int = 0


GPU = dict(backbone="convnext_small", img_px=384, batch_size=48, fast_batch=96, steps=15, warmup=3, data_steps=25,
           data_patients=128, workers=usable_cores(), compile=True, threads=0)
# ablation batch 48 on the GPU: eager fp32 ConvNeXt-S at 384 px needs ~0.5 GB of activations per image, so
# 96 pairs (192 images) would not fit in 80 GB; the fast preset row runs its own 96.

# key: (preset, amp, channels_last, compile, data path). Run in this order: the rows the GPU summary needs come
# first (cheap eager ones before the compiled fast preset), so a stage cut short by its timeout still has them.
# Labels are built from what actually ran (`_label`).
ROWS = {
    "eager_fp32": ("ablation", "fp32", False, False, None),  # the baseline
    "seed": ("seed", "fp16", False, False, None),
    "seed_pil": ("seed", "fp16", False, False, "reference"),
    "fast": ("fast", "bf16", True, True, None),
    "fast_dali": ("fast", "bf16", True, True, "dali"),
    "bf16": ("ablation", "bf16", False, False, None),
    "channels_last": ("ablation", "fp32", True, False, None),
    "compile": ("ablation", "fp32", False, True, None),
    "all": ("ablation", "bf16", True, True, None),
}
DATA_NAMES = {None: "synthetic tensors", "dali": "DALI", "reference": "PIL DataLoader"}


def _row_config(key: str, s: Settings, device) -> tuple:
    """(preset, precision, channels_last, compile, data) as they will run on this device with these settings."""
    preset, amp, cl, comp, data = ROWS[key]
    if device.type != "cuda":
        amp = "fp32"  # autocast on a CPU is not what anyone trains with: the CPU rows run fp32
    return preset, amp, cl, comp and s.compile, data


def _label(key: str, cfg: tuple, accum: int) -> str:
    preset, amp, cl, comp, data = cfg
    what = [amp + (" + GradScaler" if amp == "fp16" else "")] + ["channels_last"] * cl + ["compile"] * comp
    name = {"ablation": "eager fp32 (baseline)" if key == "eager_fp32" else " + ".join(what)}.get(preset)
    name = name or f"{preset} preset ({', '.join(what)}{f', accum {accum}' if accum > 1 else ''})"
    return f"{name}, {DATA_NAMES[data]}"


# ----------------------------------------------------------------------------------------------- one row
class Trainer:
    """A fresh model with train.py's optimizer, scaler and wrappers (`engine.make_stepper`); `step` is train.py's
    training step itself (`engine.Stepper.step`), so this benchmark times exactly what training runs."""

    def __init__(self, s: Settings, device, preset: str, amp: str, channels_last: bool, compile_: bool, accum: int):
        from checkpoint import build_model
        from config import Config
        from engine import make_stepper

        self.device, self.accum = device, accum
        self.setup = (preset, amp, channels_last, compile_)  # rows with the same set-up may share this trainer
        self.cfg = Config(backbone=s.backbone, pretrained=False, img_px=s.img_px, channels_last=channels_last,
                          compile=compile_, precision=amp, accum_steps=accum)
        model = build_model(self.cfg, pretrained=False).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        pos_weight = torch.full((NUM_CLASSES,), 3.0, device=device)  # BCE positive weights, as from ~25% positives
        self.stepper = make_stepper(model, self.cfg, device, lr=1e-4, pos_weight=pos_weight)
        # what train.py feeds: images in the autocast dtype (the DALI loader casts its fp16 to bf16), else fp32
        self.in_dtype = self.stepper.amp_dtype or torch.float32
        self.channels_last = channels_last
        self.micro = 0
        self.losses = []

    def step(self, left, right, labels):
        self.micro += 1
        loss, _ = self.stepper.step(left, right, labels, update=self.micro % self.accum == 0)
        self.losses.append(loss)

    def synthetic_batch(self, batch: int):
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        imgs = [torch.randn(batch, 3, self.cfg.img_px, self.cfg.img_px, generator=g)
                .to(self.device, self.in_dtype).contiguous(memory_format=fmt) for _ in range(2)]
        labels = (torch.rand(batch, NUM_CLASSES, generator=g) < 0.3).float().to(self.device)
        return imgs[0], imgs[1], labels

    def check_finite(self):
        loss = torch.stack(self.losses).float()
        if not torch.isfinite(loss).all():
            raise RuntimeError(f"non-finite loss in the benchmark: {loss.tolist()}")
        return float(loss[-1])


def run_row(key: str, s: Settings, device, data_table, t: Trainer | None) -> tuple[dict, Trainer]:
    """Time one row; returns (row, trainer). `t`: the previous row's trainer when it has this row's model set-up
    (the fast preset fed by DALI continues the compiled model of the synthetic fast row: no recompilation)."""
    cfg = _row_config(key, s, device)
    preset, amp, cl, comp, data = cfg
    batch = {"ablation": s.batch_size, "seed": s.seed_batch, "fast": s.fast_batch}[preset]
    accum = s.seed_accum if preset == "seed" else 1
    if t is None:
        torch._dynamo.reset()  # each compiled set-up compiles its own graph: no dynamic-shape carry-over
        t = Trainer(s, device, preset, amp, cl, comp, accum)
    reset_peak_memory(device)
    warmup = max(s.warmup, accum, 2 * s.workers + 1 if data == "reference" else 0)  # DataLoader: drain prefetch
    warmup = math.ceil(warmup / accum) * accum  # whole updates only
    steps = math.ceil((s.data_steps if data else s.steps) / accum) * accum
    fetch, close = _batches(t, data, batch, data_table, s, device, warmup + steps)
    t0 = time.perf_counter()
    for _ in range(warmup):
        t.step(*fetch())
    sync(device)
    warmup_s = time.perf_counter() - t0
    data_s = 0.0
    with Stopwatch(device) as sw:
        for _ in range(steps):
            d0 = time.perf_counter()
            batch_ = fetch()
            data_s += time.perf_counter() - d0
            t.step(*batch_)
    last_loss = t.check_finite()
    pairs = batch * steps
    row = {"key": key, "setting": _label(key, cfg, accum), "preset": preset, "batch": batch, "accum": accum,
           "precision": amp, "channels_last": cl, "compile": comp, "data": data or "synthetic", "steps": steps,
           "seconds": round(sw.seconds, 3), "pairs_per_s": round(pairs / sw.seconds, 2),
           "images_per_s": round(2 * pairs / sw.seconds, 2), "ms_per_step": round(1000 * sw.seconds / steps, 1),
           "data_wait_pct": round(100 * data_s / sw.seconds, 2) if data else None,
           "peak_mem_mib": peak_memory_mib(device), "warmup_s": round(warmup_s, 1), "last_loss": round(last_loss, 4)}
    close()
    return row, t


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _batches(t: Trainer, data, batch, table, s: Settings, device, n_steps):
    """(fetch, close): fetch() returns the next (left, right, labels) on the device."""
    if data is None:
        fixed = t.synthetic_batch(batch)
        return (lambda: fixed), (lambda: None)
    if data == "dali":
        from pipeline.dali import Augment, train_loader

        loader = train_loader(table, batch, s.img_px, device, augment=Augment(), seed=s.seed, dtype=t.in_dtype,
                              num_threads=s.dali_threads or None)
        return (lambda: loader.next_batch()[:3]), (lambda: None)
    from pipeline.odir import label_matrix
    from pipeline.reference import reference_loader

    need = batch * n_steps
    reps = -(-need // len(table))
    left, right = (list(table[c]) * reps for c in ("left", "right"))
    labels = label_matrix(table).astype("float32").repeat(reps, axis=0)
    loader = reference_loader(left[:need], right[:need], labels[:need], batch, s.img_px, train=True,
                              workers=s.workers, seed=s.seed)
    it = iter(loader)

    def fetch():
        left, right, labels, _ = next(it)
        return left.to(device), right.to(device), labels.to(device)  # the seed's .to(device), NCHW fp32

    def close():
        nonlocal it
        it = None
    return fetch, close


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from benchmarks.common import settings_from_cli

    s, device = settings_from_cli(Settings, GPU, argv, __doc__)
    keys = list(ROWS) if s.rows == "all" else [k.strip() for k in s.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if device.type != "cuda":
        keys = [k for k in keys if k != "bf16"]  # autocast rows are GPU-only
    if not s.compile:
        keys = [k for k in keys if k not in ("compile", "all")]  # they would repeat eager rows
    if s.threads:
        torch.set_num_threads(s.threads)
    info = header(device)
    print_header(info, "benchmarks/train_step.py: dual-eye training step")
    print(f"settings: {s} · device {device} · torch CPU threads {torch.get_num_threads()}")
    if device.type != "cuda":
        print(f"CPU run: backbone {s.backbone} at {s.img_px} px, every row fp32 (autocast rows are GPU-only), "
              f"compile {'on' if s.compile else 'off (--compile to time it)'}; the GPU numbers come from "
              "--device cuda (convnext_small, 384 px)")
    data_table = None
    if any(ROWS[k][4] for k in keys):
        real = real_odir()
        folder = real if real is not None else synthetic_odir(s.data_patients, s.data_src_px, s.data_src_px)
        data_table, _ = prepared_table(folder, s.img_px, n_patients=s.data_patients)
        print(f"data rows read {len(data_table)} patients prepared at {s.img_px} px from "
              f"{'the real ODIR-5K subset' if real is not None else 'synthetic originals'} ({folder})")
    rows, trainer = [], None
    for key in keys:
        print(f"  {key} ...", end=" ", flush=True)
        if trainer is not None and trainer.setup != _row_config(key, s, device)[:4]:
            trainer = None  # a different model set-up: free the last one before building the next
            _free(device)
        try:
            row, trainer = run_row(key, s, device, data_table, trainer)
        except Exception as e:  # noqa: BLE001 - out of memory or a failing set-up: report it, time the other rows
            trainer = None
            _free(device)
            what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"FAILED: {type(e).__name__}"
            row = {"key": key, "setting": f"{_label(key, _row_config(key, s, device), 1)} ({what})",
                   "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            traceback.print_exc()
        rows.append(row)
        print(f"{row.get('pairs_per_s', '-')} pairs/s, {row.get('ms_per_step', '-')} ms/step "
              f"(warm-up incl. compile {row.get('warmup_s', '-')} s)", flush=True)
        add_ratios(rows, next((r for r in rows if r["key"] == "eager_fp32"), None))
        write_results("train_step", info, s, rows, device=str(device))
    print()
    print_table(rows, [("setting", "setting", "{}"), ("batch", "pairs/step", "{}"),
                       ("images_per_s", "images/s", "{:.1f}"), ("pairs_per_s", "pairs/s", "{:.2f}"),
                       ("ms_per_step", "ms/step", "{:.1f}"), ("data_wait_pct", "data wait %", "{:.1f}"),
                       ("peak_mem_mib", "peak mem MiB", "{:.0f}"), ("x_baseline", "x eager fp32", "{:.2f}")])
    seed, fast = (next((r for r in rows if r["key"] == k and "pairs_per_s" in r), None) for k in ("seed_pil",
                                                                                                  "fast_dali"))
    if seed and fast:
        print(f"fast + DALI vs seed + PIL (the seed's way): {fast['pairs_per_s'] / seed['pairs_per_s']:.2f}x pairs/s")
    print("ms/step: per step of `pairs/step` pairs (the seed preset updates every 2 steps). data wait: time blocked "
          "fetching the next batch, % of the timed wall clock. peak mem: torch.cuda.max_memory_allocated, '-' on CPU.")
    print(f"wrote {write_results('train_step', info, s, rows, device=str(device))}")
    failed = [r["key"] for r in rows if "error" in r]
    if failed:
        print(f"rows that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
