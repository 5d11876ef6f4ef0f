"""The run folder and the console: claiming the folder (`run_folder`: exclusive, locked), metrics history (CSV),
curves (PNG), TensorBoard scalars (--tensorboard), the per-epoch table, the final report, and train.log (everything
printed: `console_log`).

Only rank 0 writes; train.py decides what goes in, this module decides how it looks.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from pipeline.constants import CLASSES
from pipeline.host import atomic_write, remove_stale_temporaries


class RunLog:
    """`runs/NAME/metrics.csv` (one row per epoch, rewritten atomically) and `curves.png` drawn from it; with
    tensorboard=True also every number of the row as a TensorBoard scalar (RUN/tensorboard, x = epoch)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = run_dir / "metrics.csv"
        self.tb = _tensorboard_writer(run_dir / "tensorboard") if tensorboard else None

    def history(self) -> list[dict]:
        if not self.csv.exists():
            return []
        with open(self.csv) as f:
            return list(csv.DictReader(f))

    def append(self, row: dict, keep_epochs_below: int | None = None):
        """Add an epoch's row; rows of epochs >= keep_epochs_below (left by an interrupted run) are dropped."""
        rows = [r for r in self.history() if keep_epochs_below is None or int(r["epoch"]) < keep_epochs_below]
        rows.append({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})
        with atomic_write(self.csv, newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[-1]))
            w.writeheader()
            w.writerows(rows)
        self.plot(rows)
        if self.tb is not None:  # losses, metrics, learning rate, throughput: every number of the row
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, int(row["epoch"]))
            self.tb.flush()

    def plot(self, rows):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [int(r["epoch"]) for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key in ("train_loss", "val_loss"):
            a.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
        for key in ("train_f1_macro", "val_f1_macro", "val_f1_micro", "val_odir"):
            b.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
        a.set_xlabel("epoch"), b.set_xlabel("epoch"), a.legend(), b.legend(), b.set_ylim(0, 1)
        a.set_title("loss"), b.set_title("F1 macro/micro at 0.5; ODIR = official score")
        fig.tight_layout()
        fig.savefig(self.dir / "curves.png", dpi=90)
        plt.close(fig)


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter, or None with one line saying how to get one."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module needs the tensorboard package
        print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); the same numbers "
              "are in metrics.csv")
        return None
    return SummaryWriter(str(folder))


# The console's epoch row (metrics.csv keeps every figure, per-class F1 included): metrics.csv key → (title, width,
# format). Validation figures are at threshold 0.5 with the raw sigmoid, as metrics.csv.
EPOCH_COLUMNS = {"train_loss": ("train loss", 10, ".4f"), "val_loss": ("val loss", 8, ".4f"),
                 "val_auc_macro": ("AUC macro", 9, ".3f"), "val_f1_macro": ("F1 macro", 8, ".3f"),
                 "val_odir": ("ODIR", 6, ".3f"), "lr": ("lr", 8, ".2e"), "epoch_s": ("sec", 7, ".1f"),
                 "pairs_per_s": ("pairs/s", 8, ".1f"), "data_pct": ("data %", 6, ".0f")}
SELECT_COLUMN = {"f1_macro": "val_f1_macro", "auc_macro": "val_auc_macro", "loss": "val_loss"}  # --select-metric


def epoch_header(epochs: int, select_metric: str) -> list[str]:
    """The two lines above the first epoch row: what the row holds, then the column titles."""
    title = EPOCH_COLUMNS[SELECT_COLUMN[select_metric]][0]
    return [f"* = new best validation {title} (--select-metric) → best.pt · at threshold 0.5 · per class: "
            f"metrics.csv",
            f"{'epoch':>{_epoch_width(epochs)}}  " + "  ".join(f"{t:>{w}}" for t, w, _ in EPOCH_COLUMNS.values())]


def format_epoch(row: dict, epochs: int, best: bool = False) -> str:
    """One epoch's row: 3/14, losses, AUC and F1 macro, ODIR, learning rate, seconds, pairs/s, data %, `*` if best."""
    cells = [f"{row['epoch']}/{epochs}".rjust(_epoch_width(epochs))]
    for key, (_, width, fmt) in EPOCH_COLUMNS.items():
        value = row.get(key)
        cells.append(f"{value:>{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}")
    return "  ".join(cells) + ("  *" if best else "")


def _epoch_width(epochs: int) -> int:
    return max(5, 2 * len(str(epochs)) + 1)


def print_epoch(row: dict, header: bool, *, epochs: int, select_metric: str = "f1_macro", best: bool = False):
    """One line per epoch (and the explanation and titles before the first)."""
    if header:
        print("\n".join(epoch_header(epochs, select_metric)))
    print(format_epoch(row, epochs, best), flush=True)


def print_final_report(report: dict, best_path: Path) -> None:
    """The final figures of report.json: per split, the model at 0.5 and at the tuned thresholds beside the
    trivial predictor (per-class F1, then per-class AUC), the official ODIR score and the calibration error."""
    cal = report["calibration"]
    print(f"\nbest epoch {report['best_epoch']} (by validation {report['selected_by']}) → {best_path}\n"
          f"probabilities calibrated per class ({cal['method']}) and thresholds tuned on validation")
    for split in ("validation", "test"):
        if split not in report:
            continue
        r = report[split]
        print(f"{split} ({r['patients']} patients)"
              + ("   — scored once, never used to choose anything" if split == "test" else "   — picked the epoch, "
                 "fitted calibration and thresholds: optimistic"))
        print(f"  {'':<25}F1 micro  F1 macro  AUC macro  " + " ".join(f"{c:>5}" for c in CLASSES))
        rows = (("model, tuned thresholds", r["tuned"], "f1"), ("model, threshold 0.5", r["at_0.5"], "f1"),
                ("trivial predictor", r["trivial"]["at_0.5"], "f1"), ("model, per-class AUC", r["at_0.5"], "auc"))
        for label, m, per in rows:
            f1s = f"{m['f1_micro']:8.3f}  {m['f1_macro']:8.3f}" if per == "f1" else f"{'':8}  {'':8}"
            print(f"  {label:<25}{f1s}  {m['auc_macro']:9.3f}  " + " ".join(f"{m[per][c]:5.3f}" for c in CLASSES))
        for label, o in (("model", r["odir"]), ("trivial", r["trivial"]["odir"])):
            print(f"  official ODIR score, {label:<7} (flattened, 0.5): kappa {o['kappa']:.3f} · F1 {o['f1']:.3f} · "
                  f"AUC {o['auc']:.3f} · final {o['final']:.3f}")
        e = r["calibration_error"]
        print(f"  calibration error (all cells): ECE {e['ece_before']:.3f} → {e['ece_after']:.3f} · Brier "
              f"{e['brier_before']:.3f} → {e['brier_after']:.3f}")
    print("  thresholds: " + " ".join(f"{c}={t:.2f}" for c, t in report["thresholds"].items()))


# ----------------------------------------------------------------------------------------------- the folder itself
RUN_FILES = ("config.json", "best.pt", "last.pt", "metrics.csv")  # any of these: the folder is a run folder
LOCK_NAME = ".lock"  # held (flock) by the training that uses the folder, for as long as it runs


class RunFolderError(ValueError):
    """A run folder that this training may not use (exists, in use, not a run folder); the message says why and
    which flag to use."""


@contextlib.contextmanager
def run_folder(path: Path | None, *, resume: bool = False, overwrite: bool = False, unique: bool = False):
    """Claim `path` for this training, exclusively, and yield the folder actually used.

    - A new run creates the folder with an exclusive mkdir. If it exists: with `unique` (the default date-time
      name) the next free `NAME-2`, `NAME-3`, ... is taken; with `overwrite` its contents are deleted first (only
      if it is a run folder); otherwise RunFolderError, naming --resume and --overwrite.
    - `resume` uses the existing folder.
    - A lock (`.lock`, flock) is held until the end: a second training in the same folder at the same time
      (the same --name twice, or --resume / --overwrite of a running run) is refused instead of mixing files.
    - If the body fails or is interrupted before any checkpoint was written, a folder created here is removed
      again: a run folder always holds a checkpoint.
    `path` None (a dry run, or a rank other than 0) yields None and claims nothing.
    """
    if path is None:
        yield None
        return
    path = Path(path)
    created = not resume
    if resume:
        if not path.is_dir():
            raise RunFolderError(f"--resume {path}: no such run folder")
    elif overwrite and path.exists():
        _check_is_run_folder(path)
    else:
        path = _create_exclusively(path, unique)
    lock = _lock(path)
    try:
        if overwrite and not resume:
            _empty(path)
        stale = remove_stale_temporaries(path)  # a kill -9 mid-write of an earlier run (nothing else runs here now)
        if stale:
            print(f"removed {len(stale)} temporary file(s) of an earlier, killed run: {', '.join(stale)}")
        yield path
    except BaseException:
        if created and not any((path / name).exists() for name in ("best.pt", "last.pt")):
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        lock.close()  # releases the flock


def _create_exclusively(path: Path, unique: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not unique:
                raise RunFolderError(f"run folder {path} exists: --resume {path} continues it, --overwrite "
                                     f"replaces it, or choose another --name") from None
    raise RunFolderError(f"run folders {path} to {path.name}-999 all exist; choose a --name")


def _check_is_run_folder(path: Path) -> None:
    if not path.is_dir():
        raise RunFolderError(f"--overwrite {path}: exists and is not a folder")
    entries = [p.name for p in path.iterdir() if p.name != LOCK_NAME]
    if entries and not any(name in entries for name in RUN_FILES):
        raise RunFolderError(f"--overwrite {path}: not a run folder (none of {', '.join(RUN_FILES)} in it); "
                             f"not deleting it")


def _lock(path: Path):
    """The open lock file, flock'ed exclusively; RunFolderError when another training holds it."""
    f = open(path / LOCK_NAME, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the exclusive mkdir still keeps two new runs apart
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise RunFolderError(f"run folder {path} is in use by a training that is still running ({owner}); "
                             f"wait for it, stop it, or choose another --name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _empty(path: Path) -> None:
    """--overwrite: delete everything in the run folder but the lock we hold."""
    for p in path.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ----------------------------------------------------------------------------------------------- the console log
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves and colours (tqdm's nested bars)


class _Tee(io.TextIOBase):
    """A console stream that also hands what is written to a `_LogSink`; everything else is the stream's."""

    def __init__(self, stream, sink: "_LogSink"):
        self.stream, self.sink = stream, sink

    def write(self, text: str) -> int:
        self.sink.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # progress bars ask: only on a terminal
        return self.stream.isatty()

    def __getattr__(self, name):  # encoding, fileno, buffer, ...
        return getattr(self.stream, name)


class _LogSink:
    """The text for train.log, as a terminal would end up showing it: a carriage return discards the line written so
    far (a progress bar redrawing itself), escape sequences are dropped. Buffered in memory until `attach`."""

    def __init__(self):
        self.file, self.buffer, self.partial = None, [], ""

    def write(self, text: str) -> None:
        lines = _ANSI.sub("", self.partial + text).split("\n")
        self.partial = lines.pop().rsplit("\r", 1)[-1]
        for line in lines:
            self._emit(line.rsplit("\r", 1)[-1] + "\n")

    def _emit(self, line: str) -> None:
        if self.file is None:
            self.buffer.append(line)
        else:
            self.file.write(line)
            self.file.flush()  # a crash or kill keeps everything printed so far

    def attach(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.file.writelines(self.buffer)
        self.buffer = []
        self.file.flush()

    def close(self) -> None:
        if self.partial.strip():
            self._emit(self.partial + "\n")
        self.partial = ""
        if self.file is not None:
            self.file.close()


_active_sink: list = []  # the sink of the console_log in effect, if any


@contextlib.contextmanager
def console_log(enabled: bool = True):
    """Tee stdout and stderr into a log file that `log_console_to` names later (what was printed before is
    written first). Python-level output only: C libraries writing to the file descriptors are not seen."""
    if not enabled:
        yield
        return
    sink = _LogSink()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, sink), _Tee(sys.stderr, sink)
    _active_sink.append(sink)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        _active_sink.remove(sink)
        sink.close()


def log_console_to(path: Path) -> None:
    """From now on (and for everything printed since `console_log` began) the console also goes to `path`
    (appended: a resumed run continues its train.log)."""
    if _active_sink and _active_sink[-1].file is None:
        _active_sink[-1].attach(path)
