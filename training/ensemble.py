"""A finished --folds run's fold ensemble, read back: the one model that export.py writes as one ONNX graph and
serve.py and score.py --explain explain. Apart from training/folds.py (which trains the folds and fits the ensemble),
so that reading a model does not import the training side's reports (folds → evaluation → deploy/report, which
reads models with this: an import cycle)."""
from __future__ import annotations

import json
from pathlib import Path

from odir_dual.model.net import DualEyeEnsemble
from odir_dual.training.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint, weights_digest
from odir_dual.training.data import fold_folder

ENSEMBLE = "fold-ensemble"  # report.json's checkpoint "file" of a --folds run: every fold's best.pt


def fold_ensemble_state(states: list[dict]) -> dict:
    """The state dict of the folds' models as one DualEyeEnsemble (members.N.*): what report.json's weights hash
    and export.py's fold-ensemble graph are of."""
    return {f"members.{i}.{k}": v for i, state in enumerate(states) for k, v in state.items()}


def is_fold_run(path) -> bool:
    """A --folds run's parent folder (its fold-1 folder and config.json with folds > 1)."""
    path = Path(path)
    if not (path.is_dir() and (path / "fold-1").is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return int(json.loads((path / "config.json").read_text()).get("folds") or 0) > 1
    except (ValueError, AttributeError):
        return False


def load_fold_ensemble(run_dir) -> tuple[dict, DualEyeEnsemble, list[Path]]:
    """The fold ensemble of a finished --folds run, for export.py and the Explainer: (a checkpoint-like dict with
    the parent's calibration and thresholds (fitted on the out-of-fold logits), the folds' models as one
    DualEyeEnsemble (mean logits) in eval mode, the fold checkpoints read).

    Raises:
        CheckpointError: a fold unfinished, or report.json not of these very fold weights (one line naming it).
    """
    run_dir = Path(run_dir)
    k = int(json.loads((run_dir / "config.json").read_text())["folds"])
    report_path = run_dir / "report.json"
    # a fold writes its report.json when it ends (the parent's, checked next, says the ensemble was fitted)
    unfinished = [n for n in range(1, k + 1) if not (fold_folder(run_dir, n) / "report.json").is_file()]
    if unfinished or not report_path.is_file():
        why = f"fold(s) {', '.join(map(str, unfinished))} unfinished" if unfinished else "no report.json yet"
        raise CheckpointError(f"{run_dir}: a --folds run that has not finished ({why}): continue it with python "
                              f"train.py --resume {run_dir}, or export one fold with --fold N")
    paths = [fold_folder(run_dir, n) / "best.pt" for n in range(1, k + 1)]
    ckpts = [read_checkpoint(p) for p in paths]
    net = DualEyeEnsemble([model_from_checkpoint(c, p) for c, p in zip(ckpts, paths)]).eval()
    report = json.loads(report_path.read_text())
    digest = weights_digest(fold_ensemble_state([c["model"] for c in ckpts]))
    if (report.get("checkpoint") or {}).get("weights") != digest:
        raise CheckpointError(f"{report_path}: is not of the folds' present best.pt weights (a fold trained again "
                              f"since?); its calibration and thresholds would not fit")
    # fold 1's per-eye calibration and thresholds were fitted on its own validation eyes, not on the ensemble's: the
    # ensemble's own, fitted on the out-of-fold eyes, are in report.json (runs from before they were: no per-eye head)
    first = {key: v for key, v in ckpts[0].items() if key not in ("eye_calibration", "eye_thresholds", "eye_fit_eyes")}
    eyes = ({"eye_thresholds": list(report["eye_thresholds"].values()), "eye_calibration": report["eye_calibration"],
             "eye_fit_eyes": report.get("eye_fit_eyes")} if "eye_thresholds" in report else {})
    ckpt = {**first, "model": net.state_dict(), "config": report["config"], "folds": k, "epoch": None,
            "best": {}, "thresholds": list(report["thresholds"].values()), "calibration": report["calibration"],
            "val_metrics": None, **eyes}
    return ckpt, net, paths
