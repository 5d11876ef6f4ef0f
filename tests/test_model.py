"""DualEyeNet on timm's tiny test backbones (random init, 64 px): shapes, eye asymmetry, gradients,
channels_last, torch.compile, ONNX export, local weights file, parameter groups."""

import warnings

import numpy as np
import pytest
import timm
import torch

from odir_dual.model.loss import eye_loss
from odir_dual.model.net import DualEyeNet, backbone_norm, count_parameters

PX = 64  # stride-32 backbones give 2x2 = 4 tokens per eye
TINY = dict(embed_dim=32, heads=8, dropout=0.0)


def _pair(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, PX, PX, generator=g), torch.randn(batch, 3, PX, PX, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DualEyeNet("test_convnext", **TINY).eval()


# CNN (NCHW), CNN with BatchNorm, EfficientNet, ViT tokens (B, T, C), NHWC feature maps
@pytest.mark.parametrize("name", ["test_convnext", "test_resnet", "test_efficientnet", "test_vit", "test_mambaout"])
def test_output_shape(name):
    model = DualEyeNet(name, num_classes=8, **TINY).eval()
    with torch.no_grad():
        out = model(*_pair(3))
    assert out.shape == (3, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_timm_contract_features_head_forward(tiny):
    left, right = _pair()
    with torch.no_grad():
        feats = tiny.forward_features(left, right)  # (B, 4D)
        hidden = tiny.forward_head(feats, pre_logits=True)  # (B, D)
        logits = tiny.forward_head(feats)
        assert feats.shape == (2, 4 * TINY["embed_dim"]) and hidden.shape == (2, TINY["embed_dim"])
        torch.testing.assert_close(logits, tiny(left, right))
        torch.testing.assert_close(logits, tiny.head[-1](hidden))


def test_eyes_are_not_interchangeable(tiny):
    left, right = _pair()
    assert tiny.left_branch.proj.weight is not tiny.right_branch.proj.weight
    with torch.no_grad():
        out, swapped = tiny(left, right), tiny(right, left)
    assert not torch.allclose(out, swapped, atol=1e-4)


def test_batch_items_independent_in_eval(tiny):
    left, right = _pair(3)
    with torch.no_grad():
        full = tiny(left, right)
        one = tiny(left[1:2], right[1:2])
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_backbone_and_head():
    torch.manual_seed(0)
    model = DualEyeNet("test_convnext", **TINY).train()
    model(*_pair()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.backbone_parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_parameter_groups_partition_the_model(tiny):
    bb, hd = list(tiny.backbone_parameters()), list(tiny.head_parameters())
    assert {id(p) for p in bb}.isdisjoint(id(p) for p in hd)
    assert len(bb) + len(hd) == len(list(tiny.parameters()))
    assert count_parameters(tiny) == sum(p.numel() for p in bb) + sum(p.numel() for p in hd)
    assert count_parameters(tiny.backbone) == sum(p.numel() for p in timm.create_model("test_convnext", num_classes=0).parameters())
    tiny.backbone.requires_grad_(False)
    try:
        assert count_parameters(tiny, trainable_only=True) == sum(p.numel() for p in hd)
    finally:
        tiny.backbone.requires_grad_(True)


def test_channels_last(tiny):
    left, right = _pair()
    cl = tiny.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            out_cl = cl(left.to(memory_format=torch.channels_last), right.to(memory_format=torch.channels_last))
    finally:
        tiny.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        ref = tiny(left, right)
    torch.testing.assert_close(out_cl, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~75 s of Inductor compilation on a 2-core CPU
def test_torch_compile(tiny):
    left, right = _pair()
    compiled = torch.compile(tiny)
    with torch.no_grad():
        ref, out = tiny(left, right), compiled(left, right)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_matches_torch(tiny, tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    path = tmp_path / "tiny.onnx"
    names = dict(input_names=["left", "right"], output_names=["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter's DeprecationWarning, dynamo's axis-name notice
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(tiny, _pair(2), str(path), dynamo=True, verbose=False,
                              dynamic_shapes={"left": {0: batch}, "right": {0: batch}}, **names)
        else:
            torch.onnx.export(tiny, _pair(2), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={k: {0: "batch"} for k in ("left", "right", "logits")}, **names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 3):  # dynamic batch, different from the export batch
        left, right = _pair(batch_size, seed=batch_size)
        (got,) = session.run(None, {"left": left.numpy(), "right": right.numpy()})
        with torch.no_grad():
            ref = tiny(left, right).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_weights_file_loads_backbone(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("test_convnext")  # with its classifier, as a real checkpoint would be
    path = tmp_path / "test_convnext.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    model = DualEyeNet("test_convnext", weights_file=str(path), **TINY)
    saved = source.state_dict()
    loaded = model.backbone.state_dict()
    assert set(loaded) <= set(saved)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0, msg=key)
    # pretrained=True with a file behaves the same; random init differs
    same = DualEyeNet("test_convnext", pretrained=True, weights_file=path, **TINY)
    torch.testing.assert_close(same.backbone.state_dict(), loaded, atol=0, rtol=0)
    random = DualEyeNet("test_convnext", **TINY)
    assert not torch.equal(random.backbone.stem[0].weight, loaded["stem.0.weight"])


def test_backbone_norm_and_data_config(tiny):
    assert backbone_norm("test_convnext") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert backbone_norm("convnext_small") == imagenet
    assert backbone_norm("convnext_small.fb_in22k_ft_in1k") == imagenet
    assert backbone_norm("no_such_model_xyz") == imagenet
    assert tuple(tiny.data_config["mean"]) == (0.5, 0.5, 0.5)
    assert tiny.config["backbone"] == "test_convnext" and tiny.config["embed_dim"] == 32


def test_bad_heads_rejected():
    with pytest.raises(ValueError, match="divisible"):
        DualEyeNet("test_convnext", embed_dim=30, heads=8)


def test_model_prints_nothing(capsys):
    model = DualEyeNet("test_resnet", **TINY).eval()
    with torch.no_grad():
        model(*_pair(1))
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_convnext_small_parameter_count():
    model = DualEyeNet("convnext_small")
    assert count_parameters(model.backbone) == 49_454_688  # ConvNeXt-Small without its 1000-class classifier
    assert count_parameters(model) == 53_400_680


def test_local_contrast_keeps_edges_and_drops_the_illumination():
    from odir_dual.model.net import LocalContrast

    layer = LocalContrast(sigma_px=2.0)
    ramp = torch.linspace(-2, 2, 64).expand(1, 3, 64, 64)  # a slow brightness gradient across the photograph
    assert layer(ramp)[..., 8:-8, 8:-8].abs().max() < 1e-4  # straight-line illumination cancels inside
    assert layer(torch.full((1, 3, 32, 32), 0.7)).abs().max() < 1e-5  # and a colour cast everywhere
    spot = torch.zeros(1, 3, 32, 32)
    spot[..., 16, 16] = 1.0  # a small lesion stands out
    out = layer(spot)
    assert out[..., 16, 16].min() > 3.0 and out.abs().sum() < 10 * out[..., 16, 16].sum()


def test_an_ensemble_averages_its_members_and_trains_each_on_its_own_loss():
    """The output is the mean of the members' logits; one training step gives each member exactly the gradient of
    its own loss (halved: the loss is the members' mean), as two separate runs on the same batch would."""
    from odir_dual.training import config
    from odir_dual.training import engine
    from odir_dual.model.net import DualEyeEnsemble

    torch.manual_seed(0)
    members = [DualEyeNet("test_resnet", eye_head=True, **TINY) for _ in range(2)]
    ensemble = DualEyeEnsemble(members)
    left, right = _pair(4)
    ensemble.eval()
    with torch.no_grad():
        mean = ensemble(left, right)
        torch.testing.assert_close(mean, (members[0](left, right) + members[1](left, right)) / 2)
        stacked, eyes = ensemble(left, right, eye_logits=True, per_member=True)
    assert stacked.shape == (2, 4, 8) and eyes.shape == (2, 4, 2, 8)
    assert not torch.allclose(stacked[0], stacked[1])  # each member starts from its own random weights
    ids = [id(p) for p in ensemble.parameters()]
    assert sorted(ids) == sorted(id(p) for p in [*ensemble.backbone_parameters(), *ensemble.head_parameters()])

    cfg = config.Config(eye_loss_weight=0.5, lr=1e-3, clip_grad=0.0, accum_steps=1)
    labels = (torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    eye_labels = labels[:, None].repeat(1, 2, 1)
    ensemble.train()
    stepper = engine.make_stepper(ensemble, cfg, torch.device("cpu"), 1e-3, torch.ones(8))
    loss, logits = stepper.step(left, right, labels, update=False, eye_labels=eye_labels)
    assert logits.shape == (4, 8)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in members]
    ensemble.zero_grad()
    solo = []
    for m in members:
        out, eye = m(left, right, eye_logits=True)
        own = stepper.loss_fn(out, labels) + 0.5 * eye_loss(eye, eye_labels)
        own.backward()
        solo.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    for g, s in zip(grads, solo):
        torch.testing.assert_close(g, s / 2, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,first_stage", [("test_resnet", "layer1"), ("test_convnext", "stages.0"),
                                              ("test_efficientnet", "blocks.0")])
def test_freeze_stages_stops_gradients_and_batch_norm_statistics(name, first_stage):
    """--freeze-stages N: the stem and the first N stages get no gradient and keep their batch-norm statistics; the
    later stages and the head still learn. More stages than the backbone has is an error naming it."""
    net = DualEyeNet(name, embed_dim=32, heads=4)
    net.freeze_stages(1)
    frozen = {n for n, p in net.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(first_stage) or not n.split(".")[0].startswith(("layer", "stages", "blocks"))
                          for n in frozen)
    assert any(p.requires_grad for p in net.backbone.parameters()) and all(p.requires_grad for p in net.head_parameters())
    buffers = {n: b.clone() for n, b in net.backbone.named_buffers() if n.startswith(first_stage)}
    assert buffers or name == "test_convnext"  # ConvNeXt has LayerNorms: no statistics to keep
    net.train()
    x = torch.randn(2, 3, 64, 64)
    net(x, x).sum().backward()
    assert all(torch.equal(b, dict(net.backbone.named_buffers())[n]) for n, b in buffers.items())
    with pytest.raises(ValueError, match="has .* stages"):
        DualEyeNet(name, embed_dim=32, heads=4).freeze_stages(99)


def test_concat_head_is_a_plain_fine_tunes_head():
    """--head concat: both eyes' pooled backbone features side by side → dropout → one linear layer; the eyes stay
    distinguishable (left's features meet other weights than right's), and the per-eye head reads each eye alone."""
    torch.manual_seed(0)
    model = DualEyeNet("test_convnext", head="concat", eye_head=True, **TINY).eval()
    width = model.backbone.num_features
    assert model.left_to_right is None and [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]
    assert model.head[-1].in_features == 2 * width
    left, right = _pair(3)
    with torch.no_grad():
        feats = model.forward_features(left, right)
        logits, eyes = model(left, right, eye_logits=True)
        swapped = model(right, left)
        alone = model.backbone.forward_head(model.backbone.forward_features(left), pre_logits=True).mean((2, 3))
    assert feats.shape == (3, 2 * width) and logits.shape == (3, 8) and eyes.shape == (3, 2, 8)
    torch.testing.assert_close(feats[:, :width], alone, atol=1e-5, rtol=1e-5)  # the left half is the left eye
    torch.testing.assert_close(eyes[:, 0], model.eye_head(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, swapped, atol=1e-4)
    from odir_dual.model.explain import explain_pair
    ex = explain_pair(model, left, right, classes=[0])
    assert ex.attention == {} and ex.cams[0][0].shape == (3, PX, PX)
