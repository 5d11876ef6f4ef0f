"""Export a trained checkpoint to ONNX, checked against PyTorch on every export.

    python export.py RUN/best.pt            # or the run folder RUN (→ RUN/best.pt); writes RUN/best.onnx
    python export.py RUN -o model.onnx [--fp16] [--opset 20] [--check-images FOLDER]
    python export.py RUN [--fold N]         # a --folds run: the fold ensemble as one graph (or fold N alone)

The ONNX file takes `left` and `right` (N, 3, img_px, img_px), normalised with the model's mean/std, and gives
`probs` (calibrated) and `logits` (N, 8), float32 also with --fp16; a model trained with the per-eye head
(--eye-loss-weight) also `eye_probs` (N, 2, 8) [left, right], calibrated on validation eyes. Its metadata carries
what score.py needs (classes, thresholds, per-eye thresholds, img_px, mean, std, backbone, commit, config).

The file is written only when the checks pass: `onnx.checker` (full check), and onnxruntime against PyTorch on
random inputs and on real images (--check-images, else the run's validation patients when found), with a largest
probability difference of at most 1e-4 in fp32, 1e-2 in fp16. Beside it: MODEL_CARD.md (intended use, training
data, figures per class, thresholds, calibration, limitations).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from odir_dual.common.cli import ArgParser, run_cli, shell_path, tool_command
from odir_dual.common.errors import OdirError
from odir_dual.training.checkpoint import (CheckpointError, checkpoint_file, model_from_checkpoint, read_checkpoint,
                                           weights_digest)
from odir_dual.deploy.modelcard import CARD_NAME, run_report, write_model_card
from odir_dual.model.eyes import LABELS_FOLLOW
from odir_dual.model.trust import model_quality, untrusted_lines
from odir_dual.pipeline.constants import EYES
from odir_dual.pipeline.dali import eval_loader
from odir_dual.pipeline.host import check_output, remove_stale_temporaries, temporary_path, wrapped
from odir_dual.pipeline.pairs import default_cache, find_pairs, prepare_pairs
from odir_dual.pipeline.split import load_split
from odir_dual.deploy.runtime import ONNX_FORMAT, ort_session
from odir_dual.training.data import fold_folder
from odir_dual.training.ensemble import ENSEMBLE, is_fold_run, load_fold_ensemble

DEFAULT_OPSET = 20  # torch 2.14's default; onnxruntime 1.31 runs up to 23
FP32_TOL = 1e-4  # max |Δ probability|, onnxruntime fp32 vs PyTorch fp32
FP16_TOL = 1e-2  # max |Δ probability|, onnxruntime fp16 vs PyTorch fp32; measured <= 6e-5 (CPU, random weights)
CHECK_PAIRS = 16  # real image pairs compared per export
EXAMPLE_BATCH = 2  # batch of the tracing inputs; the checks run other batch sizes to prove the batch is dynamic


class ExportCheckError(OdirError, RuntimeError):
    """The exported model disagrees with PyTorch (or fails the ONNX checker)."""


class ProbsAndLogits(nn.Module):
    """The inference graph: (left, right) → (probs, logits), both float32 whatever the input dtype; with
    `eye_calibration`, also eye_probs (N, 2, K) of the per-eye head: (probs, logits, eye_probs).

    probs are the calibrated probabilities: sigmoid(a * logits + b) with the per-class (a, b) that training fitted
    on validation (model.calibration; a = 1, b = 0 when the checkpoint has none), so every consumer of the ONNX
    file (score.py, an ODIR submission) gets the same probabilities as the run's report; eye_probs likewise with
    the per-eye head's (a, b), fitted on validation eyes (model/eyes.py)."""

    def __init__(self, net: nn.Module, calibration: dict | None = None, eye_calibration: dict | None = None):
        super().__init__()
        self.net = net
        self.eyes = eye_calibration is not None
        k = net.config["num_classes"]
        for prefix, cal in (("", calibration), ("eye_", eye_calibration)):
            cal = cal if cal and "a" in cal else None
            self.register_buffer(f"{prefix}scale", torch.tensor(cal["a"] if cal else [1.0] * k, dtype=torch.float32))
            self.register_buffer(f"{prefix}shift", torch.tensor(cal["b"] if cal else [0.0] * k, dtype=torch.float32))

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        if not self.eyes:
            logits = self.net(left, right).float()  # (N, 8)
            return torch.sigmoid(logits * self.scale + self.shift), logits
        logits, eye_logits = self.net(left, right, eye_logits=True)  # (N, 8), (N, 2, 8)
        logits = logits.float()
        return (torch.sigmoid(logits * self.scale + self.shift), logits,
                torch.sigmoid(eye_logits.float() * self.eye_scale + self.eye_shift))


def exported_eye_calibration(ckpt: dict, net: nn.Module) -> dict | None:
    """The per-eye head's calibration when the export includes it: a network with the head whose best.pt has the
    per-eye thresholds fitted on validation eyes (train.py writes them); None otherwise (exported as before)."""
    if not net.config.get("eye_head") or "eye_thresholds" not in ckpt:
        return None
    return ckpt.get("eye_calibration") or {"method": "none"}


# ----------------------------------------------------------------------------------------------- export


def _example_inputs(img_px: int, dtype, batch: int = EXAMPLE_BATCH, seed: int = 0):
    # Two DIFFERENT tensors: torch.export treats one tensor passed twice as aliased inputs, and the ONNX graph then
    # silently feeds `left` into both eyes (found the hard way: max |Δ| 0.1 instead of 1e-7).
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, img_px, img_px, generator=g).to(dtype) for _ in range(2))


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, warnings and optimizer log lines (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx_proto(net: nn.Module, img_px: int, *, fp16: bool = False, opset: int = DEFAULT_OPSET,
                  exporter: str = "auto", calibration: dict | None = None, eye_calibration: dict | None = None):
    """Export `net` (fp32, eval) to an in-memory ModelProto with a dynamic batch (outputs probs, logits, and
    eye_probs with `eye_calibration`).

    Args:
        exporter: "dynamo" (torch.export based), "torchscript" (the legacy tracer), or "auto": dynamo, falling back
            to torchscript if it raises.

    Returns:
        (model_proto, exporter actually used, message of the dynamo failure or "").
    """
    dtype = torch.float16 if fp16 else torch.float32
    wrapped = ProbsAndLogits(copy.deepcopy(net).to(dtype), calibration, eye_calibration).eval()
    args = _example_inputs(img_px, dtype)
    outputs = ["probs", "logits", *(["eye_probs"] if eye_calibration is not None else [])]
    names = dict(input_names=["left", "right"], output_names=outputs, opset_version=opset)
    failure = ""
    if exporter in ("auto", "dynamo"):
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            with _quiet(), torch.no_grad():
                program = torch.onnx.export(wrapped, args, dynamo=True, verbose=False,
                                            dynamic_shapes={"left": {0: batch}, "right": {0: batch}}, **names)
            return program.model_proto, "dynamo", ""
        except Exception as e:  # noqa: BLE001 - any exporter failure: report it, then try the other exporter
            if exporter == "dynamo":
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        with _quiet(), torch.no_grad():
            torch.onnx.export(wrapped, args, str(out), dynamo=False, verbose=False,
                              dynamic_axes={k: {0: "batch"} for k in ("left", "right", *outputs)}, **names)
        return onnx.load(str(out)), "torchscript", failure


def metadata(ckpt: dict, *, precision: str, exporter: str, opset: int, source: Path,
             report: dict | None = None, eye_calibration: dict | None = None) -> dict[str, str]:
    """metadata_props of our ONNX files: plain strings, JSON for lists and dicts. `report`: the run's report.json
    of this checkpoint, whose test figures and untrusted classes go into "quality" (model/trust.py);
    `eye_calibration`: the per-eye head's, when exported (its thresholds go in too)."""
    cfg = ckpt["config"]
    eyes = {}
    if eye_calibration is not None:  # the per-eye head's, applied to eye_probs; labels stay the patient head's
        eyes = {"eye_thresholds": json.dumps([float(t) for t in ckpt["eye_thresholds"]]),
                "eye_calibration": json.dumps(eye_calibration), "eye_order": json.dumps(list(EYES)),
                "labels_follow": LABELS_FOLLOW}
    return {
        "format": ONNX_FORMAT,
        "classes": json.dumps(list(ckpt["classes"])),
        "thresholds": json.dumps([float(t) for t in ckpt["thresholds"]]),  # on the calibrated probabilities
        "calibration": json.dumps(ckpt.get("calibration") or {"method": "none"}),  # already applied to `probs`
        "img_px": str(int(ckpt["img_px"])),
        "prepare_px": str(int(cfg.get("prepare_px") or ckpt["img_px"])),  # short side of the prepared copies
        "mean": json.dumps([float(m) for m in ckpt["mean"]]),
        "std": json.dumps([float(s) for s in ckpt["std"]]),
        "backbone": str(cfg.get("backbone", "")),
        "commit": str(ckpt.get("commit", "unknown")),
        "config": json.dumps(cfg, sort_keys=True, default=str),
        "precision": precision,
        "input_dtype": "float16" if precision == "fp16" else "float32",
        "exporter": exporter,
        "opset": str(opset),
        "checkpoint": source.name,
        # which weights: score.py --explain compares its checkpoint's (read_checkpoint guarantees a state dict)
        "weights_digest": weights_digest(ckpt["model"]) if "model" in ckpt else "",
        "run_id": str(ckpt.get("run_id") or ""),
        "epoch": str(ckpt.get("epoch", "")),
        "best": json.dumps(ckpt.get("best", {}), default=float),
        "versions": json.dumps({**ckpt.get("versions", {}), "export_torch": torch.__version__}),
        "quality": json.dumps(model_quality(report), default=float),  # {} without a report of this checkpoint
        **({"folds": str(ckpt["folds"])} if ckpt.get("folds") else {}),  # a fold ensemble: the mean of K models
        **eyes,
    }


def save_proto(proto, path: Path, meta: dict[str, str]) -> None:
    """Set metadata and write one self-contained .onnx file atomically (external data only past protobuf's 2 GB)."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = ("odir-dual: (left, right) fundus photographs -> probs, logits (N, 8)[, eye_probs (N, 2, 8)]; "
                        "see metadata_props")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    large = proto.ByteSize() > 1_900_000_000
    try:
        onnx.save(proto, str(tmp), save_as_external_data=large, all_tensors_to_one_file=True,
                  location=path.name + ".data")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------- checks


def max_prob_diff(session, net: nn.Module, left: torch.Tensor, right: torch.Tensor, fp16: bool,
                  calibration: dict | None = None, eye_calibration: dict | None = None) -> float:
    """max |probs_onnxruntime − probs_pytorch_fp32| over a batch (fp32 inputs; cast for an fp16 model), over probs
    and, with `eye_calibration`, eye_probs."""
    np_dtype = np.float16 if fp16 else np.float32
    feeds = {"left": left.numpy().astype(np_dtype), "right": right.numpy().astype(np_dtype)}
    eyes = eye_calibration is not None
    ort = session.run(["probs", *(["eye_probs"] if eyes else [])], feeds)
    with torch.no_grad():
        ref = ProbsAndLogits(net, calibration, eye_calibration)(left, right)
    pt = [ref[0], *([ref[2]] if eyes else [])]
    return max(float(np.abs(a.astype(np.float64) - b.numpy()).max()) for a, b in zip(ort, pt))


def check_pairs(ckpt_path: Path, ckpt: dict, folder=None, n: int = CHECK_PAIRS) -> tuple[list, str]:
    """Real (left, right) image paths to compare on, and where they come from (or why there are none).

    From `folder` (anything pipeline.pairs.find_pairs reads) when given; else the validation patients of the
    checkpoint's run (RUN/split.csv + the data folder the run recorded: --data, or the synthetic demo set).
    """
    if folder is not None:
        table = find_pairs(folder).table
        ok = table[table["status"] == "ok"].head(n)
        return list(zip(ok["left"], ok["right"])), f"{len(ok)} pairs from {folder}"
    run_dir = ckpt_path.parent
    split = run_dir / "split.csv"
    data = ckpt["config"].get("data") or ""
    if not split.is_file():
        return [], f"no {split.name} beside {ckpt_path.name}: cannot tell the run's validation images"
    if not data:
        return [], "the checkpoint does not name its data folder"
    try:
        table = find_pairs(data).table
        _, ids_val, _ = load_split(split)
    except (OSError, ValueError) as e:
        return [], f"the run's validation images are not readable ({type(e).__name__}: {e})"
    val = table[table["id"].isin(ids_val) & (table["status"] == "ok")].head(n)
    return list(zip(val["left"], val["right"])), f"{len(val)} validation pairs of the run ({data})"


def real_inputs(pairs, ckpt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Real image pairs as the model sees them at validation: prepared (cached), then the DALI eval pipeline."""
    table = pd.DataFrame({"id": range(len(pairs)), "left": [l for l, _ in pairs], "right": [r for _, r in pairs],
                          "status": "ok"})
    prepare_px = int(ckpt["config"].get("prepare_px") or ckpt["img_px"])
    table = prepare_pairs(table, default_cache(), prepare_px, workers=1, progress=False)
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return torch.empty(0), torch.empty(0)
    loader = eval_loader(list(ok["left_prepared"]), list(ok["right_prepared"]), len(ok), int(ckpt["img_px"]),
                         "cpu", mean=ckpt["mean"], std=ckpt["std"], num_threads=1)
    left, right, _, _ = loader.next_batch()
    return left.contiguous(), right.contiguous()


def run_checks(path: Path, net: nn.Module, ckpt: dict, pairs, pairs_note: str, fp16: bool, log=print) -> dict:
    """check_model(full_check) + onnxruntime vs PyTorch on random and real inputs. Raises ExportCheckError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ...
        raise ExportCheckError(f"onnx.checker.check_model({path}, full_check=True) failed: {e}") from e
    log("onnx.checker.check_model(full_check=True): ok")
    session = ort_session(path)
    tol = FP16_TOL if fp16 else FP32_TOL
    g = torch.Generator().manual_seed(1234)  # fresh inputs, not the tracing ones, at another batch size
    img_px = int(ckpt["img_px"])
    left, right = (torch.randn(3, 3, img_px, img_px, generator=g) for _ in range(2))
    cal, eye_cal = ckpt.get("calibration"), exported_eye_calibration(ckpt, net)
    result = {"random": max_prob_diff(session, net, left, right, fp16, cal, eye_cal), "real": None, "tolerance": tol}
    log(f"onnxruntime vs PyTorch fp32, max |Δ prob|: random inputs (3 pairs) {result['random']:.2e}")
    if pairs:
        left, right = real_inputs(pairs, ckpt)
        used = len(left)
        if used:
            diffs = [max_prob_diff(session, net, left[i:i + 8], right[i:i + 8], fp16, cal, eye_cal)
                     for i in range(0, used, 8)]
            result["real"] = max(diffs)
            log(f"onnxruntime vs PyTorch fp32, max |Δ prob|: real images ({pairs_note}, {used} read) "
                f"{result['real']:.2e}")
        else:
            log(f"real-image check skipped: none of the {len(pairs)} pairs could be read ({pairs_note})")
    else:
        log(f"real-image check skipped: {pairs_note} (pass --check-images FOLDER)")
    worst = max(v for v in (result["random"], result["real"]) if v is not None)
    if not np.isfinite(worst) or worst > tol:
        raise ExportCheckError(f"{path}: onnxruntime and PyTorch disagree: max |Δ prob| {worst:.2e} > {tol:g} "
                               f"({'fp16' if fp16 else 'fp32'})")
    log(f"agreement within {tol:g} ({'fp16 vs fp32' if fp16 else 'fp32'}): ok")
    return result


# ----------------------------------------------------------------------------------------------- main


def export(checkpoint, out=None, *, fold: int | None = None, fp16: bool = False, opset: int = DEFAULT_OPSET,
           check_images=None, exporter: str = "auto", log=print) -> dict:
    """Export a checkpoint to ONNX and check it; the file appears at `out` only if every check passed.

    Args:
        checkpoint: RUN/best.pt or a run folder; a --folds run's folder: the fold ensemble, one graph that averages
            the folds' logits, calibrated as the run's report (on the out-of-fold logits).
        out: output path; default beside the checkpoint (a --folds run: in its folder): best.onnx (best.fp16.onnx
            with fp16).
        fold: with a --folds run's folder, export only fold N (RUN/fold-N/best.pt).
        fp16: half-precision weights and inputs (outputs stay float32).
        opset: ONNX opset (18+).
        check_images: folder of real images to compare on (see `check_pairs`); default: the run's validation set.
        exporter: "auto" (dynamo, falling back to torchscript), "dynamo" or "torchscript".

    Returns:
        dict: path, exporter, opset, precision, diffs {random, real, tolerance}, seconds.
    """
    t0 = time.perf_counter()
    log = wrapped(log)  # every console line within 110 columns
    if fold is not None:
        if not is_fold_run(checkpoint) or not fold_folder(checkpoint, fold).is_dir():
            raise CheckpointError(f"--fold {fold}: {checkpoint} is not a --folds run with a fold-{fold} folder")
        checkpoint = fold_folder(checkpoint, fold)
    if is_fold_run(checkpoint):  # the ensemble is named after the run folder; real images from fold 1's split
        ckpt, net, read = load_fold_ensemble(checkpoint)
        ckpt_path, pairs_from = Path(checkpoint) / ENSEMBLE, read[0]
        out = out or Path(checkpoint) / ("best.fp16.onnx" if fp16 else "best.onnx")
    else:
        ckpt_path = checkpoint_file(checkpoint)
        ckpt = read_checkpoint(ckpt_path)
        net = model_from_checkpoint(ckpt, ckpt_path)
        read, pairs_from = [ckpt_path], ckpt_path
    img_px = int(ckpt["img_px"])
    precision = "fp16" if fp16 else "fp32"
    out = Path(out) if out else ckpt_path.with_suffix(".fp16.onnx" if fp16 else ".onnx")
    if out.resolve() == ckpt_path.resolve() or out.suffix.lower() in (".pt", ".pth"):
        raise ExportCheckError(f"-o {out}: would overwrite a checkpoint with the ONNX file; choose a .onnx path")
    pairs, note = check_pairs(pairs_from, ckpt, check_images)  # before any work: the outputs must not be inputs
    inputs = [*(("checkpoint", p) for p in read), *(("input image", p) for pair in pairs for p in pair)]
    check_output(out, "-o", inputs)
    check_output(out.parent / CARD_NAME, "the model card", inputs)
    stale = remove_stale_temporaries(out.parent, kinds=("checking",))  # of exports killed (-9) here before
    if stale:
        log(f"removed {len(stale)} temporary file(s) of an earlier, killed export: {', '.join(stale)}")
    what = f"the mean of {ckpt['folds']} folds' models" if ckpt.get("folds") else f"epoch {ckpt.get('epoch')}"
    log(f"checkpoint {ckpt_path}: {ckpt['config'].get('backbone')} · {img_px} px · {what} · "
        f"commit {ckpt.get('commit', 'unknown')}")
    eye_cal = exported_eye_calibration(ckpt, net)
    if net.config.get("eye_head"):
        log(f"per-eye head: exported as eye_probs (N, 2, 8), thresholds fitted on "
            f"{'out-of-fold' if ckpt.get('folds') else 'validation'} eyes" if eye_cal else
            "per-eye head: not exported (no per-eye thresholds in this checkpoint: trained before they were fitted)")
    proto, used, failure = to_onnx_proto(net, img_px, fp16=fp16, opset=opset, exporter=exporter,
                                         calibration=ckpt.get("calibration"), eye_calibration=eye_cal)
    if failure:
        log(f"dynamo exporter failed ({failure}); used the TorchScript exporter instead")
    tmp = temporary_path(out, "checking", ".onnx")
    report, _ = run_report(ckpt, ckpt_path)
    save_proto(proto, tmp, metadata(ckpt, precision=precision, exporter=used, opset=opset, source=ckpt_path,
                                    report=report, eye_calibration=eye_cal))
    for line in untrusted_lines((model_quality(report) or {}).get("untrusted", {})):
        log(f"not to be trusted: {line}")
    try:
        diffs = run_checks(tmp, net, ckpt, pairs, note, fp16, log=log)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size_mb = out.stat().st_size / 1e6
    log(f"wrote {out} ({precision}, opset {opset}, {used} exporter, {size_mb:.1f} MB) in "
        f"{time.perf_counter() - t0:.1f} s")
    card = write_model_card(out, ckpt, ckpt_path, precision=precision, diffs=diffs, log=log)
    # score.py takes the run folder when the model is its best.onnx, else the file itself
    target = ckpt_path.parent if out.resolve() == (ckpt_path.parent / "best.onnx").resolve() else out
    log(f"next: {tool_command('score')} {shell_path(target)} FOLDER -o predictions.xlsx\n"
        f"  (FOLDER: new patients' photographs, or an ODIR folder)")
    return dict(path=out, card=card, exporter=used, opset=opset, precision=precision, diffs=diffs,
                seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = ArgParser(prog="python export.py", description=__doc__)
    ap.add_argument("checkpoint", help="RUN/best.pt, or a run folder (its best.pt; a --folds run: the fold ensemble)")
    ap.add_argument("--fold", type=int, metavar="N", help="a --folds run: export fold N's model alone "
                    "(default: the fold ensemble, one graph averaging the folds' logits)")
    out = ap.add_argument_group("output")
    out.add_argument("-o", "--out", help="output .onnx (default: beside the checkpoint, best.onnx / best.fp16.onnx)")
    out.add_argument("--fp16", action="store_true", help="float16 weights and inputs (outputs stay float32)")
    out.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 18+ (default {DEFAULT_OPSET})")
    out.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                     help="auto: torch.export-based dynamo exporter, TorchScript if it fails (default)")
    check = ap.add_argument_group("check against PyTorch")
    check.add_argument("--check-images", metavar="FOLDER",
                       help="real images to check on: {ID}_left/_right images or an ODIR folder "
                            "(default: the run's validation images)")
    args = ap.parse_args(argv)
    if args.opset < 18:
        ap.error(f"--opset {args.opset}: use 18 or newer")
    return run_cli(lambda: export(args.checkpoint, args.out, fold=args.fold, fp16=args.fp16, opset=args.opset,
                                  check_images=args.check_images, exporter=args.exporter) and 0,
                   "export.py", interrupted="no ONNX file was written")


if __name__ == "__main__":
    sys.exit(main())
