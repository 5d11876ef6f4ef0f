"""Several processes, one model: torchrun's environment, barriers, rank 0's decisions for all, replica checks, and
how a signal asks the training loop to stop.

Plain `python train.py` is rank 0 of 1, and every helper here is then a no-op.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from odir_dual.common.errors import OdirError


class ReplicasDiverged(OdirError, RuntimeError):
    """The DDP ranks no longer hold the same weights (a broken all-reduce); the message lists each rank's sum."""


def setup_distributed():
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed, so the autotuned kernels are reused
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_replicas(model, device, is_main) -> None:
    """After DDP training every rank must hold the same weights: compare a checksum across ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        total = torch.stack([p.double().sum() for p in model.parameters()]).sum()
        mine = torch.stack([total, torch.stack([p.double().abs().sum() for p in model.parameters()]).sum()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine.to(device))
    if is_main:
        same = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
        print(f"replicas identical across {len(gathered)} ranks: {'yes' if same else 'NO'}")
        if not same:
            raise ReplicasDiverged("DDP replicas diverged: " + ", ".join(f"{g[0].item():.10g}" for g in gathered))


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision (early stop, Ctrl-C) for every rank, so all stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next update, after writing last.pt."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the signal that asked, if one did
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Give the caller its own handlers back (train.main may run inside a larger program or a test)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: stopping after this update (torchrun: after this epoch), then "
              "saving last.pt; again: at once", flush=True)
