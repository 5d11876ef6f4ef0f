"""Metrics for ODIR-5K: the official ODIR-2019 score and the usual multi-label metrics. Pure numpy.

numpy only, so that the light scoring install (no sklearn) prints the same figures; `tests/test_metrics.py` checks
F1, Cohen's kappa and ROC AUC against scikit-learn's definitions.

Two definitions, never to be mixed in one table (see docs/ODIR.md):
- ``odir_score``: the organisers' evaluation, on the patients x 8 matrices FLATTENED into one vector.
- ``multilabel_metrics``: F1 micro/macro over the 2-D (N, 8) matrix, per-class F1 and AUC.
"""

from __future__ import annotations

import warnings

import numpy as np

from odir_dual.pipeline.constants import CLASSES

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


def evaluate(y_true, probs, thresholds=None, *, per_class: bool = False, classes=CLASSES) -> dict:
    """The figures every report of a model shows (training's report.json, score.py, the folder report, the holdout
    check), computed here once.

    Args:
        y_true, probs: (N, K) 0/1 ground truth and probabilities.
        thresholds: (K,) tuned per-class thresholds, or None.
        per_class: also the per-class rates (`class_rates`) at the tuned thresholds (0.5 without them).

    Returns:
        dict: "at_0.5" and, with thresholds, "tuned": `multilabel_metrics` there; "odir": the official ODIR-2019
        score (`odir_score`, threshold 0.5), None when it is undefined on these labels (one label value in every
        cell), the reason then under "odir_undefined"; with per_class=True "per_class".
    """
    out = {"at_0.5": multilabel_metrics(y_true, probs, 0.5, classes=classes)}
    try:
        out["odir"] = odir_score(y_true, probs)
    except ValueError as e:  # a single label value across all cells: the pooled AUC is undefined
        out.update(odir=None, odir_undefined=str(e))
    if thresholds is not None:
        out["tuned"] = multilabel_metrics(y_true, probs, thresholds, classes=classes)
    if per_class:
        out["per_class"] = class_rates(y_true, probs, 0.5 if thresholds is None else thresholds, classes=classes)
    return out


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


# ----------------------------------------------------------------------------------------------- how sure: bootstrap

BOOTSTRAP_RESAMPLES = 1000
PER_CLASS_RATES = ("sensitivity", "specificity", "ppv")  # at a threshold, per class; with F1 and AUC the report's table


def resample_counts(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) int: how many times each of n patients is drawn in each bootstrap resample (n draws with
    replacement). A resample's figure is the figure on the patients weighted by these counts."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (B, n)
    flat = (idx + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


def _weighted_auc(pos: np.ndarray, scores: np.ndarray, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(B,) ROC AUC of 0/1 labels `pos` (M,) under B weightings w (B, M) of the M items: the Mann-Whitney statistic
    with each item counted w times (ties one half), nan where the positives' or the negatives' weight is 0.
    With `rows` (M,), item m's weight is w[:, rows[m]] (the cells of a patient share the patient's weight)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], pos[order]  # (M,) in score order
    w = w[:, order if rows is None else rows[order]]  # (B, M)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # (G,) where each run of tied scores starts
    w_pos = w * y  # (B, M)
    pos_g = np.add.reduceat(w_pos, starts, axis=1)  # (B, G) positive weight of each run of tied scores
    neg_g = np.add.reduceat(w - w_pos, starts, axis=1)  # (B, G) negative weight
    below = np.cumsum(neg_g, axis=1) - neg_g  # (B, G) negative weight strictly below each run
    n_pos, n_neg = pos_g.sum(1), neg_g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (pos_g * (below + 0.5 * neg_g)).sum(1) / (n_pos * n_neg), np.nan)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _counted(y: np.ndarray, p: np.ndarray, thr: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Figures at per-class thresholds under weightings w (B, N): F1 micro/macro, per-class F1, sensitivity,
    specificity, PPV (B, K; nan where undefined: no positive, no negative, no predicted positive)."""
    pos, pred = y == 1, p > thr[None, :]  # (N, K)
    tp, fp = w @ (pred & pos), w @ (pred & ~pos)  # (B, K) weighted confusion counts
    fn, tn = w @ (~pred & pos), w @ (~pred & ~pos)
    f1 = np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn))  # zero_division=0, as multilabel_metrics
    stp, sfp, sfn = tp.sum(1), fp.sum(1), fn.sum(1)
    # A class's own F1 counts as undefined in a resample that drew none of its positives (its 0 there says nothing
    # about the model, and would drag a rare class's interval down to 0); the macro mean keeps the 0, as defined.
    return dict(f1_micro=np.nan_to_num(_ratio(2 * stp, 2 * stp + sfp + sfn)), f1_macro=f1.mean(1),
                f1=np.where(tp + fn > 0, f1, np.nan),
                sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp), ppv=_ratio(tp, tp + fp))


def _official(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """The official ODIR score's figures (B,) under weightings w (B, N) of the patients (`odir_score`)."""
    n, k = y.shape
    out = {"odir.auc": _weighted_auc(y.ravel() == 1, p.ravel(), w, rows=np.arange(n * k) // k)}  # (N*K,) cells
    # kappa and F1 (= accuracy) from the pooled confusion counts at 0.5
    pos, pred = (y == 1).astype(np.float64), (p > 0.5).astype(np.float64)
    total = w.sum(1) * k
    agree = (w @ (pos * pred + (1 - pos) * (1 - pred))).sum(1)
    p_true, p_pred = (w @ pos).sum(1) / total, (w @ pred).sum(1) / total
    acc = agree / total
    chance = p_true * p_pred + (1 - p_true) * (1 - p_pred)
    out["odir.kappa"] = _ratio(acc - chance, 1 - chance)
    out["odir.f1"] = acc
    out["odir.final"] = (out["odir.kappa"] + acc + out["odir.auc"]) / 3
    return out


def _resampled(y: np.ndarray, p: np.ndarray, thr: np.ndarray | None, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrapped figure under weightings w (B, N) of the patients: flat name → (B,) or (B, K)."""
    k = y.shape[1]
    auc = np.stack([_weighted_auc(y[:, c] == 1, p[:, c], w) for c in range(k)], axis=1)  # (B, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no AUC defined: nan, as multilabel_metrics
        auc_macro = np.nanmean(auc, axis=1)
    out = _official(y, p, w)
    at_half = _counted(y, p, np.full(k, 0.5), w)
    for name, figures in (("at_0.5", at_half), ("tuned", _counted(y, p, thr, w) if thr is not None else None)):
        if figures is None:
            continue
        out.update({f"{name}.f1_micro": figures["f1_micro"], f"{name}.f1_macro": figures["f1_macro"],
                    f"{name}.auc_macro": auc_macro, f"{name}.f1": figures["f1"], f"{name}.auc": auc})
        if name == "tuned" or thr is None:
            out.update({f"per_class.{r}": figures[r] for r in PER_CLASS_RATES})
    return out


def class_rates(y_true, probs, thresholds=0.5, classes=CLASSES) -> dict:
    """Per class at `thresholds` (positive when prob > threshold): positives (patients), prevalence, sensitivity,
    specificity and PPV (nan when undefined: no positive, no negative, no predicted positive)."""
    y, p = _check(y_true, probs)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    r = _counted(y, p, thr, np.ones((1, len(y))))
    out = {"positives": dict(zip(classes, (int(v) for v in y.sum(0)))),
           "prevalence": dict(zip(classes, (float(v) for v in y.mean(0)))) if len(y) else {}}
    out.update({name: dict(zip(classes, (float(v) for v in r[name][0]))) for name in PER_CLASS_RATES})
    return out


def bootstrap_intervals(y_true, probs, thresholds=None, *, baseline=None, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, level: float = 0.95, min_defined: float = 0.5, classes=CLASSES,
                        chunk_cells: int = 2_000_000, groups=None) -> dict:
    """Percentile bootstrap over patients: the `level` interval of every figure of `odir_score`,
    `multilabel_metrics` (at 0.5, and at `thresholds` when given) and `class_rates`.

    Patients (rows) are drawn with replacement, `resamples` times (numpy's default_rng(seed): the same inputs and
    seed give the same intervals); each figure is recomputed on every resample and its interval is the
    ((1 - level) / 2, (1 + level) / 2) quantiles of those values. A figure undefined in a resample (a class's AUC,
    sensitivity or F1 with no positive patient drawn, specificity with no negative, PPV with none predicted) skips
    that resample; `used` says how many resamples such a figure had, and with fewer than `min_defined` x
    `resamples` it gets no interval (None).

    Args:
        y_true: (N, K) 0/1 ground truth, one row per patient.
        probs: (N, K) predicted probabilities.
        thresholds: (K,) per-class thresholds for the "tuned" figures and the per-class rates (0.5 when None).
        baseline: optional (N, K) probabilities of another predictor (the trivial one) on the same patients: its
            official final's interval, and that of the paired difference final(probs) - final(baseline), drawn
            from the same resamples.
        groups: optional (N,) int, the group (0..G-1) of each row: whole groups are drawn instead of rows, so rows
            that belong together stay together (a patient's two eyes: `model.eyes`).

    Returns:
        dict mirroring report.json's split: ``odir`` {kappa, f1, auc, final}, ``at_0.5`` and ``tuned``
        {f1_micro, f1_macro, auc_macro, f1 {class}, auc {class}}, ``per_class`` {sensitivity, specificity, ppv:
        {class}}, each [lo, hi] or None; ``baseline`` {final, final_difference} with `baseline`; and
        ``resamples``, ``seed``, ``level``, ``used`` {"tuned.auc.H": n, ...: only the figures undefined in
        some resamples}.
    """
    y, p = _check(y_true, probs)
    n, k = y.shape
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} columns")
    thr = None if thresholds is None else np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,))
    if groups is None:
        counts = resample_counts(n, resamples, seed).astype(np.float64)  # (B, N)
    else:  # a row weighs what its group was drawn
        groups = np.asarray(groups, np.int64)
        counts = resample_counts(int(groups.max()) + 1, resamples, seed).astype(np.float64)[:, groups]  # (B, N)
    if baseline is not None:
        _, base = _check(y_true, baseline)
    step = max(1, chunk_cells // max(1, n * k))  # resamples per chunk: bounds the (B, N*K) temporaries
    parts = []
    for s in range(0, resamples, step):
        w = counts[s:s + step]
        figures = _resampled(y, p, thr, w)
        if baseline is not None:
            base_final = _official(y, base, w)["odir.final"]
            figures["baseline.final"] = base_final
            figures["baseline.final_difference"] = figures["odir.final"] - base_final
        parts.append(figures)
    samples = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    q = ((1 - level) / 2, (1 + level) / 2)
    out: dict = {"resamples": resamples, "seed": seed, "level": level, "used": {}}

    def interval(values: np.ndarray, name: str):
        ok = np.isfinite(values)
        if ok.sum() < resamples:
            out["used"][name] = int(ok.sum())
        if ok.sum() < max(1, min_defined * resamples):
            return None
        lo, hi = np.quantile(values[ok], q)
        return [float(lo), float(hi)]

    for name, values in samples.items():
        group, figure = name.rsplit(".", 1)
        target = out.setdefault(group, {})
        if values.ndim == 2:  # per class
            target[figure] = {c: interval(values[:, j], f"{name}.{c}") for j, c in enumerate(classes)}
        else:
            target[figure] = interval(values, name)
    return out


COMPARED = ("final", "kappa", "f1", "auc", "auc_macro")  # paired_bootstrap's figures (official at 0.5; AUC macro)


def paired_bootstrap(y_true, probs_a, probs_b, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = 0.95, min_defined: float = 0.5, classes=CLASSES,
                     chunk_cells: int = 2_000_000) -> dict:
    """Two predictors on the same patients: each one's figures, and the percentile bootstrap interval of each
    paired difference B − A, both computed on the same resamples of the patients (default_rng(seed)), so what
    the two share (which patients are hard) cancels out.

    Figures: the official ODIR score's final, kappa, F1 and AUC (cells flattened, threshold 0.5), the AUC macro
    and each class's AUC (threshold-free). A difference undefined in a resample (a class with no positive drawn)
    skips it; with fewer than `min_defined` x `resamples` it gets no interval.

    Returns:
        {name: {"a", "b", "difference", "ci95": [lo, hi] or None, "excludes_zero": bool}} for the names
        `COMPARED` then "auc_<class>"; and "resamples", "seed", "level", "patients".
    """
    y, pa = _check(y_true, probs_a)
    _, pb = _check(y_true, probs_b)
    n, k = y.shape
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} columns")

    def figures(p, w):  # name → (B,) under the weightings w (B, N)
        r = _resampled(y, p, None, w)
        out = {**{name: r[f"odir.{name}"] for name in COMPARED[:4]}, "auc_macro": r["at_0.5.auc_macro"]}
        return {**out, **{f"auc_{c}": r["at_0.5.auc"][:, j] for j, c in enumerate(classes)}}

    point_a, point_b = figures(pa, np.ones((1, n))), figures(pb, np.ones((1, n)))
    counts = resample_counts(n, resamples, seed).astype(np.float64)  # (B, N): the same draws for A and B
    step = max(1, chunk_cells // max(1, n * k))
    chunks = []
    for s in range(0, resamples, step):
        w = counts[s:s + step]
        fa, fb = figures(pa, w), figures(pb, w)
        chunks.append({name: fb[name] - fa[name] for name in fa})
    out: dict = {"resamples": resamples, "seed": seed, "level": level, "patients": n}
    for name in point_a:
        values = np.concatenate([c[name] for c in chunks])
        ok = values[np.isfinite(values)]
        ci = None
        if len(ok) >= max(1, min_defined * resamples):
            ci = [float(v) for v in np.quantile(ok, ((1 - level) / 2, (1 + level) / 2))]
        a, b = float(point_a[name][0]), float(point_b[name][0])
        out[name] = {"a": a, "b": b, "difference": b - a, "ci95": ci,
                     "excludes_zero": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}
    return out


REPORT_AVERAGES = ("micro avg", "macro avg", "weighted avg")  # scikit-learn's classification_report rows


def classification_table(y_true, probs, thresholds=0.5, classes=CLASSES) -> dict:
    """scikit-learn's multi-label `classification_report` (zero_division=0), plus specificity, in numpy: per class
    and as micro, macro and support-weighted averages, precision, recall (sensitivity), specificity, F1 and support
    (positive patients), with a patient called positive when its probability is above the class's threshold.

    Returns {row: {"precision", "recall", "specificity", "f1", "support"}}, rows: the classes, then REPORT_AVERAGES.
    """
    y, p = _check(y_true, probs)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    truth, pred = y == 1, p > thr
    tp, fp = (truth & pred).sum(0), (~truth & pred).sum(0)
    fn, tn = (truth & ~pred).sum(0), (~truth & ~pred).sum(0)

    def rates(tp, fp, fn, tn) -> dict:
        ratio = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), 0.0)  # noqa: E731 - 0 when undefined
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        return {"precision": precision, "recall": recall, "specificity": ratio(tn, tn + fp),
                "f1": ratio(2 * tp, 2 * tp + fp + fn)}

    per = rates(tp, fp, fn, tn)
    support = truth.sum(0)
    out = {c: {**{k: float(v[k_]) for k, v in per.items()}, "support": int(support[k_])}
           for k_, c in enumerate(classes)}
    total = int(support.sum())
    out["micro avg"] = {k: float(v) for k, v in rates(tp.sum(), fp.sum(), fn.sum(), tn.sum()).items()}
    out["macro avg"] = {k: float(v.mean()) for k, v in per.items()}
    out["weighted avg"] = {k: float((v * support).sum() / total) if total else 0.0 for k, v in per.items()}
    for avg in REPORT_AVERAGES:
        out[avg]["support"] = total
    return out


def format_classification_table(table: dict) -> str:
    """`classification_table` as text, one row per class and average (classification_report's layout)."""
    names = ("precision", "recall", "specificity", "f1", "support")
    lines = [f"{'':<14}" + "".join(f"{n:>12}" for n in names)]
    for row, v in table.items():
        if row == REPORT_AVERAGES[0]:
            lines.append("")
        lines.append(f"{row:<14}" + "".join(f"{v[n]:>12.3f}" for n in names[:-1]) + f"{v['support']:>12d}")
    return "\n".join(lines)


def format_interval(value, ci, digits: int = 3) -> str:
    """`0.656 [0.62, 0.69]`: a figure with its interval (one digit fewer); `n/a` for an undefined figure, the
    figure alone when it has no interval."""
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{max(1, digits - 1)}f}, {ci[1]:.{max(1, digits - 1)}f}]"
    return text
