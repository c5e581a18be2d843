"""A diffusers pipeline for class-conditional ``UNet2DModel`` denoisers with classifier-free guidance
(the bundled digits models), and building pipelines for ptqd's models.

``ClassConditionalPipeline`` calls ``self.unet(...)`` then ``self.scheduler.step(...)`` like every
diffusers pipeline, so a quantized denoiser and a correcting scheduler slot into it. Its guidance is
computed exactly as ptqd's own sampler computes it (both branches in one batch, the null class last),
and with the per-sample generators of :func:`ptqd.sampling.sample_generators` it draws the same
noise as ``ptqd sample``. For a latent model (``digits-ldm``) it holds the full-precision autoencoder
as ``vae`` and decodes the final latents with it (``latents / vae.config.scaling_factor``), as
``DiffusionModel.to_images`` does; the autoencoder is never quantized.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ptqd.errors import PtqdError


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=50, eta=1.0, generator=…)``.

    The UNet's class table holds the classes and, as its last row, the null class used for guidance.
    ``vae`` (optional, an AutoencoderKL or VQModel): the UNet denoises latents and ``vae`` decodes them.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @property
    def num_classes(self) -> int:
        n = getattr(self.unet.config, "num_class_embeds", None)
        if not n:
            raise PtqdError("ClassConditionalPipeline needs a UNet2DModel with a class table (num_class_embeds)")
        return int(n) - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Images of ``class_labels`` (default: 0..num_classes−1, or ``batch_size`` of them cycled).
        ``output_type``: ``pil``, ``np`` (float in [0, 1], N×H×W×C) or ``pt`` (float in [0, 1], N×C×H×W)."""
        if class_labels is None:
            n = batch_size or self.num_classes
            class_labels = [i % self.num_classes for i in range(n)]
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        bad = [int(c) for c in labels if not 0 <= int(c) < self.num_classes]
        if bad:
            raise PtqdError(f"class labels {bad} out of range: this model has classes 0..{self.num_classes - 1}")
        if output_type not in ("pil", "np", "pt"):
            raise PtqdError(f"output_type must be pil, np or pt, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != len(labels):
            raise PtqdError(f"{len(generator)} generators for {len(labels)} images: give one per image")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        device = self._execution_device
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        labels = labels.to(device)
        null = torch.full_like(labels, self.null_class)
        self.scheduler.set_timesteps(num_inference_steps)
        x = x * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale == 1.0:
                eps = self.unet(x, t, class_labels=labels).sample
            else:
                cond, uncond = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            kwargs: dict[str, Any] = {"generator": generator}
            if "eta" in _step_params(self.scheduler):
                kwargs["eta"] = eta
            x = self.scheduler.step(eps, t, x, **kwargs).prev_sample
        if getattr(self, "vae", None) is not None:  # latent model: the FP decoder makes the images
            scale = getattr(self.vae.config, "scaling_factor", None) or 1.0
            x = self.vae.decode(x.to(self.vae.dtype) / scale).sample.float()
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def _step_params(scheduler) -> set[str]:
    import inspect

    inner = getattr(scheduler, "base", scheduler)  # ptqd's correcting wrapper takes what its scheduler takes
    return set(inspect.signature(inner.step).parameters)


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """A pipeline's ``np`` output (float in [0, 1], N×H×W×C) as uint8, as ``ptqd sample`` stores images."""
    return np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
