"""Dual-eye ODIR-5K model, loss and metrics; no I/O. The class list lives in `pipeline.constants`.

The network and the loss (torch, timm) are imported on first use, so that `model.metrics` (numpy only) works in the
light scoring install, which has no torch.
"""
from model.metrics import multilabel_metrics, odir_score, tune_thresholds
from pipeline.constants import CLASSES

_LAZY = {"DualEyeNet": "model.net", "DualEyeEnsemble": "model.net", "networks": "model.net",
         "backbone_norm": "model.net", "count_parameters": "model.net",
         "focal_loss": "model.loss", "hybrid_loss": "model.loss", "pos_weights_from_labels": "model.loss"}


def __getattr__(name: str):
    """`from model import DualEyeNet` imports model.net (and torch) only then (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)

__all__ = ["CLASSES", "DualEyeEnsemble", "DualEyeNet", "backbone_norm", "count_parameters", "focal_loss", "hybrid_loss",
           "multilabel_metrics", "networks", "odir_score", "pos_weights_from_labels", "tune_thresholds"]
