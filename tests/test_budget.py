"""Budgeted mixed precision: propagation gains, predicted final error, the cost/error curve and the
schedule within a tolerance (ptqd.correction.mixed), and its plot (ptqd.report)."""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ptqd.correction.mixed import (
    budget_curve,
    budget_schedule,
    data_variance,
    gains_from_coefficients,
    predicted_mse,
    propagation_gains,
    step_coefficients,
)
from ptqd.errors import PtqdError
from ptqd.models.zoo import SCHEDULER_CONFIG
from ptqd.report import plot_budget_curve

MEAN, VAR = 0.3, 0.25  # the Gaussian toy data


def scheduler(kind: str, steps: int):
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    s = cls.from_config(dict(SCHEDULER_CONFIG))
    s.set_timesteps(steps)
    return s


def ideal_eps(x: torch.Tensor, a: float, m: float = MEAN, v: float = VAR) -> torch.Tensor:
    """E[ε | x_t] for data N(m, v)."""
    return math.sqrt(1 - a) * (x - math.sqrt(a) * m) / (a * v + 1 - a)


def test_gains_are_the_product_of_later_step_derivatives():
    assert gains_from_coefficients([1.0, 2.0, 3.0], [0.5, 2.0, 4.0]) == pytest.approx([64.0, 64.0, 9.0])
    assert gains_from_coefficients([-2.0], [7.0]) == pytest.approx([4.0])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gains_by_hand_for_three_steps(eta):
    s = scheduler("ddim", 3)
    ab = s.alphas_cumprod.double().numpy()
    ts = [int(t) for t in s.timesteps]
    c, d = [], []
    for t in ts:
        a = ab[t]
        ap = ab[t - 1000 // 3] if t - 1000 // 3 >= 0 else 1.0
        sig2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        j = math.sqrt(1 - a) / (a * VAR + 1 - a)
        c.append(math.sqrt(1 - ap - sig2) - math.sqrt(ap * (1 - a) / a))
        d.append(math.sqrt(ap / a) * (1 - math.sqrt(1 - a) * j) + math.sqrt(1 - ap - sig2) * j)
    expected = [(c[0] * d[1] * d[2]) ** 2, (c[1] * d[2]) ** 2, c[2] ** 2]
    assert propagation_gains(s, "ddim", eta, VAR) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_step_derivative_matches_the_scheduler_step_with_the_ideal_denoiser(kind):
    s = scheduler(kind, 4)
    _, d = step_coefficients(s, kind, 1.0, VAR)
    x = torch.tensor([[0.7]], dtype=torch.float64)  # (batch, channel): DDPM reads shape[1]
    h = 1e-4
    for i, t in enumerate(s.timesteps):
        a = float(s.alphas_cumprod[t])

        def step(xx):
            if kind == "ddim":
                return s.step(ideal_eps(xx, a), t, xx, eta=1.0, variance_noise=torch.zeros_like(xx)).prev_sample
            return s.step(ideal_eps(xx, a), t, xx, generator=torch.Generator().manual_seed(0)).prev_sample

        fd = ((step(x + h) - step(x - h)) / (2 * h)).item()
        assert fd == pytest.approx(d[i], rel=1e-4, abs=1e-6)


def _run(s, kind, eta, inject: dict[int, float], n=40000, seed=0):
    """Sample the 1-D Gaussian toy with the ideal denoiser; ``inject``: step index → std of an ε error."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    eg = torch.Generator().manual_seed(seed + 1)  # injected errors: same draws in every run
    ng = torch.Generator().manual_seed(seed + 2)  # sampler noise: same draws in every run
    for i, t in enumerate(s.timesteps):
        eps = ideal_eps(x, float(s.alphas_cumprod[t]))
        e = torch.randn(n, 1, generator=eg, dtype=torch.float64)
        if i in inject:
            eps = eps + inject[i] * e
        if kind == "ddim":
            z = torch.randn(n, 1, generator=ng, dtype=torch.float64)
            x = s.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        else:
            x = s.step(eps, t, x, generator=ng).prev_sample
    return x


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0)])
def test_prediction_matches_monte_carlo_on_gaussian_data(kind, eta):
    steps = 10
    s = scheduler(kind, steps)
    gains = propagation_gains(s, kind, eta, VAR)
    clean = _run(s, kind, eta, {})
    # (10 steps with the posterior-mean denoiser under-disperse, Var ≈ 0.11-0.14 for 0.25: a sampler
    # property, not the model's; the prediction concerns differences between runs, not the spread)
    assert float(clean.mean()) == pytest.approx(MEAN, abs=0.02)
    for inject in ({0: 0.2}, {4: 0.1}, {steps - 1: 0.05}, {2: 0.1, 7: 0.05}):
        res = np.zeros(steps)
        for i, std in inject.items():
            res[i] = std**2
        measured = float(((_run(s, kind, eta, inject) - clean) ** 2).mean())
        pred = predicted_mse({4: res, 8: np.zeros(steps)}, gains, [4] * steps)
        assert measured == pytest.approx(pred, rel=0.04), inject


def test_data_variance_recovers_the_data_variance():
    g = torch.Generator().manual_seed(3)
    x0 = MEAN + math.sqrt(VAR) * torch.randn(200000, generator=g, dtype=torch.float64)
    for a in (1.0, 0.8, 0.3):
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(200000, generator=g, dtype=torch.float64)
        assert data_variance(float(xt.var()), a) == pytest.approx(VAR, rel=0.05)
    assert data_variance(0.5, 0.5) == 1e-6  # below the diffusion noise alone: floored
    assert data_variance(np.array([1.0, 0.5]), np.array([0.5, 0.5])) == pytest.approx([1.0, 1e-6])


def _toy(n=6, seed=0, negative=False):
    rng = np.random.default_rng(seed)
    gains = rng.uniform(0.1, 2.0, n)
    high = rng.uniform(0.01, 0.1, n)
    low = high + rng.uniform(0.0, 0.5, n)
    if negative:
        low[1] = high[1] * 0.5  # a step whose low-bit residual is smaller (noisy statistics)
    return {4: low, 8: high}, gains


BOPS = {4: 1.0e9, 8: 2.0e9}


def test_curve_runs_from_all_high_to_all_low_monotonically():
    res, gains = _toy()
    curve = budget_curve(res, gains, BOPS)
    assert len(curve) == 7
    assert list(curve[0]["bits"]) == [8] * 6 and curve[0]["relative"] == 1.0 and curve[0]["low_steps"] == 0
    assert list(curve[-1]["bits"]) == [4] * 6 and curve[-1]["low_steps"] == 6
    bops = [e["bops"] for e in curve]
    pred = [e["predicted_mse"] for e in curve]
    assert all(a > b for a, b in zip(bops, bops[1:]))
    assert all(a <= b for a, b in zip(pred, pred[1:]))
    assert bops[0] == 12e9 and bops[-1] == 6e9
    for e in curve:
        assert e["predicted_mse"] == pytest.approx(predicted_mse(res, gains, e["bits"]))
        assert e["relative"] == pytest.approx(e["predicted_mse"] / curve[0]["predicted_mse"])
        assert e["low_steps"] == int(np.sum(e["bits"] == 4))


@pytest.mark.parametrize("seed,negative", [(0, False), (1, False), (2, True)])
def test_schedule_is_the_cheapest_within_tolerance_by_brute_force(seed, negative):
    res, gains = _toy(seed=seed, negative=negative)
    ts = list(range(950, -1, -190))[:6]
    base = predicted_mse(res, gains, [8] * 6)
    for tol in (1.0, 1.2, 1.5, 2.0, 4.0, 10.0, math.inf):
        sched = budget_schedule(res, gains, BOPS, ts, tol)
        assert list(sched) == ts
        bits = list(sched.values())
        cost = sum(BOPS[b] for b in bits)
        assert predicted_mse(res, gains, bits) <= tol * base * (1 + 1e-12)
        best = min(
            sum(BOPS[b] for b in cand)
            for cand in itertools.product([4, 8], repeat=6)
            if predicted_mse(res, gains, list(cand)) <= tol * base * (1 + 1e-12)
        )
        assert cost == best, tol
    assert list(budget_schedule(res, gains, BOPS, ts, math.inf).values()) == [4] * 6


def test_three_bit_widths_greedy_curve():
    rng = np.random.default_rng(5)
    gains = rng.uniform(0.1, 2.0, 5)
    s8 = rng.uniform(0.01, 0.1, 5)
    res = {8: s8, 6: s8 + rng.uniform(0, 0.2, 5), 4: s8 + rng.uniform(0.2, 0.6, 5)}
    bops = {4: 1.0, 6: 1.5, 8: 2.0}
    curve = budget_curve(res, gains, bops)
    assert len(curve) == 5 * 2 + 1
    assert list(curve[0]["bits"]) == [8] * 5 and list(curve[-1]["bits"]) == [4] * 5
    assert all(a["bops"] > b["bops"] for a, b in zip(curve, curve[1:]))
    assert all(a["predicted_mse"] <= b["predicted_mse"] for a, b in zip(curve, curve[1:]))
    sched = budget_schedule(res, gains, bops, list(range(5)), 1.5)
    assert predicted_mse(res, gains, list(sched.values())) <= 1.5 * curve[0]["predicted_mse"]


def test_single_bit_width_and_zero_residuals():
    curve = budget_curve({8: np.zeros(3)}, np.ones(3), {8: 2.0})
    assert len(curve) == 1 and curve[0]["relative"] == 1.0
    curve = budget_curve({4: np.array([0.0, 1.0]), 8: np.zeros(2)}, np.ones(2), {4: 1.0, 8: 2.0})
    assert [e["relative"] for e in curve] == [1.0, 1.0, math.inf]
    assert budget_schedule({4: np.array([0.0, 1.0]), 8: np.zeros(2)}, np.ones(2), {4: 1.0, 8: 2.0}, [10, 0], 2.0) == {10: 4, 0: 8}


def test_bad_input_is_refused():
    res, gains = _toy()
    ts = list(range(6))
    s = scheduler("ddim", 5)
    bad = [
        lambda: predicted_mse(res, gains[:5], [8] * 6),  # residuals and gains of different lengths
        lambda: predicted_mse(res, gains, [8] * 5),  # bits for fewer steps
        lambda: predicted_mse(res, gains, [8] * 5 + [6]),  # no statistics for A6
        lambda: predicted_mse(res, gains, [8.0] * 6),  # not integers
        lambda: predicted_mse(res, gains, {t: 8 for t in ts}),  # a schedule dict, not a sequence
        lambda: predicted_mse({}, gains, []),
        lambda: predicted_mse({4: -res[4], 8: res[8]}, gains, [8] * 6),
        lambda: predicted_mse(res, -gains, [8] * 6),
        lambda: predicted_mse({4: res[4], 8: np.full(6, np.nan)}, gains, [8] * 6),
        lambda: budget_curve(res, gains, {8: 2.0}),  # no BOPs for A4
        lambda: budget_curve(res, gains, {4: 2.0, 8: 1.0}),  # BOPs shrinking with bits
        lambda: budget_curve(res, gains, {4: 0.0, 8: 1.0}),
        lambda: budget_schedule(res, gains, BOPS, ts, 0.9),  # tolerance below 1
        lambda: budget_schedule(res, gains, BOPS, ts, float("nan")),
        lambda: budget_schedule(res, gains, BOPS, ts[:5], 1.5),  # timesteps and gains differ
        lambda: budget_schedule(res, gains, BOPS, [1] * 6, 1.5),
        lambda: propagation_gains(s, "euler", 0.0, 1.0),
        lambda: propagation_gains(s, "ddim", -1.0, 1.0),
        lambda: propagation_gains(s, "ddim", 0.0, 0.0),
        lambda: propagation_gains(s, "ddim", 0.0, float("inf")),
        lambda: propagation_gains(DDIMScheduler.from_config(dict(SCHEDULER_CONFIG)), "ddim", 0.0, 1.0),  # no set_timesteps
        lambda: gains_from_coefficients([1.0, 2.0], [1.0]),
        lambda: data_variance(1.0, 0.0),
        lambda: data_variance(1.0, 1.5),
        lambda: data_variance(-1.0, 0.5),
        lambda: plot_budget_curve([], None, "unused.png"),
        lambda: plot_budget_curve([{"bops": 1.0}], None, "unused.png"),
    ]
    for i, fn in enumerate(bad):
        with pytest.raises(PtqdError):
            fn()
            pytest.fail(f"case {i} was accepted")


def test_plot_writes_a_png(tmp_path):
    res, gains = _toy()
    curve = budget_curve(res, gains, BOPS)
    measured = [{"gbops": 12.0, "relative_mse": 1.0, "label": "A8"}, {"gbops": 9.0, "relative_mse": 1.4, "label": "budget 1.5"}]
    for name, meas, tol in (("a.png", measured, 1.5), ("sub/b.png", None, None)):
        path = plot_budget_curve(curve, meas, tmp_path / name, tolerance=tol)
        assert path == tmp_path / name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "sub").glob(".*.tmp"))
