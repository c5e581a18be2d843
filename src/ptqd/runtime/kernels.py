"""Integer Conv2d / Linear that reproduce a fake-quantized ``QuantLayer`` with real int8 arithmetic.

The simulated layer computes ``op(s_x·(q_x − z_x), s_w[c]·(q_w − z_w[c])) + bias`` in float; here
the integer part ``Σ (q_x − z_x)(q_w − z_w)`` is computed exactly in int32 and scaled once, so the
outputs agree up to float summation order (and the rare rounding tie of the input quantization).

Weights are kept as ``w8 = q_w − z_w − d[c]`` (int8, symmetric: the zero point is folded in);
``d[c]`` is a per-channel offset, non-zero only where ``q_w − z_w`` would leave [−128, 127]
(asymmetric 8-bit weights); its contribution ``d[c]·Σ(q_x − z_x)`` over the receptive field is
added from a cheap channel-sum. 4-bit weights sit in int8 containers (|w8| ≤ 15).

Activations are quantized onto the layer's own grid (scale, zero point, bit-width of its
``ActQuantizer``; the container zero point is ``z_x − qmin`` so symmetric grids fit uint8 too).

Two kernels, picked by the device of the input (or forced with ``set_kernel``):

* ``onednn`` (CPU): ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` with fp32
  output — PyTorch's x86 quantized backend, prepacked weights. The kernels always get input zero
  point 0 (oneDNN's zero-point path is up to 5× slower on small feature maps); the zero point's
  exact contribution goes into the bias and, where padding cuts taps off, onto the border rows and
  columns (``IntLayer._zero_point_terms``).
* ``intmm`` (CUDA; also runs on CPU for testing, slowly): ``torch._int_mm`` on int8 matrices
  (im2col for convolutions), activations shifted to int8 by −128 with the shift corrected by the
  weights' column sums.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.errors import PtqdError
from ptqd.quant.layers import QuantLayer
from ptqd.quant.quantizer import PASS_BITS, QuantSpec, qrange

# quantize_per_tensor is the fastest fused float→uint8 quantization on CPU; its deprecation notice is noise here
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")

KERNELS = ("auto", "onednn", "intmm")
_forced = {"kernel": "auto"}


def set_kernel(kind: str) -> None:
    """Force a kernel for every integer layer (``auto``: onednn on CPU, intmm on CUDA)."""
    if kind not in KERNELS:
        raise PtqdError(f"unknown integer kernel {kind!r}: use one of {', '.join(KERNELS)}")
    _forced["kernel"] = kind


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


def _cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI dot products (u8·s8 summed in int32). Without them x86 int8 kernels
    multiply-add adjacent u8·s8 pairs into saturating int16 (vpmaddubsw), which overflows for 8-bit
    activations against weights beyond ±64."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(k in flags for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


SAFE_PAIR_WEIGHT = 64  # 2·255·64 < 2**15: a u8·s8 pair sum of weights this small never saturates int16
_SPLIT_WIDE_WEIGHTS = not _cpu_has_vnni()


def kernel_for(device: torch.device) -> str:
    k = _forced["kernel"]
    if k != "auto":
        return k
    if device.type == "cpu":
        if not onednn_available():
            raise PtqdError("this PyTorch build has no oneDNN quantized kernels; use --backend fake")
        return "onednn"
    return "intmm"


def integer_weight(wq, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale[c], zero_point[c]) of a calibrated ``WeightQuantizer`` applied to ``w``: exactly the
    integers its forward uses (AdaRound's rounding decisions included), per output channel."""
    qmin, qmax = qrange(wq.bits, wq.spec.symmetric)
    scale, zp = wq.scale.to(w.device), wq.zero_point.to(w.device)
    if wq.round_up is not None:
        q = torch.floor(w / scale) + wq.round_up.to(w.device).to(w.dtype) + zp
    else:
        q = torch.round(w / scale) + zp
    q = torch.clamp(q, qmin, qmax)
    n = w.shape[0]
    return q.to(torch.int16), scale.reshape(-1).expand(n).float().contiguous(), zp.reshape(-1).expand(n).float().contiguous()


def fold_weight(q: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w8, d)``: int8 weights ``q − zp − d`` and the per-channel offset ``d`` that keeps them in range."""
    # int16 holds every intermediate (|q − zp| ≤ 255 up to 8 bits) at half the memory of int32
    v = q.to(torch.int16) - zp.to(torch.int16).reshape(-1, *[1] * (q.ndim - 1))
    flat = v.reshape(v.shape[0], -1)
    hi, lo = flat.amax(1).int(), flat.amin(1).int()
    if (hi - lo > 255).any():
        raise PtqdError("weight integers span more than 256 levels; only bit-widths up to 8 run on integer kernels")
    d = torch.clamp(torch.zeros_like(hi), hi - 127, lo + 128)
    v -= d.to(torch.int16).reshape(-1, *[1] * (q.ndim - 1))
    return v.to(torch.int8), d


class IntLayer(QuantLayer):
    """A ``QuantLayer`` whose forward runs integer kernels. It keeps the quantizers (so bit switching,
    BOPs counting and state loading work unchanged) but no float weight."""

    def __init__(self, geometry: nn.Conv2d | nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec,
                 act_bit_options: list[int], fixed_act: bool = False, split: int = 0):
        super().__init__(geometry, weight_spec, act_spec, act_bit_options, fixed_act, split)
        del self._modules["fp"]  # geometry only (on the meta device): not a parameter of the model
        object.__setattr__(self, "fp", geometry)
        self._packed: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor (shape and dtype only, for model code that inspects them); the integer weights are ``w8_*``."""
        return self.fp.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self, "bias_fp", None)

    @property
    def parts(self) -> int:
        return len(self.weight_quantizers)

    def set_integer_weights(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bias: torch.Tensor | None) -> None:
        """``parts``: (q, scale[c], zero_point[c]) per input-channel part (two with split quantizers)."""
        if len(parts) != self.parts:
            raise PtqdError(f"layer {getattr(self, 'ptqd_name', '?')} needs {self.parts} weight parts, got {len(parts)}")
        for i, (q, scale, zp) in enumerate(parts):
            w8, d = fold_weight(q, zp)
            self.register_buffer(f"w8_{i}", w8)
            self.register_buffer(f"wscale_{i}", scale.float().reshape(-1).contiguous())
            self.register_buffer(f"wd_{i}", d.to(torch.int32))
            self.weight_quantizers[i].scale = scale.reshape(-1, *[1] * (q.ndim - 1)).float().clone()
            self.weight_quantizers[i].zero_point = zp.reshape(-1, *[1] * (q.ndim - 1)).float().clone()
            self.weight_quantizers[i].calibrated = True
        self.register_buffer("bias_fp", None if bias is None else bias.float().clone())
        self._packed = {}

    def _apply(self, fn, *args, **kwargs):
        self._packed = {}  # prepacked weights belong to one device
        return super()._apply(fn, *args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the simulated layer uses (for checks)."""
        out = []
        for i in range(self.parts):
            w8, d, s = getattr(self, f"w8_{i}"), getattr(self, f"wd_{i}"), getattr(self, f"wscale_{i}")
            shape = (-1, *[1] * (w8.ndim - 1))
            out.append((w8.float() + d.float().reshape(shape)) * s.reshape(shape))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chunks = [x] if not self.split else [x[:, : self.split], x[:, self.split :]]
        kernel = kernel_for(x.device)
        out = None
        for i, xp in enumerate(chunks):
            aq = self.act_quantizers[i]
            if not aq.enabled or aq.bits >= PASS_BITS:
                raise PtqdError("integer layers need quantized activations; use the fake backend to run activations in float")
            y = self._part(i, xp, aq, kernel, add_bias=(i == 0))
            out = y if out is None else out + y
        return out

    def _act_grid(self, aq) -> tuple[float, int, int]:
        qmin, qmax = qrange(aq.bits, aq.spec.symmetric)
        return float(aq.current_scale()), int(aq.current_zero_point()) - qmin, qmax - qmin

    def _part(self, i: int, x: torch.Tensor, aq, kernel: str, add_bias: bool) -> torch.Tensor:
        s_x, z_x, top = self._act_grid(aq)
        if kernel == "onednn":
            return self._onednn(i, x, s_x, z_x, top)
        return self._intmm(i, x, s_x, z_x, top, self.bias_fp if add_bias else None)

    # oneDNN (CPU) -------------------------------------------------------------------------
    def _quantize_u8(self, x: torch.Tensor, s_x: float, z_x: int, top: int) -> torch.Tensor:
        # fused round(x / s) + z_x, clamp, cast (it rounds x·(1/s) + z_x in float, so an activation that
        # lies within float rounding of a .5 tie can land one step from the simulated one: ~1e-5 of them)
        q = torch.quantize_per_tensor(x.float(), s_x, z_x, torch.quint8)
        # the oneDNN ops take plain uint8: reinterpret the quantized tensor's bytes instead of copying them (int_repr)
        xq = torch.empty(0, dtype=torch.uint8, device=q.device).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
        if top < 255:
            xq.clamp_(0, top)
        return xq

    def _onednn_weights(self, i: int) -> dict:
        """Prepacked weights and everything else a call needs that does not change between calls; with
        non-zero offsets d, one extra output channel of ones yields s_x·Σ q_x over the receptive field."""
        plan = self._packed.get(i)
        if plan is None:
            w8, ws, d = getattr(self, f"w8_{i}"), getattr(self, f"wscale_{i}"), getattr(self, f"wd_{i}")
            offsets = bool((d != 0).any())
            grouped = self.kind == "conv" and self.fp.groups != 1
            extra = offsets and not grouped
            if extra:
                w8 = torch.cat([w8, torch.ones_like(w8[:1])])
                ws = torch.cat([ws, ws.new_ones(1)])
            bias = self.bias_fp if i == 0 else None
            fp = self.fp
            coef = (d.float() * getattr(self, f"wscale_{i}")).contiguous()
            bias_ext = torch.cat([bias, bias.new_zeros(1)]) if extra and bias is not None else bias
            plan = {"ws": ws.contiguous(), "zeros": torch.zeros(ws.numel(), dtype=torch.long), "bias": bias, "bias_ext": bias_ext,
                    "extra": extra, "n": coef.numel(), "grouped_offsets": offsets and grouped,
                    "part": i, "wscale": getattr(self, f"wscale_{i}"), "by_grid": {}}
            # without VNNI, weights beyond ±64 run as two halves within ±64 (exact: the int32 sums add up)
            lo = None
            if _SPLIT_WIDE_WEIGHTS and int(w8.abs().max()) > SAFE_PAIR_WEIGHT:
                hi = w8.clamp(-SAFE_PAIR_WEIGHT, SAFE_PAIR_WEIGHT)
                lo, w8 = (w8 - hi)[: coef.numel()].contiguous(), hi.contiguous()
            n = coef.numel()
            plan["ws_lo"], plan["zeros_lo"] = ws[:n].contiguous(), torch.zeros(n, dtype=torch.long)
            if self.kind == "conv":
                geo = (list(fp.stride), list(fp.padding), list(fp.dilation), fp.groups)
                plan["packed"] = torch.ops.onednn.qconv_prepack(w8, ws, 1.0, 0, *geo, None)
                plan["packed_lo"] = torch.ops.onednn.qconv_prepack(lo, plan["ws_lo"], 1.0, 0, *geo, None) if lo is not None else None
                plan["geometry"] = geo
                plan["coef"] = coef.reshape(1, -1, 1, 1)
            else:
                plan["packed"] = torch.ops.onednn.qlinear_prepack(w8, None)
                plan["packed_lo"] = torch.ops.onednn.qlinear_prepack(lo, None) if lo is not None else None
                plan["coef"] = coef
            self._packed[i] = plan
        return plan

    def _zero_point_terms(self, p: dict, x: torch.Tensor, s_x: float, z_x: int) -> tuple[torch.Tensor | None, list]:
        """The input zero point's contribution −s_x·z_x·s_w[c]·Σ_{taps inside the input} w[c], for
        kernels run with zero point 0. Away from the borders it is a per-channel constant, folded
        into the bias; on the border rows/columns (where padding taps drop out) what the constant
        took too much is added back on those slices only. Returns (bias, border patches), cached per
        input grid and feature-map size."""
        key = (s_x, z_x, tuple(x.shape[2:]) if self.kind == "conv" else None)
        got = p["by_grid"].get(key)
        if got is not None:
            return got
        # the weights the zero point multiplies, q_w − z_w (grouped convs' offsets d have their own term);
        # built when a new grid or size first appears, not kept (a float copy of every weight)
        w8, d = getattr(self, f"w8_{p['part']}"), getattr(self, f"wd_{p['part']}")
        true_w = w8.float() + d.float().reshape(-1, *[1] * (w8.ndim - 1)) if p["extra"] else w8.float()
        full_sum = true_w.reshape(p["n"], -1).sum(1)  # exact: integers far below 2**24
        k = s_x * z_x * p["wscale"]
        bias = -(k * full_sum)
        if p["bias"] is not None:
            bias = p["bias"] + bias
        if p["extra"]:
            bias = torch.cat([bias, bias.new_zeros(1)])  # the extra channel's Σ q_x takes no zero point
        patches = []
        if self.kind == "conv":
            stride, padding, dilation, groups = p["geometry"]
            ones = torch.ones(1, x.shape[1], *x.shape[2:])
            inside = F.conv2d(ones, true_w, None, stride, padding, dilation, groups)[0]  # (n, Ho, Wo) tap sums
            border = (full_sum.reshape(-1, 1, 1) - inside) * k.reshape(-1, 1, 1)  # what the constant over-subtracted
            # border rows/columns: where some tap of the kernel's height/width falls into the padding
            kh, kw = self.fp.kernel_size
            rows = F.conv2d(torch.ones(1, 1, x.shape[2], 1), torch.ones(1, 1, kh, 1), None, (stride[0], 1), (padding[0], 0), (dilation[0], 1))
            cols = F.conv2d(torch.ones(1, 1, 1, x.shape[3]), torch.ones(1, 1, 1, kw), None, (1, stride[1]), (0, padding[1]), (1, dilation[1]))
            rows, cols = (rows.reshape(-1) < kh).tolist(), (cols.reshape(-1) < kw).tolist()
            row_runs, mid_runs = _runs(rows, True), _runs(rows, False)
            cl = torch.channels_last  # the layout of the kernels' outputs: patches in it add fastest
            for r0, r1 in row_runs:
                patches.append((slice(r0, r1), slice(None), border[None, :, r0:r1, :].contiguous(memory_format=cl)))
            for c0, c1 in _runs(cols, True):
                for r0, r1 in mid_runs:
                    patches.append((slice(r0, r1), slice(c0, c1), border[None, :, r0:r1, c0:c1].contiguous(memory_format=cl)))
        got = (bias.contiguous(), patches)
        p["by_grid"][key] = got
        return got

    def _onednn(self, i, x, s_x, z_x, top):
        xq = self._quantize_u8(x, s_x, z_x, top)
        p = self._onednn_weights(i)
        # the kernels always see input zero point 0: its contribution is in the bias and border patches
        bias, patches = self._zero_point_terms(p, x, s_x, z_x) if z_x else (p["bias_ext"], [])
        if self.kind == "conv":
            out = torch.ops.onednn.qconv2d_pointwise(
                xq, s_x, 0, p["packed"], p["ws"], p["zeros"], bias, *p["geometry"], 1.0, 0, torch.float32, "none", [], "",
            )
        else:
            out = torch.ops.onednn.qlinear_pointwise(xq, s_x, 0, p["packed"], p["ws"], p["zeros"], bias, 1.0, 0, torch.float32, "none", [], "")
        if p["packed_lo"] is not None:  # the second half of wide 8-bit weights (CPUs without VNNI)
            n = p["n"]
            if self.kind == "conv":
                lo = torch.ops.onednn.qconv2d_pointwise(
                    xq, s_x, 0, p["packed_lo"], p["ws_lo"], p["zeros_lo"], None, *p["geometry"], 1.0, 0, torch.float32, "none", [], "",
                )
                out[:, :n] += lo
            else:
                lo = torch.ops.onednn.qlinear_pointwise(xq, s_x, 0, p["packed_lo"], p["ws_lo"], p["zeros_lo"], None, 1.0, 0, torch.float32, "none", [], "")
                out[..., :n] += lo
        if p["extra"]:
            n = p["n"]
            if self.kind == "conv":
                out = torch.addcmul(out[:, :n], out[:, n:], p["coef"])
            else:
                out = torch.addcmul(out[..., :n], out[..., n:], p["coef"])
        for rows, cols, patch in patches:
            out[:, :, rows, cols] += patch
        if p["grouped_offsets"]:  # grouped convolution with offsets: channel sums per group
            out = out + self._offset_term(xq, z_x, i, s_x)
        return out

    def _window_sums(self, xq: torch.Tensor, z_x: int) -> torch.Tensor:
        """Σ (q_x − z_x) over each output's receptive field (per group for grouped convs)."""
        if self.kind == "linear":
            k = xq.shape[-1]
            return (xq.sum(-1, keepdim=True, dtype=torch.int32) - z_x * k).float()
        fp = self.fp
        g = fp.groups
        b, c, h, w = xq.shape
        per_group = xq.reshape(b, g, c // g, h, w).sum(2, dtype=torch.int32) - z_x * (c // g)
        ones = torch.ones(g, 1, *fp.kernel_size, dtype=torch.float32, device=xq.device)
        s = F.conv2d(per_group.float(), ones, None, fp.stride, fp.padding, fp.dilation, g)
        return s.repeat_interleave(fp.out_channels // g, dim=1) if g > 1 else s

    def _offset_term(self, xq, z_x, i, s_x) -> torch.Tensor:
        d, ws = getattr(self, f"wd_{i}"), getattr(self, f"wscale_{i}")
        coef = d.float() * ws * s_x
        sums = self._window_sums(xq, z_x)
        if self.kind == "conv":
            return sums * coef.reshape(1, -1, 1, 1)
        return sums * coef

    # torch._int_mm (CUDA) -----------------------------------------------------------------
    def _intmm(self, i, x, s_x, z_x, top, bias):
        w8, ws, d = getattr(self, f"w8_{i}"), getattr(self, f"wscale_{i}"), getattr(self, f"wd_{i}")
        xq = torch.clamp(torch.round(x.float() / s_x) + z_x, 0, top)  # exact small integers in float
        shift = 128 - z_x  # a = q_x − 128 is int8; Σ (q_x − z_x) w = Σ a·w + shift·Σ w
        n = w8.shape[0]
        if self.kind == "linear":
            lead = x.shape[:-1]
            a = (xq - 128).reshape(-1, x.shape[-1]).to(torch.int8)
            wmat = w8.reshape(n, -1)
        else:
            fp = self.fp
            if fp.groups != 1:
                raise PtqdError(f"grouped convolution {getattr(self, 'ptqd_name', '')} has no intmm kernel; use the fake backend")
            b, _, h, w = x.shape
            # padding holds q_x = z_x (the float zero), i.e. a = z_x − 128
            xp = F.pad(xq - 128, [fp.padding[1], fp.padding[1], fp.padding[0], fp.padding[0]], value=float(z_x - 128))
            cols = F.unfold(xp.half() if xp.is_cuda else xp, fp.kernel_size, fp.dilation, 0, fp.stride)  # (B, K, L)
            ho = (h + 2 * fp.padding[0] - fp.dilation[0] * (fp.kernel_size[0] - 1) - 1) // fp.stride[0] + 1
            wo = (w + 2 * fp.padding[1] - fp.dilation[1] * (fp.kernel_size[1] - 1) - 1) // fp.stride[1] + 1
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)
            wmat = w8.reshape(n, -1)
        k = a.shape[1]
        acc = int_mm(a, wmat)  # (M, N) int32
        colsum = wmat.sum(1, dtype=torch.int32)
        acc = acc + shift * colsum
        if bool((d != 0).any()):
            rows = a.sum(1, dtype=torch.int32) + shift * k  # Σ (q_x − z_x)
            acc = acc + rows[:, None] * d[None, :]
        out = acc.float() * (ws * s_x)
        if bias is not None:
            out = out + bias
        if self.kind == "linear":
            return out.reshape(*lead, n)
        return out.reshape(b, ho, wo, n).permute(0, 3, 1, 2)


def _runs(flags: list[bool], value: bool) -> list[tuple[int, int]]:
    """Maximal ranges [start, stop) where ``flags`` equals ``value``."""
    out, start = [], None
    for j, f in enumerate([*flags, not value]):
        if f == value and start is None:
            start = j
        elif f != value and start is not None:
            out.append((start, j))
            start = None
    return out


def int_mm(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """``a @ b_nk.T`` for int8 ``a`` (M, K) and ``b_nk`` (N, K), int32 result, via ``torch._int_mm``
    (padded to its shape rules: M > 16, K and N multiples of 8)."""
    m, k = a.shape
    n = b_nk.shape[0]
    pm = max(17 - m, 0)
    pk = (-k) % 8
    pn = (-n) % 8
    if pm or pk:
        a = F.pad(a, [0, pk, 0, pm])
    if pk or pn:
        b_nk = F.pad(b_nk, [0, pk, 0, pn])
    out = torch._int_mm(a, b_nk.t())
    return out[:m, :n]
