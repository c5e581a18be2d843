"""Bad inputs and faults through `ptqd.cli.main`: each a clear error before any work, nothing changed on disk.

Every case runs one command in a shared directory of pre-existing files and checks the exit code,
that the message names the offending option/file/field, and that no file in the directory was
created, changed or removed (SHA-256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqd
from ptqd.cli import main
from ptqd.models.zoo import zoo_path
from ptqd.sampling import Samples, save_samples

SAMPLE = ["sample", "--model", "digits16-cond", "--num", "2", "--steps", "2", "--batch-size", "2", "--no-progress"]
QUANT = ["quantize", "--model", "digits16-cond", "--method", "naive", "--calib-samples", "2", "--calib-steps", "2",
         "--steps", "2", "--no-progress"]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _model_copy(dst: Path) -> Path:
    shutil.copytree(zoo_path("digits16-cond"), dst)
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Pre-existing files the bad commands must leave alone, and the inputs they need."""
    from safetensors.torch import load_file, save_file

    w = tmp_path_factory.mktemp("bad_input")
    (w / "notes.txt").write_text("my notes\n")
    (w / "notes.npz").write_text("not a ptqd file\n")
    (w / "foreign.json").write_text('{"mine": true}\n')
    (w / "taken.json").write_text('{"mine": true}\n')  # the config name of taken.npz
    (w / "dir.npz").mkdir()
    (w / "afile").write_text("a file, not a directory\n")
    (w / "ro").mkdir()
    (w / "foreign_dir").mkdir()
    (w / "foreign_dir" / "keep.txt").write_text("keep\n")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    save_samples(Samples(images, np.arange(12) % 10, {"model": "test", "model_fingerprint": "x"}), w / "S.npz")
    save_samples(Samples(images, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 3]), {"model": "test", "model_fingerprint": "x"}),
                 w / "badlabels.npz")
    # a model with one NaN weight
    nan_model = _model_copy(w / "nan_model")
    f = nan_model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = sorted(k for k in state if k.endswith("weight") and state[k].ndim == 4)[2]
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(f))
    (w / "nan_key.txt").write_text(key)
    # a model whose index names an arbitrary library
    evil = _model_copy(w / "evil_model")
    (evil / "model_index.json").write_text(json.dumps({"unet": ["evil_plugin", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    # a model with only pickle weights
    pickled = _model_copy(w / "pickle_model")
    f = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(f)), pickled / "unet" / "diffusion_pytorch_model.bin")
    f.unlink()
    # a finished (tiny) run
    assert main([*QUANT, "--out", str(w / "run")]) == 0
    return w


def _nan_act_scale(monkeypatch):
    """Load runs with one activation scale set to NaN (a damaged calibration)."""
    import ptqd.runs
    from ptqd.quant import act_quantizers

    real = ptqd.runs.load_run

    def load_run(path, model=None):
        run = real(path, model)
        _, q = list(act_quantizers(run.qnet))[3]
        q.current_scale().data.fill_(float("nan"))
        return run

    monkeypatch.setattr(ptqd.runs, "load_run", load_run)


def _unwritable(name):
    def setup(monkeypatch, w):
        import ptqd.io

        real = ptqd.io._writable
        monkeypatch.setattr(ptqd.io, "_writable", lambda d: False if Path(d).name == name else real(d))

    return setup


def _raise(exc):
    def setup(monkeypatch, w):
        import ptqd.models
        import ptqd.runs

        def boom(*a, **k):
            raise exc

        monkeypatch.setattr(ptqd.models, "list_models", boom)
        monkeypatch.setattr(ptqd.runs, "quantize", boom)

    return setup


# (id, argv with {w} for the work directory, exit code, words the message must contain, optional setup)
CASES = [
    # samples output: extension, kind, parent, ownership
    ("sample-out-json", [*SAMPLE, "--out", "{w}/x.json"], 2, ["--out", "x.json", ".npz"]),
    ("sample-out-png", [*SAMPLE, "--out", "{w}/img.png"], 2, ["img.png", ".npz"]),
    ("sample-out-foreign-file", [*SAMPLE, "--out", "{w}/notes.npz"], 2, ["notes.npz", "did not write", "--overwrite"]),
    ("sample-out-directory", [*SAMPLE, "--out", "{w}/dir.npz"], 2, ["dir.npz", "existing directory"]),
    ("sample-out-parent-file", [*SAMPLE, "--out", "{w}/afile/x.npz"], 2, ["afile", "is a file"]),
    ("sample-out-readonly", [*SAMPLE, "--out", "{w}/ro/x.npz"], 2, ["ro", "cannot write"], _unwritable("ro")),
    ("sample-config-foreign", [*SAMPLE, "--out", "{w}/taken.npz"], 2, ["taken.json", "did not write"]),
    # sampler settings
    ("sample-guidance-nan", [*SAMPLE, "--guidance", "nan", "--out", "{w}/g.npz"], 2, ["guidance", "nan"]),
    ("sample-guidance-inf", [*SAMPLE, "--guidance", "inf", "--out", "{w}/g.npz"], 2, ["guidance", "inf"]),
    ("sample-guidance-negative", [*SAMPLE, "--guidance", "-1", "--out", "{w}/g.npz"], 2, ["guidance", "-1"]),
    ("sample-labels-empty", [*SAMPLE, "--labels", "", "--out", "{w}/l.npz"], 2, ["--labels", "at least one"]),
    ("sample-labels-out-of-range", [*SAMPLE, "--labels", "3,11", "--out", "{w}/l.npz"], 2, ["11", "out of range"]),
    # NaN: no images from NaN outputs
    ("sample-nan-weight", ["sample", "--model", "{w}/nan_model", "--num", "2", "--steps", "2", "--no-progress", "--out", "{w}/n.npz"],
     2, ["not finite", "step 1/2", "t=", "{nan_key}"]),
    ("sample-run-nan-scale", ["sample", "{w}/run", "--num", "2", "--steps", "2", "--no-progress", "--out", "{w}/n.npz"],
     2, ["not finite", "step 1/2", "act_quantizer"], lambda mp, w: _nan_act_scale(mp)),
    # evaluate
    ("evaluate-out-is-samples", ["evaluate", "{w}/S.npz", "--out", "{w}/S.npz"], 2, ["S.npz", "samples file itself"]),
    ("evaluate-out-txt", ["evaluate", "{w}/S.npz", "--out", "{w}/notes.txt"], 2, ["notes.txt", ".json"]),
    ("evaluate-out-foreign-json", ["evaluate", "{w}/S.npz", "--out", "{w}/foreign.json"], 2, ["foreign.json", "--overwrite"]),
    ("evaluate-out-samples-config", ["evaluate", "{w}/S.npz", "--out", "{w}/S.json"], 2, ["S.json", "did not write"]),
    ("evaluate-out-directory", ["evaluate", "{w}/S.npz", "--out", "{w}/foreign_dir"], 2, ["foreign_dir", ".json"]),
    ("evaluate-labels-outside-classes", ["evaluate", "{w}/badlabels.npz"], 2, ["labels [12]", "10 classes"]),
    # quantize
    ("quantize-out-file", [*QUANT, "--out", "{w}/notes.txt"], 2, ["notes.txt", "existing file"]),
    ("quantize-out-foreign-dir", [*QUANT, "--out", "{w}/foreign_dir"], 2, ["foreign_dir", "did not write", "--overwrite"]),
    ("quantize-out-parent-file", [*QUANT, "--out", "{w}/afile/run"], 2, ["afile", "is a file"]),
    ("quantize-out-readonly", [*QUANT, "--out", "{w}/ro/run"], 2, ["ro", "cannot write"], _unwritable("ro")),
    ("quantize-calib-steps-0", [*QUANT, "--calib-steps", "0", "--out", "{w}/q"], 2, ["--calib-steps", "0"]),
    ("quantize-guidance-nan", [*QUANT, "--guidance", "nan", "--out", "{w}/q"], 2, ["guidance", "nan"]),
    *[
        (f"quantize-nan-weight-{m}", ["quantize", "--model", "{w}/nan_model", "--method", m, "--calib-samples", "2",
                                      "--calib-steps", "2", "--steps", "2", "--noise-samples", "2", "--no-progress", "--out", "{w}/q"],
         2, ["not finite", "step 1/2", "{nan_key}"])
        for m in ("naive", "qdiff", "ptqd")
    ],
    # stats and export
    ("stats-guidance-inf", ["stats", "{w}/run", "--guidance", "inf", "--no-progress"], 2, ["guidance", "inf"]),
    ("stats-readonly-run", ["stats", "{w}/run", "--noise-samples", "2", "--no-progress"], 2, ["run", "cannot write"], _unwritable("run")),
    ("stats-nan-scale", ["stats", "{w}/run", "--noise-samples", "2", "--steps", "2", "--no-progress"], 2,
     ["noise statistics", "not finite", "step 1/2", "A8"], lambda mp, w: _nan_act_scale(mp)),
    ("export-out-file", ["export", "{w}/run", "--out", "{w}/notes.txt"], 2, ["notes.txt", "existing file"]),
    ("export-out-foreign-dir", ["export", "{w}/run", "--out", "{w}/foreign_dir"], 2, ["foreign_dir", "--overwrite"]),
    # model directories
    ("model-index-unknown-library", ["sample", "--model", "{w}/evil_model", *SAMPLE[3:], "--out", "{w}/e.npz"], 2,
     ["evil_plugin", "diffusers and transformers"]),
    ("model-pickle-weights", ["sample", "--model", "{w}/pickle_model", *SAMPLE[3:], "--out", "{w}/p.npz"], 2,
     ["diffusion_pytorch_model.bin", "safetensors", "save_pretrained"]),
    # the CLI guard
    ("unexpected-error", ["models"], 1, ["ptqd models", ptqd.__version__, "--debug", "RuntimeError"], _raise(RuntimeError("boom"))),
    ("interrupted-quantize", [*QUANT, "--out", "{w}/q"], 130, ["interrupted", "resumes"], _raise(KeyboardInterrupt())),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, work, monkeypatch, capsys):
    name, argv, code, words, *setup = case
    nan_key = (work / "nan_key.txt").read_text()
    argv = [a.format(w=work) for a in argv]
    if setup:
        setup[0](monkeypatch, work)
    before = _tree(work)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (exit 2, usage + message)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    for word in words:
        assert word.format(nan_key=nan_key) in err, err
    assert "Traceback" not in err and err.count("ptqd") <= 4, err  # a message, not a traceback
    assert _tree(work) == before, f"{name} changed files"
    assert not list(work.rglob("noise_stats_*.safetensors")), "statistics were written"


def test_debug_reraises(monkeypatch):
    _raise(RuntimeError("boom"))(monkeypatch, None)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "models"])
    with pytest.raises(RuntimeError, match="boom"):
        main(["models", "--debug"])


def test_overwrite_and_rerun(work, tmp_path):
    """--overwrite replaces a foreign file; a file ptqd wrote is replaced on a rerun without it."""
    out = tmp_path / "mine.npz"
    out.write_text("foreign")
    assert main([*SAMPLE, "--out", str(out)]) == 2 and out.read_text() == "foreign"
    assert main([*SAMPLE, "--out", str(out), "--overwrite"]) == 0
    assert main([*SAMPLE, "--out", str(out), "--seed", "1"]) == 0  # ptqd's own file: replaced
    assert main(["evaluate", str(work / "S.npz"), "--out", str(tmp_path / "m.json")]) == 0
    assert main(["evaluate", str(work / "S.npz"), "--out", str(tmp_path / "m.json")]) == 0
    assert main([*QUANT, "--out", str(work / "run")]) == 0  # a run directory: loaded again


def test_readonly_directory_refused_for_real(tmp_path):
    """A directory nobody may write to: mode 0555 for a normal user; for root (CI) an immutable one (chattr +i)."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(ro)], check=True)
    else:
        ro.chmod(0o555)
    try:
        assert main([*SAMPLE, "--out", str(ro / "x.npz")]) == 2
        assert not any(ro.iterdir())
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        else:
            ro.chmod(0o755)


def test_written_files_follow_umask(tmp_path):
    from ptqd.io import write_json, write_npz

    old = os.umask(0o022)
    try:
        a = write_json(tmp_path / "a.json", {"x": 1})
        b = write_npz(tmp_path / "b.npz", {"x": np.zeros(2)})
        assert main([*SAMPLE, "--out", str(tmp_path / "s.npz")]) == 0
        for f in (a, b, tmp_path / "s.npz", tmp_path / "s.json"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o077)
        c = write_json(tmp_path / "c.json", {"x": 1})
        assert stat.S_IMODE(c.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_calibration_stops_on_nan_weight_and_nan_inputs():
    """The checks behind `quantize` (which stops earlier, while sampling its calibration data)."""
    import dataclasses

    from ptqd.calibration import CalibrationOptions, calibrate, collect_calibration
    from ptqd.errors import PtqdError
    from ptqd.models import load
    from ptqd.quant import QuantConfig, wrap_model
    from ptqd.runs import example_forward, resolve_config
    from ptqd.sampling import SamplerConfig

    model = load("digits16-cond")
    calib = collect_calibration(model, 2, SamplerConfig(steps=2, guidance=3.0), num_steps=2, progress=False)
    config = resolve_config(QuantConfig(), "naive")
    bad = dataclasses.replace(calib, x=calib.x.clone())
    bad.x[0, 0, 0, 0] = float("inf")
    qnet = wrap_model(model.unet, config, run_once=example_forward(model))
    with pytest.raises(PtqdError, match="calibration inputs .* not finite"):
        calibrate(model, qnet, bad, CalibrationOptions(method="naive"), progress=False)
    name, p = next((n, p) for n, p in model.unet.named_parameters() if p.ndim == 4)
    p.data[0, 0, 0, 0] = float("nan")
    qnet = wrap_model(model.unet, config, run_once=example_forward(model))
    with pytest.raises(PtqdError, match=f"weights of layer {name.rsplit('.', 1)[0]} is not finite"):
        calibrate(model, qnet, calib, CalibrationOptions(method="naive"), progress=False)


def test_nan_statistics_refused():
    from ptqd.correction.stats import NoiseMoments, fit
    from ptqd.errors import PtqdError

    rng = np.random.default_rng(0)
    m = {k: rng.normal(size=(1, 3, 4)) + 10 for k in ("s_e", "s_d", "s_ee", "s_dd", "s_ed")}
    m.update({k: rng.normal(size=(1, 3, 4, 1)) for k in ("c_e", "c_d")})
    m["s_ed"][0, 1, 2] = np.nan
    with pytest.raises(PtqdError, match=r"not finite at step 2/3 \(t=20\) for 4-bit"):
        fit(NoiseMoments([4], [30, 20, 10], 16, 1, m))
