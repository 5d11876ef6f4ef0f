"""The predictions of a scored folder and the files they are written to (score.py): one row per patient with its
probabilities, decisions at the tuned thresholds and status; a CSV (or the ODIR submission format) with its thresholds
sidecar, or an Excel workbook; the summary and metric lines printed after scoring."""
from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from odir_dual.common.errors import OdirError, printable
from odir_dual.model.eyes import LABELS_FOLLOW, eye_columns
from odir_dual.model.metrics import classification_table, evaluate, format_classification_table
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES
from odir_dual.pipeline.host import atomic_write, check_can_create

SUBMISSION_HEADER = ("ID", *CLASSES)  # the ODIR-2019 submission sheet, exactly: ID,N,D,G,C,A,H,M,O
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting with these as a formula (OWASP)


class ScoreError(OdirError, ValueError):
    """Nothing to score, or nowhere to write the result; the message names the folder or file."""


def predictions_frame(table, probs_by_row: dict[int, np.ndarray], meta: dict, *, labelled: bool = False,
                      eyes_by_row: dict | None = None):
    """The output table: ID, probabilities, pred_*, labels, [findings, findings_vs_labels], [true_labels: with
    labelled=True, from the table's class columns], status, [left_p_*, right_p_*] (one row per patient; the per-eye
    columns with `eyes_by_row`, row → (2, K) per-eye probabilities: model/eyes.py)."""
    classes = list(meta["classes"])
    thr = meta["thresholds"]
    rows = []
    for i, r in enumerate(table.itertuples(index=False)):
        row = {"ID": r.id}
        p = probs_by_row.get(i)
        for c, v in zip(classes, p if p is not None else [None] * len(classes)):
            row[f"p_{c}"] = None if v is None else float(v)
        pred = (p > thr).astype(int) if p is not None else None
        for j, c in enumerate(classes):
            row[f"pred_{c}"] = None if pred is None else int(pred[j])
        row["labels"] = "" if pred is None else ",".join(c for c, on in zip(classes, pred) if on)
        if eyes_by_row is not None:
            words, eye_cells = eye_columns(eyes_by_row.get(i), meta["eye_thresholds"], pred)
            row.update(words)
        if labelled:
            truth = [c for c in classes if c in table.columns and getattr(r, c) == 1]
            row["true_labels"] = ",".join(truth)
        row["status"] = r.status if pred is None else flag_status(r.status, classes, pred, meta.get("untrusted"))
        if eyes_by_row is not None:
            row.update(eye_cells)
        rows.append(row)
    return pd.DataFrame(rows, dtype=object)  # object: ints stay ints next to the blanks of unscored patients


def flag_status(status: str, classes, pred, untrusted=()) -> str:
    """"ok", or "ok; normal together with D,H" when N (ODIR's "no disease") is predicted beside a disease: the two
    contradict each other, so the patient needs a look (each class has its own threshold, so both can pass)."""
    on = [c for c, v in zip(classes, pred) if v and c not in (untrusted or ())]  # (model/trust.py: never flags)
    if "N" in on and len(on) > 1:
        return f"{status}; normal together with {','.join(c for c in on if c != 'N')}"
    return status


def is_scored(status) -> bool:
    """The patient has probabilities: status "ok", possibly with a flag ("ok; normal together with D")."""
    return isinstance(status, str) and (status == "ok" or status.startswith("ok; "))


def is_flagged(status) -> bool:
    """Scored, with a flag that asks for a look ("ok; ...")."""
    return isinstance(status, str) and status.startswith("ok; ")


def write_csv(frame, path, *, submission: bool = False) -> None:
    """The predictions table, or with submission=True exactly `ID,N,D,G,C,A,H,M,O` for scored patients.

    Written atomically (no partial file, no temporary file left on any error). Text cells are made safe: a cell
    that a spreadsheet would run as a formula (`=HYPERLINK(...)` as a patient ID) gets a leading `'`, and a file
    name's undecodable bytes are written as `\\xNN`, so the file is always valid UTF-8.

    Raises:
        ScoreError: the file cannot be written (read-only, a folder, disk full); the message names it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            # 8 decimals: with 6, distinct small probabilities become ties and an AUC read back from the file
            # moves in its 5th decimal (enough to flip a 3-decimal figure that sits on a rounding boundary)
            if submission:
                w.writerow(SUBMISSION_HEADER)
                for r in frame[frame["status"].map(is_scored)].itertuples(index=False):
                    w.writerow([_text_cell(r.ID), *(f"{getattr(r, 'p_' + c):.8f}" for c in SUBMISSION_HEADER[1:])])
            else:
                w.writerow(frame.columns)
                for r in frame.itertuples(index=False):
                    w.writerow(["" if v is None or (isinstance(v, float) and np.isnan(v)) else
                                f"{v:.8f}" if isinstance(v, float) else _text_cell(v) for v in r])
    except OSError as e:
        raise ScoreError(f"cannot write {printable(path)}: {e.strerror or e}") from None


def _text_cell(value):
    """A CSV cell that a spreadsheet shows as text, never runs; numbers pass unchanged."""
    if not isinstance(value, str):
        return value
    text = printable(value)
    if text.startswith(FORMULA_START):
        try:
            float(text)  # "-3" or "+1.5" is a number, not a formula
        except ValueError:
            return "'" + text
    return text


def write_xlsx(frame, path, model_info: dict) -> None:
    """The predictions table as an Excel workbook (openpyxl): sheet "predictions" (the CSV's columns, numbers as
    numbers), sheet "model" (the model, its tuned threshold per class, the date). Written atomically; text cells are
    stored as text, never as formulas.

    Raises:
        ScoreError: the file cannot be written; the message names it.
    """
    from openpyxl import Workbook  # slow: ~0.3 s to import, and only an .xlsx output needs it
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    def put(ws, row):
        ws.append([None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in row])
        for cell in ws[ws.max_row]:
            if isinstance(cell.value, str):  # an ID "=1+2" stays text (openpyxl would store it as a formula)
                cell.value = ILLEGAL_CHARACTERS_RE.sub("?", printable(cell.value))
                cell.data_type = "s"

    wb = Workbook()
    ws = wb.active
    ws.title = "predictions"
    put(ws, list(frame.columns))
    for r in frame.itertuples(index=False):
        put(ws, [int(v) if isinstance(v, (np.integer,)) else float(v) if isinstance(v, np.floating) else v
                 for v in r])
    ws.freeze_panes = "B2"
    for c, cell in enumerate(ws[1], start=1):
        if str(cell.value).startswith(("p_", "left_p_", "right_p_")):
            for col in ws.iter_cols(min_col=c, max_col=c, min_row=2):
                for x in col:
                    x.number_format = "0.0000"
    info = wb.create_sheet("model")
    for key, value in model_info.items():
        if key not in ("thresholds", "eye_thresholds"):
            put(info, [key, value if isinstance(value, (int, float)) else str(value)])
    put(info, [])
    eye = model_info.get("eye_thresholds")
    put(info, ["class", "name", "threshold (a probability above it is predicted)",
               *(["per-eye threshold (findings)"] if eye else [])])
    for c, t in model_info["thresholds"].items():
        put(info, [c, CLASS_NAMES[c], t, *([eye[c]] if eye else [])])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            wb.save(f)
    except OSError as e:
        raise ScoreError(f"cannot write {printable(path)}: {e.strerror or e}") from None


def thresholds_file(out) -> Path:
    """The sidecar of a CSV output that records the thresholds: predictions.csv → predictions.thresholds.json."""
    out = Path(out)
    return out.with_name(out.stem + ".thresholds.json")


def model_info(model_path, meta: dict, *, tta: bool = False) -> dict:
    """What a result needs to be read later: the model, how it was applied, the thresholds of its pred_* columns."""
    return {"model": printable(str(model_path)), "backbone": meta.get("backbone", ""),
            "commit": meta.get("commit", ""), "img_px": meta.get("img_px"),
            "trained_on": printable(str(meta.get("config", {}).get("data", ""))),
            "probabilities": "calibrated per class on the run's validation patients" + (", TTA hflip" if tta else ""),
            "scored_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "thresholds": {c: round(float(t), 6) for c, t in zip(meta["classes"], meta["thresholds"])},
            **({"eye_thresholds": {c: round(float(t), 6) for c, t in zip(meta["classes"], meta["eye_thresholds"])},
                "labels_follow": LABELS_FOLLOW} if meta.get("eye_thresholds") is not None else {})}


def write_output(frame, out: Path, info: dict, *, submission: bool = False) -> list[Path]:
    """The result in the format its name asks for (.xlsx: a workbook with the thresholds inside; else CSV plus its
    thresholds sidecar). Returns the files written."""
    if out.suffix.lower() == ".xlsx" and not submission:
        write_xlsx(frame, out, info)
        return [out]
    write_csv(frame, out, submission=submission)
    side = thresholds_file(out)
    try:
        with atomic_write(side) as f:
            f.write(json.dumps(info, indent=1) + "\n")
    except OSError as e:
        raise ScoreError(f"cannot write {printable(side)}: {e.strerror or e}") from None
    return [out, side]


def check_writable(path) -> None:
    """Fail before any work when the output CSV could not be written at the end: a folder, a read-only file, or a
    folder where no file can be created (read-only, not a folder, permissions). Creates nothing: missing parent
    folders are made when the file is written, at the end (a failure before leaves no folder behind)."""
    path = Path(path)
    if path.is_dir():
        raise ScoreError(f"-o {printable(path)}: is a folder; give a file name, e.g. {printable(path / 'predictions.csv')}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ScoreError(f"-o {printable(path)}: the file is read-only")
    try:
        if not path.parent.is_dir():
            check_can_create(path.parent)
            return
        with tempfile.TemporaryFile(dir=path.parent, prefix=".probe"):
            pass
    except OSError as e:
        raise ScoreError(f"-o {printable(path)}: cannot write in {printable(path.parent)} ({e.strerror or e})") from None


def metrics_report(y_true, probs, thresholds, classes) -> str:
    """Multi-label metrics (at the tuned thresholds and at 0.5) and the official ODIR-2019 score, as text."""
    ev = evaluate(y_true, probs, thresholds, classes=classes)
    lines = [f"metrics on {len(y_true)} labelled patients (multi-label, per patient × class, F1 per class; not the "
             f"ODIR score):",
             "                      F1 micro  F1 macro  AUC macro  " + "  ".join(f"{c:>5}" for c in classes)]
    for label, m in (("tuned thresholds", ev["tuned"]), ("threshold 0.5", ev["at_0.5"])):
        lines.append(f"  {label:<18}  {m['f1_micro']:8.3f}  {m['f1_macro']:8.3f}  {m['auc_macro']:9.3f}  "
                     + "  ".join(f"{m['f1'][c]:5.3f}" for c in classes))
    o = ev["odir"]
    lines.append(f"official ODIR-2019 score (flattened matrices, threshold 0.5): kappa {o['kappa']:.3f} · "
                 f"F1 {o['f1']:.3f} · AUC {o['auc']:.3f} · final {o['final']:.3f}" if o else
                 f"official ODIR-2019 score: not defined on these labels ({ev['odir_undefined']})")
    lines += ["per class at the model's thresholds (support: positive patients):",
              format_classification_table(classification_table(y_true, probs, thresholds, classes))]
    return "\n".join(lines)


def status_summary(frame, ignored) -> list[str]:
    """Lines: how many scored, the reasons of the others, the ignored files."""
    scored = frame["status"].map(is_scored) if len(frame) else frame["status"]
    n, ok = len(frame), int(scored.sum()) if len(frame) else 0
    lines = [f"scored {ok} of {n} patients"]
    if ok < n:
        kinds = Counter(_reason_kind(s) for s in frame.loc[~scored, "status"])
        lines[0] += f"; not scored {n - ok}: " + ", ".join(f"{v} {k}" for k, v in kinds.most_common())
        for r in frame[~scored].head(10).itertuples(index=False):
            lines.append(printable(f"  ID {r.ID}: {r.status}"))
        if n - ok > 10:
            lines.append(f"  ... {n - ok - 10} more (status column of the predictions CSV)")
    flagged = int(frame["status"].map(is_flagged).sum()) if len(frame) else 0
    if flagged:
        lines.append(f"flagged {flagged} of {ok} scored patients: N (no disease) predicted with a disease; status "
                     f"\"ok; normal together with ...\"")
    if ignored:
        lines.append(printable(f"ignored {len(ignored)} file(s) that are no patient eye image: "
                     + ", ".join(f"{name} ({why})" for name, why in ignored[:10]) + (" ..." if len(ignored) > 10 else "")))
    return lines


def _reason_kind(status: str) -> str:
    """'left eye: truncated JPEG (3_left.jpg)' → 'truncated JPEG'; several problems → the first."""
    if status.startswith("not paired"):
        return "unpaired image"
    first = status.split("; ")[0]
    kind = first.split(": ", 1)[-1]
    return re.sub(r" \([^)]*\)$", "", kind).split(":")[0]


def checked_outputs(probs: np.ndarray, ok: np.ndarray, table, eye_probs=None):
    """Keep only the patients whose 8 model outputs (and 2 x 8 per-eye outputs, when given) are finite
    probabilities in [0, 1]; the others get a status saying what the model returned (a damaged or hand-edited
    model), never "ok". Returns (probs, ok, eye_probs) of the kept."""
    every = probs if eye_probs is None else np.concatenate([probs, eye_probs.reshape(len(probs), -1)], axis=1)
    finite = np.isfinite(every).all(axis=1)
    good = finite & ((every >= 0) & (every <= 1)).all(axis=1)
    for i, fin in zip(ok[~good], finite[~good]):
        table.iat[int(i), table.columns.get_loc("status")] = (
            "model output not finite (NaN or infinite probability)" if not fin else "model output outside [0, 1]")
    return probs[good], ok[good], None if eye_probs is None else eye_probs[good]
