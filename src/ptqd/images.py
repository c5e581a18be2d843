"""Conversions between model tensors and uint8 images, and image grids.

Model space is float in [-1, 1], channels first (N, C, H, W). Image space is uint8 in [0, 255],
channels last (N, H, W, C). These two functions are the only place the mapping lives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Map model output in [-1, 1] (N, C, H, W) to uint8 images (N, H, W, C): -1 -> 0, 1 -> 255."""
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """Map uint8 images (N, H, W, C) to float tensors in [-1, 1] (N, C, H, W)."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def save_grid(
    images: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    ncols: int = 10,
    title: str | None = None,
) -> Path:
    """Save up to ``ncols * ncols`` uint8 images (N, H, W, C) as a PNG grid, labelled when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptqd.io import atomic_path

    n = min(len(images), ncols * ncols)
    nrows = max(1, (n + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.9, nrows * 1.0 + (0.4 if title else 0)))
    axes = np.atleast_2d(axes)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        if labels is not None:
            ax.set_title(str(int(labels[i])), fontsize=8, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
