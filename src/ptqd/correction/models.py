"""Correction models fitted in closed form from streamed second moments.

At every sampler step the statistics pass sees, per pixel of every sample, the FP prediction ε
(C channels), the quantized prediction ε̂ (C), and the sampler state x_t (C). It keeps only

* ``J`` = Σ v vᵀ over all pixels of all samples, with v = [ε, ε̂, x_t, 1] (a (3C+1)² matrix; its last
  entry counts the pixels), and
* ``P`` = Σ over samples of v at each pixel (3C × H·W, the first moments per pixel),

so every model below is a pure function of (J, P), moments of two collections add, and a model
fitted on one collection can be scored on another (held-out trajectories) without any ε kept.

A correction model maps what the sampler sees to an estimate of the FP prediction:
ε_corr = Wᵀ [ε̂, x_t, 1] (+ b(pixel)), with W of shape (2C+1, C):

* ``ptqd``: the paper's CNC/BC, ε_corr = (ε̂ − μ)/(1 + k) (CNC alone: ε̂/(1+k); BC alone: ε̂ − μ).
* ``mean``: the conditional mean of ε given ε̂, per channel: ε_c ≈ a_c·ε̂_c + b_c (D2-DPM's idea, the
  estimate a corrector that sees ε̂ needs).
* ``content``: ε regressed on [ε̂ (all channels), x_t (all channels), 1]: a 1×1 channel-mixing
  affine map per step (2C²+C numbers), ridge-regularised.
* ``content-pixel``: ``content`` plus a per-pixel bias map per step (fitted jointly: the slopes come
  from moments centred per pixel, the map is the per-pixel mean of what the slopes leave).
* ``debias``: the error model the other way round, ε̂ ≈ A ε + M x_t + μ (+ noise), fitted the same way and
  inverted: ε_corr = A⁻¹(ε̂ − M x_t − μ). This is PTQD's CNC+BC generalised to a channel-mixing A and a
  content term M x_t: unbiased given the FP prediction (E[ε_corr | ε, x_t] = ε), where the conditional
  means above shrink towards the average ε (they minimise each step's error, but the part of it they
  leave, (1 − a)·ε, follows the signal and adds up over the steps of a trajectory).
  Where ε and x_t are nearly collinear (the noisiest steps, x_t ≈ ε) A and M cannot be told apart and
  the inversion would amplify the fit's arbitrary split, so there M is left out (PTQD's model with a
  channel-mixing A).
* ``debias-pixel``: ``debias`` with a per-pixel bias map in the error model.
  Where the fitted A's smallest singular value is below ``MIN_GAIN`` (the quantized output barely
  follows ε) A is taken as I and M, μ (b) are refitted for it: ε_corr = ε̂ − M x_t − μ.
* ``posterior``: the horizon-deflated posterior mean between the two, ε_corr = ε_lin(x) +
  K_τ(ε̂ − Aε_lin(x) − Mx − μ), K_τ = ΣAᵀ(AΣAᵀ + S/τ)⁻¹ (:func:`posterior_map`): τ = 1 is ``content``'s
  Gaussian posterior mean, τ → ∞ is ``debias``. τ is a fit option of the statistics (``tau``).

The ridge penalty is ``ridge`` times the mean variance of the non-constant features, on those
features only (the intercept is not shrunk). ``ridge=0`` is ordinary least squares.

Residual variance: ``ptqd``'s and ``debias``' estimate ε_corr = ε + noise (the quantization noise left after
the inversion) makes VSC *shrink* the sampler's noise; the regression models estimate E[ε | features],
whose error r = ε − ε_corr is uncorrelated with ε_corr, so matching the FP step's variance needs the
sampler noise *grown* by c_t²·E[r²] (see :mod:`ptqd.correction.corrector`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ptqd.errors import PtqdError

MODELS = ("ptqd", "mean", "content", "content-pixel", "debias", "debias-pixel", "posterior", "matched")
MAPS = ("mean", "content", "content-pixel", "debias", "debias-pixel", "posterior", "matched")  # the fitted maps (ptqd is CNC/BC)
TRAJECTORY_MAPS = ("matched",)  # fitted on lockstep trajectories (ptqd.correction.matched), not from the moments
CONDITIONAL_MEANS = ("mean", "content", "content-pixel", "matched")  # E[ε | features]: VSC grows the noise
UNBIASED = ("debias", "debias-pixel")
PIXEL = ("content-pixel", "debias-pixel")  # models with a per-pixel bias map  # E[ε_corr | ε] = ε, as PTQD's CNC: VSC shrinks the noise


def batch_moments(eps: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """J (3C+1, 3C+1) and P (3C, H·W) of one batch; ``eps``, ``q``, ``x`` all (B, C, H, W)."""
    if not (eps.shape == q.shape == x.shape):
        raise PtqdError(f"moments need equal shapes for ε, ε̂ and x_t, got {tuple(eps.shape)}, {tuple(q.shape)}, {tuple(x.shape)}")
    v = torch.cat([eps.detach(), q.detach(), x.detach()], 1).double()  # (B, 3C, H, W)
    b, d = v.shape[:2]
    rows = v.permute(0, 2, 3, 1).reshape(-1, d)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
    J = (rows.T @ rows).cpu().numpy()
    P = v.sum(0).reshape(d, -1).cpu().numpy()
    return J, P


def _idx(c: int) -> dict[str, np.ndarray]:
    return {"e": np.arange(c), "q": np.arange(c, 2 * c), "x": np.arange(2 * c, 3 * c), "one": np.array([3 * c])}


def _solve(G: np.ndarray, H: np.ndarray, ridge: float, const: int | None) -> np.ndarray:
    """(G + λD)⁻¹ H, D the identity on the non-constant features, λ = ridge × their mean variance."""
    G = G.copy()
    if ridge > 0:
        keep = [i for i in range(len(G)) if i != const]
        if keep:
            scale = float(np.mean(np.diag(G)[keep]))
            G[keep, keep] += ridge * max(scale, 1e-30)
    try:
        return np.linalg.solve(G, H)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(G, H, rcond=None)[0]


def fit_map(J: np.ndarray, P: np.ndarray, n_samples: int, channels: int, model: str, ridge: float = 0.0, tau: float = math.inf):
    """W (2C+1, C) over z = [ε̂, x_t, 1], and the pixel bias map (C, H·W) or None, of one step."""
    c = channels
    ix = _idx(c)
    W = np.zeros((2 * c + 1, c))
    if model == "mean":
        for ch in range(c):
            f = [int(ix["q"][ch]), int(ix["one"][0])]
            sol = _solve(J[np.ix_(f, f)], J[f, ch][:, None], ridge, const=1)
            W[ch, ch], W[2 * c, ch] = sol[0, 0], sol[1, 0]
        return W, None
    feats = np.concatenate([ix["q"], ix["x"]])
    if model == "content":
        f = np.concatenate([feats, ix["one"]])
        W[:] = _solve(J[np.ix_(f, f)], J[np.ix_(f, ix["e"])], ridge, const=len(f) - 1)
        return W, None
    if model == "content-pixel":
        n = float(n_samples)
        Pf, Pe = P[feats], P[ix["e"]]  # (2C, HW), (C, HW)
        G = J[np.ix_(feats, feats)] - Pf @ Pf.T / n  # centred per pixel: the bias map absorbs the means
        H = J[np.ix_(feats, ix["e"])] - Pf @ Pe.T / n
        A = _solve(G, H, ridge, const=None)
        W[: 2 * c] = A
        bias = (Pe - A.T @ Pf) / n  # (C, HW)
        return W, bias
    if model in UNBIASED:
        return _debias_map(J, P, n_samples, c, ridge, pixel=model == "debias-pixel")
    if model == "posterior":
        return posterior_map(J, P, n_samples, c, ridge, tau)
    raise PtqdError(f"unknown correction model {model!r}: use one of {', '.join(MODELS)}")


def _sel(dim: int, idx) -> np.ndarray:
    """The (dim, len(idx)) matrix that picks entries ``idx`` of v = [ε, ε̂, x_t, 1]."""
    return np.eye(dim)[:, np.asarray(idx, dtype=np.int64)]


def _regress(J, P, n_samples, Lf, Lt, ridge, pixel):
    """Least squares of the targets Lᵀ_t v on the features Lᵀ_f v (rows of v = [ε, ε̂, x_t, 1]), from moments.

    ``pixel``: the features carry no constant and a per-pixel intercept is fitted (moments centred per
    pixel); otherwise the last feature column must be the constant. Returns B (features × targets),
    the pixel intercept (targets × H·W) or None, and the residual covariance S (targets × targets, per
    element)."""
    N = max(float(J[-1, -1]), 1.0)
    k = Lf.shape[1]
    if pixel:
        n = float(n_samples)
        Pf, Pt = Lf[:-1].T @ P, Lt[:-1].T @ P
        G = Lf.T @ J @ Lf - Pf @ Pf.T / n
        H = Lf.T @ J @ Lt - Pf @ Pt.T / n
        B = _solve(G, H, ridge, const=None) if k else np.zeros((0, Lt.shape[1]))
        bias = (Pt - B.T @ Pf) / n
        Gtt = Lt.T @ J @ Lt - Pt @ Pt.T / n
        S = (Gtt - B.T @ H - H.T @ B + B.T @ G @ B) / N
        return B, bias, S
    B = _solve(Lf.T @ J @ Lf, Lf.T @ J @ Lt, ridge, const=k - 1)
    R = Lt - Lf @ B
    return B, None, R.T @ J @ R / N


def error_model(J: np.ndarray, P: np.ndarray, n_samples: int, c: int, ridge: float = 0.0, pixel: bool = False) -> dict:
    """The fitted error model ε̂ ≈ A ε + M x_t + μ (or + b(pixel)) + noise of covariance S, with the guards
    ``debias`` needs: where ε and x_t are collinear M is left out; where A's smallest singular value is below
    :data:`MIN_GAIN` (the quantized output barely follows ε) A is taken as I and M, μ (or b) are refitted
    with that A, as the regression of ε̂ − ε on [x_t, 1]."""
    ix = _idx(c)
    d = 3 * c + 1
    ex = ix["e"] if _collinear(J, ix) else np.concatenate([ix["e"], ix["x"]])
    Lf = _sel(d, ex if pixel else np.concatenate([ex, ix["one"]]))
    B, bias_q, S = _regress(J, P, n_samples, Lf, _sel(d, ix["q"]), ridge, pixel)
    A = B[:c].T
    M = B[c : 2 * c].T if len(ex) == 2 * c else np.zeros((c, c))
    mu = np.zeros(c) if pixel else B[len(ex)]
    fallback = not np.all(np.isfinite(A)) or np.linalg.svd(A, compute_uv=False).min() < MIN_GAIN
    if fallback:  # do not amplify the noise: A = I, and M, μ fitted for that A (what is left of ε̂ − ε)
        A = np.eye(c)
        Lf = _sel(d, ix["x"] if pixel else np.concatenate([ix["x"], ix["one"]]))
        B, bias_q, S = _regress(J, P, n_samples, Lf, _sel(d, ix["q"]) - _sel(d, ix["e"]), ridge, pixel)
        M = B[:c].T
        mu = np.zeros(c) if pixel else B[c]
    return {"A": A, "M": M, "mu": mu, "bias": bias_q, "S": S, "fallback": bool(fallback), "uses_x": bool(fallback or len(ex) == 2 * c)}


def _debias_map(J, P, n_samples, c, ridge, pixel: bool):
    """Fit ε̂ ≈ A ε + M x_t + μ (or + b(pixel)) and invert it into W over [ε̂, x_t, 1] (+ pixel bias)."""
    em = error_model(J, P, n_samples, c, ridge, pixel)
    A, M, mu, bias_q = em["A"], em["M"], em["mu"], em["bias"]
    Ainv = np.linalg.inv(A)
    W = np.zeros((2 * c + 1, c))
    W[:c] = Ainv.T
    W[c : 2 * c] = -M.T @ Ainv.T
    W[2 * c] = -mu @ Ainv.T
    return W, (None if bias_q is None else -Ainv @ bias_q)


def posterior_map(J: np.ndarray, P: np.ndarray, n_samples: int, c: int, ridge: float = 0.0, tau: float = math.inf):
    """The horizon-deflated posterior mean as W over [ε̂, x_t, 1]:

    ε_corr = ε_lin(x) + K_τ (ε̂ − A ε_lin(x) − M x − μ),  K_τ = Σ Aᵀ (A Σ Aᵀ + S/τ)⁻¹,

    with ε_lin(x) = Π x + π the regression of ε on [x_t, 1] (the prior mean) and Σ its residual
    covariance, A, M, μ, S the error model (:func:`error_model`, with debias' guards). τ = 1 is the
    Gaussian posterior mean (``content`` without ridge, where M is fitted); τ → ∞ (``math.inf``) gives
    K = A⁻¹, ``debias``. In between, the noise is weighted as if averaged over τ steps: the leftover of
    a shrinking estimate keeps its sign from step to step, so the final sample wants less shrinkage
    than one step does."""
    if not (tau >= 1):
        raise PtqdError(f"the posterior model's horizon τ must be ≥ 1 (1: content, inf: debias), got {tau!r}")
    ix = _idx(c)
    d = 3 * c + 1
    Pi_, _, Sigma = _regress(J, P, n_samples, _sel(d, np.concatenate([ix["x"], ix["one"]])), _sel(d, ix["e"]), ridge, False)
    Px, p0 = Pi_[:c].T, Pi_[c]
    em = error_model(J, P, n_samples, c, ridge, False)
    A, M, mu, S = em["A"], em["M"], em["mu"], em["S"]
    if math.isinf(tau):
        K = np.linalg.inv(A)
    else:
        K = Sigma @ A.T @ np.linalg.pinv(A @ Sigma @ A.T + S / tau)
    I_KA = np.eye(c) - K @ A
    W = np.zeros((2 * c + 1, c))
    W[:c] = K.T
    W[c : 2 * c] = (I_KA @ Px - K @ M).T
    W[2 * c] = I_KA @ p0 - K @ mu
    return W, None


MIN_GAIN = 0.05  # smallest singular value of the fitted A that debias inverts; below it A is taken as I
COLLINEAR = 0.02  # smallest eigenvalue of the correlation matrix of [ε, x_t] below which debias drops x_t


def _collinear(J: np.ndarray, ix: dict[str, np.ndarray]) -> bool:
    """Whether ε and x_t are (nearly) linearly dependent at this step, from their second moments."""
    f = np.concatenate([ix["e"], ix["x"]])
    n = J[-1, -1]
    mean = J[f, -1] / n
    cov = J[np.ix_(f, f)] / n - np.outer(mean, mean)
    d = np.sqrt(np.maximum(np.diag(cov), 1e-30))
    return float(np.linalg.eigvalsh(cov / np.outer(d, d)).min()) < COLLINEAR


def ptqd_map(k: float, mu: np.ndarray, parts, channels: int) -> np.ndarray:
    """PTQD's CNC/BC as W over [ε̂, x_t, 1] (for scoring it like the other models)."""
    c = channels
    W = np.zeros((2 * c + 1, c))
    scale = 1.0 / (1.0 + k) if "cnc" in parts else 1.0
    W[:c] = np.eye(c) * scale
    if "bc" in parts:
        W[2 * c] = -np.asarray(mu, dtype=np.float64) * scale
    return W


def residual_mse(J: np.ndarray, P: np.ndarray, n_samples: int, channels: int, W: np.ndarray, bias: np.ndarray | None) -> float:
    """Mean over elements of (ε − ε_corr)² on the collection (J, P): the map's error, from moments only."""
    c = channels
    L = np.zeros((3 * c + 1, c))  # r = Lᵀ v − bias(p)
    L[:c] = np.eye(c)
    L[c:] = -W  # [ε̂, x, 1] rows follow ε's in v
    sse = float(np.trace(L.T @ J @ L))
    if bias is not None:
        Pv = np.vstack([P, np.full((1, P.shape[1]), float(n_samples))])  # with the constant
        sse += -2.0 * float(np.sum(bias * (L.T @ Pv))) + n_samples * float(np.sum(bias**2))
    n = J[-1, -1] * c
    return max(sse, 0.0) / max(n, 1.0)


def error_mse(J: np.ndarray, channels: int) -> float:
    """Mean over elements of (ε̂ − ε)²: the uncorrected quantization error."""
    c = channels
    W = np.zeros((2 * c + 1, c))
    W[:c] = np.eye(c)
    return residual_mse(J, np.zeros((3 * c, 1)), 0, c, W, None)


def forward_fit(J: np.ndarray, channels: int, ridge: float = 0.0) -> dict[str, np.ndarray | float]:
    """The error model ε̂ ≈ A ε + M x_t + μ (+ noise of std σ), from the same moments: what the
    quantized network does to the FP prediction, per step. A = (1+k)·I when the error is PTQD's."""
    c = channels
    ix = _idx(c)
    f = np.concatenate([ix["e"], ix["x"], ix["one"]])
    B = _solve(J[np.ix_(f, f)], J[np.ix_(f, ix["q"])], ridge, const=len(f) - 1)  # (2C+1, C)
    L = np.zeros((3 * c + 1, c))
    L[ix["q"]] = np.eye(c)
    L[f] -= B
    var = max(float(np.trace(L.T @ J @ L)), 0.0) / max(J[-1, -1] * c, 1.0)
    return {"A": B[:c].T, "M": B[c : 2 * c].T, "mu": B[2 * c], "sigma": float(np.sqrt(var))}


def apply_map(eps: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """ε_corr = Wᵀ [ε̂, x_t, 1] (+ bias map): a 1×1 channel mix per step."""
    c = eps.shape[1]
    out = torch.einsum("bchw,cd->bdhw", eps, W[:c]) + torch.einsum("bchw,cd->bdhw", x, W[c : 2 * c])
    out = out + W[2 * c].view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, c, *eps.shape[2:])
    return out
