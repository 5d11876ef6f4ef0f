"""What a person can look at to judge a model or a patient: heatmap overlays and HTML reports.

    write_run_report(run_dir)                      runs/NAME/report.html (+ report_files/): data, config, curves,
                                                   validation/test tables, ROC/PR, confusion counts, reliability,
                                                   thresholds, a gallery of test patients with their heatmaps
    write_folder_report(scored, out_dir, ...)      DIR/index.html (+ files/): one row per scored patient
                                                   (`python score.py MODEL FOLDER --report DIR [--explain RUN]`)

Both pages are plain HTML with a little inline CSS, no JavaScript; every image is a file beside the page, referenced
by a relative path, so the folder can be copied and opened offline (`xdg-open runs/NAME/report.html`).
Heatmaps (model/explain.py) need the PyTorch checkpoint (`best.pt`): ONNX has no gradients. They are drawn on the
image the network saw: the prepared copy squashed to img_px x img_px.
Over ~400 lines: two pages with their plots and the gallery picks; the heatmap arithmetic is model/explain.py.
"""
from __future__ import annotations

import csv
import html
import json
import time
from pathlib import Path

import numpy as np

from pipeline.constants import CLASSES
from pipeline.host import atomic_write

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;font-size:13px}th{background:#f3f3f3}
td.l,th.l{text-align:left}td.on{background:#ffd9a0;font-weight:bold}td.bad{color:#b00}img{display:block}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px}h2{margin-top:1.5em}"""
GALLERY_SIZE = 2  # patients per class in the run report's gallery: the most confident correct and wrong


# ----------------------------------------------------------------------------------------------- images


def network_view(path, img_px: int) -> np.ndarray:
    """The prepared image as the network sees it before normalisation: squashed to (img_px, img_px), uint8 RGB.
    (PIL's antialiased bilinear, like the reference loader; DALI's resize differs by a grey level or two.)"""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((img_px, img_px), Image.BILINEAR))


def model_input(views: list[np.ndarray], mean, std):
    """(B, 3, H, W) float32 tensor from uint8 (H, W, 3) views, normalised with the model's mean/std (0-1 units)."""
    import torch

    x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def overlay(view: np.ndarray, heat, alpha: float = 0.45) -> np.ndarray:
    """A heatmap in [0, 1] (H, W) blended over a uint8 (H, W, 3) image with the 'jet' colour map."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](np.asarray(heat, np.float32))[..., :3]  # (H, W, 3) in 0..1
    return np.clip((1 - alpha) * view + alpha * 255 * colours, 0, 255).astype(np.uint8)


def save_image(pixels: np.ndarray, path: Path) -> None:
    """uint8 RGB → PNG or JPEG (by suffix). Not fsynced, unlike the pages (written atomically, last): a report has
    a thousand of these, and an image cut short by a crash is redrawn by the next report."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)


class Explainer:
    """A run's best.pt, ready to explain prepared image pairs (CPU, fp32, eval mode). Its probabilities are
    calibrated as training calibrated them (the ones its thresholds apply to)."""

    def __init__(self, run):
        from checkpoint import model_from_checkpoint, read_checkpoint

        ckpt = read_checkpoint(run)
        self.model = model_from_checkpoint(ckpt, run)
        self.img_px, self.mean, self.std = int(ckpt["img_px"]), ckpt["mean"], ckpt["std"]
        self.config, self.thresholds = ckpt["config"], [float(t) for t in ckpt["thresholds"]]
        self.calibration = ckpt.get("calibration")
        self.commit = ckpt.get("commit", "")

    def explain(self, left_paths, right_paths, classes, batch_size: int = 16) -> list[dict]:
        """Per pair: views (left, right uint8), probs (K,), cams {class index: (left, right) (H, W)}, attention
        {"left_to_right": map over the right eye, "right_to_left": over the left eye}.

        Args:
            classes: per pair, the class indices to explain (Grad-CAM costs one backward pass per class and batch).
        """
        from model.calibration import apply_calibration
        from model.explain import explain_pair

        out = []
        for s in range(0, len(left_paths), batch_size):
            views = [(network_view(lp, self.img_px), network_view(rp, self.img_px))
                     for lp, rp in zip(left_paths[s:s + batch_size], right_paths[s:s + batch_size])]
            wanted = [list(c) for c in classes[s:s + batch_size]]
            ex = explain_pair(self.model, model_input([v[0] for v in views], self.mean, self.std),
                              model_input([v[1] for v in views], self.mean, self.std),
                              classes=sorted({k for c in wanted for k in c}))
            probs = apply_calibration(ex.logits.numpy(), self.calibration)  # (B, K)
            for i, (view, ks) in enumerate(zip(views, wanted)):
                out.append({"views": view, "probs": probs[i],
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


def _img(src: str, caption: str = "", width: int | None = None) -> str:
    w = f" width={width}" if width else ""
    return f"<figure><img src='{_e(src)}'{w} alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_page(path: Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return path


def _metric_rows(split: dict) -> list[list[str]]:
    """Model at tuned thresholds / at 0.5 and the trivial predictor: F1 micro, F1 macro, AUC macro, per-class F1."""
    rows = []
    for label, m in (("model, tuned thresholds", split.get("tuned")), ("model, threshold 0.5", split.get("at_0.5")),
                     ("trivial (training prevalence), 0.5", split.get("trivial", {}).get("at_0.5"))):
        if m:
            rows.append([_e(label), _num(m["f1_micro"]), _num(m["f1_macro"]), _num(m["auc_macro"]),
                         *(_num(m["f1"][c]) for c in CLASSES)])
    return rows


def _split_section(name: str, split: dict) -> list[str]:
    """The tables of one split of report.json."""
    key = name.lower()
    out = [f"<h2>{_e(name)} ({split['patients']} patients)</h2>",
           _table(["", "F1 micro", "F1 macro", "AUC macro", *(f"F1 {c}" for c in CLASSES)], _metric_rows(split),
                  f"{key}-metrics")]
    odir = [["model", *(_num(split["odir"][k]) for k in ("kappa", "f1", "auc", "final"))]]
    if split.get("trivial", {}).get("odir"):
        odir.append(["trivial", *(_num(split["trivial"]["odir"][k]) for k in ("kappa", "f1", "auc", "final"))])
    out.append(_table(["official ODIR-2019 score (0.5)", "kappa", "F1", "AUC", "final"], odir, f"{key}-odir"))
    auc = split.get("tuned", split.get("at_0.5", {})).get("auc", {})
    if auc:
        out.append(_table(["", *(f"AUC {c}" for c in CLASSES)], [["model", *(_num(auc[c]) for c in CLASSES)]],
                          f"{key}-auc"))
    cal = split.get("calibration_error")
    if cal:
        out.append(_table(["calibration", "ECE before", "ECE after", "Brier before", "Brier after"],
                          [["", *(_num(cal.get(k), 4) for k in ("ece_before", "ece_after", "brier_before",
                                                                 "brier_after"))]], f"{key}-calibration"))
    return out


# ----------------------------------------------------------------------------------------------- run report


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """RUN/predictions_{val,test}.csv → (ids, y (N, 8) int, p (N, 8) float)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["id", *CLASSES, *(f"p_{c}" for c in CLASSES)]
    if rows and (absent := [c for c in need if c not in rows[0]]):
        raise ValueError(f"{path}: missing column(s) {', '.join(absent)}")
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


def _plot_curves(y, p, out: Path) -> None:
    """ROC and precision-recall per class, side by side (classes with one label value in the split are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, c in enumerate(CLASSES):
        if np.unique(y[:, k]).size < 2:
            continue
        fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
        a.plot(fpr, tpr, label=f"{c} AUC {roc_auc_score(y[:, k], p[:, k]):.3f}")
        prec, rec, _ = precision_recall_curve(y[:, k], p[:, k])
        b.plot(rec, prec, label=f"{c} AP {average_precision_score(y[:, k], p[:, k]):.3f}")
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per class")
    b.set(xlabel="recall", ylabel="precision", title="precision-recall per class", ylim=(0, 1.02))
    a.legend(fontsize=8), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _plot_reliability(y, p, out: Path, bins: int = 10) -> None:
    """Observed frequency against predicted probability, all classes pooled, in equal-width bins (bar: count)."""
    import matplotlib

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
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _prepared_pairs(cfg: dict, ids: set[str]) -> dict[str, tuple[str, str]]:
    """id → (left, right) prepared image paths for a few patients of the run's data folder (prepared if needed)."""
    from pipeline.pairs import default_cache, find_pairs, prepare_pairs

    table, _ = find_pairs(cfg["data"])
    table = table[table["id"].astype(str).isin(ids) & (table["status"] == "ok")]
    table = prepare_pairs(table, Path(cfg["cache_dir"]) if cfg.get("cache_dir") else default_cache(),
                          cfg.get("prepare_px") or cfg["img_px"], workers=1, progress=False)
    return {str(r.id): (r.left_prepared, r.right_prepared) for r in table.itertuples() if r.status == "ok"}


def _gallery(run_dir: Path, files_dir: Path, ids, y, p, thresholds) -> list[str]:
    """The gallery section: per class, both eyes with the class's Grad-CAM and the cross-attention maps."""
    picks = gallery_picks(ids, y, p, thresholds)
    if not picks:
        return []
    explainer = Explainer(run_dir)
    paths = _prepared_pairs(explainer.config, {pid for _, _, pid in picks})
    picks = [pk for pk in picks if pk[2] in paths]
    row_of = {pid: i for i, pid in enumerate(ids)}
    items = explainer.explain([paths[pid][0] for _, _, pid in picks], [paths[pid][1] for _, _, pid in picks],
                              [[CLASSES.index(c)] for c, _, _ in picks])
    out = ["<h2>Gallery</h2><p>Per class: the most confident correct and the most confident wrong patient. "
           "Both eyes as the network saw them, the class's Grad-CAM on each eye, and where each eye's tokens "
           "attend in the other eye (cross-attention, averaged over heads and tokens). Red: most weight.</p>"]
    for (c, kind, pid), item in zip(picks, items):
        files = write_heatmaps(item, files_dir, f"gallery_{c}_{kind.split()[-1]}_{pid}", run_dir)
        i = row_of[pid]
        truth = ",".join(k for j, k in enumerate(CLASSES) if y[i, j]) or "none"
        out.append(f"<h3>{_e(c)} · {_e(kind)}: patient {_e(pid)}</h3><p>p({_e(c)}) = {_num(p[i, CLASSES.index(c)])}"
                   f" (threshold {_num(thresholds[CLASSES.index(c)])}) · true labels {_e(truth)}</p><div>"
                   + "".join(_img(files[eye, what], f"{eye} · {label}") for eye in ("left", "right")
                             for what, label in (("image", "image"), (c, f"Grad-CAM {c}"),
                                                 ("attention", "attended by the other eye")))
                   + "</div>")
    return out


def write_run_report(run_dir) -> Path:
    """`RUN/report.html` from report.json, config.json, metrics.csv, curves.png, the predictions CSVs and best.pt.

    Images go to `RUN/report_files/`. The gallery uses the test split (validation when the run has none) and needs
    best.pt and the run's data folder (from config.json) for the prepared images; it is skipped when either is
    missing. Returns the page's path.

    Raises:
        FileNotFoundError: no report.json in run_dir (written by train.py at the end of a run).
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path}: no run report data (train.py writes it at the end of a run)")
    report = json.loads(report_path.read_text())
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else \
        report.get("config", {})
    files_dir = run_dir / "report_files"
    files_dir.mkdir(exist_ok=True)
    thresholds = [float(report["thresholds"][c]) for c in CLASSES]
    body = [_e(f"commit {report.get('commit', '?')} · best epoch {report.get('best_epoch', '?')}"),
            "<h2>Data</h2>", _table(list(report["data"]), [[_e(v) for v in report["data"].values()]], "data")]
    for name in ("Test", "Validation"):
        if name.lower() in report:
            body += _split_section(name, report[name.lower()])
    cal = report.get("calibration", {})
    per_class = [[_e(k), *(_num(v, 3) for v in vals)] for k, vals in cal.items()
                 if isinstance(vals, list) and len(vals) == len(CLASSES)]  # e.g. Platt's a, b
    body += ["<h2>Thresholds and calibration</h2>",
             _table(["", *CLASSES], [["tuned on validation", *(_num(t, 2) for t in thresholds)]], "thresholds"),
             f"<p>Calibration of the probabilities: {_e(cal.get('method', 'none'))}</p>"]
    if per_class:
        body.append(_table(["parameter", *CLASSES], per_class, "calibration"))
    if (run_dir / "curves.png").is_file():
        body += ["<h2>Training curves</h2>", _img("curves.png", "loss and F1 per epoch (metrics.csv)")]
    split = "test" if (run_dir / "predictions_test.csv").is_file() else "val"
    pred_path = run_dir / f"predictions_{split}.csv"
    if pred_path.is_file():
        ids, y, p = read_predictions(pred_path)
        _plot_curves(y, p, files_dir / f"roc_pr_{split}.png")
        _plot_reliability(y, p, files_dir / f"reliability_{split}.png")
        counts = confusion_counts(y, p, thresholds)
        body += [f"<h2>Per class on the {'test' if split == 'test' else 'validation'} split "
                 f"({len(ids)} patients, {pred_path.name})</h2>",
                 _img(f"report_files/roc_pr_{split}.png", "ROC and precision-recall per class"),
                 _img(f"report_files/reliability_{split}.png", "reliability of the calibrated probabilities"),
                 "<h3>Confusion counts at the tuned thresholds</h3>",
                 _table(["class", "threshold", "TP", "FP", "FN", "TN"],
                        [[c, _num(t, 2), *(str(counts[c][k]) for k in ("TP", "FP", "FN", "TN"))]
                         for c, t in zip(CLASSES, thresholds)], "confusion")]
        if (run_dir / "best.pt").is_file() and cfg.get("data"):
            body += _gallery(run_dir, files_dir, ids, y, p, thresholds)
    body += ["<h2>Config</h2>", _table(["field", "value"], [[_e(k), _e(v)] for k, v in cfg.items()], "config",
                                      left_cols=2)]
    body.append(f"<p>written in {time.perf_counter() - t0:.1f} s</p>")
    return _write_page(run_dir / "report.html", _page(f"run {report.get('run', run_dir.name)}", body))


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
    from pipeline.constants import CLASS_NAMES

    out_dir = Path(out_dir)
    files_dir = out_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    frame, table = scored["frame"], scored["table"]
    thr = [float(t) for t in thresholds]
    labelled = "true_labels" in frame.columns
    status = frame["status"].astype(str)
    flagged = status.str.startswith("ok; ").to_numpy()
    ok = (status == "ok").to_numpy() | flagged
    heatmaps = _folder_heatmaps(frame, table, files_dir, out_dir, explain_run) if explain_run else {}
    order = sorted(range(len(frame)), key=lambda i: (0 if flagged[i] else 2 if ok[i] else 1, i))
    rows = []
    for i in order:
        r, t = frame.iloc[i], table.iloc[i]
        eyes = ""
        if ok[i]:
            for eye in ("left", "right"):
                thumb = files_dir / f"{_safe(r.ID)}_{eye}.jpg"
                save_image(network_view(t[f"{eye}_prepared"], thumb_px), thumb)
                eyes += _img(thumb.relative_to(out_dir).as_posix(), eye, thumb_px)
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
    header = ["ID", "eyes", *(f"{c} (>{t:.2f})" for c, t in zip(CLASSES, thr)), "predicted",
              *(["true"] if labelled else []), "status", *(["Grad-CAM of the predicted classes"] if explain_run else [])]
    n_ok, n_flag = int(ok.sum()), int(flagged.sum())
    pred = frame.loc[ok, [f"pred_{c}" for c in CLASSES]].to_numpy(dtype=np.int64).reshape(-1, len(CLASSES))
    counts = [[_e(c), _e(CLASS_NAMES[c]), f"{t:.2f}", str(int(pred[:, k].sum())),
               f"{100 * pred[:, k].mean():.0f} %" if n_ok else "n/a",
               *([str(int(table.loc[ok, c].sum()))] if labelled else [])]
              for k, (c, t) in enumerate(zip(CLASSES, thr))]
    body = ["<style>td.flag{color:#a35200;font-weight:bold}p.flag{color:#a35200}td.eyes{white-space:nowrap}</style>",
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
             "<table id=patients><tr>" + "".join(f"<th class=l>{_e(h)}</th>" for h in header) + "</tr>"
             + "\n".join(rows) + "</table>"]
    return _write_page(out_dir / "index.html", _page(title or "scored folder", body))


def _safe(pid) -> str:
    """A patient ID as a file-name part."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(pid))


def _folder_metrics(frame, table, thr) -> str:
    """Metric tables of a labelled folder: multi-label at the tuned thresholds and at 0.5, and the ODIR score."""
    from model import multilabel_metrics, odir_score

    status = frame["status"].astype(str)
    ok = ((status == "ok") | status.str.startswith("ok; ")).to_numpy()
    y = table.loc[ok, list(CLASSES)].to_numpy(dtype=np.int64)
    p = frame.loc[ok, [f"p_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    rows = []
    for label, t in (("tuned thresholds", thr), ("threshold 0.5", 0.5)):
        m = multilabel_metrics(y, p, t)
        rows.append([label, _num(m["f1_micro"]), _num(m["f1_macro"]), _num(m["auc_macro"]),
                     *(_num(m["f1"][c]) for c in CLASSES)])
    out = _table(["", "F1 micro", "F1 macro", "AUC macro", *(f"F1 {c}" for c in CLASSES)], rows, "metrics")
    try:
        o = odir_score(y, p)
        out += _table(["official ODIR-2019 score (0.5)", "kappa", "F1", "AUC", "final"],
                      [["model", *(_num(o[k]) for k in ("kappa", "f1", "auc", "final"))]], "odir")
    except ValueError as e:  # one label value in every cell: AUC undefined
        out += f"<p>official ODIR-2019 score: not defined on these labels ({_e(e)})</p>"
    return out


def _folder_heatmaps(frame, table, files_dir: Path, out_dir: Path, run) -> dict[str, list[tuple[str, str]]]:
    """id → [(relative PNG path, caption)]: Grad-CAM of the predicted classes (else the most probable), both eyes."""
    status = frame["status"].astype(str)
    ok = np.flatnonzero(((status == "ok") | status.str.startswith("ok; ")).to_numpy())
    if not len(ok):
        return {}
    explainer = Explainer(run)
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
