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

Kernels, picked by the device of the input and, on the CPU, by its instruction set once per process
(``kernel_for``; forced with ``set_kernel`` or the environment variable ``PTQD_INT_KERNEL``):

* ``onednn`` (CPU with VNNI or AMX): ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``
  with fp32 output — PyTorch's x86 quantized backend, prepacked weights. The kernels always get input
  zero point 0 (oneDNN's zero-point path is up to 5× slower on small feature maps); the zero point's
  exact contribution goes into the bias and, where padding cuts taps off, either the uint8 input is
  padded with the zero point or border rows and columns are patched (``IntLayer._zero_point_terms``).
* ``onednn-split`` (CPU without VNNI, e.g. AVX2 only): the same, but 8-bit weights beyond ±64 run as
  two halves within ±64 (those CPUs sum adjacent u8·s8 products in saturating int16), two kernel
  calls and one add. 4-bit weights need no split and run in one pass.
* ``intmm`` (CUDA; also runs on CPU for testing, slowly): ``torch._int_mm`` on int8 matrices
  (im2col for convolutions), activations shifted to int8 by −128 with the shift corrected by the
  weights' column sums.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.errors import PtqdError
from ptqd.quant.layers import QuantLayer
from ptqd.quant.quantizer import PASS_BITS, QuantSpec, qrange

# quantize_per_tensor is the fastest fused float→uint8 quantization on CPU; its deprecation notice is noise here
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")

KERNELS = ("auto", "onednn", "onednn-split", "intmm")
_forced = {"kernel": os.environ.get("PTQD_INT_KERNEL", "auto") or "auto"}


def set_kernel(kind: str) -> None:
    """Force a kernel for every integer layer (``auto``: the fastest exact one for the device and CPU, see :func:`kernel_for`).

    ``onednn``: oneDNN u8·s8 kernels, one pass (exact where the CPU has VNNI or AMX dot products);
    ``onednn-split``: the same kernels with 8-bit weights beyond ±64 run as two halves within ±64
    (exact on every x86 CPU; what AVX2-only CPUs need); ``intmm``: ``torch._int_mm`` (CUDA; slow on CPU).
    The environment variable ``PTQD_INT_KERNEL`` sets the same at import time."""
    if kind not in KERNELS:
        raise PtqdError(f"unknown integer kernel {kind!r}: use one of {', '.join(KERNELS)}")
    _forced["kernel"] = kind


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=None)
def cpu_features() -> str:
    """The CPU's best integer dot-product instruction set: ``amx`` (AMX int8 tiles), ``avx512_vnni``,
    ``avx_vnni`` (VNNI: u8·s8 summed straight into int32), ``avx512`` or ``avx2`` (no VNNI: u8·s8 pairs
    are summed into saturating int16 by vpmaddubsw), or ``other``. Read once from /proc/cpuinfo
    (PyTorch's own capability string where that file is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        flags = set()
    if not flags:
        cap = torch.backends.cpu.get_cpu_capability().lower()  # "AVX2", "AVX512", "DEFAULT", ...
        return {"avx512": "avx512", "avx2": "avx2"}.get(cap, "other")
    if "amx_int8" in flags and "amx_tile" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx_vnni" in flags:
        return "avx_vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI dot products (u8·s8 summed in int32). Without them x86 int8 kernels
    multiply-add adjacent u8·s8 pairs into saturating int16 (vpmaddubsw), which overflows for 8-bit
    activations against weights beyond ±64."""
    return cpu_features() in ("amx", "avx512_vnni", "avx_vnni")


SAFE_PAIR_WEIGHT = 64  # 2·255·64 < 2**15: a u8·s8 pair sum of weights this small never saturates int16
PAD_INPUT = True  # padded convolutions with an input zero point: pad the uint8 input with z_x (else: border patches)


@functools.lru_cache(maxsize=None)
def _auto_cpu_kernel() -> str:
    if not onednn_available():
        raise PtqdError("this PyTorch build has no oneDNN quantized kernels; use --backend fake")
    return "onednn" if cpu_has_vnni() else "onednn-split"


def kernel_for(device: torch.device) -> str:
    """The kernel integer layers run on ``device``: the forced one (:func:`set_kernel`), else on the
    CPU ``onednn`` with VNNI/AMX and ``onednn-split`` without (chosen once per process from the CPU's
    flags), ``intmm`` on CUDA."""
    k = _forced["kernel"]
    if k != "auto":
        if k not in KERNELS:
            raise PtqdError(f"PTQD_INT_KERNEL={k!r} is not an integer kernel: use one of {', '.join(KERNELS)}")
        return k
    if device.type == "cpu":
        return _auto_cpu_kernel()
    return "intmm"


def supported_kernels(device: torch.device | str = "cpu") -> list[str]:
    """The kernels that compute exactly on ``device`` with this CPU (``onednn`` needs VNNI/AMX for 8-bit weights)."""
    device = torch.device(device)
    if device.type != "cpu":
        return ["intmm"]
    out = []
    if onednn_available():
        out += ["onednn", "onednn-split"] if cpu_has_vnni() else ["onednn-split"]
    return out + ["intmm"]


@functools.lru_cache(maxsize=None)
def _fast_dtype_class(cls: type) -> type:
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    return type(cls.__name__, (cls,), {"dtype": property(dtype), "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def fast_dtype(net: nn.Module) -> nn.Module:
    """Give a diffusers network of integer layers a cheap ``dtype`` (its first floating parameter's).

    diffusers' ``ModelMixin.dtype``, read twice per UNet call (time embedding), first walks every
    submodule looking for layerwise-casting hooks; with integer layers (each with its quantizer
    modules, whose ``hasattr`` misses raise twice) that scan cost ≈12 ms per call of the bundled
    digits16-cond, 15 % of it. ptqd never installs those hooks on a loaded checkpoint. The class is
    swapped for a subclass of the same name (``isinstance`` and the config are unchanged)."""
    if hasattr(type(net), "dtype") and "ModelMixin" in [c.__name__ for c in type(net).__mro__]:
        net.__class__ = _fast_dtype_class(type(net))
    return net


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
        if kernel != "intmm":
            return self._onednn(i, x, s_x, z_x, top, kernel == "onednn-split")
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

    def _onednn_weights(self, i: int, split: bool) -> dict:
        """Prepacked weights and everything else a call needs that does not change between calls (built
        on the first call of each part and kernel variant); with non-zero offsets d, one extra output
        channel of ones yields s_x·Σ q_x over the receptive field."""
        plan = self._packed.get((i, split))
        if plan is None:
            w8, ws, d = getattr(self, f"w8_{i}"), getattr(self, f"wscale_{i}"), getattr(self, f"wd_{i}")
            offsets = bool((d != 0).any())
            grouped = self.kind == "conv" and self.fp.groups != 1
            extra = offsets and not grouped
            pad = 0
            if extra:
                # the ones channel, then zero channels up to a multiple of 16 output channels (oneDNN's x86 int8
                # kernels block output channels by 8/16; whether an odd count costs more was not isolated here)
                pad = (-(w8.shape[0] + 1)) % 16
                w8 = torch.cat([w8, torch.ones_like(w8[:1]), torch.zeros_like(w8[:1]).expand(pad, *w8.shape[1:])])
                ws = torch.cat([ws, ws.new_ones(1 + pad)])
            bias = self.bias_fp if i == 0 else None
            fp = self.fp
            coef = (d.float() * getattr(self, f"wscale_{i}")).contiguous()
            bias_ext = torch.cat([bias, bias.new_zeros(1 + pad)]) if extra and bias is not None else bias
            plan = {"ws": ws.contiguous(), "zeros": torch.zeros(ws.numel(), dtype=torch.long), "bias": bias, "bias_ext": bias_ext,
                    "extra": extra, "pad_channels": pad, "n": coef.numel(), "grouped_offsets": offsets and grouped,
                    "part": i, "wscale": getattr(self, f"wscale_{i}"), "by_grid": {}}
            # split kernel (CPUs without VNNI): weights beyond ±64 run as two halves within ±64 (exact: the
            # int32 sums add up); the second half keeps every output channel, so its output adds in one pass
            lo = None
            if split and int(w8.abs().max()) > SAFE_PAIR_WEIGHT:
                hi = w8.clamp(-SAFE_PAIR_WEIGHT, SAFE_PAIR_WEIGHT)
                lo, w8 = (w8 - hi).contiguous(), hi.contiguous()
            if self.kind == "conv":
                geo = (list(fp.stride), list(fp.padding), list(fp.dilation), fp.groups)
                plan["packed"] = torch.ops.onednn.qconv_prepack(w8, plan["ws"], 1.0, 0, *geo, None)
                plan["packed_lo"] = torch.ops.onednn.qconv_prepack(lo, plan["ws"], 1.0, 0, *geo, None) if lo is not None else None
                plan["geometry"] = geo
                if PAD_INPUT and fp.groups == 1 and any(fp.padding) and isinstance(fp.padding, tuple):
                    plan["pad"] = [fp.padding[1], fp.padding[1], fp.padding[0], fp.padding[0]]
                    plan["geometry_unpadded"] = (geo[0], [0, 0], geo[2], geo[3])
                plan["coef"] = coef.reshape(1, -1, 1, 1)
            else:
                plan["packed"] = torch.ops.onednn.qlinear_prepack(w8, None)
                plan["packed_lo"] = torch.ops.onednn.qlinear_prepack(lo, None) if lo is not None else None
                plan["coef"] = coef
            self._packed[(i, split)] = plan
        return plan

    def _zero_point_terms(self, p: dict, x: torch.Tensor, s_x: float, z_x: int, borders: bool = True) -> tuple[torch.Tensor | None, list]:
        """The input zero point's contribution −s_x·z_x·s_w[c]·Σ_{taps inside the input} w[c], for
        kernels run with zero point 0. Away from the borders it is a per-channel constant, folded
        into the bias; on the border rows/columns (where padding taps drop out) what the constant
        took too much is added back on those slices only. Returns (bias, border patches), cached per
        input grid and feature-map size."""
        key = (s_x, z_x, tuple(x.shape[2:]) if self.kind == "conv" and borders else None)
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
            bias = torch.cat([bias, bias.new_zeros(1 + p["pad_channels"])])  # the extra channel's Σ q_x takes no zero point
        patches = []
        if self.kind == "conv" and borders:
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

    def _onednn(self, i, x, s_x, z_x, top, split):
        xq = self._quantize_u8(x, s_x, z_x, top)
        p = self._onednn_weights(i, split)
        # the kernels always see input zero point 0: its contribution is in the bias; where padding cuts taps
        # off, either the uint8 input is padded with z_x (q_x − z_x = 0 there, as the float zero padding) or
        # border patches add back what the bias took too much (grouped convolutions, PAD_INPUT off)
        geometry = p.get("geometry")
        if z_x and p.get("pad") is not None:
            xq = F.pad(xq, p["pad"], value=z_x)
            geometry = p["geometry_unpadded"]
            bias, patches = self._zero_point_terms(p, x, s_x, z_x, borders=False)
        else:
            bias, patches = self._zero_point_terms(p, x, s_x, z_x) if z_x else (p["bias_ext"], [])
        if self.kind == "conv":
            out = torch.ops.onednn.qconv2d_pointwise(
                xq, s_x, 0, p["packed"], p["ws"], p["zeros"], bias, *geometry, 1.0, 0, torch.float32, "none", [], "",
            )
            if p["packed_lo"] is not None:  # the second half of wide 8-bit weights (same output channels)
                # a separate call and one add: with oneDNN's fp32 sum post-op (qconv2d_pointwise.binary) the integer
                # kernels of a CIFAR-size W8A8 call took 930 ms instead of 625 ms on AVX2 (fp32: 1027 vs 920 ms)
                out.add_(torch.ops.onednn.qconv2d_pointwise(
                    xq, s_x, 0, p["packed_lo"], p["ws"], p["zeros"], None, *geometry, 1.0, 0, torch.float32, "none", [], "",
                ))
        else:
            out = torch.ops.onednn.qlinear_pointwise(xq, s_x, 0, p["packed"], p["ws"], p["zeros"], bias, 1.0, 0, torch.float32, "none", [], "")
            if p["packed_lo"] is not None:
                out.add_(torch.ops.onednn.qlinear_pointwise(xq, s_x, 0, p["packed_lo"], p["ws"], p["zeros"], None, 1.0, 0, torch.float32, "none", [], ""))
        if p["extra"]:
            n = p["n"]
            if self.kind == "conv":
                out = torch.addcmul(out[:, :n], out[:, n : n + 1], p["coef"])
            else:
                out = torch.addcmul(out[..., :n], out[..., n : n + 1], p["coef"])
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
