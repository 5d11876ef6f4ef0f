"""Classes not to be trusted (model/trust.py): decided once from report.json, named everywhere, never flagging."""
from __future__ import annotations

import pytest

from odir_dual.model.trust import (model_quality, positive_rate, quality_text, untrusted_classes,
                                   untrusted_lines)
from odir_dual.pipeline.constants import CLASSES


def split(auc: dict, ci: dict, prevalence=0.2, sensitivity=0.7, specificity=0.8) -> dict:
    """A report.json split with per-class AUCs, their intervals and the tuned thresholds' rates."""
    rates = {name: {c: v for c in CLASSES} for name, v in (("prevalence", prevalence), ("sensitivity", sensitivity),
                                                             ("specificity", specificity))}
    return {"patients": 90, "at_0.5": {"auc": auc, "auc_macro": 0.7}, "odir": {"final": 0.6, "kappa": 0.3},
            "ci95": {"at_0.5": {"auc": ci, "auc_macro": [0.6, 0.8]}, "odir": {"final": [0.55, 0.65]}},
            "per_class": rates}


def good(c) -> tuple:
    return 0.8, [0.7, 0.9]


def report(**overrides) -> dict:
    auc = {c: good(c)[0] for c in CLASSES}
    ci = {c: good(c)[1] for c in CLASSES}
    out = {"thresholds": {c: 0.5 for c in CLASSES}, "config": {"img_px": 128, "epochs": 15},
           "epochs": {"reached": 7, "of": 15, "stopped_by": "early stopping"}, "data": {"folder": "/d"},
           "counts": {"train": 400}, "validation": split(auc, ci), "test": split(dict(auc), dict(ci))}
    for path, value in overrides.items():
        where, key, c = path.split("__")
        target = {"auc": out[where]["at_0.5"]["auc"], "ci": out[where]["ci95"]["at_0.5"]["auc"]}[key]
        target[c] = value
    return out


def test_a_class_whose_auc_interval_includes_chance_is_untrusted_on_either_split():
    r = report(test__auc__O=0.457, test__ci__O=[0.38, 0.55], validation__auc__G=0.6, validation__ci__G=[0.45, 0.75])
    got = untrusted_classes(r, CLASSES)
    assert list(got) == ["G", "O"]  # in class order
    assert got["O"] == "no better than chance on this model's test patients (AUC 0.46 [0.38, 0.55])"
    assert got["G"].startswith("no better than chance on this model's validation patients")
    assert untrusted_lines({"O": got["O"]}) == [
        "O: no better than chance on this model's test patients (AUC 0.46 [0.38, 0.55]); its column is shown but "
        "not used for flags"]
    assert untrusted_classes(report(), CLASSES) == {}  # every interval above 0.5: all trusted


def test_a_threshold_that_calls_most_patients_positive_is_untrusted():
    r = report()
    r["test"]["per_class"]["specificity"]["O"] = 0.02  # 252 false positives against 6 true negatives, nearly
    r["test"]["per_class"]["sensitivity"]["O"] = 1.0
    assert untrusted_classes(r, CLASSES) == {"O": "its threshold calls 98% of this model's test patients positive"}
    assert positive_rate(r["test"]["per_class"], "O") == pytest.approx(0.2 * 1.0 + 0.8 * 0.98)
    assert positive_rate({}, "O") is None  # a report from before the per-class rates: not judged on it


def test_model_quality_carries_the_test_figures_and_how_far_training_went():
    q = model_quality(report(test__auc__O=0.45, test__ci__O=[0.3, 0.6]))
    assert q["split"] == "test" and q["final"] == {"value": 0.6, "ci95": [0.55, 0.65]}
    assert q["epochs"] == "stopped at epoch 7 of 15 (early stopping)" and q["img_px"] == 128
    assert list(q["untrusted"]) == ["O"]
    text = quality_text(q)
    assert text.startswith("test (90 patients): official final 0.600 [0.55, 0.65] · kappa 0.300") and \
        "AUC macro 0.700 [0.60, 0.80]" in text and "128 px · trained on /d (400 patients)" in text
    assert model_quality(None) == {} and "unknown" in quality_text({})


def test_score_raises_no_flag_from_an_untrusted_class():
    from odir_dual.deploy.predictions import flag_status

    pred = [1, 0, 0, 0, 0, 0, 0, 1]  # N and O
    assert flag_status("ok", CLASSES, pred) == "ok; normal together with O"
    assert flag_status("ok", CLASSES, pred, {"O": "no better than chance"}) == "ok"


def test_report_page_and_model_card_name_the_untrusted_class():
    from odir_dual.deploy.modelcard import _untrusted_section
    from odir_dual.deploy.report import untrusted_html

    r = report(test__auc__O=0.45, test__ci__O=[0.3, 0.6])
    page = "".join(untrusted_html(untrusted_classes(r, CLASSES)))
    assert "O other</b>: no better than chance on this model&#x27;s test patients" in page
    assert "its column is shown but not used for flags" in page
    card = "\n".join(_untrusted_section(r))
    assert "## Classes not to be trusted" in card and "**O other**: no better than chance" in card


def test_the_onnx_metadata_carries_the_quality_and_the_untrusted_classes(tmp_path):
    import json

    from odir_dual import export

    ckpt = {"classes": list(CLASSES), "thresholds": [0.5] * 8, "img_px": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
            "config": {"backbone": "b"}, "commit": "c", "epoch": 3, "best": {}}
    r = report(test__auc__O=0.45, test__ci__O=[0.3, 0.6])
    meta = export.metadata(ckpt, precision="fp32", exporter="dynamo", opset=20, source=tmp_path / "best.pt",
                           report=r)
    quality = json.loads(meta["quality"])
    assert quality == json.loads(json.dumps(model_quality(r))) and list(quality["untrusted"]) == ["O"]
    assert json.loads(export.metadata(ckpt, precision="fp32", exporter="dynamo", opset=20,
                                      source=tmp_path / "best.pt")["quality"]) == {}
