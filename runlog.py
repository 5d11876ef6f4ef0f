"""The run folder and the console: metrics history (CSV), curves (PNG), the per-epoch table, the final report.

Only rank 0 writes; train.py decides what goes in, this module decides how it looks.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.constants import CLASSES
from pipeline.host import atomic_write


class RunLog:
    """`runs/NAME/metrics.csv` (one row per epoch, rewritten atomically) and `curves.png` drawn from it."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = run_dir / "metrics.csv"

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


EPOCH_COLUMNS = {  # metrics.csv key → console title, in table order
    "epoch": "epoch", "train_loss": "trLoss", "val_loss": "vaLoss", "train_f1_macro": "trF1ma", "val_f1_micro": "F1mi",
    "val_f1_macro": "F1ma", "val_odir": "ODIR", **{f"f1_{c}": f"f1_{c}" for c in CLASSES},
    "pairs_per_s": "pairs/s", "data_pct": "data%", "epoch_s": "sec"}


def print_epoch(row: dict, header: bool):
    """One line per epoch (and the titles before the first)."""
    if header:
        print(" ".join(f"{title:>7}" for title in EPOCH_COLUMNS.values()))
    print(" ".join(f"{row[c]:>7.3f}" if isinstance(row[c], float) else f"{row[c]:>7}" for c in EPOCH_COLUMNS),
          flush=True)


def print_final_report(ckpt: dict, best_path: Path, n_val: int) -> None:
    """best.pt's validation figures: at 0.5 and at the tuned thresholds, beside the trivial predictor."""
    m = ckpt["val_metrics"]
    print(f"\nbest epoch {ckpt['best']['epoch']} → {best_path}")
    print(f"validation ({n_val} patients)   F1 micro  F1 macro  AUC macro   "
          + "  ".join(f"{c:>5}" for c in CLASSES))
    for key, label in (("at_0.5", "threshold 0.5     "), ("tuned", "tuned thresholds  ")):
        r = m[key]
        print(f"  {label}          {r['f1_micro']:.3f}     {r['f1_macro']:.3f}     {r['auc_macro']:.3f}      "
              + "  ".join(f"{r['f1'][c]:.3f}" for c in CLASSES))
    t = ckpt["trivial_metrics"]["at_0.5"]
    print(f"  trivial predictor           {t['f1_micro']:.3f}     {t['f1_macro']:.3f}     {t['auc_macro']:.3f}      "
          + "  ".join(f"{t['f1'][c]:.3f}" for c in CLASSES) + "   (always the training prevalence)")
    for label, o in (("model", m["odir"]), ("trivial", ckpt["trivial_metrics"]["odir"])):
        print(f"  official ODIR score, {label:<7} (flattened, 0.5): kappa {o['kappa']:.3f} · F1 {o['f1']:.3f} · "
              f"AUC {o['auc']:.3f} · final {o['final']:.3f}")
    print("  thresholds: " + " ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, ckpt["thresholds"])))
