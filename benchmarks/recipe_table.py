"""Choose a recipe on out-of-fold predictions, never on test: `--folds K` runs of the same patients, side by side.

Each run's row is its pooled out-of-fold predictions (predictions_oof.csv: every patient outside the test split,
each predicted by the fold that did not train on it, calibrated and offset on those predictions). Every row shows
the official final, kappa, AUC macro and per-class AUC, and its paired difference B − A to the first run (the
reference) with the 95 % bootstrap interval of `odir-compare` (the same resamples of the patients for both).
`--offset-off` adds, for each run, the same predictions with the ODIR offset undone: a post-processing choice, no
training. The test split is not read.

    .venv/bin/python benchmarks/recipe_table.py runs/sel-preset-k3 runs/sel-plain-k3 --offset-off
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from odir_dual.deploy.compare import Predictions, compare, read_predictions  # noqa: E402
from odir_dual.pipeline.constants import CLASSES  # noqa: E402

DIFFERENCES = ("final", "kappa", "auc_macro")  # the figures whose paired difference to the reference is shown


def without_offset(preds: Predictions, offset: float) -> Predictions:
    """The same predictions before the ODIR offset: every logit shifted back by `offset` (calibration.py adds it to
    each class's Platt bias, so undoing it is exact up to the CSV's rounding)."""
    p = np.clip(preds.probs, 1e-12, 1 - 1e-12)
    logits = np.log(p / (1 - p)) - offset
    return Predictions(preds.source, preds.ids, preds.labels, 1 / (1 + np.exp(-logits)))


def rows_of(runs: list[Path], offset_off: bool) -> list[tuple[str, Predictions]]:
    """(label, out-of-fold predictions) per run, and with `offset_off` the offset-free twin after each."""
    rows = []
    for run in runs:
        preds = read_predictions(run, oof=True)
        rows.append((run.name, preds))
        offset = json.loads((run / "report.json").read_text())["calibration"].get("odir_offset") or 0.0
        if offset_off and offset:
            rows.append((f"{run.name}, ODIR offset off", without_offset(preds, offset)))
    return rows


def table(rows: list[tuple[str, Predictions]], resamples: int) -> str:
    """A markdown table: each row's figures and its paired difference to the first row."""
    head = ["row", "patients", *(f"{name} (Δ, 95 % interval)" for name in DIFFERENCES), *(f"AUC {c}" for c in CLASSES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = rows[0][1]
    for label, preds in rows:
        r = compare(ref, preds, resamples=resamples)
        cells = [label, str(r["patients"])]
        for name in DIFFERENCES:
            f = r[name]
            diff = "" if preds is ref else (f" ({f['difference']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]"
                                            f"{'*' if f['excludes_zero'] else ''})")
            cells.append(f"{f['b']:.3f}{diff}")
        cells += [f"{r[f'auc_{c}']['b']:.3f}" for c in CLASSES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n* : the interval of the difference to the first row excludes 0."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished --folds runs of the same patients; the first is the "
                                                        "reference")
    ap.add_argument("--offset-off", action="store_true", help="also each run without its ODIR offset")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples [default 1000]")
    args = ap.parse_args(argv)
    print(table(rows_of(args.runs, args.offset_off), args.resamples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
