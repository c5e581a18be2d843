"""Fake quantization of diffusers denoisers: quantizers, quantized layers, model wrapping, switches."""

from ptqd.quant.quantizer import ActQuantizer, QuantSpec, WeightQuantizer, fake_quant, search_qparams
from ptqd.quant.wrap import (
    QuantConfig,
    act_quantizers,
    current_act_bits,
    find_unsupported,
    load_quant_state,
    quant_layers,
    quant_state,
    set_act_bits,
    set_quant_state,
    weight_quantizers,
    wrap_model,
)

__all__ = [
    "ActQuantizer",
    "QuantConfig",
    "QuantSpec",
    "WeightQuantizer",
    "act_quantizers",
    "current_act_bits",
    "fake_quant",
    "find_unsupported",
    "load_quant_state",
    "quant_layers",
    "quant_state",
    "search_qparams",
    "set_act_bits",
    "set_quant_state",
    "weight_quantizers",
    "wrap_model",
]
