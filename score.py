"""Score a folder of fundus photograph pairs with an exported ONNX model (onnxruntime, DALI).

    python score.py RUN_OR_MODEL FOLDER [-o predictions.csv|.xlsx] [--submission] [--tta] [--pattern P]
                    [--batch-size 32] [--cache-dir DIR] [--provider auto|cpu|cuda] [--loader auto|dali|pil]
                    [--report DIR [--explain RUN]]     (an HTML page per folder, heatmaps from RUN/best.pt)

RUN_OR_MODEL: a run folder of train.py (its best.onnx, written by `python export.py RUN`) or an .onnx file.

FOLDER is either a folder of photographs named by patient and eye, or an ODIR folder with its sheet (data.xlsx or
full_df.csv + images, any layout train.py reads): then the labels are known, and the multi-label
metrics and the official ODIR-2019 score are printed. Names understood (any case, .jpg/.jpeg/.png): `{ID}` then one
of `_ - .` or a space, then the eye: left/right, L/R, or OD/OS (OD = right eye, OS = left eye): `12_left.jpg`,
`106-L.jpg`, `P1_OD.png`, `7 os.JPG`. Other schemes: `--pattern`, a file name with `{id}`, `{eye}` and `*` (any
text), e.g. `--pattern "{id}_{eye}.jpg"` or `--pattern "{id}_{eye:1=right,2=left}.*"` (eye tokens named). An image
that pairs with nothing is a row of its own (ID: its file name) whose status says why.

Preprocessing is validation's: each image prepared once (fundus crop, resize; cached under `--cache-dir`), then
read by `pipeline.dali.eval_loader` or, without torch and DALI (`pip install ".[score]"`, or `--loader pil`), by
`pipeline.light` (numpy + Pillow). docs/DESIGN-NOTES.md (score.py) says how the two agree and when onnxruntime
runs on CUDA.

Output (`-o`, default predictions.csv; a `.xlsx` name writes an Excel workbook, any other a CSV): one row per
patient, sorted by ID: ID, the 8 calibrated probabilities p_N .. p_O (as in the run's predictions_*.csv), pred_N ..
pred_O (0/1 at the model's tuned thresholds), labels (the predicted classes, "D,H"), true_labels (when the folder
has a sheet), status: "ok"; "ok; normal together with D,H" when N (no disease) is predicted beside a disease; or why
the patient was not scored (a missing eye, a truncated/corrupt/non-image file, an unpaired image, ...). The
thresholds and the model they belong to are recorded: in a sheet "model" of the workbook, or for a CSV in
`NAME.thresholds.json` beside it. `--submission` writes the ODIR submission format instead: exactly
`ID,N,D,G,C,A,H,M,O` with probabilities, scored patients only.

A model trained with the per-eye head (train.py --eye-loss-weight, on in the cpu preset) also says which eye:
`findings` in words ("diabetes (left, right); cataract (right)", each eye's classes above the per-eye thresholds),
`findings_vs_labels` ("same", or the classes where the eyes and the patient labels differ: the labels and pred_*
are the patient head's, the official ones), and the calibrated per-eye probabilities left_p_N .. right_p_O.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from odir_dual.common.cli import ArgParser, run_cli
from odir_dual.common.errors import printable
from odir_dual.model.eyes import disagreement_line
from odir_dual.pipeline.constants import CLASSES
from odir_dual.model.metrics import classification_table
from odir_dual.model.trust import untrusted_lines
from odir_dual.pipeline.host import check_output, check_output_folder, output_folder, progress_enabled, wrapped
from odir_dual.pipeline.light import pil_batches
from odir_dual.pipeline.pairs import NamePattern, check_scorable, default_cache, find_pairs, prepare_pairs
from odir_dual.deploy.predictions import (ScoreError, check_writable, checked_outputs, metrics_report, model_info,
                                          predictions_frame, status_summary, write_output)
from odir_dual.deploy.report import check_same_model, load_explainer, write_folder_report
from odir_dual.deploy.runtime import ModelFileError, OrtRunner, load_session

LOADERS = ("auto", "dali", "pil")


def resolve_loader(loader: str = "auto") -> str:
    """auto → "dali" when DALI and torch are installed (the full install), else "pil" (the light scoring install,
    numpy + Pillow: `pipeline.light`, the same preprocessing to about one grey level)."""
    if loader not in LOADERS:
        raise ScoreError(f"loader {loader!r}: choose {', '.join(LOADERS)}")
    full = all(importlib.util.find_spec(m) is not None for m in ("torch", "nvidia.dali"))
    if loader == "dali" and not full:
        raise ScoreError("--loader dali: needs torch and nvidia-dali (the full install: pip install '.[train]')")
    return loader if loader != "auto" else "dali" if full else "pil"


def score_pairs(session, meta: dict, left, right, *, provider: str = "cpu", batch_size: int = 32,
                tta: bool = False, device=None, progress: bool = True, num_threads: int | None = None,
                loader: str = "auto") -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, K) for N prepared (left, right) image paths, in input order, and the per-eye probabilities
    (N, 2, K) of a model with the per-eye head (else None); streams in batches.

    Args:
        session, meta, provider: from `load_session`.
        left, right: prepared image paths (pipeline.prepare), N each.
        batch_size: pairs per batch, at most N (the last batch's padding is dropped before onnxruntime runs).
        tta: average with the horizontally flipped pair (both eyes flipped).
        device: where DALI decodes: default "cuda" when torch sees a GPU, else "cpu" (ignored by the pil loader).
        num_threads: decoding threads (default: min(cores, 8)).
        loader: "dali" (pipeline.dali.eval_loader), "pil" (pipeline.light, numpy + Pillow), or "auto" (dali when
            installed).
    """
    n = len(left)
    probs = np.zeros((n, len(meta["classes"])), np.float32)
    eye_probs = np.zeros((n, 2, len(meta["classes"])), np.float32) if meta.get("eye_thresholds") is not None else None
    if n == 0:
        return probs, eye_probs
    batch_size = min(batch_size, n)  # a batch larger than the folder only pads: --batch-size 4000 on 100 pairs
    make = _dali_batches if resolve_loader(loader) == "dali" else _pil_batches
    batches = make(list(left), list(right), meta, batch_size, device=device, num_threads=num_threads)
    run = OrtRunner(session, provider)
    with tqdm(total=n, desc="score", unit="pair", disable=not progress or not progress_enabled(), dynamic_ncols=True,
              mininterval=1, leave=False) as bar:
        for lb, rb, index in batches:
            real = int((index >= 0).sum())  # the last batch is padded at its end (index -1): not worth running
            lb, rb, index = lb[:real], rb[:real], index[:real]
            p, e = run(lb, rb)
            if tta:
                p_flip, e_flip = run(_hflip(lb), _hflip(rb))
                p, e = (p + p_flip) / 2, None if e is None else (e + e_flip) / 2
            probs[index] = p
            if eye_probs is not None:
                eye_probs[index] = e
            bar.update(real)
    return probs, eye_probs


def _dali_batches(left, right, meta, batch_size, *, device=None, num_threads=None):
    """(left, right, index) batches from DALI: torch tensors on `device`, index as numpy."""
    import torch  # optional: the light scoring install has no torch

    from odir_dual.pipeline.dali import eval_loader  # optional: needs torch and DALI

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if meta["input_dtype"] == "float16" else torch.float32
    loader = eval_loader(left, right, batch_size, meta["img_px"], device, dtype=dtype, mean=meta["mean"],
                         std=meta["std"], num_threads=num_threads)
    for lb, rb, _, index in loader:
        yield lb, rb, index.cpu().numpy()


def _pil_batches(left, right, meta, batch_size, *, device=None, num_threads=None):
    """(left, right, index) numpy batches from numpy + Pillow (`device` is unused: decoding is on the CPU)."""
    dtype = np.float16 if meta["input_dtype"] == "float16" else np.float32
    yield from pil_batches(left, right, batch_size, meta["img_px"], mean=meta["mean"], std=meta["std"],
                           dtype=dtype, num_threads=num_threads)


def _hflip(batch):
    """(B, 3, H, W) flipped along W, numpy or torch."""
    return batch[..., ::-1] if isinstance(batch, np.ndarray) else batch.flip(3)


def resolve_model(path) -> Path:
    """The ONNX file that `score.py RUN_OR_MODEL` means: a run folder's best.onnx, or the file itself.

    Raises:
        ModelFileError: a run folder with no best.onnx (with the export command when its best.pt exists).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "best.onnx").is_file():
        return path / "best.onnx"
    if (path / "best.pt").is_file():
        raise ModelFileError(f"{printable(path)} has no best.onnx yet: run `python export.py {printable(path)}` "
                             f"first")
    raise ModelFileError(f"{printable(path)}: a folder with no best.onnx (not a run folder of train.py?); give a "
                         f"run folder or an .onnx file")


# ----------------------------------------------------------------------------------------------- main


def score_folder(model_path, folder, *, out=None, submission=False, tta=False, batch_size=32, cache_dir=None,
                 provider="auto", progress=True, workers=None, loader="auto", loader_threads=None, pattern=None,
                 log=print, check_model=None) -> dict:
    """Everything `python score.py` does; returns frame (the predictions table), probs, metrics text, classes (the
    per-class table of a labelled folder, `model.metrics.classification_table`), out (the file written, or None).
    `model_path`: an .onnx file or a run folder (its best.onnx); `out`: the file to write (.csv or .xlsx), None: no
    file (the table is returned); `pattern`: see `pipeline.pairs.NamePattern`; `check_model(meta, path)`: called
    before any image is prepared (--explain: the same model)."""
    t0 = time.perf_counter()
    log = wrapped(log)  # every console line within 110 columns
    model_path = resolve_model(model_path)
    pattern = NamePattern(pattern) if isinstance(pattern, str) else pattern
    session, meta, provider = load_session(model_path, provider)
    if check_model is not None:
        check_model(meta, model_path)
    if list(meta["classes"]) != list(CLASSES):
        raise ModelFileError(f"{model_path}: classes {meta['classes']} differ from this code's {list(CLASSES)}")
    loader = resolve_loader(loader)
    log(f"model {model_path}: {meta['backbone']} · {meta['img_px']} px · {meta['input_dtype']} · commit "
        f"{meta['commit']} · onnxruntime {provider} · {loader} loader{' · TTA hflip' if tta else ''}")
    out = Path(out) if out is not None else None
    if out is not None:
        check_output(out, "-o", [("model", model_path)])  # a device, FIFO, link or the model itself: refused
        check_writable(out)  # before any work: a CSV that cannot be written at the end would lose all of it
    found = find_pairs(folder, pattern)
    check_scorable(found, folder, pattern)
    if out is not None:
        check_output(out, "-o", found.input_files())
    cache_dir = Path(cache_dir) if cache_dir else default_cache()
    table = prepare_pairs(found.table, cache_dir, meta["prepare_px"], workers=workers, progress=progress)
    ok = np.flatnonzero((table["status"] == "ok").to_numpy())
    probs, eye_probs = score_pairs(session, meta, table["left_prepared"].iloc[ok], table["right_prepared"].iloc[ok],
                                   provider=provider, batch_size=batch_size, tta=tta, progress=progress,
                                   loader=loader, num_threads=loader_threads)
    probs, ok, eye_probs = checked_outputs(probs, ok, table, eye_probs)
    frame = predictions_frame(table, dict(zip(ok.tolist(), probs)), meta, labelled=found.labelled,
                              eyes_by_row=None if eye_probs is None else dict(zip(ok.tolist(), eye_probs)))
    written = write_output(frame, out, model_info(model_path, meta, tta=tta), submission=submission) if out else []
    for line in status_summary(frame, found.ignored) + untrusted_lines(meta["untrusted"]):
        log(line)
    if eye_probs is not None:
        log(disagreement_line(probs > meta["thresholds"], eye_probs > meta["eye_thresholds"]))
    report = per_class = None
    if found.labelled and len(ok):
        y = table.iloc[ok][list(CLASSES)].to_numpy(dtype=np.int64)
        report = metrics_report(y, probs, meta["thresholds"], list(CLASSES))
        per_class = classification_table(y, probs, meta["thresholds"])
        log(report)
    what = "ODIR submission format" if submission else "Excel workbook" if len(written) == 1 else "predictions"
    if out is not None:
        log(f"wrote {out} ({what}" + (f"; thresholds in {written[1]}" if len(written) > 1 else "") + f") in "
            f"{time.perf_counter() - t0:.1f} s")
    return dict(frame=frame, probs=probs, eye_probs=eye_probs, table=table, ignored=found.ignored, metrics=report,
                classes=per_class, out=out, provider=provider, loader=loader, meta=meta, model=model_path)


def main(argv=None) -> int:
    # --help: the docstring without its paragraphs about the code (they name modules and functions)
    ap = ArgParser(prog="python score.py", description="\n\n".join(
                       part for part in __doc__.split("\n\n") if "pipeline." not in part and "`torch`" not in part))
    out, speed, names = (ap.add_argument_group(t) for t in ("output", "speed", "file names and the cache"))
    ap.add_argument("model", metavar="RUN_OR_MODEL",
                    help="a run folder of train.py (its best.onnx) or an .onnx file written by export.py")
    ap.add_argument("folder", help="photographs named by patient and eye (see above), or an ODIR folder with its "
                                   "sheet")
    out.add_argument("-o", "--out", help="output file: .xlsx writes an Excel workbook, any other name a CSV (default "
                                         "predictions.csv, submission.csv with --submission)")
    out.add_argument("--submission", action="store_true", help="ODIR submission format: ID,N,D,G,C,A,H,M,O")
    out.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    out.add_argument("--report", metavar="DIR", help="also write DIR/index.html: one row per patient (both eyes, "
                                                     "probabilities against thresholds, labels, status, metrics)")
    out.add_argument("--explain", metavar="RUN", help="with --report: Grad-CAM heatmaps of the predicted classes "
                     "from the run folder's best.pt, or a --folds run's fold ensemble (PyTorch: one backward pass "
                     "per class)")
    speed.add_argument("--batch-size", type=int, default=32, metavar="N", help="pairs per batch (default 32)")
    speed.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                       help="onnxruntime provider (auto: cuda when a GPU is visible and onnxruntime has CUDA, else "
                            "cpu)")
    speed.add_argument("--loader", choices=LOADERS, default="auto",
                       help="image decoding: dali (GPU when present), pil (numpy + Pillow, the light install), "
                            "auto: dali when installed (default)")
    speed.add_argument("--workers", type=int, default=None, metavar="N",
                       help="image preparation processes (default: all cores)")
    speed.add_argument("--loader-threads", type=int, default=None, metavar="N",
                       help="image decoding threads, as train.py's flag (default: min(cores, 8))")
    names.add_argument("--pattern", metavar="P", help="how the images are named, when not by a common convention: a "
                       "file name with {id}, {eye} and * (any text), e.g. \"{id}_{eye}.jpg\"; {eye:1=right,2=left} "
                       "names the eye tokens")
    names.add_argument("--cache-dir", metavar="DIR", help="prepared-image cache (default $ODIR_CACHE/prepared or "
                                                          "~/.cache/odir-dual/prepared)")
    names.add_argument("--cache", dest="cache_dir", help=argparse.SUPPRESS)  # the old spelling
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.explain and not args.report:
        ap.error("--explain RUN needs --report DIR")
    # a --folds run by its fold-1/best.pt (training/ensemble.py's is_fold_run imports torch: not in the light install)
    if args.explain and not (Path(args.explain).is_file() or (Path(args.explain) / "best.pt").is_file()
                             or (Path(args.explain) / "fold-1" / "best.pt").is_file()):
        ap.error(f"--explain {args.explain}: no best.pt there (a run folder of train.py, or its best.pt)")
    if args.pattern:
        try:
            args.pattern = NamePattern(args.pattern)
        except ValueError as e:
            ap.error(str(e))
    if args.out and Path(args.out).suffix.lower() in (".xls", ".ods", ".xlsm"):
        ap.error(f"-o {args.out}: a workbook is written as .xlsx (or give a .csv name)")
    if args.submission and args.out and Path(args.out).suffix.lower() == ".xlsx":
        ap.error("--submission writes the ODIR CSV format: give -o a .csv name")
    return run_cli(lambda: _score_and_report(args), "score.py",
                   interrupted="nothing written; the images prepared so far are cached, so a rerun goes faster")


def _score_and_report(args) -> int:
    """score_folder, then the HTML page of --report (report.py) when asked."""
    if args.report:  # before any work, like -o: an input, or a folder of the user's, is never written into
        explained = Path(args.explain) if args.explain else None
        explained = explained / "best.pt" if explained is not None and explained.is_dir() else explained
        check_output(Path(args.report) / "index.html", "--report", [("model", args.model), ("-o output", args.out),
                                                                   ("checkpoint", explained)])
        check_output(args.out or "predictions.csv", "-o", [("checkpoint", explained)])
        check_output_folder(args.report, "--report")
    explainer = load_explainer(args.explain, ScoreError) if args.explain else None  # a damaged one: before work
    same_model = (lambda meta, path: check_same_model(explainer, meta, path, ScoreError)) if explainer else None
    out = args.out or ("submission.csv" if args.submission else "predictions.csv")
    scored = score_folder(args.model, args.folder, out=out, submission=args.submission, tta=args.tta,
                          batch_size=args.batch_size, cache_dir=args.cache_dir, provider=args.provider,
                          workers=args.workers, loader=args.loader, loader_threads=args.loader_threads,
                          pattern=args.pattern, check_model=same_model)
    if args.report:
        t0 = time.perf_counter()
        with output_folder(args.report, "--report") as folder:  # removed again if the page fails
            page = write_folder_report(scored, folder, scored["meta"]["thresholds"], explain_run=explainer,
                                       title=f"{Path(args.folder).resolve().name} scored with "
                                             f"{Path(scored['model']).resolve().parent.name}/{scored['model'].name}")
        print(f"wrote {page} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
