"""Corrections judged by the final sample (issue: corrections fitted to the final sample): debias'
guards, the horizon-deflated posterior model between content and debias, the final-sample guard and
the vector-sum budget prediction, on synthetic data and a synthetic linear-Gaussian denoiser."""

import math

import numpy as np
import pytest
import torch

from ptqd.correction import models as cm
from ptqd.correction.stats import collect_moments, fit
from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.models.zoo import SCHEDULER_CONFIG
from ptqd.sampling import SamplerConfig


def _moments(eps, q, x):
    J, P = cm.batch_moments(eps, q, x)
    return J, P, eps.shape[0]


def _data(n=64, c=2, hw=5, gain=1.2, m=0.3, mu=(0.05, -0.02), noise=0.1, pattern=None, seed=0, rho=0.6):
    """ε correlated with x_t (ρ) but not collinear; ε̂ = gain·ε + m·x + μ (+ pixel pattern) + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    eps = rho * x + math.sqrt(1 - rho**2) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    q = gain * eps + m * x + torch.tensor(mu, dtype=torch.float64).view(1, -1, 1, 1)
    if pattern is not None:
        q = q + pattern
    q = q + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return eps, q, x


def test_debias_pixel_has_a_pixel_bias_and_recovers_it():
    c, hw = 2, 5
    pattern = 0.3 * torch.sin(torch.arange(c * hw * hw, dtype=torch.float64)).view(1, c, hw, hw)
    eps, q, x = _data(n=400, pattern=pattern, noise=0.02)
    J, P, n = _moments(eps, q, x)
    W, bias = cm.fit_map(J, P, n, c, "debias-pixel")
    assert bias is not None and bias.shape == (c, hw * hw)
    want = -(pattern[0] + torch.tensor([0.05, -0.02], dtype=torch.float64).view(-1, 1, 1)).reshape(c, -1).numpy() / 1.2
    np.testing.assert_allclose(bias, want, atol=0.01)
    # the statistics allocate and keep it (they used to run debias-pixel without one)
    model = DiffusionModel(name="synthetic", unet=_Affine(), scheduler_config=dict(SCHEDULER_CONFIG), image_size=4, channels=1)
    pat = 0.2 * torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def quantized(bits, xx, t, y, gd):
        return 1.1 * model.denoise(xx, t, y, gd) + pat

    stats = fit(collect_moments(model, quantized, [8], 8, SamplerConfig(steps=3, batch_size=8), seed=1, progress=False))
    W, bias = stats.maps["debias-pixel"]
    assert bias is not None and np.abs(bias).max() > 0.1
    assert stats.mse["fit"]["debias-pixel"].max() < 1e-6 < stats.mse["fit"]["debias"].min()


def test_debias_refits_m_and_mu_when_a_falls_back_to_identity():
    c = 2
    eps, q, x = _data(gain=0.01, m=0.3, noise=0.05)  # the quantized output barely follows ε: A → I
    J, P, n = _moments(eps, q, x)
    em = cm.error_model(J, P, n, c)
    assert em["fallback"] and np.array_equal(em["A"], np.eye(c))
    W, _ = cm.fit_map(J, P, n, c, "debias")
    # with A = I the map is ε̂ − M'x − μ', M', μ' the least-squares fit of ε̂ − ε on [x, 1]
    X = np.hstack([x.permute(0, 2, 3, 1).reshape(-1, c).numpy(), np.ones((x.numel() // c, 1))])
    D = (q - eps).permute(0, 2, 3, 1).reshape(-1, c).numpy()
    B = np.linalg.lstsq(X, D, rcond=None)[0]
    np.testing.assert_allclose(W[:c], np.eye(c), atol=1e-12)
    np.testing.assert_allclose(W[c:], -B, atol=1e-8)
    # the old map (A = I but M, μ of the joint fit with A ≈ 0.01) is far worse than the refit one
    Wold = W.copy()
    Wold[c : 2 * c] = -0.3 * np.eye(c)
    Wold[2 * c] = -np.array([0.05, -0.02])
    assert cm.residual_mse(J, P, n, c, W, None) < 0.7 * cm.residual_mse(J, P, n, c, Wold, None)


@pytest.mark.parametrize("pixel", [False])
def test_posterior_equals_content_at_tau_1_and_debias_as_tau_grows(pixel):
    c = 2
    eps, q, x = _data(n=200, noise=0.3)
    J, P, n = _moments(eps, q, x)
    assert not cm._collinear(J, cm._idx(c))
    content, _ = cm.fit_map(J, P, n, c, "content", ridge=0.0)
    debias, _ = cm.fit_map(J, P, n, c, "debias", ridge=0.0)
    np.testing.assert_allclose(cm.fit_map(J, P, n, c, "posterior", 0.0, tau=1.0)[0], content, atol=1e-9)
    np.testing.assert_allclose(cm.fit_map(J, P, n, c, "posterior", 0.0, tau=math.inf)[0], debias, atol=1e-9)
    far = cm.fit_map(J, P, n, c, "posterior", 0.0, tau=1e6)[0]
    np.testing.assert_allclose(far, debias, atol=1e-4)
    # in between, the gain on ε̂ lies between content's and debias' and grows with τ
    gains = [float(np.trace(cm.fit_map(J, P, n, c, "posterior", 0.0, tau=t)[0][:c])) for t in (1, 3, 10, 100)]
    assert gains == sorted(gains) and np.trace(content[:c]) <= gains[0] + 1e-12 and gains[-1] <= np.trace(debias[:c]) + 1e-12
    with pytest.raises(PtqdError, match="τ must be"):
        cm.fit_map(J, P, n, c, "posterior", 0.0, tau=0.5)


def test_posterior_at_a_fallback_step_tends_to_the_refit_debias():
    c = 2
    eps, q, x = _data(gain=0.01, noise=0.05)
    J, P, n = _moments(eps, q, x)
    np.testing.assert_allclose(cm.fit_map(J, P, n, c, "posterior", 0.0, tau=math.inf)[0], cm.fit_map(J, P, n, c, "debias")[0], atol=1e-9)


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _Affine(torch.nn.Module):
    """ε(x, t) = a_t·x + 0.2·sin(2x): a smooth nonlinear denoiser (ε and x_t not collinear)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        return _Out((0.5 + float(t) / 2000.0) * x + 0.2 * torch.sin(2 * x))


# --- a synthetic linear-Gaussian denoiser with a known quantization error ----------------------------

DATA_MEAN, DATA_VAR = 0.2, 0.3


class GaussNet(torch.nn.Module):
    """The ideal ε for data N(m, v) per element: linear in x_t, so the sampler is a linear-Gaussian system."""

    def __init__(self):
        super().__init__()
        from diffusers import DDIMScheduler

        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("ab", DDIMScheduler.from_config(dict(SCHEDULER_CONFIG)).alphas_cumprod.clone())

    def forward(self, x, t, class_labels=None):
        a = self.ab[int(t)]
        return _Out(torch.sqrt(1 - a) * (x - torch.sqrt(a) * DATA_MEAN) / (a * DATA_VAR + 1 - a))


def gauss_model():
    return DiffusionModel(name="gauss", unet=GaussNet(), scheduler_config=dict(SCHEDULER_CONFIG), image_size=4, channels=1)


PATTERN = 0.05 * torch.linspace(-1, 1, 16).view(1, 1, 4, 4)


def gauss_twin(model, gain=1.25, content=0.15, bias=0.08, noise=0.05, seed=3):
    """A deterministic error (correlated gain, content m·x_t, channel bias, fixed pattern) plus a little noise."""
    g = torch.Generator().manual_seed(seed)

    def quantized(bits, x, t, y, guidance):
        e = model.denoise(x, t, y, guidance)
        return gain * e + content * x + bias + PATTERN + noise * torch.randn(e.shape, generator=g)

    return quantized


def _hand_stats(timesteps, k, mu, sigma=0.0):
    from ptqd.correction.stats import NoiseStats

    ns = len(timesteps)
    z = np.zeros((1, ns))
    return NoiseStats(meta={}, bits=[8], timesteps=list(timesteps), k=np.full((1, ns), k), k_raw=np.full((1, ns), k),
                      mu=np.full((1, ns, 1), mu), sigma=np.full((1, ns), sigma), r=z, fp_var=np.ones(ns), rel_err=z)


def _final_mse(model, quantized, corrector, sampler, num=32, seed=7):
    from ptqd.sampling import trajectories

    fp = trajectories(model, range(num), dataclasses.replace(sampler, seed=seed))
    q = trajectories(model, range(num), dataclasses.replace(sampler, seed=seed),
                     denoise=lambda x, t, y, gd: quantized(8, x, t, y, gd), corrector=corrector)
    return float(((q - fp) ** 2).mean())


import dataclasses  # noqa: E402

from ptqd.correction import Corrector  # noqa: E402
from ptqd.correction.guard import block_bounds, fit_guard  # noqa: E402
from ptqd.sampling import make_scheduler  # noqa: E402


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_guard_switches_off_a_correction_built_to_hurt_and_keeps_one_that_helps(eta):
    model = gauss_model()
    sampler = SamplerConfig(steps=10, eta=eta, batch_size=16)
    ts = [int(t) for t in make_scheduler(model, "ddim", 10).timesteps]
    quantized = gauss_twin(model, gain=1.0, content=0.0, bias=0.1, noise=0.0)
    q8 = lambda x, t, y, gd: quantized(8, x, t, y, gd)  # noqa: E731
    hurt = Corrector(_hand_stats(ts, 0.0, -0.3), ("bc",))  # adds 0.3 to an error of +0.1: worse for every λ > 0
    g = fit_guard(model, q8, hurt, sampler, num=16, seed=11, blocks=5)
    assert g["chosen"] == "none" and g["lambda"] == [0.0] * 5
    assert g["mse"]["full"] > g["mse"]["none"] and g["mse"]["fit"] >= g["mse"]["none"]
    hurt.blend = g["blend"]
    none = _final_mse(model, quantized, None, sampler, num=16, seed=11)
    assert _final_mse(model, quantized, hurt, sampler, num=16, seed=11) == none  # exactly the uncorrected sampler
    assert len(g["blocks"]) == 5 and g["blocks"][0][0] == ts[0] and g["blocks"][-1][1] == ts[-1]
    helps = Corrector(_hand_stats(ts, 0.0, 0.1), ("bc",))  # removes the bias (the fixed pattern stays)
    g = fit_guard(model, q8, helps, sampler, num=16, seed=11, blocks=5)
    assert g["chosen"] in ("full", "fit") and min(g["lambda"]) > 0.9
    assert g["mse"][g["chosen"]] < 0.2 * g["mse"]["none"]
    # partly harmful: right in the late blocks, wrong early; the blend is never worse than either extreme
    mixed = Corrector(_hand_stats(ts, 0.0, 0.1), ("bc",))
    mixed.stats.mu[0, :4] = -0.4
    g = fit_guard(model, q8, mixed, sampler, num=16, seed=11, blocks=5)
    assert g["mse"][g["chosen"]] <= min(g["mse"]["none"], g["mse"]["full"])
    # each candidate's calibration MSE is that of the sampler run with it (same noise as sampling)
    for name, lam in (("full", [1.0] * 5), ("none", [0.0] * 5)):
        mixed.blend = {int(t): v for t, v in zip(ts, np.repeat(lam, 2))}
        x = _final_images_mse(model, quantized, mixed, sampler, num=16, seed=11)
        assert g["mse"][name] == pytest.approx(x, rel=1e-6), name
    assert g["lambda_fit"][0] < 0.5 and g["lambda_fit"][-1] > 0.5


def _final_images_mse(model, quantized, corrector, sampler, num, seed):
    from ptqd.sampling import trajectories

    run = dataclasses.replace(sampler, seed=seed)
    fp = model.to_images(trajectories(model, range(num), run)).double()
    q = trajectories(model, range(num), run, denoise=lambda x, t, y, gd: quantized(8, x, t, y, gd), corrector=corrector)
    return float(((model.to_images(q).double() - fp) ** 2).mean())


def test_block_bounds():
    assert block_bounds(10, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert block_bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(PtqdError):
        block_bounds(0, 5)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_posterior_beats_none_and_ptqd_on_the_final_sample(eta):
    model = gauss_model()
    sampler = SamplerConfig(steps=10, eta=eta, batch_size=32)
    quantized = gauss_twin(model)
    stats = fit(collect_moments(model, quantized, [8], 64, sampler, seed=1, progress=False))
    none = _final_mse(model, quantized, None, sampler)
    ptqd = _final_mse(model, quantized, Corrector(stats, ("cnc", "bc")), sampler)
    post = _final_mse(model, quantized, Corrector(stats, ("posterior",)), sampler)
    assert post < 0.5 * none and post < 0.5 * ptqd, (none, ptqd, post)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_vector_sum_predicts_a_two_step_schedule_and_the_scalar_sum_does_not(eta):
    from ptqd.correction.apply import step_deviations
    from ptqd.correction.mixed import schedule_from_curve, vector_budget_curve, vector_predicted_mse
    from ptqd.sampling import trajectories

    model = gauss_model()
    sampler = SamplerConfig(steps=8, eta=eta, batch_size=32)
    # a deterministic error that does not depend on x_t: the sampler is linear, the steps' deviations superpose exactly
    quantized = gauss_twin(model, gain=1.0, content=0.0, noise=0.0)
    dev = step_deviations(model, quantized, sampler, [4, 8], num=24, seed=5)
    assert dev[4].shape == (8, 24, 16)
    i, j = 2, 5  # quantize steps i and j only (bits 4 there); "8" here is the FP network
    ts = make_scheduler(model, "ddim", 8).timesteps
    low = {int(ts[i]), int(ts[j])}
    mixed = lambda x, t, y, gd: quantized(4, x, t, y, gd) if int(t) in low else model.denoise(x, t, y, gd)  # noqa: E731
    run = dataclasses.replace(sampler, seed=5)
    fp = trajectories(model, range(24), run)
    measured = float(((trajectories(model, range(24), run, denoise=mixed) - fp) ** 2).mean())
    zero = {b: np.zeros_like(v) for b, v in dev.items()}
    only = {4: dev[4], 8: zero[8]}  # deviation of every step at "8" (= FP) is 0
    bits = [4 if k in (i, j) else 8 for k in range(8)]
    predicted = vector_predicted_mse(only, bits)
    assert predicted == pytest.approx(measured, rel=1e-3)
    scalar = float((dev[4][i] ** 2).mean() + (dev[4][j] ** 2).mean())
    assert abs(scalar - measured) > 0.05 * measured  # the cross-step term the scalar sum drops
    # the greedy curve on the quadratic: from all-high to all-low, predictions from the vector sum
    curve = vector_budget_curve(only, {4: 1.0, 8: 2.0})
    assert curve[0]["low_steps"] == 0 and curve[-1]["low_steps"] == 8
    assert all(e["predicted_mse"] == pytest.approx(vector_predicted_mse(only, e["bits"])) for e in curve)
    sched = schedule_from_curve([{**e, "relative": e["predicted_mse"] / max(predicted, 1e-30)} for e in curve], ts, 1.0)
    assert vector_predicted_mse(only, list(sched.values())) <= predicted + 1e-12
    # an error that follows x_t: the steps interact (second order); the vector sum is still closer than the scalar sum
    quantized = gauss_twin(model, gain=1.1, content=0.05, noise=0.0)
    dev = step_deviations(model, quantized, sampler, [4], num=24, seed=5)
    measured = float(((trajectories(model, range(24), run, denoise=mixed) - fp) ** 2).mean())
    predicted = vector_predicted_mse({4: dev[4], 8: zero[8]}, bits)
    scalar = float((dev[4][i] ** 2).mean() + (dev[4][j] ** 2).mean())
    assert abs(predicted - measured) < abs(scalar - measured), (predicted, scalar, measured)


def test_consistent_vsc_solves_sigma_with_the_coefficient_it_implies():
    from ptqd.correction import ddim_quantities

    model = gauss_model()
    sched = make_scheduler(model, "ddim", 50)
    ts = [int(t) for t in sched.timesteps]
    t = ts[-10]
    q = ddim_quantities(sched, t, 1.0)
    b = math.sqrt(q["alpha_bar_prev"] * (1 - q["alpha_bar"]) / q["alpha_bar"])
    c_of = lambda s: math.sqrt(1 - q["alpha_bar_prev"] - s * s) - b  # noqa: E731
    # the knife edge: official VSC (c of the original σ) zeroes the noise, the consistent one keeps some
    res = q["sigma"] / abs(q["c"]) * 1.02
    cor = Corrector(_hand_stats(ts, 0.0, 0.0, sigma=res), ("cnc", "bc", "vsc"), vsc_mode="consistent")
    assert cor._vsc_variance(q, t) < 0  # official: max(σ² − c²s², 0) = 0
    new = cor.vsc_sigma_consistent(q, t)
    assert new > 0
    assert new**2 + c_of(new) ** 2 * res**2 == pytest.approx(q["sigma"] ** 2, rel=1e-9)
    # a small residual: both nearly agree, the consistent one matches the variance exactly
    small = Corrector(_hand_stats(ts, 0.0, 0.0, sigma=0.1 * res), ("cnc", "bc", "vsc"), vsc_mode="consistent")
    s2 = small.vsc_sigma_consistent(q, t)
    assert s2**2 + c_of(s2) ** 2 * (0.1 * res) ** 2 == pytest.approx(q["sigma"] ** 2, rel=1e-9)
    assert s2 == pytest.approx(math.sqrt(max(small._vsc_variance(q, t), 0)), rel=0.05)
    # the guard's weight scales the residual it accounts for; λ = 0 leaves σ as it is
    small.blend = {t: 0.0}
    assert small.vsc_sigma_consistent(q, t) == pytest.approx(q["sigma"], rel=1e-9)
    assert small.describe()["vsc"] == "consistent" and Corrector(small.stats, "all").describe()["vsc"] == "official"


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_matched_maps_beat_none_and_ptqd_on_the_final_sample(eta, tmp_path):
    from ptqd.correction.matched import attach_matched, fit_matched
    from ptqd.correction.stats import load_stats, save_stats

    model = gauss_model()
    sampler = SamplerConfig(steps=10, eta=eta, batch_size=32)
    quantized = gauss_twin(model)
    stats = fit(collect_moments(model, quantized, [8], 32, sampler, seed=1, progress=False))
    attach_matched(stats, fit_matched(model, quantized, sampler, [8], num=64, seed=1))
    none = _final_mse(model, quantized, None, sampler)
    ptqd = _final_mse(model, quantized, Corrector(stats, ("cnc", "bc")), sampler)
    matched = _final_mse(model, quantized, Corrector(stats, ("matched",)), sampler)
    assert matched < 0.5 * none and matched < 0.5 * ptqd, (none, ptqd, matched)
    # the maps survive a save and load (they are not refitted from the moments)
    stats.meta.update(model_fingerprint="m", quant_fingerprint="q", weight_bits=4, scheduler="ddim", steps=10, eta=eta, guidance=None)
    back = load_stats(save_stats(stats, tmp_path / "s.safetensors"))
    np.testing.assert_allclose(back.maps["matched"][0], stats.maps["matched"][0])
    assert "matched" in back.mse["fit"]
    with pytest.raises(PtqdError, match="gamma"):
        fit_matched(model, quantized, sampler, [8], num=4, gamma=2.0)
