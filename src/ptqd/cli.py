"""The ``ptqd`` command. It parses arguments and calls library functions; nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptqd", description="Post-training quantization of diffusion models (PTQD).")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the bundled models")

    s = sub.add_parser("sample", help="generate images and save them as .npz")
    s.add_argument(
        "run", nargs="?", type=Path, default=None,
        help="quantization run directory (from `ptqd quantize`) or exported checkpoint (from `ptqd export`)",
    )
    s.add_argument(
        "--backend", choices=["int", "fake"], default=None,
        help="for an exported checkpoint: int = integer kernels (default), fake = simulated quantization",
    )
    s.add_argument("--model", default=None, help="bundled model name or model directory (full precision)")
    s.add_argument(
        "--act-bits", default=None,
        help="activation bits of a run: one it was calibrated for, or 'mixed' (per step; default for a PTQD mixed-precision run)",
    )
    s.add_argument(
        "--correct", default=None,
        help="PTQD corrections: none, all, or a subset of cnc,bc,vsc (default: all for a --method ptqd run, else none)",
    )
    s.add_argument("--low-bit-steps", type=int, default=None, help="mixed precision override: the first N steps at the lowest bit-width")
    s.add_argument("--criterion", default=None, help="mixed-precision rule: snr-unscaled (default) or snr (see ptqd.correction.mixed)")
    s.add_argument("--device", default="cpu", help="torch device to sample on (cpu, cuda, …)")
    s.add_argument("--num", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0 = deterministic)")
    s.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: a run's calibration guidance, else 1)"
    )
    s.add_argument("--labels", type=_labels, default=None, help="class labels, cycled (default 0..9 cycled)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=250)
    s.add_argument("--out", type=Path, required=True, help="output .npz (a .json with the config is written beside it)")
    s.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("quantize", help="quantize a model and calibrate it; writes a run directory")
    q.add_argument("--model", required=True, help="bundled model name or model directory")
    q.add_argument("--weight-bits", type=int, default=8)
    q.add_argument("--act-bits", type=int, default=8)
    q.add_argument("--extra-act-bits", type=_labels, default=[], help="more activation bit-widths to calibrate, e.g. 4")
    q.add_argument("--softmax-bits", type=int, default=8, help="bit-width of the attention softmax output")
    q.add_argument(
        "--method", choices=["naive", "qdiff", "ptqd"], default="qdiff",
        help="naive: min-max ranges; qdiff: Q-Diffusion calibration; ptqd: qdiff + noise statistics for correction",
    )
    q.add_argument("--noise-samples", type=int, default=256, help="FP trajectories for the noise statistics (ptqd; 0: collect later with `ptqd stats`)")
    q.add_argument("--noise-seed", type=int, default=2000, help="seed of the noise-statistics trajectories (ptqd)")
    q.add_argument(
        "--mixed-precision", type=_labels, default=None, metavar="BITS",
        help="activation bit-widths to choose from per step, e.g. 4,8 (ptqd)",
    )
    q.add_argument("--weight-scale", choices=["minmax", "mse", "percentile"], default=None, help="default: naive minmax, qdiff mse")
    q.add_argument("--act-scale", choices=["minmax", "mse", "percentile"], default=None, help="default: naive minmax, qdiff mse")
    q.add_argument("--percentile", type=float, default=99.99)
    q.add_argument("--per-tensor-weights", action="store_true", help="one weight scale per layer (default: per output channel)")
    q.add_argument("--symmetric-weights", action="store_true")
    q.add_argument("--symmetric-acts", action="store_true")
    q.add_argument("--first-last-bits", type=int, default=8, help="bit-width floor of the first and last layer (0: no exception)")
    q.add_argument("--eight-bit", nargs="*", default=[], metavar="LAYER", help="more layers (name patterns) kept at 8 bit")
    q.add_argument("--keep-float", nargs="*", default=[], metavar="LAYER", help="layers (name patterns) left unquantized")
    q.add_argument("--no-attention-quant", action="store_true", help="leave the attention matmuls in float")
    q.add_argument("--no-split-shortcut", action="store_true", help="one quantizer for skip-concatenation inputs")
    q.add_argument("--calib-samples", type=int, default=256, help="FP sampling trajectories for calibration data")
    q.add_argument("--calib-steps", type=int, default=10, help="evenly spaced sampler steps kept per trajectory")
    q.add_argument("--calib-seed", type=int, default=1000)
    q.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler of the calibration trajectories")
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--eta", type=float, default=1.0)
    q.add_argument("--guidance", type=float, default=None, help="default 3.0 for conditional models")
    q.add_argument("--recon-samples", type=int, default=1024, help="network inputs used for block reconstruction")
    q.add_argument("--weight-iters", type=int, default=200, help="AdaRound iterations per block (qdiff)")
    q.add_argument("--act-iters", type=int, default=100, help="step-size learning iterations per block and bit-width (qdiff)")
    q.add_argument("--recon-batch", type=int, default=32)
    q.add_argument("--seed", type=int, default=0, help="seed of the reconstruction's minibatches")
    q.add_argument("--out", type=Path, required=True, help="run directory")
    q.add_argument("--no-progress", action="store_true")

    st = sub.add_parser("stats", help="collect PTQD noise statistics of a run for a sampler setting")
    st.add_argument("run", type=Path, help="quantization run directory")
    st.add_argument("--scheduler", choices=["ddim", "ddpm"], default=None, help="default: the run's calibration sampler")
    st.add_argument("--steps", type=int, default=None)
    st.add_argument("--eta", type=float, default=None)
    st.add_argument("--guidance", type=float, default=None)
    st.add_argument("--act-bits", type=_labels, default=None, help="bit-widths to collect for (default: all calibrated)")
    st.add_argument("--noise-samples", type=int, default=None, help="default: the run's, else 256")
    st.add_argument("--seed", type=int, default=None, help="default: the run's noise seed, else 2000")
    st.add_argument("--keep-negative-k", action="store_true", help="do not clamp k_t at 0")
    st.add_argument("--mean-of", choices=["error", "residual"], default="error", help="what μ_t averages (official: error)")
    st.add_argument("--batch-size", type=int, default=250)
    st.add_argument("--device", default="cpu")
    st.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="write a quantization run as a packed integer checkpoint (no FP weights needed to load)")
    x.add_argument("run", type=Path, help="quantization run directory")
    x.add_argument("--out", type=Path, required=True, help="checkpoint directory, e.g. model.ptqd")

    r = sub.add_parser("report", help="plots and a markdown summary of a run's noise statistics")
    r.add_argument("run", type=Path)
    r.add_argument("--out", type=Path, default=None, help="directory for report.md and PNGs (default: RUN/report)")

    e = sub.add_parser("evaluate", help="sample-quality metrics of a samples .npz")
    e.add_argument("samples", type=Path)
    e.add_argument("--reference", default="digits16", help="bundled reference name or reference .npz")
    e.add_argument("--out", type=Path, default=None, help="metrics JSON (default: metrics.json beside the samples)")

    d = sub.add_parser("demo", help="sample the bundled model and evaluate it")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--quick", action="store_true", help="a seconds-long version")
    d.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from ptqd.errors import PtqdError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PtqdError as e:
        print(f"ptqd: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "models":
        from ptqd.models import list_models

        print("\n".join(list_models()))
    elif args.command == "sample":
        from ptqd.errors import PtqdError
        from ptqd.models import load
        from ptqd.runs import load_run
        from ptqd.sampling import SamplerConfig, sample, save_samples

        if (args.run is None) == (args.model is None):
            raise PtqdError("give either a run directory (ptqd sample RUN) or --model NAME, not both or neither")
        guidance = args.guidance
        plan = None
        if args.run is not None:
            from ptqd.correction import plan_sampling

            from ptqd.runtime import is_checkpoint, load_checkpoint

            if is_checkpoint(args.run):
                run = load_checkpoint(args.run, backend=args.backend or "int").to(args.device)
            elif args.backend is not None:
                raise PtqdError(f"--backend needs an exported checkpoint (`ptqd export {args.run} --out DIR`), not a run directory")
            else:
                run = load_run(args.run).to(args.device)
            if guidance is None:
                guidance = run.config["calibration"].get("guidance") or 1.0
            config = SamplerConfig(args.scheduler, args.steps, args.eta, guidance, args.seed, args.batch_size)
            correct = args.correct if args.correct is not None else ("all" if run.config["method"] == "ptqd" else "none")
            from ptqd.correction import DEFAULT_CRITERION

            plan = plan_sampling(run, config, correct, args.act_bits, args.low_bit_steps, args.criterion or DEFAULT_CRITERION)
            model = plan.model
            if getattr(run.qnet, "ptqd_backend", None):
                plan.record["checkpoint"] = {"path": str(args.run), "backend": run.qnet.ptqd_backend}
            for note in plan.record.get("notes", []):
                print(f"note: {note}")
            if "bit_schedule" in plan.record:
                print(f"activation bits per step: {plan.record['bit_schedule']}")
        else:
            if args.act_bits is not None or args.correct is not None or args.low_bit_steps is not None or args.criterion or args.backend:
                raise PtqdError("--act-bits, --correct, --low-bit-steps, --criterion and --backend need a quantization run or checkpoint")
            model = load(args.model).to(args.device)
            config = SamplerConfig(args.scheduler, args.steps, args.eta, 1.0 if guidance is None else guidance, args.seed, args.batch_size)
        samples = sample(
            model, args.num, config, labels=args.labels, progress=not args.no_progress,
            denoise=plan.denoise if plan else None, corrector=plan.corrector if plan else None,
        )
        if plan is not None:
            samples.config.update(plan.record)
        path = save_samples(samples, args.out)
        print(f"wrote {len(samples.images)} images to {path} (config: {path.with_suffix('.json')})")
    elif args.command == "evaluate":
        from ptqd.io import write_json
        from ptqd.metrics import evaluate, format_table
        from ptqd.sampling import load_samples

        samples = load_samples(args.samples)
        metrics = evaluate(samples.images, samples.labels, reference=args.reference)
        metrics["samples"] = str(args.samples)
        out = args.out or args.samples.parent / "metrics.json"
        write_json(out, metrics)
        print(format_table([{"name": args.samples.name, **metrics}]))
        print(f"wrote {out}")
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "stats":
        _stats(args)
    elif args.command == "export":
        from ptqd.runtime import export

        export(args.run, args.out)
    elif args.command == "report":
        from ptqd.report import write_report

        path = write_report(args.run, args.out)
        print(f"wrote {path}")
    elif args.command == "demo":
        from ptqd.demo import run_demo

        run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def _quantize(args: argparse.Namespace) -> None:
    from ptqd.calibration import CalibrationOptions
    from ptqd.metrics import format_table
    from ptqd.models import load
    from ptqd.quant import QuantConfig
    from ptqd.runs import quantize
    from ptqd.sampling import SamplerConfig

    model = load(args.model)
    config = QuantConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        extra_act_bits=args.extra_act_bits,
        softmax_bits=args.softmax_bits,
        weight_symmetric=args.symmetric_weights,
        weight_per_channel=not args.per_tensor_weights,
        act_symmetric=args.symmetric_acts,
        weight_method=args.weight_scale,
        act_method=args.act_scale,
        percentile=args.percentile,
        first_last_bits=args.first_last_bits or None,
        eight_bit_layers=args.eight_bit,
        keep_float=args.keep_float,
        quantize_attention=not args.no_attention_quant,
        split_shortcut=not args.no_split_shortcut,
    )
    options = CalibrationOptions(
        method=args.method,
        recon_samples=args.recon_samples,
        weight_iters=args.weight_iters,
        act_iters=args.act_iters,
        batch_size=args.recon_batch,
        seed=args.seed,
    )
    guidance = args.guidance if args.guidance is not None else (3.0 if model.conditional else 1.0)
    sampler = SamplerConfig(args.scheduler, args.steps, args.eta, guidance)
    run = quantize(
        model, config, args.method, options, args.calib_samples, args.calib_steps, sampler, args.calib_seed,
        out=args.out, progress=not args.no_progress, noise_samples=args.noise_samples, noise_seed=args.noise_seed,
        mixed_precision=args.mixed_precision,
    )
    s = run.summary
    row = {
        "name": run.model.name,
        "macs": s["bops"]["macs"],
        "gbops": s["bops"]["bops"] / 1e9,
        "bops_saving": s["bops"]["bops_saving"],
        "size_mb": s["size"]["bytes"] / 1e6,
        "size_ratio": s["size"]["ratio"],
        "calib_seconds": s["seconds"].get("total_calibration"),
    }
    print(format_table([row], list(row)[1:]))
    print(f"wrote {args.out}/config.json, quant_state.safetensors, summary.json")
    if run.stats is not None:
        _print_stats(run, run.stats)


def _stats(args: argparse.Namespace) -> None:
    import dataclasses

    from ptqd.correction import StatsRequest, collect_stats
    from ptqd.runs import load_run
    from ptqd.sampling import SamplerConfig

    run = load_run(args.run).to(args.device)
    cal = run.config["calibration"]
    ptqd_cfg = run.config.get("correction") or {}
    sampler = SamplerConfig(
        args.scheduler or cal["scheduler"],
        args.steps or cal["steps"],
        cal["eta"] if args.eta is None else args.eta,
        (cal.get("guidance") or 1.0) if args.guidance is None else args.guidance,
        batch_size=args.batch_size,
    )
    seed = args.seed if args.seed is not None else ptqd_cfg.get("noise_seed", 2000)
    request = StatsRequest(
        sampler=dataclasses.replace(sampler, seed=seed),
        num_samples=args.noise_samples or ptqd_cfg.get("noise_samples") or 256,
        bits=args.act_bits or [],
        seed=seed,
        clamp_k=not args.keep_negative_k,
        mean_of=args.mean_of,
    )
    stats = collect_stats(run, request, out=args.run, progress=not args.no_progress)
    _print_stats(run, stats)


def _print_stats(run, stats) -> None:
    from ptqd.metrics import format_table

    rows = []
    for b in stats.bits:
        for row in stats.table(b)[:: max(1, len(stats.timesteps) // 10)]:
            rows.append({"name": f"A{b} t={row['t']}", **{k: row[k] for k in ("k", "r", "sigma", "rel_err")}})
    print(format_table(rows, ["k", "r", "sigma", "rel_err"]))
    if len(stats.bits) > 1:
        from ptqd.correction import DEFAULT_CRITERION, describe_schedule, schedule_for
        from ptqd.correction.apply import bops_per_bits
        from ptqd.correction.mixed import sampling_bops
        from ptqd.sampling import SamplerConfig

        m = stats.meta
        sampler = SamplerConfig(m["scheduler"], m["steps"], m["eta"] if m["eta"] is not None else 1.0, m.get("guidance") or 1.0)
        schedule = schedule_for(run, stats, sampler)
        bops = bops_per_bits(run, stats.bits)
        cfg = 2 if m.get("guidance") not in (None, 1.0) else 1
        mixed = sampling_bops(bops, schedule, cfg)
        fixed = ", ".join(f"A{b} {sampling_bops(bops, {t: b for t in schedule}, cfg) / 1e9:.1f}" for b in stats.bits)
        print(f"mixed precision ({DEFAULT_CRITERION}): {describe_schedule(schedule)}")
        print(f"GBOPs per image for the whole sampling run: mixed {mixed / 1e9:.1f} ({fixed})")
    print(f"wrote {stats.path} (+ .json); plots: `ptqd report {run.path}`")


if __name__ == "__main__":
    sys.exit(main())
