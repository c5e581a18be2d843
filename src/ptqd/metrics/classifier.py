"""The bundled digit classifier: the offline stand-in for Inception-v3.

A small CNN trained on the training split of the 16x16 digits (``scripts/train_zoo.py``). Its
penultimate 64-d features play the role of Inception's pool features (Frechet distance, precision,
recall), an early 8x8 feature map the role of the spatial features (sFD), and its class
probabilities feed the Inception Score and the accuracy of conditional samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptqd.errors import PtqdError
from ptqd.images import from_uint8

FEATURE_DIM = 64
SPATIAL_CHANNELS = 4  # first channels of the 8x8 map kept for sFD: 4 * 8 * 8 = 256 dims


class DigitClassifier(nn.Module):
    """CNN: 16x16x1 -> [conv-conv-pool] x2 -> 64-d features -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits, pool features (N, 64), spatial features (N, 256))."""
        h1 = self.block1(x)
        feats = self.head(self.block2(h1))
        spatial = h1[:, :SPATIAL_CHANNELS].flatten(1)
        return self.out(feats), feats, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


@dataclass
class Features:
    """What the classifier sees in a set of images."""

    pool: np.ndarray  # (N, 64) float64
    spatial: np.ndarray  # (N, 256) float64
    probs: np.ndarray  # (N, 10) float64


def classifier_path() -> Path:
    return Path(str(resources.files("ptqd") / "zoo" / "digit_classifier.safetensors"))


_CACHE: dict[str, DigitClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load the bundled classifier (or one at ``path``) in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else classifier_path()
    key = str(path)
    if key not in _CACHE:
        if not path.is_file():
            raise PtqdError(
                f"digit classifier not found at {path}; reinstall ptqd or rerun scripts/train_zoo.py --classifier"
            )
        model = DigitClassifier()
        model.load_state_dict(load_file(str(path)))
        model.eval()
        _CACHE[key] = model
    return _CACHE[key]


def classifier_fingerprint(model: DigitClassifier) -> str:
    """Short hash of the classifier's weights; reference statistics record it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(images: np.ndarray, model: DigitClassifier | None = None, batch_size: int = 500) -> Features:
    """Run the classifier over uint8 images (N, 16, 16, 1)."""
    model = model or load_classifier()
    pools, spatials, probs = [], [], []
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i : i + batch_size])
        logits, feats, spatial = model.forward_all(x)
        pools.append(feats.double().numpy())
        spatials.append(spatial.double().numpy())
        probs.append(torch.softmax(logits.double(), dim=1).numpy())
    return Features(np.concatenate(pools), np.concatenate(spatials), np.concatenate(probs))
