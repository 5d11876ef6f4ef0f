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
  candidates (issue 12), each today's fast row with one change, synthetic inputs (see CANDIDATES):
    batch 128 / 192 (lr scaled as fast scales it) · compile modes max-autotune (with and without CUDA graphs),
    reduce-overhead · regional compilation · NCHW · the depthwise conv in NCHW or as a compiled kernel ·
    GELU tanh · bf16 weights with fp32 master copies · cudnn.benchmark
Every synthetic row starts from the same initial weights (seeded) and reads the same batch (a smaller batch is the
first rows of a larger one), so each prints its max abs logit difference against the fast row: on the first step
(same weights: the forward) and, for rows with fast's batch and lr, after the warm-up updates (the backward and
the optimizer too). Dropout is 0 in this benchmark (`dropout`) because eager and compiled code draw different
dropout masks; it acts only on the head's tokens.
On a CPU every row runs fp32 and compilation is off unless --compile (C++ compilation, tens of seconds per row);
rows that differ from another only by compilation are skipped then.
Images reach a bf16 model as DALI's fp16, cast to bf16 before the forward (see Trainer.step).
Warm-up steps (and compilation) are excluded; the timed region has a CUDA synchronize at both ends and no
host sync inside (except the seed's GradScaler, which syncs every update, as it did). Prints one table and
writes benchmarks/results/train_step.json after every row (a stage killed by a timeout keeps its rows).

    .venv/bin/python benchmarks/train_step.py                      # CPU: tiny backbone, 128 px, seconds
    python benchmarks/train_step.py --device cuda                   # GPU: ConvNeXt-Small, 384 px
    python benchmarks/train_step.py --rows eager_fp32,fast,fast_dali
    python benchmarks/train_step.py --rows candidates            # fast, then every candidate
"""
from __future__ import annotations

import copy
import gc
import math
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (Stopwatch, add_ratios, header, peak_memory_mib, prepared_table,  # noqa: E402
                               print_header, print_table, real_odir, reset_peak_memory, sync, synthetic_odir,
                               usable_cores, write_results)

import torch  # noqa: E402

from benchmarks.candidates import VARIANTS as CANDIDATE_VARIANTS, MasterWeights, apply_variant  # noqa: E402
from odir_dual.pipeline.constants import NUM_CLASSES  # noqa: E402


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
    rows: str = "all"  # comma list of row keys (see ROWS, CANDIDATES), all, or candidates (fast + CANDIDATES)
    seed: int = 0  # initial weights and the synthetic batch
    lr: float = 5e-5  # head lr at 12 pairs per update, scaled by sqrt(pairs per update / 12) as train.py does
    dropout: float = 0.0  # 0: logits comparable across rows (eager and compiled code draw different masks)
    # initial layer-scale value of every block (timm's `gamma`; it initialises ConvNeXt's at 1e-6, which makes each
    # block an identity at first, so a wrong block would not show in the logits: with 1e-6, 1 % noise on every
    # depthwise weight moved ConvNeXt-S's logits by 2e-7, with 0.1 by 8e-3; CPU, 128 px); 0: timm's own
    layer_scale: float = 0.1
    # stop starting rows once this many seconds have passed or the next row (as long as the longest so far) would
    # pass them; the rows not reached are listed (0: no limit). gpu_check.sh sets it inside each stage's timeout
    budget_s: float = 0
    results: str = "train_step"  # benchmarks/results/RESULTS.json (gpu_check.sh keeps the candidates apart)


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

# Issue 12's candidates: the fast row (synthetic tensors) with one change each. `batch_x`: batch as a multiple of
# fast_batch (128 and 192 pairs on a GPU); `variant`: a model or weight change from benchmarks/candidates.py.
# In the order a stage cut short should keep them: cheap eager-compatible changes first, autotuning last.
CANDIDATES = {
    "fast_b128": dict(batch_x=128 / 96),
    "fast_b192": dict(batch_x=192 / 96),
    "fast_nchw": dict(channels_last=False),
    "fast_dw_nchw": dict(variant="dw_nchw"),
    "fast_dw_shift": dict(variant="dw_shift"),
    "fast_gelu_tanh": dict(variant="gelu_tanh"),
    "fast_bf16_weights": dict(variant="bf16_weights"),
    "fast_cudnn_benchmark": dict(cudnn_benchmark=True),
    "fast_regional": dict(regional_compile=True),
    "fast_reduce_overhead": dict(compile_mode="reduce-overhead"),
    "fast_max_autotune_no_cg": dict(compile_mode="max-autotune-no-cudagraphs"),
    "fast_max_autotune": dict(compile_mode="max-autotune"),
}
NEEDS_COMPILE = {k for k, c in CANDIDATES.items() if "compile_mode" in c or "regional_compile" in c}


@dataclass(frozen=True)
class Spec:
    """What one row runs, as it will run on this device with these settings."""

    preset: str  # ablation | seed | fast
    amp: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    data: str | None  # None (synthetic tensors) | dali | reference
    batch: int  # pairs per step
    accum: int = 1  # steps per update
    compile_mode: str = "default"
    regional_compile: bool = False
    variant: str = ""  # benchmarks/candidates.py VARIANTS, or bf16_weights
    cudnn_benchmark: bool = False

    @property
    def model_setup(self) -> tuple:
        """Rows with the same model set-up may share one trainer (fast_dali continues fast's compiled model)."""
        return (self.preset, self.amp, self.channels_last, self.compile, self.batch, self.accum, self.compile_mode,
                self.regional_compile, self.variant, self.cudnn_benchmark)


def _spec(key: str, s: Settings, device) -> Spec:
    if key in CANDIDATES:
        c = dict(CANDIDATES[key])
        base = _spec("fast", s, device)
        batch = round(base.batch * c.pop("batch_x", 1.0))
        return replace(base, batch=batch, **c)
    preset, amp, cl, comp, data = ROWS[key]
    if device.type != "cuda":
        amp = "fp32"  # autocast on a CPU is not what anyone trains with: the CPU rows run fp32
    batch = {"ablation": s.batch_size, "seed": s.seed_batch, "fast": s.fast_batch}[preset]
    return Spec(preset, amp, cl, comp and s.compile, data, batch, s.seed_accum if preset == "seed" else 1)


def _label(key: str, sp: Spec) -> str:
    what = [sp.amp + (" + GradScaler" if sp.amp == "fp16" else "")] + ["channels_last"] * sp.channels_last
    what += ["compile" + (f" {sp.compile_mode}" if sp.compile_mode != "default" else "")] * sp.compile
    if key in CANDIDATES:
        change = {"batch_x": f"batch {sp.batch}", "channels_last": "NCHW",
                  "variant": {**CANDIDATE_VARIANTS, "bf16_weights": "bf16 weights, fp32 master copies"}.get(sp.variant),
                  "cudnn_benchmark": "cudnn.benchmark",
                  "regional_compile": "regional compile" if sp.compile else "regional compile (eager here)",
                  "compile_mode": f"compile {sp.compile_mode}" if sp.compile else "compile mode (eager here)"}
        return "fast + " + ", ".join(change[k] for k in CANDIDATES[key])
    name = {"ablation": "eager fp32 (baseline)" if key == "eager_fp32" else " + ".join(what)}.get(sp.preset)
    name = name or f"{sp.preset} preset ({', '.join(what)}{f', accum {sp.accum}' if sp.accum > 1 else ''})"
    return f"{name}, {DATA_NAMES[sp.data]}"


# ----------------------------------------------------------------------------------------------- one row
class Trainer:
    """A fresh model with train.py's optimizer, scaler and wrappers (`engine.make_stepper`); `step` is train.py's
    training step itself (`engine.Stepper.step`), so this benchmark times exactly what training runs. Every
    trainer starts from the same initial weights (seeded), whatever its row changes."""

    def __init__(self, s: Settings, device, sp: Spec):
        from odir_dual.model.factory import build_model
        from odir_dual.training.config import REFERENCE_BATCH, Config
        from odir_dual.training.engine import make_optimizer, make_stepper

        self.device, self.accum, self.spec = device, sp.accum, sp
        self.cfg = Config(backbone=s.backbone, pretrained=False, img_px=s.img_px, channels_last=sp.channels_last,
                          compile=sp.compile, compile_mode=sp.compile_mode,
                          regional_compile=sp.regional_compile and sp.compile, precision=sp.amp,
                          accum_steps=sp.accum, batch_size=sp.batch, dropout=s.dropout)
        torch.manual_seed(s.seed)
        model = build_model(self.cfg, pretrained=False).to(device)
        if s.layer_scale:
            with torch.no_grad():
                for name, p in model.backbone.named_parameters():
                    if name.split(".")[-1] == "gamma":
                        p.fill_(s.layer_scale)
        if sp.channels_last:
            model = model.to(memory_format=torch.channels_last)
        masters = None
        if sp.variant == "bf16_weights":
            masters, model = model, copy.deepcopy(model).to(torch.bfloat16)
        elif sp.variant:
            apply_variant(model, sp.variant)
        pos_weight = torch.full((NUM_CLASSES,), 3.0, device=device)  # BCE positive weights, as from ~25% positives
        lr = s.lr * math.sqrt(sp.batch * sp.accum / REFERENCE_BATCH)
        self.stepper = make_stepper(model, self.cfg, device, lr=lr, pos_weight=pos_weight)
        if masters is not None:
            self.stepper.optimizer = MasterWeights(make_optimizer(masters, self.cfg, lr), model, masters)
        self.stepper.set_lr(lr)
        # what train.py feeds: images in the autocast dtype (the DALI loader casts its fp16 to bf16), else fp32
        self.in_dtype = self.stepper.amp_dtype or (torch.bfloat16 if masters is not None else torch.float32)
        self.channels_last = sp.channels_last
        self.micro = 0
        self.losses = []
        self.logits = {}  # step number (1 = the first) → logits of that step, kept on the device

    def step(self, left, right, labels, keep_logits: bool = False):
        self.micro += 1
        loss, logits = self.stepper.step(left, right, labels, update=self.micro % self.accum == 0)
        self.losses.append(loss)
        if keep_logits:  # a copy: CUDA-graph outputs are overwritten by the next replay; no host sync here
            self.logits[self.micro] = logits.float().clone()

    def synthetic_batch(self, batch: int, pool: int):
        """The first `batch` pairs of one seeded pool of `pool` pairs: every row reads the same images."""
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        imgs = [torch.randn(pool, 3, self.cfg.img_px, self.cfg.img_px, generator=g)[:batch]
                .to(self.device, self.in_dtype).contiguous(memory_format=fmt) for _ in range(2)]
        labels = (torch.rand(pool, NUM_CLASSES, generator=g) < 0.3).float()[:batch].to(self.device)
        return imgs[0], imgs[1], labels

    def check_finite(self):
        loss = torch.stack(self.losses).float()
        if not torch.isfinite(loss).all():
            raise RuntimeError(f"non-finite loss in the benchmark: {loss.tolist()}")
        return float(loss[-1])


def run_row(key: str, s: Settings, device, data_table, t: Trainer | None, pool: int) -> tuple[dict, Trainer]:
    """Time one row; returns (row, trainer). `t`: the previous row's trainer when it has this row's model set-up
    (the fast preset fed by DALI continues the compiled model of the synthetic fast row: no recompilation).
    `pool`: pairs in the shared synthetic pool (the largest synthetic batch of the run)."""
    sp = _spec(key, s, device)
    batch, accum, data = sp.batch, sp.accum, sp.data
    if t is None:
        torch._dynamo.reset()  # each compiled set-up compiles its own graph: no dynamic-shape carry-over
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = sp.cudnn_benchmark
        t = Trainer(s, device, sp)
    reset_peak_memory(device)
    warmup = max(s.warmup, accum, 2 * s.workers + 1 if data == "reference" else 0)  # DataLoader: drain prefetch
    warmup = math.ceil(warmup / accum) * accum  # whole updates only
    steps = math.ceil((s.data_steps if data else s.steps) / accum) * accum
    fetch, close = _batches(t, data, batch, data_table, s, device, warmup + steps, pool)
    first = t.micro + 1  # a trainer continued from the row before has stepped already: no comparable logits
    t0 = time.perf_counter()
    for i in range(warmup):
        t.step(*fetch(), keep_logits=data is None and first == 1 and i == 0)
    sync(device)
    warmup_s = time.perf_counter() - t0
    data_s = 0.0
    with Stopwatch(device) as sw:
        for i in range(steps):
            d0 = time.perf_counter()
            batch_ = fetch()
            data_s += time.perf_counter() - d0
            t.step(*batch_, keep_logits=data is None and first == 1 and i == 0)
    last_loss = t.check_finite()
    pairs = batch * steps
    row = {"key": key, "setting": _label(key, sp), "preset": sp.preset, "batch": batch, "accum": accum,
           "precision": sp.amp, "channels_last": sp.channels_last, "compile": sp.compile,
           "compile_mode": sp.compile_mode, "regional_compile": sp.regional_compile, "variant": sp.variant,
           "cudnn_benchmark": sp.cudnn_benchmark, "data": data or "synthetic", "steps": steps,
           "seconds": round(sw.seconds, 3), "pairs_per_s": round(pairs / sw.seconds, 2),
           "images_per_s": round(2 * pairs / sw.seconds, 2), "ms_per_step": round(1000 * sw.seconds / steps, 1),
           "data_wait_pct": round(100 * data_s / sw.seconds, 2) if data else None,
           "peak_mem_mib": peak_memory_mib(device), "warmup_s": round(warmup_s, 1), "last_loss": round(last_loss, 4)}
    close()
    return row, t


def logit_differences(spec: Spec, logits: dict, ref_spec: Spec | None, ref_logits: dict | None) -> dict:
    """Max abs logit difference against the fast row (`ref_*`): on the first step (same initial weights, the first
    pairs of the same batch: the forward) and on the first step after the warm-up updates, only when the row has
    fast's batch and accumulation (the same updates: the backward and the optimizer too)."""
    if not logits or not ref_logits:
        return {"dlogit_first": None, "dlogit_after": None}
    first, ref_first = logits[min(logits)], ref_logits[min(ref_logits)]
    n = min(len(first), len(ref_first))
    out = {"dlogit_first": float((first[:n] - ref_first[:n]).abs().max()), "dlogit_after": None}
    if (spec.batch, spec.accum) == (ref_spec.batch, ref_spec.accum) and logits.keys() == ref_logits.keys():
        out["dlogit_after"] = float((logits[max(logits)] - ref_logits[max(ref_logits)]).abs().max())
    return {k: None if v is None else float(f"{v:.3g}") for k, v in out.items()}


def select_rows(s: Settings, device) -> list[str]:
    """The row keys of --rows in run order, less those this device or these settings cannot run differently."""
    if s.rows in ("all", "candidates"):
        keys = (list(ROWS) if s.rows == "all" else ["fast"]) + list(CANDIDATES)
    else:
        keys = [k.strip() for k in s.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS and k not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from all, candidates, {', '.join([*ROWS, *CANDIDATES])}")
    if any(k in CANDIDATES for k in keys) and "fast" not in keys:
        keys.insert(next(i for i, k in enumerate(keys) if k in CANDIDATES), "fast")  # the reference comes first
    skip = set()
    if device.type != "cuda":
        skip |= {"bf16", "fast_cudnn_benchmark"}  # autocast and cuDNN: GPU-only
    if not s.compile:
        skip |= {"compile", "all"} | NEEDS_COMPILE  # they would repeat eager rows
    if skip & set(keys):
        print(f"skipped on this device/settings (they would repeat another row): "
              f"{', '.join(k for k in keys if k in skip)}")
    return [k for k in keys if k not in skip]


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _batches(t: Trainer, data, batch, table, s: Settings, device, n_steps, pool):
    """(fetch, close): fetch() returns the next (left, right, labels) on the device."""
    if data is None:
        fixed = t.synthetic_batch(batch, pool)
        return (lambda: fixed), (lambda: None)
    if data == "dali":
        from odir_dual.pipeline.dali import Augment, train_loader

        loader = train_loader(table, batch, s.img_px, device, augment=Augment(), seed=s.seed, dtype=t.in_dtype,
                              num_threads=s.dali_threads or None)
        return (lambda: loader.next_batch()[:3]), (lambda: None)
    from odir_dual.pipeline.odir import label_matrix
    from odir_dual.pipeline.reference import reference_loader

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
    keys = select_rows(s, device)
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
    if any(_spec(k, s, device).data for k in keys):
        real = real_odir()
        folder = real if real is not None else synthetic_odir(s.data_patients, s.data_src_px, s.data_src_px)
        data_table, _ = prepared_table(folder, s.img_px, n_patients=s.data_patients)
        print(f"data rows read {len(data_table)} patients prepared at {s.img_px} px from "
              f"{'the real ODIR-5K subset' if real is not None else 'synthetic originals'} ({folder})")
    rows, trainer, reference = [], None, None
    pool = max(_spec(k, s, device).batch for k in keys)  # every synthetic batch: the first rows of this pool
    t_start, longest_s, not_reached = time.perf_counter(), 0.0, []
    for key in keys:
        elapsed = time.perf_counter() - t_start
        if s.budget_s and (not_reached or elapsed + longest_s > s.budget_s):
            not_reached.append(key)
            continue
        t_row = time.perf_counter()
        print(f"  {key} ...", end=" ", flush=True)
        if trainer is not None and trainer.spec.model_setup != _spec(key, s, device).model_setup:
            trainer = None  # a different model set-up: free the last one before building the next
            _free(device)
        try:
            row, trainer = run_row(key, s, device, data_table, trainer, pool)
            if key == "fast":  # the reference: its spec and logits only (its model is freed with the next row)
                reference = (trainer.spec, dict(trainer.logits))
            row.update(logit_differences(trainer.spec, trainer.logits, *(reference or (None, None))))
        except Exception as e:  # noqa: BLE001 - out of memory or a failing set-up: report it, time the other rows
            trainer = None
            _free(device)
            what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"FAILED: {type(e).__name__}"
            row = {"key": key, "setting": f"{_label(key, _spec(key, s, device))} ({what})",
                   "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            traceback.print_exc()
        rows.append(row)
        longest_s = max(longest_s, time.perf_counter() - t_row)
        print(f"{row.get('pairs_per_s', '-')} pairs/s, {row.get('ms_per_step', '-')} ms/step "
              f"(warm-up incl. compile {row.get('warmup_s', '-')} s), max |logit - fast's| "
              f"{row.get('dlogit_first', '-')} (step 1), {row.get('dlogit_after', '-')} (after warm-up)", flush=True)
        add_ratios(rows, next((r for r in rows if r["key"] == "eager_fp32"), None))
        add_ratios(rows, next((r for r in rows if r["key"] == "fast" and "error" not in r), None), out="x_fast")
        write_results(s.results, info, s, rows, device=str(device), not_reached=not_reached)
    print()
    print_table(rows, [("setting", "setting", "{}"), ("batch", "pairs/step", "{}"),
                       ("images_per_s", "images/s", "{:.1f}"), ("pairs_per_s", "pairs/s", "{:.2f}"),
                       ("ms_per_step", "ms/step", "{:.1f}"), ("data_wait_pct", "data wait %", "{:.1f}"),
                       ("peak_mem_mib", "peak mem MiB", "{:.0f}"), ("x_baseline", "x eager fp32", "{:.2f}"),
                       ("x_fast", "x fast", "{:.2f}"), ("warmup_s", "warm-up s", "{:.1f}"),
                       ("dlogit_first", "dlogit step 1", "{:.2e}"), ("dlogit_after", "dlogit later", "{:.2e}")])
    seed, fast = (next((r for r in rows if r["key"] == k and "pairs_per_s" in r), None) for k in ("seed_pil",
                                                                                                  "fast_dali"))
    if seed and fast:
        print(f"fast + DALI vs seed + PIL (the seed's way): {fast['pairs_per_s'] / seed['pairs_per_s']:.2f}x pairs/s")
    print("ms/step: per step of `pairs/step` pairs (the seed preset updates every 2 steps). data wait: time blocked "
          "fetching the next batch, % of the timed wall clock. peak mem: torch.cuda.max_memory_allocated, '-' on CPU.")
    print("x fast: pairs/s against the fast row of this run. warm-up s: the untimed first steps, compilation "
          "included. dlogit: max abs difference of the row's logits from the fast row's on the same pairs and the "
          "same initial weights, on step 1 and on the first step after the warm-up updates ('-': other batch/lr).")
    print(f"wrote {write_results(s.results, info, s, rows, device=str(device), not_reached=not_reached)}")
    if not_reached:
        print(f"not reached within --budget-s {s.budget_s:.0f}: {', '.join(not_reached)} (run them with --rows)")
    failed = [r["key"] for r in rows if "error" in r]
    if failed:
        print(f"rows that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
