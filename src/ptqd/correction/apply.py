"""PTQD on a quantization run: collect its noise statistics, and set up corrected (mixed-precision) sampling.

Statistics live in the run directory, one file per sampler setting
(``noise_stats_ddim50_eta1_g3.safetensors`` + ``.json``): they depend on the trajectory, so eta,
steps and guidance are part of what must match.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqd import defaults, distributed
from ptqd.correction.corrector import Corrector, parse_parts
from ptqd.correction.mixed import DEFAULT_CRITERION, bit_schedule, describe_schedule, sampling_bops
from ptqd.correction.stats import (
    NoiseStats,
    StatsRequest,
    check_stats,
    collect_moments,
    fit,
    load_stats,
    save_stats,
    stats_meta,
    stats_name,
)
from ptqd.errors import PtqdError
from ptqd.locks import holds_lock
from ptqd.metrics.bops import count_bops
from ptqd.models.loading import DiffusionModel, example_forward
from ptqd.quant.denoiser import quant_fingerprint
from ptqd.quant.wrap import current_act_bits, set_act_bits
from ptqd.sampling import SamplerConfig, make_scheduler


def calibrated_bits(run) -> list[int]:
    return run.quant_config.act_bit_options


def expected_meta(run, sampler: SamplerConfig) -> dict[str, Any]:
    """What statistics used with ``run`` and ``sampler`` must have been made with."""
    fp = run.base
    return {
        "model_fingerprint": fp.fingerprint(),
        "quant_fingerprint": quant_fingerprint(run.qnet),
        "weight_bits": run.quant_config.weight_bits,
        "scheduler": sampler.scheduler,
        "steps": sampler.steps,
        "eta": float(sampler.eta) if sampler.scheduler == "ddim" else None,
        "guidance": float(sampler.guidance) if fp.conditional else None,
    }


@holds_lock("out", "run directory")
def collect_stats(run, request: StatsRequest, out: str | Path | None = None, progress: bool = True) -> NoiseStats:
    """Algorithm 1 on ``run``: FP trajectories of ``request.sampler``, the quantized twin evaluated on
    the same inputs at every step for each activation bit-width; fitted and (with ``out``, a run
    directory) saved as ``stats_name(...)``. Resumes an interrupted collection."""
    request.validate()
    bits = sorted(request.bits or calibrated_bits(run))
    have = calibrated_bits(run)
    missing = [b for b in bits if b not in have]
    if missing:
        raise PtqdError(
            f"the run was calibrated for {', '.join(map(str, have))}-bit activations, not {', '.join(map(str, missing))}; "
            "quantize again with --extra-act-bits (or --mixed-precision)"
        )
    request = dataclasses.replace(request, bits=bits)
    if out is not None:
        from ptqd.io import RUN_DIR, check_output

        check_output(out, kind="dir", ours=RUN_DIR, option="run directory")
    fp, qnet = run.fp, run.qnet
    meta = stats_meta(fp, quant_fingerprint(qnet), run.quant_config.weight_bits, request)
    path = Path(out) / stats_name(request.sampler, fp.conditional) if out is not None else None
    partial = path.with_suffix(".parts") if path is not None else None  # finished batches: resume after a crash
    if path is not None and path.is_file():
        old = load_stats(path)
        same = all(old.meta.get(k) == v for k, v in json.loads(json.dumps(meta)).items() if k != "batch_size")
        if same and old.moments is not None and old.moments.joint is not None:  # same collection: only the fit options changed
            stats = fit(old.moments, request.clamp_k, request.mean_of, meta, request.ridge, old.heldout, request.tau)
            distributed.barrier(distributed.context())  # every rank has read the file before rank 0 rewrites it
            if distributed.context().main:
                save_stats(stats, path)
            return stats
    before = current_act_bits(qnet)

    def quantized(b, x, t, y, guidance):
        set_act_bits(qnet, b)
        return fp.denoise(x, t, y, guidance, unet=qnet)

    n_held = request.heldout_count()
    held_partial = path.with_suffix(".heldout.parts") if path is not None else None
    try:
        moments = collect_moments(
            fp, quantized, bits, request.num_samples, request.sampler, request.seed, progress, partial, meta, drive=request.drive
        )
        heldout = None
        if n_held:  # trajectories of another seed: every correction model is scored on them
            heldout = collect_moments(
                fp, quantized, bits, n_held, request.sampler, request.heldout_seed, progress, held_partial, meta, drive=request.drive
            )
    finally:
        if before is not None:
            set_act_bits(qnet, before)
    stats = fit(moments, request.clamp_k, request.mean_of, meta, request.ridge, heldout, request.tau)
    if path is not None and distributed.context().main:  # under torchrun every rank has the stats; rank 0 writes
        save_stats(stats, path)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(held_partial, ignore_errors=True)
    return stats


def add_matched(run, stats: NoiseStats, num: int = defaults.MATCHED_SAMPLES, gamma: float = defaults.MATCHED_GAMMA,
                ridge: float = defaults.MATCHED_RIDGE, progress: bool = False) -> NoiseStats:
    """Fit the trajectory-matched maps (:mod:`ptqd.correction.matched`) for ``stats``' sampler on ``num``
    lockstep trajectory pairs of the statistics' seed, add them as the ``matched`` correction model and,
    when the statistics have a file, save it again."""
    from ptqd.correction.matched import attach_matched, fit_matched

    m = stats.meta
    sampler = SamplerConfig(m["scheduler"], m["steps"], m["eta"] if m["eta"] is not None else 1.0, m.get("guidance") or 1.0)
    fp, qnet = run.fp, run.qnet
    before = current_act_bits(qnet)

    def quantized(b, x, t, y, guidance):
        set_act_bits(qnet, b)
        return fp.denoise(x, t, y, guidance, unet=qnet)

    try:
        fitted = fit_matched(fp, quantized, sampler, list(stats.bits), num, int(m.get("seed", defaults.NOISE_SEED)), gamma, ridge, progress)
    finally:
        if before is not None:
            set_act_bits(qnet, before)
    attach_matched(stats, fitted, {"num": int(num), "gamma": float(gamma), "ridge": float(ridge), "seed": int(m.get("seed", defaults.NOISE_SEED))})
    if stats.path is not None and distributed.context().main:
        save_stats(stats, stats.path)
    return stats


def guards_of(run, stats: NoiseStats) -> list[dict[str, Any]]:
    """The final-sample guards fitted for ``stats`` in ``run`` (entries of ``guard_<statistics>.json`` in its
    directory, those fitted in this process, those an exported checkpoint carries)."""
    found = [e for e in stats.meta.get("guards") or [] if isinstance(e, dict)]
    if run.path is not None and getattr(run, "manifest", None) is None:
        path = Path(run.path) / ("guard_" + Path(stats_name_for(stats)).stem + ".json")
        found += _read_guards(path)[0] if path.is_file() else []  # a damaged cache carries nothing (it is fitted again)
    name = stats_name_for(stats)
    found += [e for e in getattr(run, "_ptqd_guard_entries", []) if e["key"].get("stats") == name]
    out = {}
    for e in found:  # one entry per key, the latest kept
        out[json.dumps(e.get("key"), sort_keys=True)] = e
    return list(out.values())


def refit(stats: NoiseStats, clamp_k: bool = True, mean_of: str = "error", ridge: float | None = None,
          tau: float | None | str = "keep") -> NoiseStats:
    """The same statistics fitted with other options (needs the stored moments)."""
    if stats.moments is None:
        raise PtqdError(f"{stats.path} holds no moments to refit; collect the statistics again")
    meta = {k: v for k, v in stats.meta.items() if k not in ("clamp_k", "mean_of", "ridge", "tau")}
    tau = stats.meta.get("tau", defaults.POSTERIOR_TAU) if tau == "keep" else tau
    ridge = float(stats.meta.get("ridge", defaults.RIDGE)) if ridge is None else ridge
    out = fit(stats.moments, clamp_k, mean_of, meta, ridge, stats.heldout, tau)
    out.path = stats.path
    return out


def find_stats(run, sampler: SamplerConfig) -> NoiseStats:
    """The run's statistics for ``sampler``, checked against the run; a clear error when there are none."""
    held = [s for s in ([run.stats] if not isinstance(run.stats, list) else run.stats) if s is not None]
    for s in held:  # collected in this process (ptqd.quantize / ptqd.plan without a directory)
        if stats_name_for(s) == stats_name(sampler, run.base.conditional):
            check_stats(s, expected_meta(run, sampler))
            return s
    if run.path is None:
        g = f", guidance {sampler.guidance:g}" if run.base.conditional else ""
        raise PtqdError(
            f"no noise statistics for {sampler.scheduler} {sampler.steps} steps, eta {sampler.eta:g}{g} in this quantized "
            "model (held: " + (", ".join(stats_name_for(s) for s in held) or "none") + "); collect them with "
            "ptqd.plan(model, sampler, collect=True)"
        )
    path = Path(run.path) / stats_name(sampler, run.base.conditional)
    if not path.is_file():
        found = sorted(p.name for p in Path(run.path).glob("noise_stats_*.safetensors"))
        g = f" --guidance {sampler.guidance:g}" if run.base.conditional else ""
        eta = f" --eta {sampler.eta:g}" if sampler.scheduler == "ddim" else ""
        collect = f"ptqd stats {{}} --scheduler {sampler.scheduler} --steps {sampler.steps}{eta}{g}"
        if getattr(run, "manifest", None) is not None:  # an exported checkpoint: statistics need the FP model
            how = ("sample with the settings of those statistics, or with --correct none; or collect them in the "
                   f"quantization run directory (`{collect.format('RUN')}`) and export again")
        else:
            how = f"collect them with `{collect.format(run.path)}`"
        raise PtqdError(
            f"{run.path} has no noise statistics for {sampler.scheduler} {sampler.steps} steps{eta.replace(' --', ' ')}"
            f"{' guidance ' + format(sampler.guidance, 'g') if run.base.conditional else ''} (found: {', '.join(found) or 'none'}); {how}"
        )
    stats = load_stats(path)
    check_stats(stats, expected_meta(run, sampler))
    return stats


def stats_name_for(stats: NoiseStats) -> str:
    """The file name statistics of this sampler setting have in a run directory."""
    m = stats.meta
    sampler = SamplerConfig(m["scheduler"], m["steps"], m["eta"] if m["eta"] is not None else 1.0, m.get("guidance") or 1.0)
    return stats_name(sampler, m.get("guidance") is not None)


def schedule_for(run, stats: NoiseStats, sampler: SamplerConfig, candidates=None, criterion=DEFAULT_CRITERION, low_steps=None) -> dict[int, int]:
    sched = make_scheduler(run.base, sampler.scheduler, sampler.steps)
    return bit_schedule(stats, sched.alphas_cumprod.numpy(), sched.config.num_train_timesteps, candidates, criterion, low_steps)


def residual_for_budget(stats: NoiseStats, parts) -> dict[int, np.ndarray]:
    """Per bit-width, the per-element mean square of ε left by the correction ``parts`` at each step
    (held-out trajectories when the statistics have them): what the budgeted criterion propagates."""
    from ptqd.correction.corrector import correction_model
    from ptqd.correction.stats import _score_key

    table = stats.mse.get("heldout") or stats.mse.get("fit")
    if not table:
        where = f" in {stats.path}" if stats.path else ""
        raise PtqdError(
            f"the fidelity budget needs the joint moments the noise statistics{where} lack (written by an older ptqd); "
            "collect them again with `ptqd stats RUN`"
        )
    model = correction_model(tuple(parts))
    key = "error" if not any(p in parts for p in ("cnc", "bc")) and model == "ptqd" else _score_key(model, parts)
    return {b: np.asarray(table[key][i]) for i, b in enumerate(stats.bits)}


PROPAGATIONS = ("measured", "gaussian")


@torch.no_grad()
def step_deviations(fp: DiffusionModel, quantized, sampler: SamplerConfig, bits: list[int], corrector=None,
                    num: int = defaults.SENSITIVITY_SAMPLES, seed: int = defaults.HELDOUT_SEED, progress: bool = False,
                    ) -> dict[int, np.ndarray]:
    """Measured, per bit-width b and step i, the deviation of the final sample from FP (samples ×
    elements of x_0, float32) that quantizing *only* step i causes: FP trajectories of ``num`` samples,
    ``quantized(b, x, t, y, guidance)`` (corrected by ``corrector``, whose ``bits_at`` is set to b) at
    step i alone, the FP network before and after with the same noise. Returns {b: (steps, num, elements)}.
    A schedule's final error is predicted by the vector sum (:func:`ptqd.correction.mixed.vector_predicted_mse`).
    Costs about steps/2 FP sampling runs of ``num`` samples per bit-width."""
    from tqdm import tqdm

    from ptqd.sampling import default_labels, sample_generators

    sched = make_scheduler(fp, sampler.scheduler, sampler.steps)
    kw = {"eta": sampler.eta} if sampler.scheduler == "ddim" else {}
    guidance = sampler.guidance if fp.conditional else 1.0
    shape = (fp.channels, fp.image_size, fp.image_size)
    param = next(fp.unet.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gens = sample_generators(seed, range(num))  # as the sampling loop: CPU generators, tensors on the model's device
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * sched.init_noise_sigma
    labels = default_labels(fp, num)
    y = torch.from_numpy(np.asarray(labels)).to(device) if labels is not None else None
    xs, states = [], []
    for t in sched.timesteps:  # the FP trajectory, with each step's input and generator states
        xs.append(x)
        states.append([g.get_state() for g in gens])
        x = sched.step(fp.denoise(x, t, y, guidance), t, x, generator=gens, **kw).prev_sample
    final = x
    out = {b: np.zeros((len(xs), num, int(np.prod(shape))), dtype=np.float32) for b in bits}
    bar = tqdm(total=len(bits) * len(xs), desc="step sensitivity", disable=not progress)
    try:
        for b in bits:
            if corrector is not None:
                corrector.bits_at = {int(t): b for t in sched.timesteps}
                corrector._cache.clear()
            for i, t in enumerate(sched.timesteps):
                g = [torch.Generator().set_state(st) for st in states[i]]
                eps = quantized(b, xs[i], t, y, guidance)
                if corrector is not None:
                    z = corrector.step(sched, eps, t, xs[i], g, eta=sampler.eta if sampler.scheduler == "ddim" else 0.0)
                else:
                    z = sched.step(eps, t, xs[i], generator=g, **kw).prev_sample
                for t2 in sched.timesteps[i + 1:]:
                    z = sched.step(fp.denoise(z, t2, y, guidance), t2, z, generator=g, **kw).prev_sample
                out[b][i] = (z - final).reshape(num, -1).float().cpu().numpy()
                bar.update(1)
    finally:
        bar.close()
    return out


def step_contributions(run, sampler: SamplerConfig, parts, bits: list[int], num: int = defaults.SENSITIVITY_SAMPLES,
                       seed: int = defaults.HELDOUT_SEED, progress: bool = False) -> dict[int, np.ndarray]:
    """:func:`step_deviations` of ``run``'s quantized network (corrected by ``parts``), {b: (steps, num, elements)}.
    The per-step final MSE that quantizing step i alone causes is ``(d[b][i] ** 2).mean()``."""
    if getattr(run, "manifest", None) is not None:  # a checkpoint holds no FP network: its base would be the quantized one
        raise PtqdError(
            "the measured fidelity budget needs the FP model as reference, which an exported checkpoint does not hold: "
            "sample the quantization run directory instead, or pass --budget-propagation gaussian"
        )
    fp = run.base
    corrector = Corrector(find_stats(run, sampler), parts, bits_at=None, act_bits=bits[0]) if parts else None
    before = current_act_bits(run.qnet)

    def quantized(b, x, t, y, guidance):
        set_act_bits(run.qnet, b)
        return fp.denoise(x, t, y, guidance, unet=run.qnet)

    try:
        return step_deviations(fp, quantized, sampler, bits, corrector, num, seed, progress)
    finally:
        if before is not None:
            set_act_bits(run.qnet, before)


def budget_plan(run, stats: NoiseStats, sampler: SamplerConfig, parts, tolerance: float, candidates=None,
                propagation: str = defaults.BUDGET_PROPAGATION, progress: bool = False) -> dict[str, Any]:
    """The cheapest bit schedule whose predicted final MSE to FP stays within ``tolerance`` × that of
    the all-high-bit run, with the whole cost/error curve. ``propagation``: ``measured`` (each step's
    contribution measured by :func:`step_contributions`, cached in the run directory) or ``gaussian``
    (each step's residual propagated through the sampler linearised around Gaussian data,
    :mod:`ptqd.correction.mixed`; free, but blind to how a real model carries early errors). The
    measured propagation predicts a schedule by the vector sum of the steps' final deviations and picks
    schedules greedily on that quadratic (:func:`ptqd.correction.mixed.vector_budget_curve`)."""
    from ptqd.correction.mixed import (
        budget_curve,
        budget_schedule,
        data_variance,
        propagation_gains,
        schedule_from_curve,
        vector_budget_curve,
    )

    if propagation not in PROPAGATIONS:
        raise PtqdError(f"the budget's error propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}")
    candidates = sorted(candidates or stats.bits)
    for b in candidates:
        stats.bit(b)
    sched = make_scheduler(run.base, sampler.scheduler, sampler.steps)
    v = None
    if propagation == "gaussian":
        res_all = residual_for_budget(stats, parts)
        res = {b: res_all[b] for b in candidates}
        if stats.x_var is None:
            raise PtqdError("the fidelity budget needs the variance of x_t the noise statistics lack; collect them again with `ptqd stats RUN`")
        last = int(np.argmax([float(sched.alphas_cumprod[int(t)]) for t in stats.timesteps]))  # the least noisy step
        v = data_variance(float(stats.x_var[last]), float(sched.alphas_cumprod[int(stats.timesteps[last])]))
        gains = propagation_gains(sched, sampler.scheduler, float(sampler.eta), v)
    bops = bops_per_bits(run, candidates)
    if propagation == "gaussian":
        schedule = budget_schedule(res, gains, bops, stats.timesteps, tolerance)
        curve = budget_curve(res, gains, bops)
    else:
        dev = _cached_contributions(run, stats, sampler, parts, candidates, progress)
        gains = np.ones(len(stats.timesteps))
        curve = vector_budget_curve(dev, bops)
        schedule = schedule_from_curve(curve, stats.timesteps, tolerance)
    bits = [schedule[int(t)] for t in stats.timesteps]
    chosen = next(e for e in curve if list(e["bits"]) == bits)
    return {"schedule": schedule, "curve": curve, "chosen": chosen, "data_var": v, "gains": gains, "bops": bops,
            "propagation": propagation}


def has_cached_contributions(run, stats: NoiseStats, parts, bits=None) -> bool:
    """Whether :func:`step_contributions` for these corrections are already measured (in memory or in
    the run directory), so a measured budget costs nothing."""
    return _cached_contributions(run, stats, None, tuple(parts), sorted(bits or stats.bits), False, measure=False) is not None


def _cached_contributions(run, stats, sampler, parts, bits, progress, measure: bool = True) -> dict[int, np.ndarray] | None:
    """:func:`step_contributions`, read from / written to the run directory when there is one
    (``measure=False``: None when not measured yet)."""
    key = {"stats": stats_name_for(stats), "quant_fingerprint": quant_fingerprint(run.qnet), "parts": list(parts),
           "bits": list(bits), "num": defaults.SENSITIVITY_SAMPLES, "seed": defaults.HELDOUT_SEED, "vectors": True}
    cache = getattr(run, "_ptqd_contributions", {})
    tag = json.dumps(key, sort_keys=True)
    if tag in cache:
        return cache[tag]
    path = Path(run.path) / ("budget_" + Path(stats_name_for(stats)).stem + ".json") if run.path is not None and run.manifest is None else None
    if path is not None and path.is_file():
        entries, problem = _read_contributions(path, len(stats.timesteps))
        for entry in entries:
            if entry["key"] == key:
                vectors, problem = _read_vectors(path, entry, len(stats.timesteps))
                if vectors is not None:
                    cache[tag] = vectors
                    run._ptqd_contributions = cache
                    return cache[tag]
        if problem and measure:
            print(f"note: {path} {problem}; measuring the step contributions again (it is a cache)")
    if not measure:
        return None
    contrib = step_contributions(run, sampler, parts, bits, progress=progress)
    cache[tag] = contrib
    run._ptqd_contributions = cache
    if path is not None and distributed.context().main:
        from ptqd.io import write_json

        import hashlib

        from ptqd.integrity import seal, sha256_file
        from ptqd.io import write_npz

        entries = [e for e in _read_contributions(path, len(stats.timesteps))[0] if e["key"] != key] if path.is_file() else []
        h = hashlib.sha256(tag.encode()).hexdigest()[:16]
        npz = path.with_name(path.stem + "_" + h + ".npz")  # one vectors file per entry, so entries stay independent
        write_npz(npz, {f"a{b}": c for b, c in contrib.items()})
        entries.append({"key": key, "contributions": {str(b): [float((v ** 2).mean()) for v in c] for b, c in contrib.items()},
                        "vectors": npz.name, "vectors_sha256": sha256_file(npz)})
        write_json(path, seal({"what": "per-step final MSE to FP caused by quantizing that step alone, and (in the .npz files "
                               "named by each entry) its final deviation vectors (ptqd.correction.apply.step_contributions)",
                               "entries": entries}))
    return contrib


def _read_sealed(path: Path, what: str) -> tuple[dict | None, str | None]:
    """A cache ptqd wrote as a sealed JSON object with a list of ``entries``, or (None, what is wrong with it)."""
    from ptqd.integrity import SEAL, digest

    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"cannot be read ({type(e).__name__})"
    if not isinstance(saved, dict) or not isinstance(saved.get("entries"), list):
        return None, f"is not a {what} (field 'entries' must be a list in a JSON object)"
    if saved.get(SEAL) != digest(saved, SEAL):
        return None, f"was changed after ptqd wrote it (field {SEAL!r} does not match its content)"
    return saved, None


def _read_contributions(path: Path, steps: int) -> tuple[list[dict], str | None]:
    """The valid entries of a budget cache and, when it is damaged or edited, what is wrong with it
    (then no entry is used: the cache is measured again)."""
    saved, problem = _read_sealed(path, "budget cache")
    if problem:
        return [], problem
    good = []
    for i, e in enumerate(saved["entries"]):
        c = e.get("contributions") if isinstance(e, dict) else None
        if not isinstance(c, dict) or not isinstance(e.get("key"), dict):
            return [], f"field 'entries[{i}]' lacks its key or contributions"
        for b, v in c.items():
            ok = isinstance(v, list) and len(v) == steps and all(isinstance(x, (int, float)) and np.isfinite(x) and x >= 0 for x in v)
            if not ok or not str(b).isdigit():
                return [], f"field 'entries[{i}].contributions.{b}' must be {steps} finite, non-negative numbers"
        good.append(e)
    return good, None


def _read_vectors(path: Path, entry: dict, steps: int) -> tuple[dict[int, np.ndarray] | None, str | None]:
    """The final deviation vectors of a valid budget-cache entry ({b: (steps, num, elements)}), checked against
    the checksum the sealed entry records; (None, what is wrong) when missing, damaged or not of this shape."""
    from ptqd.integrity import sha256_file

    name = entry.get("vectors")
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        return None, "has an entry without its deviation vectors (an older format)"
    npz = path.with_name(name)
    try:
        if not npz.is_file() or sha256_file(npz) != entry.get("vectors_sha256"):
            return None, f"names {npz.name}, which is missing or was changed after ptqd wrote it"
        with np.load(npz, allow_pickle=False) as z:
            out = {int(b): z[f"a{b}"] for b in entry["contributions"]}
    except (OSError, KeyError, ValueError) as e:
        return None, f"names {npz.name}, which cannot be read ({type(e).__name__})"
    for b, v in out.items():
        if v.ndim != 3 or v.shape[0] != steps or not np.isfinite(v).all():
            return None, f"names {npz.name}, whose vectors for {b} bits are not {steps} finite steps × samples × elements"
    return out, None


def bops_per_bits(run, bits: list[int]) -> dict[int, float]:
    """BOPs of one denoiser forward (one image) at each activation bit-width."""
    before = current_act_bits(run.qnet)
    out = {}
    try:
        for b in bits:
            set_act_bits(run.qnet, b)
            out[b] = count_bops(run.qnet, example_forward(run.base)).summary()["bops"]
    finally:
        if before is not None:
            set_act_bits(run.qnet, before)
    return out


@dataclass
class SamplingPlan:
    """What ``sample`` needs for a (corrected, mixed-precision) quantized run, and what to record."""

    model: DiffusionModel  # the quantized model; its denoiser runs the plan's bits per timestep
    denoise: Any
    corrector: Corrector | None
    record: dict[str, Any]
    denoiser: Any = None  # the QuantizedDenoiser view of this plan


def plan_sampling(
    run,
    sampler: SamplerConfig,
    correct: str | list[str] | None = "all",
    act_bits: int | str | None = None,
    low_steps: int | None = None,
    criterion: str = DEFAULT_CRITERION,
    model: str | None = None,
    fidelity_budget: float | None = None,
    budget_propagation: str = defaults.BUDGET_PROPAGATION,
    guard: bool = defaults.GUARD,
    progress: bool = False,
) -> SamplingPlan:
    """Corrections ``correct`` (none|all|subset of cnc,bc,vsc); ``act_bits`` an int, ``"mixed"``
    (bit-width per step from the statistics) or None (the run's default: mixed for a PTQD run
    calibrated for several bit-widths, else its act_bits). ``low_steps`` forces the first N steps to the
    lowest bit-width. ``model``: the correction model (``ptqd`` default; a regression model replaces
    CNC/BC, see :func:`ptqd.correction.corrector.parse_parts`). ``fidelity_budget``: mixed precision
    by the budgeted criterion, the cheapest schedule whose predicted MSE to FP is within that factor of
    the all-high-bit run's (:func:`budget_plan`). ``guard`` (default on): the correction is blended per
    block of steps by its measured effect on the final samples (:mod:`ptqd.correction.guard`, fitted on
    calibration trajectories of seed :data:`ptqd.defaults.GUARD_SEED`, cached in the run directory), so
    it is never worse than none there, and PTQD's DDIM VSC solves σ′ with the ε coefficient c′(σ′) it implies
    (:meth:`Corrector.vsc_sigma_consistent`); ``guard=False`` applies the correction as it is with the
    official VSC (the paper's PTQD exactly)."""
    parts = parse_parts(correct, model)
    if fidelity_budget is not None:
        if low_steps is not None:
            raise PtqdError("give either a fidelity budget or a number of low-bit steps, not both")
        if not (isinstance(fidelity_budget, (int, float)) and np.isfinite(fidelity_budget) and fidelity_budget >= 1):
            raise PtqdError(f"the fidelity budget is a factor ≥ 1 on the all-high-bit run's predicted MSE to FP, got {fidelity_budget!r}")
        act_bits = "mixed"
    bits_avail = calibrated_bits(run)
    if act_bits is None:
        act_bits = "mixed" if (run.config.get("correction") or {}).get("mixed_precision") else run.quant_config.act_bits
    if low_steps is not None:
        act_bits = "mixed"
    mixed = act_bits == "mixed"
    if mixed and len(bits_avail) < 2:
        raise PtqdError(
            f"mixed precision needs a run calibrated for two or more activation bit-widths (this one: {bits_avail}); "
            "quantize with --mixed-precision 4,8"
        )
    if not mixed:
        try:
            act_bits = int(act_bits)
        except ValueError:
            raise PtqdError(f"activation bits must be a number or 'mixed', got {act_bits!r}") from None
        if act_bits not in bits_avail:
            raise PtqdError(f"the run was calibrated for {bits_avail}-bit activations, not {act_bits}")
    stats = find_stats(run, sampler) if (parts or mixed) else None
    fp = run.base
    record: dict[str, Any] = {"correction": list(parts)}
    if mixed and fidelity_budget is not None:
        plan = budget_plan(run, stats, sampler, parts, float(fidelity_budget), bits_avail, budget_propagation)
        schedule = plan["schedule"]
        record["bit_schedule"] = describe_schedule(schedule)
        record["bit_criterion"] = f"fidelity budget {fidelity_budget:g}"
        record["budget"] = {
            "tolerance": float(fidelity_budget), "predicted_relative_mse": float(plan["chosen"]["relative"]),
            "predicted_mse": float(plan["chosen"]["predicted_mse"]), "low_steps": int(plan["chosen"]["low_steps"]),
            "propagation": plan["propagation"], **({"data_var": float(plan["data_var"])} if plan["data_var"] is not None else {}),
        }
    elif mixed:
        schedule = schedule_for(run, stats, sampler, bits_avail, criterion, low_steps)
        record["bit_schedule"] = describe_schedule(schedule)
        record["bit_criterion"] = f"first {low_steps} steps low" if low_steps is not None else criterion
    else:
        schedule = {int(t): act_bits for t in make_scheduler(fp, sampler.scheduler, sampler.steps).timesteps}
        record["act_bits"] = act_bits
    bops = bops_per_bits(run, sorted(set(schedule.values())))
    cfg = 2 if fp.conditional and sampler.guidance != 1.0 else 1
    record["sampling_bops"] = sampling_bops(bops, schedule, cfg)
    record["bops_per_forward"] = {str(b): v for b, v in bops.items()}
    # the denoiser sets its bit-width from each call's timestep: nothing shared is changed here
    denoiser = run.denoiser.with_bits(schedule if mixed else act_bits)
    model = run.model_with(denoiser)
    corrector = None
    if parts:
        corrector = Corrector(stats, parts, bits_at=schedule, vsc_mode="consistent" if guard else "official")
        record["notes"] = corrector.notes(sampler.scheduler, sampler.eta, make_scheduler(fp, sampler.scheduler, sampler.steps))
        g = guard_for(run, stats, sampler, parts, schedule, model.denoise, corrector, progress) if guard else None
        if g is not None:
            corrector.blend = {int(t): float(v) for t, v in g["blend"].items()}
            record["guard"] = {k: v for k, v in g.items() if k != "blend"}
        else:
            record["guard"] = None
            corrector.vsc_mode = "official"  # no guard applied: the paper's PTQD exactly
            if guard:
                record["notes"].append("the correction is not guarded: an exported checkpoint has no FP model to measure the final "
                                       "samples against, and none fitted in its run travelled with it (sample the run directory once "
                                       "with this setting and export again, or sample with --no-guard)")
    return SamplingPlan(model, model.denoise, corrector, record, denoiser)


def guard_for(run, stats: NoiseStats, sampler: SamplerConfig, parts, schedule: dict[int, int], denoise, corrector,
              progress: bool = False) -> dict[str, Any]:
    """The final-sample guard of ``corrector`` on ``run`` (:func:`ptqd.correction.guard.fit_guard`),
    read from / written to the run directory (``guard_<statistics>.json``) when there is one; None
    for an exported checkpoint (no FP model to measure against)."""
    from ptqd.correction.guard import fit_guard

    key = {"stats": stats_name_for(stats), "quant_fingerprint": quant_fingerprint(run.qnet), "parts": list(parts),
           "schedule": {str(t): int(b) for t, b in schedule.items()}, "ridge": stats.meta.get("ridge"), "tau": stats.meta.get("tau"),
           "num": defaults.GUARD_SAMPLES, "seed": defaults.GUARD_SEED, "blocks": defaults.GUARD_BLOCKS, "version": 2,
           "guidance": float(sampler.guidance) if run.base.conditional else None}
    tag = json.dumps(key, sort_keys=True)
    cache = getattr(run, "_ptqd_guards", {})
    if tag in cache:
        return cache[tag]
    path = Path(run.path) / ("guard_" + Path(stats_name_for(stats)).stem + ".json") if run.path is not None and run.manifest is None else None
    entries = []
    if path is not None and path.is_file():
        entries, problem = _read_guards(path)
        if problem:
            print(f"note: {path} {problem}; fitting the guard again (it is a cache)")
        for e in entries:
            if e.get("key") == key and isinstance(e.get("guard"), dict):
                g = dict(e["guard"])
                g["blend"] = {int(t): float(v) for t, v in g.get("blend", {}).items()}
                cache[tag] = g
                run._ptqd_guards = cache
                return g
    if getattr(run, "manifest", None) is not None:  # an exported checkpoint: the guards fitted in its run travel in the statistics
        for e in stats.meta.get("guards") or []:
            if isinstance(e, dict) and e.get("key") == key and isinstance(e.get("guard"), dict):
                g = dict(e["guard"])
                g["blend"] = {int(t): float(v) for t, v in g.get("blend", {}).items()}
                return g
        return None
    fp = run.fp
    g = fit_guard(fp, denoise, corrector, sampler, progress=progress)
    cache[tag] = g
    run._ptqd_guards = cache
    entry = {"key": key, "guard": {**g, "blend": {str(t): v for t, v in g["blend"].items()}}}
    run._ptqd_guard_entries = [e for e in getattr(run, "_ptqd_guard_entries", []) if e["key"] != key] + [entry]
    if path is not None and distributed.context().main:
        from ptqd.io import write_json

        from ptqd.integrity import seal

        entries = [e for e in entries if e.get("key") != key] + [entry]
        write_json(path, seal({"what": "final-sample guard of corrections (ptqd.correction.guard.fit_guard)", "entries": entries}))
    return g


def _read_guards(path: Path) -> tuple[list[dict], str | None]:
    """The valid entries of a guard cache and, when it is damaged or edited, what is wrong with it (then no
    entry is used: the guard is fitted again). An entry's λ must lie in [0, 1], per block and per timestep."""
    saved, problem = _read_sealed(path, "guard cache")
    if problem:
        return [], problem

    def unit(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0

    for i, e in enumerate(saved["entries"]):
        g = e.get("guard") if isinstance(e, dict) else None
        if not isinstance(g, dict) or not isinstance(e.get("key"), dict):
            return [], f"field 'entries[{i}]' lacks its key or guard"
        lam, blend = g.get("lambda"), g.get("blend")
        if not isinstance(lam, list) or not lam or not all(unit(v) for v in lam):
            return [], f"field 'entries[{i}].guard.lambda' must be a list of numbers in [0, 1]"
        if not isinstance(blend, dict) or not blend or not all(str(t).lstrip("-").isdigit() and unit(v) for t, v in blend.items()):
            return [], f"field 'entries[{i}].guard.blend' must map timesteps to numbers in [0, 1]"
        if g.get("chosen") not in ("none", "fit", "full") or not isinstance(g.get("mse"), dict):
            return [], f"field 'entries[{i}].guard' lacks its choice or calibration errors"
    return list(saved["entries"]), None


def fp_sampling_bops(fp: DiffusionModel, sampler: SamplerConfig) -> float:
    per = count_bops(fp.unet, example_forward(fp)).summary()["fp_bops"]
    cfg = 2 if fp.conditional and sampler.guidance != 1.0 else 1
    return float(per * sampler.steps * cfg)


def schedule_array(schedule: dict[int, int]) -> np.ndarray:
    return np.asarray([[t, b] for t, b in schedule.items()], dtype=np.int64)
