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
PTQD = ["quantize", "--model", "digits16-cond", "--method", "ptqd", "--calib-samples", "2", "--calib-steps", "2", "--steps", "2",
        "--noise-samples", "2", "--weight-iters", "0", "--act-iters", "0", "--recon-samples", "4", "--no-progress"]
STATS_FILE = "noise_stats_ddim2_eta1_g3.safetensors"


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
    _damaged_files(w)
    return w


def _json_edit(f: Path, edit) -> None:
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def _state_edit(f: Path, edit, metadata=True) -> None:
    """Rewrite a safetensors file with ``edit(tensors, metadata)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(tensors, meta)
    save_file(tensors, str(f), metadata=meta if metadata else None)


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix) and "weight_quantizers" in k)[0]


def _damaged_files(w: Path) -> None:
    """Copies of the run, a PTQD run, a checkpoint, samples files and model dirs, each damaged in one way."""
    import zipfile

    from ptqd.integrity import seal

    def run_copy(name, src="run"):
        shutil.copytree(w / src, w / name)
        return w / name

    run_copy("rc_notjson") .joinpath("config.json").write_text('{"ptqd": "0.1.0", "quant": ')
    run_copy("rc_binary").joinpath("config.json").write_bytes(b"\x89PNG\x00\xff\xfe")
    run_copy("rc_list").joinpath("config.json").write_text("[1, 2]")
    _json_edit(run_copy("rc_noquant") / "config.json", lambda d: d.pop("quant"))
    _json_edit(run_copy("rc_nomodel") / "config.json", lambda d: d.pop("model"))
    _json_edit(run_copy("rc_guidance") / "config.json", lambda d: d["calibration"].update(guidance="3"))
    _json_edit(run_copy("rc_bits") / "config.json", lambda d: d["quant"].update(weight_bits="8"))
    _json_edit(run_copy("rc_edited") / "config.json", lambda d: d["options"].update(seed=7))  # valid: only the record sees it
    run_copy("rs_garbled").joinpath("summary.json").write_text('{"size": {"bytes": 1')
    _json_edit(run_copy("rs_type") / "summary.json", lambda d: d["size"].update(bytes="big"))
    _json_edit(run_copy("ri_edited") / "integrity.json", lambda d: d["files"]["config.json"].update(bytes=1))
    run_copy("rq_garbage").joinpath("quant_state.safetensors").write_bytes(b"not a safetensors file")
    state = "quant_state.safetensors"
    _state_edit(run_copy("rq_nozp") / state, lambda t, m: t.pop(_first(t, ".zero_point")))
    _state_edit(run_copy("rq_shape") / state, lambda t, m: t.update({_first(t, ".scale"): t[_first(t, ".scale")][:-1]}))
    _state_edit(run_copy("rq_x100") / state, lambda t, m: t.update({_first(t, ".scale"): t[_first(t, ".scale")] * 100}))
    _state_edit(run_copy("rq_nan") / state, lambda t, m: t[_first(t, ".scale")].view(-1).__setitem__(0, float("nan")))
    _state_edit(run_copy("rq_act") / state,  # an activation scale ×100: plausible alone, caught by the record
                lambda t, m: t.update({k: t[k] * 100 for k in sorted(t) if "act_quantizers" in k and ".scale_" in k}))
    # a W4 state (another run) moved into the W8 run: with its metadata, and without (an older file)
    assert main([*QUANT, "--weight-bits", "4", "--out", str(w / "run_w4")]) == 0
    for name in ("rq_w4", "rq_w4_nometa"):
        shutil.copy(w / "run_w4" / state, run_copy(name) / state)
    _state_edit(w / "rq_w4_nometa" / state, lambda t, m: None, metadata=False)  # as an older file
    (w / "rq_w4_nometa" / "integrity.json").unlink()  # an older run: no record either
    shutil.rmtree(w / "run_w4")
    # noise statistics of a PTQD run, damaged
    assert main([*PTQD, "--out", str(w / "prun")]) == 0
    for name in ("ps_meta", "ps_type", "ps_len"):
        shutil.copytree(w / "prun", w / name)
    _state_edit(w / "ps_meta" / STATS_FILE, lambda t, m: m.update(ptqd_noise_stats='{"model": '))
    _state_edit(w / "ps_type" / STATS_FILE, lambda t, m: m.update(ptqd_noise_stats=json.dumps({**json.loads(m["ptqd_noise_stats"]), "steps": "2"})))
    _state_edit(w / "ps_len" / STATS_FILE, lambda t, m: t.update(k=t["k"][:, :1].contiguous()))
    # a damaged calibration file of an interrupted run
    (w / "badcal").mkdir()
    (w / "badcal" / "calibration.safetensors").write_bytes(b"\x00" * 40)
    # checkpoints with edited manifests: plainly edited (the manifest's own checksum), and edited then resealed
    assert main(["export", str(w / "run"), "--out", str(w / "ckpt")]) == 0
    manifest = "ptqd_checkpoint.json"

    def ckpt(name, edit, reseal):
        shutil.copytree(w / "ckpt", w / name)
        data = json.loads((w / name / manifest).read_text())
        edit(data)
        (w / name / manifest).write_text(json.dumps(seal(data) if reseal else data))

    def int_part(d):
        return next(p for r in d["layers"] for p in r["parts"] if not p.get("simulated"))

    ckpt("ck_qmin", lambda d: int_part(d).update(qmin=int_part(d)["qmin"] + 1), reseal=False)
    ckpt("ck_qmin_sealed", lambda d: int_part(d).update(qmin=int_part(d)["qmin"] + 1), reseal=True)
    ckpt("ck_shape_sealed", lambda d: d["layers"][1]["parts"][0].update(shape=[d["layers"][1]["parts"][0]["shape"][0] * 2,
                                                                              *d["layers"][1]["parts"][0]["shape"][1:]]), reseal=True)
    ckpt("ck_classes_sealed", lambda d: d["model"].update(num_classes=50), reseal=True)
    shutil.rmtree(w / "ckpt")
    # model directories
    m = _model_copy(w / "m_binary")
    (m / "unet" / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    m = _model_copy(w / "m_list")
    (m / "unet" / "config.json").write_text("[]")
    m = _model_copy(w / "m_classes")
    _json_edit(m / "ptqd_model.json", lambda d: d.update(num_classes=50))
    # samples files
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    cfg = np.array(json.dumps({"model": "test", "model_fingerprint": "x"}))
    from ptqd.io import write_npz

    write_npz(w / "s_crc.npz", {"images": images, "config": cfg}, compress=False)
    raw = bytearray((w / "s_crc.npz").read_bytes())
    raw[400] ^= 0xFF  # inside the images member's data
    (w / "s_crc.npz").write_bytes(bytes(raw))
    with zipfile.ZipFile(w / "s_trunc.npz", "w") as zf:
        import io as _io

        buf = _io.BytesIO()
        np.lib.format.write_array(buf, images)
        zf.writestr("images.npy", buf.getvalue()[:300])
        zf.writestr("config.npy", _npy(cfg))
    np.savez(w / "s_objimages.npz", images=np.array([images, "x"], dtype=object), config=cfg)
    np.savez(w / "s_objconfig.npz", images=images, config=np.array([{"model": "x"}], dtype=object))
    np.savez(w / "s_badconfig.npz", images=images, config=np.array('{"model": "test", '))


def _npy(a) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.lib.format.write_array(buf, a)
    return buf.getvalue()


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
    # run directories: config.json, summary.json, quant_state.safetensors, integrity.json
    *[
        (f"run-{name}", ["sample", f"{{w}}/{name}", *SAMPLE[5:], "--out", "{w}/o.npz"], 2, words)
        for name, words in [
            ("rc_notjson", ["rc_notjson/config.json", "not valid JSON", "line 1"]),
            ("rc_binary", ["rc_binary/config.json", "UTF-8"]),
            ("rc_list", ["rc_list/config.json", "JSON object"]),
            ("rc_noquant", ["rc_noquant/config.json", "'quant' is missing"]),
            ("rc_nomodel", ["rc_nomodel/config.json", "'model' is missing"]),
            ("rc_guidance", ["rc_guidance/config.json", "'calibration.guidance'", "a string"]),
            ("rc_bits", ["rc_bits/config.json", "'quant.weight_bits'", "an integer"]),
            ("rc_edited", ["rc_edited/config.json", "changed after ptqd wrote it", "integrity.json"]),
            ("rs_garbled", ["rs_garbled/summary.json", "not valid JSON"]),
            ("rs_type", ["rs_type/summary.json", "'size.bytes'"]),
            ("ri_edited", ["ri_edited/integrity.json", "changed after ptqd wrote it"]),
            ("rq_garbage", ["rq_garbage/quant_state.safetensors", "not a readable safetensors"]),
            ("rq_nozp", ["rq_nozp/quant_state.safetensors", "zero_point", "lacks"]),
            ("rq_shape", ["rq_shape/quant_state.safetensors", ".scale", "shape"]),
            ("rq_x100", ["rq_x100/quant_state.safetensors", ".scale", "does not fit the model's weights"]),
            ("rq_nan", ["rq_nan/quant_state.safetensors", ".scale", "NaN"]),
            ("rq_act", ["rq_act/quant_state.safetensors", "changed after ptqd wrote it"]),
            ("rq_w4", ["rq_w4/quant_state.safetensors", "another run", "'quant.weight_bits' is 4", "8 in config.json"]),
            ("rq_w4_nometa", ["rq_w4_nometa", "no integrity.json", "ptqd upgrade"]),
            ("ps_meta", [f"ps_meta/{STATS_FILE}", "ptqd_noise_stats", "not valid JSON"]),
            ("ps_type", [f"ps_type/{STATS_FILE}", "'steps'", "an integer"]),
            ("ps_len", [f"ps_len/{STATS_FILE}", "'k'", "shape"]),
        ]
    ],
    # an older run (no record): `ptqd upgrade` checks what it can and refuses the damage
    ("upgrade-old-run-damaged-state", ["upgrade", "{w}/rq_w4_nometa"], 2,
     ["rq_w4_nometa/quant_state.safetensors", ".scale", "does not fit", "8-bit"]),
    ("stats-run-damaged-state", ["stats", "{w}/rq_x100", "--noise-samples", "2", "--no-progress"], 2, ["rq_x100/quant_state", "scale"]),
    ("export-run-damaged-config", ["export", "{w}/rc_guidance", "--out", "{w}/x.ptqd"], 2, ["rc_guidance/config.json", "guidance"]),
    ("quantize-into-damaged-config", [*QUANT, "--out", "{w}/rc_notjson"], 2, ["rc_notjson/config.json", "not valid JSON"]),
    ("quantize-damaged-calibration", [*QUANT, "--out", "{w}/badcal"], 2,
     ["badcal/calibration.safetensors", "delete", "!rerun `ptqd quantize`"]),
    # checkpoints: the manifest's own checksum; geometry and class count against the weights
    ("ckpt-qmin-edited", ["sample", "{w}/ck_qmin", *SAMPLE[5:], "--out", "{w}/o.npz"], 2, ["ptqd_checkpoint.json", "changed after ptqd wrote it"]),
    ("ckpt-qmin-resealed", ["sample", "{w}/ck_qmin_sealed", *SAMPLE[5:], "--out", "{w}/o.npz"], 2, ["ptqd_checkpoint.json", ".qmin'"]),
    ("ckpt-shape-resealed", ["sample", "{w}/ck_shape_sealed", *SAMPLE[5:], "--out", "{w}/o.npz"], 2, ["ptqd_checkpoint.json", ".shape'"]),
    ("ckpt-classes-resealed", ["sample", "{w}/ck_classes_sealed", *SAMPLE[5:], "--out", "{w}/o.npz"], 2,
     ["ptqd_checkpoint.json", "'model.num_classes'", "rows"]),
    # model directories
    ("model-unet-config-binary", ["sample", "--model", "{w}/m_binary", *SAMPLE[3:], "--out", "{w}/o.npz"], 2, ["unet/config.json", "UTF-8"]),
    ("model-unet-config-list", ["sample", "--model", "{w}/m_list", *SAMPLE[3:], "--out", "{w}/o.npz"], 2, ["unet/config.json", "JSON object"]),
    ("model-too-many-classes", ["sample", "--model", "{w}/m_classes", *SAMPLE[3:], "--out", "{w}/o.npz"], 2,
     ["ptqd_model.json", "'num_classes' is 50", "11 rows"]),
    # samples files
    ("samples-bad-crc", ["evaluate", "{w}/s_crc.npz", "--out", "{w}/m.json"], 2, ["s_crc.npz", "'images'", "damaged"]),
    ("samples-truncated", ["evaluate", "{w}/s_trunc.npz", "--out", "{w}/m.json"], 2, ["s_trunc.npz", "'images'", "cannot be read"]),
    ("samples-object-images", ["evaluate", "{w}/s_objimages.npz", "--out", "{w}/m.json"], 2, ["s_objimages.npz", "'images'", "Python objects"]),
    ("samples-object-config", ["evaluate", "{w}/s_objconfig.npz", "--out", "{w}/m.json"], 2, ["s_objconfig.npz", "'config'", "Python objects"]),
    ("samples-garbled-config", ["evaluate", "{w}/s_badconfig.npz", "--out", "{w}/m.json"], 2, ["s_badconfig.npz", "'config'", "not valid JSON"]),
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
        if word.startswith("!"):
            assert word[1:] not in err, err
        else:
            assert word.format(nan_key=nan_key) in err, err
    assert "Traceback" not in err and err.count("ptqd") <= 6, err  # a message, not a traceback
    assert "allow_pickle" not in err, err  # numpy's advice to load pickles never reaches the user
    assert _tree(work) == before, f"{name} changed files"  # nothing written: no statistics, no outputs


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


# ------------------------------------------------------------------ locks, determinism, integrity, honest records


def _hold_lock(path: Path):
    """A second process holding the output lock of ``path`` until killed."""
    import subprocess
    import sys

    code = ("import sys, time; from ptqd.locks import output_lock\n"
            f"with output_lock({str(path)!r}):\n    print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(Path(ptqd.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refused(work, tmp_path, capsys):
    out = tmp_path / "s.npz"
    holder = _hold_lock(out)
    try:
        for argv in ([*SAMPLE, "--out", str(out)], [*SAMPLE, "--num", "3", "--chunk-size", "2", "--out", str(out)]):
            assert main(argv) == 2
            assert "being written by another ptqd process" in capsys.readouterr().err
        assert not out.exists() and not out.with_suffix(".shards").exists()  # no orphan OUT.shards/
    finally:
        holder.kill()
        holder.wait()
    assert main([*SAMPLE, "--num", "3", "--chunk-size", "2", "--out", str(out)]) == 0  # the lock died with its process
    assert out.is_file() and not out.with_suffix(".shards").exists()
    run = tmp_path / "r"
    holder = _hold_lock(run)
    try:
        assert main([*QUANT, "--out", str(run)]) == 2
        assert main(["export", str(work / "run"), "--out", str(run)]) == 2
        assert "being written by another ptqd process" in capsys.readouterr().err
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()


def test_chunked_equals_unchunked_for_quantized_run(work, tmp_path):
    """Chunk size 3 with batch size 2: chunks are widened to 4, so every batch is the one-process batch."""
    run = tmp_path / "w4"
    assert main([*QUANT, "--weight-bits", "4", "--act-bits", "4", "--out", str(run)]) == 0
    base = ["sample", str(run), "--num", "5", "--steps", "2", "--batch-size", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one.npz")]) == 0
    assert main([*base, "--chunk-size", "3", "--out", str(tmp_path / "chunked.npz")]) == 0
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "chunked.npz")
    assert np.array_equal(a["images"], b["images"])


def test_vsc_zero_noise_keeps_generators_in_step():
    from ptqd.correction import Corrector
    from ptqd.correction.stats import NoiseStats
    from ptqd.models import load
    from ptqd.sampling import make_scheduler, sample_generators

    model = load("digits16-cond")
    sched = make_scheduler(model, "ddim", 4)
    steps = [int(t) for t in sched.timesteps]
    z = np.zeros((1, len(steps)))
    stats = NoiseStats({"clamp_k": True}, [8], steps, z, z, np.zeros((1, len(steps), 1)), np.full((1, len(steps)), 100.0), z, z[0], z)
    corrector = Corrector(stats, "all")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    g1, g2 = sample_generators(0, range(2)), sample_generators(0, range(2))
    t = sched.timesteps[1]
    corrector.step(sched, eps, t, x, g1, eta=1.0)
    assert corrector.log[-1]["sigma_vsc"] == 0.0  # VSC shrank this step's noise to zero
    make_scheduler(model, "ddim", 4).step(eps, t, x, eta=1.0, generator=g2)
    for a, b in zip(g1, g2):
        assert torch.equal(a.get_state(), b.get_state())
    notes = corrector.notes("ddim", 1.0, make_scheduler(model, "ddim", 4))
    assert any("cnc is a no-op" in n for n in notes)
    assert any("shrinks the sampler noise to 0 on" in n for n in notes)
    clipped = make_scheduler(model, "ddim", 4)
    clipped.register_to_config(clip_sample=True)
    assert any("clip_sample: true" in n for n in corrector.notes("ddim", 1.0, clipped))


def test_run_records_and_old_runs(work, tmp_path, capsys):
    """Strict JSON summary with the data-sampling time, stage lines with --no-progress, an old run (no
    integrity.json) still loads, and export replaces a checkpoint whole."""
    run = tmp_path / "r"
    capsys.readouterr()
    assert main([*QUANT, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "calibration data ready" in out and "naive calibration done" in out
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    secs = summary["seconds"]
    assert secs["total_calibration"] >= secs["calibration_data"] > 0
    assert json.loads((run / "integrity.json").read_text())["files"].keys() >= {"config.json", "quant_state.safetensors", "summary.json"}
    ck = tmp_path / "c.ptqd"
    assert main(["export", str(run), "--out", str(ck)]) == 0
    (ck / "noise_stats_stale.safetensors").write_text("from an earlier export")
    assert main(["export", str(run), "--out", str(ck)]) == 0
    assert not (ck / "noise_stats_stale.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.ptqd")]  # no temporary directory left
    (run / "integrity.json").unlink()  # an older run: refused until `ptqd upgrade` checked it
    assert main([*SAMPLE[:1], str(run), *SAMPLE[5:], "--out", str(tmp_path / "s.npz")]) == 2
    assert main(["upgrade", str(run)]) == 0
    assert main([*SAMPLE[:1], str(run), *SAMPLE[5:], "--out", str(tmp_path / "s.npz")]) == 0
