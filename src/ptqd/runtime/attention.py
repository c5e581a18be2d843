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

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        quant = attn.ptqd_quant
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = (fused_fake_quant(quant.q, query) * attn.scale) @ fused_fake_quant(quant.k, key).transpose(-1, -2)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        probs = fused_fake_quant(quant.softmax, torch.softmax(scores, dim=-1))
        del scores
        hidden_states = probs @ fused_fake_quant(quant.v, value)
        if QuantAttnProcessor.on_matmul is not None:
            QuantAttnProcessor.on_matmul(attn, query.shape, key.shape)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
