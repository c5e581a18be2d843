"""Time-step-aware calibration data (Q-Diffusion): network inputs taken along the FP sampler's trajectory.

The FP model samples ``num_samples`` images with the target sampler; at ``num_steps`` evenly spaced
sampler steps the input (x_t, t, class label) is kept. Saved as safetensors with the settings as
metadata, so a run can reuse it and refuse data from another model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqd import __version__, defaults
from ptqd.errors import PtqdError
from ptqd.io import atomic_path
from ptqd.models.loading import DiffusionModel
from ptqd.sampling import SamplerConfig, make_scheduler, sample

CALIB_SEED = defaults.CALIB_SEED  # differs from the evaluation seeds (0, 1, 2, …): calibration never sees their noise


@dataclass
class CalibrationSet:
    """Inputs of the denoiser: x (M, C, H, W), t (M,), labels (M,) or None; ``meta`` says how they were made."""

    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    def network_inputs(self, null_class: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the network actually sees: with classifier-free guidance each input runs twice,
        with its label and with the null class, so both are calibrated for."""
        guidance = self.meta.get("guidance") or 1.0
        if self.labels is None or guidance == 1.0 or null_class is None:
            return self.x, self.t, self.labels
        null = torch.full_like(self.labels, null_class)
        return torch.cat([self.x, self.x]), torch.cat([self.t, self.t]), torch.cat([self.labels, null])


def kept_steps(steps: int, num_steps: int) -> list[int]:
    """Indices (into the sampler's timesteps) of ``num_steps`` evenly spaced steps, first and last included."""
    num_steps = max(1, min(num_steps, steps))
    return sorted({int(round(v)) for v in np.linspace(0, steps - 1, num_steps)})


@torch.no_grad()
def collect_calibration(
    model: DiffusionModel,
    num_samples: int = 256,
    sampler: SamplerConfig | None = None,
    num_steps: int = 10,
    seed: int = CALIB_SEED,
    progress: bool = True,
) -> CalibrationSet:
    """Run the FP sampler for ``num_samples`` images and keep the denoiser inputs at ``num_steps`` steps."""
    if num_samples < 1:
        raise PtqdError(f"calibration needs at least 1 sample, got {num_samples}")
    sampler = SamplerConfig(**{**asdict(sampler or SamplerConfig()), "seed": seed})
    sampler.validate()
    timesteps = make_scheduler(model, sampler.scheduler, sampler.steps).timesteps.tolist()
    keep = {int(timesteps[i]) for i in kept_steps(sampler.steps, num_steps)}
    xs, ts, ys = [], [], []

    def recording_denoise(x, t, y, guidance):
        if int(t) in keep:
            xs.append(x.clone())
            ts.append(torch.full((len(x),), int(t), dtype=torch.long))
            if y is not None:
                ys.append(y.clone())
        return model.denoise(x, t, y, guidance)

    try:
        sample(model, num_samples, sampler, progress=progress, denoise=recording_denoise)
    except PtqdError as e:
        raise PtqdError(f"collecting calibration data: {e}") from None
    meta = {
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "num_samples": num_samples,
        "num_steps": len(keep),
        "timesteps": sorted(keep, reverse=True),
        "ptqd": __version__,
        **{k: v for k, v in asdict(sampler).items() if k != "batch_size"},
    }
    if not model.conditional:
        meta["guidance"] = None
    return CalibrationSet(torch.cat(xs), torch.cat(ts), torch.cat(ys) if ys else None, meta)


def save_calibration(calib: CalibrationSet, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"x": calib.x.contiguous(), "t": calib.t.contiguous()}
    if calib.labels is not None:
        tensors["labels"] = calib.labels.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ptqd_calibration": json.dumps(calib.meta)})
    return path


def load_calibration(path: str | Path, model: DiffusionModel | None = None) -> CalibrationSet:
    """Read a calibration file; with ``model``, refuse data collected with a different model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"calibration file {path} does not exist")
    # rerunning `ptqd quantize` would read this file again: say how to get rid of it instead
    fix = f"delete {path} (the next `ptqd quantize` collects the data again) or choose a new --out"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ptqd_calibration", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PtqdError(f"{path} is not a readable calibration file ({e}); {fix}") from None
    if not isinstance(meta, dict) or "x" not in tensors or "t" not in tensors:
        raise PtqdError(f"{path} is not a ptqd calibration file (no 'ptqd_calibration' metadata or no x/t tensors); {fix}")
    x, t, labels = tensors["x"], tensors["t"], tensors.get("labels")
    if x.ndim != 4 or t.shape != (len(x),) or (labels is not None and labels.shape != (len(x),)):
        raise PtqdError(f"{path}: tensors x {tuple(x.shape)}, t {tuple(t.shape)}"
                        f"{'' if labels is None else f', labels {tuple(labels.shape)}'} do not fit (N, C, H, W) / (N,); {fix}")
    if model is not None and meta.get("model_fingerprint") != model.fingerprint():
        raise PtqdError(
            f"{path} was collected with model {meta.get('model')} (fingerprint {meta.get('model_fingerprint')}), "
            f"not {model.name} ({model.fingerprint()}); collect calibration data for this model"
        )
    return CalibrationSet(tensors["x"], tensors["t"], tensors.get("labels"), meta)


@torch.no_grad()
def record_forward_loop(model: DiffusionModel, forward_loop) -> CalibrationSet:
    """Calibration inputs from a user's ``forward_loop(denoiser)`` (ModelOpt's convention): every call
    it makes to the FP denoiser is recorded (sample, timestep, class labels) and becomes calibration data
    as it was called (with guidance, both branches are whatever the loop passed)."""
    xs, ts, ys = [], [], []

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if x is None or t is None:
            raise PtqdError("forward_loop called the denoiser without a sample and a timestep")
        t = torch.as_tensor(t).reshape(-1).to(torch.long).cpu()
        xs.append(x.detach().cpu().float())
        ts.append(t.expand(len(x)).clone() if t.numel() == 1 else t)
        y = kwargs.get("class_labels")
        if y is not None:
            ys.append(torch.as_tensor(y).reshape(-1).cpu())

    handle = model.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        forward_loop(model.unet)
    finally:
        handle.remove()
    if not xs:
        raise PtqdError("forward_loop never called the denoiser it was given: it must run it on representative inputs")
    if ys and len(ys) != len(xs):
        raise PtqdError("forward_loop passed class_labels on some calls only: pass them on every call of a class-conditional model")
    meta = {
        "model": model.name, "model_fingerprint": model.fingerprint(), "source": "forward_loop",
        "num_inputs": int(sum(len(x) for x in xs)), "guidance": None, "ptqd": __version__,
    }
    return CalibrationSet(torch.cat(xs), torch.cat(ts), torch.cat(ys) if ys else None, meta)
