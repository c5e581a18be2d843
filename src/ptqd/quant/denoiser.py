"""The quantized-denoiser object, and the in-memory quantized run that holds it.

``QuantizedDenoiser`` is a ``torch.nn.Module`` drop-in for the diffusers denoiser it was made from
(same call, same output type, ``.config``/``.dtype``/``.device``): it owns the quantized network,
its quantization config, calibrated activation bit-widths and fingerprints, and the activation
bit-width it runs at for each timestep (one for all, or a per-step mixed-precision schedule). Each
call sets the bit-width from the timestep it is given, so any sampling loop — ptqd's or a diffusers
pipeline's own ``__call__`` — runs mixed precision without knowing it. Views with other schedules
(:meth:`QuantizedDenoiser.with_bits`) share the network; nothing is set at planning time.

``save_pretrained`` is refused: the quantized network's state is not a diffusers checkpoint (loaded
as one it would give random weights); ``ptqd.save`` writes a directory ``ptqd.load`` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel
from ptqd.quant.wrap import QuantConfig, quant_state, set_act_bits


def quant_fingerprint(qnet: nn.Module) -> str:
    """Hash of every quantizer's state: statistics of one calibration are refused by another.

    A network loaded from an exported checkpoint carries the hash of the run it was exported from
    (``ptqd_quant_fingerprint``): it runs the same quantization grids and rounded weights."""
    stored = getattr(qnet, "ptqd_quant_fingerprint", None)
    if stored:
        return stored
    h = hashlib.sha256()
    for name, t in sorted(quant_state(qnet).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def timestep_int(t: Any) -> int:
    """A sampler timestep (int, 0-d or per-sample 1-d tensor) as an int."""
    if isinstance(t, torch.Tensor):
        return int(t.reshape(-1)[0])
    return int(t)


class QuantizedDenoiser(nn.Module):
    """A quantized denoiser that runs at ``bits`` (an int) or at ``bits[t]`` for timestep ``t`` (a
    mixed-precision schedule)."""

    def __init__(self, net: nn.Module, bits: int | dict[int, int] | None = None, fp_fingerprint: str | None = None):
        super().__init__()
        if getattr(net, "ptqd_config", None) is None:
            raise PtqdError("QuantizedDenoiser wraps a network quantized by ptqd (ptqd.quant.wrap_model or ptqd.quantize)")
        self.net = net
        self.fp_fingerprint = fp_fingerprint
        bits = self.quant_config.act_bits if bits is None else bits
        self._check_bits(bits)
        self.bits = dict(bits) if isinstance(bits, dict) else int(bits)

    def _check_bits(self, bits: int | dict[int, int]) -> None:
        have = self.calibrated_bits
        wanted = set(bits.values()) if isinstance(bits, dict) else {int(bits)}
        missing = sorted(b for b in wanted if b not in have)
        if missing:
            raise PtqdError(
                f"this quantized denoiser was calibrated for {have}-bit activations, not {missing}; quantize with "
                "extra_act_bits (or mixed precision) to run at those"
            )

    # what it is
    @property
    def quant_config(self) -> QuantConfig:
        return self.net.ptqd_config

    @property
    def calibrated_bits(self) -> list[int]:
        return self.quant_config.act_bit_options

    @property
    def quant_fingerprint(self) -> str:
        return quant_fingerprint(self.net)

    @property
    def backend(self) -> str:
        return getattr(self.net, "ptqd_backend", None) or "fake"

    @property
    def mixed(self) -> bool:
        return isinstance(self.bits, dict) and len(set(self.bits.values())) > 1

    # what diffusers pipelines read from a denoiser
    @property
    def config(self):
        return self.net.config

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def bits_for(self, t: Any) -> int:
        """The activation bit-width of the call at timestep ``t``."""
        if not isinstance(self.bits, dict):
            return self.bits
        key = timestep_int(t)
        if key not in self.bits:
            known = sorted(self.bits)
            raise PtqdError(
                f"no activation bit-width for timestep {key}: this denoiser's mixed-precision schedule covers "
                f"{len(known)} timesteps ({known[-1]}…{known[0]}); plan it for the sampler you use "
                "(ptqd.plan(pipe, sampler) or `ptqd sample RUN --steps N`)"
            )
        return self.bits[key]

    def with_bits(self, bits: int | dict[int, int]) -> "QuantizedDenoiser":
        """A view of the same network at other bits (an int, or a {timestep: bits} schedule)."""
        return QuantizedDenoiser(self.net, bits, self.fp_fingerprint)

    def forward(self, *args, **kwargs):
        """Called exactly as the wrapped denoiser (``unet(sample, t, …)``, ``transformer(x, timestep=t, …)``)."""
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if t is None:
            raise PtqdError("a quantized denoiser needs the timestep of each call (positionally after the sample, or timestep=)")
        set_act_bits(self.net, self.bits_for(t))
        return self.net(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        raise PtqdError(
            "a ptqd quantized denoiser cannot be saved with save_pretrained (diffusers would store its quantizer "
            "state under names from_pretrained ignores, and load random weights): use ptqd.save(pipe_or_denoiser, DIR) "
            "and ptqd.load(DIR)"
        )

    def extra_repr(self) -> str:
        q = self.quant_config
        bits = f"schedule over {len(self.bits)} steps" if isinstance(self.bits, dict) else f"A{self.bits}"
        return f"W{q.weight_bits}, calibrated A{self.calibrated_bits}, running {bits}, backend {self.backend}"


@dataclass
class QuantizedRun:
    """A calibrated quantized network with what it came from and what it records.

    ``base`` describes the model (adapter, scheduler config, classes, decoder): the FP model for a run
    made or loaded with its FP weights; for an exported checkpoint, the model rebuilt from it without
    FP weights (``fp`` then refuses: statistics and calibration need the FP network).
    """

    base: DiffusionModel
    qnet: nn.Module
    config: dict[str, Any]
    path: Path | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: Any = None  # NoiseStats of a PTQD run collected in this process (also saved in the run directory)
    manifest: dict[str, Any] | None = None  # set for a run loaded from an exported checkpoint

    @property
    def fp(self) -> DiffusionModel:
        if self.manifest is not None:
            raise PtqdError(
                f"{self.path} is an exported checkpoint: it holds no full-precision weights, which noise statistics "
                "and calibration need; use the quantization run directory it was exported from"
            )
        return self.base

    @property
    def denoiser(self) -> QuantizedDenoiser:
        """The quantized denoiser at the run's activation bit-width."""
        return QuantizedDenoiser(self.qnet, fp_fingerprint=self.config.get("model_fingerprint"))

    @property
    def model(self) -> DiffusionModel:
        """The quantized model behind the same ``denoise`` adapter (sampling uses it unchanged)."""
        return self.model_with(self.denoiser)

    def model_with(self, denoiser: QuantizedDenoiser) -> DiffusionModel:
        q = self.config["quant"]
        tag = f"W{q['weight_bits']}A{q['act_bits']} {self.config['method']}"
        return dataclasses.replace(self.base, unet=denoiser, name=f"{self.base.name} [{tag}]", info={**self.base.info, "run": self.config})

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.config["quant"])

    @property
    def calibrated_bits(self) -> list[int]:
        return self.quant_config.act_bit_options

    def set_act_bits(self, bits: int) -> None:
        set_act_bits(self.qnet, bits)

    def to(self, device: str | torch.device) -> "QuantizedRun":
        """Move the model and the quantized network to ``device`` (in place); returns self."""
        self.base.to(device)
        self.qnet.to(device)
        return self
