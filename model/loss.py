"""Losses for multi-label logits: class-weighted BCE, binary focal loss, and their mix. Pure functions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pos_weights_from_labels(labels) -> torch.Tensor:
    """BCE positive-class weights ``(N - pos) / pos`` per class (negatives per positive).

    Args:
        labels: (N, K) 0/1 matrix (numpy array, tensor or nested lists) of training labels.

    Returns:
        float32 tensor (K,); the divisor ``pos`` is clamped to >= 1, so a class without positives
        gets weight N (its negative count).
    """
    if torch.is_tensor(labels):
        y = labels.detach().float().cpu()
    else:
        y = torch.tensor(np.array(labels, dtype=np.float32))  # a copy: labels may be a read-only view
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, K), got shape {tuple(y.shape)}")
    pos = y.sum(dim=0)  # (K,)
    neg = y.shape[0] - pos  # (K,)
    return neg / pos.clamp_min(1.0)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.3, gamma: float = 2.5
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over all elements.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` for positives and ``1 - alpha``
    for negatives. ``-log(p_t)`` is BCE-with-logits, so large |logits| stay finite.

    Args:
        logits: (B, K) raw scores.
        targets: (B, K) 0/1 (soft targets allowed; then ``p_t = exp(-BCE)``).
        alpha: weight of the positive class in [0, 1].
        gamma: focusing exponent (>= 0); 0 gives alpha-weighted BCE.

    Returns:
        scalar tensor.
    """
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log p_t, (B, K)
    one_minus_pt = -torch.expm1(-bce)  # 1 - p_t without cancellation when p_t -> 1
    # 1 - p_t underflows to 0 for confident right answers; the floor keeps d/dx x^gamma finite for gamma < 1.
    one_minus_pt = one_minus_pt.clamp_min(torch.finfo(one_minus_pt.dtype).tiny)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return (alpha_t * one_minus_pt.pow(gamma) * bce).mean()


def hybrid_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    bce_weight: float = 0.5,
    focal_weight: float = 0.5,
    alpha: float = 0.3,
    gamma: float = 2.5,
) -> torch.Tensor:
    """``bce_weight * BCE-with-logits(pos_weight) + focal_weight * focal``, computed in float32.

    Safe inside ``torch.autocast``: autocast is switched off locally and inputs are cast to float32.

    Args:
        logits: (B, K) raw scores (any float dtype).
        targets: (B, K) 0/1 labels.
        pos_weight: (K,) positive-class weights for the BCE term (see ``pos_weights_from_labels``);
            None for unweighted BCE.
        bce_weight: weight of the BCE term.
        focal_weight: weight of the focal term.
        alpha: focal loss positive-class weight.
        gamma: focal loss focusing exponent.

    Returns:
        float32 scalar tensor.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        targets = targets.to(device=logits.device, dtype=torch.float32)
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
        focal = focal_loss(logits, targets, alpha=alpha, gamma=gamma)
        return bce_weight * bce + focal_weight * focal
