"""Train the bundled zoo: the digit classifier, its reference statistics, and the diffusion models.

Rerunnable by anyone, offline, on a laptop CPU (the data ships inside scikit-learn):

    python scripts/train_zoo.py --classifier            # ~1 min: classifier + reference statistics
    python scripts/train_zoo.py --model digits16-cond   # ~15 min on 2 cores
    python scripts/train_zoo.py --model digits16
    python scripts/train_zoo.py --model digits-ldm --steps 3000 --vae-steps 1000  # latent: autoencoder, then UNet on its latents

Writes into src/ptqd/zoo/ (or --out). Fixed seeds; the EMA of the weights is what ships.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ptqd.data import IMAGE_SIZE, NUM_CLASSES, load_digits
from ptqd.images import from_uint8
from ptqd.io import write_json
from ptqd.metrics.classifier import DigitClassifier, classifier_fingerprint
from ptqd.models.zoo import (
    CONDITIONAL_NAMES, LATENT_CHANNELS, LATENT_NAMES, LATENT_SIZE, NULL_CLASS, SCHEDULER_CONFIG, ZOO_NAMES, unet_config, vae_config,
    zoo_dir,
)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero fill with -1, the background)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    h, w = x.shape[-2:]
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train_classifier(out: Path, epochs: int, seed: int) -> dict:
    set_seed(seed)
    train, test = load_digits("train"), load_digits("test")
    x_train, y_train = from_uint8(train.images), torch.from_numpy(train.labels)
    x_test, y_test = from_uint8(test.images), torch.from_numpy(test.labels)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(x_train) / 64))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="classifier"):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            xb = random_shift(x_train[idx], g)
            xb = xb + 0.05 * torch.randn(xb.shape, generator=g)  # light noise: generated samples are not perfect
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "digit_classifier.safetensors"))
    info = {
        "held_out_accuracy": acc,
        "train_size": len(x_train),
        "test_size": len(x_test),
        "epochs": epochs,
        "seed": seed,
        "wall_seconds": round(time.time() - t0, 1),
        "fingerprint": classifier_fingerprint(model),
        "torch": torch.__version__,
    }
    write_json(out / "digit_classifier.json", info)
    print(f"classifier held-out accuracy {acc:.4f} ({len(x_test)} images)")
    return info


def build_reference(out: Path) -> None:
    from ptqd.metrics.reference import compute_reference, save_reference

    digits = load_digits("all")
    ref = compute_reference(digits.images, name="digits16", classifier_path=out / "digit_classifier.safetensors")
    save_reference(ref, out / "digits16_reference.npz")
    print(f"reference statistics of {len(digits.images)} real digits written")


def lr_lambda(steps: int) -> Callable[[int], float]:
    """Linear warmup (100 steps or a tenth), then cosine down to a tenth of the peak."""
    warmup = min(100, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_at


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], steps: int, lr: float, desc: str):
    """AdamW + :func:`lr_lambda` + gradient clipping, keeping an EMA of the weights (what ships).
    ``loss_fn(model)`` draws its own batch. Returns (ema model, per-step losses, wall seconds)."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    losses = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return ema, losses, time.time() - t0


def training_record(losses: list[float], wall: float, **fields) -> dict:
    """What ptqd_model.json records about one training run."""
    return {
        **fields,
        "ema": "decay min(0.999, (1+step)/(10+step)); EMA weights shipped",
        "wall_seconds": round(wall, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "loss_every_50_steps": [round(float(np.mean(losses[i : i + 50])), 5) for i in range(0, len(losses), 50)],
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
    }


def train_denoiser(name: str, draw_x0: Callable[[torch.Tensor, torch.Generator], torch.Tensor], labels_all: torch.Tensor,
                   steps: int, batch_size: int, lr: float, seed: int, label_dropout: float):
    """ε-prediction training of zoo UNet ``name`` on the data ``draw_x0(indices, generator)`` gives
    (pixels or scaled latents), with class dropout to the null class for the conditional models."""
    from diffusers import DDPMScheduler, UNet2DModel

    conditional = name in CONDITIONAL_NAMES
    model = UNet2DModel(**unet_config(name))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(seed)

    def loss_fn(net):
        idx = torch.randint(0, len(labels_all), (batch_size,), generator=g)
        x0 = draw_x0(idx, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        labels = None
        if conditional:
            labels = labels_all[idx].clone()
            drop = torch.rand(batch_size, generator=g) < label_dropout
            labels[drop] = NULL_CLASS
        return F.mse_loss(net(xt, t, class_labels=labels).sample, noise)

    ema, losses, wall = fit(model, loss_fn, steps, lr, name)
    return ema, scheduler, losses, wall


def model_info(name: str, unet: torch.nn.Module, image_size: int, channels: int) -> dict:
    conditional = name in CONDITIONAL_NAMES
    return {
        "name": name,
        "conditional": conditional,
        "num_classes": NUM_CLASSES if conditional else 0,
        "null_class": NULL_CLASS if conditional else None,
        "image_size": image_size,
        "channels": channels,
        "parameters": sum(p.numel() for p in unet.parameters()),
    }


DATA_NOTE = "sklearn load_digits (all 1797), bilinear 8x8->16x16, uint8, scaled to [-1, 1]"


def train_diffusion(name: str, out: Path, steps: int, batch_size: int, lr: float, seed: int, label_dropout: float) -> None:
    set_seed(seed)
    digits = load_digits("all")
    x_all, y_all = from_uint8(digits.images), torch.from_numpy(digits.labels)
    ema, scheduler, losses, wall = train_denoiser(name, lambda idx, g: x_all[idx], y_all, steps, batch_size, lr, seed, label_dropout)
    target = out / name
    ema.save_pretrained(str(target / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(target / "scheduler"))
    conditional = name in CONDITIONAL_NAMES
    info = model_info(name, ema, IMAGE_SIZE, 1)
    info["training"] = training_record(
        losses, wall, data=DATA_NOTE, steps=steps, batch_size=batch_size, lr=lr,
        label_dropout=label_dropout if conditional else None, seed=seed,
    )
    write_json(target / "ptqd_model.json", info)
    print(f"{name}: {steps} steps in {wall / 60:.1f} min, final loss {info['training']['final_loss_mean_last_100']:.4f}")


def train_vae(name: str, x_all: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int):
    """The first stage: an AutoencoderKL, per-pixel MSE + ``kl_weight`` × KL per latent element."""
    from diffusers import AutoencoderKL

    set_seed(seed)
    vae = AutoencoderKL(**vae_config(name))
    g = torch.Generator().manual_seed(seed)
    parts: list[tuple[float, float]] = []

    def loss_fn(net):
        x = x_all[torch.randint(0, len(x_all), (batch_size,), generator=g)]
        post = net.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = F.mse_loss(net.decode(z).sample, x)
        kl = post.kl().mean() / post.mean[0].numel()
        parts.append((rec.item(), kl.item()))
        return rec + kl_weight * kl

    ema, losses, wall = fit(vae, loss_fn, steps, lr, f"{name} vae")
    return ema, losses, parts, wall


@torch.no_grad()
def encode_all(vae, x_all: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every training image."""
    means, stds = [], []
    for i in range(0, len(x_all), batch):
        post = vae.encode(x_all[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_latent(name: str, out: Path, steps: int, batch_size: int, lr: float, seed: int, label_dropout: float,
                 vae_steps: int, vae_batch_size: int, vae_lr: float, kl_weight: float) -> None:
    """A latent diffusion model (LDM, in miniature): the autoencoder first, then the UNet on its scaled latents."""
    digits = load_digits("all")
    x_all, y_all = from_uint8(digits.images), torch.from_numpy(digits.labels)
    vae, vae_losses, parts, vae_wall = train_vae(name, x_all, vae_steps, vae_batch_size, vae_lr, kl_weight, seed)
    mean, std = encode_all(vae, x_all)
    g = torch.Generator().manual_seed(seed)
    latents = mean + std * torch.randn(mean.shape, generator=g)  # posterior samples, as the UNet sees them
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        recon = vae.decode(mean).sample.clamp(-1, 1)
    rec_mse = float(F.mse_loss(recon, x_all))
    acc = _classifier_accuracy(recon, y_all)
    print(f"{name} vae: {vae_steps} steps in {vae_wall / 60:.1f} min, reconstruction MSE {rec_mse:.5f}, "
          f"classifier accuracy on reconstructions {acc:.4f}, scaling_factor {scaling_factor:.4f}")

    def draw(idx, gen):  # a fresh posterior sample each time, scaled to unit variance
        return (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor

    set_seed(seed)
    ema, scheduler, losses, wall = train_denoiser(name, draw, y_all, steps, batch_size, lr, seed, label_dropout)
    target = out / name
    ema.save_pretrained(str(target / "unet"), safe_serialization=True)
    vae.save_pretrained(str(target / "vae"), safe_serialization=True)
    scheduler.save_pretrained(str(target / "scheduler"))
    info = model_info(name, ema, LATENT_SIZE, LATENT_CHANNELS)
    info.update(latent=True, decoded_image_size=IMAGE_SIZE, decoded_channels=1, vae_parameters=sum(p.numel() for p in vae.parameters()),
                scaling_factor=scaling_factor)
    info["vae_training"] = training_record(
        vae_losses, vae_wall, data=DATA_NOTE, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr,
        loss="per-pixel MSE + kl_weight * KL per latent element (posterior sampled)", kl_weight=kl_weight, seed=seed,
        final_reconstruction_mse_last_100=float(np.mean([r for r, _ in parts[-100:]])),
        final_kl_per_element_last_100=float(np.mean([k for _, k in parts[-100:]])),
        reconstruction_mse_all_posterior_mean=rec_mse, classifier_accuracy_on_reconstructions=acc,
        scaling_factor="1 / std of posterior samples of all 1797 training images",
    )
    info["training"] = training_record(
        losses, wall, data="scaled latents of the shipped vae: a fresh posterior sample of each image per step",
        steps=steps, batch_size=batch_size, lr=lr, label_dropout=label_dropout, seed=seed,
    )
    write_json(target / "ptqd_model.json", info)
    print(f"{name}: vae {vae_wall / 60:.1f} min + unet {steps} steps in {wall / 60:.1f} min, "
          f"final loss {info['training']['final_loss_mean_last_100']:.4f}")


def _classifier_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    from ptqd.metrics.classifier import load_classifier

    with torch.no_grad():
        return float((load_classifier()(images).argmax(1) == labels).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", action="store_true", help="train the digit classifier and reference statistics")
    p.add_argument("--model", choices=ZOO_NAMES, action="append", default=[], help="diffusion model(s) to train")
    p.add_argument("--out", type=Path, default=zoo_dir(), help="zoo directory (default: the package's)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--vae-steps", type=int, default=1200, help="latent models: autoencoder training steps")
    p.add_argument("--vae-batch-size", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3, help="latent models: weight of the KL term (per latent element)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.classifier and not args.model:
        p.error("nothing to do: pass --classifier and/or --model NAME")
    if args.classifier:
        train_classifier(args.out, args.classifier_epochs, args.seed)
        build_reference(args.out)
    for name in args.model:
        if name in LATENT_NAMES:
            train_latent(name, args.out, args.steps, args.batch_size, args.lr, args.seed, args.label_dropout,
                         args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight)
            continue
        train_diffusion(name, args.out, args.steps, args.batch_size, args.lr, args.seed, args.label_dropout)


if __name__ == "__main__":
    main()
