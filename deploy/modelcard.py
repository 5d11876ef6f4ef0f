"""MODEL_CARD.md beside an exported ONNX file: what the model is for and not for, what it was trained on, its test
figures per class, thresholds, calibration and known limitations (Mitchell et al. 2019, "Model Cards for Model
Reporting"; timm's and Hugging Face's cards are the familiar form).

Written by export.py from the checkpoint and, when it exists, the run's report.json (train.py writes it at the end
of a run). Pure: dicts in, Markdown out; torch only to hash the weights (`report_for`).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from odir_dual.model.calibration import describe_calibration
from odir_dual.model.metrics import format_interval
from odir_dual.model.trust import NOT_USED, untrusted_classes
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES
from odir_dual.pipeline.host import write_text_atomic
from odir_dual.pipeline.synthetic import is_synthetic

CARD_NAME = "MODEL_CARD.md"

INTENDED = """\
- Research and teaching: multi-label screening of a patient's **pair** of colour fundus photographs (left and right
  eye, 45° field, as in ODIR-5K) for the eight ODIR-5K labels, to rank or flag patients for review by an
  ophthalmologist.
- Input: both eyes of one patient, prepared and normalised exactly as `score.py` does (fundus crop, resize to the
  model's size, the mean/std in the ONNX metadata).
- Output: one probability per label (calibrated on the validation split when a calibration is named below) and a
  0/1 decision at the per-label threshold below."""

NOT_INTENDED = """\
- Diagnosis, or any decision about a patient without a clinician: this model is not a certified medical device and
  has not been validated prospectively or on any population but its training data's.
- Photographs unlike the training data: other cameras, fields of view, resolutions, children, non-fundus images
  (OCT, anterior segment), a single eye, or both inputs from the same eye.
- Diseases outside the eight labels, grading severity, or locating lesions."""

LIMITATIONS = """\
- ODIR-5K was collected from hospitals and medical centres in China (by Shanggong Medical Technology), with several
  camera models: its patients, cameras and labelling habits are not those of other clinics; figures elsewhere will
  differ.
- Labels are per patient (from both eyes' diagnostic keywords), not per image, and carry the annotators' noise; the
  "O" (other) label mixes many conditions.
- Rare labels (H hypertension, A AMD, and often G, C, M) have few positive test patients: their F1 and AUC have wide
  uncertainty (see their intervals, and the positives per label in the table).
- Thresholds and the calibration were fitted on the validation split; the test split was used once, for the figures
  above. A new site should check both on its own labelled patients.
- The official ODIR-2019 score pools all cells at threshold 0.5; it is reported as the challenge defined it and is
  not comparable to the per-class F1/AUC."""


def model_card(ckpt: dict, report: dict | None, *, onnx_name: str, precision: str, diffs: dict | None = None,
               no_report: str = "no report.json was found beside the checkpoint") -> str:
    """The card's Markdown.

    Args:
        ckpt: the checkpoint (config, thresholds, calibration, img_px, mean, std, commit, epoch, val_metrics).
        report: the run's report.json, or None (then the figures are the checkpoint's validation metrics).
        onnx_name: the exported file's name.
        precision: "fp32" or "fp16".
        diffs: export.py's agreement check (max |Δ probability| vs PyTorch), if any.
        no_report: why report is None (said in the card beside the validation figures).
    """
    cfg = ckpt.get("config", {})
    lines = [f"# Model card: {onnx_name}", "",
             f"odir-dual dual-eye network ({cfg.get('backbone', '?')} backbone"
             + (f" with `{cfg['backbone_args']}`" if cfg.get("backbone_args") else "") + ", shared by both eyes, with "
             f"cross-attention between the eyes) → 8 ODIR-5K labels. {precision} ONNX, inputs `left`, `right` "
             f"(N, 3, {ckpt.get('img_px')}, {ckpt.get('img_px')}), outputs `probs`, `logits` (N, 8)"
             + (", `eye_probs` (N, 2, 8) [left, right]" if _has_eyes(ckpt) else "") + ". Training commit "
             f"`{ckpt.get('commit', 'unknown')}`, "
             + (f"the mean of the logits of {ckpt['folds']} fold models (K-fold cross-validation), calibrated on "
                f"their out-of-fold predictions." if ckpt.get("folds") else
                f"checkpoint epoch {ckpt.get('epoch', '?')}.")
             + (f" Backbone's initial weights: {ckpt['weights']}." if ckpt.get("weights") else ""), ""]
    if is_synthetic(cfg.get("data", "")):
        lines += ["> **Trained on the synthetic demo set** (generated pictures, not photographs of patients): a "
                  "demonstration of the tooling with no medical meaning at all.", ""]
    lines += ["## Intended use", "", INTENDED, "", "## Not intended for", "", NOT_INTENDED, ""]
    lines += _data_section(cfg, report)
    lines += _untrusted_section(report)
    lines += _figures_section(ckpt, report, no_report)
    lines += _thresholds_section(ckpt)
    lines += _calibration_section(ckpt, report)
    lines += _eyes_section(ckpt, report)
    lines += ["## Known limitations", "", LIMITATIONS, ""]
    if diffs:
        lines += ["## Export check", "",
                  f"onnxruntime ({precision}) against PyTorch (fp32): largest probability difference "
                  f"{_fmt_diff(diffs)}.", ""]
    return "\n".join(lines)


def _has_eyes(ckpt: dict) -> bool:
    """The export includes the per-eye head (export.exported_eye_calibration's rule)."""
    return bool(ckpt.get("config", {}).get("eye_loss_weight")) and "eye_thresholds" in ckpt


def _eyes_section(ckpt: dict, report: dict | None) -> list[str]:
    """Per-eye findings: what eye_probs is, its thresholds, and its test figures beside the naive baseline."""
    if not _has_eyes(ckpt):
        return []
    eyes = ((report or {}).get("test") or {}).get("eyes") or {}
    out = ["## Per-eye findings", "",
           "`eye_probs` is the per-eye head's probability per class for each eye, calibrated and thresholded on "
           f"{ckpt.get('eye_fit_eyes') or '?'} {'out-of-fold' if ckpt.get('folds') else 'validation'} eyes labelled "
           "from their diagnostic keywords. The patient "
           "labels (`probs` at the thresholds above) stay the official output; score.py's `findings_vs_labels` says "
           "where the eyes differ.", "",
           "per-eye thresholds: " + " ".join(f"{c} {t:.2f}" for c, t in zip(CLASSES, ckpt["eye_thresholds"])), ""]
    if eyes.get("model"):
        out += [f"On {eyes['eyes']} test eyes: AUC macro {_num(eyes['model']['auc_macro'])} (naive baseline, each eye "
                f"given its patient's probability: {_num(eyes['naive']['auc_macro'])}), F1 macro "
                f"{_num(eyes['model']['f1_macro'])} (naive {_num(eyes['naive']['f1_macro'])}); per class with "
                "intervals in report.json and report.html.", ""]
    return out


def write_model_card(onnx_path: Path, ckpt: dict, ckpt_path: Path, *, precision: str, diffs: dict | None = None,
                     log=print) -> Path:
    """MODEL_CARD.md beside onnx_path, from the checkpoint and the run's report.json (beside the checkpoint)."""
    run_dir = Path(ckpt_path).parent
    report_path = run_dir / "report.json"
    report, why = run_report(ckpt, ckpt_path)
    for split in ("validation", "test"):
        if report and split in report and (run_dir / f"predictions_{split}.csv").is_file():
            report[split]["positives"] = _positives(run_dir / f"predictions_{split}.csv")
    path = Path(onnx_path).parent / CARD_NAME
    write_text_atomic(path, model_card(ckpt, report, onnx_name=Path(onnx_path).name, precision=precision,
                                       diffs=diffs, no_report=why))
    log(f"wrote {path} ({'with ' + str(report_path) if report else why + ': validation figures only'})")
    return path


def run_report(ckpt: dict, ckpt_path) -> tuple[dict | None, str]:
    """The run's report.json beside the checkpoint when it was made from this very checkpoint (`report_for`)."""
    report_path = Path(ckpt_path).parent / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return report_for(report, ckpt, Path(ckpt_path))


def report_for(report: dict | None, ckpt: dict, ckpt_path: Path) -> tuple[dict | None, str]:
    """(report, "") when report.json was made from this very checkpoint: it names the same file, epoch and weights
    hash (`checkpoint.weights_digest`, recorded by train.py's final report); else (None, why not). An interrupted
    resumed run leaves an older model's report.json beside a newer best.pt: its figures must not be paired."""
    if report is None:
        return None, "no report.json was found beside the checkpoint"
    named = report.get("checkpoint") if isinstance(report, dict) else None
    if not isinstance(named, dict):
        return None, "report.json names no checkpoint (written by an older version), so it may be another model's"
    from odir_dual.training.checkpoint import weights_digest  # slow: imports torch, needed only here

    if named.get("file") != ckpt_path.name or named.get("epoch") != ckpt.get("epoch") or \
            named.get("weights") != weights_digest(ckpt.get("model") or {}):
        return None, (f"report.json is of another checkpoint ({named.get('file')}, epoch {named.get('epoch')}, "
                      f"weights {named.get('weights')}; this is {ckpt_path.name}, epoch {ckpt.get('epoch')})")
    return report, ""


# ----------------------------------------------------------------------------------------------- sections


def _untrusted_section(report: dict | None) -> list[str]:
    untrusted = untrusted_classes(report or {}, CLASSES)
    if not untrusted:
        return []
    return ["## Classes not to be trusted", "",
            *(f"- **{c} {CLASS_NAMES[c]}**: {why}; {NOT_USED}." for c, why in untrusted.items()), "",
            "(model/trust.py: a class whose AUC's 95 % interval includes 0.5, or whose threshold calls more than "
            "80 % of the patients positive, on the test or the validation split.)", ""]


def _data_section(cfg: dict, report: dict | None) -> list[str]:
    data = (report or {}).get("data", {})
    split = " · ".join(f"{k} {v} patients" for k, v in data.items() if k != "folder" and isinstance(v, int))
    return ["## Training data", "",
            f"- Folder: `{data.get('folder') or cfg.get('data') or '?'}` (ODIR-5K layout: patient sheet + images).",
            f"- Split (seeded, multi-label stratified, seed {cfg.get('seed', '?')}): {split or 'see split.csv'}; "
            f"the rest trained the model.",
            f"- Images: fundus cropped, resized to {cfg.get('img_px', '?')} px; augmentation: flips, rotation ±12°, "
            f"brightness/contrast ±20 %.",
            f"- Recipe: preset `{cfg.get('preset', '?')}`, {cfg.get('epochs', '?')} epochs, batch "
            f"{cfg.get('batch_size', '?')} × {cfg.get('accum_steps', 1)}, lr {cfg.get('lr', '?')}, "
            f"{'ImageNet-pretrained' if cfg.get('pretrained') else 'randomly initialised'} backbone"
            + (", local contrast as the first layer (inside the model: feed plain images)"
               if cfg.get("local_contrast") else "")
            + (", per-eye loss from the diagnostic keywords" if cfg.get("eye_loss_weight") else "")
            + (f", an ensemble of {cfg['ensemble']} networks (their mean logits)" if cfg.get("ensemble", 1) > 1 else "")
            + (f", EMA of the weights (decay {cfg.get('model_ema_decay')})" if cfg.get("model_ema") else "") + ".", ""]


def _figures_section(ckpt: dict, report: dict | None, no_report: str = "no report.json was found") -> list[str]:
    split = "test" if report and "test" in report else "validation" if report else None
    ci = {}
    if split:
        r = report[split]
        title = f"## Figures on the {split} split ({r.get('patients', '?')} patients)"
        note = ("scored once, never used to choose anything" if split == "test" else
                "optimistic: this split picked the epoch, the calibration and the thresholds")
        tuned, at_half, odir, trivial = r.get("tuned"), r.get("at_0.5"), r.get("odir"), r.get("trivial", {})
        positives = (r.get("per_class") or {}).get("positives") or r.get("positives")
        ci = r.get("ci95") or {}
        if ci:
            note += (f"; in brackets the 95 % interval, a percentile bootstrap over the {r.get('patients', '?')} "
                     f"patients ({ci.get('resamples')} resamples, seed {ci.get('seed')})")
    else:
        title, note = "## Figures on the validation split", f"optimistic: it picked the epoch and the thresholds; " \
                                                              f"{no_report}"
        m = ckpt.get("val_metrics") or {}
        tuned, at_half, odir, trivial, positives = m.get("tuned"), m.get("at_0.5"), m.get("odir"), {}, None
    if not (tuned or at_half):
        return [title, "", f"No evaluation figures are stored with this checkpoint ({note}).", ""]

    def fig(metrics, key, c=None, path=None):  # the figure, with its interval from ci[path][key][c] when present
        value = (metrics or {}).get(key)
        bounds = (ci.get(path) or {}).get(key) if path else None
        if c is not None:
            value, bounds = (value or {}).get(c), (bounds or {}).get(c)
        return _num(value) if not bounds else format_interval(value, bounds)

    auc_from = "at_0.5" if at_half else "tuned"
    lines = [title, "", f"({note})", "",
             "| label | | F1 (tuned threshold) | F1 (0.5) | AUC |" + (" positives |" if positives else ""),
             "|---|---|---|---|---|" + ("---|" if positives else "")]
    for c in CLASSES:
        row = (f"| {c} | {CLASS_NAMES[c]} | {fig(tuned, 'f1', c, 'tuned')} | {fig(at_half, 'f1', c, 'at_0.5')} | "
               f"{fig(at_half or tuned, 'auc', c, auc_from)} |")
        lines.append(row + (f" {positives.get(c, '')} |" if positives else ""))
    lines.append(f"| macro | | {fig(tuned, 'f1_macro', path='tuned')} | {fig(at_half, 'f1_macro', path='at_0.5')} | "
                 f"{fig(at_half or tuned, 'auc_macro', path=auc_from)} |" + (" |" if positives else ""))
    lines.append("")
    if trivial.get("at_0.5"):
        lines.append(f"Trivial predictor (always the training prevalence): F1 macro "
                     f"{_num(trivial['at_0.5'].get('f1_macro'))}, AUC macro "
                     f"{_num(trivial['at_0.5'].get('auc_macro'))}.")
    if odir:
        base = ci.get("baseline") or {}
        lines.append(f"Official ODIR-2019 score (all cells pooled, threshold 0.5): kappa "
                     f"{fig(odir, 'kappa', path='odir')} · F1 {fig(odir, 'f1', path='odir')} · AUC "
                     f"{fig(odir, 'auc', path='odir')} · final "
                     f"{fig(odir, 'final', path='odir')}"
                     + (f" (trivial: {format_interval(trivial['odir'].get('final'), base.get('final'))})"
                        if trivial.get("odir") else "") + ".")
        if trivial.get("odir") and base.get("final_difference"):
            lo, hi = base["final_difference"]
            lines.append(f"Model minus trivial, official final: {odir['final'] - trivial['odir']['final']:+.3f} "
                         f"[{lo:+.2f}, {hi:+.2f}] (paired: the same resamples).")
    return lines + [""]


def _thresholds_section(ckpt: dict) -> list[str]:
    thresholds = [float(t) for t in ckpt.get("thresholds", [])]
    if not thresholds:
        return []
    return ["## Thresholds", "",
            "A label is predicted when its probability is above its threshold (tuned per label on validation to "
            "maximise that label's F1; stored in the ONNX metadata and applied by `score.py`):", "",
            "| " + " | ".join(CLASSES) + " |", "|" + "---|" * len(CLASSES),
            "| " + " | ".join(f"{t:.2f}" for t in thresholds) + " |", ""]


def _calibration_section(ckpt: dict, report: dict | None) -> list[str]:
    cal = ckpt.get("calibration") or (report or {}).get("calibration") or {"method": "none"}
    method = cal.get("method", "none")
    lines = ["## Calibration", "",
             f"Method: {describe_calibration(cal)}" + (" (fitted on the validation logits; already inside the ONNX "
                                                       "graph's `probs`)." if method != "none" else ".")]
    split = "test" if report and "test" in report else "validation" if report else None
    err = (report or {}).get(split, {}).get("calibration_error") if split else None
    if err:
        lines.append(f"On the {split} split: expected calibration error {_num(err.get('ece_before'))} → "
                     f"{_num(err.get('ece_after'))}, Brier score {_num(err.get('brier_before'))} → "
                     f"{_num(err.get('brier_after'))} (before → after calibration).")
    return lines + [""]


# ----------------------------------------------------------------------------------------------- helpers


def _positives(predictions_csv: Path) -> dict:
    """Positive patients per label in train.py's predictions_{split}.csv (columns id, N..O true labels, p_N..)."""
    with open(predictions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: sum(int(float(r[c])) for r in rows) for c in CLASSES if rows and c in rows[0]}


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.3f}"


def _fmt_diff(diffs: dict) -> str:
    parts = [f"{k} inputs {v:.1e}" for k, v in diffs.items() if k in ("random", "real") and isinstance(v, float)]
    return ", ".join(parts) or json.dumps(diffs, default=str)
