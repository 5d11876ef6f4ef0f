"""pipeline.split: exact sizes, determinism, stratification quality, and the split file."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from odir_dual.pipeline.split import load_split, save_split, stratified_split, three_way_split

TOLERANCE = 0.03  # |validation prevalence - overall prevalence| allowed for a class with >= 50 positives


def synthetic_labels(n=2000, seed=0) -> np.ndarray:
    """ODIR-like multi-label matrix: two common, several rare, some correlated classes."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.35, 0.33, 0.05, 0.06, 0.045, 0.03, 0.04, 0.22])
    y = (rng.random((n, 8)) < prevalence).astype(np.int64)
    y[:, 5] |= y[:, 1] & (rng.random(n) < 0.05)  # hypertension often comes with diabetes
    return y


@pytest.fixture(scope="module")
def real_labels(odir256):
    from odir_dual.pipeline.odir import label_matrix, read_patients
    return label_matrix(read_patients(odir256 / "full_df.csv")[0])


def check_partition(y, train, val, val_fraction):
    n = len(y)
    assert len(val) == round(n * val_fraction) and len(train) == n - len(val)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted


def max_deviation(y, val, min_positives=50) -> float:
    """Largest |validation prevalence - overall prevalence| over classes with enough positives."""
    common = y.sum(0) >= min_positives
    return float(np.abs(y[val].mean(0) - y.mean(0))[common].max())


def test_same_seed_same_split_other_seed_other_split():
    y = synthetic_labels(500)
    a, b, c = (stratified_split(y, 0.15, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("n, val_fraction", [(2, 0.5), (3, 0.15), (7, 0.15), (100, 0.15),
                                             (2239, 0.15), (1001, 0.2)])
def test_partition_and_sizes(n, val_fraction):
    y = synthetic_labels(n)
    check_partition(y, *stratified_split(y, val_fraction), val_fraction)


def test_stratified_on_synthetic():
    y = synthetic_labels()
    for seed in range(3):
        assert max_deviation(y, stratified_split(y, 0.15, seed)[1]) <= TOLERANCE


def test_stratified_on_real(real_labels):
    assert len(real_labels) == 2215 and (real_labels.sum(0) >= 50).all()
    for seed in range(3):
        train, val = stratified_split(real_labels, 0.15, seed)
        check_partition(real_labels, train, val, 0.15)
        assert max_deviation(real_labels, val) <= TOLERANCE


def rare_class_error(y, val) -> float:
    rare = y.mean(0) < 0.10
    return float(np.abs(y[val].mean(0) - y.mean(0))[rare].mean())


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_better_than_random_for_rare_classes(source, request):
    y = synthetic_labels() if source == "synthetic" else request.getfixturevalue("real_labels")
    n_val, seeds = round(len(y) * 0.15), range(8)
    stratified = np.mean([rare_class_error(y, stratified_split(y, 0.15, s)[1]) for s in seeds])
    rand = np.mean([rare_class_error(y, np.random.default_rng(s).permutation(len(y))[:n_val])
                    for s in seeds])
    assert stratified < 0.5 * rand, (stratified, rand)


def test_rows_without_labels():
    y = np.zeros((20, 8), dtype=int)
    y[:4, 2] = 1
    train, val = stratified_split(y, 0.25)
    check_partition(y, train, val, 0.25)
    assert y[val, 2].sum() == 1  # a quarter of the 4 positives


@pytest.mark.parametrize("labels, fraction", [(np.array([0, 1, 1]), 0.15), (np.full((4, 8), 2), 0.15),
                                              (np.zeros((4, 8)), 0.0), (np.zeros((4, 8)), 1.0)])
def test_bad_arguments(labels, fraction):
    with pytest.raises(ValueError):
        stratified_split(labels, fraction)


@settings(max_examples=60, deadline=None)
@given(y=st.tuples(st.integers(2, 60), st.integers(1, 8)).flatmap(
           lambda shape: arrays(np.int8, shape, elements=st.integers(0, 1))),
       val_fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_any_matrix_is_partitioned(y, val_fraction, seed):
    check_partition(y, *stratified_split(y, val_fraction, seed), val_fraction)


# ----------------------------------------------------------------------------- split file

def test_save_load_round_trip(tmp_path):
    path = tmp_path / "runs" / "split.csv"
    save_split(path, [30, 4, 17], np.array([9, 2]))
    assert path.read_text().splitlines()[:3] == ["id,split", "2,val", "4,train"]
    train, val, test = load_split(path)
    assert train.tolist() == [4, 17, 30] and val.tolist() == [2, 9] and test.tolist() == []
    save_split(path, [30, 4], [9], [2, 17])
    assert [a.tolist() for a in load_split(path)] == [[4, 30], [9], [2, 17]]


@pytest.mark.parametrize("parts", [([1, 2], [2, 3], []), ([1], [2], [1]), ([1], [], [3, 3])])
def test_save_rejects_a_patient_in_two_parts(tmp_path, parts):
    with pytest.raises(ValueError, match="more than one part"):
        save_split(tmp_path / "s.csv", *parts)


@pytest.mark.parametrize("text, message", [("pid,fold\n1,train\n", "row 1"),
                                           ("id,split\n1,train\n2,tset\n", "row 3"),
                                           ("id,split\nx,val\n", "row 2"),
                                           ("id,split\n1,train\n1,val\n", "rows 2 and 3")])
def test_load_names_the_bad_row(tmp_path, text, message):
    path = tmp_path / "split.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_split(path)


# ----------------------------------------------------------------------------- three-way split


@pytest.mark.parametrize("n, val_fraction, test_fraction", [(2239, 0.15, 0.15), (100, 0.15, 0.15), (7, 0.2, 0.2),
                                                           (1001, 0.1, 0.3)])
def test_three_way_split_never_leaks_a_patient(n, val_fraction, test_fraction):
    y = synthetic_labels(n)
    train, val, test = three_way_split(y, val_fraction, test_fraction, seed=3)
    assert len(val) == round(n * val_fraction) and len(test) == round(n * test_fraction)
    assert np.intersect1d(train, val).size == np.intersect1d(train, test).size == np.intersect1d(val, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))


def test_three_way_split_is_stratified_and_seeded():
    y = synthetic_labels()
    a = three_way_split(y, 0.15, 0.15, seed=0)
    assert all(np.array_equal(u, v) for u, v in zip(a, three_way_split(y, 0.15, 0.15, seed=0)))
    assert not np.array_equal(a[2], three_way_split(y, 0.15, 0.15, seed=1)[2])
    assert max(max_deviation(y, a[1]), max_deviation(y, a[2])) <= TOLERANCE


def test_no_test_fraction_is_the_two_way_split():
    y = synthetic_labels(500)
    train, val, test = three_way_split(y, 0.15, 0.0, seed=4)
    two = stratified_split(y, 0.15, 4)
    assert np.array_equal(train, two[0]) and np.array_equal(val, two[1]) and test.size == 0
