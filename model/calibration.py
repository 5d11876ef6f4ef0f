"""Per-class probability calibration on validation logits, and the errors that measure it. Pure numpy.

Why: the loss rebalances the classes, so `sigmoid(logit)` ranks well within a class but is no probability, and the
official ODIR score (every cell cut at 0.5, AUC pooled over classes) punishes exactly that. An increasing map per
class, fitted on validation, fixes it without changing any class's ranking (docs/DESIGN-NOTES.md):

    platt:        p = sigmoid(a_k * z + b_k)    (Platt 1999; two numbers per class)
    temperature:  p = sigmoid(z / T_k)          (Guo et al. 2017, per class; keeps 0 at 0.5)
    none:         p = sigmoid(z)

`with_odir_offset` then shifts all logits by one number so that the official cut, 0.5, falls where the official
final is best on validation.
"""
from __future__ import annotations

import numpy as np

from odir_dual.model.metrics import odir_score

METHODS = ("platt", "temperature", "none")
RIDGE = 1e-3  # L2 penalty on (a - 1, b) per validation patient: a class with 3 positives stays finite
ECE_BINS = 15


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def fit_calibration(logits, labels, method: str = "platt", iterations: int = 50) -> dict:
    """Per-class calibration parameters from validation logits (N, K) and 0/1 labels (N, K).

    Returns:
        {"method": method, "a": [K floats], "b": [K floats]}: p = sigmoid(a * z + b) (temperature: b = 0,
        a = 1/T; none: a = 1, b = 0). Plain floats, so it fits a weights-only checkpoint and ONNX metadata.
    """
    if method not in METHODS:
        raise ValueError(f"calibration {method!r}: choose one of {', '.join(METHODS)}")
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    k = z.shape[1]
    a, b = np.ones(k), np.zeros(k)
    if method != "none":
        for c in range(k):
            a[c], b[c] = _fit_one(z[:, c], y[:, c], with_bias=method == "platt", iterations=iterations)
    return {"method": method, "a": a.tolist(), "b": b.tolist()}


def _fit_one(z: np.ndarray, y: np.ndarray, *, with_bias: bool, iterations: int) -> tuple[float, float]:
    """Damped Newton on the mean log-loss of sigmoid(a z + b) + RIDGE * ((a-1)^2 + b^2): each step is halved until
    the loss falls (a full step overshoots when the logits are far too confident)."""
    x = np.stack([z, np.ones_like(z)], 1) if with_bias else z[:, None]  # (N, 2) or (N, 1)
    prior = np.array([1.0, 0.0])[: x.shape[1]]
    theta = prior.copy()

    def loss(t):
        s = x @ t
        return np.mean(np.logaddexp(0.0, s) - y * s) + RIDGE * np.sum((t - prior) ** 2)

    current = loss(theta)
    for _ in range(iterations):
        p = _sigmoid(x @ theta)
        grad = x.T @ (p - y) / len(z) + 2 * RIDGE * (theta - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(z) + 2 * RIDGE * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        for _ in range(30):
            trial = loss(theta - step)
            if trial <= current:
                break
            step = step / 2
        theta, improvement, current = theta - step, current - trial, trial
        if improvement < 1e-12:
            break
    return float(theta[0]), float(theta[1]) if with_bias else 0.0


def with_odir_offset(calibration: dict, logits, labels) -> dict:
    """`calibration` plus one logit shift for every class, chosen on these (validation) logits to maximise the
    official ODIR final. Why: the official score marks a cell positive above 0.5, while a log-loss fit puts the best
    cut for the pooled kappa elsewhere; shifting the logits moves that cut to 0.5 and leaves the ranking, hence every
    AUC, unchanged. The shift is folded into `b`, so every consumer (ONNX, score.py) outputs the shifted
    probabilities; `odir_offset` records it."""
    probs = apply_calibration(logits, calibration)
    cuts = sorted(np.round(np.arange(0.05, 0.951, 0.01), 2), key=lambda t: abs(t - 0.5))  # ties: the smaller shift
    finals = [odir_score(labels, probs, float(t))["final"] for t in cuts]
    cut = float(cuts[int(np.argmax(finals))])
    offset = -float(np.log(cut / (1 - cut)))  # sigmoid(x + offset) > 0.5  ⇔  sigmoid(x) > cut
    b = [float(v) + offset for v in calibration["b"]]
    return {**calibration, "b": b, "odir_offset": offset, "odir_cut": cut}


def describe_calibration(calibration: dict | None) -> str:
    """One line for the console, the model card and report.html: the method, and the ODIR shift when there is one."""
    method = (calibration or {}).get("method", "none")
    text = "none: probabilities are sigmoid(logits)" if method == "none" else f"{method}, per class"
    if (calibration or {}).get("odir_offset"):
        text += (f"; then every logit shifted by {calibration['odir_offset']:+.2f}, so that the official score's 0.5 "
                 f"cut falls where validation's best cut ({calibration['odir_cut']:.2f}) was")
    return text


def apply_calibration(logits, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities (N, K) from logits (N, K); without (a, b) (None, or a checkpoint from before
    calibration) the plain sigmoid."""
    z = np.asarray(logits, np.float64)
    if not calibration or "a" not in calibration:
        return _sigmoid(z)
    return _sigmoid(np.asarray(calibration["a"]) * z + np.asarray(calibration["b"]))


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """ECE over every (patient, class) cell, as the official score flattens them: the mean |accuracy - confidence|
    gap of `bins` equal-width probability bins, weighted by the cells in each bin."""
    p, y = np.asarray(probs, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    gap = 0.0
    for i in range(bins):
        cells = which == i
        if cells.any():
            gap += cells.sum() * abs(y[cells].mean() - p[cells].mean())
    return float(gap / len(p))


def brier_score(probs, labels) -> float:
    """Mean squared error between probabilities and 0/1 labels over every cell."""
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(labels, np.float64)) ** 2))
