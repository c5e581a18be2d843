"""Fidelity to FP: paired PSNR/SSIM/MSE, FD→FP and its floor, pairing checks, one metrics file per samples file."""

import json
import math

import numpy as np
import pytest

from ptqd.cli import main
from ptqd.errors import PtqdError
from ptqd.metrics.caveats import caveats, min_samples
from ptqd.metrics.fidelity import (
    evaluate_file,
    fidelity,
    metrics_path,
    paired_metrics,
    psnr_cap,
    set_distance,
    set_features,
)
from ptqd.sampling import Samples, save_samples

N = 50


def fake_samples(seed: int, n: int = N, shape=(16, 16, 1), labels=True, **config) -> Samples:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    lab = np.resize(np.arange(10), n) if labels else None
    cfg = {"model": "m", "model_fingerprint": "abc", "scheduler": "ddim", "steps": 10, "eta": 1.0, "guidance": 3.0,
           "seed": seed, "num": n, **config}
    return Samples(images, lab, cfg)


def test_identical_images_ssim_one_mse_zero():
    s = fake_samples(0)
    m = paired_metrics(s.images, s.images.copy())
    assert m["mse"] == 0 and m["mse_std"] == 0
    assert m["ssim"] == pytest.approx(1.0) and m["ssim_std"] == pytest.approx(0.0)
    assert m["identical"] == N and m["psnr"] == pytest.approx(psnr_cap((16, 16, 1)))
    assert psnr_cap((16, 16, 1)) == pytest.approx(10 * math.log10(255**2 * 256))


def test_constant_offset_matches_the_formulas():
    a = np.full((3, 16, 16, 1), 100, np.uint8)
    b = a + np.uint8(10)
    m = paired_metrics(b, a)
    assert m["mse"] == pytest.approx((10 / 255) ** 2)
    assert m["psnr"] == pytest.approx(10 * math.log10(255**2 / 10**2))  # 28.13 dB
    # SSIM of two flat images: only the luminance term is left, (2 μx μy + C1) / (μx² + μy² + C1), C1 = (0.01·255)²
    c1 = (0.01 * 255) ** 2
    assert m["ssim"] == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    # a noisy image: PSNR from the per-image MSE
    rng = np.random.default_rng(1)
    x = rng.integers(50, 200, size=(4, 16, 16, 3), dtype=np.uint8)
    y = (x.astype(int) + rng.integers(-5, 6, size=x.shape)).astype(np.uint8)
    per = ((x / 255.0 - y / 255.0) ** 2).reshape(4, -1).mean(1)
    m = paired_metrics(y, x)
    assert m["mse"] == pytest.approx(per.mean())
    assert m["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / per)))
    assert 0 < m["ssim"] < 1


def test_small_images_and_other_channel_counts():
    a = fake_samples(0, n=4, shape=(5, 5, 3)).images
    m = paired_metrics(a, a)
    assert m["ssim"] == pytest.approx(1.0)  # window shrinks to 5
    with pytest.raises(PtqdError, match="one shape"):
        paired_metrics(a, a[:, :4])


def test_fd_to_fp_of_a_set_against_itself_is_zero_and_floor_is_fp_vs_other_seed():
    fp0, fp1, q = fake_samples(0), fake_samples(1), fake_samples(0)
    q.images = np.clip(fp0.images.astype(int) + 3, 0, 255).astype(np.uint8)
    m = fidelity(fp0, fp0, fp1)
    assert m["fd_fp"] == pytest.approx(0.0, abs=1e-6) and m["fd_fp_ratio"] == pytest.approx(0.0, abs=1e-6)
    m = fidelity(q, fp0, fp1)
    direct = set_distance(set_features(fp1.images).pool, set_features(fp0.images).pool)
    assert m["fd_fp_floor"] == pytest.approx(direct) and direct > 0
    assert m["fd_fp_ratio"] == pytest.approx(m["fd_fp"] / direct)
    assert m["floor_seed"] == 1


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seed=1), "seed"),
        (dict(n=40), "sample count"),
        (dict(shape=(8, 8, 1)), "image shape"),
        (dict(labels=False), "labels"),
        (dict(prompts=["a cat"]), "prompts"),
    ],
)
def test_mismatched_pairs_are_refused_naming_the_field(tmp_path, capsys, change, field):
    fp = save_samples(fake_samples(0), tmp_path / "fp.npz")
    kw = {"seed": 0, **change}
    seed = kw.pop("seed")
    other = save_samples(fake_samples(seed, **kw), tmp_path / "q.npz")
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert main(["evaluate", str(other), "--against", str(fp)]) == 2
    err = capsys.readouterr().err
    assert field in err and "q.npz" in err and "fp.npz" in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # nothing written


def test_floor_must_be_another_seed_of_the_same_sampler(tmp_path, capsys):
    fp = save_samples(fake_samples(0), tmp_path / "fp.npz")
    q = save_samples(fake_samples(0), tmp_path / "q.npz")
    same = save_samples(fake_samples(0), tmp_path / "same.npz")
    assert main(["evaluate", str(q), "--against", str(fp), "--floor", str(same)]) == 2
    assert "same seed" in capsys.readouterr().err
    steps = save_samples(fake_samples(1, steps=20), tmp_path / "steps.npz")
    assert main(["evaluate", str(q), "--against", str(fp), "--floor", str(steps)]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["evaluate", str(q), "--floor", str(steps)]) == 2
    assert "--floor needs --against" in capsys.readouterr().err


def test_evaluate_against_writes_one_metrics_file_per_samples_file(tmp_path, capsys):
    fp = save_samples(fake_samples(0), tmp_path / "fp.npz")
    floor = save_samples(fake_samples(1), tmp_path / "fp_seed1.npz")
    q = fake_samples(0)
    q.images = np.clip(q.images.astype(int) + np.random.default_rng(5).integers(-8, 9, q.images.shape), 0, 255).astype(np.uint8)
    qa = save_samples(q, tmp_path / "a.npz")
    qb = save_samples(fake_samples(0), tmp_path / "b.npz")
    assert main(["evaluate", str(qa), "--against", str(fp), "--floor", str(floor)]) == 0
    text = capsys.readouterr().out
    assert "PSNR to FP dB" in text and "FD→FP / floor" in text and "*" in text  # N=50: FD and IS marked
    assert main(["evaluate", str(qb)]) == 0
    ma, mb = json.loads(metrics_path(qa).read_text()), json.loads(metrics_path(qb).read_text())
    assert metrics_path(qa).name == "a.metrics.json" and metrics_path(qb).name == "b.metrics.json"
    assert ma["samples"] == str(qa) and mb["samples"] == str(qb)
    assert ma["psnr"] > 20 and ma["ssim"] < 1 and ma["fd_fp_floor"] > 0 and ma["fd_fp_ratio"] is not None
    assert "psnr" not in mb and mb["fd"] > 0
    for m in (ma, mb):
        assert m["sampler"] == {"scheduler": "ddim", "steps": 10, "eta": 1.0, "guidance": 3.0}
        assert m["seed"] == 0 and m["num_samples"] == N
    # the Python function gives the same numbers
    again = evaluate_file(qa, fp, floor)
    assert again["psnr"] == pytest.approx(ma["psnr"]) and again["fd_fp"] == pytest.approx(ma["fd_fp"])


def test_compare_shows_paired_columns_and_marks_a_different_sampler(tmp_path, capsys):
    fp = save_samples(fake_samples(0), tmp_path / "fp.npz")
    a = save_samples(fake_samples(0), tmp_path / "a.npz")
    b = save_samples(fake_samples(0, steps=20), tmp_path / "b.npz")
    assert main(["evaluate", str(a), "--against", str(fp)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "PSNR to FP dB" in lines[0] and "seed" in lines[0] and "sampler" in lines[0]
    row_a = next(line for line in lines if "a.npz" in line)
    row_b = next(line for line in lines if "b.npz" in line)
    assert "≠" in row_b and "≠" not in row_a and "20 steps" in row_b
    assert "sampled differently from the first row" in text


def test_small_sample_caveats():
    small = {"num_samples": 40, "fd": 10.0, "is": 1.6, "recall": 1.0, "precision": 1.0, "accuracy": 1.0, "psnr": 30.0}
    flagged = caveats(small)
    assert set(flagged) == {"fd", "is", "recall", "precision"}
    assert "N=40" in flagged["recall"]
    big = {**small, "num_samples": 1000}
    assert caveats(big) == {}
    assert min_samples("fid", "inception") == 20480 and min_samples("sfd") == 2560 and min_samples("psnr") is None
