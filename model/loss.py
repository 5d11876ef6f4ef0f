"""Every loss training uses: class-weighted BCE + focal on the patient labels, BCE on the per-eye labels, and
`Objective`, the one function of (model, batch) that the training step minimises."""

from __future__ import annotations

import functools
from typing import Callable

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


def eye_loss(eye_logits: torch.Tensor, eye_labels: torch.Tensor) -> torch.Tensor:
    """Plain BCE of the per-eye logits (B, 2, K) against per-eye labels, over the rows whose labels are known
    (NaN marks the others); 0 when none is, so a batch without keywords still trains the patient head."""
    known = ~torch.isnan(eye_labels)
    bce = F.binary_cross_entropy_with_logits(eye_logits, torch.nan_to_num(eye_labels), reduction="none")
    return (bce * known).sum() / known.sum().clamp_min(1)


class Objective:
    """What training minimises, as one function of the model and a batch: `objective(model, left, right, labels,
    eye_labels) -> (loss, logits)`. The patient loss of the logits, plus `eye_weight` × the per-eye loss of the eye
    head when that is on; an ensemble (`per_member`) is trained on the mean of its members' own losses, so each
    learns as a run of its own would, and reports its mean logits. New auxiliary losses belong here, not in the
    training step."""

    def __init__(self, patient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eye_weight: float = 0.0,
                 per_member: bool = False):
        self.patient = patient  # (logits, labels) → scalar: also the validation loss
        self.eye_weight = eye_weight
        self.per_member = per_member
        self._forward = dict(eye_logits=True) if eye_weight > 0 else {}
        if per_member:
            self._forward["per_member"] = True

    def __call__(self, model, left, right, labels, eye_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(left, right, **self._forward)
        logits, per_eye = out if self.eye_weight > 0 else (out, None)
        loss = self.patient(logits.float(), labels.expand_as(logits))  # an ensemble's (M, B, K): each member's own
        if per_eye is not None:
            loss = loss + self.eye_weight * eye_loss(per_eye.float(), eye_labels.expand_as(per_eye))
        return loss, logits.mean(0) if self.per_member else logits


def make_objective(pos_weight: torch.Tensor | None, *, focal_weight: float, alpha: float, gamma: float,
                   eye_weight: float = 0.0, per_member: bool = False) -> Objective:
    """The training objective from its settings: (1 - focal_weight) × BCE + focal_weight × focal on the patient
    labels (BCE positive weights `pos_weight`, None for none), plus the per-eye loss at `eye_weight`."""
    patient = functools.partial(hybrid_loss, pos_weight=pos_weight, bce_weight=1.0 - focal_weight,
                                focal_weight=focal_weight, alpha=alpha, gamma=gamma)
    return Objective(patient, eye_weight=eye_weight, per_member=per_member)
