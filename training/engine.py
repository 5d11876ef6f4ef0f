"""The training step and the evaluation pass, shared by train.py's loop and benchmarks/train_step.py.

    stepper = make_stepper(model, cfg, device, lr, pos_weight)   # wrappers (DDP, compile), AdamW, scaler, objective
    loss, logits = stepper.step(left, right, labels, update=True)
    logits = predict(stepper.eval_model, val_loader, stepper.amp_dtype, device, n_rows)
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from odir_dual.model.loss import Objective, make_objective
from odir_dual.model.net import DualEyeEnsemble, networks
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.host import cache_root
from odir_dual.training.config import Config


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
    objective: Objective  # (model, left, right, labels, eye_labels) → (loss, logits): model/loss.py
    accum_steps: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0: off
    distributed: bool = False  # DDP: skip the gradient all-reduce on steps that do not update
    eval_model: nn.Module | None = None  # what `predict` runs: the model, compiled like train_model, never DDP

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The patient-label loss (logits, labels) → scalar: what the validation loss measures."""
        return self.objective.patient

    def step(self, left, right, labels, update: bool, eye_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and objective, scaled backward; with `update`, clip and take an optimizer step.
        `eye_labels`: (B, 2, K) per-eye targets, NaN where unknown (used when the objective has a per-eye loss).

        Returns (loss, logits), both detached; nothing here waits for the device.
        """
        quiet = self.train_model.no_sync() if (self.distributed and not update) else contextlib.nullcontext()
        with quiet:
            with torch.autocast(left.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, logits = self.objective(self.train_model, left, right, labels, eye_labels)
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


def objective_of(cfg: Config, pos_weight: torch.Tensor, model: nn.Module) -> Objective:
    """The configured objective (model/loss.py): the seed's hybrid BCE + focal, the per-eye loss at
    --eye-loss-weight, each ensemble member trained on its own loss."""
    return make_objective(pos_weight if cfg.bce_pos_weight else None, focal_weight=cfg.focal_weight,
                          alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, eye_weight=cfg.eye_loss_weight,
                          per_member=isinstance(model, DualEyeEnsemble))


def make_stepper(model, cfg: Config, device, lr: float, pos_weight, world: int = 1) -> Stepper:
    """The model wrapped for DDP/compile, with its optimizer, scaler and objective."""
    amp_dtype = autocast_dtype(cfg.precision, device)
    if cfg.compile or cfg.regional_compile:
        persist_compile_cache()
    if cfg.regional_compile:
        compile_regions(model, cfg.compile_mode)  # in place: DDP and predict run the compiled blocks
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                                if device.type == "cuda" else None)
    eval_model = model
    if cfg.compile and not cfg.regional_compile:
        train_model = _compile(train_model, cfg.compile_mode)
        eval_model = train_model if world == 1 else _compile(model, cfg.compile_mode)
    return Stepper(model=model, train_model=train_model, optimizer=make_optimizer(model, cfg, lr),
                   scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                   amp_dtype=amp_dtype, objective=objective_of(cfg, pos_weight, model), accum_steps=cfg.accum_steps,
                   clip_grad=cfg.clip_grad, distributed=world > 1, eval_model=eval_model)


# ----------------------------------------------------------------------------------------------- compilation


def persist_compile_cache() -> None:
    """Keep torch.compile's on-disk caches (Inductor's compiled graphs and kernels, AOTAutograd's graphs) in the
    project cache folder instead of /tmp, so a second run of the same configuration loads its kernels instead of
    compiling them. A folder the user chose with TORCHINDUCTOR_CACHE_DIR is left alone; Inductor's own default
    is not a choice: `import timm` already writes it into the environment (/tmp/torchinductor_USER)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        inductor_default = os.path.abspath(default_cache_dir())
    except ImportError:  # another torch layout: only an unset variable counts as not chosen
        inductor_default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, inductor_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "torch-compile")


def _compile(module: nn.Module, mode: str) -> nn.Module:
    return torch.compile(module, dynamic=False, mode=mode)  # batch shapes are fixed by design


def compile_regions(model: nn.Module, mode: str = "default") -> list[nn.Module]:
    """Regional compilation, in place: every repeated backbone block and each of the head's modules is compiled
    on its own (`nn.Module.compile`, so parameter names and checkpoints are unchanged). Blocks of one class share
    their compiled code, so ConvNeXt-S's 36 blocks cost 4 compilations (one per stage's shapes), not a whole-network
    graph; what runs between the regions (stem, downsampling, the token glue) stays eager.

    Returns the compiled modules.
    """
    regions = [m for net in networks(model) for m in
               repeated_blocks(net.backbone) + [m for name, m in net.named_children() if name != "backbone"]]
    # Each distinct (block, shape, train/eval) is one compilation of the same forward: ConvNeXt's 4 stages x
    # train/eval x the training and validation batch exceed dynamo's default limit of 8, after which it would
    # silently run those blocks eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for m in regions:
        m.compile(dynamic=False, mode=mode)
    return regions


def repeated_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The innermost runs of same-class model blocks: the children of every container whose children are all one
    class defined by the model's library (timm's ConvNeXtBlock, BasicBlock, ...; not torch.nn layers), and which
    holds no such run further down (so ConvNeXt's blocks, not its stages)."""
    def is_run(container: nn.Module) -> bool:
        kids = list(container.children())
        return (bool(kids) and len({type(k) for k in kids}) == 1
                and not type(kids[0]).__module__.startswith("torch.nn"))

    runs = [m for m in backbone.modules() if is_run(m)]
    innermost = [m for m in runs if not any(r is not m and _contains(m, r) for r in runs)]
    return [block for run in innermost for block in run.children()]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def eval_batch_pairs(n_rows: int, cfg: Config) -> int:
    """Pairs per validation batch: at most `eval_batch_size` (0: 2 x batch_size, as a pass without gradients
    needs far less memory), evened out over the batches that takes so the last one is not mostly padding
    (525 pairs at most 192 a batch: 3 batches of 175, not 192 + 192 + 141 and 51 padded)."""
    most = cfg.eval_batch_size or 2 * cfg.batch_size
    batches = max(1, -(-n_rows // most))
    return max(1, -(-n_rows // batches))


@torch.no_grad()
def predict(model, loader, amp_dtype, device, n_rows: int, eye_logits: bool = False):
    """Logits (n_rows, 8), float32 on the CPU, in table order (padding dropped); with `eye_logits` (a model with
    the per-eye head) also the per-eye logits (n_rows, 2, 8) [left, right]: (logits, eye logits).

    `model`: the plain model or its compiled wrapper (`Stepper.eval_model`). The logits stay on the device and
    are copied to the CPU once at the end: no host sync per batch, so the device never waits for Python.
    """
    model.eval()
    out = torch.zeros(n_rows + 1, len(CLASSES), device=device)  # row n_rows collects the padding
    eyes = torch.zeros(n_rows + 1, 2, len(CLASSES), device=device) if eye_logits else None
    for left, right, _, index in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(left, right, eye_logits=True) if eye_logits else model(left, right)
        rows = torch.where(index >= 0, index, n_rows).to(device)
        if eye_logits:
            logits, per_eye = logits
            eyes[rows] = per_eye.float()
        out[rows] = logits.float()  # index_put: deterministic on CUDA, unlike index_copy_
    model.train()
    return (out[:n_rows].cpu(), eyes[:n_rows].cpu()) if eye_logits else out[:n_rows].cpu()
