"""Dual-eye ODIR-5K model, loss and metrics; no I/O. The class list lives in `pipeline.constants`."""
from model.loss import focal_loss, hybrid_loss, pos_weights_from_labels
from model.metrics import multilabel_metrics, odir_score, tune_thresholds
from model.net import DualEyeNet, backbone_norm, count_parameters
from pipeline.constants import CLASSES

__all__ = ["CLASSES", "DualEyeNet", "backbone_norm", "count_parameters", "focal_loss", "hybrid_loss",
           "multilabel_metrics", "odir_score", "pos_weights_from_labels", "tune_thresholds"]
