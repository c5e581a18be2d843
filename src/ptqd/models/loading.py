"""Load a diffusion model (zoo name or diffusers directory) behind one adapter: ``denoise(x, t, labels, guidance)``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ptqd.errors import PtqdError
from ptqd.models.adapters import Adapter, ContextAdapter, DiTAdapter, LatentDecoder, UNetAdapter, encode_prompts
from ptqd.models.zoo import ZOO_NAMES, zoo_path


@dataclass
class DiffusionModel:
    """A denoiser plus what sampling needs to know about it.

    ``denoise`` is the only way the rest of ptqd calls the network, so a quantized copy of ``unet``
    (the denoiser, whatever its class; same interface) drops in unchanged. ``adapter`` knows how to
    call this kind of denoiser; ``decoder`` (latent models) turns final latents into images.
    ``num_classes`` counts the condition ids: classes, or the prompts of a text-to-image model.
    """

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    num_classes: int = 0  # 0: unconditional
    null_class: int | None = None  # id of the unconditional branch for classifier-free guidance
    image_size: int = 16  # of the denoiser's input (latent size for latent models)
    channels: int = 1
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    adapter: Adapter = field(default_factory=UNetAdapter)
    decoder: LatentDecoder | None = None
    prompts: list[str] | None = None  # text-to-image: the prompt of each condition id
    prompt_encoder: Callable[[list[str]], torch.Tensor] | None = None

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def latent(self) -> bool:
        return self.decoder is not None

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
            return self.adapter(net, x, t, None)
        if labels is None:
            raise PtqdError(f"model {self.name} is conditional: pass class labels (or prompt ids)")
        if guidance == 1.0:
            return self.adapter(net, x, t, labels)
        null = torch.full_like(labels, self.null_class)
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
        out = self.adapter(net, torch.cat([x, x]), t2, torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Final sampler output → images in [-1, 1] (decoded by the FP decoder for latent models)."""
        return self.decoder(x) if self.decoder is not None else x

    def with_prompts(self, prompts: list[str]) -> "DiffusionModel":
        """A copy conditioned on ``prompts`` (ids 0..N-1; id N is the empty prompt for guidance)."""
        if self.prompt_encoder is None:
            raise PtqdError(f"model {self.name} has no text encoder: prompts apply to text-to-image models only")
        if not prompts:
            raise PtqdError("give at least one prompt")
        context = self.prompt_encoder([*prompts, ""])
        p = next(self.unet.parameters(), None)
        if p is not None:
            context = context.to(p.device)
        adapter = ContextAdapter(context, [*prompts, ""], source="text encoder")
        return dataclasses.replace(self, adapter=adapter, prompts=list(prompts), num_classes=len(prompts), null_class=len(prompts))

    def describe(self) -> dict[str, Any]:
        """What kind of model this is, for run records."""
        d = {"denoiser": type(self.unet).__name__, **self.adapter.describe()}
        if self.decoder is not None:
            d.update(self.decoder.describe())
        return d

    def to(self, device: str | torch.device) -> "DiffusionModel":
        """Move the denoiser (and decoder, conditioning table) to ``device`` (in place); returns self."""
        try:
            self.unet.to(device)
            self.adapter.to(device)
            if self.decoder is not None:
                self.decoder.to(device)
        except (RuntimeError, AssertionError) as e:
            raise PtqdError(f"cannot use device {device!r}: {e}") from e
        return self

    def fingerprint(self) -> str:
        """Hash of the denoiser's weights and config: statistics and artifacts record it to refuse mismatches.
        The same weights give the same fingerprint wherever they are loaded from."""
        h = hashlib.sha256()
        # keys like _name_or_path say where the model was loaded from, not what it is: left out
        config = {k: v for k, v in dict(getattr(self.unet, "config", {})).items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, t in sorted(self.unet.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def example_forward(model: DiffusionModel, batch: int = 1):
    """A function running one denoiser forward on a fixed input (for split detection and BOPs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.channels, model.image_size, model.image_size, generator=g)
    y = torch.zeros(batch, dtype=torch.long) if model.conditional else None

    def run(net: nn.Module):
        p = next(net.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        return model.denoise(x.to(dev), torch.tensor(500), y.to(dev) if y is not None else None, 1.0, unet=net)

    return run


def list_models() -> list[str]:
    """Names of the bundled models."""
    return list(ZOO_NAMES)


DENOISERS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
DECODER_KEYS = ("vqvae", "vae")


def load(name_or_path: str | Path, prompts: list[str] | None = None, cache_dir: str | Path | None = None) -> DiffusionModel:
    """Load a bundled model by name (``digits16-cond``, ``digits16``, ``digits-ldm``), a diffusers pipeline directory,
    or a hub repo id that is already in the local hub cache (``cache_dir``, default the hub's). Nothing
    is downloaded.

    Pipeline directories are what ``save_pretrained`` writes: DDPM/DDIM (UNet2DModel), LDM (UNet2DModel
    + VQModel or AutoencoderKL), DiT (DiT transformer + AutoencoderKL), Stable Diffusion
    (UNet2DConditionModel + CLIP text encoder; needs ``prompts``). A directory without
    ``model_index.json`` holding ``unet/`` and ``scheduler/`` (the zoo layout; plus ``vae/`` for a latent model) works too; an optional
    ``ptqd_model.json`` sets ``num_classes``/``null_class``, and ``ptqd_context.safetensors`` (key
    ``context``, (E, L, D)) gives a UNet2DConditionModel a fixed table of contexts, one per class id.
    """
    s = str(name_or_path)
    name = s
    if s in ZOO_NAMES:
        path = zoo_path(s)
        if not (path / "unet").is_dir():
            raise PtqdError(f"bundled model {s} is missing from {path}; rerun scripts/train_zoo.py --model {s}")
    else:
        path = Path(s).expanduser()
        if not path.exists():
            path = _hub_snapshot(s, cache_dir)
        elif not path.is_dir():
            raise PtqdError(f"model path {path} is a file; pass the model directory (a diffusers pipeline saved with save_pretrained)")
        else:
            path = path.resolve()  # runs record the absolute path: they load from any working directory
            name = path.name
    model = _load_dir(path, name=name)
    if prompts is not None:
        return model.with_prompts(list(prompts))
    if model.prompt_encoder is not None:
        raise PtqdError(f"{s} is a text-to-image model: give prompts (--prompts FILE, one prompt per line)")
    return model


def _hub_snapshot(repo_id: str, cache_dir: str | Path | None) -> Path:
    """The local snapshot of hub repo ``repo_id`` (never downloads)."""
    unknown = f"unknown model {repo_id!r}: not a bundled model ({', '.join(ZOO_NAMES)}) and no such directory"
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise PtqdError(unknown)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception as e:
        raise PtqdError(
            f"{unknown}, nor in the local hub cache ({type(e).__name__}); ptqd never downloads: fetch it first "
            f"(`hf download {repo_id}`, or pipeline.save_pretrained(DIR)) and pass the directory"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    """A model directory's JSON file: a JSON object, or an error naming the file."""
    from ptqd.validate import read_json

    return read_json(path, "fix or replace the file (save the model again with save_pretrained)", schema={})


def _components(path: Path) -> dict[str, tuple[str, str]]:
    """component name → (library, class) from model_index.json, or the zoo layout (unet/ + scheduler/, and
    vae/ for a latent model)."""
    index = path / "model_index.json"
    if index.is_file():
        items = _read_json(index)
        return {
            k: (v[0], v[1]) for k, v in items.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]
        }
    cfg = path / "unet" / "config.json"
    if not cfg.is_file():
        raise PtqdError(
            f"model directory {path} has neither model_index.json nor unet/config.json; save the pipeline with save_pretrained"
        )
    comps = {"unet": ("diffusers", _read_json(cfg).get("_class_name", "UNet2DModel")), "scheduler": ("diffusers", "DDPMScheduler")}
    vae_cfg = path / "vae" / "config.json"
    if vae_cfg.is_file():  # a latent zoo model (digits-ldm): its autoencoder
        comps["vae"] = ("diffusers", _read_json(vae_cfg).get("_class_name", "AutoencoderKL"))
    return comps


LIBRARIES = ("diffusers", "transformers")  # the only libraries a model_index.json may name
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _is_tokenizer(cls_name: str) -> bool:
    return cls_name.endswith(("Tokenizer", "TokenizerFast"))


def _refuse_pickle_weights(sub: Path, library: str, cls_name: str) -> None:
    """A component folder with pickle weights and no safetensors: refused with how to convert it."""
    files = [f for f in sub.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PtqdError(
            f"{sub} holds only pickle weights ({', '.join(pickles)}); ptqd loads safetensors only (loading a pickle can "
            f"run code). If you trust the file, convert it once: python -c \"import {library}; "
            f"{library}.{cls_name}.from_pretrained('{sub}', use_safetensors=False).save_pretrained('{sub}')\" "
            "(writes .safetensors), then delete the pickle file"
        )


def _load_component(path: Path, key: str, library: str, cls_name: str):
    sub = path / key
    if not sub.is_dir():
        raise PtqdError(f"model directory {path} has no {key}/ (model_index.json lists it); save the pipeline with save_pretrained")
    if library not in LIBRARIES:
        raise PtqdError(
            f"{path / 'model_index.json'}: component {key}/ names the library {library!r}; ptqd imports only "
            f"{' and '.join(LIBRARIES)} for model components, so this model directory is refused"
        )
    try:
        lib = importlib.import_module(library)
    except ImportError as e:
        extra = " (pip install 'ptqd[sd]')" if library == "transformers" else ""
        raise PtqdError(f"{key}/ needs the {library} package{extra}: {e}") from e
    cls = getattr(lib, cls_name, None)
    if cls is None:
        raise PtqdError(f"{key}/ is a {library}.{cls_name}, which this {library} version does not have")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if not _is_tokenizer(cls_name):  # weights: safetensors only, never pickle
        _refuse_pickle_weights(sub, library, cls_name)
        kwargs["use_safetensors"] = True
    if library == "diffusers" and not _is_tokenizer(cls_name):
        kwargs["low_cpu_mem_usage"] = False
    try:
        obj = cls.from_pretrained(str(sub), **kwargs)
    except Exception as e:
        raise PtqdError(f"cannot load {key}/ ({cls_name}) from {path}: {e}") from e
    if isinstance(obj, nn.Module):
        obj.eval().requires_grad_(False)
    return obj


def _load_dir(path: Path, name: str) -> DiffusionModel:
    comps = _components(path)
    key = next((k for k in ("unet", "transformer") if k in comps), None)
    if key is None:
        raise PtqdError(f"{path} has no denoiser: model_index.json lists neither unet nor transformer (found {', '.join(comps)})")
    cls_name = comps[key][1]
    if cls_name not in DENOISERS:
        raise PtqdError(f"{path}: denoiser {cls_name} is not supported; ptqd supports {', '.join(DENOISERS)}")
    net = _load_component(path, key, *comps[key])
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise PtqdError(f"model directory {path} has no scheduler/scheduler_config.json; save the model with save_pretrained")
    scheduler_config = _read_json(sched_file)
    info: dict[str, Any] = {}
    info_file = path / "ptqd_model.json"
    if info_file.is_file():
        from ptqd.validate import check_object

        info = check_object(_read_json(info_file), {"num_classes?": "int", "null_class?": "int|null"}, info_file,
                            "fix the file (num_classes: the number of classes, null_class: the unconditional class id)")
    if str(scheduler_config.get("variance_type", "")).startswith("learned"):
        # the denoiser's variance half is dropped (see adapters.DiTAdapter): DDPM uses fixed variances
        info["variance_note"] = f"variance_type {scheduler_config['variance_type']} replaced by fixed_small; the learned variance is not used"
        scheduler_config = {**scheduler_config, "variance_type": "fixed_small"}

    model = _describe(net, cls_name, scheduler_config, name, path, info)
    if cls_name == "UNet2DConditionModel":
        _setup_context(model, path, comps)
    dec = next((k for k in DECODER_KEYS if k in comps), None)
    if dec is not None:
        vae = _load_component(path, dec, *comps[dec])
        model.decoder = LatentDecoder(vae, getattr(vae.config, "scaling_factor", None) or 1.0)
    return model


def _describe(net: nn.Module, cls_name: str, scheduler_config: dict[str, Any], name: str, path: Path | None,
              info: dict[str, Any]) -> DiffusionModel:
    """A DiffusionModel around denoiser ``net`` (its conditioning from its config; cross-attention
    conditioning is set up by the caller)."""
    cfg = net.config
    size = cfg.sample_size
    model = DiffusionModel(
        name=name, unet=net, scheduler_config=scheduler_config, path=path, info=info,
        image_size=int(size if isinstance(size, int) else size[0]), channels=int(cfg.in_channels),
    )
    if cls_name == "UNet2DModel":
        n_embeds = cfg.num_class_embeds
        model.num_classes = int(info.get("num_classes", (n_embeds - 1) if n_embeds else 0))
        model.null_class = info.get("null_class", (n_embeds - 1) if n_embeds else None)
        _check_classes(model, path, n_embeds or 0, "the class embedding (unet num_class_embeds)")
    elif cls_name != "UNet2DConditionModel":
        _setup_dit(model, cls_name, info)
    return model


def from_components(denoiser: nn.Module, scheduler, name: str | None = None, decoder: nn.Module | None = None,
                    path: str | Path | None = None) -> DiffusionModel:
    """A DiffusionModel from in-memory diffusers components: a denoiser (``UNet2DModel`` or a DiT
    transformer; the null class is the last row of its class table), its scheduler (or scheduler
    config) and, for latent models, the VQModel/AutoencoderKL whose decoder makes the images."""
    cls_name = type(denoiser).__name__
    if cls_name not in DENOISERS:
        raise PtqdError(f"denoiser {cls_name} is not supported; ptqd supports {', '.join(DENOISERS)}")
    if cls_name == "UNet2DConditionModel":
        raise PtqdError(
            "in memory, ptqd takes UNet2DModel and DiT denoisers; for a text-to-image (UNet2DConditionModel) pipeline "
            "save it with save_pretrained and use ptqd.models.load(DIR, prompts=[...])"
        )
    config = scheduler if isinstance(scheduler, dict) else dict(getattr(scheduler, "config", {}) or {})
    if not config:
        raise PtqdError(f"give the denoiser's scheduler (or its config), got {type(scheduler).__name__}")
    if str(config.get("variance_type", "")).startswith("learned"):
        config = {**config, "variance_type": "fixed_small"}
    given = getattr(denoiser.config, "_name_or_path", None)
    name = name or (Path(given).name if given else cls_name)
    denoiser.eval().requires_grad_(False)
    model = _describe(denoiser, cls_name, config, name, Path(path) if path else None, {})
    if decoder is not None:
        model.decoder = LatentDecoder(decoder, getattr(decoder.config, "scaling_factor", None) or 1.0)
    return model


def _setup_context(model: DiffusionModel, path: Path, comps: dict[str, tuple[str, str]]) -> None:
    """Cross-attention conditioning: a text encoder (prompts given later) or a fixed context table."""
    if "text_encoder" in comps and "tokenizer" in comps:
        tokenizer = _load_component(path, "tokenizer", *comps["tokenizer"])
        text_encoder = _load_component(path, "text_encoder", *comps["text_encoder"])
        model.prompt_encoder = lambda prompts: encode_prompts(tokenizer, text_encoder, prompts)
        model.info["text_encoder"] = comps["text_encoder"][1]
        return
    table = path / "ptqd_context.safetensors"
    if not table.is_file():
        raise PtqdError(
            f"{path}: a UNet2DConditionModel needs its conditioning: a text_encoder/ + tokenizer/ (Stable Diffusion) "
            "or ptqd_context.safetensors (a class-embedding table, as `ptqd convert-ldm` writes)"
        )
    from safetensors.torch import load_file

    context = load_file(str(table)).get("context")
    if context is None:
        raise PtqdError(f"{table} has no tensor named 'context'")
    model.adapter = ContextAdapter(context.float(), source="class embeddings")
    model.num_classes = int(model.info.get("num_classes", context.shape[0] - 1))
    model.null_class = model.info.get("null_class", context.shape[0] - 1)
    if not (model.num_classes < context.shape[0] and 0 <= model.null_class < context.shape[0]):
        raise PtqdError(f"{path}/ptqd_model.json: num_classes/null_class do not fit the {context.shape[0]} rows of {table.name}")


def _setup_dit(model: DiffusionModel, cls_name: str, info: dict[str, Any]) -> None:
    cfg = model.unet.config
    if getattr(cfg, "norm_type", "ada_norm_zero") != "ada_norm_zero" or not getattr(cfg, "num_embeds_ada_norm", None):
        raise PtqdError(
            f"{model.path}: {cls_name} with norm_type {getattr(cfg, 'norm_type', None)!r} is not a class-conditional DiT; "
            "ptqd supports DiT transformers (ada_norm_zero with num_embeds_ada_norm)"
        )
    out_ch = cfg.out_channels or cfg.in_channels
    model.adapter = DiTAdapter(cfg.in_channels, learned_sigma=out_ch == 2 * cfg.in_channels)
    model.num_classes = int(info.get("num_classes", cfg.num_embeds_ada_norm))
    model.null_class = int(info.get("null_class", cfg.num_embeds_ada_norm))
    _check_classes(model, model.path, cfg.num_embeds_ada_norm + 1, "the DiT class embedding (num_embeds_ada_norm + 1)")


def _check_classes(model: DiffusionModel, path: Path, rows: int, table: str) -> None:
    """Class ids 0..num_classes-1 and the null class must be rows of the embedding table."""
    if model.num_classes == 0 and model.null_class is None:
        return
    f = Path(path) / "ptqd_model.json" if path is not None else f"the {model.name} denoiser's config"  # in memory: no file
    if model.num_classes < 0 or model.num_classes > rows or (model.num_classes and model.num_classes >= rows and model.null_class is not None):
        raise PtqdError(f"{f}: field 'num_classes' is {model.num_classes}, but {table} has {rows} rows"
                        f"{' (one of them the null class)' if model.null_class is not None else ''}; fix or delete the file")
    if model.null_class is not None and not 0 <= int(model.null_class) < rows:
        raise PtqdError(f"{f}: field 'null_class' is {model.null_class}, but {table} has rows 0..{rows - 1}; fix or delete the file")
