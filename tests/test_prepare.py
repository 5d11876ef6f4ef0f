"""pipeline.prepare: crop + resize + re-encode, the cache's idempotency, every bad input, tables, the CLI."""
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFile

import odir_dual.pipeline.prepare as P
from odir_dual.pipeline.prepare import (BadImage, cache_path, crop_fundus, fundus_box, prepare_image, prepare_paths,
                              prepare_table)

ORANGE = (215, 105, 40)


# ----------------------------------------------------------------------------- helpers

def fundus(w=400, h=300, r=None, cx=None, cy=None, color=ORANGE, noise=8.0, seed=0) -> Image.Image:
    """An orange disc with a little texture on a black frame (the disc is centred unless told)."""
    rng = np.random.default_rng(seed)
    r = r or int(0.47 * h)
    cx, cy = cx if cx is not None else w / 2, cy if cy is not None else h / 2
    yy, xx = np.ogrid[:h, :w]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2  # (H, W)
    img = np.asarray(color, np.float32) + rng.normal(0, noise, (h, w, 1)).astype(np.float32)
    img = np.clip(img, 0, 255) * inside[..., None]
    return Image.fromarray(img.astype(np.uint8))


def save(img: Image.Image, path: Path, fmt="JPEG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}) | kw)
    return path


def truncated_jpeg(path: Path, keep=0.6) -> Path:
    buf = io.BytesIO()
    fundus(noise=30).save(buf, "JPEG", quality=95)  # noisy: many scan bytes, so the cut lands in image data
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def black_fraction(img: Image.Image) -> float:
    a = np.asarray(img.convert("RGB"))
    return float((a.max(axis=2) <= 20).mean())


def bad_and_good_inputs(d: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (path, expected reason or None for 'prepares fine'), covering every kind of input."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("ID,left,right\n1,a.jpg,b.jpg\n")
    return {
        "good": (save(fundus(), d / "good.jpg"), None),
        "missing": (d / "missing.jpg", "missing file"),
        "empty": (d / "empty.jpg", "empty file"),
        "truncated": (truncated_jpeg(d / "truncated.jpg"), "truncated JPEG"),
        "text": (d / "text.jpg", "not an image"),
        "black": (save(Image.new("RGB", (400, 300)), d / "black.jpg"), "no fundus found (image is black)"),
        "png_named_jpg": (save(fundus(seed=1), d / "png.jpg", "PNG"), None),
        "gray": (save(fundus(seed=2).convert("L"), d / "gray.jpg"), None),
        "cmyk": (save(fundus(seed=3).convert("CMYK"), d / "cmyk.jpg"), None),
        "good_last": (save(fundus(seed=4), d / "good_last.jpg"), None),
    }


# ----------------------------------------------------------------------------- one image

def test_fundus_is_cropped_resized_and_reencoded(tmp_path):
    src = save(fundus(), tmp_path / "eye.jpg")  # disc 282 px across in a 400x300 frame: ~49% black
    dst = tmp_path / "out" / "eye.jpg"
    prepare_image(src, dst, 128)
    out = Image.open(dst)
    assert out.format == "JPEG" and out.mode == "RGB" and not out.info.get("progressive")
    assert min(out.size) == 128 and out.size == (128, 128)
    # a disc inscribed in its box leaves 1 - pi/4 = 21.5% black corners; the uncropped frame was ~49% black
    assert black_fraction(Image.open(src)) > 0.45
    assert black_fraction(out) < 0.25
    a = np.asarray(out, np.float32)
    assert np.abs(a[54:74, 54:74].mean(axis=(0, 1)) - ORANGE).max() < 12  # the centre is the fundus, unchanged


def test_short_side_is_short_px_for_wide_and_tall_fundi(tmp_path):
    wide = Image.new("RGB", (500, 300))
    ImageDraw.Draw(wide).ellipse([20, 40, 480, 260], fill=ORANGE)  # box 461x221: wider than tall
    prepare_image(save(wide, tmp_path / "wide.jpg"), tmp_path / "w.jpg", 100)
    w, h = Image.open(tmp_path / "w.jpg").size
    assert h == 100 and abs(w - round(461 * 100 / 221)) <= 2
    prepare_image(save(wide.transpose(Image.Transpose.ROTATE_90), tmp_path / "tall.jpg"), tmp_path / "t.jpg", 100)
    assert Image.open(tmp_path / "t.jpg").size == (h, w)


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (500, 300))
    ImageDraw.Draw(wide).ellipse([20, 40, 480, 260], fill=ORANGE)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    prepare_image(save(wide, tmp_path / "rot.jpg", exif=exif), tmp_path / "out.jpg", 100)
    w, h = Image.open(tmp_path / "out.jpg").size
    assert w == 100 and h > 200  # displayed upright: tall


def test_image_without_dark_border_is_returned_whole():
    img = fundus(w=200, h=150, r=400)  # the disc covers the whole frame
    assert fundus_box(img) == (0, 0, 200, 150)
    assert crop_fundus(img).size == (200, 150)


def test_noise_and_text_label_in_the_border_are_ignored():
    img = fundus(w=400, h=300, r=120)  # disc box (80, 30, 320, 270)
    draw = ImageDraw.Draw(img)
    draw.rectangle([5, 270, 70, 290], fill=(255, 255, 255))  # a white label in the bottom-left corner
    draw.text((330, 5), "OD 2019-04-01", fill=(255, 255, 255))  # text in the top-right corner
    a = np.asarray(img).copy()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 300, 300), rng.integers(0, 400, 300)
    a[ys, xs] = 255  # salt noise everywhere
    box = fundus_box(Image.fromarray(a))
    assert all(abs(b - e) <= 3 for b, e in zip(box, (80, 30, 320, 270))), box


def test_dark_side_of_the_fundus_is_kept():
    """Under-exposed halves stay below the threshold; the box must still hold the whole (centred) disc."""
    img = fundus(w=400, h=300, r=140)
    a = np.asarray(img).copy()
    a[:, :200] = (a[:, :200] * 0.05).astype(np.uint8)  # left half: channel max ~11, below the threshold of 20
    l, t, r, b = fundus_box(Image.fromarray(a))
    assert l <= 62 and r >= 338 and t <= 12 and b >= 288, (l, t, r, b)
    assert fundus_box(Image.fromarray(a), symmetric=False)[0] >= 195  # the plain box would cut that half off


@settings(max_examples=25, deadline=None)
@given(w=st.integers(120, 260), h=st.integers(120, 260), frac=st.floats(0.3, 0.5),
       dx=st.floats(-0.15, 0.15), dy=st.floats(-0.15, 0.15))
def test_box_always_holds_the_disc(w, h, frac, dx, dy):
    r = frac * min(w, h)
    cx, cy = w / 2 + dx * w, h / 2 + dy * h
    img = fundus(w=w, h=h, r=r, cx=cx, cy=cy, noise=0)
    l, t, rr, b = fundus_box(img)
    # Never cuts into the disc beyond its extreme sliver: a line counts once its chord is >= 10% of the widest,
    # i.e. from depth (0.1 * 2r / 2)^2 / 2r = 0.0025 * 2r in (plus 1 px of pixel-grid rounding).
    slack = 0.005 * r + 1.5
    assert l <= max(0, cx - r) + slack and t <= max(0, cy - r) + slack
    assert rr >= min(w, cx + r) - slack and b >= min(h, cy + r) - slack
    assert 0 <= l < rr <= w and 0 <= t < b <= h


def test_black_image_and_lone_label_are_rejected():
    with pytest.raises(BadImage, match=r"^no fundus found \(image is black\)$"):
        fundus_box(Image.new("RGB", (300, 200), (12, 12, 12)))
    label_only = Image.new("RGB", (400, 300))
    ImageDraw.Draw(label_only).rectangle([10, 10, 150, 20], fill=(255, 255, 255))
    with pytest.raises(BadImage, match="no fundus found"):
        fundus_box(label_only)


@pytest.mark.parametrize("w, h, short_px, k", [(2592, 1944, 384, 4), (2592, 1944, 512, 2), (2592, 1944, 243, 8),
                                               (2592, 1944, 244, 4), (1944, 2592, 972, 2), (300, 200, 384, 1)])
def test_draft_scale_leaves_the_short_side_at_least_short_px(w, h, short_px, k):
    assert P._draft_scale(w, h, short_px) == k


def _spy_decodes(monkeypatch) -> list:
    calls = []
    real = P._decode

    def spy(src, short_px, max_k):
        img, k = real(src, short_px, max_k)
        calls.append((k, img.size))
        return img, k

    monkeypatch.setattr(P, "_decode", spy)
    return calls


def test_draft_decode_matches_full_decode(tmp_path, monkeypatch):
    src = save(fundus(w=1600, h=1200, noise=4), tmp_path / "big.jpg")
    calls = _spy_decodes(monkeypatch)
    prepare_image(src, tmp_path / "draft.jpg", 128)
    assert calls == [(8, (200, 150))]  # 1200 // 8 = 150 >= 128, fundus ~1128 px tall -> 141 >= 128: one decode
    full = Image.open(src).convert("RGB")
    draft_box = [8 * v for v in fundus_box(P._decode(src, 128, 8)[0])]
    assert np.abs(np.subtract(draft_box, fundus_box(full))).max() <= 8  # the box is found to 1 decoded pixel
    # same box, so this measures DCT-scaled decoding + LANCZOS against full decoding + LANCZOS
    ref = full.resize((128, 128), Image.Resampling.LANCZOS, box=draft_box)
    out = np.asarray(Image.open(tmp_path / "draft.jpg"), np.float32)
    psnr = 10 * np.log10(255 ** 2 / np.mean((out - np.asarray(ref, np.float32)) ** 2))
    assert psnr > 30, psnr


def test_small_fundus_in_a_big_frame_is_decoded_again_finer(tmp_path, monkeypatch):
    """A fundus spanning 40% of the frame height: 1/8 scale leaves it too small, so decode at 1/2 (never upscale)."""
    src = save(fundus(w=1600, h=1200, r=240, noise=4), tmp_path / "small.jpg")  # 480 px across
    calls = _spy_decodes(monkeypatch)
    prepare_image(src, tmp_path / "out.jpg", 128)
    assert [k for k, _ in calls] == [8, 2]  # 480 / 8 = 60 < 128; 480 / 4 = 120 < 128; 480 / 2 = 240 >= 128
    assert min(Image.open(tmp_path / "out.jpg").size) == 128


def test_grayscale_cmyk_and_png_named_jpg_become_rgb(tmp_path):
    for name, img, fmt in [("gray.jpg", fundus().convert("L"), "JPEG"), ("cmyk.jpg", fundus().convert("CMYK"), "JPEG"),
                           ("png.jpg", fundus(), "PNG"), ("rgba.png", fundus().convert("RGBA"), "PNG")]:
        dst = tmp_path / "out" / name
        prepare_image(save(img, tmp_path / name, fmt), dst, 96)
        out = Image.open(dst)
        assert out.format == "JPEG" and out.mode == "RGB" and min(out.size) == 96, name
    centre = np.asarray(Image.open(tmp_path / "out" / "cmyk.jpg"), np.float32)[38:58, 38:58].mean(axis=(0, 1))
    assert np.abs(centre - ORANGE).max() < 12, centre  # Adobe-inverted CMYK comes back orange, not blue


def test_sixteen_bit_png(tmp_path):
    a = (np.asarray(fundus().convert("L"), np.uint16) * 257)  # 16-bit grey
    src = tmp_path / "deep.png"
    Image.fromarray(a).save(src)
    prepare_image(src, tmp_path / "deep.jpg", 64)
    assert np.asarray(Image.open(tmp_path / "deep.jpg"))[32, 32].max() > 100


def test_truncated_jpeg_fails_even_if_the_caller_allows_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImage, match=r"^truncated JPEG$"):
        prepare_image(truncated_jpeg(tmp_path / "t.jpg"), tmp_path / "out.jpg", 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    assert not (tmp_path / "out.jpg").exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    src, dst = save(fundus(), tmp_path / "eye.jpg"), tmp_path / "out" / "eye.jpg"
    real_fsync = os.fsync

    def full_disk(fd):  # the JPEG's bytes went into the temporary file; the disk fills before they reach it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):  # a cache-side failure is not a BadImage
        prepare_image(src, dst, 64)
    assert list((tmp_path / "out").iterdir()) == []  # neither a partial dst nor a *.tmp
    monkeypatch.setattr(os, "fsync", real_fsync)
    prepare_image(src, dst, 64)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["eye.jpg"]


# ----------------------------------------------------------------------------- many images

def test_cache_side_failure_stops_the_run_and_names_the_file(tmp_path, monkeypatch):
    src = save(fundus(), tmp_path / "eye.jpg")

    def full_disk(fd):  # writing the prepared copy: the image itself was fine (encoded in memory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RuntimeError, match=r"preparing .*eye\.jpg .*No space left"):
        prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False)


def test_cache_names_are_stable_and_do_not_collide(tmp_path):
    a = save(fundus(seed=1), tmp_path / "site_a" / "1_left.jpg")
    b = save(fundus(seed=2), tmp_path / "site_b" / "1_left.jpg")
    ca, cb = cache_path(a, tmp_path / "c", 64), cache_path(b, tmp_path / "c", 64)
    assert ca != cb and len(ca.name) == len("0" * 32 + ".jpg") and ca.parent == tmp_path / "c" / "64px"
    assert cache_path(a, tmp_path / "c", 64) == ca  # stable
    assert cache_path(os.path.relpath(a), tmp_path / "c", 64) == ca  # relative or absolute: same source
    assert cache_path(a, tmp_path / "c", 96) != ca  # short_px is part of the layout
    out, reasons = prepare_paths([a, b], tmp_path / "c", 64, workers=1, progress=False)
    assert reasons == [None, None] and out == [str(ca), str(cb)]
    assert not np.array_equal(np.asarray(Image.open(ca)), np.asarray(Image.open(cb)))


def test_second_run_skips_and_touching_the_source_redoes(tmp_path):
    src = save(fundus(), tmp_path / "eye.jpg")
    stats = {}
    (dst,), _ = prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert stats["prepared"] == 1 and stats["up_to_date"] == 0
    mtime = os.stat(dst).st_mtime_ns
    (dst2,), _ = prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert dst2 == dst and os.stat(dst).st_mtime_ns == mtime
    assert stats["prepared"] == 0 and stats["up_to_date"] == 1
    later = os.stat(src).st_mtime_ns + 10 * 10**9
    os.utime(src, ns=(later, later))  # touch the source, 10 s later
    prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert stats["prepared"] == 1 and os.stat(dst).st_mtime_ns != mtime


def test_a_run_killed_half_way_keeps_what_it_prepared(tmp_path):
    """Each entry records the settings it was made with: a kill before the run's end (when the folder's SETTINGS
    file used to be written) no longer makes the next run prepare everything again."""
    a, b = save(fundus(), tmp_path / "a.jpg"), save(fundus(seed=1), tmp_path / "b.jpg")
    prepare_paths([a], tmp_path / "c", 64, workers=1, progress=False)
    (tmp_path / "c" / "64px" / "SETTINGS").unlink()  # as a kill during the first run left it
    stats = {}
    prepare_paths([a, b], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert stats["up_to_date"] == 1 and stats["prepared"] == 1


def test_changed_settings_make_every_entry_stale(tmp_path, monkeypatch):
    src = save(fundus(), tmp_path / "eye.jpg")
    stats = {}
    prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False)
    assert "jpeg_quality = 95" in (tmp_path / "c" / "64px" / "SETTINGS").read_text()
    monkeypatch.setattr(P, "JPEG_QUALITY", 80)
    prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert stats["prepared"] == 1 and "jpeg_quality = 80" in (tmp_path / "c" / "64px" / "SETTINGS").read_text()
    prepare_paths([src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert stats["up_to_date"] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_input_gets_its_reason_and_stops_nothing(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(P, "MIN_POOL_IMAGES", 0)  # workers=2: really use the process pool for these few images
    cases = bad_and_good_inputs(tmp_path / "in")
    paths = [str(p) for p, _ in cases.values()] + [None]
    out, reasons = prepare_paths(paths, tmp_path / "c", 64, workers=workers, progress=False)
    for (name, (_, expected)), o, r in zip(cases.items(), out, reasons):
        assert r == expected, name
        assert (o is None) == (expected is not None), name
        if o is not None:
            im = Image.open(o)
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == 64, name
    assert out[-1] is None and reasons[-1] == "no path given"
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_duplicate_paths_are_prepared_once(tmp_path):
    src = save(fundus(), tmp_path / "eye.jpg")
    stats = {}
    out, reasons = prepare_paths([src, str(src), src], tmp_path / "c", 64, workers=1, progress=False, stats=stats)
    assert len(set(out)) == 1 and reasons == [None] * 3 and stats["images"] == stats["prepared"] == 1


def test_table_leaves_out_patients_with_a_bad_eye(tmp_path):
    d = tmp_path / "in"
    good = [save(fundus(seed=i), d / f"{i}.jpg") for i in range(4)]
    patients = pd.DataFrame({
        "id": [10, 11, 12],
        "left": [str(good[0]), str(good[2]), str(d / "gone.jpg")],
        "right": [str(good[1]), str(truncated_jpeg(d / "cut.jpg")), str(good[3])],
        "N": [1, 0, 0],
    })
    prepared, problems = prepare_table(patients, tmp_path / "c", 64, workers=1, progress=False)
    assert list(prepared.columns) == list(patients.columns)
    assert prepared["id"].tolist() == [10] and prepared["N"].tolist() == [1]
    assert prepared.index.tolist() == [0]
    for eye, src in (("left", good[0]), ("right", good[1])):
        assert prepared.loc[0, eye] == str(cache_path(src, tmp_path / "c", 64))
        assert Path(prepared.loc[0, eye]).is_file()
    assert list(problems.columns) == ["id", "eye", "path", "reason"]
    assert sorted(problems.itertuples(index=False, name=None)) == [
        (11, "right", str(d / "cut.jpg"), "truncated JPEG"),
        (12, "left", str(d / "gone.jpg"), "missing file"),
    ]


def test_table_with_no_problems_has_an_empty_problem_frame(tmp_path):
    d = tmp_path / "in"
    patients = pd.DataFrame({"id": [1], "left": [str(save(fundus(), d / "l.jpg"))],
                             "right": [str(save(fundus(seed=5), d / "r.jpg"))]})
    prepared, problems = prepare_table(patients, tmp_path / "c", 64, workers=1, progress=False)
    assert len(prepared) == 1 and len(problems) == 0 and list(problems.columns) == ["id", "eye", "path", "reason"]


def test_real_odir_images_prepare(odir256, tmp_path):
    srcs = sorted((odir256 / "Training Images").glob("*.jpg"))[:16]
    out, reasons = prepare_paths(srcs, tmp_path / "c", 128, workers=1, progress=False)
    assert reasons == [None] * len(srcs)
    assert all(min(Image.open(o).size) == 128 for o in out)


# ----------------------------------------------------------------------------- command line

def test_cli_prints_a_summary_and_writes_the_problems(tmp_path, monkeypatch, capsys):
    d = tmp_path / "data"
    patients = pd.DataFrame({"id": [1, 2], "left": [str(save(fundus(), d / "1_l.jpg")), str(d / "2_l.jpg")],
                             "right": [str(save(fundus(seed=1), d / "1_r.jpg")),
                                       str(save(fundus(seed=2), d / "2_r.jpg"))]})
    missing = pd.DataFrame({"id": [3], "eye": ["right"], "path": [str(d / "3_r.jpg")], "reason": ["missing file"]})
    monkeypatch.setattr("odir_dual.pipeline.odir.read_patients", lambda data_dir: (patients, missing))
    argv = ["--data", str(d), "--cache", str(tmp_path / "c"), "--short-px", "64", "--workers", "1", "--no-progress"]
    assert P.main(argv) == 0
    text = capsys.readouterr().out
    assert "prepared 3" in text and "failed 1" in text and "patients ready: 1 of 2" in text
    assert "missing file" in text
    report = pd.read_csv(tmp_path / "c" / "64px" / "problems.csv")
    assert sorted(report["id"]) == [2, 3]
    assert P.main(argv) == 0  # second run: everything up to date
    text = capsys.readouterr().out
    assert "prepared 0" in text and "up to date 3" in text
