"""PTQD ablation on digits16-cond: FP; qdiff; +CNC; +CNC+BC; +CNC+BC+VSC; mixed precision with all
corrections — at W8A8, W4A8 and W4A4, DDIM 50 steps, eta 1.0 and 0.0, guidance 3.0, several seeds.

Two phases, so calibration (CPU) and the many sampling runs (any device) can run on different machines:

    .venv/bin/python benchmarks/ptqd_ablation.py calibrate --out benchmarks/results/ptqd_ablation
    .venv/bin/python benchmarks/ptqd_ablation.py sample --out benchmarks/results/ptqd_ablation \\
        --device cuda --num 1000 --seeds 0,1 --noise-samples 1024
    .venv/bin/python benchmarks/ptqd_ablation.py sample --scheduler ddpm ...   # the same rows with DDPM 50 steps

``calibrate`` writes one PTQD run directory per bit setting (qdiff calibration; W4A8 calibrated for
4- and 8-bit activations for the mixed-precision row). ``sample`` collects the noise statistics of each
run for each eta, samples every row for every seed, evaluates with ``ptqd.metrics.evaluate`` and writes
results.json / results.md (mean ± std over seeds). Finished rows are kept in results.json and skipped
when the command is rerun, so an interrupted run resumes.
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
from ptqd.correction import StatsRequest, collect_stats, describe_schedule, plan_sampling, stats_name
from ptqd.correction.apply import fp_sampling_bops
from ptqd.io import write_json
from ptqd.metrics import evaluate
from ptqd.models import load
from ptqd.quant import QuantConfig
from ptqd.runs import load_run, quantize
from ptqd.sampling import SamplerConfig, sample

COLUMNS = ["fd", "sfd", "is", "precision", "recall", "accuracy", "mse_fp"]
SETTINGS = {"W8A8": (8, 8, None), "W4A8": (4, 8, [4, 8]), "W4A4": (4, 4, None)}
ROWS = [  # name, correction, act bits (None: the run's), eta-0 note
    ("qdiff", "none", None),
    ("+CNC", "cnc", None),
    ("+CNC+BC", "cnc,bc", None),
    ("+CNC+BC+VSC", "cnc,bc,vsc", None),
]


def calibrate(args) -> None:
    model = load("digits16-cond")
    sampler = SamplerConfig(scheduler="ddim", steps=50, eta=1.0, guidance=3.0)
    for name in args.settings.split(","):
        wb, ab, mixed = SETTINGS[name]
        t0 = time.perf_counter()
        quantize(
            model, QuantConfig(weight_bits=wb, act_bits=ab), "ptqd", CalibrationOptions(), sampler=sampler,
            out=args.out / "runs" / name.lower(), noise_samples=0, mixed_precision=mixed,
        )
        print(f"{name}: calibrated in {time.perf_counter() - t0:.0f} s", flush=True)


def stats_all(args) -> None:
    """Collect the noise statistics of every run for every sampler setting (so sampling can run elsewhere)."""
    fp = load("digits16-cond").to(torch.device(args.device))
    ddim = args.scheduler == "ddim"
    for eta in [float(e) for e in args.etas.split(",")] if ddim else [None]:
        for setting in args.settings.split(","):
            run = load_run(args.out / "runs" / setting.lower(), model=fp).to(torch.device(args.device))
            sampler = SamplerConfig(args.scheduler, 50, 1.0 if eta is None else eta, 3.0, 0, args.batch_size)
            if (run.path / stats_name(sampler, True)).is_file():
                continue
            t0 = time.perf_counter()
            collect_stats(run, StatsRequest(sampler, args.noise_samples), out=run.path, progress=True)
            print(f"{setting} {args.scheduler} eta {eta}: statistics in {time.perf_counter() - t0:.0f} s", flush=True)


def sample_all(args) -> None:
    device = torch.device(args.device)
    results_file = args.out / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    done = previous.get("rows", [])
    commands = [c for c in previous.get("commands", []) if c != meta(args)["command"]] + [meta(args)["command"]]
    key = lambda r: (r.get("scheduler", "ddim"), r["eta"], r["setting"], r["name"], r["seed"])  # noqa: E731
    finished = {key(r) for r in done}
    rows = list(done)
    fp = load("digits16-cond").to(device)
    seeds = [int(s) for s in args.seeds.split(",")]
    stats_seconds = {}

    fp_images: dict[tuple, np.ndarray] = {}

    def fp_file(row):
        tag = f"eta{row['eta']:g}" if row.get("scheduler", "ddim") == "ddim" else "ddpm"
        return args.out / f"fp_{tag}_seed{row['seed']}.npz"

    def fp_ref(row):
        f = fp_file(row)
        if f not in fp_images:
            fp_images[f] = np.load(f)["images"]
        return fp_images[f]

    def record(row, samples, seconds):
        row.update(evaluate(samples.images, samples.labels))
        if row["setting"] == "FP32":
            np.savez_compressed(fp_file(row), images=samples.images)
        # paired distance to the FP images of the same seed (same initial noise and labels)
        diff = samples.images.astype(np.float64) / 255 - fp_ref(row).astype(np.float64) / 255
        row["mse_fp"] = float((diff**2).mean())
        row["sample_seconds"] = round(seconds, 2)
        row["device"] = meta(args)["device"] + f", torch {torch.__version__}"
        row["num"] = args.num
        rows.append(row)
        finished.add(key(row))
        write_json(results_file, {**meta(args), "commands": commands, "rows": rows, "stats_seconds": stats_seconds})
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS + ["name", "setting", "seed", "eta"]}, flush=True)

    ddim = args.scheduler == "ddim"
    for eta in [float(e) for e in args.etas.split(",")] if ddim else [None]:
        for seed in seeds:
            sampler = SamplerConfig(args.scheduler, 50, 1.0 if eta is None else eta, 3.0, seed, args.batch_size)
            row = {"scheduler": args.scheduler, "eta": eta, "setting": "FP32", "name": "FP32", "seed": seed,
                   "gbops_sampling": fp_sampling_bops(fp, sampler) / 1e9}
            if key(row) not in finished:
                t0 = time.perf_counter()
                s = sample(fp, args.num, sampler, progress=False)
                record(row, s, time.perf_counter() - t0)
        for setting in args.settings.split(","):
            run = load_run(args.out / "runs" / setting.lower(), model=fp).to(device)
            stats_sampler = SamplerConfig(args.scheduler, 50, 1.0 if eta is None else eta, 3.0, 0, args.batch_size)
            if not (run.path / stats_name(stats_sampler, True)).is_file():
                t0 = time.perf_counter()
                collect_stats(run, StatsRequest(stats_sampler, args.noise_samples), out=run.path, progress=False)
                stats_seconds[f"{setting} {args.scheduler} eta {eta}"] = round(time.perf_counter() - t0, 1)
            rows_here = list(ROWS)
            if SETTINGS[setting][2]:
                rows_here.append(("mixed A4/A8 +CNC+BC+VSC", "all", "mixed"))
                rows_here.append(("A4 throughout +CNC+BC+VSC", "all", 4))
            for name, correct, bits in rows_here:
                if ddim and eta == 0 and correct == "cnc,bc,vsc":
                    continue  # identical to +CNC+BC: deterministic DDIM has no noise for VSC to shrink
                for seed in seeds:
                    sampler = SamplerConfig(args.scheduler, 50, 1.0 if eta is None else eta, 3.0, seed, args.batch_size)
                    row = {"scheduler": args.scheduler, "eta": eta, "setting": setting, "name": name, "seed": seed}
                    if key(row) in finished:
                        continue
                    plan = plan_sampling(run, sampler, correct, bits if bits is not None else SETTINGS[setting][1])
                    t0 = time.perf_counter()
                    s = sample(plan.model, args.num, sampler, progress=False, denoise=plan.denoise, corrector=plan.corrector)
                    row["gbops_sampling"] = plan.record["sampling_bops"] / 1e9
                    row["bit_schedule"] = plan.record.get("bit_schedule")
                    record(row, s, time.perf_counter() - t0)
    write_table(args, rows, commands)


def meta(args) -> dict:
    return {
        "command": f"python benchmarks/ptqd_ablation.py {args.phase} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "phase"
        ),
        "ptqd": __version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "machine": platform.platform(),
        "sampler": f"{getattr(args, 'scheduler', 'ddim').upper()} 50 steps, guidance 3.0, labels 0..9 cycled",
        "calibration": "qdiff: 256 trajectories x 10 steps (seed 1000), default CalibrationOptions",
    }


def write_table(args, rows, commands) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        sampler = f"DDIM eta {r['eta']:g}" if r.get("scheduler", "ddim") == "ddim" else "DDPM"
        groups.setdefault((sampler, r["setting"], r["name"]), []).append(r)
    lines = [
        "| sampler | setting | method | FD | sFD | IS | precision | recall | accuracy | MSE to FP ×1e3 | GBOPs / image (50 steps, CFG) | act bits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (sampler, setting, name), rs in groups.items():
        cells = []
        for c in COLUMNS:
            v = np.array([r[c] for r in rs], dtype=float)
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            if c == "mse_fp":
                cells.append(f"{1000 * v.mean():.2f} ± {1000 * sd:.2f}")
            elif c in ("fd", "sfd", "is"):
                cells.append(f"{v.mean():.2f} ± {sd:.2f}")
            else:
                cells.append(f"{v.mean():.3f} ± {sd:.3f}")
        bits = rs[0].get("bit_schedule") or ""
        if len(rs) == 1:  # no spread to show
            cells = [c.split(" ± ")[0] for c in cells]
            name = f"{name} (seed {rs[0]['seed']} only)"
        lines.append(f"| {sampler} | {setting} | {name} | " + " | ".join(cells) + f" | {rs[0]['gbops_sampling']:.1f} | {bits} |")
    seeds = sorted({r["seed"] for r in rows})
    text = "\n".join([
        "# PTQD ablation on digits16-cond",
        "",
        "Commands (after `python benchmarks/ptqd_ablation.py calibrate`):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Device: {rows[-1].get('device', meta(args)['device'])}; ptqd {__version__}. Seeds {seeds}; mean ± std over seeds;",
        f"{rows[-1].get('num', args.num)} images per row and seed; noise statistics from {args.noise_samples} FP trajectories (seed 2000).",
        "MSE to FP: mean squared pixel difference (images in [0, 1]) to the FP images of the same seed, labels and",
        "initial noise: how far quantization moved each sample (FD alone rewards added diversity, see README).",
        "",
        *lines,
        "",
    ])
    (args.out / "results.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--out", type=Path, default=Path("benchmarks/results/ptqd_ablation"))
    c.add_argument("--settings", default="W8A8,W4A8,W4A4")
    s = sub.add_parser("sample")
    s.add_argument("--out", type=Path, default=Path("benchmarks/results/ptqd_ablation"))
    s.add_argument("--settings", default="W8A8,W4A8,W4A4")
    s.add_argument("--device", default="cpu")
    s.add_argument("--num", type=int, default=1000)
    s.add_argument("--seeds", default="0,1")
    s.add_argument("--etas", default="1.0,0.0", help="DDIM etas")
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--noise-samples", type=int, default=1024)
    s.add_argument("--batch-size", type=int, default=500)
    st = sub.add_parser("stats", help="only collect the noise statistics (resumable)")
    st.add_argument("--out", type=Path, default=Path("benchmarks/results/ptqd_ablation"))
    st.add_argument("--settings", default="W8A8,W4A8,W4A4")
    st.add_argument("--device", default="cpu")
    st.add_argument("--etas", default="1.0,0.0", help="DDIM etas")
    st.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    st.add_argument("--noise-samples", type=int, default=1024)
    st.add_argument("--batch-size", type=int, default=500)
    t = sub.add_parser("table", help="rewrite results.md from results.json")
    t.add_argument("--out", type=Path, default=Path("benchmarks/results/ptqd_ablation"))
    t.add_argument("--noise-samples", type=int, default=1024)
    t.add_argument("--num", type=int, default=1000)
    t.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.phase == "calibrate":
        calibrate(args)
    elif args.phase == "stats":
        stats_all(args)
    elif args.phase == "sample":
        sample_all(args)
    else:
        data = json.loads((args.out / "results.json").read_text())
        write_table(args, data["rows"], data.get("commands", [data["command"]]))


if __name__ == "__main__":
    main()
