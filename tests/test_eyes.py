"""Which eye (issue 31): the per-eye head from best.pt through ONNX (`eye_probs`) to score.py's columns and
`findings`, the reports and serve.py; the per-eye figures on a case worked out by hand."""
from __future__ import annotations

import base64
import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from odir_dual import export, score, serve
from odir_dual.deploy import predictions, report, runtime
from odir_dual.model import eyes
from odir_dual.model.factory import build_model
from odir_dual.model.metrics import bootstrap_intervals
from odir_dual.pipeline.constants import CLASSES
from odir_dual.training import checkpoint, config, evaluation, runlog
from test_export import MEAN, STD, THRESHOLDS, make_checkpoint, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_score import fundus, pair_folder, read_csv

EYE_THRESHOLDS = np.round(np.linspace(0.2, 0.55, len(CLASSES)), 3)  # distinct per class, and from the patient's
EYE_CALIBRATION = {"method": "platt", "a": np.linspace(0.8, 1.5, len(CLASSES)).tolist(),
                   "b": np.linspace(-0.5, 0.3, len(CLASSES)).tolist()}
EYE_COLUMNS = [f"{e}_p_{c}" for e in ("left", "right") for c in CLASSES]


def eye_checkpoint(path: Path) -> Path:
    """best.pt of a tiny model with the per-eye head, its calibration and thresholds fitted, as train.py writes."""
    make_checkpoint(path, seed=5, eye_loss_weight=2.0)
    ckpt = checkpoint.load_checkpoint(path)
    ckpt.update(eye_calibration=EYE_CALIBRATION, eye_thresholds=EYE_THRESHOLDS.tolist(), eye_fit_eyes=30)
    checkpoint.save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def eye_onnx(tmp_path_factory) -> dict:
    path = eye_checkpoint(tmp_path_factory.mktemp("eyes") / "best.pt")
    return {**export.export(path, log=lambda *a: None), "checkpoint": path}


def reference_eye_probs(ckpt_path: Path, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    """PyTorch's calibrated per-eye probabilities (N, 2, K), computed here from the eye logits."""
    net = checkpoint.model_from_checkpoint(checkpoint.read_checkpoint(ckpt_path))
    with torch.no_grad():
        eye_logits = net(left, right, eye_logits=True)[1].numpy().astype(np.float64)
    a, b = np.asarray(EYE_CALIBRATION["a"]), np.asarray(EYE_CALIBRATION["b"])
    return 1 / (1 + np.exp(-(a * eye_logits + b)))


# ----------------------------------------------------------------------------------------------- the ONNX file


def test_exported_eye_probs_equal_pytorch_and_the_thresholds_are_in_the_metadata(eye_onnx):
    session, meta, _ = runtime.load_session(eye_onnx["path"], "cpu")
    assert [o.name for o in session.get_outputs()] == ["probs", "logits", "eye_probs"]
    np.testing.assert_allclose(meta["eye_thresholds"], EYE_THRESHOLDS)
    np.testing.assert_allclose(meta["thresholds"], THRESHOLDS)  # the patient head's stay the patient head's
    assert json.loads(meta["raw"]["eye_order"]) == ["left", "right"] and "official" in meta["raw"]["labels_follow"]
    g = torch.Generator().manual_seed(7)
    left, right = (torch.randn(5, 3, 64, 64, generator=g) for _ in range(2))
    eye_probs = session.run(["eye_probs"], {"left": left.numpy(), "right": right.numpy()})[0]
    assert eye_probs.shape == (5, 2, len(CLASSES))
    np.testing.assert_allclose(eye_probs, reference_eye_probs(eye_onnx["checkpoint"], left, right), atol=1e-4, rtol=0)
    assert eye_onnx["diffs"]["random"] <= export.FP32_TOL  # export's own check covers eye_probs too
    card = eye_onnx["card"].read_text()
    assert "`eye_probs` (N, 2, 8) [left, right]" in card and "## Per-eye findings" in card


def test_a_model_without_the_head_exports_as_before(tiny_onnx):
    session, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    assert [o.name for o in session.get_outputs()] == ["probs", "logits"] and meta["eye_thresholds"] is None
    assert "eye_thresholds" not in meta["raw"]


@pytest.mark.parametrize("outputs, eye_thresholds, message", [
    (("probs", "logits", "eye_probs"), None, r"outputs probs, logits, eye_probs; expected exactly probs, logits;"),
    (("probs", "logits"), "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]",
     r"expected exactly probs, logits, eye_probs \(the metadata has per-eye thresholds\)"),
    (("probs", "logits", "eye_probs"), "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]",
     r"output eye_probs has shape \['N', 8\], expected \(N, 2, 8\)"),
])
def test_per_eye_outputs_and_thresholds_must_come_together(tiny_onnx, tmp_path, outputs, eye_thresholds, message):
    from test_faults import onnx_model

    raw = dict(runtime.load_session(tiny_onnx["path"], "cpu")[1]["raw"])
    if eye_thresholds:
        raw["eye_thresholds"] = eye_thresholds
    with pytest.raises(runtime.ModelFileError, match=message):
        runtime.load_session(onnx_model(tmp_path / "m.onnx", raw, outputs=outputs), "cpu")


def test_the_cpu_preset_keeps_the_per_eye_head():
    cfg = config.resolve_config({"preset": "cpu"})
    assert cfg.eye_loss_weight > 0
    assert build_model(dataclasses.replace(cfg, pretrained=False)).eye_head is not None


# ----------------------------------------------------------------------------------------------- score.py


def test_scored_folder_has_per_eye_columns_and_findings(eye_onnx, tmp_path, capsys):
    folder = pair_folder(tmp_path / "images", [3, 1, 2])
    fundus(folder / "4_left.jpg", 40)  # one eye only: not scored, blank per-eye columns
    out = tmp_path / "pred.csv"
    assert score.main([str(eye_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    assert "per-eye findings (column findings)" in capsys.readouterr().out
    rows = read_csv(out)
    header = list(rows[0])
    assert header == ["ID", *(f"p_{c}" for c in CLASSES), *(f"pred_{c}" for c in CLASSES), "labels", "findings",
                      "findings_vs_labels", "status", *EYE_COLUMNS]
    scored = [r for r in rows if predictions.is_scored(r["status"])]
    assert [r["ID"] for r in scored] == ["1", "2", "3"]
    for r in scored:
        eye_probs = np.array([float(r[c]) for c in EYE_COLUMNS]).reshape(2, len(CLASSES))
        pred = np.array([int(r[f"pred_{c}"]) for c in CLASSES])
        assert r["findings"] == eyes.findings(eye_probs > EYE_THRESHOLDS)
        assert r["findings_vs_labels"] == (eyes.differences(pred, eye_probs > EYE_THRESHOLDS) or "same")
    # the per-eye probabilities are the ONNX model's on the prepared images, as PyTorch computes them
    from odir_dual.pipeline import pairs
    from odir_dual.pipeline.dali import eval_loader

    table = pairs.prepare_pairs(pairs.find_pairs(folder).table, tmp_path / "c", 64, workers=1, progress=False)
    ok = table[table["status"] == "ok"].sort_values("id")
    left, right, _, index = eval_loader(list(ok["left_prepared"]), list(ok["right_prepared"]), len(ok), 64, "cpu",
                                        mean=MEAN, std=STD).next_batch()
    expected = reference_eye_probs(eye_onnx["checkpoint"], left.contiguous(), right.contiguous())
    got = np.array([[float(r[c]) for c in EYE_COLUMNS] for r in scored]).reshape(-1, 2, len(CLASSES))
    np.testing.assert_allclose(got, expected[index.numpy()], atol=1e-4, rtol=0)
    unscored = next(r for r in rows if r["ID"] == "4")
    assert unscored["findings"] == "" and all(unscored[c] == "" for c in EYE_COLUMNS)
    sidecar = json.loads(predictions.thresholds_file(out).read_text())
    assert sidecar["eye_thresholds"] == dict(zip(CLASSES, EYE_THRESHOLDS.tolist())) and "official" in \
        sidecar["labels_follow"]
    # --submission stays the ODIR format
    sub = tmp_path / "sub.csv"
    assert score.main([str(eye_onnx["path"]), str(folder), "-o", str(sub), "--submission", "--cache-dir",
                       str(tmp_path / "c"), "--workers", "1"]) == 0
    assert sub.read_text().splitlines()[0] == "ID,N,D,G,C,A,H,M,O"
    assert all(len(line.split(",")) == 9 for line in sub.read_text().splitlines())


def test_workbook_has_the_per_eye_columns_and_thresholds(eye_onnx, tmp_path):
    from openpyxl import load_workbook

    folder = pair_folder(tmp_path / "images", [1, 2])
    out = tmp_path / "pred.xlsx"
    assert score.main([str(eye_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    wb = load_workbook(out)
    head = [c.value for c in wb["predictions"][1]]
    assert {"findings", "findings_vs_labels", *EYE_COLUMNS} <= set(head)
    first = [c.value for c in wb["predictions"][2]]
    assert isinstance(first[head.index("left_p_D")], float)
    model = [[c.value for c in row] for row in wb["model"].iter_rows()]
    header = next(r for r in model if r[0] == "class")
    assert header[3] == "per-eye threshold (findings)"
    assert [r[3] for r in model[model.index(header) + 1:]] == pytest.approx(EYE_THRESHOLDS.tolist())


def test_a_model_without_the_head_scores_without_the_columns(tiny_onnx, tmp_path, capsys):
    folder = pair_folder(tmp_path / "images", [1, 2])
    out = tmp_path / "pred.csv"
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    assert "per-eye" not in capsys.readouterr().out
    header = list(read_csv(out)[0])
    assert not {"findings", "findings_vs_labels", *EYE_COLUMNS} & set(header)
    assert "eye_thresholds" not in json.loads(predictions.thresholds_file(out).read_text())


def test_findings_say_each_class_with_its_eyes_and_where_they_differ_from_the_labels():
    k = {c: i for i, c in enumerate(CLASSES)}
    eye_pred = np.zeros((2, len(CLASSES)), bool)
    eye_pred[:, k["D"]] = True  # both eyes
    eye_pred[1, k["C"]] = True  # the right eye only
    assert eyes.findings(eye_pred) == "diabetes (left, right); cataract (right)"
    assert eyes.eye_findings(eye_pred) == {"left": "diabetes", "right": "diabetes, cataract"}
    patient = np.zeros(len(CLASSES), bool)
    patient[[k["D"], k["G"]]] = True
    assert eyes.differences(patient, eye_pred) == "labels only: G; eyes only: C"
    normal = np.zeros((2, len(CLASSES)), bool)
    normal[0, k["N"]] = True  # a normal left eye and a right eye with nothing above its threshold
    assert eyes.findings(normal) == "normal (left)"
    assert eyes.differences(np.eye(len(CLASSES), dtype=bool)[k["N"]], normal) == "labels only: N"  # both must be
    assert eyes.findings(np.zeros((2, len(CLASSES)), bool)) == "none"
    table = pd.DataFrame({"id": ["7", "8"], "status": ["ok", "left eye: missing file"]})
    meta = {"classes": list(CLASSES), "thresholds": np.full(len(CLASSES), 0.5), "eye_thresholds": np.full(8, 0.5)}
    frame = predictions.predictions_frame(table, {0: np.where(patient, 0.9, 0.1)}, meta,
                                          eyes_by_row={0: np.where(eye_pred, 0.8, 0.2)})
    assert frame.loc[0, "findings"] == "diabetes (left, right); cataract (right)"
    assert frame.loc[0, "findings_vs_labels"] == "labels only: G; eyes only: C" and frame.loc[0, "labels"] == "D,G"
    assert frame.loc[1, "findings"] == "" and frame.loc[1, "right_p_C"] is None


# ----------------------------------------------------------------------------------------------- the figures


def known_case():
    """4 patients, class D per eye [left, right]; every other class negative everywhere (its figures undefined).

    eye labels   (1,0) (0,1) (0,0) (1,1)
    eye probs    (.9,.2) (.3,.8) (.1,.6) (.7,.4), per-eye threshold 0.5
    patient prob  .9     .8     .6     .5,       patient threshold 0.55
    """
    d = CLASSES.index("D")
    labels, eye_probs = np.zeros((4, 2, 8)), np.zeros((4, 2, 8))
    patient = np.zeros((4, 8))
    labels[:, :, d] = [[1, 0], [0, 1], [0, 0], [1, 1]]
    eye_probs[:, :, d] = [[.9, .2], [.3, .8], [.1, .6], [.7, .4]]
    patient[:, d] = [.9, .8, .6, .5]
    return labels, eye_probs, patient, d


def test_per_eye_figures_on_a_case_worked_out_by_hand():
    labels, eye_probs, patient, d = known_case()
    fig = eyes.eye_figures(labels, np.ones(4, bool), eye_probs, np.full(8, 0.5), patient, np.full(8, 0.55))
    assert (fig["eyes"], fig["patients"], fig["left_out"], fig["positives"]["D"]) == (8, 4, 0, 4)
    # positives .9 .8 .7 .4 against negatives .2 .3 .1 .6: .4 beats 3 of 4, the others all 4 → 15/16;
    # at 0.5: TP .9 .8 .7, FP .6, FN .4 → F1 = 2·3 / (2·3 + 1 + 1) = 0.75
    assert fig["model"]["auc"]["D"] == pytest.approx(15 / 16) and fig["model"]["f1"]["D"] == pytest.approx(0.75)
    # naive: each eye inherits its patient's probability: positives .9 .8 .5 .5, negatives .9 .8 .6 .6 →
    # (3 + ½ + 2 + ½) / 16 = 6/16; at 0.55: TP 2 (.9 .8), FP 4, FN 2 (.5 .5) → F1 = 4 / (4 + 4 + 2) = 0.4
    assert fig["naive"]["auc"]["D"] == pytest.approx(6 / 16) and fig["naive"]["f1"]["D"] == pytest.approx(0.4)
    assert np.isnan(fig["model"]["auc"]["G"]) and fig["ci95"]["model"]["auc"]["G"] is None
    lo, hi = fig["ci95"]["model"]["auc"]["D"]
    assert lo <= 15 / 16 <= hi and fig["ci95"]["resamples"] == 1000
    # patient 3: label D at .5 < .55, while its left eye is at .7 > .5: the only disagreement
    assert fig["consistency"] == {"patients": 4, "patients_differing": 1, "labels_only": dict.fromkeys(CLASSES, 0),
                                  "eyes_only": {**dict.fromkeys(CLASSES, 0), "D": 1}}
    # eyes whose patient's keywords do not reproduce the labels are left out
    fig = eyes.eye_figures(labels, np.array([True, True, True, False]), eye_probs, np.full(8, 0.5), patient,
                           np.full(8, 0.55))
    assert (fig["eyes"], fig["left_out"], fig["positives"]["D"]) == (6, 1, 2)
    assert fig["model"]["auc"]["D"] == pytest.approx(1.0)  # .9 .8 against .2 .3 .1 .6: every pair ranked right


def test_eyes_are_resampled_with_their_patient():
    """Two identical eyes per patient, drawn together: every interval equals the patients' own bootstrap (F1 and
    AUC do not change when each row is counted twice); drawn apart they would not."""
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, (30, 8)), rng.random((30, 8))
    groups = np.repeat(np.arange(30), 2)
    pairs = bootstrap_intervals(np.repeat(y, 2, 0), np.repeat(p, 2, 0), 0.5, groups=groups, seed=3, resamples=200)
    alone = bootstrap_intervals(y, p, 0.5, seed=3, resamples=200)
    for c in CLASSES:
        assert pairs["tuned"]["auc"][c] == pytest.approx(alone["tuned"]["auc"][c])
        assert pairs["tuned"]["f1"][c] == pytest.approx(alone["tuned"]["f1"][c])


def test_fit_eye_head_uses_only_usable_validation_eyes():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(40, 2, 8)), rng.integers(0, 2, (40, 2, 8)).astype(np.float32)
    usable = np.arange(40) % 4 != 0
    fit = eyes.fit_eye_head(logits, labels, usable, "platt")
    assert fit["eye_fit_eyes"] == 60 and len(fit["eye_thresholds"]) == 8 and fit["eye_calibration"]["method"] == "platt"
    garbage = labels.copy()
    garbage[~usable] = 1 - garbage[~usable]  # the left-out patients' labels change nothing
    assert eyes.fit_eye_head(logits, garbage, usable, "platt") == fit
    assert eyes.fit_eye_head(logits, labels, np.zeros(40, bool), "platt")["eye_fit_eyes"] == 0


def test_final_report_console_and_run_page_give_the_per_eye_figures(tmp_path, capsys):
    """report.json's per-eye section (with the naive baseline and the agreement), the console's table and
    report.html's, from best.pt's per-eye calibration and thresholds; the predictions CSV gets left/right_p_*."""
    labels, eye_probs, patient, d = known_case()
    ckpt = checkpoint.read_checkpoint(eye_checkpoint(tmp_path / "best.pt"))
    ckpt.update(eye_calibration={"method": "none"}, eye_thresholds=[0.5] * 8, thresholds=[0.55] * 8, calibration=None,
                best={"epoch": 1, "metric": "auc_macro"})
    kw = [f"{'diabetic retinopathy' if on else 'normal fundus'}" for on in labels[:, :, d].ravel()]
    test = pd.DataFrame({"id": ["a", "b", "c", "e"], **{c: (labels.max(1)[:, k] if c != "N" else
                                                             1 - labels.max(1)[:, d]).astype(int)
                                                         for k, c in enumerate(CLASSES)},
                         "left_keywords": kw[0::2], "right_keywords": kw[1::2]})
    logit = lambda q: np.log(np.clip(q, 1e-6, 1 - 1e-6) / (1 - np.clip(q, 1e-6, 1 - 1e-6)))  # noqa: E731
    run = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(data="x", seed=0), started=0.0, resume_dir=None)
    out = evaluation.final_report(run, ckpt, {"test": test}, {"test": logit(patient)}, np.ones((10, 8)),
                                  eye_logits={"test": logit(eye_probs)})
    saved = json.loads((tmp_path / "report.json").read_text())["test"]["eyes"]
    assert saved["model"]["auc"]["D"] == pytest.approx(15 / 16) and saved["naive"]["f1"]["D"] == pytest.approx(0.4)
    assert saved["consistency"]["eyes_only"]["D"] == 1
    assert "official" in out["labels_follow"]
    csv_head = (tmp_path / "predictions_test.csv").read_text().splitlines()[0].split(",")
    assert set(EYE_COLUMNS) <= set(csv_head)
    runlog.print_final_report(out, tmp_path / "best.pt")
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith("D diabetes") and "0.938" in x)
    assert "0.750" in line and "0.375" in line and "0.400" in line and line.split()[2] == "4"  # positive eyes
    assert "1 of 4 patients differ" in text
    page = "".join(report._split_section("Test", out["test"], [0.55] * 8))  # report.html's section of the split
    table = page.split("<table id=test-eyes>")[1].split("</table>")[0]
    assert "0.938" in table and "0.750" in table and "0.375" in table and "0.400" in table
    assert "1 of 4 patients differ" in page and "<table id=test-eyes-agree>" in page


# ----------------------------------------------------------------------------------------------- the pages


class _Captions(HTMLParser):
    """The figure captions of a page, as text."""

    def __init__(self, text: str):
        super().__init__()
        self.captions, self._in = [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "figcaption":
            self._in = True
            self.captions.append("")

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.captions[-1] += data


def test_folder_report_shows_each_eyes_findings_under_its_photograph(eye_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [1, 2])
    scored = score.score_folder(eye_onnx["path"], folder, out=tmp_path / "p.csv", cache_dir=tmp_path / "c",
                                progress=False, workers=1, log=lambda *a: None)
    page = report.write_folder_report(scored, tmp_path / "rep", scored["meta"]["thresholds"]).read_text()
    captions = _Captions(page).captions
    frame = scored["frame"]
    expected = []
    for _, r in frame.sort_values("ID").iterrows():
        probs = np.array([[r[f"{e}_p_{c}"] for c in CLASSES] for e in ("left", "right")], np.float64)
        found = eyes.eye_findings(probs > EYE_THRESHOLDS)
        expected += [f"left{found['left']}", f"right{found['right']}"]
    assert sorted(captions) == sorted(expected) and "id=eye-note" in page  # (flagged patients come first)


def test_web_page_shows_the_findings_per_eye_and_the_download_carries_them(eye_onnx, tiny_checkpoint, tmp_path):
    explainer = report.Explainer(eye_onnx["checkpoint"])
    images = {e: fundus(tmp_path / f"{e}.jpg", s).read_bytes() for e, s in (("left", 1), ("right", 2))}
    page = serve.explain_upload(explainer, images["left"], images["right"])
    uri = page.split("download='odir-result.json' href='data:application/json;base64,")[1].split("'")[0]
    result = json.loads(base64.b64decode(uri))
    eye_pred = np.array([[result["eyes"][e]["probabilities"][c] for c in CLASSES] for e in ("left", "right")]) \
        > EYE_THRESHOLDS
    assert result["findings"] == eyes.findings(eye_pred)
    for e, words in eyes.eye_findings(eye_pred).items():
        assert f"<p class=found id=found-{e}>Findings in the {e} eye: <b>{words}</b></p>" in page
        assert result["eyes"][e]["found"] == [c for c, on in zip(CLASSES, eye_pred[int(e == "right")]) if on]
    rows = base64.b64decode(page.split("download='odir-result.csv' href='data:text/csv;base64,")[1].split("'")[0])
    rows = rows.decode().splitlines()
    assert rows[0].endswith(",left_probability,right_probability,eye_threshold,left_found,right_found")
    assert len(rows) == 1 + len(CLASSES) and len(rows[1].split(",")) == 10
    headless = serve.explain_upload(report.Explainer(tiny_checkpoint), images["left"], images["right"])
    assert "Findings in the" not in headless and "left_probability" not in headless


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_io_binding_gives_the_eye_probs_too(eye_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [1, 2, 3])
    common = dict(cache_dir=tmp_path / "c", batch_size=2, progress=False, workers=1, log=lambda *a: None)
    cpu = score.score_folder(eye_onnx["path"], folder, out=tmp_path / "cpu.csv", provider="cpu", **common)
    gpu = score.score_folder(eye_onnx["path"], folder, out=tmp_path / "gpu.csv", provider="cuda", **common)
    assert gpu["provider"] == "cuda" and gpu["eye_probs"].shape == (3, 2, len(CLASSES))
    np.testing.assert_allclose(gpu["eye_probs"], cpu["eye_probs"], atol=2e-2)  # nvJPEG: a few grey levels
