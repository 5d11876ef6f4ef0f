"""Per-eye labels from the diagnostic keywords, the per-eye loss, and the model's per-eye head."""
import numpy as np
import pandas as pd
import pytest
import torch

from odir_dual.model.loss import eye_loss
from odir_dual.model import DualEyeNet
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.keywords import eye_label_matrix, eye_labels, keyword_class


def letters(v) -> str:
    return "".join(c for c, x in zip(CLASSES, v) if x)


def test_keywords_map_to_odir_classes():
    assert keyword_class("normal fundus") == "N"
    for k in ("mild nonproliferative retinopathy", "moderate non proliferative retinopathy",
              "severe proliferative diabetic retinopathy", "suspected diabetic retinopathy"):
        assert keyword_class(k) == "D", k
    assert keyword_class("suspected glaucoma") == "G" and keyword_class("cataract") == "C"
    assert keyword_class("wet age-related macular degeneration") == "A"
    assert keyword_class("hypertensive retinopathy") == "H" and keyword_class("myopic maculopathy") == "M"
    for k in ("drusen", "laser spot", "epiretinal membrane", "branch retinal vein occlusion"):
        assert keyword_class(k) == "O", k
    assert keyword_class("lens dust") is None and keyword_class(" ") is None


def test_an_eye_is_normal_exactly_when_it_shows_no_disease():
    assert letters(eye_labels("normal fundus")) == "N"
    assert letters(eye_labels("lens dust，normal fundus")) == "N"
    assert letters(eye_labels("laser spot，moderate non proliferative retinopathy")) == "DO"
    assert letters(eye_labels("cataract, drusen")) == "CO"  # an ASCII comma from a hand-edited sheet


def patients(rows):
    table = pd.DataFrame(rows, columns=["left_keywords", "right_keywords", "labels"])
    for c in CLASSES:
        table[c] = table["labels"].str.contains(c).astype(np.int8)
    return table


def test_the_eyes_union_must_reproduce_the_patient_labels():
    table = patients([("normal fundus", "normal fundus", "N"),
                      ("cataract", "normal fundus", "C"),  # the disease is in one eye only
                      ("glaucoma", "normal fundus", "D"),  # keywords disagree with the labels
                      ("", "normal fundus", "N")])  # a keyword cell left empty
    labels, usable = eye_label_matrix(table)
    assert usable.tolist() == [True, True, False, False]
    assert letters(labels[1, 0]) == "C" and letters(labels[1, 1]) == "N"
    _, usable = eye_label_matrix(table.drop(columns=["left_keywords"]))
    assert not usable.any()


def test_real_sheet_keywords_reproduce_every_patients_labels(odir256):
    from odir_dual.pipeline.odir import read_patients

    table, _ = read_patients(odir256)
    labels, usable = eye_label_matrix(table)
    assert usable.all() and len(table) > 2000
    one_eye_d = (labels[:, :, CLASSES.index("D")].sum(1) == 1).sum()
    assert one_eye_d > 50  # the per-eye labels say more than the patient's: many have D in one eye only


def test_eye_loss_skips_unknown_rows():
    logits = torch.randn(3, 2, 8, requires_grad=True)
    targets = torch.randint(0, 2, (3, 2, 8)).float()
    targets[1] = float("nan")
    loss = eye_loss(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 2]], targets[[0, 2]])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert eye_loss(logits, torch.full_like(targets, float("nan"))).item() == 0.0


def test_eye_logits_read_each_eye_alone_and_leave_the_patient_output_unchanged():
    torch.manual_seed(0)
    net = DualEyeNet("test_resnet", embed_dim=32, heads=4, eye_head=True).eval()
    left, right = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    logits, per_eye = net(left, right, eye_logits=True)
    assert per_eye.shape == (2, 2, 8) and torch.equal(net(left, right), logits)
    _, other = net(left, torch.randn(2, 3, 64, 64), eye_logits=True)
    assert torch.allclose(other[:, 0], per_eye[:, 0]) and not torch.allclose(other[:, 1], per_eye[:, 1])

