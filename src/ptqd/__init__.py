"""ptqd: post-training quantization of diffusion models with PTQD noise correction."""
__version__ = "0.1.0"
