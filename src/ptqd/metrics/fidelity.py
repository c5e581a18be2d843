"""How close a quantized model's samples stay to its own full-precision (FP) samples with the same seeds.

Two views, both against the FP model rather than real data (which rewards the diversity quantization
noise adds):

* paired: per image MSE, PSNR and SSIM against the FP image of the same index (same seed, label and
  noise), reported as mean ± std over images (scikit-image's implementations);
* set: the Fréchet distance between the features of the sample set and of the FP set (``fd_fp``), next
  to its noise floor — the same distance between FP sets of two different seeds (``fd_fp_floor``). A
  method whose ``fd_fp / floor`` is near 1 is indistinguishable from FP at that sample count.

Pairs are refused when their seed, labels, prompts, sample count or image shape differ.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.errors import PtqdError
from ptqd.metrics.frechet import feature_stats, frechet_distance

SAMPLER_FIELDS = ("scheduler", "steps", "eta", "guidance")
EVALUATORS = ("digits", "inception")


def psnr_cap(shape: tuple[int, ...]) -> float:
    """PSNR given to a pair of identical 8-bit images: that of a one-level difference in one pixel, the
    closest two different 8-bit images of this shape can be (10·log10(255²·pixels))."""
    return 10.0 * math.log10(255.0**2 * int(np.prod(shape)))


def ssim_window(shape: tuple[int, ...]) -> int | None:
    """SSIM window: 7 (scikit-image's default) or the largest odd size the image allows; None below 3."""
    side = min(shape[0], shape[1])
    w = min(7, side if side % 2 else side - 1)
    return w if w >= 3 else None


def paired_arrays(images: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image MSE (pixels scaled to [0, 1]), PSNR (dB) and SSIM of uint8 ``images`` (N, H, W, C)
    against ``reference`` of the same shape, image ``i`` against reference ``i`` (scikit-image). Identical
    pairs get the PSNR :func:`psnr_cap`; SSIM is left out (empty) for images smaller than 3×3."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    a, b = np.asarray(images), np.asarray(reference)
    if a.shape != b.shape:
        raise PtqdError(f"paired metrics need image sets of one shape, got {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 4 or len(a) == 0:
        raise PtqdError(f"paired metrics need non-empty uint8 images (N, H, W, C), got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    cap = psnr_cap(a.shape[1:])
    win = ssim_window(a.shape[1:])
    mse, psnr, ssim = [], [], []
    for x, ref in zip(a, b):
        m = mean_squared_error(ref, x) / 255.0**2
        mse.append(m)
        psnr.append(cap if m == 0.0 else peak_signal_noise_ratio(ref, x, data_range=255))
        if win is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ssim.append(structural_similarity(ref, x, data_range=255, channel_axis=-1, win_size=win))
    return {"mse": np.asarray(mse, np.float64), "psnr": np.asarray(psnr, np.float64), "ssim": np.asarray(ssim, np.float64)}


def paired_metrics(images: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mean and std over images of :func:`paired_arrays` (``mse``/``mse_std``, ``psnr``/``psnr_std``,
    ``ssim``/``ssim_std``), ``identical`` (pairs that are equal; their PSNR is :func:`psnr_cap`) and
    ``num_pairs``."""
    arrays = paired_arrays(images, reference)
    out: dict[str, Any] = {}
    for key, v in arrays.items():
        out[key] = float(v.mean()) if len(v) else None
        out[f"{key}_std"] = float(v.std()) if len(v) else None
    out.update(identical=int((arrays["mse"] == 0).sum()), psnr_cap=psnr_cap(np.asarray(images).shape[1:]), num_pairs=int(len(images)))
    return out


def _field(samples, name: str) -> Any:
    if name == "num":
        return len(samples.images)
    if name == "shape":
        return tuple(samples.images.shape[1:])
    if name == "labels":
        return None if samples.labels is None else samples.labels.tolist()
    return samples.config.get(name)


def _show(v: Any) -> str:
    if isinstance(v, list) and len(v) > 8:
        return f"[{', '.join(map(str, v[:8]))}, … ({len(v)} values)]"
    return repr(v)


QUANTIZED_KEYS = ("act_bits", "correction", "bit_schedule", "checkpoint", "corrector")


def _fp_fingerprint(samples) -> str | None:
    """The fingerprint of the FP model behind a samples file: its own for FP samples, the recorded
    ``fp_model_fingerprint`` for quantized ones (None where an older quantized file does not say)."""
    c = samples.config
    if c.get("fp_model_fingerprint"):
        return c["fp_model_fingerprint"]
    return None if any(k in c for k in QUANTIZED_KEYS) else c.get("model_fingerprint")


def check_pair(samples, fp, names: tuple[str, str] = ("samples", "FP samples")) -> list[str]:
    """Refuse a pair whose seed, labels, prompts, sample count or image shape differ (naming the field);
    return notes on sampler settings that differ (allowed, but the pairing then means less)."""
    for f in ("num", "shape", "seed", "labels", "prompts"):
        va, vb = _field(samples, f), _field(fp, f)
        if f == "seed" and (va is None or vb is None):
            missing = names[0] if va is None else names[1]
            raise PtqdError(
                f"{missing} records no seed, so its images cannot be paired with {names[1] if va is None else names[0]}: "
                "paired metrics need samples written by `ptqd sample` (their config holds the seed)"
            )
        if va != vb:
            what = {"num": "sample count", "shape": "image shape"}.get(f, f)
            raise PtqdError(
                f"{names[0]} and {names[1]} differ in {what} ({_show(va)} vs {_show(vb)}): paired metrics compare each image "
                f"with the FP image made from the same seed, label and prompt; sample the FP model with the same "
                f"--seed, --num, --labels and prompts"
            )
    ka, kb = (_fp_fingerprint(s) for s in (samples, fp))
    if ka is not None and kb is not None and ka != kb:
        raise PtqdError(
            f"{names[0]} and {names[1]} come from different models (FP model fingerprint {ka} vs {kb}): paired metrics "
            "compare a quantized model with its own FP model; sample that model's FP samples with the same seeds"
        )
    notes = []
    for f in SAMPLER_FIELDS:
        va, vb = samples.config.get(f), fp.config.get(f)
        if va != vb:
            notes.append(f"{names[0]} and {names[1]} were sampled with different {f} ({va!r} vs {vb!r})")
    return notes


def check_floor(fp, other, names: tuple[str, str] = ("FP samples", "floor samples")) -> None:
    """The floor set must be the same FP model and sampler with another seed."""
    if _field(fp, "seed") is not None and _field(fp, "seed") == _field(other, "seed"):
        raise PtqdError(
            f"{names[1]} has the same seed as {names[0]} ({_field(fp, 'seed')}): the noise floor is the distance between "
            "FP sets of two different seeds; sample the FP model again with another --seed"
        )
    for f in ("num", "shape", "labels", "prompts", "model_fingerprint", *SAMPLER_FIELDS):
        va, vb = _field(fp, f), _field(other, f)
        if va != vb:
            what = {"num": "sample count", "shape": "image shape", "model_fingerprint": "model"}.get(f, f)
            raise PtqdError(
                f"{names[0]} and {names[1]} differ in {what} ({_show(va)} vs {_show(vb)}): the floor must come from the same "
                "FP model and sampler with only the seed changed"
            )


def set_features(images: np.ndarray, evaluator: str = "digits", inception=None, batch_size: int = 100, progress: bool = False):
    """Features the set distances use: the bundled digit classifier's 64-d pool features (16×16 grayscale
    digits), or the FID Inception-v3's 2048-d pool features (any uint8 images; ``inception`` from
    :func:`ptqd.metrics.load_inception`)."""
    if evaluator == "digits":
        from ptqd.metrics.classifier import extract_features

        if images.ndim != 4 or images.shape[1:] != (16, 16, 1):
            raise PtqdError(
                f"the bundled digit classifier takes 16x16 grayscale images, got {images.shape[1:]}: use --evaluator inception "
                "(FID Inception-v3 features) for other images"
            )
        return extract_features(images)
    if evaluator == "inception":
        from ptqd.metrics.inception import inception_features

        if inception is None:
            raise PtqdError("the inception evaluator needs the FID Inception-v3 network (pass --inception WEIGHTS)")
        return inception_features(images, inception, batch_size, progress)
    raise PtqdError(f"unknown evaluator {evaluator!r}: use one of {', '.join(EVALUATORS)}")


def set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N, D)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def fidelity(
    samples,
    fp,
    floor=None,
    evaluator: str = "digits",
    inception=None,
    batch_size: int = 100,
    progress: bool = False,
    features: dict | None = None,
    names: tuple[str, str, str] = ("samples", "FP samples", "floor samples"),
) -> dict[str, Any]:
    """Paired metrics of ``samples`` against ``fp`` (:class:`ptqd.sampling.Samples`), the Fréchet
    distance of their feature sets (``fd_fp``) and, with ``floor`` (FP samples of another seed),
    ``fd_fp_floor`` = FD(floor, fp) and ``fd_fp_ratio`` = fd_fp / floor. ``features`` may hold features
    already computed (keys ``samples``, ``fp``, ``floor``) and receives those computed here; ``names``
    (e.g. the file names) appear in error messages."""
    notes = check_pair(samples, fp, names[:2])
    if floor is not None:
        check_floor(fp, floor, names[1:])
    out: dict[str, Any] = {"evaluator": evaluator, **paired_metrics(samples.images, fp.images)}
    features = features if features is not None else {}
    for key, obj in (("samples", samples), ("fp", fp), ("floor", floor)):
        if obj is not None and key not in features:
            features[key] = set_features(obj.images, evaluator, inception, batch_size, progress)
    pool = {k: v.pool for k, v in features.items()}
    if len(samples.images) < 2:
        notes.append("the set distance needs at least 2 images")
    else:
        out["fd_fp"] = set_distance(pool["samples"], pool["fp"])
        if floor is not None:
            out["fd_fp_floor"] = set_distance(pool["floor"], pool["fp"])
            out["fd_fp_ratio"] = out["fd_fp"] / out["fd_fp_floor"] if out["fd_fp_floor"] > 0 else None
            out["floor_seed"] = floor.config.get("seed")
    if notes:
        out["notes"] = notes
    return out


def metrics_path(samples: str | Path) -> Path:
    """Where the metrics of ``S.npz`` live: ``S.metrics.json`` beside it (one file per samples file)."""
    samples = Path(samples)
    return samples.with_name(samples.stem + ".metrics.json")


def sampler_record(config: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings a metrics row records (from a samples file's config)."""
    return {k: config.get(k) for k in SAMPLER_FIELDS}


def evaluate_file(
    samples: str | Path,
    against: str | Path | None = None,
    floor: str | Path | None = None,
    reference: str | None = None,
    evaluator: str = "digits",
    inception=None,
    batch_size: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything ``ptqd evaluate S.npz [--against FP.npz [--floor FP_OTHER.npz]]`` writes: distances to
    real data where the evaluator has a reference (always for bundled-digit images; ``reference`` for
    Inception), with ``against`` the fidelity to FP (:func:`fidelity`), and the sampler, seed and N
    the samples were made with."""
    from ptqd.sampling import load_samples

    if floor is not None and against is None:
        raise PtqdError("--floor needs --against: the floor is the FP→FP distance that FD→FP is read against")
    if evaluator not in EVALUATORS:
        raise PtqdError(f"unknown evaluator {evaluator!r}: use one of {', '.join(EVALUATORS)}")
    s = load_samples(samples)
    f = load_samples(against) if against is not None else None
    o = load_samples(floor) if floor is not None else None
    names = (str(samples), str(against), str(floor))
    if f is not None:  # refuse mismatched pairs before any feature is computed
        check_pair(s, f, names[:2])
        if o is not None:
            check_floor(f, o, names[1:])
    if evaluator == "inception" and reference is None and f is None:
        raise PtqdError(
            "--evaluator inception needs --reference REF.npz (a reference batch from ADM or `ptqd reference`) "
            "or --against FP.npz (fidelity to FP samples)"
        )
    features: dict = {}
    out: dict[str, Any] = {}
    if evaluator == "digits":
        from ptqd.metrics.evaluate import evaluate

        if s.images.shape[1:] == (16, 16, 1) or f is None:
            out.update(evaluate(s.images, s.labels, reference=reference or "digits16"))
    elif reference is not None:
        from ptqd.metrics.standard import load_reference, standard_metrics

        features["samples"] = set_features(s.images, evaluator, inception, batch_size, progress)
        ref = load_reference(reference, inception, batch_size, progress)
        out.update(standard_metrics(features["samples"], ref, device=inception.device))
        out["inception"] = inception.fingerprint
    if f is not None:
        out.update(fidelity(s, f, o, evaluator, inception, batch_size, progress, features, names))
        out.update(against=str(against), floor=str(floor) if floor is not None else None)
    c = s.config
    out.update(
        evaluator=evaluator, samples=str(samples), num_samples=len(s.images), seed=c.get("seed"),
        sampler=sampler_record(c), model=c.get("model"),
    )
    return out
