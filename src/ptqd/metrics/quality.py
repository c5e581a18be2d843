"""Inception Score, k-NN precision/recall and label accuracy, on classifier outputs."""

from __future__ import annotations

import numpy as np
import torch


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` equal chunks (mean, std), as in the IS code."""
    p = np.asarray(probs, dtype=np.float64)
    splits = max(1, min(splits, len(p)))
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = _pairwise_dist(x, x)
    # the k-th nearest neighbour excluding the point itself (distance 0 at index 0)
    return d.kthvalue(k + 1, dim=1).values


def _coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    d = _pairwise_dist(points, manifold)
    return float((d <= radii.unsqueeze(0)).any(dim=1).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls, k=3 as in the paper.

    Precision: share of generated samples inside the real manifold (union of real k-NN balls).
    Recall: share of real samples inside the generated manifold.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall need more than k={k} samples on each side, got {len(r)} and {len(f)}")
    precision = _coverage(f, r, _knn_radii(r, k))
    recall = _coverage(r, f, _knn_radii(f, k))
    return precision, recall


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples the classifier assigns to the class they were generated for."""
    return float((np.asarray(probs).argmax(axis=1) == np.asarray(labels)).mean())
