"""Sampling large runs in resumable chunks, across ``torchrun`` processes or in one process.

``sample_to_file`` cuts the sample indices 0..num-1 into chunks of ``chunk_size``; each chunk is
generated on its own (sample ``i`` depends only on (seed, i)) and written to ``OUT.shards/`` as soon
as it is done. Rank 0 merges the chunks in index order into ``OUT`` and removes the directory. A
rerun after an interruption skips the chunks on disk, so no image is generated twice or lost, and
the merged file is byte-for-byte the one an uninterrupted run (with any number of processes) writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptqd import distributed
from ptqd.chunks import ChunkStore
from ptqd.locks import holds_lock
from ptqd.sampling import SamplerConfig, Samples, check_samples_output, check_samples_space, sample, sample_record, save_samples

DEFAULT_CHUNK = 1000


def shard_dir(out: str | Path) -> Path:
    """Where the chunks of ``OUT.npz`` live: ``OUT.shards/``."""
    return Path(out).with_suffix(".shards")


def _saved_config(path: Path) -> dict | None:
    """The config stored in a samples file, without reading its images (None if unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["config"]))
    except Exception:
        return None


@holds_lock("out", "samples file")
def sample_to_file(
    model,
    num: int,
    config: SamplerConfig,
    out: str | Path,
    labels: list[int] | None = None,
    progress: bool = True,
    denoise=None,
    corrector=None,
    record: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    keep_chunks: bool = False,
    ctx: distributed.Context | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Generate ``num`` samples into ``out`` (.npz + .json) chunk by chunk; resumable.

    Chunk boundaries are multiples of the batch size (``chunk_size`` is rounded up to one), so a
    chunked, resumed or torchrun-split run samples exactly the batches of a single-process run and
    writes the same bytes, for quantized models too. ``record`` adds to what the samples file records (e.g. a quantized run's plan) and, like the
    sampler settings, must match for chunks on disk to be reused. Under torchrun every rank calls
    this; rank 0 returns the path, the others None. ``out`` is checked before any sampling
    (:func:`ptqd.sampling.check_samples_output`; ``overwrite`` replaces files ptqd did not write).
    """
    from ptqd.errors import PtqdError

    ctx = ctx or distributed.context()
    config.validate()
    if num < 1:
        raise PtqdError(f"number of samples must be at least 1, got {num}")
    out = check_samples_output(out, overwrite)
    check_samples_space(model, num, out, chunked=True)
    full = sample_record(model, num, config, corrector)
    full.update(record or {})
    full = json.loads(json.dumps(full, default=str))
    if chunk_size < 1:
        raise PtqdError(f"chunk size must be at least 1, got {chunk_size}")
    # chunk boundaries on batch boundaries: every chunk samples the batches a single process would
    # (quantized outputs depend on the batch composition at the ~1e-7 level, which rounding amplifies)
    chunk_size = -(-chunk_size // config.batch_size) * config.batch_size
    job = {k: v for k, v in full.items() if k != "num"}
    job.update({"labels": [int(v) for v in labels] if labels else None, "chunk_size": chunk_size})
    store = ChunkStore(shard_dir(out), job)
    ranges = distributed.chunk_ranges(num, chunk_size)

    done = ctx.main and out.is_file() and not store.root.exists() and _saved_config(out) == full
    if distributed.broadcast(done, ctx):
        if ctx.main and progress:
            print(f"{out} already holds these {num} samples; nothing to do")
        return out if ctx.main else None

    def compute(start: int, stop: int, tick) -> dict[str, np.ndarray]:
        s = sample(model, stop - start, config, labels=labels, progress=False, denoise=denoise, corrector=corrector, first=start)
        return {"images": s.images} if s.labels is None else {"images": s.images, "labels": s.labels}

    try:
        distributed.run_chunks(ranges, compute, ctx, store=store, collect=False, progress=progress, desc=f"sampling {model.name}")
    except PtqdError:
        if ctx.main:
            store.remove_if_empty()  # nothing to resume from: leave no empty OUT.shards/ behind
        raise
    if not ctx.main:
        return None
    images = label_arr = None
    for start, stop in ranges:  # fill preallocated arrays: a 50k run is held once in memory, not twice
        part = store.read(start, stop)
        if images is None:
            images = np.empty((num, *part["images"].shape[1:]), dtype=part["images"].dtype)
            label_arr = np.empty(num, dtype=part["labels"].dtype) if "labels" in part else None
        images[start:stop] = part["images"]
        if label_arr is not None:
            label_arr[start:stop] = part["labels"]
    path = save_samples(Samples(images, label_arr, full), out)
    if not keep_chunks:
        store.remove()
    return path
