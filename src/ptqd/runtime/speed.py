"""Sampling throughput: time the real sampling loop (denoiser + scheduler step) of a model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.sampling import SamplerConfig, trajectories


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: DiffusionModel) -> torch.device:
    p = next(model.unet.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sampling_loop(model: DiffusionModel, batch: int, steps: int, guidance: float = 1.0, seed: int = 0) -> torch.Tensor:
    """One DDIM (eta 0) sampling run of ``batch`` images through ptqd's sampling loop, without saving."""
    labels = (np.arange(batch) % model.num_classes) if model.conditional else None
    config = SamplerConfig("ddim", steps, 0.0, guidance if model.conditional else 1.0, seed, batch)
    return trajectories(model, range(batch), config, labels)


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
