"""Regression correction models (mean, content, content-pixel) fitted in closed form from streamed
moments: recovery of a known error model, equality with lstsq, merging, corrected steps by Monte Carlo,
old statistics files, held-out scores and the command line."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from ptqd.cli import main
from ptqd.correction import Corrector, collect_moments, ddim_quantities, ddpm_quantities, fit, load_stats, parse_parts, save_stats
from ptqd.correction import models as cm
from ptqd.correction.stats import NoiseMoments, merge_moments, sample_moments
from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.models.zoo import SCHEDULER_CONFIG
from ptqd.sampling import SamplerConfig


class _Out:
    def __init__(self, sample):
        self.sample = sample


class NonlinearNet(nn.Module):
    """ε(x, t) = a_t·x + 0.3·sin(3x) + b: not linear in x, so ε and x_t are not collinear."""

    def __init__(self, channels=2):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("b", torch.tensor([0.1, -0.05][:channels]).view(1, -1, 1, 1))

    def forward(self, x, t, class_labels=None):
        a = 0.5 + float(t) / 2000.0
        return _Out(a * x + 0.3 * torch.sin(3 * x) + self.b)


K, M, MU, SIGMA = 0.2, 0.15, torch.tensor([0.04, -0.03]), 0.05


def _model(channels=2):
    return DiffusionModel(name="synthetic", unet=NonlinearNet(channels), scheduler_config=dict(SCHEDULER_CONFIG), image_size=6,
                          channels=channels)


def _twin(model, seed=5):
    """The quantized twin: (1 + k)ε + m·x_t + μ + σz, content-dependent (m) as real quantization error is."""
    g = torch.Generator().manual_seed(seed)

    def quantized(bits, x, t, y, guidance):
        eps = model.denoise(x, t, y, guidance)
        return (1 + K) * eps + M * x + MU.view(1, -1, 1, 1) + SIGMA * torch.randn(eps.shape, generator=g)

    return quantized


def test_content_model_recovers_a_content_dependent_error_and_ptqd_cannot():
    model = _model()
    sampler = SamplerConfig(steps=5, eta=1.0, batch_size=32)
    moments = collect_moments(model, _twin(model), [8], 64, sampler, seed=1, progress=False)
    held = collect_moments(model, _twin(model, seed=9), [8], 32, sampler, seed=2, progress=False)
    stats = fit(moments, heldout=held)
    assert stats.models() == ["ptqd", "mean", "content", "content-pixel", "debias", "debias-pixel", "posterior"]
    # debias inverts the fitted error model: ε_corr = (ε̂ − m·x_t − μ)/(1 + k), unbiased given ε
    Wd = stats.maps["debias"][0][0]
    collinear = [cm._collinear(moments.joint["J"][0, s], cm._idx(2)) for s in range(len(stats.timesteps))]
    assert not all(collinear)
    for s in range(len(stats.timesteps)):
        if collinear[s]:  # x_t ≈ ε: A and M cannot be told apart, debias leaves M out
            assert np.all(Wd[s, 2:4] == 0)
            continue
        np.testing.assert_allclose(Wd[s, :2], np.eye(2) / (1 + K), atol=0.02)
        np.testing.assert_allclose(Wd[s, 2:4], -M * np.eye(2) / (1 + K), atol=0.02)
        np.testing.assert_allclose(Wd[s, 4], -MU.numpy() / (1 + K), atol=0.01)
        # its residual is the quantization noise left after the inversion, σ/(1+k), larger than the conditional mean's
        assert stats.mse["heldout"]["debias"][0, s] == pytest.approx((SIGMA / (1 + K)) ** 2, rel=0.1)
        assert stats.mse["heldout"]["debias"][0, s] >= stats.mse["heldout"]["content"][0, s]
    # a collinear step is detected from the moments alone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=g)
    J, _ = cm.batch_moments(x + 1e-4 * torch.randn(x.shape, generator=g), x, x)
    assert cm._collinear(J, cm._idx(1))
    J, _ = cm.batch_moments(torch.randn(x.shape, generator=g), x, x)
    assert not cm._collinear(J, cm._idx(1))
    J = moments.joint["J"]
    for s in range(len(stats.timesteps)):
        err = cm.forward_fit(J[0, s], 2)  # what the content moments say the quantized network does
        # tolerances ≈ 5 standard errors: σ/(sd of ε not explained by x_t ≈ 0.2)/√(64·36 pixels) ≈ 0.005
        np.testing.assert_allclose(err["A"], (1 + K) * np.eye(2), atol=0.025)
        np.testing.assert_allclose(err["M"], M * np.eye(2), atol=0.025)
        np.testing.assert_allclose(err["mu"], MU.numpy(), atol=0.01)
        assert err["sigma"] == pytest.approx(SIGMA, rel=0.03)
        # the corrector's estimate: content leaves only the noise σ/(1+k)-ish; every PTQD variant leaves part of
        # the x_t term (its k absorbs only what of m·x_t correlates with ε)
        for which in ("fit", "heldout"):
            mse = stats.mse[which]
            assert mse["content"][0, s] < 1.1 * (SIGMA / (1 + K)) ** 2
            best_ptqd = min(mse[k][0, s] for k in ("ptqd:cnc,bc", "ptqd:cnc", "ptqd:bc"))
            assert best_ptqd > 1.25 * mse["content"][0, s], (which, s)
            assert mse["error"][0, s] > 10 * mse["content"][0, s]
        r2 = stats.r2("heldout")
        assert r2["content"][0, s] > 0.97 and r2["content"][0, s] > r2["ptqd:cnc,bc"][0, s]
    # the per-step table reports R² in-sample and held out
    row = stats.table(8)[0]
    assert set(row["r2_heldout"]) >= {"content", "mean", "ptqd:cnc,bc"} and "r2_fit" in row


def _design(eps, q, x):
    """The regression rows [ε̂ (C), x (C), 1] and targets ε, one row per pixel."""
    c = eps.shape[1]
    rows = torch.cat([q, x], 1).permute(0, 2, 3, 1).reshape(-1, 2 * c).double().numpy()
    y = eps.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    return np.hstack([rows, np.ones((len(rows), 1))]), y


def test_closed_form_fit_equals_lstsq():
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 40, 3, 4, 5
    x = torch.randn(n, c, h, w, generator=g)
    eps = 0.7 * x + torch.sin(2 * x) + 0.1 * torch.randn(n, c, h, w, generator=g)
    q = 1.1 * eps + 0.2 * x.roll(1, dims=1) + 0.05 + 0.2 * torch.randn(n, c, h, w, generator=g) + torch.linspace(0, 0.3, h * w).view(1, 1, h, w)
    J, P = cm.batch_moments(eps, q, x)
    Z, y = _design(eps, q, x)
    W, bias = cm.fit_map(J, P, n, c, "content", ridge=0.0)
    assert bias is None
    np.testing.assert_allclose(W, np.linalg.lstsq(Z, y, rcond=None)[0], rtol=1e-8, atol=1e-10)
    # residual from moments equals the residual of the data
    assert cm.residual_mse(J, P, n, c, W, None) == pytest.approx(np.mean((y - Z @ W) ** 2), rel=1e-8)
    # the per-channel conditional mean: one lstsq per channel on [ε̂_c, 1]
    Wm, _ = cm.fit_map(J, P, n, c, "mean", ridge=0.0)
    for ch in range(c):
        sol = np.linalg.lstsq(Z[:, [ch, 2 * c]], y[:, ch], rcond=None)[0]
        assert Wm[ch, ch] == pytest.approx(sol[0], rel=1e-8) and Wm[2 * c, ch] == pytest.approx(sol[1], rel=1e-8)
        assert np.count_nonzero(Wm[:, ch]) == 2
    # content-pixel: lstsq with one indicator column per pixel instead of the intercept
    Wp, bp = cm.fit_map(J, P, n, c, "content-pixel", ridge=0.0)
    pix = np.tile(np.eye(h * w), (n, 1))
    sol = np.linalg.lstsq(np.hstack([Z[:, :-1], pix]), y, rcond=None)[0]
    np.testing.assert_allclose(Wp[: 2 * c], sol[: 2 * c], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(bp, sol[2 * c :].T, rtol=1e-7, atol=1e-9)
    pred = Z[:, :-1] @ Wp[: 2 * c] + np.tile(bp.T, (n, 1))
    assert cm.residual_mse(J, P, n, c, Wp, bp) == pytest.approx(np.mean((y - pred) ** 2), rel=1e-7)
    # the map applied to tensors is the same affine map
    out = cm.apply_map(q.double(), x.double(), torch.from_numpy(Wp), torch.from_numpy(bp))
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).reshape(-1, c).numpy(), pred, rtol=1e-9, atol=1e-10)
    # ridge shrinks the slopes, not the intercept's role: a large penalty gives nearly the mean of ε
    Wr, _ = cm.fit_map(J, P, n, c, "content", ridge=1e6)
    assert np.abs(Wr[: 2 * c]).max() < 1e-3
    np.testing.assert_allclose(Wr[2 * c], y.mean(0), atol=1e-3)


def test_moments_of_two_halves_merge_to_one_pass():
    model = _model()
    sampler = SamplerConfig(steps=3, eta=1.0, batch_size=4)

    def deterministic(bits, x, t, y, g):
        eps = model.denoise(x, t, y, g)
        return 1.1 * eps + 0.05 * torch.sin(37 * x)

    full = collect_moments(model, deterministic, [8], 12, sampler, progress=False)
    a = collect_moments(model, deterministic, [8], 8, sampler, progress=False)
    b = collect_moments(model, deterministic, [8], 4, sampler, progress=False, first=8)
    merged = merge_moments(a, b)
    for k in full.m:
        np.testing.assert_allclose(merged.m[k], full.m[k], rtol=1e-12, atol=1e-12)
    for k in ("J", "P"):
        np.testing.assert_allclose(merged.joint[k], full.joint[k], rtol=1e-12, atol=1e-12)
    f1, f2 = fit(full), fit(merged)
    np.testing.assert_allclose(f1.maps["content"][0], f2.maps["content"][0], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# a corrected step with the content model reproduces the FP step's mean and variance

N_MC = 400_000


def _mc_stats(t, kind):
    """Content statistics fitted on Monte Carlo data: x_t random, ε = f(x_t) + an independent part, ε̂ with a
    content-dependent error."""
    g = torch.Generator().manual_seed(11)
    x = 0.4 + 0.5 * torch.randn(N_MC // 400, 1, 20, 20, generator=g)
    eps = 0.8 * x + 0.3 * torch.sin(3 * x) + 0.5 * torch.randn(x.shape, generator=g)  # + what x_t does not tell
    q = (1 + K) * eps + M * x + 0.05 + 0.4 * torch.randn(x.shape, generator=g)
    J, P = cm.batch_moments(eps, q, x)
    mom = {k: v[None, None] for k, v in sample_moments(eps, q - eps).items()}
    moments = NoiseMoments([8], [int(t)], 400, 1, mom, {"J": J[None, None], "P": P[None, None]})
    return fit(moments), x, eps, q


@pytest.mark.parametrize("kind,eta,model", [("ddim", 1.0, "content"), ("ddpm", None, "content"), ("ddim", 1.0, "debias"),
                                            ("ddpm", None, "debias")])
def test_fitted_corrected_step_matches_fp_mean_and_variance(kind, eta, model):
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls.from_config(dict(SCHEDULER_CONFIG))
    sched.set_timesteps(50)
    t = sched.timesteps[30]
    stats, x, eps, q = _mc_stats(t, kind)
    kw = {"eta": eta} if kind == "ddim" else {}

    def run(e, corrector, seed):
        g = torch.Generator().manual_seed(seed)
        if corrector is None:
            return sched.step(e, t, x, generator=g, **kw).prev_sample
        return corrector.step(sched, e, t, x, g, eta=eta or 0.0)

    # the step is a·x_t + c·ε + σ·z; a·x_t is the same for all runs and removed so the test sees the ε part
    q_ = ddim_quantities(sched, t, eta) if kind == "ddim" else ddpm_quantities(sched, t)
    if kind == "ddim":
        a = math.sqrt(q_["alpha_bar_prev"] / q_["alpha_bar"])
    else:
        a = q_["coef_x0"] / math.sqrt(q_["alpha_bar"]) + q_["coef_xt"]
    c = Corrector(stats, (model, "vsc"))
    # common random numbers (one noise seed for every run): the MC error of the differences is far below that of each run
    fp, cor, raw, no_vsc = (run(e, corr, 1) - a * x for e, corr in ((eps, None), (q, c), (q, None), (q, Corrector(stats, (model,)))))
    se = math.sqrt(fp.var().item() / N_MC)
    assert abs(cor.mean().item() - fp.mean().item()) < 5 * se
    assert cor.var().item() == pytest.approx(fp.var().item(), rel=0.004)
    if model == "content":  # a conditional mean has too little variance: VSC grows the noise
        assert c.log[-1]["sigma_vsc"] > q_["sigma"]
        assert no_vsc.var().item() < fp.var().item() * (1 - 0.012)
    else:  # the unbiased inversion keeps the quantization noise: VSC shrinks the sampler's
        assert c.log[-1]["sigma_vsc"] < q_["sigma"]
        assert no_vsc.var().item() > fp.var().item() * (1 + 0.012)
    # uncorrected, the quantized step is measurably off: the test can fail
    assert abs(raw.mean().item() - fp.mean().item()) > 20 * se


def test_parse_parts_with_correction_models():
    assert parse_parts("all", "content") == ("content", "vsc")
    assert parse_parts("cnc,bc", "mean") == ("mean",)
    assert parse_parts("content-pixel,vsc") == ("content-pixel", "vsc")
    assert parse_parts("all", "ptqd") == ("cnc", "bc", "vsc")
    assert parse_parts("none", "content") == ()
    with pytest.raises(PtqdError, match="do not combine"):
        parse_parts("cnc,content")
    with pytest.raises(PtqdError, match="disagree"):
        parse_parts("mean", "content")
    with pytest.raises(PtqdError, match="unknown correction model"):
        parse_parts("all", "fancy")


def test_old_statistics_files_load_for_ptqd_only(tmp_path):
    model = _model()
    moments = collect_moments(model, _twin(model), [8], 8, SamplerConfig(steps=3, batch_size=8), seed=1, progress=False)
    old = fit(NoiseMoments(moments.bits, moments.timesteps, moments.elements, moments.channels, moments.m, None))
    old.meta.update(model_fingerprint="m", quant_fingerprint="q", weight_bits=4, scheduler="ddim", steps=3, eta=1.0, guidance=None)
    path = save_stats(old, tmp_path / "noise_stats_ddim3_eta1.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # the file has exactly the arrays files had before
        assert not any(k.startswith(("moments.J", "moments.P", "heldout.")) for k in f.keys())
        assert "ridge" not in json.loads(f.metadata()["ptqd_noise_stats"])
    loaded = load_stats(path)
    assert loaded.models() == ["ptqd"]
    np.testing.assert_array_equal(loaded.k, old.k)
    Corrector(loaded, "all")  # PTQD works
    with pytest.raises(PtqdError, match="hold no moments for the 'content' correction model.*ptqd stats"):
        Corrector(loaded, ("content", "vsc"))
    # a new file round-trips its models and held-out scores
    new = fit(moments, heldout=moments)
    new.meta.update(old.meta)
    back = load_stats(save_stats(new, tmp_path / "new.safetensors"))
    assert back.models() == new.models()
    np.testing.assert_allclose(back.maps["content"][0], new.maps["content"][0])
    np.testing.assert_allclose(back.mse["heldout"]["content"], new.mse["heldout"]["content"])


def test_damaged_joint_moments_are_refused(tmp_path):
    model = _model()
    moments = collect_moments(model, _twin(model), [8], 4, SamplerConfig(steps=2, batch_size=4), seed=1, progress=False)
    stats = fit(moments)
    stats.meta.update(model_fingerprint="m", quant_fingerprint="q", weight_bits=4, scheduler="ddim", steps=2, eta=1.0, guidance=None)
    stats.moments.joint["J"] = stats.moments.joint["J"][..., :-1]
    path = save_stats(stats, tmp_path / "s.safetensors")
    with pytest.raises(PtqdError, match="moments.J.*expected"):
        load_stats(path)


def test_correction_model_end_to_end_cli(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main([
        "quantize", "--model", "digits16-cond", "--weight-bits", "4", "--mixed-precision", "4,8", "--method", "ptqd",
        "--calib-samples", "4", "--calib-steps", "2", "--recon-samples", "16", "--weight-iters", "2", "--act-iters", "1",
        "--steps", "5", "--noise-samples", "8", "--out", str(run), "--no-progress",
    ]) == 0
    out = capsys.readouterr().out
    assert "R² content" in out and "held-out trajectories" in out
    stats = load_stats(run / "noise_stats_ddim5_eta1_g3.safetensors")
    assert stats.meta["heldout_samples"] == 2 and stats.heldout is not None and stats.heldout.num_samples == 2
    images = {}
    for name, extra in {"ptqd": [], "content": ["--correction-model", "content"], "novsc": ["--correction-model", "content", "--correct", "cnc,bc"]}.items():
        npz = tmp_path / f"{name}.npz"
        assert main(["sample", str(run), "--num", "3", "--steps", "5", "--act-bits", "4", "--out", str(npz), "--no-progress", *extra]) == 0, \
            capsys.readouterr().err
        images[name] = np.load(npz)["images"]
        rec = json.loads(npz.with_suffix(".json").read_text())
        want = {"ptqd": ["cnc", "bc", "vsc"], "content": ["content", "vsc"], "novsc": ["content"]}[name]
        assert rec["correction"] == want
    assert not (images["ptqd"] == images["content"]).all() and not (images["content"] == images["novsc"]).all()
    # every correction is guarded by default: λ per block recorded, never worse than none on the guard's trajectories
    g = json.loads((tmp_path / "ptqd.json").read_text())["guard"]
    assert len(g["lambda"]) == 5 and all(0 <= v <= 1 for v in g["lambda"]) and g["mse"][g["chosen"]] <= g["mse"]["none"]
    assert g["seed"] == 2002 and (run / "guard_noise_stats_ddim5_eta1_g3.json").is_file()
    assert main(["sample", str(run), "--num", "3", "--steps", "5", "--act-bits", "4", "--out", str(tmp_path / "paper.npz"),
                 "--no-progress", "--no-guard"]) == 0
    paper = json.loads((tmp_path / "paper.json").read_text())
    assert paper["guard"] is None and paper["corrector"]["vsc"] == "official"
    if g["chosen"] == "none":  # the guard switched PTQD off: the uncorrected sampler exactly
        assert main(["sample", str(run), "--num", "3", "--steps", "5", "--act-bits", "4", "--correct", "none",
                     "--out", str(tmp_path / "none.npz"), "--no-progress"]) == 0
        assert (np.load(tmp_path / "none.npz")["images"] == images["ptqd"]).all()
    # budgeted mixed precision: tolerance 1 keeps every step at A8, a huge one puts every step at A4, 1.5 lies between
    records = {}
    for budget in ("1", "1.5", "1e9"):
        npz = tmp_path / f"budget{budget}.npz"
        assert main(["sample", str(run), "--num", "2", "--steps", "5", "--correction-model", "content", "--fidelity-budget", budget,
                     "--out", str(npz), "--no-progress"]) == 0, capsys.readouterr().err
        records[budget] = json.loads(npz.with_suffix(".json").read_text())
    assert records["1e9"]["bit_schedule"] == "t 800→0: A4" and records["1"]["budget"]["propagation"] == "measured"
    assert records["1"]["budget"]["predicted_relative_mse"] <= 1.0  # A4 only where measured no worse than A8
    cache = json.loads((run / "budget_noise_stats_ddim5_eta1_g3.json").read_text())
    contrib = cache["entries"][0]["contributions"]
    assert set(contrib) == {"4", "8"} and all(len(v) == 5 and min(v) >= 0 for v in contrib.values())
    assert sum(contrib["4"]) > sum(contrib["8"])  # quantizing every step at A4 costs more than at A8
    assert records["1.5"]["budget"]["predicted_relative_mse"] <= 1.5 and records["1.5"]["bit_criterion"] == "fidelity budget 1.5"
    assert records["1e9"]["sampling_bops"] < records["1.5"]["sampling_bops"] <= records["1"]["sampling_bops"]
    # the cached contributions are reused (nothing is measured again), and the free Gaussian prediction is offered
    import ptqd.correction.apply as apply_mod

    monkeypatch.setattr(apply_mod, "step_contributions", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    assert main(["sample", str(run), "--num", "2", "--steps", "5", "--correction-model", "content", "--fidelity-budget", "1.5",
                 "--out", str(tmp_path / "again.npz"), "--no-progress"]) == 0
    assert main(["sample", str(run), "--num", "2", "--steps", "5", "--fidelity-budget", "1.5", "--budget-propagation", "gaussian",
                 "--out", str(tmp_path / "gauss.npz"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "gauss.json").read_text())["budget"]["propagation"] == "gaussian"
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "2", "--steps", "5", "--fidelity-budget", "0.5", "--out", str(tmp_path / "b.npz"),
                 "--no-progress"]) == 2
    assert "fidelity budget is a factor ≥ 1" in capsys.readouterr().err
    # bad statistics options are refused before any trajectory runs, and the statistics file is untouched
    before = (run / "noise_stats_ddim5_eta1_g3.safetensors").read_bytes()
    for opts, msg in ((["--heldout-samples", "1"], "--heldout-samples must be 0"), (["--ridge", "-1"], "--ridge must be")):
        assert main(["stats", str(run), "--steps", "5", "--noise-samples", "8", "--no-progress", *opts]) == 2
        assert msg in capsys.readouterr().err
    assert (run / "noise_stats_ddim5_eta1_g3.safetensors").read_bytes() == before
    # another ridge refits the stored moments without a new collection
    assert main(["stats", str(run), "--steps", "5", "--noise-samples", "8", "--ridge", "0.01", "--no-progress"]) == 0
    refit = load_stats(run / "noise_stats_ddim5_eta1_g3.safetensors")
    assert refit.meta["ridge"] == 0.01 and not np.allclose(refit.maps["content"][0], stats.maps["content"][0])
    np.testing.assert_array_equal(refit.moments.joint["J"], stats.moments.joint["J"])
    # the trajectory-matched model: fitted on lockstep trajectories, kept in the statistics file, sampled like any model
    assert main(["stats", str(run), "--steps", "5", "--noise-samples", "8", "--matched", "--no-progress"]) == 0
    assert "matched" in load_stats(run / "noise_stats_ddim5_eta1_g3.safetensors").maps
    assert main(["sample", str(run), "--num", "2", "--steps", "5", "--act-bits", "4", "--correction-model", "matched",
                 "--out", str(tmp_path / "matched.npz"), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "matched.json").read_text())["correction"] == ["matched", "vsc"]
    # a regression model needs a run: refused for an FP model
    capsys.readouterr()
    assert main(["sample", "--model", "digits16-cond", "--num", "2", "--steps", "3", "--correction-model", "content",
                 "--out", str(tmp_path / "fp.npz"), "--no-progress"]) == 2
    assert "--correction-model" in capsys.readouterr().err


def test_statistics_driven_by_the_quantized_network_follow_its_trajectories():
    from ptqd.sampling import trajectories

    model = _model()
    sampler = SamplerConfig(steps=4, eta=1.0, batch_size=6)

    def twin(bits, x, t, y, g):  # deterministic, bit-dependent
        eps = model.denoise(x, t, y, g)
        return (1.1 if bits == 4 else 1.02) * eps + 0.05 * torch.sin(37 * x)

    fp_driven = collect_moments(model, twin, [4, 8], 6, sampler, seed=3, progress=False)
    q_driven = collect_moments(model, twin, [4, 8], 6, sampler, seed=3, progress=False, drive="quantized")
    c = model.channels
    xs = slice(2 * c, 3 * c)
    for j, b in enumerate((4, 8)):
        seen = []  # x_t of the trajectories the quantized network drives at b, and the FP output there

        def observe(step, seen=seen):
            e = model.denoise(step.x, step.t, step.y, step.guidance)
            seen.append(cm.batch_moments(e, step.eps, step.x)[0])

        trajectories(model, range(6), dataclasses.replace(sampler, seed=3), None,
                     denoise=lambda x, t, y, g, b=b: twin(b, x, t, y, g), callback=observe)
        for s, J in enumerate(seen):
            np.testing.assert_allclose(q_driven.joint["J"][j, s], J, rtol=1e-10, atol=1e-10)
        # after the first step the quantized trajectories have left the FP ones
        assert not np.allclose(q_driven.joint["J"][j, -1][xs, xs], fp_driven.joint["J"][j, -1][xs, xs])
    np.testing.assert_allclose(q_driven.joint["J"][:, 0], fp_driven.joint["J"][:, 0], rtol=1e-10)  # same x_T
    with pytest.raises(PtqdError, match="drive must be"):
        collect_moments(model, twin, [4], 2, sampler, progress=False, drive="teacher")
