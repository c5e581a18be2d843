"""Step-aware mixed precision: choose the activation bit-width of each sampler step from SNRs.

SNR^F(t) = ᾱ_t/(1−ᾱ_t) is the FP model's signal-to-noise ratio at t. For a quantized model whose
noise prediction is (1+k)ε + Δε' (Δε' of std σ) two definitions of its SNR are offered:

* ``snr`` (DESIGN.md): SNR^Q_b(t) = ᾱ_t / ((1−ᾱ_t)(1+k)² + σ²(1−ᾱ_t)): the residual scaled like ε
  in x_t. Its ratio to SNR^F(t) is 1/((1+k)²+σ²), flat in t unless σ grows.
* ``snr-unscaled``: SNR^Q_b(t) = ᾱ_t / ((1−ᾱ_t)(1+k)² + σ²): the residual is not shrunk with the
  diffusion noise, so it dominates near t = 0 where (1−ᾱ_t) is small; this gives the paper's shape
  (low bits for the noisy first steps, high bits after).

Either picks, per step, the lowest candidate b with SNR^Q_b(t) ≥ SNR^F(t_prev), t_prev the sampler's
previous (noisier) step: quantization noise may lower the SNR, but not below that of the step
before (:func:`snr_rule`). This is the least pinned-down part of the paper (the exact SNR definitions
are not recoverable, the official code never released it), so criteria are plain functions in
:data:`CRITERIA`, and any ``criterion(table, candidates) -> bits`` can be passed instead.

Budgeted criterion (:func:`propagation_gains`, :func:`predicted_mse`, :func:`budget_curve`,
:func:`budget_schedule`): after correction, step i leaves a residual error in ε of per-element mean
square s²_b(i) at activation bit-width b. It enters x_{t−1} as c_i·e (c_i the ε coefficient of the
update, :func:`~ptqd.correction.corrector.ddim_quantities` / ``ddpm_quantities``) and is carried to
x_0 by the later steps. The predicted per-element MSE of the final sample to the FP sample is

    MSE(x_0) ≈ Σ_i g_i · s²_{b_i}(i),   g_i = (c_i · Π_{j>i} d_j)²   (i, j in sampling order),

where d_j = ∂x_{t_j−1}/∂x_{t_j} is the derivative of step j with respect to its input. This is an
approximation in three ways:

* d_j is that of the *ideal* denoiser for Gaussian data with per-element variance v (``data_var``,
  :func:`data_variance`): ε*(x_t) = √(1−ᾱ_t)(x_t − √ᾱ_t·m)/(ᾱ_t v + 1 − ᾱ_t), an affine map with the
  scalar Jacobian J_t = √(1−ᾱ_t)/(ᾱ_t v + 1 − ᾱ_t). A trained network is neither this denoiser nor
  linear, so the gains only describe how a step's error is amplified or damped on average.
  DDIM: d_t = √(ᾱ_{t−1}/ᾱ_t)(1 − √(1−ᾱ_t)J_t) + √(1−ᾱ_{t−1}−σ_t²)·J_t; DDPM:
  d_t = coef_x0·(1 − √(1−ᾱ_t)J_t)/√ᾱ_t + coef_xt. The sampler's own noise σ_t z is the same with and
  without quantization, so it drops out of the difference; clipping of x̂_0 is ignored.
* errors of different steps are taken as uncorrelated (their cross terms are dropped);
* the later steps' quantization does not change how an earlier error propagates (second order).

For Gaussian data and the ideal denoiser the first point is exact, so the prediction is exact for
independent injected errors (``tests/test_budget.py`` checks it by Monte Carlo).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ptqd.correction.corrector import ddim_quantities, ddpm_quantities
from ptqd.correction.stats import NoiseStats
from ptqd.errors import PtqdError

Criterion = Callable[[dict, list[int]], np.ndarray]


def snr_fp(alpha_bar: np.ndarray) -> np.ndarray:
    a = np.asarray(alpha_bar, dtype=np.float64)
    return a / (1 - a)


def snr_q(alpha_bar: np.ndarray, k: np.ndarray, sigma: np.ndarray, scaled: bool = True) -> np.ndarray:
    """SNR^Q of a quantized model (``scaled``: σ² multiplied by (1−ᾱ_t), as DESIGN.md writes it)."""
    a = np.asarray(alpha_bar, dtype=np.float64)
    s2 = np.asarray(sigma, dtype=np.float64) ** 2
    return a / ((1 - a) * (1 + np.asarray(k)) ** 2 + (s2 * (1 - a) if scaled else s2))


def snr_rule(snr_prev: np.ndarray, snr_q_by_bits: dict[int, np.ndarray]) -> np.ndarray:
    """Lowest b with SNR^Q_b(t) ≥ SNR^F(t_prev) at each step; the highest candidate where none qualifies."""
    cands = sorted(snr_q_by_bits)
    out = np.full(len(snr_prev), cands[-1], dtype=np.int64)
    for i in range(len(snr_prev)):
        for b in cands:
            if snr_q_by_bits[b][i] >= snr_prev[i]:
                out[i] = b
                break
    return out


def snr_criterion(table: dict, candidates: list[int]) -> np.ndarray:
    """DESIGN.md's SNR^Q (residual scaled by 1−ᾱ_t) against the previous step's SNR^F."""
    return snr_rule(table["snr_fp_prev"], {b: table["snr_q"][b] for b in candidates})


def snr_unscaled_criterion(table: dict, candidates: list[int]) -> np.ndarray:
    """Unscaled SNR^Q (residual not shrunk with the diffusion noise) against the previous step's SNR^F."""
    return snr_rule(table["snr_fp_prev"], {b: table["snr_q_unscaled"][b] for b in candidates})


CRITERIA: dict[str, Criterion] = {"snr": snr_criterion, "snr-unscaled": snr_unscaled_criterion}
DEFAULT_CRITERION = "snr-unscaled"


def snr_table(stats: NoiseStats, alphas_cumprod, num_train_timesteps: int) -> dict[str, np.ndarray | dict]:
    """SNR^F at each sampler step and at its previous (noisier) step, and SNR^Q for each bit-width.

    The first step's previous step is the last training timestep (T−1), or the same step when the
    sampler starts there (then its SNR^F is compared with itself)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    ts = np.asarray(stats.timesteps)
    prev_ts = np.concatenate([[max(num_train_timesteps - 1, ts[0])], ts[:-1]])
    out = {
        "t": ts,
        "snr_fp": snr_fp(ab[ts]),
        "snr_fp_prev": snr_fp(ab[prev_ts]),
        "snr_q": {b: snr_q(ab[ts], stats.k[i], stats.sigma[i]) for i, b in enumerate(stats.bits)},
        "snr_q_unscaled": {b: snr_q(ab[ts], stats.k[i], stats.sigma[i], scaled=False) for i, b in enumerate(stats.bits)},
    }
    return out


def bit_schedule(
    stats: NoiseStats,
    alphas_cumprod,
    num_train_timesteps: int,
    candidates: list[int] | None = None,
    criterion: str | Criterion = DEFAULT_CRITERION,
    low_steps: int | None = None,
) -> dict[int, int]:
    """Activation bit-width per sampler timestep.

    ``low_steps=N`` overrides the criterion: the first N (noisiest) steps at the lowest candidate,
    the rest at the highest.
    """
    candidates = sorted(candidates or stats.bits)
    for b in candidates:
        stats.bit(b)
    ts = [int(t) for t in stats.timesteps]
    if low_steps is not None:
        if not 0 <= low_steps <= len(ts):
            raise PtqdError(f"low-bit steps must lie in 0..{len(ts)}, got {low_steps}")
        return {t: (candidates[0] if i < low_steps else candidates[-1]) for i, t in enumerate(ts)}
    fn = CRITERIA.get(criterion) if isinstance(criterion, str) else criterion
    if fn is None:
        raise PtqdError(f"unknown mixed-precision criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    table = snr_table(stats, alphas_cumprod, num_train_timesteps)
    chosen = fn(table, candidates)
    return {t: int(b) for t, b in zip(ts, chosen)}


def describe_schedule(schedule: dict[int, int]) -> str:
    """Runs of equal bit-width in sampling order, e.g. ``t 980→620: A4, t 600→0: A8``."""
    items = list(schedule.items())
    parts, start = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i][1] != items[start][1]:
            parts.append(f"t {items[start][0]}→{items[i - 1][0]}: A{items[start][1]}")
            start = i
    return ", ".join(parts)


def sampling_bops(bops_per_bits: dict[int, float], schedule: dict[int, int], cfg_batches: int = 1) -> float:
    """BOPs of one image's whole sampling run: Σ over steps of the per-forward BOPs at that step's
    bit-width, times 2 with classifier-free guidance (``cfg_batches``)."""
    return float(sum(bops_per_bits[b] for b in schedule.values()) * cfg_batches)


# --- budgeted mixed precision: predicted final error of a bit schedule ---------------------------


def data_variance(x_var, alpha_bar, floor: float = 1e-6):
    """Per-element data variance v estimated from the variance of x_t at a step with ᾱ_t = ``alpha_bar``.

    For data of variance v, Var x_t = ᾱ_t·v + 1 − ᾱ_t, so v = (Var x_t − (1−ᾱ_t))/ᾱ_t, floored at
    ``floor`` (noisy steps, where ᾱ_t is small, give poor estimates; the least noisy step is best,
    and ``alpha_bar=1`` with the variance of FP samples gives v directly). Scalars give a float,
    arrays an array."""
    xv = np.asarray(x_var, dtype=np.float64)
    a = np.asarray(alpha_bar, dtype=np.float64)
    if not np.all(np.isfinite(xv)) or np.any(xv < 0):
        raise PtqdError(f"the variance of x_t must be finite and non-negative, got {x_var!r}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0) or np.any(a > 1):
        raise PtqdError(f"alpha_bar must lie in (0, 1], got {alpha_bar!r}")
    if not (math.isfinite(floor) and floor > 0):
        raise PtqdError(f"the variance floor must be positive, got {floor!r}")
    v = np.maximum((xv - (1 - a)) / a, floor)
    return float(v) if v.ndim == 0 else v


def _jacobian(alpha_bar: float, data_var: float) -> float:
    """J_t of the ideal denoiser for Gaussian data of variance ``data_var``."""
    return math.sqrt(1 - alpha_bar) / (alpha_bar * data_var + 1 - alpha_bar)


def step_coefficients(scheduler, kind: str, eta: float, data_var: float) -> tuple[np.ndarray, np.ndarray]:
    """(c, d) over ``scheduler.timesteps``: the ε coefficient c_t of each update and its derivative
    d_t with respect to x_t through x̂_0 and the ideal Gaussian-data denoiser (module docstring)."""
    if kind not in ("ddim", "ddpm"):
        raise PtqdError(f"budgeted mixed precision supports the ddim and ddpm samplers, not {kind!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise PtqdError(f"eta must be a finite number ≥ 0, got {eta!r}")
    if not (isinstance(data_var, (int, float, np.floating)) and math.isfinite(data_var) and data_var > 0):
        raise PtqdError(f"the data variance must be a finite positive number, got {data_var!r}")
    if getattr(scheduler, "num_inference_steps", None) is None or getattr(scheduler, "timesteps", None) is None:
        raise PtqdError("the scheduler has no sampling steps: call scheduler.set_timesteps(steps) first")
    cs, ds = [], []
    for t in scheduler.timesteps:
        if kind == "ddim":
            q = ddim_quantities(scheduler, int(t), float(eta))
            a, ap = q["alpha_bar"], q["alpha_bar_prev"]
            j = _jacobian(a, float(data_var))
            d = math.sqrt(ap / a) * (1 - math.sqrt(1 - a) * j) + math.sqrt(max(1 - ap - q["sigma"] ** 2, 0.0)) * j
        else:
            q = ddpm_quantities(scheduler, int(t))
            a = q["alpha_bar"]
            j = _jacobian(a, float(data_var))
            d = q["coef_x0"] * (1 - math.sqrt(1 - a) * j) / math.sqrt(a) + q["coef_xt"]
        cs.append(q["c"])
        ds.append(d)
    return np.asarray(cs, dtype=np.float64), np.asarray(ds, dtype=np.float64)


def gains_from_coefficients(c, d) -> np.ndarray:
    """g_i = (c_i · Π_{j>i} d_j)² from per-step coefficients in sampling order."""
    c = np.asarray(c, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    if c.ndim != 1 or c.shape != d.shape or not (np.all(np.isfinite(c)) and np.all(np.isfinite(d))):
        raise PtqdError(f"c and d must be finite 1-D arrays of one length, got shapes {c.shape} and {d.shape}")
    after = np.ones_like(d)  # after[i] = Π_{j>i} d_j
    if len(d) > 1:
        after[:-1] = np.cumprod(d[::-1])[::-1][1:]
    return (c * after) ** 2


def propagation_gains(scheduler, kind: str, eta: float, data_var: float) -> np.ndarray:
    """Gain g_i of each sampler step (``scheduler.timesteps`` order, noisiest first): a per-element
    ε error of mean square s² at step i adds g_i·s² to the final sample's per-element MSE.

    ``scheduler``: a diffusers DDIM/DDPM scheduler already set to its steps; ``kind`` ``"ddim"`` or
    ``"ddpm"`` (``eta`` is used by DDIM only); ``data_var``: per-element variance v of the data in
    the model's x space (:func:`data_variance`)."""
    return gains_from_coefficients(*step_coefficients(scheduler, kind, eta, data_var))


def _check_inputs(residual_mse: Mapping, gains) -> tuple[dict[int, np.ndarray], np.ndarray]:
    g = np.asarray(gains, dtype=np.float64)
    if g.ndim != 1 or len(g) == 0 or not np.all(np.isfinite(g)) or np.any(g < 0):
        raise PtqdError("gains must be a non-empty 1-D array of finite values ≥ 0 (one per sampler step)")
    if not isinstance(residual_mse, Mapping) or not residual_mse:
        raise PtqdError("residual_mse must be a non-empty dict: activation bits → per-step residual mean square")
    res = {}
    for b, v in residual_mse.items():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
            raise PtqdError(f"bit-widths must be positive integers, got {b!r}")
        a = np.asarray(v, dtype=np.float64)
        if a.shape != g.shape:
            raise PtqdError(f"residual_mse[{b}] has {a.shape} values, the gains {g.shape}: one per sampler step for both")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise PtqdError(f"residual_mse[{b}] must be finite and ≥ 0")
        res[int(b)] = a
    return res, g


def _predicted(res: dict[int, np.ndarray], g: np.ndarray, bits: Sequence[int]) -> float:
    return float(sum(g[i] * res[b][i] for i, b in enumerate(bits)))


def predicted_mse(residual_mse: Mapping[int, np.ndarray], gains, bits: Sequence[int]) -> float:
    """Predicted per-element MSE of the final sample to the FP sample, Σ_i g_i·s²_{b_i}(i).

    ``residual_mse``: bits → per-step residual mean square of ε after correction; ``gains`` from
    :func:`propagation_gains`; ``bits``: activation bit-width of each step, in sampling order (for a
    schedule dict from :func:`bit_schedule`, ``list(schedule.values())``)."""
    res, g = _check_inputs(residual_mse, gains)
    if isinstance(bits, Mapping) or isinstance(bits, (str, bytes)):
        raise PtqdError("bits must be a sequence in sampling order (for a schedule dict pass list(schedule.values()))")
    bits = list(np.asarray(bits).ravel())
    if len(bits) != len(g):
        raise PtqdError(f"{len(bits)} bit-widths for {len(g)} sampler steps")
    unknown = sorted({str(b) for b in bits if not (isinstance(b, (int, np.integer)) and int(b) in res)})
    if unknown:
        raise PtqdError(f"no residual statistics for activation bits {', '.join(unknown)}: have {sorted(res)}")
    return _predicted(res, g, [int(b) for b in bits])


def _check_bops(bops_per_bits: Mapping, cands: list[int]) -> dict[int, float]:
    if not isinstance(bops_per_bits, Mapping):
        raise PtqdError("bops_per_bits must be a dict: activation bits → BOPs of one forward pass")
    missing = [b for b in cands if b not in bops_per_bits]
    if missing:
        raise PtqdError(f"no BOPs for activation bits {missing}: have {sorted(bops_per_bits, key=str)}")
    bops = {b: float(bops_per_bits[b]) for b in cands}
    if not all(math.isfinite(v) and v > 0 for v in bops.values()):
        raise PtqdError(f"BOPs must be finite and positive, got {bops}")
    if any(bops[lo] >= bops[hi] for lo, hi in zip(cands, cands[1:])):
        raise PtqdError(f"BOPs must grow with the activation bit-width, got {bops}")
    return bops


def _entry(res, g, bops, bits: np.ndarray, high: int, base: float) -> dict:
    pred = _predicted(res, g, bits)
    rel = pred / base if base > 0 else (1.0 if pred == 0 else math.inf)
    return {
        "bits": bits.copy(),
        "low_steps": int(np.sum(bits != high)),
        "predicted_mse": pred,
        "relative": float(rel),
        "bops": float(sum(bops[int(b)] for b in bits)),
    }


def budget_curve(residual_mse: Mapping[int, np.ndarray], gains, bops_per_bits: Mapping[int, float]) -> list[dict]:
    """Schedules from all-high to all-low bits, each the one of least predicted error for its cost.

    The candidates are the bit-widths of ``residual_mse``; ``bops_per_bits``: BOPs of one forward
    pass at each (must grow with the bits). Two candidates: steps move to the low bits one at a time
    in order of the error they add, g_i·(s²_low(i) − s²_high(i)) (ties: noisiest step first); since
    every step saves the same BOPs, entry k is the exact optimum among schedules with k low-bit
    steps. More candidates: a greedy that repeatedly lowers one step by one candidate level, the move
    of least added error per BOP saved, until every step is at the lowest; a heuristic, not
    guaranteed optimal.

    Each entry: ``bits`` (per step, sampling order), ``low_steps`` (steps below the highest
    candidate), ``predicted_mse``, ``relative`` (to the all-high schedule; 1 where both are 0, inf
    where only the all-high one is) and ``bops`` (Σ over steps of the per-forward BOPs; multiply by 2
    for classifier-free guidance). BOPs decrease along the curve; the prediction increases wherever
    no step's low-bit residual is below its high-bit one."""
    res, g = _check_inputs(residual_mse, gains)
    cands = sorted(res)
    bops = _check_bops(bops_per_bits, cands)
    n, high = len(g), cands[-1]
    bits = np.full(n, high, dtype=np.int64)
    base = _predicted(res, g, bits)
    curve = [_entry(res, g, bops, bits, high, base)]
    if len(cands) == 1:
        return curve
    if len(cands) == 2:
        low = cands[0]
        added = g * (res[low] - res[high])
        for i in np.argsort(added, kind="stable"):
            bits[i] = low
            curve.append(_entry(res, g, bops, bits, high, base))
        return curve
    level = {b: k for k, b in enumerate(cands)}
    while True:
        best, best_i = None, -1
        for i in range(n):
            k = level[int(bits[i])]
            if k == 0:
                continue
            lo, hi = cands[k - 1], cands[k]
            ratio = g[i] * (res[lo][i] - res[hi][i]) / (bops[hi] - bops[lo])
            if best is None or ratio < best:
                best, best_i = ratio, i
        if best is None:
            return curve
        bits[best_i] = cands[level[int(bits[best_i])] - 1]
        curve.append(_entry(res, g, bops, bits, high, base))


def budget_schedule(
    residual_mse: Mapping[int, np.ndarray],
    gains,
    bops_per_bits: Mapping[int, float],
    timesteps,
    tolerance: float,
) -> dict[int, int]:
    """Timestep → activation bits: the cheapest schedule of :func:`budget_curve` whose predicted
    final MSE is within ``tolerance`` × that of the all-high-bit schedule (``tolerance`` ≥ 1; 1.5
    allows 50 % more predicted error). ``timesteps``: the sampler's steps in sampling order, one per
    gain (``scheduler.timesteps``)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)) or math.isnan(tolerance) or tolerance < 1:
        raise PtqdError(f"the error tolerance is a factor ≥ 1 on the all-high-bit prediction, got {tolerance!r}")
    ts = [int(t) for t in np.asarray(timesteps).ravel()]
    g = np.asarray(gains)
    if len(ts) != g.size:
        raise PtqdError(f"{len(ts)} timesteps for {g.size} gains: one per sampler step")
    if len(set(ts)) != len(ts):
        raise PtqdError("the timesteps repeat: one entry per sampler step")
    curve = budget_curve(residual_mse, gains, bops_per_bits)
    ok = [e for e in curve if e["relative"] <= tolerance]  # the all-high entry always qualifies
    best = min(ok, key=lambda e: e["bops"])
    return {t: int(b) for t, b in zip(ts, best["bits"])}


# --- budgeted mixed precision from measured final deviation vectors ---------------------------------


def _check_deviations(deviations: Mapping) -> dict[int, np.ndarray]:
    if not isinstance(deviations, Mapping) or not deviations:
        raise PtqdError("deviations must be a non-empty dict: activation bits → (steps, samples, elements) final deviations")
    out, shape = {}, None
    for b, v in deviations.items():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
            raise PtqdError(f"bit-widths must be positive integers, got {b!r}")
        a = np.asarray(v, dtype=np.float64)
        if a.ndim != 3 or 0 in a.shape or not np.all(np.isfinite(a)):
            raise PtqdError(f"deviations[{b}] must be a finite (steps, samples, elements) array, got shape {a.shape}")
        if shape is not None and a.shape != shape:
            raise PtqdError(f"deviations of every bit-width must have one shape, got {shape} and {a.shape}")
        shape = a.shape
        out[int(b)] = a
    return out


def vector_predicted_mse(deviations: Mapping[int, np.ndarray], bits: Sequence[int]) -> float:
    """Predicted per-element MSE of the final sample to FP of a bit schedule: |Σ_i d_{b_i}(i)|² averaged
    over samples and elements, d_b(i) the measured final deviation (samples × elements) that step i
    alone at bit-width b causes. Unlike a sum of per-step MSEs it keeps the cross-step terms (errors of
    different steps that point the same way add up more than their squares)."""
    dev = _check_deviations(deviations)
    bits = [int(b) for b in np.asarray(bits).ravel()]
    steps = next(iter(dev.values())).shape[0]
    if len(bits) != steps:
        raise PtqdError(f"{len(bits)} bit-widths for {steps} sampler steps")
    missing = sorted({b for b in bits if b not in dev})
    if missing:
        raise PtqdError(f"no measured deviations for activation bits {missing}: have {sorted(dev)}")
    total = sum(dev[b][i] for i, b in enumerate(bits))
    return float(np.mean(total**2))


def vector_budget_curve(deviations: Mapping[int, np.ndarray], bops_per_bits: Mapping[int, float]) -> list[dict]:
    """Schedules from all-high to all-low bits by a greedy on the vector-sum prediction: from all-high,
    repeatedly lower the one step (by one candidate level) whose move adds the least predicted error
    |Σ_i d_{b_i}(i)|² per BOP saved, until every step is at the lowest. Entries as
    :func:`budget_curve`'s."""
    dev = _check_deviations(deviations)
    cands = sorted(dev)
    bops = _check_bops(bops_per_bits, cands)
    n, high = next(iter(dev.values())).shape[0], cands[-1]
    bits = np.full(n, high, dtype=np.int64)
    total = dev[high].sum(0)
    base = float(np.mean(total**2))

    def entry(err):
        rel = err / base if base > 0 else (1.0 if err == 0 else math.inf)
        return {"bits": bits.copy(), "low_steps": int(np.sum(bits != high)), "predicted_mse": float(err), "relative": float(rel),
                "bops": float(sum(bops[int(b)] for b in bits))}

    curve = [entry(base)]
    level = {b: k for k, b in enumerate(cands)}
    cur = base
    while True:
        best = None
        for i in range(n):
            k = level[int(bits[i])]
            if k == 0:
                continue
            lo, hi = cands[k - 1], cands[k]
            err = float(np.mean((total - dev[hi][i] + dev[lo][i]) ** 2))
            score = (err - cur) / (bops[hi] - bops[lo])
            if best is None or score < best[0]:
                best = (score, i, lo, hi, err)
        if best is None:
            return curve
        _, i, lo, hi, cur = best
        total = total - dev[hi][i] + dev[lo][i]
        bits[i] = lo
        curve.append(entry(cur))


def schedule_from_curve(curve: list[dict], timesteps, tolerance: float) -> dict[int, int]:
    """Timestep → bits: the cheapest entry of ``curve`` predicted within ``tolerance`` × the all-high entry."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)) or math.isnan(tolerance) or tolerance < 1:
        raise PtqdError(f"the error tolerance is a factor ≥ 1 on the all-high-bit prediction, got {tolerance!r}")
    ts = [int(t) for t in np.asarray(timesteps).ravel()]
    if len(ts) != len(curve[0]["bits"]):
        raise PtqdError(f"{len(ts)} timesteps for {len(curve[0]['bits'])} sampler steps")
    best = min((e for e in curve if e["relative"] <= tolerance), key=lambda e: e["bops"])
    return {t: int(b) for t, b in zip(ts, best["bits"])}
