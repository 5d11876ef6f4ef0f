"""From a folder on disk to prepared (left, right) pairs: the one path that train.py, score.py, export.py's
real-image check and the benchmarks use.

    find_pairs(folder)          an ODIR folder with its sheet, or a folder of images named by patient and eye
                                ({ID}_left/_right, _L/_R, _OD/_OS; or a --pattern)
                                → FolderPairs: one row per patient (id, left, right (source paths), status,
                                [labels]), the ignored files, the layout when labelled, the missing eyes
    prepare_pairs(table, ...)   both eyes of every scorable patient prepared once (pipeline.prepare, cached)
                                → + left_prepared, right_prepared; a bad image sets the patient's status
    load_prepared(folder, ...)  the training view (TrainingData): labelled patients with both eyes prepared,
                                and every left-out eye with its reason
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from odir_dual.common.errors import OdirError, printable
from odir_dual.pipeline.constants import EYES
from odir_dual.pipeline.host import cache_root
from odir_dual.pipeline.odir import DataFolderError, Layout, SheetError, as_layout, find_layout, read_patients
from odir_dual.pipeline.prepare import prepare_table, source_hash

IMAGE_EXTS = ("jpg", "jpeg", "png")
# The eye tokens of the common naming conventions, any case: left/right, L/R, and the ophthalmic OD (oculus dexter,
# the right eye) / OS (oculus sinister, the left eye).
EYE_TOKENS = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}
# {ID}{separator}{eye}.{extension}, separator one of _ - . or a space: 12_left.jpg, 106-L.jpg, P1_OD.png, 7 os.JPG
PAIR_NAME = re.compile(r"^(?P<id>.+?)[_\-. ](?P<eye>left|right|l|r|od|os)\.(?P<ext>[^.]+)$", re.IGNORECASE)
NAMING_HELP = "{ID}_left/_right, _L/_R or _OD/_OS (any case; separator _ - . or space)"


class PatternError(OdirError, ValueError):
    """A --pattern that cannot pair file names (the message quotes it and says what is wrong)."""


class NamePattern:
    """`score.py --pattern`: how the images of a folder are named, when the common conventions do not fit.

    The pattern is a file name with placeholders, matched against the whole name, case-insensitively:
    `{id}` (the patient ID: any text), `{eye}` (an eye token: left/right, l/r, od/os), `*` (any text, ignored);
    everything else is literal. `{eye:A=left,B=right}` names the tokens instead. Examples:
    `"{id}_{eye}.jpg"`, `"scan {id} ({eye}).png"`, `"{id}_{eye:1=right,2=left}_*.*"`.
    """

    def __init__(self, pattern: str):
        self.text = pattern
        parts = re.split(r"(\{id\}|\{eye(?::[^}]*)?\}|\*)", pattern)
        if parts.count("{id}") != 1 or sum(p.startswith("{eye") for p in parts) != 1:
            raise PatternError(f"--pattern {pattern!r}: needs exactly one {{id}} and one {{eye}} "
                             f"(e.g. \"{{id}}_{{eye}}.jpg\")")
        self.tokens = dict(EYE_TOKENS)
        regex = ""
        for part in parts:
            if part == "{id}":
                regex += "(?P<id>.+?)"
            elif part.startswith("{eye"):
                if ":" in part:
                    self.tokens = self._token_map(part[5:-1], pattern)
                regex += "(?P<eye>" + "|".join(map(re.escape, sorted(self.tokens, key=len, reverse=True))) + ")"
            elif part == "*":
                regex += ".*?"
            else:
                regex += re.escape(part)
        self.regex = re.compile(f"^{regex}$", re.IGNORECASE)

    @staticmethod
    def _token_map(text: str, pattern: str) -> dict[str, str]:
        tokens = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            token, _, eye = item.partition("=")
            if eye.strip().lower() not in EYES or not token.strip():
                raise PatternError(f"--pattern {pattern!r}: {item!r} in {{eye:...}} should be TOKEN=left or "
                                 f"TOKEN=right")
            tokens[token.strip().lower()] = eye.strip().lower()
        if set(tokens.values()) != set(EYES):
            raise PatternError(f"--pattern {pattern!r}: {{eye:...}} must name a token for each eye, e.g. "
                             f"{{eye:1=right,2=left}}")
        return tokens

    def match(self, name: str) -> tuple[str, str] | None:
        """(id, "left"|"right") of a file name, or None."""
        m = self.regex.match(name)
        return (m["id"], self.tokens[m["eye"].lower()]) if m and m["id"] else None

    def __str__(self) -> str:
        return self.text


def match_name(name: str, pattern: NamePattern | None = None) -> tuple[str, str] | None:
    """(patient ID, "left"|"right") that a file name encodes, or None: by `pattern` when given, else by the common
    conventions (`PAIR_NAME`)."""
    if pattern is not None:
        return pattern.match(name)
    m = PAIR_NAME.match(name)
    return (m["id"], EYE_TOKENS[m["eye"].lower()]) if m else None


class DataError(OdirError, RuntimeError):
    """Bad input data: a folder with no patient to score, or bad eye images that the user asked to be fatal
    (--strict). The message names the folder or the files."""


def default_cache() -> Path:
    """The prepared-image cache: $ODIR_CACHE/prepared, else ~/.cache/odir-dual/prepared."""
    return cache_root() / "prepared"


# ----------------------------------------------------------------------------------------------- finding pairs


def _id_key(pid):
    """Sort key: numeric IDs numerically, then the others by name."""
    s = str(pid)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _eye_rows() -> pd.DataFrame:
    return pd.DataFrame(columns=["id", "eye", "path", "reason"])


@dataclass
class FolderPairs:
    """What `find_pairs` finds in a folder.

    table: one row per patient, sorted by ID: id, left, right (source paths, None when absent), status ("ok" or why
        the patient cannot be scored, e.g. "right eye: no photograph"), plus the sheet's columns (N..O as int 0/1,
        age, sex, keywords) when labelled.
    ignored: (file name, reason) for files that name no patient eye, and for subfolders.
    layout: the ODIR sheet and images folder when the folder has one (the labels are known), else None.
    missing: the eyes the sheet names whose file is absent, one row each (id, eye, path, reason).
    """
    table: pd.DataFrame
    ignored: list[tuple[str, str]] = field(default_factory=list)
    layout: Layout | None = None
    missing: pd.DataFrame = field(default_factory=_eye_rows)

    @property
    def labelled(self) -> bool:
        return self.layout is not None

    def input_files(self) -> list[tuple[str, str]]:
        """(what, path) of every file read from the folder: the eye images and the sheet, if any (an output path
        equal to one of them is refused: `pipeline.host.check_output`)."""
        files = [("input image", p) for eye in EYES for p in self.table[eye] if isinstance(p, str)]
        return files + ([("annotation sheet", str(self.layout.sheet))] if self.labelled else [])


def check_scorable(found: FolderPairs, folder, pattern: NamePattern | None = None) -> None:
    """Refuse a folder with no patient to score: no image at all, or none named by patient and eye by the naming
    looked for (the message names it, and how to give another).

    Raises:
        DataError: the message names the folder and a few of its files.
    """
    naming = f"--pattern {pattern}" if pattern else NAMING_HELP
    if found.table.empty:
        names = ", ".join(name for name, _ in found.ignored[:5])
        seen = f"; found only: {names}" if names else " (it is empty)"
        raise DataError(printable(f"{folder}: no patient images to score, looked for {naming} .jpg/.jpeg/.png files "
                                  f"or an ODIR sheet{seen}"))
    if found.table["status"].str.startswith("not paired").all():
        raise DataError(printable(f"{folder}: none of its {len(found.table)} images is named by patient and eye "
                                  f"({naming}), e.g. {', '.join(found.table['id'].head(3))}; give their naming with "
                                  f"--pattern, e.g. --pattern \"{{id}}_{{eye}}.jpg\""))


def find_pairs(folder, pattern: NamePattern | str | None = None) -> FolderPairs:
    """The patients of a folder, one row each, sorted by ID.

    Args:
        folder: an ODIR folder with a sheet (labels known; or its `Layout`, found already), or a folder of images
            named by a common convention (`{ID}_left.jpg`, `{ID}-L.png`, `{ID}_OD.jpeg`, ...: `PAIR_NAME`; only the
            folder itself is read: its subfolders are listed in `ignored`). An image whose name pairs with nothing
            becomes a row of its own (ID: the file name), its status saying why.
        pattern: a `NamePattern` (or its text) for other naming schemes; then the folder's sheet is not read.

    Raises:
        pipeline.odir.DataFolderError: the folder does not exist.
        pipeline.odir.SheetError: the folder has an ODIR sheet with a bad row (the message names it).
    """
    if isinstance(folder, Layout):
        return _pairs_from_sheet(folder)
    folder = Path(folder)
    if not folder.exists():
        raise DataFolderError(f"no such folder: {folder}")
    if isinstance(pattern, str):
        pattern = NamePattern(pattern)
    if pattern is not None:
        return _pairs_from_names(folder, pattern)
    try:
        layout = find_layout(folder)
    except FileNotFoundError:  # no sheet: pair the images by file name
        return _pairs_from_names(folder)
    except SheetError:
        raise
    except ValueError as e:  # e.g. several ODIR sheets in one folder: a user-facing message, same path as a bad sheet
        raise SheetError(str(e)) from None
    return _pairs_from_sheet(layout)


def _pairs_from_sheet(layout: Layout) -> FolderPairs:
    patients, missing = read_patients(layout)
    swapped = swapped_eyes(patients)
    if len(swapped):  # left out like a missing eye: the reason says which column names which eye's file
        patients = patients[~patients["id"].isin(swapped["id"])]
        missing = pd.concat([missing, swapped]).sort_values(["id", "eye"], kind="stable", ignore_index=True)
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
    return FolderPairs(table, layout=layout, missing=missing)


def swapped_eyes(patients: pd.DataFrame) -> pd.DataFrame:
    """The eyes whose sheet column names a file of the other eye (Left-Fundus: `18_right.jpg`), as rows (id, eye,
    path, reason). Trained on, such a patient would teach the per-eye head the wrong eye's findings; only names that
    follow a known convention are judged (`match_name`), any other name passes."""
    rows = []
    for r in patients.itertuples():
        for eye in EYES:
            path = getattr(r, eye)
            named = match_name(Path(path).name)
            if named is not None and named[1] != eye:
                rows.append((r.id, eye, path, f"{eye.capitalize()}-Fundus names a {named[1]}-eye file (eyes swapped "
                                              f"in the sheet?)"))
    return pd.DataFrame(rows, columns=["id", "eye", "path", "reason"])


def _pairs_from_names(folder: Path, pattern: NamePattern | None = None) -> FolderPairs:
    files: dict[str, dict[str, list[str]]] = {}
    ignored, unpaired = [], []
    naming = f"--pattern {pattern}" if pattern else "{ID}_left/_right, _L/_R or _OD/_OS"
    with os.scandir(folder) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith("."):
                continue  # hidden files (.DS_Store)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError as err:  # a symbolic link loop, a permission: this entry only, never the whole folder
                if match_name(e.name, pattern) is None:
                    ignored.append((e.name, f"cannot be read: {err.strerror or err}"))
                    continue
                is_dir = is_file = False  # an eye: preparation gives its reason ("unreadable file: ...")
            if is_dir:
                ignored.append((e.name + "/", "a subfolder: not searched, score it on its own"))
                continue
            found = match_name(e.name, pattern)
            if found is None:
                if not is_file:
                    ignored.append((e.name, "not a regular file"))
                elif Path(e.name).suffix[1:].lower() in IMAGE_EXTS:  # an image we cannot pair: a row, with the reason
                    unpaired.append({"id": e.name, "left": None, "right": None,
                                     "status": f"not paired: the name does not say the patient and the eye "
                                               f"(expected {naming})"})
                else:
                    ignored.append((e.name, f"not an image named {naming}"))
                continue
            # an eye that is no regular file (a FIFO, a device, a dangling link) is kept here: preparation then
            # reports it as "not a regular file" / "missing file", not this patient as missing an eye
            files.setdefault(found[0], {"left": [], "right": []})[found[1]].append(e.path)
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
                problems.append(f"{eye} eye: no photograph")
            if images:
                ignored += [(Path(p).name, "not a " + "/".join(IMAGE_EXTS) + " file") for p in others]
        row["status"] = "; ".join(problems) or "ok"
        rows.append(row)
    for row in [r for r in unpaired if r["id"] in files]:  # `scan.jpg` beside `scan.jpg_left.jpg`: one ID, two rows
        unpaired.remove(row)
        ignored.append((row["id"], f"not paired (expected {naming}), and its name is the ID of the patient paired "
                                   "from other files"))
    table = pd.DataFrame(rows + unpaired, columns=["id", "left", "right", "status"])
    table = table.sort_values("id", key=lambda s: s.map(_id_key), kind="stable", ignore_index=True)
    return FolderPairs(table, ignored)


# ----------------------------------------------------------------------------------------------- preparing


def prepare_pairs(table: pd.DataFrame, cache_dir, short_px: int, *, workers=None, progress=True,
                  stats: dict | None = None) -> pd.DataFrame:
    """Prepare both eyes of every patient whose status is "ok" (fundus crop + resize, cached).

    Returns a copy of table with columns left_prepared, right_prepared (None if not prepared) and the status of
    patients with a bad image set to the reason (e.g. "left eye: truncated JPEG (12_left.jpg)").
    """
    return _prepare_pairs(table, cache_dir, short_px, workers=workers, progress=progress, stats=stats)[0]


def _prepare_pairs(table: pd.DataFrame, cache_dir, short_px: int, *, workers=None, progress=True,
                   stats: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`prepare_pairs`, and the bad eyes as rows (id, eye, path, reason)."""
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
    return out, bad


@dataclass
class TrainingData:
    """What `load_prepared` returns.

    patients: only patients with both eyes usable, left/right pointing at the prepared copies (original paths kept in
        `left_src`/`right_src`, their content hashes in `left_sha256`/`right_sha256`), the sheet's labels and columns.
    left_out: one row per bad eye (id, eye, path, reason): missing, unreadable, corrupt, or one photograph used twice
        (by two patients, or for both eyes: it would sit in training and in test); sorted by id, eye.
    layout: where the sheet and the images were found.
    """
    patients: pd.DataFrame
    left_out: pd.DataFrame
    layout: Layout


def load_prepared(data_dir, short_px: int, *, cache_dir=None, strict=False, workers=None, progress=True,
                  allow_shared=False) -> TrainingData:
    """Read the sheet, check and prepare every image: the labelled patients to train on, and the left-out eyes.

    Args:
        data_dir: an ODIR folder (or sheet file), or the `Layout` found there already (then it is not searched again).
        strict: any left-out patient is a DataError instead.
        allow_shared: keep a photograph used twice (`shared_photographs`).
    """
    layout = as_layout(data_dir)  # training needs labels: no sheet is a DataFolderError naming what was looked for
    found = find_pairs(layout)
    table, bad_eyes = _prepare_pairs(found.table, Path(cache_dir) if cache_dir else default_cache(), short_px,
                                     workers=workers, progress=progress)
    for eye in EYES:
        table[f"{eye}_sha256"] = [source_hash(p) if isinstance(p, str) else None for p in table[f"{eye}_prepared"]]
    shared = pd.DataFrame(columns=["id", "eye", "path", "reason"]) if allow_shared else shared_photographs(table)
    for pid in shared["id"].unique():
        table.loc[table["id"] == pid, "status"] = "a photograph used twice"
    parts = [df for df in (found.missing, bad_eyes, shared) if len(df)]
    left_out = pd.concat(parts, ignore_index=True) if parts else shared.iloc[:0]
    left_out = left_out.sort_values(["id", "eye"], ignore_index=True)
    if strict and len(left_out):
        raise DataError(f"--strict: {left_out['id'].nunique()} patient(s) have bad eye images, first: "
                        + "; ".join(f"{r.path}: {r.reason}" for r in left_out.head(5).itertuples()))
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    patients = ok.drop(columns=["status", "left_prepared", "right_prepared"]).rename(
        columns={"left": "left_src", "right": "right_src"})
    patients.insert(1, "left", ok["left_prepared"])
    patients.insert(2, "right", ok["right_prepared"])
    return TrainingData(patients, left_out, layout)


def shared_photographs(table: pd.DataFrame) -> pd.DataFrame:
    """The eyes whose photograph (same content hash) is also another eye's, of this patient or another: rows
    (id, eye, path, reason), the reason naming every other use. Such a photograph would sit in training and in
    validation or test at once (one patient's file named in another's row, a copy, one image for both eyes)."""
    uses: dict[str, list[tuple]] = {}
    for r in table[table["status"] == "ok"].itertuples():
        for eye in EYES:
            uses.setdefault(getattr(r, f"{eye}_sha256"), []).append((r.id, eye, getattr(r, eye)))
    rows = []
    for group in uses.values():
        if len(group) < 2:
            continue
        for pid, eye, path in group:
            others = "; ".join(f"patient {o}'s {e} eye ({Path(p).name})" for o, e, p in group
                               if (o, e) != (pid, eye))
            rows.append((pid, eye, path, f"the same photograph as {others}: left out so that it cannot be in "
                                         f"training and in test at once (--allow-shared-images keeps it)"))
    return pd.DataFrame(rows, columns=["id", "eye", "path", "reason"])


def left_out_summary(left_out: pd.DataFrame) -> str:
    """One line: how many patients were left out, by reason."""
    if left_out.empty:
        return "no patient left out"
    by_reason = left_out.groupby("reason")["id"].nunique().sort_values(ascending=False)
    reasons = ", ".join(f"{n} {reason}" for reason, n in by_reason.items())
    return f"left out {left_out['id'].nunique()} patient(s): {reasons}"

