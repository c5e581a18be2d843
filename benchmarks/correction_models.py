"""Which correction brings a quantized model closest to its own FP model? Q-Diffusion, each part of
PTQD's correction, the per-channel conditional mean, the content-aware map (± pixel bias), each ± VSC,
and budgeted mixed precision, at W8A8, W4A8, W4A4 and mixed A4/A8, on the bundled models.

Two phases (sampling is the slow part; evaluation reruns in seconds):

    .venv/bin/python benchmarks/correction_models.py sample --model digits16-cond --num 500 --seeds 0,1
    .venv/bin/python benchmarks/correction_models.py evaluate --model digits16-cond --num 500 --seeds 0,1

``--protocol``: ``eta1`` (DDIM 50 steps, eta 1, guidance 3: the default), ``eta0`` (DDIM 20 steps,
eta 0, guidance 3: the paper's deterministic LDM protocol in miniature) or ``long`` (DDIM 100 steps,
eta 1, guidance 1.5). ``sample`` quantizes the runs into OUT/runs if missing (``w4``: 4-bit weights
calibrated for 8- and 4-bit activations, so one run serves W4A8, W4A4 and mixed; ``w8``: W8A8), collects
each run's noise statistics for the protocol's sampler (fitted on seed 2000's trajectories, scored on
seed 2001's; evaluation seeds are 0, 1, …, never those), and writes OUT/samples/<row>_<protocol>_seed<S>.npz
for FP and every row and seed. Finished files are skipped and files holding more images are reused (their
first N images are exactly an N-image run), so an interrupted run resumes. ``evaluate`` writes
OUT/results_<protocol>.{json,md}: per row the paired metrics to FP of the same seed (PSNR, SSIM, MSE),
FD→FP against its floor (FP of the other seed), FD/sFD/precision/recall to the real digits (decoded
images for the latent model), GBOPs, per-image paired PSNR differences with 95 % intervals, and from the
statistics the held-out R² per step of every correction model next to its in-sample value.

Rows whose key starts with ``g`` (``gptqd_w4a4``, ``gdebias_w4a4``, ``gposterior_w4a4``, …) sample with the
final-sample guard (:mod:`ptqd.correction.guard`: λ per block of steps fitted on 32 trajectories of seed
2002, cached in the run directory; its fitting time is recorded per row); every other row applies its
correction as it is (the guard off, the paper's PTQD for ``ptqd_*``). ``--results-name`` names the
results files (default ``results_PROTOCOL``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ptqd import __version__
from ptqd.calibration import CalibrationOptions
from ptqd.correction import plan_sampling
from ptqd.io import write_json
from ptqd.models import load
from ptqd.quant import QuantConfig
from ptqd.runs import ensure_stats, load_run, quantize
from ptqd.sampling import SamplerConfig, load_samples, sample, save_samples

from fidelity import first  # noqa: E402  (benchmarks/fidelity.py: the first N images of a larger run)

PROTOCOLS = {  # steps, eta, guidance
    "eta1": (50, 1.0, 3.0),
    "eta0": (20, 0.0, 3.0),
    "long": (100, 1.0, 1.5),
}
# key: setting, label, run, correction, act bits, correction model, fidelity budget
ROWS = {  # in the order they are sampled: the most telling first
    "qdiff_w4a4": ("W4A4", "Q-Diffusion", "w4", "none", 4, None, None),
    "ptqd_w4a4": ("W4A4", "PTQD (CNC+BC+VSC)", "w4", "all", 4, None, None),
    "content_w4a4": ("W4A4", "content", "w4", "cnc,bc", 4, "content", None),
    "debias_w4a4": ("W4A4", "debias", "w4", "cnc,bc", 4, "debias", None),
    "debiasvsc_w4a4": ("W4A4", "debias + VSC", "w4", "all", 4, "debias", None),
    "dpixel_w4a4": ("W4A4", "debias-pixel", "w4", "cnc,bc", 4, "debias-pixel", None),
    "mean_w4a4": ("W4A4", "mean", "w4", "cnc,bc", 4, "mean", None),
    "contentvsc_w4a4": ("W4A4", "content + VSC", "w4", "all", 4, "content", None),
    "pixel_w4a4": ("W4A4", "content-pixel", "w4", "cnc,bc", 4, "content-pixel", None),
    "cnc_w4a4": ("W4A4", "+CNC", "w4", "cnc", 4, None, None),
    "meanvsc_w4a4": ("W4A4", "mean + VSC", "w4", "all", 4, "mean", None),
    "cncbc_w4a4": ("W4A4", "+CNC+BC", "w4", "cnc,bc", 4, None, None),
    "bc_w4a4": ("W4A4", "+BC", "w4", "bc", 4, None, None),
    "pixelvsc_w4a4": ("W4A4", "content-pixel + VSC", "w4", "all", 4, "content-pixel", None),
    "qdiff_w4a8": ("W4A8", "Q-Diffusion", "w4", "none", 8, None, None),
    "ptqd_w4a8": ("W4A8", "PTQD", "w4", "all", 8, None, None),
    "content_w4a8": ("W4A8", "content", "w4", "cnc,bc", 8, "content", None),
    "mean_w4a8": ("W4A8", "mean", "w4", "cnc,bc", 8, "mean", None),
    "debias_w4a8": ("W4A8", "debias", "w4", "cnc,bc", 8, "debias", None),
    "contentvsc_w4a8": ("W4A8", "content + VSC", "w4", "all", 8, "content", None),
    "ptqd_mixed": ("A4/A8", "PTQD mixed (snr-unscaled)", "w4", "all", "mixed", None, None),
    "content_budget": ("A4/A8", "content, budget 1.5", "w4", "cnc,bc", "mixed", "content", 1.5),
    "content_budget3": ("A4/A8", "content, budget 3", "w4", "cnc,bc", "mixed", "content", 3.0),
    "qdiff_budget": ("A4/A8", "Q-Diffusion, budget 1.5 (measured)", "w4", "none", "mixed", None, 1.5),
    "qdiff_gbudget": ("A4/A8", "Q-Diffusion, budget 1.5 (Gaussian)", "w4", "none", "mixed", None, ("gaussian", 1.5)),
    "cnc_budget": ("A4/A8", "+CNC, budget 1.5 (measured)", "w4", "cnc", "mixed", None, 1.5),
    "qdiff_budget3": ("A4/A8", "Q-Diffusion, budget 3 (measured)", "w4", "none", "mixed", None, 3.0),
    "qptqd_w4a4": ("W4A4 q-driven", "PTQD, statistics on quantized trajectories", "w4q", "all", 4, None, None),
    "qcnc_w4a4": ("W4A4 q-driven", "+CNC, statistics on quantized trajectories", "w4q", "cnc", 4, None, None),
    "qmean_w4a4": ("W4A4 q-driven", "mean, statistics on quantized trajectories", "w4q", "cnc,bc", 4, "mean", None),
    "qcontent_w4a4": ("W4A4 q-driven", "content, statistics on quantized trajectories", "w4q", "cnc,bc", 4, "content", None),
    "qdebias_w4a4": ("W4A4 q-driven", "debias, statistics on quantized trajectories", "w4q", "cnc,bc", 4, "debias", None),
    "qpixel_w4a4": ("W4A4 q-driven", "content-pixel, statistics on quantized trajectories", "w4q", "cnc,bc", 4, "content-pixel", None),
    "qcontent_w4a8": ("W4A8 q-driven", "content, statistics on quantized trajectories", "w4q", "cnc,bc", 8, "content", None),
    "qdebias_w4a8": ("W4A8 q-driven", "debias, statistics on quantized trajectories", "w4q", "cnc,bc", 8, "debias", None),
    "qdiff_w4a4_fwd": ("W4A4 fwd", "Q-Diffusion, forward block order", "w4fwd", "none", 4, None, None),
    "qdiff_w4a8_fwd": ("W4A8 fwd", "Q-Diffusion, forward block order", "w4fwd", "none", 8, None, None),
    "gptqd_w4a4": ("W4A4", "PTQD (CNC+BC+VSC), guarded", "w4", "all", 4, None, None),
    "gdebias_w4a4": ("W4A4", "debias, guarded", "w4", "cnc,bc", 4, "debias", None),
    "posterior_w4a4": ("W4A4", "posterior (τ=10)", "w4", "cnc,bc", 4, "posterior", None),
    "gposterior_w4a4": ("W4A4", "posterior (τ=10), guarded", "w4", "cnc,bc", 4, "posterior", None),
    "gcontent_w4a4": ("W4A4", "content, guarded", "w4", "cnc,bc", 4, "content", None),
    "gptqd_w4a8": ("W4A8", "PTQD (CNC+BC+VSC), guarded", "w4", "all", 8, None, None),
    "gdebias_w4a8": ("W4A8", "debias, guarded", "w4", "cnc,bc", 8, "debias", None),
    "posterior_w4a8": ("W4A8", "posterior (τ=10)", "w4", "cnc,bc", 8, "posterior", None),
    "gposterior_w4a8": ("W4A8", "posterior (τ=10), guarded", "w4", "cnc,bc", 8, "posterior", None),
    "qdiff_w8a8": ("W8A8", "Q-Diffusion", "w8", "none", 8, None, None),
    "ptqd_w8a8": ("W8A8", "PTQD", "w8", "all", 8, None, None),
    "content_w8a8": ("W8A8", "content", "w8", "cnc,bc", 8, "content", None),
    "mean_w8a8": ("W8A8", "mean", "w8", "cnc,bc", 8, "mean", None),
}
DEFAULT_ROWS = ",".join(ROWS)
# rows sampled with the final-sample guard (ptqd.correction.guard); every other row applies its correction as it is
GUARDED = {k for k in ROWS if k.startswith("g") and not k.startswith("gbudget")}
# paired PSNR differences reported: (a, b) on the same images
COMPARISONS = [
    ("ptqd_w8a8", "qdiff_w8a8"), ("content_w8a8", "qdiff_w8a8"), ("mean_w8a8", "qdiff_w8a8"),
    ("ptqd_w4a8", "qdiff_w4a8"), ("content_w4a8", "qdiff_w4a8"), ("mean_w4a8", "qdiff_w4a8"), ("contentvsc_w4a8", "qdiff_w4a8"),
    ("ptqd_w4a4", "qdiff_w4a4"), ("cnc_w4a4", "qdiff_w4a4"), ("debias_w4a4", "qdiff_w4a4"), ("mean_w4a4", "qdiff_w4a4"),
    ("content_w4a4", "qdiff_w4a4"), ("pixel_w4a4", "qdiff_w4a4"), ("debias_w4a8", "qdiff_w4a8"), ("ptqd_mixed", "qdiff_w4a8"),
    ("content_w4a4", "ptqd_w4a4"), ("content_w4a4", "cnc_w4a4"), ("contentvsc_w4a4", "content_w4a4"),
    ("content_budget", "content_w4a8"), ("qdiff_budget", "qdiff_w4a8"), ("qdiff_gbudget", "qdiff_w4a8"), ("cnc_budget", "qdiff_w4a8"),
    ("qdiff_w4a4_fwd", "qdiff_w4a4"), ("qdiff_w4a8_fwd", "qdiff_w4a8"),
    ("qptqd_w4a4", "qdiff_w4a4"), ("qcnc_w4a4", "qdiff_w4a4"), ("qmean_w4a4", "qdiff_w4a4"), ("qcontent_w4a4", "qdiff_w4a4"),
    ("qdebias_w4a4", "qdiff_w4a4"), ("qpixel_w4a4", "qdiff_w4a4"), ("qcontent_w4a4", "content_w4a4"),
    ("qcontent_w4a8", "qdiff_w4a8"), ("qdebias_w4a8", "qdiff_w4a8"),
    ("gptqd_w4a4", "qdiff_w4a4"), ("gdebias_w4a4", "qdiff_w4a4"), ("posterior_w4a4", "qdiff_w4a4"), ("gposterior_w4a4", "qdiff_w4a4"),
    ("gcontent_w4a4", "qdiff_w4a4"), ("gptqd_w4a4", "ptqd_w4a4"),
    ("gptqd_w4a8", "qdiff_w4a8"), ("gdebias_w4a8", "qdiff_w4a8"), ("posterior_w4a8", "qdiff_w4a8"), ("gposterior_w4a8", "qdiff_w4a8"),
    ("gptqd_w4a8", "ptqd_w4a8"),
]


def rows_of(args) -> list[str]:
    keys = [k for k in args.rows.split(",") if k]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use some of {DEFAULT_ROWS}")
    return keys


def sampler_for(args, seed: int) -> SamplerConfig:
    steps, eta, guidance = PROTOCOLS[args.protocol]
    return SamplerConfig("ddim", steps, eta, guidance, seed, args.batch_size)


def calib_options(args) -> CalibrationOptions:
    """The library default (``--calibration full``), or lighter, as the demo, so a CPU session fits (``light``)."""
    if args.calibration == "full":
        return CalibrationOptions()
    return CalibrationOptions(recon_samples=512, weight_iters=100, act_iters=50)


def get_run(args, fp, name: str):
    """``w4``: W4 for A8 and A4 (registration block order, as the library did before forward order);
    ``w4fwd``: the same with blocks reconstructed in forward order; ``w4q``: ``w4``'s quantizers with
    statistics collected on the quantized network's own trajectories (``--drive quantized``); ``w8``: W8A8."""
    d = args.out / "runs" / name
    if name == "w4q" and not (d / "quant_state.safetensors").is_file():
        import shutil

        src = get_run(args, fp, "w4").path
        d.mkdir(parents=True, exist_ok=True)
        for f in ("calibration.safetensors", "config.json", "quant_state.safetensors", "summary.json"):
            shutil.copy2(Path(src) / f, d / f)
    if (d / "quant_state.safetensors").is_file():
        run = load_run(d, model=fp)
        if name == "w4q":
            from ptqd.correction import StatsRequest, collect_stats
            from ptqd.correction.stats import stats_name

            sampler = sampler_for(args, 0)
            if not (d / stats_name(sampler, fp.conditional)).is_file():
                collect_stats(run, StatsRequest(dataclasses.replace(sampler, seed=2000), args.noise_samples, seed=2000, drive="quantized"),
                              out=d, progress=False)
        return run
    qc = QuantConfig(weight_bits=8, act_bits=8) if name == "w8" else QuantConfig(weight_bits=4, act_bits=8, extra_act_bits=[4])
    opts = calib_options(args)
    opts = dataclasses.replace(opts, block_order="forward" if name == "w4fwd" else "registration")
    t0 = time.perf_counter()
    run = quantize(fp, qc, "ptqd", opts, sampler=sampler_for(args, 0), out=d, progress=False,  # w4fwd: uncorrected rows only
                   noise_samples=0 if name == "w4fwd" else args.noise_samples, mixed_precision=None if name == "w8" else [4, 8])
    print(f"{name}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def sample_path(args, key: str, seed: int) -> Path:
    return args.out / "samples" / f"{key}_{args.protocol}_seed{seed}.npz"


def sample_all(args) -> None:
    fp = load(args.model)
    runs: dict[str, object] = {}
    for key in ["fp32"] + rows_of(args):  # a row for every seed before the next row
        for seed in args.seeds:
            sampler = sampler_for(args, seed)
            path = sample_path(args, key, seed)
            if path.is_file() and len(load_samples(path).images) >= args.num:
                continue
            t0 = time.perf_counter()
            if key == "fp32":
                s = sample(fp, args.num, sampler, progress=False)
            else:
                _, _, run_name, correct, bits, model, budget = ROWS[key]
                if run_name not in runs:
                    runs[run_name] = get_run(args, fp, run_name)
                run = runs[run_name]
                if (correct != "none" or bits == "mixed") and run_name != "w4q":
                    ensure_stats(run, dataclasses.replace(sampler, seed=0), "all", "mixed" if run_name != "w8" else None, progress=False)
                propagation, tol = budget if isinstance(budget, tuple) else ("measured", budget)
                t1 = time.perf_counter()
                plan = plan_sampling(run, sampler, correct, bits, model=model, fidelity_budget=tol, budget_propagation=propagation,
                                     guard=key in GUARDED)
                plan_seconds = time.perf_counter() - t1  # the guard's calibration (once per row: cached in the run directory)
                t0 = time.perf_counter()
                s = sample(plan.model, args.num, sampler, progress=False, denoise=plan.denoise, corrector=plan.corrector)
                s.config.update(plan.record)
                s.config["benchmark_plan_seconds"] = round(plan_seconds, 1)
            s.config["benchmark"] = {"row": path.stem, "seconds": round(time.perf_counter() - t0, 1)}
            save_samples(s, path)
            print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)


def r2_summary(args) -> dict:
    """Per run, bit-width and model: held-out and in-sample R² (share of the quantization error removed),
    averaged over steps and over the noisiest / middle / last third of the steps."""
    from ptqd.correction.stats import load_stats, stats_name

    out = {}
    for run_name in ("w4", "w4q", "w4fwd", "w8"):
        sampler = sampler_for(args, 0)
        path = args.out / "runs" / run_name / stats_name(sampler, True)
        if not path.is_file():
            continue
        st = load_stats(path)
        for which in ("fit", "heldout"):
            for model, v in st.r2(which).items():
                for i, b in enumerate(st.bits):
                    thirds = np.array_split(v[i], 3)
                    out.setdefault(f"{run_name} A{b}", {}).setdefault(model, {})[which] = {
                        "mean": float(v[i].mean()), "thirds": [float(t.mean()) for t in thirds], "per_step": [float(x) for x in v[i]],
                    }
    return out


def evaluate_all(args) -> None:
    from ptqd.metrics import evaluate
    from ptqd.metrics.fidelity import fidelity, paired_arrays

    results, loaded = [], {}

    def get(key, seed):
        if (key, seed) not in loaded:
            loaded[key, seed] = first(load_samples(sample_path(args, key, seed)), args.num)
        return loaded[key, seed]

    fps = {s: get("fp32", s) for s in args.seeds}
    for key in ["fp32"] + rows_of(args):
        setting, label = ("FP32", "FP32") if key == "fp32" else ROWS[key][:2]
        for seed in args.seeds:
            if not sample_path(args, key, seed).is_file():
                continue
            s = get(key, seed)
            other = next((o for o in args.seeds if o != seed), None)
            m = {**evaluate(s.images, s.labels), **fidelity(s, fps[seed], fps[other] if other is not None else None)}
            results.append({
                "key": key, "setting": setting, "method": label, "seed": seed, "num": len(s.images),
                "bit_schedule": s.config.get("bit_schedule"), "budget": s.config.get("budget"),
                "gbops_sampling": (s.config.get("sampling_bops") or 0) / 1e9 or None,
                "sample_seconds": s.config.get("benchmark", {}).get("seconds"), "guard": s.config.get("guard"),
                "plan_seconds": s.config.get("benchmark_plan_seconds"), **m,
            })
            print(f"{key} seed {seed}: psnr {m['psnr']:.2f} mse {m['mse'] * 1e3:.3f}e-3 fd_fp {m.get('fd_fp', float('nan')):.2f}", flush=True)
    diffs = []
    for a, b in COMPARISONS:
        for seed in args.seeds:
            if not all(sample_path(args, k, seed).is_file() for k in (a, b)):
                continue
            pa = paired_arrays(get(a, seed).images, fps[seed].images)
            pb = paired_arrays(get(b, seed).images, fps[seed].images)
            d = pa["psnr"] - pb["psnr"]
            rel = pa["mse"].mean() / max(pb["mse"].mean(), 1e-30) - 1
            diffs.append({"a": a, "b": b, "seed": seed, "mean_db": float(d.mean()), "ci95_db": float(1.96 * d.std(ddof=1) / np.sqrt(len(d))),
                          "mse_change": float(rel), "num": int(len(d))})
    steps, eta, guidance = PROTOCOLS[args.protocol]
    meta = {
        "command": f"python benchmarks/correction_models.py sample {_argline(args)} && "
                   f"python benchmarks/correction_models.py evaluate {_argline(args)}",
        "ptqd": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor() or "cpu", "model": args.model,
        "sampler": f"DDIM {steps} steps, eta {eta:g}, guidance {guidance:g}, labels 0..9 cycled",
    }
    r2 = r2_summary(args)
    write_json(args.out / f"{args.results_name or 'results_' + args.protocol}.json", {**meta, "rows": results, "paired_differences": diffs, "r2": r2})
    write_table(args, meta, results, diffs, r2)
    if any(r["key"] in ("qdiff_budget", "qdiff_gbudget") for r in results):
        plot_budget(args, results)


COLUMNS = [  # key, header, scale, digits
    ("psnr", "PSNR to FP dB", 1, 2), ("mse", "MSE to FP ×1e3", 1000, 3), ("ssim", "SSIM to FP", 1, 3),
    ("fd_fp_ratio", "FD→FP / floor", 1, 2), ("fd", "FD", 1, 1), ("sfd", "sFD", 1, 2),
    ("precision", "prec.", 1, 3), ("recall", "recall", 1, 3), ("accuracy", "acc.", 1, 3),
]


def _cell(rs, key, scale, digits):
    v = np.array([r[key] for r in rs if r.get(key) is not None], dtype=float) * scale
    if len(v) == 0:
        return "–"
    if key == "psnr" and all(r.get("identical") == r.get("num_pairs") for r in rs):
        return "= FP"
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {sd:.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def write_table(args, meta, results, diffs, r2) -> None:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["key"], []).append(r)
    lines = ["| setting | method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " | GBOPs / image |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for key, rs in groups.items():
        g = rs[0].get("gbops_sampling")
        lines.append(f"| {rs[0]['setting']} | {rs[0]['method']} | " + " | ".join(_cell(rs, *c[:1], *c[2:]) for c in COLUMNS)
                     + (f" | {g:.1f} |" if g else " | – |"))
    r2_lines = ["| run | model | held-out R² (all steps) | noisiest third | middle third | last third | in-sample R² |", "|---|---|---|---|---|---|---|"]
    for where, models in r2.items():
        for model, v in models.items():
            h, f = v.get("heldout"), v.get("fit")
            if h is None:
                continue
            r2_lines.append(f"| {where} | {model} | {h['mean']:.3f} | " + " | ".join(f"{x:.3f}" for x in h["thirds"]) + f" | {f['mean']:.3f} |")
    schedules = sorted({(r["method"], r["bit_schedule"], json.dumps(r["budget"])) for r in results if r.get("bit_schedule")})
    guards = {}
    for r in results:
        if r.get("guard") and r["key"] not in guards:
            g = r["guard"]
            guards[r["key"]] = (f"- {r['setting']} {r['method']}: {g['chosen']}, λ per block " + ", ".join(
                f"t {a}→{b}: {v:.2f}" for (a, b), v in zip(g["blocks"], g["lambda"])) + f" (fitted: {', '.join(f'{v:.2f}' for v in g['lambda_fit'])}); "
                f"calibration MSE to FP ({g['num']} trajectories of seed {g['seed']}) none {g['mse']['none']:.3g}, full {g['mse']['full']:.3g}, "
                f"fitted {g['mse']['fit']:.3g}; guard fitted in {r.get('plan_seconds') or 0:.0f} s")
    n = results[0]["num"] if results else 0
    text = "\n".join([
        f"# Correction models on {args.model} ({args.protocol})",
        "",
        "Command:",
        "",
        f"    {meta['command']}",
        "",
        f"{meta['sampler']}; {n} images per row and seed, seeds {', '.join(map(str, args.seeds))} (mean ± std over seeds);",
        f"ptqd {meta['ptqd']}, torch {meta['torch']}, {meta['threads']} threads, {meta['processor']}.",
        "Paired columns compare each image with the FP image of the same seed, label and noise. FD→FP / floor: Fréchet",
        "distance (bundled classifier features) to the FP set of the same seed over that between the two FP seeds.",
        "FD/sFD, precision, recall, accuracy: against the real digits. Statistics were fitted on seed 2000's",
        "trajectories; every evaluation seed is another.",
        "",
        *lines,
        "",
        "Per-image paired differences on the same images (a − b; PSNR mean and 95 % interval over images; change in mean MSE to FP):",
        "",
        *[f"- {d['a']} − {d['b']}, seed {d['seed']}: {d['mean_db']:+.2f} ± {d['ci95_db']:.2f} dB, MSE {d['mse_change']:+.1%}" for d in diffs],
        "",
        "Share of the quantization error E|ε̂ − ε|² each correction model removes (R², 1 − E|ε_corr − ε|²/E|ε̂ − ε|², mean over",
        "steps), on held-out trajectories (seed 2001) and in-sample (seed 2000):",
        "",
        *r2_lines,
        "",
        "Final-sample guard (λ per block of steps, chosen on the calibration trajectories; seeds 0/1 never used there):",
        "",
        *guards.values(),
        "",
        "Bit schedules:",
        "",
        *[f"- {m}: {s}" + (f" (predicted {json.loads(b)['predicted_relative_mse']:.2f}× the A8 run's MSE)" if b != "null" else "")
          for m, s, b in schedules],
        "",
    ])
    (args.out / f"{args.results_name or 'results_' + args.protocol}.md").write_text(text)
    print(text)


def plot_budget(args, results) -> None:
    """Predicted relative MSE to FP against GBOPs along the budget curve, and the measured points."""
    from ptqd.correction.apply import budget_plan
    from ptqd.correction.stats import load_stats, stats_name
    from ptqd.report import plot_budget_curve

    fp = load(args.model)
    run = load_run(args.out / "runs" / "w4", model=fp)
    sampler = sampler_for(args, 0)
    stats = load_stats(args.out / "runs" / "w4" / stats_name(sampler, True))
    plan = budget_plan(run, stats, sampler, (), 1.5, propagation="measured")
    gauss = budget_plan(run, stats, sampler, (), 1.5, propagation="gaussian")
    base = {r["seed"]: r["mse"] for r in results if r["key"] == "qdiff_w4a8"}
    measured = []
    for key in ("qdiff_w4a4", "qdiff_budget", "qdiff_budget3", "qdiff_gbudget", "qdiff_w4a8"):
        rs = [r for r in results if r["key"] == key and r["seed"] in base]
        if rs:
            gb = rs[0]["gbops_sampling"] / 2  # the curve counts one forward per step (no guidance factor)
            measured.append({"gbops": gb, "relative_mse": float(np.mean([r["mse"] / base[r["seed"]] for r in rs])), "label": f"{ROWS[key][0]} {ROWS[key][1]}"})
    plot_budget_curve(plan["curve"], measured, args.out / f"budget_{args.protocol}.png",
                      title=f"{args.model}, W4 Q-Diffusion: predicted (measured step contributions) vs measured MSE to FP", tolerance=1.5)
    plot_budget_curve(gauss["curve"], measured, args.out / f"budget_gaussian_{args.protocol}.png",
                      title=f"{args.model}, W4 Q-Diffusion: predicted (Gaussian propagation) vs measured MSE to FP", tolerance=1.5)


def _argline(args) -> str:
    return (f"--model {args.model} --protocol {args.protocol} --num {args.num} --seeds {','.join(map(str, args.seeds))} "
            f"--calibration {args.calibration} --noise-samples {args.noise_samples} --rows {args.rows}"
            + (f" --results-name {args.results_name}" if args.results_name else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["sample", "evaluate"])
    p.add_argument("--model", default="digits16-cond", choices=["digits16-cond", "digits-ldm"])
    p.add_argument("--protocol", default="eta1", choices=list(PROTOCOLS))
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/correction_models/MODEL")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="which quantized rows (comma-separated keys)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--noise-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--results-name", default=None, help="evaluate: results file name without suffix (default results_PROTOCOL)")
    p.add_argument("--calibration", choices=["full", "light"], default="full",
                   help="full: the library's default calibration; light: 512 inputs, 100/50 iterations (as the demo)")
    args = p.parse_args()
    args.out = args.out or Path("benchmarks/results/correction_models") / args.model
    if args.phase == "sample":
        sample_all(args)
    else:
        evaluate_all(args)


if __name__ == "__main__":
    main()
