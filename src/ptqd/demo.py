"""``ptqd demo``: FP32 vs naive, Q-Diffusion and PTQD at W4A8 and W4A4 (and PTQD mixed A4/A8) on the
bundled digits16-cond model, end to end.

Calibrates, quantizes, collects PTQD noise statistics, samples every method with the same seeds,
evaluates each against the FP samples of the same seeds (paired PSNR/SSIM, FD→FP against the FP→FP
floor of a second FP seed) and against real digits, and writes ``DIR/report.md`` with one table,
side-by-side sample grids with per-method error maps (|method − FP|) and the PTQD plots.
Everything lands under ``DIR`` (runs/, samples/, report.md, demo.json); rerunning the same command
reuses finished runs and samples, so an interrupted demo resumes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqd import __version__, defaults
from ptqd.calibration import CalibrationOptions
from ptqd.errors import PtqdError
from ptqd.images import save_comparison
from ptqd.io import atomic_path, write_json
from ptqd.metrics import evaluate
from ptqd.metrics.fidelity import fidelity, metrics_path
from ptqd.models import load
from ptqd.sampling import SamplerConfig, Samples, load_samples, sample, save_samples

MODEL = "digits16-cond"
WEIGHT_BITS, ACT_BITS, LOW_ACT_BITS = 4, 8, 4


@dataclass
class DemoSettings:
    """Sizes of the demo: the full one takes under ten minutes on 2 CPU cores, ``quick`` about a minute."""

    num: int = 160  # images per method
    steps: int = 25
    eta: float = 1.0
    guidance: float = 3.0
    calib_samples: int = defaults.CALIB_SAMPLES
    calib_steps: int = defaults.CALIB_STEPS
    noise_samples: int = 128
    batch_size: int = 160
    # a lighter reconstruction than the library default (1024 inputs, 200/100 iterations) keeps the demo
    # within ten minutes on two CPU cores
    options: CalibrationOptions = field(default_factory=lambda: CalibrationOptions(recon_samples=512, weight_iters=100, act_iters=50))

    @classmethod
    def quick(cls) -> "DemoSettings":
        p = defaults.PRESETS["quick"]
        return cls(
            num=40, steps=10, calib_samples=p["calib_samples"], calib_steps=p["calib_steps"], noise_samples=p["noise_samples"],
            batch_size=40, options=CalibrationOptions(**p["options"]),
        )


COLUMNS = [
    "bits", "psnr", "fd_fp_ratio", "fd_fp", "fd", "sfd", "precision", "recall", "accuracy", "mse", "gbops", "size_mb",
    "prep_s", "sample_s",
]
HEADERS = {
    "bits": "bits", "psnr": "PSNR to FP dB", "fd_fp_ratio": "FD→FP / floor", "fd_fp": "FD→FP", "fd": "FD", "sfd": "sFD",
    "precision": "prec.", "recall": "recall", "accuracy": "acc.", "mse": "MSE to FP ×1e3", "gbops": "GBOPs / image",
    "size_mb": "size MB", "prep_s": "calib + stats s", "sample_s": "sampling s",
}


def run_demo(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; return ``{"rows": [...], "settings": ..., ...}`` (also in demo.json)."""
    from ptqd.correction import plan_sampling
    from ptqd.correction.apply import fp_sampling_bops
    from ptqd.quant import QuantConfig
    from ptqd.report import write_report
    from ptqd.runs import quantize

    out = Path(out)
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    t_start = time.perf_counter()
    model = load(MODEL)
    sampler = SamplerConfig("ddim", settings.steps, settings.eta, settings.guidance, seed, settings.batch_size)
    floor_sampler = dataclasses.replace(sampler, seed=seed + 1)
    calib_sampler = dataclasses.replace(sampler, seed=0)
    config = {
        "ptqd": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": MODEL,
        "quick": quick,
        "seed": seed,
        "floor_seed": seed + 1,
        "sampler": asdict(sampler),
        "settings": {**asdict(settings), "options": asdict(settings.options)},
        "weight_bits": WEIGHT_BITS,
        "act_bits": [LOW_ACT_BITS, ACT_BITS],
        "mixed_precision": [LOW_ACT_BITS, ACT_BITS],
    }
    write_json(out / "config.json", config)
    say = print if progress else (lambda *a, **k: None)

    rows: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}

    def generate(key: str, name: str, bits: str, model_, plan=None, sampler_: SamplerConfig = sampler) -> tuple[Samples, float]:
        """The samples of one method: made now, or reused from an interrupted demo."""
        path = out / "samples" / f"{key}.npz"
        s, seconds = _cached(path, sampler_, settings.num, name, bits)
        if s is None:
            say(f"[demo] sampling {settings.num} images: {name} {bits}" + (f" (seed {sampler_.seed})" if sampler_ is not sampler else ""))
            t0 = time.perf_counter()
            s = sample(
                model_, settings.num, sampler_, progress=progress,
                denoise=plan.denoise if plan else None, corrector=plan.corrector if plan else None,
            )
            seconds = time.perf_counter() - t0
            if plan is not None:
                s.config.update(plan.record)
            s.config["demo"] = {"method": name, "bits": bits, "sampling_seconds": round(seconds, 2)}
            save_samples(s, path)
        return s, seconds

    fp_path, floor_path = out / "samples" / "fp32.npz", out / "samples" / "fp32_floor.npz"

    def sampled(key: str, name: str, bits: str, model_, plan=None, extra: dict | None = None) -> dict[str, Any]:
        s, seconds = generate(key, name, bits, model_, plan)
        images[name if name == "FP32" else f"{name} {bits}"] = s.images
        metrics = {**evaluate(s.images, s.labels), **fidelity(s, fp, floor)}
        write_json(metrics_path(out / "samples" / f"{key}.npz"), {
            **metrics, "samples": str(out / "samples" / f"{key}.npz"), "against": str(fp_path), "floor": str(floor_path),
        })
        row = {"name": name, "bits": bits, **metrics, "sample_s": round(seconds, 1), **(extra or {})}
        rows.append(row)
        return row

    # FP32, and FP32 with the next seed: the floor that FD→FP is read against
    fp_size = sum(p.numel() * p.element_size() for p in model.unet.parameters()) / 1e6
    fp, _ = generate("fp32", "FP32", "W32A32", model)
    floor, _ = generate("fp32_floor", "FP32", "W32A32", model, sampler_=floor_sampler)
    sampled("fp32", "FP32", "W32A32", model, extra={"gbops": fp_sampling_bops(model, sampler) / 1e9, "size_mb": fp_size})

    common = dict(calib_samples=settings.calib_samples, calib_steps=settings.calib_steps, sampler=calib_sampler, progress=progress)
    qc = QuantConfig(weight_bits=WEIGHT_BITS, act_bits=ACT_BITS, extra_act_bits=[LOW_ACT_BITS])

    # naive min-max quantization, calibrated for 8- and 4-bit activations
    say(f"[demo] quantizing W{WEIGHT_BITS} (A{ACT_BITS} and A{LOW_ACT_BITS}) with naive min-max ranges")
    t0 = time.perf_counter()
    naive = quantize(model, qc, "naive", settings.options, out=out / "runs" / "naive_w4", **common)
    naive_prep = _seconds(naive, time.perf_counter() - t0)

    # Q-Diffusion calibration + PTQD statistics at A4 and A8 (one run serves every other row)
    say(f"[demo] quantizing W{WEIGHT_BITS} with Q-Diffusion calibration and PTQD noise statistics (A{LOW_ACT_BITS} and A{ACT_BITS})")
    t0 = time.perf_counter()
    _share_calibration_data(out / "runs" / "naive_w4", out / "runs" / "ptqd_w4")
    run = quantize(
        model, qc, "ptqd", settings.options, out=out / "runs" / "ptqd_w4",
        noise_samples=settings.noise_samples, mixed_precision=[LOW_ACT_BITS, ACT_BITS], **common,
    )
    wall = time.perf_counter() - t0
    secs = run.summary.get("seconds", {})
    stats_s = secs.get("noise_statistics", 0.0)
    calib_s = _seconds(run, wall) - stats_s

    for bits in (ACT_BITS, LOW_ACT_BITS):
        tag = f"W{WEIGHT_BITS}A{bits}"
        plan = plan_sampling(naive, sampler, "none", bits)
        sampled(f"naive_{tag.lower()}", "naive", tag, plan.model, plan, _quant_extra(naive, plan, naive_prep))
        plan = plan_sampling(run, sampler, "none", bits)
        sampled(f"qdiff_{tag.lower()}", "Q-Diffusion", tag, plan.model, plan, _quant_extra(run, plan, calib_s))
        plan = plan_sampling(run, sampler, "all", bits, guard=False)  # the paper's PTQD as it is
        sampled(f"ptqd_{tag.lower()}", "PTQD", tag, plan.model, plan, _quant_extra(run, plan, calib_s + stats_s))
    plan = plan_sampling(run, sampler, "all", "mixed", guard=False)
    sampled("ptqd_mixed", "PTQD mixed", f"W{WEIGHT_BITS}A{LOW_ACT_BITS}/{ACT_BITS}", plan.model, plan, _quant_extra(run, plan, calib_s + stats_s))
    rows[-1]["bit_schedule"] = plan.record.get("bit_schedule")
    row = rows[-1]

    # real integer execution of the exported W4A8 checkpoint next to fp32 (A8 throughout)
    say("[demo] exporting the PTQD W4A8 run and timing integer sampling against fp32")
    speed = _real_speed(run, model, out, settings)

    # report
    say("[demo] writing report")
    run_report = write_report(run.path, out / "ptqd_run_report")
    grid = save_comparison(
        images, out / "comparison.png", labels=fp.labels, per_class=1, errors_against="FP32",
        title=f"{MODEL}: same seeds, DDIM {settings.steps} steps, eta {settings.eta:g}, guidance {settings.guidance:g}",
    )
    total = time.perf_counter() - t_start
    result = {"config": config, "rows": rows, "speed": speed, "total_seconds": round(total, 1)}
    write_json(out / "demo.json", result)
    table = format_demo_table(rows)
    _write_report(out, settings, table, rows, grid, run_report, total, config, speed)
    print(table)
    print(f"\nmixed precision: {row.get('bit_schedule')}")
    print(speed["line"])
    print(f"demo finished in {total:.0f} s; wrote {out}/report.md, comparison.png, demo.json")
    return result


def _share_calibration_data(src: Path, dst: Path) -> None:
    """Both runs calibrate on the same FP trajectories: copy them instead of sampling them twice
    (``quantize`` checks that the copied data was made with the same sampler, seed and size)."""
    import shutil

    f = src / "calibration.safetensors"
    if f.is_file() and not (dst / f.name).exists():
        dst.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst / f.name) as tmp:
            shutil.copyfile(f, tmp)


def _real_speed(run, model, out: Path, settings: DemoSettings) -> dict[str, Any]:
    """Export the run (packed integer checkpoint) and time fp32 vs integer-kernel sampling, same batch and steps."""
    from ptqd.runtime import export
    from ptqd.runtime.checkpoint import is_checkpoint
    from ptqd.runtime.speed import measure_speed

    ckpt = out / "model.ptqd"
    if not is_checkpoint(ckpt):
        export(run, ckpt, progress=False)
    run.qnet.to("cpu")
    quick = settings.num < 100
    m = measure_speed(model, ckpt, batch=8 if quick else 16, steps=2 if quick else 10, repeats=1 if quick else 2)
    fp_ips = m["rows"]["fp32"]["images_per_second"]
    int_ips = m["rows"]["int"]["images_per_second"]
    size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) / 1e6
    s = m["settings"]
    line = (
        f"real speed on this CPU (batch {s['batch']}, {s['steps']} steps, guidance {settings.guidance:g}, A8): fp32 {fp_ips:.1f} "
        f"images/s, bf16 autocast {m['rows']['bf16']['images_per_second']:.1f} images/s, integer W4A8 {int_ips:.1f} images/s "
        f"({m['speedup']['int']:.2f}x fp32, {m['speedup_vs_bf16']['int']:.2f}x bf16); checkpoint {ckpt.name} {size:.2f} MB"
    )
    return {"fp32_images_per_second": fp_ips, "bf16_images_per_second": m["rows"]["bf16"]["images_per_second"],
            "int_images_per_second": int_ips, "speedup": m["speedup"]["int"], "speedup_vs_bf16": m["speedup_vs_bf16"]["int"],
            "checkpoint": str(ckpt), "checkpoint_mb": size, "settings": s, "line": line}


def _cached(path: Path, sampler: SamplerConfig, num: int, name: str, bits: str) -> tuple[Samples | None, float]:
    """Reuse samples of an earlier, interrupted demo when they were made by the same method with the same
    sampler and size."""
    if not path.is_file():
        return None, 0.0
    try:
        s = load_samples(path)
    except PtqdError:
        return None, 0.0
    cfg = s.config
    same = len(s.images) == num and all(cfg.get(k) == v for k, v in asdict(sampler).items() if k != "batch_size")
    same = same and cfg.get("demo", {}).get("method") == name and cfg.get("demo", {}).get("bits") == bits
    if not same:
        return None, 0.0
    return s, float(cfg.get("demo", {}).get("sampling_seconds", 0.0))


def _seconds(run, wall: float) -> float:
    """Calibration (+ statistics) seconds of a run: the measured wall time, or the recorded one when the
    run was loaded from an earlier demo."""
    secs = run.summary.get("seconds", {})
    recorded = secs.get("total_calibration", 0.0) + secs.get("noise_statistics", 0.0)
    return recorded if wall < 0.5 * recorded else wall


def _quant_extra(run, plan, prep_s: float) -> dict[str, Any]:
    return {
        "gbops": plan.record["sampling_bops"] / 1e9,
        "size_mb": run.summary["size"]["bytes"] / 1e6,
        "prep_s": round(prep_s, 1),
    }


def format_demo_table(rows: list[dict[str, Any]]) -> str:
    """The demo's markdown table: fidelity to FP first, then distances to real digits, then cost. ``*``
    marks numbers resting on too few images (explained below the table)."""
    from ptqd.metrics.caveats import caveats, footnotes

    lines = ["| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        flagged = caveats(r, COLUMNS)
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            if v is None:
                cells.append("–")
            elif c == "psnr" and r.get("identical") == r.get("num_pairs"):
                cells.append("= FP")
            elif c == "psnr":
                cells.append(f"{v:.2f} ± {r.get('psnr_std', 0.0):.2f}")
            elif c == "mse":
                cells.append(f"{1000 * v:.2f}")
            elif c in ("precision", "recall", "accuracy"):
                cells.append(f"{v:.3f}")
            elif c in ("gbops", "prep_s", "sample_s"):
                cells.append(f"{v:.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:.2f}")
            else:
                cells.append(str(v))
            if c in flagged:
                cells[-1] += "*"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = footnotes(rows, COLUMNS)
    return "\n".join(lines + ([""] + notes if notes else []))


def _write_report(out, settings, table, rows, grid, run_report: Path, total: float, config: dict, speed: dict) -> None:
    rel = run_report.parent.relative_to(out)
    pngs = sorted(run_report.parent.glob("*.png"))
    mixed = next((r.get("bit_schedule") for r in rows if r.get("bit_schedule")), None)
    floor = next((r.get("fd_fp_floor") for r in rows if r.get("fd_fp_floor") is not None), None)
    lines = [
        f"# ptqd demo: {MODEL}, W{WEIGHT_BITS}A{ACT_BITS} and W{WEIGHT_BITS}A{LOW_ACT_BITS}",
        "",
        f"{settings.num} images per method, DDIM {settings.steps} steps, eta {settings.eta:g}, guidance "
        f"{settings.guidance:g}, seed {config['seed']} (every method gets the same initial noise, labels and step "
        f"noise); calibration {settings.calib_samples} trajectories × {settings.calib_steps} steps; PTQD noise "
        f"statistics from {settings.noise_samples} trajectories. ptqd {__version__}, torch {torch.__version__}, "
        f"{config['torch_threads']} threads. Total {total:.0f} s.",
        "",
        table,
        "",
        "Read the first columns first: they say how close each method stays to its own FP model. PSNR to FP:",
        "per-image PSNR (mean ± std over images) against the FP32 image of the same seed, label and noise.",
        f"FD→FP: Fréchet distance of the bundled digit classifier's features to the FP32 sample set; the floor is",
        f"the same distance between FP32 sets of seeds {config['seed']} and {config['floor_seed']}"
        + (f" ({floor:.2f} here)" if floor is not None else "")
        + ", so FD→FP / floor near 1 means",
        "indistinguishable from FP at this sample count (below 1: closer to the FP set than a second FP seed is, as",
        "paired samples can be; above 1: a shift a second FP run would not show). FD/sFD, precision, recall: against the held-out real",
        "digits; on this model quantization noise adds diversity that these reward, so a method can beat FP",
        "there while departing from it. MSE to FP: mean squared pixel difference (pixels in [0, 1]). GBOPs per",
        "image over the whole sampling run (all steps, both guidance branches). Size: weights as stored by the",
        "method (4-bit weights packed).",
        "",
        f"PTQD mixed precision, activation bits per step: {mixed}",
        "",
        f"Real integer execution (`ptqd export` + integer kernels, `model.ptqd/`): {speed['line']}.",
        "Sampling seconds in the table are simulated (fake) quantization, which is slower than fp32.",
        "",
        "## Samples (same seeds) and where each method departs from FP",
        "",
        "One sample per class (rows); each method's column is followed by its error map |method − FP32|.",
        "",
        f"![comparison]({grid.name})",
        "",
        "## PTQD noise statistics of the W4 run",
        "",
        f"Full run report: [{rel}/report.md]({rel}/report.md).",
        "",
        *[f"![{p.stem}]({rel}/{p.name})" for p in pngs],
        "",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
