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
        _show(ax, images[i])
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


def _show(ax, img: np.ndarray) -> None:
    """One uint8 image (H, W, C) on a matplotlib axis, grayscale when it has one channel."""
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")


def error_maps(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|images − reference| per pixel, largest over channels, in [0, 1] (N, H, W)."""
    d = np.abs(images.astype(np.float64) - reference.astype(np.float64)) / 255.0
    return d.max(axis=-1)


def save_comparison(
    panels: dict[str, np.ndarray],
    path: str | Path,
    labels: np.ndarray | None = None,
    per_class: int = 2,
    title: str | None = None,
    errors_against: str | None = None,
) -> Path:
    """Side-by-side grids, one panel per method, of the same sample indices.

    Samples with the same index share their seed (initial noise, label and step noise), so the panels
    show what each method changed. With ``labels``, ``per_class`` samples of each class are shown
    (rows = classes); otherwise the first 20 samples. With ``errors_against`` (the name of the
    reference panel, e.g. FP), every other panel is followed by its error map |panel − reference|,
    all on one colour scale (stated in the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptqd.io import atomic_path

    first = next(iter(panels.values()))
    if labels is not None:
        classes = sorted(set(int(v) for v in labels))
        idx = [[i for i in np.flatnonzero(labels == c)[:per_class]] for c in classes]
        idx = [row + [None] * (per_class - len(row)) for row in idx]
    else:
        n = min(len(first), 20)
        idx = [[i + j for j in range(per_class) if i + j < n] for i in range(0, n, per_class)]
        idx = [row + [None] * (per_class - len(row)) for row in idx]
    shown: list[tuple[str, np.ndarray, bool]] = []  # name, images or error maps, is an error map
    vmax = None
    if errors_against is not None:
        if errors_against not in panels:
            raise ValueError(f"errors_against={errors_against!r} is not one of the panels {list(panels)}")
        ref = panels[errors_against]
        picked = [i for row in idx for i in row if i is not None]
        errs = {k: error_maps(v, ref) for k, v in panels.items() if k != errors_against}
        vals = np.concatenate([e[picked].ravel() for e in errs.values()]) if errs else np.zeros(1)
        vmax = max(float(np.percentile(vals, 99.5)), 1 / 255)
        for k, v in panels.items():
            shown.append((k, v, False))
            if k in errs:
                shown.append(("|Δ|", errs[k], True))
    else:
        shown = [(k, v, False) for k, v in panels.items()]
    nrows, ncols = len(idx), per_class
    fig, axes = plt.subplots(
        nrows, ncols * len(shown), figsize=(ncols * len(shown) * 0.8 + 0.3 * len(shown), nrows * 0.8 + 0.9),
        squeeze=False,
    )
    for p, (name, images, is_err) in enumerate(shown):
        for r, row in enumerate(idx):
            for c, i in enumerate(row):
                ax = axes[r, p * ncols + c]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if i is None or i >= len(images):
                    continue
                if is_err:
                    ax.imshow(images[i], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
                else:
                    _show(ax, images[i])
                if r == 0 and c == 0:
                    ax.set_title(name, fontsize=7, loc="left", pad=3, rotation=0 if is_err else 20)
    if vmax is not None:
        note = f"error maps |method − {errors_against}|: black 0, white ≥ {vmax:.2f} (pixels in [0, 1])"
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
