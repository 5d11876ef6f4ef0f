"""Which patient each training step sees: weighted sample order, sharded by rank.

Pure functions of (labels, seed, epoch, rank, world), so every rank of a `torchrun` job draws the same global
order without talking to the others, and a resumed run replays exactly the order it would have seen.
"""
from __future__ import annotations

import numpy as np


def rarity_weights(labels: np.ndarray) -> np.ndarray:
    """Per-patient sampling weight: the inverse frequency of the patient's rarest positive label.

    Args:
        labels: (N, C) 0/1 matrix.
    Returns:
        (N,) float64 weights summing to 1. A patient with no positive label gets the weight of the commonest
        class, so it is never starved.
    """
    labels = np.asarray(labels, dtype=np.float64)
    class_freq = np.maximum(labels.sum(axis=0), 1.0)  # (C,)
    inv = labels / class_freq  # (N, C): 1/freq where positive, 0 elsewhere
    w = inv.max(axis=1)
    w[w == 0] = 1.0 / class_freq.max()
    return w / w.sum()


def epoch_order(weights: np.ndarray | None, n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of one epoch: n draws with replacement by weight, or a permutation if no weights."""
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=n, replace=True, p=weights)


def steps_per_epoch(n: int, batch_size: int, world: int, multiple: int = 1) -> int:
    """Steps every rank takes per epoch: the same on all ranks, full batches only (fixed shapes for compile),
    a multiple of `multiple` (the gradient accumulation) so no optimizer step straddles two epochs."""
    steps = (n // world) // batch_size // multiple * multiple
    if steps == 0:
        raise ValueError(f"{n} training patients cannot fill {multiple} batch(es) of {batch_size} "
                         f"on each of {world} rank(s)")
    return steps


def rank_positions(n: int, batch_size: int, rank: int, world: int, multiple: int = 1) -> np.ndarray:
    """Positions in the global order that `rank` consumes, in step order: order[rank::world], truncated."""
    steps = steps_per_epoch(n, batch_size, world, multiple)
    return np.arange(rank, n, world)[: steps * batch_size]
