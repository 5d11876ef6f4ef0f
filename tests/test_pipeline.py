"""The DALI pipelines (CPU here) and the sampling behind them: order, shards, padding, augmentation, parity."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.dali import Augment, PairSource, eval_loader, train_loader
from odir_dual.pipeline.reference import reference_loader
from odir_dual.pipeline.sampling import epoch_order, rarity_weights, steps_per_epoch

IMG_PX = 64


def _fundus(path, rng, size=(96, 80)):
    """A small RGB picture with structure (so flips and rotations change it)."""
    a = (rng.random((size[1], size[0], 3)) * 60).astype(np.uint8)
    a[10:40, 10:30] = (230, 120, 40)
    Image.fromarray(a).save(path, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """40 patients with distinct left and right images; class H is rare (3 patients)."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        labels = {c: 0 for c in CLASSES}
        labels["H" if i < 3 else "N"] = 1
        rows.append({"id": i, "left": _fundus(d / f"{i}_l.jpg", rng), "right": _fundus(d / f"{i}_r.jpg", rng),
                     **labels})
    return pd.DataFrame(rows)


def test_weighted_sampling_raises_rare_class_share():
    labels = np.zeros((1000, 8))
    labels[:20, 5] = 1  # H: 2 %
    labels[20:, 0] = 1
    w = rarity_weights(labels)
    drawn = np.concatenate([epoch_order(w, 1000, seed=0, epoch=e) for e in range(5)])
    uniform = np.concatenate([epoch_order(None, 1000, seed=0, epoch=e) for e in range(5)])
    share_weighted = labels[drawn, 5].mean()
    share_uniform = labels[uniform, 5].mean()
    assert share_uniform == pytest.approx(0.02)
    assert share_weighted > 0.4  # the two classes are drawn about equally often


def test_epoch_order_is_seeded():
    w = rarity_weights(np.eye(8)[np.arange(100) % 8])
    assert np.array_equal(epoch_order(w, 100, 1, 3), epoch_order(w, 100, 1, 3))
    assert not np.array_equal(epoch_order(w, 100, 1, 3), epoch_order(w, 100, 1, 4))


def test_two_shards_are_disjoint_and_equally_long(table):
    labels = table[list(CLASSES)].to_numpy()
    shards = [PairSource(table.left, table.right, labels, 4, train=True, rank=r, world=2, seed=3) for r in (0, 1)]
    assert shards[0].steps == shards[1].steps == steps_per_epoch(40, 4, 2) == 5
    for epoch in (0, 1):
        seen = []
        for s in shards:
            g0 = epoch * s.steps * 4
            seen.append({s.locate(g)[1] for g in range(g0, g0 + s.steps * 4)})  # positions in the global order
            assert all(s.locate(g)[0] == epoch for g in range(g0, g0 + s.steps * 4))
        assert not seen[0] & seen[1]
        assert len(seen[0]) == len(seen[1]) == 20


def test_train_loader_batches(table):
    loader = train_loader(table, 8, IMG_PX, "cpu", seed=0, num_threads=1)
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    left, right, labels, index = batches[0]
    assert left.shape == right.shape == (8, 3, IMG_PX, IMG_PX)
    assert left.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (8, 8) and index.dtype == torch.int64
    assert torch.equal(labels, torch.as_tensor(table[list(CLASSES)].to_numpy()[index.numpy()], dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output(table, dtype):
    loader = eval_loader(table.left, table.right, 4, IMG_PX, "cpu", dtype=dtype, num_threads=1)
    half, *_ = next(iter(loader))
    full, *_ = next(iter(eval_loader(table.left, table.right, 4, IMG_PX, "cpu", num_threads=1)))
    assert half.dtype == dtype and half.is_contiguous(memory_format=torch.channels_last)
    assert (half.float() - full).abs().max() < 0.05  # rounding only


def test_validation_sees_each_patient_once(table):
    loader = eval_loader(table.left[:13], table.right[:13], 5, IMG_PX, "cpu", num_threads=1)
    assert len(loader) == 3
    for _ in range(2):  # the second pass starts over at patient 0
        index = torch.cat([b[3] for b in loader]).tolist()
        assert index == list(range(13)) + [-1, -1]


def test_validation_pass_left_half_read_does_not_shift_the_next(table):
    loader = eval_loader(table.left[:13], table.right[:13], 5, IMG_PX, "cpu", num_threads=1)
    next(iter(loader))
    assert torch.cat([b[3] for b in loader]).tolist()[:13] == list(range(13))


def test_resumed_stream_equals_uninterrupted(table):
    a = train_loader(table, 8, IMG_PX, "cpu", seed=5, num_threads=1)
    full = [a.next_batch() for _ in range(7)]
    b = train_loader(table, 8, IMG_PX, "cpu", seed=5, num_threads=1, start_step=4)
    assert len(b) == 1  # the rest of epoch 0, then full epochs
    for want in full[4:]:
        got = b.next_batch()
        for x, y in zip(got, want):
            assert torch.equal(x, y)


def test_shared_augmentation_keeps_identical_eyes_identical(table):
    same = table.assign(right=table.left)
    loader = train_loader(same, 8, IMG_PX, "cpu", augment=Augment(same_for_both_eyes=True), num_threads=1)
    for left, right, _, _ in loader:
        assert torch.equal(left, right)
    loader = train_loader(same, 8, IMG_PX, "cpu", augment=Augment(same_for_both_eyes=False), num_threads=1)
    left, right, _, _ = next(iter(loader))
    assert not torch.equal(left, right)


def test_augmentation_changes_images(table):
    plain = eval_loader(table.left, table.right, 8, IMG_PX, "cpu", num_threads=1)
    aug = train_loader(table, 8, IMG_PX, "cpu", weighted=False, num_threads=1)
    x_aug, _, _, idx = next(iter(aug))
    x_plain = torch.cat([b[0] for b in plain])[idx]
    changed = [(a - p).abs().mean() > 1e-3 for a, p in zip(x_aug, x_plain)]
    assert 2 <= sum(changed) <= 8  # the seed's probabilities leave some images untouched


# DALI and PIL (antialiased resize) round differently. In normalised units one 8-bit grey level is ≈ 0.017.
# Measured on 64 real patients: 256 → 128 px mean |Δ| 0.0027, 99th percentile 0.0175 (one grey level),
# max 0.28 (a few edge pixels); 256 → 384 px mean 0.0033, max 0.0175; 256 → 256 px exact (≤ 5e-7).
PARITY_MEAN_ABS = 0.01
PARITY_P99_ABS = 0.05


def test_validation_output_matches_reference_loader_on_real_images(odir256):
    from odir_dual.pipeline.odir import read_patients

    patients, _ = read_patients(odir256)
    sub = patients.head(16)
    dali = eval_loader(sub.left, sub.right, 8, 128, "cpu", num_threads=1)
    ref = reference_loader(sub.left, sub.right, np.zeros((16, 8)), 8, 128, train=False, workers=0)
    for (dl, dr, _, _), (rl, rr, _, _) in zip(dali, ref):
        diff = torch.cat([(dl - rl).abs().flatten(), (dr - rr).abs().flatten()])
        assert diff.mean() < PARITY_MEAN_ABS
        assert torch.quantile(diff[::7], 0.99) < PARITY_P99_ABS
