"""Train the dual-eye ODIR network: `python train.py` (a CPU demo on synthetic fundus images) or
`python train.py --data ODIR_FOLDER [--preset seed|fast|demo|cpu] [--flags]`; `torchrun --nproc-per-node N
train.py ...` for several GPUs (only rank 0 writes). `--help` lists every flag.

Read top to bottom: `main` reads the flags, then sets up (devices, data, split) and calls training/loop.py's `fit`,
which builds the model and loops over epochs: `train_epoch` (the steps), `validate` (metrics, best.pt), `save_last`
(last.pt), then `report_best`. torch, timm and DALI are imported only once the flags are read, so that `--help` and
a mistyped flag answer in well under 2 s. With `--folds K`, training/folds.py calls `fit` once per fold (RUN/fold-N)
and then reports the fold ensemble.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from odir_dual.common.cli import EXIT_SIGINT, EXIT_SIGTERM, run_cli, shell_path, tool_command
from odir_dual.pipeline.host import keep_freed_memory, wrap
from odir_dual.training.config import config_parser, parse_config, resume_folder


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    """Train (see the module docstring); everything rank 0 prints also goes to RUN/train.log.

    Returns best.pt's checkpoint (a dict); None after a dry run, for a finished run, or with no epoch completed; or
    the exit status EXIT_SIGINT / EXIT_SIGTERM when a signal stopped the run (after last.pt was written).
    """
    from odir_dual.training.runlog import console_log  # (light)

    with console_log(enabled=os.environ.get("RANK", "0") == "0"):  # torchrun sets RANK; other ranks print little
        return _main(argv)


def _main(argv=None):
    started = time.time()  # report.json's start time and duration (of this process: a resume starts again)
    last = {}  # --resume's last.pt, read once: its config for the flags, its progress for "already finished"
    cfg = parse_config(argv, saved_config=lambda resume: last.setdefault("pt", saved_run(resume))["config"])
    resume_dir = resume_folder(cfg.resume) if cfg.resume else None
    if resume_dir is not None and finished(last["pt"], cfg.epochs):  # nothing to do: the folder stays untouched
        print(f"finished: {last['pt']['epochs_done']} of {cfg.epochs} epochs"
              + (" (stopped early by --patience)" if last["pt"].get("stopped_early") else "")
              + f"; extend with {tool_command('train')} --resume {shell_path(resume_dir)} --epochs N")
        return None
    # After the flags (and the check above, which reads last.pt only), the heavy imports: torch, timm, DALI.
    import torch

    from odir_dual.pipeline.odir import describe, find_layout
    from odir_dual.pipeline.pairs import left_out_summary
    from odir_dual.training.checkpoint import git_commit, library_versions
    from odir_dual.training.config import format_settings
    from odir_dual.training.data import (check_one_batch, data_folder, fold_folder, fold_tables, load_data, save_split,
                                        split_table)
    from odir_dual.training.distributed import StopRequest, setup_distributed
    from odir_dual.training.folds import cross_validate, describe_split
    from odir_dual.training.loop import Run, fit
    from odir_dual.training.runlog import (RunFolderError, check_run_folder, log_console_to, next_steps, run_folder,
                                           run_id)

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
    if is_main:  # every reason to refuse the folder, before any work: nothing is written or deleted yet
        check_run_folder(run_dir, resume=resume_dir is not None, overwrite=cfg.overwrite, unique=not cfg.name)
        print(wrap(f"odir-dual · commit {git_commit()} · "
                   + ", ".join(f"{k} {v}" for k, v in library_versions().items())))
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} × {world} rank(s)")

    # The folder actually used (the synthetic set's cache folder for the demo), as an absolute path, is recorded in
    # the config, so --resume, export.py and the reports find the same images from any working directory.
    folder = data_folder(cfg, is_main)
    cfg = dataclasses.replace(cfg, data=str(folder.resolve()))
    data = load_data(cfg, layout or find_layout(folder), is_main)  # the synthetic set's, once generated
    patients, left_out = data.patients, data.left_out
    # a resumed run: the same photographs and labels, or refused; --folds K: one split per fold
    splits = fold_tables(patients, cfg, resume_dir) if cfg.folds > 1 else [split_table(patients, cfg, resume_dir)]
    tables = [split.tables for split in splits]
    for train_tab, _, _ in tables:
        check_one_batch(train_tab, len(patients), cfg, world)
    train_tab, val_tab, test_tab = tables[0]
    # Every check has passed: only now is the folder claimed (created, or emptied by --overwrite) and written.
    with run_folder(run_dir if is_main else None, resume=resume_dir is not None, overwrite=cfg.overwrite,
                    unique=not cfg.name) as claimed:
        run_dir = claimed or run_dir
        if is_main:
            print(f"usable patients: {len(patients)}; {left_out_summary(left_out)}")
            if run_dir is not None:
                log_console_to(run_dir / "train.log")  # with what was printed so far
                for n, split in enumerate(splits if resume_dir is None else [], 1):  # (a resume read them there)
                    save_split((fold_folder(run_dir, n) if cfg.folds > 1 else run_dir) / "split.csv", split)
                left_out.to_csv(run_dir / "left_out.csv", index=False)
                (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
                if len(left_out):
                    print(f"  every left-out eye and why: {run_dir / 'left_out.csv'}")
            print(describe(patients))
            print(describe_split(tables, cfg.seed))
            print(format_settings(cfg, every=run_dir / "config.json" if run_dir else None))
        if cfg.dry_run:
            if is_main:
                for r in left_out.itertuples():
                    print(f"  left out {r.id}: {r.eye} eye {r.path}: {r.reason}")
            return None
        stop = StopRequest()
        try:
            run = Run(cfg, rank, world, device, run_dir, resume_dir, stop, started,
                      run_id(run_dir) if run_dir is not None else None)
            result = cross_validate(run, tables, fit) if cfg.folds > 1 else fit(run, *tables[0])
        finally:
            stop.restore()
        if stop.signum is not None:  # fit printed where it stopped and how to continue; the shell's status
            return EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
        if is_main and result.ckpt is not None:
            print("\n".join(next_steps(run_dir)))
        return result.ckpt


def saved_run(resume: str) -> dict:
    """The last.pt that `--resume` names (checkpoint.saved_run)."""
    from odir_dual.training.checkpoint import saved_run as read  # torch: only once the flags are read

    return read(resume)


def finished(last: dict, epochs: int) -> bool:
    """Whether the run of this last.pt has nothing left to do at `epochs` (its own, or a larger --epochs): every
    epoch done, or stopped early by --patience at its own length. A last.pt from before `epochs_done` was recorded
    is never taken as finished (it resumes, as it always did)."""
    done = last.get("epochs_done")
    if done is None or last.get("unvalidated_row") is not None:  # (a signal skipped its last epoch's validation)
        return False
    return done >= epochs or bool(last.get("stopped_early") and epochs <= last["config"]["epochs"])


def cli(argv=None) -> int:
    """`python train.py`: `main`, ended with an exit status (docs/data.md, "Exit statuses"): bad input is one line
    naming the file, row, column or flag; a signal's stop is one line saying how to continue, then 130 (SIGINT) /
    143."""

    def body():
        config_parser().parse_args(argv)  # --help and a mistyped flag answer here, before torch is imported
        # a CPU step's activations reused, not faulted in again; the command's own process only: a library caller's
        # process would keep its peak memory (pipeline/host.py)
        keep_freed_memory()
        result = main(argv)
        return result if isinstance(result, int) else None  # an exit status (a signal's stop), or success

    return run_cli(body, "train.py", interrupted=f"stopped at once: last.pt holds the last saved update; continue "
                                                 f"with {tool_command('train')} --resume RUN_FOLDER")


def console() -> int:
    """`python train.py` and the `odir-train` command: the exit status, with the process group shut down."""
    try:
        return cli()
    finally:
        if "torch.distributed" in sys.modules:  # (--help never imported it)
            from odir_dual.training.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(console())
