"""The command line: every option documented with its default, presets, samplers not frozen at
quantize time, runs that survive a moved model."""

import argparse
import json
import shutil

import pytest

from ptqd import defaults
from ptqd.cli import build_parser, main
from ptqd.models.zoo import zoo_path


def subcommands():
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    for name, sp in subcommands().items():
        for a in sp._actions:
            assert a.help, f"`ptqd {name}` option {a.option_strings or a.dest} has no help"
    text = subcommands()["sample"].format_help()
    assert f"(default: {defaults.STEPS})" in text and f"(default: {defaults.BATCH_SIZE})" in text
    q = subcommands()["quantize"].format_help()
    assert "quick" in q and f"{defaults.CALIB_SAMPLES}" in q and f"(default: {defaults.CALIB_SEED})" in q


@pytest.mark.slow
def test_quick_preset_samplers_not_frozen_and_a_moved_model(tmp_path, capsys):
    model = tmp_path / "m1"
    shutil.copytree(zoo_path("digits16-cond"), model)
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(model), "--quick", "--method", "ptqd", "--weight-bits", "4", "--steps", "10",
                 "--out", str(run), "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    quick = defaults.PRESETS["quick"]
    assert cfg["options"]["recon_samples"] == quick["options"]["recon_samples"]
    assert cfg["calibration"]["num_samples"] == quick["calib_samples"] and cfg["correction"]["noise_samples"] == quick["noise_samples"]
    capsys.readouterr()
    # another sampler: refused before any image is made, naming the exact command
    out = tmp_path / "s.npz"
    args = ["sample", str(run), "--num", "4", "--steps", "5", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"ptqd stats {run} --scheduler ddim --steps 5 --eta 1 --guidance 3" in err and not out.exists()
    # … or collected on the way
    assert main([*args, "--collect-stats"]) == 0
    assert (run / "noise_stats_ddim5_eta1_g3.safetensors").is_file() and out.is_file()
    # the FP model moves: the run says how to point at it, and accepts it where its weights match
    moved = tmp_path / "m2"
    model.rename(moved)
    assert main(["sample", str(run), "--num", "4", "--steps", "10", "--out", str(tmp_path / "a.npz"), "--no-progress"]) == 2
    assert "--model NEWDIR" in capsys.readouterr().err
    assert main(["sample", str(run), "--model", str(moved), "--num", "4", "--steps", "10",
                 "--out", str(tmp_path / "a.npz"), "--no-progress"]) == 0
    assert main(["sample", str(run), "--model", "digits16", "--num", "4", "--steps", "10",
                 "--out", str(tmp_path / "b.npz"), "--no-progress"]) == 2
    assert "not the same weights" in capsys.readouterr().err


def test_fp_sampling_defaults_to_the_guidance_runs_use(tmp_path):
    out = tmp_path / "fp.npz"
    assert main(["sample", "--model", "digits16-cond", "--num", "4", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["guidance"] == defaults.GUIDANCE


def test_latent_zoo_model_quantizes_and_samples_from_the_cli(tmp_path):
    """digits-ldm through `ptqd quantize` (smallest calibration) and `ptqd sample`: decoded 16x16 digits."""
    from ptqd.sampling import load_samples

    run = tmp_path / "run"
    assert main(["quantize", "--model", "digits-ldm", "--method", "ptqd", "--weight-bits", "4", "--calib-samples", "2",
                 "--calib-steps", "2", "--steps", "2", "--noise-samples", "2", "--weight-iters", "0", "--act-iters", "0",
                 "--recon-samples", "4", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["model"] == "digits-ldm"
    out = tmp_path / "q.npz"
    assert main(["sample", str(run), "--num", "4", "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert load_samples(out).images.shape == (4, 16, 16, 1)
    fp = tmp_path / "fp.npz"
    assert main(["sample", "--model", "digits-ldm", "--num", "4", "--steps", "2", "--out", str(fp), "--no-progress"]) == 0
    assert load_samples(fp).images.shape == (4, 16, 16, 1)
