"""Train/validation/test split of patients that keeps every label's prevalence in every part.

Multi-label iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the stratification of
multi-label data", ECML PKDD 2011, Algorithm 1) for two folds, in numpy, with an exact validation
size; then a few train/val swaps repair what that exact size costs the most common label. A three-way split
applies the same two-way split twice: test out of all patients, then validation out of the rest; K-fold
cross-validation (`cross_validation_split`) keeps that test part and cuts the rest into K folds.
How close it stays to each class's prevalence, against a random split: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from odir_dual.common.errors import OdirError
from odir_dual.pipeline.host import atomic_write


class SplitError(OdirError, ValueError):
    """A split file (RUN/split.csv) that cannot be read: the message names the file and the row."""

SPLIT_NAMES = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float = 0.15,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split rows of a multi-label 0/1 matrix into train and validation indices.

    Args:
        labels: (N, C) 0/1 matrix, one row per patient.
        val_fraction: share of patients in validation; the validation size is exactly
            ``round(N * val_fraction)`` (Python rounding).
        seed: ties are broken and rows ordered by a generator seeded with it: same seed, same split.

    Iterative stratification (Sechidis et al. 2011) assigns the rows; pairwise swaps then bring
    each label's validation count as close as possible to its share (see ``_rebalance``).

    Returns:
        (train_idx, val_idx): sorted int64 row indices, disjoint, together 0..N-1.
    """
    y = _check_labels(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(y)
    n_val = min(max(round(n * val_fraction), 0), n)
    rng = np.random.default_rng(seed)
    fold = _iterative_stratification(y, np.array([n - n_val, n_val]), rng)
    fold = _rebalance(y, fold, rng)
    return np.flatnonzero(fold == 0), np.flatnonzero(fold == 1)


def three_way_split(labels: np.ndarray, val_fraction: float = 0.15, test_fraction: float = 0.15,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_idx, val_idx, test_idx): sorted, disjoint, together 0..N-1, each part stratified.

    test_fraction 0 gives exactly ``stratified_split(labels, val_fraction, seed)`` and an empty test part, so a
    two-way run keeps the split it always had. Validation is ``round(N * val_fraction)`` patients of all N, taken
    from what the test part leaves.
    """
    y = _check_labels(labels)
    if not 0.0 <= test_fraction < 1.0 or not 0.0 < val_fraction + test_fraction < 1.0:
        raise ValueError(f"need 0 <= test_fraction and val_fraction + test_fraction < 1, got val_fraction "
                         f"{val_fraction}, test_fraction {test_fraction}")
    if test_fraction == 0.0:
        train, val = stratified_split(y, val_fraction, seed)
        return train, val, np.zeros(0, np.int64)
    rest, test = stratified_split(y, test_fraction, seed)
    n_val = round(len(y) * val_fraction)
    train, val = stratified_split(y[rest], n_val / len(rest), seed + 1) if n_val else (np.arange(len(rest)), [])
    return rest[train], np.sort(rest[np.asarray(val, np.int64)]), test


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """K folds of the rows of a multi-label 0/1 matrix, for cross-validation: sorted, disjoint, together 0..N-1,
    sizes N // k or one more, each label's prevalence as close to the overall one as whole patients allow.

    Iterative stratification into K folds at once, then `_rebalance` between every pair of folds, pass after pass,
    until no swap helps: each swap lowers the pair's squared distance to their pooled per-label counts, so the loop
    ends. Measured on the 2,215 real ODIR patients (`cross_validation_split`, 5 folds of the 1,883 outside the test
    split, seeds 0-3 and 42): the largest deviation of a class's per-fold prevalence from the overall one is
    0.0023-0.0028 (iterative-stratification's MultilabelStratifiedKFold: 0.0059-0.0105; these folds before the
    swaps: 0.0085-0.0211); benchmarks/RESULTS.md.
    """
    y = _check_labels(labels)
    if not 2 <= k <= len(y):
        raise ValueError(f"{k} folds of {len(y)} patients: need 2 <= folds <= patients")
    rng = np.random.default_rng(seed)
    sizes = np.full(k, len(y) // k)
    sizes[: len(y) % k] += 1
    fold = _iterative_stratification(y, sizes, rng)
    for _ in range(FOLD_PASSES):
        before = fold.copy()
        for f in range(k):
            for g in range(f + 1, k):
                rows = np.flatnonzero((fold == f) | (fold == g))
                moved = _rebalance(y[rows], (fold[rows] == g).astype(np.int64), rng)
                fold[rows] = np.where(moved == 1, g, f)
        if (fold == before).all():
            break
    return [np.flatnonzero(fold == f) for f in range(k)]


FOLD_PASSES = 50  # rebalancing passes over all fold pairs; the real data settles in 2-3


def cross_validation_split(labels: np.ndarray, k: int, test_fraction: float = 0.15,
                   seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(folds, test_idx) for K-fold cross-validation: the test part is exactly `three_way_split`'s for the same
    seed and test_fraction (0: none), and `stratified_folds` divides the other patients into k folds."""
    y = _check_labels(labels)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"need 0 <= test_fraction < 1, got {test_fraction}")
    rest, test = stratified_split(y, test_fraction, seed) if test_fraction else (np.arange(len(y)), np.zeros(0, int))
    return [rest[f] for f in stratified_folds(y[rest], k, seed + 1)], test.astype(np.int64)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (patients, classes) matrix, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must hold only 0 and 1")
    return y.astype(np.int64)


def _iterative_stratification(y: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fold number (0..F-1) of each row; fold f receives exactly sizes[f] rows.

    Sechidis et al.: take the label with the fewest unassigned positives (the rarest is the
    hardest to spread evenly), hand each of its rows to the fold that still wants most of that
    label, then repeat; rows without any label go last, by fold size. The exact sizes are kept
    by closing a fold once it is full.
    """
    fold = np.full(len(y), -1)
    capacity = sizes.astype(np.int64).copy()  # rows each fold still takes
    share = sizes / max(sizes.sum(), 1)
    wanted = share[:, None] * y.sum(0)[None, :]  # (F, C) positives each fold still wants
    while (fold < 0).any():
        unassigned = fold < 0
        remaining = y[unassigned].sum(0)  # (C,) unassigned positives per label
        if remaining.any():
            label = _rarest(remaining, rng)
            rows = np.flatnonzero(unassigned & (y[:, label] == 1))
        else:
            label, rows = None, np.flatnonzero(unassigned)  # only label-free rows are left
        for row in rng.permutation(rows):
            f = _pick_fold(wanted[:, label] if label is not None else capacity, capacity, rng)
            fold[row] = f
            capacity[f] -= 1
            wanted[f] -= y[row]
    return fold


def _rebalance(y: np.ndarray, fold: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap train/val row pairs while a swap brings validation's per-label counts closer to
    n_val / N of each label's positives (least squares over labels); sizes stay exact.

    Why: fixed fold sizes make the last label processed (the most common, N in ODIR) absorb all
    the slack of the earlier ones. Each swap strictly lowers the squared error, so the loop ends.
    """
    fold = fold.copy()
    patterns, code = np.unique(y, axis=0, return_inverse=True)  # distinct label rows
    code = code.ravel()
    err = y[fold == 1].sum(0) - y.sum(0) * (fold == 1).mean()  # (C,) validation surplus
    while True:
        in_t, in_v = np.unique(code[fold == 0]), np.unique(code[fold == 1])
        if not (len(in_t) and len(in_v)):
            return fold
        moved = patterns[in_t][:, None, :] - patterns[in_v][None, :, :]  # (Pt, Pv, C)
        cost = ((err + moved) ** 2).sum(-1)
        if cost.min() >= (err ** 2).sum() - 1e-9:
            return fold
        best = np.argwhere(cost == cost.min())
        a, b = best[rng.integers(len(best))]
        i = rng.choice(np.flatnonzero((fold == 0) & (code == in_t[a])))  # train -> val
        j = rng.choice(np.flatnonzero((fold == 1) & (code == in_v[b])))  # val -> train
        fold[i], fold[j] = 1, 0
        err += moved[a, b]


def _rarest(remaining: np.ndarray, rng: np.random.Generator) -> int:
    """Label with the fewest (non-zero) unassigned positives; ties broken at random."""
    counts = np.where(remaining > 0, remaining, np.iinfo(np.int64).max)
    return int(rng.choice(np.flatnonzero(counts == counts.min())))


def _pick_fold(demand: np.ndarray, capacity: np.ndarray, rng: np.random.Generator) -> int:
    """Open fold (capacity > 0) with the highest demand, then the most room, then at random."""
    open_ = capacity > 0
    best = open_ & (demand == demand[open_].max())
    best &= capacity == capacity[best].max()
    return int(rng.choice(np.flatnonzero(best)))


RECORD_COLUMNS = ("left_sha256", "right_sha256", "labels")  # what binds a run to its data (after id, split)


def save_split(path, ids_train, ids_val, ids_test=(), records: dict | None = None) -> None:
    """Write a split as a CSV with columns id,split (split is 'train', 'val' or 'test'), sorted by id; with
    `records` (id → {left_sha256, right_sha256, labels}) also each patient's photographs' content hashes and labels
    (as a 0/1 string in CLASSES order), which `--resume` compares with the data it is given."""
    parts = [np.asarray(ids, dtype=np.int64) for ids in (ids_train, ids_val, ids_test)]
    ids = np.concatenate(parts)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids in more than one part of the split, e.g. {unique[counts > 1][:5].tolist()}")
    names = np.repeat(np.array(SPLIT_NAMES), [len(p) for p in parts])
    order = np.argsort(ids, kind="stable")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", *(RECORD_COLUMNS if records is not None else ())])
        for pid, name in zip(ids[order].tolist(), names[order].tolist()):
            w.writerow([pid, name, *([records[pid][c] for c in RECORD_COLUMNS] if records is not None else [])])


def load_split(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a split written by :func:`save_split`: (ids_train, ids_val, ids_test), sorted int64 arrays (the test
    part is empty for a two-way split)."""
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for pid, row in _split_rows(path):
        parts[row[1].strip()].append(pid)
    return tuple(np.sort(np.array(parts[name], dtype=np.int64)) for name in SPLIT_NAMES)


def load_split_records(path) -> dict[int, dict] | None:
    """id → {left_sha256, right_sha256, labels} as `save_split` recorded them; None for a split without them (a run
    from before they were recorded)."""
    records = {}
    for pid, row in _split_rows(path):
        if len(row) != 2 + len(RECORD_COLUMNS):
            return None
        records[pid] = dict(zip(RECORD_COLUMNS, (v.strip() for v in row[2:])))
    return records


def _split_rows(path):
    """(id, row) of every row of a split CSV, checked: the header, each row's shape, no id twice.

    Raises:
        SplitError: naming the file and the row."""
    seen: dict[int, int] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header not in (["id", "split"], ["id", "split", *RECORD_COLUMNS]):
                raise SplitError(f"{path}: row 1: expected header 'id,split' (or 'id,split,"
                                 f"{','.join(RECORD_COLUMNS)}'), got {header}")
            width = len(header)
            for row_no, row in enumerate(reader, start=2):
                pid = _split_row(path, row_no, row, width)
                if pid in seen:
                    raise SplitError(f"{path}: rows {seen[pid]} and {row_no}: id {pid} appears twice")
                seen[pid] = row_no
                yield pid, row
    except UnicodeDecodeError as e:
        raise SplitError(f"{path}: not UTF-8 text ({e.reason}); not a split.csv written by train.py") from None


def _split_row(path, row_no: int, row: list[str], width: int = 2) -> int:
    """The id of one split CSV row; SplitError naming the row when it is malformed."""
    if len(row) != width or row[1].strip() not in SPLIT_NAMES:
        raise SplitError(f"{path}: row {row_no}: expected '<id>,train', '<id>,val' or '<id>,test'"
                         + (f" and {', '.join(RECORD_COLUMNS)}" if width > 2 else "") + f", got {row}")
    try:
        return int(row[0])
    except ValueError:
        raise SplitError(f"{path}: row {row_no}: id must be an integer, got {row[0]!r}") from None
