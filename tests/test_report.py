"""Heatmaps (model/explain.py), the synthetic set's drawn regions, and the HTML reports (report.py, score.py --report).

The reports are read back with the standard library's HTMLParser: every image they reference must exist, and their
tables must hold the figures of report.json / the predictions CSV.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from odir_dual.model import factory
from odir_dual.training import checkpoint
from odir_dual.training import config
from odir_dual.deploy import report
from odir_dual import score
from odir_dual.deploy import predictions
from odir_dual.model import multilabel_metrics, odir_score
from odir_dual.model.metrics import bootstrap_intervals, class_rates, format_interval
from odir_dual.model.explain import cam_peak, explain_pair, grad_cam
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.synthetic import KEYWORD_SEP, KEYWORDS, make_synthetic_odir, read_regions
from odir_dual.training.runlog import RunLog
from test_export import MEAN, STD, THRESHOLDS, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)

CLASS_OF_KEYWORD = {k: c for c, kws in KEYWORDS.items() for k in kws}
LOCALISED = ("D", "G", "A", "O")
# The pointing game after the demo-sized run of test_heatmaps_point_at_the_drawn_signs, measured on a 2-core CPU:
# 89 held-out eyes, the peak inside the region (widened by a quarter of a 32-px Grad-CAM cell, 8 px at 128 px) for
# 0.66 of them (A 1.00, D 0.84, O 0.53, G 0.12), against 0.29 for a random point of the fundus.
TOLERANCE_CELLS = 0.25
HIT_RATE_MIN = 0.55
MARGIN_OVER_RANDOM = 0.2


class Page(HTMLParser):
    """An HTML page as data: image sources, tables by id (rows of cell texts), rows by id, every tag seen."""

    def __init__(self, path: Path):
        super().__init__()
        self.images, self.tables, self.rows, self.tags = [], {}, {}, set()
        self._table = self._row = self._cell = None
        self.feed(path.read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
            if "id" in attrs:
                self.rows[attrs["id"]] = self._row
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def f3(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


# ----------------------------------------------------------------------------------------------- regions


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 24-patient synthetic ODIR set (small images) with its regions.csv."""
    return make_synthetic_odir(tmp_path_factory.mktemp("odir") / "set", n_patients=24, seed=2, min_px=96,
                               max_px=140, workers=1)


def test_regions_name_every_localised_sign_and_nothing_else(synth):
    sheet, regions = pd.read_excel(synth / "data.xlsx"), read_regions(synth)
    drawn = {(r.id, r.eye, r["class"]) for _, r in regions.iterrows()}
    expected = set()
    for _, row in sheet.iterrows():
        for eye, col in (("left", "Left-Diagnostic Keywords"), ("right", "Right-Diagnostic Keywords")):
            for kw in row[col].split(KEYWORD_SEP):
                if CLASS_OF_KEYWORD.get(kw) in LOCALISED:
                    expected.add((row["ID"], eye, CLASS_OF_KEYWORD[kw]))
    assert expected and drawn == expected
    assert (regions["r_px"] > 0).all()
    for _, r in regions.iterrows():  # centres inside the written image
        w = h = 140  # max_px: frames are at most this wide, and no taller than wide
        assert -1 <= r.x_px <= w and -1 <= r.y_px <= h, r


def test_regions_mark_where_the_sign_was_drawn(synth):
    """An A region (drusen, pale yellow) is brighter than the same spot of a normal eye of the same set."""
    from PIL import Image

    regions, sheet = read_regions(synth), pd.read_excel(synth / "data.xlsx")
    a = regions[(regions["class"] == "A")]
    if a.empty:
        pytest.skip("no AMD eye in this small set")
    r = a.iloc[0]
    with Image.open(synth / "Training Images" / f"{r.id}_{r.eye}.jpg") as im:
        g = np.asarray(im.convert("L"), np.float32)
    yy, xx = np.mgrid[:g.shape[0], :g.shape[1]]
    inside = (xx - r.x_px) ** 2 + (yy - r.y_px) ** 2 <= r.r_px ** 2
    ring = ((xx - r.x_px) ** 2 + (yy - r.y_px) ** 2 <= (2 * r.r_px) ** 2) & ~inside & (g > 20)
    assert g[inside].mean() > g[ring].mean()  # drusen are paler than the fundus round them
    assert int(sheet.loc[sheet["ID"] == r.id, "A"].iloc[0]) == 1


def test_read_regions_names_a_set_without_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="regions"):
        read_regions(tmp_path)


# ----------------------------------------------------------------------------------------------- explain


def tiny_model(seed=0, backbone="test_resnet"):
    torch.manual_seed(seed)
    cfg = config.resolve_config({"backbone": backbone, "pretrained": False, "img_px": 64, "embed_dim": 32})
    return factory.build_model(cfg).eval()


def test_grad_cam_is_the_gradient_weighted_activation():
    feats = torch.zeros(1, 2, 4, 4)
    feats[0, 0, 1, 2] = 3.0  # channel 0 fires at (row 1, col 2); channel 1 at (3, 0)
    feats[0, 1, 3, 0] = 5.0
    grads = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), -1.0)])[None]  # ch 0 helps, ch 1 hurts
    cam = grad_cam(feats, grads)
    assert cam.shape == (1, 4, 4) and float(cam.max()) == 1.0
    assert cam_peak(cam[0]) == (2.5, 1.5)
    assert float(cam[0, 3, 0]) == 0.0  # ReLU: a location that lowers the score is not shown
    nhwc = grad_cam(feats.permute(0, 2, 3, 1), grads.permute(0, 2, 3, 1), nhwc=True, size_hw=(16, 16))
    x, y = cam_peak(nhwc[0])
    assert nhwc.shape == (1, 16, 16) and 8 < x < 12 and 4 < y < 8  # the same cell, 4x upsampled


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext"])
def test_explain_pair_maps_per_eye_and_class(backbone):
    model = tiny_model(backbone=backbone)
    left, right = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ex = explain_pair(model, left, right, classes=[1, 4])
    assert set(ex.cams) == {1, 4} and ex.grid_hw == (2, 2)
    for maps in (*ex.cams[1], *ex.cams[4], *ex.attention.values()):
        assert maps.shape == (3, 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.allclose(ex.probs, torch.sigmoid(model(left, right)), atol=1e-6)
    # A pair's maps do not depend on the other pairs of the batch (eval mode, one backward for all).
    alone = explain_pair(model, left[1:2], right[1:2], classes=[1])
    assert torch.allclose(alone.cams[1][0][0], ex.cams[1][0][1], atol=1e-5)
    assert torch.allclose(alone.attention["left_to_right"][0], ex.attention["left_to_right"][1], atol=1e-5)


def test_an_ensemble_is_explained_by_its_members_mean_maps():
    from odir_dual.model.net import DualEyeEnsemble

    members = [tiny_model(), tiny_model(seed=1)]
    left, right = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    ex = explain_pair(DualEyeEnsemble(members).eval(), left, right, classes=[2])
    parts = [explain_pair(m, left, right, classes=[2]) for m in members]
    assert torch.allclose(ex.probs, torch.sigmoid((parts[0].logits + parts[1].logits) / 2), atol=1e-6)
    for eye in (0, 1):
        mean = (parts[0].cams[2][eye] + parts[1].cams[2][eye]) / 2
        peak = mean.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # a map with no positive cell stays 0
        assert torch.allclose(ex.cams[2][eye], mean / peak, atol=1e-5)
    assert any(float(ex.cams[2][eye].max()) == 1.0 for eye in (0, 1))
    assert ex.attention["left_to_right"].shape == (2, 64, 64)


def test_explain_pair_needs_eval_mode():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="eval"):
        explain_pair(model, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), classes=[0])


class _Pooler(torch.nn.Module):
    """A stand-in network whose last stage is average pooling of the input (16-px cells) and whose class 0 is the
    sum of the left eye's red channel there: Grad-CAM must point at the left eye's brightest cell."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.stage = torch.nn.AvgPool2d(16)
        self.backbone.feature_info = [{"module": "stage"}]

    def forward(self, left, right):
        feats = self.backbone.stage(torch.cat([left, right]))  # (2B, 3, H/16, W/16)
        score = feats[: len(left), 0].sum(dim=(1, 2))  # (B,)
        return torch.stack([score, -score], dim=1)  # (B, 2)


def test_grad_cam_points_at_the_cue():
    left, right = torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64)
    left[0, :, 32:48, 16:32] = 1.0  # a bright square filling cell (row 2, col 1) of the first pair's left eye
    left[1, :, 0:16, 48:64] = 1.0  # cell (0, 3), top right, for the second pair
    ex = explain_pair(_Pooler().eval(), left, right, classes=[0, 1], attention=False)
    x, y = cam_peak(ex.cams[0][0][0])
    assert 16 <= x <= 32 and 32 <= y <= 48
    assert cam_peak(ex.cams[0][0][1])[0] >= 48 and cam_peak(ex.cams[0][0][1])[1] <= 16
    assert float(ex.cams[0][1].max()) == 0.0  # the right eye does not move class 0: an empty map
    assert float(ex.cams[1][0].max()) == 0.0  # class 1 falls with brightness: ReLU leaves nothing to show


# ----------------------------------------------------------------------------------------------- run report


def _write_predictions(path: Path, ids, y, p) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *CLASSES, *(f"p_{c}" for c in CLASSES)])
        for i, pid in enumerate(ids):
            w.writerow([pid, *y[i], *(f"{v:.6f}" for v in p[i])])


def _split_figures(y, p, thresholds, y_train) -> dict:
    """A split of report.json as train.final_report writes it."""
    trivial = np.broadcast_to(y_train.mean(0), y.shape).copy()
    return {"patients": len(y), "at_0.5": multilabel_metrics(y, p), "tuned": multilabel_metrics(y, p, thresholds),
            "odir": odir_score(y, p), "trivial": {"at_0.5": multilabel_metrics(y, trivial), "odir": odir_score(y, trivial)},
            "calibration_error": {"ece_before": 0.12, "ece_after": 0.05, "brier_before": 0.2, "brier_after": 0.15},
            "per_class": class_rates(y, p, thresholds),
            "ci95": bootstrap_intervals(y, p, thresholds, baseline=trivial, resamples=200, seed=42)}


@pytest.fixture
def fake_run(tmp_path, synth):
    """A run folder in the shape train.py leaves (report.json, predictions_{val,test}.csv, config.json,
    metrics.csv, curves.png, best.pt of a tiny random model) over the synthetic set."""
    run = tmp_path / "run"
    cfg = config.resolve_config({"backbone": "test_resnet", "pretrained": False, "img_px": 64, "embed_dim": 32,
                                 "data": str(synth), "cache_dir": str(tmp_path / "cache"), "preset": "demo"})
    torch.manual_seed(0)
    model = factory.build_model(cfg)
    run.mkdir()
    checkpoint.save_checkpoint(checkpoint.checkpoint_payload(
        model, cfg, thresholds=THRESHOLDS, mean=MEAN, std=STD, epoch=2, step=4, best={"f1_macro": 0.3, "epoch": 2}),
        run / "best.pt")
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    log = RunLog(run, select_metric="f1_macro")
    for epoch in (1, 2):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch, "train_f1_macro": 0.2 * epoch,
                    "val_f1_macro": 0.2 * epoch, "val_f1_micro": 0.3 * epoch, "val_odir": 0.25 * epoch,
                    "train_patient_loss": 0.9 / epoch})
    sheet = pd.read_excel(synth / "data.xlsx")
    y_all = sheet[list(CLASSES)].to_numpy()
    p_all = np.random.default_rng(0).uniform(0, 1, y_all.shape) * 0.6 + 0.4 * y_all  # better than chance
    ids = sheet["ID"].astype(str).tolist()
    thresholds = dict(zip(CLASSES, (float(t) for t in THRESHOLDS)))
    rep = {"run": "run", "commit": "abc123", "config": asdict(cfg),
           "data": {"folder": str(synth), "patients": 24, "left_out": 0, "train": 8, "val": 8, "test": 8},
           "best_epoch": 2, "selected_by": "f1_macro", "thresholds": thresholds,
           "calibration": {"method": "platt", "a": [1.0] * 8}, "counts": {"train": 8, "validation": 8, "test": 8},
           "started": "2026-12-06T02:00:00Z", "finished": "2026-12-06T02:01:05Z", "duration_s": 65.0, "resumed": False}
    for split, rows in (("test", slice(0, 8)), ("val", slice(8, 16))):
        _write_predictions(run / f"predictions_{split}.csv", ids[rows], y_all[rows], p_all[rows])
        rep["test" if split == "test" else "validation"] = _split_figures(y_all[rows], p_all[rows], THRESHOLDS,
                                                                          y_all[16:])
    (run / "report.json").write_text(json.dumps(rep, default=float))
    return run, rep, (ids[:8], y_all[:8], p_all[:8])


def _check_images_exist(page: Page, folder: Path) -> None:
    assert page.images
    for src in page.images:
        assert not src.startswith(("/", "http", "data:")), src  # relative: the folder opens offline anywhere
        assert (folder / src).is_file(), src


def ci_text(value, bounds) -> str:
    """A cell with its interval as the page shows it once the tags are stripped: `0.656 [0.62, 0.69]`."""
    return format_interval(value, bounds)


def test_run_report_is_complete(fake_run):
    run, rep, (test_ids, y, p) = fake_run
    path = report.write_run_report(run)
    assert path == run / "report.html"
    page = Page(path)
    assert "script" not in page.tags
    _check_images_exist(page, run)
    assert "curves.png" in page.images
    text = path.read_text()
    # the summary comes first: the test official final against the trivial predictor, with intervals
    t, ci = rep["test"], rep["test"]["ci95"]
    assert text.index("id=summary-head") < text.index("id=split-test") < text.index("id=split-validation")
    lo, hi = ci["odir"]["final"]
    assert f"test official ODIR-2019 final <b>{t['odir']['final']:.3f} <span class=ci>[{lo:.2f}, {hi:.2f}]" in text
    lo, hi = ci["baseline"]["final"]
    assert f"trivial predictor {t['trivial']['odir']['final']:.3f} <span class=ci>[{lo:.2f}, {hi:.2f}]" in text
    lo, hi = ci["baseline"]["final_difference"]
    assert f"difference {t['odir']['final'] - t['trivial']['odir']['final']:+.3f} <span class=ci>[{lo:+.2f}, " in text
    summary = {row[0]: row[1] for row in page.tables["summary"]}
    assert summary["patients"] == "train 8 · validation 8 · test 8"
    assert summary["preset · backbone"] == "demo · test_resnet (from scratch) · 64 px"
    assert summary["duration"] == "1 min 05 s" and summary["started · finished (UTC)"].startswith("2026-12-06T02:00")
    assert summary["epochs"].endswith("best 2 by validation f1_macro")
    for split, key in (("test", "test"), ("validation", "validation")):
        r, ci = rep[key], rep[key]["ci95"]
        odir = page.tables[f"{split}-odir"]
        assert odir[1][1:] == [ci_text(r["odir"][k], ci["odir"][k]) for k in ("kappa", "f1", "auc", "final")]
        assert odir[2][-1] == ci_text(r["trivial"]["odir"]["final"], ci["baseline"]["final"])
        overall = page.tables[f"{split}-overall"]
        assert overall[1][1:] == [ci_text(r["tuned"][k], ci["tuned"][k]) for k in ("f1_micro", "f1_macro", "auc_macro")]
        assert overall[2][1:] == [ci_text(r["at_0.5"][k], ci["at_0.5"][k]) for k in ("f1_micro", "f1_macro",
                                                                                    "auc_macro")]
        assert overall[3][2] == f3(r["trivial"]["at_0.5"]["f1_macro"])
        classes = page.tables[f"{split}-classes"]
        assert classes[0] == ["class", "positives", "prevalence", "threshold", "sensitivity", "specificity", "PPV",
                              "F1", "AUC"]
        rates = r["per_class"]
        for k, c in enumerate(CLASSES):
            row = classes[k + 1]
            assert row[0].startswith(c + " ") and row[1] == str(rates["positives"][c])
            assert row[3] == f"{THRESHOLDS[k]:.2f}"
            assert row[2] == f"{100 * rates['prevalence'][c]:.1f} %"
            assert row[4:7] == [ci_text(rates[m][c], ci["per_class"][m][c])
                                for m in ("sensitivity", "specificity", "ppv")]
            assert row[7] == ci_text(r["tuned"]["f1"][c], ci["tuned"]["f1"][c])
            assert row[8] == ci_text(r["at_0.5"]["auc"][c], ci["at_0.5"]["auc"][c])
        assert page.tables[f"{split}-calibration"][1][1:] == ["0.1200", "0.0500", "0.2000", "0.1500"]
    # the per-class table holds the test rates recomputed from the predictions CSV at the tuned thresholds
    pred = p > THRESHOLDS[None, :]
    sens_d = (pred[:, 1] & (y[:, 1] == 1)).sum() / max(1, (y[:, 1] == 1).sum())
    assert page.tables["test-classes"][2][4].startswith("n/a" if not y[:, 1].any() else f"{sens_d:.3f}")
    confusion = page.tables["confusion"]
    for k, c in enumerate(CLASSES):  # counts recomputed from the predictions CSV at the tuned thresholds
        tp, fp = int((pred[:, k] & (y[:, k] == 1)).sum()), int((pred[:, k] & (y[:, k] == 0)).sum())
        fn, tn = int((~pred[:, k] & (y[:, k] == 1)).sum()), int((~pred[:, k] & (y[:, k] == 0)).sum())
        assert confusion[k + 1] == [c, f"{THRESHOLDS[k]:.2f}", str(tp), str(fp), str(fn), str(tn)]
    from PIL import Image

    for name, min_width in (("roc_pr_test.png", 1500), ("f1_threshold.png", 1500), ("reliability_test.png", 700)):
        assert f"report_files/{name}" in page.images
        assert Image.open(run / "report_files" / name).size[0] >= min_width, name  # >= 150 dpi
    gallery = [s for s in page.images if "gallery_" in s]
    picks = report.gallery_picks(test_ids, y, p, THRESHOLDS)
    assert picks and len(gallery) == 6 * len(picks)  # per patient: 2 eyes x (image, Grad-CAM, attention)
    assert all(pid in test_ids for _, _, pid in picks)
    eyes = [s for s in gallery if not s.endswith("_attention.jpg")]
    assert {Image.open(run / s).size for s in eyes} == {(report.GALLERY_PX, report.GALLERY_PX)}  # >= 256 px
    assert "report_files/colour_bar.png" in page.images


def test_run_report_of_an_older_run_computes_the_intervals(fake_run):
    """report.json from before the intervals (no ci95, no per_class): the page computes them from the predictions
    CSVs, the same function with the same seed."""
    run, rep, (_, y, p) = fake_run
    for split in ("test", "validation"):
        del rep[split]["ci95"], rep[split]["per_class"]
    for key in ("counts", "started", "finished", "duration_s"):
        del rep[key]
    (run / "report.json").write_text(json.dumps(rep, default=float))
    (run / "best.pt").unlink()  # no gallery: faster
    page = Page(report.write_run_report(run))
    ci = bootstrap_intervals(y, p, THRESHOLDS, seed=rep["config"]["seed"])
    assert page.tables["test-odir"][1][-1] == ci_text(rep["test"]["odir"]["final"], ci["odir"]["final"])
    assert page.tables["test-classes"][2][7] == ci_text(rep["test"]["tuned"]["f1"]["D"], ci["tuned"]["f1"]["D"])
    summary = {row[0]: row[1] for row in page.tables["summary"]}
    assert summary["duration"] == "not recorded" and summary["patients"].endswith("val 8 · test 8")


def test_run_report_without_test_split_uses_validation(fake_run):
    run, rep, _ = fake_run
    del rep["test"]
    (run / "report.json").write_text(json.dumps(rep, default=float))
    (run / "predictions_test.csv").unlink()
    (run / "best.pt").unlink()  # no checkpoint: no gallery, the rest is still written
    page = Page(report.write_run_report(run))
    assert "test-classes" not in page.tables and "validation-classes" in page.tables
    assert any("roc_pr_val" in s for s in page.images) and not any("gallery_" in s for s in page.images)
    _check_images_exist(page, run)


def test_run_report_needs_report_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json"):
        report.write_run_report(tmp_path)


def test_gallery_picks_most_confident_correct_and_wrong():
    ids = ["a", "b", "c", "d"]
    y = np.zeros((4, 8), int)
    y[:2, 1] = 1  # D present in a, b
    p = np.full((4, 8), 0.1)
    p[:, 1] = [0.9, 0.6, 0.95, 0.2]  # a, b correct positives (a more confident); c a confident false positive
    picks = [pk for pk in report.gallery_picks(ids, y, p, np.full(8, 0.5)) if pk[0] == "D"]
    assert picks == [("D", "most confident correct", "a"), ("D", "most confident wrong", "c")]


# ----------------------------------------------------------------------------------------------- folder report


def test_score_report_with_heatmaps(tmp_path, synth, tiny_onnx):
    """`score.py MODEL FOLDER --report DIR --explain RUN` on a labelled folder: a row per patient holding the CSV's
    figures, both eyes, the true labels, the metrics, and heatmaps from the run's best.pt."""
    out_csv, out_dir = tmp_path / "pred.csv", tmp_path / "page"
    run = tiny_onnx["checkpoint"].parent
    assert score.main([str(tiny_onnx["path"]), str(synth), "-o", str(out_csv), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1", "--report", str(out_dir), "--explain", str(run)]) == 0
    page = Page(out_dir / "index.html")
    assert "script" not in page.tags
    _check_images_exist(page, out_dir)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and len(page.rows) == 24
    for r in rows:
        cells = page.rows[f"patient-{r['ID']}"]
        assert cells[0] == r["ID"]
        assert cells[2:10] == [f"{float(r[f'p_{c}']):.3f}" for c in CLASSES]
        assert cells[10:13] == [r["labels"], r["true_labels"], r["status"]]
        assert sum(f"/{report._safe(r['ID'])}_cam_" in "/" + s for s in page.images) >= 2  # both eyes' Grad-CAM
    assert "metrics" in page.tables and "odir" in page.tables


def test_folder_report_shows_unscored_patients(tmp_path, synth):
    """An unlabelled folder with a patient missing an eye: its row says why, with no images."""
    import shutil

    from odir_dual.pipeline.pairs import find_pairs, prepare_pairs

    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("0_left.jpg", "0_right.jpg", "1_left.jpg"):
        shutil.copy(synth / "Training Images" / name, folder / name)
    table = prepare_pairs(find_pairs(folder).table, tmp_path / "cache", 64, workers=1, progress=False)
    probs = {0: np.linspace(0.1, 0.8, 8)}
    meta = {"classes": list(CLASSES), "thresholds": THRESHOLDS}
    scored = {"frame": predictions.predictions_frame(table, probs, meta), "table": table, "metrics": None}
    page = Page(report.write_folder_report(scored, tmp_path / "page", THRESHOLDS))
    _check_images_exist(page, tmp_path / "page")
    assert page.rows["patient-1"][-1] == "right eye: no photograph" and page.rows["patient-1"][2] == "n/a"
    assert page.rows["patient-0"][2:10] == [f"{v:.3f}" for v in probs[0]]
    assert len(page.images) == 2  # patient 0's two eyes only


def test_folder_report_starts_with_per_class_counts_and_lists_flagged_patients_first(tmp_path, synth):
    """Counts per class at the top (predicted positives, flagged, not scored); rows: flagged, unscored, the rest."""
    import shutil

    from odir_dual.pipeline.pairs import find_pairs, prepare_pairs

    folder = tmp_path / "pairs"
    folder.mkdir()
    for pid in range(3):
        for eye in ("left", "right"):
            shutil.copy(synth / "Training Images" / f"{pid}_{eye}.jpg", folder / f"{pid}_{eye}.jpg")
    shutil.copy(synth / "Training Images" / "3_left.jpg", folder / "3_left.jpg")
    table = prepare_pairs(find_pairs(folder).table, tmp_path / "cache", 64, workers=1, progress=False)
    thr = np.full(len(CLASSES), 0.5)
    probs = {0: np.array([0.1, 0.9, 0, 0, 0, 0, 0, 0.2]), 1: np.array([0.1, 0.2, 0, 0, 0, 0, 0, 0.1]),
             2: np.array([0.8, 0.9, 0, 0, 0, 0.6, 0, 0])}  # patient 2: normal together with D and H
    scored = {"frame": predictions.predictions_frame(table, probs, {"classes": list(CLASSES), "thresholds": thr}),
              "table": table, "metrics": None}
    page = Page(report.write_folder_report(scored, tmp_path / "page", thr))
    counts = {r[0]: r for r in page.tables["counts"][1:]}
    assert [counts[c][3] for c in CLASSES] == ["1", "2", "0", "0", "0", "1", "0", "0"]  # predicted positives
    text = (tmp_path / "page" / "index.html").read_text()
    assert text.index("id=counts") < text.index("id=patients")
    assert "1 flagged" in text and "1 not scored" in text
    order = [r[0] for r in page.tables["patients"][1:]]
    assert order == ["2", "3", "0", "1"]  # flagged, then not scored, then the rest in ID order
    assert page.rows["patient-2"][-1] == "ok; normal together with D,H"


# ----------------------------------------------------------------------------------------------- the heatmaps point at the disease


def region_mask(circles: pd.DataFrame, box, img_px: int, tolerance_px: float) -> np.ndarray:
    """(img_px, img_px) bool: the union of an eye's drawn circles (pixels of the written JPEG) in the network's
    input, i.e. after the fundus crop `box` and the squash to img_px; each circle widened by tolerance_px."""
    x0, y0, x1, y1 = box
    sx, sy = img_px / (x1 - x0), img_px / (y1 - y0)
    yy, xx = np.mgrid[0:img_px, 0:img_px] + 0.5  # pixel centres
    mask = np.zeros((img_px, img_px), bool)
    for c in circles.itertuples():
        u, v = (c.x_px - x0) * sx, (c.y_px - y0) * sy
        mask |= ((xx - u) / (c.r_px * sx + tolerance_px)) ** 2 + ((yy - v) / (c.r_px * sy + tolerance_px)) ** 2 <= 1
    return mask


def pointing_game(run: Path, data: Path, ids, tolerance_cells: float = TOLERANCE_CELLS) -> pd.DataFrame:
    """Per eye with a localised sign (D, G, A, O) among `ids`: does the Grad-CAM peak of that class fall inside the
    drawn region (`hit`), and what fraction of the fundus does the region cover (`random`: the chance that a random
    point of the fundus falls inside)? The regions are widened by `tolerance_cells` of the last stage's grid (32 px
    cells for test_resnet: 4 x 4 at 128 px), the resolution Grad-CAM has."""
    from PIL import Image

    from odir_dual.pipeline.pairs import find_pairs, prepare_pairs
    from odir_dual.pipeline.prepare import fundus_box

    explainer = report.Explainer(run)
    cfg = explainer.config
    regions = read_regions(data)
    regions = regions[regions["class"].isin(LOCALISED) & regions["id"].astype(str).isin(set(map(str, ids)))]
    table = find_pairs(data).table
    table = table[table["id"].astype(str).isin(set(regions["id"].astype(str)))]
    table = prepare_pairs(table, cfg["cache_dir"], cfg["img_px"], workers=1, progress=False).reset_index(drop=True)
    by_eye = regions.groupby(["id", "eye"])
    wanted = [sorted({CLASSES.index(k) for e in ("left", "right") if (r.id, e) in by_eye.groups
                      for k in by_eye.get_group((r.id, e))["class"]}) for r in table.itertuples()]
    items = explainer.explain(list(table["left_prepared"]), list(table["right_prepared"]), wanted)
    px, rows = explainer.img_px, []
    cell_px = explainer.model.backbone.feature_info[-1]["reduction"]  # input px per cell of the last stage
    for r, item in zip(table.itertuples(), items):
        for e, eye in enumerate(("left", "right")):
            if (r.id, eye) not in by_eye.groups:
                continue
            with Image.open(getattr(r, eye)) as im:
                box = fundus_box(im.convert("RGB"))
            fundus = item["views"][e].max(axis=2) > 20
            for k, circles in by_eye.get_group((r.id, eye)).groupby("class"):
                grid = item["cams"][CLASSES.index(k)][e]
                mask = region_mask(circles, box, px, tolerance_cells * cell_px)
                x, y = cam_peak(torch.from_numpy(grid))
                rows.append({"id": r.id, "eye": eye, "class": k, "hit": bool(mask[int(y), int(x)]),
                             "random": float((mask & fundus).sum() / fundus.sum())})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_heatmaps_point_at_the_drawn_signs(tmp_path):
    """After a demo-sized run (test_resnet from scratch, 128 px, 300 synthetic patients, 15 epochs), the Grad-CAM
    peak of a present localised class falls inside its drawn region for most held-out eyes, far more often than a
    random point of the fundus does."""
    from odir_dual import train

    data = make_synthetic_odir(tmp_path / "odir", n_patients=300, seed=7, min_px=160, max_px=260, workers=2)
    train.main(["--data", str(data), "--out", str(tmp_path), "--name", "run", "--cache-dir", str(tmp_path / "cache"),
                "--preset", "demo", "--img-px", "128", "--epochs", "15", "--embed-dim", "64"])
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    held_out = split.loc[split["split"] != "train", "id"]
    eyes = pointing_game(tmp_path / "run", data, held_out)
    print(eyes.groupby("class")[["hit", "random"]].mean(), f"\nall {len(eyes)} eyes: hit {eyes['hit'].mean():.2f}, "
          f"random point {eyes['random'].mean():.2f}")
    assert len(eyes) >= 50
    assert eyes["hit"].mean() >= HIT_RATE_MIN
    assert eyes["hit"].mean() >= eyes["random"].mean() + MARGIN_OVER_RANDOM


# ----------------------------------------------------------------------------------------------- the web page


def test_web_page_explains_an_uploaded_pair(synth, tiny_checkpoint):
    """serve.py on 127.0.0.1: the form, then a POST of two photographs answers with the 8 probabilities and the
    heatmaps inlined; a missing eye is a 400 with a message."""
    import threading
    import urllib.error
    import urllib.request

    from odir_dual import serve

    explainer = report.Explainer(tiny_checkpoint)
    server = serve.ThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(explainer, "test"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert "type=file name=left" in urllib.request.urlopen(url, timeout=60).read().decode()
        images = {eye: (synth / "Training Images" / f"0_{eye}.jpg").read_bytes() for eye in ("left", "right")}

        def post(files: dict):
            boundary = "----odirtest"
            body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.jpg\"\r\n"
                            f"Content-Type: image/jpeg\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items())
            body += f"--{boundary}--\r\n".encode()
            req = urllib.request.Request(url, data=body, headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}"})
            return urllib.request.urlopen(req, timeout=120)

        answer = post(images).read().decode()
        cells = answer.split("<table id=probs>")[1].split("</table>")[0]
        assert cells.count("<td") == len(CLASSES)
        assert answer.count("data:image/png;base64,") >= 4  # both eyes: image, >= 1 Grad-CAM, attention
        # the uploaded files' names with each eye, and the heatmaps' colour scale beside them
        assert "<h2>Left eye <small>(left.jpg)</small></h2>" in answer and "Right eye <small>(right.jpg)" in answer
        assert answer.count("heatmap weight") == 2
        # a class this model is not to be trusted on (model/trust.py) is named and raises no "normal with" note
        explainer.quality = {"untrusted": {"O": "no better than chance on this model's test patients"}}
        answer = post(images).read().decode()
        assert "O · threshold" in answer and "not to be trusted" in answer
        # a --head concat model has no cross-attention: the page shows the images and Grad-CAMs without that figure
        explain = explainer.explain
        explainer.explain = lambda *args: [dict(item, attention={}) for item in explain(*args)]
        answer = post(images).read().decode()
        assert "attended by the other eye" not in answer and answer.count("heatmap weight") == 2
        assert answer.count("data:image/png;base64,") >= 4  # both eyes: image, >= 1 Grad-CAM
        explainer.explain = explain
        page = serve.identity_html({"run": "r", "backbone": "b", "img_px": 64, "data": "/d", "patients": "",
                                    "preset": "demo", "commit": "c", "synthetic": False,
                                    "quality": {"untrusted": explainer.quality["untrusted"]}})
        assert "O other</b>: no better than chance on this model&#x27;s test patients; its column is shown but not " \
               "used for flags" in page
        with pytest.raises(urllib.error.HTTPError) as bad:
            post({"left": images["left"]})
        assert bad.value.code == 400 and "no right eye" in bad.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_web_page_names_the_model_diseases_and_eye_and_offers_a_download(synth, tiny_checkpoint):
    """The page says which model answers (run, backbone, data, commit) and that it is for research use; the result
    uses disease names and has JSON/CSV downloads; a bad photograph's error names its eye."""
    import base64
    import threading
    import urllib.error
    import urllib.request

    from odir_dual import serve

    explainer = report.Explainer(tiny_checkpoint)
    identity = serve.model_identity(tiny_checkpoint.parent, explainer)
    assert identity["run"] == tiny_checkpoint.parent.name and identity["backbone"] == "test_convnext"
    server = serve.ThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(explainer, "test", identity))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    def post(files: dict):
        boundary = "----odirtest"
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.jpg\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items())
        body += f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return urllib.request.urlopen(req, timeout=120)

    try:
        form = urllib.request.urlopen(url, timeout=60).read().decode()
        assert f"run <b>{identity['run']}</b>" in form and "test_convnext" in form and "research use only" in form
        assert "SYNTHETIC" not in form  # the tiny checkpoint names no synthetic data folder
        images = {eye: (synth / "Training Images" / f"0_{eye}.jpg").read_bytes() for eye in ("left", "right")}
        answer = post(images).read().decode()
        head = answer.split("<table id=probs>")[1].split("</table>")[0]
        for name in ("Normal", "Diabetes", "Glaucoma", "Cataract", "AMD", "Hypertension", "Myopia", "Other"):
            assert f"<th>{name}<br>" in head
        uri = answer.split("download='odir-result.json' href='data:application/json;base64,")[1].split("'")[0]
        result = json.loads(base64.b64decode(uri))
        assert list(result["probabilities"]) == list(CLASSES) and result["model"]["run"] == identity["run"]
        assert "download='odir-result.csv'" in answer
        with pytest.raises(urllib.error.HTTPError) as bad:
            post({"left": b"not a photograph\n", "right": images["right"]})
        assert bad.value.code == 400 and "left eye: not an image" in bad.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_web_page_warns_loudly_about_a_synthetic_data_model():
    from odir_dual import serve

    ident = {"run": "demo", "backbone": "test_resnet", "img_px": 128, "data": "/x/.cache/odir-dual/synthetic/odir",
             "patients": "600 patients", "preset": "demo", "commit": "abc", "synthetic": True}
    assert "class=synthetic" in serve.identity_html(ident) and "SYNTHETIC" in serve.identity_html(ident)
    assert "class=synthetic" not in serve.identity_html({**ident, "synthetic": False})


def test_serve_takes_a_run_folder_and_a_taken_port_is_one_line(tiny_checkpoint, capsys):
    import socket

    from odir_dual import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main([str(tiny_checkpoint.parent), "--port", str(port)]) == 1  # the run folder loads
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"serve.py: error: port {port} is in use (choose another with --port)"]
