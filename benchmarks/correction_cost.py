"""Per-step cost of each correction model, relative to one forward of the quantized denoiser.

    .venv/bin/python benchmarks/correction_cost.py --run RUN [--batch 250] [--repeats 30] [--threads 1]

RUN: a ptqd run directory with noise statistics for DDIM 50 steps, eta 1, guidance 3 (for example
benchmarks/results/correction_models/digits16-cond/runs/w4). At one mid step, with a batch of
``--batch`` images, times (interleaved repeats, medians, one process): the guided denoiser call of the
quantized model (two forwards with classifier-free guidance), the plain scheduler step, and the
corrected step (correction + step) for PTQD's CNC+BC+VSC and every regression model ± VSC. The
correction's cost is (corrected step − plain step) / denoiser call: the target is under 2 %. Writes
OUT/correction_cost.{json,md} next to the run (or ``--out``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ptqd import __version__
from ptqd.correction import plan_sampling
from ptqd.io import write_json
from ptqd.runs import load_run
from ptqd.sampling import SamplerConfig, make_scheduler

VARIANTS = [("PTQD CNC+BC+VSC", "all", None), ("mean", "cnc,bc", "mean"), ("mean + VSC", "all", "mean"),
            ("content", "cnc,bc", "content"), ("content + VSC", "all", "content"),
            ("content-pixel", "cnc,bc", "content-pixel"), ("content-pixel + VSC", "all", "content-pixel")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--act-bits", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    fp = run.base
    sampler = SamplerConfig("ddim", 50, 1.0, 3.0 if fp.conditional else 1.0, 0, args.batch)
    sched = make_scheduler(fp, "ddim", 50)
    t = sched.timesteps[25]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, fp.channels, fp.image_size, fp.image_size, generator=g)
    y = torch.arange(args.batch) % fp.num_classes if fp.conditional else None
    base = plan_sampling(run, sampler, "none", args.act_bits)
    plans = {name: plan_sampling(run, sampler, correct, args.act_bits, model=model) for name, correct, model in VARIANTS}
    with torch.no_grad():
        eps = base.denoise(x, t, y, sampler.guidance)
    times: dict[str, list[float]] = {"denoiser call": [], "scheduler step": [], **{k: [] for k in plans}}
    gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for name in times:
                t0 = time.perf_counter()
                if name == "denoiser call":
                    base.denoise(x, t, y, sampler.guidance)
                elif name == "scheduler step":
                    sched.step(eps, t, x, eta=1.0, generator=gens)
                else:
                    plans[name].corrector.step(sched, eps, t, x, gens, eta=1.0)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "median_ms": 1e3 * med[k], "overhead_pct": 100 * (med[k] - med["scheduler step"]) / med["denoiser call"]}
            for k in plans]
    out = args.out or args.run.parent.parent
    command = "python " + " ".join(sys.argv)
    meta = {"command": command, "ptqd": __version__, "torch": torch.__version__, "threads": args.threads,
            "machine": platform.platform(), "model": fp.name, "batch": args.batch, "act_bits": args.act_bits,
            "denoiser_call_ms": 1e3 * med["denoiser call"], "scheduler_step_ms": 1e3 * med["scheduler step"]}
    write_json(out / "correction_cost.json", {**meta, "rows": rows})
    lines = [f"# Per-step correction cost on {fp.name} (A{args.act_bits}, batch {args.batch}, {args.threads} thread)", "",
             "Command:", "", f"    {command}", "",
             f"Guided denoiser call {meta['denoiser_call_ms']:.1f} ms, plain DDIM step {meta['scheduler_step_ms']:.2f} ms "
             f"(medians of {args.repeats} interleaved repeats); ptqd {__version__}, torch {torch.__version__}.", "",
             "| correction | corrected step ms | cost, % of a denoiser call |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_ms']:.2f} | {r['overhead_pct']:.2f} |" for r in rows]
    (out / "correction_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
