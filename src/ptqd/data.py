"""The bundled training data: scikit-learn's handwritten digits, upsampled to 16x16.

Everything here is deterministic: the same split and the same pixels on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    """Digits as uint8 images (N, 16, 16, 1) and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def _upsample(raw: np.ndarray) -> np.ndarray:
    """8x8 digits with values 0..16 -> 16x16 uint8 images (N, 16, 16, 1)."""
    x = torch.from_numpy(raw.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def load_digits(split: str = "all") -> Digits:
    """Load the digits as 16x16 uint8 images.

    ``split`` is ``"all"`` (1797 images), ``"train"`` or ``"test"`` (a fixed stratified 80/20 split,
    the one the bundled classifier was trained and evaluated on).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    images = _upsample(raw.data)
    labels = raw.target.astype(np.int64)
    if split == "all":
        return Digits(images, labels)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'all', 'train' or 'test'")
    test_idx = _test_indices(labels)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    if split == "train":
        mask = ~mask
    return Digits(images[mask], labels[mask])


def _test_indices(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SPLIT_SEED)
    picked = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * TEST_FRACTION))
        picked.append(rng.permutation(idx)[:n_test])
    return np.sort(np.concatenate(picked))
