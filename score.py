"""Score a folder of fundus photograph pairs with an exported ONNX model (onnxruntime, DALI).

    python score.py model.onnx FOLDER [-o predictions.csv] [--submission] [--tta] [--batch-size 32]
                    [--cache DIR] [--provider auto|cpu|cuda]

FOLDER is either a folder of `{ID}_left.{jpg,jpeg,png}` / `{ID}_right.*` files (case-insensitive), or an ODIR
folder with its sheet (data.xlsx or full_df.csv + images, any layout `pipeline.odir.find_layout` knows): then the
labels are known, and the multi-label metrics and the official ODIR-2019 score are printed.

Same preprocessing as validation: every image is prepared once (fundus crop, short side resized; cached under
`--cache`, default $ODIR_CACHE/prepared), then read by `pipeline.dali.eval_loader` (decoded on the GPU when torch
sees CUDA) and normalised with the model's mean/std at the model's img_px. onnxruntime runs on CUDA (with I/O
binding of the DALI/torch GPU buffers) when torch sees a GPU and onnxruntime has the CUDA provider; otherwise on
the CPU provider only.

Output CSV (`-o`, default predictions.csv): one row per patient, sorted by ID: ID, the 8 probabilities (columns
N D G C A H M O), pred_N .. pred_O (0/1 at the model's tuned thresholds), labels (the predicted classes, "D,H"),
true_labels (when the folder has a sheet), status ("ok" or why the patient was not scored: a missing eye, a
truncated/corrupt/non-image file, ...). `--submission` writes the ODIR submission format instead: exactly
`ID,N,D,G,C,A,H,M,O` with probabilities, scored patients only.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ONNX_FORMAT = "odir-dual-onnx/1"  # also export.ONNX_FORMAT; repeated so scoring never imports the exporter
IMAGE_EXTS = ("jpg", "jpeg", "png")
PAIR_NAME = re.compile(r"^(?P<id>.+)_(?P<eye>left|right)\.(?P<ext>[^.]+)$", re.IGNORECASE)
EYES = ("left", "right")
SUBMISSION_HEADER = ("ID", "N", "D", "G", "C", "A", "H", "M", "O")  # the ODIR-2019 submission sheet, exactly


class ModelFileError(ValueError):
    """Not an ONNX model exported by export.py; the message names the file."""


# ----------------------------------------------------------------------------------------------- finding pairs


def _id_key(pid):
    """Sort key: numeric IDs numerically, then the others by name."""
    s = str(pid)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def find_pairs(folder) -> tuple["pd.DataFrame", list[tuple[str, str]]]:
    """The patients of a folder, one row each, sorted by ID.

    Args:
        folder: an ODIR folder with a sheet (labels known), or a folder of `{ID}_left|right.{jpg,jpeg,png}` files
            (case-insensitive; only the folder itself is read, not its subfolders).

    Returns:
        (table, ignored). table: columns id, left, right (source paths, None when absent), status ("ok" or why the
        patient cannot be scored, e.g. "right eye: missing file"), plus N..O (int 0/1) when labelled;
        `table.attrs["labelled"]` tells which. ignored: (file name, reason) for files that name no patient eye.

    Raises:
        FileNotFoundError: the folder does not exist.
        pipeline.odir.SheetError: the folder has an ODIR sheet with a bad row (the message names it).
    """
    from pipeline.odir import SheetError, find_layout

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    try:
        find_layout(folder)
    except FileNotFoundError:  # no sheet: pair the images by file name
        return _pairs_from_names(folder)
    except SheetError:
        raise
    except ValueError as e:  # e.g. several ODIR sheets in one folder: a user-facing message, same path as a bad sheet
        raise SheetError(str(e)) from None
    return _pairs_from_sheet(folder), []


def _pairs_from_sheet(folder: Path):
    import pandas as pd

    from model import CLASSES
    from pipeline.odir import read_patients

    patients, missing = read_patients(folder)
    table = patients[["id", "left", "right", *CLASSES]].copy()
    table["status"] = "ok"
    if len(missing):
        reasons = {}
        for r in missing.itertuples():
            reasons.setdefault(r.id, []).append(f"{r.eye} eye: {r.reason} ({Path(r.path).name})")
        absent = pd.DataFrame({"id": list(reasons), "status": ["; ".join(v) for v in reasons.values()]})
        absent["left"] = None
        absent["right"] = None  # only patients with both files get paths; the reason names the missing one
        table = pd.concat([table, absent], ignore_index=True)
    table = table.sort_values("id", key=lambda s: s.map(_id_key), kind="stable", ignore_index=True)
    table.attrs["labelled"] = True
    return table


def _pairs_from_names(folder: Path):
    import pandas as pd

    files: dict[str, dict[str, list[str]]] = {}
    ignored = []
    with os.scandir(folder) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith(".") or not e.is_file():
                continue  # hidden files (.DS_Store) and subfolders
            m = PAIR_NAME.match(e.name)
            if m is None:
                ignored.append((e.name, "not named {ID}_left/{ID}_right." + "/".join(IMAGE_EXTS)))
                continue
            files.setdefault(m["id"], {"left": [], "right": []})[m["eye"].lower()].append(e.path)
    rows = []
    for pid, eyes in files.items():
        row, problems = {"id": pid}, []
        for eye in EYES:
            images = [p for p in eyes[eye] if Path(p).suffix[1:].lower() in IMAGE_EXTS]
            others = [p for p in eyes[eye] if p not in images]
            row[eye] = images[0] if len(images) == 1 else None
            if len(images) > 1:
                problems.append(f"{eye} eye: {len(images)} files ({', '.join(Path(p).name for p in images)})")
            elif not images and others:
                problems.append(f"{eye} eye: not an image file ({Path(others[0]).name})")
            elif not images:
                problems.append(f"{eye} eye: missing file")
            if images:
                ignored += [(Path(p).name, "not a " + "/".join(IMAGE_EXTS) + " file") for p in others]
        row["status"] = "; ".join(problems) or "ok"
        rows.append(row)
    table = pd.DataFrame(rows, columns=["id", "left", "right", "status"])
    table = table.sort_values("id", key=lambda s: s.map(_id_key), kind="stable", ignore_index=True)
    table.attrs["labelled"] = False
    return table, ignored


def prepare_pairs(table, cache_dir, short_px: int, *, workers=None, progress=True):
    """Prepare both eyes of every patient whose status is "ok" (fundus crop + resize, cached).

    Returns a copy of table with columns left_prepared, right_prepared (None if not prepared) and the status of
    patients with a bad image set to the reason (e.g. "left eye: truncated JPEG (12_left.jpg)").
    """
    from pipeline.prepare import prepare_paths

    out = table.copy()
    out["left_prepared"] = None
    out["right_prepared"] = None
    todo = np.flatnonzero((out["status"] == "ok").to_numpy())
    if not len(todo):
        return out
    paths = [out.at[i, eye] for eye in EYES for i in todo]
    prepared, reasons = prepare_paths(paths, cache_dir, short_px, workers=workers, progress=progress)
    n = len(todo)
    for k, i in enumerate(todo):
        problems = [f"{eye} eye: {reasons[j * n + k]} ({Path(out.at[i, eye]).name})"
                    for j, eye in enumerate(EYES) if reasons[j * n + k] is not None]
        if problems:
            out.at[i, "status"] = "; ".join(problems)
        else:
            out.at[i, "left_prepared"], out.at[i, "right_prepared"] = prepared[k], prepared[n + k]
    return out


# ----------------------------------------------------------------------------------------------- model


def cuda_usable() -> bool:
    """torch sees a CUDA GPU and this onnxruntime build has the CUDA provider."""
    import torch
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_provider(provider: str = "auto") -> str:
    """auto → "cuda" when usable, else "cpu". Asking for cuda where it is not usable is an error."""
    if provider not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider {provider!r}: choose auto, cpu or cuda")
    if provider == "cpu":
        return "cpu"
    usable = cuda_usable()
    if provider == "cuda" and not usable:
        raise SystemExit("--provider cuda: no CUDA GPU visible to torch, or onnxruntime has no CUDA provider")
    return "cuda" if usable else "cpu"


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def session_options(threads: int | None = None):
    """Errors-only logging, all graph optimisations, one intra-op thread per usable core."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or _cpu_threads()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def load_session(path, provider: str = "auto", *, threads: int | None = None):
    """An onnxruntime session for one of our ONNX files, and its metadata.

    Args:
        path: an .onnx file written by export.py.
        provider: "auto" (CUDA when usable, else CPU), "cpu" or "cuda". The CUDA provider is never listed on a
            machine without a usable GPU, so onnxruntime prints no provider warnings there.
        threads: CPU intra-op threads (default: the usable cores).

    Returns:
        (session, meta, provider used). meta: classes (list), thresholds (np.ndarray), img_px, prepare_px, mean,
        std, input_dtype ("float32"/"float16"), backbone, commit, config (dict), raw (every metadata string).

    Raises:
        ModelFileError: missing, not ONNX, or not exported by export.py.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    ort.set_default_logger_severity(3)  # errors only, also for messages emitted before the session exists
    provider = resolve_provider(provider)
    if provider == "cuda":
        import torch  # loaded before the CUDA provider: onnxruntime then uses the CUDA/cuDNN libraries torch loaded

        providers = [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # noqa: BLE001 - InvalidProtobuf, Fail, InvalidGraph, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = "; a training checkpoint? export it first: python export.py RUN/best.pt" if path.suffix == ".pt" else ""
        raise ModelFileError(f"{path}: not a loadable ONNX model ({first}){hint}") from None
    raw = dict(session.get_modelmeta().custom_metadata_map)
    if raw.get("format") != ONNX_FORMAT:
        raise ModelFileError(f"{path}: not an odir-dual ONNX model (metadata format {raw.get('format')!r}, expected "
                             f"{ONNX_FORMAT!r}); export a checkpoint with `python export.py RUN/best.pt`")
    try:
        meta = dict(
            classes=json.loads(raw["classes"]), thresholds=np.asarray(json.loads(raw["thresholds"]), np.float64),
            img_px=int(raw["img_px"]), prepare_px=int(raw.get("prepare_px") or raw["img_px"]),
            mean=tuple(json.loads(raw["mean"])), std=tuple(json.loads(raw["std"])),
            backbone=raw.get("backbone", ""), commit=raw.get("commit", ""),
            config=json.loads(raw.get("config", "{}")), raw=raw,
        )
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: odir-dual metadata incomplete or malformed ({type(e).__name__}: {e})") from None
    inputs = {i.name: i.type for i in session.get_inputs()}
    if set(inputs) != {"left", "right"}:
        raise ModelFileError(f"{path}: expected inputs left, right; found {', '.join(inputs)}")
    meta["input_dtype"] = "float16" if inputs["left"] == "tensor(float16)" else "float32"
    return session, meta, provider


class OrtRunner:
    """(left, right) torch batches → probabilities (B, K) as numpy float32, on the session's device.

    CPU: plain `session.run` on contiguous numpy copies. CUDA: I/O binding of the torch tensors' device memory (no
    host round trip); the device is synchronised before binding, because DALI/torch write the buffers on their own
    streams and onnxruntime reads them on its stream (docs/DALI-NOTES.md: binding DALI buffers raced otherwise).
    """

    def __init__(self, session, provider: str):
        self.session, self.provider = session, provider
        self.np_dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.k = session.get_outputs()[0].shape[1]

    def __call__(self, left, right) -> np.ndarray:
        if self.provider == "cuda":
            return self._run_cuda(left, right)
        feeds = {"left": np.ascontiguousarray(left.cpu().numpy(), dtype=self.np_dtype),
                 "right": np.ascontiguousarray(right.cpu().numpy(), dtype=self.np_dtype)}
        return self.session.run(["probs"], feeds)[0]

    def _run_cuda(self, left, right) -> np.ndarray:
        import torch

        dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        device = torch.device("cuda", torch.cuda.current_device())
        # dense NCHW on the GPU (DALI hands out NHWC buffers viewed as channels_last)
        left = left.to(device=device, dtype=dtype).contiguous()
        right = right.to(device=device, dtype=dtype).contiguous()
        probs = torch.empty((left.shape[0], self.k), dtype=torch.float32, device=device)
        torch.cuda.synchronize(device)  # every producer stream is done before onnxruntime reads
        binding = self.session.io_binding()
        for name, t in (("left", left), ("right", right)):
            binding.bind_input(name, "cuda", device.index, self.np_dtype, tuple(t.shape), t.data_ptr())
        binding.bind_output("probs", "cuda", device.index, np.float32, tuple(probs.shape), probs.data_ptr())
        binding.bind_output("logits", "cuda", device.index)  # onnxruntime allocates it on the device
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return probs.cpu().numpy()


def score_pairs(session, meta: dict, left, right, *, provider: str = "cpu", batch_size: int = 32,
                tta: bool = False, device=None, progress: bool = True, num_threads: int | None = None) -> np.ndarray:
    """Probabilities (N, K) for N prepared (left, right) image paths, in input order; streams in batches.

    Args:
        session, meta, provider: from `load_session`.
        left, right: prepared image paths (pipeline.prepare), N each.
        batch_size: pairs per batch (the last batch is padded, padding dropped).
        tta: average with the horizontally flipped pair (both eyes flipped, on the device).
        device: where DALI decodes: default "cuda" when torch sees a GPU, else "cpu".
        num_threads: DALI CPU threads (default: min(cores, 8)).
    """
    import torch
    from tqdm import tqdm

    from pipeline.dali import eval_loader

    n = len(left)
    probs = np.zeros((n, len(meta["classes"])), np.float32)
    if n == 0:
        return probs
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if meta["input_dtype"] == "float16" else torch.float32
    loader = eval_loader(list(left), list(right), batch_size, meta["img_px"], device, dtype=dtype,
                         mean=meta["mean"], std=meta["std"], num_threads=num_threads)
    run = OrtRunner(session, provider)
    with tqdm(total=n, desc="score", unit="pair", disable=not progress, dynamic_ncols=True, mininterval=1,
              leave=False) as bar:
        for lb, rb, _, index in loader:
            p = run(lb, rb)
            if tta:  # (B, 3, H, W): flip W
                p = (p + run(torch.flip(lb, dims=[3]), torch.flip(rb, dims=[3]))) / 2
            index = index.cpu().numpy()
            keep = index >= 0
            probs[index[keep]] = p[keep]
            bar.update(int(keep.sum()))
    return probs


# ----------------------------------------------------------------------------------------------- output


def predictions_frame(table, probs_by_row: dict[int, np.ndarray], meta: dict):
    """The output table: ID, probabilities, pred_*, labels, [true_labels], status (one row per patient)."""
    import pandas as pd

    classes = list(meta["classes"])
    thr = meta["thresholds"]
    rows = []
    for i, r in enumerate(table.itertuples(index=False)):
        row = {"ID": r.id}
        p = probs_by_row.get(i)
        for c, v in zip(classes, p if p is not None else [None] * len(classes)):
            row[c] = None if v is None else float(v)
        pred = (p > thr).astype(int) if p is not None else None
        for j, c in enumerate(classes):
            row[f"pred_{c}"] = None if pred is None else int(pred[j])
        row["labels"] = "" if pred is None else ",".join(c for c, on in zip(classes, pred) if on)
        if table.attrs.get("labelled"):
            truth = [c for c in classes if c in table.columns and getattr(r, c) == 1]
            row["true_labels"] = ",".join(truth)
        row["status"] = r.status
        rows.append(row)
    return pd.DataFrame(rows, dtype=object)  # object: ints stay ints next to the blanks of unscored patients


def write_csv(frame, path, *, submission: bool = False) -> None:
    """The predictions table, or with submission=True exactly `ID,N,D,G,C,A,H,M,O` for scored patients."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if submission:
            w.writerow(SUBMISSION_HEADER)
            for r in frame[frame["status"] == "ok"].itertuples(index=False):
                w.writerow([r.ID, *(f"{getattr(r, c):.6f}" for c in SUBMISSION_HEADER[1:])])
        else:
            w.writerow(frame.columns)
            for r in frame.itertuples(index=False):
                w.writerow(["" if v is None or (isinstance(v, float) and np.isnan(v)) else
                            f"{v:.6f}" if isinstance(v, float) else v for v in r])
    os.replace(tmp, path)


def metrics_report(y_true, probs, thresholds, classes) -> str:
    """Multi-label metrics (at the tuned thresholds and at 0.5) and the official ODIR-2019 score, as text."""
    from model import multilabel_metrics, odir_score

    lines = [f"metrics on {len(y_true)} labelled patients (multi-label, per patient × class; not the ODIR score):",
             "                      F1 micro  F1 macro  AUC macro  " + "  ".join(f"{c:>5}" for c in classes)]
    for label, thr in (("tuned thresholds", thresholds), ("threshold 0.5", 0.5)):
        m = multilabel_metrics(y_true, probs, thr, classes=classes)
        lines.append(f"  {label:<18}  {m['f1_micro']:8.3f}  {m['f1_macro']:8.3f}  {m['auc_macro']:9.3f}  "
                     + "  ".join(f"{m['f1'][c]:5.3f}" for c in classes) + "   (per-class F1)")
    try:
        o = odir_score(y_true, probs)
        lines.append(f"official ODIR-2019 score (flattened matrices, threshold 0.5): kappa {o['kappa']:.3f} · "
                     f"F1 {o['f1']:.3f} · AUC {o['auc']:.3f} · final {o['final']:.3f}")
    except ValueError as e:  # e.g. a single label value across all cells: AUC undefined
        lines.append(f"official ODIR-2019 score: not defined on these labels ({e})")
    return "\n".join(lines)


def status_summary(frame, ignored) -> list[str]:
    """Lines: how many scored, the reasons of the others, the ignored files."""
    n, ok = len(frame), int((frame["status"] == "ok").sum())
    lines = [f"scored {ok} of {n} patients"]
    if ok < n:
        kinds = Counter(_reason_kind(s) for s in frame.loc[frame["status"] != "ok", "status"])
        lines[0] += f"; not scored {n - ok}: " + ", ".join(f"{v} {k}" for k, v in kinds.most_common())
        for r in frame[frame["status"] != "ok"].head(10).itertuples(index=False):
            lines.append(f"  ID {r.ID}: {r.status}")
        if n - ok > 10:
            lines.append(f"  ... {n - ok - 10} more (status column of the predictions CSV)")
    if ignored:
        lines.append(f"ignored {len(ignored)} file(s) that are no patient eye image: "
                     + ", ".join(f"{name} ({why})" for name, why in ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    return lines


def _reason_kind(status: str) -> str:
    """'left eye: truncated JPEG (3_left.jpg)' → 'truncated JPEG'; several problems → the first."""
    first = status.split("; ")[0]
    kind = first.split(": ", 1)[-1]
    return re.sub(r" \([^)]*\)$", "", kind).split(":")[0]


# ----------------------------------------------------------------------------------------------- main


def score_folder(model_path, folder, *, out=None, submission=False, tta=False, batch_size=32, cache_dir=None,
                 provider="auto", progress=True, workers=None, log=print) -> dict:
    """Everything `python score.py` does; returns frame (the predictions table), probs, metrics text, out path."""
    from model import CLASSES
    from pipeline.data import cache_root

    t0 = time.perf_counter()
    session, meta, provider = load_session(model_path, provider)
    if list(meta["classes"]) != list(CLASSES):
        raise ModelFileError(f"{model_path}: classes {meta['classes']} differ from this code's {list(CLASSES)}")
    log(f"model {model_path}: {meta['backbone']} · {meta['img_px']} px · {meta['input_dtype']} · commit "
        f"{meta['commit']} · onnxruntime {provider}{' · TTA hflip' if tta else ''}")
    table, ignored = find_pairs(folder)
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "prepared"
    table = prepare_pairs(table, cache_dir, meta["prepare_px"], workers=workers, progress=progress)
    ok = np.flatnonzero((table["status"] == "ok").to_numpy())
    probs = score_pairs(session, meta, table["left_prepared"].iloc[ok], table["right_prepared"].iloc[ok],
                        provider=provider, batch_size=batch_size, tta=tta, progress=progress)
    frame = predictions_frame(table, dict(zip(ok.tolist(), probs)), meta)
    out = Path(out or ("submission.csv" if submission else "predictions.csv"))
    write_csv(frame, out, submission=submission)
    for line in status_summary(frame, ignored):
        log(line)
    report = None
    if table.attrs.get("labelled") and len(ok):
        y = table.iloc[ok][list(CLASSES)].to_numpy(dtype=np.int64)
        report = metrics_report(y, probs, meta["thresholds"], list(CLASSES))
        log(report)
    log(f"wrote {out} ({'ODIR submission format' if submission else 'predictions'}) in "
        f"{time.perf_counter() - t0:.1f} s")
    return dict(frame=frame, probs=probs, table=table, ignored=ignored, metrics=report, out=out, provider=provider)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python score.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an .onnx file written by export.py")
    ap.add_argument("folder", help="{ID}_left/_right images, or an ODIR folder with its sheet")
    ap.add_argument("-o", "--out", help="output CSV (default predictions.csv, submission.csv with --submission)")
    ap.add_argument("--submission", action="store_true", help="ODIR submission format: ID,N,D,G,C,A,H,M,O")
    ap.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default 32)")
    ap.add_argument("--cache", help="prepared-image cache (default $ODIR_CACHE/prepared or ~/.cache/odir-dual/prepared)")
    ap.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                    help="onnxruntime provider (auto: cuda when torch sees a GPU, else cpu)")
    ap.add_argument("--workers", type=int, default=None, help="image preparation processes (default: all cores)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    from pipeline.odir import SheetError

    try:
        score_folder(args.model, args.folder, out=args.out, submission=args.submission, tta=args.tta,
                     batch_size=args.batch_size, cache_dir=args.cache, provider=args.provider, workers=args.workers)
    except (ModelFileError, FileNotFoundError, SheetError) as e:
        print(f"score.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
