"""The training step and the evaluation pass, shared by train.py's loop and benchmarks/train_step.py.

    stepper = make_stepper(model, cfg, device, lr, pos_weight)   # wrappers (DDP, compile), AdamW, scaler, loss
    loss, logits = stepper.step(left, right, labels, update=True)
    logits = predict(model, val_loader, stepper.amp_dtype, device, n_rows)
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from config import Config
from pipeline.constants import CLASSES


# ----------------------------------------------------------------------------------------------- schedule, precision


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0 (per optimizer update)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(precision: str, device: torch.device):
    """None (fp32) or the autocast dtype for this device."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------------------------- the step


def make_optimizer(model, cfg: Config, lr: float):
    """AdamW with the backbone at lr × backbone_lr_mult, everything else (the head) at lr."""
    groups = [dict(params=[p for p in model.backbone_parameters() if p.requires_grad], lr_mult=cfg.backbone_lr_mult),
              dict(params=[p for p in model.head_parameters() if p.requires_grad], lr_mult=1.0)]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)


@dataclass
class Stepper:
    """Everything one training step touches. `step` is THE training step: train.py's loop and
    benchmarks/train_step.py both call it, so the benchmark times exactly what training runs."""

    model: nn.Module  # the plain module: clipped, checkpointed
    train_model: nn.Module  # what runs the forward: the model, or its DDP and/or torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: fp32
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) → scalar
    accum_steps: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0: off
    distributed: bool = False  # DDP: skip the gradient all-reduce on steps that do not update

    def step(self, left, right, labels, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, hybrid loss, scaled backward; with `update`, clip and take an optimizer step.

        Returns (loss, logits), both detached; nothing here waits for the device.
        """
        quiet = self.train_model.no_sync() if (self.distributed and not update) else contextlib.nullcontext()
        with quiet:
            with torch.autocast(left.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.train_model(left, right)
            loss = self.loss_fn(logits.float(), labels)
            self.scaler.scale(loss / self.accum_steps).backward()
        if update:
            if self.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def set_lr(self, lr: float) -> None:
        """Every parameter group at lr × its lr_mult (the backbone's is backbone_lr_mult)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]


def make_stepper(model, cfg: Config, device, lr: float, pos_weight, world: int = 1) -> Stepper:
    """The model wrapped for DDP/compile, with its optimizer, scaler and loss (the seed's hybrid BCE + focal)."""
    from model import loss

    amp_dtype = autocast_dtype(cfg.precision, device)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                                if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model, dynamic=False)  # batch shapes are fixed by design
    return Stepper(model=model, train_model=train_model, optimizer=make_optimizer(model, cfg, lr),
                   scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                   amp_dtype=amp_dtype, loss_fn=functools.partial(loss.hybrid_loss, pos_weight=pos_weight),
                   accum_steps=cfg.accum_steps,
                   clip_grad=cfg.clip_grad, distributed=world > 1)


@torch.no_grad()
def predict(model, loader, amp_dtype, device, n_rows: int) -> torch.Tensor:
    """Logits (n_rows, 8), float32 on the CPU, in table order (padding dropped)."""
    model.eval()
    out = torch.zeros(n_rows, len(CLASSES))
    for left, right, _, index in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(left, right)
        keep = index >= 0
        out[index[keep].cpu()] = logits[keep].float().cpu()
    model.train()
    return out
