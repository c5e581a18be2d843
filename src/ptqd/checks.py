"""Cheap checks that stop a run on non-finite numbers instead of writing results made of NaN."""

from __future__ import annotations

import torch
from torch import nn

from ptqd.errors import PtqdError


def first_nonfinite(module: nn.Module | None) -> str | None:
    """Name of the first parameter, buffer or quantizer scale/zero point of ``module`` holding NaN or inf."""
    if module is None:
        return None
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    for mname, m in module.named_modules():
        for attr in ("scale", "zero_point"):
            t = m.__dict__.get(attr)  # plain tensor attributes (weight quantizers), not registered ones
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{mname}.{attr}" if mname else attr
    return None


def check_finite(x: torch.Tensor, what: str, module: nn.Module | None = None) -> None:
    """Raise a PtqdError naming ``what`` (and the first non-finite weight of ``module``) if ``x`` holds NaN or inf."""
    if bool(torch.isfinite(x).all()):
        return
    name = first_nonfinite(module)
    where = f"; first non-finite weight: {name}" if name else (
        "; every weight is finite, so the activations overflow" if module is not None else ""
    )
    raise PtqdError(f"{what} is not finite (NaN or inf){where}; the run stopped before writing results from it")
