"""Convert an original CompVis latent-diffusion checkpoint (e.g. LDM-4 ImageNet ``cin256-v2``, the model
the PTQD paper quantized) into a model directory ``ptqd`` loads.

What it handles: ``LatentDiffusion`` with a cross-attention class conditioner (``ClassEmbedder``,
``conditioning_key: crossattn``) and a VQ (``VQModelInterface``) or KL (``AutoencoderKL``) first stage.

* the UNet (``model.diffusion_model.*``) → diffusers ``UNet2DConditionModel``; the class embedder's
  table (``cond_stage_model.embedding.weight``, (classes, D)) becomes ``ptqd_context.safetensors``
  (classes, 1, D): the context the original model cross-attends to is the embedding of the label;
* the first stage (``first_stage_model.*``) → ``VQModel``/``AutoencoderKL`` with the run's
  ``scale_factor`` (LatentDiffusion's default 1.0 when the config has none, as for cin256-v2);
* the noise schedule (``linear_start``/``linear_end``; CompVis "linear" is linear in √β, diffusers'
  ``scaled_linear``) → a DDIM scheduler with ``steps_offset=1`` and ``set_alpha_to_one=False``, which
  gives CompVis' DDIM timesteps (1, 1+c, …) and final ᾱ.

The key mapping is diffusers' own single-file conversion; every converted tensor must fit the
diffusers model exactly (missing or unexpected keys are an error, not random weights). The last row
of the class table is the unconditional class (cin256-v2: 1001 rows, class 1000 = "no class").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ptqd.errors import PtqdError
from ptqd.io import _temp_prefix, check_output, os_error, process_umask, write_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLASS_TABLE = "cond_stage_model.embedding.weight"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a ``.ckpt``/``.pt`` (with or without a ``state_dict`` entry) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PtqdError(f"cannot read checkpoint {path}: {e}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise PtqdError(f"{path} holds no state dict")
    return sd


def read_config(path: str | Path) -> dict[str, Any]:
    """The original YAML (or JSON) model config, e.g. ``configs/latent-diffusion/cin256-v2.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise PtqdError(f"config {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:
        raise PtqdError(f"cannot parse config {path}: {e}") from e


def _params(cfg: dict, *keys: str) -> dict:
    node = cfg
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise PtqdError(f"config has no {'.'.join(keys)} (looked for {k!r}); pass the original LatentDiffusion config")
        node = node[k]
    return node


def _strict_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise PtqdError(
            f"{what}: the checkpoint does not fit the model its config describes: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); is this the right config?"
        )


def convert_compvis_ldm(
    checkpoint: str | Path | dict[str, torch.Tensor],
    config: str | Path | dict[str, Any],
    out: str | Path,
    null_class: int | None = None,
) -> Path:
    """Write a ptqd model directory for a CompVis class-conditional LDM to ``out`` (atomically)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    out = Path(out)
    if out.exists() or out.is_symlink():
        raise PtqdError(f"--out {out} already exists; choose another --out (convert-ldm never writes into an existing path)")
    check_output(out, kind="dir")  # a writable parent, a name that fits: before reading the checkpoint
    sd = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    cfg = config if isinstance(config, dict) else read_config(config)
    params = _params(cfg, "model", "params")
    unet_p = _params(params, "unet_config", "params")
    first = _params(params, "first_stage_config")
    cond = params.get("cond_stage_config") or {}
    if params.get("conditioning_key") != "crossattn" or "ClassEmbedder" not in str(cond.get("target", "")):
        raise PtqdError(
            "only class-conditional LDMs with a cross-attention ClassEmbedder (e.g. cin256-v2) are supported; "
            f"this config has conditioning_key {params.get('conditioning_key')!r} and cond stage {cond.get('target')!r}"
        )
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "first stage")):
        if not any(k.startswith(prefix) for k in sd):
            raise PtqdError(f"checkpoint has no {what} weights ({prefix}*): is it a CompVis LatentDiffusion checkpoint?")
    if CLASS_TABLE not in sd:
        raise PtqdError(f"checkpoint has no class embedding table {CLASS_TABLE}")

    # denoiser
    ucfg = create_unet_diffusers_config_from_ldm(cfg, sd)
    ucfg["sample_size"] = int(unet_p["image_size"])  # the latent size
    unet = UNet2DConditionModel(**ucfg)
    _strict_load(unet, convert_ldm_unet_checkpoint(sd, ucfg), "UNet")

    # first stage
    fp = _params(first, "params")
    dd = _params(fp, "ddconfig")
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    common = dict(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"], block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels),
        layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"], sample_size=dd["resolution"],
        scaling_factor=float(params.get("scale_factor", 1.0)),
    )
    target = str(first.get("target", ""))
    vae_sd = convert_ldm_vae_checkpoint(sd, common)
    if "VQ" in target:
        vae = VQModel(**common, num_vq_embeddings=fp["n_embed"], vq_embed_dim=fp["embed_dim"])
        vae_sd["quantize.embedding.weight"] = sd[VAE_PREFIX + "quantize.embedding.weight"]
        key, vae_name = "vqvae", "VQModel"
    elif "AutoencoderKL" in target:
        vae = AutoencoderKL(**common)
        key, vae_name = "vae", "AutoencoderKL"
    else:
        raise PtqdError(f"first stage {target!r} is neither a VQ nor a KL autoencoder")
    _strict_load(vae, vae_sd, "first stage")

    table = sd[CLASS_TABLE].float()
    null = table.shape[0] - 1 if null_class is None else int(null_class)
    if not 0 <= null < table.shape[0]:
        raise PtqdError(f"null class {null} is outside the {table.shape[0]} classes of the embedding table")
    scheduler = DDIMScheduler(
        num_train_timesteps=int(params.get("timesteps", 1000)), beta_schedule="scaled_linear",
        beta_start=float(params.get("linear_start", 0.0015)), beta_end=float(params.get("linear_end", 0.0195)),
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )

    if out.exists():
        raise PtqdError(f"{out} already exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh temporary directory of our own (never a name a user may hold), removed on any failure
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        _write_converted(tmp, out, unet, vae, key, vae_name, scheduler, table, null)
    except OSError as e:
        raise os_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_converted(tmp: Path, out: Path, unet, vae, key: str, vae_name: str, scheduler, table, null: int) -> None:
    os.chmod(tmp, 0o777 & ~process_umask())
    unet.save_pretrained(str(tmp / "unet"))
    vae.save_pretrained(str(tmp / key))
    scheduler.save_pretrained(str(tmp / "scheduler"))
    from safetensors.torch import save_file

    save_file({"context": table[:, None, :].contiguous()}, str(tmp / "ptqd_context.safetensors"))
    write_json(tmp / "model_index.json", {
        "_class_name": "CompVisClassConditionalLDM", "_source": "ptqd convert-ldm",
        "unet": ["diffusers", "UNet2DConditionModel"], key: ["diffusers", vae_name], "scheduler": ["diffusers", "DDIMScheduler"],
    })
    num_classes = table.shape[0] - 1 if null == table.shape[0] - 1 else table.shape[0]
    write_json(tmp / "ptqd_model.json", {"num_classes": num_classes, "null_class": null, "converted_from": "CompVis LatentDiffusion"})
    tmp.rename(out)
