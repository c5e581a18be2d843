"""Reference statistics of real images: what samples are compared against."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ptqd.errors import PtqdError
from ptqd.io import atomic_path
from ptqd.metrics.classifier import classifier_fingerprint, extract_features, load_classifier
from ptqd.metrics.frechet import feature_stats

BUNDLED_REFERENCES = ("digits16",)
_KEYS = ("pool_mu", "pool_sigma", "spatial_mu", "spatial_sigma", "pool_features")


@dataclass
class Reference:
    name: str
    classifier: str  # fingerprint of the classifier that made the features
    num_images: int
    pool_mu: np.ndarray
    pool_sigma: np.ndarray
    spatial_mu: np.ndarray
    spatial_sigma: np.ndarray
    pool_features: np.ndarray  # kept for precision/recall


def compute_reference(images: np.ndarray, name: str, classifier_path: str | Path | None = None) -> Reference:
    """Reference statistics of uint8 images (N, 16, 16, 1) under the digit classifier."""
    model = load_classifier(classifier_path)
    feats = extract_features(images, model)
    pool_mu, pool_sigma = feature_stats(feats.pool)
    spatial_mu, spatial_sigma = feature_stats(feats.spatial)
    return Reference(
        name=name,
        classifier=classifier_fingerprint(model),
        num_images=len(images),
        pool_mu=pool_mu,
        pool_sigma=pool_sigma,
        spatial_mu=spatial_mu,
        spatial_sigma=spatial_sigma,
        pool_features=feats.pool.astype(np.float32),
    )


def save_reference(ref: Reference, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                name=np.array(ref.name),
                classifier=np.array(ref.classifier),
                num_images=np.array(ref.num_images),
                **{k: getattr(ref, k) for k in _KEYS},
            )
    return path


def reference_path(name: str) -> Path:
    return Path(str(resources.files("ptqd") / "zoo" / f"{name}_reference.npz"))


def load_reference(name_or_path: str | Path) -> Reference:
    """Load a bundled reference by name (``digits16``) or a reference ``.npz`` written by ``save_reference``."""
    s = str(name_or_path)
    if s in BUNDLED_REFERENCES:
        path = reference_path(s)
    else:
        path = Path(s)
        if not path.is_file():
            raise PtqdError(
                f"reference {s!r} is neither a bundled reference ({', '.join(BUNDLED_REFERENCES)}) nor a file"
            )
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*_KEYS, "name", "classifier", "num_images") if k not in z.files]
            if missing:
                raise PtqdError(f"{path} is not a ptqd reference file: missing {', '.join(missing)}")
            return Reference(
                name=str(z["name"]),
                classifier=str(z["classifier"]),
                num_images=int(z["num_images"]),
                **{k: z[k] for k in _KEYS},
            )
    except PtqdError:
        raise
    except Exception as e:  # zipfile/pickle/value errors from a corrupt file
        raise PtqdError(f"cannot read reference statistics {path}: {e}") from e
