"""K-fold cross-validation (`--folds K`): K full runs, one per fold, in RUN/fold-1 .. RUN/fold-K (each validated on
its held-out fold, tested on the same test patients), then the parent's report in RUN: each fold's figures with
their mean ± sd, the pooled out-of-fold predictions (predictions_oof.csv), and the fold ensemble (the mean of the
folds' logits, calibrated and thresholded on the out-of-fold predictions) on test, beside the best single fold and
the trivial predictor.

Why: every patient outside the test split is predicted once by a model that never trained on it, so the recipe can
be judged on all of them instead of a 15 % validation split, and the ensemble has seen every one of them.
A fold is finished when RUN/fold-N/fold_logits.npz exists (written after its final report); `--resume RUN` skips
finished folds and continues the unfinished one from its last.pt.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from odir_dual.model.calibration import apply_calibration, fit_calibration, with_odir_offset
from odir_dual.model.eyes import fit_eye_head
from odir_dual.model.metrics import tune_thresholds
from odir_dual.pipeline.host import atomic_write, write_text_atomic
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import label_matrix
from odir_dual.training.checkpoint import git_commit, load_checkpoint, weights_digest
from odir_dual.training.data import fold_folder
from odir_dual.training.ensemble import ENSEMBLE, fold_ensemble_state
from odir_dual.training.evaluation import Fitted, final_report, write_html_report
from odir_dual.training.runlog import MARKER_NAME, RunFolderError, print_final_report

FOLD_LOGITS = "fold_logits.npz"  # a finished fold's raw logits: held-out and test patients
FIGURES = ("final", "kappa", "f1", "auc", "auc_macro")  # per fold: the official figures and the AUC macro


class FoldsError(RunFolderError):
    """A --folds run that cannot go on as asked (under torchrun, a changed --epochs, mismatched files)."""


@dataclass
class FoldResult:
    """A finished fold: its number, folder, optimizer updates, report.json, and its raw logits on its held-out
    patients and on the test patients (rows in the order of the ids)."""

    n: int
    folder: Path
    steps: int
    report: dict
    held_ids: np.ndarray
    held_logits: np.ndarray
    test_ids: np.ndarray
    test_logits: np.ndarray
    held_eye_logits: np.ndarray | None = None  # (N, 2, K): a fold with the per-eye head (folds of older runs: none)
    test_eye_logits: np.ndarray | None = None


def describe_split(tables: list[tuple], seed: int) -> str:
    """The console's split line: train · validation · test, or the folds' held-out sizes · test."""
    if len(tables) == 1:
        train, val, test = tables[0]
        return f"split (seed {seed}): train {len(train)} · validation {len(val)} · test {len(test)}"
    held = [len(t[1]) for t in tables]
    return (f"split (seed {seed}): {len(tables)} folds of the {sum(held)} patients outside the test split, held out "
            f"{' / '.join(map(str, held))} (each fold trains on the others) · test {len(tables[0][2])}")


def cross_validate(run, tables: list[tuple], fit):
    """Train every unfinished fold with `fit` (train.py's, one full run per fold), then write the parent's report.

    Args:
        run: train.py's Run of the parent folder; each fold runs with a copy (its folder, its config: folds 0).
        tables: (train, held-out, test) per fold (`data.fold_tables`).
        fit: train.py's `fit(run, train, validation, test) -> Fitted`.

    Returns:
        train.py's Fitted: the fold ensemble's calibration and thresholds as `ckpt` (None when stopped) and its
        logits ("oof", "test"); `steps`: the updates of all folds. `--stop-after-steps N` counts the updates of all
        folds together, in fold order.
    """
    if run.world > 1:
        raise FoldsError(f"--folds {run.cfg.folds}: runs in one process for now; start it without torchrun, "
                         "or add --folds 0 for one run")
    results = []
    for n, fold_tables in enumerate(tables, 1):
        result = finished_fold(fold_folder(run.run_dir, n), n)
        if result is not None:
            if result.report["config"]["epochs"] != run.cfg.epochs:  # a resume with a larger --epochs
                raise FoldsError(f"--epochs {run.cfg.epochs}: fold {n} of {run.run_dir} finished with "
                                 f"{result.report['config']['epochs']} epochs; a --folds run keeps its epochs (start "
                                 f"a new run with --config {run.run_dir / 'config.json'} --epochs {run.cfg.epochs})")
            print(f"\nfold {n}/{len(tables)}: finished earlier ({result.folder}), not trained again")
        else:
            budget = run.cfg.stop_after_steps - sum(r.steps for r in results) if run.cfg.stop_after_steps else 0
            if run.cfg.stop_after_steps and budget <= 0:
                print(f"--stop-after-steps {run.cfg.stop_after_steps}: reached before fold {n}")
                result = None
            else:
                result = _train_fold(run, fit, n, len(tables), fold_tables, budget)
            if result is None:  # stopped (a signal or --stop-after-steps): resumable
                print(f"fold {n}/{len(tables)} unfinished; continue with: python train.py --resume {run.run_dir}")
                return Fitted(None, None, stopped=True, steps=sum(r.steps for r in results))
        results.append(result)
    ckpt, logits = summarise(run, tables, results)
    return Fitted(ckpt, logits, stopped=False, steps=sum(r.steps for r in results))


def _train_fold(run, fit, n: int, k: int, tables: tuple, budget: int) -> FoldResult | None:
    """Fold n as a full run in RUN/fold-n (continued from its last.pt when there is one); None when stopped."""
    folder = fold_folder(run.run_dir, n)
    resume = folder if (folder / "last.pt").is_file() else None
    train_tab, held_tab, test_tab = tables
    cfg = dataclasses.replace(run.cfg, folds=0, out=str(run.run_dir), name=folder.name, resume=str(resume or ""),
                              stop_after_steps=budget)
    folder.mkdir(exist_ok=True)
    (folder / MARKER_NAME).write_text(f"odir-dual run folder: fold {n} of {k} of the --folds run {run.run_dir}\n")
    write_text_atomic(folder / "config.json", json.dumps(asdict(cfg), indent=1))
    print(f"\n=== fold {n}/{k}: trains on {len(train_tab)} patients, validated on its {len(held_tab)} held-out ones"
          + (f", continued from {resume / 'last.pt'}" if resume else "") + f" → {folder}")
    fitted = fit(dataclasses.replace(run, cfg=cfg, run_dir=folder, resume_dir=resume), train_tab, held_tab, test_tab)
    if fitted.stopped or fitted.ckpt is None or run.stop.requested:
        return None
    buffer = io.BytesIO()
    eyes = fitted.eye_logits or {}
    eye_arrays = {f"{key}_eye_logits": eyes.get(split, np.zeros((0, 2, len(CLASSES))))
                  for key, split in (("held", "validation"), ("test", "test"))} if eyes else {}
    np.savez(buffer, steps=fitted.steps, held_ids=held_tab["id"].to_numpy(), held_logits=fitted.logits["validation"],
             test_ids=test_tab["id"].to_numpy(), test_logits=fitted.logits.get("test", np.zeros((0, len(CLASSES)))),
             **eye_arrays)
    with atomic_write(folder / FOLD_LOGITS, "wb") as f:  # last: its presence says the fold is finished
        f.write(buffer.getvalue())
    return finished_fold(folder, n)


def finished_fold(folder: Path, n: int) -> FoldResult | None:
    """Fold n's results when it finished (its fold_logits.npz and report.json), else None."""
    if not (folder / FOLD_LOGITS).is_file() or not (folder / "report.json").is_file():
        return None
    with np.load(folder / FOLD_LOGITS) as z:
        arrays = {k: z[k] for k in z.files}
    return FoldResult(n=n, folder=folder, steps=int(arrays["steps"]), report=json.loads((folder / "report.json")
                      .read_text()), held_ids=arrays["held_ids"], held_logits=arrays["held_logits"],
                      test_ids=arrays["test_ids"], test_logits=arrays["test_logits"],
                      held_eye_logits=arrays.get("held_eye_logits"), test_eye_logits=arrays.get("test_eye_logits"))


def summarise(run, tables: list[tuple], results: list[FoldResult]) -> tuple[dict, dict]:
    """The parent's report.json, predictions_oof.csv and predictions_test.csv, printed: the fold ensemble on the
    pooled out-of-fold and on the test patients (calibration and thresholds fitted on the out-of-fold logits), and
    the per-fold figures. Returns (the ensemble's calibration, thresholds and config as a checkpoint-like dict,
    its logits per split)."""
    cfg = run.cfg
    held = pd.concat([t[1] for t in tables], ignore_index=True)
    oof = np.concatenate([r.held_logits for r in results])
    if not all((r.held_ids == t[1]["id"].to_numpy()).all() for r, t in zip(results, tables)):
        raise FoldsError(f"{run.run_dir}: a fold's {FOLD_LOGITS} is of other patients than its split.csv")
    y = label_matrix(held)
    calibration = fit_calibration(oof, y, cfg.calibration)
    if cfg.odir_offset:
        calibration = with_odir_offset(calibration, oof, y)
    thresholds = tune_thresholds(y, apply_calibration(oof, calibration))
    splits, logits = {"oof": held}, {"oof": oof}
    test_tab = tables[0][2]
    if len(test_tab):
        splits["test"], logits["test"] = test_tab, np.mean([r.test_logits for r in results], axis=0)
    states = [load_checkpoint(r.folder / "best.pt")["model"] for r in results]
    ckpt = {"commit": git_commit(), "config": asdict(cfg), "thresholds": thresholds.tolist(),
            "calibration": calibration, "best": {"epoch": None, "metric": "each fold's own"}, "folds": len(results)}
    eye_logits = None
    if all(r.held_eye_logits is not None for r in results):  # the per-eye head: fitted on the out-of-fold eyes too
        eye_logits = {"oof": np.concatenate([r.held_eye_logits for r in results])}
        if len(test_tab):
            eye_logits["test"] = np.mean([r.test_eye_logits for r in results], axis=0)
        ckpt.update(fit_eye_head(eye_logits["oof"], *eye_label_matrix(held), cfg.calibration))
    source = {"file": ENSEMBLE, "epoch": None, "weights": weights_digest(fold_ensemble_state(states)),
              "folds": [f"{r.folder.name}/best.pt" for r in results]}
    report = final_report(run, ckpt, splits, logits, y, source=source, extra={"folds": fold_figures(results)},
                          eye_logits=eye_logits)
    print_final_report(report, run.run_dir)
    write_html_report(run.run_dir)
    return ckpt, logits


def fold_figures(results: list[FoldResult]) -> dict:
    """report.json's "folds": per fold its held-out and test figures (`FIGURES`), their mean and sd over the folds,
    and the best single fold (by its held-out official final) with its whole test section."""
    rows = []
    for r in results:
        row = {"fold": r.n, "train": r.report["counts"]["train"], "best_epoch": r.report["best_epoch"]}
        for split, key in (("validation", "held_out"), ("test", "test")):
            if split in r.report:
                s = r.report[split]
                row[key] = {"patients": s["patients"], **{k: s["odir"][k] for k in ("final", "kappa", "f1", "auc")},
                            "auc_macro": s["at_0.5"]["auc_macro"]}
        rows.append(row)
    spread = {}
    for stat, f in (("mean", np.mean), ("sd", lambda v: np.std(v, ddof=1))):
        spread[stat] = {key: {k: float(f([row[key][k] for row in rows])) for k in FIGURES}
                        for key in ("held_out", "test") if key in rows[0]}
    best = max(results, key=lambda r: r.report["validation"]["odir"]["final"])
    return {"k": len(results), "per_fold": rows, **spread,
            "best_fold": {"fold": best.n, "chosen_by": "its held-out official final",
                          **({"test": best.report["test"]} if "test" in best.report else {})}}
