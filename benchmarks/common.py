"""Shared helpers for the benchmark scripts: settings + CLI, hardware header, honest timers, table, JSON.

Every benchmark is a plain script: a `Settings` dataclass at its top holds the CPU defaults (small, seconds on
2 cores) and a dict of GPU overrides (full size); `settings_from_cli` turns the fields into flags. The script
prints `header()` first, then one table (`print_table`), and writes `benchmarks/results/NAME.json`
(`write_results`) so `benchmarks/gpu_check.sh` can summarise it.

    from benchmarks.common import ...   # or, from a script in benchmarks/: sys.path.insert(0, repo root)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS_DIR = ROOT / "benchmarks" / "results"
# ../shared/data/odir5k-256 beside the repository: the real 2,239-patient ODIR-5K subset at 256 px (absent in a
# user's fresh clone: benchmarks then fall back to synthetic data).
REAL_ODIR = ROOT.parent / "shared" / "data" / "odir5k-256"

if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` import the project's packages
    sys.path.insert(0, str(ROOT))

from odir_dual.pipeline.host import atomic_write, cache_root, usable_cores  # noqa: E402  (re-exported for the scripts)


# ----------------------------------------------------------------------------------------------- settings


def settings_from_cli(cls, gpu_overrides: dict, argv=None, description: str = ""):
    """(settings, device): `cls()` defaults, GPU overrides when the device is CUDA, then the explicit flags.

    Every dataclass field becomes a flag (`img_px` → `--img-px`), exactly as train.py's Config fields do
    (`config.add_dataclass_flags`); `--device` picks cpu/cuda (default: cuda when available). Explicit flags always
    win over the GPU overrides.
    """
    import torch

    from odir_dual.training.config import add_dataclass_flags, explicit_values

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_dataclass_flags(p, cls, lambda f: f"CPU default {f.default!r}; GPU {gpu_overrides.get(f.name, f.default)!r}")
    args = explicit_values(p.parse_args(argv))
    device = args.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    values = dict(gpu_overrides) if device.startswith("cuda") else {}
    values.update(args)
    return cls(**values), torch.device(device)


# ----------------------------------------------------------------------------------------------- header


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(device=None) -> dict:
    """Hardware, library versions and git commit as a dict; `print_header` prints it."""
    import numpy as np
    import torch

    info = {
        "cpu": cpu_model(), "cores_usable": usable_cores(), "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2), "host": platform.node(),
        "python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for mod, key in (("torchvision", "torchvision"), ("timm", "timm"), ("nvidia.dali", "dali"),
                     ("onnxruntime", "onnxruntime"), ("PIL", "pillow")):
        try:
            info[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is reported, not fatal
            info[key] = None
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        idx = (torch.device(device).index or 0) if device is not None else 0
        prop = torch.cuda.get_device_properties(idx)
        info.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                    gpu_capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    else:
        info["gpu"] = None
    try:
        from odir_dual.training.checkpoint import git_commit

        info["commit"] = git_commit()
    except Exception:  # noqa: BLE001
        info["commit"] = "unknown"
    return info


def print_header(info: dict, title: str) -> None:
    gpu = (f"GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['gpu_capability']}, CUDA {info['cuda']}, "
           f"cuDNN {info['cudnn']})" if info.get("gpu") else "GPU: none (CPU run)")
    print(f"== {title} · commit {info['commit']} · {info['time']}")
    print(f"CPU: {info['cpu']} · {info['cores_usable']} usable cores (cpu_count {info['cpu_count']}) · "
          f"load avg {info['load_avg_1min']:.2f} at start · {gpu}")
    libs = " · ".join(f"{k} {info[k]}" for k in ("python", "torch", "torchvision", "timm", "dali", "onnxruntime",
                                                   "pillow", "numpy") if info.get(k))
    print(libs, flush=True)


# ----------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for queued GPU work (no-op on the CPU): call at both ends of every timed region."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`with Stopwatch(device) as t: ...` then `t.seconds`: wall clock with a CUDA synchronize at both ends."""

    def __init__(self, device="cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def reset_peak_memory(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, MiB; None on the CPU (not measured)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def device_memory_used_mib(device) -> float | None:
    """Memory in use on the whole GPU (all allocators: DALI's and torch's), MiB; None on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return round((total - free) / 2**20, 1)


# ----------------------------------------------------------------------------------------------- output

# (key, title, format) of the standard columns; a value of None prints as "-".
STANDARD_COLUMNS = [
    ("setting", "setting", "{}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("pairs_per_s", "pairs/s", "{:.1f}"),
    ("ms_per_step", "ms/step", "{:.1f}"),
    ("peak_mem_mib", "peak mem MiB", "{:.0f}"),
    ("x_baseline", "x baseline", "{:.2f}"),
]


def print_table(rows: list[dict], columns=None) -> None:
    """Rows of dicts as an aligned text table; `columns` is a list of (key, title, format)."""
    columns = columns or STANDARD_COLUMNS
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    sys.stdout.flush()


def add_ratios(rows: list[dict], baseline: dict | None, key: str = "pairs_per_s", out: str = "x_baseline") -> None:
    """rows[i][out] = rows[i][key] / baseline[key] where both are known."""
    base = (baseline or {}).get(key)
    for r in rows:
        r[out] = round(r[key] / base, 3) if base and r.get(key) else None


def write_results(name: str, info: dict, settings, rows: list[dict], **extra) -> Path:
    """benchmarks/results/NAME.json: {"header", "settings", "rows", ...extra}, written atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    settings = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
    with atomic_write(path) as f:
        f.write(json.dumps({"header": info, "settings": settings, "rows": rows, **extra}, indent=1, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- data


def real_odir() -> Path | None:
    """The real ODIR-5K subset beside the repository, or None when it is absent."""
    return REAL_ODIR if (REAL_ODIR / "data.xlsx").is_file() else None


def synthetic_odir(n_patients: int, min_px: int, max_px: int, seed: int = 0) -> Path:
    """A synthetic ODIR folder, generated once into the project cache ($ODIR_CACHE/synthetic, as train.py)."""
    from odir_dual.pipeline.synthetic import ensure_synthetic_odir

    return ensure_synthetic_odir(cache_root() / "synthetic", n_patients=n_patients, seed=seed, min_px=min_px,
                                 max_px=max_px)


def prepared_table(folder, short_px: int, n_patients: int | None = None, workers: int | None = None):
    """The first n patients of an ODIR folder with both eyes prepared at short_px (cached as train.py does).

    Returns (table, original_table): left/right point at the prepared copies, resp. at the source files.
    """
    from odir_dual.pipeline.pairs import default_cache, find_pairs, prepare_pairs

    table = find_pairs(folder).table
    table = table[table["status"] == "ok"]
    table = prepare_pairs(table.head(n_patients) if n_patients else table, default_cache(), short_px,
                          workers=workers, progress=False)
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    originals = ok.drop(columns=["left_prepared", "right_prepared"])
    prepared = ok.drop(columns=["left", "right"]).rename(columns={"left_prepared": "left", "right_prepared": "right"})
    return prepared, originals
