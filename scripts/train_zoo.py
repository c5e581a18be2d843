"""Train the bundled zoo: the digit classifier, its reference statistics, and the two diffusion models.

Rerunnable by anyone, offline, on a laptop CPU (the data ships inside scikit-learn):

    python scripts/train_zoo.py --classifier            # ~1 min: classifier + reference statistics
    python scripts/train_zoo.py --model digits16-cond   # ~15 min on 2 cores
    python scripts/train_zoo.py --model digits16

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

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ptqd.data import NUM_CLASSES, load_digits
from ptqd.images import from_uint8
from ptqd.io import write_json
from ptqd.metrics.classifier import DigitClassifier, classifier_fingerprint
from ptqd.models.zoo import NULL_CLASS, SCHEDULER_CONFIG, ZOO_NAMES, unet_config, zoo_dir


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


def train_diffusion(name: str, out: Path, steps: int, batch_size: int, lr: float, seed: int, label_dropout: float) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    set_seed(seed)
    conditional = name == "digits16-cond"
    digits = load_digits("all")
    x_all, y_all = from_uint8(digits.images), torch.from_numpy(digits.labels)
    model = UNet2DModel(**unet_config(name))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        labels = None
        if conditional:
            labels = y_all[idx].clone()
            drop = torch.rand(batch_size, generator=g) < label_dropout
            labels[drop] = NULL_CLASS
        pred = model(xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
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
    wall = time.time() - t0
    target = out / name
    ema.save_pretrained(str(target / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(target / "scheduler"))
    info = {
        "name": name,
        "conditional": conditional,
        "num_classes": NUM_CLASSES if conditional else 0,
        "null_class": NULL_CLASS if conditional else None,
        "image_size": 16,
        "channels": 1,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            "data": "sklearn load_digits (all 1797), bilinear 8x8->16x16, uint8, scaled to [-1, 1]",
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "label_dropout": label_dropout if conditional else None,
            "ema": "decay min(0.999, (1+step)/(10+step)); EMA weights shipped",
            "seed": seed,
            "wall_seconds": round(wall, 1),
            "final_loss_mean_last_100": float(np.mean(losses[-100:])),
            "loss_every_50_steps": [round(float(np.mean(losses[i : i + 50])), 5) for i in range(0, steps, 50)],
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        },
    }
    write_json(target / "ptqd_model.json", info)
    print(f"{name}: {steps} steps in {wall / 60:.1f} min, final loss {info['training']['final_loss_mean_last_100']:.4f}")


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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.classifier and not args.model:
        p.error("nothing to do: pass --classifier and/or --model NAME")
    if args.classifier:
        train_classifier(args.out, args.classifier_epochs, args.seed)
        build_reference(args.out)
    for name in args.model:
        train_diffusion(name, args.out, args.steps, args.batch_size, args.lr, args.seed, args.label_dropout)


if __name__ == "__main__":
    main()
