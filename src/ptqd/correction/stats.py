"""Quantization-noise statistics (PTQD Algorithm 1).

The FP sampler drives N trajectories; at every step the FP and the quantized denoiser see the same
x_t (same labels and guidance) and the error Δε = ε̂ − ε is split into a part correlated with the FP
output and a residual: Δε = k_t·ε + Δε'. Collection streams: only per-sample moments are kept
(sums of ε, Δε, ε², Δε², ε·Δε over each sample, and per-channel sums), never the ε tensors, and the
fit is a pure function of those moments, so other fit options need no new collection.

Fit per step (official PTQD code where the paper is vague):

* ``k``: least-squares slope of Δε on ε over all elements (scipy ``linregress``' slope), clamped at 0
  from below unless ``clamp_k=False``; ``k_raw`` keeps the unclamped value.
* ``mu[c]``: per-channel mean of the total error Δε (``mean_of="error"``, official) or of the residual
  Δε − kε (``mean_of="residual"``).
* ``sigma``: mean over samples of each sample's (unbiased) std of Δε − kε (official).
* ``r``: correlation coefficient of Δε and ε; ``fp_var``: variance of the FP output;
  ``rel_err``: RMS(Δε)/RMS(ε), to spot steps (t≈0) where the fit is not to be trusted.

The same pass also streams the joint second moments of [ε, ε̂, x_t, 1] (``J``) and their per-pixel
sums (``P``) that the regression correction models of :mod:`ptqd.correction.models` are fitted from
(``mean``, ``content``, ``content-pixel``), and a second, smaller pass over trajectories of another
seed (``heldout``) on which every model, PTQD's included, is scored: per step, the share of the
quantization error E|ε̂ − ε|² it removes (R², negative when it adds error), in-sample and held out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ptqd import __version__, defaults, integrity
from ptqd.validate import check_object, parse_json
from ptqd.checks import check_finite
from ptqd.correction import models as cm
from ptqd.errors import PtqdError
from ptqd.io import atomic_path, write_json
from ptqd.models.loading import DiffusionModel
from ptqd.sampling import SamplerConfig, default_labels, make_scheduler, trajectories

STATS_SEED = defaults.NOISE_SEED  # differs from calibration (1000) and evaluation seeds (0, 1, 2, …)
MOMENTS = ("s_e", "s_d", "s_ee", "s_dd", "s_ed")  # per sample, over all elements
MEAN_OF = ("error", "residual")
DRIVES = ("fp", "quantized")  # which network drives the statistics trajectories
# metadata that must agree between statistics and the sampling run that uses them
JOINT = ("J", "P")  # summed over samples: (bits, steps, 3C+1, 3C+1) and (bits, steps, 3C, H·W)
MATCH_KEYS = ("model_fingerprint", "quant_fingerprint", "weight_bits", "scheduler", "steps", "eta", "guidance")


@dataclass
class NoiseMoments:
    """Per-sample sums for each (bit-width, step): ``m[name]`` has shape (bits, steps, N) for the
    scalar moments and (bits, steps, N, C) for ``c_e``/``c_d`` (per-channel sums of ε and Δε)."""

    bits: list[int]
    timesteps: list[int]
    elements: int  # C·H·W per sample
    channels: int
    m: dict[str, np.ndarray]
    joint: dict[str, np.ndarray] | None = None  # "J", "P" (see JOINT); None in files written before ptqd 0.6

    @property
    def num_samples(self) -> int:
        return int(self.m["s_e"].shape[2])


def merge_moments(a: NoiseMoments, b: NoiseMoments) -> NoiseMoments:
    """The moments of two collections (same bit-widths, steps and shapes) as one: per-sample sums are
    concatenated (a's samples first), joint sums added."""
    if (a.bits, a.timesteps, a.elements, a.channels) != (b.bits, b.timesteps, b.elements, b.channels):
        raise PtqdError("cannot merge noise moments of different bit-widths, steps or shapes")
    m = {k: np.concatenate([a.m[k], b.m[k]], axis=2) for k in a.m}
    joint = None
    if a.joint is not None and b.joint is not None:
        joint = {k: a.joint[k] + b.joint[k] for k in JOINT}
    return NoiseMoments(list(a.bits), list(a.timesteps), a.elements, a.channels, m, joint)


@dataclass
class NoiseStats:
    """Fitted per-step statistics for each activation bit-width (arrays indexed [bit, step(, channel)])."""

    meta: dict[str, Any]
    bits: list[int]
    timesteps: list[int]  # the sampler's timesteps, in sampling order (noisiest first)
    k: np.ndarray
    k_raw: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    r: np.ndarray
    fp_var: np.ndarray
    rel_err: np.ndarray
    moments: NoiseMoments | None = None
    path: Path | None = None
    heldout: NoiseMoments | None = None
    # fitted regression maps: model → (W (bits, steps, 2C+1, C), pixel bias (bits, steps, C, H·W) or None)
    maps: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    # per-element mean squares (bits, steps): "error" (uncorrected ε̂ − ε) and each model's residual,
    # on the fitting trajectories ("fit") and the held-out ones ("heldout")
    mse: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    x_var: np.ndarray | None = None  # per-element variance of x_t per step (FP trajectories)

    def models(self) -> list[str]:
        """The correction models these statistics can apply (``ptqd`` always)."""
        return ["ptqd"] + [m for m in cm.MAPS if m in self.maps]

    def need_model(self, model: str) -> None:
        if model not in cm.MODELS:
            raise PtqdError(f"unknown correction model {model!r}: use one of {', '.join(cm.MODELS)}")
        if model != "ptqd" and model not in self.maps:
            where = f" in {self.path}" if self.path else ""
            raise PtqdError(
                f"the noise statistics{where} hold no moments for the {model!r} correction model (they were written by an "
                "older ptqd); collect them again with `ptqd stats RUN` (it collects anew when the file lacks them)"
            )

    def map_step(self, model: str, bits: int, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """W (2C+1, C) and the pixel bias (C, H·W) or None of a regression model at one step."""
        self.need_model(model)
        b, s = self.bit(bits), self.index(t)
        W, bias = self.maps[model]
        return W[b, s], (None if bias is None else bias[b, s])

    def residual_var(self, model: str, bits: int, t: int, parts=("cnc", "bc")) -> float:
        """The per-element mean square the model leaves in ε at one step (fitting trajectories)."""
        return float(self.mse["fit"][_score_key(model, parts)][self.bit(bits), self.index(t)])

    def r2(self, which: str = "heldout") -> dict[str, np.ndarray]:
        """Per model, the share of the quantization error removed, 1 − E|ε_corr − ε|²/E|ε̂ − ε|², (bits, steps)."""
        table = self.mse.get(which) or {}
        if "error" not in table:
            return {}
        err = np.maximum(table["error"], 1e-30)
        return {k: 1.0 - v / err for k, v in table.items() if k != "error"}

    def index(self, t: int) -> int:
        try:
            return self._tindex[int(t)]
        except AttributeError:
            self._tindex = {int(v): i for i, v in enumerate(self.timesteps)}
            return self.index(t)
        except KeyError:
            raise PtqdError(
                f"timestep {int(t)} is not among the {len(self.timesteps)} steps these noise statistics were "
                f"collected at ({self.meta.get('scheduler')}, {self.meta.get('steps')} steps)"
            ) from None

    def bit(self, bits: int) -> int:
        if bits not in self.bits:
            raise PtqdError(
                f"no noise statistics for {bits}-bit activations (collected for {', '.join(map(str, self.bits))}); "
                "collect them with `ptqd stats RUN --act-bits ...`"
            )
        return self.bits.index(bits)

    def step(self, bits: int, t: int) -> dict[str, Any]:
        """k, mu (C,), sigma of one step and bit-width."""
        b, s = self.bit(bits), self.index(t)
        return {"k": float(self.k[b, s]), "mu": self.mu[b, s], "sigma": float(self.sigma[b, s])}

    def table(self, bits: int) -> list[dict[str, Any]]:
        b = self.bit(bits)
        return [
            {
                "t": t,
                "k": float(self.k[b, i]),
                "k_raw": float(self.k_raw[b, i]),
                "r": float(self.r[b, i]),
                "sigma": float(self.sigma[b, i]),
                "mu": [float(v) for v in self.mu[b, i]],
                "fp_var": float(self.fp_var[i]),
                "rel_err": float(self.rel_err[b, i]),
                **{f"r2_{which}": {k: float(v[b, i]) for k, v in self.r2(which).items()} for which in ("fit", "heldout") if self.r2(which)},
            }
            for i, t in enumerate(self.timesteps)
        ]


def _score_key(model: str, parts=("cnc", "bc")) -> str:
    """The key of a model in NoiseStats.mse: ``ptqd`` with its CNC/BC parts (``ptqd:cnc,bc``) or the model's name."""
    if model != "ptqd":
        return model
    used = [p for p in ("cnc", "bc") if p in parts]
    return "ptqd:" + (",".join(used) or "none")


PTQD_SCORED = (("cnc", "bc"), ("cnc",), ("bc",))


def score_models(stats: "NoiseStats", moments: NoiseMoments) -> dict[str, np.ndarray]:
    """Per-element mean squares (bits, steps) of the uncorrected error and of every model's residual on ``moments``."""
    c, n = moments.channels, moments.num_samples
    J, P = moments.joint["J"], moments.joint["P"]
    nb, ns = J.shape[:2]
    out = {"error": np.zeros((nb, ns))}
    for parts in PTQD_SCORED:
        out[_score_key("ptqd", parts)] = np.zeros((nb, ns))
    for m in stats.maps:
        out[m] = np.zeros((nb, ns))
    for b in range(nb):
        for s in range(ns):
            out["error"][b, s] = cm.error_mse(J[b, s], c)
            for parts in PTQD_SCORED:
                W = cm.ptqd_map(stats.k[b, s], stats.mu[b, s], parts, c)
                out[_score_key("ptqd", parts)][b, s] = cm.residual_mse(J[b, s], P[b, s], n, c, W, None)
            for m, (W, bias) in stats.maps.items():
                out[m][b, s] = cm.residual_mse(J[b, s], P[b, s], n, c, W[b, s], None if bias is None else bias[b, s])
    return out


def fit(
    moments: NoiseMoments,
    clamp_k: bool = True,
    mean_of: str = "error",
    meta: dict | None = None,
    ridge: float = defaults.RIDGE,
    heldout: NoiseMoments | None = None,
    tau: float | None = defaults.POSTERIOR_TAU,
) -> NoiseStats:
    """Fit k, μ, σ, r per (bit-width, step) from streamed moments (see module docstring); with joint
    moments also the regression correction models (``ridge``: their penalty), scored on ``moments``
    and, when given, on the ``heldout`` collection. ``tau``: the ``posterior`` model's horizon (None: ∞)."""
    if ridge < 0 or not np.isfinite(ridge):
        raise PtqdError(f"the ridge penalty must be a finite number ≥ 0, got {ridge}")
    if mean_of not in MEAN_OF:
        raise PtqdError(f"mean_of must be one of {', '.join(MEAN_OF)}, got {mean_of!r}")
    m = {k: v.astype(np.float64) for k, v in moments.m.items()}
    n_el = moments.elements
    total = n_el * moments.num_samples
    mean_e = m["s_e"].sum(-1) / total
    mean_d = m["s_d"].sum(-1) / total
    var_e = m["s_ee"].sum(-1) / total - mean_e**2
    var_d = m["s_dd"].sum(-1) / total - mean_d**2
    cov = m["s_ed"].sum(-1) / total - mean_e * mean_d
    var_e = np.maximum(var_e, 1e-30)
    k_raw = cov / var_e
    k = np.maximum(k_raw, 0.0) if clamp_k else k_raw
    r = cov / np.sqrt(var_e * np.maximum(var_d, 1e-30))
    # per-sample std of the residual d - k e, from that sample's moments
    kk = k[..., None]
    mean_res = (m["s_d"] - kk * m["s_e"]) / n_el
    ss = m["s_dd"] - 2 * kk * m["s_ed"] + kk**2 * m["s_ee"]
    var_res = np.maximum(ss - n_el * mean_res**2, 0.0) / max(n_el - 1, 1)
    sigma = np.sqrt(var_res).mean(-1)
    per_ch = moments.num_samples * (n_el // moments.channels)
    mu = m["c_d"].sum(2) / per_ch
    if mean_of == "residual":
        mu = mu - k[..., None] * m["c_e"].sum(2) / per_ch
    rel_err = np.sqrt((m["s_dd"].sum(-1) / total) / np.maximum(m["s_ee"].sum(-1) / total, 1e-30))
    bad = ~(np.isfinite(k_raw) & np.isfinite(sigma) & np.isfinite(mu).all(-1))
    if bad.any():
        b, s = (int(v) for v in np.argwhere(bad)[0])
        raise PtqdError(
            f"noise statistics are not finite at step {s + 1}/{len(moments.timesteps)} (t={moments.timesteps[s]}) "
            f"for {moments.bits[b]}-bit activations; nothing was saved"
        )
    meta = dict(meta or {})
    meta.update({"clamp_k": clamp_k, "mean_of": mean_of})
    stats = NoiseStats(
        meta=meta,
        bits=list(moments.bits),
        timesteps=list(moments.timesteps),
        k=k,
        k_raw=k_raw,
        mu=mu,
        sigma=sigma,
        r=r,
        fp_var=var_e[0],
        rel_err=rel_err,
        moments=moments,
        heldout=heldout,
    )
    if tau is not None and not (np.isfinite(tau) and tau >= 1):
        raise PtqdError(f"the posterior model's horizon τ must be a finite number ≥ 1 (or None for ∞), got {tau}")
    if moments.joint is not None:
        meta["ridge"] = float(ridge)
        meta["tau"] = None if tau is None else float(tau)
        _attach_models(stats, ridge, tau)
    return stats


def _attach_models(stats: NoiseStats, ridge: float, tau: float | None = defaults.POSTERIOR_TAU) -> None:
    """The regression maps, every model's scores and x_t's variance, from the joint moments."""
    moments, heldout = stats.moments, stats.heldout
    _fit_maps(stats, moments, ridge, tau)
    stats.mse["fit"] = score_models(stats, moments)
    if heldout is not None and heldout.joint is not None:
        stats.mse["heldout"] = score_models(stats, heldout)
    c = moments.channels
    J = moments.joint["J"][0]  # x_t of the first bit-width's trajectories (FP-driven: the same for every bit-width)
    n = J[:, -1, -1]
    xs = np.arange(2 * c, 3 * c)
    ex2 = np.stack([np.trace(J[s][np.ix_(xs, xs)]) for s in range(len(n))]) / (n * c)
    ex = J[:, xs, -1] / n[:, None]
    stats.x_var = ex2 - (ex**2).mean(-1)


def _fit_maps(stats: NoiseStats, moments: NoiseMoments, ridge: float, tau: float | None = defaults.POSTERIOR_TAU) -> None:
    c, n = moments.channels, moments.num_samples
    J, P = moments.joint["J"], moments.joint["P"]
    nb, ns = J.shape[:2]
    for model in cm.MAPS:
        if model in cm.TRAJECTORY_MAPS:  # not a function of the moments: kept as fitted (ptqd.correction.matched)
            continue
        W = np.zeros((nb, ns, 2 * c + 1, c))
        bias = np.zeros((nb, ns, c, P.shape[-1])) if model in cm.PIXEL else None
        for b in range(nb):
            for s in range(ns):
                w, bb = cm.fit_map(J[b, s], P[b, s], n, c, model, ridge, math.inf if tau is None else tau)
                if not (np.isfinite(w).all() and (bb is None or np.isfinite(bb).all())):
                    raise PtqdError(
                        f"the {model!r} correction model is not finite at step {s + 1}/{ns} (t={moments.timesteps[s]}) for "
                        f"{moments.bits[b]}-bit activations; nothing was saved"
                    )
                W[b, s] = w
                if bias is not None:
                    bias[b, s] = bb
        stats.maps[model] = (W, bias)


def sample_moments(eps: torch.Tensor, err: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample moment sums of FP output ``eps`` and error ``err`` (both (B, C, H, W))."""
    e = eps.detach().double().flatten(2)
    d = err.detach().double().flatten(2)
    return {
        "s_e": e.sum((1, 2)).cpu().numpy(),
        "s_d": d.sum((1, 2)).cpu().numpy(),
        "s_ee": (e * e).sum((1, 2)).cpu().numpy(),
        "s_dd": (d * d).sum((1, 2)).cpu().numpy(),
        "s_ed": (e * d).sum((1, 2)).cpu().numpy(),
        "c_e": e.sum(2).cpu().numpy(),
        "c_d": d.sum(2).cpu().numpy(),
    }


@torch.no_grad()
def collect_moments(
    model: DiffusionModel,
    quantized: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor],
    bits: list[int],
    num_samples: int,
    sampler: SamplerConfig,
    seed: int = STATS_SEED,
    progress: bool = True,
    partial: Path | None = None,
    meta: dict | None = None,
    ctx=None,
    first: int = 0,
    drive: str = "fp",
) -> NoiseMoments:
    """Drive ``num_samples`` FP trajectories (sample indices ``first`` … ``first + num_samples − 1``) with ``sampler`` and record, at every step, the moments of
    the error of ``quantized(bits, x, t, labels, guidance)`` (guided output) for each bit-width.

    Trajectories go in batches of ``sampler.batch_size``. With ``partial`` (a directory), finished
    batches are saved there and a rerun resumes after them (batches made with other ``meta`` are
    discarded). Under torchrun the batches are split across ranks; the per-sample moments are
    gathered in sample order, so every rank returns exactly what one process would.

    ``drive="quantized"``: the quantized network at each bit-width drives its own trajectories (same
    seeds) and the FP network is evaluated on them, so the statistics describe the error where the
    quantized sampler actually goes; ``"fp"`` (PTQD's Algorithm 1) drives them with the FP network.
    """
    if drive not in DRIVES:
        raise PtqdError(f"drive must be one of {', '.join(DRIVES)}, got {drive!r}")
    from ptqd import distributed
    from ptqd.chunks import ChunkStore

    if num_samples < 2:
        raise PtqdError(f"noise statistics need at least 2 samples, got {num_samples}")
    sampler.validate()
    ctx = ctx or distributed.context()
    labels = default_labels(model, first + num_samples)
    shape = (model.channels, model.image_size, model.image_size)
    timesteps = [int(t) for t in make_scheduler(model, sampler.scheduler, sampler.steps).timesteps]

    def compute(start: int, stop: int, tick) -> dict[str, np.ndarray]:
        per_step: list[list[dict[str, np.ndarray]]] = []

        def observe(step) -> None:  # the FP trajectory drives x_t; the quantized twin sees the same inputs
            where = f"step {step.i + 1}/{sampler.steps} (t={int(step.t)}, samples {start}..{stop - 1})"
            moments = []
            for b in bits:
                q = quantized(b, step.x, step.t, step.y, step.guidance)
                check_finite(q, f"noise statistics: the quantized network output (A{b}) at {where}")
                mom = sample_moments(step.eps, q - step.eps)
                J, P = cm.batch_moments(step.eps, q, step.x)
                mom.update(J=J[None], P=P[None])  # one chunk: summed over chunks below
                moments.append(mom)
            per_step.append(moments)

        run = dataclasses.replace(sampler, seed=seed)
        y = labels[start:stop] if labels is not None else None
        if drive == "fp":
            trajectories(model, range(start, stop), run, y, callback=observe, tick=tick)
        else:  # one trajectory set per bit-width, driven by the quantized network at that bit-width
            for j, b in enumerate(bits):
                rows: list[dict[str, np.ndarray]] = []

                def observe_q(step, b=b, rows=rows) -> None:
                    where = f"step {step.i + 1}/{sampler.steps} (t={int(step.t)}, samples {start}..{stop - 1})"
                    check_finite(step.eps, f"noise statistics: the quantized network output (A{b}) at {where}")
                    e = model.denoise(step.x, step.t, step.y, step.guidance)
                    mom = sample_moments(e, step.eps - e)
                    J, P = cm.batch_moments(e, step.eps, step.x)
                    mom.update(J=J[None], P=P[None])
                    rows.append(mom)

                drive_fn = lambda x, t, yy, g, b=b: quantized(b, x, t, yy, g)  # noqa: E731
                trajectories(model, range(start, stop), run, y, denoise=drive_fn, callback=observe_q, tick=tick)
                for s_, mom in enumerate(rows):
                    if j == 0:
                        per_step.append([])
                    per_step[s_].append(mom)
        return {
            name: np.stack([np.stack([per_step[s][b][name] for s in range(len(timesteps))]) for b in range(len(bits))])
            for name in per_step[0][0]
        }

    store = None
    if partial is not None:
        store = ChunkStore(partial, {**(meta or {}), "bits": list(bits), "seed": seed, "batch_size": sampler.batch_size, "drive": drive})
    ranges = [(a + first, b + first) for a, b in distributed.chunk_ranges(num_samples, sampler.batch_size)]
    try:
        results = distributed.run_chunks(
            ranges, compute, ctx, store=store, progress=progress, desc="noise statistics",
            units=len(timesteps) * (len(bits) if drive == "quantized" else 1),
            restart_on_mismatch=True,
        )
    except PtqdError:
        if store is not None and ctx.main:
            store.remove_if_empty()  # nothing to resume from: leave no empty directory behind
        raise
    m = {name: np.concatenate([results[r][name] for r in ranges], axis=2) for name in results[ranges[0]]}
    joint = {k: m.pop(k).sum(axis=2) for k in JOINT if k in m}  # chunk sums, added in sample order
    return NoiseMoments(list(bits), timesteps, int(np.prod(shape)), shape[0], m, joint or None)


# ----------------------------------------------------------------------------------------- files


def save_stats(stats: NoiseStats, path: str | Path) -> Path:
    """Write ``path`` (.safetensors: moments and fitted arrays) and ``path`` with .json (metadata and a
    per-step table), both atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {
        "timesteps": np.asarray(stats.timesteps, dtype=np.int64),
        "bits": np.asarray(stats.bits, dtype=np.int64),
        "k": stats.k,
        "k_raw": stats.k_raw,
        "mu": stats.mu,
        "sigma": stats.sigma,
        "r": stats.r,
        "fp_var": stats.fp_var,
        "rel_err": stats.rel_err,
    }
    meta = dict(stats.meta)
    if stats.moments is not None:
        arrays.update({f"moments.{k}": v for k, v in stats.moments.m.items()})
        arrays.update({f"moments.{k}": v for k, v in (stats.moments.joint or {}).items()})
        meta["elements"] = stats.moments.elements
        meta["channels"] = stats.moments.channels
    if stats.heldout is not None:
        arrays.update({f"heldout.{k}": v for k, v in {**stats.heldout.m, **(stats.heldout.joint or {})}.items()})
    # the fitted maps and their scores: refitted from the moments on load, read as stored without them (checkpoints)
    for model, (W, bias) in stats.maps.items():
        arrays[f"map.{model}.W"] = W
        if bias is not None:
            arrays[f"map.{model}.bias"] = bias
    for which, table in stats.mse.items():
        arrays.update({f"mse.{which}.{key}": v for key, v in table.items()})
    if stats.x_var is not None:
        arrays["x_var"] = stats.x_var
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64 if v.dtype.kind == "f" else v.dtype) for k, v in arrays.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"ptqd_noise_stats": json.dumps(meta)})
    write_json(path.with_suffix(".json"), {"meta": meta, "steps": {str(b): stats.table(b) for b in stats.bits}}, strict=True)
    integrity.record(path.parent, [path.name, path.with_suffix(".json").name], create=False)  # a run directory's record
    stats.path = path
    return path


def load_stats(path: str | Path) -> NoiseStats:
    """Read a statistics file written by :func:`save_stats`; clear errors for missing or damaged files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"noise statistics file {path} does not exist; collect it with `ptqd stats RUN`")
    fix = f"delete {path} and collect the statistics again with `ptqd stats` (or export the checkpoint again)"
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_text = (f.metadata() or {}).get("ptqd_noise_stats")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PtqdError(f"{path} is not a readable noise statistics file ({e}); {fix}") from None
    if meta_text is None:
        raise PtqdError(f"{path} is a safetensors file but not ptqd noise statistics (no 'ptqd_noise_stats' metadata)")
    meta = parse_json(meta_text, f"{path} (metadata 'ptqd_noise_stats')", fix)
    check_object(meta, STATS_META_SCHEMA, f"{path} (metadata)", fix)
    need = ("timesteps", "bits", "k", "k_raw", "mu", "sigma", "r", "fp_var", "rel_err")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise PtqdError(f"{path} lacks {', '.join(missing)}; {fix}")
    _check_shapes(path, arrays, meta, fix)
    integrity.verify(path, fix)
    moments = _read_moments(arrays, "moments", meta)
    heldout = _read_moments(arrays, "heldout", meta)
    stats = NoiseStats(
        meta=meta,
        bits=[int(b) for b in arrays["bits"]],
        timesteps=[int(t) for t in arrays["timesteps"]],
        k=arrays["k"],
        k_raw=arrays["k_raw"],
        mu=arrays["mu"],
        sigma=arrays["sigma"],
        r=arrays["r"],
        fp_var=arrays["fp_var"],
        rel_err=arrays["rel_err"],
        moments=moments,
        path=path,
        heldout=heldout,
    )
    if moments is not None and moments.joint is not None:
        try:
            _attach_models(stats, float(meta.get("ridge", defaults.RIDGE)), meta.get("tau", defaults.POSTERIOR_TAU))
        except PtqdError as e:
            raise PtqdError(f"{path}: {e}; {fix}") from None
        if any(f"map.{m}.W" in arrays for m in cm.TRAJECTORY_MAPS):  # maps that are not refitted from the moments
            _read_maps(stats, {k: v for k, v in arrays.items() if any(k.startswith(f"map.{m}.") for m in cm.TRAJECTORY_MAPS)}, path, fix)
            stats.mse["fit"] = score_models(stats, moments)
            if heldout is not None and heldout.joint is not None:
                stats.mse["heldout"] = score_models(stats, heldout)
    else:  # fitted maps stored without their moments (an exported checkpoint)
        _read_maps(stats, arrays, path, fix)
    return stats


def _read_maps(stats: NoiseStats, arrays: dict[str, np.ndarray], path: Path, fix: str) -> None:
    nb, ns, c = len(stats.bits), len(stats.timesteps), stats.mu.shape[-1]
    for model in cm.MAPS:
        W = arrays.get(f"map.{model}.W")
        if W is None:
            continue
        bias = arrays.get(f"map.{model}.bias")
        if W.shape != (nb, ns, 2 * c + 1, c) or (bias is not None and bias.shape[:3] != (nb, ns, c)):
            raise PtqdError(f"{path}: array 'map.{model}.W' has shape {W.shape}, expected {(nb, ns, 2 * c + 1, c)}; {fix}")
        if not (np.isfinite(W).all() and (bias is None or np.isfinite(bias).all())):
            raise PtqdError(f"{path}: the {model!r} correction model holds NaN or inf; {fix}")
        stats.maps[model] = (W, bias)
    for key, v in arrays.items():
        if key.startswith("mse."):
            _, which, name = key.split(".", 2)
            if v.shape != (nb, ns):
                raise PtqdError(f"{path}: array {key!r} has shape {v.shape}, expected {(nb, ns)}; {fix}")
            stats.mse.setdefault(which, {})[name] = v
    if "x_var" in arrays:
        stats.x_var = arrays["x_var"]


def _read_moments(arrays: dict[str, np.ndarray], prefix: str, meta: dict[str, Any]) -> NoiseMoments | None:
    if f"{prefix}.s_e" not in arrays:
        return None
    m = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
    joint = {k: m.pop(k) for k in JOINT if k in m}
    return NoiseMoments(
        [int(b) for b in arrays["bits"]], [int(t) for t in arrays["timesteps"]], int(meta["elements"]), int(meta["channels"]), m,
        joint or None,
    )


STATS_META_SCHEMA = {
    "model_fingerprint": "str", "quant_fingerprint": "str", "weight_bits": "int", "scheduler": "str", "steps": "int",
    "eta": "number|null", "guidance": "number|null", "num_samples?": "int", "seed?": "int", "elements?": "int", "channels?": "int",
    "ridge?": "number", "tau?": "number|null", "heldout_samples?": "int", "heldout_seed?": "int", "drive?": "str",
}


def _check_shapes(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], fix: str) -> None:
    """Every array's shape against the bit-widths and timesteps the file lists."""
    for key in ("bits", "timesteps"):
        if arrays[key].ndim != 1 or arrays[key].dtype.kind not in "iu" or len(arrays[key]) == 0:
            raise PtqdError(f"{path}: array {key!r} must be a non-empty list of integers, got {arrays[key].dtype} {arrays[key].shape}; {fix}")
    nb, ns = len(arrays["bits"]), len(arrays["timesteps"])
    if ns != meta["steps"]:
        raise PtqdError(f"{path}: {ns} timesteps, but the metadata field 'steps' says {meta['steps']}; {fix}")
    c = arrays["mu"].shape[-1] if arrays["mu"].ndim == 3 else None
    want = {k: (nb, ns) for k in ("k", "k_raw", "sigma", "r", "rel_err")}
    want.update(mu=(nb, ns, c), fp_var=(ns,))
    for key, shape in want.items():
        if arrays[key].shape != shape or c is None:
            raise PtqdError(f"{path}: array {key!r} has shape {arrays[key].shape}, expected {shape} "
                            f"({nb} bit-widths × {ns} steps{'' if c is None else f' × {c} channels'}); {fix}")
        if key in ("k", "mu", "sigma") and not np.isfinite(arrays[key]).all():  # what the corrector uses
            raise PtqdError(f"{path}: array {key!r} holds NaN or inf; {fix}")
    for prefix in ("moments", "heldout"):
        moments = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
        if not moments:
            continue
        for key in ("elements", "channels"):
            if key not in meta:
                raise PtqdError(f"{path}: metadata field {key!r} is missing (the file holds moments); {fix}")
        n = moments.get("s_e", np.zeros((0, 0, 0))).shape[-1]
        c = meta["channels"]
        for key in MOMENTS + ("c_e", "c_d"):
            shape = (nb, ns, n) if key in MOMENTS else (nb, ns, n, c)
            if key not in moments or moments[key].shape != shape:
                got = moments[key].shape if key in moments else "missing"
                raise PtqdError(f"{path}: array '{prefix}.{key}' has shape {got}, expected {shape}; {fix}")
        if any(k in moments for k in JOINT):
            for key, shape in (("J", (nb, ns, 3 * c + 1, 3 * c + 1)), ("P", (nb, ns, 3 * c, meta["elements"] // max(c, 1)))):
                if key not in moments or moments[key].shape != shape:
                    got = moments[key].shape if key in moments else "missing"
                    raise PtqdError(f"{path}: array '{prefix}.{key}' has shape {got}, expected {shape}; {fix}")
                if not np.isfinite(moments[key]).all():
                    raise PtqdError(f"{path}: array '{prefix}.{key}' holds NaN or inf; {fix}")


def check_stats(stats: NoiseStats, expected: dict[str, Any], bits: list[int] | None = None) -> None:
    """Refuse statistics made for another model, quantized network or sampler: name the field that differs."""
    where = f"noise statistics {stats.path}" if stats.path else "noise statistics"
    for key in MATCH_KEYS:
        if key not in expected:
            continue
        have, want = stats.meta.get(key), expected[key]
        if isinstance(have, float) or isinstance(want, float):
            same = have is not None and want is not None and abs(float(have) - float(want)) < 1e-9
        else:
            same = have == want
        if not same:
            raise PtqdError(
                f"{where} do not match: {key} is {have!r} there but {want!r} here; "
                "collect statistics for this setting with `ptqd stats RUN` (with the same --scheduler/--steps/--eta/--guidance)"
            )
    for b in bits or []:
        stats.bit(b)


def stats_name(sampler: SamplerConfig, conditional: bool) -> str:
    """File name of the statistics of one sampler setting inside a run directory."""
    g = f"_g{sampler.guidance:g}" if conditional else ""
    eta = f"_eta{sampler.eta:g}" if sampler.scheduler == "ddim" else ""  # DDPM has no eta
    return f"noise_stats_{sampler.scheduler}{sampler.steps}{eta}{g}.safetensors"


@dataclass
class StatsRequest:
    """What to collect: which sampler, how many trajectories, which activation bit-widths."""

    sampler: SamplerConfig
    num_samples: int = 256
    bits: list[int] = field(default_factory=list)
    seed: int = STATS_SEED
    clamp_k: bool = True
    mean_of: str = "error"
    heldout_samples: int | None = None  # None: a quarter of num_samples, at most defaults.HELDOUT_SAMPLES; 0: none
    heldout_seed: int = defaults.HELDOUT_SEED
    ridge: float = defaults.RIDGE
    tau: float | None = defaults.POSTERIOR_TAU  # the posterior model's horizon (None: ∞)
    drive: str = "fp"  # "quantized": the quantized network drives the trajectories (see collect_moments)

    def validate(self) -> None:
        """Refuse bad settings before any trajectory is run."""
        if self.heldout_samples is not None and (self.heldout_samples < 0 or self.heldout_samples == 1):
            raise PtqdError(f"--heldout-samples must be 0 (none) or at least 2, got {self.heldout_samples}")
        if not (self.ridge >= 0 and np.isfinite(self.ridge)):
            raise PtqdError(f"--ridge must be a finite number ≥ 0, got {self.ridge}")
        if self.tau is not None and not (np.isfinite(self.tau) and self.tau >= 1):
            raise PtqdError(f"--tau must be a finite number ≥ 1 (1: the content model, larger: towards debias), got {self.tau}")
        if self.drive not in DRIVES:
            raise PtqdError(f"--drive must be one of {', '.join(DRIVES)}, got {self.drive!r}")
        if self.mean_of not in MEAN_OF:
            raise PtqdError(f"mean_of must be one of {', '.join(MEAN_OF)}, got {self.mean_of!r}")

    def heldout_count(self) -> int:
        if self.heldout_samples is not None:
            return int(self.heldout_samples)
        return min(defaults.HELDOUT_SAMPLES, max(2, self.num_samples // 4))


def stats_meta(model: DiffusionModel, quant_fingerprint: str, weight_bits: int, request: StatsRequest) -> dict[str, Any]:
    s = request.sampler
    return {
        "ptqd": __version__,
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "quant_fingerprint": quant_fingerprint,
        "weight_bits": weight_bits,
        "act_bits": list(request.bits),
        "scheduler": s.scheduler,
        "steps": s.steps,
        "eta": float(s.eta) if s.scheduler == "ddim" else None,
        "guidance": float(s.guidance) if model.conditional else None,
        "num_samples": request.num_samples,
        "seed": request.seed,
        "heldout_samples": request.heldout_count(),
        "heldout_seed": request.heldout_seed,
        "drive": request.drive,
        "batch_size": s.batch_size,
    }
