"""Quantization runs: load → collect calibration data → wrap → calibrate → measure → save, as one call.

A run directory holds

* ``config.json``: everything needed to redo the run (model and its fingerprint, quantization
  settings, calibration method and options, calibration sampler and seed, ptqd version);
* ``calibration.safetensors``: the calibration inputs (reused when the run is repeated);
* ``quant_state.safetensors``: every quantizer's scales, zero points and AdaRound decisions;
* ``summary.json``: BOPs, model size, timings, reconstruction losses, what was kept in float.

``load_run(dir)`` rebuilds the quantized network from the FP model and the saved state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptqd import __version__, defaults
from ptqd.calibration.data import (
    CALIB_SEED,
    CalibrationSet,
    collect_calibration,
    record_forward_loop,
    kept_steps,
    load_calibration,
    save_calibration,
)
from ptqd.calibration.methods import CalibrationOptions, calibrate
from ptqd import integrity
from ptqd.errors import PtqdError
from ptqd.io import RUN_DIR, atomic_path, check_output, write_json
from ptqd.locks import holds_lock
from ptqd.metrics.bops import count_bops, model_size_bytes
from ptqd.models.loading import DiffusionModel, example_forward, load
from ptqd.quant.denoiser import QuantizedDenoiser, QuantizedRun  # noqa: F401  (public names of this module)
from ptqd.quant.wrap import QuantConfig, find_unsupported, load_quant_state, quant_layers, quant_state, set_act_bits, wrap_model
from ptqd.sampling import SamplerConfig

SCALE_DEFAULTS = {"naive": "minmax", "qdiff": "mse", "ptqd": "mse"}
METHODS = ("naive", "qdiff", "ptqd")  # ptqd = qdiff calibration + noise statistics + correction when sampling


def _device(model: DiffusionModel) -> torch.device:
    p = next(model.unet.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_config(config: QuantConfig, method: str) -> QuantConfig:
    """Fill scale methods left as None with the calibration method's default (naive: minmax, qdiff: mse)."""
    d = config.to_dict()
    for key in ("weight_method", "act_method"):
        if d[key] is None:
            d[key] = SCALE_DEFAULTS.get(method, "minmax")
    return QuantConfig.from_dict(d)


def measure(fp: DiffusionModel, qnet: nn.Module) -> dict[str, Any]:
    """BOPs per denoiser forward (one image) and model size, quantized vs FP."""
    run = example_forward(fp)
    bops = count_bops(qnet, run)
    size = model_size_bytes(qnet)
    layers = [
        {"name": n, "kind": m.kind, "w_bits": m.weight_bits, "a_bits": m.act_bits, "split": m.split}
        for n, m in quant_layers(qnet)
    ]
    _, kept = find_unsupported(fp.unet)
    return {
        "bops": bops.summary(),
        "bops_by_layer": [dataclasses.asdict(o) | {"bops": o.bops} for o in bops.ops],
        "size": size,
        "layers": layers,
        "kept_float": kept,
    }


@holds_lock("out", "run directory")
def quantize(
    model: str | Path | DiffusionModel,
    config: QuantConfig | None = None,
    method: str = "qdiff",
    options: CalibrationOptions | None = None,
    calib_samples: int = defaults.CALIB_SAMPLES,
    calib_steps: int = defaults.CALIB_STEPS,
    sampler: SamplerConfig | None = None,
    calib_seed: int = CALIB_SEED,
    out: str | Path | None = None,
    progress: bool = True,
    noise_samples: int = defaults.NOISE_SAMPLES,
    noise_seed: int | None = None,
    mixed_precision: list[int] | None = None,
    overwrite: bool = False,
    stages: bool = False,
    forward_loop=None,
) -> QuantizedRun:
    """Quantize ``model`` and calibrate it with ``method``; write a run directory when ``out`` is given.

    ``sampler`` is the sampler the calibration trajectories follow (use the one you will sample
    with; default DDIM 50 steps, eta 1, guidance 3 for conditional models).

    ``method="ptqd"``: ``qdiff`` calibration, then noise statistics of ``noise_samples`` FP
    trajectories of the same sampler (PTQD Algorithm 1; 0 defers them to ``ptqd stats``), saved in
    the run directory; with
    ``mixed_precision`` (e.g. [4, 8]) the activations are calibrated and the statistics collected for
    each of those bit-widths, and sampling picks one per step.

    ``stages``: print one line as each stage ends (the CLI does, so ``--no-progress`` still shows them).

    Settings and ``out`` are checked before any work: ``out`` must be a new or empty directory, or
    a run directory (``config.json`` with a ``ptqd`` key, or the calibration data of an interrupted
    run); any other existing directory is written into only with ``overwrite``.
    """
    from ptqd.correction.stats import STATS_SEED

    if method not in METHODS:
        raise PtqdError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if calib_samples < 1:
        raise PtqdError(f"--calib-samples must be at least 1, got {calib_samples}")
    if calib_steps < 1:
        raise PtqdError(f"--calib-steps must be at least 1 (sampler steps kept per calibration trajectory), got {calib_steps}")
    if sampler is not None:
        sampler.validate()
    if out is not None:
        check_output(out, kind="dir", overwrite=overwrite, ours=RUN_DIR)
    fp = model if isinstance(model, DiffusionModel) else load(model)
    config = config or QuantConfig()
    ptqd_cfg = None
    if method == "ptqd":
        if mixed_precision:
            bits = sorted(set(mixed_precision))
            if len(bits) < 2:
                raise PtqdError(f"--mixed-precision needs two or more bit-widths, got {mixed_precision}")
            config = dataclasses.replace(config, act_bits=bits[-1], extra_act_bits=sorted(set(config.extra_act_bits) | set(bits[:-1])))
        if noise_samples == 1 or noise_samples < 0:
            raise PtqdError(f"noise statistics need at least 2 samples (0: collect later with `ptqd stats`), got {noise_samples}")
        ptqd_cfg = {
            "noise_samples": noise_samples,
            "noise_seed": STATS_SEED if noise_seed is None else noise_seed,
            "mixed_precision": sorted(set(mixed_precision)) if mixed_precision else None,
        }
    elif mixed_precision:
        raise PtqdError("--mixed-precision needs --method ptqd (it chooses bit-widths from noise statistics)")
    options = dataclasses.replace(options or CalibrationOptions(), method="qdiff" if method == "ptqd" else method)
    options.validate()
    config = resolve_config(config, method)
    config.validate()
    sampler = sampler or SamplerConfig(guidance=defaults.guidance(fp.conditional))
    sampler = dataclasses.replace(sampler, seed=calib_seed)
    run_config = {
        "ptqd": __version__,
        "model": _model_ref(fp),
        "model_fingerprint": fp.fingerprint(),
        "model_kind": fp.describe(),
        "method": method,
        "quant": config.to_dict(),
        "calibration": {"num_samples": calib_samples, "num_steps": calib_steps, **asdict(sampler)}
        | ({"forward_loop": getattr(forward_loop, "__name__", "forward_loop")} if forward_loop is not None else {}),
        "options": asdict(options),
        "torch_threads": torch.get_num_threads(),
    }
    if fp.prompts is not None:
        run_config["prompts"] = fp.prompts  # calibration, statistics and default sampling prompts
    if ptqd_cfg is not None:
        run_config["correction"] = ptqd_cfg
    out = Path(out) if out is not None else None
    if out is not None:
        done = _existing_run(out, run_config)
        if done is not None:
            if progress:
                print(f"{out} already holds this run; loading it")
            _ptqd_stats(done, sampler, ptqd_cfg, out, progress)
            return done

    t0 = time.perf_counter()
    if forward_loop is not None:
        calib = record_forward_loop(fp, forward_loop)
        dev = _device(fp)
        calib = dataclasses.replace(calib, x=calib.x.to(dev), t=calib.t.to(dev), labels=calib.labels.to(dev) if calib.labels is not None else None)
    else:
        calib = _calibration_data(fp, out, calib_samples, calib_steps, sampler, calib_seed, progress)
    t_data = time.perf_counter() - t0
    if stages:
        print(f"quantize: calibration data ready: {len(calib.x)} network inputs from {calib_samples} trajectories ({t_data:.1f} s)", flush=True)
    qnet = wrap_model(fp.unet, config, run_once=example_forward(fp))
    qnet.to(_device(fp))  # new quantizer modules start on the CPU; calibrate where the model is
    summary = calibrate(fp, qnet, calib, options, progress=progress)
    summary["seconds"]["calibration_data"] = round(t_data, 2)
    summary["seconds"]["total_calibration"] = round(time.perf_counter() - t0, 2)  # calibration data included
    if stages:
        print(f"quantize: {options.method} calibration done ({time.perf_counter() - t0 - t_data:.1f} s)", flush=True)
    summary.update(measure(fp, qnet))
    run = QuantizedRun(fp, qnet, run_config, out, summary)
    if out is not None:
        save_run(run, out)
        if stages:
            print(f"quantize: wrote {out}", flush=True)
    t1 = time.perf_counter()
    _ptqd_stats(run, sampler, ptqd_cfg, out, progress)
    if stages and run.stats is not None:
        print(f"quantize: noise statistics of {ptqd_cfg['noise_samples']} trajectories done ({time.perf_counter() - t1:.1f} s)", flush=True)
    return run


def _ptqd_stats(run: QuantizedRun, sampler: SamplerConfig, ptqd_cfg: dict | None, out: Path | None, progress: bool) -> None:
    """Collect the noise statistics of a PTQD run (skipped when the run directory already has them)."""
    if ptqd_cfg is None or not ptqd_cfg["noise_samples"]:
        return  # not PTQD, or statistics deferred to `ptqd stats`
    from ptqd.correction.apply import calibrated_bits, collect_stats
    from ptqd.correction.stats import StatsRequest, stats_name

    if out is not None and (out / stats_name(sampler, run.fp.conditional)).is_file():
        return
    request = StatsRequest(
        sampler=dataclasses.replace(sampler, seed=ptqd_cfg["noise_seed"]),
        num_samples=ptqd_cfg["noise_samples"],
        bits=calibrated_bits(run),
        seed=ptqd_cfg["noise_seed"],
    )
    t0 = time.perf_counter()
    run.stats = collect_stats(run, request, out=out, progress=progress)
    run.summary.setdefault("seconds", {})["noise_statistics"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_json(out / "summary.json", run.summary, strict=True)
        integrity.record(out, ["summary.json"], create=False)


def _calibration_data(fp, out, num, steps, sampler, seed, progress) -> CalibrationSet:
    """The run's calibration inputs (reused from the run directory when they match), on the model's device."""
    calib = _find_calibration(fp, out, num, steps, sampler, seed, progress)
    dev = _device(fp)
    labels = calib.labels.to(dev) if calib.labels is not None else None
    return dataclasses.replace(calib, x=calib.x.to(dev), t=calib.t.to(dev), labels=labels)


def _find_calibration(fp, out, num, steps, sampler, seed, progress) -> CalibrationSet:
    path = out / "calibration.safetensors" if out is not None else None
    if path is not None and path.is_file():
        calib = load_calibration(path, fp)
        integrity.verify(path, f"delete {path} (the next `ptqd quantize` collects the data again) or choose a new --out")
        m = calib.meta
        wanted = (num, seed, sampler.scheduler, sampler.steps, sampler.eta, sampler.guidance if fp.conditional else None)
        found = (m.get("num_samples"), m.get("seed"), m.get("scheduler"), m.get("steps"), m.get("eta"), m.get("guidance"))
        same = wanted == found and m.get("num_steps") == len(kept_steps(sampler.steps, steps))
        if same:
            if progress:
                print(f"reusing calibration data {path}")
            return calib
    calib = collect_calibration(fp, num, sampler, steps, seed, progress)
    if path is not None:
        save_calibration(calib, path)
    return calib


def _existing_run(out: Path, run_config: dict[str, Any]) -> QuantizedRun | None:
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        return None
    old = read_run_config(out)
    keys = ("model_fingerprint", "method", "quant", "calibration", "options", "correction", "prompts")
    diff = [k for k in keys if old.get(k) != run_config.get(k)]
    if "options" in diff:  # name the options that differ (e.g. options.block_order)
        a, b = old.get("options") or {}, run_config.get("options") or {}
        diff[diff.index("options")] = ", ".join(f"options.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    if diff:
        hint = ""
        if "options.block_order" in ", ".join(diff):
            hint = f" (that run reconstructed its blocks in {old['options']['block_order']} order; " \
                   f"--block-order {old['options']['block_order']} matches it)"
        raise PtqdError(
            f"{out} already holds a different run (differs in: {', '.join(diff)}){hint}; "
            "choose another --out or delete that directory"
        )
    if not (out / "quant_state.safetensors").is_file():
        return None  # interrupted before the end: calibrate again (calibration data is reused)
    return load_run(out)


def save_run(run: QuantizedRun, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "quant_state.safetensors") as tmp:
        save_file(quant_state(run.qnet), str(tmp), metadata={"ptqd_run": json.dumps(run.config)})
    write_json(out / "summary.json", run.summary, strict=True)
    write_json(out / "config.json", run.config)
    integrity.record(out, list(RUN_FILES))
    run.path = out
    return out


def load_run(path: str | Path, model: DiffusionModel | None = None, require_record: bool = True) -> QuantizedRun:
    """Rebuild a quantized model from a run directory (the FP model is loaded by name/path unless given).

    Every file is checked before use: ``config.json`` and ``summary.json`` field by field,
    ``quant_state.safetensors`` against the config and the model (see :func:`read_quant_state`), and
    all of them against the run's ``integrity.json`` (sizes and SHA-256) when it has one."""
    path = Path(path)
    cfg_file = path / "config.json"
    state_file = path / "quant_state.safetensors"
    if not cfg_file.is_file():
        _not_a_run(path)
    if not state_file.is_file():
        raise PtqdError(f"{path} has no quant_state.safetensors: the run did not finish; rerun the same `ptqd quantize`")
    if require_record and not integrity.has_record(path):
        raise PtqdError(
            f"run {path} has no {integrity.RECORD} (an older ptqd made it, or the file was deleted): its files cannot be "
            f"checked against what ptqd wrote; run `ptqd upgrade {path}` to check what can be checked and write one, or quantize again"
        )
    config = read_run_config(path)
    fp = model if model is not None else _load_run_model(path, config)
    if fp.fingerprint() != config["model_fingerprint"]:
        given = "the model given" if model is not None else config["model"]
        raise PtqdError(
            f"run {path} was made from a model with fingerprint {config['model_fingerprint']}, but {given} "
            f"has {fp.fingerprint()}: not the same weights; pass the model the run was made from (--model DIR), or quantize again"
        )
    qconfig = QuantConfig.from_dict(config["quant"])
    qnet = wrap_model(fp.unet, qconfig, run_once=example_forward(fp))
    qnet.to(_device(fp))
    state = read_quant_state(state_file, config, qnet)
    load_quant_state(qnet, state)
    summary = read_summary(path)
    fix = _fix(path)
    for name in RUN_FILES:  # after the field checks above (they name what is wrong), every recorded byte
        if name != "calibration.safetensors":
            integrity.verify(path / name, fix)
    return QuantizedRun(fp, qnet, config, path, summary)


# ------------------------------------------------------------------------------ reading run files

RUN_FILES = ("config.json", "quant_state.safetensors", "summary.json", "calibration.safetensors")
RUN_SCHEMA = {
    "ptqd": "str",
    "model": "str",
    "model_fingerprint": "str",
    "method": "str",
    "quant": {"weight_bits": "int", "act_bits": "int", "extra_act_bits?": "list[int]", "softmax_bits?": "int"},
    "calibration": {
        "num_samples": "int", "num_steps": "int", "scheduler": "str", "steps": "int", "eta": "number",
        "guidance": "number|null", "seed": "int", "batch_size?": "int",
    },
    "options": "dict",
    "correction?": {"noise_samples": "int", "noise_seed": "int", "mixed_precision?": "list[int]|null"},
    "prompts?": "list[str]|null",
    "torch_threads?": "int",
}
SUMMARY_SCHEMA = {
    "seconds?": "dict",
    "size?": {"bytes": "number", "ratio?": "number|null"},
    "bops?": {"bops": "number", "macs?": "number", "bops_saving?": "number|null"},
    "layers?": "list",
    "kept_float?": "list",
}


def _fix(path: Path) -> str:
    return f"undo the edit, or delete {path} (or choose a new --out) and quantize again"


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's ``config.json``, checked field by field (an error names the file and the field)."""
    from ptqd.validate import check_object, fail, read_json

    path = Path(path)
    f = path / "config.json"
    fix = _fix(path)
    config = read_json(f, fix, RUN_SCHEMA, what="run config")
    if config["method"] not in METHODS:
        raise fail(f, "method", f"is {config['method']!r}, not one of {', '.join(METHODS)}", fix)
    try:
        QuantConfig.from_dict(config["quant"]).validate()
    except (PtqdError, TypeError, ValueError) as e:
        raise fail(f, "quant", f"is not a valid quantization config ({e})", fix) from None
    cal = config["calibration"]
    try:
        SamplerConfig(cal["scheduler"], cal["steps"], cal["eta"], cal["guidance"] if cal["guidance"] is not None else 1.0).validate()
    except PtqdError as e:
        raise fail(f, "calibration", f"is not a valid sampler setting ({e})", fix) from None
    for key in ("num_samples", "num_steps"):
        if cal[key] < 1:
            raise fail(f, f"calibration.{key}", f"must be at least 1, got {cal[key]}", fix)
    options = check_object(config["options"], {"block_order?": "str"}, f, fix, "options.")
    # runs made before the option existed reconstructed their blocks in module registration order
    options.setdefault("block_order", defaults.BLOCK_ORDER_BEFORE)
    if options["block_order"] not in defaults.BLOCK_ORDERS:
        raise fail(f, "options.block_order", f"is {options['block_order']!r}, not one of {', '.join(defaults.BLOCK_ORDERS)}", fix)
    return config


def read_summary(path: str | Path) -> dict[str, Any]:
    """A run's ``summary.json`` (empty when absent), checked field by field."""
    from ptqd.validate import read_json

    f = Path(path) / "summary.json"
    if not f.is_file():
        return {}
    return read_json(f, f"delete {f} (it holds only timings and sizes) or quantize again", SUMMARY_SCHEMA)


def read_quant_state(state_file: Path, config: dict[str, Any], qnet: nn.Module) -> dict[str, torch.Tensor]:
    """Read ``quant_state.safetensors`` and check it against ``config`` (the run it claims to belong to)
    and the freshly wrapped ``qnet``: every quantizer's tensors present with the right shapes, finite,
    positive scales, integer zero points in range, weight scales that fit the FP weights."""
    from safetensors import safe_open

    from ptqd.quant.quantizer import PASS_BITS, qrange
    from ptqd.validate import parse_json
    from ptqd.quant.wrap import act_quantizers, quant_layers

    fix = _fix(state_file.parent)
    try:
        with safe_open(str(state_file), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise PtqdError(f"{state_file} is not a readable safetensors file ({e}); {fix}") from None
    if "ptqd_run" in meta:
        claimed = parse_json(meta["ptqd_run"], f"{state_file} (metadata 'ptqd_run')", fix)
        if not isinstance(claimed, dict):
            raise PtqdError(f"{state_file}: metadata 'ptqd_run' is not a JSON object; {fix}")
        for key in ("model_fingerprint", "method"):
            if claimed.get(key) != config.get(key):
                raise PtqdError(f"{state_file} belongs to another run: field {key!r} is {claimed.get(key)!r} there but "
                                f"{config.get(key)!r} in config.json; {fix}")
        cq, q = claimed.get("quant") or {}, config["quant"]
        for key in sorted(set(cq) | set(q)):
            if cq.get(key) != q.get(key):
                raise PtqdError(f"{state_file} belongs to another run: field 'quant.{key}' is {cq.get(key)!r} there but "
                                f"{q.get(key)!r} in config.json; {fix}")

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise PtqdError(f"{state_file} lacks the tensor {key!r}; {fix}")
        t = state[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PtqdError(f"{state_file}: tensor {key!r} holds NaN or inf; {fix}")
        return t

    for name, m in quant_layers(qnet):
        for i, (wq, w) in enumerate(zip(m.weight_quantizers, m.weight_parts())):
            key = f"{name}.weight_quantizers.{i}"
            scale, zp = get(f"{key}.scale"), get(f"{key}.zero_point")
            want = w.shape[0] if wq.spec.per_channel else 1
            if scale.numel() != want or zp.shape != scale.shape:
                raise PtqdError(f"{state_file}: tensor {key + '.scale'!r} has shape {tuple(scale.shape)} (zero point "
                                f"{tuple(zp.shape)}), but the layer's weight {tuple(w.shape)} needs {want} value(s); {fix}")
            if f"{key}.round_up" in state and tuple(state[f"{key}.round_up"].shape) != tuple(w.shape):
                raise PtqdError(f"{state_file}: tensor {key + '.round_up'!r} has shape {tuple(state[key + '.round_up'].shape)}, "
                                f"the weight has {tuple(w.shape)}; {fix}")
            if wq.bits >= PASS_BITS:
                continue
            qmin, qmax = qrange(wq.bits, wq.spec.symmetric)
            if not bool((scale > 0).all()):
                raise PtqdError(f"{state_file}: tensor {key + '.scale'!r} has scales that are not positive; {fix}")
            if not bool((zp == zp.round()).all() and (zp >= qmin).all() and (zp <= qmax).all()):
                raise PtqdError(f"{state_file}: tensor {key + '.zero_point'!r} is not an integer in [{qmin}, {qmax}] "
                                f"({wq.bits}-bit weights); {fix}")
            wf = w.detach().float()
            amax = wf.abs().reshape(wf.shape[0], -1).amax(1) if wq.spec.per_channel else wf.abs().max().reshape(1)
            limit = 1.05 * amax.cpu() / (2 ** (wq.bits - 1) - 1) + 1e-7
            if bool((scale.reshape(-1).float() > limit).any()):
                ratio = float((scale.reshape(-1).float() / limit).max()) * 1.05
                raise PtqdError(f"{state_file}: tensor {key + '.scale'!r} does not fit the model's weights (up to {ratio:.3g}× "
                                f"the largest {wq.bits}-bit scale those weights allow); {fix}")
    for name, aq in act_quantizers(qnet):
        for b in aq.bit_options:
            scale = get(f"{name}.scale_{b}")
            if scale.numel() != 1 or not bool((scale > 0).all()):
                raise PtqdError(f"{state_file}: tensor {name + f'.scale_{b}'!r} must be one positive number, "
                                f"got shape {tuple(scale.shape)}; {fix}")
        zp = get(f"{name}.zero_point")
        if tuple(zp.shape) != (len(aq.bit_options),):
            raise PtqdError(f"{state_file}: tensor {name + '.zero_point'!r} must hold one number per bit-width "
                            f"({len(aq.bit_options)}), got shape {tuple(zp.shape)}; {fix}")
    return state


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "quant_state.safetensors").is_file()


def _load_run_model(path: Path, config: dict[str, Any]) -> DiffusionModel:
    """The FP model a run names: a bundled name, or the directory it was made from."""
    from ptqd.models.zoo import ZOO_NAMES

    ref = config["model"]
    if ref not in ZOO_NAMES and not Path(ref).expanduser().exists():
        raise PtqdError(
            f"run {path} was made from the model at {ref}, which is not there any more (moved or deleted): pass its new "
            f"location with --model NEWDIR (or load_run(RUN, model=...)); it is accepted when its weights match "
            f"(fingerprint {config['model_fingerprint']})"
        )
    return load(ref, prompts=config.get("prompts"))


def _model_ref(fp: DiffusionModel) -> str:
    """How a run names its model: the bundled name for zoo models (so runs move between machines),
    else the absolute model directory."""
    from ptqd.models.zoo import ZOO_NAMES, zoo_path

    if fp.path is None or (fp.name in ZOO_NAMES and Path(fp.path).resolve() == zoo_path(fp.name).resolve()):
        return fp.name
    return str(fp.path)


def _not_a_run(path: Path) -> None:
    from ptqd.runtime.checkpoint import MANIFEST

    if (path / MANIFEST).is_file():
        raise PtqdError(
            f"{path} is an exported checkpoint, not a quantization run: it samples (`ptqd sample {path}`), but "
            "quantizing, noise statistics and exports need the FP model: use the run directory it was exported from"
        )
    raise PtqdError(f"{path} is not a quantization run (no config.json); make one with `ptqd quantize --out {path}`")


def read_run_info(path: str | Path) -> dict[str, Any]:
    """What a run is, from its config.json and summary.json alone (no model is loaded)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        _not_a_run(path)
    config = read_run_config(path)
    summary = read_summary(path)
    q = config["quant"]
    extra = sorted(set(q.get("extra_act_bits") or []) - {q["act_bits"]})
    bits = f"W{q['weight_bits']}A{q['act_bits']}" + (f" (+A{',A'.join(map(str, extra))})" if extra else "")
    secs = summary.get("seconds", {})
    return {
        "model": config.get("model"),
        "method": config.get("method"),
        "bits": bits,
        "size_mb": summary["size"]["bytes"] / 1e6 if summary.get("size") else None,
        "gbops_forward": summary["bops"]["bops"] / 1e9 if summary.get("bops") else None,
        "calib_s": (secs.get("total_calibration") or 0.0) + (secs.get("noise_statistics") or 0.0) or None,
    }


def export_run(run: str | Path | QuantizedRun, out: str | Path, progress: bool = True, overwrite: bool = False) -> Path:
    """``ptqd export``: the packed checkpoint of a run directory (or an in-memory run) in ``out``."""
    from ptqd.runtime.checkpoint import CHECKPOINT_DIR, export, is_checkpoint

    if not isinstance(run, QuantizedRun):
        if is_checkpoint(run):
            raise PtqdError(f"{run} is already an exported checkpoint; export from the quantization run directory")
        if Path(out).resolve() == Path(run).resolve():
            raise PtqdError("export into a new directory, not into the run directory")
        check_output(out, kind="dir", overwrite=overwrite, ours=CHECKPOINT_DIR)  # before the run is loaded
        run = load_run(run)
    return export(run, out, progress=progress, overwrite=overwrite)


def ensure_stats(run: QuantizedRun, sampler: SamplerConfig, correct: str | None = "all", act_bits=None, progress: bool = True):
    """Collect (and save in the run directory) the noise statistics sampling ``run`` with ``sampler``
    needs, when it has none for that sampler (``ptqd sample --collect-stats``); returns them or None."""
    from ptqd.correction.apply import find_stats
    from ptqd.correction.corrector import parse_parts
    from ptqd.correction.stats import StatsRequest, stats_name

    mixed = act_bits == "mixed" or (act_bits is None and (run.config.get("correction") or {}).get("mixed_precision"))
    if not parse_parts(correct) and not mixed:
        return None
    try:
        return find_stats(run, sampler)
    except PtqdError:
        if run.manifest is not None:
            raise  # an exported checkpoint: statistics need the FP model (the message says how)
    from ptqd.correction.apply import collect_stats

    ptqd_cfg = run.config.get("correction") or {}
    seed = ptqd_cfg.get("noise_seed", defaults.NOISE_SEED)
    request = StatsRequest(
        sampler=dataclasses.replace(sampler, seed=seed), num_samples=ptqd_cfg.get("noise_samples") or defaults.NOISE_SAMPLES,
        bits=run.calibrated_bits, seed=seed,
    )
    if progress:
        print(f"collecting noise statistics for {stats_name(sampler, run.base.conditional)}: {request.num_samples} trajectories")
    return collect_stats(run, request, out=run.path, progress=progress)


UPGRADE_MAX_ERROR = 0.5  # ‖ε̂ − ε‖/‖ε‖ on the bundled model: W8A8 naive 0.04, W4A4 naive 0.13


def upgrade(path: str | Path, model: DiffusionModel | None = None, force: bool = False) -> dict[str, Any]:
    """``ptqd upgrade PATH``: give a run directory or checkpoint without an integrity record one, after
    checking what can be checked (every field, the quantizer state against the model, finite values,
    and the quantized network's error against the FP one on a fixed input). Returns what was checked."""
    from ptqd.locks import output_lock
    from ptqd.runtime.checkpoint import MANIFEST, is_checkpoint, upgrade_checkpoint

    path = Path(path)
    if is_checkpoint(path) or (path / MANIFEST).is_file():
        with output_lock(path, "checkpoint"):
            return upgrade_checkpoint(path)
    if not (path / "config.json").is_file():
        _not_a_run(path)
    with output_lock(path, "run directory"):
        if integrity.has_record(path):
            load_run(path, model)  # verifies every recorded file
            return {"path": str(path), "upgraded": False, "note": f"{path} already has {integrity.RECORD}; it was checked"}
        run = load_run(path, model, require_record=False)
        from ptqd.correction.stats import load_stats

        stats_files = sorted(path.glob("noise_stats_*.safetensors"))
        for f in stats_files:
            load_stats(f)  # field and shape checks
        err = _relative_error(run)
        if not np.isfinite(err) or (err > UPGRADE_MAX_ERROR and not force):
            raise PtqdError(
                f"run {path}: the quantized network's output differs from the FP network's by {err:.2f} of its size on a "
                f"fixed input (more than {UPGRADE_MAX_ERROR}): its quantizer state looks damaged; quantize again "
                "(no record was written), or pass --force if this error is expected for its bit-widths"
            )
        names = [*RUN_FILES, *[n for f in stats_files for n in (f.name, f.with_suffix(".json").name)]]
        integrity.record(path, names)
        return {"path": str(path), "upgraded": True, "relative_error": err, "files": [n for n in names if (path / n).is_file()]}


@torch.no_grad()
def _relative_error(run: QuantizedRun) -> float:
    """‖ε̂ − ε‖ / ‖ε‖ of the quantized denoiser against the FP one on a fixed noise input at mid-schedule."""
    fp = run.base
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, fp.channels, fp.image_size, fp.image_size), generator=g).to(_device(fp))
    y = torch.zeros(2, dtype=torch.long, device=x.device) if fp.conditional else None
    t = torch.tensor(int(fp.scheduler_config.get("num_train_timesteps", 1000)) // 2)
    guidance = 1.0
    e = fp.denoise(x, t, y, guidance)
    q = fp.denoise(x, t, y, guidance, unet=run.qnet)
    return float((q - e).norm() / e.norm().clamp_min(1e-12))
