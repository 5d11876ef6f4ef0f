"""Official ODIR score and multi-label metrics."""

import math

import numpy as np
import pytest

from odir_dual.pipeline.constants import CLASSES
from odir_dual.model.metrics import (bootstrap_intervals, class_rates, evaluate, multilabel_metrics, odir_score,
                                     tune_thresholds)


def _random_problem(seed=0, n=200):
    """Labels with ODIR-like prevalences and informative but noisy probabilities."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.33, 0.32, 0.06, 0.06, 0.05, 0.03, 0.05, 0.28])
    y = (rng.random((n, 8)) < prevalence).astype(int)
    logits = 1.5 * (2 * y - 1) + rng.normal(0, 1.5, (n, 8)) - 1.0
    return y, 1 / (1 + np.exp(-logits))


def test_odir_score_hand_computed():
    # one patient, 8 cells
    y = np.array([[1, 0, 0, 1, 0, 0, 0, 1]])
    p = np.array([[0.9, 0.6, 0.2, 0.4, 0.1, 0.3, 0.7, 0.8]])
    # pred (p > 0.5) = 1 1 0 0 0 0 1 1  ->  TP 2 (cells 0, 7), FP 2 (1, 6), FN 1 (3), TN 3 (2, 4, 5)
    # f1 (micro on the flat vector) = accuracy = (2 + 3) / 8 = 0.625
    # kappa: po = 5/8, pe = P(gt=1) P(pred=1) + P(gt=0) P(pred=0) = 3/8 * 4/8 + 5/8 * 4/8 = 1/2
    #        kappa = (5/8 - 1/2) / (1 - 1/2) = 0.25
    # auc: positives {.9, .8, .4} vs negatives {.6, .2, .1, .3, .7}: .9 beats 5, .8 beats 5, .4 beats 3 -> 13/15
    s = odir_score(y, p)
    assert s["f1"] == pytest.approx(0.625)
    assert s["kappa"] == pytest.approx(0.25)
    assert s["auc"] == pytest.approx(13 / 15)
    assert s["final"] == pytest.approx((0.25 + 0.625 + 13 / 15) / 3)
    # it is defined on the flattened matrix: any reshaping of the same cells gives the same score
    assert odir_score(y.reshape(2, 4), p.reshape(2, 4)) == pytest.approx(s)


def test_odir_threshold_is_strict():
    y = np.array([[1, 0, 1, 0]])
    s = odir_score(y, np.array([[0.5, 0.5, 0.9, 0.1]]))
    # 0.5 is not > 0.5: pred = 0 0 1 0 -> 3 of 4 cells right
    assert s["f1"] == pytest.approx(0.75)


def test_flat_f1_micro_equals_accuracy():
    y, p = _random_problem(1)
    accuracy = np.mean(y.flatten() == (p.flatten() > 0.5))
    assert odir_score(y, p)["f1"] == pytest.approx(accuracy)


def test_trivial_prevalence_predictor_has_zero_kappa():
    y, _ = _random_problem(2, n=500)
    probs = np.broadcast_to(y.mean(axis=0), y.shape)  # same prevalence vector for every patient
    assert (probs < 0.5).all()
    s = odir_score(y, probs)
    assert s["kappa"] == 0.0
    assert s["f1"] == pytest.approx(1 - y.mean())  # all-negative: accuracy = fraction of negative cells


def test_multilabel_metrics_keys_and_values():
    y, p = _random_problem(3)
    m = multilabel_metrics(y, p)
    assert set(m["f1"]) == set(CLASSES) == set(m["auc"])
    from sklearn.metrics import f1_score, roc_auc_score

    pred = (p > 0.5).astype(int)
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["f1_macro"] == pytest.approx(np.mean([m["f1"][c] for c in CLASSES]))
    assert m["auc"]["D"] == pytest.approx(roc_auc_score(y[:, 1], p[:, 1]))
    assert m["auc_macro"] == pytest.approx(np.mean(list(m["auc"].values())))
    # per-class thresholds are applied column by column
    thr = np.full(8, 0.5)
    thr[0] = 0.99
    m2 = multilabel_metrics(y, p, thresholds=thr)
    assert m2["f1"]["N"] <= m["f1"]["N"] and m2["f1"]["D"] == m["f1"]["D"]


def test_per_class_auc_nan_for_single_valued_column():
    y, p = _random_problem(4)
    y[:, 5] = 0  # no H patients
    y[:, 6] = 1  # everyone M
    m = multilabel_metrics(y, p)
    assert math.isnan(m["auc"]["H"]) and math.isnan(m["auc"]["M"])
    finite = [v for v in m["auc"].values() if not math.isnan(v)]
    assert len(finite) == 6 and m["auc_macro"] == pytest.approx(np.mean(finite))
    assert m["f1"]["H"] == 0.0  # no positives: F1 is 0 (zero_division=0), no exception
    all_nan = multilabel_metrics(np.zeros((3, 8), int), np.full((3, 8), 0.2))
    assert math.isnan(all_nan["auc_macro"])


def test_tuned_thresholds_not_worse_on_tuning_data():
    y, p = _random_problem(5)
    thr = tune_thresholds(y, p)
    assert thr.shape == (8,)
    base, tuned = multilabel_metrics(y, p, 0.5), multilabel_metrics(y, p, thr)
    for c in CLASSES:
        assert tuned["f1"][c] >= base["f1"][c]
    assert tuned["f1_macro"] >= base["f1_macro"]


def test_evaluate_is_the_figures_of_every_report():
    """One evaluation for training's report, score.py, the folder report and the holdout check: the official score
    at 0.5, multi-label metrics at 0.5 and at the tuned thresholds, per-class rates at the tuned thresholds."""
    y, p = _random_problem(6)
    thr = tune_thresholds(y, p)
    ev = evaluate(y, p, thr, per_class=True)
    assert ev == {"at_0.5": multilabel_metrics(y, p, 0.5), "odir": odir_score(y, p),
                  "tuned": multilabel_metrics(y, p, thr), "per_class": class_rates(y, p, thr)}
    assert set(evaluate(y, p)) == {"at_0.5", "odir"}
    # no positive cell at all: the official score is undefined, said once, and the rest is still computed
    none = evaluate(np.zeros_like(y), p, thr)
    assert none["odir"] is None and "one class" in none["odir_undefined"]
    assert none["tuned"]["f1_macro"] == 0.0


def test_tune_thresholds_ties_and_empty_class():
    y = np.zeros((4, 8), int)
    p = np.full((4, 8), 0.3)
    y[:2, 0], p[:2, 0], p[2:, 0] = 1, 0.9, 0.1  # separable at any t in [0.1, 0.9): tie -> 0.5
    y[:2, 1], p[:2, 1], p[2:, 1] = 1, 0.9, 0.68  # perfect F1 only for t in [0.7, 0.85]: closest to 0.5 is 0.7
    thr = tune_thresholds(y, p)
    assert thr[0] == pytest.approx(0.5)
    assert thr[1] == pytest.approx(0.7)
    assert np.allclose(thr[2:], 0.5)  # no positives -> 0.5


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        odir_score(np.zeros((3, 8)), np.zeros((3, 7)))


def test_numpy_metrics_equal_sklearn_with_ties():
    # the metrics are numpy-only (the light scoring install has no sklearn); held to sklearn's definitions
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

    from odir_dual.model.metrics import cohen_kappa, roc_auc

    for seed in range(3):
        y, p = _random_problem(seed, n=300)
        p = np.round(p, 1)  # many ties
        flat_y, flat_p = y.flatten(), p.flatten()
        assert roc_auc(flat_y, flat_p) == pytest.approx(roc_auc_score(flat_y, flat_p), abs=1e-12)
        assert cohen_kappa(flat_y, flat_p > 0.5) == pytest.approx(cohen_kappa_score(flat_y, flat_p > 0.5), abs=1e-12)
        m = multilabel_metrics(y, p, 0.45)
        pred = (p > 0.45).astype(int)
        assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        roc_auc(np.zeros(5), np.linspace(0, 1, 5))


# ----------------------------------------------------------------------------------------------- bootstrap intervals


def test_each_resample_is_the_metric_on_the_drawn_patients():
    """The vectorised, count-weighted figures equal the plain metrics on the explicitly resampled rows (ties too)."""
    from odir_dual.model.metrics import _resampled, class_rates, resample_counts

    y, p = _random_problem(6, n=120)
    p = np.round(p, 1)  # ties inside and across classes
    thr = np.linspace(0.3, 0.65, 8)
    counts = resample_counts(len(y), 5, seed=3)
    figures = _resampled(y, p, thr, counts.astype(float))
    for b in range(5):
        rows = np.repeat(np.arange(len(y)), counts[b])  # the patients of resample b, each as often as drawn
        o, m = odir_score(y[rows], p[rows]), multilabel_metrics(y[rows], p[rows], thr)
        for key in ("kappa", "f1", "auc", "final"):
            assert figures[f"odir.{key}"][b] == pytest.approx(o[key], abs=1e-12)
        assert figures["tuned.f1_macro"][b] == pytest.approx(m["f1_macro"], abs=1e-12)
        assert figures["tuned.f1_micro"][b] == pytest.approx(m["f1_micro"], abs=1e-12)
        assert np.allclose(figures["tuned.auc"][b], [m["auc"][c] for c in CLASSES], equal_nan=True)
        rates = class_rates(y[rows], p[rows], thr)
        assert np.allclose(figures["per_class.sensitivity"][b], [rates["sensitivity"][c] for c in CLASSES],
                           equal_nan=True)
    assert counts.sum(1).tolist() == [len(y)] * 5


def test_perfect_separation_collapses_the_interval_to_one():
    rng = np.random.default_rng(7)
    y = (rng.random((80, 8)) < 0.3).astype(int)
    y[:2], y[2:4] = 1, 0  # every class has positives and negatives
    p = np.where(y == 1, rng.uniform(0.6, 0.9, y.shape), rng.uniform(0.1, 0.4, y.shape))
    ci = bootstrap_intervals(y, p, np.full(8, 0.5), resamples=200)
    for key in ("kappa", "f1", "auc", "final"):
        assert ci["odir"][key] == [1.0, 1.0], key
    assert all(ci["tuned"]["auc"][c] == [1.0, 1.0] for c in CLASSES)
    assert ci["tuned"]["f1_macro"] == [1.0, 1.0]


def test_interval_of_a_proportion_has_the_binomial_width():
    """Sensitivity 0.7 on 200 positive patients of 1000: the 95 % interval is about 2 x 1.96 x sqrt(.7 .3 / 200)
    = 0.127 wide (normal approximation) and holds 0.7."""
    y = np.zeros((1000, 8), int)
    y[:200, 1] = 1
    y[:, 0] = np.arange(1000) % 2  # other columns: anything with both labels
    p = np.full(y.shape, 0.2)
    p[:140, 1] = 0.9  # 140 of the 200 D patients detected
    p[:, 0] = np.where(y[:, 0] == 1, 0.8, 0.3)
    ci = bootstrap_intervals(y, p, np.full(8, 0.5), resamples=1000, seed=1)
    lo, hi = ci["per_class"]["sensitivity"]["D"]
    assert lo < 0.7 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / 200), rel=0.12)
    assert ci["per_class"]["specificity"]["D"] == [1.0, 1.0]


def test_intervals_are_reproducible_with_a_seed():
    y, p = _random_problem(8, n=150)
    a = bootstrap_intervals(y, p, np.full(8, 0.4), resamples=100, seed=5)
    assert bootstrap_intervals(y, p, np.full(8, 0.4), resamples=100, seed=5) == a
    b = bootstrap_intervals(y, p, np.full(8, 0.4), resamples=100, seed=6)
    assert b["odir"]["final"] != a["odir"]["final"]
    # chunking the resamples (memory bound) does not change them
    assert bootstrap_intervals(y, p, np.full(8, 0.4), resamples=100, seed=5, chunk_cells=1) == a


def test_undefined_auc_skips_resamples_and_says_how_many():
    from odir_dual.model.metrics import resample_counts

    y, p = _random_problem(9, n=30)
    y[:, 5] = 0
    y[4, 5] = 1  # a single H patient: resamples without patient 4 have no H AUC
    y[:, 4] = 0  # no A patient at all
    ci = bootstrap_intervals(y, p, resamples=300, seed=2)
    drawn = int((resample_counts(30, 300, seed=2)[:, 4] > 0).sum())
    assert 0.5 * 300 < drawn < 300  # about 1 - (29/30)^30 = 64 %
    assert ci["used"]["at_0.5.auc.H"] == drawn and ci["used"]["per_class.sensitivity.H"] == drawn
    assert ci["at_0.5"]["auc"]["H"] is not None
    assert ci["used"]["at_0.5.auc.A"] == 0 and ci["at_0.5"]["auc"]["A"] is None
    assert ci["at_0.5"]["f1"]["A"] is None  # no positive: F1 is 0 by definition, and says nothing; no interval
    assert ci["used"]["at_0.5.f1.H"] == drawn
    assert "odir.final" not in ci["used"]
    strict = bootstrap_intervals(y, p, resamples=300, seed=2, min_defined=0.9)
    assert strict["at_0.5"]["auc"]["H"] is None  # too few resamples had an H patient: no interval


def test_paired_difference_against_a_baseline():
    y, p = _random_problem(10, n=300)
    trivial = np.broadcast_to(y.mean(0), y.shape).copy()
    ci = bootstrap_intervals(y, p, baseline=trivial, resamples=300)
    diff = odir_score(y, p)["final"] - odir_score(y, trivial)["final"]
    lo, hi = ci["baseline"]["final_difference"]
    assert 0 < lo < diff < hi
    assert ci["baseline"]["final"][0] < odir_score(y, trivial)["final"] < ci["baseline"]["final"][1]


def test_format_interval():
    from odir_dual.model.metrics import format_interval

    assert format_interval(0.6561, [0.6204, 0.6912]) == "0.656 [0.62, 0.69]"
    assert format_interval(0.5, None) == "0.500"
    assert format_interval(float("nan"), [0.1, 0.2]) == "n/a"


@pytest.mark.parametrize("n", [330, 700])
def test_bootstrap_of_a_report_split_is_fast(n):
    import time

    y, p = _random_problem(11, n=n)
    t0 = time.perf_counter()
    bootstrap_intervals(y, p, np.full(8, 0.4), baseline=np.broadcast_to(y.mean(0), y.shape))
    assert time.perf_counter() - t0 < 10  # 1.3-1.6 s and 2.7-3.2 s (B = 1000) on the 2-core CPU at load 6.4


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_table_equals_sklearns_classification_report(seed):
    from sklearn.metrics import classification_report

    from odir_dual.model.metrics import classification_table, format_classification_table

    rng = np.random.default_rng(seed)
    y = (rng.random((60, 8)) < [0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.1, 0.2]).astype(int)
    y[:, 4] = 0  # a class with no positive: precision, recall, F1 defined as 0, as zero_division=0
    p = np.clip(0.6 * y + rng.random((60, 8)) * 0.7, 0, 1)
    thr = rng.uniform(0.3, 0.7, 8)
    ours = classification_table(y, p, thr)
    theirs = classification_report(y, (p > thr).astype(int), target_names=list(CLASSES), output_dict=True,
                                   zero_division=0)
    for row in [*CLASSES, "micro avg", "macro avg", "weighted avg"]:
        for key, name in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                          ("support", "support")):
            assert ours[row][key] == pytest.approx(theirs[row][name]), (row, key)
    k = 2
    tn = ((y[:, k] == 0) & (p[:, k] <= thr[k])).sum()
    assert ours["G"]["specificity"] == pytest.approx(tn / (y[:, k] == 0).sum())
    text = format_classification_table(ours)
    assert "weighted avg" in text and max(map(len, text.splitlines())) <= 110
