"""Adapters: how to call each kind of denoiser, so the rest of ptqd sees only ``eps = adapter(net, x, t, cond)``.

``cond`` is always a (B,) integer tensor (or None for unconditional models):

* ``UNetAdapter`` (diffusers ``UNet2DModel``): class ids go to ``class_labels``.
* ``ContextAdapter`` (``UNet2DConditionModel``): the ids index a table of cross-attention contexts,
  (E, L, D), held by the adapter: Stable Diffusion prompt embeddings from the FP text encoder (one row
  per prompt of the prompts file, plus the empty prompt for guidance), or the class embeddings of a
  converted CompVis class-conditional LDM.
* ``DiTAdapter`` (``DiTTransformer2DModel`` / ``Transformer2DModel`` with ada-norm-zero): ids go to
  ``class_labels``; with learned sigma (out_channels = 2 × in_channels) only the first half, the noise
  prediction, is returned. The variance half is computed and dropped, as diffusers' DiTPipeline does:
  DDIM never uses it, and ptqd's DDPM runs with fixed variances (see ``loading``). PTQD's statistics
  and corrections therefore see ε only.

``LatentDecoder`` turns final latents into images with the full-precision VQModel/AutoencoderKL.
The quantized network is a drop-in replacement for ``net``: adapters hold no weights of the denoiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptqd.errors import PtqdError


class Adapter:
    """Calls one kind of denoiser. Subclasses implement ``__call__(net, x, t, cond) -> eps``."""

    kind = "base"

    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Adapter":
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class UNetAdapter(Adapter):
    """``UNet2DModel``: ``net(x, t, class_labels=cond)``."""

    kind = "unet"

    def __call__(self, net, x, t, cond):
        if cond is None:
            return net(x, t).sample
        return net(x, t, class_labels=cond).sample


class ContextAdapter(Adapter):
    """``UNet2DConditionModel``: ``net(x, t, encoder_hidden_states=context[cond])``.

    ``context`` is (E, L, D); ``names`` says what each row is (prompts, class names) for the records.
    """

    kind = "cross-attention"

    def __init__(self, context: torch.Tensor, names: list[str] | None = None, source: str = "context"):
        if context.ndim != 3:
            raise PtqdError(f"cross-attention context must be (entries, tokens, dim), got shape {tuple(context.shape)}")
        self.context = context
        self.names = names
        self.source = source

    def __call__(self, net, x, t, cond):
        if cond is None:
            raise PtqdError("this model is conditioned on prompts/classes: pass their ids as labels")
        ctx = self.context[cond.to(self.context.device)].to(x.dtype)
        return net(x, t, encoder_hidden_states=ctx).sample

    def to(self, device):
        self.context = self.context.to(device)
        return self

    def describe(self):
        return {"kind": self.kind, "source": self.source, "entries": int(self.context.shape[0])}


class DiTAdapter(Adapter):
    """DiT transformer: ``net(x, timestep=t (per sample), class_labels=cond)``, noise half of the output only."""

    kind = "dit"

    def __init__(self, eps_channels: int, learned_sigma: bool):
        self.eps_channels = eps_channels
        self.learned_sigma = learned_sigma

    def __call__(self, net, x, t, cond):
        if cond is None:
            raise PtqdError("DiT models are class-conditional: pass class labels")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(len(x))
        out = net(x, timestep=t, class_labels=cond).sample
        return out[:, : self.eps_channels] if self.learned_sigma else out

    def describe(self):
        return {"kind": self.kind, "learned_sigma": self.learned_sigma, "variance_half": "dropped" if self.learned_sigma else None}


class LatentDecoder:
    """Full-precision VQModel/AutoencoderKL decoder: latents → images in [-1, 1] (``latents / scaling_factor``)."""

    def __init__(self, vae: nn.Module, scaling_factor: float, batch_size: int = 16):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = latents[i : i + self.batch_size].to(p.device, p.dtype) / self.scaling_factor
            out.append(self.vae.decode(z).sample.float())
        return torch.cat(out)

    def to(self, device):
        self.vae.to(device)
        return self

    def describe(self):
        return {"decoder": type(self.vae).__name__, "scaling_factor": self.scaling_factor}


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """CLIP text embeddings (len(prompts), L, D) from the FP text encoder, padded to the tokenizer's max length."""
    text_encoder.eval()
    p = next(text_encoder.parameters())
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(
            prompts[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(p.device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"prompts file {path} does not exist; give a text file with one prompt per line")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PtqdError(f"prompts file {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts
