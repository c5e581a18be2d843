import json

import numpy as np
import pytest
import torch

from ptqd.cli import main
from ptqd.data import load_digits
from ptqd.errors import PtqdError
from ptqd.images import from_uint8, to_uint8
from ptqd.metrics import evaluate, frechet_distance
from ptqd.metrics.classifier import load_classifier
from ptqd.models import list_models, load
from ptqd.sampling import SamplerConfig, load_samples, sample, save_samples


@pytest.mark.parametrize("name", ["digits16-cond", "digits16"])
def test_zoo_loads_offline(name):
    m = load(name)
    assert m.image_size == 16 and m.channels == 1
    assert m.conditional == (name == "digits16-cond")
    x = torch.randn(2, 1, 16, 16)
    y = torch.tensor([3, 4]) if m.conditional else None
    out = m.denoise(x, torch.tensor(500), y, guidance=3.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_latent_zoo_model_loads_offline_and_decodes():
    m = load("digits-ldm")
    assert "digits-ldm" in list_models()
    assert m.latent and m.conditional and (m.num_classes, m.null_class) == (10, 10)
    assert (m.channels, m.image_size) == (4, 8)  # the UNet denoises 4x8x8 latents
    assert m.decoder.describe()["decoder"] == "AutoencoderKL" and m.decoder.scaling_factor > 0
    assert not any(p.requires_grad for p in m.decoder.vae.parameters())  # the FP decoder, frozen
    x = torch.randn(2, 4, 8, 8)
    out = m.denoise(x, torch.tensor(500), torch.tensor([3, 4]), guidance=3.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert m.to_images(x).shape == (2, 1, 16, 16)
    s = sample(m, 3, SamplerConfig(steps=3, guidance=3.0, seed=0, batch_size=3), progress=False)
    assert s.images.dtype == np.uint8 and s.images.shape == (3, 16, 16, 1) and list(s.labels) == [0, 1, 2]


def test_latent_zoo_pipeline_decodes_like_ptqd_sample():
    import ptqd
    from ptqd.models.pipeline import ClassConditionalPipeline, to_uint8_images
    from ptqd.sampling import sample_generators

    pipe = ptqd.load_pipeline("digits-ldm")
    assert isinstance(pipe, ClassConditionalPipeline) and pipe.vae is pipe.ptqd_model.decoder.vae
    images = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, num_inference_steps=3, eta=1.0,
                  generator=sample_generators(0, range(3)), output_type="np").images
    mine = sample(pipe.ptqd_model, 3, SamplerConfig(steps=3, eta=1.0, guidance=3.0, seed=0, batch_size=3), progress=False)
    diff = np.abs(to_uint8_images(images).astype(int) - mine.images.astype(int))
    assert images.shape == (3, 16, 16, 1) and diff.max() <= 1  # the same decoded images (float rounding)


@pytest.mark.slow
def test_latent_zoo_model_quality():
    """digits-ldm, DDIM 50 steps, eta 1, guidance 3: the bundled classifier recognises >= 90 % of the decoded digits."""
    m = load("digits-ldm")
    s = sample(m, 100, SamplerConfig(steps=50, eta=1.0, guidance=3.0, seed=0, batch_size=50), progress=False)
    assert evaluate(s.images, s.labels)["accuracy"] >= 0.9


def test_model_directory_loads_same_as_name():
    m = load("digits16")
    m2 = load(str(m.path))
    assert m.fingerprint() == m2.fingerprint()


def test_unknown_model_lists_known():
    with pytest.raises(PtqdError, match="digits16-cond"):
        load("no-such-model")


def test_sampling_deterministic_and_batch_independent():
    m = load("digits16-cond")
    a = sample(m, 6, SamplerConfig(steps=4, guidance=3.0, seed=1, batch_size=6), progress=False)
    b = sample(m, 6, SamplerConfig(steps=4, guidance=3.0, seed=1, batch_size=4), progress=False)
    c = sample(m, 6, SamplerConfig(steps=4, guidance=3.0, seed=2, batch_size=6), progress=False)
    assert a.images.dtype == np.uint8 and a.images.shape == (6, 16, 16, 1)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert list(a.labels) == [0, 1, 2, 3, 4, 5]


def test_ddpm_sampling_unconditional():
    m = load("digits16")
    s = sample(m, 3, SamplerConfig(scheduler="ddpm", steps=3), progress=False)
    assert s.images.shape == (3, 16, 16, 1) and s.labels is None


def test_uint8_conversion_endpoints():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 255]
    imgs = load_digits().images[:5]
    assert np.array_equal(to_uint8(from_uint8(imgs)), imgs)


def test_frechet_matches_scipy_reference():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(1.0, 2.0, size=(300, 8)) @ rng.normal(size=(8, 8))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_real_digits_fd_zero_noise_large():
    d = load_digits()
    real = evaluate(d.images, d.labels)
    assert real["fd"] < 1e-6 and real["accuracy"] > 0.97
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(500, 16, 16, 1), dtype=np.uint8)
    assert evaluate(noise)["fd"] > 50 * max(real["fd"], 0.1)


def test_classifier_held_out_accuracy():
    test = load_digits("test")
    with torch.no_grad():
        pred = load_classifier()(from_uint8(test.images)).argmax(1).numpy()
    assert (pred == test.labels).mean() >= 0.97


def test_bad_npz_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(PtqdError, match="not a readable"):
        load_samples(bad)
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, foo=np.zeros(3))
    with pytest.raises(PtqdError, match="no 'images'"):
        load_samples(nokey)
    assert main(["evaluate", str(tmp_path / "missing.npz")]) == 2


def test_cli_sample_evaluate_roundtrip(tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", "digits16-cond", "--num", "20", "--steps", "3", "--guidance", "3",
                 "--out", str(out), "--no-progress"]) == 0
    s = load_samples(out)
    assert s.config["steps"] == 3 and len(s.images) == 20
    assert main(["evaluate", str(out)]) == 0
    metrics = json.loads((tmp_path / "s.metrics.json").read_text())
    assert set(["fd", "sfd", "is", "precision", "recall", "accuracy", "num_samples"]) <= set(metrics)
