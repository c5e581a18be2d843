"""Real low-bit execution: sampling throughput of fp32 (and bf16/fp16 autocast) vs simulated vs integer models,
checkpoint sizes, peak memory.

    OMP_NUM_THREADS=2 python benchmarks/runtime.py --threads 2 --out benchmarks/results/runtime
    python benchmarks/runtime.py --device cuda --quick --out benchmarks/results/runtime/cuda   # one GPU call, < 5 min

The free baselines are rows of every table: ``fp32`` and ``bf16`` (the FP model under
``torch.autocast(device, dtype=torch.bfloat16)``, no calibration), on CUDA also ``fp16`` autocast.
On the CPU the integer layers run oneDNN u8·s8 kernels (``ptqd.runtime.kernel_for``: one pass with
VNNI/AMX, wide 8-bit weights as two halves on AVX2-only CPUs); on CUDA ``torch._int_mm`` (PyTorch's
int8 GEMM, cuBLASLt), convolutions as im2col GEMMs. ``--quick`` on CUDA: the CIFAR-size UNet at
batches 1, 8 and 32.

Models: the bundled digits16-cond (DDIM, guidance 3, so two UNet batches per step) and a
CIFAR-10-sized UNet2DModel (block_out_channels (128, 256, 256, 256), 35.7M parameters, random
weights: speed does not depend on them). Each is quantized with naive calibration (the grids do not
change the speed either) at W8A8 and W4A8, exported as packed checkpoints, and loaded back:
``fake`` is the simulated model, ``int`` the integer kernels. Every row of a model is measured in the
same run with the backends interleaved (each repeat times every backend once), so the ratios stay
comparable when the machine is shared. Peak memory of loading a backend and one sampling step at the
largest batch: on the CPU in a fresh process (``peak_rss_mb``, including the ≈ ``baseline_rss_mb`` of
an idle Python with torch and ptqd imported); on CUDA the peak allocated GPU memory.

Writes results.json and results.md (with the command) under --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

CIFAR_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


def cifar_model():
    from diffusers import UNet2DModel

    from ptqd.models.loading import DiffusionModel
    from ptqd.models.zoo import SCHEDULER_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_CONFIG).eval().requires_grad_(False)
    return DiffusionModel(name="cifar10-size-random", unet=unet, scheduler_config=dict(SCHEDULER_CONFIG), image_size=32, channels=3)


def fp_model(name: str):
    from ptqd.models import load

    return cifar_model() if name == "cifar10-size" else load(name)


def fp32_safetensors_bytes(model, work: Path) -> int:
    from safetensors.torch import save_file

    path = work / f"{model.name}_fp32.safetensors"
    save_file({k: v.contiguous().float() for k, v in model.unet.state_dict().items()}, str(path))
    return path.stat().st_size


def make_checkpoints(name: str, work: Path, bits: list[tuple[int, int]], quick: bool) -> dict:
    """Quantize (naive) and export ``name`` at each (w, a); return paths and sizes."""
    from ptqd.calibration import CalibrationOptions
    from ptqd.quant import QuantConfig
    from ptqd.runs import quantize
    from ptqd.runtime import export
    from ptqd.sampling import SamplerConfig

    model = fp_model(name)
    out = {"fp32_safetensors_bytes": fp32_safetensors_bytes(model, work), "params": sum(p.numel() for p in model.unet.parameters())}
    sampler = SamplerConfig(steps=4, guidance=3.0 if model.conditional else 1.0, batch_size=4)
    for wb, ab in bits:
        t0 = time.perf_counter()
        run = quantize(model, QuantConfig(weight_bits=wb, act_bits=ab), "naive", CalibrationOptions(recon_samples=8),
                       calib_samples=2 if quick else 4, calib_steps=2, sampler=sampler, progress=False)
        ck = export(run, work / f"{name}_w{wb}a{ab}.ptqd", progress=False)
        manifest = json.loads((ck / "ptqd_checkpoint.json").read_text())
        size = manifest["files"]["weights.safetensors"]["bytes"]
        total = sum(f.stat().st_size for f in ck.iterdir())
        out[f"w{wb}a{ab}"] = {
            "path": str(ck), "weights_bytes": size, "dir_bytes": total,
            "ratio_vs_fp32_safetensors": round(size / out["fp32_safetensors_bytes"], 4),
            "seconds_to_make": round(time.perf_counter() - t0, 1),
        }
        del run
    return out


FLOAT_BACKENDS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(backend: str, device: str):
    """The autocast context of a float baseline row (none for fp32 and the quantized rows)."""
    from contextlib import nullcontext

    dtype = FLOAT_BACKENDS.get(backend)
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def load_backend(name: str, backend: str, ckpt: str | None, device: str):
    from ptqd.runtime import load_checkpoint

    model = fp_model(name) if backend in FLOAT_BACKENDS else load_checkpoint(ckpt, backend="int" if backend.startswith("int") else "fake").model
    return model.to(device)


def timed_runs(models: dict, batches: list[int], steps: int, repeats: int, device: str) -> dict:
    """Interleaved timing: each repeat times every backend once, so load changes on a shared machine hit all alike."""
    from ptqd.runtime.speed import sampling_loop, time_sampling

    out = {be: {"rows": {}} for be in models}
    for b in batches:
        for be, m in models.items():  # warm-up (first calls, prepacking)
            with autocast(be, device):
                sampling_loop(m, b, steps, 3.0 if m.conditional else 1.0)
        per = {be: [] for be in models}
        for _ in range(repeats):
            for be, m in models.items():
                with autocast(be, device):
                    per[be].append(time_sampling(m, b, steps, 3.0 if m.conditional else 1.0, repeats=1, warmup=0)["seconds"][0])
        for be, times in per.items():
            med = sorted(times)[len(times) // 2]
            out[be]["rows"][str(b)] = {"batch": b, "steps": steps, "seconds": times, "median_s": round(med, 4), "images_per_second": round(b / med, 3)}
    return out


def peak_memory(name: str, backend: str, ckpt: str | None, batch: int, device: str, threads: int) -> float:
    """Peak memory (MB) of loading one backend and one sampling step at ``batch``: RSS of a fresh process on CPU, allocated GPU memory on CUDA."""
    from ptqd.runtime.speed import sampling_loop

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    m = load_backend(name, backend, ckpt, device)
    with autocast(backend, device):
        sampling_loop(m, batch, 1, 3.0 if m.conditional else 1.0)
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's at fork time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _worker(q, *args):
    try:
        q.put(("ok", peak_memory(*args)))
    except Exception as e:  # reported in the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def _baseline(q, threads):
    import diffusers  # noqa: F401  (every backend's process imports it: ≈180 MB of the idle footprint)

    import ptqd.models  # noqa: F401
    import ptqd.runtime  # noqa: F401

    q.put(("ok", peak_rss_mb()))


def in_child(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def main() -> None:
    from ptqd import __version__
    from ptqd.io import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="few steps and repeats; on CUDA the CIFAR-size UNet at batches 1, 8, 32 (< 5 min)")
    p.add_argument("--models", default=None, help="default digits16-cond,cifar10-size (CUDA --quick: cifar10-size)")
    p.add_argument("--batches", default=None, help="default 1,16 (CUDA --quick: 1,8,32)")
    p.add_argument("--no-fake", action="store_true", help="leave out the simulated (fake-quantized) row")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per timed run (default 5, quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row, median reported (default 3, quick 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-isolate", action="store_true", help="CPU: skip the per-backend peak-memory processes")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: this PyTorch ({torch.__version__}) sees no CUDA device; run it on a machine with an NVIDIA GPU "
                 "and a CUDA build of PyTorch, or use --device cpu")
    gpu_quick = args.device == "cuda" and args.quick
    steps = args.steps or (3 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    models_arg = args.models or ("cifar10-size" if gpu_quick else "digits16-cond,cifar10-size")
    batches = [int(b) for b in (args.batches or ("1,8,32" if gpu_quick else "1,16")).split(",")]
    isolate = args.device == "cpu" and not args.no_isolate
    torch.set_num_threads(args.threads)
    from ptqd.runtime.kernels import cpu_features, kernel_for

    results = {
        "command": "python " + " ".join(sys.argv),
        "cpu": cpu_description(), "int_kernel": kernel_for(torch.device(args.device)), "cpu_isa": cpu_features(),
        "ptqd": __version__, "torch": torch.__version__, "device": args.device,
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                 "load_avg_start": os.getloadavg()},
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "steps": steps, "repeats": repeats, "batches": batches, "models": {},
    }
    if isolate:
        results["baseline_rss_mb"] = in_child(_baseline, args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in models_arg.split(","):
            print(f"== {name}: quantizing and exporting", flush=True)
            ck = make_checkpoints(name, work, [(8, 8), (4, 8)], args.quick)
            entry = {"checkpoints": {k: {kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v for k, v in ck.items()}}
            plan = {"fp32": None, "bf16": None}
            if args.device == "cuda":
                plan["fp16"] = None
            if not args.no_fake:
                plan["fake-w8a8"] = ck["w8a8"]["path"]
            plan.update({"int-w8a8": ck["w8a8"]["path"], "int-w4a8": ck["w4a8"]["path"]})
            print("   timing " + ", ".join(plan), flush=True)
            models = {be: load_backend(name, be, path, args.device) for be, path in plan.items()}
            entry["backends"] = timed_runs(models, batches, steps, repeats, args.device)
            del models
            for be, path in plan.items():
                if isolate:
                    entry["backends"][be]["peak_rss_mb"] = in_child(_worker, name, be, path, max(batches), args.device, args.threads)
                elif args.device == "cuda":
                    entry["backends"][be]["peak_gpu_mb"] = peak_memory(name, be, path, max(batches), args.device, args.threads)
            fp = entry["backends"]["fp32"]["rows"]
            bf = entry["backends"]["bf16"]["rows"]
            entry["speedup_vs_fp32"] = {
                be: {b: round(r["rows"][b]["images_per_second"] / fp[b]["images_per_second"], 3) for b in r["rows"]}
                for be, r in entry["backends"].items()
            }
            entry["speedup_vs_bf16"] = {
                be: {b: round(r["rows"][b]["images_per_second"] / bf[b]["images_per_second"], 3) for b in r["rows"]}
                for be, r in entry["backends"].items()
            }
            results["models"][name] = entry
            print(json.dumps(entry["speedup_vs_fp32"]), flush=True)
    results["host"]["load_avg_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(to_markdown(results))
    print((args.out / "results.md").read_text())


def cpu_description() -> dict:
    """CPU model name and its SIMD flags (the ones that decide the integer kernels)."""
    from ptqd.runtime.speed import cpu_description as describe

    return describe()


def to_markdown(r: dict) -> str:
    mem = "peak GPU MB" if r["device"] == "cuda" else "peak RSS MB"
    lines = [
        f"# Runtime benchmark ({r['device']}{', ' + r['gpu'] if r.get('gpu') else ''}; torch {r['torch']}, {r['host']['threads']} thread(s))",
        "",
        f"CPU: {r['cpu']['model']}, {r['host']['cores']} cores; SIMD flags: {' '.join(r['cpu']['simd_flags'])}; "
        f"integer kernel: {r['int_kernel']} (CPU ISA {r['cpu_isa']}).",
        "",
        f"DDIM {r['steps']} steps per timed run, median of {r['repeats']}; images/second, and the ratios to fp32 and to "
        "bf16 autocast measured in the same run (rows interleaved).",
        f"Load average at start/end: {', '.join(f'{v:.1f}' for v in r['host']['load_avg_start'])} / "
        f"{', '.join(f'{v:.1f}' for v in r['host']['load_avg_end'])} on {r['host']['cores']} cores (shared machine).",
        "",
        "| model | backend | " + " | ".join(f"batch {b} img/s | ×fp32 | ×bf16" for b in r["batches"]) + f" | {mem} |",
        "|---|---|" + "---|---|---|" * len(r["batches"]) + "---|",
    ]
    for name, m in r["models"].items():
        for be, row in m["backends"].items():
            cells = []
            for b in r["batches"]:
                cells += [f"{row['rows'][str(b)]['images_per_second']:.2f}", f"{m['speedup_vs_fp32'][be][str(b)]:.2f}",
                          f"{m['speedup_vs_bf16'][be][str(b)]:.2f}"]
            memv = row.get("peak_gpu_mb", row.get("peak_rss_mb"))
            lines.append(f"| {name} | {be} | " + " | ".join(cells) + f" | {memv} |")
    if "baseline_rss_mb" in r:
        lines += ["", f"Peak RSS includes ≈{r['baseline_rss_mb']} MB of an idle process with torch, diffusers and ptqd imported."]
    lines += ["", "| model | params | fp32 safetensors MB | W8A8 weights MB (×fp32) | W4A8 weights MB (×fp32) |", "|---|---|---|---|---|"]
    for name, m in r["models"].items():
        c = m["checkpoints"]
        lines.append(
            f"| {name} | {c['params'] / 1e6:.2f}M | {c['fp32_safetensors_bytes'] / 1e6:.2f} | "
            f"{c['w8a8']['weights_bytes'] / 1e6:.3f} ({c['w8a8']['ratio_vs_fp32_safetensors']:.3f}) | "
            f"{c['w4a8']['weights_bytes'] / 1e6:.3f} ({c['w4a8']['ratio_vs_fp32_safetensors']:.3f}) |"
        )
    lines += ["", f"Command: `{r['command']}` ({r['seconds']} s)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
