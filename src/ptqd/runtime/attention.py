"""Attention for the integer backend: the simulated model's quantized matmul inputs, with fused quantizers.

The two attention products (Q·Kᵀ and softmax·V) have no fast integer kernel on the CPU, so they run
in float on quantized values, as in the simulated model, but each activation quantizer is one fused
``torch.fake_quantize_per_tensor_affine`` pass instead of six elementwise ops, and the attention
scale is applied to Q (the small tensor) rather than to the scores. On a CIFAR-sized UNet the scores
are 16×32×256×256 floats per call, so the passes over them dominate its cost.
"""

from __future__ import annotations

import torch

from ptqd.quant.layers import QuantAttnProcessor
from ptqd.quant.quantizer import PASS_BITS, qrange


def fused_fake_quant(aq, x: torch.Tensor) -> torch.Tensor:
    """``aq(x)`` (an ActQuantizer at its current bit-width) in one fused pass."""
    if not aq.enabled or aq.bits >= PASS_BITS:
        return x
    qmin, qmax = qrange(aq.bits, aq.spec.symmetric)
    return torch.fake_quantize_per_tensor_affine(x, float(aq.current_scale()), int(aq.current_zero_point()), qmin, qmax)


class FusedQuantAttnProcessor(QuantAttnProcessor):
    """Same computation as :class:`ptqd.quant.layers.QuantAttnProcessor`, fewer passes over the scores."""

    def attend(self, attn, quant, query, key, value, attention_mask):
        scores = (fused_fake_quant(quant.q, query) * attn.scale) @ fused_fake_quant(quant.k, key).transpose(-1, -2)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        probs = fused_fake_quant(quant.softmax, torch.softmax(scores, dim=-1))
        del scores
        return probs @ fused_fake_quant(quant.v, value)
