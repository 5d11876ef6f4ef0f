"""MODEL_CARD.md beside every exported ONNX file: from report.json when the run has one, else the checkpoint."""
from __future__ import annotations

import json

from odir_dual.deploy.modelcard import CARD_NAME, model_card
from odir_dual.pipeline.constants import CLASSES
from test_export import THRESHOLDS, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)

SECTIONS = ("## Intended use", "## Not intended for", "## Training data", "## Thresholds", "## Calibration",
            "## Known limitations")


def _metrics(f1: float, auc: float) -> dict:
    return {"f1_micro": f1, "f1_macro": f1, "auc_macro": auc, "f1": {c: f1 for c in CLASSES},
            "auc": {c: auc for c in CLASSES}}


def _report() -> dict:
    """report.json as train.py writes it (the keys the card reads)."""
    split = lambda n, f1, auc: {  # noqa: E731
        "patients": n, "at_0.5": _metrics(f1 - 0.1, auc), "tuned": _metrics(f1, auc),
        "odir": {"kappa": 0.4, "f1": 0.9, "auc": 0.85, "final": 0.716},
        "trivial": {"at_0.5": _metrics(0.0, 0.5), "odir": {"kappa": 0.0, "f1": 0.8, "auc": 0.6, "final": 0.47}},
        "calibration_error": {"ece_before": 0.21, "ece_after": 0.03, "brier_before": 0.2, "brier_after": 0.1}}
    return {"data": {"folder": "/data/ODIR-5K", "train": 1500, "validation": 330, "test": 331}, "best_epoch": 9,
            "thresholds": dict(zip(CLASSES, THRESHOLDS.tolist())), "calibration": {"method": "platt"},
            "validation": split(330, 0.55, 0.8), "test": split(331, 0.512, 0.777)}


def test_export_writes_a_model_card_beside_the_onnx_file(tiny_onnx):
    card = tiny_onnx["path"].parent / CARD_NAME
    assert tiny_onnx["card"] == card
    text = card.read_text()
    assert text.startswith(f"# Model card: {tiny_onnx['path'].name}")
    for section in SECTIONS:
        assert section in text, section
    assert "| " + " | ".join(f"{t:.2f}" for t in THRESHOLDS) + " |" in text  # the thresholds the file applies
    assert "## Export check" in text


def test_card_reports_test_figures_per_class_from_report_json(tiny_checkpoint):
    import torch

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    text = model_card(ckpt, _report(), onnx_name="best.onnx", precision="fp32")
    assert "## Figures on the test split (331 patients)" in text and "never used to choose anything" in text
    assert "| D | diabetes | 0.512 | 0.412 | 0.777 |" in text  # tuned F1, F1 at 0.5, AUC
    assert "final 0.716 (trivial: 0.470)" in text
    assert "Method: platt" in text and "0.210 → 0.030" in text
    assert "validation 330 patients · test 331 patients" in text
    json.dumps(text)  # plain text


def test_card_counts_positive_test_patients_from_the_runs_predictions(tmp_path):
    import torch

    from odir_dual.training.checkpoint import weights_digest
    from odir_dual.deploy.modelcard import write_model_card

    ckpt = {"config": {"backbone": "resnet18"}, "thresholds": THRESHOLDS.tolist(), "img_px": 64, "epoch": 9,
            "model": {"w": torch.arange(4.0)}}
    report = {**_report(), "checkpoint": {"file": "best.pt", "epoch": 9, "weights": weights_digest(ckpt["model"])}}
    (tmp_path / "report.json").write_text(json.dumps(report))  # made by this very checkpoint
    rows = ["id," + ",".join(CLASSES) + "," + ",".join(f"p_{c}" for c in CLASSES)]
    rows += [f"{i}," + ",".join("1" if (c == "D" or (c == "H" and i == 0)) else "0" for c in CLASSES) + ",0.5" * 8
             for i in range(3)]
    (tmp_path / "predictions_test.csv").write_text("\n".join(rows) + "\n")
    card = write_model_card(tmp_path / "best.onnx", ckpt, tmp_path / "best.pt", precision="fp32", log=lambda *a: None)
    text = card.read_text()
    assert "| D | diabetes | 0.512 | 0.412 | 0.777 | 3 |" in text and "| H | hypertension | 0.512 | 0.412 | 0.777 | 1 |" in text


def test_card_gives_each_figure_its_bootstrap_interval(tiny_checkpoint):
    """With report.json's "ci95" (train.py's bootstrap over patients) every figure of the card carries its interval
    (a figure without one is shown alone); the positives come from report.json's per-class counts."""
    import torch

    rep = _report()
    ci = {"resamples": 1000, "seed": 42, "odir": {"kappa": [0.3, 0.5], "f1": [0.88, 0.92], "auc": [0.8, 0.9],
                                                 "final": [0.69, 0.74]},
          "tuned": {"f1": {"D": [0.45, 0.57]}, "f1_macro": [0.48, 0.55]}, "at_0.5": {"auc": {"D": [0.71, 0.84]}},
          "baseline": {"final": [0.44, 0.5], "final_difference": [0.2, 0.29]}}
    rep["test"].update(ci95=ci, per_class={"positives": dict(zip(CLASSES, range(8)))})
    text = model_card(torch.load(tiny_checkpoint, weights_only=True), rep, onnx_name="best.onnx", precision="fp32")
    assert "| D | diabetes | 0.512 [0.45, 0.57] | 0.412 | 0.777 [0.71, 0.84] | 1 |" in text
    assert "| macro | | 0.512 [0.48, 0.55] | 0.412 | 0.777 |" in text
    assert "kappa 0.400 [0.30, 0.50] · F1 0.900 [0.88, 0.92]" in text
    assert "final 0.716 [0.69, 0.74] (trivial: 0.470 [0.44, 0.50])" in text
    assert "Model minus trivial, official final: +0.246 [+0.20, +0.29]" in text
    assert "95 % interval, a percentile bootstrap over the 331 patients (1000 resamples, seed 42)" in text
