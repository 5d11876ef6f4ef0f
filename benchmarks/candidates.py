"""Speed candidates for the training step that are not (yet) Config options: changes to the model's kernels or to
how its weights are held. benchmarks/train_step.py applies one per row to today's `fast` set-up and prints the
row's logit difference against `fast` on the same batch and the same initial weights, so no candidate wins by
being wrong. A winner on the GPU moves into the model or engine.py and becomes a `fast` default.

Why these (issue 12's profile of 3 compiled ConvNeXt-S steps on an H200): cuDNN's channels_last depthwise 7x7
convolution is ~31 % of the CUDA time (its NHWC backward-data kernel alone 17.7 %), the fused GELUs ~8 %, and the
fp32 → bf16 weight casts under autocast ~3 %.

    model = apply_variant(model, "dw_shift")          # in place; returns the model
    optimizer = MasterWeights(make_optimizer(fp32_model, cfg, lr), bf16_model, fp32_model)
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = {
    "dw_nchw": "depthwise conv in NCHW (channels_last elsewhere)",
    "dw_shift": "depthwise conv as 49 shifted multiply-adds (one fused compiled kernel)",
    "gelu_tanh": "GELU tanh approximation",
}


def is_depthwise(m: nn.Module) -> bool:
    """A k x k (k > 1) convolution with one filter per channel, stride 1, 'same' padding: ConvNeXt's conv_dw."""
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.kernel_size[0] > 1
            and m.stride == (1, 1) and m.dilation == (1, 1) and m.padding == (m.kernel_size[0] // 2,) * 2
            and m.kernel_size[0] == m.kernel_size[1] and m.padding_mode == "zeros")


class NCHWAround(nn.Module):
    """Runs the wrapped convolution on an NCHW copy of its input and hands channels_last back: cuDNN's NCHW
    depthwise kernels instead of its NHWC ones (the NHWC backward-data kernel is the profile's largest)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.contiguous())  # (N, C, H, W) in NCHW memory
        return y.contiguous(memory_format=torch.channels_last)


class DepthwiseShifts(nn.Module):
    """The same depthwise convolution written as k*k shifted multiply-adds of the padded input. Eager this is slow
    (k*k full-size temporaries); torch.compile fuses the forward into one elementwise kernel and the backward into
    a few, in whatever memory format the input has, instead of cuDNN's depthwise kernels. Sums in fp32."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters: same initial weights, same names
        self.k = conv.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.k // 2
        xp = F.pad(x, (pad, pad, pad, pad))  # (N, C, H + 2p, W + 2p)
        weight = self.weight.float().view(c, self.k, self.k)
        acc = sum(xp[:, :, i:i + h, j:j + w].float() * weight[:, i, j].view(1, c, 1, 1)
                  for i, j in itertools.product(range(self.k), range(self.k)))  # (N, C, H, W), fp32
        if self.bias is not None:
            acc = acc + self.bias.float().view(1, c, 1, 1)
        return acc.to(x.dtype)


def apply_variant(model: nn.Module, variant: str) -> nn.Module:
    """Change every depthwise convolution (dw_nchw, dw_shift) or GELU (gelu_tanh) of `model` in place; returns it.
    Raises ValueError when the model has nothing the variant changes (the row would time the baseline)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if variant == "gelu_tanh" and isinstance(child, nn.GELU):
                child.approximate = "tanh"
                changed += 1
            elif variant in ("dw_nchw", "dw_shift") and is_depthwise(child):
                setattr(parent, name, (NCHWAround if variant == "dw_nchw" else DepthwiseShifts)(child))
                changed += 1
    if not changed:
        raise ValueError(f"variant {variant!r}: the model has no layer it applies to")
    return model


class MasterWeights:
    """Weights held in bf16 for the forward and backward (no fp32 → bf16 casts under autocast, half the weight
    traffic), with fp32 master copies in the optimizer: `step` copies the bf16 gradients to the masters, runs the
    fp32 AdamW on them and copies the result back, so small updates are not lost to bf16's 8-bit mantissa.

    Duck-types what engine.Stepper and train.py use of an optimizer: param_groups, step, zero_grad, state_dict.

    Args:
        inner: the optimizer over `masters`' parameters (engine.make_optimizer(masters, ...)).
        model: the bf16 model that runs the step.
        masters: an fp32 model with the same parameters in the same order.
    """

    def __init__(self, inner: torch.optim.Optimizer, model: nn.Module, masters: nn.Module):
        pairs = list(zip(model.parameters(), masters.parameters()))
        if any(p.shape != m.shape for p, m in pairs) or len(pairs) != len(list(masters.parameters())):
            raise ValueError("MasterWeights: model and masters must have the same parameters")
        self.inner = inner
        self.params = [p for p, m in pairs if m.requires_grad]
        self.masters = [m for p, m in pairs if m.requires_grad]

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        torch._foreach_copy_(self.params, self.masters)  # fp32 → bf16, one launch per few tensors

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
