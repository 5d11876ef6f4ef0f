"""Why the network said what it said: Grad-CAM per eye and the cross-attention maps between the eyes.

Pure tensor functions on a `DualEyeNet` (or an ensemble of them) in eval mode (no I/O; drawing and files live in
report.py):

    ex = explain_pair(model, left, right, classes=[1, 4])   # left, right: (B, 3, H, W), normalised
    ex.cams[1]          # (left (B, H, W), right (B, H, W)): Grad-CAM of class 1 (D) on each eye, in [0, 1]
    ex.attention        # {"left_to_right": (B, H, W) over the RIGHT eye, "right_to_left": (B, H, W) over the LEFT}

Grad-CAM (Selvaraju et al. 2017) on the backbone's last stage; one backward pass per class explains every eye of
the batch (both eyes share the backbone's batch of 2B). ONNX has no gradients: explanations need the PyTorch
checkpoint. Why written here rather than taken from the `grad-cam` package: docs/DESIGN-NOTES.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from odir_dual.model.net import DualEyeEnsemble


@dataclass
class Explanation:
    """One batch of pairs explained. Maps are float32 on the CPU, (B, H, W) at the input size, each in [0, 1]."""

    logits: torch.Tensor  # (B, K)
    probs: torch.Tensor  # (B, K) sigmoid of the logits (uncalibrated)
    cams: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # class → (left, right)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # direction → map over the attended eye
    grid_hw: tuple[int, int] = (0, 0)  # (h, w) of the last stage: the maps' true resolution


def last_stage(model: nn.Module) -> nn.Module:
    """The backbone module whose output Grad-CAM explains: the last entry of timm's ``feature_info``."""
    backbone = model.backbone
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__}: no feature_info, cannot find its last stage for Grad-CAM")
    name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    return backbone.get_submodule(name)


def explain_pair(model: nn.Module, left: torch.Tensor, right: torch.Tensor, classes=None,
                 attention: bool = True) -> Explanation:
    """Probabilities, Grad-CAM maps of the asked classes for both eyes, and the cross-attention maps.

    Args:
        model: a DualEyeNet with a convolutional backbone (NCHW or NHWC last stage), in eval mode.
        left, right: (B, 3, H, W) normalised images, as the network sees them.
        classes: class indices to explain; None: every class predicted above 0.5 in any pair of the batch.
        attention: also compute the cross-attention maps.

    Returns:
        an `Explanation`; ``cams[k]`` = (left maps, right maps), each (B, H, W) in [0, 1] (0 everywhere when
        no location raises the logit).
    """
    if model.training:
        raise ValueError("explain_pair needs the model in eval mode (model.eval()): dropout and batch statistics "
                         "would make the maps random and mix the pairs of a batch")
    if isinstance(model, DualEyeEnsemble):
        return _explain_ensemble(model, left, right, classes, attention)
    attention = attention and model.left_to_right is not None  # the concat head has no attention to map
    stage, saved = last_stage(model), {}
    hooks = [stage.register_forward_hook(lambda m, i, out: saved.__setitem__("feats", out))]
    if attention:
        hooks.append(model.left_to_right.register_forward_hook(
            lambda m, args, out: saved.__setitem__("l2r", args)))
        hooks.append(model.right_to_left.register_forward_hook(
            lambda m, args, out: saved.__setitem__("r2l", args)))
    try:
        with torch.enable_grad():  # inputs that need grad: a graph to the features even with frozen weights
            logits = model(left.detach().requires_grad_(), right.detach().requires_grad_())  # (B, K)
    finally:
        for h in hooks:
            h.remove()
    feats = saved["feats"]  # (2B, C, h, w), or (2B, h, w, C) for NHWC backbones
    if feats.ndim != 4:
        raise ValueError(f"Grad-CAM needs a spatial last stage; {type(stage).__name__} gives {tuple(feats.shape)}")
    nhwc = bool(getattr(model, "_nhwc", False))
    probs = torch.sigmoid(logits.detach().float())
    if classes is None:
        classes = torch.nonzero((probs > 0.5).any(dim=0)).flatten().tolist()
    size_hw = tuple(left.shape[-2:])
    out = Explanation(logits=logits.detach().float().cpu(), probs=probs.cpu(), grid_hw=tuple(feats.shape[1:3] if nhwc else feats.shape[-2:]))
    for n, k in enumerate(classes):
        (grads,) = torch.autograd.grad(logits[:, k].sum(), feats, retain_graph=n + 1 < len(classes))
        cam = grad_cam(feats.detach(), grads, nhwc=nhwc, size_hw=size_hw)  # (2B, H, W)
        batch = left.shape[0]
        out.cams[int(k)] = (cam[:batch], cam[batch:])
    if attention:
        out.attention = {"left_to_right": _attention_map(model.left_to_right, *saved["l2r"], out.grid_hw, size_hw),
                         "right_to_left": _attention_map(model.right_to_left, *saved["r2l"], out.grid_hw, size_hw)}
    return out


def _explain_ensemble(model: nn.Module, left, right, classes, attention: bool) -> Explanation:
    """An ensemble's explanation: its mean probabilities, and the mean of its members' maps (each member's Grad-CAM
    of the class it is asked about is that member's share of the ensemble's gradient)."""
    if classes is None:  # the classes the ensemble (not each member) predicts
        with torch.no_grad():
            probs = torch.sigmoid(model(left, right).float())
        classes = torch.nonzero((probs > 0.5).any(dim=0)).flatten().tolist()
    parts = [explain_pair(m, left, right, classes, attention) for m in model.members]
    logits = torch.stack([p.logits for p in parts]).mean(0)  # = the ensemble's: the members' mean
    mean = lambda maps: _to_size(torch.stack(maps).mean(0), None)  # noqa: E731 (each map back to a peak of 1)
    return Explanation(logits=logits, probs=torch.sigmoid(logits), grid_hw=parts[0].grid_hw,
                       cams={k: tuple(mean([p.cams[k][e] for p in parts]) for e in (0, 1)) for k in parts[0].cams},
                       attention={d: mean([p.attention[d] for p in parts]) for d in parts[0].attention})


def grad_cam(feats: torch.Tensor, grads: torch.Tensor, *, nhwc: bool = False, size_hw=None) -> torch.Tensor:
    """Grad-CAM maps from a stage's activations and the gradients of one class score with respect to them.

    Args:
        feats, grads: (N, C, h, w), or (N, h, w, C) with ``nhwc``.
        size_hw: (H, W) to upsample to (bilinear); None keeps (h, w).

    Returns:
        (N, H, W) float32 on the CPU, each map scaled to a maximum of 1 (all zeros when none is positive).
    """
    if nhwc:
        feats, grads = feats.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)  # → (N, C, h, w)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): importance of each channel
    cam = F.relu((weights * feats.float()).sum(dim=1))  # (N, h, w)
    return _to_size(cam, size_hw)


def _attention_map(module: nn.Module, query: torch.Tensor, context: torch.Tensor, grid_hw, size_hw) -> torch.Tensor:
    """Where the query eye's tokens attend in the context eye: weights averaged over heads and query tokens,
    laid out on the context eye's (h, w) grid and upsampled; (B, H, W) scaled to [0, 1] (min to max)."""
    with torch.no_grad():
        _, weights = module.attn(query, context, context, need_weights=True, average_attn_weights=True)  # (B, Tq, Tc)
    h, w = grid_hw
    if weights.shape[-1] != h * w:
        raise ValueError(f"attention over {weights.shape[-1]} tokens does not match the {h}x{w} feature grid")
    maps = weights.float().mean(dim=1).reshape(-1, h, w)  # (B, Tc) → (B, h, w)
    # Attention weights sum to 1 over the tokens, so the map is never 0: show its contrast (min → 0, max → 1).
    maps = maps - maps.flatten(1).amin(dim=1)[:, None, None]
    return _to_size(maps, size_hw)  # (B, H, W)


def _to_size(maps: torch.Tensor, size_hw) -> torch.Tensor:
    """(N, h, w) → (N, H, W) bilinear, each map divided by its maximum; CPU float32."""
    if size_hw is not None and tuple(maps.shape[-2:]) != tuple(size_hw):
        maps = F.interpolate(maps[:, None], size=tuple(size_hw), mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]  # (N, 1, 1)
    return (maps / peak).detach().cpu()


def cam_peak(cam: torch.Tensor) -> tuple[float, float]:
    """(x, y) in pixels (pixel centres) of a map's maximum; the first one on ties."""
    h, w = cam.shape[-2:]
    i = int(torch.argmax(cam.reshape(-1)))
    return i % w + 0.5, i // w + 0.5
