"""What a person can look at to judge a model or a patient: heatmap overlays and HTML reports.

    write_run_report(run_dir)                      runs/NAME/report.html (+ report_files/): a summary, per split
                                                   the official score and a per-class table with 95 % intervals,
                                                   per-class ROC/PR and F1-threshold panels, confusion counts,
                                                   reliability, curves, a gallery of test patients with heatmaps
    write_folder_report(scored, out_dir, ...)      DIR/index.html (+ files/): one row per scored patient
                                                   (`python score.py MODEL FOLDER --report DIR [--explain RUN]`)

Both pages are plain HTML with a little inline CSS, no JavaScript; every image is a file beside the page, referenced
by a relative path, so the folder can be copied and opened offline (`xdg-open runs/NAME/report.html`).
Heatmaps (model/explain.py) need the PyTorch checkpoint (`best.pt`): ONNX has no gradients. They are computed on the
image the network saw (the prepared copy squashed to img_px x img_px) and drawn, upsampled, on the prepared copy.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from odir_dual.common.errors import OdirError
from odir_dual.deploy.predictions import is_flagged, is_scored
from odir_dual.model.calibration import apply_calibration, describe_calibration
from odir_dual.model.eyes import eye_findings
from odir_dual.model.metrics import bootstrap_intervals, class_rates, classification_table, evaluate, format_interval
from odir_dual.model.trust import NOT_USED, epochs_text, model_quality, quality_text, untrusted_classes
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES, EYES
from odir_dual.pipeline.synthetic import is_synthetic
from odir_dual.common.errors import one_line, printable
from odir_dual.pipeline.host import atomic_write
from odir_dual.pipeline.pairs import default_cache, find_pairs, prepare_pairs

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;font-size:13px}th{background:#f3f3f3}
td.l,th.l{text-align:left}td.on{background:#ffd9a0;font-weight:bold}td.bad{color:#b00}img{display:block}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px}h2{margin-top:1.5em}
.warn{background:#fff0c0;padding:6px}.model{background:#f3f6fa;border:1px solid #c8d3e0;padding:.4em .8em}"""


# ----------------------------------------------------------------------------------------------- images



class ReportError(OdirError, ValueError):
    """A run's saved predictions that a report cannot read (the message names the file)."""


class RunReportMissing(OdirError, FileNotFoundError):
    """A run folder without report.json: training has not finished there."""


def network_view(path, img_px: int) -> np.ndarray:
    """The prepared image as the network sees it before normalisation: squashed to (img_px, img_px), uint8 RGB.
    (PIL's antialiased bilinear, like the reference loader; DALI's resize differs by a grey level or two.)"""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((img_px, img_px), Image.BILINEAR))


def model_input(views: list[np.ndarray], mean, std):
    """(B, 3, H, W) float32 tensor from uint8 (H, W, 3) views, normalised with the model's mean/std (0-1 units)."""
    import torch  # optional: only heatmaps need torch, and score.py imports this module in the light install

    x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def overlay(view: np.ndarray, heat, alpha: float = 0.45) -> np.ndarray:
    """A heatmap in [0, 1] (H, W) blended over a uint8 (H, W, 3) image with the 'jet' colour map."""
    import matplotlib  # optional and slow: not in the light install, ~0.5 s to import

    colours = matplotlib.colormaps["jet"](np.asarray(heat, np.float32))[..., :3]  # (H, W, 3) in 0..1
    return np.clip((1 - alpha) * view + alpha * 255 * colours, 0, 255).astype(np.uint8)


def colour_strip(width: int = 256, height: int = 12) -> np.ndarray:
    """The heatmaps' scale as a uint8 (height, width, 3) strip: jet from 0 (left) to 1 (right), as `overlay` paints."""
    import matplotlib  # optional and slow: as in overlay

    row = matplotlib.colormaps["jet"](np.linspace(0, 1, width, dtype=np.float32))[:, :3]
    return np.repeat((255 * row[None]).astype(np.uint8), height, axis=0)


def save_image(pixels: np.ndarray, path: Path) -> None:
    """uint8 RGB → PNG or JPEG (by suffix). Not fsynced, unlike the pages (written atomically, last): a report has
    a thousand of these, and an image cut short by a crash is redrawn by the next report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)


class Explainer:
    """A run's best.pt (a --folds run: its fold ensemble, as export.py writes it), ready to explain prepared image
    pairs (CPU, fp32, eval mode). Its probabilities are calibrated as training calibrated them (the ones its
    thresholds apply to); a model with the per-eye head fitted also gives per-eye probabilities (`eye_thresholds`
    is then not None)."""

    def __init__(self, run):
        from odir_dual.deploy.modelcard import run_report
        from odir_dual.training.checkpoint import (checkpoint_file, model_from_checkpoint, read_checkpoint,  # torch
                                                   weights_digest)
        from odir_dual.training.ensemble import ENSEMBLE, is_fold_run, load_fold_ensemble

        if is_fold_run(run):
            ckpt, self.model, _ = load_fold_ensemble(run)
            source = Path(run) / ENSEMBLE  # report.json's name for the ensemble
        else:
            ckpt = read_checkpoint(run)
            source = checkpoint_file(run)
            self.model = model_from_checkpoint(ckpt, run)
        # its test figures and untrusted classes, from the run's report.json of this very checkpoint
        self.quality = model_quality(run_report(ckpt, source)[0])
        self.folds = ckpt.get("folds")
        self.digest = weights_digest(ckpt["model"])  # which weights: export.py writes the same into the ONNX file
        self.path = run
        self.img_px, self.mean, self.std = int(ckpt["img_px"]), ckpt["mean"], ckpt["std"]
        self.config, self.thresholds = ckpt["config"], [float(t) for t in ckpt["thresholds"]]
        self.calibration = ckpt.get("calibration")
        self.commit = ckpt.get("commit", "")
        eyes = self.model.config.get("eye_head") and "eye_thresholds" in ckpt
        self.eye_thresholds = [float(t) for t in ckpt["eye_thresholds"]] if eyes else None
        self.eye_calibration = ckpt.get("eye_calibration") if eyes else None

    def explain(self, left_paths, right_paths, classes, batch_size: int = 16) -> list[dict]:
        """Per pair: views (left, right uint8), probs (K,), cams {class index: (left, right) (H, W)}, attention
        {"left_to_right": map over the right eye, "right_to_left": over the left eye}, and with the per-eye head
        eye_probs (2, K) [left, right], calibrated.

        Args:
            classes: per pair, the class indices to explain (Grad-CAM costs one backward pass per class and batch).
        """
        import torch  # optional: as in model_input

        from odir_dual.model.explain import explain_pair  # optional: torch

        out = []
        for s in range(0, len(left_paths), batch_size):
            views = [(network_view(lp, self.img_px), network_view(rp, self.img_px))
                     for lp, rp in zip(left_paths[s:s + batch_size], right_paths[s:s + batch_size])]
            wanted = [list(c) for c in classes[s:s + batch_size]]
            left = model_input([v[0] for v in views], self.mean, self.std)
            right = model_input([v[1] for v in views], self.mean, self.std)
            ex = explain_pair(self.model, left, right, classes=sorted({k for c in wanted for k in c}))
            probs = apply_calibration(ex.logits.numpy(), self.calibration)  # (B, K)
            eye_probs = None
            if self.eye_thresholds is not None:
                with torch.no_grad():
                    eye_logits = self.model(left, right, eye_logits=True)[1]  # (B, 2, K)
                eye_probs = apply_calibration(eye_logits.numpy(), self.eye_calibration)
            for i, (view, ks) in enumerate(zip(views, wanted)):
                out.append({"views": view, "probs": probs[i], **({"eye_probs": eye_probs[i]} if eye_probs is not None
                                                                 else {}),
                            "cams": {k: (ex.cams[k][0][i].numpy(), ex.cams[k][1][i].numpy()) for k in ks},
                            "attention": {d: m[i].numpy() for d, m in ex.attention.items()}})
        return out


def write_heatmaps(item: dict, folder: Path, stem: str, rel_to: Path) -> dict:
    """PNG files of one explained pair; returns {(eye, what): relative path}, what = "image", a class name, or
    "attention" (where the OTHER eye's tokens attend in this eye)."""
    files = {}
    attended = {"left": item["attention"].get("right_to_left"), "right": item["attention"].get("left_to_right")}
    for e, eye in enumerate(("left", "right")):
        view = item["views"][e]
        maps = {"image": None, **{CLASSES[k]: cams[e] for k, cams in item["cams"].items()}, "attention": attended[eye]}
        for what, heat in maps.items():
            if what == "attention" and heat is None:
                continue
            path = folder / f"{stem}_{eye}_{what.replace(' ', '')}.png"
            save_image(view if heat is None else overlay(view, heat), path)
            files[eye, what] = path.relative_to(rel_to).as_posix()
    return files


# ----------------------------------------------------------------------------------------------- html helpers


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, digits: int = 3) -> str:
    """A metric as the reports print it (the tests read it back the same way)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _table(header: list, rows: list[list], table_id: str = "", left_cols: int = 1) -> str:
    """An HTML table; cells are pre-escaped strings; the first `left_cols` columns are left-aligned."""
    def cell(tag, i, v):
        return f"<{tag}{' class=l' if i < left_cols else ''}>{v}</{tag}>"

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table{f' id={table_id}' if table_id else ''}><tr>{head}</tr>{body}</table>"


def _img(src: str, caption: str = "", width: int | None = None, found: str | None = None) -> str:
    """A figure; `found`: an eye's findings, written in bold under the caption."""
    w = f" width={width}" if width else ""
    extra = f"<b class=found>{_e(found)}</b>" if found is not None else ""
    return (f"<figure><img src='{_e(src)}'{w} alt='{_e(caption)}'><figcaption>{_e(caption)}{extra}</figcaption>"
            "</figure>")


def _page(title: str, body: list[str], css: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}{css}</style>"
            f"</head><body><h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_page(path: Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return path


def _ci(value, bounds, digits: int = 3) -> str:
    """`0.656 <small>[0.62, 0.69]</small>`: a figure with its 95 % interval (model.metrics.format_interval)."""
    text = format_interval(value, bounds, digits)
    return text.replace(" [", " <span class=ci>[", 1) + "</span>" if " [" in text else text


def _at(tree, *path):
    """tree[path[0]][path[1]]... or None where a key is missing (older report.json, a split without intervals)."""
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _split_section(name: str, split: dict, thresholds: list[float]) -> list[str]:
    """One split of report.json: the official ODIR score and the overall figures, then ONE per-class table
    (prevalence, sensitivity, specificity, PPV, F1 at the tuned thresholds, AUC, positives), each figure with its
    95 % interval when report.json has them."""
    key, ci = name.lower(), split.get("ci95") or {}
    rates = split.get("per_class") or {}
    out = [f"<h2 id=split-{key}>{_e(name)}: {split['patients']} patients</h2>",
           "<p class=note>" + ("Scored once with best.pt; never used to choose anything." if key == "test" else
                               "Picked the epoch and fitted the calibration and the thresholds: optimistic.")
           + (f" 95 % intervals: percentile bootstrap over patients ({ci['resamples']} resamples, seed {ci['seed']})."
              if ci else "") + "</p>"]
    odir = [["model", *(_ci(split["odir"][k], _at(ci, "odir", k)) for k in ("kappa", "f1", "auc", "final"))]]
    if split.get("trivial", {}).get("odir"):
        t = split["trivial"]["odir"]
        odir.append(["trivial (training prevalence)", *(_num(t[k]) for k in ("kappa", "f1", "auc")),
                     _ci(t["final"], _at(ci, "baseline", "final"))])
    out.append(_table(["official ODIR-2019 score (cells flattened, 0.5)", "kappa", "F1", "AUC", "final"], odir,
                      f"{key}-odir"))
    overall = []
    for label, m, path in (("model, tuned thresholds", split.get("tuned"), "tuned"),
                           ("model, threshold 0.5", split.get("at_0.5"), "at_0.5"),
                           ("trivial (training prevalence), 0.5", split.get("trivial", {}).get("at_0.5"), None)):
        if m:
            overall.append([_e(label), *(_ci(m[k], _at(ci, path, k) if path else None)
                                         for k in ("f1_micro", "f1_macro", "auc_macro"))])
    out.append(_table(["multi-label (per class, then averaged)", "F1 micro", "F1 macro", "AUC macro"], overall,
                      f"{key}-overall"))
    tuned, auc = split.get("tuned") or split.get("at_0.5") or {}, (split.get("at_0.5") or {}).get("auc", {})
    rows = []
    for k, c in enumerate(CLASSES):
        positives = _at(rates, "positives", c)
        rows.append([f"{c} {_e(CLASS_NAMES[c])}", "n/a" if positives is None else str(positives),
                     _pct(_at(rates, "prevalence", c)), _num(thresholds[k], 2),
                     *(_ci(_at(rates, r, c), _at(ci, "per_class", r, c))
                       for r in ("sensitivity", "specificity", "ppv")),
                     _ci(_at(tuned, "f1", c), _at(ci, "tuned", "f1", c)),
                     _ci(auc.get(c, _at(tuned, "auc", c)), _at(ci, "at_0.5", "auc", c))])
    out.append(_table(["class", "positives", "prevalence", "threshold", "sensitivity", "specificity", "PPV", "F1",
                       "AUC"], rows, f"{key}-classes"))
    out.append("<p class=note>At the thresholds tuned on validation (positive when p &gt; threshold). Sensitivity: "
               "found / positives; specificity: cleared / negatives; PPV: right / flagged; n/a where undefined. "
               "An interval is left out when fewer than half the resamples define the figure (a rare class).</p>")
    cal = split.get("calibration_error")
    if cal:
        out.append(_table(["calibration (all cells)", "ECE before", "ECE after", "Brier before", "Brier after"],
                          [["", *(_num(cal.get(k), 4) for k in ("ece_before", "ece_after", "brier_before",
                                                                 "brier_after"))]], f"{key}-calibration"))
    if split.get("eyes"):
        out += _eye_section(key, split["eyes"])
    return out


def _eye_section(key: str, eyes: dict) -> list[str]:
    """The per-eye head on a split's labelled eyes (report.json's "eyes", model/eyes.py): per class the positive
    eyes, AUC and F1 at the per-eye thresholds with 95 % intervals, beside the naive baseline; then how often the
    patient labels and the eyes' findings disagree."""
    out = [f"<h3 id={key}-eyes>Per eye: {eyes['eyes']} eyes of {eyes['patients']} patients</h3>",
           "<p class=note>Which eye: the per-eye head, each eye judged against its own diagnostic keywords (patients "
           f"whose keywords do not reproduce their labels left out: {eyes['left_out']}). Naive baseline: each eye "
           "inherits its patient's probability (and the patient threshold). 95 % intervals: bootstrap over patients, "
           "both eyes of a patient drawn together.</p>"]
    if eyes.get("model"):
        ci, rows = eyes["ci95"], []
        for c in [*CLASSES, None]:
            keys = (("auc", c), ("f1", c)) if c else (("auc_macro",), ("f1_macro",))
            rows.append([f"{c} {_e(CLASS_NAMES[c])}" if c else "macro", str(eyes["positives"][c]) if c else "",
                         *(_ci(_at(eyes, who, *k), _at(ci, who, *k)) for who in ("model", "naive") for k in keys)])
        out.append(_table(["class", "positive eyes", "AUC", "F1 (per-eye thresholds)", "naive AUC", "naive F1"],
                          rows, f"{key}-eyes"))
    agree = eyes["consistency"]
    out.append(_table([f"patient labels against the eyes' findings ({agree['patients']} patients)", *CLASSES],
                      [[what, *(str(agree[k][c]) for c in CLASSES)] for what, k in (
                          ("label positive, no eye above its threshold", "labels_only"),
                          ("an eye above its threshold, label negative", "eyes_only"))], f"{key}-eyes-agree"))
    out.append(f"<p class=note>{agree['patients_differing']} of {agree['patients']} patients differ in some class "
               "(an eye's N counts for the patient only when both eyes are normal). The labels, the patient head's, "
               "are the official ones.</p>")
    return out


def _pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %"


# ----------------------------------------------------------------------------------------------- run report


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """RUN/predictions_{val,test}.csv → (ids, y (N, 8) int, p (N, 8) float)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["id", *CLASSES, *(f"p_{c}" for c in CLASSES)]
    if rows and (absent := [c for c in need if c not in rows[0]]):
        raise ReportError(f"{path}: missing column(s) {', '.join(absent)}")
    ids = [r["id"] for r in rows]
    y = np.array([[int(float(r[c])) for c in CLASSES] for r in rows], np.int64).reshape(-1, len(CLASSES))
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], np.float64).reshape(-1, len(CLASSES))
    return ids, y, p


def confusion_counts(y: np.ndarray, p: np.ndarray, thresholds) -> dict[str, dict[str, int]]:
    """Per class: TP, FP, FN, TN at `thresholds` (positive when p > threshold, as everywhere in the project)."""
    pred = p > np.asarray(thresholds)[None, :]
    return {c: {"TP": int((pred[:, k] & (y[:, k] == 1)).sum()), "FP": int((pred[:, k] & (y[:, k] == 0)).sum()),
                "FN": int((~pred[:, k] & (y[:, k] == 1)).sum()), "TN": int((~pred[:, k] & (y[:, k] == 0)).sum())}
            for k, c in enumerate(CLASSES)}


def gallery_picks(ids, y: np.ndarray, p: np.ndarray, thresholds) -> list[tuple[str, str, str]]:
    """(class, kind, id): per class the most confident correct positive (true and predicted, highest p) and the
    most confident mistake (false positive or negative farthest from the threshold); classes without one skip."""
    picks = []
    thr = np.asarray(thresholds)
    for k, c in enumerate(CLASSES):
        pred = p[:, k] > thr[k]
        hit = np.flatnonzero(pred & (y[:, k] == 1))
        if len(hit):
            picks.append((c, "most confident correct", ids[hit[np.argmax(p[hit, k])]]))
        miss = np.flatnonzero(pred != (y[:, k] == 1))
        if len(miss):
            picks.append((c, "most confident wrong", ids[miss[np.argmax(np.abs(p[miss, k] - thr[k]))]]))
    return picks


PLOT_DPI = 150


def _save_figure(fig, out: Path) -> None:
    import matplotlib.pyplot as plt  # optional and slow: as in overlay

    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI)
    plt.close(fig)


def _class_axes(rows: int, cols: int, size=(2.9, 2.5)):
    import matplotlib  # optional and slow: as in overlay

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes.ravel()


def _plot_roc_pr(y, p, thresholds, out: Path) -> None:
    """Per class, side by side: its ROC curve and its precision-recall curve (step-drawn, as precision is only
    defined at the observed thresholds), the tuned threshold's operating point marked; 4 x 4 panels."""
    # optional and slow: scikit-learn comes with the [train] extra only, and takes ~3 s to import
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    fig, axes = _class_axes(4, 4, (3.1, 2.6))
    for k, c in enumerate(CLASSES):
        roc_ax, pr_ax = axes[2 * k], axes[2 * k + 1]
        n_pos = int(y[:, k].sum())
        if np.unique(y[:, k]).size < 2:
            for ax in (roc_ax, pr_ax):
                ax.text(0.5, 0.5, f"{c}: {n_pos} positives\nin {len(y)}: undefined", ha="center", va="center")
                ax.set_axis_off()
            continue
        pred = p[:, k] > thresholds[k]
        tpr_at = pred[y[:, k] == 1].mean()
        fpr_at, ppv_at = pred[y[:, k] == 0].mean(), (y[pred, k].mean() if pred.any() else np.nan)
        fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
        roc_ax.plot(fpr, tpr, lw=1.4)  # straight segments: tied scores move both rates at once
        roc_ax.plot([0, 1], [0, 1], "k:", lw=0.7)
        roc_ax.plot([fpr_at], [tpr_at], "o", color="C3", ms=5)
        roc_ax.set(title=f"{c} ROC · AUC {roc_auc_score(y[:, k], p[:, k]):.3f}", xlim=(0, 1), ylim=(0, 1.02))
        prec, rec, _ = precision_recall_curve(y[:, k], p[:, k])
        pr_ax.plot(rec, prec, drawstyle="steps-post", lw=1.4, color="C2")
        pr_ax.axhline(n_pos / len(y), color="k", ls=":", lw=0.7)  # a random ranking's precision: the prevalence
        if np.isfinite(ppv_at):
            pr_ax.plot([tpr_at], [ppv_at], "o", color="C3", ms=5)
        pr_ax.set(title=f"{c} PR · AP {average_precision_score(y[:, k], p[:, k]):.3f} · {n_pos} pos",
                  xlim=(0, 1), ylim=(0, 1.02))
        roc_ax.set_xlabel("false positive rate", fontsize=8), roc_ax.set_ylabel("sensitivity", fontsize=8)
        pr_ax.set_xlabel("recall", fontsize=8), pr_ax.set_ylabel("precision", fontsize=8)
    for ax in axes:
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    _save_figure(fig, out)


def f1_curve(y, p, grid) -> np.ndarray:
    """(G,) F1 of one class at each threshold of `grid` (positive when p > t; 0 when nothing is positive)."""
    pred = p[None, :] > np.asarray(grid)[:, None]  # (G, N)
    pos = (y == 1)[None, :]
    tp, fp, fn = (pred & pos).sum(1), (pred & ~pos).sum(1), (~pred & pos).sum(1)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _plot_f1_threshold(splits: dict, thresholds, out: Path) -> None:
    """Per class: F1 against the threshold on validation (where the threshold was tuned: its maximum over the
    0.05 grid) and on test, the tuned threshold marked; 2 x 4 panels."""
    grid = np.linspace(0.01, 0.99, 99)
    fig, axes = _class_axes(2, 4, (3.3, 2.6))
    for k, (c, ax) in enumerate(zip(CLASSES, axes)):
        for (name, (y, p)), colour in zip(splits.items(), ("C0", "C1")):
            ax.plot(grid, f1_curve(y[:, k], p[:, k], grid), color=colour, lw=1.4,
                    label=f"{name} ({int(y[:, k].sum())} pos)")
        ax.axvline(thresholds[k], color="C3", lw=1.2, label=f"tuned {thresholds[k]:.2f}")
        ax.axvline(0.5, color="grey", lw=0.7, ls=":")
        ax.set(title=f"{c} {CLASS_NAMES[c]}", xlim=(0, 1), ylim=(0, 1.02))
        ax.set_xlabel("threshold", fontsize=8), ax.set_ylabel("F1", fontsize=8)
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    _save_figure(fig, out)


def _plot_colour_bar(out: Path) -> None:
    """The heatmaps' scale: jet from 0 (no weight) to 1 (the map's own maximum)."""
    import matplotlib  # optional and slow: as in overlay

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 0.75))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap="jet", extent=(0, 1, 0, 1))
    ax.set_yticks([])
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_xlabel("heatmap weight (each map scaled to its own maximum)", fontsize=8)
    ax.tick_params(labelsize=8)
    _save_figure(fig, out)


def _plot_reliability(y, p, out: Path, bins: int = 10) -> None:
    """Observed frequency against predicted probability, all classes pooled, in equal-width bins (bar: count)."""
    import matplotlib  # optional and slow: as in overlay

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat_p, flat_y = p.ravel(), y.ravel()
    which = np.minimum((flat_p * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, flat_p, bins) / np.maximum(counts, 1)
    freq = np.bincount(which, flat_y, bins) / np.maximum(counts, 1)
    fig, a = plt.subplots(figsize=(5, 4.5))
    a.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    a.plot(mean_p[counts > 0], freq[counts > 0], "o-", label="model (all classes pooled)")
    a2 = a.twinx()
    a2.bar((np.arange(bins) + 0.5) / bins, counts, width=1 / bins, alpha=0.15, color="grey")
    a2.set_ylabel("patient × class cells per bin")
    a.set(xlabel="predicted probability", ylabel="observed frequency", title="reliability", xlim=(0, 1), ylim=(0, 1))
    a.legend(loc="upper left", fontsize=8)
    _save_figure(fig, out)


def _prepared_pairs(cfg: dict, ids: set[str], px: int | None = None) -> dict[str, tuple[str, str]]:
    """id → (left, right) prepared image paths for a few patients of the run's data folder (prepared if needed), at
    the run's size or, with `px`, at that short side."""
    table = find_pairs(cfg["data"]).table
    table = table[table["id"].astype(str).isin(ids) & (table["status"] == "ok")]
    table = prepare_pairs(table, Path(cfg["cache_dir"]) if cfg.get("cache_dir") else default_cache(),
                          px or cfg.get("prepare_px") or cfg["img_px"], workers=1, progress=False)
    return {str(r.id): (r.left_prepared, r.right_prepared) for r in table.itertuples() if r.status == "ok"}


GALLERY_PX = 256  # px per eye in the run report's gallery: the prepared image, large enough to see a lesion
ATTENTION_PX = 124  # the cross-attention maps (coarse: one value per token) beside them, smaller


def _gallery_images(item: dict, paths: tuple[str, str], folder: Path, stem: str, rel_to: Path, px: int) -> dict:
    """JPEGs of one explained pair (the prepared images, not the network's smaller view; the heatmaps, computed at
    the network's size, upsampled bilinearly): {(eye, what): relative path}, what = "image" or a class name (at
    `px`), or "attention" (at ATTENTION_PX)."""
    files = {}
    attended = {"left": item["attention"].get("right_to_left"), "right": item["attention"].get("left_to_right")}
    for e, eye in enumerate(("left", "right")):
        maps = {"image": None, **{CLASSES[k]: cams[e] for k, cams in item["cams"].items()}, "attention": attended[eye]}
        for what, heat in maps.items():
            if what == "attention" and heat is None:
                continue
            size = ATTENTION_PX if what == "attention" else px
            view = network_view(paths[e], size)
            if heat is not None:
                heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((size, size), Image.BILINEAR))
            path = folder / f"{stem}_{eye}_{what.replace(' ', '')}.jpg"
            save_image(view if heat is None else overlay(view, np.clip(heat, 0, 1)), path)
            files[eye, what] = path.relative_to(rel_to).as_posix()
    return files


def _gallery(run_dir: Path, files_dir: Path, ids, y, p, thresholds) -> list[str]:
    """The gallery section: per class, both eyes with the class's Grad-CAM and the cross-attention maps."""
    picks = gallery_picks(ids, y, p, thresholds)
    if not picks:
        return []
    explainer = Explainer(run_dir)
    paths = _prepared_pairs(explainer.config, {pid for _, _, pid in picks})
    px = max(GALLERY_PX, explainer.img_px)
    # drawn on the photographs prepared at the gallery's size (a 64-px training copy, enlarged, shows no lesion);
    # explained on the training copy, as the network saw it
    run_px = explainer.config.get("prepare_px") or explainer.img_px
    large = _prepared_pairs(explainer.config, set(paths), px) if px > run_px else paths
    picks = [pk for pk in picks if pk[2] in paths and pk[2] in large]
    row_of = {pid: i for i, pid in enumerate(ids)}
    items = explainer.explain([paths[pid][0] for _, _, pid in picks], [paths[pid][1] for _, _, pid in picks],
                              [[CLASSES.index(c)] for c, _, _ in picks])
    _plot_colour_bar(files_dir / "colour_bar.png")
    out = ["<h2 id=gallery>Gallery</h2><p class=note>Per class: the most confident correct and the most confident "
           f"wrong patient of the split. Each eye at {px} px (the network saw it at {explainer.img_px} px) with the "
           "class's "
           "Grad-CAM on it; at the end, smaller, where the other eye's tokens attend in each eye (cross-attention, "
           "averaged over heads and tokens). Each map is scaled to its own maximum: compare where, not how much, "
           "between maps.</p>", _img("report_files/colour_bar.png", "", 416)]
    for (c, kind, pid), item in zip(picks, items):
        files = _gallery_images(item, large[pid], files_dir, f"gallery_{c}_{kind.split()[-1]}_{_safe(pid)}", run_dir,
                                px)
        i = row_of[pid]
        truth = ",".join(k for j, k in enumerate(CLASSES) if y[i, j]) or "none"
        k = CLASSES.index(c)
        big = "".join(_img(files[eye, what], f"{eye} · {label}", px) for eye in ("left", "right")
                      for what, label in (("image", "image"), (c, f"Grad-CAM {c}")))
        small = "".join(_img(files[eye, "attention"], f"{eye} · attended", ATTENTION_PX) for eye in ("left", "right")
                        if (eye, "attention") in files)
        out.append(f"<div class=pick><h3>{_e(c)} {_e(CLASS_NAMES[c])} · {_e(kind)}: patient {_e(pid)}</h3>"
                   f"<p>p({_e(c)}) = {_num(p[i, k])} (threshold {_num(thresholds[k], 2)}) · true labels "
                   f"{_e(truth)}</p>{big}<div class=att>{small}</div></div>")
    return out


RUN_CSS = """body{max-width:1640px}.ci{color:#666;font-size:11px}#summary-head .ci{font-size:15px}
figure{max-width:100%}figure img{max-width:100%;height:auto}p.note{color:#555;font-size:13px;max-width:1100px}
#summary-head{font-size:20px;margin:.3em 0 .6em}#summary-head b{font-size:24px}.warn{background:#fff0c0;padding:6px}
div.pick{margin:0 0 10px}div.pick h3{margin:.3em 0 0;font-size:15px}div.pick figure{vertical-align:top}
div.att{display:inline-block;vertical-align:top;width:140px}div.att figure{margin:0 4px 2px}
div.pick p{margin:.2em 0;font-size:13px}details{margin:.5em 0}"""


def _summary(report: dict, cfg: dict) -> list[str]:
    """The top of the run report: the headline figure (test official final vs the trivial predictor, with
    intervals) and what the run was: preset, backbone, patients per split, date, duration."""
    split = "test" if "test" in report else "validation"
    r = report[split]
    ci = r.get("ci95") or {}
    final, trivial = r["odir"]["final"], r.get("trivial", {}).get("odir", {}).get("final")
    head = (f"{split} official ODIR-2019 final <b>{_ci(final, _at(ci, 'odir', 'final'))}</b>"
            + (f" · trivial predictor {_ci(trivial, _at(ci, 'baseline', 'final'))}" if trivial is not None else ""))
    diff = _at(ci, "baseline", "final_difference")
    if trivial is not None:
        head += f" · difference {final - trivial:+.3f}" + (f" <span class=ci>[{diff[0]:+.2f}, {diff[1]:+.2f}]</span>"
                                                          if diff else "")
    head += f" ({r['patients']} patients{'' if split == 'test' else ', optimistic: no test split'})"
    counts = report.get("counts") or {k: v for k, v in report.get("data", {}).items() if isinstance(v, int)}
    duration = report.get("duration_s")
    rows = [["patients", " · ".join(f"{k} {v}" for k, v in counts.items())],
            ["preset · backbone", f"{_e(cfg.get('preset', '?'))} · {_e(cfg.get('backbone', '?'))}"
             f"{' (ImageNet-pretrained)' if cfg.get('pretrained') else ' (from scratch)'} · "
             f"{_e(cfg.get('img_px'))} px"],
            ["epochs", f"{_e(epochs_text(report) or cfg.get('epochs', '?'))}; best "
                       f"{_e(report.get('best_epoch', '?'))} by validation {_e(report.get('selected_by', '?'))}"],
            ["started · finished (UTC)", f"{_e(report.get('started', 'not recorded'))} · "
                                         f"{_e(report.get('finished', 'not recorded'))}"],
            ["duration", "not recorded" if duration is None else
             _duration(duration) + (" (this process: the run was resumed)" if report.get("resumed") else "")],
            ["data", _e(report.get("data", {}).get("folder", cfg.get("data", "?")))],
            ["commit", _e(report.get("commit", "?"))]]
    out = [f"<p id=summary-head>{head}</p>"]
    data = str(report.get("data", {}).get("folder", cfg.get("data", "")))
    if is_synthetic(data):
        out.append("<p class=warn><b>Synthetic demo data</b>: generated pictures, not patients. These figures "
                   "test the tooling and mean nothing medically.</p>")
    out += untrusted_html(untrusted_classes(report, CLASSES))
    return out + [_table(["run", _e(report.get("run", ""))], rows, "summary", left_cols=2)]


def untrusted_html(untrusted: dict[str, str]) -> list[str]:
    """The warning paragraph on the classes not to be trusted (model/trust.py); none when every class is."""
    if not untrusted:
        return []
    items = "".join(f"<li><b>{_e(c)} {_e(CLASS_NAMES.get(c, ''))}</b>: {_e(why)}; {NOT_USED}</li>"
                    for c, why in untrusted.items())
    return [f"<div class=warn id=untrusted><b>Not to be trusted</b>: {len(untrusted)} class(es) whose figures say "
            f"this model cannot tell them apart, or whose threshold flags nearly everyone.<ul>{items}</ul></div>"]


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s"


def _split_figures(run_dir: Path, report: dict) -> dict[str, tuple]:
    """{"validation"/"test": (ids, y, p)} from the predictions CSVs; report.json's splits without per-class rates
    or intervals (runs from before they existed) get them computed from these."""
    out = {}
    thresholds = [float(report["thresholds"][c]) for c in CLASSES]
    for split, name in (("validation", "val"), ("test", "test")):
        path = run_dir / f"predictions_{name}.csv"
        if split not in report or not path.is_file():
            continue
        ids, y, p = read_predictions(path)
        out[split] = (ids, y, p)
        report[split].setdefault("per_class", class_rates(y, p, thresholds))
        if "ci95" not in report[split]:
            report[split]["ci95"] = bootstrap_intervals(y, p, thresholds, seed=report.get("config", {}).get("seed", 0))
    return out


def write_run_report(run_dir) -> Path:
    """`RUN/report.html` from report.json, config.json, metrics.csv, curves.png, the predictions CSVs and best.pt.

    The summary first (test official final against the trivial predictor, with 95 % intervals; patients, preset,
    date, duration), then per split the official score and one per-class table with intervals, the per-class
    ROC/PR and F1-versus-threshold panels, calibration, the training curves, a gallery and the config.
    Images go to `RUN/report_files/`. The gallery uses the test split (validation when the run has none) and needs
    best.pt and the run's data folder (from config.json) for the prepared images; it is skipped when either is
    missing. Returns the page's path.

    Raises:
        RunReportMissing: no report.json in run_dir (written by train.py at the end of a run).
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise RunReportMissing(f"{report_path}: no run report data (train.py writes it at the end of a run)")
    report = json.loads(report_path.read_text())
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else \
        report.get("config", {})
    files_dir = run_dir / "report_files"
    files_dir.mkdir(exist_ok=True)
    thresholds = [float(report["thresholds"][c]) for c in CLASSES]
    predictions = _split_figures(run_dir, report)
    body = _summary(report, cfg)
    for name in ("Test", "Validation"):
        if name.lower() in report:
            body += _split_section(name, report[name.lower()], thresholds)
    split = "test" if "test" in predictions else "validation" if "validation" in predictions else None
    if split:
        ids, y, p = predictions[split]
        short = "test" if split == "test" else "val"
        _plot_roc_pr(y, p, thresholds, files_dir / f"roc_pr_{short}.png")
        _plot_f1_threshold({s: predictions[s][1:] for s in ("validation", "test") if s in predictions}, thresholds,
                           files_dir / "f1_threshold.png")
        _plot_reliability(y, p, files_dir / f"reliability_{short}.png")
        counts = confusion_counts(y, p, thresholds)
        body += [f"<h2>Curves per class on the {split} split ({len(ids)} patients)</h2>",
                 "<p class=note>ROC and precision-recall per class; the dot is the tuned threshold's operating point, "
                 "the dotted line chance (for PR: the prevalence).</p>",
                 _img(f"report_files/roc_pr_{short}.png", "ROC and precision-recall per class", 1240),
                 "<h3>F1 against the threshold</h3><p class=note>Each class's threshold was tuned on validation to "
                 "its best F1 (0.05 grid); the test curve shows how well that choice carries over.</p>",
                 _img("report_files/f1_threshold.png", "F1 against the threshold per class", 1240),
                 "<h3>Confusion counts at the tuned thresholds</h3>",
                 _table(["class", "threshold", "TP", "FP", "FN", "TN"],
                        [[c, _num(t, 2), *(str(counts[c][k]) for k in ("TP", "FP", "FN", "TN"))]
                         for c, t in zip(CLASSES, thresholds)], "confusion")]
    cal = report.get("calibration", {})
    per_class = [[_e(k), *(_num(v, 3) for v in vals)] for k, vals in cal.items()
                 if isinstance(vals, list) and len(vals) == len(CLASSES)]  # e.g. Platt's a, b
    body += ["<h2>Calibration</h2>",
             f"<p>Calibration of the probabilities: {_e(describe_calibration(cal))} (fitted on validation)</p>"]
    if per_class:
        body.append(_table(["parameter", *CLASSES], per_class, "calibration"))
    if split:
        body.append(_img(f"report_files/reliability_{short}.png", f"reliability on the {split} split", 560))
    if (run_dir / "curves.png").is_file():
        body += ["<h2>Training curves</h2>", _img("curves.png", "per epoch, from metrics.csv; dotted: the best epoch",
                                                  1240)]
    if split and (run_dir / "best.pt").is_file() and cfg.get("data"):
        ids, y, p = predictions[split]
        body += _gallery(run_dir, files_dir, ids, y, p, thresholds)
    body += ["<h2>Config</h2><details><summary>every setting of the run (config.json)</summary>",
             _table(["field", "value"], [[_e(k), _e(v)] for k, v in cfg.items()], "config", left_cols=2),
             "</details>"]
    body.append(f"<p class=note>written in {time.perf_counter() - t0:.1f} s</p>")
    return _write_page(run_dir / "report.html", _page(f"run {report.get('run', run_dir.name)}", body, RUN_CSS))


# ----------------------------------------------------------------------------------------------- folder report


def write_folder_report(scored: dict, out_dir, thresholds, *, explain_run=None, title: str = "",
                        thumb_px: int = 128) -> Path:
    """`DIR/index.html`: one row per patient of a scored folder (score.py's `score_folder` result).

    The page starts with the counts: per class the patients predicted positive (and the true positives when the
    folder has a sheet), the flagged patients (status "ok; ...": normal predicted together with a disease) and those
    not scored. Then one row per patient, flagged patients first, then the ones that could not be scored, then the
    rest (each group in ID order): both eyes (thumbnails), the 8 probabilities (highlighted where above the model's
    threshold), the predicted labels, the true labels when the folder has a sheet, and the status; the metrics when
    labelled. With `explain_run` (a run folder or best.pt), the Grad-CAM of each predicted class (the most probable
    one when none is) on both eyes, from the PyTorch model.

    Args:
        scored: dict with "frame" (predictions table), "table" (prepared pairs), "probs", "metrics" (text or None).
        thresholds: the model's 8 thresholds.
    """
    out_dir = Path(out_dir)
    files_dir = out_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    frame, table = scored["frame"], scored["table"]
    thr = [float(t) for t in thresholds]
    labelled = "true_labels" in frame.columns
    flagged = frame["status"].map(is_flagged).to_numpy(dtype=bool)
    ok = frame["status"].map(is_scored).to_numpy(dtype=bool)
    heatmaps = _folder_heatmaps(frame, table, files_dir, out_dir, explain_run) if explain_run else {}
    eye_thr = (scored.get("meta") or {}).get("eye_thresholds")  # a model with the per-eye head: findings per eye
    eye_thr = eye_thr if eye_thr is not None and "findings" in frame.columns else None
    order = sorted(range(len(frame)), key=lambda i: (0 if flagged[i] else 2 if ok[i] else 1, i))
    rows = []
    for i in order:
        r, t = frame.iloc[i], table.iloc[i]
        eyes = ""
        if ok[i]:
            found = _row_eye_findings(r, eye_thr) if eye_thr is not None else {}
            for eye in EYES:
                thumb = files_dir / f"{_safe(r.ID)}_{eye}.jpg"
                save_image(network_view(t[f"{eye}_prepared"], thumb_px), thumb)
                eyes += _img(thumb.relative_to(out_dir).as_posix(), eye, thumb_px, found.get(eye))
        probs = [r[f"p_{c}"] for c in CLASSES]
        cells = [f"<td class=on>{_num(v)}</td>" if v is not None and v > t else f"<td>{_num(v)}</td>"
                 for v, t in zip(probs, thr)]
        maps = "".join(_img(src, cap, thumb_px) for src, cap in heatmaps.get(str(r.ID), []))
        kind = " flag" if flagged[i] else "" if ok[i] else " bad"
        rows.append(f"<tr id='patient-{_e(r.ID)}'><td class=l>{_e(r.ID)}</td><td class='l eyes'>{eyes}</td>"
                    + "".join(cells) + f"<td class=l>{_e(r.labels)}</td>"
                    + (f"<td class=l>{_e(r.true_labels)}</td>" if labelled else "")
                    + f"<td class='l{kind}'>{_e(r.status)}</td>"
                    + (f"<td class=l>{maps}</td>" if explain_run else "") + "</tr>")
    untrusted = (scored.get("meta") or {}).get("untrusted") or {}
    header = ["ID", "eyes", *(f"{c} (>{t:.2f})" + (" untrusted" if c in untrusted else "")
                              for c, t in zip(CLASSES, thr)), "predicted",
              *(["true"] if labelled else []), "status",
              *(["Grad-CAM of the predicted classes"] if explain_run else [])]
    n_ok, n_flag = int(ok.sum()), int(flagged.sum())
    pred = frame.loc[ok, [f"pred_{c}" for c in CLASSES]].to_numpy(dtype=np.int64).reshape(-1, len(CLASSES))
    counts = [[_e(c), _e(CLASS_NAMES[c]) + (" (not to be trusted)" if c in untrusted else ""), f"{t:.2f}",
               str(int(pred[:, k].sum())),
               f"{100 * pred[:, k].mean():.0f} %" if n_ok else "n/a",
               *([str(int(table.loc[ok, c].sum()))] if labelled else [])]
              for k, (c, t) in enumerate(zip(CLASSES, thr))]
    quality = (scored.get("meta") or {}).get("quality") or {}
    body = ["<style>td.flag{color:#a35200;font-weight:bold}p.flag{color:#a35200}td.eyes{white-space:nowrap}"
            f"figcaption b.found{{display:block;white-space:normal;max-width:{thumb_px}px}}</style>",
            f"<p class=model>Model {_e(scored.get('model', ''))}: {_e(quality_text(quality))}</p>",
            *untrusted_html((scored.get("meta") or {}).get("untrusted") or {}),
            f"<p><b>{n_ok} of {len(frame)} patients scored</b>"
            + (f"; <b>{len(frame) - n_ok} not scored</b> (their status says why)" if n_ok < len(frame) else "")
            + ".</p>",
            "<h2>Predicted per class</h2>",
            _table(["class", "", "threshold", "predicted positive", "of scored",
                    *(["positive in the sheet"] if labelled else [])], counts, "counts", left_cols=2)]
    if n_flag:
        body.append(f"<p class=flag><b>{n_flag} flagged</b> patient(s): normal (N, no disease) predicted together "
                    "with a disease. Each class has its own threshold, so both can pass; these need a look. They "
                    "are listed first.</p>")
    if scored.get("metrics"):
        body += ["<h2>Metrics</h2>", _folder_metrics(frame, table, thr)]
    body += ["<h2>Patients</h2>",
             "<p>Flagged patients first, then those not scored, then the rest; probabilities above the model's "
             "threshold are highlighted.</p>",
             *(["<p id=eye-note>Under each photograph: that eye's findings (the per-eye head, each class above its "
                "per-eye threshold). The predicted labels are the patient head's, the official ones; where the two "
                "differ, the CSV's findings_vs_labels says how.</p>"] if eye_thr is not None else []),
             "<table id=patients><tr>" + "".join(f"<th class=l>{_e(h)}</th>" for h in header) + "</tr>"
             + "\n".join(rows) + "</table>"]
    return _write_page(out_dir / "index.html", _page(title or "scored folder", body))


def _row_eye_findings(r, eye_thresholds) -> dict[str, str]:
    """{"left": "normal", "right": "diabetes, cataract"} from a predictions row's left_p_* and right_p_*."""
    probs = np.array([[float(r[f"{eye}_p_{c}"]) for c in CLASSES] for eye in EYES])  # (2, K)
    return eye_findings(probs > np.asarray(eye_thresholds))


def _safe(pid) -> str:
    """A patient ID as a file-name part, unique per ID: the ID with other characters than letters, digits, - and _
    replaced, then a short hash of the ID itself (`7 x`, `7.x` and `7_x` would all read `7_x` otherwise)."""
    text = str(pid)
    digest = hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:80] + "-" + digest


def _folder_metrics(frame, table, thr) -> str:
    """Metric tables of a labelled folder: multi-label at the tuned thresholds and at 0.5, and the ODIR score."""
    ok = frame["status"].map(is_scored).to_numpy(dtype=bool)
    y = table.loc[ok, list(CLASSES)].to_numpy(dtype=np.int64)
    p = frame.loc[ok, [f"p_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    ev = evaluate(y, p, thr)
    rows = [[label, *(_num(m[k]) for k in ("f1_micro", "f1_macro", "auc_macro")), *(_num(m["f1"][c]) for c in CLASSES)]
            for label, m in (("tuned thresholds", ev["tuned"]), ("threshold 0.5", ev["at_0.5"]))]
    out = _table(["", "F1 micro", "F1 macro", "AUC macro", *(f"F1 {c}" for c in CLASSES)], rows, "metrics")
    table = classification_table(y, p, thr)
    out += "<p>Per class at the model's thresholds (support: positive patients):</p>" + _table(
        ["", "precision", "recall", "specificity", "F1", "support"],
        [[_e(row), *(_num(v[k]) for k in ("precision", "recall", "specificity", "f1")), str(v["support"])]
         for row, v in table.items()], "classification", left_cols=1)
    if ev["odir"] is None:
        return out + f"<p>official ODIR-2019 score: not defined on these labels ({_e(ev['odir_undefined'])})</p>"
    return out + _table(["official ODIR-2019 score (0.5)", "kappa", "F1", "AUC", "final"],
                        [["model", *(_num(ev["odir"][k]) for k in ("kappa", "f1", "auc", "final"))]], "odir")


def load_explainer(run, error=ValueError) -> Explainer:
    """score.py --explain RUN: the run's best.pt, checked (a damaged file is `error` naming it, raised before any
    scoring rather than after the CSV is written)."""
    from odir_dual.training.checkpoint import CheckpointError  # optional: torch

    try:
        return Explainer(run)
    except CheckpointError as e:
        raise error(f"--explain {printable(run)}: {one_line(e)}") from None


def check_same_model(explainer: Explainer, meta: dict, model_path, error=ValueError) -> None:
    """The heatmaps must explain the model that scored: the checkpoint's weights digest against the one export.py
    wrote into the ONNX metadata. Another model is `error`; an ONNX file from before the digest was written cannot
    be compared, which is said loudly (the page names it too)."""
    exported = meta["raw"].get("weights_digest")
    if exported is None:
        print(f"WARNING: --explain: {printable(model_path)} does not record which weights it was exported from (an "
              "older export); the heatmaps may explain another model than the one that scored. Export again to "
              "check.", file=sys.stderr)
    elif exported != explainer.digest:
        raise error(f"--explain: {printable(explainer.path)} (weights {explainer.digest}) is not the model that "
                    f"scores, {printable(model_path)} (exported from weights {exported}): the heatmaps would explain "
                    "another model; give --explain the run the ONNX file was exported from, or export this run")


def _folder_heatmaps(frame, table, files_dir: Path, out_dir: Path, run) -> dict[str, list[tuple[str, str]]]:
    """id → [(relative PNG path, caption)]: Grad-CAM of the predicted classes (else the most probable), both eyes."""
    ok = np.flatnonzero(frame["status"].map(is_scored).to_numpy(dtype=bool))
    if not len(ok):
        return {}
    explainer = run if isinstance(run, Explainer) else Explainer(run)
    wanted = []
    for i in ok:
        p = np.array([frame[f"p_{c}"].iloc[i] for c in CLASSES], np.float64)
        pred = [k for k, c in enumerate(CLASSES) if frame[f"pred_{c}"].iloc[i] == 1]
        wanted.append(pred or [int(np.argmax(p))])
    items = explainer.explain(list(table["left_prepared"].iloc[ok]), list(table["right_prepared"].iloc[ok]), wanted)
    out = {}
    for i, item in zip(ok, items):
        pid = str(frame["ID"].iloc[i])
        item["attention"] = {}  # the folder page shows Grad-CAM only; attention maps are in the run report
        files = write_heatmaps(item, files_dir, f"{_safe(pid)}_cam", out_dir)
        out[pid] = [(src, f"{eye} · {what}") for (eye, what), src in sorted(files.items()) if what != "image"]
    return out
