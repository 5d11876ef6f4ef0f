"""Which eye: the per-eye head's findings, fitted, put in words, compared with the patient labels, and measured.
Pure numpy, so the light scoring install writes the same findings.

The network's patient head gives the official labels (ODIR labels a patient); its per-eye head (`--eye-loss-weight`)
says which eye shows what, trained on each eye's diagnostic keywords (pipeline/keywords.py). Its probabilities are
calibrated and thresholded on validation EYES, like the patient head's on validation patients.

    fit = fit_eye_head(eye_logits, eye_labels, usable, "platt")    # into best.pt: eye_calibration, eye_thresholds
    findings(eye_probs[i] > eye_thresholds)                        # "diabetes (left, right); cataract (right)"
    differences(patient_pred[i], eye_pred[i])                      # "labels only: G; eyes only: C" ("" when equal)
    eye_figures(...)                                               # per-eye AUC and F1 with intervals, naive baseline
"""
from __future__ import annotations

import numpy as np

from odir_dual.model.calibration import apply_calibration, fit_calibration
from odir_dual.model.metrics import BOOTSTRAP_RESAMPLES, bootstrap_intervals, multilabel_metrics, tune_thresholds
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES, EYES
from odir_dual.pipeline.keywords import patient_from_eyes

LABELS_FOLLOW = ("labels and pred_* are the patient head's (the official ODIR labels); findings are the per-eye "
                 "head's, each eye at its own thresholds; findings_vs_labels names the classes where the two differ")


def eye_rows(per_eye: np.ndarray) -> np.ndarray:
    """(N, 2, K) → (2N, K): rows [patient 0 left, patient 0 right, patient 1 left, ...]."""
    per_eye = np.asarray(per_eye)
    return per_eye.reshape(-1, per_eye.shape[-1])


def fit_eye_head(eye_logits, eye_labels, usable, method: str) -> dict:
    """The per-eye head's calibration and thresholds, fitted on validation eyes whose keywords reproduce their
    patient's labels (`usable`, pipeline.keywords.eye_label_matrix): the same kind of per-class calibration as the
    patient head (`method`; no ODIR offset: the official score is a patient figure), then per class the threshold
    of best F1 on those eyes.

    Args:
        eye_logits: (N, 2, K) validation eye logits [left, right]; eye_labels: (N, 2, K) 0/1; usable: (N,) bool.

    Returns:
        {"eye_calibration": {...}, "eye_thresholds": [K floats], "eye_fit_eyes": eyes used}; plain data for
        best.pt. No usable eye: no calibration and thresholds 0.5 (eye_fit_eyes 0).
    """
    usable = np.asarray(usable, bool)
    z, y = eye_rows(np.asarray(eye_logits)[usable]), eye_rows(np.asarray(eye_labels)[usable])
    if not len(z):
        return {"eye_calibration": {"method": "none"}, "eye_thresholds": [0.5] * len(CLASSES), "eye_fit_eyes": 0}
    calibration = fit_calibration(z, y, method)
    thresholds = tune_thresholds(y, apply_calibration(z, calibration))
    return {"eye_calibration": calibration, "eye_thresholds": [float(t) for t in thresholds],
            "eye_fit_eyes": int(len(z))}


def findings(eye_pred) -> str:
    """(2, K) 0/1 [left, right] → the classes found, each with its eyes, in class order:
    "normal (left); diabetes (right)", "diabetes (left, right); cataract (right)"; "none" when no class of either
    eye is above its threshold."""
    eye_pred = np.asarray(eye_pred).astype(bool)
    parts = [f"{CLASS_NAMES[c]} ({', '.join(e for e, on in zip(EYES, eye_pred[:, k]) if on)})"
             for k, c in enumerate(CLASSES) if eye_pred[:, k].any()]
    return "; ".join(parts) or "none"


def eye_findings(eye_pred) -> dict[str, str]:
    """(2, K) 0/1 → {"left": "normal", "right": "diabetes, cataract"}: each eye's own findings ("none")."""
    eye_pred = np.asarray(eye_pred).astype(bool)
    return {e: ", ".join(CLASS_NAMES[c] for c, on in zip(CLASSES, eye_pred[i]) if on) or "none"
            for i, e in enumerate(EYES)}


def differences(patient_pred, eye_pred) -> str:
    """Where the patient labels (K,) and the eyes' findings (2, K) disagree, with the eyes read as a patient by
    the keywords' rule (a disease in either eye; normal only when both are): "labels only: G; eyes only: C";
    "" when they agree."""
    patient = np.asarray(patient_pred).astype(bool)
    union = patient_from_eyes(np.asarray(eye_pred).astype(bool))
    parts = [f"{what}: {','.join(c for c, on in zip(CLASSES, mask) if on)}"
             for what, mask in (("labels only", patient & ~union), ("eyes only", union & ~patient)) if mask.any()]
    return "; ".join(parts)


def consistency(patient_pred, eye_pred) -> dict:
    """How often the two heads disagree over N patients, per class: `labels_only` (the patient label is positive
    and no eye is above its threshold) and `eyes_only` (an eye is above its threshold, the patient label negative;
    for N: both eyes normal, the patient not), and `patients_differing` (any class)."""
    patient = np.asarray(patient_pred).astype(bool)  # (N, K)
    union = patient_from_eyes(np.asarray(eye_pred).astype(bool))  # (N, K)
    return {"patients": int(len(patient)),
            "labels_only": dict(zip(CLASSES, (int(v) for v in (patient & ~union).sum(0)))),
            "eyes_only": dict(zip(CLASSES, (int(v) for v in (union & ~patient).sum(0)))),
            "patients_differing": int((patient != union).any(1).sum())}


def disagreement_line(patient_pred, eye_pred) -> str:
    """score.py's console line on how many scored patients' findings differ from their labels."""
    agree = consistency(patient_pred, eye_pred)
    return (f"per-eye findings (column findings): they differ from the patient labels for {agree['patients_differing']}"
            f" of {agree['patients']} patients (column findings_vs_labels; the labels are the official ones)")


def _figures(y, p, thresholds, groups, seed) -> tuple[dict, dict]:
    """Per class AUC and F1 (at `thresholds`) of rows y, p, and their 95 % intervals (eyes resampled by patient)."""
    m = multilabel_metrics(y, p, thresholds)
    ci = bootstrap_intervals(y, p, thresholds, groups=groups, seed=seed)
    figures = {"auc": m["auc"], "f1": m["f1"], "auc_macro": m["auc_macro"], "f1_macro": m["f1_macro"]}
    intervals = {"auc": ci["at_0.5"]["auc"], "f1": ci["tuned"]["f1"], "auc_macro": ci["at_0.5"]["auc_macro"],
                 "f1_macro": ci["tuned"]["f1_macro"]}
    return figures, intervals


def eye_figures(eye_labels, usable, eye_probs, eye_thresholds, patient_probs, patient_thresholds,
                seed: int = 0) -> dict:
    """The per-eye head on labelled eyes, beside the naive per-eye predictor (each eye inherits its patient's
    probabilities and thresholds), and how the two heads agree on every patient.

    Args:
        eye_labels: (N, 2, K) keyword labels; usable: (N,) bool, patients whose keywords reproduce their labels
            (only their eyes are measured).
        eye_probs: (N, 2, K) calibrated per-eye probabilities; eye_thresholds: (K,).
        patient_probs: (N, K) calibrated patient probabilities; patient_thresholds: (K,).
        seed: of the bootstrap (the same seed, the same intervals).

    Returns:
        {"eyes", "patients", "left_out", "positives" {class}, "model" and "naive" {auc, f1 {class}, auc_macro,
        f1_macro}, "ci95" {"model", "naive": the same keys as [lo, hi] or None, "resamples", "seed"},
        "consistency" (`consistency` on all N patients)}; without a usable patient, no figures (eyes 0).
    """
    usable = np.asarray(usable, bool)
    eye_probs, patient_probs = np.asarray(eye_probs, np.float64), np.asarray(patient_probs, np.float64)
    patient_pred = patient_probs > np.asarray(patient_thresholds)
    eye_pred = eye_probs > np.asarray(eye_thresholds)
    out = {"eyes": 2 * int(usable.sum()), "patients": int(usable.sum()), "left_out": int((~usable).sum()),
           "consistency": consistency(patient_pred, eye_pred)}
    if not usable.any():
        return out
    y = eye_rows(np.asarray(eye_labels)[usable]).astype(np.int64)  # (2M, K)
    groups = np.repeat(np.arange(int(usable.sum())), 2)  # both eyes of a patient are drawn together
    naive = np.repeat(patient_probs[usable], 2, axis=0)  # each eye inherits its patient's probabilities
    model, model_ci = _figures(y, eye_rows(eye_probs[usable]), eye_thresholds, groups, seed)
    base, base_ci = _figures(y, naive, patient_thresholds, groups, seed)
    out.update(positives=dict(zip(CLASSES, (int(v) for v in y.sum(0)))), model=model, naive=base,
               ci95={"model": model_ci, "naive": base_ci, "resamples": BOOTSTRAP_RESAMPLES, "seed": seed})
    return out


def eye_columns(eye_probs, eye_thresholds, patient_pred) -> tuple[dict, dict]:
    """One scored patient's per-eye columns, as score.py writes them: ({"findings", "findings_vs_labels"},
    {"left_p_N" ... "right_p_O"}); blanks (None, "") for a patient that was not scored (`eye_probs` None)."""
    names = [f"{e}_p_{c}" for e in EYES for c in CLASSES]
    if eye_probs is None:
        return {"findings": "", "findings_vs_labels": ""}, dict.fromkeys(names)
    eye_probs = np.asarray(eye_probs, np.float64)
    eye_pred = eye_probs > np.asarray(eye_thresholds)
    words = {"findings": findings(eye_pred), "findings_vs_labels": differences(patient_pred, eye_pred) or "same"}
    return words, dict(zip(names, (float(v) for v in eye_probs.ravel())))
