"""The training loop that train.py runs once its flags are read: `fit` builds the model and loops over epochs:
`train_epoch` (the steps), `validate` (metrics, best.pt), `save_last` (last.pt), then `report_best`. Kept out of
train.py so that `--help` and a mistyped flag answer before torch, timm and DALI are imported (seconds)."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from odir_dual.model import (backbone_norm, count_parameters, evaluate, multilabel_metrics, pos_weights_from_labels,
                             tune_thresholds)
from odir_dual.model.factory import build_model, weights_description
from odir_dual.model.calibration import apply_calibration, fit_calibration, with_odir_offset
from odir_dual.model.eyes import fit_eye_head
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.dali import Augment, eval_loader, train_loader
from odir_dual.common.cli import shell_path, signal_name, tool_command
from odir_dual.common.errors import OdirError
from odir_dual.pipeline.host import progress_enabled
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import label_matrix
from odir_dual.training.checkpoint import (CheckpointError, checkpoint_payload, model_from_checkpoint, read_checkpoint,
                                           save_checkpoint)
from odir_dual.training.config import REFERENCE_BATCH, SELECT_COLUMNS, Config
from odir_dual.training.distributed import StopRequest, broadcast_flag, check_replicas
from odir_dual.training.engine import Stepper, autocast_dtype, eval_batch_pairs, lr_factor, make_stepper, predict
from odir_dual.training.evaluation import Fitted, final_report, plain, write_html_report
from odir_dual.training.runlog import RunLog, format_duration, print_epoch, print_final_report
from odir_dual.training.data import per_eye_targets

class LossNotFinite(OdirError, RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and the update."""


@dataclass
class Run:
    """Where and how this process trains."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    run_dir: Path | None
    resume_dir: Path | None
    stop: StopRequest
    started: float = dataclasses.field(default_factory=time.time)  # time.time() when the process started
    run_id: str | None = None  # the run folder's id (runlog.run_id), written into every checkpoint

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def should_stop(self, step: int) -> bool:
        return bool(self.stop.requested or (self.cfg.stop_after_steps and step >= self.cfg.stop_after_steps))


@dataclass
class Progress:
    """What changes as training goes, and what last.pt restores."""

    step: int = 0  # optimizer updates done
    best: dict = dataclasses.field(default_factory=lambda: {"score": -math.inf, "epoch": -1})
    thresholds: np.ndarray = dataclasses.field(default_factory=lambda: np.full(len(CLASSES), 0.5))
    ema: object = None  # timm ModelEmaV3 of the model when --model-ema
    epochs_done: int = 0  # complete epochs (passes over the training split)
    stopped_early: bool = False  # by --patience
    # A finished epoch's training row whose validation a signal skipped: --resume validates it first, so that epoch
    # can still become best.pt
    unvalidated_row: dict | None = None


@dataclass
class RunClock:
    """The whole run's elapsed time and its ETA, from the pace of the updates this process made (validation
    included, so the estimate covers what the remaining epochs will really take)."""

    total_updates: int
    start_step: int  # updates done before this process (a resume)
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        return (time.perf_counter() - self.t0) / done * (self.total_updates - step) if done > 0 else None

    def text(self, step: int) -> str:
        """"3:05 elapsed, ETA 12:40" (this process's time)."""
        eta = self.eta_s(step)
        return (f"{format_duration(time.perf_counter() - self.t0)} elapsed, ETA "
                + (format_duration(eta) if eta is not None else "?"))


def fit(run: Run, train_tab, val_tab, test_tab) -> Fitted:
    """Build the model and the loaders, then epochs of: train, validate (best.pt), save last.pt; then the final
    report of best.pt on validation and test."""
    cfg, device = run.cfg, run.device
    amp_dtype = autocast_dtype(cfg.precision, device)
    in_dtype = amp_dtype or torch.float32  # images arrive in the autocast dtype: half the bytes of fp32
    mean, std = backbone_norm(cfg.backbone)  # what the pretrained weights expect (ImageNet's for ConvNeXt)

    model = build_model(cfg, pretrained=cfg.pretrained and run.resume_dir is None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.is_main:
        backbone = sum(p.numel() for p in model.backbone_parameters())
        print(f"model: {cfg.backbone} dual-eye" + (" · concat head" if cfg.head == "concat" else "")
              + (f" · ensemble of {cfg.ensemble}" if cfg.ensemble > 1 else "")
              + f" · {count_parameters(model) / 1e6:.1f}M parameters ({backbone / 1e6:.1f}M in the backbone"
              + ("s" if cfg.ensemble > 1 else "") + ")"
              + (f" · stem + {cfg.freeze_stages} stages frozen" if cfg.freeze_stages else ""))
        print(f"backbone weights: {weights_description(cfg)}")
        print(f"input normalised as the weights expect: mean {mean}, std {std}")
    pairs_per_update = cfg.batch_size * cfg.accum_steps * run.world
    lr = cfg.lr * math.sqrt(pairs_per_update / REFERENCE_BATCH)
    y_train, y_val = label_matrix(train_tab), label_matrix(val_tab)
    stepper = make_stepper(model, cfg, device, lr, pos_weights_from_labels(y_train).to(device), run.world)
    eye_targets = per_eye_targets(train_tab, device, run.is_main) if cfg.eye_loss_weight > 0 else None
    val_eyes = eye_label_matrix(val_tab) if cfg.eye_loss_weight > 0 else None  # fits the per-eye head's outputs

    progress = Progress()
    if cfg.model_ema:
        progress.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True)  # ramps up: short runs too
    if run.resume_dir is not None:
        restore(run.resume_dir / "last.pt", model, stepper, progress)

    loader = train_loader(train_tab, cfg.batch_size, cfg.img_px, device, augment=Augment(same_for_both_eyes=
                          cfg.same_eye_aug), weighted=cfg.weighted_sampling, seed=cfg.seed, rank=run.rank,
                          world=run.world, start_step=progress.step * cfg.accum_steps,
                          step_multiple=cfg.accum_steps, dtype=in_dtype, mean=mean, std=std,
                          num_threads=cfg.loader_threads or None)
    updates_per_epoch = loader.source.steps // cfg.accum_steps
    if run.is_main and run.resume_dir is not None:  # epochs counted from 1, as on the console and in the report
        print(f"resumed {run.resume_dir} at update {progress.step}: epoch {progress.step // updates_per_epoch + 1} "
              f"of {cfg.epochs}")
    schedule = dict(total_steps=updates_per_epoch * cfg.epochs,
                    warmup_steps=max(1, round(cfg.warmup_epochs * updates_per_epoch)))
    val_loader = None
    if run.is_main:
        val_loader = eval_loader(val_tab["left"], val_tab["right"], eval_batch_pairs(len(val_tab), cfg), cfg.img_px,
                                 device, dtype=in_dtype, mean=mean, std=std, num_threads=cfg.loader_threads or None)
        print(f"{updates_per_epoch} updates/epoch of {pairs_per_update} pairs · lr {lr:.2e} (backbone "
              f"{lr * cfg.backbone_lr_mult:.2e}) · {str(amp_dtype or 'fp32').replace('torch.', '')} · compile "
              f"{cfg.compile} · channels_last {cfg.channels_last}")

    # The baseline every number is read against: always predict the training prevalence.
    trivial = evaluate(y_val, np.broadcast_to(y_train.mean(0), y_val.shape).copy())
    log = RunLog(run.run_dir, tensorboard=cfg.tensorboard, select_metric=cfg.select_metric) if run.is_main else None
    checkpoint_args = dict(mean=mean, std=std)
    start_epoch = progress.step // updates_per_epoch
    clock = RunClock(total_updates=updates_per_epoch * cfg.epochs, start_step=progress.step)
    stop_now = False
    header = True  # the validation table's header, once per process
    if run.is_main and progress.unvalidated_row is not None:  # the epoch a signal ended before its validation
        validate(run, model, val_loader, y_val, stepper.loss_fn, progress.unvalidated_row, progress, log, trivial,
                 header=header, eval_model=stepper.eval_model, val_eyes=val_eyes, **checkpoint_args)
        progress.unvalidated_row, header = None, False
        save_last(run, stepper, progress, start_epoch - 1, **checkpoint_args)  # a second resume owes nothing
    for epoch in range(start_epoch, cfg.epochs):
        row = train_epoch(run, stepper, loader, progress, epoch, lr, schedule, eye_targets, clock)
        finished_epoch = progress.step % updates_per_epoch == 0
        stop_now = broadcast_flag(run.should_stop(progress.step), device)
        if finished_epoch:
            row["lr"] = lr * lr_factor(progress.step - 1, **schedule)
        if run.is_main and finished_epoch and run.stop.requested:  # a signal asks to stop now: no evaluation
            progress.unvalidated_row = row
        elif run.is_main and finished_epoch:
            validate(run, model, val_loader, y_val, stepper.loss_fn, row, progress, log, trivial,
                     header=header, eval_model=stepper.eval_model, val_eyes=val_eyes,
                     eta_s=clock.eta_s(progress.step),
                     **checkpoint_args)
            header = False
        early = broadcast_flag(bool(cfg.patience and finished_epoch and not run.stop.requested
                                    and epoch + 1 - progress.best["epoch"] >= cfg.patience), device)
        progress.epochs_done, progress.stopped_early = progress.step // updates_per_epoch, early
        if run.is_main:
            save_last(run, stepper, progress, epoch, **checkpoint_args)
        if early and run.is_main:
            print(f"early stopping: no better validation {cfg.select_metric} for {cfg.patience} epochs")
        if broadcast_flag(run.stop.requested, device):  # (also a signal that came during validation)
            if run.is_main:
                head = (f"{signal_name(run.stop.signum)}: stopped in epoch {epoch + 1} of {cfg.epochs} (update "
                        f"{progress.step}), last.pt saved; resume:")
                command = f"{tool_command('train')} --resume {shell_path(run.run_dir)}"  # whole: copyable
                print(f"{head} {command}" if len(head) + len(command) < 110 else f"{head}\n  {command}", flush=True)
            return Fitted(None, None, stopped=True, steps=progress.step)
        if stop_now or early:
            break
    check_replicas(model, device, run.is_main)
    best = None
    if run.is_main:
        reached = -(-progress.step // updates_per_epoch)  # the epoch it ended in, counted from 1
        stopped = ("early stopping" if progress.stopped_early else "--stop-after-steps" if reached < cfg.epochs
                   or progress.step % updates_per_epoch else None)
        best = report_best(run, val_tab, test_tab, y_train, val_loader, in_dtype,
                           epochs={"reached": reached, "of": cfg.epochs, "stopped_by": stopped})
    return Fitted(*(best or (None, None, None))[:2], stopped=bool(stop_now), steps=progress.step,
                  eye_logits=best[2] if best else None)


def train_epoch(run: Run, stepper: Stepper, loader, progress: Progress, epoch: int, lr: float, schedule,
                eye_targets: torch.Tensor | None = None, clock: RunClock | None = None) -> dict:
    """One pass over this rank's share (shorter right after a resume); returns the epoch's training figures.
    `eye_targets`: the training table's per-eye labels (`per_eye_targets`), when the per-eye loss is on;
    `clock`: the whole run's elapsed time and ETA, shown beside the bar."""
    cfg, device, world = run.cfg, run.device, run.world
    t0, data_s = time.perf_counter(), 0.0
    loss_sum = torch.zeros((), device=device)
    patient_sum = torch.zeros((), device=device)  # the patient-label loss alone: what the validation loss measures
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite micro-step, no host sync
    train_probs, train_rows = [], []
    n_batches = len(loader)
    bar = _progress_bar(n_batches, epoch, cfg.epochs) if run.is_main else None
    stepper.optimizer.zero_grad(set_to_none=True)
    micro_done, micro0 = 0, progress.step * cfg.accum_steps  # micro-steps are numbered across the run
    t_data = time.perf_counter()
    for micro, (left, right, labels, index) in enumerate(loader):
        data_s += time.perf_counter() - t_data
        update = (micro + 1) % cfg.accum_steps == 0
        if update:
            stepper.set_lr(lr * lr_factor(progress.step, **schedule))
        eyes = eye_targets[index.to(eye_targets.device)] if eye_targets is not None else None
        loss, logits = stepper.step(left, right, labels, update, eyes)
        loss_sum += loss
        patient_sum += stepper.loss_fn(logits.float(), labels.float())  # (an ensemble's: of its mean logits)
        micro_done += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), micro0 + micro, first_bad)
        train_probs.append(torch.sigmoid(logits.float()))
        train_rows.append(labels)
        if update:
            progress.step += 1
            if progress.ema is not None:
                progress.ema.update(stepper.model, step=progress.step)
            if bar is not None and (progress.step % 10 == 0 or micro + 1 == n_batches):
                _check_finite(first_bad, epoch, cfg.accum_steps)
                pairs_s = micro_done * cfg.batch_size * world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss_sum.item() / micro_done:.4f}", pairs_s=f"{pairs_s:.1f}",
                                run=clock.text(progress.step) if clock else None)
            # A signal stops a single process at once; DDP ranks may see it at different updates, so they stop
            # together at the end of the epoch (the flag is broadcast from rank 0 by the caller).
            if (world == 1 and run.stop.requested) or (cfg.stop_after_steps
                                                       and progress.step >= cfg.stop_after_steps):
                break
        if bar is not None:
            bar.update(1)
        t_data = time.perf_counter()
    if bar is not None:
        bar.close()
    _check_finite(first_bad, epoch, cfg.accum_steps)
    epoch_s = time.perf_counter() - t0
    train_m = multilabel_metrics(torch.cat(train_rows).cpu().numpy(), torch.cat(train_probs).cpu().numpy())
    return {"epoch": epoch + 1, "step": progress.step, "train_loss": loss_sum.item() / max(1, micro_done),
            "train_patient_loss": patient_sum.item() / max(1, micro_done),
            "train_f1_macro": train_m["f1_macro"],
            "pairs_per_s": micro_done * cfg.batch_size * world / epoch_s, "data_s": data_s,
            "data_pct": 100 * data_s / epoch_s,  # time blocked waiting for the pipeline
            "epoch_s": epoch_s}


def validate(run: Run, model, val_loader, y_val, loss_fn, row: dict, progress: Progress, log: RunLog, trivial,
             *, header: bool, mean, std, eval_model=None, eta_s: float | None = None, val_eyes=None) -> None:
    """Validation metrics into the epoch's row (metrics.csv, console); a better `select_metric` writes best.pt with
    the calibration fitted and the thresholds tuned on these validation logits (and with `val_eyes`, the validation
    eyes' (keyword labels, usable) of the per-eye head, its own calibration and thresholds: model/eyes.py).
    `eval_model`: what runs the pass (the compiled model, `Stepper.eval_model`); default `model`. With --model-ema
    the moving average is what is validated and saved."""
    cfg = run.cfg
    weights = progress.ema.module if progress.ema is not None else model
    amp_dtype = autocast_dtype(cfg.precision, run.device)
    t0 = time.perf_counter()
    runner = eval_model if eval_model is not None else model  # (a compiled module has no truth value)
    logits = predict(weights if progress.ema is not None else runner, val_loader, amp_dtype, run.device, len(y_val),
                     eye_logits=val_eyes is not None)
    logits, eye_logits = logits if val_eyes is not None else (logits, None)
    val_s = time.perf_counter() - t0  # predict ends with a copy to the CPU: the device's work is included
    val_loss = float(loss_fn(logits, torch.as_tensor(y_val, dtype=torch.float32)))
    metrics = evaluate(y_val, torch.sigmoid(logits).numpy())
    at_half = metrics["at_0.5"]
    row = {**{k: row[k] for k in ("epoch", "step", "train_loss")}, "val_loss": val_loss,
           "train_f1_macro": row["train_f1_macro"], "val_f1_micro": at_half["f1_micro"],
           "val_f1_macro": at_half["f1_macro"], "val_odir": metrics["odir"]["final"],
           "val_auc_macro": at_half["auc_macro"], **{f"f1_{c}": at_half["f1"][c] for c in CLASSES},
           **{k: row[k] for k in ("pairs_per_s", "data_s", "data_pct", "epoch_s", "lr")}, "val_s": val_s,
           "train_patient_loss": row["train_patient_loss"]}  # new columns at the end: readers by position keep working
    log.append(row, keep_epochs_below=row["epoch"])
    score = row[SELECT_COLUMNS[cfg.select_metric]] * (-1 if cfg.select_metric == "loss" else 1)  # higher is better
    better = bool(np.isfinite(score) and score > progress.best.get("score", -math.inf))
    print_epoch({**row, "eta_s": eta_s}, header=header, epochs=cfg.epochs, select_metric=cfg.select_metric, best=better)
    if better:
        progress.best = {"score": float(score), "metric": cfg.select_metric, "epoch": row["epoch"]}
        calibration = fit_calibration(logits.numpy(), y_val, cfg.calibration)
        if cfg.odir_offset:
            calibration = with_odir_offset(calibration, logits.numpy(), y_val)
        probs = apply_calibration(logits.numpy(), calibration)
        progress.thresholds = tune_thresholds(y_val, probs)
        metrics = evaluate(y_val, probs, progress.thresholds)
        extra = {"val_metrics": plain(metrics), "trivial_metrics": plain(trivial), "calibration": calibration}
        if eye_logits is not None:
            extra.update(fit_eye_head(eye_logits.numpy(), *val_eyes, cfg.calibration))
        save_checkpoint(checkpoint_payload(weights, cfg, thresholds=progress.thresholds, mean=mean, std=std,
                                           epoch=row["epoch"], step=progress.step, best=progress.best, extra=extra,
                                           run_id=run.run_id),
                        run.run_dir / "best.pt")


def restore(path: Path, model, stepper: Stepper, progress: Progress) -> int:
    """Load last.pt into the model, optimizer, scaler, RNG and progress; returns its epoch. A checkpoint of
    another run, another network or without the optimizer's state is a CheckpointError naming the file."""
    state = read_checkpoint(path)  # format, contents, and that it belongs to this run folder
    try:
        model.load_state_dict(state["model"])
        if progress.ema is not None:
            progress.ema.module.load_state_dict(state["model_ema"])
        stepper.optimizer.load_state_dict(state["optimizer"])
        stepper.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        progress.step, progress.best = int(state["step"]), dict(state["best"])
        progress.unvalidated_row = state.get("unvalidated_row")
        return int(state["epoch"])
    except KeyError as e:
        why = f"it has no {e.args[0]!r} (written by export or by hand, not by train.py's last.pt)"
    except (RuntimeError, ValueError, TypeError) as e:
        why = f"it does not fit this run's network and optimizer ({' '.join(str(e).split())[:160]})"
    raise CheckpointError(f"{path}: cannot continue from it: {why}; start a new run, or --resume the run it "
                          "belongs to")


def save_last(run: Run, stepper: Stepper, progress: Progress, epoch: int, *, mean, std) -> None:
    """last.pt: the weights plus everything --resume needs to continue exactly (optimizer, scaler, RNG, EMA)."""
    extra = {"optimizer": stepper.optimizer.state_dict(), "scaler": stepper.scaler.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             # whether this run is finished (train.py's --resume answers "finished" without touching the folder)
             "epochs_done": progress.epochs_done, "stopped_early": progress.stopped_early,
             "unvalidated_row": progress.unvalidated_row}
    if progress.ema is not None:
        extra["model_ema"] = {k: v.detach().cpu() for k, v in progress.ema.module.state_dict().items()}
    save_checkpoint(checkpoint_payload(stepper.model, run.cfg, thresholds=progress.thresholds, mean=mean, std=std,
                                       epoch=epoch, step=progress.step, best=progress.best, extra=extra,
                                       run_id=run.run_id),
                    run.run_dir / "last.pt")


def report_best(run: Run, val_tab, test_tab, y_train, val_loader, in_dtype, epochs: dict | None = None):
    """The final report: best.pt scored once on validation and on the test patients (calibrated probabilities,
    thresholds tuned on validation), beside the trivial predictor; written to report.json and
    predictions_{val,test}.csv and printed. `epochs`: how far training went (report.json's "epochs").
    Returns (best.pt's contents, its logits per split, its per-eye logits per split or None), or None without a
    completed epoch."""
    best_path = run.run_dir / "best.pt"
    if not best_path.exists():
        print(f"no completed epoch yet: continue with {tool_command('train')} --resume {shell_path(run.run_dir)}")
        return None
    ckpt = read_checkpoint(best_path)  # also: it belongs to this run folder
    model = model_from_checkpoint(ckpt, best_path).to(run.device)
    if run.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(run.cfg.precision, run.device)
    loaders, tables = {"validation": val_loader}, {"validation": val_tab}
    if len(test_tab):
        loaders["test"] = eval_loader(test_tab["left"], test_tab["right"], val_loader.source.batch_size,
                                      run.cfg.img_px, run.device, dtype=in_dtype, mean=ckpt["mean"], std=ckpt["std"],
                                      num_threads=run.cfg.loader_threads or None)
        tables["test"] = test_tab
    eyes = "eye_thresholds" in ckpt  # the per-eye head, fitted on validation eyes: its figures too
    logits, eye_logits = {}, {}
    for split, loader in loaders.items():
        out = predict(model, loader, amp_dtype, run.device, len(tables[split]), eye_logits=eyes)
        logits[split], eye_logits[split] = (out[0].numpy(), out[1].numpy()) if eyes else (out.numpy(), None)
    report = final_report(run, ckpt, tables, logits, y_train, epochs, eye_logits=eye_logits if eyes else None)
    print_final_report(report, best_path)
    write_html_report(run.run_dir)
    return ckpt, logits, (eye_logits if eyes else None)


def _check_finite(first_bad, epoch, accum):
    bad = int(first_bad.item())
    if bad >= 0:
        raise LossNotFinite(f"loss is NaN or infinite at epoch {epoch + 1}, update {bad // accum + 1} (counted from "
                         "the start of the run); stopping. The last good checkpoints are untouched. Try a lower "
                         "--lr, --precision fp32, or check the data.")


def _progress_bar(total, epoch, epochs):
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", mininterval=2, leave=False,
                dynamic_ncols=True, disable=not progress_enabled())

