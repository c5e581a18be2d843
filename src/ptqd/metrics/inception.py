"""The FID Inception-v3 network, as the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) uses it.

This is the architecture of TensorFlow's 2015-12-05 Inception graph (``classify_image_graph_def.pb``)
in PyTorch: torchvision's Inception-v3 with the FID changes (average pools that do not count the
padding, a max pool in the last block, 1008 classes). No weights ship with ptqd and none are
downloaded: :func:`load_inception` reads pytorch-fid's or torch-fidelity's conversion of the TF
weights from a file the user gives, or from torch hub's cache where those packages keep it.

What the ADM evaluator computes, and this module too:

* input: uint8 RGB images as float 0..255, resized to 299x299 with TensorFlow 1's bilinear resize
  (no half-pixel offset), then (x - 128) / 128;
* ``pool``: the 2048-d ``pool_3`` features (FID, precision/recall);
* ``spatial``: the first 7 channels of ``mixed_6/conv`` (the 1x1 branch of Mixed_6d, 17x17),
  flattened in TF's (H, W, C) order: 2023-d (sFID);
* ``probs``: softmax of ``pool_3 @ W`` with the 1008-class weight matrix and no bias (Inception Score).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqd.errors import PtqdError

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
NUM_CLASSES = 1008
WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
ALT_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # TF's pooling


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 block at 17x17."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward_with_first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its 1x1 branch (TF's ``mixed_N/conv``)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool(x))], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_first(x)[0]


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded block at 8x8; the FID graph pools with an average in Mixed_7b and a max in Mixed_7c."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF FID graph; parameter names match pytorch-fid's and torch-fidelity's files."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised input (N, 3, 299, 299) -> (pool (N, 2048), spatial (N, 17*17*7), logits (N, 1008))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        x, mixed_6_conv = self.Mixed_6d.forward_with_first(x)
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean((2, 3))
        logits = pool @ self.fc.weight.T  # the ADM evaluator's softmax graph has no bias
        return pool, spatial, logits


# ----------------------------------------------------------------------------------- weights


def cache_dirs() -> list[Path]:
    """Where pytorch-fid and torch-fidelity keep the weights they download (torch hub's checkpoints)."""
    return [Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file: ``path`` when given, else one found in torch hub's cache; never downloads."""
    how = (
        f"ptqd does not download weights. Fetch {WEIGHTS_URL} (pytorch-fid's conversion of the TF 2015-12-05 "
        f"Inception graph the ADM evaluator uses; torch-fidelity's {ALT_WEIGHTS_URL} works too) and pass "
        f"--inception PATH, or put it in {cache_dirs()[0]}"
    )
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise PtqdError(f"Inception weights {p} do not exist. {how}")
        return p
    for d in cache_dirs():
        for name in WEIGHT_FILES:
            if (d / name).is_file():
                return d / name
    raise PtqdError(f"no Inception-v3 weights given (--inception) or found in {', '.join(map(str, cache_dirs()))}. {how}")


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Inception:
    """A loaded network, where it runs, and the fingerprint of its weights file."""

    net: FIDInceptionV3
    device: torch.device
    fingerprint: str
    path: Path


_CACHE: dict[tuple[str, str], Inception] = {}


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> Inception:
    """Build the network and load weights from ``path`` (or the cache); clear errors for wrong files."""
    p = find_weights(path)
    key = (str(p.resolve()), str(device))
    if key in _CACHE:
        return _CACHE[key]
    fix = f"use pt_inception-2015-12-05-6726825d.pth from {WEIGHTS_URL}"
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PtqdError(f"{p} is not a readable PyTorch weights file ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(state, dict):
        raise PtqdError(f"{p} holds a {type(state).__name__}, not a state dict of Inception-v3 weights; {fix}")
    net = FIDInceptionV3()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise PtqdError(f"{p} does not fit the FID Inception-v3 network: {str(e).splitlines()[-1].strip()}; {fix}") from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise PtqdError(
            f"{p} does not hold FID Inception-v3 weights (missing: {', '.join(missing[:3]) or 'none'}"
            f"{'…' if len(missing) > 3 else ''}; unexpected: {', '.join(unexpected[:3]) or 'none'}); {fix}"
        )
    dev = torch.device(device)
    net.eval().to(dev)
    out = Inception(net, dev, file_fingerprint(p), p)
    _CACHE[key] = out
    return out


# ----------------------------------------------------------------------------------- features


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to size x size as TF 1's ``resize_bilinear`` (align_corners
    False, no half-pixel centres): source coordinate = output index * in/out."""

    def axis(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    lo, hi, w = axis(x.shape[-1])
    left, right = x[..., lo], x[..., hi]
    x = left + (right - left) * w
    lo, hi, w = axis(x.shape[-2])
    top, bottom = x[..., lo, :], x[..., hi, :]
    return top + (bottom - top) * w[:, None]


def preprocess(images: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 images (N, H, W, C), C = 1 or 3, to the network's input: RGB, resized, (x - 128) / 128."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (resize_bilinear_tf1(x, size) - 128.0) / 128.0


@dataclass
class InceptionFeatures:
    pool: np.ndarray  # (N, 2048) float32
    spatial: np.ndarray  # (N, 2023) float32
    probs: np.ndarray  # (N, 1008) float64


@torch.no_grad()
def inception_features(images: np.ndarray, inception: Inception, batch_size: int = 100, progress: bool = True) -> InceptionFeatures:
    """Run the network over uint8 images (N, H, W, C) in batches."""
    from tqdm import tqdm

    check_images(images)
    pools, spatials, probs = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc="inception features", unit="batch", disable=not progress):
        x = preprocess(images[i : i + batch_size]).to(inception.device)
        pool, spatial, logits = inception.net(x)
        pools.append(pool.float().cpu().numpy())
        spatials.append(spatial.float().cpu().numpy())
        probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    return InceptionFeatures(np.concatenate(pools), np.concatenate(spatials), np.concatenate(probs))


def check_images(images: np.ndarray, where: str = "images") -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise PtqdError(f"{where}: need a non-empty uint8 array (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}")
