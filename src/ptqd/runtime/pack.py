"""Packing of low-bit unsigned integers: two 4-bit values per byte (low nibble first)."""

from __future__ import annotations

import torch

from ptqd.errors import PtqdError


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Flatten ``u`` (integers 0..15) and pack pairs into bytes; an odd count is padded with 0."""
    flat = u.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise PtqdError("values above 15 cannot be packed into 4 bits")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``numel`` values (uint8, flat)."""
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 1) // 2:
        raise PtqdError(f"packed 4-bit data has {packed.numel()} bytes of {packed.dtype}; expected {(numel + 1) // 2} uint8 bytes")
    out = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


def bytes_per_value(bits: int) -> float:
    return 0.5 if bits <= 4 else 1.0
