"""Real low-bit execution: packed quantized checkpoints and integer Conv2d/Linear kernels."""

from ptqd.runtime.checkpoint import BACKENDS, FORMAT, MANIFEST, VERSION, export, is_checkpoint, load_checkpoint, read_manifest
from ptqd.runtime.kernels import IntLayer, cpu_features, int_mm, integer_weight, kernel_for, set_kernel, supported_kernels
from ptqd.runtime.speed import measure_speed

__all__ = [
    "BACKENDS",
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "IntLayer",
    "cpu_features",
    "export",
    "int_mm",
    "integer_weight",
    "is_checkpoint",
    "kernel_for",
    "load_checkpoint",
    "measure_speed",
    "read_manifest",
    "set_kernel",
    "supported_kernels",
]
