"""Where the integer runtime's time goes, and the speed goals measured side by side with the free baselines.

    python benchmarks/runtime_profile.py checkpoints --work /tmp/ptqd_runtime        # quantize + export once (cached)
    python benchmarks/runtime_profile.py profile --work /tmp/ptqd_runtime --out benchmarks/results/runtime/profile
    python benchmarks/runtime_profile.py goals   --work /tmp/ptqd_runtime --out benchmarks/results/runtime/goals

``checkpoints``: the bundled digits16-cond and the CIFAR-10-sized UNet of ``runtime.py`` (random
weights), naive calibration at W8A8 and W4A8, exported as packed checkpoints under ``--work`` (kept
between runs, so "before" and "after" measure the same checkpoints).

``profile``: torch.profiler over one denoiser call of each backend (fp32, bf16 autocast, int W8A8,
int W4A8); digits16-cond at batch 32 (= 16 images with guidance 3), the CIFAR-size UNet at batch 8.
Operator self times are grouped by what they do (activation quantization, integer kernel,
dequantize/zero-point epilogue, layout conversion, float conv/linear, GroupNorm, SiLU and other
elementwise, attention); the rest of the wall time is Python and dispatch overhead.

``goals``: the issue's goal measurements, every backend interleaved in one run (each repeat times
every backend once): the CIFAR-size UNet, one denoiser call at batch 1 and 8 (median of --repeats),
and digits16-cond sampling (batch 16, DDIM 10 steps, guidance 3, median of --sample-repeats).

Both write results.json and results.md (with the command, CPU model and flags) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import fp_model, make_checkpoints  # noqa: E402

MODELS = {"digits16-cond": 16, "cifar10-size": 8}  # images per denoiser call in the profile


def cpu_info() -> dict:
    """CPU model name, the SIMD flags that decide the integer kernels and the kernel ISA."""
    from ptqd.runtime.speed import cpu_description

    return cpu_description()


def checkpoints(work: Path) -> dict:
    """The cached checkpoints (made on first use)."""
    index = work / "checkpoints.json"
    if index.exists():
        return json.loads(index.read_text())
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in MODELS:
        print(f"== {name}: quantizing and exporting", flush=True)
        out[name] = make_checkpoints(name, work, [(8, 8), (4, 8)], quick=False)
    index.write_text(json.dumps(out, indent=1))
    return out


def load_models(name: str, ck: dict) -> dict:
    from ptqd.runtime import load_checkpoint

    fp = fp_model(name)
    return {"fp32": fp, "bf16": fp, "int-w8a8": load_checkpoint(ck[name]["w8a8"]["path"], "int").model,
            "int-w4a8": load_checkpoint(ck[name]["w4a8"]["path"], "int").model}


def autocast_for(backend: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if backend == "bf16" else nullcontext()


def denoiser_call(model, batch: int, guidance: float):
    """One call of the network as sampling makes it (both guidance branches in one batch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.channels, model.image_size, model.image_size, generator=g)
    labels = torch.arange(batch) % model.num_classes if model.conditional else None
    t = torch.tensor(500)

    def call():
        with torch.no_grad():
            return model.denoise(x, t, labels, guidance)

    return call


# operator name → what it does (self times; an op not listed is "other")
CATEGORIES = {
    "int kernel": ("onednn::qconv2d_pointwise", "onednn::qlinear_pointwise", "aten::_int_mm", "quantized::"),
    "act quantize": ("aten::quantize_per_tensor", "aten::set_", "aten::int_repr", "aten::clamp_", "aten::fake_quantize_per_tensor_affine",
                     "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", "aten::dequantize", "aten::round_", "aten::div_"),
    "dequant / zero-point epilogue": ("aten::addcmul", "aten::add_", "aten::index_put_", "aten::slice", "aten::narrow", "aten::select"),
    "layout conversion": ("aten::contiguous", "aten::clone", "aten::copy_", "aten::to", "aten::_to_copy", "aten::to_dense",
                          "aten::to_mkldnn", "aten::permute", "aten::transpose", "aten::reshape", "aten::view", "aten::_reshape_alias",
                          "aten::as_strided", "aten::expand", "aten::t", "aten::empty_like", "aten::empty", "aten::empty_strided",
                          "aten::resize_", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::chunk", "aten::split", "aten::unbind"),
    "float conv / linear": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d", "aten::addmm",
                            "aten::mm", "aten::linear", "aten::_mkldnn_convolution", "aten::mkldnn_linear", "aten::_slow_conv2d_forward"),
    "GroupNorm": ("aten::native_group_norm", "aten::group_norm", "aten::native_layer_norm", "aten::layer_norm"),
    "attention": ("aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_softmax", "aten::softmax",
                  "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math", "aten::masked_fill_"),
    "SiLU / elementwise": ("aten::silu", "aten::silu_", "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::cat", "aten::mul_",
                           "aten::exp", "aten::sin", "aten::cos", "aten::arange", "aten::pow", "aten::neg", "aten::clamp",
                           "aten::upsample_nearest2d", "aten::fill_", "aten::zero_", "aten::sum", "aten::addcmul_", "aten::sub_"),
}


def categorize(op: str) -> str:
    for cat, names in CATEGORIES.items():
        if any(op == n or (n.endswith("::") and op.startswith(n)) for n in names):
            return cat
    return "other"


def profile_one(call, backend: str, reps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with autocast_for(backend):
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            wall = (time.perf_counter() - t0) / reps
    ops = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        ops[e.key][0] += e.self_cpu_time_total / reps / 1e3  # ms per call
        ops[e.key][1] += e.count // reps
    cats = defaultdict(float)
    for name, (ms, _) in ops.items():
        cats[categorize(name)] += ms
    op_ms = sum(v[0] for v in ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    # the profiler's own bookkeeping inflates the wall time; the overhead row is an upper bound
    return {"wall_ms_profiled": round(wall * 1e3, 2), "op_self_ms": round(op_ms, 2),
            "categories_ms": {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "python_dispatch_overhead_ms": round(wall * 1e3 - op_ms, 2),
            "top_ops": [{"op": k, "ms": round(v[0], 2), "calls": v[1], "category": categorize(k)} for k, v in top]}


def cmd_profile(args) -> None:
    ck = checkpoints(args.work)
    out = {"command": "python " + " ".join(sys.argv), "cpu": cpu_info(), "models": {}}
    only = args.backends.split(",") if args.backends else None
    if only and (args.out / "results.json").exists():  # re-profile some rows, keep the others
        old = json.loads((args.out / "results.json").read_text())
        out["models"] = old["models"]
        out["command"] = old["command"] + "; rows " + ", ".join(only) + " again with: python " + " ".join(sys.argv)
    for name, images in MODELS.items():
        models = load_models(name, ck)
        out["models"].setdefault(name, {})
        for be, m in models.items():
            if only and be not in only:
                continue
            guidance = 3.0 if m.conditional else 1.0
            call = denoiser_call(m, images, guidance)
            slow = be == "bf16" and "avx512_bf16" not in cpu_info()["simd_flags"]  # emulated bf16: 10x slower, fewer calls
            t_plain = timed(call, be, 1 if slow else 5)
            prof = profile_one(call, be, 1 if slow else 3)
            prof["wall_ms_unprofiled"] = round(t_plain * 1e3, 2)
            out["models"][name][be] = prof
            print(f"{name} {be}: {prof['wall_ms_unprofiled']} ms  {prof['categories_ms']}", flush=True)
    write(args.out, out, profile_md(out))


def timed(call, backend: str, reps: int) -> float:
    with autocast_for(backend):
        call()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def cmd_goals(args) -> None:
    from ptqd.runtime.speed import sampling_loop

    ck = checkpoints(args.work)
    out = {"command": "python " + " ".join(sys.argv), "cpu": cpu_info(), "repeats": args.repeats,
           "sample_repeats": args.sample_repeats, "load_avg_start": os.getloadavg(), "rows": {}}
    # emulated bf16 (no avx512_bf16/amx_bf16) runs 10-40x slower than fp32: fewer of its repeats (interleaved as the first ones)
    native_bf16 = any(f in out["cpu"]["simd_flags"] for f in ("avx512_bf16", "amx_bf16"))
    bf16_repeats = args.repeats if native_bf16 else min(args.repeats, args.bf16_repeats)
    out["bf16_repeats"] = bf16_repeats
    # CIFAR-size UNet: one denoiser call, batches 1 and 8, backends interleaved
    models = load_models("cifar10-size", ck)
    for b in (1, 8):
        calls = {be: denoiser_call(m, b, 1.0) for be, m in models.items()}
        per = {be: [] for be in calls}
        for be, c in calls.items():  # warm-up
            with autocast_for(be):
                c()
        for r in range(args.repeats):
            for be, c in calls.items():
                if be == "bf16" and r >= bf16_repeats:
                    continue
                with autocast_for(be):
                    t0 = time.perf_counter()
                    c()
                    per[be].append(time.perf_counter() - t0)
        out["rows"][f"cifar10-size denoiser call, batch {b}"] = summarize(per, b)
        print(f"cifar b{b}: " + json.dumps({k: v["x_fp32"] for k, v in out['rows'][f'cifar10-size denoiser call, batch {b}'].items()}), flush=True)
    del models
    models = load_models("digits16-cond", ck)
    per = {be: [] for be in models}

    def run(be, m):
        with autocast_for(be), torch.no_grad():
            sampling_loop(m, 16, 10, 3.0)

    for be, m in models.items():
        run(be, m)
    for r in range(args.sample_repeats):
        for be, m in models.items():
            if be == "bf16" and r >= bf16_repeats:
                continue
            t0 = time.perf_counter()
            run(be, m)
            per[be].append(time.perf_counter() - t0)
    out["rows"]["digits16-cond sampling, batch 16, DDIM 10 steps, guidance 3"] = summarize(per, 16)
    out["load_avg_end"] = os.getloadavg()
    write(args.out, out, goals_md(out))


def summarize(per: dict, images: int) -> dict:
    med = {be: sorted(t)[len(t) // 2] for be, t in per.items()}
    return {be: {"seconds": [round(x, 4) for x in per[be]], "median_s": round(med[be], 4),
                 "images_per_second": round(images / med[be], 2), "x_fp32": round(med["fp32"] / med[be], 3),
                 "x_bf16": round(med["bf16"] / med[be], 3)} for be in per}


def write(out: Path, data: dict, md: str) -> None:
    from ptqd.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", data)
    (out / "results.md").write_text(md)
    print(md)


def cpu_line(c: dict) -> str:
    return (f"CPU: {c['model']}, {c['cores']} cores, {c['threads']} threads; torch {c['torch']}; integer kernel ISA: {c['isa']}; "
            f"SIMD flags: {' '.join(c['simd_flags'])}")


def profile_md(r: dict) -> str:
    lines = ["# Where the time goes: one denoiser call per backend (torch.profiler, operator self time)", "",
             cpu_line(r["cpu"]), "",
             "digits16-cond: batch 32 (16 images, guidance 3); CIFAR-size UNet (35.7M params, random weights): batch 8. "
             "ms per call; `overhead` = profiled wall time minus operator self time (Python, dispatch, profiler bookkeeping).", ""]
    cats = list(CATEGORIES) + ["other"]
    lines += ["| model | backend | wall ms (unprofiled) | " + " | ".join(cats) + " | overhead |",
              "|---|---|---|" + "---|" * len(cats) + "---|"]
    for name, rows in r["models"].items():
        for be, p in rows.items():
            lines.append(f"| {name} | {be} | {p['wall_ms_unprofiled']} | " + " | ".join(f"{p['categories_ms'].get(c, 0):.1f}" for c in cats)
                         + f" | {p['python_dispatch_overhead_ms']:.1f} |")
    lines += ["", "Top operators (self ms per call, calls per call):", ""]
    for name, rows in r["models"].items():
        for be, p in rows.items():
            if be.startswith("int"):
                lines.append(f"* {name} {be}: " + ", ".join(f"{o['op']} {o['ms']:.1f} ({o['calls']})" for o in p["top_ops"][:8]))
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def goals_md(r: dict) -> str:
    lines = ["# Integer runtime vs the free baselines (fp32, bf16 autocast), interleaved in one run", "", cpu_line(r["cpu"]), "",
             f"Denoiser calls: median of {r['repeats']}; sampling: median of {r['sample_repeats']} (bf16 rows: of "
             f"{r.get('bf16_repeats', r['repeats'])}, the first rounds, where the CPU has no native bf16). Load average at start/end: "
             f"{r['load_avg_start'][0]:.2f} / {r['load_avg_end'][0]:.2f}.", "",
             "| measurement | backend | median s | images/s | ×fp32 | ×bf16 |", "|---|---|---|---|---|---|"]
    for what, rows in r["rows"].items():
        for be, v in rows.items():
            lines.append(f"| {what} | {be} | {v['median_s']:.4f} | {v['images_per_second']:.2f} | {v['x_fp32']:.2f} | {v['x_bf16']:.2f} |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["checkpoints", "profile", "goals"])
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqd_runtime"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--backends", default=None, help="profile: only these rows (e.g. int-w8a8,int-w4a8), merged into an existing --out")
    p.add_argument("--bf16-repeats", type=int, default=3, help="repeats of the bf16 rows on CPUs without native bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "checkpoints":
        print(json.dumps(checkpoints(args.work), indent=1))
        return
    args.out = args.out or Path(f"benchmarks/results/runtime/{args.what}")
    (cmd_profile if args.what == "profile" else cmd_goals)(args)


if __name__ == "__main__":
    main()
