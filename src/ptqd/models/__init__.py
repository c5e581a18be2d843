"""Model loading: the bundled zoo and diffusers model directories, behind one adapter."""

from ptqd.models.loading import DiffusionModel, list_models, load

__all__ = ["DiffusionModel", "list_models", "load"]
