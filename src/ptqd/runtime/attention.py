"""Attention for the integer backend: the simulated model's quantized attention, computed in tiles.

The two attention products (Q·Kᵀ and softmax·V) have no fast integer kernel on the CPU, so they run
in float on quantized values, as in the simulated model. What made them slow was not the products
but the passes over the full score tensor (16×32×256×256 floats per call on a CIFAR-sized UNet, far
larger than the caches): scores, softmax, the softmax output's quantizer and its mask. Here the
scores are computed one cache-sized tile at a time (several batch elements, a group of heads or, for
long sequences, a block of query rows), so every pass stays in cache, and the softmax output is quantized in place onto its integer grid
``clamp(round(p / s) + z) − z``; the products with V of those exact small integers are scaled by
``s`` once at the end. The attention scale is applied to Q (the small tensor) rather than to the
scores, and the second product is computed transposed (Vᵀ·Pᵀ), which BLAS runs ~4× faster for small
head dimensions. Same math as :class:`ptqd.quant.layers.QuantAttnProcessor` up to float summation order.
"""

from __future__ import annotations

import torch

from ptqd.quant.layers import QuantAttnProcessor
from ptqd.quant.quantizer import PASS_BITS, qrange

TILE_BYTES = 1 << 20  # score tile size on the CPU: about a core's L2 cache
TILE_BYTES_CUDA = 1 << 28  # on a GPU tiles only bound the memory of long sequences


def fused_fake_quant(aq, x: torch.Tensor) -> torch.Tensor:
    """``aq(x)`` (an ActQuantizer at its current bit-width) in two fast passes: quantize into a uint8/int8
    container and dequantize (grids narrower than the container are clamped afterwards, exactly, since
    the values are grid points). Like the integer layers' input quantization it rounds ``x·(1/s)``, so
    a value within float rounding of a .5 tie can land one step from the simulated one (~1e-5 of them)."""
    if not aq.enabled or aq.bits >= PASS_BITS:
        return x
    qmin, qmax = qrange(aq.bits, aq.spec.symmetric)
    s, z = float(aq.current_scale()), int(aq.current_zero_point())
    if x.device.type != "cpu" or not (0 <= qmin and qmax <= 255 and 0 <= z <= 255 or -128 <= qmin and qmax <= 127 and z == 0):
        return torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    dtype = torch.quint8 if qmin >= 0 else torch.qint8
    out = torch.quantize_per_tensor(x.float(), s, z, dtype).dequantize()
    if qmax - qmin < 255:
        out.clamp_((qmin - z) * s, (qmax - z) * s)
    return out


def tiled_quant_attention(query, key, value, attention_mask=None, probs_grid=None, tile_bytes: int | None = None):
    """``softmax(query·keyᵀ + mask)·value`` over (batch, heads, tokens, dim) tensors, one tile at a time:
    several batch elements when their heads fit a tile (small models: few, large tiles), else a group of
    heads, else (long sequences) a block of query rows. ``probs_grid`` = (scale, zero_point, qmin, qmax)
    quantizes the softmax output (as ``ActQuantizer`` does: round(p / scale) + zero_point, clamped);
    None keeps it float. ``attention_mask`` broadcasts to (batch, heads, tokens, keys)."""
    tile_bytes = tile_bytes or (TILE_BYTES if query.device.type == "cpu" else TILE_BYTES_CUDA)
    b, h, n, _ = query.shape
    m, dv = key.shape[-2], value.shape[-1]
    keys_t, values_t = key.transpose(-1, -2), value.transpose(-1, -2)
    # the second product is computed transposed, Vᵀ·Pᵀ: with a head dimension of 8 BLAS is ~4x faster
    # at (dv × m)·(m × n) than at (n × m)·(m × dv)
    out_t = query.new_empty(b, h, dv, n)
    per_head = n * m * query.element_size()
    batches, heads, rows = 1, h, n
    if per_head * h <= tile_bytes:
        batches = tile_bytes // (per_head * h)
    elif per_head <= tile_bytes:
        heads = tile_bytes // per_head
    else:
        heads, rows = 1, max(1, tile_bytes // (m * query.element_size()))
    mask = attention_mask
    for b0 in range(0, b, batches):
        b1 = min(b, b0 + batches)
        for h0 in range(0, h, heads):
            h1 = min(h, h0 + heads)
            kt, vt = keys_t[b0:b1, h0:h1], values_t[b0:b1, h0:h1]
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                scores = torch.matmul(query[b0:b1, h0:h1, r0:r1], kt)
                if mask is not None:
                    mt = mask[b0:b1] if mask.shape[0] > 1 else mask
                    mt = mt[:, h0:h1] if mt.shape[1] > 1 else mt
                    mt = mt[:, :, r0:r1] if mt.shape[2] > 1 else mt
                    if mt.dtype == torch.bool:
                        scores.masked_fill_(~mt, float("-inf"))
                    else:
                        scores.add_(mt)
                probs = torch.softmax(scores, dim=-1)
                del scores
                if probs_grid is not None:
                    s, z, qmin, qmax = probs_grid
                    probs.div_(s).round_()
                    if z:
                        probs.add_(z)
                    probs.clamp_(qmin, qmax)
                    if z:
                        probs.sub_(z)
                if r1 - r0 == n:  # whole heads: a contiguous block of ``out_t``
                    torch.matmul(vt, probs.transpose(-1, -2), out=out_t[b0:b1, h0:h1])
                else:
                    out_t[b0:b1, h0:h1, :, r0:r1] = torch.matmul(vt, probs.transpose(-1, -2))
    if probs_grid is not None:
        out_t.mul_(probs_grid[0])
    return out_t.transpose(-1, -2)


class FusedQuantAttnProcessor(QuantAttnProcessor):
    """Same computation as :class:`ptqd.quant.layers.QuantAttnProcessor`, in cache-sized tiles."""

    def attend(self, attn, quant, query, key, value, attention_mask):
        sm = quant.softmax
        grid = None
        if sm.enabled and sm.bits < PASS_BITS:
            qmin, qmax = qrange(sm.bits, sm.spec.symmetric)
            grid = (float(sm.current_scale()), int(sm.current_zero_point()), qmin, qmax)
        q = fused_fake_quant(quant.q, query) * attn.scale
        return tiled_quant_attention(q, fused_fake_quant(quant.k, key), fused_fake_quant(quant.v, value), attention_mask, grid)
