"""Frechet distance between Gaussians fitted to feature sets (the FID formula).

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

The trace of the matrix square root is computed stably in float64 from the eigenvalues of the
symmetric matrix S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2 and never produces
complex values (scipy's sqrtm can, for nearly singular covariances).
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, like the FID reference code) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(d, 0.0))
