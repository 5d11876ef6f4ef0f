"""Metrics for ODIR-5K: the official ODIR-2019 score and the usual multi-label metrics. Pure numpy + sklearn.

Two definitions, never to be mixed in one table (see docs/ODIR.md):
- ``odir_score``: the organisers' evaluation, on the patients x 8 matrices FLATTENED into one vector.
- ``multilabel_metrics``: F1 micro/macro over the 2-D (N, 8) matrix, per-class F1 and AUC.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from pipeline.constants import CLASSES

DEFAULT_THRESHOLD_GRID = tuple(np.round(np.linspace(0.05, 0.95, 19), 6))  # 0.05 steps, contains 0.5 exactly


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true and probs must both be (N, K); got {y.shape} and {p.shape}")
    return y.astype(np.int64), p


def odir_score(y_true, probs, threshold: float = 0.5) -> dict[str, float]:
    """Official ODIR-2019 score: kappa, F1 and AUC on the flattened matrices, and their mean.

    Exactly the organisers' example evaluation: ``gt = y_true.flatten()``, ``pr = probs.flatten()``,
    ``kappa = cohen_kappa_score(gt, pr > thr)``, ``f1 = f1_score(gt, pr > thr, average="micro")``
    (on a flat 0/1 vector this is plain accuracy over all cells), ``auc = roc_auc_score(gt, pr)``,
    ``final = (kappa + f1 + auc) / 3``.

    Args:
        y_true: (N, 8) 0/1 ground truth, one row per patient.
        probs: (N, 8) predicted probabilities.
        threshold: a cell is predicted positive when ``prob > threshold`` (strict, as in the official code).

    Returns:
        dict with float ``kappa``, ``f1``, ``auc``, ``final``.
    """
    y, p = _check(y_true, probs)
    gt = y.flatten()  # (N*8,)
    pr = p.flatten()  # (N*8,)
    pred = pr > threshold
    kappa = float(cohen_kappa_score(gt, pred))
    f1 = float(f1_score(gt, pred, average="micro"))
    auc = float(roc_auc_score(gt, pr))
    return dict(kappa=kappa, f1=f1, auc=auc, final=(kappa + f1 + auc) / 3.0)


def multilabel_metrics(y_true, probs, thresholds=0.5, classes=CLASSES) -> dict:
    """Multi-label metrics over the 2-D (N, K) matrix (NOT the official ODIR score).

    Args:
        y_true: (N, K) 0/1 ground truth.
        probs: (N, K) predicted probabilities.
        thresholds: a scalar, or (K,) per-class thresholds; positive when ``prob > threshold``.
        classes: K class names, used as keys of the per-class dicts.

    Returns:
        dict with ``f1_micro``, ``f1_macro`` (zero_division=0), ``f1`` {class: F1}, ``auc`` {class: AUC,
        nan when y_true has a single value in that column}, ``auc_macro`` (nanmean of the per-class AUCs,
        nan if all are nan), and ``thresholds`` (K floats, as used).
    """
    y, p = _check(y_true, probs)
    k = y.shape[1]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} columns")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,))
    pred = (p > thr[None, :]).astype(np.int64)  # (N, K)
    f1_per = f1_score(y, pred, average=None, zero_division=0)  # (K,)
    aucs = np.full(k, np.nan)
    for c in range(k):
        if np.unique(y[:, c]).size == 2:
            aucs[c] = roc_auc_score(y[:, c], p[:, c])
    return dict(
        f1_micro=float(f1_score(y, pred, average="micro", zero_division=0)),
        f1_macro=float(f1_score(y, pred, average="macro", zero_division=0)),
        f1={name: float(v) for name, v in zip(classes, f1_per)},
        auc={name: float(v) for name, v in zip(classes, aucs)},
        auc_macro=float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
        thresholds=[float(t) for t in thr],
    )


def tune_thresholds(y_true, probs, grid=DEFAULT_THRESHOLD_GRID) -> np.ndarray:
    """Per-class threshold that maximises that class's F1 on the given data.

    Tune on a validation split and report on another: on the data it was tuned on, the result is
    optimistic by construction.

    Args:
        y_true: (N, K) 0/1 ground truth.
        probs: (N, K) predicted probabilities.
        grid: candidate thresholds (positive when ``prob > threshold``).

    Returns:
        (K,) float array. Ties go to the threshold closest to 0.5 (then the lower one); a class with no
        positives gets 0.5.
    """
    y, p = _check(y_true, probs)
    grid = np.asarray(grid, dtype=np.float64)  # (G,)
    pred = p[None, :, :] > grid[:, None, None]  # (G, N, K)
    pos = y[None, :, :] == 1  # (1, N, K)
    tp = (pred & pos).sum(axis=1)  # (G, K)
    fp = (pred & ~pos).sum(axis=1)  # (G, K)
    fn = (~pred & pos).sum(axis=1)  # (G, K)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)  # (G, K)
    out = np.full(y.shape[1], 0.5)
    # Sort candidates by distance to 0.5, then value, so argmax (first maximum) breaks ties that way.
    order = np.lexsort((grid, np.abs(grid - 0.5)))
    for c in range(y.shape[1]):
        if pos[0, :, c].any():
            out[c] = grid[order[np.argmax(f1[order, c])]]
    return out
