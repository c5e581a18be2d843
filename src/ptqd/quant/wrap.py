"""Turn a diffusers denoiser into a fake-quantized one, module by module, without editing model code.

``wrap_model(net, config)`` returns a quantized copy: every ``nn.Conv2d`` and ``nn.Linear`` becomes
a ``QuantLayer``; every diffusers ``Attention`` gets a processor that quantizes its two matrix
products; the first and last layer stay at 8 bit (``first_last_bits``); layers whose input is a
concatenation of two tensors along channels (the skip connections of UNet up blocks) get
split quantizers when ``split_shortcut`` is on. Modules it cannot quantize and does not know to be
safe in float make it fail with a list of them; nothing is skipped silently.

The quantizers start uncalibrated: ``ptqd.calibration`` sets their scales.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ptqd.errors import PtqdError
from ptqd.quant.layers import AttentionQuantizers, QuantAttnProcessor, QuantLayer
from ptqd.quant.quantizer import PASS_BITS, SCALE_METHODS, ActQuantizer, QuantSpec, WeightQuantizer, check_bits

# Leaf modules with parameters that stay in float on purpose (normalisations and lookups: no matmul).
FLOAT_OK = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)


@dataclass
class QuantConfig:
    """What to quantize and how. Bit-widths 2–8, or 16 for "leave in float"."""

    weight_bits: int = 8
    act_bits: int = 8
    extra_act_bits: list[int] = field(default_factory=list)  # also calibrated, for switching per step
    softmax_bits: int = 8
    weight_symmetric: bool = False
    weight_per_channel: bool = True
    act_symmetric: bool = False
    weight_method: str | None = None  # minmax | mse | percentile; None: the calibration method's default
    act_method: str | None = None
    percentile: float = 99.99
    first_last_bits: int | None = 8  # first and last layer at max(this, chosen bits); None: no exception
    eight_bit_layers: list[str] = field(default_factory=list)  # name patterns also kept at ≥ 8 bit
    keep_float: list[str] = field(default_factory=list)  # name patterns left unquantized (reported)
    quantize_attention: bool = True
    split_shortcut: bool = True

    def validate(self) -> None:
        check_bits(self.weight_bits, "weight bit-width")
        check_bits(self.act_bits, "activation bit-width")
        check_bits(self.softmax_bits, "softmax bit-width")
        for b in self.extra_act_bits:
            check_bits(b, "activation bit-width")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first/last layer bit-width")
        for m in (self.weight_method, self.act_method):
            if m is not None and m not in SCALE_METHODS:
                raise PtqdError(f"unknown scale method {m!r}: use one of {', '.join(SCALE_METHODS)}")

    @property
    def act_bit_options(self) -> list[int]:
        return sorted({self.act_bits, *self.extra_act_bits})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise PtqdError(f"unknown quantization settings {sorted(unknown)}; this run was written by another ptqd version")
        return cls(**d)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _is_attention(m: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(m, Attention)


def _check_attention(name: str, attn: nn.Module) -> str | None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0)):
        return f"{name} (Attention with processor {type(attn.processor).__name__})"
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return f"{name} (Attention with added key/value projections)"
    return None


def find_unsupported(net: nn.Module, keep_float: list[str] = (), attention: bool = True) -> tuple[list[str], list[str]]:
    """(unsupported, kept-in-float) module descriptions for ``net``.

    Unsupported: leaf modules with weights that are neither Conv2d/Linear nor a known float-safe
    type (normalisation, embedding), and attention modules whose processor ptqd cannot quantize.
    """
    unsupported, kept = [], []
    for name, m in net.named_modules():
        if _matches(name, list(keep_float)) and name:
            continue
        if _is_attention(m):
            problem = _check_attention(name, m) if attention else None
            if problem:
                unsupported.append(problem)
            continue
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own:
            continue
        if type(m) in (nn.Conv2d, nn.Linear):
            continue
        if isinstance(m, FLOAT_OK):
            kept.append(f"{name} ({type(m).__name__})")
        elif list(m.children()):
            kept.append(f"{name} (parameters {', '.join(own)} of {type(m).__name__})")
        else:
            unsupported.append(f"{name} ({type(m).__name__})")
    return unsupported, kept


def find_concat_splits(net: nn.Module, run_once: Callable[[nn.Module], Any]) -> dict[str, int]:
    """Layers whose input is a two-way channel concatenation, with the channel count of the first part.

    Found by running ``run_once(net)`` with ``torch.cat`` instrumented: a Conv2d/Linear that receives
    the result of ``torch.cat([a, b], dim=1)`` directly (UNet up blocks' skip connections) is listed.
    """
    splits: dict[str, int] = {}
    real_cat = torch.cat

    def tagging_cat(tensors, dim=0, **kwargs):
        out = real_cat(tensors, dim=dim, **kwargs)
        seq = list(tensors)
        if len(seq) == 2 and dim in (1, -3) and seq[0].ndim == 4:
            out._ptqd_split = seq[0].shape[1]
        return out

    hooks = []
    for name, m in net.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, QuantLayer):

            def pre(mod, args, name=name):
                s = getattr(args[0], "_ptqd_split", None) if args else None
                if s:
                    splits[name] = int(s)

            hooks.append(m.register_forward_pre_hook(pre))
    torch.cat = tagging_cat
    try:
        with torch.no_grad():
            run_once(net)
    finally:
        torch.cat = real_cat
        for h in hooks:
            h.remove()
    return splits


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def wrap_model(
    net: nn.Module,
    config: QuantConfig,
    run_once: Callable[[nn.Module], Any] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A quantized copy of ``net`` (uncalibrated). ``run_once`` runs one forward, for split detection."""
    config.validate()
    unsupported, _ = find_unsupported(net, config.keep_float, config.quantize_attention)
    if unsupported:
        raise PtqdError(
            "cannot quantize these modules (no quantized version, and not known to be safe in float):\n  "
            + "\n  ".join(unsupported)
            + "\nleave them in float explicitly with keep_float / --keep-float NAME, or file an issue"
        )
    net = net if inplace else copy.deepcopy(net)
    splits = find_concat_splits(net, run_once) if (config.split_shortcut and run_once is not None) else {}

    layer_names = [n for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and not _matches(n, config.keep_float)]
    if not layer_names:
        raise PtqdError(f"{type(net).__name__} has no Conv2d or Linear layers to quantize")
    edge = {layer_names[0], layer_names[-1]} if config.first_last_bits is not None else set()
    act_options = config.act_bit_options
    for name in layer_names:
        fp = net.get_submodule(name)
        high = name in edge or _matches(name, config.eight_bit_layers)
        floor = config.first_last_bits or 8
        wbits = max(config.weight_bits, floor) if high else config.weight_bits
        w_spec = QuantSpec(wbits, config.weight_symmetric, config.weight_per_channel, config.weight_method or "minmax", config.percentile)
        if high:
            abits = max(config.act_bits, floor)
            a_spec = QuantSpec(abits, config.act_symmetric, False, config.act_method or "minmax", config.percentile)
            layer = QuantLayer(fp, w_spec, a_spec, [abits], fixed_act=True, split=splits.get(name, 0))
        else:
            a_spec = QuantSpec(config.act_bits, config.act_symmetric, False, config.act_method or "minmax", config.percentile)
            layer = QuantLayer(fp, w_spec, a_spec, act_options, split=splits.get(name, 0))
        layer.ptqd_name = name
        _set_module(net, name, layer)

    if config.quantize_attention:
        sm_spec = QuantSpec(config.softmax_bits, False, False, config.act_method or "minmax", config.percentile)
        a_spec = QuantSpec(config.act_bits, config.act_symmetric, False, config.act_method or "minmax", config.percentile)
        for name, m in net.named_modules():
            if _is_attention(m) and not _matches(name, config.keep_float):
                m.ptqd_quant = AttentionQuantizers(a_spec, act_options, sm_spec)
                m.set_processor(QuantAttnProcessor())
    net.ptqd_config = config
    return net


# --------------------------------------------------------------------------------------------
# Inspection and switches


def quant_layers(net: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, m in net.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def weight_quantizers(net: nn.Module) -> Iterator[tuple[str, WeightQuantizer]]:
    for name, m in net.named_modules():
        if isinstance(m, WeightQuantizer):
            yield name, m


def act_quantizers(net: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    for name, m in net.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def is_quantized(net: nn.Module) -> bool:
    return any(True for _ in quant_layers(net))


def set_quant_state(net: nn.Module, weights: bool | None = None, acts: bool | None = None) -> None:
    """Turn weight and/or activation quantization on or off (None leaves it as it is)."""
    if weights is not None:
        for _, q in weight_quantizers(net):
            q.enabled = weights
    if acts is not None:
        for _, q in act_quantizers(net):
            q.enabled = acts


def set_act_bits(net: nn.Module, bits: int) -> None:
    """Switch every switchable activation quantizer to ``bits`` (must have been calibrated; 16: activations
    left in float, a weight-only model, when it was calibrated with ``act_bits=16``)."""
    for _, q in act_quantizers(net):
        q.set_bits(bits)


def current_act_bits(net: nn.Module) -> int | None:
    for _, q in act_quantizers(net):
        if not q.fixed:
            return q.bits
    return None


def quant_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer's calibrated state, flat (for safetensors)."""
    out = {}
    for name, q in [*weight_quantizers(net), *act_quantizers(net)]:
        if not q.calibrated:
            raise PtqdError(f"quantizer {name} is not calibrated; nothing to save")
        for k, v in q.state().items():
            out[f"{name}.{k}"] = v.detach().contiguous().clone()
    return out


def load_quant_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``quant_state``; refuses a state with missing or unexpected quantizers."""
    quantizers = dict([*weight_quantizers(net), *act_quantizers(net)])
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        owner, _, leaf = key.rpartition(".")
        grouped.setdefault(owner, {})[leaf] = v
    missing = sorted(set(quantizers) - set(grouped))
    extra = sorted(set(grouped) - set(quantizers))
    if missing or extra:
        raise PtqdError(
            f"quantizer state does not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}); it was made with another model or settings"
        )
    for name, q in quantizers.items():
        q.load_state(grouped[name])
