"""Dual-eye ODIR-5K model, loss and metrics.

`CLASSES` is defined here, once, for the whole project (the data layer imports it too). Importing this
package is cheap: torch/timm are only imported when a model name below is first used (PEP 562).
"""

# ODIR-5K label columns, in the order of data.xlsx and of every (N, 8) label / logit / probability matrix.
CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")

_LAZY = {
    "DualEyeNet": "net",
    "count_parameters": "net",
    "backbone_norm": "net",
    "pos_weights_from_labels": "loss",
    "focal_loss": "loss",
    "hybrid_loss": "loss",
    "odir_score": "metrics",
    "multilabel_metrics": "metrics",
    "tune_thresholds": "metrics",
}

__all__ = ["CLASSES", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
