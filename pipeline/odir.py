"""ODIR-5K annotation sheets -> one table row per patient whose two eye images exist.

Two sheet formats are read (see docs/ODIR.md):
- the original ``data.xlsx``: one row per patient;
- Kaggle's ``full_df.csv``: one row per image file that exists, with the patient's columns repeated.
  Its per-image ``labels``/``target`` columns are never used: the patient labels are N..O.
The format is told by the columns (Kaggle's sheet has ``filename``), not by the file extension.

Only file existence is checked here (one ``os.listdir``); decoding every image is left to the
preparation step that reads them anyway. A sheet is user input: every bad cell is reported by sheet, row and column.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from odir_dual.common.errors import OdirError
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES, EYES

REQUIRED = ("ID", "Left-Fundus", "Right-Fundus", *CLASSES)
# sheet column -> patient-table column; absent columns become NaN (age) or "" (text)
OPTIONAL = {"Patient Age": "age", "Patient Sex": "sex",
            "Left-Diagnostic Keywords": "left_keywords",
            "Right-Diagnostic Keywords": "right_keywords"}
KAGGLE_MARK = "filename"  # only Kaggle's one-row-per-image sheet has this column
# (sheet, images folder) pairs of the two published layouts, in order of preference
KNOWN_LAYOUTS = (("data.xlsx", "Training Images"), ("full_df.csv", "preprocessed_images"))
SHEET_SUFFIXES = (".xlsx", ".csv")
FIRST_DATA_ROW = 2  # spreadsheet row of the first data row: the header is row 1, as Excel shows it


class SheetError(OdirError, ValueError):
    """Bad annotation sheet; message names the sheet file, the row (spreadsheet row number,
    header = row 1, as a user sees it in Excel) and the column."""


class DataFolderError(OdirError, FileNotFoundError):
    """The data folder, or the images folder its sheet names, is not there or holds no ODIR layout; the message
    says what was looked for. Also a FileNotFoundError, as it was before the error family."""


# ----------------------------------------------------------------------------- layout

class Layout(NamedTuple):
    """Where an ODIR download keeps its annotation sheet and its images: found once per folder (`find_layout`) and
    passed down, so that reading the patients does not search the folder again."""
    sheet: Path
    images: Path


def as_layout(data_dir) -> Layout:
    """`data_dir` itself when it is a Layout already, else the layout found there (`find_layout`)."""
    return data_dir if isinstance(data_dir, Layout) else find_layout(data_dir)


def find_layout(data_dir) -> Layout:
    """Locate the annotation sheet and the images folder of an ODIR-5K download.

    Args:
        data_dir: a folder in one of these layouts, tried in this order:
            - original / Kaggle ``ODIR-5K/ODIR-5K``: ``data.xlsx`` + ``Training Images/``;
            - Kaggle root: ``full_df.csv`` + ``preprocessed_images/``;
            - any folder with one sheet (.xlsx or .csv with the ODIR columns) and a subfolder
              holding the image files it names;
            - either published layout one or two folder levels down (the Kaggle root holds
              ``ODIR-5K/ODIR-5K/data.xlsx``; full_df.csv at the top wins over it).
            A sheet file may also be given directly; its images folder is looked for beside it.

    Returns:
        Layout(sheet, images): a named pair.

    Raises:
        DataFolderError: nothing matched; the message lists what was looked for.
        SheetError: several candidate sheets in one folder (pass the sheet file instead).
    """
    root = Path(data_dir).expanduser()
    if root.is_file():
        images = _images_beside(root)
        if images is None:
            raise DataFolderError(f"no images folder beside {root}: looked for a subfolder "
                                    f"holding the files its Left-/Right-Fundus columns name")
        return Layout(root, images)
    if not root.is_dir():
        raise DataFolderError(f"ODIR data folder not found: {root}")
    found = _layout_in(root) or _known_layout_below(root)
    if found is None:
        raise DataFolderError(_not_found_message(root))
    return Layout(*found)


def _known_layout(folder: Path) -> tuple[Path, Path] | None:
    """A published (sheet, images) pair directly in folder, or None."""
    for sheet_name, images_name in KNOWN_LAYOUTS:
        sheet, images = folder / sheet_name, folder / images_name
        if sheet.is_file() and images.is_dir():
            return sheet, images
    return None


def _layout_in(folder: Path) -> tuple[Path, Path] | None:
    """A published pair in folder, else its only ODIR sheet with an images subfolder, or None."""
    known = _known_layout(folder)
    if known is not None:
        return known
    pairs = [(s, i) for s in _odir_sheets(folder) if (i := _images_beside(s)) is not None]
    if len(pairs) > 1:
        names = ", ".join(s.name for s, _ in pairs)
        raise SheetError(f"several ODIR sheets in {folder} ({names}); pass the sheet file itself")
    return pairs[0] if pairs else None


def _known_layout_below(root: Path) -> tuple[Path, Path] | None:
    """A published pair one, then two, folder levels below root (shallowest, then by name)."""
    level = [root]
    for _ in range(2):
        level = [d for parent in level for d in _subfolders(parent)]
        for folder in level:
            found = _known_layout(folder)
            if found is not None:
                return found
    return None


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name so that detection is deterministic."""
    with os.scandir(folder) as entries:
        dirs = [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]
    return sorted(dirs)


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False where it cannot be told (a symbolic link loop, a permission): one bad entry never makes
    a whole folder unreadable."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _odir_sheets(folder: Path) -> list[Path]:
    """The .xlsx/.csv files in folder whose header has all the required ODIR columns."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SHEET_SUFFIXES
                   and p.is_file() and not p.name.startswith(("~$", ".")))  # ~$: Excel lock file
    return [p for p in files if set(REQUIRED) <= set(_header(p))]


def _header(sheet: Path) -> list[str]:
    """Column names of a sheet, or [] when it cannot be parsed (it is then not an ODIR sheet)."""
    try:
        return list(_read_raw(sheet, nrows=0).columns)
    except (OSError, ValueError, zipfile.BadZipFile):  # ValueError covers pandas parser errors
        return []


def _images_beside(sheet: Path) -> Path | None:
    """The subfolder next to sheet holding most of the files it names (None if none holds any)."""
    for sheet_name, images_name in KNOWN_LAYOUTS:
        if sheet.name == sheet_name and (sheet.parent / images_name).is_dir():
            return sheet.parent / images_name
    raw = _read_raw(sheet)
    _require_columns(raw, sheet)
    names = set(raw["Left-Fundus"].dropna().astype(str)) | set(raw["Right-Fundus"].dropna().astype(str))
    best, best_hits = None, 0
    for folder in _subfolders(sheet.parent):
        hits = len(names.intersection(os.listdir(folder)))
        if hits > best_hits:
            best, best_hits = folder, hits
    return best


def _not_found_message(root: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "") or "(empty)"
    return (f"no ODIR-5K data in {root}. Looked for: data.xlsx with 'Training Images/' (original "
            f"layout); full_df.csv with 'preprocessed_images/' (Kaggle root); either of these one "
            f"or two levels down (e.g. ODIR-5K/ODIR-5K/); or one .xlsx/.csv sheet with columns "
            f"{', '.join(REQUIRED)} beside a subfolder holding the images it names. "
            f"Found: {shown}" + "".join(f". {why}" for why in _sheet_problems(root)))


def _sheet_problems(root: Path) -> list[str]:
    """Why the .csv/.xlsx files in root are no readable sheet (semicolons, encodings, a hidden worksheet), so that a
    folder whose sheet was saved the wrong way says so instead of "no ODIR-5K data"."""
    problems = []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in SHEET_SUFFIXES and not p.name.startswith(("~$", ".")) and p.is_file():
            try:
                _read_raw(p, nrows=0)
            except SheetError as e:
                problems.append(str(e))
            except (OSError, zipfile.BadZipFile):
                pass
    return problems[:3]


# ----------------------------------------------------------------------------- sheet parsing

def _read_raw(sheet: Path, nrows: int | None = None) -> pd.DataFrame:
    """The sheet's first worksheet as read, header names stripped, fully blank rows dropped.

    The index counts the data rows from 0 as the sheet has them, blank rows included, so `_row(label)` is the row
    number a user sees in Excel or a text editor also below a blank row.

    Raises:
        SheetError: not a .xlsx/.csv file, or one that cannot be parsed (a damaged workbook, binary data, ...).
    """
    suffix = sheet.suffix.lower()
    if suffix not in SHEET_SUFFIXES:
        raise SheetError(f"{sheet}: not an annotation sheet: expected an ODIR .xlsx or .csv file, or a folder "
                         f"holding one")
    if suffix == ".csv":
        _check_csv_text(sheet)
    try:
        if suffix == ".csv":
            # utf-8-sig: Excel writes a byte-order mark when saving CSV. Blank lines kept: they count as rows.
            raw = pd.read_csv(sheet, nrows=nrows, encoding="utf-8-sig", skip_blank_lines=False)
        else:
            _check_first_worksheet(sheet)
            raw = pd.read_excel(sheet, nrows=nrows, engine="openpyxl")
    except SheetError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as e:  # ValueError: parser and decoding errors
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise SheetError(f"{sheet}: cannot be read as {'a CSV' if suffix == '.csv' else 'an Excel .xlsx'} sheet "
                         f"({type(e).__name__}: {first})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    if suffix == ".csv" and len(raw.columns) == 1 and any(sep in raw.columns[0] for sep in (";", "\t")):
        sep = "semicolons (;)" if ";" in raw.columns[0] else "tabs"
        raise SheetError(f"{sheet}: its columns are separated by {sep}, not commas: save it as CSV with commas "
                         f"(Excel: 'CSV UTF-8 (Comma delimited)') or as .xlsx")
    raw = raw.reset_index(drop=True)
    blank = raw.isna()
    for column in raw.columns:  # a cell of spaces is blank too
        if not pd.api.types.is_numeric_dtype(raw[column]):
            blank[column] |= raw[column].astype(str).str.strip() == ""
    return raw[~blank.all(axis=1)] if len(raw.columns) else raw


def _check_csv_text(sheet: Path) -> None:
    """A CSV sheet must be UTF-8 text (a BOM allowed): UTF-16 and Latin-1/Windows-1252 files get a SheetError saying
    how to save it, instead of a decoder's complaint."""
    try:
        data = sheet.read_bytes()
    except OSError:
        return  # pandas says it, naming the file
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) > 1 and data[1:2] == b"\0"):
        raise SheetError(f"{sheet}: is UTF-16 text (Excel's 'Unicode Text'); save it as 'CSV UTF-8 (Comma "
                         f"delimited)' or as .xlsx")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SheetError(f"{sheet}: row {line}: not UTF-8 text (byte 0x{data[e.start]:02x}; probably Latin-1 or "
                         f"Windows-1252 from an older Excel): save it as 'CSV UTF-8 (Comma delimited)' or as .xlsx"
                         ) from None


def _check_first_worksheet(sheet: Path) -> None:
    """The patient table is read from the workbook's first worksheet: refuse one that Excel hides (the user sees
    another worksheet and would not know which one was read)."""
    try:
        import openpyxl  # slow: ~0.3 s to import, and only .xlsx sheets need it

        wb = openpyxl.load_workbook(sheet, read_only=True)
    except Exception:  # noqa: BLE001 - a damaged workbook: pandas' own error names it next
        return
    try:
        first = wb.worksheets[0] if wb.worksheets else None
        if first is not None and first.sheet_state != "visible":
            visible = [ws.title for ws in wb.worksheets if ws.sheet_state == "visible"]
            raise SheetError(f"{sheet}: its first worksheet {first.title!r} is hidden, and the first worksheet is the "
                             f"one read: unhide it, or delete it or move it after the patient worksheet"
                             + (f" ({visible[0]!r})" if visible else ""))
    finally:
        wb.close()


def _check_formulas(raw: pd.DataFrame, sheet: Path) -> None:
    """Blank required cells of an .xlsx that hold a formula never calculated (saved by a program that does not
    compute formulas: openpyxl then reads no value): SheetError naming the first, saying how to fix it."""
    columns = [c for c in REQUIRED if c in raw.columns]
    blank = raw[columns].isna()
    if sheet.suffix.lower() != ".xlsx" or not blank.to_numpy().any():
        return
    import openpyxl  # slow: as in _check_first_worksheet

    wb = openpyxl.load_workbook(sheet, read_only=True, data_only=False)
    try:
        ws = wb.worksheets[0]
        header = [str(c.value).strip() if c.value is not None else "" for c in next(ws.iter_rows(max_row=1))]
        wanted = {header.index(c): c for c in columns if c in header}
        for r, row in enumerate(ws.iter_rows(min_row=FIRST_DATA_ROW), start=FIRST_DATA_ROW):
            for j, column in wanted.items():
                if j < len(row) and row[j].data_type == "f":
                    label = r - FIRST_DATA_ROW
                    if label in blank.index and blank.at[label, column]:
                        raise SheetError(f"{sheet}: row {r}, column {column!r}: a formula ({row[j].value}) with no "
                                         f"saved value: open the workbook in Excel or LibreOffice and save it (that "
                                         f"stores the computed values), or paste the values over the formulas")
    finally:
        wb.close()


def _row(label) -> int:
    """Spreadsheet row number of the data row with index label `label` (see `_read_raw`)."""
    return int(label) + FIRST_DATA_ROW


def _require_columns(raw: pd.DataFrame, sheet: Path) -> None:
    absent = [c for c in REQUIRED if c not in raw.columns]
    if absent:
        raise SheetError(f"{sheet}: row 1 (header): missing column(s) {', '.join(map(repr, absent))}; "
                         f"columns found: {', '.join(map(repr, raw.columns))}")


def _bad_cell(sheet: Path, mask: pd.Series, values: pd.Series, column: str, what: str) -> SheetError:
    """SheetError for the first True cell of mask, counting the others."""
    bad = np.flatnonzero(mask.to_numpy())
    more = f" ({len(bad) - 1} more bad cells in this column)" if len(bad) > 1 else ""
    i = bad[0]
    return SheetError(f"{sheet}: row {_row(mask.index[i])}, column {column!r}: {what}, got {_show(values.iloc[i])}"
                      f"{more}")


def _show(value) -> str:
    """A cell value as a user would recognise it: 2, 'yes', a blank cell (not np.float64(nan))."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "a blank cell"
    return repr(value)


def _binary_cell(v) -> float:
    """0/1 for a 0/1 int, float or string cell; NaN for anything else (blank, 2, 'yes', True)."""
    if isinstance(v, (bool, np.bool_)):
        return np.nan  # a TRUE/FALSE Excel cell is not a 0/1 label
    if isinstance(v, str):
        return {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}.get(v.strip(), np.nan)
    if isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1):
        return float(v)
    return np.nan


def _parse_labels(raw: pd.DataFrame, sheet: Path) -> pd.DataFrame:
    """The N..O columns as int8 0/1; SheetError at the first cell that is not 0/1."""
    out = {}
    for c in CLASSES:
        col = raw[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            num = col.where(col.isin([0, 1]))  # fast path for the usual all-number column
        else:
            num = col.map(_binary_cell, na_action=None).astype(float)
        if num.isna().any():
            raise _bad_cell(sheet, num.isna(), col, c, "a label must be 0 or 1")
        out[c] = num.astype(np.int8)
    return pd.DataFrame(out)


def _parse_ids(raw: pd.DataFrame, sheet: Path) -> pd.Series:
    num = pd.to_numeric(raw["ID"], errors="coerce")
    # beyond int64 an ID would wrap to a negative number (or lose digits as a float)
    bad = num.isna() | (num.round() != num) | ~(num.abs() < 2**63)
    if bad.any():
        raise _bad_cell(sheet, bad, raw["ID"], "ID", "a patient ID must be an integer below 2**63")
    return num.astype(np.int64)


def _parse_text(raw: pd.DataFrame, column: str) -> pd.Series:
    """A text column with blanks as ""; all "" if the column is absent."""
    if column not in raw.columns:
        return pd.Series([""] * len(raw), index=raw.index, dtype=object)
    col = raw[column]
    return col.where(col.notna(), "").astype(str).str.strip().astype(object)


def _parse_filenames(raw: pd.DataFrame, sheet: Path) -> dict[str, pd.Series]:
    """Left-/Right-Fundus as stripped strings; SheetError at a blank cell or a name that leaves the images folder
    (an absolute path, a `..` component: `sub/x.jpg` is fine, `../x.jpg` is not)."""
    out = {}
    for eye in EYES:
        column = f"{eye.capitalize()}-Fundus"
        names = _parse_text(raw, column)
        if (names == "").any():
            raise _bad_cell(sheet, names == "", raw[column], column, "an image file name is required")
        outside = names.map(_leaves_folder).astype(bool)
        if outside.any():
            raise _bad_cell(sheet, outside, raw[column], column, "an image file name must name a file inside the "
                            "images folder (no absolute path, no '..')")
        out[eye] = names
    return out


def _leaves_folder(name: str) -> bool:
    """An absolute path, a Windows drive, or a '..' component (with / or \\ as separator)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (name[:1].isalpha() and name[1:2] == ":") or ".." in parts


def _parse_age(raw: pd.DataFrame, sheet: Path) -> pd.Series:
    """Patient Age as float (NaN where blank or absent); SheetError at a non-number."""
    if "Patient Age" not in raw.columns:
        return pd.Series(np.nan, index=raw.index)
    col = raw["Patient Age"]
    age = pd.to_numeric(col, errors="coerce").astype(float)
    bad = age.isna() & col.notna() & (col.astype(str).str.strip() != "")
    if bad.any():
        raise _bad_cell(sheet, bad, col, "Patient Age", "an age must be a number")
    return age


def _parse_sheet(raw: pd.DataFrame, sheet: Path) -> pd.DataFrame:
    """Sheet rows as a patient-table-shaped frame (file names, not paths), same index as raw."""
    _require_columns(raw, sheet)
    if raw.empty:
        raise SheetError(f"{sheet}: has the header row but no patient rows: fill in one row per patient (or per "
                         f"image, Kaggle's layout) below it")
    _check_formulas(raw, sheet)
    names = _parse_filenames(raw, sheet)
    table = pd.DataFrame({"id": _parse_ids(raw, sheet), "left": names["left"], "right": names["right"]})
    table = pd.concat([table, _parse_labels(raw, sheet)], axis=1)
    table["age"] = _parse_age(raw, sheet)
    for column, name in OPTIONAL.items():
        if name != "age":
            table[name] = _parse_text(raw, column)
    return table


def _check_unique_ids(table: pd.DataFrame, sheet: Path) -> None:
    """One row per patient in the original sheet: a repeated ID is an error naming both rows."""
    dup = table["id"].duplicated(keep=False)
    if dup.any():
        first_id = table.loc[dup, "id"].iloc[0]
        rows = [_row(table.index[i]) for i in np.flatnonzero((table["id"] == first_id).to_numpy())]
        raise SheetError(f"{sheet}: rows {' and '.join(map(str, rows))}, column 'ID': patient ID "
                         f"{first_id} appears more than once (one row per patient expected)")


def _one_row_per_patient(table: pd.DataFrame, sheet: Path) -> pd.DataFrame:
    """Kaggle sheet: collapse each ID's image rows to its first, after checking they agree."""
    must_agree = ["left", "right", *CLASSES]
    first = table.groupby("id")[must_agree].transform("first")
    differs = table[must_agree] != first
    if differs.to_numpy().any():
        i = int(np.flatnonzero(differs.any(axis=1).to_numpy())[0])
        pid, column = table["id"].iloc[i], differs.columns[differs.iloc[i].to_numpy()][0]
        j = int(np.flatnonzero((table["id"] == pid).to_numpy())[0])  # that ID's first row
        sheet_column = {"left": "Left-Fundus", "right": "Right-Fundus"}.get(column, column)
        raise SheetError(f"{sheet}: rows {_row(table.index[j])} and {_row(table.index[i])}, column "
                         f"{sheet_column!r}: the rows "
                         f"of patient ID {pid} disagree ({_show(table[column].iloc[j])} vs "
                         f"{_show(table[column].iloc[i])}); a patient's image rows must carry the same "
                         f"patient columns")
    return table[~table["id"].duplicated()]


# ----------------------------------------------------------------------------- patients

def read_patients(data_dir: Path | str | Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read an ODIR-5K annotation sheet into a patient table; set aside patients missing an eye.

    Args:
        data_dir: any layout :func:`find_layout` accepts (a folder, or the sheet file itself), or the Layout it
            found.

    Returns:
        patients: columns id (int), left, right (str, absolute image paths), N D G C A H M O
            (int8 0/1), age (float, NaN allowed), sex, left_keywords, right_keywords (str, raw:
            keywords are separated by the full-width comma "，"); sorted by id, index reset.
            Only patients with both image files present.
        missing: columns id, eye ('left'/'right'), path, reason ('missing file'); one row per
            missing eye image, sorted by id then eye. Images are not decoded here.

    Raises:
        SheetError: a bad sheet (missing column, repeated ID, label not 0/1, disagreeing rows, ...).
        DataFolderError: no layout found, or none of the named images exists (wrong folder).
    """
    sheet, images = as_layout(data_dir)
    raw = _read_raw(sheet)
    table = _parse_sheet(raw, sheet)
    if KAGGLE_MARK in raw.columns:
        table = _one_row_per_patient(table, sheet)
    else:
        _check_unique_ids(table, sheet)
    return _split_missing(table, Path(os.path.abspath(images)), sheet)


def _present(names: pd.Series, images: Path) -> np.ndarray:
    """Which file names exist in images: one listdir; a stat only for names with a subfolder."""
    present = set(os.listdir(images))
    found = names.isin(present).to_numpy().copy()  # writable: pandas 3 hands out read-only views
    nested = names.str.contains("/", regex=False) | names.str.contains("\\", regex=False)
    for i in np.flatnonzero(nested.to_numpy()):
        found[i] = (images / names.iloc[i]).is_file()
    return found


def _split_missing(table: pd.DataFrame, images: Path, sheet: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(patients with both images, one row per missing eye image); file names become paths."""
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    prefix = str(images) + os.sep
    found = {eye: _present(table[eye], images) for eye in EYES}
    if len(table) and not (found["left"].any() or found["right"].any()):
        raise DataFolderError(f"none of the {2 * len(table)} images named in {sheet} is in {images}"
                              + _subfolder_hint(images, table["left"].iloc[0]))
    for eye in EYES:
        table[eye] = prefix + table[eye]
    missing = pd.concat([pd.DataFrame({"id": table.loc[~found[eye], "id"], "eye": eye,
                                       "path": table.loc[~found[eye], eye], "reason": "missing file"})
                         for eye in EYES])
    missing = missing.sort_values(["id", "eye"], kind="stable").reset_index(drop=True)
    patients = table[found["left"] & found["right"]].reset_index(drop=True)
    return patients, missing


def _subfolder_hint(images: Path, name: str) -> str:
    """"; they are in its subfolder X (...)" when a subfolder of `images` holds the sheet's first image, else ""."""
    for sub in _subfolders(images):
        if (sub / name).is_file():
            return (f"; they are in its subfolder {sub.name!r}: move them up, or name {sub.name}/{name} in the "
                    "sheet")
    return ""


def label_matrix(patients: pd.DataFrame) -> np.ndarray:
    """(N, 8) int64 0/1 matrix, columns in CLASSES order."""
    return patients[list(CLASSES)].to_numpy(dtype=np.int64, copy=True)  # writable: torch warns on views


def describe(patients: pd.DataFrame) -> str:
    """A short text summary for the dry run: N patients and positives per class."""
    y = label_matrix(patients)
    n = len(y)
    lines = [f"{n} patients, {y.sum(1).mean() if n else 0:.2f} labels per patient"]
    for c, count in zip(CLASSES, y.sum(0)):
        share = 100 * count / n if n else 0.0
        lines.append(f"  {c} {CLASS_NAMES[c]:<13}{count:>6}  {share:5.1f}%")
    return "\n".join(lines)


def subset_folder(data_dir, ids, out_dir) -> Path:
    """An ODIR folder of some patients of another: their sheet rows (data.xlsx, the original columns) and links to
    their two images in `Training Images/`. For scoring the held-out patients of a run as a user would score a
    folder of new patients (`score.py MODEL OUT_DIR`).

    Returns out_dir. Raises FileExistsError if out_dir exists.
    """
    layout = find_layout(data_dir)
    sheet, patients = layout.sheet, read_patients(layout)[0]
    keep = patients[patients["id"].isin(set(int(i) for i in ids))]
    raw = _read_raw(sheet)
    if KAGGLE_MARK in raw.columns:  # one row per image: back to one row per patient, the original columns
        raw = raw.drop_duplicates("ID")
    raw = raw[raw["ID"].astype(int).isin(set(keep["id"]))]
    out_dir = Path(out_dir)
    images = out_dir / KNOWN_LAYOUTS[0][1]
    images.mkdir(parents=True, exist_ok=False)
    rows = raw[[c for c in raw.columns if c in (*REQUIRED, *OPTIONAL)]].copy()
    for eye, column in (("left", "Left-Fundus"), ("right", "Right-Fundus")):
        names = [f"{pid}_{eye}{Path(src).suffix}" for pid, src in zip(keep["id"], keep[eye])]
        for name, src in zip(names, keep[eye]):
            (images / name).symlink_to(Path(src).resolve())
        rows[column] = rows["ID"].astype(int).map(dict(zip(keep["id"], names)))
    rows.to_excel(out_dir / KNOWN_LAYOUTS[0][0], index=False, engine="openpyxl")
    return out_dir
