"""Inception Score, k-NN precision/recall and label accuracy, on classifier outputs."""

from __future__ import annotations

import numpy as np
import torch


def inception_score(probs: np.ndarray, splits: int = 10, split_size: int | None = None) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` equal chunks (mean, std), as in the IS code;
    with ``split_size``, over consecutive chunks of that many samples instead (ADM: 5000)."""
    p = np.asarray(probs, dtype=np.float64)
    if split_size is not None:
        parts = [p[i : i + split_size] for i in range(0, len(p), split_size)]
    else:
        parts = np.array_split(p, max(1, min(splits, len(p))))
    scores = []
    for chunk in parts:
        py = chunk.mean(axis=0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


CHUNK = 1024  # rows of the distance matrix held at once: 50k samples never need the full 50k x 50k matrix


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    # the k-th nearest neighbour excluding the point itself (distance 0 at index 0)
    return torch.cat([torch.cdist(x[i : i + CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), CHUNK)])


def _coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    inside = [
        (torch.cdist(points[i : i + CHUNK], manifold) <= radii.unsqueeze(0)).any(dim=1) for i in range(0, len(points), CHUNK)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls, k=3 as in the paper.

    Precision: share of generated samples inside the real manifold (union of real k-NN balls).
    Recall: share of real samples inside the generated manifold.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall need more than k={k} samples on each side, got {len(r)} and {len(f)}")
    precision = _coverage(f, r, _knn_radii(r, k))
    recall = _coverage(r, f, _knn_radii(f, k))
    return precision, recall


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples the classifier assigns to the class they were generated for."""
    return float((np.asarray(probs).argmax(axis=1) == np.asarray(labels)).mean())
