"""Sample-quality metrics of a set of generated digits against reference statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptqd.errors import PtqdError
from ptqd.metrics.classifier import classifier_fingerprint, extract_features, load_classifier
from ptqd.metrics.frechet import feature_stats, frechet_distance
from ptqd.metrics.quality import inception_score, label_accuracy, precision_recall
from ptqd.metrics.reference import Reference, load_reference

METRIC_KEYS = ("fd", "sfd", "is", "precision", "recall", "accuracy", "num_samples")


def evaluate(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    reference: str | Path | Reference = "digits16",
) -> dict[str, Any]:
    """Metrics of uint8 images (N, 16, 16, 1), optionally generated for class ``labels``.

    Keys: ``fd`` (Frechet distance of the classifier's 64-d features), ``sfd`` (the same on an early
    8x8 feature map), ``is`` (Inception Score from the classifier's probabilities; ``is_std`` over 10
    splits), ``precision``/``recall`` (k=3 manifolds), ``accuracy`` (share classified as the requested
    label; None without labels), ``num_samples``, ``reference``.
    """
    if images.ndim != 4 or images.shape[1:] != (16, 16, 1):
        raise PtqdError(
            f"the bundled digit metrics need 16x16 grayscale images (N, 16, 16, 1), got {images.shape}: they fit the "
            "bundled digits models only; for your own model's samples use Inception-feature metrics (FID/sFID/IS against "
            "a reference set of real images of that size), or a reference and feature network made for your images"
        )
    if len(images) < 10:
        raise PtqdError(f"need at least 10 images to estimate the metrics, got {len(images)}")
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    model = load_classifier()
    fp = classifier_fingerprint(model)
    if ref.classifier != fp:
        raise PtqdError(
            f"reference {ref.name!r} was made with classifier {ref.classifier}, but the bundled classifier is {fp}; "
            "rebuild the reference with ptqd.metrics.compute_reference"
        )
    feats = extract_features(images, model)
    if labels is not None:
        n_classes = feats.probs.shape[1]
        bad = sorted({int(v) for v in np.asarray(labels) if not 0 <= int(v) < n_classes})
        if bad:
            raise PtqdError(
                f"the samples' labels {bad[:5]} lie outside the {n_classes} classes (0..{n_classes - 1}) of the bundled digit "
                "classifier; these samples were not made by a bundled digits model"
            )
    mu, sigma = feature_stats(feats.pool)
    smu, ssigma = feature_stats(feats.spatial)
    is_mean, is_std = inception_score(feats.probs)
    precision, recall = precision_recall(ref.pool_features, feats.pool)
    return {
        "fd": frechet_distance(mu, sigma, ref.pool_mu, ref.pool_sigma),
        "sfd": frechet_distance(smu, ssigma, ref.spatial_mu, ref.spatial_sigma),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "accuracy": label_accuracy(feats.probs, labels) if labels is not None else None,
        "num_samples": int(len(images)),
        "reference": ref.name,
    }


LABELS = {  # header and display scale of the columns tables show
    "psnr": ("PSNR to FP dB", 1), "ssim": ("SSIM to FP", 1), "mse": ("MSE to FP ×1e3", 1000),
    "fd_fp": ("FD→FP", 1), "fd_fp_floor": ("floor", 1), "fd_fp_ratio": ("FD→FP / floor", 1),
}
PAIRED_COLUMNS = ["psnr", "ssim", "mse", "fd_fp", "fd_fp_floor", "fd_fp_ratio"]


def format_value(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """One cell: the value (scaled as in ``LABELS``), ``± std`` where the row has ``KEY_std`` for a
    paired metric, ``–`` when missing."""
    v = row.get(key)
    if v is None:
        return "–"
    if key == "psnr" and row.get("identical") is not None and row.get("identical") == row.get("num_pairs"):
        return "= FP (identical)"
    if not isinstance(v, float):
        return str(v)
    scale = LABELS.get(key, (key, 1))[1]
    text = f"{v * scale:.{digits}f}"
    sd = row.get(f"{key}_std")
    if key in PAIRED_COLUMNS and isinstance(sd, float):
        text += f" ± {sd * scale:.{digits}f}"
    return text


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table of metric dicts; the first column is each row's ``name``. Numbers that rest on
    too few samples for what they measure are marked ``*`` and explained below the table
    (:mod:`ptqd.metrics.caveats`)."""
    from ptqd.metrics.caveats import caveats, footnotes

    columns = columns or ["fd", "sfd", "is", "precision", "recall", "accuracy", "num_samples"]
    header = ["", *(LABELS.get(c, (c, 1))[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        flagged = caveats(row, columns)
        cells = [str(row.get("name", ""))]
        for c in columns:
            cells.append(format_value(row, c) + ("*" if c in flagged else ""))
        lines.append("| " + " | ".join(cells) + " |")
    notes = footnotes(rows, columns)
    return "\n".join(lines + ([""] + notes if notes else []))
