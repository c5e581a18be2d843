"""Trajectory-matched correction maps: fitted where the corrected sampler goes, to the ε that returns it to FP.

Every other correction model is fitted on FP trajectories (or the uncorrected quantized ones) but runs
on its own corrected trajectory, and minimises each step's ε error rather than the final sample's.
Here the FP sampler and the *corrected* quantized sampler advance in lockstep on the same x_T and
step noise. At step t, over all trajectories at once, a map W_t on z = [ε̂(x_Q), x_Q, 1] is fitted by
least squares to the target

    y_t = ε_FP(x_FP) + γ·(A_t/c_t)(x_FP − x_Q),

the ε that puts x_Q,t−1 onto x_FP,t−1 (DDIM: x_{t−1} = A_t x_t + c_t ε + σ_t z, A_t = √(ᾱ_{t−1}/ᾱ_t)),
ridge-regularised toward the identity map (ε_corr = ε̂); then the quantized sampler steps on with
ε_corr = W_tᵀ z. ``gamma`` ∈ [0, 1] sets how much of the state gap a step tries to close (γ = 0: plain
ε matching on the corrected trajectory). The maps join the statistics as the ``matched`` correction
model (:func:`attach_matched`), applied like any fitted map.

The fit runs all trajectories of a bit-width in one batch, in memory (lockstep needs every trajectory at
step t before any goes on): it has no chunked resume or torchrun split, unlike the moments pass.
DDIM only.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ptqd import defaults
from ptqd.correction import models as cm
from ptqd.correction.corrector import ddim_quantities
from ptqd.errors import PtqdError
from ptqd.sampling import SamplerConfig, default_labels, make_scheduler, sample_generators


def _fit_step(z: torch.Tensor, y: torch.Tensor, ridge: float) -> np.ndarray:
    """W (2C+1, C) minimising |y − Wᵀz|² + λ|W − W₀|² on the non-constant rows, W₀ the identity map on ε̂."""
    c = y.shape[1]
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1).cpu().numpy()
    target = y.permute(0, 2, 3, 1).reshape(-1, c).double().cpu().numpy()
    G, H = rows.T @ rows, rows.T @ target
    W0 = np.zeros((2 * c + 1, c))
    W0[:c] = np.eye(c)
    lam = ridge * max(float(np.mean(np.diag(G)[:-1])), 1e-30)
    D = np.eye(2 * c + 1)
    D[-1, -1] = 0.0
    try:
        return np.linalg.solve(G + lam * D, H + lam * D @ W0)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(G + lam * D, H + lam * D @ W0, rcond=None)[0]


@torch.no_grad()
def fit_matched(fp, quantized: Callable, sampler: SamplerConfig, bits: list[int], num: int = 64,
                seed: int = defaults.NOISE_SEED, gamma: float = defaults.MATCHED_GAMMA, ridge: float = defaults.MATCHED_RIDGE,
                progress: bool = False) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per bit-width b: the matched maps W (steps, 2C+1, C) and each step's residual mean square
    E|y − ε_corr|² (steps,), fitted on ``num`` lockstep trajectory pairs of ``seed`` with
    ``quantized(b, x, t, y, guidance)`` (see the module docstring)."""
    from tqdm import tqdm

    if sampler.scheduler != "ddim":
        raise PtqdError(f"trajectory-matched statistics support the ddim sampler, not {sampler.scheduler}")
    if not (0.0 <= gamma <= 1.0):
        raise PtqdError(f"gamma (the share of the state gap a step closes) must lie in [0, 1], got {gamma}")
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise PtqdError(f"the ridge penalty must be a finite number ≥ 0, got {ridge}")
    if num < 2:
        raise PtqdError(f"trajectory-matched statistics need at least 2 trajectories, got {num}")
    sched = make_scheduler(fp, "ddim", sampler.steps)
    guidance = sampler.guidance if fp.conditional else 1.0
    shape = (fp.channels, fp.image_size, fp.image_size)
    param = next(fp.unet.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    labels = default_labels(fp, num)
    y_lab = torch.from_numpy(np.asarray(labels)).to(device) if labels is not None else None
    out = {}
    bar = tqdm(total=len(bits) * sampler.steps, desc="matched statistics", unit="step", disable=not progress)
    for b in bits:
        g_fp, g_q = sample_generators(seed, range(num)), sample_generators(seed, range(num))
        x_fp = torch.stack([torch.randn(shape, generator=g) for g in g_fp]).to(device) * sched.init_noise_sigma
        x_q = torch.stack([torch.randn(shape, generator=g) for g in g_q]).to(device) * sched.init_noise_sigma
        Ws, res = [], []
        for t in sched.timesteps:
            q = ddim_quantities(sched, int(t), sampler.eta)
            A = math.sqrt(q["alpha_bar_prev"] / q["alpha_bar"])
            e_fp = fp.denoise(x_fp, t, y_lab, guidance)
            e_q = quantized(b, x_q, t, y_lab, guidance)
            gap = (A / q["c"]) * (x_fp - x_q) if q["c"] != 0 else torch.zeros_like(x_fp)
            target = e_fp + gamma * gap
            W = _fit_step(torch.cat([e_q, x_q], 1), target, ridge)
            Wt = torch.as_tensor(W, dtype=e_q.dtype, device=e_q.device)
            e_corr = cm.apply_map(e_q, x_q, Wt, None)
            Ws.append(W)
            res.append(float(((target - e_corr) ** 2).mean()))
            x_fp = sched.step(e_fp, t, x_fp, eta=sampler.eta, generator=g_fp).prev_sample
            x_q = sched.step(e_corr, t, x_q, eta=sampler.eta, generator=g_q).prev_sample
            bar.update(1)
        if not all(np.isfinite(W).all() for W in Ws):
            raise PtqdError(f"the matched correction maps are not finite for {b}-bit activations; nothing was kept")
        out[b] = (np.stack(Ws), np.asarray(res))
    bar.close()
    return out


def attach_matched(stats, fitted: dict[int, tuple[np.ndarray, np.ndarray]], meta: dict | None = None) -> None:
    """Add the matched maps to ``stats`` as the ``matched`` correction model (every bit-width of the statistics)."""
    missing = [b for b in stats.bits if b not in fitted]
    if missing:
        raise PtqdError(f"matched maps missing for {missing}-bit activations (the statistics hold {stats.bits})")
    W = np.stack([fitted[b][0] for b in stats.bits])
    if W.shape[1] != len(stats.timesteps):
        raise PtqdError(f"matched maps for {W.shape[1]} steps, the statistics have {len(stats.timesteps)}")
    stats.maps["matched"] = (W, None)
    from ptqd.correction.stats import score_models

    if stats.moments is not None and stats.moments.joint is not None:
        stats.mse["fit"] = score_models(stats, stats.moments)
        if stats.heldout is not None and stats.heldout.joint is not None:
            stats.mse["heldout"] = score_models(stats, stats.heldout)
    else:
        stats.mse.setdefault("fit", {})["matched"] = np.stack([fitted[b][1] for b in stats.bits])
    stats.meta["matched"] = dict(meta or {})
