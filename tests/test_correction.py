"""PTQD correction: noise statistics, CNC/BC/VSC on DDIM and DDPM, mixed precision, mismatch checks."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from ptqd.cli import main
from ptqd.correction import (
    Corrector,
    NoiseStats,
    bit_schedule,
    check_stats,
    collect_moments,
    ddim_quantities,
    ddpm_quantities,
    describe_schedule,
    fit,
    load_stats,
    parse_parts,
    save_stats,
    snr_fp,
    snr_q,
    snr_table,
)
from ptqd.correction.mixed import sampling_bops, snr_criterion, snr_rule, snr_unscaled_criterion
from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.models.zoo import SCHEDULER_CONFIG
from ptqd.sampling import SamplerConfig

# ------------------------------------------------------------------------------------------
# a synthetic denoiser and its "quantized" twin with known noise


class _Out:
    def __init__(self, sample):
        self.sample = sample


class SyntheticNet(nn.Module):
    """ε(x, t) = a·x + b, a depending on t: smooth, with variance, no training needed. (An offset that
    differed per channel would correlate with the per-channel μ and bias the pooled slope, as it would
    in the official fit.)"""

    def __init__(self, channels=2):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))  # a parameter so the device is known
        self.register_buffer("b", torch.full((1, channels, 1, 1), 0.1))

    def forward(self, x, t, class_labels=None):
        a = 0.5 + float(t) / 2000.0
        return _Out(a * x + self.b)


K = {4: lambda t: 0.05 + t / 5000.0, 8: lambda t: 0.01}
MU = {4: torch.tensor([0.03, -0.02]), 8: torch.tensor([0.004, 0.001])}
SIGMA = {4: lambda t: 0.1 + t / 4000.0, 8: lambda t: 0.02}


def _synthetic_model(channels=2):
    return DiffusionModel(
        name="synthetic", unet=SyntheticNet(channels), scheduler_config=dict(SCHEDULER_CONFIG), image_size=8, channels=channels
    )


def _twin(model, seed=5):
    g = torch.Generator().manual_seed(seed)

    def quantized(bits, x, t, y, guidance):
        eps = model.denoise(x, t, y, guidance)
        z = torch.randn(eps.shape, generator=g)
        return (1 + K[bits](int(t))) * eps + MU[bits].view(1, -1, 1, 1) + SIGMA[bits](int(t)) * z

    return quantized


def test_fit_recovers_known_k_mu_sigma():
    model = _synthetic_model()
    sampler = SamplerConfig(steps=10, eta=1.0, batch_size=64)
    moments = collect_moments(model, _twin(model), [4, 8], 128, sampler, seed=1, progress=False)
    stats = fit(moments)
    resid = fit(moments, mean_of="residual")
    mean_eps = moments.m["c_e"].sum(2) / (128 * 64)  # per channel
    n = 128 * 2 * 64
    for i, b in enumerate(stats.bits):
        for s, t in enumerate(stats.timesteps):
            # tolerances: 5 standard errors of each estimate (σ/√n for means, σ/(sd(ε)·√n) for the slope)
            se_k = SIGMA[b](t) / math.sqrt(stats.fp_var[s] * n)
            se_mu = SIGMA[b](t) / math.sqrt(n / 2)
            assert stats.k[i, s] == pytest.approx(K[b](t), abs=5 * se_k), (b, t)
            assert stats.sigma[i, s] == pytest.approx(SIGMA[b](t), rel=0.03), (b, t)
            np.testing.assert_allclose(resid.mu[i, s], MU[b].numpy(), atol=5 * se_mu + 5 * se_k * 0.2)
            # official μ: mean of the total error, which includes k·mean(ε)
            np.testing.assert_allclose(stats.mu[i, s], MU[b].numpy() + K[b](t) * mean_eps[i, s], atol=5 * se_mu)
            assert stats.r[i, s] > 0
    # FP output variance recorded per step
    assert stats.fp_var.shape == (10,) and (stats.fp_var > 0).all()


def test_fit_matches_scipy_linregress_and_official_sigma():
    from scipy.stats import linregress

    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 2, 4, 4))
    d = -0.2 * e + 0.05 + rng.normal(scale=0.3, size=e.shape)
    from ptqd.correction.stats import NoiseMoments, sample_moments

    m = sample_moments(torch.from_numpy(e), torch.from_numpy(d))
    moments = NoiseMoments([8], [10], 32, 2, {k: v[None, None] for k, v in m.items()})
    lr = linregress(e.ravel(), d.ravel())
    raw = fit(moments, clamp_k=False)
    assert raw.k[0, 0] == pytest.approx(lr.slope, rel=1e-9)
    assert raw.r[0, 0] == pytest.approx(lr.rvalue, rel=1e-9)
    resid = d - lr.slope * e
    assert raw.sigma[0, 0] == pytest.approx(np.mean([resid[i].std(ddof=1) for i in range(6)]), rel=1e-9)
    np.testing.assert_allclose(raw.mu[0, 0], d.mean(axis=(0, 2, 3)), rtol=1e-9)
    res_mean = fit(moments, clamp_k=False, mean_of="residual")
    np.testing.assert_allclose(res_mean.mu[0, 0], resid.mean(axis=(0, 2, 3)), rtol=1e-9)
    clamped = fit(moments)  # default: negative slope clamped to 0
    assert clamped.k[0, 0] == 0 and clamped.k_raw[0, 0] < 0
    assert clamped.sigma[0, 0] == pytest.approx(np.mean([d[i].std(ddof=1) for i in range(6)]), rel=1e-9)


def test_collection_resumes_after_interruption(tmp_path):
    model = _synthetic_model()
    sampler = SamplerConfig(steps=4, eta=1.0, batch_size=8)

    def deterministic(bits, x, t, y, g):  # noise that depends only on the input: reproducible across runs
        eps = model.denoise(x, t, y, g)
        return 1.1 * eps + 0.05 * torch.sin(37 * x)

    full = collect_moments(model, deterministic, [8], 24, sampler, progress=False)
    partial = tmp_path / "stats.parts"
    calls = {"n": 0}

    def failing(bits, x, t, y, g):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # two batches of 4 steps, then "crash"
            raise KeyboardInterrupt
        return deterministic(bits, x, t, y, g)

    with pytest.raises(KeyboardInterrupt):
        collect_moments(model, failing, [8], 24, sampler, progress=False, partial=partial, meta={"m": 1})
    assert partial.is_dir()
    calls["n"] = -1000
    resumed = collect_moments(model, failing, [8], 24, sampler, progress=False, partial=partial, meta={"m": 1})
    assert calls["n"] == -1000 + 4  # only the last batch was recomputed
    for k in full.m:
        np.testing.assert_allclose(resumed.m[k], full.m[k], rtol=1e-12)


# ------------------------------------------------------------------------------------------
# corrected steps reproduce the FP step's mean and variance


def _hand_stats(t, k, mu, sigma, bits=8, channels=1):
    z = np.zeros((1, 1))
    return NoiseStats(
        meta={}, bits=[bits], timesteps=[int(t)], k=np.full((1, 1), k), k_raw=np.full((1, 1), k),
        mu=np.full((1, 1, channels), mu), sigma=np.full((1, 1), sigma), r=z, fp_var=np.ones(1), rel_err=z,
    )


def _step_moments(scheduler, eps_fn, t, x, parts, stats, eta, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    eps = eps_fn(x)
    c = Corrector(stats, parts) if stats is not None else None
    if c is None:
        kw = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
        out = scheduler.step(eps, t, x, generator=g, **kw).prev_sample
    else:
        out = c.step(scheduler, eps, t, x, g, eta=eta)
    return out.mean().item(), out.var().item(), c


# tolerance: 400k elements → the sample variance is within ~0.5% (4 standard errors ≈ 0.9%)
N_MC = 400_000


@pytest.mark.parametrize("kind,eta", [("ddim", 1.0), ("ddim", 0.5), ("ddpm", None)])
def test_corrected_step_matches_fp_mean_and_variance(kind, eta):
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(50)
    t = sched.timesteps[30]  # t = 380
    x = torch.full((N_MC, 1, 1, 1), 0.4)
    fp_eps = lambda x: 0.8 * x  # noqa: E731
    k, mu, sigma = 0.15, 0.05, 0.12
    gq = torch.Generator().manual_seed(123)
    q_eps = lambda x: (1 + k) * fp_eps(x) + mu + sigma * torch.randn(x.shape, generator=gq)  # noqa: E731
    stats = _hand_stats(t, k, mu, sigma)
    m_fp, v_fp, _ = _step_moments(sched, fp_eps, t, x, (), None, eta or 0.0, seed=1)
    m_c, v_c, c = _step_moments(sched, q_eps, t, x, ("cnc", "bc", "vsc"), stats, eta or 0.0, seed=2)
    m_q, v_q, _ = _step_moments(sched, q_eps, t, x, (), None, eta or 0.0, seed=3)
    se = math.sqrt(v_fp / N_MC)
    assert abs(m_c - m_fp) < 5 * se + 1e-5
    # DDIM: the official c_t uses the original σ_t, so the corrected variance undershoots by (c² − c'²)·σ_res²
    q = ddim_quantities(sched, t, eta) if kind == "ddim" else ddpm_quantities(sched, t)
    assert v_c == pytest.approx(v_fp, rel=0.02)
    assert c.log and c.log[-1]["sigma_vsc"] < q["sigma"]
    # without correction the quantized step is measurably off: the test can fail
    assert abs(m_q - m_fp) > 20 * se or abs(v_q / v_fp - 1) > 0.05


def test_vsc_without_cnc_uses_raw_sigma_and_cnc_alone_rescales():
    sched = DDIMScheduler.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(50)
    t = int(sched.timesteps[10])
    stats = _hand_stats(t, 0.25, 0.1, 0.2)
    eps = torch.ones(1, 1, 2, 2)
    assert torch.allclose(Corrector(stats, ("cnc",)).correct_eps(eps, t), eps / 1.25)
    assert torch.allclose(Corrector(stats, ("bc",)).correct_eps(eps, t), eps - 0.1)
    assert torch.allclose(Corrector(stats, ("cnc", "bc")).correct_eps(eps, t), (eps - 0.1) / 1.25)
    assert Corrector(stats, "all").parts == ("cnc", "bc", "vsc") and Corrector(stats, "none").parts == ()
    assert Corrector(stats, ("vsc",)).residual_std(t) == pytest.approx(0.2)
    assert Corrector(stats, ("cnc", "vsc")).residual_std(t) == pytest.approx(0.2 / 1.25)


def test_ddim_eta0_vsc_is_a_noop_and_reported():
    sched = DDIMScheduler.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(20)
    t = sched.timesteps[5]
    stats = _hand_stats(t, 0.1, 0.02, 0.3)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = 0.5 * x
    with_vsc = Corrector(stats, ("cnc", "bc", "vsc"))
    a = with_vsc.step(sched, eps, t, x, None, eta=0.0)
    b = Corrector(stats, ("cnc", "bc")).step(sched, eps, t, x, None, eta=0.0)
    ref = sched.step((eps - 0.02) / 1.1, t, x, eta=0.0).prev_sample
    assert torch.equal(a, b) and torch.equal(a, ref)
    assert with_vsc.log == []  # no variance was changed
    assert any("no-op" in n for n in with_vsc.notes("ddim", 0.0))
    assert with_vsc.notes("ddim", 1.0) == []


def test_ddim_and_ddpm_coefficients_match_the_formulas():
    sched = DDIMScheduler.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(50)
    t = int(sched.timesteps[20])
    q = ddim_quantities(sched, t, 1.0)
    a, ap = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 20])
    var = (1 - ap) / (1 - a) * (1 - a / ap)
    assert q["sigma"] == pytest.approx(math.sqrt(var))
    assert q["c"] == pytest.approx(math.sqrt(1 - ap - var) - math.sqrt(ap * (1 - a) / a))
    # the coefficient is the derivative of the scheduler's own update with respect to ε
    x = torch.zeros(1, 1, 1, 1)
    e0, e1 = torch.zeros_like(x), torch.ones_like(x)
    d = sched.step(e1, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample - sched.step(
        e0, t, x, eta=1.0, variance_noise=torch.zeros_like(x)
    ).prev_sample
    assert d.item() == pytest.approx(q["c"], rel=1e-5)
    dd = DDPMScheduler.from_config(dict(SCHEDULER_CONFIG))
    dd.set_timesteps(50)
    p = ddpm_quantities(dd, t)
    alpha = a / ap
    assert p["c"] == pytest.approx((1 - alpha) / (math.sqrt(alpha) * math.sqrt(1 - a)))
    step = lambda e: dd.step(e, t, x, generator=torch.Generator().manual_seed(0)).prev_sample  # noqa: E731
    assert (step(e0) - step(e1)).item() == pytest.approx(p["c"], rel=1e-5)
    assert p["sigma"] == pytest.approx(math.sqrt((1 - ap) / (1 - a) * (1 - alpha)))


def test_parse_parts():
    assert parse_parts("all") == ("cnc", "bc", "vsc")
    assert parse_parts("none") == ()
    assert parse_parts("vsc,cnc") == ("cnc", "vsc")
    with pytest.raises(PtqdError, match="unknown correction"):
        parse_parts("cnc,foo")


# ------------------------------------------------------------------------------------------
# mixed precision


def test_snr_rule_picks_lowest_sufficient_bits():
    snr_prev = np.array([1.0, 1.0, 10.0, 100.0])
    snr_by_bits = {4: np.array([2.0, 0.5, 11.0, 50.0]), 8: np.array([3.0, 2.0, 12.0, 80.0])}
    assert snr_rule(snr_prev, snr_by_bits).tolist() == [4, 8, 4, 8]  # none sufficient → highest


def test_bit_schedule_on_hand_made_statistics():
    sched = DDIMScheduler.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]  # 900 … 0
    n = len(ts)
    sigma4 = np.array([0.1] * (n - 3) + [0.3, 0.4, 0.5])
    stats = NoiseStats(
        meta={}, bits=[4, 8], timesteps=ts, k=np.zeros((2, n)), k_raw=np.zeros((2, n)), mu=np.zeros((2, n, 1)),
        sigma=np.stack([sigma4, np.full(n, 0.01)]), r=np.zeros((2, n)), fp_var=np.ones(n), rel_err=np.zeros((2, n)),
    )
    ab = sched.alphas_cumprod.numpy()
    table = snr_table(stats, ab, 1000)
    assert table["snr_fp"] == pytest.approx(snr_fp(ab[ts]))
    assert table["snr_fp_prev"][0] == pytest.approx(snr_fp(ab[999]))
    assert table["snr_q"][4] == pytest.approx(snr_q(ab[ts], 0, sigma4))
    # by hand: unscaled SNR^Q at t = 100, 0 is swamped by σ² (1−ᾱ small), scaled SNR^Q is not
    expect_unscaled = [4 if ab[t] / ((1 - ab[t]) + s**2) >= p else 8 for t, s, p in zip(ts, sigma4, table["snr_fp_prev"])]
    unscaled = bit_schedule(stats, ab, 1000, criterion="snr-unscaled")
    assert list(unscaled.values()) == expect_unscaled
    assert list(unscaled.values())[:5] == [4] * 5 and list(unscaled.values())[-1] == 8
    scaled = bit_schedule(stats, ab, 1000, criterion="snr")
    expect_scaled = [4 if 1 / (1 + s**2) * snr_fp(ab[t]) >= p else 8 for t, s, p in zip(ts, sigma4, table["snr_fp_prev"])]
    assert list(scaled.values()) == expect_scaled
    assert snr_criterion(table, [4, 8]).tolist() == expect_scaled
    assert snr_unscaled_criterion(table, [4, 8]).tolist() == expect_unscaled
    # override and custom criterion
    first3 = bit_schedule(stats, ab, 1000, low_steps=3)
    assert list(first3.values()) == [4, 4, 4] + [8] * (n - 3)
    assert describe_schedule(first3) == f"t 900→700: A4, t 600→0: A8"
    always8 = bit_schedule(stats, ab, 1000, criterion=lambda table, c: np.full(n, max(c)))
    assert set(always8.values()) == {8}
    with pytest.raises(PtqdError, match="unknown mixed-precision criterion"):
        bit_schedule(stats, ab, 1000, criterion="magic")
    assert sampling_bops({4: 1.0, 8: 4.0}, first3, cfg_batches=2) == 2 * (3 * 1.0 + (n - 3) * 4.0)


# ------------------------------------------------------------------------------------------
# files and mismatches


def test_stats_roundtrip_and_mismatch_refused(tmp_path):
    model = _synthetic_model()
    sampler = SamplerConfig(steps=4, eta=1.0, batch_size=8)
    meta = {"model_fingerprint": "abc", "quant_fingerprint": "q1", "weight_bits": 4, "scheduler": "ddim", "steps": 4, "eta": 1.0, "guidance": 3.0}
    stats = fit(collect_moments(model, _twin(model), [4, 8], 8, sampler, progress=False), meta=meta)
    path = save_stats(stats, tmp_path / "s.safetensors")
    back = load_stats(path)
    np.testing.assert_array_equal(back.k, stats.k)
    np.testing.assert_array_equal(back.mu, stats.mu)
    assert back.timesteps == stats.timesteps and back.bits == [4, 8]
    assert json.loads(path.with_suffix(".json").read_text())["meta"]["eta"] == 1.0
    check_stats(back, meta, bits=[4])
    with pytest.raises(PtqdError, match="eta is 1.0 there but 0.0 here"):
        check_stats(back, {**meta, "eta": 0.0})
    with pytest.raises(PtqdError, match="weight_bits"):
        check_stats(back, {**meta, "weight_bits": 8})
    with pytest.raises(PtqdError, match="model_fingerprint"):
        check_stats(back, {**meta, "model_fingerprint": "other"})
    with pytest.raises(PtqdError, match="no noise statistics for 2-bit"):
        check_stats(back, meta, bits=[2])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PtqdError, match="not a readable noise statistics file"):
        load_stats(bad)
    with pytest.raises(PtqdError, match="does not exist"):
        load_stats(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------
# end to end on the bundled model, through the CLI


def test_ptqd_end_to_end_cli(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main([
        "quantize", "--model", "digits16-cond", "--weight-bits", "4", "--method", "ptqd", "--mixed-precision", "4,8",
        "--calib-samples", "4", "--calib-steps", "2", "--recon-samples", "16", "--weight-iters", "2", "--act-iters", "1",
        "--steps", "6", "--noise-samples", "4", "--out", str(run), "--no-progress",
    ])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "A4 t=" in out and "A8 t=" in out and "mixed precision (snr-unscaled)" in out and "GBOPs per image" in out
    stats_file = run / "noise_stats_ddim6_eta1_g3.safetensors"
    assert stats_file.is_file() and stats_file.with_suffix(".json").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "ptqd" and cfg["correction"]["mixed_precision"] == [4, 8] and cfg["quant"]["extra_act_bits"] == [4]

    npz = tmp_path / "s.npz"
    assert main(["sample", str(run), "--num", "4", "--steps", "6", "--out", str(npz), "--no-progress"]) == 0
    rec = json.loads(npz.with_suffix(".json").read_text())
    assert rec["correction"] == ["cnc", "bc", "vsc"] and "A" in rec["bit_schedule"] and rec["sampling_bops"] > 0
    # corrections change the images; no correction at fixed 8 bits is plain qdiff
    plain = tmp_path / "plain.npz"
    assert main(["sample", str(run), "--num", "4", "--steps", "6", "--correct", "none", "--act-bits", "8", "--out", str(plain), "--no-progress"]) == 0
    assert not (np.load(npz)["images"] == np.load(plain)["images"]).all()
    # other fit options refit the stored moments (no new collection)
    before = load_stats(stats_file)
    assert main(["stats", str(run), "--steps", "6", "--noise-samples", "4", "--keep-negative-k", "--no-progress"]) == 0
    refit = load_stats(stats_file)
    assert refit.meta["clamp_k"] is False and (refit.k == refit.k_raw).all()
    np.testing.assert_array_equal(refit.k_raw, before.k_raw)
    assert main(["stats", str(run), "--steps", "6", "--noise-samples", "4", "--no-progress"]) == 0
    np.testing.assert_array_equal(load_stats(stats_file).k, before.k)
    # another sampler needs its own statistics: refused with the command that makes them
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "4", "--steps", "6", "--eta", "0", "--out", str(npz), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no noise statistics for ddim 6 steps eta 0" in err and "ptqd stats" in err
    assert main(["stats", str(run), "--eta", "0", "--act-bits", "8", "--noise-samples", "4", "--no-progress"]) == 0
    assert main(["sample", str(run), "--num", "4", "--steps", "6", "--eta", "0", "--act-bits", "8", "--out", str(npz), "--no-progress"]) == 0
    assert "vsc is a no-op" in capsys.readouterr().out
    assert any("no-op" in n for n in json.loads(npz.with_suffix(".json").read_text())["notes"])
    # statistics of another calibration are refused
    other = load_stats(stats_file)
    other.meta["quant_fingerprint"] = "0000"
    save_stats(other, stats_file)
    assert main(["sample", str(run), "--num", "2", "--steps", "6", "--out", str(npz), "--no-progress"]) == 2
    assert "quant_fingerprint" in capsys.readouterr().err
    # report with plots
    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "criterion snr-unscaled" in report and "| A4 |" in report
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert len(pngs) == 7 and "noise_stats_ddim6_eta1_g3_budget.png" in pngs and "noise_stats_ddim6_eta0_g3_r2.png" in pngs
    assert "Share of the quantization error each correction model removes" in report and "budgeted mixed precision" in report
