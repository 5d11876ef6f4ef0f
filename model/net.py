"""Dual-eye network: one shared timm backbone, per-eye branches, two-way cross-attention, fusion MLP.

    left  (B,3,H,W) ─┐                  ┌─ left branch  (B,T,D) ─┬─ left attends right ─┐
                     ├─ backbone (2B) ──┤                        ×                      ├─ mean pool ×4 ─ MLP ─ logits (B,K)
    right (B,3,H,W) ─┘                  └─ right branch (B,T,D) ─┴─ right attends left ─┘

Options: `head="concat"` replaces branches, attention and MLP by a plain fine-tune's head (both eyes' pooled backbone
features side by side → dropout → one linear layer); `LocalContrast` before the backbone (Graham's fundus normalisation, fixed weights), and a per-eye classifier
on each eye's pooled branch tokens (`eye_head`, trained on the per-eye diagnostic keywords; not in the patient output).
`DualEyeEnsemble` averages the logits of several such networks.
The model returns logits (no sigmoid) and does no I/O; the loss lives in model/loss.py.
"""

from __future__ import annotations

import re
from typing import Iterator

import timm
import torch
from timm.data import resolve_model_data_config
from timm.utils.model import freeze
from torch import nn

from odir_dual.common.errors import OdirError
from odir_dual.pipeline.constants import IMAGENET_MEAN, IMAGENET_STD


def backbone_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation the backbone's pretrained weights expect, from timm's registry (no download).

    Args:
        name: a timm model name, with or without a pretrained tag (``"convnext_small"``,
            ``"convnext_small.fb_in22k_ft_in1k"``).

    Returns:
        ``(mean, std)``, each a 3-tuple in [0, 1] pixel units; ImageNet defaults when timm has no
        pretrained config for the name.
    """
    cfg = timm.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of a module.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class BackboneError(OdirError, ValueError):
    """A backbone that cannot do what a flag asks (e.g. --freeze-stages beyond its stages)."""


class EyeBranch(nn.Module):
    """Per-eye projection of backbone tokens: Linear(C→D), LayerNorm, GELU, Dropout.

    Args:
        in_dim: backbone feature channels C.
        embed_dim: token width D after projection.
        dropout: dropout probability after the activation.
    """

    def __init__(self, in_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, T, D)."""
        return self.drop(self.act(self.norm(self.proj(tokens))))


class LocalContrast(nn.Module):
    """Ben Graham's fundus normalisation (Kaggle diabetic retinopathy 2015) as the network's first, fixed layer:
    4 × (image − its Gaussian blur), per channel. It removes what varies between cameras (brightness, colour cast,
    vignetting) and keeps lesions and vessels; inside the model, it is exported with it (docs/DESIGN-NOTES.md).

    Args:
        sigma_px: the blur's standard deviation in pixels (Graham: the fundus radius / 30).
    """

    def __init__(self, sigma_px: float):
        super().__init__()
        self.sigma_px, self.half = float(sigma_px), max(1, int(3 * sigma_px + 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, 3, H, W), same memory format."""
        # The taps are made here, not held as a buffer: a constant has nothing to checkpoint or for DDP to broadcast
        # (DDP's per-step buffer broadcast fails on a lone channels_last buffer); compile and ONNX fold it away.
        t = torch.arange(-self.half, self.half + 1, device=x.device, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / self.sigma_px) ** 2)
        k = (g / g.sum()).to(x.dtype).expand(3, 1, 1, -1)  # (3, 1, 1, taps): one filter per channel
        blur = nn.functional.pad(x, (self.half, self.half, 0, 0), mode="replicate")
        blur = nn.functional.conv2d(blur, k, groups=3)  # along W
        blur = nn.functional.pad(blur, (0, 0, self.half, self.half), mode="replicate")
        blur = nn.functional.conv2d(blur, k.transpose(2, 3), groups=3)  # along H
        return 4.0 * (x - blur)


class CrossAttention(nn.Module):
    """Query tokens attend to context tokens, with a residual connection and post-LayerNorm.

    Args:
        embed_dim: token width D (must be divisible by ``heads``).
        heads: number of attention heads.
        dropout: dropout on the attention weights and on the residual branch.
    """

    def __init__(self, embed_dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query (B, Tq, D), context (B, Tc, D) → (B, Tq, D)."""
        attended, _ = self.attn(query, context, context, need_weights=False)  # (B, Tq, D)
        return self.norm(query + self.drop(attended))


class DualEyeNet(nn.Module):
    """Multi-label classifier over a (left, right) pair of fundus photographs.

    Both eyes go through ONE shared timm backbone in a single batch of 2B images. Each eye's spatial
    tokens then pass through their own branch (weights not shared, so the model knows which eye is
    which), each eye attends to the other with 8-head cross-attention (one attention module per
    direction), and the four mean-pooled representations are fused by an MLP into one logit per class.

    Args:
        backbone: a timm model name that accepts ``global_pool=""``. CNNs give feature maps (B, C, h, w)
            (or (B, h, w, C) for NHWC models such as Swin), ViT-like models give tokens (B, T, C); both
            become (B, T, C) tokens. (A few timm models refuse ``global_pool=""``, e.g. distilled DeiT and
            EfficientViT-MIT; timm raises at construction.)
        num_classes: number of output logits (8 for ODIR-5K).
        head: "attention" (the diagram above) or "concat": each eye's backbone features mean-pooled, the two
            side by side (B, 2C) → dropout → Linear(2C → K); ``embed_dim`` and ``heads`` are then unused.
        embed_dim: token width D of the branches and the cross-attention.
        heads: attention heads; must divide ``embed_dim``.
        dropout: dropout in the branches, the attention and the fusion MLP.
        pretrained: load timm's pretrained weights (timm may download them; the model itself does no I/O
            beyond what timm.create_model does at construction).
        weights_file: local checkpoint for the backbone (offline hosts); implies ``pretrained=True`` and
            is loaded through timm's ``pretrained_cfg_overlay=dict(file=...)``, so timm's own
            checkpoint filtering (classifier removal, key remapping) applies.
        drop_path_rate: stochastic depth rate of the backbone.
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size=384`` for a ViT).
        local_contrast_px: when > 0, the images pass `LocalContrast` with this blur (pixels) before the backbone.
        eye_head: add a per-eye classifier on each eye's pooled branch tokens (``forward(..., eye_logits=True)``),
            trained on the sheet's per-eye diagnostic keywords; the patient logits do not use it.

    Attributes:
        backbone: the shared timm feature extractor (``num_classes=0, global_pool=""``).
        data_config: timm's resolved data config of the backbone (input_size, mean, std, interpolation, ...).
        config: the constructor arguments needed to rebuild this architecture (no weights/paths).
    """

    def __init__(
        self,
        backbone: str = "convnext_small",
        num_classes: int = 8,
        head: str = "attention",
        embed_dim: int = 512,
        heads: int = 8,
        dropout: float = 0.2,
        pretrained: bool = False,
        weights_file: str | None = None,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict | None = None,
        eye_head: bool = False,
        local_contrast_px: float = 0.0,
    ):
        super().__init__()
        if head not in ("attention", "concat"):
            raise ValueError(f"head {head!r}: choose attention or concat")
        if head == "attention" and embed_dim % heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by heads ({heads})")
        self.config = dict(
            backbone=backbone,
            num_classes=num_classes,
            head=head,
            embed_dim=embed_dim,
            heads=heads,
            dropout=dropout,
            drop_path_rate=drop_path_rate,
            backbone_kwargs=dict(backbone_kwargs or {}),
            eye_head=eye_head,
            local_contrast_px=local_contrast_px,
        )
        self.local_contrast = LocalContrast(local_contrast_px) if local_contrast_px > 0 else None
        self.backbone = timm.create_model(
            backbone,
            pretrained=pretrained or weights_file is not None,
            num_classes=0,
            global_pool="",
            drop_path_rate=drop_path_rate,
            pretrained_cfg_overlay=dict(file=str(weights_file)) if weights_file is not None else None,
            **(backbone_kwargs or {}),
        )
        self.data_config = resolve_model_data_config(self.backbone)
        # NHWC backbones (Swin, MambaOut, ...) declare it; everything else 4-D is NCHW.
        fmt = getattr(self.backbone, "output_fmt", "NCHW")
        self._nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"

        # forward_head(pre_logits=True) can widen the features (MobileNetV3/V4, GhostNet, HGNetV2 conv_head).
        feat_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features  # C
        if head == "concat":  # no branches or attention: the eyes meet in the one linear layer
            self.left_branch = self.right_branch = self.left_to_right = self.right_to_left = None
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * feat_dim, num_classes))
            self.eye_dim = feat_dim  # the width of each eye's pooled vector, the per-eye head's input
        else:
            self.left_branch = EyeBranch(feat_dim, embed_dim, dropout)
            self.right_branch = EyeBranch(feat_dim, embed_dim, dropout)
            self.left_to_right = CrossAttention(embed_dim, heads, dropout)  # left queries, right keys/values
            self.right_to_left = CrossAttention(embed_dim, heads, dropout)  # right queries, left keys/values
            self.head = nn.Sequential(
                nn.Linear(4 * embed_dim, embed_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(embed_dim, num_classes),
            )
            self.eye_dim = embed_dim
        self.eye_head = nn.Linear(self.eye_dim, num_classes) if eye_head else None  # shared by both eyes

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the shared backbone (for a lower learning rate)."""
        return self.backbone.parameters()

    def freeze_stages(self, stages: int) -> None:
        """Freeze the backbone's stem and its first `stages` stages: no gradients, batch-norm statistics fixed
        (timm's FrozenBatchNorm). Call after loading pretrained weights. Why: those layers hold generic edge and
        colour filters, and their backward pass at the highest resolutions is costly (benchmarks/RESULTS.md).

        Raises:
            ValueError: the backbone has no `blocks`/`stages` sequence (timm's EfficientNet, MobileNet, ConvNeXt
                have one), or fewer stages than asked.
        """
        if stages <= 0:
            return
        names = [name for name, _ in self.backbone.named_children()]
        body = next((n for n in ("blocks", "stages") if n in names), None)  # EfficientNet, MobileNet; ConvNeXt
        if body is not None:
            stage_names = [f"{body}.{i}" for i in range(len(getattr(self.backbone, body)))]
            first = names.index(body)
        else:  # ResNet-style: layer1, layer2, ...
            stage_names = [n for n in names if re.fullmatch(r"layer\d+", n)]
            first = names.index(stage_names[0]) if stage_names else 0
        if not stage_names:
            raise BackboneError(f"--freeze-stages: {self.config['backbone']} has no `blocks`, `stages` or `layerN` to "
                             "freeze")
        if stages > len(stage_names):
            raise BackboneError(f"--freeze-stages {stages}: {self.config['backbone']} has {len(stage_names)} stages")
        freeze(self.backbone, names[:first] + stage_names[:stages])  # the stem, then the first stages
        self.config["freeze_stages"] = stages

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone: branches, cross-attention, fusion MLP."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in backbone_ids)

    def _tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone output → tokens (N, T, C)."""
        if feats.ndim == 3:  # ViT-like: already (N, T, C), prefix/class tokens included
            return feats
        if feats.ndim != 4:
            raise ValueError(f"unsupported backbone output shape {tuple(feats.shape)}")
        if self._nhwc:
            return feats.flatten(1, 2)  # (N, h, w, C) → (N, h*w, C)
        return feats.flatten(2).transpose(1, 2)  # (N, C, h, w) → (N, C, h*w) → (N, h*w, C)

    def forward_features(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Fused representation before the classifier.

        Args:
            left: left-eye images (B, 3, H, W), normalised.
            right: right-eye images (B, 3, H, W), same shape as ``left``.

        Returns:
            (B, 4 * embed_dim): [left, right, left-attends-right, right-attends-left], each mean-pooled; with the
            concat head (B, 2C): [left, right] backbone features, mean-pooled.
        """
        batch = left.shape[0]
        images = torch.cat([left, right], dim=0)  # (2B, 3, H, W)
        if self.local_contrast is not None:
            images = self.local_contrast(images)
        feats = self.backbone.forward_features(images)  # (2B, C, h, w) or (2B, T, C)
        # With global_pool="" the pre-logits head keeps the spatial/token layout but applies what timm puts
        # between the features and the classifier (ConvNeXt's final LayerNorm, MobileNet's conv_head, ...),
        # so every backbone parameter is used (no unused parameters for DDP) and pretrained heads match.
        feats = self.backbone.forward_head(feats, pre_logits=True)  # same layout as above
        tokens = self._tokens(feats)  # (2B, T, C)
        if self.left_branch is None:  # concat head
            pooled = tokens.mean(dim=1)  # (2B, C)
            return torch.cat([pooled[:batch], pooled[batch:]], dim=1)  # (B, 2C)
        left_tok = self.left_branch(tokens[:batch])  # (B, T, D)
        right_tok = self.right_branch(tokens[batch:])  # (B, T, D)
        left_att = self.left_to_right(left_tok, right_tok)  # (B, T, D)
        right_att = self.right_to_left(right_tok, left_tok)  # (B, T, D)
        pooled = [t.mean(dim=1) for t in (left_tok, right_tok, left_att, right_att)]  # 4 × (B, D)
        return torch.cat(pooled, dim=1)  # (B, 4D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The fusion MLP, timm's contract: (B, 4D) → logits (B, K), or with ``pre_logits`` its hidden (B, D)
        (the concat head: (B, 2C) → logits, or the dropped-out features)."""
        hidden = self.head[:-1](x)  # Linear(4D → D), GELU, Dropout: (B, D)
        return hidden if pre_logits else self.head[-1](hidden)  # (B, K)

    def forward(self, left: torch.Tensor, right: torch.Tensor, eye_logits: bool = False):
        """Logits, one per class: ``forward_head(forward_features(left, right))``.

        Args:
            left: left-eye images (B, 3, H, W), normalised with ``data_config`` mean/std.
            right: right-eye images (B, 3, H, W).
            eye_logits: also return the per-eye classifier's logits (needs ``eye_head``; training only).

        Returns:
            logits (B, num_classes); apply a sigmoid for probabilities. With ``eye_logits``:
            (logits, eye logits (B, 2, num_classes) for [left, right]).
        """
        feats = self.forward_features(left, right)  # (B, 4D)
        logits = self.forward_head(feats)  # (B, K)
        if not eye_logits:
            return logits
        d = self.eye_dim
        per_eye = feats[:, :2 * d].reshape(-1, 2, d)  # the pooled left and right eyes (branch tokens) (B, 2, D)
        return logits, self.eye_head(per_eye)  # (B, K), (B, 2, K)


class DualEyeEnsemble(nn.Module):
    """Several independently initialised DualEyeNets whose logits are averaged: one module, one checkpoint, one ONNX
    graph. Training feeds every member the same batches, and each member gets its own loss (`forward(...,
    per_member=True)`), so they learn as separate runs would (not as one wide network) at the cost of one data stream.
    Why: networks that err differently average to better ranked, better calibrated outputs (deep ensembles,
    Lakshminarayanan et al. 2017), for N times the compute.

    Args:
        members: the networks (same architecture, different initial weights).
    """

    def __init__(self, members: list[DualEyeNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config  # the architecture of each member; len(members) says how many
        self.data_config = members[0].data_config

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for m in self.members for p in m.backbone_parameters())

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for m in self.members for p in m.head_parameters())

    def forward(self, left: torch.Tensor, right: torch.Tensor, eye_logits: bool = False, per_member: bool = False):
        """The members' mean logits (B, K) (with ``eye_logits``, also their mean per-eye logits (B, 2, K)); with
        ``per_member`` (training) each member's own instead, stacked first: (M, B, K) and (M, B, 2, K)."""
        outs = [m(left, right, eye_logits=eye_logits) for m in self.members]
        if eye_logits:
            stacked = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
            return stacked if per_member else (stacked[0].mean(0), stacked[1].mean(0))
        stacked = torch.stack(outs)
        return stacked if per_member else stacked.mean(0)


def networks(model: nn.Module) -> list[DualEyeNet]:
    """The DualEyeNets inside a model: its members for an ensemble, else the model itself."""
    return list(model.members) if isinstance(model, DualEyeEnsemble) else [model]
