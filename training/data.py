"""A training process's data: the folder (or the synthetic demo set), the prepared images, the split, and the
per-eye targets; rank 0 prepares, the other ranks wait and then read the same files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from odir_dual.common.errors import one_line
from odir_dual.pipeline.host import cache_root
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import Layout, label_matrix
from odir_dual.pipeline.pairs import DataError, TrainingData, load_prepared
from odir_dual.pipeline.sampling import steps_per_epoch
from odir_dual.pipeline.split import (SplitError, cross_validation_split, load_split, load_split_records,
                                      three_way_split)
from odir_dual.pipeline.split import save_split as pipeline_save_split
from odir_dual.pipeline.synthetic import ensure_synthetic_odir
from odir_dual.training.config import Config, ConfigError
from odir_dual.training.distributed import barrier


def data_folder(cfg: Config, is_main: bool) -> Path:
    """The ODIR folder to train on; the synthetic demo set (generated once, cached) when --data is not given."""
    if cfg.data:
        return Path(cfg.data)
    root = cache_root() / "synthetic"
    if is_main:
        print(f"no --data given: using the synthetic ODIR demo set ({cfg.synthetic_patients} patients) in {root}")
        ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)
    barrier()
    return ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)  # rank 0: a cache hit by now


def load_data(cfg: Config, layout: Layout, is_main: bool) -> TrainingData:
    """The patients and the left-out eyes of the run's data folder, found once (`layout`): rank 0 prepares the
    images, the others then find them up to date."""
    kwargs = dict(cache_dir=cfg.cache_dir or None, strict=cfg.strict, allow_shared=cfg.allow_shared_images)
    if is_main:
        result = load_prepared(layout, cfg.prepare_px or cfg.img_px, progress=True, **kwargs)
    barrier()
    if not is_main:
        result = load_prepared(layout, cfg.prepare_px or cfg.img_px, progress=False, **kwargs)
    return result


@dataclass
class Split:
    """The (train, validation, test) patient tables of a run, and what split.csv records of each patient."""

    tables: tuple
    records: dict  # id → {left_sha256, right_sha256, labels}: what binds the run to its data


def split_table(patients, cfg: Config, resume_dir: Path | None) -> Split:
    """A seeded multi-label stratified split (test empty with --test-fraction 0); when resuming, the run's
    split.csv, with every patient's photographs (content hashes) and labels compared with the run's.

    Raises:
        DataError: a resumed run whose data differ from what it was trained on, or a damaged split.csv."""
    records = split_records(patients)
    if resume_dir is not None:
        return _resumed_split(patients, resume_dir, records)
    parts = three_way_split(label_matrix(patients), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    ids = [patients["id"].to_numpy()[p] for p in parts]
    return Split(_tables(patients, ids), records)


def split_records(patients) -> dict:
    """id → {left_sha256, right_sha256, labels}: what split.csv records of each patient."""
    return {int(r.id): {"left_sha256": r.left_sha256, "right_sha256": r.right_sha256, "labels": "".join(map(str, y))}
            for r, y in zip(patients.itertuples(), label_matrix(patients))}


def _resumed_split(patients, folder: Path, records: dict) -> Split:
    """The split saved in `folder`/split.csv, its data compared with `records` (`check_same_data`)."""
    path = folder / "split.csv"
    try:
        ids = load_split(path)
        recorded = load_split_records(path)
    except (OSError, SplitError) as e:
        raise DataError(f"--resume {folder}: {one_line(e)}") from None
    check_same_data(folder, ids, recorded, records)
    return Split(_tables(patients, ids), records)


def fold_tables(patients, cfg: Config, resume_dir: Path | None) -> list[Split]:
    """--folds K: one Split (train, held-out fold, test) per fold (`split.cross_validation_split`: the test part
    is the one a plain run with this seed has), saved by train.py as RUN/fold-N/split.csv once the folder is
    claimed; reloaded from there, and compared with the data, when resuming."""
    records = split_records(patients)
    if resume_dir is not None:
        return [_resumed_split(patients, fold_folder(resume_dir, n), records) for n in range(1, cfg.folds + 1)]
    try:
        folds, test = cross_validation_split(label_matrix(patients), cfg.folds, cfg.test_fraction, cfg.seed)
    except ValueError as e:  # more folds than patients
        raise ConfigError(f"--folds {cfg.folds}: {e}") from None
    ids = patients["id"].to_numpy()
    out = []
    for n, held in enumerate(folds, 1):
        train = np.sort(np.concatenate([f for m, f in enumerate(folds, 1) if m != n]))
        out.append(Split(_tables(patients, (ids[train], ids[held], ids[test])), records))
    return out


def fold_folder(run_dir: Path, n: int) -> Path:
    """Fold n's own run folder (1-based) inside a --folds run."""
    return Path(run_dir) / f"fold-{n}"


def _tables(patients, ids):
    """The patients' rows of each part of a split, in the order of `ids`."""
    by_id = patients.set_index("id", drop=False)
    return tuple(by_id.loc[part].reset_index(drop=True) for part in ids)


def check_same_data(run: Path, ids, recorded: dict | None, now: dict) -> None:
    """DataError (one line) unless every patient of the run's split is still usable with the same photographs
    (content hashes) and labels; a moved folder or another path to it is the same data."""
    wanted = np.concatenate(ids).tolist()
    missing = sorted(set(wanted) - set(now))
    if missing:
        raise DataError(f"--resume {run}: split.csv names {len(missing)} patient(s) that this data does not have "
                        f"(or leaves out), e.g. {missing[:5]}: give --data the folder the run was trained on")
    if recorded is None:  # a run from before split.csv recorded its data: nothing to compare with
        return
    what = {"left_sha256": "left photograph", "right_sha256": "right photograph", "labels": "labels"}
    changed = [(pid, key) for pid in wanted for key in what if recorded[pid][key] != now[pid][key]]
    if changed:
        pid, key = changed[0]
        raise DataError(f"--resume {run}: the data differ from what the run was trained on ({run / 'split.csv'}): "
                        f"patient {pid}'s {what[key]} changed ({recorded[pid][key][:12]} → {now[pid][key][:12]})"
                        + (f", and {len(changed) - 1} more" if len(changed) > 1 else "")
                        + "; a resumed run must see the same photographs and labels: give --data the run's data, "
                        "or start a new run")


def save_split(path: Path, split: Split) -> None:
    """split.csv: each patient's part, photographs' content hashes and labels (pipeline.split.save_split)."""
    ids = [part["id"].to_numpy() for part in split.tables]
    pipeline_save_split(path, *ids, records=split.records)


def check_one_batch(train_tab, usable: int, cfg: Config, world: int) -> None:
    """DataError (before any training) when the training split cannot fill one optimizer update."""
    try:
        steps_per_epoch(len(train_tab), cfg.batch_size, world, cfg.accum_steps)
    except ValueError:
        raise DataError(f"{len(train_tab)} training patients (of {usable} usable) cannot fill one update of "
                        f"--batch-size {cfg.batch_size} × --accum-steps {cfg.accum_steps} × {world} rank(s): use a "
                        f"smaller --batch-size or more data") from None


def per_eye_targets(train_tab, device, verbose: bool) -> torch.Tensor:
    """(N, 2, K) per-eye labels of the training patients from their diagnostic keywords, NaN where unusable."""
    labels, usable = eye_label_matrix(train_tab)
    labels[~usable] = np.nan
    if verbose:
        print(f"per-eye loss: {int(usable.sum())} of {len(usable)} training patients have keywords that match "
              "their labels" + ("" if usable.any() else " (no per-eye loss will be trained)"))
    return torch.from_numpy(labels).to(device)
