"""Loss functions against hand-computed values, and their numerical behaviour."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from odir_dual.model.loss import focal_loss, hybrid_loss, pos_weights_from_labels

LN2, LN3 = math.log(2.0), math.log(3.0)

# 2x2 example. sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4.
#   cell   logit   target   p     p_t   -log p_t = BCE
#   (0,0)  0       1        1/2   1/2   ln 2
#   (0,1)  ln 3    0        3/4   1/4   ln 4
#   (1,0)  -ln 3   0        1/4   3/4   ln 4/3
#   (1,1)  0       1        1/2   1/2   ln 2
LOGITS = torch.tensor([[0.0, LN3], [-LN3, 0.0]])
TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_pos_weights_hand_computed():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # N = 4; pos = (3, 1, 0 -> clamped to 1); (N - pos) / pos = (1/3, 3, 4)
    w = pos_weights_from_labels(labels)
    assert w.dtype == torch.float32 and w.shape == (3,)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 3.0, 4.0]))
    torch.testing.assert_close(pos_weights_from_labels(torch.tensor(labels)), w)


def test_focal_hand_computed_gamma2():
    # alpha = 0.25, gamma = 2: FL = alpha_t (1 - p_t)^2 BCE, alpha_t = 0.25 (t=1) / 0.75 (t=0)
    #   (0,0): 0.25 * (1/2)^2  * ln 2   = ln2 / 16
    #   (0,1): 0.75 * (3/4)^2  * 2 ln 2 = 27/32 ln 2
    #   (1,0): 0.75 * (1/4)^2  * ln 4/3 = 3/64 ln(4/3)
    #   (1,1): 0.25 * (1/2)^2  * ln 2   = ln2 / 16
    expected = (LN2 / 16 + 27 / 32 * LN2 + 3 / 64 * math.log(4 / 3) + LN2 / 16) / 4
    got = focal_loss(LOGITS, TARGETS, alpha=0.25, gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_hand_computed_defaults():
    # alpha = 0.3, gamma = 2.5 (the recipe's values)
    expected = (
        0.3 * 0.5**2.5 * LN2  # (0,0)
        + 0.7 * 0.75**2.5 * 2 * LN2  # (0,1)
        + 0.7 * 0.25**2.5 * math.log(4 / 3)  # (1,0)
        + 0.3 * 0.5**2.5 * LN2  # (1,1)
    ) / 4
    assert focal_loss(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_hybrid_hand_computed():
    # pos_weight = (3, 1) multiplies the positive cells: (0,0) in column 0, (1,1) in column 1.
    #   weighted BCE = (3 ln2 + 2 ln2 + (2 ln2 - ln3) + ln2) / 4 = (8 ln2 - ln3) / 4
    pw = torch.tensor([3.0, 1.0])
    bce = (8 * LN2 - LN3) / 4
    focal = (0.3 * 0.5**2.5 * LN2 * 2 + 0.7 * 0.75**2.5 * 2 * LN2 + 0.7 * 0.25**2.5 * math.log(4 / 3)) / 4
    got = hybrid_loss(LOGITS, TARGETS, pw)
    assert got.item() == pytest.approx(0.5 * bce + 0.5 * focal, rel=1e-6)
    # unweighted BCE: (6 ln2 - ln3) / 4
    got = hybrid_loss(LOGITS, TARGETS, None, bce_weight=1.0, focal_weight=0.0)
    assert got.item() == pytest.approx((6 * LN2 - LN3) / 4, rel=1e-6)


def test_focal_gamma0_is_alpha_weighted_bce():
    logits, targets = torch.randn(5, 8), torch.randint(0, 2, (5, 8)).float()
    alpha_t = 0.3 * targets + 0.7 * (1 - targets)
    ref = (alpha_t * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")).mean()
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0), ref)


@pytest.mark.parametrize("gamma", [2.5, 0.5, 0.0])
def test_gradients_finite_for_extreme_logits(gamma):
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # right, right, wrong, wrong
    loss = hybrid_loss(logits, targets, torch.full((4,), 10.0), gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # confidently right cells contribute ~0 gradient, confidently wrong ones a large one
    assert logits.grad[0, :2].abs().max() < 1e-6 < logits.grad[0, 2:].abs().min()


def test_hybrid_under_autocast_is_float32():
    logits = torch.randn(4, 8).bfloat16()
    targets = torch.randint(0, 2, (4, 8))
    pw = torch.rand(8) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hybrid_loss(logits, targets, pw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, hybrid_loss(logits.float(), targets.float(), pw))


@settings(max_examples=50, deadline=None)
@given(
    x=st.lists(st.floats(-60, 60), min_size=4, max_size=4),
    t=st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4),
)
def test_focal_bounded_by_weighted_bce(x, t):
    logits, targets = torch.tensor([x]), torch.tensor([t])
    fl = focal_loss(logits, targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    # (1 - p_t)^gamma <= 1 and alpha_t <= 0.7
    assert torch.isfinite(fl) and 0.0 <= fl.item() <= 0.7 * bce.item() + 1e-6


def test_the_training_step_minimises_the_objective_it_is_given():
    """A new auxiliary loss is a new objective: the step runs it unchanged (no branches on heads or model types)."""
    from odir_dual.model.loss import Objective, make_objective
    from odir_dual.model.net import DualEyeNet
    from odir_dual.training.config import Config
    from odir_dual.training.engine import make_stepper

    torch.manual_seed(0)
    net = DualEyeNet("test_resnet", pretrained=False, embed_dim=32, heads=8, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
    labels = (torch.rand(4, 8, generator=g) > 0.5).float()
    stepper = make_stepper(net, Config(lr=1e-3, clip_grad=0.0, accum_steps=1), torch.device("cpu"), 1e-3,
                           torch.ones(8))
    assert isinstance(stepper.objective, Objective) and stepper.objective.eye_weight == 0.0
    patient = make_objective(None, focal_weight=0.5, alpha=0.3, gamma=2.5).patient

    def with_logit_penalty(model, left, right, labels, eye_labels=None):
        logits = model(left, right)
        return patient(logits, labels) + 0.1 * logits.pow(2).mean(), logits

    stepper.objective = with_logit_penalty
    net.eval()  # no dropout or batch-norm updates: the two passes below see the same function
    loss, _ = stepper.step(left, right, labels, update=False)
    stepped = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    logits = net(left, right)
    expected = patient(logits, labels) + 0.1 * logits.pow(2).mean()
    expected.backward()
    by_hand = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(stepped) == len(by_hand) > 0
    for a, b in zip(stepped, by_hand):
        torch.testing.assert_close(a, b)
    assert loss.item() == pytest.approx(expected.detach().item(), rel=1e-5)
