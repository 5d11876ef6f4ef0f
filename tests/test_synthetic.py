"""Synthetic ODIR generator: layout, label logic, determinism, caching, signs visible at 128 px."""

import pathlib
import socket
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.synthetic import (COLUMNS, IMAGE_DIR, KEYWORD_SEP, KEYWORDS, MARKER_NAME, NORMAL_KEYWORD,
                                SHEET_NAME, ensure_synthetic_odir, make_synthetic_odir)

MIN_PX, MAX_PX = 160, 260  # small images keep the suite fast; the drawing is the same at any size
CLASS_OF_KEYWORD = {k: c for c, kws in KEYWORDS.items() for k in kws}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(root, sheet) of one 200-patient set shared by the read-only tests."""
    root = make_synthetic_odir(tmp_path_factory.mktemp("odir") / "set", n_patients=200, seed=3,
                               min_px=MIN_PX, max_px=MAX_PX, workers=2)
    return root, pd.read_excel(root / SHEET_NAME)


def eye_classes(keywords: str) -> set:
    """Classes named by one eye's keyword cell; {'N'} for a normal eye."""
    kws = keywords.split(KEYWORD_SEP)
    if kws == [NORMAL_KEYWORD]:
        return {"N"}
    assert NORMAL_KEYWORD not in kws, keywords
    return {CLASS_OF_KEYWORD[k] for k in kws}


def test_layout_and_columns(synth):
    root, sheet = synth
    assert list(sheet.columns) == list(COLUMNS)
    assert sheet["ID"].tolist() == list(range(200))
    assert set(sheet["Patient Sex"]) == {"Male", "Female"}
    assert sheet["Patient Age"].between(18, 92).all()
    assert set(np.unique(sheet[list(CLASSES)].to_numpy())) == {0, 1}
    assert (sheet["Left-Fundus"] == sheet["ID"].astype(str) + "_left.jpg").all()
    assert (sheet["Right-Fundus"] == sheet["ID"].astype(str) + "_right.jpg").all()
    files = sorted(p.name for p in (root / IMAGE_DIR).iterdir())
    assert files == sorted([*sheet["Left-Fundus"], *sheet["Right-Fundus"]])  # nothing missing, no .tmp left
    with Image.open(root / IMAGE_DIR / "0_left.jpg") as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")


def test_labels_follow_keywords(synth):
    _, sheet = synth
    for _, row in sheet.iterrows():
        left = eye_classes(row["Left-Diagnostic Keywords"])
        right = eye_classes(row["Right-Diagnostic Keywords"])
        assert row["N"] == int(left == right == {"N"}), row["ID"]
        for k in CLASSES[1:]:
            assert row[k] == int(k in left | right), (row["ID"], k)


def test_every_class_present_and_age_correlates(synth):
    _, sheet = synth
    counts = sheet[list(CLASSES)].sum()
    assert (counts >= 8).all(), counts.to_dict()  # targets: N 30%, D 25%, O 15%, others ~10% of 200
    old = sheet[(sheet["A"] == 1) | (sheet["C"] == 1)]["Patient Age"].mean()
    assert old > sheet[sheet["N"] == 1]["Patient Age"].mean() + 8


def test_sizes_in_range_with_black_border(synth):
    root, sheet = synth
    for name in [*sheet["Left-Fundus"], *sheet["Right-Fundus"]]:
        with Image.open(root / IMAGE_DIR / name) as im:
            w_px, h_px = im.size
            assert MIN_PX <= w_px <= MAX_PX, name
            assert min(abs(w_px / h_px - a) for a in (1.0, 4 / 3, 3 / 2)) < 0.02, name
    with Image.open(root / IMAGE_DIR / "0_left.jpg") as im:
        corners = np.asarray(im)[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.max() < 20  # the fundus is a circle on black


def test_deterministic_whatever_the_workers(tmp_path):
    one = make_synthetic_odir(tmp_path / "a", n_patients=4, seed=7, min_px=MIN_PX, max_px=MAX_PX, workers=1)
    two = make_synthetic_odir(tmp_path / "b", n_patients=4, seed=7, min_px=MIN_PX, max_px=MAX_PX, workers=2)
    other = make_synthetic_odir(tmp_path / "c", n_patients=4, seed=8, min_px=MIN_PX, max_px=MAX_PX, workers=1)
    names = [SHEET_NAME, *(f"{IMAGE_DIR}/{i}_{s}.jpg" for i in range(4) for s in ("left", "right"))]
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (one / IMAGE_DIR / "0_left.jpg").read_bytes() != (other / IMAGE_DIR / "0_left.jpg").read_bytes()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_px"):
        make_synthetic_odir(tmp_path, n_patients=2, min_px=300, max_px=200)
    with pytest.raises(ValueError, match="n_patients"):
        make_synthetic_odir(tmp_path, n_patients=0)


def _mtimes(folder: pathlib.Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_ensure_reuses_the_cache(tmp_path):
    args = dict(n_patients=3, seed=1, min_px=MIN_PX, max_px=MAX_PX)
    first = ensure_synthetic_odir(tmp_path, **args)
    assert (first / MARKER_NAME).is_file() and (first / SHEET_NAME).is_file()
    before = _mtimes(first)
    assert ensure_synthetic_odir(tmp_path, **args) == first
    assert _mtimes(first) == before  # nothing rewritten
    assert ensure_synthetic_odir(tmp_path, **{**args, "seed": 2}) != first  # parameters name the folder
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_ensure_redoes_a_set_without_marker(tmp_path):
    args = dict(n_patients=3, seed=1, min_px=MIN_PX, max_px=MAX_PX)
    first = ensure_synthetic_odir(tmp_path, **args)
    sheet = (first / SHEET_NAME).read_bytes()
    (first / MARKER_NAME).unlink()  # as if generation had been interrupted before the end
    (first / "stale.txt").write_text("left by an interrupted run")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    orphan = first.with_name(f"{first.name}.tmp-{socket.gethostname()}-{dead.pid}")
    orphan.mkdir()  # the temporary folder of a killed run
    again = ensure_synthetic_odir(tmp_path, **args)
    assert again == first and (again / MARKER_NAME).is_file()
    assert not (again / "stale.txt").exists()  # regenerated from scratch, not patched
    assert (again / SHEET_NAME).read_bytes() == sheet
    assert not orphan.exists()


# --- learnability: each sign moves a simple statistic of the 128 px crop that a CNN would see ---------
def _crop_128(path: pathlib.Path) -> np.ndarray:
    """The fundus cut out of its black border and resized to 128 x 128, float RGB 0..1."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        ys, xs = np.nonzero(np.asarray(im).astype(int).sum(2) > 30)
        im = im.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)).resize((128, 128), Image.BILINEAR)
    return np.asarray(im, np.float32) / 255


def _laplacian_energy(img: np.ndarray) -> float:
    """Mean |Laplacian| of the luminance over the central 64 x 64 (always inside the fundus)."""
    lum = img[32:96, 32:96].mean(2)
    lap = 4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:]
    return float(np.abs(lap).mean())


def _whitish_fraction(img: np.ndarray) -> float:
    """Fraction of bright, white-ish pixels (blue high relative to red): the optic cup."""
    r, b = img[..., 0], img[..., 2]
    return float(((b > 0.6 * r) & (r > 0.5)).mean())


def _yellow_fraction(img: np.ndarray) -> float:
    """Fraction of bright yellow pixels (green close to red, blue low): drusen and exudates."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return float(((g > 0.72 * r) & (b < 0.75 * g) & (r > 0.5)).mean())


def test_signs_are_visible_at_128px(synth):
    root, sheet = synth
    stats = {c: [] for c in ("N", "C", "G", "A")}
    for _, row in sheet.iterrows():
        for side in ("Left", "Right"):
            cls = eye_classes(row[f"{side}-Diagnostic Keywords"])
            if len(cls) == 1 and (c := next(iter(cls))) in stats:  # eyes showing one class only
                img = _crop_128(root / IMAGE_DIR / row[f"{side}-Fundus"])
                stats[c].append((_laplacian_energy(img), _whitish_fraction(img), _yellow_fraction(img)))
    med = {c: np.median(np.array(v), axis=0) for c, v in stats.items() if len(v) >= 3}
    assert set(med) == set(stats), {c: len(v) for c, v in stats.items()}
    assert med["C"][0] < 0.4 * med["N"][0]  # cataract: blurred, little high-frequency energy
    assert med["G"][1] > 4 * med["N"][1]  # glaucoma: a large white cup
    assert med["A"][2] > 4 * med["N"][2]  # AMD: yellow drusen round the macula
