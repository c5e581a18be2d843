"""Correction at sampling time: correlated-noise correction (CNC), bias correction (BC) and variance
schedule calibration (VSC), over diffusers' DDPM and DDIM schedulers.

* CNC + BC: ε_corr = (ε̂ − μ_t) / (1 + k_t) (official order: bias first, then the division; the paper
  writes the division first, which differs only in μ's scaling). CNC alone divides, BC alone subtracts.
* VSC: the residual noise left in ε_corr (std σ^q_t/(1+k_t) with CNC, σ^q_t without) enters x_{t−1}
  through the coefficient c_t of ε in the update; the sampler's own noise is shrunk to
  σ'_t² = max(σ_t² − c_t²·σ_res², 0).

  - DDIM (any eta): σ'_t is passed through the scheduler's own ``eta`` argument
    (eta' = σ'_t/√variance_t), so diffusers computes the step, and its direction term uses σ'_t, as
    the official code does. c_t = √(1−ᾱ_{t−1}−σ_t²) − √(ᾱ_{t−1}(1−ᾱ_t)/ᾱ_t) uses the original σ_t
    (official), which slightly over-corrects (by (c_t² − c'_t²)·σ_res², c'_t the coefficient with σ'_t).
    eta = 0: no noise to shrink, VSC is a no-op (reported by :meth:`Corrector.notes`).
  - DDPM: the scheduler takes the step with its own noise draw σ_t·z; the step's mean is recomputed
    from the scheduler's alphas and its x̂_0 (clipped as the scheduler clips it), and the noise is
    rescaled to σ'_t·z. c_t = β_t / (√α_t·√(1−ᾱ_t)) with the step's effective α_t = ᾱ_t/ᾱ_{t−1}.

Fitted correction models (:mod:`ptqd.correction.models`) replace CNC/BC by their map
ε_corr = Wᵀ[ε̂, x_t, 1] (+ pixel bias). ``mean``, ``content``, ``content-pixel`` estimate a conditional
mean, whose error r (mean square s_t², the model's own residual) is uncorrelated with it, so the FP
step's variance is matched by *growing* the sampler noise: σ'_t² = σ_t² + c_t²·s_t². ``debias`` and
``debias-pixel`` are unbiased given ε (ε_corr = ε + noise, as PTQD's), so VSC shrinks it:
σ'_t² = max(σ_t² − c_t²·s_t², 0). DDIM takes σ'_t on the noise only (the direction term keeps σ_t, so
the variance matches exactly), DDPM rescales its noise draw; eta = 0 stays a no-op.

Both keep the random numbers drawn identical to uncorrected sampling, so runs with and without a
correction differ only by the correction: when VSC shrinks a DDIM step's noise to zero (diffusers then
draws nothing), the step's noise is drawn anyway and discarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ptqd.correction.models import CONDITIONAL_MEANS, MAPS, MODELS, apply_map
from ptqd.correction.stats import NoiseStats
from ptqd.errors import PtqdError

PARTS = ("cnc", "bc", "vsc")  # PTQD's
ORDER = ("cnc", "bc") + MAPS + ("vsc",)  # canonical order of every correction part


def parse_parts(text: str | list[str] | tuple | None, model: str | None = None) -> tuple[str, ...]:
    """``none``, ``all`` or a comma-separated subset of cnc, bc, vsc, or one fitted model (mean, content,
    content-pixel, debias, debias-pixel) with or without vsc → a tuple in canonical order.

    ``model`` (the correction model, default ``ptqd``): a fitted model replaces CNC/BC, so
    ``all`` becomes (model, vsc), and any of cnc/bc (or vsc alone) becomes the model (with vsc if given)."""
    if model is not None and model not in MODELS:
        raise PtqdError(f"unknown correction model {model!r}: use one of {', '.join(MODELS)}")
    if text is None:
        return ()
    items = list(text) if isinstance(text, (list, tuple)) else [s.strip().lower() for s in text.split(",") if s.strip()]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        items = list(PARTS)
    bad = [p for p in items if p not in ORDER]
    if bad:
        raise PtqdError(
            f"unknown correction {', '.join(bad)}: use none, all, a comma-separated subset of {', '.join(PARTS)}, "
            f"or one of {', '.join(MAPS)} (optionally with vsc)"
        )
    maps = [p for p in items if p in MAPS]
    if len(maps) > 1 or (maps and any(p in items for p in ("cnc", "bc"))):
        raise PtqdError(f"corrections {', '.join(items)} do not combine: use one of cnc/bc, {', '.join(MAPS)} (each optionally with vsc)")
    if model is not None and model != "ptqd":
        if maps and maps[0] != model:
            raise PtqdError(f"correction {maps[0]} and correction model {model} disagree: give one of them")
        items = [model] + (["vsc"] if "vsc" in items else [])
    return tuple(p for p in ORDER if p in items)


def correction_model(parts: tuple[str, ...]) -> str:
    """The correction model a parts tuple uses: ``ptqd`` or the fitted model's name."""
    return next((p for p in parts if p in MAPS), "ptqd")


def ddim_quantities(scheduler, t: int, eta: float) -> dict[str, float]:
    """ᾱ_t, ᾱ_{t−1}, the DDIM variance at t, σ_t and the ε coefficient c_t of the DDIM update."""
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * math.sqrt(max(variance, 0.0))
    c = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) - math.sqrt(a_prev * (1 - a_t) / a_t)
    return {"alpha_bar": a_t, "alpha_bar_prev": a_prev, "variance": variance, "sigma": sigma, "c": c}


def ddpm_quantities(scheduler, t: int) -> dict[str, float]:
    """ᾱ_t, ᾱ_{t−1}, effective β_t, σ_t of the scheduler's variance type, c_t and the x̂_0/x_t mean coefficients."""
    t = int(t)
    prev = int(scheduler.previous_timestep(t))
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.one)
    alpha = a_t / a_prev
    beta = 1 - alpha
    kind = scheduler.config.variance_type
    if t <= 0:
        var = 0.0  # diffusers adds no noise at the last step
    elif kind in ("fixed_small", "fixed_small_log"):
        var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    elif kind == "fixed_large":
        var = beta
    else:
        raise PtqdError(f"variance schedule calibration supports DDPM variance_type fixed_small/fixed_large, not {kind!r}")
    return {
        "alpha_bar": a_t,
        "alpha_bar_prev": a_prev,
        "beta": beta,
        "variance": var,
        "sigma": math.sqrt(var),
        "c": beta / (math.sqrt(alpha) * math.sqrt(1 - a_t)),
        "coef_x0": math.sqrt(a_prev) * beta / (1 - a_t),
        "coef_xt": math.sqrt(alpha) * (1 - a_prev) / (1 - a_t),
    }


@dataclass
class Corrector:
    """Applies the chosen parts with the statistics of the activation bit-width used at each step.

    ``bits_at``: timestep → activation bit-width (mixed precision); default the single bit-width of
    ``act_bits``. ``blend``: timestep → λ ∈ [0, 1], the final-sample guard's share of the correction
    (:mod:`ptqd.correction.guard`): ε̂ + λ(ε_corr − ε̂), VSC's change of the sampler noise variance
    times λ; λ = 0 takes the uncorrected step exactly. None (default): the correction in full.
    """

    stats: NoiseStats
    parts: tuple[str, ...] | str = PARTS  # or "all", "none", "cnc,bc", …
    act_bits: int | None = None
    bits_at: dict[int, int] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    blend: dict[int, float] | None = None
    vsc_mode: str = "official"  # PTQD's DDIM VSC: "official" (the paper's code) or "consistent" (see vsc_sigma_consistent)

    def __post_init__(self):
        self.parts = parse_parts(self.parts if isinstance(self.parts, str) else list(self.parts))
        if self.bits_at is None:
            bits = self.act_bits if self.act_bits is not None else self.stats.bits[0]
            self.stats.bit(bits)
            self.bits_at = {t: bits for t in self.stats.timesteps}
        for b in set(self.bits_at.values()):
            self.stats.bit(b)
        self.model = correction_model(self.parts)
        self.stats.need_model(self.model)
        self._cache: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _params(self, t: int) -> dict[str, Any]:
        return self.stats.step(self.bits_at[int(t)], int(t))

    def weight(self, t) -> float:
        """λ of step t: the share of the correction the guard keeps (1 without a guard)."""
        return 1.0 if self.blend is None else float(self.blend.get(int(t), 1.0))

    def correct_eps(self, eps: torch.Tensor, t, x: torch.Tensor | None = None) -> torch.Tensor:
        """CNC and/or BC, or the regression model's map (which needs the sampler state ``x``), on the
        (guided) quantized noise prediction; blended with it by the guard's λ."""
        lam = self.weight(t)
        if lam == 0.0:
            return eps
        out = self._correct(eps, t, x)
        return out if lam == 1.0 else eps + lam * (out - eps)

    def _correct(self, eps: torch.Tensor, t, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.model != "ptqd":
            if x is None:
                raise PtqdError(f"the {self.model} correction model needs the sampler state x_t")
            key = (int(t), str(eps.device), eps.dtype)
            if key not in self._cache:
                W, bias = self.stats.map_step(self.model, self.bits_at[int(t)], int(t))
                as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=eps.dtype, device=eps.device)  # noqa: E731
                self._cache[key] = (as_t(W), as_t(bias))
            W, bias = self._cache[key]
            if bias is not None and bias.shape[-1] != eps.shape[-1] * eps.shape[-2]:
                raise PtqdError(f"the {self.model} statistics were collected for another image size than {tuple(eps.shape[-2:])}")
            return apply_map(eps, x, W, bias)
        p = self._params(int(t))
        if "bc" in self.parts:
            mu = torch.as_tensor(p["mu"], dtype=eps.dtype, device=eps.device).view(1, -1, 1, 1)
            eps = eps - mu
        if "cnc" in self.parts:
            eps = eps / (1.0 + p["k"])
        return eps

    def residual_std(self, t) -> float:
        """Std of the error left in the corrected ε at step t (what VSC accounts for)."""
        if self.model != "ptqd":
            return math.sqrt(self.stats.residual_var(self.model, self.bits_at[int(t)], int(t)))
        p = self._params(int(t))
        return p["sigma"] / (1.0 + p["k"]) if "cnc" in self.parts else p["sigma"]

    def step(self, scheduler, eps: torch.Tensor, t, x: torch.Tensor, generators, eta: float = 0.0) -> torch.Tensor:
        """One sampler step with the corrected ε and, with VSC, the shrunk sampler noise."""
        if scheduler.config.prediction_type != "epsilon":
            raise PtqdError(
                f"PTQD corrects noise (epsilon) predictions; this scheduler is set to {scheduler.config.prediction_type!r}"
            )
        kind = type(scheduler).__name__
        if self.weight(t) == 0.0 and (kind.startswith("DDIM") or kind.startswith("DDPM")):  # the uncorrected step, exactly
            kw = {"eta": eta} if kind.startswith("DDIM") else {}
            return scheduler.step(eps, t, x, generator=generators, **kw).prev_sample
        eps = self.correct_eps(eps, t, x)
        if kind.startswith("DDIM"):
            if "vsc" not in self.parts or eta == 0:
                return scheduler.step(eps, t, x, eta=eta, generator=generators).prev_sample
            q = ddim_quantities(scheduler, t, eta)
            if self.model != "ptqd":  # change the noise only: the direction term keeps σ_t (see module docstring)
                from diffusers.utils.torch_utils import randn_tensor

                new_sigma = self._vsc_sigma(q, t)
                noise = randn_tensor(eps.shape, generator=generators, device=eps.device, dtype=eps.dtype)
                scale = new_sigma / q["sigma"] if q["sigma"] > 0 else 0.0
                return scheduler.step(eps, t, x, eta=eta, variance_noise=noise * scale).prev_sample

            new_sigma = self._vsc_sigma(q, t) if self.vsc_mode == "official" else self.vsc_sigma_consistent(q, t)
            new_eta = new_sigma / math.sqrt(q["variance"]) if q["variance"] > 0 else 0.0
            out = scheduler.step(eps, t, x, eta=new_eta, generator=generators).prev_sample
            if new_eta <= 0:  # diffusers draws no noise at eta 0: draw (and discard) it to keep the generators in step
                from diffusers.utils.torch_utils import randn_tensor

                randn_tensor(eps.shape, generator=generators, device=eps.device, dtype=eps.dtype)
            return out
        if kind.startswith("DDPM"):
            out = scheduler.step(eps, t, x, generator=generators)
            if "vsc" not in self.parts:
                return out.prev_sample
            q = ddpm_quantities(scheduler, t)
            if q["sigma"] == 0:
                return out.prev_sample
            new_sigma = self._vsc_sigma(q, t)
            mean = q["coef_x0"] * out.pred_original_sample + q["coef_xt"] * x
            return mean + (new_sigma / q["sigma"]) * (out.prev_sample - mean)
        raise PtqdError(f"PTQD correction supports DDIM and DDPM schedulers, not {kind}")

    def _vsc_variance(self, q: dict[str, float], t) -> float:
        """σ'_t²: grown by c_t²·res² for the conditional-mean models, shrunk by it for PTQD and debias."""
        res = self.residual_std(t)
        sign = 1.0 if self.model in CONDITIONAL_MEANS else -1.0
        return q["sigma"] ** 2 + sign * self.weight(t) * q["c"] ** 2 * res**2

    def vsc_sigma_consistent(self, q: dict[str, float], t) -> float:
        """PTQD's DDIM VSC with its bookkeeping made consistent: σ′ enters the update as a new eta, which also
        shrinks the ε coefficient to c′(σ′) = √(1 − ᾱ_{t−1} − σ′²) − √(ᾱ_{t−1}(1 − ᾱ_t)/ᾱ_t), so σ′ is solved
        from σ′² + c′(σ′)²·λ·s² = σ_t² (s the residual std, λ the guard's weight) instead of using c_t of
        the original σ_t (official). The left side grows with σ′ on [0, σ_t]; σ′ = 0 only where even
        c′(0)²·λ·s² ≥ σ_t² (the residual alone carries more than the step's noise)."""
        res2 = self.weight(t) * self.residual_std(t) ** 2
        ap, a, sigma = q["alpha_bar_prev"], q["alpha_bar"], q["sigma"]
        b = math.sqrt(ap * (1 - a) / a)

        def excess(s):
            return s * s + (math.sqrt(max(1 - ap - s * s, 0.0)) - b) ** 2 * res2 - sigma**2

        if excess(0.0) >= 0:
            new = 0.0
        else:
            lo, hi = 0.0, sigma
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
            new = 0.5 * (lo + hi)
        c_new = math.sqrt(max(1 - ap - new * new, 0.0)) - b
        self.log.append({"t": int(t), "sigma": sigma, "sigma_vsc": new, "c": q["c"], "c_vsc": c_new, "residual_std": math.sqrt(res2)})
        return new

    def _vsc_sigma(self, q: dict[str, float], t) -> float:
        res = self.residual_std(t)
        var = self._vsc_variance(q, t)
        new = math.sqrt(var) if var > 0 else 0.0
        self.log.append({"t": int(t), "sigma": q["sigma"], "sigma_vsc": new, "c": q["c"], "residual_std": res})
        return new

    def notes(self, scheduler: str, eta: float, sched=None) -> list[str]:
        """What the run summary should say about parts that cannot act (fully) with this sampler.

        ``sched``: the diffusers scheduler the run samples with (set to its steps); with it the
        notes also count the steps VSC acts on and flag scheduler settings PTQD does not assume."""
        notes = []
        used = sorted(set(self.bits_at.values()))
        if "cnc" in self.parts:
            ks = [self.stats.k[self.stats.bit(b)] for b in used]
            if all(float(abs(k).max()) == 0.0 for k in ks):
                clamped = " (every fitted slope was negative and clamped to 0; `ptqd stats --keep-negative-k` keeps them)" \
                    if self.stats.meta.get("clamp_k", True) else ""
                notes.append(f"cnc is a no-op: k_t is 0 at every step{clamped}; bc/vsc still apply")
        if "vsc" in self.parts and scheduler == "ddim" and eta == 0:
            notes.append("vsc is a no-op: deterministic DDIM (eta=0) has no sampler noise to shrink; cnc/bc still apply")
        elif "vsc" in self.parts and sched is not None:
            acting = zeroed = 0
            steps = [int(t) for t in sched.timesteps]
            for t in steps:
                try:
                    q = ddim_quantities(sched, t, eta) if scheduler == "ddim" else ddpm_quantities(sched, t)
                except PtqdError:
                    break
                change = q["c"] ** 2 * self.residual_std(t) ** 2
                if q["sigma"] > 0 and change > 0:
                    acting += 1
                    if scheduler == "ddim" and self.model == "ptqd" and self.vsc_mode == "consistent":
                        zeroed += self.vsc_sigma_consistent(q, t) <= 0
                        self.log.pop()
                    else:
                        zeroed += self._vsc_variance(q, t) <= 0
            if acting < len(steps):
                notes.append(f"vsc acts on {acting} of {len(steps)} steps (on the others the sampler adds no noise or the residual is 0)")
            if zeroed:
                notes.append(f"vsc shrinks the sampler noise to 0 on {zeroed} of {len(steps)} steps (the quantization residual is larger)")
        if sched is not None and self.parts:
            cfg = sched.config
            for key in ("clip_sample", "thresholding"):
                if cfg.get(key):
                    notes.append(
                        f"the model's scheduler has {key}: true; PTQD's corrections assume the unclipped update "
                        f"(x̂_0 is {'clipped' if key == 'clip_sample' else 'thresholded'} after correction, so cnc/bc/vsc act only approximately)"
                    )
        return notes

    def describe(self) -> dict[str, Any]:
        return {
            "parts": list(self.parts),
            "model": self.model,
            **({"vsc": self.vsc_mode} if "vsc" in self.parts and self.model == "ptqd" else {}),
            "statistics": str(self.stats.path) if self.stats.path else None,
            "bit_schedule": {str(t): b for t, b in self.bits_at.items()} if len(set(self.bits_at.values())) > 1 else None,
        }
