"""The final-sample guard: a correction is used only as far as it brings the *final* samples closer to FP.

A per-step correction f (PTQD's CNC/BC, a fitted map) is judged by what it does to x_0, not by its
per-step error. The sampler's steps are cut into ``blocks`` contiguous blocks; the guarded correction
uses ε̂ + λ_b (f − ε̂) in block b, λ_b ∈ [0, 1] (VSC's change of the sampler noise blended by the same
λ_b). On ``num`` calibration trajectories of ``seed`` (a seed never used for evaluation):

1. the FP sampler gives the target x_0^FP, the quantized sampler without correction (λ = 0) x_0^0;
2. for each block b, the quantized sampler with the correction in block b alone gives x_0^b; the
   responses r_b = x_0^b − x_0^0 (started from the λ = 0 trajectory at the block's first step, so
   the steps before it are not run again);
3. λ* = argmin_{λ ∈ [0,1]^B} |x_0^0 + Σ_b λ_b r_b − x_0^FP|² (box least squares, scipy's
   ``lsq_linear``): the responses add only to first order, so
4. λ*, all-0 (no correction) and all-1 (the correction as it is) are run exactly and the one closest to
   FP on these trajectories is kept.

So on its calibration trajectories a guarded correction is never worse than none. The distance is the
mean square over the final images (decoded by the FP decoder for latent models), as the paired
metrics measure it. Every run shares each sample's noise (generators seeded by (seed, index)), so the
candidates differ only by the correction. Cost: about B/2 + 3 quantized sampling runs and one FP run
of ``num`` samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from ptqd import defaults
from ptqd.errors import PtqdError
from ptqd.sampling import SamplerConfig, default_labels, make_scheduler, sample_generators, trajectories


def block_bounds(steps: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous [start, stop) ranges of step indices covering ``steps`` steps (fewer when steps < blocks)."""
    if steps < 1 or blocks < 1:
        raise PtqdError(f"the guard needs at least one step and one block, got {steps} steps and {blocks} blocks")
    parts = np.array_split(np.arange(steps), min(blocks, steps))
    return [(int(p[0]), int(p[-1]) + 1) for p in parts]


def blend_per_step(timesteps: list[int], bounds: list[tuple[int, int]], lam) -> dict[int, float]:
    """Timestep → λ of its block."""
    out = {}
    for (a, b), v in zip(bounds, lam):
        for i in range(a, b):
            out[int(timesteps[i])] = float(v)
    return out


@torch.no_grad()
def fit_guard(fp, denoise: Callable, corrector, sampler: SamplerConfig, num: int = defaults.GUARD_SAMPLES,
              seed: int = defaults.GUARD_SEED, blocks: int = defaults.GUARD_BLOCKS, progress: bool = False) -> dict[str, Any]:
    """λ per block of steps for ``corrector`` (a :class:`~ptqd.correction.Corrector`; its ``blend`` is
    set to the result) on ``num`` trajectories of ``seed``: see the module docstring.

    ``fp``: the FP model (its ``denoise`` gives the target, its ``to_images`` the images compared);
    ``denoise``: the quantized denoiser the corrected sampler uses. Returns ``blocks`` (timestep
    ranges), ``lambda`` (the chosen λ per block), ``lambda_fit`` (λ*), ``chosen`` (``fit``, ``none``
    or ``full``), ``mse`` (final MSE to FP on the calibration trajectories of each candidate),
    ``num``, ``seed`` and ``blend`` (timestep → λ)."""
    from scipy.optimize import lsq_linear
    from tqdm import tqdm

    if num < 1:
        raise PtqdError(f"the guard needs at least 1 calibration trajectory, got {num}")
    run = dataclasses.replace(sampler, seed=seed)
    run.validate()
    sched = make_scheduler(fp, run.scheduler, run.steps)
    ts = [int(t) for t in sched.timesteps]
    bounds = block_bounds(len(ts), blocks)
    labels = default_labels(fp, num)
    eta = run.eta if run.scheduler == "ddim" else 0.0
    guidance = run.guidance if fp.conditional else 1.0
    param = next(fp.unet.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    y = torch.from_numpy(np.asarray(labels)).to(device) if labels is not None else None
    bar = tqdm(total=len(ts) * (len(bounds) + 4), desc="correction guard", unit="step", disable=not progress)
    target = fp.to_images(trajectories(fp, range(num), run, labels, tick=lambda: bar.update(1))).double()

    def run_from(start: int, x, states, lam) -> tuple[torch.Tensor, list]:
        """The corrected quantized sampler from step ``start`` (state x, generator states) with λ per block;
        returns the final images and the (x, generator states) at each block start it passed."""
        corrector.blend = blend_per_step(ts, bounds, lam)
        gens = [torch.Generator().set_state(s) for s in states]
        saved = {}
        starts = {a for a, _ in bounds}
        for i in range(start, len(ts)):
            if i in starts:
                saved[i] = (x, [g.get_state() for g in gens])
            t = sched.timesteps[i]
            x = corrector.step(sched, denoise(x, t, y, guidance), t, x, gens, eta=eta)
            bar.update(1)
        return fp.to_images(x).double(), saved

    gens = sample_generators(seed, range(num))
    x0 = torch.stack([torch.randn((fp.channels, fp.image_size, fp.image_size), generator=g) for g in gens]).to(device)
    x0 = x0 * sched.init_noise_sigma
    start_states = [g.get_state() for g in gens]  # after the initial noise: every run draws the same step noise
    before = getattr(corrector, "blend", None)
    try:
        nb = len(bounds)
        base, saved = run_from(0, x0, start_states, np.zeros(nb))
        responses = []
        for b, (a, _) in enumerate(bounds):
            lam = np.zeros(nb)
            lam[b] = 1.0
            xa, st = saved[a]
            out, _ = run_from(a, xa, st, lam)
            responses.append((out - base).flatten())
        R = torch.stack(responses, 1).cpu().numpy()
        resid = (base - target).flatten().cpu().numpy()
        if np.abs(R).max() > 0:
            lam_fit = np.clip(lsq_linear(R, -resid, bounds=(0.0, 1.0)).x, 0.0, 1.0)
        else:  # the correction changes nothing here
            lam_fit = np.zeros(nb)
        mse = {"none": float(((base - target) ** 2).mean())}
        finals = {}
        first = next((b for b in range(nb) if lam_fit[b] > 0), None)
        if first is None:
            mse["fit"] = mse["none"]
        else:
            xa, st = saved[bounds[first][0]]
            finals["fit"], _ = run_from(bounds[first][0], xa, st, lam_fit)
            mse["fit"] = float(((finals["fit"] - target) ** 2).mean())
        if np.allclose(lam_fit, 1.0):
            mse["full"] = mse["fit"]
        else:
            out, _ = run_from(0, x0, start_states, np.ones(nb))
            mse["full"] = float(((out - target) ** 2).mean())
    finally:
        bar.close()
        corrector.blend = before
    lams = {"none": np.zeros(nb), "full": np.ones(nb), "fit": lam_fit}
    chosen = min(("none", "fit", "full"), key=lambda k: (mse[k], {"none": 0, "full": 1, "fit": 2}[k]))  # ties: the simpler one
    lam = lams[chosen]
    return {
        "blocks": [[ts[a], ts[b - 1]] for a, b in bounds],
        "lambda": [float(v) for v in lam],
        "lambda_fit": [float(v) for v in lam_fit],
        "chosen": chosen,
        "mse": mse,
        "num": int(num),
        "seed": int(seed),
        "blend": blend_per_step(ts, bounds, lam),
    }


def describe_guard(g: dict[str, Any]) -> str:
    """One line: λ per block and the calibration MSEs."""
    lam = ", ".join(f"t {a}→{b}: {v:.2f}" for (a, b), v in zip(g["blocks"], g["lambda"]))
    m = g["mse"]
    return (f"guard ({g['chosen']}, {g['num']} trajectories of seed {g['seed']}): λ {lam}; final MSE to FP on them "
            f"none {m['none']:.3g}, full {m['full']:.3g}, fitted {m['fit']:.3g}")
