"""From a folder on disk to a checked, prepared patient table: the one entry point train.py and score.py use."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.odir import read_patients
from pipeline.prepare import prepare_table


class DataError(RuntimeError):
    """Bad input that the user asked to be fatal (--strict)."""


def cache_root() -> Path:
    """Where prepared images and the synthetic demo set live: $ODIR_CACHE, else ~/.cache/odir-dual."""
    return Path(os.environ.get("ODIR_CACHE", Path.home() / ".cache" / "odir-dual")).expanduser()


def load_prepared(data_dir, short_px: int, *, cache_dir=None, strict=False, workers=None, progress=True):
    """Read the sheet, check and prepare every image; return (patients, left_out).

    patients: only patients with both eyes usable, left/right pointing at the prepared copies (original paths
    kept in `left_src`/`right_src`). left_out: one row per bad eye (id, eye, path, reason): missing, unreadable
    or corrupt. With strict=True any left-out patient is an error instead.
    """
    patients, missing = read_patients(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "prepared"
    prepared, bad = prepare_table(patients, cache_dir, short_px, workers=workers, progress=progress)
    src = patients.set_index("id")[["left", "right"]].rename(columns=lambda c: f"{c}_src")
    prepared = prepared.join(src, on="id")
    left_out = pd.concat([missing, bad], ignore_index=True).sort_values(["id", "eye"], ignore_index=True)
    if strict and len(left_out):
        raise DataError(f"--strict: {left_out['id'].nunique()} patient(s) have bad eye images, first: "
                        + "; ".join(f"{r.path}: {r.reason}" for r in left_out.head(5).itertuples()))
    return prepared, left_out


def left_out_summary(left_out: pd.DataFrame) -> str:
    """One line: how many patients were left out, by reason."""
    if left_out.empty:
        return "no patient left out"
    by_reason = left_out.groupby("reason")["id"].nunique().sort_values(ascending=False)
    reasons = ", ".join(f"{n} {reason}" for reason, n in by_reason.items())
    return f"left out {left_out['id'].nunique()} patient(s): {reasons}"
