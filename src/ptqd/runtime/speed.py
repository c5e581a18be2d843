"""Sampling throughput: time the real sampling loop (denoiser + scheduler step) of a model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.sampling import make_scheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: DiffusionModel) -> torch.device:
    p = next(model.unet.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sampling_loop(model: DiffusionModel, batch: int, steps: int, guidance: float = 1.0, seed: int = 0) -> torch.Tensor:
    """One DDIM sampling run of ``batch`` images (what ``ptqd sample`` does per batch, without saving)."""
    device = _device(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.channels, model.image_size, model.image_size, generator=g).to(device)
    y = (torch.arange(batch) % model.num_classes).to(device) if model.conditional else None
    scheduler = make_scheduler(model, "ddim", steps)
    for t in scheduler.timesteps:
        eps = model.denoise(x, t, y, guidance if model.conditional else 1.0)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def time_sampling(model: DiffusionModel, batch: int = 16, steps: int = 10, guidance: float = 1.0,
                  repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median wall time of ``repeats`` sampling runs (after ``warmup`` untimed ones) and images/second."""
    if batch < 1 or steps < 1 or repeats < 1:
        raise PtqdError(f"batch, steps and repeats must be at least 1 (got {batch}, {steps}, {repeats})")
    device = _device(model)
    for _ in range(warmup):
        sampling_loop(model, batch, steps, guidance)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        sampling_loop(model, batch, steps, guidance)
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "steps": steps, "seconds": [round(t, 4) for t in times], "median_s": round(med, 4),
            "images_per_second": round(batch / med, 3), "threads": torch.get_num_threads(), "device": str(device)}


def measure_speed(fp_model: DiffusionModel | str, checkpoint: str | Path, batch: int = 16, steps: int = 10,
                  repeats: int = 3, guidance: float | None = None, backends: tuple[str, ...] = ("fp32", "int"),
                  device: str = "cpu") -> dict[str, Any]:
    """Sampling throughput of the FP model and of an exported checkpoint on its backends.

    ``backends``: any of ``fp32`` (``fp_model``), ``int`` (integer kernels) and ``fake`` (the
    simulated quantized model). Returns ``{"rows": {backend: time_sampling(...)}, "speedup": {backend:
    ratio to fp32}, "settings": ...}``.
    """
    from ptqd.models import load
    from ptqd.runtime.checkpoint import load_checkpoint

    unknown = [b for b in backends if b not in ("fp32", "int", "fake")]
    if unknown:
        raise PtqdError(f"unknown backends {unknown}: use fp32, int, fake")
    rows = {}
    for b in backends:
        if b == "fp32":
            model = load(fp_model) if isinstance(fp_model, str) else fp_model
        else:
            model = load_checkpoint(checkpoint, backend=b).model
        model.to(device)
        g = guidance if guidance is not None else (3.0 if model.conditional else 1.0)
        rows[b] = time_sampling(model, batch, steps, g, repeats)
    speedup = {}
    if "fp32" in rows:
        for b, r in rows.items():
            speedup[b] = round(r["images_per_second"] / rows["fp32"]["images_per_second"], 3)
    return {"rows": rows, "speedup": speedup, "settings": {"batch": batch, "steps": steps, "repeats": repeats, "device": device}}
