"""Inference throughput: onnxruntime vs PyTorch eager and torch.compile, same model, same batch, one run.

Builds the dual-eye network (random weights: speed does not depend on them), exports it with export.py's exporter
(fp32, and fp16 on CUDA), then times, interleaved over a few rounds so a busy shared machine hurts every setting
alike: PyTorch eager, torch.compile (default mode; compilation is warm-up and excluded), onnxruntime (CPU provider
with one intra-op thread per usable core and every graph optimisation; on CUDA the CUDA provider with I/O binding of
torch device tensors, as score.py does). Inputs are random tensors already on the device, so this is the model's
speed, not the image pipeline's (benchmarks/loader.py measures that). ms/batch is the median over all timed
batches (each synchronised on CUDA); pairs/s = batch / median.

    .venv/bin/python benchmarks/infer.py               # CPU defaults: resnet10t 128 px, batch 4 (~2 min on 2 cores)
    .venv/bin/python benchmarks/infer.py --backbone convnext_small --img-px 192   # larger CPU run
    # on a GPU the defaults become convnext_small, 384 px, batch 64, fp16 rows added

Prints the hardware, library versions and one table; writes benchmarks/results/infer.json.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (add_ratios, header, print_header, print_table, settings_from_cli,  # noqa: E402
                               sync, usable_cores, write_results)
from odir_dual.pipeline.constants import NUM_CLASSES  # noqa: E402


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    backbone: str = "resnet10t"  # CPU default: a backbone that runs in reasonable time on 2 cores
    img_px: int = 128  # input side, pixels
    batch_size: int = 4  # pairs per batch (2 × batch images through the backbone)
    embed_dim: int = 512  # head width, as the training default
    heads: int = 8
    warmup: int = 2  # untimed batches per setting after compilation / session creation
    rounds: int = 5  # timed rounds; every setting runs once per round, in turn
    iters: int = 4  # timed batches per setting per round
    compile: bool = True  # include torch.compile rows
    fp16: bool = True  # include fp16 rows (CUDA only: CPU fp16 is not a deployment target)
    channels_last: bool = True  # PyTorch model and inputs in channels_last (what train.py and DALI use)
    threads: int = 0  # CPU threads for torch and onnxruntime; 0: the usable cores
    opset: int = 20


GPU = dict(backbone="convnext_small", img_px=384, batch_size=64, warmup=5, rounds=5, iters=10)
COLUMNS = [("setting", "setting", "{}"), ("pairs_per_s", "pairs/s", "{:.1f}"), ("ms_per_batch", "ms/batch", "{:.1f}"),
           ("x_baseline", "ratio vs eager fp32", "{:.2f}")]


# ---------------------------------------------------------------------------------------------------- runners
def build_net(s: Settings):
    from odir_dual.model.factory import build_model
    from odir_dual.training.config import resolve_config

    cfg = resolve_config({"backbone": s.backbone, "pretrained": False, "img_px": s.img_px,
                          "embed_dim": s.embed_dim, "heads": s.heads})
    return build_model(cfg, pretrained=False).eval()


def torch_runner(net, left, right, compile_: bool):
    """A no-argument callable running one batch; compilation happens on its first call (warm-up)."""
    import torch

    fn = torch.compile(net) if compile_ else net

    def run():
        with torch.no_grad():
            return fn(left, right)

    return run


def ort_runner(net, s: Settings, left, right, device, fp16: bool, tmp: Path):
    """Export `net`, open an onnxruntime session (CPU or CUDA) and return (run, export seconds, exporter)."""
    import onnx
    import torch

    from odir_dual import export
    from odir_dual.deploy.runtime import ort_session

    t0 = time.perf_counter()
    proto, used, _ = export.to_onnx_proto(net.float().to(memory_format=torch.contiguous_format), s.img_px,
                                          fp16=fp16, opset=s.opset)
    path = tmp / f"model_{'fp16' if fp16 else 'fp32'}.onnx"
    onnx.save(proto, str(path))
    export_s = time.perf_counter() - t0
    threads = s.threads or usable_cores()
    if device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        session = ort_session(path, providers, threads)
        np_dtype = np.float16 if fp16 else np.float32
        ins = {"left": left.contiguous(), "right": right.contiguous()}  # dense NCHW device buffers
        probs = torch.empty((left.shape[0], NUM_CLASSES), device=device)
        binding = session.io_binding()
        for name, t in ins.items():
            binding.bind_input(name, "cuda", device.index or 0, np_dtype, tuple(t.shape), t.data_ptr())
        binding.bind_output("probs", "cuda", device.index or 0, np.float32, tuple(probs.shape), probs.data_ptr())
        binding.bind_output("logits", "cuda", device.index or 0)

        def run(_keep=(ins, probs)):  # the bound device buffers must outlive the binding
            session.run_with_iobinding(binding)

    else:
        session = ort_session(path, threads=threads)
        feeds = {"left": left.contiguous().numpy(), "right": right.contiguous().numpy()}

        def run():
            session.run(["probs"], feeds)

    return run, export_s, used


def time_batches(run, device, n: int) -> list[float]:
    """Seconds per batch, each synchronised at both ends on CUDA."""
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    import torch

    s, device = settings_from_cli(Settings, GPU, argv, description=__doc__)
    threads = s.threads or usable_cores()
    torch.set_num_threads(threads)
    info = header(device)
    print_header(info, f"inference: onnxruntime vs PyTorch · {s.backbone} · {s.img_px} px · batch {s.batch_size} "
                       f"pairs · {threads} CPU threads")
    torch.manual_seed(0)
    net = build_net(s).to(device)
    dtypes = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if s.fp16 and device.type == "cuda" else [])
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(s.batch_size, 3, s.img_px, s.img_px, generator=g) for _ in range(2)]

    runners, extra = {}, {}  # setting → run; setting → {compile_s | export_s, error}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in dtypes:
            left, right = (x.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for x in base)
            model = copy.deepcopy(net).to(dtype=dtype, memory_format=fmt).eval()
            runners[f"pytorch eager {label}"] = torch_runner(model, left, right, compile_=False)
            if s.compile:
                runners[f"torch.compile {label}"] = torch_runner(model, left, right, compile_=True)
            name = f"onnxruntime {label}" + (" (CUDA, I/O binding)" if device.type == "cuda" else " (CPU)")
            try:
                runners[name], export_s, used = ort_runner(copy.deepcopy(net).cpu(), s, left, right, device,
                                                           label == "fp16", Path(tmp))
                extra[name] = {"export_s": round(export_s, 1), "exporter": used}
            except Exception as e:  # noqa: BLE001 - report the failed setting, time the others
                extra[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(f"{name}: failed ({extra[name]['error']})", flush=True)

        for name, run in list(runners.items()):  # warm-up; compilation happens here and is excluded
            t0 = time.perf_counter()
            try:
                for _ in range(max(1, s.warmup)):
                    run()
                sync(device)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor on this host
                extra.setdefault(name, {})["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{name}: failed ({extra[name]['error']})", flush=True)
                del runners[name]
                continue
            if name.startswith("torch.compile"):
                extra.setdefault(name, {})["compile_and_warmup_s"] = round(time.perf_counter() - t0, 1)
            print(f"  warm: {name} ({time.perf_counter() - t0:.1f} s)", flush=True)

        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(s.rounds):  # interleaved: a burst of load from other processes hits every setting
            for name, run in runners.items():
                times[name] += time_batches(run, device, s.iters)

    rows = []
    for name in [*runners, *(n for n in extra if n not in runners)]:
        t = times.get(name)
        row = {"setting": name, **extra.get(name, {})}
        if t:
            med = statistics.median(t)
            row.update(pairs_per_s=round(s.batch_size / med, 2), ms_per_batch=round(1000 * med, 2),
                       ms_mean=round(1000 * statistics.fmean(t), 2),
                       ms_std=round(1000 * statistics.stdev(t), 2) if len(t) > 1 else 0.0, batches=len(t))
        rows.append(row)
    add_ratios(rows, next((r for r in rows if r["setting"] == "pytorch eager fp32"), None))
    print()
    print_table(rows, COLUMNS)
    for r in rows:
        notes = [f"{k} {r[k]}" for k in ("export_s", "exporter", "compile_and_warmup_s", "error") if k in r]
        if notes:
            print(f"  {r['setting']}: " + " · ".join(notes))
    load = os.getloadavg()[0]
    busy = device.type == "cpu" and max(load, info["load_avg_1min"]) > usable_cores()
    if busy:  # seen on a shared 2-core host: eager fp32 1232 ms/batch with 2 threads, 191 ms with 1 (load 8)
        print(f"note: load average {load:.1f} on {usable_cores()} cores: other processes compete for the CPU, and "
              "multi-threaded PyTorch eager suffers most (each op waits for descheduled OpenMP threads); "
              "compare with --threads 1")
    path = write_results("infer", info, s, rows, device=str(device), busy_host=busy, load_avg_end=round(load, 2))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
