"""Where does a correction's error come from? Per step along the *quantized* sampler's own trajectory:
the error of the noise prediction it uses (uncorrected or corrected) against the FP prediction at the
same x_t, and how far x_t has drifted from the FP trajectory of the same seed.

    .venv/bin/python benchmarks/correction_drift.py --run RUN [--num 50] [--act-bits 4]

RUN: a ptqd run with noise statistics for DDIM 50 steps, eta 1, guidance 3 (e.g.
benchmarks/results/correction_models/digits16-cond/runs/w4). Writes correction_drift.{json,md} beside
the run directory's parent (or ``--out``). The statistics were fitted on FP trajectories; this shows
whether what they fitted still holds where the quantized sampler actually goes, and whether the final
error follows the per-step error or the drift.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from ptqd import __version__
from ptqd.correction import plan_sampling
from ptqd.io import write_json
from ptqd.runs import load_run
from ptqd.sampling import SamplerConfig, sample

VARIANTS = [("Q-Diffusion", "none", None), ("PTQD", "all", None), ("PTQD CNC", "cnc", None), ("mean", "cnc,bc", "mean"),
            ("content", "cnc,bc", "content"), ("debias", "cnc,bc", "debias")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--num", type=int, default=50)
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    fp = run.base
    sampler = SamplerConfig("ddim", 50, 1.0, 3.0 if fp.conditional else 1.0, 0, args.num)
    fp_x = []
    fp_s = sample(fp, args.num, sampler, progress=False, callback=lambda st: fp_x.append(st.x.clone()))
    out: dict[str, dict] = {}
    for name, correct, model in VARIANTS:
        plan = plan_sampling(run, sampler, correct, args.act_bits, model=model)
        rec = {"pred_err": [], "raw_err": [], "drift": []}

        def observe(st, plan=plan, rec=rec):
            with torch.no_grad():
                e_fp = fp.denoise(st.x, st.t, st.y, st.guidance)  # the FP prediction where the quantized sampler is
                used = plan.corrector.correct_eps(st.eps, st.t, st.x) if plan.corrector is not None else st.eps
            rec["raw_err"].append(float(((st.eps - e_fp) ** 2).mean()))
            rec["pred_err"].append(float(((used - e_fp) ** 2).mean()))
            rec["drift"].append(float(((st.x - fp_x[st.i]) ** 2).mean()))

        s = sample(plan.model, args.num, sampler, progress=False, denoise=plan.denoise, corrector=plan.corrector, callback=observe)
        d = (s.images.astype(np.float64) - fp_s.images.astype(np.float64)) / 255.0
        rec["final_mse"] = float((d**2).mean())
        out[name] = rec
        print(f"{name}: final MSE to FP {rec['final_mse'] * 1e3:.3f}e-3", flush=True)
    dest = args.out or args.run.parent.parent
    command = "python " + " ".join(sys.argv)
    write_json(dest / "correction_drift.json", {"command": command, "ptqd": __version__, "torch": torch.__version__,
                                                "machine": platform.platform(), "num": args.num, "act_bits": args.act_bits,
                                                "variants": out})
    thirds = lambda v: [float(np.mean(c)) for c in np.array_split(np.asarray(v), 3)]  # noqa: E731
    lines = [f"# Per-step error along the quantized trajectory (A{args.act_bits}, {args.num} images, DDIM 50 eta 1)", "",
             "Command:", "", f"    {command}", "",
             "ε error: mean square of the prediction the step uses minus the FP prediction at the same x_t (noisiest /",
             "middle / last third of the steps); drift: mean square of x_t minus the FP trajectory's x_t (same seed).", "",
             "| correction | ε error, thirds | uncorrected ε error, thirds | drift, thirds | final MSE to FP ×1e3 |", "|---|---|---|---|---|"]
    for name, rec in out.items():
        f = lambda v: " / ".join(f"{x:.4f}" for x in thirds(v))  # noqa: E731
        lines.append(f"| {name} | {f(rec['pred_err'])} | {f(rec['raw_err'])} | {f(rec['drift'])} | {rec['final_mse'] * 1e3:.3f} |")
    (dest / "correction_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
