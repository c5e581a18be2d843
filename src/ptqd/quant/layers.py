"""Quantized stand-ins for Conv2d and Linear, and a quantized attention processor.

``QuantLayer`` wraps the original module (kept as ``.fp``, weights shared, not copied) and
fake-quantizes its input activation and its weight before calling the same functional op.
With ``split > 0`` (Q-Diffusion's split-shortcut quantization) the input channels ``[:split]``
and ``[split:]`` (the two halves of a skip concatenation) get their own activation and weight
quantizers, because their ranges differ a lot.

``QuantAttnProcessor`` replaces diffusers' attention processor on an ``Attention`` module and
quantizes the inputs of the two matrix products: Q and K for Q·Kᵀ, and the softmax output and V
for softmax·V (the softmax output has its own bit-width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.quant.quantizer import ActQuantizer, QuantSpec, WeightQuantizer


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose input and weight are fake-quantized."""

    def __init__(
        self,
        fp: nn.Conv2d | nn.Linear,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        act_bit_options: list[int],
        fixed_act: bool = False,
        split: int = 0,
    ):
        super().__init__()
        self.fp = fp
        self.kind = "conv" if isinstance(fp, nn.Conv2d) else "linear"
        self.split = split
        self.fixed_act = fixed_act
        parts = 2 if split else 1
        self.weight_quantizers = nn.ModuleList([WeightQuantizer(weight_spec) for _ in range(parts)])
        self.act_quantizers = nn.ModuleList(
            [ActQuantizer(act_bit_options, act_spec, fixed=fixed_act) for _ in range(parts)]
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes of the wrapped layer (in_channels, out_features, …) that model code may read
            return getattr(super().__getattr__("fp"), name)

    @property
    def weight(self) -> torch.Tensor:
        return self.fp.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.fp.bias

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizers[0].bits

    @property
    def act_bits(self) -> int:
        return self.act_quantizers[0].bits

    def weight_parts(self) -> list[torch.Tensor]:
        w = self.fp.weight
        return [w] if not self.split else [w[:, : self.split], w[:, self.split :]]

    def quantized_weight(self) -> torch.Tensor:
        parts = [q(w) for q, w in zip(self.weight_quantizers, self.weight_parts())]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.act_quantizers[0](x)
        a, b = x[:, : self.split], x[:, self.split :]
        return torch.cat([self.act_quantizers[0](a), self.act_quantizers[1](b)], dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.quantized_weight()
        if self.kind == "linear":
            return F.linear(x, w, self.fp.bias)
        return self.fp._conv_forward(x, w, self.fp.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, w{self.weight_bits}a{self.act_bits}" + (f", split={self.split}" if self.split else "")


class AttentionQuantizers(nn.Module):
    """The activation quantizers of one attention module's two matrix products."""

    def __init__(self, act_spec: QuantSpec, act_bit_options: list[int], softmax_spec: QuantSpec):
        super().__init__()
        self.q = ActQuantizer(act_bit_options, act_spec)
        self.k = ActQuantizer(act_bit_options, act_spec)
        self.v = ActQuantizer(act_bit_options, act_spec)
        self.softmax = ActQuantizer([softmax_spec.bits], softmax_spec, fixed=True)


class QuantAttnProcessor:
    """Attention with quantized matmul inputs; otherwise the same computation as diffusers' AttnProcessor2_0.

    The quantizers live on the ``Attention`` module (``attn.ptqd_quant``) so they are part of the
    model's module tree; this processor holds no state. ``on_matmul`` (set by the BOPs counter) is
    called with the MAC counts of the two products.
    """

    on_matmul = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        quant: AttentionQuantizers = attn.ptqd_quant
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

        hidden_states = self.attend(attn, quant, query, key, value, attention_mask)
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

    def attend(self, attn, quant, query, key, value, attention_mask):
        """softmax(Q·Kᵀ·scale + mask)·V with quantized Q, K, V and softmax output (per head)."""
        scores = quant.q(query) @ quant.k(key).transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        probs = quant.softmax(scores.softmax(dim=-1))
        return probs @ quant.v(value)
