"""The demo: sample from the bundled conditional model and measure the samples."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptqd import __version__
from ptqd.images import save_grid
from ptqd.io import write_json
from ptqd.metrics import evaluate, format_table
from ptqd.models import load
from ptqd.sampling import SamplerConfig, sample, save_samples


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Sample digits16-cond (DDIM, eta 1, guidance 3) and evaluate; write everything under ``out``.

    ``quick`` makes a seconds-long version (few samples, few steps) for tests.
    """
    out = Path(out)
    num = 50 if quick else 500
    config = SamplerConfig(scheduler="ddim", steps=10 if quick else 50, eta=1.0, guidance=3.0, seed=seed, batch_size=250)
    model = load("digits16-cond")
    write_json(out / "config.json", {"ptqd": __version__, "model": model.name, "num": num, "quick": quick, **asdict(config)})
    t0 = time.perf_counter()
    samples = sample(model, num, config, progress=progress)
    seconds = time.perf_counter() - t0
    save_samples(samples, out / "samples.npz")
    metrics = evaluate(samples.images, samples.labels)
    metrics["sampling_seconds"] = round(seconds, 2)
    write_json(out / "metrics.json", metrics)
    save_grid(samples.images, out / "samples.png", labels=samples.labels, title=f"{model.name}, FP32, DDIM {config.steps} steps")
    print(format_table([{"name": "FP32", **metrics}], ["fd", "sfd", "is", "precision", "recall", "accuracy", "num_samples", "sampling_seconds"]))
    print(f"wrote {out}/samples.npz, metrics.json, samples.png")
    return metrics
