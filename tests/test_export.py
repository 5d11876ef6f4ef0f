"""export.py: a tiny checkpoint (random weights, test_convnext at 64 px) exported to ONNX and checked against PyTorch.

`tiny_checkpoint` and `tiny_onnx` are shared with tests/test_score.py (imported there; built once per session).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from odir_dual.model import factory
from odir_dual.training import checkpoint
from odir_dual.training import config
from odir_dual import export
from odir_dual.deploy import runtime
from odir_dual.pipeline.constants import CLASSES

THRESHOLDS = np.round(np.linspace(0.3, 0.65, len(CLASSES)), 3)  # distinct per class, so a mix-up shows
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = {"backbone": "test_convnext", "pretrained": False, "img_px": 64, "embed_dim": 32, "heads": 8}
_BUILT: dict = {}  # one export per test session, whichever test module asks first


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A best.pt exactly as train.py writes it, for a tiny random-weight model."""
    torch.manual_seed(seed)
    cfg = config.resolve_config({**TINY, **overrides})
    model = factory.build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = checkpoint.checkpoint_payload(model, cfg, thresholds=THRESHOLDS, mean=MEAN, std=STD, epoch=1, step=1,
                                            best={"f1_macro": 0.1, "epoch": 1})
    checkpoint.save_checkpoint(payload, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """RUN/best.pt of a tiny test_convnext model (64 px, random weights)."""
    if "ckpt" not in _BUILT:
        _BUILT["ckpt"] = make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt")
    return _BUILT["ckpt"]


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint) -> dict:
    """The tiny checkpoint exported (fp32, default options): export()'s result dict plus the checkpoint path."""
    if "onnx" not in _BUILT:
        result = export.export(tiny_checkpoint, log=lambda *a: None)
        _BUILT["onnx"] = {**result, "checkpoint": tiny_checkpoint}
    return _BUILT["onnx"]


def tiny_net(ckpt_path: Path):
    """The PyTorch reference model of a checkpoint (eval, fp32)."""
    return checkpoint.model_from_checkpoint(checkpoint.read_checkpoint(ckpt_path))


# ----------------------------------------------------------------------------------------------- the ONNX file


def test_export_writes_checked_model_with_metadata(tiny_onnx):
    import onnx

    path = tiny_onnx["path"]
    assert path == tiny_onnx["checkpoint"].with_suffix(".onnx") and path.is_file()
    assert not list(path.parent.glob(".*checking*")), "temporary file left behind"
    assert tiny_onnx["exporter"] == "dynamo" and tiny_onnx["opset"] >= 18
    assert tiny_onnx["diffs"]["random"] <= export.FP32_TOL
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["format"] == runtime.ONNX_FORMAT == "odir-dual-onnx/1"
    assert json.loads(meta["classes"]) == list(CLASSES)
    np.testing.assert_allclose(json.loads(meta["thresholds"]), THRESHOLDS)
    assert int(meta["img_px"]) == 64 and int(meta["prepare_px"]) == 64
    np.testing.assert_allclose(json.loads(meta["mean"]), MEAN)
    np.testing.assert_allclose(json.loads(meta["std"]), STD)
    assert meta["backbone"] == "test_convnext" and meta["commit"] and meta["precision"] == "fp32"
    assert json.loads(meta["config"])["embed_dim"] == 32
    # inputs left/right (N, 3, 64, 64) float32 with a symbolic batch; outputs probs and logits (N, 8)
    elem = onnx.TensorProto.FLOAT
    for io, names in ((m.graph.input, ["left", "right"]), (m.graph.output, ["probs", "logits"])):
        assert [v.name for v in io] == names
        for v in io:
            assert v.type.tensor_type.elem_type == elem
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 64, 64]
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == len(CLASSES)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_pytorch_any_batch(tiny_onnx, batch):
    session = runtime.ort_session(tiny_onnx["path"])
    net = tiny_net(tiny_onnx["checkpoint"])
    g = torch.Generator().manual_seed(batch)
    left, right = (torch.randn(batch, 3, 64, 64, generator=g) for _ in range(2))
    probs, logits = session.run(["probs", "logits"], {"left": left.numpy(), "right": right.numpy()})
    with torch.no_grad():
        ref = net(left, right)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(probs, torch.sigmoid(ref).numpy(), atol=1e-4)
    # the eyes are separate inputs: swapping them changes the answer (a graph fed one input twice would not)
    swapped = session.run(["probs"], {"left": right.numpy(), "right": left.numpy()})[0]
    assert np.abs(swapped - probs).max() > 1e-4


def test_onnx_matches_pytorch_on_real_images(tiny_onnx, odir256):
    pairs, note = export.check_pairs(tiny_onnx["checkpoint"], {}, odir256, n=12)
    assert len(pairs) == 12, note
    net = tiny_net(tiny_onnx["checkpoint"])
    left, right = export.real_inputs(pairs, checkpoint.read_checkpoint(tiny_onnx["checkpoint"]))
    assert left.shape == (12, 3, 64, 64)
    assert export.max_prob_diff(runtime.ort_session(tiny_onnx["path"]), net, left, right, fp16=False) <= 1e-4


def test_real_image_check_defaults_to_the_runs_validation_split(tmp_path, odir256):
    run = tmp_path / "run"
    ckpt_path = make_checkpoint(run / "best.pt", data=str(odir256))
    # split.csv as train.py writes it (pipeline.split.save_split): id,split
    (run / "split.csv").write_text("id,split\n0,val\n4,val\n5,val\n7,train\n")
    pairs, note = export.check_pairs(ckpt_path, checkpoint.read_checkpoint(ckpt_path))
    assert note.startswith("3 validation pairs") and len(pairs) == 3
    assert all(Path(p).name.startswith(("0_", "4_", "5_")) for pair in pairs for p in pair)
    # no split.csv beside the checkpoint: skipped with a note, not an error
    (run / "split.csv").unlink()
    pairs, note = export.check_pairs(ckpt_path, checkpoint.read_checkpoint(ckpt_path))
    assert pairs == [] and "split.csv" in note


def test_disagreement_fails_loudly(tiny_onnx, tmp_path):
    other = checkpoint.model_from_checkpoint(checkpoint.read_checkpoint(make_checkpoint(tmp_path / "b.pt", seed=1)))
    with pytest.raises(export.ExportCheckError, match="disagree"):
        export.run_checks(tiny_onnx["path"], other, {"img_px": 64}, [], "none", fp16=False, log=lambda *a: None)


def test_fp16_export(tiny_checkpoint, tmp_path):
    out = tmp_path / "m16.onnx"
    result = export.export(tiny_checkpoint, out, fp16=True, log=lambda *a: None)
    assert result["precision"] == "fp16" and out.is_file()
    session = runtime.ort_session(out)
    assert [i.type for i in session.get_inputs()] == ["tensor(float16)"] * 2
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"] * 2  # outputs stay float32
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["precision"] == "fp16" and meta["input_dtype"] == "float16"
    net = tiny_net(tiny_checkpoint)
    g = torch.Generator().manual_seed(7)
    left, right = (torch.randn(4, 3, 64, 64, generator=g) for _ in range(2))
    assert export.max_prob_diff(session, net, left, right, fp16=True) <= export.FP16_TOL


def test_torchscript_fallback_exporter(tiny_checkpoint, tmp_path):
    out = tmp_path / "ts.onnx"
    result = export.export(tiny_checkpoint, out, exporter="torchscript", log=lambda *a: None)
    assert result["exporter"] == "torchscript" and result["diffs"]["random"] <= export.FP32_TOL
    session = runtime.ort_session(out)
    assert session.get_modelmeta().custom_metadata_map["exporter"] == "torchscript"
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    assert session.run(["probs"], {"left": x, "right": x[::-1].copy()})[0].shape == (3, len(CLASSES))


# ----------------------------------------------------------------------------------------------- not our file


class _NotPlainData:
    pass


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    text = tmp / "notes.pt"
    text.write_text("these are not weights\n")
    other = tmp / "other.pt"
    torch.save({"format": "someone-else/2", "model": {}}, other)
    plain = tmp / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    objects = tmp / "objects.pt"
    with open(objects, "wb") as f:
        torch.save({"x": _NotPlainData()}, f, pickle_module=pickle)
    return {"text": (text, "not a PyTorch checkpoint"), "other format": (other, "not an odir-dual checkpoint"),
            "no format": (plain, "not an odir-dual checkpoint"), "objects": (objects, "weights_only=True"),
            "missing": (tmp / "absent.pt", "no such checkpoint"), "empty run folder": (tmp, "no such checkpoint")}


def test_not_our_checkpoint_is_a_clear_error(tmp_path, capsys):
    for case, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(checkpoint.CheckpointError, match=message) as err:
            checkpoint.read_checkpoint(path)
        assert str(path if path.suffix else path / "best.pt") in str(err.value), case
        # the command line: exit status 1, one line on stderr naming the file
        assert export.main([str(path), "-o", str(tmp_path / "x.onnx")]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("export.py: error:") and path.name in lines[0], (case, lines)
    assert not (tmp_path / "x.onnx").exists()


def test_real_image_check_uses_the_runs_recorded_data_folder(tmp_path):
    """train.py records the folder it trained on (for a demo run: the synthetic set's cache folder); export.py
    compares on that run's validation images."""
    import pandas as pd
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for pid in (1, 2, 3):
        for eye in ("left", "right"):
            Image.new("RGB", (32, 32), (200, 90, 40)).save(data / "images" / f"{pid}_{eye}.jpg")
        rows.append({"ID": pid, "Left-Fundus": f"{pid}_left.jpg", "Right-Fundus": f"{pid}_right.jpg",
                     **dict.fromkeys(CLASSES, 0), "N": 1})
    pd.DataFrame(rows).to_csv(data / "sheet.csv", index=False)
    ckpt_path = make_checkpoint(tmp_path / "run" / "best.pt", data=str(data))
    (tmp_path / "run" / "split.csv").write_text("id,split\n1,train\n2,val\n3,val\n")
    pairs, note = export.check_pairs(ckpt_path, checkpoint.read_checkpoint(ckpt_path))
    assert [Path(left).name for left, _ in pairs] == ["2_left.jpg", "3_left.jpg"], note
    nameless = make_checkpoint(tmp_path / "run2" / "best.pt")
    (tmp_path / "run2" / "split.csv").write_text("id,split\n1,train\n2,val\n")
    pairs, note = export.check_pairs(nameless, checkpoint.read_checkpoint(nameless))
    assert pairs == [] and "does not name its data folder" in note


def test_onnx_probs_are_the_checkpoints_calibrated_probabilities(tmp_path):
    from odir_dual.model.calibration import apply_calibration

    path = make_checkpoint(tmp_path / "run" / "best.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["calibration"] = {"method": "platt", "a": [0.5 + 0.1 * k for k in range(8)], "b": [-1.0 + 0.25 * k
                                                                                           for k in range(8)]}
    torch.save(ckpt, path)
    out = export.export(path, log=lambda *a: None)["path"]
    session = runtime.ort_session(out)
    assert json.loads(session.get_modelmeta().custom_metadata_map["calibration"]) == ckpt["calibration"]
    g = torch.Generator().manual_seed(3)
    left, right = (torch.randn(4, 3, 64, 64, generator=g).numpy() for _ in range(2))
    probs, logits = session.run(["probs", "logits"], {"left": left, "right": right})
    np.testing.assert_allclose(probs, apply_calibration(logits, ckpt["calibration"]), atol=1e-6)
    assert np.abs(probs - 1 / (1 + np.exp(-logits))).max() > 0.05  # the calibration really changed them


def test_the_cpu_presets_extras_export_the_patient_output(tmp_path):
    """The per-eye head (training only) stays out of the graph; the local-contrast layer goes in it."""
    path = make_checkpoint(tmp_path / "run" / "best.pt", eye_loss_weight=1.0, local_contrast=1 / 60)
    ckpt = torch.load(path, weights_only=True)
    assert any(k.startswith("eye_head.") for k in ckpt["model"])
    out = export.export(path, log=lambda *a: None)["path"]
    session = runtime.ort_session(out)
    assert [o.name for o in session.get_outputs()] == ["probs", "logits"]
    left, right = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    (logits,) = session.run(["logits"], {"left": left.numpy(), "right": right.numpy()})
    expected = checkpoint.model_from_checkpoint(ckpt)(left, right).detach().numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_a_widened_backbone_and_an_ensemble_are_rebuilt_from_the_checkpoint_and_exported(tmp_path):
    """--backbone-args and --ensemble travel in the checkpoint's config: export.py rebuilds the same widths and
    members, so the weights load, and the ONNX graph gives the members' mean logits."""
    args = '{"channels": [16, 24, 24, 40]}'
    path = make_checkpoint(tmp_path / "run" / "best.pt", backbone="test_resnet", backbone_args=args, ensemble=2)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"]["members.1.backbone.layer4.0.conv2.weight"].shape[0] == 40  # test_resnet's own has 96
    out = export.export(path, log=lambda *a: None)["path"]
    left, right = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    (logits,) = runtime.ort_session(out).run(["logits"], {"left": left.numpy(), "right": right.numpy()})
    members = checkpoint.model_from_checkpoint(ckpt).members
    expected = sum(m(left, right) for m in members).detach().numpy() / 2
    np.testing.assert_allclose(logits, expected, atol=1e-4)
