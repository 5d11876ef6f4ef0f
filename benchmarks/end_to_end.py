"""Wall clock of a whole `fast` training run on a data set of ODIR-5K's size, as a user would start it.

`python train.py --preset fast --data FOLDER --no-pretrained --epochs N` runs as a subprocess, from launch to
exit: start-up, model build, torch.compile, every epoch's training, validation and checkpoints, the final report.
The data set is ODIR-5K-sized: 3,500 patients split 85/15 (2,975 training pairs, 525 validation), synthetic
(pipeline.synthetic, generated once into the cache) unless --data names a real ODIR folder. Preparing the images
(crop, resize, re-encode: done once per data set and image size) is done and timed BEFORE the run, so the run
finds its cache up to date, as every run after a user's first does.

Epoch ends are taken from the run's metrics.csv (a row is appended after each validation), so the first epoch
(start-up + compilation) and the steady epochs are reported apart. With --time-limit-s the run is asked to stop
(SIGTERM: train.py finishes its update and writes last.pt) at the limit; the table then shows the epochs done and
a clearly marked projection for all N. Prints one table; writes benchmarks/results/end_to_end.json.

    .venv/bin/python benchmarks/end_to_end.py           # CPU: 240 patients, tiny backbone, 1 epoch, ~1 min
    python benchmarks/end_to_end.py --device cuda        # GPU: 3,500 patients, ConvNeXt-S, 384 px, 25 epochs
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (ROOT, header, prepared_table, print_header, print_table,  # noqa: E402
                               synthetic_odir, write_results)


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:  # CPU defaults: a tenth of the data, a tiny backbone, one epoch
    data: str = ""  # an ODIR folder; empty: a synthetic set of n_patients
    n_patients: int = 240  # synthetic patients (3,500 = 2,975 train + 525 validation at val_fraction 0.15)
    synth_min_px: int = 400  # synthetic image widths, px (only their prepared copies are read in training)
    synth_max_px: int = 900
    epochs: int = 1
    backbone: str = "test_convnext"  # the fast preset's convnext_small on a GPU
    img_px: int = 64
    batch_size: int = 32  # the fast preset's 96 on a GPU
    compile: bool = False  # the fast preset compiles; on a CPU that alone takes minutes
    loader_threads: int = 0  # 0: train.py's default
    time_limit_s: float = 0  # ask the run to stop after this many seconds (0: no limit)
    extra: str = ""  # more train.py flags, space separated


GPU = dict(n_patients=3500, epochs=25, backbone="convnext_small", img_px=384, batch_size=96, compile=True)


# ----------------------------------------------------------------------------------------------- run
def run_training(cmd: list[str], run_dir: Path, time_limit_s: float, log_path: Path, env: dict) -> dict:
    """Launch train.py, echo its stdout, note when each metrics.csv row appears; stop it at the time limit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                lines.append(line)
                print("  | " + line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        epoch_end_s: list[float] = []
        stopped_at = None
        metrics = run_dir / "metrics.csv"
        while proc.poll() is None:
            time.sleep(0.1)
            n = _count_rows(metrics)
            while len(epoch_end_s) < n:
                epoch_end_s.append(time.perf_counter() - t0)
            if time_limit_s and stopped_at is None and time.perf_counter() - t0 > time_limit_s:
                stopped_at = time.perf_counter() - t0
                print(f"  (time limit {time_limit_s:.0f} s reached: SIGTERM, train.py stops after this update)")
                proc.send_signal(signal.SIGTERM)
            if stopped_at is not None and time.perf_counter() - t0 > stopped_at + 90:
                proc.kill()
        total_s = time.perf_counter() - t0
        reader.join(timeout=5)
    n = _count_rows(metrics)
    while len(epoch_end_s) < n:  # an epoch that ended in the last 0.1 s
        epoch_end_s.append(total_s)
    return {"returncode": proc.returncode, "total_s": total_s, "epoch_end_s": epoch_end_s, "stopped_at_s": stopped_at,
            "stdout": lines}


def _count_rows(path: Path) -> int:
    try:
        with open(path) as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from benchmarks.common import settings_from_cli

    s, device = settings_from_cli(Settings, GPU, argv, __doc__)
    info = header(device)
    print_header(info, "benchmarks/end_to_end.py: a whole fast-preset training run")
    print(f"settings: {s} · device {device}")

    t = time.perf_counter()
    folder = Path(s.data) if s.data else synthetic_odir(s.n_patients, s.synth_min_px, s.synth_max_px)
    data_s = time.perf_counter() - t
    t = time.perf_counter()
    table, _ = prepared_table(folder, s.img_px)
    prepare_s = time.perf_counter() - t
    print(f"data: {folder} · {len(table)} usable patients · generate/find {data_s:.1f} s · prepare at {s.img_px} px "
          f"{prepare_s:.1f} s (cached after the first time; not part of the run below)")

    out = Path(tempfile.mkdtemp(prefix="e2e_runs_"))
    cmd = [sys.executable, "train.py", "--preset", "fast", "--data", str(folder), "--no-pretrained",
           "--out", str(out), "--name", "e2e", "--epochs", str(s.epochs), "--backbone", s.backbone,
           "--img-px", str(s.img_px), "--batch-size", str(s.batch_size),
           "--compile" if s.compile else "--no-compile", *s.extra.split()]
    if s.loader_threads:
        cmd += ["--loader-threads", str(s.loader_threads)]
    print("run: " + " ".join(cmd), flush=True)
    try:
        # train.py picks its device itself (CUDA when visible): hide the GPU for --device cpu
        env = {"CUDA_VISIBLE_DEVICES": ""} if device.type != "cuda" else {}
        r = run_training(cmd, out / "e2e", s.time_limit_s, out / "stderr.log", env)
        metrics = read_metrics(out / "e2e" / "metrics.csv")
        if r["returncode"] != 0 and r["stopped_at_s"] is None:
            print("train.py failed; the end of its stderr:\n" + "".join((out / "stderr.log").read_text()
                                                                         .splitlines(True)[-30:]))
            return 1
    finally:
        shutil.rmtree(out, ignore_errors=True)

    text = "".join(r["stdout"])
    m = re.search(r"split \(seed \d+\): train (\d+) · validation (\d+)", text)
    n_train, n_val = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"(\d+) updates/epoch of (\d+) pairs", text)
    pairs_per_epoch = int(m.group(1)) * int(m.group(2)) if m else None

    ends = r["epoch_end_s"]
    done = len(ends)
    walls = [b - a for a, b in zip([0.0] + ends[:-1], ends)]  # wall clock per epoch, training + validation
    steady = statistics.median(walls[1:]) if done >= 2 else None
    rows = []
    if done:
        rows.append({"setting": f"first epoch (start-up, {'compilation, ' if s.compile else ''}training, validation)",
                     "seconds": walls[0], "pairs_per_s": pairs_per_epoch / walls[0] if pairs_per_epoch else None})
    if steady:
        rows.append({"setting": f"steady epoch (median of epochs 2-{done}, with validation)", "seconds": steady,
                     "pairs_per_s": pairs_per_epoch / steady if pairs_per_epoch else None})
        train_rates = [float(row["pairs_per_s"]) for row in metrics[1:] if row.get("pairs_per_s")]
        if train_rates:
            rows.append({"setting": "steady epoch, training loop only (train.py's pairs/s, median)",
                         "seconds": pairs_per_epoch / statistics.median(train_rates) if pairs_per_epoch else None,
                         "pairs_per_s": statistics.median(train_rates),
                         "data_wait_pct": statistics.median(100 * float(row["data_s"]) / float(row["epoch_s"])
                                                            for row in metrics[1:] if row.get("data_s"))})
    finished = done >= s.epochs and r["stopped_at_s"] is None
    rows.append({"setting": f"whole run, {done} of {s.epochs} epochs{'' if finished else ' (stopped at the limit)'}",
                 "seconds": r["total_s"], "epochs": done,
                 "pairs_per_s": done * pairs_per_epoch / r["total_s"] if pairs_per_epoch and done else None})
    projected = None
    if not finished and steady and done:
        projected = ends[0] + (s.epochs - 1) * steady
        rows.append({"setting": f"PROJECTED {s.epochs} epochs: first epoch + {s.epochs - 1} x steady epoch",
                     "seconds": projected, "projected": True,
                     "pairs_per_s": s.epochs * pairs_per_epoch / projected if pairs_per_epoch else None})
    for row in rows:
        row["seconds"] = round(row["seconds"], 2) if row.get("seconds") is not None else None
        row["pairs_per_s"] = round(row["pairs_per_s"], 1) if row.get("pairs_per_s") is not None else None
    print()
    print_table(rows, [("setting", "setting", "{}"), ("seconds", "seconds", "{:.1f}"),
                       ("pairs_per_s", "pairs/s", "{:.1f}"), ("data_wait_pct", "data wait %", "{:.1f}")])
    print(f"{n_train} training / {n_val} validation patients; {pairs_per_epoch} training pairs per epoch (whole "
          f"batches of {s.batch_size}); {len(table)} patients prepared. pairs/s counts training pairs only.")
    summary = {"epochs_requested": s.epochs, "epochs_done": done, "finished": finished, "total_s": round(r["total_s"], 2),
               "first_epoch_s": round(walls[0], 2) if done else None,
               "steady_epoch_s": round(steady, 2) if steady else None,
               "projected_total_s": round(projected, 1) if projected else None, "n_train": n_train, "n_val": n_val,
               "pairs_per_epoch": pairs_per_epoch, "prepare_s": round(prepare_s, 1), "epoch_walls_s": walls,
               "metrics": metrics}
    print(f"wrote {write_results('end_to_end', info, s, rows, device=str(device), summary=summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
