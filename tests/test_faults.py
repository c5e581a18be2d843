"""Write failures, foreign or damaged artifacts and conflicting options (issue 24), table-driven.

Full-disk cases run on a real, small tmpfs (we mount one when the test runs as root and mounting is
permitted; elsewhere they are skipped with the reason). Immutable files use ``chattr +i`` where the
file system allows it; the translation of EPERM/EROFS at the one OSError→PtqdError point
(:func:`ptqd.io.os_error`, raised by :func:`ptqd.io.atomic_path`) is also tested by injection.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ptqd.cli import main
from ptqd.errors import PtqdError

SAMPLE = ["sample", "--model", "digits16-cond", "--num", "2", "--steps", "2", "--batch-size", "2", "--no-progress"]
QUANT = ["quantize", "--model", "digits16-cond", "--method", "naive", "--calib-samples", "2", "--calib-steps", "2",
         "--steps", "2", "--no-progress"]


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "unexpected error" not in err, err
    return rc, out, err


def _leftovers(d: Path) -> list[str]:
    """Temporary files or directories of an atomic write left in ``d``."""
    return sorted(p.name for p in d.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("faults")
    assert main([*QUANT, "--out", str(w / "run")]) == 0
    assert main([*SAMPLE[:4], "10", *SAMPLE[5:], "--out", str(w / "S.npz")]) == 0
    return w / "run"


# ------------------------------------------------------------------------------ a small, full tmpfs


def _can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else the reason it cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@contextmanager
def full_tmpfs(base: Path, size: str = "4m", copy: dict[str, Path] | None = None, leave: int = 0):
    """A tmpfs at ``base/fs`` with ``copy`` in it, then filled up to ``leave`` bytes free."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    mnt = base / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        for name, src in (copy or {}).items():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, mnt / name)
        with open(mnt / "filler", "wb") as fh:
            try:
                while True:
                    st = os.statvfs(mnt)
                    free = st.f_bavail * st.f_frsize
                    if free <= leave:
                        break
                    fh.write(b"\0" * min(1 << 16, max(1, free - leave)))
                    fh.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _no_preflight(monkeypatch):
    """Switch off the free-space check before work, so the write itself meets the full disk."""
    import ptqd.io
    import ptqd.runtime.checkpoint

    monkeypatch.setattr(ptqd.io, "check_space", lambda *a, **k: None)
    monkeypatch.setattr(ptqd.runtime.checkpoint, "check_space", lambda *a, **k: None)


# (id, argv with {fs} the full tmpfs, {run} and {w} the module's run and work dir, words in the error, setup)
DISK_FULL = [
    ("sample-refused-before-work", [*SAMPLE, "--out", "{fs}/s.npz"], ["--out", "s.npz", "free", "nothing was written"], None),
    ("sample-write", [*SAMPLE, "--out", "{fs}/s.npz"], ["cannot write", "s.npz", "no space left", "free some space"], _no_preflight),
    ("sample-chunked", [*SAMPLE[:4], "4", *SAMPLE[5:], "--chunk-size", "2", "--out", "{fs}/s.npz"],
     ["no space left", "finished chunks", "resumes"], _no_preflight),
    ("quantize", [*QUANT, "--out", "{fs}/q"], ["no space left", "q", "rerunning the same command resumes"], None),
    ("stats", ["stats", "{fs}/run", "--noise-samples", "2", "--steps", "2", "--no-progress"], ["no space left", "run"], None),
    ("export-refused-before-work", ["export", "{run}", "--out", "{fs}/c.ptqd"], ["checkpoint", "free", "nothing was written"], None),
    ("export-write", ["export", "{run}", "--out", "{fs}/c.ptqd"], ["no space left", "c.ptqd"], _no_preflight),
    ("evaluate-out", ["evaluate", "{w}/S.npz", "--out", "{fs}/m.json", "--no-progress"], ["no space left", "m.json"], None),
]


@pytest.mark.parametrize("case", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_full_disk(case, run_dir, tmp_path, monkeypatch, capsys):
    name, argv, words, setup = case
    with full_tmpfs(tmp_path, copy={"run": run_dir} if name == "stats" else None) as fs:
        if setup:
            setup(monkeypatch)
        before = sorted(p.name for p in fs.rglob("*"))
        rc, out, err = _run([a.format(fs=fs, run=run_dir, w=run_dir.parent) for a in argv], capsys)
        assert rc == 2, err
        for word in words:
            assert word in err, err
        assert _leftovers(fs) == [], "a temporary file was left behind"
        if name != "sample-chunked":  # a chunked run keeps OUT.shards/ to resume from (the message says so)
            assert sorted(p.name for p in fs.rglob("*")) == before or name in ("quantize", "stats")
        assert "wrote" not in out  # never a success line


def test_full_disk_chunked_sample_resumes(run_dir, tmp_path, monkeypatch, capsys):
    """A chunked sample that hits a full disk resumes, once space is free, to the same bytes as a clean run."""
    _no_preflight(monkeypatch)
    argv = [*SAMPLE[:4], "6", *SAMPLE[5:], "--chunk-size", "2"]
    assert _run([*argv, "--out", tmp_path / "clean.npz"], capsys)[0] == 0
    with full_tmpfs(tmp_path, size="1m") as fs:
        import ptqd.chunks

        real, calls = ptqd.chunks.write_npz, []

        def fill_after_first(path, arrays, compress=True):  # the disk fills up after the first chunk
            calls.append(path)
            if len(calls) == 2:
                (fs / "filler").write_bytes(b"")  # start from a known state, then fill everything
                with open(fs / "filler2", "wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 4096)
                            fh.flush()
                    except OSError:
                        pass
            return real(path, arrays, compress)

        (fs / "filler").unlink()
        monkeypatch.setattr(ptqd.chunks, "write_npz", fill_after_first)
        rc, _, err = _run([*argv, "--out", fs / "s.npz"], capsys)
        assert rc == 2 and "no space left" in err and "resumes" in err, err
        assert _leftovers(fs) == [] and len(list((fs / "s.shards").glob("chunk_*.npz"))) == 1
        (fs / "filler2").unlink()
        monkeypatch.setattr(ptqd.chunks, "write_npz", real)
        assert _run([*argv, "--out", fs / "s.npz"], capsys)[0] == 0
        assert (fs / "s.npz").read_bytes() == (tmp_path / "clean.npz").read_bytes()


# ------------------------------------------------------------------------------ other write failures


def _chattr(path: Path, flag: str) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_immutable_target_refused_before_sampling(run_dir, tmp_path, capsys, monkeypatch):
    """An immutable samples file is refused before any sampling (it used to fail after it)."""
    out = tmp_path / "s.npz"
    assert _run([*SAMPLE, "--out", out], capsys)[0] == 0
    if not _chattr(out, "+i"):
        pytest.skip("chattr +i is not permitted on this file system (EPERM is tested by injection below)")
    try:
        import ptqd.sampling

        monkeypatch.setattr(ptqd.sampling, "trajectories", lambda *a, **k: pytest.fail("sampled before refusing"))
        rc, _, err = _run([*SAMPLE, "--out", out], capsys)
        assert rc == 2 and "cannot be replaced" in err and "immutable" in err and "s.npz" in err, err
    finally:
        _chattr(out, "-i")
    assert _leftovers(tmp_path) == []


def test_immutable_directory_refused(tmp_path, capsys):
    d = tmp_path / "locked"
    d.mkdir()
    if not _chattr(d, "+i"):
        pytest.skip("chattr +i is not permitted on this file system")
    try:
        rc, _, err = _run([*SAMPLE, "--out", d / "s.npz"], capsys)
        assert rc == 2 and "cannot write in" in err and "locked" in err, err
    finally:
        _chattr(d, "-i")


INJECTED = [  # errno raised by the final rename of an atomic write → words of the message
    (errno.EPERM, ["operation not permitted", "immutable"]),
    (errno.EROFS, ["read-only"]),
    (errno.ENOSPC, ["no space left"]),
    (errno.EACCES, ["permission denied"]),
    (errno.EIO, ["input/output error"]),
]


@pytest.mark.parametrize("code,words", INJECTED, ids=[errno.errorcode[c] for c, _ in INJECTED])
def test_oserror_translation_by_injection(code, words, tmp_path, monkeypatch):
    import ptqd.io

    def fail(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(ptqd.io.os, "replace", fail)
    with pytest.raises(ptqd.io.WriteError) as e:
        ptqd.io.write_json(tmp_path / "x.json", {"a": 1})
    for word in ["x.json", *words]:
        assert word in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_writer_error_on_full_disk_is_a_write_error(tmp_path, monkeypatch):
    """A writer that wraps ENOSPC in its own exception (torch, safetensors) still gives the clear message."""
    import ptqd.io

    monkeypatch.setattr(ptqd.io, "free_bytes", lambda p: 0)
    with pytest.raises(ptqd.io.WriteError, match="no space left"):
        with ptqd.io.atomic_path(tmp_path / "w.safetensors") as tmp:
            raise RuntimeError("PytorchStreamWriter failed writing file")
    assert list(tmp_path.iterdir()) == []


def _long_path(base: Path, total: int) -> Path:
    p = base
    while len(str(p)) < total - 300:
        p = p / ("d" * 200)
    return p / "x.npz"


NAMES = [  # (id, --out relative to tmp_path or a builder, rc, words)
    ("name-255-bytes-evaluate", lambda t: ["evaluate", t / "S.npz", "--out", t / ("m" * 250 + ".json"), "--no-progress"], 0, []),
    ("name-254-bytes-sample", lambda t: [*SAMPLE, "--out", t / ("s" * 250 + ".npz")], 0, []),
    ("name-255-bytes-sample-config-too-long", lambda t: [*SAMPLE, "--out", t / ("s" * 251 + ".npz")], 2,
     ["config file", "too long", "255 bytes per name"]),
    ("name-256-bytes", lambda t: [*SAMPLE, "--out", t / ("s" * 252 + ".npz")], 2, ["too long", "choose a shorter --out"]),
    ("path-4300-bytes", lambda t: [*SAMPLE, "--out", _long_path(t, 4300)], 2, ["too long"]),
    ("symlink-loop", lambda t: [*SAMPLE, "--out", t / "loop" / "x.npz"], 2, ["symbolic links", "loop"]),
    ("fifo-target", lambda t: [*SAMPLE, "--out", t / "fifo.npz"], 2, ["fifo.npz", "not a regular file"]),
    ("fifo-evaluate-out", lambda t: ["evaluate", t / "S.npz", "--out", t / "fifo.json"], 2, ["fifo.json", "not a regular file"]),
]


@pytest.mark.parametrize("case", NAMES, ids=[c[0] for c in NAMES])
def test_names_loops_fifos(case, run_dir, tmp_path, capsys):
    name, build, code, words = case
    shutil.copy(run_dir.parent / "S.npz", tmp_path / "S.npz")
    shutil.copy(run_dir.parent / "S.json", tmp_path / "S.json")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo.npz")
    os.mkfifo(tmp_path / "fifo.json")
    rc, out, err = _run(build(tmp_path), capsys)
    assert rc == code, err
    for word in words:
        assert word in err, err
    assert _leftovers(tmp_path) == []


def test_temporary_names_fit_name_max(tmp_path):
    from ptqd.io import atomic_path, write_json

    target = tmp_path / ("n" * 250 + ".json")
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode()) <= 255
        tmp.write_text("{}")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


# ------------------------------------------------------------------------------ outputs ptqd did not write


def test_out_never_replaces_foreign_files(run_dir, tmp_path, capsys):
    """report, compare and reference --out follow sample's rules; convert-ldm keeps a user's X.partial/."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (tmp_path / "table.md").write_text("my notes")
    (tmp_path / "table2.json").write_text('{"mine": 1}')
    (tmp_path / "ref.npz").write_text("my file")
    cases = [
        (["report", run_dir, "--out", foreign], ["--out", "mine", "did not write", "--overwrite"]),
        (["compare", run_dir.parent / "S.npz", "--out", tmp_path / "table"], ["table.md", "did not write", "--overwrite"]),
        (["compare", run_dir.parent / "S.npz", "--out", tmp_path / "table2"], ["table2.json", "did not write"]),
        (["reference", run_dir.parent / "S.npz", "--out", tmp_path / "ref.npz"], ["ref.npz", "did not write", "--overwrite"]),
        (["convert-ldm", tmp_path / "none.ckpt", "--config", tmp_path / "none.yaml", "--out", foreign],
         ["mine", "already exists"]),
    ]
    for argv, words in cases:
        rc, _, err = _run(argv, capsys)
        assert rc == 2, (argv, err)
        for word in words:
            assert word in err, err
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    assert (tmp_path / "table.md").read_text() == "my notes" and (tmp_path / "ref.npz").read_text() == "my file"
    # ptqd's own outputs are replaced, with a printed line; --overwrite writes over foreign ones
    assert _run(["report", run_dir, "--out", tmp_path / "rep"], capsys)[0] == 0
    rc, out, _ = _run(["report", run_dir, "--out", tmp_path / "rep"], capsys)
    assert rc == 0
    rc, out, err = _run(["compare", run_dir.parent / "S.npz", "--out", tmp_path / "table", "--overwrite"], capsys)
    assert rc == 0 and "will be replaced" in out and "did not write" in out, out
    rc, out, _ = _run(["compare", run_dir.parent / "S.npz", "--out", tmp_path / "table"], capsys)
    assert rc == 0 and "ptqd wrote earlier" in out, out


def test_sample_and_export_say_when_they_replace(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc, first, _ = _run([*SAMPLE, "--out", out], capsys)
    assert rc == 0 and "replaced" not in first
    rc, again, _ = _run([*SAMPLE, "--seed", "3", "--out", out], capsys)
    assert rc == 0 and f"--out {out} exists (a file ptqd wrote earlier); it will be replaced" in again, again


# ------------------------------------------------------------------------------ records, caches, pipeline files


def _edit_state(f: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)


def test_run_without_record_refused_until_upgraded(run_dir, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(run_dir, run)
    (run / "integrity.json").unlink()
    rc, _, err = _run(["sample", run, *SAMPLE[5:], "--out", tmp_path / "s.npz"], capsys)
    assert rc == 2 and "integrity.json" in err and f"ptqd upgrade {run}" in err, err
    rc, out, err = _run(["upgrade", run], capsys)
    assert rc == 0 and "integrity record" in out, err
    assert {"config.json", "quant_state.safetensors"} <= set(json.loads((run / "integrity.json").read_text())["files"])
    assert _run(["sample", run, *SAMPLE[5:], "--out", tmp_path / "s.npz"], capsys)[0] == 0
    rc, out, _ = _run(["upgrade", run], capsys)
    assert rc == 0 and "already has" in out


def test_upgrade_refuses_damaged_activation_scales(run_dir, tmp_path, capsys):
    """A run whose record was deleted and whose activation scales were damaged is not blessed by upgrade."""
    run = tmp_path / "damaged"
    shutil.copytree(run_dir, run)
    (run / "integrity.json").unlink()

    def damage(t):
        for k in t:
            if "act_quantizers" in k and ".scale" in k:
                t[k] = t[k] * 1e-3

    _edit_state(run / "quant_state.safetensors", damage)
    rc, _, err = _run(["upgrade", run], capsys)
    assert rc == 2 and "damaged" in err and "no record was written" in err, err
    assert not (run / "integrity.json").exists()


def test_checkpoint_without_seal_refused_until_upgraded(run_dir, tmp_path, capsys):
    ck = tmp_path / "c.ptqd"
    assert _run(["export", run_dir, "--out", ck], capsys)[0] == 0
    mf = ck / "ptqd_checkpoint.json"
    data = json.loads(mf.read_text())
    del data["manifest_sha256"]
    mf.write_text(json.dumps(data))
    rc, _, err = _run(["sample", ck, *SAMPLE[5:], "--out", tmp_path / "s.npz"], capsys)
    assert rc == 2 and "manifest_sha256" in err and "ptqd upgrade" in err, err
    assert _run(["upgrade", ck], capsys)[0] == 0
    assert _run(["sample", ck, *SAMPLE[5:], "--out", tmp_path / "s.npz"], capsys)[0] == 0


def test_export_is_byte_reproducible(run_dir, tmp_path, capsys):
    from ptqd.io import canonical_safetensors
    from safetensors.torch import save

    import torch

    for name in ("a", "b"):
        assert _run(["export", run_dir, "--out", tmp_path / name], capsys)[0] == 0
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()
    t = {"x": torch.arange(3.0)}
    one = canonical_safetensors(save(t, metadata={"format": "f", "version": "1"}))
    two = canonical_safetensors(save(t, metadata={"version": "1", "format": "f"}))
    assert one == two  # the same tensors and metadata in any key order: the same bytes
    from safetensors.torch import load

    assert torch.equal(load(one)["x"], t["x"])


def _sealed(info: dict) -> dict:
    from ptqd.integrity import seal

    return seal(info)


GOOD_INFO = {"kind": "pipeline", "pipeline": "ClassConditionalPipeline", "scheduler": "DDIMScheduler",
             "sampler": {"scheduler": "ddim", "steps": 2, "eta": 1.0, "guidance": 3.0, "seed": 0, "batch_size": 2},
             "correct": "none", "act_bits": 8, "fidelity_budget": None}
PIPELINE_FILES = [  # (id, file content (bytes or a JSON-able value), words)
    ("binary", b"\x89PNG\x00\xff", ["ptqd_pipeline.json", "UTF-8"]),
    ("list", [1, 2], ["ptqd_pipeline.json", "JSON object"]),
    ("unknown-key", _sealed({**GOOD_INFO, "evil": 1}), ["'evil'", "not a field"]),
    ("sampler-string", _sealed({**GOOD_INFO, "sampler": "ddim"}), ["'sampler'", "an object"]),
    ("sampler-steps-0", _sealed({**GOOD_INFO, "sampler": {**GOOD_INFO["sampler"], "steps": 0}}), ["'sampler'", "steps"]),
    ("correct-edited", {**_sealed(GOOD_INFO), "correct": "all"}, ["changed after ptqd wrote it"]),
    ("no-checksum", GOOD_INFO, ["'manifest_sha256'", "missing"]),
    ("kind-wrong", _sealed({**GOOD_INFO, "kind": "scheduler"}), ["'kind'", "scheduler"]),
]


@pytest.mark.parametrize("case", PIPELINE_FILES, ids=[c[0] for c in PIPELINE_FILES])
def test_pipeline_file_validated(case, run_dir, tmp_path, capsys):
    import ptqd

    name, content, words = case
    ck = tmp_path / "c.ptqd"
    assert _run(["export", run_dir, "--out", ck], capsys)[0] == 0
    f = ck / "ptqd_pipeline.json"
    f.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(PtqdError) as e:
        ptqd.load(ck)
    for word in words:
        assert word in str(e.value), str(e.value)
    f.write_text(json.dumps(_sealed(GOOD_INFO)))  # the same checkpoint with a sound file loads
    pipe = ptqd.load(ck)
    assert pipe.ptqd_sampler.steps == 2


BUDGET_CACHES = [  # (id, content, words of the note or None when valid)
    ("list", [1, 2], "not a budget cache"),
    ("unsealed", {"entries": []}, "changed after ptqd wrote it"),
    ("zeroed", "zeroed", "changed after ptqd wrote it"),
    ("negative", "negative", "non-negative"),
    ("garbage", "not json{", "cannot be read"),
    ("valid", "valid", None),
]


@pytest.mark.parametrize("case", BUDGET_CACHES, ids=[c[0] for c in BUDGET_CACHES])
def test_budget_cache_validated(case, tmp_path):
    from ptqd.correction.apply import _read_contributions
    from ptqd.integrity import seal

    name, content, problem = case
    entry = {"key": {"stats": "s"}, "contributions": {"4": [0.1, 0.2], "8": [0.01, 0.02]}}
    good = seal({"what": "x", "entries": [entry]})
    if content == "zeroed":  # every contribution edited to 0 (would pick an all-A4 schedule "within budget")
        content = json.loads(json.dumps(good))
        content["entries"][0]["contributions"] = {"4": [0, 0], "8": [0, 0]}
    elif content == "negative":
        content = seal({"what": "x", "entries": [{**entry, "contributions": {"4": [-1.0, 0.2]}}]})
    elif content == "valid":
        content = good
    f = tmp_path / "budget.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    entries, found = _read_contributions(f, 2)
    if problem is None:
        assert found is None and entries == [entry]
    else:
        assert entries == [] and problem in found


GUARD_CACHES = [  # (id, how the sealed cache is damaged, words of the note or None when valid)
    ("list", "list", "not a guard cache"),
    ("unsealed", "unsealed", "changed after ptqd wrote it"),
    ("lambda-edited", "edited", "changed after ptqd wrote it"),  # λ edited by hand (would switch a correction on)
    ("lambda-out-of-range", "range", "numbers in [0, 1]"),
    ("garbage", "garbage", "cannot be read"),
    ("valid", "valid", None),
]


@pytest.mark.parametrize("case", GUARD_CACHES, ids=[c[0] for c in GUARD_CACHES])
def test_guard_cache_validated(case, tmp_path):
    from ptqd.correction.apply import _read_guards
    from ptqd.integrity import seal

    name, how, problem = case
    guard = {"blocks": [[800, 600], [400, 0]], "lambda": [0.0, 0.5], "lambda_fit": [0.0, 0.5], "chosen": "fit",
             "mse": {"none": 1.0, "fit": 0.5, "full": 2.0}, "num": 4, "seed": 2002, "blend": {"800": 0.0, "600": 0.0, "400": 0.5, "0": 0.5}}
    entry = {"key": {"stats": "s"}, "guard": guard}
    good = seal({"what": "x", "entries": [entry]})
    content = {"list": [entry], "unsealed": {"entries": [entry]}, "valid": good, "garbage": "{not json"}.get(how)
    if how == "edited":
        content = json.loads(json.dumps(good))
        content["entries"][0]["guard"]["lambda"] = [1.0, 1.0]
    elif how == "range":
        content = seal({"what": "x", "entries": [{**entry, "guard": {**guard, "lambda": [0.0, 1.5]}}]})
    f = tmp_path / "guard.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    entries, found = _read_guards(f)
    if problem is None:
        assert found is None and entries == [entry]
    else:
        assert entries == [] and problem in found, found


def test_budget_vectors_checked_against_the_cache(tmp_path):
    from ptqd.correction.apply import _read_vectors
    from ptqd.integrity import sha256_file

    vec = {"a4": np.ones((3, 2, 5), np.float32), "a8": np.zeros((3, 2, 5), np.float32)}
    npz = tmp_path / "budget_s_0123.npz"
    np.savez(npz, **vec)
    entry = {"key": {}, "contributions": {"4": [1.0] * 3, "8": [0.0] * 3}, "vectors": npz.name, "vectors_sha256": sha256_file(npz)}
    out, problem = _read_vectors(tmp_path / "budget_s.json", entry, 3)
    assert problem is None and set(out) == {4, 8} and out[4].shape == (3, 2, 5)
    assert _read_vectors(tmp_path / "budget_s.json", entry, 4)[1] is not None  # another number of steps
    np.savez(npz, a4=2 * vec["a4"], a8=vec["a8"])  # the vectors edited after the cache was sealed
    out, problem = _read_vectors(tmp_path / "budget_s.json", entry, 3)
    assert out is None and "changed after ptqd wrote it" in problem
    out, problem = _read_vectors(tmp_path / "budget_s.json", {**entry, "vectors": "../x.npz"}, 3)
    assert out is None and problem


def test_measured_budget_refused_on_checkpoints():
    from types import SimpleNamespace

    from ptqd.correction.apply import step_contributions
    from ptqd.sampling import SamplerConfig

    with pytest.raises(PtqdError, match="FP model as reference"):
        step_contributions(SimpleNamespace(manifest={"format": "x"}), SamplerConfig(), (), [4, 8])


def test_evaluate_against_refuses_another_model(tmp_path, capsys):
    from ptqd.sampling import Samples, save_samples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(10) % 10
    cfg = {"model": "a", "model_fingerprint": "aaaa", "seed": 0, "scheduler": "ddim", "steps": 2}
    save_samples(Samples(images, labels, {**cfg, "model_fingerprint": "qqqq", "fp_model_fingerprint": "aaaa"}), tmp_path / "q.npz")
    save_samples(Samples(images, labels, cfg), tmp_path / "fp.npz")
    save_samples(Samples(images, labels, {**cfg, "model_fingerprint": "bbbb"}), tmp_path / "other.npz")
    rc, _, err = _run(["evaluate", tmp_path / "q.npz", "--against", tmp_path / "other.npz", "--no-progress"], capsys)
    assert rc == 2 and "different models" in err and "aaaa" in err and "bbbb" in err, err
    rc, _, err = _run(["evaluate", tmp_path / "q.npz", "--against", tmp_path / "fp.npz", "--no-progress"], capsys)
    assert rc == 0, err
    # the report's budget curve reads the measured MSE where evaluate writes it (it used to look under "metrics")
    from ptqd.report import read_mse

    written = json.loads((tmp_path / "q.metrics.json").read_text())
    assert read_mse(tmp_path / "q.metrics.json") == written["mse"] == 0.0


# ------------------------------------------------------------------------------ options refused before work


OPTIONS = [  # (id, argv, words): every one must name both options
    ("correction-model-without-corrections", ["sample", "{run}", "--correction-model", "mean", "--correct", "none"],
     ["--correction-model", "--correct"]),
    ("correction-model-naive-run", ["sample", "{run}", "--correction-model", "mean"], ["--correction-model", "--correct", "naive"]),
    ("correct-comma", ["sample", "{run}", "--correct", ","], ["--correct", "names no correction"]),
    ("budget-with-act-bits", ["sample", "{run}", "--fidelity-budget", "1.5", "--act-bits", "8"], ["--fidelity-budget", "--act-bits"]),
    ("budget-with-criterion", ["sample", "{run}", "--fidelity-budget", "1.5", "--criterion", "snr"], ["--fidelity-budget", "--criterion"]),
    ("propagation-without-budget", ["sample", "{run}", "--budget-propagation", "gaussian"], ["--budget-propagation", "--fidelity-budget"]),
    ("stats-steps-0", ["stats", "{run}", "--steps", "0", "--no-progress"], ["steps", "0"]),
    ("calib-steps-above-steps", [*QUANT[:-1], "--calib-steps", "5", "--no-progress", "--out", "{tmp}/q"], ["--calib-steps 5", "--steps 2"]),
]


@pytest.mark.parametrize("case", OPTIONS, ids=[c[0] for c in OPTIONS])
def test_conflicting_options_refused_before_work(case, run_dir, tmp_path, capsys, monkeypatch):
    import ptqd.sampling

    name, argv, words = case
    monkeypatch.setattr(ptqd.sampling, "trajectories", lambda *a, **k: pytest.fail("worked before refusing"))
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    if argv[0] == "sample":
        argv += [*SAMPLE[5:], "--out", str(tmp_path / "s.npz")]
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------ the Python API


def test_api_validates_arguments_before_work(monkeypatch):
    import ptqd
    import ptqd.runs
    from ptqd.api import as_config, as_model, pipeline_for
    from ptqd.models import load

    assert as_config("W4A8") is ptqd.W4A8 and as_config("w8a8") is ptqd.W8A8
    monkeypatch.setattr(ptqd.runs, "quantize", lambda *a, **k: pytest.fail("worked before refusing"))
    model = load("digits16-cond")
    pipe = pipeline_for(model)
    for bad, words in [("W5A5", "W4A8"), (3, "QuantConfig")]:
        with pytest.raises(PtqdError, match=words):
            ptqd.quantize(pipe, bad)
    with pytest.raises(PtqdError, match="method"):
        ptqd.quantize(pipe, "W4A8", method="fast")
    pipe.ptqd_run = object()  # what ptqd.quantize leaves on the pipelines it makes
    with pytest.raises(PtqdError, match="already quantized"):
        ptqd.quantize(pipe, "W4A8")
    # a bare class-conditional UNet2DModel (no scheduler, no directory) is taken, as documented
    bare = as_model(model.unet)
    assert bare.conditional and bare.num_classes == model.num_classes


# ------------------------------------------------------------------------------ the lock directory


def test_lock_directory_checked(tmp_path):
    from ptqd.locks import check_lock_dir

    good = tmp_path / "locks"
    assert check_lock_dir(good) == good and (good.stat().st_mode & 0o777) == 0o700
    planted = tmp_path / "planted"
    planted.write_text("x")
    with pytest.raises(PtqdError, match="not a directory"):
        check_lock_dir(planted)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(PtqdError, match="not a directory"):
        check_lock_dir(link)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    with pytest.raises(PtqdError, match="mode 777"):
        check_lock_dir(open_dir)
    if os.geteuid() == 0:  # only root can give a directory away
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
        with pytest.raises(PtqdError, match="another user"):
            check_lock_dir(other)


def test_recon_samples_beyond_inputs_said(tmp_path, capsys):
    rc, out, err = _run(["quantize", "--model", "digits16-cond", "--method", "qdiff", "--calib-samples", "2", "--calib-steps", "2",
                         "--steps", "2", "--weight-iters", "0", "--act-iters", "0", "--recon-samples", "1000", "--no-progress",
                         "--out", tmp_path / "q"], capsys)
    assert rc == 0, err
    assert "--recon-samples 1000 is more than the" in out and "uses all" in out, out


def test_act_bits_16_is_a_weight_only_model(tmp_path, capsys):
    """`--act-bits 16` (documented as float activations) quantizes the weights only, end to end: it was
    calibrated and then stopped with an error; now it samples, and its activations are never rounded."""
    run = tmp_path / "w4a16"
    rc, _, err = _run(["quantize", "--model", "digits16-cond", "--weight-bits", "4", "--act-bits", "16", "--method", "naive",
                       "--quick", "--out", run, "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["quant"]["act_bits"] == 16
    rc, _, err = _run(["sample", run, "--num", "2", "--steps", "2", "--out", tmp_path / "s.npz", "--no-progress"], capsys)
    assert rc == 0, err
    from ptqd.quant.wrap import act_quantizers
    from ptqd.runs import load_run

    q = load_run(run).qnet
    bits = {a.bits for _, a in act_quantizers(q) if not a.fixed}
    assert bits == {16}
