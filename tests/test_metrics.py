"""Official ODIR score and multi-label metrics."""

import math

import numpy as np
import pytest

from pipeline.constants import CLASSES
from model.metrics import multilabel_metrics, odir_score, tune_thresholds


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

    from model.metrics import cohen_kappa, roc_auc

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
