"""Train the dual-eye ODIR network: `python train.py` (a CPU demo on synthetic fundus images) or
`python train.py --data ODIR_FOLDER [--preset seed|fast|demo|cpu] [--flags]`; `torchrun --nproc-per-node N
train.py ...` for several GPUs (only rank 0 writes). `--help` lists every flag.

Read top to bottom: `main` sets up (config, devices, data, split), `fit` builds the model and loops over epochs:
`train_epoch` (the steps), `validate` (metrics, best.pt), `save_last` (last.pt), then `report_best`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from odir_dual.common.cli import Terminated, run_cli
from odir_dual.model import (backbone_norm, count_parameters, evaluate, multilabel_metrics, pos_weights_from_labels,
                             tune_thresholds)
from odir_dual.model.calibration import apply_calibration, fit_calibration, with_odir_offset
from odir_dual.model.eyes import fit_eye_head
from odir_dual.model.factory import build_model, weights_description
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.dali import Augment, eval_loader, train_loader
from odir_dual.pipeline.host import progress_enabled
from odir_dual.pipeline.keywords import eye_label_matrix
from odir_dual.pipeline.odir import describe, find_layout, label_matrix
from odir_dual.pipeline.pairs import left_out_summary
from odir_dual.training.checkpoint import (checkpoint_payload, git_commit, library_versions, load_checkpoint,
                                           model_from_checkpoint, save_checkpoint, saved_run_config)
from odir_dual.training.config import (REFERENCE_BATCH, SELECT_COLUMNS, Config, format_settings, parse_config,
                                       resume_folder)
from odir_dual.training.data import check_one_batch, data_folder, load_data, per_eye_targets, split_table
from odir_dual.training.distributed import (StopRequest, broadcast_flag, check_replicas, setup_distributed,
                                            shutdown)
from odir_dual.training.engine import Stepper, autocast_dtype, eval_batch_pairs, lr_factor, make_stepper, predict
from odir_dual.training.evaluation import final_report, plain, write_html_report
from odir_dual.training.runlog import (RunFolderError, RunLog, console_log, log_console_to, next_steps, print_epoch,
                                       print_final_report, run_folder)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    """Train (see the module docstring); everything rank 0 prints also goes to RUN/train.log."""
    with console_log(enabled=os.environ.get("RANK", "0") == "0"):  # torchrun sets RANK; other ranks print little
        return _main(argv)


def _main(argv=None):
    started = time.time()  # report.json's start time and duration (of this process: a resume starts again)
    cfg = parse_config(argv, saved_config=saved_run_config)  # with --resume: the run's config (+ a larger --epochs)
    resume_dir = resume_folder(cfg.resume) if cfg.resume else None
    if cfg.name and (cfg.name in (".", "..") or Path(cfg.name).name != cfg.name or "\\" in cfg.name):
        raise RunFolderError(f"--name {cfg.name!r}: must be a plain folder name, created inside --out {cfg.out} "
                             "(no '/', '..' or absolute path)")
    # the data folder's layout, found once and passed down; a wrong --data is one line before anything else happens
    # (no run folder, no header)
    layout = find_layout(cfg.data) if cfg.data else None
    rank, world, device = setup_distributed()
    is_main = rank == 0
    torch.manual_seed(cfg.seed)

    run_dir = None
    if not cfg.dry_run:
        run_dir = resume_dir or Path(cfg.out) / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    # rank 0 claims the folder before any work: exclusive, locked, removed again if no checkpoint gets written
    with run_folder(run_dir if is_main else None, resume=resume_dir is not None, overwrite=cfg.overwrite,
                    unique=not cfg.name) as claimed:
        run_dir = claimed or run_dir
        if is_main and run_dir is not None:
            log_console_to(run_dir / "train.log")  # with what was printed so far
        if is_main:
            print(f"odir-dual · commit {git_commit()} · "
                  + ", ".join(f"{k} {v}" for k, v in library_versions().items()))
            print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} × {world} "
                  f"rank(s)")

        # The folder actually used (the synthetic set's cache folder for the demo), as an absolute path, is recorded
        # in the config, so --resume, export.py and the reports find the same images from any working directory.
        folder = data_folder(cfg, is_main)
        cfg = dataclasses.replace(cfg, data=str(folder.resolve()))
        data = load_data(cfg, layout or find_layout(folder), is_main)  # the synthetic set's, once generated
        patients, left_out = data.patients, data.left_out
        train_tab, val_tab, test_tab = split_table(patients, cfg, run_dir if is_main else None, resume_dir)
        check_one_batch(train_tab, len(patients), cfg, world)
        if is_main:
            print(f"usable patients: {len(patients)}; {left_out_summary(left_out)}")
            if run_dir is not None:
                left_out.to_csv(run_dir / "left_out.csv", index=False)
                (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
                if len(left_out):
                    print(f"  every left-out eye and why: {run_dir / 'left_out.csv'}")
            print(describe(patients))
            print(f"split (seed {cfg.seed}): train {len(train_tab)} · validation {len(val_tab)} · test "
                  f"{len(test_tab)}")
            print(format_settings(cfg, every=run_dir / "config.json" if run_dir else None))
        if cfg.dry_run:
            if is_main:
                for r in left_out.itertuples():
                    print(f"  left out {r.id}: {r.eye} eye {r.path}: {r.reason}")
            return None
        stop = StopRequest()
        try:
            result = fit(Run(cfg, rank, world, device, run_dir, resume_dir, stop, started), train_tab, val_tab,
                         test_tab)
        finally:
            stop.restore()
        if stop.signum is not None:  # stopped by a signal: say so with the shell's status (130/143), not 0
            if is_main:
                print(f"continue with: python train.py --resume {run_dir}")
            raise KeyboardInterrupt if stop.signum == signal.SIGINT else Terminated
        if is_main and result is not None:
            print("\n".join(next_steps(run_dir)))
        return result


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


def fit(run: Run, train_tab, val_tab, test_tab):
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
        print(f"model: {cfg.backbone} dual-eye" + (f" · ensemble of {cfg.ensemble}" if cfg.ensemble > 1 else "")
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
        state = load_checkpoint(run.resume_dir / "last.pt")
        model.load_state_dict(state["model"])
        if progress.ema is not None:
            progress.ema.module.load_state_dict(state["model_ema"])
        stepper.optimizer.load_state_dict(state["optimizer"])
        stepper.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        progress.step, progress.best = state["step"], state["best"]
        if run.is_main:
            print(f"resumed {run.resume_dir} at update {progress.step} (epoch {state['epoch']})")

    loader = train_loader(train_tab, cfg.batch_size, cfg.img_px, device, augment=Augment(same_for_both_eyes=
                          cfg.same_eye_aug), weighted=cfg.weighted_sampling, seed=cfg.seed, rank=run.rank,
                          world=run.world, start_step=progress.step * cfg.accum_steps,
                          step_multiple=cfg.accum_steps, dtype=in_dtype, mean=mean, std=std,
                          num_threads=cfg.loader_threads or None)
    updates_per_epoch = loader.source.steps // cfg.accum_steps
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
    for epoch in range(start_epoch, cfg.epochs):
        row = train_epoch(run, stepper, loader, progress, epoch, lr, schedule, eye_targets)
        finished_epoch = progress.step % updates_per_epoch == 0
        stop_now = broadcast_flag(run.should_stop(progress.step), device)
        if run.is_main and finished_epoch:
            row["lr"] = lr * lr_factor(progress.step - 1, **schedule)
            validate(run, model, val_loader, y_val, stepper.loss_fn, row, progress, log, trivial,
                     header=epoch == start_epoch, eval_model=stepper.eval_model, val_eyes=val_eyes,
                     **checkpoint_args)
        if run.is_main:
            save_last(run, stepper, progress, epoch, **checkpoint_args)
        early = broadcast_flag(bool(cfg.patience and finished_epoch
                                    and epoch + 1 - progress.best["epoch"] >= cfg.patience), device)
        if early and run.is_main:
            print(f"early stopping: no better validation {cfg.select_metric} for {cfg.patience} epochs")
        if stop_now or early:
            break
    check_replicas(model, device, run.is_main)
    if run.is_main:
        return report_best(run, val_tab, test_tab, y_train, val_loader, in_dtype)
    return None


def train_epoch(run: Run, stepper: Stepper, loader, progress: Progress, epoch: int, lr: float, schedule,
                eye_targets: torch.Tensor | None = None) -> dict:
    """One pass over this rank's share (shorter right after a resume); returns the epoch's training figures.
    `eye_targets`: the training table's per-eye labels (`per_eye_targets`), when the per-eye loss is on."""
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
                bar.set_postfix(loss=f"{loss_sum.item() / micro_done:.4f}", pairs_s=f"{pairs_s:.1f}")
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
             *, header: bool, mean, std, eval_model=None, val_eyes=None) -> None:
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
    print_epoch(row, header=header, epochs=cfg.epochs, select_metric=cfg.select_metric, best=better)
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
                                           epoch=row["epoch"], step=progress.step, best=progress.best, extra=extra),
                        run.run_dir / "best.pt")


def save_last(run: Run, stepper: Stepper, progress: Progress, epoch: int, *, mean, std) -> None:
    """last.pt: the weights plus everything --resume needs to continue exactly (optimizer, scaler, RNG, EMA)."""
    extra = {"optimizer": stepper.optimizer.state_dict(), "scaler": stepper.scaler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    if progress.ema is not None:
        extra["model_ema"] = {k: v.detach().cpu() for k, v in progress.ema.module.state_dict().items()}
    save_checkpoint(checkpoint_payload(stepper.model, run.cfg, thresholds=progress.thresholds, mean=mean, std=std,
                                       epoch=epoch, step=progress.step, best=progress.best, extra=extra),
                    run.run_dir / "last.pt")


def report_best(run: Run, val_tab, test_tab, y_train, val_loader, in_dtype):
    """The final report: best.pt scored once on validation and on the test patients (calibrated probabilities,
    thresholds tuned on validation), beside the trivial predictor; written to report.json and
    predictions_{val,test}.csv and printed."""
    best_path = run.run_dir / "best.pt"
    if not best_path.exists():
        print(f"no completed epoch yet: resume with --resume {run.run_dir}")
        return None
    ckpt = load_checkpoint(best_path)
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
    report = final_report(run, ckpt, tables, logits, y_train, eye_logits=eye_logits if eyes else None)
    print_final_report(report, best_path)
    write_html_report(run.run_dir)
    return ckpt


def _check_finite(first_bad, epoch, accum):
    bad = int(first_bad.item())
    if bad >= 0:
        raise SystemExit(f"loss is NaN or infinite at epoch {epoch + 1}, update {bad // accum + 1} (counted from "
                         "the start of the run); stopping. The last good checkpoints are untouched. Try a lower "
                         "--lr, --precision fp32, or check the data.")


def _progress_bar(total, epoch, epochs):
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", mininterval=2, leave=False,
                dynamic_ncols=True, disable=not progress_enabled())


def cli(argv=None) -> int:
    """`python train.py`: `main`, ended with an exit status (docs/data.md, "Exit statuses"): bad input is one line
    naming the file, row, column or flag, an interruption says what was kept."""
    return run_cli(lambda: main(argv) and None, "train.py",
                   interrupted="the checkpoints written so far are complete; continue with --resume RUN_FOLDER")


def console() -> int:
    """`python train.py` and the `odir-train` command: the exit status, with the process group shut down."""
    try:
        return cli()
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(console())
