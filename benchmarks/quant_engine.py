"""FP vs naive vs qdiff at W8A8, W4A8, W4A4 on digits16-cond: sample quality, BOPs, size, calibration time.

    .venv/bin/python benchmarks/quant_engine.py --out benchmarks/results/quant_engine

Writes results.json and results.md (the table in README's results). Each run directory
(calibration data, quantizer state, summary) is kept under --out so it can be resampled.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from ptqd import __version__
from ptqd.calibration import CalibrationOptions
from ptqd.io import write_json
from ptqd.metrics import evaluate
from ptqd.models import load
from ptqd.quant import QuantConfig
from ptqd.runs import quantize
from ptqd.sampling import SamplerConfig, sample, save_samples

COLUMNS = ["fd", "sfd", "is", "precision", "recall", "accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_engine"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", default="8/8,4/8,4/4", help="weight/activation pairs")
    p.add_argument("--methods", default="naive,qdiff")
    args = p.parse_args()

    model = load("digits16-cond")
    sampler = SamplerConfig(scheduler="ddim", steps=50, eta=1.0, guidance=3.0, seed=args.seed)
    rows = []
    t0 = time.perf_counter()
    fp = sample(model, args.num, sampler)
    fp_seconds = time.perf_counter() - t0
    save_samples(fp, args.out / "fp.npz")
    rows.append({"name": "FP32", "method": "fp", "bits": "W32A32", **evaluate(fp.images, fp.labels),
                 "gbops": None, "bops_saving": 1.0, "size_mb": None, "calib_seconds": None, "sample_seconds": round(fp_seconds, 1)})
    calib_file = None
    for bits in args.bits.split(","):
        wb, ab = (int(v) for v in bits.split("/"))
        for method in args.methods.split(","):
            run_dir = args.out / f"{method}-w{wb}a{ab}"
            if calib_file is not None and not (run_dir / "calibration.safetensors").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(calib_file, run_dir / "calibration.safetensors")  # same calibration data for every row
            run = quantize(model, QuantConfig(weight_bits=wb, act_bits=ab), method, CalibrationOptions(), out=run_dir)
            calib_file = run_dir / "calibration.safetensors"
            t0 = time.perf_counter()
            s = sample(run.model, args.num, sampler)
            seconds = time.perf_counter() - t0
            save_samples(s, run_dir / "samples.npz")
            summ = run.summary
            rows.append({
                "name": f"{method} W{wb}A{ab}", "method": method, "bits": f"W{wb}A{ab}", **evaluate(s.images, s.labels),
                "gbops": summ["bops"]["bops"] / 1e9, "bops_saving": summ["bops"]["bops_saving"],
                "size_mb": summ["size"]["bytes"] / 1e6, "calib_seconds": summ["seconds"].get("total_calibration"),
                "sample_seconds": round(seconds, 1),
            })
            print(rows[-1], flush=True)
    fp_size = run.summary["size"]["fp32_bytes"] / 1e6
    rows[0]["size_mb"] = fp_size
    rows[0]["gbops"] = run.summary["bops"]["fp_bops"] / 1e9
    record = {
        "command": "python benchmarks/quant_engine.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "ptqd": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor(),
        "sampler": vars(sampler), "calibration": "256 trajectories, 10 steps, seed 1000; default CalibrationOptions",
        "rows": rows,
    }
    write_json(args.out / "results.json", record)
    cols = COLUMNS + ["gbops", "bops_saving", "size_mb", "calib_seconds", "sample_seconds"]
    lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [r["name"]] + ["–" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + f"\n\nCommand: `{record['command']}`\n"
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
