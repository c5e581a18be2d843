"""The sampling loop over diffusers' DDPM and DDIM schedulers.

Deterministic and batch-size independent: sample ``i`` draws all of its noise (initial and per
step) from its own generator seeded by (seed, i), so the same seed gives the same images whatever
the batch size, and any slice of a run can be regenerated on its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ptqd import defaults
from ptqd.checks import check_finite
from ptqd.errors import PtqdError
from ptqd.images import to_uint8
from ptqd.io import SAMPLES, SAMPLES_CONFIG, check_output, write_json, write_npz
from ptqd.models.loading import DiffusionModel

SCHEDULERS = ("ddim", "ddpm")


@dataclass
class SamplerConfig:
    """How to sample. ``eta`` applies to DDIM only (DDPM is always stochastic)."""

    scheduler: str = defaults.SCHEDULER
    steps: int = defaults.STEPS
    eta: float = defaults.ETA
    guidance: float = 1.0  # the default for a model: defaults.guidance(model.conditional)
    seed: int = defaults.SEED
    batch_size: int = defaults.BATCH_SIZE

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise PtqdError(f"unknown scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise PtqdError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise PtqdError(f"eta must lie in [0, 1], got {self.eta}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise PtqdError(f"guidance must be a finite number, 0 or more (1 = no guidance), got {self.guidance}")
        if self.batch_size < 1:
            raise PtqdError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class Samples:
    """Generated images (N, H, W, C) uint8, the class labels asked for (or None), and how they were made."""

    images: np.ndarray
    labels: np.ndarray | None
    config: dict[str, Any] = field(default_factory=dict)


def make_scheduler(model: DiffusionModel, kind: str, steps: int):
    """A fresh diffusers scheduler of ``kind`` built from the model's training schedule, set to ``steps``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
    cfg = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    scheduler = cls.from_config(cfg)
    if steps > scheduler.config.num_train_timesteps:
        raise PtqdError(f"steps ({steps}) exceeds the model's {scheduler.config.num_train_timesteps} training timesteps")
    scheduler.set_timesteps(steps)
    return scheduler


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One generator per sample index: the noise of sample ``i`` depends only on (seed, i)."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + i) % (2**63 - 1)) for i in indices]


def default_labels(model: DiffusionModel, num: int, labels: list[int] | None = None) -> np.ndarray | None:
    """Labels for ``num`` samples: the given list cycled, or all class ids (prompt ids) cycled for a conditional model."""
    if not model.conditional:
        if labels:
            raise PtqdError(f"model {model.name} is unconditional: it takes no class labels")
        return None
    if labels is not None and len(labels) == 0:
        raise PtqdError("the list of class labels is empty: give at least one label, or none for all classes cycled")
    if labels:
        bad = [c for c in labels if not 0 <= c < model.num_classes]
        if bad:
            raise PtqdError(f"class labels {bad} out of range: model {model.name} has classes 0..{model.num_classes - 1}")
        base = np.asarray(labels, dtype=np.int64)
    else:
        base = np.arange(model.num_classes, dtype=np.int64)
    return np.resize(base, num)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


@dataclass
class Step:
    """What an observer of the sampling loop sees at one step, before the scheduler moves ``x``:
    step index ``i`` of ``steps``, timestep ``t``, the input ``x`` (x_t), the class labels ``y`` and
    the (guided) noise prediction ``eps`` the step will use, for the samples ``indices`` of the run."""

    i: int
    steps: int
    t: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor | None
    eps: torch.Tensor
    guidance: float
    indices: range


StepCallback = Callable[[Step], None]


@torch.no_grad()
def trajectories(
    model: DiffusionModel,
    indices: range,
    config: SamplerConfig,
    labels: np.ndarray | None = None,
    denoise: DenoiseFn | None = None,
    corrector=None,
    callback: StepCallback | None = None,
    tick: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The one sampling loop: samples ``indices`` of a run (their noise from generators seeded by
    (seed, index)) from pure noise to the final ``x_0`` (latents for latent models), one batch.

    ``labels`` are these samples' labels. ``callback(step)`` observes every step (statistics
    collection and speed measurement use it); ``tick()`` is called after each step (progress bars).
    """
    denoise = denoise or model.denoise
    guidance = config.guidance if model.conditional else 1.0
    shape = (model.channels, model.image_size, model.image_size)
    param = next(model.unet.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gens = sample_generators(config.seed, indices)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    y = torch.from_numpy(np.asarray(labels)).to(device) if labels is not None else None
    scheduler = make_scheduler(model, config.scheduler, config.steps)
    x = x * scheduler.init_noise_sigma
    where = f"samples {indices.start}..{indices.stop - 1}"
    for i, t in enumerate(scheduler.timesteps):
        eps = denoise(x, t, y, guidance)
        check_finite(eps, f"sampling: the network output at step {i + 1}/{config.steps} (t={int(t)}, {where})", model.unet)
        if callback is not None:
            callback(Step(i, config.steps, t, x, y, eps, guidance, indices))
        if corrector is not None:
            x = corrector.step(scheduler, eps, t, x, gens, eta=config.eta if config.scheduler == "ddim" else 0.0)
        else:
            kwargs = {"eta": config.eta} if config.scheduler == "ddim" else {}
            x = scheduler.step(eps, t, x, generator=gens, **kwargs).prev_sample
        if tick is not None:
            tick()
    return x


@torch.no_grad()
def sample(
    model: DiffusionModel,
    num: int,
    config: SamplerConfig | None = None,
    labels: list[int] | np.ndarray | None = None,
    progress: bool = True,
    denoise: DenoiseFn | None = None,
    corrector=None,
    first: int = 0,
    callback: StepCallback | None = None,
) -> Samples:
    """Generate ``num`` images. ``denoise(x, t, labels, guidance)`` defaults to ``model.denoise``.

    ``first`` makes these samples ``first .. first + num - 1`` of a larger run (same noise and labels
    as in the whole run): chunks of a run are generated this way (:mod:`ptqd.shards`).

    ``corrector`` (a :class:`ptqd.correction.Corrector`) takes each step instead of the scheduler
    alone: it corrects the noise prediction and, with VSC, the sampler's noise. ``callback`` observes
    every step (see :func:`trajectories`). Sampling runs on the device of the model's parameters;
    images come back on the CPU.
    """
    from tqdm import tqdm

    config = config or SamplerConfig()
    config.validate()
    if num < 1:
        raise PtqdError(f"number of samples must be at least 1, got {num}")
    if first < 0:
        raise PtqdError(f"first sample index must be at least 0, got {first}")
    label_arr = default_labels(model, first + num, list(labels) if labels is not None else None)
    label_arr = label_arr[first:] if label_arr is not None else None
    out = []
    n_batches = (num + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=n_batches * config.steps, desc=f"sampling {model.name}", unit="step", disable=not progress)
    for b in range(n_batches):
        idx = range(b * config.batch_size, min(num, (b + 1) * config.batch_size))
        x = trajectories(
            model, range(first + idx.start, first + idx.stop), config,
            label_arr[idx.start : idx.stop] if label_arr is not None else None,
            denoise, corrector, callback, lambda: bar.update(1),
        )
        images = model.to_images(x)
        check_finite(images, f"sampling: the final images (samples {first + idx.start}..{first + idx.stop - 1})", model.unet)
        out.append(to_uint8(images.cpu()))  # latent models: the FP decoder makes the images
    bar.close()
    return Samples(np.concatenate(out), label_arr, sample_record(model, num, config, corrector))


def sample_record(model: DiffusionModel, num: int, config: SamplerConfig, corrector=None) -> dict[str, Any]:
    """What a sampling run records beside its images: model, sampler settings, corrector."""
    record = {"model": model.name, "model_fingerprint": model.fingerprint(), "num": num, **asdict(config)}
    run = model.info.get("run") if isinstance(model.info, dict) else None
    if isinstance(run, dict) and run.get("model_fingerprint"):  # a quantized model: its FP model (`evaluate --against` checks it)
        record["fp_model_fingerprint"] = run["model_fingerprint"]
    if not model.conditional:
        record["guidance"] = None
    if model.prompts is not None:
        record["prompts"] = model.prompts
    if corrector is not None:
        record["corrector"] = {**corrector.describe(), "notes": corrector.notes(config.scheduler, config.eta, make_scheduler(model, config.scheduler, config.steps))}
    return record


def check_samples_output(path: str | Path, overwrite: bool = False) -> Path:
    """Check before sampling that ``path`` (.npz) and its config ``.json`` beside it can be written:
    see :func:`ptqd.io.check_output`. Files ptqd wrote (a .npz with ``images`` and ``config``, a JSON
    with ``model_fingerprint``) are replaced; other existing files only with ``overwrite``."""
    path = check_output(path, ".npz", overwrite=overwrite, ours=SAMPLES)
    check_output(path.with_suffix(".json"), ".json", overwrite=overwrite, ours=SAMPLES_CONFIG, option="config file")
    return path


def samples_bytes(model: DiffusionModel, num: int) -> int:
    """About how many bytes ``num`` uint8 images of ``model`` take (a latent model's decoder upsamples)."""
    side, channels = model.image_size, model.channels
    if model.latent:
        blocks = getattr(getattr(model.decoder.vae, "config", None), "block_out_channels", None) or (0, 0, 0, 0)
        side, channels = side * 2 ** (len(blocks) - 1), 3
    return int(num) * side * side * channels


def check_samples_space(model: DiffusionModel, num: int, path: str | Path, chunked: bool = False) -> None:
    """Refuse before sampling when the disk of ``path`` cannot take the images (twice over when chunked:
    the chunks and the merged file exist together)."""
    from ptqd.io import check_space

    check_space(path, samples_bytes(model, num) * (2 if chunked else 1), f"{num} images")


def save_samples(samples: Samples, path: str | Path) -> Path:
    """Write ``images`` (+ ``labels``) to ``.npz`` atomically (byte-reproducible), and the config to a
    ``.json`` beside it."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise PtqdError(f"samples are written as .npz (with the config as .json beside it); {path} does not end in .npz")
    arrays = {"images": samples.images, "config": np.array(json.dumps(samples.config))}
    if samples.labels is not None:
        arrays["labels"] = samples.labels
    write_npz(path, arrays)
    write_json(path.with_suffix(".json"), samples.config)
    return path


def _npz_problem(e: Exception) -> str:
    """numpy's error without its advice to load pickles ("allow_pickle=True" would run code)."""
    text = str(e)
    if "allow_pickle" in text or "pickled" in text.lower():
        return "it holds Python objects (pickled data), which ptqd never loads"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _npz_array(z, name: str, path: Path, fix: str) -> np.ndarray:
    try:
        return z[name]
    except Exception as e:
        raise PtqdError(f"{path}: array {name!r} cannot be read ({_npz_problem(e)}); the file is damaged; {fix}") from None


def load_samples(path: str | Path) -> Samples:
    """Read and check a samples ``.npz``: key ``images`` uint8 (N, H, W, C), optional ``labels`` (N,)."""
    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"samples file {path} does not exist")
    fix = "write the samples again with `ptqd sample --out FILE.npz`"
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except Exception as e:
        raise PtqdError(f"{path} is not a readable .npz file ({_npz_problem(e)}); {fix}") from None
    with z:
        if "images" not in files:
            raise PtqdError(f"{path} has no 'images' array (found: {', '.join(sorted(files)) or 'nothing'}); {fix}")
        images = _npz_array(z, "images", path, fix)
        labels = _npz_array(z, "labels", path, fix) if "labels" in files else None
        config = {}
        if "config" in files:
            from ptqd.validate import parse_json

            raw = _npz_array(z, "config", path, fix)
            if raw.shape != () or raw.dtype.kind != "U":
                raise PtqdError(f"{path}: array 'config' must be one JSON string, got {raw.dtype} {raw.shape}; {fix}")
            config = parse_json(str(raw), f"{path} (array 'config')", fix)
            if not isinstance(config, dict):
                raise PtqdError(f"{path}: array 'config' must hold a JSON object; {fix}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise PtqdError(
            f"{path}: 'images' must be a non-empty uint8 array (N, H, W, C) with C = 1 or 3, "
            f"got {images.dtype} {images.shape}"
        )
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise PtqdError(f"{path}: 'labels' must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
    return Samples(images, labels, config)
