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
