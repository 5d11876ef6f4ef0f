"""Two models on the same patients (`odir-compare A B`): each one's figures and the paired difference B − A with its
95 % bootstrap interval. Reads the predictions CSVs that runs write (predictions_test.csv, predictions_oof.csv:
id, the 8 labels, p_N .. p_O) and score.py's output on a labelled folder (ID, p_N .. p_O, true_labels). numpy and
pandas only: it works in the light scoring install.

Why paired: two models scored on the same patients share which patients are hard; resampling the patients once
for both and reading the interval of the difference removes that shared part, so a difference of 0.02 can be told
from noise where two separate intervals (each ±0.03) overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from odir_dual.common.errors import OdirError
from odir_dual.model.metrics import BOOTSTRAP_RESAMPLES, COMPARED, paired_bootstrap
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES

RUN_FILES = {False: "predictions_test.csv", True: "predictions_oof.csv"}  # a run folder's file: test, --oof


class CompareError(OdirError, ValueError):
    """Predictions that cannot be compared (unreadable, unlabelled, other patients); the message names the file."""


@dataclass
class Predictions:
    """One model's calibrated probabilities on labelled patients, sorted by id."""

    source: Path  # the CSV read
    ids: np.ndarray  # (N,) patient ids as strings
    labels: np.ndarray  # (N, 8) 0/1
    probs: np.ndarray  # (N, 8)


def read_predictions(path, oof: bool = False) -> Predictions:
    """A run folder's predictions_test.csv (predictions_oof.csv with `oof`), or a predictions CSV: a run's (id,
    N .. O, p_N .. p_O) or score.py's on a folder with a sheet (ID, p_N .. p_O, true_labels "D,H"; unscored
    patients, with no probabilities, are left out)."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_FILES[oof]
        if not path.is_file():
            hint = " (a --folds run writes it)" if oof else " (a run with a test split writes it at its end)"
            raise CompareError(f"{path}: no such file{hint}")
    try:
        frame = pd.read_csv(path, dtype={"id": str, "ID": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise CompareError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    id_column = "id" if "id" in frame.columns else "ID" if "ID" in frame.columns else None
    missing = [f"p_{c}" for c in CLASSES if f"p_{c}" not in frame.columns]
    if id_column is None or missing:
        raise CompareError(f"{path}: expected an id (or ID) column and p_{CLASSES[0]} .. p_{CLASSES[-1]}; missing "
                           f"{', '.join(([] if id_column else ['id']) + missing)}")
    if "true_labels" in frame.columns and not all(c in frame.columns for c in CLASSES):  # score.py's output
        frame = frame[frame[f"p_{CLASSES[0]}"].astype(str).str.strip() != ""]
        labels = np.array([[c in str(t).split(",") for c in CLASSES] for t in frame["true_labels"]], np.int64)
    elif all(c in frame.columns for c in CLASSES):
        labels = _numbers(frame[list(CLASSES)], path, "label").astype(np.int64)
    else:
        raise CompareError(f"{path}: no true labels (columns {', '.join(CLASSES)} or true_labels): score a folder "
                           "that has its sheet, or give a run's predictions CSV")
    probs = _numbers(frame[[f"p_{c}" for c in CLASSES]], path, "probability")
    ids = frame[id_column].astype(str).str.strip().to_numpy()
    if len(set(ids)) != len(ids):
        raise CompareError(f"{path}: an id appears twice")
    order = np.argsort(ids, kind="stable")
    return Predictions(path, ids[order], labels[order], probs[order])


def _numbers(frame: pd.DataFrame, path: Path, what: str) -> np.ndarray:
    try:
        values = frame.apply(pd.to_numeric).to_numpy(np.float64)
    except (ValueError, TypeError):
        raise CompareError(f"{path}: a {what} column holds something that is not a number") from None
    if not np.isfinite(values).all():
        raise CompareError(f"{path}: a {what} is missing or not finite")
    return values


def compare(a: Predictions, b: Predictions, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """`paired_bootstrap` of A and B (B − A), after checking that they are the same patients with the same labels.

    Raises:
        CompareError: the patients (ids) or their labels differ, naming both files and a few ids.
    """
    if len(a.ids) != len(b.ids) or (a.ids != b.ids).any():
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        raise CompareError(f"{a.source} and {b.source} are not the same patients ({len(a.ids)} and {len(b.ids)}; "
                           f"only in the first: {', '.join(only_a[:5]) or 'none'}; only in the second: "
                           f"{', '.join(only_b[:5]) or 'none'}): a paired comparison needs the same patients")
    differ = np.flatnonzero((a.labels != b.labels).any(1))
    if len(differ):
        raise CompareError(f"{a.source} and {b.source} give {len(differ)} patient(s) different labels, e.g. id "
                           f"{a.ids[differ[0]]}: not the same ground truth")
    return paired_bootstrap(a.labels, a.probs, b.probs, resamples=resamples, seed=seed)


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    """The console table: per figure A, B, B − A [95 % interval], and * where the interval excludes zero."""
    lines = [f"A: {name_a}", f"B: {name_b}",
             f"{result['patients']} patients · paired percentile bootstrap: {result['resamples']} resamples of the "
             f"patients, the same for A and B, seed {result['seed']} · * : the {result['level']:.0%} interval of "
             f"B − A excludes 0",
             f"  {'':<26}{'A':>7}  {'B':>7}  {'B − A':>7}  {'95 % interval':<17}"]
    titles = {"final": "official final", "kappa": "official kappa", "f1": "official F1", "auc": "official AUC",
              "auc_macro": "AUC macro", **{f"auc_{c}": f"AUC {c} {CLASS_NAMES[c]}" for c in CLASSES}}
    for name in (*COMPARED, *(f"auc_{c}" for c in CLASSES)):
        r = result[name]
        ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else "n/a"
        lines.append(f"  {titles[name]:<26}{_num(r['a']):>7}  {_num(r['b']):>7}  {_num(r['difference'], '+'):>7}  "
                     f"{ci:<17}{' *' if r['excludes_zero'] else ''}".rstrip())
    return "\n".join(lines)


def _num(v: float, sign: str = "") -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:{sign}.3f}"
