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
    s.add_argument("--model", required=True, help="bundled model name or model directory")
    s.add_argument("--num", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (conditional models)")
    s.add_argument("--labels", type=_labels, default=None, help="class labels, cycled (default 0..9 cycled)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=250)
    s.add_argument("--out", type=Path, required=True, help="output .npz (a .json with the config is written beside it)")
    s.add_argument("--no-progress", action="store_true")

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
        from ptqd.models import load
        from ptqd.sampling import SamplerConfig, sample, save_samples

        model = load(args.model)
        config = SamplerConfig(args.scheduler, args.steps, args.eta, args.guidance, args.seed, args.batch_size)
        samples = sample(model, args.num, config, labels=args.labels, progress=not args.no_progress)
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
    elif args.command == "demo":
        from ptqd.demo import run_demo

        run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
