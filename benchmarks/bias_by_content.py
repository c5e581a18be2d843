"""Where does the quantized model's mean error come from? Per sampler step: the mean error along the
quantized trajectory (vs the FP-trajectory μ_t in the run's statistics), split into background pixels
(FP x̂_0 < 0) and digit pixels. Numbers quoted in README's PTQD ablation notes:

    .venv/bin/python benchmarks/bias_by_content.py benchmarks/results/ptqd_ablation/runs/w4a4 --bits 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ptqd.quant import set_act_bits
from ptqd.runs import load_run
from ptqd.sampling import default_labels, make_scheduler, sample_generators


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num", type=int, default=96)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    run = load_run(args.run)
    fp, q = run.fp, run.qnet
    set_act_bits(q, args.bits)
    sched = make_scheduler(fp, "ddim", 50)
    gens = sample_generators(args.seed, range(args.num))
    x = torch.stack([torch.randn(fp.channels, fp.image_size, fp.image_size, generator=g) for g in gens])
    y = torch.from_numpy(default_labels(fp, args.num)) if fp.conditional else None
    stats_file = args.run / f"noise_stats_ddim50_eta{args.eta:g}_g{args.guidance:g}.json"
    fp_mu = {r["t"]: r["mu"][0] for r in json.loads(stats_file.read_text())["steps"][str(args.bits)]} if stats_file.is_file() else {}
    print("| t | μ_t (FP trajectory, statistics) | mean error (quantized trajectory) | background | digits | background share |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            e = fp.denoise(x, t, y, args.guidance)
            eq = fp.denoise(x, t, y, args.guidance, unet=q)
            d = eq - e
            a = sched.alphas_cumprod[int(t)]
            bg = (x - (1 - a).sqrt() * e) / a.sqrt() < 0
            if i % 5 == 0 or i == len(sched.timesteps) - 1:
                fpm = fp_mu.get(int(t))
                print(
                    f"| {int(t)} | {'–' if fpm is None else f'{fpm:+.4f}'} | {float(d.mean()):+.4f} | "
                    f"{float(d[bg].mean()) if bg.any() else 0:+.4f} | {float(d[~bg].mean()) if (~bg).any() else 0:+.4f} | "
                    f"{float(bg.float().mean()):.2f} |"
                )
            x = sched.step(eq, t, x, eta=args.eta, generator=gens).prev_sample


if __name__ == "__main__":
    main()
