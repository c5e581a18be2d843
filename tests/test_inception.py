"""Standard metrics: the FID Inception-v3 (random weights: shapes and plumbing), TF1 resize, weight
loading errors, reference batches, Fréchet distance against scipy, IS splits, chunked precision/recall."""

import json

import numpy as np
import pytest
import torch

from ptqd.cli import main
from ptqd.errors import PtqdError
from ptqd.metrics import frechet_distance, inception_score, precision_recall
from ptqd.metrics import quality
from ptqd.metrics.inception import (
    WEIGHT_FILES,
    WEIGHTS_URL,
    FIDInceptionV3,
    find_weights,
    inception_features,
    load_inception,
    preprocess,
    resize_bilinear_tf1,
)
from ptqd.metrics.standard import InceptionReference, load_reference, save_reference, standard_metrics


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight FID Inception-v3 saved as pytorch-fid's file would be (no AuxLogits), with a
    large fc bias that the ADM softmax must ignore."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # variance-preserving weights: features of different images stay apart
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.8, 1.25)
    with torch.no_grad():
        net.fc.bias.uniform_(-50, 50)
    path = tmp_path_factory.mktemp("w") / WEIGHT_FILES[0]
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def _images(n, seed, size=16, channels=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_resize_is_tf1_legacy_bilinear():
    x = torch.tensor([[[[10.0, 30.0]]]])  # 1x2 row -> width 4: source coords 0, .5, 1, 1.5 (clamped)
    out = resize_bilinear_tf1(x.expand(1, 1, 2, 2), 4)
    assert out[0, 0, 0].tolist() == [10.0, 20.0, 30.0, 30.0]
    assert torch.equal(out[0, 0, 0], out[0, 0, 3])
    img = torch.rand(2, 3, 299, 299)
    assert torch.equal(resize_bilinear_tf1(img, 299), img)  # already 299: untouched
    # against a direct per-pixel implementation of TF1's formula
    small = torch.rand(1, 1, 5, 7)
    big = resize_bilinear_tf1(small, 11)
    for i, j in [(0, 0), (3, 4), (10, 10), (7, 2)]:
        sy, sx = i * 5 / 11, j * 7 / 11
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
        wy, wx = sy - y0, sx - x0
        s = small[0, 0]
        top = s[y0, x0] + (s[y0, x1] - s[y0, x0]) * wx
        bot = s[y1, x0] + (s[y1, x1] - s[y1, x0]) * wx
        assert float(big[0, 0, i, j]) == pytest.approx(float(top + (bot - top) * wy), abs=1e-5)
    x = preprocess(np.full((1, 8, 8, 1), 255, np.uint8))
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.full_like(x, 127 / 128))


@pytest.fixture(scope="module")
def features(weights):
    """Features of 4 grayscale 16x16 images (upsampled to 299), with the hooked layer outputs."""
    inc = load_inception(weights)
    seen = {}
    hooks = [
        inc.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o)),
        inc.net.Mixed_7c.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_10", o)),
    ]
    try:
        f = inception_features(_images(4, 0), inc, progress=False)
    finally:
        for h in hooks:
            h.remove()
    return inc, f, seen


def test_features_shapes_spatial_order_and_unbiased_softmax(features):
    inc, f, seen = features
    assert f.pool.shape == (4, 2048) and f.spatial.shape == (4, 17 * 17 * 7) and f.probs.shape == (4, 1008)
    assert seen["mixed_6_conv"].shape == (4, 192, 17, 17) and seen["mixed_10"].shape == (4, 2048, 8, 8)
    nhwc = seen["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(4, -1).numpy()
    np.testing.assert_array_equal(f.spatial, nhwc)
    np.testing.assert_allclose(f.pool, seen["mixed_10"].mean((2, 3)).numpy(), rtol=1e-6)
    w = inc.net.fc.weight.detach().double().numpy()
    logits = f.pool.astype(np.float64) @ w.T
    expect = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(f.probs, expect / expect.sum(1, keepdims=True), rtol=1e-4, atol=1e-9)
    assert np.isfinite(f.pool).all() and f.pool.std() > 0 and not np.allclose(f.pool[0], f.pool[1])


def test_missing_and_wrong_weights_are_clear_errors(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PtqdError, match=r"no Inception-v3 weights.*pt_inception-2015-12-05.*--inception PATH") as e:
        find_weights()
    assert WEIGHTS_URL in str(e.value)
    with pytest.raises(PtqdError, match=r"do not exist.*download"):
        find_weights(tmp_path / "nope.pth")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHT_FILES[1]  # torch-fidelity's file name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights)
    assert find_weights() == cached
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PtqdError, match="not a readable PyTorch weights file"):
        load_inception(bad)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(PtqdError, match="does not hold FID Inception-v3 weights"):
        load_inception(other)
    shape = tmp_path / "shape.pth"
    sd = torch.load(weights, weights_only=True)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, shape)
    with pytest.raises(PtqdError, match="does not fit"):
        load_inception(shape)


@pytest.mark.slow  # two 2048-d Fréchet distances (eigendecompositions) and 8 Inception forwards on the CPU
def test_cli_reference_and_evaluate_inception(weights, tmp_path):
    images = _images(4, 3, size=32, channels=3)
    np.savez(tmp_path / "samples.npz", images=images)
    np.savez(tmp_path / "adm_batch.npz", arr_0=images)  # ADM's key
    ref = tmp_path / "ref.npz"
    assert main(["reference", str(tmp_path / "adm_batch.npz"), "--out", str(ref), "--inception", str(weights), "--no-progress"]) == 0
    out = tmp_path / "m.json"
    assert main([
        "evaluate", str(tmp_path / "samples.npz"), "--evaluator", "inception", "--inception", str(weights),
        "--reference", str(ref), "--out", str(out), "--no-progress",
    ]) == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"fid", "sfid", "is", "precision", "recall", "num_samples", "inception"}
    # the same images as the reference: distances vanish, manifolds coincide
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["num_samples"] == 4 and m["is"] >= 1.0
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--evaluator", "inception", "--inception", str(weights)]) == 2
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--inception", str(weights)]) == 2


def test_reference_formats_and_mismatches(features, tmp_path, monkeypatch):
    inc, f, _ = features
    mu, sigma = f.pool.mean(0), np.cov(f.pool.astype(np.float64), rowvar=False)
    mu_s, sigma_s = f.spatial.mean(0), np.cov(f.spatial.astype(np.float64), rowvar=False)
    adm = tmp_path / "adm_stats.npz"  # ADM's precomputed statistics only: no images, no pool features
    np.savez(adm, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = load_reference(adm, inc)
    assert ref.inception is None and ref.pool is None and np.array_equal(ref.sigma_s, sigma_s)
    from ptqd.metrics import standard

    # the 2048-d Fréchet distances are exercised end to end in the CLI test; here only the branches
    monkeypatch.setattr(standard, "frechet_distance", lambda *a: 0.0)
    m = standard_metrics(f, ref)
    assert m["precision"] is None and m["recall"] is None and m["num_samples"] == 4
    ours = InceptionReference("r", "0123456789abcdef", 4, mu, sigma, mu_s, sigma_s, f.pool)
    save_reference(ours, tmp_path / "ours.npz")
    back = load_reference(tmp_path / "ours.npz")
    assert back.inception == "0123456789abcdef" and back.num_images == 4 and np.array_equal(back.pool, f.pool)
    m = standard_metrics(f, back)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    with pytest.raises(PtqdError, match="made with Inception weights 0123456789abcdef"):
        standard.evaluate_standard(_images(2, 5), back, inc, progress=False)
    np.savez(tmp_path / "digits_like.npz", mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(256), sigma_s=np.eye(256))
    with pytest.raises(PtqdError, match="64-d pool"):
        standard_metrics(f, load_reference(tmp_path / "digits_like.npz"))
    np.savez(tmp_path / "empty.npz", x=np.zeros(2))
    with pytest.raises(PtqdError, match="not a reference batch"):
        load_reference(tmp_path / "empty.npz")
    with pytest.raises(PtqdError, match="needs the Inception network"):
        np.savez(tmp_path / "imgs.npz", arr_0=_images(2, 6))
        load_reference(tmp_path / "imgs.npz")


@pytest.mark.parametrize("n", [400, 40])  # full-rank and rank-deficient (fewer samples than dimensions)
def test_frechet_against_scipy_sqrtm(n):
    from scipy import linalg

    rng = np.random.default_rng(n)
    d = 64
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    b = rng.normal(0.5, 1.0, size=(n + 7, d)) @ rng.normal(size=(d, d)) * 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))  # the ADM evaluator's computation (it passes disp=False, deprecated)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))


def test_inception_score_splits_of_fixed_size():
    onehot = np.eye(10)[np.arange(10)]
    assert inception_score(onehot, split_size=5) == pytest.approx((5.0, 0.0))  # each split: 5 distinct classes
    assert inception_score(onehot, splits=1) == pytest.approx((10.0, 0.0))
    assert inception_score(np.full((12, 4), 0.25), split_size=5)[0] == pytest.approx(1.0)


def test_precision_recall_chunked_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.7, 1.2, size=(45, 5))

    def brute(a, b, k=3):
        da = np.linalg.norm(a[:, None] - a[None], axis=-1)
        radii = np.sort(da, axis=1)[:, k]
        dab = np.linalg.norm(b[:, None] - a[None], axis=-1)
        return float((dab <= radii[None]).any(1).mean())

    monkeypatch.setattr(quality, "CHUNK", 7)
    p, r = precision_recall(real, fake)
    assert p == pytest.approx(brute(real, fake)) and r == pytest.approx(brute(fake, real))
    assert 0 < p < 1 and 0 < r < 1
