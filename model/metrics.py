"""Metrics for ODIR-5K: the official ODIR-2019 score and the usual multi-label metrics. Pure numpy.

numpy only, so that the light scoring install (no sklearn) prints the same figures; `tests/test_metrics.py` checks
F1, Cohen's kappa and ROC AUC against scikit-learn's definitions.

Two definitions, never to be mixed in one table (see docs/ODIR.md):
- ``odir_score``: the organisers' evaluation, on the patients x 8 matrices FLATTENED into one vector.
- ``multilabel_metrics``: F1 micro/macro over the 2-D (N, 8) matrix, per-class F1 and AUC.
"""

from __future__ import annotations

import numpy as np

from pipeline.constants import CLASSES

DEFAULT_THRESHOLD_GRID = tuple(np.round(np.linspace(0.05, 0.95, 19), 6))  # 0.05 steps, contains 0.5 exactly


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true and probs must both be (N, K); got {y.shape} and {p.shape}")
    return y.astype(np.int64), p


def _f1(y, pred) -> float:
    """F1 of the positive class of 0/1 vectors; 0 when there is no positive at all (sklearn's zero_division=0)."""
    y, pred = np.asarray(y) == 1, np.asarray(pred) == 1
    tp, fp, fn = (y & pred).sum(), (~y & pred).sum(), (y & ~pred).sum()
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def cohen_kappa(y, pred) -> float:
    """Cohen's kappa of two 0/1 vectors: (observed − chance agreement) / (1 − chance); nan if chance is 1."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    observed = np.mean(y == pred)
    chance = y.mean() * pred.mean() + (1 - y.mean()) * (1 - pred.mean())
    return float((observed - chance) / (1 - chance)) if chance < 1 else float("nan")


def roc_auc(y, scores) -> float:
    """Area under the ROC curve of 0/1 labels: the Mann-Whitney statistic, ties counted one half.

    Raises:
        ValueError: y holds a single value (the AUC is undefined), as sklearn's roc_auc_score does.
    """
    y = np.asarray(y) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("only one class present in y_true: ROC AUC is not defined")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))  # 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2)[inverse]


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
    kappa = cohen_kappa(gt, pred)
    f1 = float(np.mean(gt == pred))  # micro F1 over both labels of a flat 0/1 vector = accuracy
    auc = roc_auc(gt, pr)
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
    f1_per = np.array([_f1(y[:, c], pred[:, c]) for c in range(k)])  # (K,)
    aucs = np.full(k, np.nan)
    for c in range(k):
        if np.unique(y[:, c]).size == 2:
            aucs[c] = roc_auc(y[:, c], p[:, c])
    return dict(
        f1_micro=_f1(y.ravel(), pred.ravel()),  # pooled TP/FP/FN over all cells
        f1_macro=float(f1_per.mean()),
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
