"""Fidelity to full precision on digits16-cond: naive, Q-Diffusion and PTQD at W4A8 and W4A4 (and PTQD
mixed A4/A8), judged first by how close each stays to the FP model with the same seeds, then by the
distance to real digits.

Two phases (sampling is the slow part; evaluation reruns in seconds):

    .venv/bin/python benchmarks/fidelity.py sample --num 1000 --seeds 0,1      # calibrates the runs if missing
    .venv/bin/python benchmarks/fidelity.py evaluate --seeds 0,1

A file already holding at least ``--num`` images is reused (its first ``--num`` images are exactly a
run of that size with the same seed and batch size). ``sample`` quantizes two runs into OUT/runs (naive min-max, and Q-Diffusion calibration + PTQD noise
statistics, both calibrated for 8- and 4-bit activations so one run serves the W4A8 and the W4A4 rows),
then writes OUT/samples/<row>_seed<S>.npz for FP and every quantized row and seed; finished files are
skipped, so an interrupted run resumes. ``evaluate`` computes per row and seed the paired metrics against
the FP samples of the same seed (PSNR/SSIM/MSE), the Fréchet distance to the FP sample set with its noise
floor (FP of the other seed), and FD/sFD to the real digits, and writes OUT/results.json and results.md
(mean ± std over seeds).
"""

from __future__ import annotations

import argparse
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
from ptqd.runs import load_run, quantize
from ptqd.sampling import SamplerConfig, load_samples, sample, save_samples

MODEL = "digits16-cond"
ROWS = [  # key, setting, method, run, correction, act bits
    ("naive_w4a8", "W4A8", "naive", "naive", "none", 8),
    ("qdiff_w4a8", "W4A8", "Q-Diffusion", "ptqd", "none", 8),
    ("ptqd_w4a8", "W4A8", "PTQD", "ptqd", "all", 8),
    ("naive_w4a4", "W4A4", "naive", "naive", "none", 4),
    ("qdiff_w4a4", "W4A4", "Q-Diffusion", "ptqd", "none", 4),
    ("ptqd_w4a4", "W4A4", "PTQD", "ptqd", "all", 4),
    ("ptqd_mixed", "W4A4/8", "PTQD mixed", "ptqd", "all", "mixed"),
]
DEFAULT_ROWS = "naive_w4a8,qdiff_w4a8,ptqd_w4a8,naive_w4a4,qdiff_w4a4,ptqd_w4a4,ptqd_mixed"


def rows_of(args):
    keys = args.rows.split(",")
    unknown = [k for k in keys if k not in {r[0] for r in ROWS}]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use some of {DEFAULT_ROWS}")
    return [r for r in ROWS if r[0] in keys]


def first(samples, n: int):
    """The first ``n`` samples of a run: exactly a run of ``n`` with the same seed and batch size."""
    if len(samples.images) < n:
        raise SystemExit(f"{n} images asked, the file has {len(samples.images)}")
    samples.images = samples.images[:n]
    samples.labels = samples.labels[:n] if samples.labels is not None else None
    samples.config = {**samples.config, "num": n}
    return samples


def sampler_for(args, seed: int) -> SamplerConfig:
    return SamplerConfig("ddim", args.steps, args.eta, args.guidance, seed, args.batch_size)


def runs(args, fp):
    qc = QuantConfig(weight_bits=4, act_bits=8, extra_act_bits=[4])
    calib = sampler_for(args, 0)
    out = {}
    for name, method in (("naive", "naive"), ("ptqd", "ptqd")):
        d = args.out / "runs" / name
        if (d / "quant_state.safetensors").is_file() and (method != "ptqd" or any(d.glob("noise_stats_*.safetensors"))):
            out[name] = load_run(d, model=fp)
            continue
        t0 = time.perf_counter()
        out[name] = quantize(
            fp, qc, method, CalibrationOptions(), sampler=calib, out=d, progress=False,
            noise_samples=args.noise_samples, mixed_precision=[4, 8] if method == "ptqd" else None,
        )
        print(f"{name}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def sample_all(args) -> None:
    fp = load(MODEL)
    quantized = runs(args, fp)
    for seed in args.seeds:
        sampler = sampler_for(args, seed)
        todo = [("fp32", None)] + [(r, r) for r in rows_of(args)]
        for key, row in todo:
            path = args.out / "samples" / f"{key if row is None else row[0]}_seed{seed}.npz"
            if path.is_file() and len(load_samples(path).images) >= args.num:
                continue
            t0 = time.perf_counter()
            if row is None:
                s = sample(fp, args.num, sampler, progress=False)
            else:
                _, _, _, run, correct, bits = row
                plan = plan_sampling(quantized[run], sampler, correct, bits)
                s = sample(plan.model, args.num, sampler, progress=False, denoise=plan.denoise, corrector=plan.corrector)
                s.config.update(plan.record)
            s.config["benchmark"] = {"row": path.stem, "seconds": round(time.perf_counter() - t0, 1)}
            save_samples(s, path)
            print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate_all(args) -> None:
    from ptqd.metrics import evaluate
    from ptqd.metrics.fidelity import fidelity

    results = []
    load = lambda key, seed: first(load_samples(args.out / "samples" / f"{key}_seed{seed}.npz"), args.num)  # noqa: E731
    fps = {s: load("fp32", s) for s in args.seeds}
    for key, setting, method, *_ in [("fp32", "FP32", "FP32", None, None, None)] + rows_of(args):
        for seed in args.seeds:
            if not (args.out / "samples" / f"{key}_seed{seed}.npz").is_file():
                continue
            s = load(key, seed)
            other = next((o for o in args.seeds if o != seed), None)
            m = {**evaluate(s.images, s.labels), **fidelity(s, fps[seed], fps[other] if other is not None else None)}
            results.append({
                "key": key, "setting": setting, "method": method, "seed": seed, "num": len(s.images),
                "bit_schedule": s.config.get("bit_schedule"), "gbops_sampling": (s.config.get("sampling_bops") or 0) / 1e9 or None,
                "sample_seconds": s.config.get("benchmark", {}).get("seconds"), **m,
            })
            print(f"{key} seed {seed}: psnr {m['psnr']:.2f} fd_fp {m.get('fd_fp', float('nan')):.3f} fd {m['fd']:.2f}", flush=True)
    meta = {
        "command": "python benchmarks/fidelity.py sample " + _argline(args) + " && python benchmarks/fidelity.py evaluate " + _argline(args),
        "ptqd": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor() or "cpu",
        "sampler": f"DDIM {args.steps} steps, eta {args.eta:g}, guidance {args.guidance:g}, labels 0..9 cycled",
    }
    diffs = paired_differences(args, load, fps)
    write_json(args.out / "results.json", {**meta, "rows": results, "paired_differences": diffs})
    write_table(args, meta, results, diffs)


COMPARISONS = [("qdiff_w4a8", "naive_w4a8"), ("ptqd_w4a8", "qdiff_w4a8"), ("qdiff_w4a4", "naive_w4a4"), ("ptqd_w4a4", "qdiff_w4a4")]


def paired_differences(args, load, fps) -> list[dict]:
    """Per-image PSNR difference of two methods on the same images (same seed, label, noise): its mean
    and 95 % interval (±1.96 standard errors over images), per seed."""
    from ptqd.metrics.fidelity import paired_arrays

    out = []
    for a, b in COMPARISONS:
        for seed in args.seeds:
            if not all((args.out / "samples" / f"{k}_seed{seed}.npz").is_file() for k in (a, b)):
                continue
            pa = paired_arrays(load(a, seed).images, fps[seed].images)["psnr"]
            pb = paired_arrays(load(b, seed).images, fps[seed].images)["psnr"]
            d = pa - pb
            half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
            out.append({"a": a, "b": b, "seed": seed, "mean_db": float(d.mean()), "ci95_db": float(half), "num": int(len(d))})
    return out


def _argline(args) -> str:
    return (f"--num {args.num} --seeds {','.join(map(str, args.seeds))} --rows {args.rows} --steps {args.steps} "
            f"--eta {args.eta:g} --guidance {args.guidance:g}")


COLUMNS = [  # key, header, scale, digits
    ("psnr", "PSNR to FP dB", 1, 2), ("ssim", "SSIM to FP", 1, 3), ("mse", "MSE to FP ×1e3", 1000, 2),
    ("fd_fp", "FD→FP", 1, 2), ("fd_fp_ratio", "FD→FP / floor", 1, 2), ("fd", "FD", 1, 2), ("sfd", "sFD", 1, 2),
    ("precision", "prec.", 1, 3), ("recall", "recall", 1, 3),
]


def write_table(args, meta, results, diffs=()) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    lines = [
        "| setting | method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " | GBOPs / image |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for (setting, method), rs in groups.items():
        cells = []
        for key, _, scale, digits in COLUMNS:
            if key == "psnr" and all(r.get("identical") == r.get("num_pairs") for r in rs):
                cells.append("= FP")
                continue
            v = np.array([r[key] for r in rs if r.get(key) is not None], dtype=float) * scale
            if len(v) == 0 or not np.all(np.isfinite(v)):
                cells.append("–" if len(v) == 0 else f"{v.mean():.{digits}f}")
                continue
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():.{digits}f} ± {sd:.{digits}f}")
        g = rs[0].get("gbops_sampling")
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + f" | {g:.1f} |" if g else f"| {setting} | {method} | " + " | ".join(cells) + " | – |")
    n = results[0]["num"] if results else 0
    text = "\n".join([
        f"# Fidelity to full precision on {MODEL}",
        "",
        "Command:",
        "",
        f"    {meta['command']}",
        "",
        f"{meta['sampler']}; {n} images per row and seed, seeds {', '.join(map(str, args.seeds))} (mean ± std over seeds);",
        f"ptqd {meta['ptqd']}, torch {meta['torch']}, {meta['threads']} threads, {meta['processor']}.",
        "Paired columns compare each image with the FP image of the same seed, label and noise (per-image PSNR/SSIM,",
        "mean over images). FD→FP: Fréchet distance of the bundled classifier's features to the FP sample set of",
        "the same seed; floor: the same distance between the FP sets of the two seeds (FP→FP at this N). FD/sFD,",
        "precision, recall: against the held-out real digits.",
        "",
        *lines,
        "",
        "Per-image PSNR differences on the same images (mean, 95 % interval over images, per seed):",
        "",
        *[f"- {d['a']} − {d['b']}, seed {d['seed']}: {d['mean_db']:+.2f} ± {d['ci95_db']:.2f} dB" for d in diffs],
        "",
    ])
    (args.out / "results.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["sample", "evaluate"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="which quantized rows (comma-separated keys)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--noise-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args()
    if args.phase == "sample":
        sample_all(args)
    else:
        evaluate_all(args)


if __name__ == "__main__":
    main()
