"""Scale-out: chunked resumable sampling, torchrun with 2 gloo processes, split noise statistics."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqd.chunks import ChunkStore
from ptqd.correction import collect_moments
from ptqd.distributed import chunk_ranges
from ptqd.errors import PtqdError
from ptqd.models import load
from ptqd.sampling import SamplerConfig, load_samples, sample
from ptqd.shards import sample_to_file, shard_dir

SRC = Path(__file__).resolve().parents[1] / "src"


def _pythonpath() -> str:
    """This checkout's src first, keeping any PYTHONPATH the environment needs (e.g. packages installed aside)."""
    return os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
CONFIG = SamplerConfig("ddim", 3, 1.0, 3.0, 0, 4)  # what `ptqd sample --model digits16-cond --steps 3 --batch-size 4` uses
NUM, CHUNK = 32, 8


class Interrupt(Exception):
    pass


def _failing_denoise(model, after_calls):
    calls = {"n": 0}

    def denoise(x, t, y, g):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt
        return model.denoise(x, t, y, g)

    return denoise, calls


def _interrupted_run(model, out, chunks_done=2):
    calls_per_chunk = (CHUNK // CONFIG.batch_size) * CONFIG.steps
    denoise, _ = _failing_denoise(model, chunks_done * calls_per_chunk)
    with pytest.raises(Interrupt):
        sample_to_file(model, NUM, CONFIG, out, denoise=denoise, chunk_size=CHUNK, progress=False)
    files = sorted(shard_dir(out).glob("chunk_*.npz"))
    assert [f.name for f in files] == [f"chunk_{i * CHUNK:09d}.npz" for i in range(chunks_done)]
    return files


def _torchrun(args, cwd, timeout=240):
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one thread, like the torchrun ranks (OMP_NUM_THREADS=1), so float sums run
    in the same order and byte-for-byte comparisons across processes are fair."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load("digits16-cond")


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.npz"
    sample_to_file(model, NUM, CONFIG, out, chunk_size=CHUNK, progress=False)
    return out


def test_chunk_ranges():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(PtqdError):
        chunk_ranges(10, 0)


def test_chunked_equals_plain_sampling(model, uninterrupted):
    s = load_samples(uninterrupted)
    plain = sample(model, NUM, CONFIG, progress=False)
    assert np.array_equal(s.images, plain.images) and np.array_equal(s.labels, plain.labels)
    assert s.config["num"] == NUM and s.config["seed"] == 0
    assert not shard_dir(uninterrupted).exists()  # merged and cleaned up
    # sample(first=...) regenerates any slice of the run on its own
    part = sample(model, 5, CONFIG, progress=False, first=11)
    assert np.array_equal(part.images, plain.images[11:16]) and list(part.labels) == list(plain.labels[11:16])


def test_resume_after_interruption_is_byte_identical(model, uninterrupted, tmp_path):
    out = tmp_path / "resumed.npz"
    _interrupted_run(model, out, chunks_done=2)
    denoise, calls = _failing_denoise(model, 10**9)
    sample_to_file(model, NUM, CONFIG, out, denoise=denoise, chunk_size=CHUNK, progress=False)
    assert calls["n"] == (NUM - 2 * CHUNK) // CONFIG.batch_size * CONFIG.steps  # only the missing chunks
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert out.with_suffix(".json").read_text() == uninterrupted.with_suffix(".json").read_text()
    # a second rerun finds the finished file and does nothing
    sample_to_file(model, NUM, CONFIG, out, denoise=_failing_denoise(model, 0)[0], chunk_size=CHUNK, progress=False)


def test_chunks_of_another_run_are_refused(model, tmp_path):
    out = tmp_path / "s.npz"
    _interrupted_run(model, out, chunks_done=1)
    other = SamplerConfig("ddim", 3, 1.0, 3.0, 7, 4)
    with pytest.raises(PtqdError, match=r"different run.*seed is 0 there but 7 here"):
        sample_to_file(model, NUM, other, out, chunk_size=CHUNK, progress=False)
    store = ChunkStore(shard_dir(out), {"x": 1})
    assert not store.has(0, CHUNK)  # stamped with another hash: not reused
    (tmp_path / "junk.shards").mkdir()
    (tmp_path / "junk.shards" / "file.txt").write_text("x")
    with pytest.raises(PtqdError, match="not a ptqd chunk directory"):
        sample_to_file(model, NUM, CONFIG, tmp_path / "junk.npz", chunk_size=CHUNK, progress=False)


def test_torchrun_two_gloo_processes_resume(model, uninterrupted, tmp_path):
    """Interrupted in one process after 2 chunks, finished by `torchrun --nproc-per-node 2 -m ptqd sample`
    on gloo: the 2 chunks on disk are kept, the rest split over the ranks, the merged file is
    byte-identical to the uninterrupted single-process run."""
    out = tmp_path / "dist.npz"
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in _interrupted_run(model, out, 2)}
    res = _torchrun(
        ["-m", "ptqd", "sample", "--model", "digits16-cond", "--num-samples", str(NUM), "--steps", "3", "--batch-size", "4",
         "--chunk-size", str(CHUNK), "--out", str(out), "--no-progress", "--keep-chunks"],
        cwd=tmp_path,
    )
    assert res.stdout.count("32 images in") == 1  # rank 0 reports
    assert out.read_bytes() == uninterrupted.read_bytes()
    files = {f.name: f for f in shard_dir(out).glob("chunk_*.npz")}
    assert len(files) == NUM // CHUNK
    for name, (ino, mtime) in before.items():  # not recomputed
        assert (files[name].stat().st_ino, files[name].stat().st_mtime_ns) == (ino, mtime)


def test_noise_statistics_split_over_two_gloo_processes(tmp_path):
    """collect_moments under torchrun: each rank drives half of the trajectories; all ranks get the
    moments of all samples, equal to a single-process collection."""
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent("""
        import sys, numpy as np, torch
        from ptqd import distributed
        from ptqd.correction import collect_moments
        from ptqd.models import load
        from ptqd.sampling import SamplerConfig

        def run(out, partial=None):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): same float summation order
            try:
                _run(out, partial)
            finally:
                torch.set_num_threads(threads)

        def _run(out, partial):
            model = load("digits16")
            q = lambda b, x, t, y, g: model.denoise(x, t, y, g) * (1 + b / 100) + 0.01 * torch.sin(37 * x)
            ctx, _ = distributed.setup("cpu")
            m = collect_moments(model, q, [4, 8], 12, SamplerConfig(steps=3, batch_size=2), seed=5,
                                progress=False, partial=partial, meta={"test": 1})
            np.savez(f"{out}.rank{ctx.rank}.npz", **m.m)
            distributed.teardown()

        if __name__ == "__main__":
            run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    """))
    _torchrun([str(script), str(tmp_path / "dist"), str(tmp_path / "parts")], cwd=tmp_path)
    import runpy

    runpy.run_path(str(script))["run"](str(tmp_path / "single"))  # one process, in this one
    single = np.load(tmp_path / "single.rank0.npz")
    for rank in (0, 1):
        dist = np.load(tmp_path / f"dist.rank{rank}.npz")
        assert set(dist.files) == set(single.files)
        for k in single.files:
            assert dist[k].shape[2] == 12
            np.testing.assert_allclose(dist[k], single[k], rtol=1e-12, atol=1e-12)
    assert len(list((tmp_path / "parts").glob("chunk_*.npz"))) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_torchrun_nccl_one_gpu(tmp_path):
    out = tmp_path / "gpu.npz"
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "ptqd", "sample",
           "--model", "digits16-cond", "--num-samples", "16", "--steps", "3", "--chunk-size", "8", "--device", "cuda",
           "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    assert load_samples(out).images.shape == (16, 16, 16, 1)
