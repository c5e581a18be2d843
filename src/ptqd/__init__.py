"""ptqd: post-training quantization of diffusion models with PTQD noise correction.

The public API (``ptqd.quantize``, ``ptqd.save``, ``ptqd.load``, ``ptqd.plan``, ``ptqd.load_pipeline``,
the configs ``ptqd.W8A8`` / ``W4A8`` / ``W4A4`` / ``QuantConfig`` and ``ptqd.SamplerConfig``) is
imported on first use, so ``import ptqd`` and the command line start fast.
"""

__version__ = "0.1.0"

_API = {
    "quantize": "ptqd.api", "save": "ptqd.api", "load": "ptqd.api", "plan": "ptqd.api", "load_pipeline": "ptqd.api",
    "corrected_scheduler": "ptqd.api", "W8A8": "ptqd.api", "W4A8": "ptqd.api", "W4A4": "ptqd.api",
    "QuantConfig": "ptqd.quant", "SamplerConfig": "ptqd.sampling", "QuantizedDenoiser": "ptqd.quant.denoiser",
    "PTQDScheduler": "ptqd.correction.scheduler", "ClassConditionalPipeline": "ptqd.models.pipeline",
    "sample_generators": "ptqd.sampling",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ptqd' has no attribute {name!r}")
