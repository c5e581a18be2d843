"""Bit operations (BOPs) and model size, counted on a real forward pass.

BOPs of a layer = MACs × b_w × b_a, as in the PTQD paper; a float layer or matmul counts 32 × 32.
Counted: every Conv2d / Linear (quantized or not) and, in quantized attention, Q·Kᵀ
(b_q × b_k) and softmax·V (b_softmax × b_v). Normalisations, activations, softmax itself and
additions are not counted (the paper does not count them either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ptqd.quant.layers import QuantAttnProcessor, QuantLayer
from ptqd.quant.quantizer import PASS_BITS

FP_BITS = 32


@dataclass
class OpCount:
    name: str
    kind: str  # conv | linear | qk | av
    macs: int
    w_bits: int
    a_bits: int

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass
class BopsReport:
    """Per-op counts of one forward pass (divide by the batch yourself, or run with batch 1)."""

    ops: list[OpCount] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def bops(self) -> int:
        return sum(o.bops for o in self.ops)

    @property
    def fp_bops(self) -> int:
        return self.macs * FP_BITS * FP_BITS

    def summary(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "bops": self.bops,
            "fp_bops": self.fp_bops,
            "bops_saving": round(self.fp_bops / self.bops, 3) if self.bops else None,
            "ops": len(self.ops),
        }


def _bits(q, default: int = FP_BITS) -> int:
    if q is None or not q.enabled or q.bits >= PASS_BITS:
        return default
    return q.bits


def _layer_macs(m: nn.Module, out: torch.Tensor) -> int:
    fp = m.fp if isinstance(m, QuantLayer) else m
    if isinstance(fp, nn.Conv2d):
        per_out = (fp.in_channels // fp.groups) * fp.kernel_size[0] * fp.kernel_size[1]
    else:
        per_out = fp.in_features
    return int(out.numel()) * per_out


@torch.no_grad()
def count_bops(net: nn.Module, run_once: Callable[[nn.Module], Any]) -> BopsReport:
    """Run ``run_once(net)`` and count MACs/BOPs of every Conv2d, Linear and quantized attention matmul."""
    report = BopsReport()
    names = {m: n for n, m in net.named_modules()}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, QuantLayer):

            def hook(mod, args, out, name=name):
                report.ops.append(OpCount(name, mod.kind, _layer_macs(mod, out), _bits(mod.weight_quantizers[0]), _bits(mod.act_quantizers[0])))

            hooks.append(m.register_forward_hook(hook))
        elif type(m) in (nn.Conv2d, nn.Linear):

            def hook(mod, args, out, name=name):
                kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
                report.ops.append(OpCount(name, kind, _layer_macs(mod, out), FP_BITS, FP_BITS))

            hooks.append(m.register_forward_hook(hook))

    def on_matmul(attn, q_shape, k_shape):
        b, h, lq, d = q_shape
        lk = k_shape[2]
        macs = int(b * h * lq * lk * d)
        qz = attn.ptqd_quant
        name = names.get(attn, "attention")
        report.ops.append(OpCount(f"{name}.qk", "qk", macs, _bits(qz.k), _bits(qz.q)))
        report.ops.append(OpCount(f"{name}.av", "av", macs, _bits(qz.v), _bits(qz.softmax)))

    QuantAttnProcessor.on_matmul = on_matmul
    try:
        run_once(net)
    finally:
        QuantAttnProcessor.on_matmul = None
        for h in hooks:
            h.remove()
    return report


def model_size_bytes(net: nn.Module) -> dict[str, float]:
    """Storage at the chosen bit-widths: quantized weights at b_w bits, every other parameter
    (biases, norms, embeddings) and every weight scale/zero point at 32 bits; and the fp32 size."""
    quantized_params = set()
    bits_total = 0
    for m in net.modules():
        if isinstance(m, QuantLayer):
            for q, w in zip(m.weight_quantizers, m.weight_parts()):
                b = _bits(q)
                bits_total += w.numel() * b
                if b < FP_BITS:
                    bits_total += (q.scale.numel() + q.zero_point.numel()) * FP_BITS
            quantized_params.add(id(m.fp.weight))
    from ptqd.quant.quantizer import ActQuantizer

    act_scales = {id(s) for m in net.modules() if isinstance(m, ActQuantizer) for s in m.scale.values()}
    fp_total = 0
    for p in net.parameters():
        if not p.is_floating_point():
            continue
        if id(p) in quantized_params:
            fp_total += p.numel() * FP_BITS
            continue
        if id(p) in act_scales:
            bits_total += p.numel() * FP_BITS  # one number per quantizer and bit-width
            continue
        bits_total += p.numel() * FP_BITS
        fp_total += p.numel() * FP_BITS
    return {"bytes": bits_total / 8, "fp32_bytes": fp_total / 8, "ratio": fp_total / bits_total if bits_total else None}

