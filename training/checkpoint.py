"""The checkpoint format: what a checkpoint holds, atomic save, safe load (the network itself: `model.factory`).

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), so it loads with
`torch.load(path, weights_only=True)` and can never run code. train.py writes `best.pt` and `last.pt`;
export.py, the benchmarks and the tests read them through `read_checkpoint` / `model_from_checkpoint`.

    payload = checkpoint_payload(model, cfg, thresholds=..., mean=..., std=..., epoch=3, step=120, best={...})
    save_checkpoint(payload, run_dir / "best.pt")
    model = model_from_checkpoint(read_checkpoint(run_dir))   # eval mode, fp32, CPU
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from odir_dual.common.errors import OdirError
from odir_dual.model.factory import build_model, weights_description
from odir_dual.pipeline.constants import CLASSES, MAX_IMG_PX, MAX_PREPARE_PX
from odir_dual.pipeline.host import atomic_write
from odir_dual.training.config import Config, config_from_dict, resume_folder
from odir_dual.training.runlog import run_id

FORMAT = "odir-dual/1"  # "format" of every checkpoint; bump when its meaning changes
REQUIRED_KEYS = ("model", "config", "classes", "thresholds", "img_px", "mean", "std")
HERE = Path(__file__).resolve().parent


class CheckpointError(OdirError, ValueError):
    """The file is not a checkpoint of ours; the message names it."""


# ----------------------------------------------------------------------------------------------- provenance


def git_commit() -> str:
    """The code's commit (short), "-dirty" when tracked files differ from it; "unknown" outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__), "timm": timm.__version__,
                "numpy": np.__version__}
    try:
        import nvidia.dali  # optional: a checkpoint is also read where DALI is not installed

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return versions


# ----------------------------------------------------------------------------------------------- writing


def checkpoint_payload(model: nn.Module, cfg: Config, *, thresholds, mean, std, epoch, step, best,
                       extra=None, run_id: str | None = None) -> dict:
    """Everything export.py and score.py need, as plain data (loads with weights_only=True). `run_id`: the run
    folder's id (runlog.run_id): a checkpoint copied into another run's folder is refused (`read_checkpoint`)."""
    payload = {
        "run_id": run_id,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(cfg),
        "classes": list(CLASSES),
        "thresholds": [float(t) for t in thresholds],
        "img_px": cfg.img_px,
        "mean": list(mean),
        "std": list(std),
        "weights": weights_description(cfg),  # where the backbone's initial weights came from
        "versions": library_versions(),
        "commit": git_commit(),
        "epoch": epoch,
        "step": step,
        "best": best,
        "format": FORMAT,
    }
    payload.update(extra or {})
    return payload


def save_checkpoint(payload: dict, path) -> None:
    """torch.save, atomically: a kill at any moment leaves the old file or the new one; a full disk is an OSError
    (ENOSPC) naming `path`, with no temporary file left."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write as "... unexpected pos ..."
            raise _write_error(e, f) from e


def _write_error(e: RuntimeError, f) -> Exception:
    """torch.save's RuntimeError on a failed write as the OSError it hides: ENOSPC when the file system is full
    (measured while the temporary file still takes its space), else EIO; other RuntimeErrors unchanged."""
    if "unexpected pos" not in str(e) and "write" not in str(e).lower():
        return e
    try:
        st = os.fstatvfs(f.fileno())
        full = st.f_bavail * st.f_frsize < 1 << 20  # under 1 MiB free: what a checkpoint write runs into
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code))  # atomic_write adds the checkpoint's path


def weights_digest(state_dict: dict) -> str:
    """A short hash (sha256, 16 hex digits) of a state dict's tensors, names, dtypes and shapes: tells whether a
    report (report.json) was made by these very weights (modelcard.py checks it)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- reading


def load_checkpoint(path) -> dict:
    """A checkpoint is data, never code: plain tensors, numbers and strings only (no format checks)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_file(path) -> Path:
    """A checkpoint path, or a run folder → its best.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save's zip archive, or a legacy pickle (protocol 2+ starts with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_checkpoint(path) -> dict:
    """Load a checkpoint written by train.py (a file, or a run folder → best.pt) and check that it is one of ours.

    Raises:
        CheckpointError: not a torch file, refused by the weights-only loader, or not an odir-dual checkpoint.
    """
    path = checkpoint_file(path)
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (neither a torch.save zip archive nor a "
                              "pickle)")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - torch.load raises KeyError, RuntimeError, UnpicklingError, ...
        msg = str(e)
        if "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): it holds Python objects, "
                                  f"not plain data, so it is not a checkpoint written by train.py"
                                  + (f" (object of {found[1]})" if found else "")) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({type(e).__name__}: "
                              f"{msg.splitlines()[0][:120] if msg else 'unreadable'})") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT:
        what = f"format {fmt!r}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}, not a dict"
        raise CheckpointError(f"{path}: not an odir-dual checkpoint ({what}; expected format "
                              f"{FORMAT!r}, as train.py writes in best.pt/last.pt)")
    absent = [k for k in REQUIRED_KEYS if k not in ckpt]
    if absent:
        raise CheckpointError(f"{path}: odir-dual checkpoint without {', '.join(absent)}")
    _check_contents(ckpt, path)
    check_belongs_to_folder(ckpt, path)
    return ckpt


def check_belongs_to_folder(ckpt: dict, path) -> None:
    """CheckpointError when `path` lies in a run folder whose marker names another run than the checkpoint (a
    last.pt or best.pt copied from another run: resuming or exporting it would mix two runs). Folders from before
    run ids, and checkpoints outside a run folder, have nothing to compare."""
    folder_id = run_id(Path(path).parent)
    ckpt_id = ckpt.get("run_id")
    if folder_id is not None and ckpt_id != folder_id:
        raise CheckpointError(f"{path}: belongs to another run (run id {ckpt_id or 'none: from before run ids'}; "
                              f"this folder's run is {folder_id}): a checkpoint copied in from elsewhere; move it "
                              "out, or use the run folder it came from")


def _check_contents(ckpt: dict, path) -> None:
    """The fields export.py and score.py build on have the right kind and size (a crafted or damaged file is
    refused here, with its name, not by a traceback deep inside the export)."""
    def fail(what: str):
        raise CheckpointError(f"{path}: {what}")

    classes, thresholds = ckpt["classes"], ckpt["thresholds"]
    if not isinstance(classes, (list, tuple)) or list(classes) != list(CLASSES):
        fail(f"classes {classes!r}; this code predicts {list(CLASSES)}")
    try:
        thr = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError):
        thr = np.full(0, np.nan)
    if thr.shape != (len(CLASSES),) or not np.all((thr >= 0) & (thr <= 1)):
        fail(f"thresholds {thresholds!r}; expected {len(CLASSES)} numbers in [0, 1], one per class")
    if not isinstance(ckpt["img_px"], int) or isinstance(ckpt["img_px"], bool) or ckpt["img_px"] < 1:
        fail(f"img_px {ckpt['img_px']!r}; expected a positive whole number of pixels")
    sides = {"img_px": ckpt["img_px"], "config img_px": ckpt["config"].get("img_px") if isinstance(
        ckpt["config"], dict) else None, "config prepare_px": (ckpt["config"].get("prepare_px") or 0) if isinstance(
        ckpt["config"], dict) else None}
    for name, value in sides.items():
        limit = MAX_PREPARE_PX if "prepare" in name else MAX_IMG_PX
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            fail(f"{name} {value}; at most {limit} px (a larger value is a damaged or crafted file: exporting or "
                 "scoring it would need gigabytes per image)")
    for name in ("mean", "std"):
        try:
            values = np.asarray(ckpt[name], dtype=np.float64)
        except (TypeError, ValueError):
            values = np.full(0, np.nan)
        if values.shape != (3,) or not np.all(np.isfinite(values)) or (name == "std" and not np.all(values > 0)):
            fail(f"{name} {ckpt[name]!r}; expected 3 finite numbers" + (" > 0" if name == "std" else ""))
    if not isinstance(ckpt["config"], dict):
        fail(f"config is a {type(ckpt['config']).__name__}, not a dict")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        fail(f"model is a {type(ckpt['model']).__name__}, not a state dict (names → tensors)")
    try:
        config_from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        fail(f"config: {e}")


def checkpoint_config(ckpt: dict) -> Config:
    """The Config a checkpoint was trained with, set to rebuild its model offline (no download, no weights file:
    the state dict brings every weight)."""
    return dataclasses.replace(config_from_dict(ckpt["config"]), pretrained=False, weights_file="")


def model_from_checkpoint(ckpt: dict, path="checkpoint") -> nn.Module:
    """The plain DualEyeNet of a checkpoint, weights loaded (strict), in eval mode, fp32 on the CPU."""
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a checkpoint of ours (no model and config); read it with read_checkpoint")
    try:
        model = build_model(checkpoint_config(ckpt), pretrained=False)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # unknown backbone, impossible sizes, ...
        raise CheckpointError(f"{path}: cannot build the network its config describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved config "
                              f"({str(e).splitlines()[0]})") from None
    return model.eval()


def saved_run_config(resume: str) -> dict:
    """The config a run was started with, from its last.pt (`resume`: the run folder or its last.pt)."""
    return saved_run(resume)["config"]


def saved_run(resume: str) -> dict:
    """A run's last.pt (`resume`: the run folder or its last.pt): its config, weights and progress; for a --folds
    run (no last.pt of its own, a fold-1 folder) {"config": its config.json} (its folds keep their progress).

    Raises:
        CheckpointError: no last.pt (a run killed before its first checkpoint), or a damaged one; one
            line naming the file.
    """
    folder = resume_folder(resume)
    last, saved = folder / "last.pt", folder / "config.json"
    if not last.is_file() and (folder / "fold-1").is_dir() and saved.is_file():
        try:
            config = json.loads(saved.read_text())
            if config_from_dict(config).folds > 1:
                return {"config": config}
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"--resume {resume}: {saved} is damaged ({e})") from None
    if not last.is_file():
        raise CheckpointError(f"--resume {resume}: no {last} (the run stopped before its first checkpoint, or this is "
                              f"no run folder); start it again with --overwrite")
    return read_checkpoint(last)  # a damaged or foreign last.pt: one line naming it
