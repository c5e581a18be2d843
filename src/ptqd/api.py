"""ptqd's Python API, in the shape of the ecosystem: ``quantize(obj, config)`` gives back the kind it was
given (a diffusers pipeline stays a pipeline, a denoiser a denoiser), quantized and PTQD-corrected, with
no directory needed; ``save`` / ``load`` round-trip it; ``plan`` re-targets it to another sampler.

    import ptqd
    pipe = ptqd.load_pipeline("digits16-cond")                              # a diffusers pipeline
    qpipe = ptqd.quantize(pipe, ptqd.W4A8, method="ptqd", preset="quick")   # same pipeline class, quantized + corrected
    images = qpipe(class_labels=[0, 1, 2], num_inference_steps=50).images   # the pipeline's own __call__
    ptqd.save(qpipe, "digits-w4a8.ptqd")                                    # ptqd.load("digits-w4a8.ptqd") reads it

A quantized pipeline holds a :class:`ptqd.quant.denoiser.QuantizedDenoiser` as its denoiser (it sets
the activation bit-width per timestep: mixed precision) and, with corrections, a
:class:`ptqd.correction.scheduler.PTQDScheduler` as its scheduler (CNC/BC/VSC inside ``step``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ptqd import defaults
from ptqd.calibration import CalibrationOptions
from ptqd.correction import StatsRequest, collect_stats, plan_sampling
from ptqd.correction.apply import stats_name_for
from ptqd.correction.scheduler import PTQDScheduler
from ptqd.errors import PtqdError
from ptqd.io import atomic_path
from ptqd.models.loading import DiffusionModel, from_components
from ptqd.models.loading import load as load_model
from ptqd.models.pipeline import ClassConditionalPipeline
from ptqd.quant import QuantConfig
from ptqd.quant.denoiser import QuantizedDenoiser, QuantizedRun
from ptqd.sampling import SamplerConfig

W8A8 = QuantConfig(weight_bits=8, act_bits=8)
W4A8 = QuantConfig(weight_bits=4, act_bits=8)
W4A4 = QuantConfig(weight_bits=4, act_bits=4)
PIPELINE_FILE = "ptqd_pipeline.json"
CONFIGS = {"W8A8": W8A8, "W4A8": W4A8, "W4A4": W4A4}  # the preset names quantize() also takes as strings
PIPELINE_SCHEMA = {
    "kind": "str", "pipeline": "str|null", "scheduler": "str|null", "sampler": "dict|null", "correct": "str",
    "act_bits": "int|str|null", "fidelity_budget": "number|null", "guard?": "bool", "manifest_sha256?": "str",
}


def as_config(config) -> QuantConfig:
    """A :class:`QuantConfig`, or one of the preset names ``"W8A8"``, ``"W4A8"``, ``"W4A4"``."""
    if isinstance(config, QuantConfig):
        config.validate()
        return config
    if isinstance(config, str) and config.upper() in CONFIGS:
        return CONFIGS[config.upper()]
    raise PtqdError(
        f"config must be a ptqd.QuantConfig or one of the names {', '.join(map(repr, CONFIGS))}, got {config!r}: "
        "e.g. ptqd.quantize(pipe, ptqd.W4A8) or ptqd.quantize(pipe, \"W4A8\")"
    )


@dataclass(frozen=True)
class Preset:
    """Calibration sizes: how much FP sampling and reconstruction a calibration spends."""

    options: CalibrationOptions
    calib_samples: int
    calib_steps: int
    noise_samples: int


def get_preset(name: str) -> Preset:
    """``default`` (the Q-Diffusion/PTQD settings ptqd's results use) or ``quick`` (about a minute on the
    bundled model on 2 CPU cores; for trying things out)."""
    if name not in defaults.PRESETS:
        raise PtqdError(f"unknown preset {name!r}: use one of {', '.join(defaults.PRESETS)}")
    p = defaults.PRESETS[name]
    return Preset(CalibrationOptions(**p["options"]), p["calib_samples"], p["calib_steps"], p["noise_samples"])


def load_pipeline(name_or_path: str | Path, scheduler: str = "ddim"):
    """A diffusers pipeline for a bundled model (``digits16-cond``: :class:`ClassConditionalPipeline`,
    ``digits-ldm``: the same with its autoencoder as ``vae``, ``digits16``: ``DDIMPipeline``) or a model
    directory ptqd can load."""
    return pipeline_for(load_model(name_or_path), scheduler)


def pipeline_for(model: DiffusionModel, scheduler: str = "ddim", denoiser: torch.nn.Module | None = None):
    """The diffusers pipeline that samples ``model`` (UNet2DModel denoisers)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if type(model.unet).__name__ != "UNet2DModel" and not isinstance(model.unet, QuantizedDenoiser):
        raise PtqdError(f"ptqd builds pipelines for UNet2DModel denoisers; {model.name} has a {type(model.unet).__name__}")
    if model.latent and not model.conditional:
        raise PtqdError(f"{model.name} is an unconditional latent model: load its own diffusers pipeline (e.g. LDMPipeline) and pass that")
    sched_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler]
    sched = sched_cls.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    net = denoiser if denoiser is not None else model.unet
    if model.conditional:
        pipe = ClassConditionalPipeline(unet=net, scheduler=sched, vae=model.decoder.vae if model.latent else None)
    else:
        pipe = (DDIMPipeline if scheduler == "ddim" else DDPMPipeline)(unet=net, scheduler=sched)
    pipe.ptqd_model = model
    return pipe


def _is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _denoiser_key(pipe) -> str:
    key = next((k for k in ("unet", "transformer") if getattr(pipe, k, None) is not None), None)
    if key is None:
        raise PtqdError(f"{type(pipe).__name__} has no unet or transformer to quantize")
    return key


def as_model(obj, scheduler=None) -> DiffusionModel:
    """What ptqd quantizes, from a bundled name or model directory, a diffusers pipeline, or a diffusers
    denoiser (``scheduler``: its scheduler or scheduler config; default a 1000-step linear DDPM)."""
    if isinstance(obj, DiffusionModel):
        return obj
    if isinstance(obj, (str, Path)):
        return load_model(obj)
    if _is_pipeline(obj):
        if getattr(obj, "ptqd_model", None) is not None and obj.ptqd_model.unet is getattr(obj, _denoiser_key(obj)):
            return obj.ptqd_model
        key = _denoiser_key(obj)
        net = getattr(obj, key)
        if isinstance(net, QuantizedDenoiser):
            raise PtqdError("this pipeline is already quantized; quantize the full-precision pipeline")
        vae = getattr(obj, "vqvae", None) or getattr(obj, "vae", None)
        where = getattr(obj.config, "_name_or_path", None)
        path = where if where and Path(where).is_dir() else None
        return from_components(net, obj.scheduler, name=Path(where).name if path else type(obj).__name__, decoder=vae, path=path)
    from diffusers import DDPMScheduler, ModelMixin

    if isinstance(obj, QuantizedDenoiser):
        raise PtqdError("this denoiser is already quantized; quantize the full-precision one")
    if isinstance(obj, ModelMixin):
        return from_components(obj, scheduler if scheduler is not None else DDPMScheduler())
    raise PtqdError(
        f"ptqd.quantize takes a diffusers pipeline, a diffusers denoiser (ModelMixin), a bundled model name or a model "
        f"directory, got {type(obj).__name__}"
    )


def default_sampler(model: DiffusionModel, **overrides) -> SamplerConfig:
    """The sampler statistics and corrections are made for unless one is given (see :mod:`ptqd.defaults`)."""
    base = dict(scheduler=defaults.SCHEDULER, steps=defaults.STEPS, eta=defaults.ETA, guidance=defaults.guidance(model.conditional))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**base)


def quantize(
    obj,
    config: QuantConfig = W4A8,
    method: str = "ptqd",
    *,
    sampler: SamplerConfig | None = None,
    preset: str = "default",
    forward_loop: Callable[[torch.nn.Module], Any] | None = None,
    mixed_precision: list[int] | None = None,
    correct: str | None = None,
    act_bits: int | str | None = None,
    scheduler=None,
    block_order: str | None = None,
    correction_model: str | None = None,
    fidelity_budget: float | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    guard: bool = defaults.GUARD,
):
    """Quantize ``obj`` and give back the same kind: a pipeline (its denoiser swapped for a
    :class:`QuantizedDenoiser`, its scheduler for a :class:`PTQDScheduler` when corrections apply), a
    quantized denoiser for a denoiser, a pipeline for a bundled model name or model directory.

    ``method``: ``naive``, ``qdiff`` or ``ptqd`` (qdiff + noise statistics + correction). ``sampler``:
    what the calibration trajectories and statistics follow (default DDIM 50 steps, eta 1, guidance 3
    for conditional models); the returned pipeline samples corrected with exactly that sampler (use
    :func:`plan` for another). ``forward_loop(denoiser)`` replaces the built-in calibration
    trajectories (ModelOpt's convention). ``block_order``: the order blocks are reconstructed in,
    ``forward`` or ``registration`` (default: :data:`ptqd.defaults.BLOCK_ORDER`). ``correction_model``:
    ``ptqd`` (default), ``mean``, ``content`` or ``content-pixel`` (:mod:`ptqd.correction.models`).
    ``fidelity_budget``: mixed precision by the budgeted criterion (the cheapest bit schedule whose
    predicted MSE to FP stays within that factor of the all-high-bit run's). ``out``: also write a
    run directory (a cache: the object returned is complete without it). ``guard`` (default on): each
    correction is blended per block of steps by its measured effect on the final samples, never worse
    than none on its calibration trajectories (:mod:`ptqd.correction.guard`); False: the paper's PTQD as it is.
    """
    from ptqd.runs import quantize as quantize_run

    config = as_config(config)  # every argument is checked before any work
    if method not in ("naive", "qdiff", "ptqd"):
        raise PtqdError(f"method must be naive, qdiff or ptqd, got {method!r}")
    if isinstance(obj, QuantizedDenoiser) or getattr(obj, "ptqd_run", None) is not None or (
            _is_pipeline(obj) and isinstance(getattr(obj, _denoiser_key(obj), None), QuantizedDenoiser)):
        raise PtqdError(f"this {type(obj).__name__} is already quantized by ptqd; quantize the full-precision one "
                        "(or use ptqd.plan to re-target it to another sampler)")
    p = get_preset(preset)
    model = as_model(obj, scheduler)
    options = p.options if block_order is None else dataclasses.replace(p.options, block_order=block_order)
    sampler = sampler or default_sampler(model)
    run = quantize_run(
        model, config, method, options, p.calib_samples, p.calib_steps, sampler, out=out, progress=progress,
        noise_samples=p.noise_samples if method == "ptqd" else 0, mixed_precision=mixed_precision, forward_loop=forward_loop,
    )
    template = obj if (_is_pipeline(obj) or not isinstance(obj, (str, Path, DiffusionModel))) else None
    return _assemble(template, run, sampler, correct, act_bits, correction_model, fidelity_budget, guard)


def run_of(obj) -> QuantizedRun:
    """The quantized run behind a pipeline or denoiser that :func:`quantize` or :func:`load` made."""
    run = getattr(obj, "ptqd_run", None)
    if run is None and _is_pipeline(obj):
        run = getattr(getattr(obj, _denoiser_key(obj)), "ptqd_run", None)
    if run is None:
        raise PtqdError(f"this {type(obj).__name__} was not made by ptqd.quantize or ptqd.load")
    return run


def plan(obj, sampler: SamplerConfig | None = None, *, steps: int | None = None, eta: float | None = None,
         guidance: float | None = None, scheduler: str | None = None, correct: str | None = None,
         act_bits: int | str | None = None, correction_model: str | None = None, fidelity_budget: float | None = None,
         collect: bool = True, progress: bool = True, guard: bool = defaults.GUARD):
    """The same quantized pipeline (or denoiser) made for another sampler, correction or bit schedule
    (``correction_model``, ``fidelity_budget`` as in :func:`quantize`): its noise statistics are
    collected first when ``collect`` (the default; they need the FP model) and none are held."""
    run = run_of(obj)
    old = getattr(obj, "ptqd_sampler", None) or default_sampler(run.base)
    sampler = sampler or dataclasses.replace(
        old, **{k: v for k, v in dict(steps=steps, eta=eta, guidance=guidance, scheduler=scheduler).items() if v is not None}
    )
    if fidelity_budget is not None:
        act_bits = "mixed"
    if collect and _needs_stats(run, sampler, correct, act_bits) and not _has_stats(run, sampler):
        ptqd_cfg = run.config.get("correction") or {}
        seed = ptqd_cfg.get("noise_seed", defaults.NOISE_SEED)
        request = StatsRequest(
            sampler=dataclasses.replace(sampler, seed=seed), num_samples=ptqd_cfg.get("noise_samples") or defaults.NOISE_SAMPLES,
            bits=run.calibrated_bits, seed=seed,
        )
        stats = collect_stats(run, request, out=run.path if run.manifest is None else None, progress=progress)
        run.stats = [s for s in _held(run) if stats_name_for(s) != stats_name_for(stats)] + [stats]
    return _assemble(obj, run, sampler, correct, act_bits, correction_model, fidelity_budget, guard)


def _held(run) -> list:
    return [s for s in (run.stats if isinstance(run.stats, list) else [run.stats]) if s is not None]


def _needs_stats(run, sampler, correct, act_bits) -> bool:
    default = "all" if run.config.get("method") == "ptqd" else "none"
    return (correct or default) != "none" or act_bits == "mixed" or (act_bits is None and (run.config.get("correction") or {}).get("mixed_precision"))


def _has_stats(run, sampler) -> bool:
    from ptqd.correction.stats import stats_name

    name = stats_name(sampler, run.base.conditional)
    return any(stats_name_for(s) == name for s in _held(run)) or (run.path is not None and (Path(run.path) / name).is_file())


def _assemble(template, run: QuantizedRun, sampler: SamplerConfig, correct: str | None, act_bits,
              correction_model: str | None = None, fidelity_budget: float | None = None, guard: bool = defaults.GUARD):
    """The object :func:`quantize` / :func:`load` / :func:`plan` return, planned for ``sampler``: a
    denoiser when ``template`` is a denoiser, else a pipeline (``template``'s class and components, or
    the one ptqd builds for the model)."""
    if correct is None:
        correct = "all" if run.config.get("method") == "ptqd" else "none"
    sp = plan_sampling(run, sampler, correct, act_bits, model=correction_model, fidelity_budget=fidelity_budget, guard=guard)
    denoiser = sp.denoiser
    denoiser.ptqd_run, denoiser.ptqd_sampler, denoiser.ptqd_record = run, sampler, sp.record
    if template is not None and not _is_pipeline(template):
        return denoiser  # a denoiser went in: a denoiser comes back (corrected_scheduler() gives its scheduler)
    if template is None:
        pipe = pipeline_for(run.base, sampler.scheduler, denoiser)
    else:
        comps = dict(template.components)
        comps[_denoiser_key(template)] = denoiser
        if isinstance(comps.get("scheduler"), PTQDScheduler):
            comps["scheduler"] = comps["scheduler"].base
        pipe = type(template)(**comps)
    base = pipe.scheduler.base if isinstance(pipe.scheduler, PTQDScheduler) else pipe.scheduler
    if sp.corrector is not None:
        pipe.register_modules(scheduler=PTQDScheduler(base, sp.corrector, sampler))
    pipe.ptqd_run, pipe.ptqd_sampler, pipe.ptqd_record = run, sampler, sp.record
    pipe.ptqd_model = run.model_with(denoiser)
    pipe.save_pretrained = _refuse_save_pretrained  # diffusers would skip the quantized parts and write a pipeline that does not load
    return pipe


def _refuse_save_pretrained(*args, **kwargs):
    raise PtqdError(
        "a ptqd-quantized pipeline cannot be saved with save_pretrained (its quantized denoiser and correcting scheduler "
        "are not diffusers components): use ptqd.save(pipe, DIR), and ptqd.load(DIR) to read it back"
    )


def corrected_scheduler(denoiser: QuantizedDenoiser, scheduler):
    """A diffusers scheduler wrapped with the PTQD correction of a quantized denoiser's plan."""
    run, sampler = run_of(denoiser), denoiser.ptqd_sampler
    record = denoiser.ptqd_record
    sp = plan_sampling(run, sampler, record.get("correction") or "none", "mixed" if "bit_schedule" in record else record.get("act_bits"),
                       fidelity_budget=(record.get("budget") or {}).get("tolerance"), guard=record.get("guard", defaults.GUARD) is not None)
    if sp.corrector is None:
        return scheduler
    return PTQDScheduler(scheduler, sp.corrector, sampler)


def save(obj, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized pipeline or denoiser as a packed checkpoint directory: the diffusers configs,
    the packed low-bit weights (safetensors), its noise statistics and how it samples
    (``ptqd_pipeline.json``). :func:`load` reads it back."""
    from ptqd.runtime.checkpoint import export

    run = run_of(obj)
    sampler = getattr(obj, "ptqd_sampler", None)
    record = getattr(obj, "ptqd_record", None) or {}
    directory = export(run, directory, progress=False, overwrite=overwrite)
    info = {
        "kind": "pipeline" if _is_pipeline(obj) else "denoiser",
        "pipeline": type(obj).__name__ if _is_pipeline(obj) else None,
        "scheduler": type(obj.scheduler.base if isinstance(getattr(obj, "scheduler", None), PTQDScheduler) else obj.scheduler).__name__
        if _is_pipeline(obj) else None,
        "sampler": asdict(sampler) if sampler is not None else None,
        "correct": ",".join(record.get("correction") or []) or "none",
        "act_bits": "mixed" if "bit_schedule" in record else record.get("act_bits"),
        "fidelity_budget": (record.get("budget") or {}).get("tolerance"),
        "guard": record.get("guard", defaults.GUARD) is not None,
    }
    from ptqd.integrity import seal

    with atomic_path(Path(directory) / PIPELINE_FILE) as tmp:
        tmp.write_text(json.dumps(seal(info), indent=2) + "\n")  # its own checksum: an edit is refused, not obeyed
    return Path(directory)


def read_pipeline_info(directory: Path) -> dict[str, Any]:
    """``ptqd_pipeline.json`` of a saved pipeline, checked field by field and against its own checksum."""
    from ptqd.integrity import check_seal
    from ptqd.validate import check_object, fail, read_json

    f = directory / PIPELINE_FILE
    fix = "save the pipeline again with ptqd.save (or delete the file to load the checkpoint with its calibration sampler)"
    info = read_json(f, fix, PIPELINE_SCHEMA)
    unknown = sorted(set(info) - {k.rstrip("?") for k in PIPELINE_SCHEMA})
    if unknown:
        raise fail(f, unknown[0], "is not a field ptqd writes", fix)
    if not check_seal(info, f, fix):
        raise fail(f, "manifest_sha256", "is missing (files ptqd saves carry their checksum)", fix)
    if info["kind"] not in ("pipeline", "denoiser"):
        raise fail(f, "kind", f"is {info['kind']!r}, not pipeline or denoiser", fix)
    if info["sampler"] is not None:
        check_object(info["sampler"], {"scheduler": "str", "steps": "int", "eta": "number", "guidance": "number",
                                       "seed?": "int", "batch_size?": "int"}, f, fix, "sampler.")
        try:
            SamplerConfig(**info["sampler"]).validate()
        except (TypeError, PtqdError) as e:
            raise fail(f, "sampler", f"is not a valid sampler setting ({e})", fix) from None
    info.pop("manifest_sha256", None)
    return info


PIPELINES = ("DDIMPipeline", "DDPMPipeline", "ClassConditionalPipeline")


def load(directory: str | Path, backend: str = "int"):
    """A quantized pipeline (or denoiser) from a directory :func:`save` or ``ptqd export`` wrote.
    ``backend``: ``int`` (integer kernels) or ``fake`` (simulated quantization, numerically the
    quantized model that was saved)."""
    from ptqd.runtime.checkpoint import load_checkpoint

    directory = Path(directory)
    run = load_checkpoint(directory, backend)
    info_file = directory / PIPELINE_FILE
    info: dict[str, Any] = read_pipeline_info(directory) if info_file.is_file() else {}
    sampler = SamplerConfig(**info["sampler"]) if info.get("sampler") else default_sampler(
        run.base, scheduler=run.config["calibration"].get("scheduler"), steps=run.config["calibration"].get("steps"),
        eta=run.config["calibration"].get("eta"), guidance=run.config["calibration"].get("guidance"),
    )
    correct, act_bits, budget = info.get("correct"), info.get("act_bits"), info.get("fidelity_budget")
    guard = bool(info.get("guard", defaults.GUARD))
    if info.get("kind") == "denoiser":
        return _assemble(QuantizedDenoiser(run.qnet), run, sampler, correct, act_bits, fidelity_budget=budget, guard=guard)
    if info.get("pipeline") not in (None, *PIPELINES):
        raise PtqdError(f"{info_file}: pipeline {info['pipeline']!r} is not one ptqd rebuilds ({', '.join(PIPELINES)})")
    return _assemble(None, run, sampler, correct, act_bits, fidelity_budget=budget, guard=guard)
