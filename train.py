"""Train the dual-eye ODIR network: `python train.py` (a CPU demo on synthetic fundus images) or
`python train.py --data ODIR_FOLDER [--preset seed|fast|demo] [--flags]`.

Multi-GPU: `torchrun --nproc-per-node N train.py --data ...` (each rank reads its own shard; only rank 0 writes).
Every flag is a field of `config.Config`; `--help` lists them with their defaults.

Read top to bottom: `main` sets up (config, devices, data, split), `fit` builds the model and loops over epochs:
`train_epoch` (the steps), `validate` (metrics, best.pt), `save_last` (last.pt), then `report_best`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import (build_model, checkpoint_payload, git_commit, library_versions, load_checkpoint,
                        save_checkpoint)
from config import REFERENCE_BATCH, Config, config_from_dict, format_config, parse_config
from distributed import barrier, broadcast_flag, check_replicas, setup_distributed, shutdown
from engine import Stepper, autocast_dtype, lr_factor, make_stepper, predict
from pipeline.constants import CLASSES
from runlog import RunLog, print_epoch, print_final_report


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next update, after writing last.pt."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Give the caller its own handlers back (train.main may run inside a larger program or a test)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this update (with torchrun: at the end of this "
              "epoch), writing last.pt; again to stop at once", flush=True)


# ----------------------------------------------------------------------------------------------- data


def data_folder(cfg: Config, is_main: bool) -> Path:
    """The ODIR folder to train on; the synthetic demo set (generated once, cached) when --data is not given."""
    if cfg.data:
        return Path(cfg.data)
    from pipeline.host import cache_root
    from pipeline.synthetic import ensure_synthetic_odir

    root = cache_root() / "synthetic"
    if is_main:
        print(f"no --data given: using the synthetic ODIR demo set ({cfg.synthetic_patients} patients) in {root}")
        ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)
    barrier()
    return ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)  # rank 0: a cache hit by now


def load_data(cfg: Config, folder: Path, is_main: bool):
    """(patients, left_out): rank 0 prepares the images, the others then find them up to date."""
    from pipeline.pairs import load_prepared

    kwargs = dict(cache_dir=cfg.cache_dir or None, strict=cfg.strict)
    if is_main:
        result = load_prepared(folder, cfg.prepare_px or cfg.img_px, progress=True, **kwargs)
    barrier()
    if not is_main:
        result = load_prepared(folder, cfg.prepare_px or cfg.img_px, progress=False, **kwargs)
    return result


def split_table(patients, cfg: Config, run_dir: Path | None, resume_dir: Path | None):
    """Seeded multi-label stratified split; reloaded from the run folder when resuming."""
    from pipeline.odir import label_matrix
    from pipeline.split import load_split, save_split, stratified_split

    if resume_dir is not None:
        ids_train, ids_val, _ = load_split(resume_dir / "split.csv")
    else:
        tr, va = stratified_split(label_matrix(patients), cfg.val_fraction, cfg.seed)
        ids_train, ids_val = patients["id"].to_numpy()[tr], patients["id"].to_numpy()[va]
        if run_dir is not None:
            save_split(run_dir / "split.csv", ids_train, ids_val)
    by_id = patients.set_index("id", drop=False)
    missing = set(ids_train).union(ids_val) - set(by_id.index)
    if missing:
        raise SystemExit(f"split.csv names {len(missing)} patient(s) that are no longer usable, e.g. "
                         f"{sorted(missing)[:5]}: was the data changed since the run started?")
    return by_id.loc[ids_train].reset_index(drop=True), by_id.loc[ids_val].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(y_true, probs, thresholds=None) -> dict:
    """Multi-label metrics (2-D F1/AUC) and the official ODIR score, both at 0.5 and at tuned thresholds."""
    from model import multilabel_metrics, odir_score

    out = {"at_0.5": multilabel_metrics(y_true, probs, 0.5), "odir": odir_score(y_true, probs)}
    if thresholds is not None:
        out["tuned"] = multilabel_metrics(y_true, probs, thresholds)
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_config(argv, description=__doc__)
    resume_dir = None
    if cfg.resume:
        resume_dir = Path(cfg.resume)
        resume_dir = resume_dir.parent if resume_dir.suffix == ".pt" else resume_dir
        saved = config_from_dict(load_checkpoint(resume_dir / "last.pt")["config"])
        cfg = dataclasses.replace(saved, resume=cfg.resume, stop_after_steps=cfg.stop_after_steps)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    torch.manual_seed(cfg.seed)

    run_dir = None
    if not cfg.dry_run:
        run_dir = resume_dir or Path(cfg.out) / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    if is_main:
        print(f"odir-dual · commit {git_commit()} · {json.dumps(library_versions())}")
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} × {world} rank(s)")
        print(format_config(cfg))

    # The folder actually used (the synthetic set's cache folder for the demo) is recorded in the config, so
    # --resume and export.py find the same images.
    cfg = dataclasses.replace(cfg, data=str(data_folder(cfg, is_main)))
    patients, left_out = load_data(cfg, Path(cfg.data), is_main)
    train_tab, val_tab = split_table(patients, cfg, run_dir if is_main else None, resume_dir)
    if is_main:
        from pipeline.odir import describe
        from pipeline.pairs import left_out_summary

        print(f"usable patients: {len(patients)}; {left_out_summary(left_out)}")
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            left_out.to_csv(run_dir / "left_out.csv", index=False)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            if len(left_out):
                print(f"  every left-out eye and why: {run_dir / 'left_out.csv'}")
        print(describe(patients))
        print(f"split (seed {cfg.seed}): train {len(train_tab)} · validation {len(val_tab)}")
    if cfg.dry_run:
        if is_main:
            for r in left_out.itertuples():
                print(f"  left out {r.id}: {r.eye} eye {r.path}: {r.reason}")
        return None
    stop = StopRequest()
    try:
        return fit(Run(cfg, rank, world, device, run_dir, resume_dir, stop), train_tab, val_tab)
    finally:
        stop.restore()


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def should_stop(self, step: int) -> bool:
        return bool(self.stop.requested or (self.cfg.stop_after_steps and step >= self.cfg.stop_after_steps))


@dataclass
class Progress:
    """What changes as training goes, and what last.pt restores."""

    step: int = 0  # optimizer updates done
    best: dict = dataclasses.field(default_factory=lambda: {"f1_macro": -1.0, "epoch": -1})
    thresholds: np.ndarray = dataclasses.field(default_factory=lambda: np.full(len(CLASSES), 0.5))


def fit(run: Run, train_tab, val_tab):
    """Build the model and the loaders, then epochs of: train, validate (best.pt), save last.pt."""
    from model import backbone_norm, count_parameters, pos_weights_from_labels
    from pipeline.dali import Augment, eval_loader, train_loader
    from pipeline.odir import label_matrix

    cfg, device = run.cfg, run.device
    amp_dtype = autocast_dtype(cfg.precision, device)
    in_dtype = amp_dtype or torch.float32  # images arrive in the autocast dtype: half the bytes of fp32
    mean, std = backbone_norm(cfg.backbone)  # what the pretrained weights expect (ImageNet's for ConvNeXt)

    model = build_model(cfg, pretrained=cfg.pretrained and run.resume_dir is None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.is_main:
        print(f"model: {cfg.backbone} dual-eye · {count_parameters(model) / 1e6:.1f}M parameters "
              f"({count_parameters(model.backbone) / 1e6:.1f}M in the backbone)")
    pairs_per_update = cfg.batch_size * cfg.accum_steps * run.world
    lr = cfg.lr * math.sqrt(pairs_per_update / REFERENCE_BATCH)
    y_train, y_val = label_matrix(train_tab), label_matrix(val_tab)
    stepper = make_stepper(model, cfg, device, lr, pos_weights_from_labels(y_train).to(device), run.world)

    progress = Progress()
    if run.resume_dir is not None:
        state = load_checkpoint(run.resume_dir / "last.pt")
        model.load_state_dict(state["model"])
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
        val_loader = eval_loader(val_tab["left"], val_tab["right"], cfg.batch_size, cfg.img_px, device,
                                 dtype=in_dtype, mean=mean, std=std, num_threads=cfg.loader_threads or None)
        print(f"{updates_per_epoch} updates/epoch of {pairs_per_update} pairs · head lr {lr:.2e} · "
              f"backbone lr {lr * cfg.backbone_lr_mult:.2e} · precision {amp_dtype or 'fp32'} · "
              f"compile {cfg.compile} · channels_last {cfg.channels_last}")

    # The baseline every number is read against: always predict the training prevalence.
    trivial = evaluate(y_val, np.broadcast_to(y_train.mean(0), y_val.shape).copy())
    log = RunLog(run.run_dir) if run.is_main else None
    checkpoint_args = dict(mean=mean, std=std)
    start_epoch = progress.step // updates_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        row = train_epoch(run, stepper, loader, progress, epoch, lr, schedule)
        finished_epoch = progress.step % updates_per_epoch == 0
        stop_now = broadcast_flag(run.should_stop(progress.step), device)
        if run.is_main and finished_epoch:
            row["lr"] = lr * lr_factor(progress.step - 1, **schedule)
            validate(run, model, val_loader, y_val, stepper.loss_fn, row, progress, log, trivial,
                     header=epoch == start_epoch, **checkpoint_args)
        if run.is_main:
            save_last(run, stepper, progress, epoch, **checkpoint_args)
        early = broadcast_flag(bool(cfg.patience and finished_epoch
                                    and epoch + 1 - progress.best["epoch"] >= cfg.patience), device)
        if early and run.is_main:
            print(f"early stopping: no better validation F1 macro for {cfg.patience} epochs")
        if stop_now or early:
            break
    check_replicas(model, device, run.is_main)
    if run.is_main:
        return report_best(run.run_dir, val_tab)
    return None


def train_epoch(run: Run, stepper: Stepper, loader, progress: Progress, epoch: int, lr: float, schedule) -> dict:
    """One pass over this rank's share (shorter right after a resume); returns the epoch's training figures."""
    from model import multilabel_metrics

    cfg, device, world = run.cfg, run.device, run.world
    t0, data_s = time.perf_counter(), 0.0
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite micro-step, no host sync
    train_probs, train_rows = [], []
    n_batches = len(loader)
    bar = _progress_bar(n_batches, epoch, cfg.epochs) if run.is_main else None
    stepper.optimizer.zero_grad(set_to_none=True)
    micro_done, micro0 = 0, progress.step * cfg.accum_steps  # micro-steps are numbered across the run
    t_data = time.perf_counter()
    for micro, (left, right, labels, _) in enumerate(loader):
        data_s += time.perf_counter() - t_data
        update = (micro + 1) % cfg.accum_steps == 0
        if update:
            stepper.set_lr(lr * lr_factor(progress.step, **schedule))
        loss, logits = stepper.step(left, right, labels, update)
        loss_sum += loss
        micro_done += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), micro0 + micro, first_bad)
        train_probs.append(torch.sigmoid(logits.float()))
        train_rows.append(labels)
        if update:
            progress.step += 1
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
            "train_f1_macro": train_m["f1_macro"],
            "pairs_per_s": micro_done * cfg.batch_size * world / epoch_s, "data_s": data_s,
            "data_pct": 100 * data_s / epoch_s,  # time blocked waiting for the pipeline
            "epoch_s": epoch_s}


def validate(run: Run, model, val_loader, y_val, loss_fn, row: dict, progress: Progress, log: RunLog, trivial,
             *, header: bool, mean, std) -> None:
    """Validation metrics into the epoch's row (metrics.csv, console); a better F1 macro writes best.pt."""
    from model import multilabel_metrics, tune_thresholds

    amp_dtype = autocast_dtype(run.cfg.precision, run.device)
    logits = predict(model, val_loader, amp_dtype, run.device, len(y_val))
    val_loss = float(loss_fn(logits, torch.as_tensor(y_val, dtype=torch.float32)))
    probs = torch.sigmoid(logits).numpy()
    metrics = evaluate(y_val, probs)
    at_half = metrics["at_0.5"]
    row = {**{k: row[k] for k in ("epoch", "step", "train_loss")}, "val_loss": val_loss,
           "train_f1_macro": row["train_f1_macro"], "val_f1_micro": at_half["f1_micro"],
           "val_f1_macro": at_half["f1_macro"], "val_odir": metrics["odir"]["final"],
           "val_auc_macro": at_half["auc_macro"], **{f"f1_{c}": at_half["f1"][c] for c in CLASSES},
           **{k: row[k] for k in ("pairs_per_s", "data_s", "data_pct", "epoch_s", "lr")}}
    log.append(row, keep_epochs_below=row["epoch"])
    print_epoch(row, header=header)
    if row["val_f1_macro"] > progress.best["f1_macro"]:
        progress.best = {"f1_macro": float(row["val_f1_macro"]), "epoch": row["epoch"]}
        progress.thresholds = tune_thresholds(y_val, probs)
        metrics["tuned"] = multilabel_metrics(y_val, probs, progress.thresholds)
        extra = {"val_metrics": _plain(metrics), "trivial_metrics": _plain(trivial)}
        save_checkpoint(checkpoint_payload(model, run.cfg, thresholds=progress.thresholds, mean=mean, std=std,
                                           epoch=row["epoch"], step=progress.step, best=progress.best, extra=extra),
                        run.run_dir / "best.pt")


def save_last(run: Run, stepper: Stepper, progress: Progress, epoch: int, *, mean, std) -> None:
    """last.pt: the weights plus everything --resume needs to continue exactly (optimizer, scaler, RNG)."""
    extra = {"optimizer": stepper.optimizer.state_dict(), "scaler": stepper.scaler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    save_checkpoint(checkpoint_payload(stepper.model, run.cfg, thresholds=progress.thresholds, mean=mean, std=std,
                                       epoch=epoch, step=progress.step, best=progress.best, extra=extra),
                    run.run_dir / "last.pt")


def report_best(run_dir: Path, val_tab):
    """Final evaluation of best.pt on the validation split: metrics at 0.5 and at the tuned thresholds."""
    best_path = run_dir / "best.pt"
    if not best_path.exists():
        print(f"no completed epoch yet: resume with --resume {run_dir}")
        return None
    ckpt = load_checkpoint(best_path)
    print_final_report(ckpt, best_path, len(val_tab))
    return ckpt


def _plain(obj):
    """Metrics as JSON-able plain data (numpy scalars → float) for a weights_only checkpoint."""
    return json.loads(json.dumps(obj, default=float))


def _check_finite(first_bad, epoch, accum):
    bad = int(first_bad.item())
    if bad >= 0:
        raise SystemExit(f"loss is NaN or infinite at epoch {epoch + 1}, update {bad // accum + 1} (counted from "
                         "the start of the run); stopping. The last good checkpoints are untouched. Try a lower "
                         "--lr, --precision fp32, or check the data.")


def _progress_bar(total, epoch, epochs):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", mininterval=2, leave=False,
                dynamic_ncols=True)


if __name__ == "__main__":
    from pipeline.odir import SheetError
    from pipeline.pairs import DataError

    try:
        main()
    except (DataError, SheetError, FileNotFoundError) as e:  # bad input: the message names the file, row, column
        sys.exit(f"error: {e}")
    finally:
        shutdown()
