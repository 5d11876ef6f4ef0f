"""model.calibration: fitted maps undo a known miscalibration, keep the ranking, and the errors measure it."""
import numpy as np
import pytest

from odir_dual.model.calibration import apply_calibration, brier_score, expected_calibration_error, fit_calibration


def miscalibrated(n=3000, k=8, seed=0):
    """Labels drawn from true probabilities q; logits that are 3× overconfident and shifted per class."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-1.5, 1.5, (n, k)) + np.linspace(-1, 1, k)  # classes of different prevalence
    labels = (rng.random((n, k)) < 1 / (1 + np.exp(-true_logit))).astype(int)
    shift = np.linspace(-2, 2, k)
    return 3.0 * true_logit + shift, labels, (1.0 / 3.0, -shift / 3.0)


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibration_lowers_the_error_on_unseen_patients(method):
    logits, labels, _ = miscalibrated()
    fit, held = slice(0, 1500), slice(1500, None)  # fitted on "validation", judged on "test"
    cal = fit_calibration(logits[fit], labels[fit], method)
    raw = apply_calibration(logits[held], None)
    calibrated = apply_calibration(logits[held], cal)
    assert expected_calibration_error(calibrated, labels[held]) < 0.5 * expected_calibration_error(raw, labels[held])
    assert brier_score(calibrated, labels[held]) < brier_score(raw, labels[held])
    # an increasing map per class: the ranking inside each class (its AUC) is untouched
    for c in range(labels.shape[1]):
        order = np.argsort(logits[held][:, c], kind="stable")
        assert np.all(np.diff(calibrated[:, c][order]) >= 0)


def test_platt_recovers_the_known_slope_and_shift():
    logits, labels, (slope, shift) = miscalibrated(n=20000, seed=1)
    cal = fit_calibration(logits, labels, "platt")
    np.testing.assert_allclose(cal["a"], slope, atol=0.03)
    np.testing.assert_allclose(cal["b"], shift, atol=0.12)


def test_none_is_the_plain_sigmoid_and_parameters_are_plain_floats():
    logits, labels, _ = miscalibrated(n=100)
    cal = fit_calibration(logits, labels, "none")
    np.testing.assert_allclose(apply_calibration(logits, cal), 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-12)
    assert all(type(v) is float for v in cal["a"] + cal["b"])
    with pytest.raises(ValueError, match="choose one of"):
        fit_calibration(logits, labels, "isotonic")


def test_a_class_without_positives_stays_finite():
    logits, labels, _ = miscalibrated(n=200)
    labels[:, 3] = 0
    cal = fit_calibration(logits, labels, "platt")
    assert np.isfinite(cal["a"]).all() and np.isfinite(cal["b"]).all()
    assert apply_calibration(logits, cal)[:, 3].mean() < 0.02  # no positives seen: near-zero probabilities


def test_ece_of_perfect_and_of_worst_predictions():
    y = np.array([[0, 1], [1, 0]])
    assert expected_calibration_error(y.astype(float), y) == 0.0
    assert expected_calibration_error(1.0 - y, y) == 1.0
    assert brier_score(np.full((2, 2), 0.5), y) == 0.25


def test_odir_offset_moves_the_official_cut_to_its_best_place_and_keeps_the_ranking():
    from odir_dual.model.calibration import with_odir_offset
    from odir_dual.model.metrics import odir_score

    logits, labels, _ = miscalibrated()
    fit, held = slice(0, 1500), slice(1500, None)
    platt = fit_calibration(logits[fit], labels[fit], "platt")
    shifted = with_odir_offset(platt, logits[fit], labels[fit])
    before, after = (apply_calibration(logits[fit], c) for c in (platt, shifted))
    best_cut = max(odir_score(labels[fit], before, t)["final"] for t in np.arange(0.05, 0.951, 0.01))
    assert odir_score(labels[fit], after)["final"] == pytest.approx(best_cut)  # at the official 0.5
    assert shifted["odir_cut"] != 0.5 and np.allclose(np.array(shifted["b"]) - platt["b"], shifted["odir_offset"])
    assert np.array_equal(np.argsort(after.ravel(), kind="stable"), np.argsort(before.ravel(), kind="stable"))
    # chosen on "validation", it also helps patients it did not see
    unseen = [odir_score(labels[held], apply_calibration(logits[held], c))["final"] for c in (platt, shifted)]
    assert unseen[1] > unseen[0] + 0.005
