"""Do integer kernels reproduce the simulated model's samples? Same seeds, same checkpoint, both backends.

    OMP_NUM_THREADS=1 python benchmarks/runtime_match.py --out benchmarks/results/runtime/match

Quantizes digits16-cond at W4A8 (``--method``, naive by default: the comparison is between two
executions of the same quantized network, not about calibration quality), exports it, samples
``--num`` images with ``--backend fake`` and ``--backend int`` (DDIM 50 steps, eta 1, guidance 3,
seed 0) and evaluates both with the bundled digit classifier. Also samples the run directory itself
to show that the fake backend reproduces it bit for bit. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ptqd.calibration import CalibrationOptions
from ptqd.io import write_json
from ptqd.metrics import evaluate, format_table
from ptqd.models import load
from ptqd.quant import QuantConfig
from ptqd.runs import quantize
from ptqd.runtime import export, load_checkpoint
from ptqd.sampling import SamplerConfig, sample, save_samples

COLUMNS = ["fd", "sfd", "is", "precision", "recall", "accuracy", "seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime/match"))
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--method", default="naive", choices=["naive", "qdiff"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = load("digits16-cond")
    sampler = SamplerConfig("ddim", args.steps, 1.0, 3.0, args.seed, batch_size=250)
    run = quantize(model, QuantConfig(weight_bits=4, act_bits=8), args.method, CalibrationOptions(), calib_samples=64,
                   sampler=sampler, out=args.out / "run", progress=False)
    ck = export(run, args.out / "model.ptqd")
    rows, images = [], {}
    for name, m in [("run (simulated)", run.model), ("checkpoint, fake", None), ("checkpoint, int", None)]:
        if m is None:
            m = load_checkpoint(ck, backend=name.split(", ")[1]).model
        t0 = time.perf_counter()
        s = sample(m, args.num, sampler, progress=False)
        seconds = time.perf_counter() - t0
        save_samples(s, args.out / f"{name.split()[-1].strip('()')}.npz")
        images[name] = s.images
        rows.append({"name": name, **evaluate(s.images, s.labels), "seconds": round(seconds, 1)})
    diff = {
        "fake_vs_run_identical": bool((images["checkpoint, fake"] == images["run (simulated)"]).all()),
        "int_vs_fake_mean_abs_pixel": float(np.abs(images["checkpoint, int"].astype(float) - images["checkpoint, fake"].astype(float)).mean()),
    }
    result = {"command": "python " + " ".join(sys.argv), "torch_threads": torch.get_num_threads(), "num": args.num,
              "sampler": vars(sampler) if hasattr(sampler, "__dict__") else str(sampler), "rows": rows, **diff}
    write_json(args.out / "results.json", result)
    table = format_table(rows, COLUMNS)
    md = (f"# Integer vs simulated samples (digits16-cond W4A8 {args.method}, {args.num} images, DDIM {args.steps} steps, "
          f"eta 1, guidance 3, seed {args.seed})\n\n{table}\n\nfake backend identical to the run: {diff['fake_vs_run_identical']}; "
          f"int vs fake mean |pixel difference|: {diff['int_vs_fake_mean_abs_pixel']:.2f} / 255\n\nCommand: `{result['command']}`\n")
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
