"""Sampling throughput: time the real sampling loop (denoiser + scheduler step) of a model."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
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


def _autocast(backend: str, device: torch.device):
    """bf16 rows: the FP model under ``torch.autocast(device, dtype=torch.bfloat16)`` (no calibration)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if backend == "bf16" else nullcontext()


def time_sampling(model: DiffusionModel, batch: int = 16, steps: int = 10, guidance: float = 1.0,
                  repeats: int = 3, warmup: int = 1, bf16: bool = False) -> dict[str, Any]:
    """Median wall time of ``repeats`` sampling runs (after ``warmup`` untimed ones) and images/second;
    ``bf16``: under bf16 autocast."""
    if batch < 1 or steps < 1 or repeats < 1:
        raise PtqdError(f"batch, steps and repeats must be at least 1 (got {batch}, {steps}, {repeats})")
    device = _device(model)
    ctx = _autocast("bf16" if bf16 else "fp32", device)
    with ctx:
        for _ in range(warmup):
            sampling_loop(model, batch, steps, guidance)
    times = []
    for _ in range(repeats):
        _sync(device)
        with ctx:
            t0 = time.perf_counter()
            sampling_loop(model, batch, steps, guidance)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return _row(batch, steps, times, device)


def _row(batch: int, steps: int, times: list[float], device: torch.device) -> dict[str, Any]:
    med = statistics.median(times)
    return {"batch": batch, "steps": steps, "seconds": [round(t, 4) for t in times], "median_s": round(med, 4),
            "images_per_second": round(batch / med, 3), "threads": torch.get_num_threads(), "device": str(device)}


def measure_speed(fp_model: DiffusionModel | str, checkpoint: str | Path, batch: int = 16, steps: int = 10,
                  repeats: int = 3, guidance: float | None = None, backends: tuple[str, ...] = ("fp32", "bf16", "int"),
                  device: str = "cpu") -> dict[str, Any]:
    """Sampling throughput of the FP model and of an exported checkpoint on its backends, interleaved
    (each repeat times every backend once, so a change of load on a shared machine hits all alike).

    ``backends``: any of ``fp32`` (``fp_model``), ``bf16`` (``fp_model`` under bf16 autocast, the free
    baseline), ``int`` (integer kernels) and ``fake`` (the simulated quantized model). Returns
    ``{"rows": {backend: {..., "median_s", "images_per_second"}}, "speedup": {backend: ratio to fp32},
    "speedup_vs_bf16": ..., "settings": ...}``.
    """
    from ptqd.models import load
    from ptqd.runtime.checkpoint import load_checkpoint

    unknown = [b for b in backends if b not in ("fp32", "bf16", "int", "fake")]
    if unknown:
        raise PtqdError(f"unknown backends {unknown}: use fp32, bf16, int, fake")
    if batch < 1 or steps < 1 or repeats < 1:
        raise PtqdError(f"batch, steps and repeats must be at least 1 (got {batch}, {steps}, {repeats})")
    models, fp = {}, None
    for b in backends:
        if b in ("fp32", "bf16"):
            fp = fp or (load(fp_model) if isinstance(fp_model, str) else fp_model)
            models[b] = fp
        else:
            models[b] = load_checkpoint(checkpoint, backend=b).model
        models[b].to(device)
    dev = torch.device(device)
    times: dict[str, list[float]] = {b: [] for b in models}
    gs = {b: guidance if guidance is not None else (3.0 if m.conditional else 1.0) for b, m in models.items()}
    for b, m in models.items():  # warm-up: first calls, prepacked weights
        with _autocast(b, dev):
            sampling_loop(m, batch, steps, gs[b])
    for _ in range(repeats):
        for b, m in models.items():
            _sync(dev)
            with _autocast(b, dev):
                t0 = time.perf_counter()
                sampling_loop(m, batch, steps, gs[b])
                _sync(dev)
                times[b].append(time.perf_counter() - t0)
    rows = {b: _row(batch, steps, t, dev) for b, t in times.items()}
    speedup, vs_bf16 = {}, {}
    for b, r in rows.items():
        if "fp32" in rows:
            speedup[b] = round(r["images_per_second"] / rows["fp32"]["images_per_second"], 3)
        if "bf16" in rows:
            vs_bf16[b] = round(r["images_per_second"] / rows["bf16"]["images_per_second"], 3)
    return {"rows": rows, "speedup": speedup, "speedup_vs_bf16": vs_bf16,
            "settings": {"batch": batch, "steps": steps, "repeats": repeats, "device": device, "interleaved": True}}


def cpu_description() -> dict[str, Any]:
    """The CPU model name, the SIMD flags that decide the integer kernels and the kernel ISA chosen from them
    (recorded beside every speed number: machines differ)."""
    import os
    import platform

    from ptqd.runtime.kernels import cpu_features

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "ssse3"))]
    return {"model": model, "simd_flags": sorted(keep), "isa": cpu_features(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}

