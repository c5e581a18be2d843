"""Uniform affine fake quantization with straight-through rounding, and scale/zero-point search.

Conventions (tested against hand-computed values):

* asymmetric, b bits: integers 0 .. 2^b-1, ``scale = (max - min) / (2^b - 1)``,
  ``zero_point = round(-min / scale)``; min is taken ≤ 0 and max ≥ 0 so that 0 is exact.
* symmetric, b bits: integers -2^(b-1) .. 2^(b-1)-1, ``scale = max|x| / (2^(b-1) - 1)``, zero point 0.
* ``q(x) = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``; the rounding passes gradients
  straight through, so the scale can be learned (LSQ-style) and AdaRound can replace the rounding.
* 16 bits or more means pass-through (no quantization).

Scale search: ``minmax``; ``mse`` (shrink the range by 1%, 2%, … 79% and keep the one with the
lowest Lp error, p = 2.4, as the Q-Diffusion/BRECQ code does); ``percentile`` (clip at the
``percentile`` / ``100 - percentile`` quantiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptqd.errors import PtqdError

SCALE_METHODS = ("minmax", "mse", "percentile")
PASS_BITS = 16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with the identity gradient."""
    return (x.round() - x).detach() + x


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit quantizer."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int, what: str = "bit-width") -> int:
    if not isinstance(bits, int) or not (2 <= bits <= 8 or bits == PASS_BITS):
        raise PtqdError(f"{what} must be an integer from 2 to 8, or {PASS_BITS} for no quantization; got {bits!r}")
    return bits


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` (scale and zero_point broadcast against x)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / qmax, min=1e-8)
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zp = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zp


def _reduce(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _shape_for(params: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return params
    shape = [1] * x.ndim
    shape[axis] = -1
    return params.reshape(shape)


def _lp_error(x: torch.Tensor, xq: torch.Tensor, axis: int | None, p: float) -> torch.Tensor:
    err = (x - xq).abs().pow(p)
    if axis is None:
        return err.mean()
    return err.transpose(0, axis).reshape(x.shape[axis], -1).mean(dim=1)


@torch.no_grad()
def search_qparams(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    axis: int | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    p: float = 2.4,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``x`` (per tensor, or per slice along ``axis``).

    ``lo``/``hi`` override the observed range (used when ``x`` is a subsample of a larger tensor).
    """
    if method not in SCALE_METHODS:
        raise PtqdError(f"unknown scale method {method!r}: use one of {', '.join(SCALE_METHODS)}")
    x = x.detach().float()
    if lo is None or hi is None:
        lo, hi = _reduce(x, axis)
    if method == "minmax":
        return _params_from_range(lo, hi, bits, symmetric)
    if method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise PtqdError(f"percentile must lie in (50, 100], got {percentile}")
        flat = x.reshape(1, -1) if axis is None else x.transpose(0, axis).reshape(x.shape[axis], -1)
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=flat.device)
        if flat.shape[1] > 2**24:  # torch.quantile's limit: use an even subsample
            flat = flat[:, :: flat.shape[1] // 2**23 + 1]
        qs = torch.quantile(flat, q, dim=1)
        plo, phi = qs[0], qs[1]
        if axis is None:
            plo, phi = plo[0], phi[0]
        return _params_from_range(plo, phi, bits, symmetric)
    # mse: grid search over clipping ratios
    qmin, qmax = qrange(bits, symmetric)
    best_err = None
    best = None
    for i in range(80):
        r = 1.0 - 0.01 * i
        scale, zp = _params_from_range(lo * r, hi * r, bits, symmetric)
        xq = fake_quant(x, _shape_for(scale, x, axis), _shape_for(zp, x, axis), qmin, qmax)
        err = _lp_error(x, xq, axis, p)
        if best is None:
            best_err, best = err, (scale, zp)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
    return best


@dataclass
class QuantSpec:
    """How one tensor is quantized."""

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    method: str = "minmax"
    percentile: float = 99.99


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor (per output channel = axis 0, or per tensor).

    Rounding is ``nearest`` by default; AdaRound (``ptqd.calibration``) sets ``alpha`` while it
    learns (soft rounding) and finally a fixed ``round_up`` mask (hard rounding).
    """

    GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch

    def __init__(self, spec: QuantSpec):
        super().__init__()
        check_bits(spec.bits, "weight bit-width")
        self.spec = spec
        self.enabled = True
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.round_up: torch.Tensor | None = None  # AdaRound's hard decision (bool, weight-shaped)
        self.alpha: nn.Parameter | None = None  # AdaRound's soft variable while learning
        self.calibrated = False

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def axis(self) -> int | None:
        return 0 if self.spec.per_channel else None

    def calibrate(self, w: torch.Tensor) -> None:
        """Pick scale and zero point for ``w`` by the spec's method."""
        if self.bits >= PASS_BITS:
            self.calibrated = True
            return
        if not bool(torch.isfinite(w).all()):
            raise PtqdError("the weights to quantize are not finite (NaN or inf)")
        s, z = search_qparams(w, self.bits, self.spec.symmetric, self.axis, self.spec.method, self.spec.percentile)
        self.scale = _shape_for(s, w, self.axis).clone()
        self.zero_point = _shape_for(z, w, self.axis).clone()
        self.round_up = None
        self.alpha = None
        self.calibrated = True

    # AdaRound -----------------------------------------------------------------------------
    def soft_bits(self) -> torch.Tensor:
        assert self.alpha is not None
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0.0, 1.0)

    def init_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Start learning the rounding of ``w``: alpha set so the soft rounding equals the remainder."""
        rest = (w / self.scale) - torch.floor(w / self.scale)
        alpha = -torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1.0)
        self.alpha = nn.Parameter(alpha.detach().clone())
        self.round_up = None
        return self.alpha

    def finish_adaround(self) -> None:
        """Freeze the learned rounding: round up where alpha ≥ 0."""
        assert self.alpha is not None
        self.round_up = (self.alpha.detach() >= 0).clone()
        self.alpha = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bits >= PASS_BITS:
            return w
        if not self.calibrated:
            raise PtqdError("weight quantizer used before calibration; calibrate the model first")
        qmin, qmax = qrange(self.bits, self.spec.symmetric)
        if self.alpha is not None or self.round_up is not None:
            base = torch.floor(w / self.scale)
            if self.alpha is None and self.round_up.device != w.device:
                self.round_up = self.round_up.to(w.device)  # a plain attribute: Module.to() does not move it
            up = self.soft_bits() if self.alpha is not None else self.round_up.to(w.dtype)
            q = torch.clamp(base + up + self.zero_point, qmin, qmax)
            return (q - self.zero_point) * self.scale
        return fake_quant(w, self.scale, self.zero_point, qmin, qmax)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"scale": self.scale, "zero_point": self.zero_point}
        if self.round_up is not None:
            out["round_up"] = self.round_up.to(torch.uint8)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scale = state["scale"].float().clone()
        self.zero_point = state["zero_point"].float().clone()
        self.round_up = state["round_up"].bool().clone() if "round_up" in state else None
        self.alpha = None
        self.calibrated = True


class ActQuantizer(nn.Module):
    """Fake-quantizes an activation tensor per tensor, with one (scale, zero point) per bit-width.

    Keeping a calibrated scale for each bit-width in ``bit_options`` lets the sampler switch
    bit-widths step by step without recalibrating. ``fixed`` quantizers (first/last layer, softmax)
    ignore switching. In ``observe`` mode the quantizer passes data through and records its range
    and a random subsample of values for scale search.
    """

    MAX_SAMPLES = 1 << 17
    PER_CALL = 4096

    def __init__(self, bit_options: list[int], spec: QuantSpec, fixed: bool = False):
        super().__init__()
        for b in bit_options:
            check_bits(b, "activation bit-width")
        self.spec = spec
        self.bit_options = sorted(set(bit_options))
        self.bits = self.bit_options[0] if fixed else spec.bits
        if self.bits not in self.bit_options:
            self.bits = self.bit_options[-1]
        self.fixed = fixed
        self.enabled = True
        self.observing = False
        self.scale = nn.ParameterDict({str(b): nn.Parameter(torch.ones(()), requires_grad=False) for b in self.bit_options})
        self.register_buffer("zero_point", torch.zeros(len(self.bit_options)))
        self.calibrated = False
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def set_bits(self, bits: int) -> None:
        if self.fixed:
            return
        if bits not in self.bit_options:
            raise PtqdError(
                f"activation bit-width {bits} was not calibrated (calibrated: {self.bit_options}); "
                "quantize again with it in --act-bits"
            )
        self.bits = bits

    def current_scale(self) -> nn.Parameter:
        return self.scale[str(self.bits)]

    def current_zero_point(self) -> torch.Tensor:
        return self.zero_point[self.bit_options.index(self.bits)]

    # observation --------------------------------------------------------------------------
    def reset_observer(self) -> None:
        self._lo = self._hi = None
        self._samples = []
        self._gen = torch.Generator().manual_seed(0)

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        lo, hi = x.min(), x.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        n = min(self.PER_CALL, x.numel())
        idx = torch.randint(0, x.numel(), (n,), generator=self._gen)
        self._samples.append(x[idx])
        total = sum(s.numel() for s in self._samples)
        if total > 2 * self.MAX_SAMPLES:
            flat = torch.cat(self._samples)
            keep = torch.randperm(flat.numel(), generator=self._gen)[: self.MAX_SAMPLES]
            self._samples = [flat[keep]]

    def calibrate_from_observed(self, method: str | None = None) -> None:
        """Set the scale of every bit-width from what was observed (range + subsample)."""
        if self._lo is None:
            raise PtqdError("activation quantizer saw no data during calibration (is the layer used by the model?)")
        if not (bool(torch.isfinite(self._lo)) and bool(torch.isfinite(self._hi))):
            raise PtqdError(f"the observed activation range is not finite ({float(self._lo)} .. {float(self._hi)})")
        data = torch.cat(self._samples)
        method = method or self.spec.method
        for i, b in enumerate(self.bit_options):
            if b >= PASS_BITS:
                continue
            s, z = search_qparams(data, b, self.spec.symmetric, None, method, self.spec.percentile, lo=self._lo, hi=self._hi)
            self.scale[str(b)].data = s.reshape(()).clone()
            self.zero_point[i] = z.reshape(())
        self.calibrated = True
        self.reset_observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled or self.bits >= PASS_BITS:
            return x
        if not self.calibrated:
            raise PtqdError("activation quantizer used before calibration; calibrate the model first")
        qmin, qmax = qrange(self.bits, self.spec.symmetric)
        return fake_quant(x, self.current_scale(), self.current_zero_point(), qmin, qmax)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"scale_{b}": self.scale[str(b)].detach() for b in self.bit_options}
        out["zero_point"] = self.zero_point
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for b in self.bit_options:
            key = f"scale_{b}"
            if key not in state:
                raise PtqdError(f"saved activation quantizer has no scale for {b} bits")
            self.scale[str(b)].data = state[key].float().reshape(()).clone()
        self.zero_point = state["zero_point"].float().clone()
        self.calibrated = True
