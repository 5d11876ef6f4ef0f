"""A training process's data: the folder (or the synthetic demo set), the prepared images, the split, and the
per-eye targets; rank 0 prepares, the other ranks wait and then read the same files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from odir_dual.pipeline.host import cache_root
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import Layout, label_matrix
from odir_dual.pipeline.pairs import DataError, TrainingData, load_prepared
from odir_dual.pipeline.sampling import steps_per_epoch
from odir_dual.pipeline.split import load_split, save_split, cross_validation_split, three_way_split
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
    kwargs = dict(cache_dir=cfg.cache_dir or None, strict=cfg.strict)
    if is_main:
        result = load_prepared(layout, cfg.prepare_px or cfg.img_px, progress=True, **kwargs)
    barrier()
    if not is_main:
        result = load_prepared(layout, cfg.prepare_px or cfg.img_px, progress=False, **kwargs)
    return result


def split_table(patients, cfg: Config, run_dir: Path | None, resume_dir: Path | None):
    """(train, validation, test) tables: a seeded multi-label stratified split (test empty with --test-fraction 0),
    saved as split.csv; reloaded from the run folder when resuming."""
    if resume_dir is not None:
        ids = load_split(resume_dir / "split.csv")
    else:
        parts = three_way_split(label_matrix(patients), cfg.val_fraction, cfg.test_fraction, cfg.seed)
        ids = [patients["id"].to_numpy()[p] for p in parts]
        if run_dir is not None:
            save_split(run_dir / "split.csv", *ids)
    return _tables(patients, ids)


def fold_tables(patients, cfg: Config, run_dir: Path | None, resume_dir: Path | None) -> list[tuple]:
    """--folds K: one (train, held-out fold, test) triple per fold (`split.cross_validation_split`: the test part
    is the one a plain run with this seed has), each saved as RUN/fold-N/split.csv; reloaded from there when
    resuming."""
    if resume_dir is not None:
        return [_tables(patients, load_split(fold_folder(resume_dir, n) / "split.csv"))
                for n in range(1, cfg.folds + 1)]
    try:
        folds, test = cross_validation_split(label_matrix(patients), cfg.folds, cfg.test_fraction, cfg.seed)
    except ValueError as e:  # more folds than patients
        raise ConfigError(f"--folds {cfg.folds}: {e}") from None
    ids = patients["id"].to_numpy()
    out = []
    for n, held in enumerate(folds, 1):
        train = np.sort(np.concatenate([f for m, f in enumerate(folds, 1) if m != n]))
        parts = (ids[train], ids[held], ids[test])
        if run_dir is not None:
            save_split(fold_folder(run_dir, n) / "split.csv", *parts)
        out.append(_tables(patients, parts))
    return out


def fold_folder(run_dir: Path, n: int) -> Path:
    """Fold n's own run folder (1-based) inside a --folds run."""
    return Path(run_dir) / f"fold-{n}"


def _tables(patients, ids):
    """The patients' rows of each part of a split, in the order of `ids`."""
    by_id = patients.set_index("id", drop=False)
    missing = set(np.concatenate(ids).tolist()) - set(by_id.index)
    if missing:
        raise DataError(f"split.csv names {len(missing)} patient(s) that are no longer usable, e.g. "
                         f"{sorted(missing)[:5]}: was the data changed since the run started?")
    return tuple(by_id.loc[part].reset_index(drop=True) for part in ids)


def check_one_batch(train_tab, usable: int, cfg: Config, world: int) -> None:
    """Stop with a message (before any training) when the training split cannot fill one optimizer update."""
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
