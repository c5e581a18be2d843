"""Standard metrics with the FID Inception-v3, computed as the ADM evaluator does: FID, sFID, IS,
precision and recall against a reference batch.

Reference batches are ``.npz`` files in ADM's format: ``arr_0`` (uint8 images) and/or the precomputed
``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial features), as in the batches
published with guided-diffusion. ``build_reference`` writes the same keys plus ``pool`` (the
reference's pool features, for precision/recall without the images) and the fingerprint of the
weights that made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.errors import PtqdError
from ptqd.io import check_output, npz_with, write_npz
from ptqd.metrics.frechet import feature_stats, frechet_distance
from ptqd.metrics.inception import Inception, InceptionFeatures, check_images, inception_features
from ptqd.metrics.quality import inception_score, precision_recall

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IS_SPLIT = 5000  # ADM: Inception Score over consecutive splits of 5000 samples


@dataclass
class InceptionReference:
    name: str
    inception: str | None  # fingerprint of the weights file; None for batches made elsewhere (ADM's TF graph)
    num_images: int | None
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: np.ndarray | None  # reference pool features for precision/recall


def read_images(path: str | Path) -> np.ndarray:
    """uint8 images (N, H, W, C) from a ``.npz`` (``images`` as ``ptqd sample`` writes, or ADM's
    ``arr_0``) or from a directory of image files of one size (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        return _read_dir(path)
    if not path.is_file():
        raise PtqdError(f"{path} does not exist: give a samples .npz (images or arr_0) or a directory of images")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "images" if "images" in z.files else "arr_0" if "arr_0" in z.files else None
            if key is None:
                raise PtqdError(f"{path} has neither 'images' nor 'arr_0' (found: {', '.join(z.files) or 'nothing'})")
            images = z[key]
    except PtqdError:
        raise
    except Exception as e:
        raise PtqdError(f"{path} is not a readable .npz file ({e})") from e
    check_images(images, str(path))
    return images


def _read_dir(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PtqdError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
        if out[-1].shape != out[0].shape:
            raise PtqdError(
                f"{f} is {out[-1].shape[1]}x{out[-1].shape[0]} but {files[0].name} is {out[0].shape[1]}x{out[0].shape[0]}: "
                "reference images must share one size (center-crop and resize them first, as ADM's reference batches are)"
            )
    return np.stack(out)


def build_reference(images: np.ndarray, inception: Inception, name: str, batch_size: int = 100, progress: bool = True) -> InceptionReference:
    """Reference statistics of real uint8 images under ``inception``."""
    if len(images) < 2:
        raise PtqdError(f"a reference needs at least 2 images, got {len(images)}")
    f = inception_features(images, inception, batch_size, progress)
    mu, sigma = feature_stats(f.pool)
    mu_s, sigma_s = feature_stats(f.spatial)
    return InceptionReference(name, inception.fingerprint, len(images), mu, sigma, mu_s, sigma_s, f.pool)


REFERENCE = npz_with("mu", "sigma", "mu_s", "sigma_s")


def check_reference_output(path: str | Path, overwrite: bool = False) -> Path:
    """Check before any work that ``path`` (.npz) can take a reference batch: new, or one ptqd wrote;
    any other file only with ``overwrite``."""
    return check_output(path, ".npz", overwrite=overwrite, ours=REFERENCE)


def save_reference(ref: InceptionReference, path: str | Path) -> Path:
    arrays: dict[str, Any] = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
    if ref.pool is not None:
        arrays["pool"] = ref.pool.astype(np.float32)
    arrays.update(name=np.array(ref.name), inception=np.array(ref.inception or ""), num_images=np.array(ref.num_images or -1))
    return write_npz(path, arrays)


def load_reference(path: str | Path, inception: Inception | None = None, batch_size: int = 100, progress: bool = True) -> InceptionReference:
    """Read a reference batch: ADM's (``arr_0`` and/or ``mu``, ``sigma``, ``mu_s``, ``sigma_s``) or one
    from :func:`build_reference`. Missing statistics or pool features are computed from ``arr_0``
    with ``inception`` (as the ADM evaluator does for precision/recall)."""
    path = Path(path)
    if not path.is_file():
        raise PtqdError(
            f"reference batch {path} does not exist: use an ADM reference .npz or build one with "
            "`ptqd reference IMAGES --out REF.npz --inception WEIGHTS`"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise PtqdError(f"{path} is not a readable reference .npz ({e})") from e
    stats = ("mu", "sigma", "mu_s", "sigma_s")
    have_stats = all(k in arrays for k in stats)
    if not have_stats and "arr_0" not in arrays:
        raise PtqdError(
            f"{path} is not a reference batch: it needs images 'arr_0' or the statistics {', '.join(stats)} "
            f"(found: {', '.join(arrays) or 'nothing'})"
        )
    fingerprint = (str(arrays["inception"]) or None) if "inception" in arrays else None
    n = int(arrays["num_images"]) if "num_images" in arrays else None
    ref = InceptionReference(
        name=str(arrays["name"]) if "name" in arrays else path.name,
        inception=fingerprint,
        num_images=n if n is None or n >= 0 else None,
        mu=arrays.get("mu"), sigma=arrays.get("sigma"), mu_s=arrays.get("mu_s"), sigma_s=arrays.get("sigma_s"),
        pool=arrays.get("pool"),
    )
    if "arr_0" in arrays and (ref.pool is None or not have_stats):
        if inception is None:
            raise PtqdError(f"{path} needs the Inception network to compute its features from 'arr_0'")
        images = arrays["arr_0"]
        check_images(images, f"{path}: arr_0")
        built = build_reference(images, inception, ref.name, batch_size, progress)
        ref.pool = built.pool
        ref.num_images = len(images)
        if not have_stats:
            ref.mu, ref.sigma, ref.mu_s, ref.sigma_s, ref.inception = built.mu, built.sigma, built.mu_s, built.sigma_s, built.inception
    return ref


def evaluate_standard(
    images: np.ndarray,
    reference: InceptionReference,
    inception: Inception,
    batch_size: int = 100,
    progress: bool = True,
    k: int = 3,
) -> dict[str, Any]:
    """FID, sFID, IS, precision and recall of uint8 images against ``reference`` (ADM's definitions);
    see :func:`standard_metrics`."""
    if reference.inception is not None and reference.inception != inception.fingerprint:
        raise PtqdError(
            f"reference {reference.name!r} was made with Inception weights {reference.inception}, but {inception.path} "
            f"is {inception.fingerprint}; rebuild the reference with these weights (`ptqd reference`) or pass the weights it was made with"
        )
    if len(images) < 2:
        raise PtqdError(f"need at least 2 images for FID, got {len(images)}")
    features = inception_features(images, inception, batch_size, progress)
    out = standard_metrics(features, reference, k=k, device=inception.device)
    out["inception"] = inception.fingerprint
    return out


def standard_metrics(features: InceptionFeatures, reference: InceptionReference, k: int = 3, device="cpu") -> dict[str, Any]:
    """The metrics from Inception features of the samples.

    Keys: ``fid`` (pool features), ``sfid`` (2023-d spatial features), ``is`` (mean over splits of
    5000; ``is_std``), ``precision``/``recall`` (k=3 nearest-neighbour manifolds of pool features;
    None when the reference holds neither images nor pool features), ``num_samples``, ``reference``.
    """
    mu, sigma = feature_stats(features.pool)
    mu_s, sigma_s = feature_stats(features.spatial)
    if reference.mu.shape != mu.shape or reference.mu_s.shape != mu_s.shape:
        raise PtqdError(
            f"reference {reference.name!r} has {reference.mu.shape[0]}-d pool and {reference.mu_s.shape[0]}-d spatial statistics, "
            f"but the Inception features are {mu.shape[0]}-d and {mu_s.shape[0]}-d; use an Inception-v3 reference batch"
        )
    precision = recall = None
    if reference.pool is not None and len(reference.pool) > k and len(features.pool) > k:
        precision, recall = precision_recall(reference.pool, features.pool, k=k, device=device)
    is_mean, is_std = inception_score(features.probs, split_size=IS_SPLIT)
    return {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "sfid": frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(features.pool)),
        "reference": reference.name,
    }
