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
"""

from __future__ import annotations

from typing import Callable

import numpy as np

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
