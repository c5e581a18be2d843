"""Load a diffusion model (zoo name or diffusers directory) behind one adapter: ``denoise(x, t, labels, guidance)``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqd.errors import PtqdError
from ptqd.models.zoo import ZOO_NAMES, zoo_path


@dataclass
class DiffusionModel:
    """A denoiser plus what sampling needs to know about it.

    ``denoise`` is the only way the rest of ptqd calls the network, so a quantized copy of ``unet``
    (same interface) drops in unchanged.
    """

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    num_classes: int = 0  # 0: unconditional
    null_class: int | None = None  # class id of the unconditional branch for classifier-free guidance
    image_size: int = 16
    channels: int = 1
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        unet: nn.Module | None = None,
    ) -> torch.Tensor:
        """Noise prediction at timestep ``t``; with classifier-free guidance when ``guidance != 1``.

        eps = eps(x, null) + guidance * (eps(x, label) - eps(x, null)), both branches in one batch.
        ``unet`` replaces the model's own network for this call (used to compare FP and quantized).
        """
        net = unet if unet is not None else self.unet
        if not self.conditional:
            return net(x, t).sample
        if labels is None:
            raise PtqdError(f"model {self.name} is class-conditional: pass class labels")
        if guidance == 1.0:
            return net(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.null_class)
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
        out = net(torch.cat([x, x]), t2, class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def to(self, device: str | torch.device) -> "DiffusionModel":
        """Move the denoiser to ``device`` (in place); returns self."""
        try:
            self.unet.to(device)
        except (RuntimeError, AssertionError) as e:
            raise PtqdError(f"cannot use device {device!r}: {e}") from e
        return self

    def fingerprint(self) -> str:
        """Hash of the weights and config: statistics and artifacts record it to refuse mismatches."""
        h = hashlib.sha256()
        h.update(json.dumps(dict(getattr(self.unet, "config", {})), sort_keys=True, default=str).encode())
        for name, t in sorted(self.unet.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def list_models() -> list[str]:
    """Names of the bundled models."""
    return list(ZOO_NAMES)


def load(name_or_path: str | Path) -> DiffusionModel:
    """Load a bundled model by name (``digits16-cond``, ``digits16``) or a model directory.

    A directory holds ``unet/`` (diffusers UNet2DModel: config.json + safetensors) and
    ``scheduler/`` (scheduler_config.json), as ``save_pretrained`` writes them, and optionally
    ``ptqd_model.json`` with the class count. Nothing is downloaded.
    """
    s = str(name_or_path)
    if s in ZOO_NAMES:
        path = zoo_path(s)
        if not (path / "unet").is_dir():
            raise PtqdError(f"bundled model {s} is missing from {path}; rerun scripts/train_zoo.py --model {s}")
    else:
        path = Path(s).expanduser()
        if not path.exists():
            raise PtqdError(
                f"unknown model {s!r}: not a bundled model ({', '.join(ZOO_NAMES)}) and no such directory"
            )
        if not path.is_dir():
            raise PtqdError(f"model path {path} is a file; pass the model directory (with unet/ and scheduler/)")
    return _load_dir(path, name=s if s in ZOO_NAMES else path.name)


def _load_dir(path: Path, name: str) -> DiffusionModel:
    from diffusers import UNet2DModel

    unet_dir = path / "unet"
    sched_file = path / "scheduler" / "scheduler_config.json"
    for need in (unet_dir / "config.json", sched_file):
        if not need.is_file():
            raise PtqdError(f"model directory {path} has no {need.relative_to(path)}; save the model with save_pretrained")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:
        raise PtqdError(f"cannot load the UNet in {unet_dir}: {e}") from e
    unet.eval().requires_grad_(False)
    try:
        scheduler_config = json.loads(sched_file.read_text())
    except json.JSONDecodeError as e:
        raise PtqdError(f"{sched_file} is not valid JSON: {e}") from e
    info: dict[str, Any] = {}
    info_file = path / "ptqd_model.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
    n_embeds = unet.config.num_class_embeds
    num_classes = int(info.get("num_classes", (n_embeds - 1) if n_embeds else 0))
    null_class = info.get("null_class", (n_embeds - 1) if n_embeds else None)
    size = unet.config.sample_size
    return DiffusionModel(
        name=name,
        unet=unet,
        scheduler_config=scheduler_config,
        num_classes=num_classes,
        null_class=null_class,
        image_size=int(size if isinstance(size, int) else size[0]),
        channels=int(unet.config.in_channels),
        path=path,
        info=info,
    )
