"""Which classes of a trained model are not to be trusted, decided once from its report.json, and the line every
reader prints for them (train.py's final report, report.html, MODEL_CARD.md, the ONNX metadata, score.py's folder
report and flags, serve.py). numpy only: the light scoring install has it.

    untrusted = untrusted_classes(report)   # {"O": "no better than chance on this model's test patients (AUC ...)"}
    for line in untrusted_lines(untrusted): print(line)
"""
from __future__ import annotations

import math

CHANCE_AUC = 0.5  # a class whose AUC interval includes this ranks patients no better than a coin
MOST_POSITIVE = 0.8  # a threshold that calls more than this share of patients positive flags nearly everyone
NOT_USED = "its column is shown but not used for flags"


def untrusted_classes(report: dict, classes=None) -> dict[str, str]:
    """Class → why it is not to be trusted, from report.json's splits ("test" first, then "validation"):

    - its AUC's 95 % bootstrap interval includes 0.5, or lies below it (no better than chance on that split's
      patients), or
    - its tuned threshold calls more than 80 % of that split's patients positive.

    A class can fail on one split only: each split is small, and the test split is the honest one. Reports without
    intervals or per-class rates (runs from before they existed) are judged on what they have.
    """
    out: dict[str, str] = {}
    for split in ("test", "validation"):
        r = report.get(split) or {}
        aucs = (r.get("at_0.5") or {}).get("auc") or {}
        intervals = (((r.get("ci95") or {}).get("at_0.5") or {}).get("auc")) or {}
        rates = r.get("per_class") or {}
        for c in classes or aucs:
            if c in out:
                continue
            auc, ci = aucs.get(c), intervals.get(c)
            if ci and _finite(auc) and ci[0] <= CHANCE_AUC:  # the interval includes chance, or lies below it
                out[c] = (f"no better than chance on this model's {split} patients (AUC {auc:.2f} "
                          f"[{ci[0]:.2f}, {ci[1]:.2f}])")
                continue
            called = positive_rate(rates, c)
            if called is not None and called > MOST_POSITIVE:
                out[c] = f"its threshold calls {called:.0%} of this model's {split} patients positive"
    order = list(classes or report.get("thresholds") or out)
    return {c: out[c] for c in sorted(out, key=lambda c: order.index(c) if c in order else len(order))}


def positive_rate(per_class: dict, c: str) -> float | None:
    """Share of patients the tuned threshold calls positive, from report.json's per-class rates: sensitivity x
    prevalence + (1 - specificity) x (1 - prevalence); None when not recorded."""
    prev = (per_class.get("prevalence") or {}).get(c)
    sens = (per_class.get("sensitivity") or {}).get(c)
    spec = (per_class.get("specificity") or {}).get(c)
    if not _finite(prev):
        return None
    called = 0.0
    if prev > 0:
        if not _finite(sens):
            return None
        called += sens * prev
    if prev < 1:
        if not _finite(spec):
            return None
        called += (1 - spec) * (1 - prev)
    return called


def untrusted_lines(untrusted: dict[str, str]) -> list[str]:
    """One line per untrusted class: "O: no better than chance on ...; its column is shown but not used for flags"."""
    return [f"{c}: {why}; {NOT_USED}" for c, why in untrusted.items()]


def epochs_text(report: dict) -> str | None:
    """How far training went, from report.json's "epochs": "15 of 15", "stopped at epoch 7 of 15
    (--stop-after-steps)"; None for reports from before it was recorded."""
    e = report.get("epochs")
    if not e:
        return None
    if e.get("stopped_by"):
        return f"stopped at epoch {e['reached']} of {e['of']} ({e['stopped_by']})"
    return f"{e['reached']} of {e['of']}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def model_quality(report: dict | None) -> dict:
    """What a user of the exported model should see beside its predictions (export.py puts it in the ONNX
    metadata; score.py's folder report and serve.py show it): the test split's official final, kappa and AUC macro
    with their 95 % intervals (validation's when there is no test split), how far training went, the image size, the
    training data, and the untrusted classes. {} without a report.json of this checkpoint."""
    if not report:
        return {}
    split = "test" if "test" in report else "validation"
    r, cfg = report.get(split) or {}, report.get("config") or {}
    ci = r.get("ci95") or {}

    def fig(value, *path):
        bounds = ci
        for key in path:
            bounds = (bounds or {}).get(key)
        return {"value": value, "ci95": bounds}

    odir, at_half = r.get("odir") or {}, r.get("at_0.5") or {}
    return {"split": split, "patients": r.get("patients"),
            "final": fig(odir.get("final"), "odir", "final"), "kappa": fig(odir.get("kappa"), "odir", "kappa"),
            "auc_macro": fig(at_half.get("auc_macro"), "at_0.5", "auc_macro"),
            "epochs": epochs_text(report) or cfg.get("epochs"), "best_epoch": report.get("best_epoch"),
            "img_px": cfg.get("img_px"), "data": (report.get("data") or {}).get("folder", cfg.get("data")),
            "counts": report.get("counts"),
            "untrusted": untrusted_classes(report, list(report.get("thresholds") or []))}


def quality_text(quality: dict) -> str:
    """One line from `model_quality`: "test (90 patients): official final 0.59 [0.54, 0.65] · kappa ... · AUC macro
    ... · epochs 15 of 15 · 128 px · trained on DATA (train 420)"."""
    if not quality.get("split"):
        return "no report.json of this checkpoint: its test figures are unknown"

    def fig(name):
        f = quality.get(name) or {}
        v, ci = f.get("value"), f.get("ci95")
        return "n/a" if not _finite(v) else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    train = (quality.get("counts") or {}).get("train")
    return (f"{quality['split']} ({quality.get('patients')} patients): official final {fig('final')} · kappa "
            f"{fig('kappa')} · AUC macro {fig('auc_macro')} · epochs {quality.get('epochs')} · "
            f"{quality.get('img_px')} px · trained on {quality.get('data')}"
            + (f" ({train} patients)" if train else ""))
