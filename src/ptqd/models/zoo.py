"""The bundled model zoo: architectures, training schedule and where the weights live."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ptqd.data import IMAGE_SIZE, NUM_CLASSES

ZOO_NAMES = ("digits16-cond", "digits16", "digits-ldm")
CONDITIONAL_NAMES = ("digits16-cond", "digits-ldm")
LATENT_NAMES = ("digits-ldm",)  # denoise in the latent space of a bundled AutoencoderKL (vae/)
NULL_CLASS = NUM_CLASSES  # the extra class id used for the unconditional branch of guidance
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2  # one downsampling: 16x16x1 pixels -> 8x8x4 latents

# One UNet2DModel config for all models; the conditional ones add the class embedding, the latent one
# works on 8x8x4 latents (so its three levels are 8, 4, 2 and the attention runs at 4x4 and 2x2).
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

# digits-ldm's autoencoder (the LDM first stage, in miniature): KL-regularized, 16x16x1 -> 8x8x4, 209K
# parameters; no mid-block attention (at 8x8 a convolution already sees most of the latent). Its
# scaling_factor (1/std of the training latents) is measured at training time and stored in vae/config.json.
VAE_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    latent_channels=LATENT_CHANNELS,
    block_out_channels=(32, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=8,
    mid_block_add_attention=False,
)

# clip_sample=False: clipping x̂_0 to [-1, 1] without re-deriving ε broke deterministic DDIM at guidance 3
# (FD 703 vs 98 unclipped, 300 samples) and halved quality at eta 1 (FD 96 vs 44, 500 samples).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


def unet_config(name: str) -> dict:
    """The diffusers UNet2DModel config of zoo model ``name``."""
    if name not in ZOO_NAMES:
        raise KeyError(name)
    cfg = dict(UNET_CONFIG)
    if name in CONDITIONAL_NAMES:
        cfg["num_class_embeds"] = NUM_CLASSES + 1
    if name in LATENT_NAMES:
        cfg.update(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS)
    return cfg


def vae_config(name: str) -> dict:
    """The diffusers AutoencoderKL config of latent zoo model ``name`` (without its scaling_factor)."""
    if name not in LATENT_NAMES:
        raise KeyError(name)
    return dict(VAE_CONFIG)


def zoo_dir() -> Path:
    return Path(str(resources.files("ptqd") / "zoo"))


def zoo_path(name: str) -> Path:
    return zoo_dir() / name
