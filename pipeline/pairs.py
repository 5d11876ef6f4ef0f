"""From a folder on disk to prepared (left, right) pairs: the one path that train.py, score.py, export.py's
real-image check and the benchmarks use.

    find_pairs(folder)          an ODIR folder with its sheet, or a folder of {ID}_left/{ID}_right images
                                → one row per patient: id, left, right (source paths), status, [labels]
    prepare_pairs(table, ...)   both eyes of every scorable patient prepared once (pipeline.prepare, cached)
                                → + left_prepared, right_prepared; a bad image sets the patient's status
    load_prepared(folder, ...)  the training view: labelled patients with both eyes prepared, and every
                                left-out eye with its reason
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from pipeline.host import cache_root
from pipeline.odir import SheetError, find_layout, read_patients
from pipeline.prepare import prepare_table

IMAGE_EXTS = ("jpg", "jpeg", "png")
PAIR_NAME = re.compile(r"^(?P<id>.+)_(?P<eye>left|right)\.(?P<ext>[^.]+)$", re.IGNORECASE)
EYES = ("left", "right")


class DataError(RuntimeError):
    """Bad input that the user asked to be fatal (--strict)."""


def default_cache() -> Path:
    """The prepared-image cache: $ODIR_CACHE/prepared, else ~/.cache/odir-dual/prepared."""
    return cache_root() / "prepared"


# ----------------------------------------------------------------------------------------------- finding pairs


def _id_key(pid):
    """Sort key: numeric IDs numerically, then the others by name."""
    s = str(pid)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def find_pairs(folder) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The patients of a folder, one row each, sorted by ID.

    Args:
        folder: an ODIR folder with a sheet (labels known), or a folder of `{ID}_left|right.{jpg,jpeg,png}` files
            (case-insensitive; only the folder itself is read: its subfolders are listed in `ignored`).

    Returns:
        (table, ignored). table: columns id, left, right (source paths, None when absent), status ("ok" or why the
        patient cannot be scored, e.g. "right eye: missing file"), plus the sheet's columns (N..O as int 0/1, age,
        sex, keywords) when labelled; `table.attrs["labelled"]` tells which. ignored: (file name, reason) for
        files that name no patient eye, and for subfolders.

    Raises:
        FileNotFoundError: the folder does not exist.
        pipeline.odir.SheetError: the folder has an ODIR sheet with a bad row (the message names it).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    try:
        find_layout(folder)
    except FileNotFoundError:  # no sheet: pair the images by file name
        return _pairs_from_names(folder)
    except SheetError:
        raise
    except ValueError as e:  # e.g. several ODIR sheets in one folder: a user-facing message, same path as a bad sheet
        raise SheetError(str(e)) from None
    return _pairs_from_sheet(folder), []


def _pairs_from_sheet(folder: Path) -> pd.DataFrame:
    patients, missing = read_patients(folder)
    table = patients.copy()
    table["status"] = "ok"
    if len(missing):
        reasons = {}
        for r in missing.itertuples():
            reasons.setdefault(r.id, []).append(f"{r.eye} eye: {r.reason} ({Path(r.path).name})")
        absent = pd.DataFrame({"id": list(reasons), "status": ["; ".join(v) for v in reasons.values()]})
        absent["left"] = None
        absent["right"] = None  # only patients with both files get paths; the reason names the missing one
        table = pd.concat([table, absent], ignore_index=True)
    table = table.sort_values("id", key=lambda s: s.map(_id_key), kind="stable", ignore_index=True)
    table.attrs["labelled"] = True
    table.attrs["missing"] = missing  # per-eye rows (id, eye, path, reason) for the training view's left_out
    return table


def _pairs_from_names(folder: Path):
    files: dict[str, dict[str, list[str]]] = {}
    ignored = []
    with os.scandir(folder) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith("."):
                continue  # hidden files (.DS_Store)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError as err:  # a symbolic link loop, a permission: this entry only, never the whole folder
                if PAIR_NAME.match(e.name) is None:
                    ignored.append((e.name, f"cannot be read: {err.strerror or err}"))
                    continue
                is_dir = is_file = False  # an eye: preparation gives its reason ("unreadable file: ...")
            if is_dir:
                ignored.append((e.name + "/", "a subfolder: not searched, score it on its own"))
                continue
            m = PAIR_NAME.match(e.name)
            if m is None:
                ignored.append((e.name, "not named {ID}_left/{ID}_right." + "/".join(IMAGE_EXTS) if is_file else
                                "not a regular file"))
                continue
            # an eye that is no regular file (a FIFO, a device, a dangling link) is kept here: preparation then
            # reports it as "not a regular file" / "missing file", not this patient as missing an eye
            files.setdefault(m["id"], {"left": [], "right": []})[m["eye"].lower()].append(e.path)
    rows = []
    for pid, eyes in files.items():
        row, problems = {"id": pid}, []
        for eye in EYES:
            images = [p for p in eyes[eye] if Path(p).suffix[1:].lower() in IMAGE_EXTS]
            others = [p for p in eyes[eye] if p not in images]
            row[eye] = images[0] if len(images) == 1 else None
            if len(images) > 1:
                problems.append(f"{eye} eye: {len(images)} files ({', '.join(Path(p).name for p in images)})")
            elif not images and others:
                problems.append(f"{eye} eye: not an image file ({Path(others[0]).name})")
            elif not images:
                problems.append(f"{eye} eye: missing file")
            if images:
                ignored += [(Path(p).name, "not a " + "/".join(IMAGE_EXTS) + " file") for p in others]
        row["status"] = "; ".join(problems) or "ok"
        rows.append(row)
    table = pd.DataFrame(rows, columns=["id", "left", "right", "status"])
    table = table.sort_values("id", key=lambda s: s.map(_id_key), kind="stable", ignore_index=True)
    table.attrs["labelled"] = False
    return table, ignored


# ----------------------------------------------------------------------------------------------- preparing


def prepare_pairs(table: pd.DataFrame, cache_dir, short_px: int, *, workers=None, progress=True,
                  stats: dict | None = None) -> pd.DataFrame:
    """Prepare both eyes of every patient whose status is "ok" (fundus crop + resize, cached).

    Returns a copy of table with columns left_prepared, right_prepared (None if not prepared) and the status of
    patients with a bad image set to the reason (e.g. "left eye: truncated JPEG (12_left.jpg)");
    `attrs["bad_eyes"]` holds those eyes as rows (id, eye, path, reason).
    """
    out = table.copy()
    out["left_prepared"] = None
    out["right_prepared"] = None
    todo = out.loc[out["status"] == "ok", ["id", *EYES]]
    prepared, bad = prepare_table(todo, cache_dir, short_px, workers=workers, progress=progress, stats=stats)
    row_of = pd.Series(out.index, index=out["id"])
    rows = row_of.loc[prepared["id"]].to_numpy()
    out.loc[rows, "left_prepared"] = prepared["left"].to_numpy()
    out.loc[rows, "right_prepared"] = prepared["right"].to_numpy()
    for pid, group in bad.groupby("id", sort=False):
        out.at[row_of[pid], "status"] = "; ".join(f"{r.eye} eye: {r.reason} ({Path(r.path).name})"
                                                  for r in group.itertuples())
    out.attrs["bad_eyes"] = bad
    return out


def load_prepared(data_dir, short_px: int, *, cache_dir=None, strict=False, workers=None, progress=True):
    """Read the sheet, check and prepare every image; return (patients, left_out).

    patients: only patients with both eyes usable, left/right pointing at the prepared copies (original paths
    kept in `left_src`/`right_src`). left_out: one row per bad eye (id, eye, path, reason): missing, unreadable
    or corrupt. With strict=True any left-out patient is an error instead.
    """
    find_layout(data_dir)  # training needs labels: no sheet is a FileNotFoundError naming what was looked for
    table, _ = find_pairs(data_dir)
    table = prepare_pairs(table, Path(cache_dir) if cache_dir else default_cache(), short_px, workers=workers,
                          progress=progress)
    left_out = pd.concat([table.attrs["missing"], table.attrs["bad_eyes"]], ignore_index=True)
    left_out = left_out.sort_values(["id", "eye"], ignore_index=True)
    if strict and len(left_out):
        raise DataError(f"--strict: {left_out['id'].nunique()} patient(s) have bad eye images, first: "
                        + "; ".join(f"{r.path}: {r.reason}" for r in left_out.head(5).itertuples()))
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    patients = ok.drop(columns=["status", "left_prepared", "right_prepared"]).rename(
        columns={"left": "left_src", "right": "right_src"})
    patients.insert(1, "left", ok["left_prepared"])
    patients.insert(2, "right", ok["right_prepared"])
    return patients, left_out


def left_out_summary(left_out: pd.DataFrame) -> str:
    """One line: how many patients were left out, by reason."""
    if left_out.empty:
        return "no patient left out"
    by_reason = left_out.groupby("reason")["id"].nunique().sort_values(ascending=False)
    reasons = ", ".join(f"{n} {reason}" for reason, n in by_reason.items())
    return f"left out {left_out['id'].nunique()} patient(s): {reasons}"

