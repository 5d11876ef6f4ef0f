"""Dual-eye ODIR-5K model, its factory, loss and metrics; no prints. The class list lives in `pipeline.constants`.

The network, its factory and the loss (torch, timm) are imported on first use, so that `model.metrics` (numpy only) works in the
light scoring install, which has no torch.
"""
import importlib

from odir_dual.model.metrics import evaluate, multilabel_metrics, odir_score, tune_thresholds
from odir_dual.pipeline.constants import CLASSES

_LAZY = {"build_model": "factory", "DualEyeNet": "net", "DualEyeEnsemble": "net", "networks": "net",
         "backbone_norm": "net", "count_parameters": "net",
         "focal_loss": "loss", "hybrid_loss": "loss", "pos_weights_from_labels": "loss"}


def __getattr__(name: str):
    """`from odir_dual.model import DualEyeNet` imports model.net (and torch) only then (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)

__all__ = ["CLASSES", "DualEyeEnsemble", "DualEyeNet", "backbone_norm", "build_model", "count_parameters", "evaluate",
           "focal_loss", "hybrid_loss", "multilabel_metrics", "networks", "odir_score", "pos_weights_from_labels",
           "tune_thresholds"]
