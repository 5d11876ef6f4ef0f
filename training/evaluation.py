"""The final report of best.pt: report.json (the figures of `model.metrics.evaluate` with 95 % bootstrap intervals),
one predictions CSV per split, report.html."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from odir_dual.model.calibration import apply_calibration, brier_score, expected_calibration_error
from odir_dual.model.eyes import LABELS_FOLLOW, eye_figures
from odir_dual.model.metrics import bootstrap_intervals, evaluate
from odir_dual.pipeline.constants import CLASSES, EYES
from odir_dual.pipeline.host import atomic_write, write_text_atomic
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import label_matrix
from odir_dual.training.checkpoint import weights_digest


@dataclass
class Fitted:
    """What train.py's `fit` (and a --folds run) hands back: best.pt's contents and its logits per split
    ("validation", "test"; "oof", "test" for a fold ensemble; with the per-eye head also its eye logits), None on ranks
    other than 0 or without a finished epoch; whether a signal or --stop-after-steps ended it; its optimizer updates."""

    ckpt: dict | None
    logits: dict | None
    stopped: bool
    steps: int
    eye_logits: dict | None = None  # per split (N, 2, K): a model with a fitted per-eye head


def final_report(run, ckpt: dict, tables: dict, logits: dict, y_train, epochs: dict | None = None,
                 source: dict | None = None, extra: dict | None = None, eye_logits: dict | None = None) -> dict:
    """report.json (every final figure, with its 95 % bootstrap interval over patients under "ci95") and one
    predictions CSV per split (id, true labels, probabilities): predictions_val.csv for "validation", else
    predictions_{split}.csv. `run`: train.py's Run (folder, config, start); `epochs`: how far training went,
    {"reached": 7, "of": 15, "stopped_by": "early stopping" or None}. `source`: report.json's "checkpoint" (which
    weights these figures are of); default best.pt's file, epoch and weights hash. `extra`: more top-level entries
    of report.json (a --folds run's per-fold figures). `eye_logits` ({split: (N, 2, K)}, a model with the per-eye
    head fitted in best.pt): per split also "eyes", the per-eye figures beside the naive baseline and the heads'
    agreement (model/eyes.py), and the CSVs get left_p_* and right_p_*."""
    thresholds = np.asarray(ckpt["thresholds"])
    report = {"run": run.run_dir.name, "commit": ckpt["commit"], "config": ckpt["config"],
              # which checkpoint these figures are of: modelcard.py uses them only for this very best.pt
              "checkpoint": source or {"file": "best.pt", "epoch": ckpt.get("epoch"),
                                       "weights": weights_digest(ckpt["model"])},
              "data": {"folder": run.cfg.data, **{k: len(t) for k, t in tables.items()}},
              "best_epoch": ckpt["best"]["epoch"], "epochs": epochs,
              "selected_by": ckpt["best"].get("metric", "f1_macro"),
              "thresholds": dict(zip(CLASSES, thresholds.tolist())),
              # best.pt of runs from before calibration existed has none: their probabilities are the plain sigmoid
              "calibration": ckpt.get("calibration") or {"method": "none"},
              "counts": {"train": len(y_train), **{k: len(t) for k, t in tables.items()}},
              **({"eye_thresholds": dict(zip(CLASSES, ckpt["eye_thresholds"])),
                  "eye_calibration": ckpt["eye_calibration"], "eye_fit_eyes": ckpt.get("eye_fit_eyes"),
                  "labels_follow": LABELS_FOLLOW} if eye_logits else {}),
              "started": _iso(run.started), "resumed": run.resume_dir is not None}
    bootstrap_s = 0.0
    for split, table in tables.items():
        y = label_matrix(table)
        raw, probs = apply_calibration(logits[split], None), apply_calibration(logits[split], report["calibration"])
        trivial = np.broadcast_to(y_train.mean(0), y.shape).copy()
        t0 = time.perf_counter()  # the same patients resampled, seeded: the same run gives the same intervals
        ci95 = bootstrap_intervals(y, probs, thresholds, baseline=trivial, seed=run.cfg.seed)
        bootstrap_s += time.perf_counter() - t0
        report[split] = {"patients": len(y), **evaluate(y, probs, thresholds, per_class=True),
                         "trivial": evaluate(y, trivial),
                         "calibration_error": {"ece_before": expected_calibration_error(raw, y),
                                               "ece_after": expected_calibration_error(probs, y),
                                               "brier_before": brier_score(raw, y), "brier_after": brier_score(probs, y)},
                         "ci95": ci95}
        frame = pd.DataFrame({"id": table["id"], **{c: y[:, k] for k, c in enumerate(CLASSES)},
                              **{f"p_{c}": probs[:, k] for k, c in enumerate(CLASSES)}})
        if eye_logits:
            eye_probs = apply_calibration(eye_logits[split], ckpt["eye_calibration"])  # (N, 2, K)
            report[split]["eyes"] = eye_figures(*eye_label_matrix(table), eye_probs, ckpt["eye_thresholds"], probs,
                                                thresholds, seed=run.cfg.seed)
            frame = frame.assign(**{f"{eye}_p_{c}": eye_probs[:, e, k] for e, eye in enumerate(EYES)
                                    for k, c in enumerate(CLASSES)})
        with atomic_write(run.run_dir / f"predictions_{'val' if split == 'validation' else split}.csv") as f:
            frame.to_csv(f, index=False, float_format="%.8f")
    report["bootstrap_s"] = round(bootstrap_s, 2)
    finished = time.time()
    report.update(extra or {})
    report.update(finished=_iso(finished), duration_s=round(finished - run.started, 1))
    report = plain(report)
    write_text_atomic(run.run_dir / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _iso(t: float) -> str:
    """A time.time() as UTC ISO 8601 to the second: 2026-12-06T02:25:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def plain(obj):
    """Metrics as JSON-able plain data (numpy scalars → float) for a weights_only checkpoint."""
    return json.loads(json.dumps(obj, default=float))


def write_html_report(run_dir: Path) -> None:
    """RUN/report.html (report.py); a failure there prints one line and never fails the run."""
    if not (run_dir / "report.json").is_file():
        return
    t0 = time.perf_counter()
    try:
        from odir_dual.deploy.report import write_run_report  # slow: matplotlib; and a failure here is contained

        path = write_run_report(run_dir)
        print(f"report: {path} ({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # noqa: BLE001 - the run's results are saved already; the page is a convenience
        print(f"report: not written ({type(e).__name__}: {e})")
