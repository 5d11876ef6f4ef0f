"""pipeline.odir: layouts, both sheet formats, every bad input, and the real 2,239-patient subset."""
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odir_dual.pipeline.odir import CLASSES, SheetError, describe, find_layout, label_matrix, read_patients

COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
           "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *CLASSES]
REAL_MISSING = 24  # patients of odir5k-256 with one eye image missing (its README)


# ----------------------------------------------------------------------------- helpers

def original_sheet(labels) -> pd.DataFrame:
    """A data.xlsx-format frame, one patient per row of the (n, 8) 0/1 labels, IDs 0..n-1."""
    labels = np.asarray(labels)
    ids = np.arange(len(labels))
    df = pd.DataFrame({"ID": ids, "Patient Age": 50 + ids, "Patient Sex": "Female",
                       "Left-Fundus": [f"{i}_left.jpg" for i in ids],
                       "Right-Fundus": [f"{i}_right.jpg" for i in ids],
                       "Left-Diagnostic Keywords": "normal fundus",
                       "Right-Diagnostic Keywords": "cataract，drusen"})
    for j, c in enumerate(CLASSES):
        df[c] = labels[:, j]
    return df[COLUMNS]


def kaggle_sheet(df: pd.DataFrame, dropped=()) -> pd.DataFrame:
    """full_df.csv format: one row per image not in dropped, with per-image labels/target that
    deliberately disagree with the patient's N..O (all 'N', as Kaggle's are often wrong)."""
    rows = []
    for _, r in df.iterrows():
        for eye in ("Right", "Left"):  # Kaggle lists right first; order must not matter
            name = r[f"{eye}-Fundus"]
            if name not in dropped:
                rows.append({**r.to_dict(), "filepath": f"../input/x/{name}", "labels": "['N']",
                             "target": "[1, 0, 0, 0, 0, 0, 0, 0]", "filename": name})
    return pd.DataFrame(rows)


def write_sheet(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_excel(path, index=False)
    return path


def touch_images(folder: Path, df: pd.DataFrame, skip=()) -> Path:
    """Empty placeholder jpgs for every file the sheet names, except skip."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in set(df["Left-Fundus"]) | set(df["Right-Fundus"]):
        if name not in skip:
            (folder / name).touch()
    return folder


def make_dataset(root: Path, df: pd.DataFrame, sheet="data.xlsx", images="Training Images",
                 skip=()) -> Path:
    """root/sheet + root/images/ with placeholder images; returns the sheet path."""
    touch_images(root / images, df, skip)
    return write_sheet(df, root / sheet)


def small() -> pd.DataFrame:
    """Three patients: one cataract, one diabetic + other, one normal."""
    return original_sheet([[0, 0, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]])


# ----------------------------------------------------------------------------- the real subset

@pytest.fixture(scope="module")
def real(odir256):
    """(patients, missing, seconds) read from data.xlsx and from full_df.csv."""
    out = {}
    for name in ("data.xlsx", "full_df.csv"):
        t0 = time.perf_counter()
        patients, missing = read_patients(odir256 / name)
        out[name] = patients, missing, time.perf_counter() - t0
    return out


def test_real_formats_give_the_same_table(real):
    xlsx, csv = real["data.xlsx"], real["full_df.csv"]
    pd.testing.assert_frame_equal(xlsx[0], csv[0])
    pd.testing.assert_frame_equal(xlsx[1], csv[1])


def test_real_missing_eyes(real, odir256):
    patients, missing, _ = real["full_df.csv"]
    assert missing["id"].nunique() == REAL_MISSING == len(missing)  # one eye each
    assert set(missing["reason"]) == {"missing file"}
    assert not set(missing["id"]) & set(patients["id"])
    assert len(patients) + REAL_MISSING == 2239
    for pid, eye, path in missing[["id", "eye", "path"]].itertuples(index=False):
        assert Path(path).name == f"{pid}_{eye}.jpg" and not Path(path).exists()
    # in full_df.csv most dropped eyes have no row, a few have a row but no file: both must count
    rows = set(pd.read_csv(odir256 / "full_df.csv")["filename"])
    in_csv = missing["path"].map(lambda p: Path(p).name).isin(rows)
    assert in_csv.any() and (~in_csv).any()


def test_real_labels_match_the_xlsx(real, odir256):
    patients = real["full_df.csv"][0]
    sheet = pd.read_excel(odir256 / "data.xlsx").set_index("ID").loc[patients["id"]]
    np.testing.assert_array_equal(label_matrix(patients), sheet[list(CLASSES)].to_numpy())
    np.testing.assert_array_equal(patients["age"], sheet["Patient Age"].to_numpy(float))
    assert (patients["left_keywords"].to_numpy() == sheet["Left-Diagnostic Keywords"].to_numpy()).all()


def test_real_table_shape(real):
    patients = real["data.xlsx"][0]
    assert list(patients.columns) == ["id", "left", "right", *CLASSES, "age", "sex",
                                      "left_keywords", "right_keywords"]
    assert patients["id"].is_monotonic_increasing and patients["id"].is_unique
    assert all(patients[c].dtype == np.int8 for c in CLASSES)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in patients["left"].head(20))
    assert describe(patients).startswith(f"{len(patients)} patients")


def test_real_read_is_fast(real):
    assert real["data.xlsx"][2] < 2.0, "reading the 2,239-patient xlsx should take < 2 s"
    assert real["full_df.csv"][2] < 2.0


def test_real_folder_and_kaggle_root(odir256, tmp_path, real):
    assert find_layout(odir256) == (odir256 / "data.xlsx", odir256 / "Training Images")
    # a Kaggle root: full_df.csv + preprocessed_images/ (links to the real files)
    (tmp_path / "full_df.csv").symlink_to(odir256 / "full_df.csv")
    (tmp_path / "preprocessed_images").symlink_to(odir256 / "Training Images")
    patients, missing = read_patients(tmp_path)
    assert patients["left"].iloc[0].startswith(str(tmp_path / "preprocessed_images"))
    expected = real["data.xlsx"][0]
    pd.testing.assert_frame_equal(patients.drop(columns=["left", "right"]),
                                  expected.drop(columns=["left", "right"]))
    assert len(missing) == REAL_MISSING


# ----------------------------------------------------------------------------- bad sheets

def bad_label(value):
    def edit(df):
        df = df.astype({"D": object})
        df.loc[1, "D"] = value  # sheet row 3
        return df
    return edit


BAD_SHEETS = {  # name -> (edit, text the message must contain besides the file name)
    "missing column": (lambda df: df.drop(columns="G"), ["row 1", "'G'", "columns found"]),
    "duplicate ID": (lambda df: df.assign(ID=[0, 1, 0]), ["rows 2 and 4", "'ID'"]),
    "label 2": (bad_label(2), ["row 3", "'D'", "got 2"]),
    "label yes": (bad_label("yes"), ["row 3", "'D'", "'yes'"]),
    "blank label": (bad_label(np.nan), ["row 3", "'D'", "blank"]),
    "blank file name": (lambda df: df.assign(**{"Left-Fundus": ["0_left.jpg", None, "2_left.jpg"]}),
                        ["row 3", "'Left-Fundus'"]),
    "ID not a number": (lambda df: df.assign(ID=["0", "one", "2"]), ["row 3", "'ID'", "'one'"]),
    "age not a number": (lambda df: df.assign(**{"Patient Age": [1, 2, "old"]}),
                         ["row 4", "'Patient Age'", "'old'"]),
}


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
@pytest.mark.parametrize("case", BAD_SHEETS)
def test_bad_sheet_is_named(tmp_path, case, suffix):
    edit, expected = BAD_SHEETS[case]
    good = small()
    sheet = f"odir_sheet{suffix}"
    touch_images(tmp_path / "imgs", good)
    write_sheet(edit(good), tmp_path / sheet)
    with pytest.raises(SheetError) as err:
        read_patients(tmp_path / sheet)
    for text in [sheet, *expected]:
        assert text in str(err.value), (text, str(err.value))


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
@pytest.mark.parametrize("column", ["O", "Left-Fundus"])
def test_kaggle_rows_that_disagree(tmp_path, suffix, column):
    rows = kaggle_sheet(small())
    rows[column] = rows[column].astype(object)
    rows.loc[3, column] = 0 if column == "O" else "elsewhere.jpg"  # second row of patient 1: row 5
    sheet = make_dataset(tmp_path, rows, sheet=f"full_df{suffix}", images="preprocessed_images")
    with pytest.raises(SheetError) as err:
        read_patients(tmp_path)
    message = str(err.value)
    assert sheet.name in message and "rows 4 and 5" in message and f"'{column}'" in message


def test_good_label_spellings(tmp_path):
    df = small().astype({"N": object, "D": float})
    df["N"] = ["0", "0", " 1 "]  # text cells, as typed in Excel with a leading apostrophe
    make_dataset(tmp_path, df)
    patients, _ = read_patients(tmp_path)
    np.testing.assert_array_equal(label_matrix(patients), small()[list(CLASSES)].to_numpy())


def test_wrong_images_folder(tmp_path):
    make_dataset(tmp_path, small(), images="Training Images", skip=set(small()["Left-Fundus"])
                 | set(small()["Right-Fundus"]))
    with pytest.raises(FileNotFoundError, match="none of the 6 images"):
        read_patients(tmp_path)


def test_images_in_a_subfolder_of_the_images_folder_get_a_hint(tmp_path):
    make_dataset(tmp_path, small(), images="Training Images", skip=set(small()["Left-Fundus"])
                 | set(small()["Right-Fundus"]))
    touch_images(tmp_path / "Training Images" / "batch1", small(), ())
    with pytest.raises(FileNotFoundError, match=r"none of the 6 images .*; they are in its subfolder 'batch1': move "
                                                r"them up, or name batch1/"):
        read_patients(tmp_path)


# ----------------------------------------------------------------------------- formats

def test_kaggle_labels_and_target_are_never_used(tmp_path):
    df = small()
    make_dataset(tmp_path, kaggle_sheet(df), sheet="full_df.csv", images="preprocessed_images")
    patients, missing = read_patients(tmp_path)
    np.testing.assert_array_equal(label_matrix(patients), df[list(CLASSES)].to_numpy())
    assert missing.empty


def test_missing_eyes_in_both_formats(tmp_path):
    df = original_sheet(np.eye(8, dtype=int)[[0, 1, 2, 3]])
    gone = {"1_left.jpg", "3_right.jpg"}
    make_dataset(tmp_path / "orig", df, skip=gone)
    # Kaggle: one dropped eye has no row, the other has a row but no file; both are missing
    make_dataset(tmp_path / "kaggle", kaggle_sheet(df, dropped={"1_left.jpg"}), sheet="full_df.csv",
                 images="preprocessed_images", skip=gone)
    for root in ("orig", "kaggle"):
        patients, missing = read_patients(tmp_path / root)
        assert patients["id"].tolist() == [0, 2]
        assert missing[["id", "eye", "reason"]].values.tolist() == [[1, "left", "missing file"],
                                                                    [3, "right", "missing file"]]
        assert missing["path"].map(lambda p: Path(p).name).tolist() == ["1_left.jpg", "3_right.jpg"]


def test_optional_columns_may_be_absent(tmp_path):
    df = small().drop(columns=["Patient Age", "Patient Sex", "Left-Diagnostic Keywords"])
    make_dataset(tmp_path, df, sheet="labels.csv", images="fundus")
    patients, _ = read_patients(tmp_path)
    assert patients["age"].isna().all() and (patients["sex"] == "").all()
    assert (patients["left_keywords"] == "").all()
    assert patients["right_keywords"].iloc[0] == "cataract，drusen"  # raw, full-width comma kept


def test_label_matrix_and_describe(tmp_path):
    make_dataset(tmp_path, small())
    patients, _ = read_patients(tmp_path)
    y = label_matrix(patients)
    assert y.shape == (3, 8) and y.dtype == np.int64
    text = describe(patients)
    assert text.startswith("3 patients") and "D diabetes" in text


# ----------------------------------------------------------------------------- layouts

def test_layout_original_at_any_depth(tmp_path):
    inner = tmp_path / "ODIR-5K" / "ODIR-5K"
    sheet = make_dataset(inner, small())
    (inner / "Testing Images").mkdir()
    expected = (sheet, inner / "Training Images")
    for folder in (inner, inner.parent, tmp_path):  # the folder, one and two levels above
        assert find_layout(folder) == expected


def test_layout_kaggle_root_prefers_full_df(tmp_path):
    make_dataset(tmp_path / "ODIR-5K" / "ODIR-5K", small())
    sheet = make_dataset(tmp_path, kaggle_sheet(small()), sheet="full_df.csv",
                         images="preprocessed_images")
    assert find_layout(tmp_path) == (sheet, tmp_path / "preprocessed_images")


def test_layout_kaggle_root_without_full_df_descends(tmp_path):
    inner = tmp_path / "ODIR-5K" / "ODIR-5K"
    sheet = make_dataset(inner, small())
    touch_images(tmp_path / "preprocessed_images", small())
    assert find_layout(tmp_path) == (sheet, inner / "Training Images")


@pytest.mark.parametrize("sheet_name", ["annotations.xlsx", "labels.csv"])
def test_layout_any_sheet_and_images_folder(tmp_path, sheet_name):
    sheet = make_dataset(tmp_path, small(), sheet=sheet_name, images="fundus photos")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # not an ODIR sheet: ignored
    (tmp_path / "empty").mkdir()  # holds none of the files: not the images folder
    assert find_layout(tmp_path) == (sheet, tmp_path / "fundus photos")
    assert len(read_patients(tmp_path)[0]) == 3


def test_layout_sheet_file_given(tmp_path):
    sheet = make_dataset(tmp_path, small(), sheet="my.csv", images="jpgs")
    assert find_layout(sheet) == (sheet, tmp_path / "jpgs")


def test_layout_several_sheets_is_ambiguous(tmp_path):
    make_dataset(tmp_path, small(), sheet="a.csv", images="imgs")
    write_sheet(small(), tmp_path / "b.xlsx")
    with pytest.raises(ValueError, match="several ODIR sheets"):
        find_layout(tmp_path)


def test_layout_not_found_says_what_was_looked_for(tmp_path):
    (tmp_path / "data.xlsx").touch()  # a sheet without its images folder is not a layout
    with pytest.raises(FileNotFoundError) as err:
        find_layout(tmp_path)
    for text in ("data.xlsx", "Training Images", "full_df.csv", "preprocessed_images", "ODIR-5K"):
        assert text in str(err.value)
    with pytest.raises(FileNotFoundError):
        find_layout(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- round trip

label_tables = st.integers(1, 12).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 1), min_size=8, max_size=8), min_size=n, max_size=n))


@settings(max_examples=15, deadline=None)
@given(labels=label_tables, fmt=st.sampled_from(["data.xlsx", "data.csv", "full_df.csv"]),
       ids=st.randoms(use_true_random=False))
def test_labels_round_trip(labels, fmt, ids):
    df = original_sheet(labels)
    df["ID"] = ids.sample(range(10_000), len(df))  # any distinct IDs, in any order
    df["Left-Fundus"] = [f"{i}_left.jpg" for i in df["ID"]]
    df["Right-Fundus"] = [f"{i}_right.jpg" for i in df["ID"]]
    sheet = kaggle_sheet(df) if fmt == "full_df.csv" else df
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), sheet, sheet=fmt, images="imgs")
        patients, missing = read_patients(Path(tmp) / fmt)
    expected = df.sort_values("ID")
    assert missing.empty
    assert patients["id"].tolist() == expected["ID"].tolist()
    np.testing.assert_array_equal(label_matrix(patients), expected[list(CLASSES)].to_numpy())
