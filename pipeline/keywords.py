"""Per-eye labels from the sheet's diagnostic keywords.

ODIR-5K labels a patient, not an eye: "D" says one eye or both show diabetic retinopathy. The sheet's
"Left/Right-Diagnostic Keywords" say which; the union of the two eyes' classes gives back the patient's N..O labels
(N when neither eye shows a disease). The trainer uses them for an auxiliary per-eye loss (`--eye-loss-weight`):
each eye is told what it shows, instead of inheriting its fellow eye's disease.

    labels, usable = eye_label_matrix(patients)   # (N, 2, 8) float32 [left, right]; (N,) bool
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from odir_dual.pipeline.constants import CLASSES

# Notes on the image, not findings: they make an eye neither normal nor diseased.
NOT_FINDINGS = frozenset({"lens dust", "optic disk photographically invisible", "low image quality",
                          "image offset", "no fundus image", "anterior segment image"})
SEPARATORS = ("，", ",")  # ODIR uses the full-width comma; a hand-edited sheet may use the ASCII one


def keyword_class(keyword: str) -> str | None:
    """The class letter a single keyword stands for ('N' for "normal fundus"); None for a note on the image.
    Anything not named by the rules is 'O' (other), as in ODIR (drusen and laser spots included)."""
    k = keyword.strip().lower()
    if not k or k in NOT_FINDINGS:
        return None
    if k == "normal fundus":
        return "N"
    if "proliferative" in k or "diabetic retinopathy" in k:  # mild/moderate/severe non-proliferative, suspected
        return "D"
    rules = (("glaucoma", "G"), ("cataract", "C"), ("age-related macular degeneration", "A"),
             ("hypertensive retinopathy", "H"), ("pathological myopia", "M"), ("myopic maculopathy", "M"))
    return next((cls for term, cls in rules if term in k), "O")


def eye_labels(text: str) -> np.ndarray:
    """One eye's keyword cell → (8,) 0/1; N is 1 exactly when no disease keyword is present."""
    for sep in SEPARATORS[1:]:
        text = text.replace(sep, SEPARATORS[0])
    found = {keyword_class(k) for k in text.split(SEPARATORS[0])} - {None}
    out = np.array([c in found for c in CLASSES], dtype=np.float32)
    out[CLASSES.index("N")] = float(not (found - {"N"}))
    return out


def eye_label_matrix(patients: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, 2, 8) float32 for [left, right], usable (N,) bool).

    A patient is usable when both keyword cells are filled in and the eyes' union reproduces the patient's
    labels; for the others (keywords missing, or a sheet whose keywords disagree with its labels) the per-eye
    loss is left out rather than trained on a guess.
    """
    n = len(patients)
    labels = np.zeros((n, 2, len(CLASSES)), np.float32)
    if not {"left_keywords", "right_keywords"} <= set(patients.columns):
        return labels, np.zeros(n, bool)
    texts = [patients[f"{eye}_keywords"].fillna("").astype(str).to_numpy() for eye in ("left", "right")]
    for i in range(n):
        labels[i, 0], labels[i, 1] = eye_labels(texts[0][i]), eye_labels(texts[1][i])
    union = patient_from_eyes(labels)
    filled = np.array([bool(a.strip()) and bool(b.strip()) for a, b in zip(*texts)], dtype=bool)
    agrees = (union == patients[list(CLASSES)].to_numpy(dtype=np.float32)).all(axis=1)
    return labels, filled & agrees


def patient_from_eyes(eyes: np.ndarray) -> np.ndarray:
    """(..., 2, K) per-eye 0/1 [left, right] → (..., K) the patient's: a disease when either eye has it, N (normal)
    only when both eyes are. The one rule that turns eyes into a patient, for keywords and predictions alike."""
    eyes = np.asarray(eyes)
    union = eyes.max(axis=-2)
    n_col = CLASSES.index("N")
    union[..., n_col] = eyes[..., n_col].min(axis=-1)  # the patient is normal when both eyes are
    return union
