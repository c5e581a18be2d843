"""The ``ptqd`` command. It parses arguments and calls library functions; nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _labels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"needs at least one integer, got {text!r}")
    return values


OVERWRITE_HELP = "write over an existing output that ptqd did not write (by default it is refused)"

# what an interrupted command leaves behind (printed on Ctrl-C)
KEPT = {
    "quantize": "the calibration data and finished results in the run directory are kept; rerunning the same command resumes",
    "stats": "the finished batches (RUN/noise_stats_*.parts/) are kept; rerunning the same command resumes",
    "sample": "finished chunks (OUT.shards/, runs larger than --chunk-size) are kept and rerunning the same command "
              "resumes; a run of one chunk is redone",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# help of options that several commands share (by destination)
COMMON_HELP = {
    "no_progress": "no progress bars (long commands still print one line per stage)",
    "scheduler": "sampler: ddim or ddpm",
    "steps": "sampler steps",
    "eta": "DDIM eta (0: deterministic, 1: as stochastic as DDPM)",
    "seed": "seed of the samples' noise (sample i draws from a generator seeded by (seed, i))",
    "batch_size": "images per batch (quantized results depend on it at the 1e-7 level: compare runs of one batch size)",
    "device": "torch device (cpu, cuda, …)",
    "overwrite": "write over an existing output that ptqd did not write (by default it is refused)",
}


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every option gets a help text (shared ones from COMMON_HELP); one without is a bug caught here."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _finish(sp)
        elif action.help is None:
            if action.dest not in COMMON_HELP:
                raise RuntimeError(f"option {action.option_strings or action.dest} of `{parser.prog}` has no help text")
            action.help = COMMON_HELP[action.dest]


def build_parser() -> argparse.ArgumentParser:
    from ptqd import defaults as D
    from ptqd.correction.models import MODELS as CORRECTION_MODELS

    p = argparse.ArgumentParser(prog="ptqd", description="Post-training quantization of diffusion models (PTQD).", formatter_class=_Help)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of unexpected errors (and of Ctrl-C)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the bundled models", formatter_class=_Help)

    s = sub.add_parser(formatter_class=_Help, name="sample", help="generate images and save them as .npz")
    s.add_argument(
        "run", nargs="?", type=Path, default=None,
        help="quantization run directory (from `ptqd quantize`) or exported checkpoint (from `ptqd export`)",
    )
    s.add_argument(
        "--backend", choices=["int", "fake"], default=None,
        help="for an exported checkpoint: int = integer kernels (default), fake = simulated quantization",
    )
    s.add_argument(
        "--model", default=None,
        help="bundled model name, diffusers pipeline directory or cached hub id (full precision); with RUN: where the "
        "run's FP model is now, if it moved (accepted when its weights match the run's)",
    )
    s.add_argument("--prompts", type=Path, default=None, help="text-to-image models: prompts file, one per line (default for a run: its calibration prompts)")
    s.add_argument(
        "--act-bits", default=None,
        help="activation bits of a run: one it was calibrated for, or 'mixed' (per step; default for a PTQD mixed-precision run)",
    )
    s.add_argument(
        "--correct", default=None,
        help="corrections: none, all, or a subset of cnc,bc,vsc (default: all for a --method ptqd run, else none); "
        "with a regression --correction-model, cnc/bc stand for its map",
    )
    s.add_argument(
        "--correction-model", choices=list(CORRECTION_MODELS), default=None,
        help=f"how the quantization error is corrected: ptqd (the paper's CNC/BC, default), mean (per-channel conditional "
        "mean of ε given ε̂), content (ε regressed on ε̂ and x_t across channels), content-pixel (content + a per-pixel bias "
        "map), debias/debias-pixel (the fitted error model inverted), posterior (between content and debias, `ptqd stats --tau`), "
        "matched (fitted on lockstep FP/corrected trajectories, `ptqd stats --matched`); VSC uses each model's own residual variance",
    )
    s.add_argument(
        "--no-guard", action="store_true",
        help="apply the correction as it is (the paper's PTQD exactly); by default it is blended per block of steps by its "
        f"measured effect on the final samples ({D.GUARD_SAMPLES} trajectories of seed {D.GUARD_SEED}), never worse than none there",
    )
    s.add_argument("--low-bit-steps", type=int, default=None, help="mixed precision override: the first N steps at the lowest bit-width")
    s.add_argument("--criterion", default=None, help="mixed-precision rule: snr-unscaled (default) or snr (see ptqd.correction.mixed)")
    s.add_argument(
        "--fidelity-budget", type=float, default=None,
        help="mixed precision by budget: the cheapest bit schedule whose predicted MSE to FP stays within this factor "
        "(e.g. 1.5) of the all-high-bit run's",
    )
    s.add_argument(
        "--budget-propagation", choices=["measured", "gaussian"], default=None,
        help="how the budget predicts each step's share of the final error: measured (quantize that step alone on "
        f"{D.SENSITIVITY_SAMPLES} FP trajectories, cached in the run; default) or gaussian (the statistics' residual "
        "propagated through the sampler linearised around Gaussian data: free, blind to how the model carries early errors)",
    )
    s.add_argument("--device", default="cpu", help="torch device to sample on (cpu, cuda, …)")
    s.add_argument(
        "--num", "--num-samples", dest="num", type=int, default=D.NUM_SAMPLES,
        help=f"number of images (default {D.NUM_SAMPLES}); under torchrun spell it --num-samples (torchrun mistakes --num for its --numa-binding)",
    )
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default=D.SCHEDULER)
    s.add_argument("--steps", type=int, default=D.STEPS)
    s.add_argument("--eta", type=float, default=D.ETA)
    s.add_argument(
        "--guidance", type=float, default=None,
        help=f"classifier-free guidance scale (default: a run's calibration guidance; a conditional FP model {D.GUIDANCE:g})",
    )
    s.add_argument(
        "--collect-stats", action="store_true",
        help="a run without noise statistics for this sampler collects them first (else it stops before any work, "
        "naming the `ptqd stats` command)",
    )
    s.add_argument("--labels", type=_labels, default=None, help="class labels, cycled (default 0..9 cycled)")
    s.add_argument("--seed", type=int, default=D.SEED)
    s.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    s.add_argument("--out", type=Path, required=True, help="output .npz (a .json with the config is written beside it)")
    s.add_argument(
        "--chunk-size", type=int, default=D.CHUNK_SIZE,
        help="runs larger than this (or under torchrun) are made in chunks of this many images in OUT.shards/, resumable",
    )
    s.add_argument("--keep-chunks", action="store_true", help="keep OUT.shards/ after merging")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("--no-progress", action="store_true")

    q = sub.add_parser(formatter_class=_Help, name="quantize", help="quantize a model and calibrate it; writes a run directory")
    q.add_argument("--model", required=True, help="bundled model name, diffusers pipeline directory or cached hub id")
    q.add_argument("--prompts", type=Path, default=None, help="text-to-image models: prompts file (one per line) for calibration and statistics")
    q.add_argument("--weight-bits", type=int, default=8, help="weight bit-width (2-8; 16: float)")
    q.add_argument("--act-bits", type=int, default=8, help="activation bit-width (2-8; 16: float)")
    q.add_argument("--extra-act-bits", type=_labels, default=[], help="more activation bit-widths to calibrate, e.g. 4")
    q.add_argument("--softmax-bits", type=int, default=8, help="bit-width of the attention softmax output")
    q.add_argument(
        "--method", choices=["naive", "qdiff", "ptqd"], default="qdiff",
        help="naive: min-max ranges; qdiff: Q-Diffusion calibration; ptqd: qdiff + noise statistics for correction",
    )
    q.add_argument(
        "--preset", choices=sorted(D.PRESETS), default="default",
        help="calibration sizes: default (the settings ptqd's results use), quick (about a minute on the bundled model "
        "on 2 CPU cores); the options below override single values",
    )
    q.add_argument("--quick", action="store_true", help="same as --preset quick")
    q.add_argument(
        "--noise-samples", type=int, default=None,
        help=f"FP trajectories for the noise statistics (ptqd; 0: collect later with `ptqd stats`; default: the preset's, {D.NOISE_SAMPLES})",
    )
    q.add_argument("--noise-seed", type=int, default=D.NOISE_SEED, help="seed of the noise-statistics trajectories (ptqd)")
    q.add_argument(
        "--mixed-precision", type=_labels, default=None, metavar="BITS",
        help="activation bit-widths to choose from per step, e.g. 4,8 (ptqd)",
    )
    q.add_argument("--weight-scale", choices=["minmax", "mse", "percentile"], default=None, help="default: naive minmax, qdiff mse")
    q.add_argument("--act-scale", choices=["minmax", "mse", "percentile"], default=None, help="default: naive minmax, qdiff mse")
    q.add_argument("--percentile", type=float, default=99.99, help="clipping percentile of the percentile scale method")
    q.add_argument("--per-tensor-weights", action="store_true", help="one weight scale per layer (default: per output channel)")
    q.add_argument("--symmetric-weights", action="store_true", help="symmetric weight grids (default: asymmetric, with zero points)")
    q.add_argument("--symmetric-acts", action="store_true", help="symmetric activation grids (default: asymmetric)")
    q.add_argument("--first-last-bits", type=int, default=8, help="bit-width floor of the first and last layer (0: no exception)")
    q.add_argument("--eight-bit", nargs="*", default=[], metavar="LAYER", help="more layers (name patterns) kept at 8 bit")
    q.add_argument("--keep-float", nargs="*", default=[], metavar="LAYER", help="layers (name patterns) left unquantized")
    q.add_argument("--no-attention-quant", action="store_true", help="leave the attention matmuls in float")
    q.add_argument("--no-split-shortcut", action="store_true", help="one quantizer for skip-concatenation inputs")
    q.add_argument("--calib-samples", type=int, default=None, help=f"FP sampling trajectories for calibration data (default: the preset's, {D.CALIB_SAMPLES})")
    q.add_argument("--calib-steps", type=int, default=None, help=f"evenly spaced sampler steps kept per trajectory (default: the preset's, {D.CALIB_STEPS})")
    q.add_argument("--calib-seed", type=int, default=D.CALIB_SEED, help="seed of the calibration trajectories (never an evaluation seed)")
    q.add_argument("--scheduler", choices=["ddim", "ddpm"], default=D.SCHEDULER, help="sampler of the calibration and statistics trajectories")
    q.add_argument("--steps", type=int, default=D.STEPS, help="sampler steps of the calibration and statistics trajectories")
    q.add_argument("--eta", type=float, default=D.ETA, help="DDIM eta of the calibration and statistics trajectories")
    q.add_argument("--guidance", type=float, default=None, help=f"guidance of the trajectories (default {D.GUIDANCE:g} for conditional models)")
    q.add_argument("--recon-samples", type=int, default=None, help=f"network inputs used for block reconstruction (default: the preset's, {D.RECON_SAMPLES})")
    q.add_argument("--weight-iters", type=int, default=None, help=f"AdaRound iterations per block (qdiff; default: the preset's, {D.WEIGHT_ITERS})")
    q.add_argument("--act-iters", type=int, default=None, help=f"step-size learning iterations per block and bit-width (qdiff; default: the preset's, {D.ACT_ITERS})")
    q.add_argument("--recon-batch", type=int, default=None, help=f"minibatch of the reconstruction (default: the preset's, {D.RECON_BATCH})")
    q.add_argument(
        "--block-order", choices=D.BLOCK_ORDERS, default=D.BLOCK_ORDER,
        help="order of block reconstruction (qdiff): registration (module order: down, up, then mid blocks; default) or "
        "forward (the order the forward pass runs the blocks)",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the reconstruction's minibatches")
    q.add_argument("--device", default="cpu", help="torch device to calibrate on (cpu, cuda, …); the run directory loads anywhere")
    q.add_argument("--out", type=Path, required=True, help="run directory")
    q.add_argument("--overwrite", action="store_true", help="write into an existing directory that is not a ptqd run")
    q.add_argument("--no-progress", action="store_true")

    st = sub.add_parser(formatter_class=_Help, name="stats", help="collect PTQD noise statistics of a run for a sampler setting")
    st.add_argument("run", type=Path, help="quantization run directory")
    st.add_argument("--scheduler", choices=["ddim", "ddpm"], default=None, help="default: the run's calibration sampler")
    st.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's calibration sampler)")
    st.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's calibration sampler)")
    st.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's calibration sampler)")
    st.add_argument("--act-bits", type=_labels, default=None, help="bit-widths to collect for (default: all calibrated)")
    st.add_argument("--noise-samples", type=int, default=None, help=f"FP trajectories (default: the run's, else {D.NOISE_SAMPLES})")
    st.add_argument("--seed", type=int, default=None, help=f"seed of the trajectories (default: the run's noise seed, else {D.NOISE_SEED})")
    st.add_argument("--keep-negative-k", action="store_true", help="do not clamp k_t at 0")
    st.add_argument("--mean-of", choices=["error", "residual"], default="error", help="what μ_t averages (official: error)")
    st.add_argument(
        "--heldout-samples", type=int, default=None,
        help=f"trajectories of seed {D.HELDOUT_SEED} every correction model is scored on (default: a quarter of the "
        f"statistics' trajectories, at most {D.HELDOUT_SAMPLES}; 0: none)",
    )
    st.add_argument("--ridge", type=float, default=None, help=f"ridge penalty of the regression correction models (default {D.RIDGE:g})")
    st.add_argument(
        "--matched", action="store_true",
        help=f"also fit the trajectory-matched correction model (`--correction-model matched`): FP and the corrected quantized "
        f"sampler in lockstep on {D.MATCHED_SAMPLES} trajectories of the statistics' seed (DDIM only)",
    )
    st.add_argument("--tau", type=float, default=None,
                    help=f"horizon τ of the posterior correction model: 1 = content, larger → debias (default {D.POSTERIOR_TAU:g})")
    st.add_argument(
        "--drive", choices=["fp", "quantized"], default="fp",
        help="which network drives the statistics trajectories: fp (PTQD's Algorithm 1) or quantized (each bit-width its "
        "own trajectories, the FP network evaluated on them: the error where the quantized sampler goes)",
    )
    st.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    st.add_argument("--device", default="cpu")
    st.add_argument("--no-progress", action="store_true")

    x = sub.add_parser(formatter_class=_Help, name="export", help="write a quantization run as a packed integer checkpoint (no FP weights needed to load)")
    x.add_argument("run", type=Path, help="quantization run directory")
    x.add_argument("--out", type=Path, required=True, help="checkpoint directory, e.g. model.ptqd")
    x.add_argument("--overwrite", action="store_true", help="write into an existing directory that is not a ptqd checkpoint")

    u = sub.add_parser(formatter_class=_Help, name="upgrade",
                       help="give a run directory or checkpoint without an integrity record one, after checking what can be checked")
    u.add_argument("path", type=Path, help="quantization run directory or exported checkpoint")
    u.add_argument("--model", default=None, help="where the run's FP model is now, if it moved")
    u.add_argument("--force", action="store_true", help="write the record even when the quantized network's error looks too large")

    r = sub.add_parser(formatter_class=_Help, name="report", help="plots and a markdown summary of a run's noise statistics")
    r.add_argument("run", type=Path, help="quantization run directory")
    r.add_argument("--out", type=Path, default=None, help="directory for report.md and PNGs (default: RUN/report)")
    r.add_argument("--overwrite", action="store_true", help="write into an existing directory that is not a ptqd report")

    c = sub.add_parser(formatter_class=_Help, name="compare", help="tabulate several runs (and samples .npz files) side by side")
    c.add_argument("paths", type=Path, nargs="+", help="run directories and/or samples .npz files")
    c.add_argument("--out", type=Path, default=None, help="also write OUT.md (table + FD-vs-BOPs plot) and OUT.json")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    e = sub.add_parser(formatter_class=_Help, name="evaluate", help="sample-quality metrics of a samples .npz")
    e.add_argument("samples", type=Path, help="samples .npz (from `ptqd sample`)")
    e.add_argument(
        "--evaluator", choices=["digits", "inception"], default="digits",
        help="digits: the bundled digit classifier (offline); inception: FID/sFID/IS/precision/recall as the ADM evaluator",
    )
    e.add_argument(
        "--reference", default=None,
        help="digits: bundled reference name or reference .npz (default digits16); inception: reference batch .npz (ADM's or `ptqd reference`)",
    )
    e.add_argument("--inception", type=Path, default=None, help="FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth)")
    e.add_argument("--device", default="cpu", help="device of the Inception network")
    e.add_argument("--batch-size", type=int, default=100, help="Inception batch size")
    e.add_argument(
        "--against", type=Path, default=None, metavar="FP.npz",
        help="FP samples of the same seeds: adds paired PSNR/SSIM/MSE per image and FD→FP (the Fréchet distance to the FP set)",
    )
    e.add_argument(
        "--floor", type=Path, default=None, metavar="FP_OTHER.npz",
        help="FP samples of another seed: the noise floor of FD→FP (FD between the two FP sets), shown as FD→FP / floor",
    )
    e.add_argument("--out", type=Path, default=None, help="metrics JSON (default: S.metrics.json beside S.npz)")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.add_argument("--no-progress", action="store_true")

    rf = sub.add_parser(formatter_class=_Help, name="reference", help="build an Inception reference batch (.npz, ADM format) from real images")
    rf.add_argument("images", type=Path, help=".npz with images (or ADM's arr_0), or a directory of image files of one size")
    rf.add_argument("--out", type=Path, required=True, help="reference .npz")
    rf.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    rf.add_argument("--inception", type=Path, default=None, help="FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth)")
    rf.add_argument("--name", default=None, help="name recorded in the reference (default: the file name)")
    rf.add_argument("--device", default="cpu")
    rf.add_argument("--batch-size", type=int, default=100)
    rf.add_argument("--no-progress", action="store_true")

    c = sub.add_parser(formatter_class=_Help, name="convert-ldm", help="convert an original CompVis class-conditional LDM checkpoint (e.g. cin256-v2)")
    c.add_argument("checkpoint", type=Path, help="the original .ckpt (or .safetensors)")
    c.add_argument("--config", type=Path, required=True, help="its original YAML config, e.g. configs/latent-diffusion/cin256-v2.yaml")
    c.add_argument("--out", type=Path, required=True, help="model directory to write (use it as --model)")
    c.add_argument("--null-class", type=int, default=None, help="the unconditional class id (default: the last row of the class table)")

    d = sub.add_parser(formatter_class=_Help, name="demo", help="FP32 vs naive, Q-Diffusion and PTQD at W4A8 and W4A4 on the bundled model: table + report.md")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="directory for the runs, samples, report.md and plots")
    d.add_argument("--quick", action="store_true", help="a one-minute version (few images, few steps, short calibration)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num", type=int, default=None, help="images per method (default 160; --quick 40)")
    d.add_argument("--no-progress", action="store_true")
    for command in sub.choices.values():  # --debug after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _finish(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from ptqd.errors import PtqdError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (PtqdError, OSError) as e:
        from ptqd.io import WriteError, os_error

        if isinstance(e, OSError):  # an OSError no writer translated: the same translation (io.os_error)
            if args.debug:
                raise
            e = os_error(e, action="read or write")
        if isinstance(e, WriteError) and args.command in KEPT:
            e = f"{e}; {KEPT[args.command]}"
        print(f"ptqd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"ptqd: interrupted; {KEPT.get(args.command, 'rerun the same command to start again')}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from ptqd import __version__

        print(
            f"ptqd: unexpected error in `ptqd {args.command}` (ptqd {__version__}): {type(e).__name__}: {e}\n"
            "rerun the command with --debug for the traceback, and please report it",
            file=sys.stderr,
        )
        return 1


def _run(args: argparse.Namespace) -> int:
    from ptqd.errors import PtqdError

    if args.command == "models":
        from ptqd.models import list_models

        print("\n".join(list_models()))
    elif args.command == "sample":
        _distributed(_sample, args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "reference":
        from ptqd.metrics.inception import load_inception
        from ptqd.metrics.standard import build_reference, check_reference_output, read_images, save_reference

        check_reference_output(args.out, args.overwrite)
        images = read_images(args.images)
        inception = load_inception(args.inception, args.device)
        ref = build_reference(images, inception, args.name or args.out.name, args.batch_size, not args.no_progress)
        save_reference(ref, args.out)
        print(f"wrote {args.out}: Inception statistics of {ref.num_images} images (weights {inception.fingerprint})")
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "stats":
        _distributed(_stats, args)
    elif args.command == "export":
        from ptqd.runtime import export

        from ptqd.runs import export_run

        export_run(args.run, args.out, overwrite=args.overwrite)
    elif args.command == "upgrade":
        from ptqd.models import load
        from ptqd.runs import upgrade

        result = upgrade(args.path, model=load(args.model) if args.model else None, force=args.force)
        if not result["upgraded"]:
            print(result["note"])
        else:
            err = f" (quantized vs FP relative error {result['relative_error']:.3f} on a fixed input)" if "relative_error" in result else ""
            print(f"checked {args.path}{err}; wrote its integrity record over {', '.join(result['files'])}")
    elif args.command == "report":
        from ptqd.report import write_report

        path = write_report(args.run, args.out, overwrite=args.overwrite)
        print(f"wrote {path}")
    elif args.command == "compare":
        from ptqd.compare import check_compare_output, compare, format_compare, write_compare

        if args.out is not None:
            check_compare_output(args.out, args.overwrite)
        rows = compare(args.paths)
        print(format_compare(rows))
        if args.out is not None:
            print(f"wrote {write_compare(rows, args.out, overwrite=args.overwrite)}")
    elif args.command == "convert-ldm":
        from ptqd.models.convert import convert_compvis_ldm

        out = convert_compvis_ldm(args.checkpoint, args.config, args.out, null_class=args.null_class)
        print(f"wrote {out}; quantize it with `ptqd quantize --model {out} ...`")
    elif args.command == "demo":
        from ptqd.demo import DemoSettings, run_demo

        settings = DemoSettings.quick() if args.quick else DemoSettings()
        if args.num is not None:
            if args.num < 10:
                raise PtqdError(f"--num must be at least 10 (the metrics need a few images per class), got {args.num}")
            settings.num = settings.batch_size = args.num
        run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, settings=settings)
    return 0


def _sample(args: argparse.Namespace, ctx, device: str) -> None:
    from ptqd.errors import PtqdError
    from ptqd.models import load
    from ptqd.models.adapters import read_prompts
    from ptqd.runs import load_run
    from ptqd.sampling import SamplerConfig, check_samples_output, sample, save_samples

    if args.run is None and args.model is None:
        raise PtqdError("give a run directory or checkpoint (ptqd sample RUN), or a full-precision model (--model NAME)")
    from ptqd import defaults

    if args.budget_propagation is not None and args.fidelity_budget is None:
        raise PtqdError("--budget-propagation applies to --fidelity-budget: pass a budget, or leave it out")
    if args.fidelity_budget is not None and args.act_bits not in (None, "mixed"):
        raise PtqdError(f"--fidelity-budget chooses the activation bits per step, --act-bits {args.act_bits} fixes them: pass one of the two")
    if args.fidelity_budget is not None and args.criterion is not None:
        raise PtqdError(f"--fidelity-budget is its own mixed-precision rule, --criterion {args.criterion} another: pass one of the two")
    check_samples_output(args.out, args.overwrite)
    if args.guidance is not None:
        SamplerConfig(guidance=args.guidance).validate()
    guidance = args.guidance
    plan = None
    if args.run is not None:
        from ptqd.correction import plan_sampling

        from ptqd.runtime import is_checkpoint, load_checkpoint

        if is_checkpoint(args.run):
            if args.model is not None:
                raise PtqdError("an exported checkpoint holds its model: --model applies to run directories (a moved FP model)")
            run = load_checkpoint(args.run, backend=args.backend or "int")
        elif args.backend is not None:
            raise PtqdError(f"--backend needs an exported checkpoint (`ptqd export {args.run} --out DIR`), not a run directory")
        else:
            run = load_run(args.run, model=load(args.model) if args.model is not None else None)
        if args.prompts is not None:
            run.base = run.base.with_prompts(read_prompts(args.prompts))
        run.to(device)
        if guidance is None:
            guidance = run.config["calibration"].get("guidance") or 1.0
        config = SamplerConfig(args.scheduler, args.steps, args.eta, guidance, args.seed, args.batch_size)
        correct = args.correct if args.correct is not None else ("all" if run.config["method"] == "ptqd" else "none")
        from ptqd.correction import DEFAULT_CRITERION, parse_parts

        if args.correct is not None and args.correct.strip().lower() != "none" and not parse_parts(args.correct, args.correction_model):
            raise PtqdError(f"--correct {args.correct!r} names no correction: give none, all, or a subset of cnc,bc,vsc")
        correct = ",".join(parse_parts(correct, args.correction_model)) or "none"
        if args.correction_model is not None and correct == "none":
            raise PtqdError(f"--correction-model {args.correction_model} needs corrections, but --correct is none"
                            f"{'' if args.correct is not None else ' (the default for a ' + run.config['method'] + ' run)'}: "
                            "pass --correct all (or cnc,bc), or leave out --correction-model")
        if args.no_guard and correct == "none":
            raise PtqdError("--no-guard applies to a correction, but no correction runs"
                            f"{'' if args.correct is not None else ' (the default for a ' + run.config['method'] + ' run)'}: "
                            "pass --correct all, or leave out --no-guard")

        if args.collect_stats:
            from ptqd.runs import ensure_stats

            ensure_stats(run, config, correct, "mixed" if args.fidelity_budget is not None else args.act_bits,
                         progress=not args.no_progress and ctx.main)

        plan = plan_sampling(run, config, correct, args.act_bits, args.low_bit_steps, args.criterion or DEFAULT_CRITERION,
                             fidelity_budget=args.fidelity_budget, budget_propagation=args.budget_propagation or defaults.BUDGET_PROPAGATION,
                             guard=not args.no_guard, progress=not args.no_progress and ctx.main)
        model = plan.model
        if getattr(run.qnet, "ptqd_backend", None):
            plan.record["checkpoint"] = {"path": str(args.run), "backend": run.qnet.ptqd_backend}
        if ctx.main:
            for note in plan.record.get("notes", []):
                print(f"note: {note}")
            if "bit_schedule" in plan.record:
                print(f"activation bits per step: {plan.record['bit_schedule']}")
            if plan.record.get("guard"):
                from ptqd.correction.guard import describe_guard

                print(describe_guard(plan.record["guard"]))
    else:
        if args.act_bits is not None or args.correct is not None or args.low_bit_steps is not None or args.criterion or args.backend \
                or args.correction_model or args.fidelity_budget is not None or args.no_guard:
            raise PtqdError("--act-bits, --correct, --correction-model, --no-guard, --low-bit-steps, --criterion, --fidelity-budget and --backend "
                            "need a quantization run or checkpoint")
        if args.collect_stats:
            raise PtqdError("--collect-stats needs a quantization run directory")
        model = load(args.model, prompts=read_prompts(args.prompts) if args.prompts else None).to(device)
        from ptqd import defaults

        guidance = defaults.guidance(model.conditional) if guidance is None else guidance
        config = SamplerConfig(args.scheduler, args.steps, args.eta, guidance, args.seed, args.batch_size)
    denoise, corrector = (plan.denoise, plan.corrector) if plan else (None, None)
    if ctx.active or args.num > args.chunk_size:  # chunked, resumable, split across torchrun ranks
        from ptqd.shards import sample_to_file

        path = sample_to_file(
            model, args.num, config, args.out, labels=args.labels, progress=not args.no_progress, denoise=denoise,
            corrector=corrector, record=plan.record if plan else None, chunk_size=args.chunk_size,
            keep_chunks=args.keep_chunks, ctx=ctx, overwrite=args.overwrite,
        )
        if ctx.main:
            print(f"{args.num} images in {path} (config: {path.with_suffix('.json')})")
        return
    from ptqd.locks import output_lock
    from ptqd.sampling import check_samples_space

    check_samples_space(model, args.num, args.out)
    with output_lock(args.out, "samples file"):
        samples = sample(model, args.num, config, labels=args.labels, progress=not args.no_progress, denoise=denoise, corrector=corrector)
        if plan is not None:
            samples.config.update(plan.record)
        path = save_samples(samples, args.out)
    print(f"wrote {len(samples.images)} images to {path} (config: {path.with_suffix('.json')})")


def _evaluate(args: argparse.Namespace) -> None:
    from ptqd.errors import PtqdError
    from ptqd.io import METRICS, check_output, write_json
    from ptqd.metrics import format_table
    from ptqd.metrics.evaluate import PAIRED_COLUMNS
    from ptqd.metrics.fidelity import evaluate_file, metrics_path

    out = args.out or metrics_path(args.samples)
    if out.resolve() == args.samples.resolve():
        raise PtqdError(f"--out {out} is the samples file itself; give a .json name for the metrics")
    check_output(out, ".json", overwrite=args.overwrite, ours=METRICS, option="--out" if args.out else "metrics file")

    if args.evaluator == "inception" and args.against is None:
        metrics = _evaluate_inception(args)
        metrics.update(evaluator="inception", samples=str(args.samples))
        columns = ["fid", "sfid", "is", "precision", "recall", "num_samples"]
    else:
        if args.evaluator == "digits" and args.inception is not None:
            raise PtqdError("--inception needs --evaluator inception")
        inception = None
        if args.evaluator == "inception":
            from ptqd.metrics.inception import load_inception

            inception = load_inception(args.inception, args.device)
        metrics = evaluate_file(
            args.samples, args.against, args.floor, args.reference, args.evaluator, inception, args.batch_size,
            not args.no_progress,
        )
        real = ["fid", "sfid"] if args.evaluator == "inception" else ["fd", "sfd", "accuracy"]
        columns = [c for c in PAIRED_COLUMNS + real + ["is", "precision", "recall", "num_samples"] if c in metrics]
    write_json(out, metrics)
    print(format_table([{"name": args.samples.name, **metrics}], columns))
    for note in metrics.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {out}")


def _evaluate_inception(args: argparse.Namespace) -> dict:
    from ptqd.errors import PtqdError
    from ptqd.metrics.inception import load_inception
    from ptqd.metrics.standard import evaluate_standard, load_reference, read_images

    if args.reference is None or not Path(args.reference).suffix == ".npz":
        raise PtqdError(
            "--evaluator inception needs --reference REF.npz: a reference batch from ADM (guided-diffusion) "
            "or one built with `ptqd reference IMAGES --out REF.npz --inception WEIGHTS`"
        )
    if not Path(args.reference).is_file():
        raise PtqdError(f"reference batch {args.reference} does not exist; build one with `ptqd reference IMAGES --out REF.npz`")
    images = read_images(args.samples)
    inception = load_inception(args.inception, args.device)
    ref = load_reference(args.reference, inception, args.batch_size, not args.no_progress)
    return evaluate_standard(images, ref, inception, args.batch_size, not args.no_progress)


def _distributed(fn, args: argparse.Namespace) -> None:
    """Run ``fn(args, ctx, device)`` in torchrun's process group (a no-op without torchrun)."""
    from ptqd import distributed

    ctx, device = distributed.setup(args.device)
    try:
        fn(args, ctx, device)
    finally:
        distributed.teardown()


def _quantize(args: argparse.Namespace) -> None:
    from ptqd.calibration import CalibrationOptions
    from ptqd.errors import PtqdError
    from ptqd.metrics import format_table
    from ptqd.models import load
    from ptqd.models.adapters import read_prompts
    from ptqd.quant import QuantConfig
    from ptqd.runs import quantize
    from ptqd.io import RUN_DIR, check_output
    from ptqd.sampling import SamplerConfig

    check_output(args.out, kind="dir", overwrite=args.overwrite, ours=RUN_DIR)
    if args.guidance is not None:
        SamplerConfig(guidance=args.guidance).validate()
    model = load(args.model, prompts=read_prompts(args.prompts) if args.prompts else None).to(args.device)
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
    from ptqd import defaults

    p = defaults.PRESETS["quick" if args.quick else args.preset]

    def pick(value, default):
        return default if value is None else value

    if args.calib_steps is not None and args.calib_steps > args.steps:
        raise PtqdError(f"--calib-steps {args.calib_steps} keeps more steps per trajectory than "
                        f"--steps {args.steps} has: lower --calib-steps or raise --steps")
    if args.calib_steps is None and p["calib_steps"] > args.steps:
        print(f"note: calibration keeps all {args.steps} steps of each trajectory (the preset's {p['calib_steps']} is more than --steps)")

    options = CalibrationOptions(
        method=args.method,
        recon_samples=pick(args.recon_samples, p["options"]["recon_samples"]),
        weight_iters=pick(args.weight_iters, p["options"]["weight_iters"]),
        act_iters=pick(args.act_iters, p["options"]["act_iters"]),
        batch_size=pick(args.recon_batch, p["options"]["batch_size"]),
        seed=args.seed,
        block_order=args.block_order,
    )
    guidance = args.guidance if args.guidance is not None else defaults.guidance(model.conditional)
    sampler = SamplerConfig(args.scheduler, args.steps, args.eta, guidance)
    run = quantize(
        model, config, args.method, options, pick(args.calib_samples, p["calib_samples"]), pick(args.calib_steps, p["calib_steps"]),
        sampler, args.calib_seed, out=args.out, progress=not args.no_progress,
        noise_samples=pick(args.noise_samples, p["noise_samples"]), noise_seed=args.noise_seed,
        mixed_precision=args.mixed_precision, overwrite=args.overwrite, stages=True,
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


def _stats(args: argparse.Namespace, ctx, device: str) -> None:
    import dataclasses

    from ptqd import defaults

    from ptqd.correction import StatsRequest, collect_stats
    from ptqd.runs import load_run
    from ptqd.sampling import SamplerConfig

    from ptqd.io import RUN_DIR, check_output

    if args.guidance is not None:
        SamplerConfig(guidance=args.guidance).validate()
    if (args.run / "config.json").is_file():
        check_output(args.run, kind="dir", ours=RUN_DIR, option="run directory")
    run = load_run(args.run).to(device)
    cal = run.config["calibration"]
    ptqd_cfg = run.config.get("correction") or {}
    sampler = SamplerConfig(
        args.scheduler or cal["scheduler"],
        cal["steps"] if args.steps is None else args.steps,
        cal["eta"] if args.eta is None else args.eta,
        (cal.get("guidance") or 1.0) if args.guidance is None else args.guidance,
        batch_size=args.batch_size,
    )
    seed = args.seed if args.seed is not None else ptqd_cfg.get("noise_seed", 2000)
    if args.noise_samples is not None:
        num, source = args.noise_samples, "--noise-samples"
    elif ptqd_cfg.get("noise_samples"):
        num, source = ptqd_cfg["noise_samples"], "the run's recorded --noise-samples"
    else:
        num, source = 256, "the default; the run records no --noise-samples"
    if ctx.main:
        print(f"noise statistics from {num} trajectories ({source})")
    request = StatsRequest(
        sampler=dataclasses.replace(sampler, seed=seed),
        num_samples=num,
        bits=args.act_bits or [],
        seed=seed,
        clamp_k=not args.keep_negative_k,
        mean_of=args.mean_of,
        heldout_samples=args.heldout_samples,
        ridge=defaults.RIDGE if args.ridge is None else args.ridge,
        tau=defaults.POSTERIOR_TAU if args.tau is None else args.tau,
        drive=args.drive,
    )
    stats = collect_stats(run, request, out=args.run, progress=not args.no_progress)
    if args.matched:
        from ptqd.correction.apply import add_matched

        add_matched(run, stats, progress=not args.no_progress and ctx.main)
    if ctx.main:
        _print_stats(run, stats)


def _print_stats(run, stats) -> None:
    from ptqd.metrics import format_table

    rows = []
    r2 = stats.r2("heldout") or stats.r2("fit")
    shown = [k for k in ("ptqd:cnc,bc", "mean", "content", "content-pixel", "debias", "debias-pixel") if k in r2]
    for b in stats.bits:
        for i, row in list(enumerate(stats.table(b)))[:: max(1, len(stats.timesteps) // 10)]:
            rows.append({"name": f"A{b} t={row['t']}", **{k: row[k] for k in ("k", "r", "sigma", "rel_err")},
                         **{f"R² {k}": float(r2[k][stats.bit(b), i]) for k in shown}})
    print(format_table(rows, ["k", "r", "sigma", "rel_err"] + [f"R² {k}" for k in shown]))
    if shown:
        which = "held-out trajectories" if stats.r2("heldout") else "the fitting trajectories"
        print(f"R²: share of the quantization error E|ε̂ − ε|² each correction model removes, on {which} (negative: it adds error)")
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
