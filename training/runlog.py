"""The run folder and the console: claiming the folder (`run_folder`: exclusive, locked), metrics history (CSV),
curves (PNG), TensorBoard scalars (--tensorboard), the per-epoch table, the final report, and train.log (everything
printed: `console_log`).

Only rank 0 writes; train.py decides what goes in, this module decides how it looks.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import shutil
import socket
import sys
import textwrap
import uuid
from pathlib import Path

from odir_dual.common.errors import OdirError
from odir_dual.common.cli import shell_path, tool_command
from odir_dual.model.calibration import describe_calibration
from odir_dual.model.metrics import format_interval
from odir_dual.model.trust import epochs_text, untrusted_classes, untrusted_lines
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES
from odir_dual.pipeline.host import atomic_write, check_can_create, is_temporary, remove_stale_temporaries
from odir_dual.training.config import SELECT_COLUMNS


class RunLog:
    """`runs/NAME/metrics.csv` (one row per epoch, rewritten atomically) and `curves.png` drawn from it; with
    tensorboard=True also every number of the row as a TensorBoard scalar (RUN/tensorboard, x = epoch).
    `select_metric`: the config's `select_metric` (f1_macro, auc_macro, loss), plotted with its best epoch marked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, select_metric: str | None = None):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = run_dir / "metrics.csv"
        self.select_metric = select_metric
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
            w = csv.DictWriter(f, fieldnames=list(rows[-1]))  # rows of an older run may lack new columns: blank
            w.writeheader()
            w.writerows(rows)
        self.plot(rows)
        if self.tb is not None:  # losses, metrics, learning rate, throughput: every number of the row
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, int(row["epoch"]))
            self.tb.flush()

    def plot(self, rows):
        """curves.png (atomically): losses that compare like with like, the selection metric with the best epoch
        marked, and the F1 / official-score curves; integer epochs."""
        plot_curves(rows, self.dir / "curves.png", self.select_metric)


def best_epoch(rows: list[dict], select_metric: str | None) -> int | None:
    """The epoch train.py saved as best.pt: the first with the highest selection metric (the lowest loss)."""
    column = SELECT_COLUMNS.get(select_metric or "")
    values = [(_float(r.get(column)), int(r["epoch"])) for r in rows] if column else []
    values = [(v if select_metric != "loss" else -v, e) for v, e in values if v is not None and math.isfinite(v)]
    return max(values, key=lambda ve: (ve[0], -ve[1]))[1] if values else None


def plot_curves(rows: list[dict], out: Path, select_metric: str | None = None) -> None:
    """curves.png from metrics.csv rows (`curves_figure`), written atomically at 150 dpi."""
    import matplotlib.pyplot as plt  # slow (~1 s): only when a curve is drawn

    fig = curves_figure(rows, select_metric)
    with atomic_write(out, "wb") as f:  # a reader (the report, a browser) never sees half a PNG
        fig.savefig(f, format="png", dpi=150)
    plt.close(fig)


def curves_figure(rows: list[dict], select_metric: str | None = None):
    """Three panels from metrics.csv rows: loss (the training patient loss beside the validation loss: the same
    function of the same outputs; the total with the per-eye term dashed when it differs), the selection metric
    with its best epoch starred, and F1 macro/micro at 0.5 with the official ODIR score. Integer epochs; the best
    epoch is a dotted line on each panel. Returns the matplotlib figure."""
    import matplotlib  # slow (~1 s): only when a curve is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [int(r["epoch"]) for r in rows]

    def series(key):
        return [_float(r.get(key)) for r in rows]

    def draw(ax, key, label, **kw):
        ys = series(key)
        pts = [(e, y) for e, y in zip(ep, ys) if y is not None and math.isfinite(y)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3.5, label=label, **kw)
        return bool(pts)

    best = best_epoch(rows, select_metric)
    column = SELECT_COLUMNS.get(select_metric or "")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.9))
    patient = any(r.get("train_patient_loss") not in (None, "") for r in rows)
    draw(a, "train_patient_loss" if patient else "train_loss", "train (patient loss)" if patient else "train")
    draw(a, "val_loss", "validation")
    if patient and any(_float(r.get("train_loss")) != _float(r.get("train_patient_loss")) for r in rows):
        draw(a, "train_loss", "train, with the per-eye term", ls="--", color="grey", alpha=0.7)
    a.set(title="loss (same function: patient labels)", ylabel="loss")
    if column and draw(b, column, f"validation {select_metric.replace('_', ' ')}", color="C3"):
        if best is not None:
            v = _float(next(r for r in rows if int(r["epoch"]) == best).get(column))
            b.plot([best], [v], marker="*", ms=14, color="C3", ls="none", label=f"best: epoch {best}, {v:.3f}")
        b.set(title=f"selection metric: validation {select_metric.replace('_', ' ')}")
    else:
        b.set(title="selection metric: not recorded")
    for key, label in (("train_f1_macro", "train F1 macro"), ("val_f1_macro", "val F1 macro"),
                       ("val_f1_micro", "val F1 micro"), ("val_odir", "val ODIR final (official)")):
        draw(c, key, label)
    c.set(title="F1 at 0.5 and the official ODIR score", ylim=(0, 1))
    for ax in (a, b, c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if ep:
            ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
        if best is not None:
            ax.axvline(best, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


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
                 "pairs_per_s": ("pairs/s", 8, ".1f"), "data_pct": ("data %", 6, ".0f"),
                 "eta_s": ("run ETA", 7, "duration")}  # the whole run's remaining time (console only)


def epoch_header(epochs: int, select_metric: str) -> list[str]:
    """The two lines above the first epoch row: what the row holds, then the column titles."""
    title = EPOCH_COLUMNS[SELECT_COLUMNS[select_metric]][0]
    return [f"* = new best validation {title} (--select-metric) → best.pt · at threshold 0.5 · per class: "
            f"metrics.csv",
            f"{'epoch':>{_epoch_width(epochs)}}  " + "  ".join(f"{t:>{w}}" for t, w, _ in EPOCH_COLUMNS.values())]


def format_epoch(row: dict, epochs: int, best: bool = False) -> str:
    """One epoch's row: 3/14, losses, AUC and F1 macro, ODIR, learning rate, seconds, pairs/s, data %, `*` if best."""
    cells = [f"{row['epoch']}/{epochs}".rjust(_epoch_width(epochs))]
    for key, (_, width, fmt) in EPOCH_COLUMNS.items():
        value = row.get(key)
        if fmt == "duration" and isinstance(value, (int, float)):
            value, fmt = format_duration(value), ""
        cells.append(f"{value:>{width}{fmt}}" if isinstance(value, (int, float, str)) else f"{'-':>{width}}")
    return "  ".join(cells) + ("  *" if best else "")


def format_duration(seconds: float) -> str:
    """"4:05" (minutes:seconds) or "1:02:05" (hours)."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _epoch_width(epochs: int) -> int:
    return max(5, 2 * len(str(epochs)) + 1)


def print_epoch(row: dict, header: bool, *, epochs: int, select_metric: str = "f1_macro", best: bool = False):
    """One line per epoch (and the explanation and titles before the first)."""
    if header:
        print("\n".join(epoch_header(epochs, select_metric)))
    print(format_epoch(row, epochs, best), flush=True)


def print_final_report(report: dict, best_path: Path) -> None:
    """The final figures of report.json, each with its 95 % bootstrap interval over patients when report.json has
    them: per split, the official ODIR score of the model and of the trivial predictor (and their paired
    difference), F1 micro/macro and AUC macro at the tuned thresholds and at 0.5, per class the positives, F1 and
    AUC, and the calibration error."""
    cal = report["calibration"]
    if "folds" in report:
        print(f"\nfold ensemble: the mean of the {report['folds']['k']} folds' logits → {best_path}")
        print(textwrap.fill(f"fitted on the out-of-fold logits: the thresholds, and the calibration "
                            f"({describe_calibration(cal)})", 110, subsequent_indent="  "))
    else:
        epochs = epochs_text(report)
        print(f"\n{f'epochs: {epochs}; ' if epochs else ''}best epoch {report['best_epoch']} (by validation "
              f"{report['selected_by']}) → {best_path}")
        print(textwrap.fill(f"fitted on validation: the thresholds, and the calibration "
                            f"({describe_calibration(cal)})", 110, subsequent_indent="  "))
    for split in SPLIT_NOTES:
        if split not in report:
            continue
        r = report[split]
        ci = r.get("ci95") or {}

        def fig(value, *path):  # "0.656 [0.62, 0.69]": the figure and its interval at ci[path...], if any
            bounds = ci if path else None
            for key in path:
                bounds = (bounds or {}).get(key)
            return f"{format_interval(value, bounds):<19}"

        print(f"{split} ({r['patients']} patients)   — {SPLIT_NOTES[split]}")
        if ci:
            print(f"  [95 % intervals: percentile bootstrap over patients, {ci['resamples']} resamples, "
                  f"seed {ci['seed']}]")
        print("  official ODIR-2019 score (cells flattened, threshold 0.5)")
        print(f"  {'':<24}  {'kappa':<19}  {'F1':<19}  {'AUC':<19}  final")
        for label, o, key in (("model", r["odir"], "odir"), ("trivial", r["trivial"]["odir"], None)):
            cells = [fig(o[k], key, k) if key else fig(o[k]) for k in ("kappa", "f1", "auc")]
            final = fig(o["final"], key, "final") if key else fig(o["final"], "baseline", "final")
            print(f"  {label:<24}  " + "  ".join(cells) + f"  {final}".rstrip())
        if (ci.get("baseline") or {}).get("final_difference"):
            diff = r["odir"]["final"] - r["trivial"]["odir"]["final"]
            lo, hi = ci["baseline"]["final_difference"]
            print(f"  official final, model − trivial: {diff:+.3f} [{lo:+.2f}, {hi:+.2f}] "
                  "(paired: the same resamples)")
        print(f"  {'multi-label':<24}  {'F1 micro':<19}  {'F1 macro':<19}  AUC macro")
        for label, m, key in (("model, tuned thresholds", r["tuned"], "tuned"),
                              ("model, threshold 0.5", r["at_0.5"], "at_0.5"),
                              ("trivial, threshold 0.5", r["trivial"]["at_0.5"], None)):
            cells = [fig(m[k], key, k) if key else fig(m[k]) for k in ("f1_micro", "f1_macro", "auc_macro")]
            print(f"  {label:<24}  " + "  ".join(cells).rstrip())
        positives = (r.get("per_class") or {}).get("positives", {})
        print(f"  {'per class':<15}{'positives':>9}  {'F1, tuned':<19}  {'F1 at 0.5':<19}  AUC")
        for c in CLASSES:
            print(f"  {c + ' ' + CLASS_NAMES[c]:<15}{positives.get(c, ''):>9}  "
                  f"{fig(r['tuned']['f1'][c], 'tuned', 'f1', c)}  {fig(r['at_0.5']['f1'][c], 'at_0.5', 'f1', c)}  "
                  f"{fig(r['at_0.5']['auc'][c], 'at_0.5', 'auc', c)}".rstrip())
        e = r["calibration_error"]
        print(f"  calibration error (all cells): ECE {e['ece_before']:.3f} → {e['ece_after']:.3f} · Brier "
              f"{e['brier_before']:.3f} → {e['brier_after']:.3f}")
        if r.get("eyes") and split == ("test" if "test" in report else "validation"):
            print("\n".join(eye_lines(r["eyes"], split)))
    print("  thresholds: " + " ".join(f"{c}={t:.2f}" for c, t in report["thresholds"].items()))
    if report.get("eye_thresholds"):
        print("  per-eye thresholds: " + " ".join(f"{c}={t:.2f}" for c, t in report["eye_thresholds"].items()))
    untrusted = untrusted_lines(untrusted_classes(report, CLASSES))
    if untrusted:
        print("not to be trusted (model/trust.py):")
        for line in untrusted:
            print(textwrap.fill(line, 110, initial_indent="  ", subsequent_indent="    "))
    if "folds" in report:
        print_folds(report)


SPLIT_NOTES = {"validation": "picked the epoch, fitted calibration and thresholds: optimistic",
               "oof": "out of fold: each patient predicted by the fold that did not train on it; the ensemble's "
                      "calibration and thresholds were fitted on these",
               "test": "scored once, never used to choose anything"}


def print_folds(report: dict) -> None:
    """A --folds run's table: each fold's official final, kappa and AUC macro on its held-out patients and on test,
    their mean ± sd, then on test the fold ensemble, the best single fold and the trivial predictor."""
    folds = report["folds"]
    keys = [k for k in ("held_out", "test") if k in folds["mean"]]
    print("\nfolds (each validated on its own held-out patients; test: the same patients for every fold)")
    print(f"  {'':<24}" + "".join(f"  {where + ' ' + f:<17}" for where in ("held-out", "test")[:len(keys)]
                                 for f in ("final", "kappa", "AUC mac.")))
    for row in folds["per_fold"]:
        print(f"  {'fold ' + str(row['fold']) + ' (' + str(row['held_out']['patients']) + ' held out)':<24}"
              + "".join(f"  {row[k][f]:<17.3f}" for k in keys for f in ("final", "kappa", "auc_macro")).rstrip())
    print(f"  {'mean ± sd':<24}" + "".join(f"  {folds['mean'][k][f]:.3f} ± {folds['sd'][k][f]:<9.3f}"
                                          for k in keys for f in ("final", "kappa", "auc_macro")).rstrip())
    if "test" not in report:
        return
    best = folds["best_fold"]
    rows = [("fold ensemble", report["test"]["odir"], report["test"]["ci95"].get("odir")),
            (f"best single fold ({best['fold']})", best["test"]["odir"], (best["test"].get("ci95") or {}).get("odir")),
            ("trivial", report["test"]["trivial"]["odir"], None)]
    print(f"  {'test, official score':<24}  {'final':<19}  {'kappa':<19}  {'F1':<19}  AUC")
    for label, o, ci in rows:
        print(f"  {label:<24}  " + "  ".join(f"{format_interval(o[k], (ci or {}).get(k)):<19}"
                                            for k in ("final", "kappa", "f1", "auc")).rstrip())
    print(f"  (best single fold: chosen by {best['chosen_by']}, not by test)")


def eye_lines(eyes: dict, split: str) -> list[str]:
    """The per-eye head on a split's labelled eyes (report.json's "eyes", model/eyes.py): per class the positive
    eyes, AUC and F1 at the per-eye thresholds with 95 % intervals, beside the naive baseline (each eye inherits its
    patient's probabilities), then how often the patient labels and the eyes' findings disagree."""
    out = [f"  per eye ({split}: {eyes['eyes']} eyes of {eyes['patients']} patients whose keywords reproduce their "
           f"labels; {eyes['left_out']} left out)"]
    if eyes.get("model"):
        ci = eyes["ci95"]
        out.append(f"  [95 % intervals: bootstrap over patients, both eyes together, {ci['resamples']} resamples]")
        out.append(f"  {'class':<15}{'pos. eyes':>9}  {'AUC':<19}  {'F1, eye thresholds':<19}  "
                   f"{'naive AUC':<19}  naive F1")
        for c in [*CLASSES, None]:  # None: the macro means
            keys = (("auc", c), ("f1", c)) if c else (("auc_macro",), ("f1_macro",))
            cells = [format_interval(_pick(eyes[who], key), _pick(ci[who], key)) for who in ("model", "naive")
                     for key in keys]
            out.append(f"  {f'{c} {CLASS_NAMES[c]}' if c else 'macro':<15}{eyes['positives'][c] if c else '':>9}  "
                       + "  ".join(f"{x:<19}" for x in cells).rstrip())
    agree = eyes["consistency"]
    out += [f"  patient labels (the official ones) vs the eyes' findings: {agree['patients_differing']} of "
            f"{agree['patients']} patients differ",
            *((f"    {what:<45}" + " ".join(f"{c} {v:<3}" for c, v in agree[key].items())).rstrip()
              for what, key in (("label positive, no eye above its threshold:", "labels_only"),
                                ("an eye above its threshold, label negative:", "eyes_only")))]
    return out


def _pick(tree: dict, key: tuple):
    """tree[key[0]][key[1]]..., None where missing."""
    for k in key:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


# ----------------------------------------------------------------------------------------------- the folder itself
RUN_FILES = ("config.json", "best.pt", "last.pt", "metrics.csv")  # a run folder from before the marker has these
LOCK_NAME = ".lock"  # held (flock) by the training that uses the folder, for as long as it runs
MARKER_NAME = ".odir-run"  # written when train.py creates the folder: this project's own run folder
# Everything a run (train.py, then report.py and export.py's defaults) writes in its folder: --overwrite deletes
# these and nothing else. Folders among them (tensorboard/, report_files/) are the run's own.
RUN_OUTPUTS = frozenset({MARKER_NAME, "config.json", "best.pt", "last.pt", "metrics.csv", "curves.png", "train.log",
                         "left_out.csv", "split.csv", "report.json", "report.html", "report_files", "tensorboard",
                         "predictions_val.csv", "predictions_test.csv", "best.onnx", "best.fp16.onnx",
                         "best.onnx.data", "best.fp16.onnx.data", "MODEL_CARD.md",
                         "predictions_oof.csv", "fold_logits.npz"})  # --folds: the parent's, each fold's
FOLD_FOLDER = re.compile(r"fold-[1-9][0-9]*")  # --folds: RUN/fold-N, each a run folder of its own


def is_run_output(name: str) -> bool:
    """A name that a run writes in its folder (`RUN_OUTPUTS`, or a --folds run's fold-N folder)."""
    return name in RUN_OUTPUTS or FOLD_FOLDER.fullmatch(name) is not None


def has_checkpoint(path: Path) -> bool:
    """best.pt or last.pt in the folder, or in one of its fold-N folders (a --folds run)."""
    folders = [path, *(p for p in path.glob("fold-*") if FOLD_FOLDER.fullmatch(p.name))]
    return any((f / name).is_file() for f in folders for name in ("best.pt", "last.pt"))


class RunFolderError(OdirError, ValueError):
    """A run folder that this training may not use (exists, in use, not a run folder); the message says why and
    which flag to use."""


@contextlib.contextmanager
def run_folder(path: Path | None, *, resume: bool = False, overwrite: bool = False, unique: bool = False):
    """Claim `path` for this training, exclusively, and yield the folder actually used.

    - Every refusal below is checked first (`check_run_folder`), before anything is created or deleted.
    - A new run creates the folder with an exclusive mkdir and writes the marker `.odir-run` in it, with a new run
      id (`run_id`: every checkpoint of the run carries it). If it exists:
      with `unique` (the default date-time name) the next free `NAME-2`, `NAME-3`, ... is taken; with `overwrite`
      the files a run writes (`RUN_OUTPUTS`) are deleted first, only in a run folder (the marker, or a run's files
      from before the marker) that holds nothing else: anything unknown refuses the overwrite, naming it; a run
      killed before its first checkpoint (marker, lock, log) is a run folder too. Otherwise RunFolderError,
      naming --resume and --overwrite.
    - `resume` uses the existing folder; it must hold last.pt.
    - A lock (`.lock`, flock) is held until the end, then removed: a second training in the same folder at the same
      time (the same --name twice, or --resume / --overwrite of a running run) is refused instead of mixing files.
    - If the body fails or is interrupted before any checkpoint was written, a folder created here is removed
      again: a run folder always holds a checkpoint.
    `path` None (a dry run, or a rank other than 0) yields None and claims nothing.
    """
    if path is None:
        yield None
        return
    path = Path(path)
    check_run_folder(path, resume=resume, overwrite=overwrite, unique=unique)
    created = not resume and not (overwrite and (path.exists() or path.is_symlink()))
    if created:
        path = _create_exclusively(path, unique)
    lock = _lock(path)
    try:
        if overwrite and not resume:
            _check_is_run_folder(path)  # again under the lock: nothing was added meanwhile
            _empty(path)
        if not resume:
            (path / MARKER_NAME).write_text("odir-dual run folder (train.py); --overwrite deletes only what a run "
                                            f"writes here\nrun id: {new_run_id()}\n")
        stale = remove_stale_temporaries(path)  # a kill -9 mid-write of an earlier run (nothing else runs here now)
        if stale:
            print(f"removed {len(stale)} temporary file(s) of an earlier, killed run: {', '.join(stale)}")
        yield path
    except BaseException:
        if created and not has_checkpoint(path):
            _remove_run_folder(path)
        raise
    finally:
        _unlock(lock, path)


def check_run_folder(path: Path | None, *, resume: bool = False, overwrite: bool = False,
                     unique: bool = False) -> None:
    """Every reason `run_folder` would refuse `path`, checked without writing or deleting anything: train.py calls
    it before any work, so a refused run costs nothing and --overwrite never deletes a run that is then refused.

    Raises:
        RunFolderError: as `run_folder` (no such run / no last.pt, exists, not a run folder, in use).
        OSError: the folder cannot be created where --out points (read-only, permissions), naming it.
    """
    if path is None:
        return
    path = Path(path)
    if resume:
        if not path.is_dir():
            raise RunFolderError(f"--resume {path}: no such run folder")
        if not has_checkpoint(path):
            raise RunFolderError(f"--resume {path}: no last.pt in it (the run stopped before its first checkpoint, "
                                 f"or this is no run folder); start it again with --overwrite")
        _check_not_in_use(path)
    elif path.exists() or path.is_symlink():
        if overwrite:
            _check_is_run_folder(path)
            _check_not_in_use(path)
        elif not unique:
            raise RunFolderError(f"run folder {path} exists: --resume {path} continues it, --overwrite "
                                 f"replaces it, or choose another --name")
    else:
        check_can_create(path)


def _check_not_in_use(path: Path) -> None:
    """RunFolderError when a training holds the folder's lock; creates nothing (a folder without `.lock` is free)."""
    try:
        f = open(path / LOCK_NAME)
    except OSError:
        return
    with f:
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = f.read().strip() or "another process"
            raise RunFolderError(f"run folder {path} is in use by a training that is still running ({owner}); "
                                 f"wait for it, stop it, or choose another --name") from None


def new_run_id() -> str:
    """A run's identity: written into its marker when the folder is created and into every checkpoint it saves, so
    a checkpoint copied into another run's folder is recognised (`run_id`)."""
    return uuid.uuid4().hex[:16]


def run_id(folder: Path) -> str | None:
    """The run id in a run folder's marker; None for a folder from before run ids (or no run folder)."""
    try:
        text = (Path(folder) / MARKER_NAME).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    found = re.search(r"^run id: ([0-9a-f]{16})$", text, re.MULTILINE)
    return found[1] if found else None


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
    """--overwrite: a run folder of ours (the marker, or a run's files from before the marker) holding only what a
    run writes (and stale temporaries of one); else RunFolderError naming what is in the way."""
    if path.is_symlink() or not path.is_dir():
        raise RunFolderError(f"--overwrite {path}: exists and is not a folder" + (" (a symbolic link)"
                                                                                  if path.is_symlink() else ""))
    entries = [p.name for p in path.iterdir() if p.name != LOCK_NAME]
    if entries and MARKER_NAME not in entries and not any(name in entries for name in RUN_FILES):
        raise RunFolderError(f"--overwrite {path}: not a run folder (no {MARKER_NAME} marker, none of "
                             f"{', '.join(RUN_FILES)}); not deleting it")
    unknown = sorted(name + ("/" if (path / name).is_dir() else "") for name in entries
                     if not is_run_output(name) and not is_temporary(name))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise RunFolderError(f"--overwrite {path}: holds {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} "
                             f"that a run does not write ({shown}); not deleting anything: move them out, or "
                             "choose another --name")


def _unlock(lock, path: Path) -> None:
    """Release the flock, and remove `.lock` so that a finished run leaves only its own files (removed before the
    file is closed: nobody can take a lock we still hold on a file that is gone)."""
    with contextlib.suppress(OSError):
        (path / LOCK_NAME).unlink()
    lock.close()


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


def _remove_run_folder(path: Path) -> None:
    """A run that failed before its first checkpoint: remove what it wrote, then the folder if nothing else is in
    it (never a file it did not write)."""
    with contextlib.suppress(OSError):
        _empty(path)
        (path / LOCK_NAME).unlink(missing_ok=True)
        path.rmdir()


def _empty(path: Path) -> None:
    """--overwrite: delete what a run writes (`RUN_OUTPUTS`, stale temporaries) in a folder `_check_is_run_folder`
    accepted, but the lock we hold. A link among them is removed, never what it points to."""
    for p in path.iterdir():
        if p.name == LOCK_NAME or (not is_run_output(p.name) and not is_temporary(p.name)):
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


def next_steps(run_dir: Path) -> list[str]:
    """The commands that follow a finished run, with its real paths: export, score a folder, open the report."""
    opener = {"darwin": "open", "win32": "start"}.get(sys.platform, "xdg-open")
    run = shell_path(run_dir)
    return ["next steps:",
            f"  {tool_command('export')} {run}    # the ONNX model, checked against PyTorch",
            f"  {tool_command('score')} {run} FOLDER -o predictions.xlsx --report scored",
            "    # FOLDER: new patients' photographs ({ID}_left/_right, _L/_R or _OD/_OS) or an ODIR folder",
            f"  {opener} {run}/report.html"]
