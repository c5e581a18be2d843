"""Sample-quality metrics: offline ones on the bundled digit classifier's features, and the standard
FID/sFID/IS/precision/recall with the FID Inception-v3 (``ptqd.metrics.standard``; weights from a local file)."""

from ptqd.metrics.evaluate import METRIC_KEYS, evaluate, format_table
from ptqd.metrics.frechet import feature_stats, frechet_distance
from ptqd.metrics.quality import inception_score, label_accuracy, precision_recall
from ptqd.metrics.reference import compute_reference, load_reference, save_reference
from ptqd.metrics.inception import load_inception
from ptqd.metrics.standard import build_reference, evaluate_standard

__all__ = [
    "METRIC_KEYS",
    "build_reference",
    "evaluate_standard",
    "load_inception",
    "compute_reference",
    "evaluate",
    "feature_stats",
    "format_table",
    "frechet_distance",
    "inception_score",
    "label_accuracy",
    "load_reference",
    "precision_recall",
    "save_reference",
]
