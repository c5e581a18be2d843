"""FP32 sample quality of the bundled models (README "FP baseline" table).

    .venv/bin/python benchmarks/fp_baseline.py --out benchmarks/results/fp_baseline [--num 1000] [--seed 0]

Rows: digits16-cond at guidance 3.0 and digits16, each with DDIM 50 steps at eta 1.0 and 0.0, plus the
real held-out digits against the reference (the floor any model can reach with this classifier).
Each row equals `ptqd sample --model M --num N --steps 50 --eta E [--guidance 3] --seed S --out X.npz &&
ptqd evaluate X.npz`. Finished rows are kept in results.json and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ptqd import __version__
from ptqd.io import write_json
from ptqd.metrics import evaluate
from ptqd.data import load_digits
from ptqd.models import load
from ptqd.sampling import SamplerConfig, sample

ROWS = [("digits16-cond", 3.0, 1.0), ("digits16-cond", 3.0, 0.0), ("digits16", 1.0, 1.0), ("digits16", 1.0, 0.0)]
COLUMNS = ["fd", "sfd", "is", "precision", "recall", "accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp_baseline"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    command = "python " + " ".join(sys.argv)
    f = args.out / "results.json"
    old = json.loads(f.read_text()) if f.is_file() else {}
    rows = [r for r in old.get("rows", []) if r.get("num") == args.num and r.get("seed") == args.seed]
    done = {(r["model"], r["eta"]) for r in rows}
    for name, guidance, eta in ROWS:
        if (name, eta) in done:
            continue
        model = load(name).to(args.device)
        t0 = time.perf_counter()
        s = sample(model, args.num, SamplerConfig("ddim", 50, eta, guidance, args.seed, 500), progress=True)
        seconds = time.perf_counter() - t0
        m = evaluate(s.images, s.labels)
        rows.append({"model": name, "guidance": guidance, "eta": eta, "seed": args.seed, "num": args.num,
                     "sample_seconds": round(seconds, 1), "device": _device(args), **m})
        _write(args, command, rows)
    if not any(r["model"] == "real held-out" for r in rows):
        held = load_digits("test")
        images, labels = held.images, held.labels
        rows.append({"model": "real held-out", "guidance": None, "eta": None, "seed": None, "num": len(images),
                     **evaluate(images, labels)})
    _write(args, command, rows)


def _device(args) -> str:
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "cpu")
    return f"{name}, torch {torch.__version__}"


def _write(args, command, rows) -> None:
    old = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    commands = [c for c in old.get("commands", [old["command"]] if "command" in old else []) if c != command] + [command]
    meta = {
        "command": command, "commands": commands, "ptqd": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "cpu"),
        "machine": platform.platform(), "sampler": "DDIM 50 steps", "reference": "digits16 (bundled)",
    }
    write_json(args.out / "results.json", {**meta, "rows": rows})
    lines = [
        "# FP32 baseline of the bundled models",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + f" (rows resume; ptqd {__version__}).",
        f"{args.num} samples per row, DDIM 50 steps, seed {args.seed}; metrics on the bundled digit classifier.",
        "",
        "| model | guidance | eta | " + " | ".join(COLUMNS) + " | N | sampled on |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for r in rows:
        cells = ["–" if r.get(c) is None else (f"{r[c]:.2f}" if c in ("fd", "sfd", "is") else f"{r[c]:.3f}") for c in COLUMNS]
        g = "–" if r["guidance"] is None else f"{r['guidance']:g}"
        e = "–" if r["eta"] is None else f"{r['eta']:g}"
        lines.append(f"| {r['model']} | {g} | {e} | " + " | ".join(cells) + f" | {r['num']} | {r.get('device') or '–'} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
