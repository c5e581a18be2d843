"""Offline sample-quality metrics on the bundled digit classifier's features."""

from ptqd.metrics.evaluate import METRIC_KEYS, evaluate, format_table
from ptqd.metrics.frechet import feature_stats, frechet_distance
from ptqd.metrics.quality import inception_score, label_accuracy, precision_recall
from ptqd.metrics.reference import compute_reference, load_reference, save_reference

__all__ = [
    "METRIC_KEYS",
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
