"""Work split across processes launched by ``torchrun`` (or one process without it).

Work comes in chunks: fixed index ranges [start, stop) whose result depends only on the range (the
sampler seeds every sample from (seed, index)), so any process can compute any chunk and the merged
result does not depend on how many processes made it. Rank 0 decides which chunks are still missing
and tells the others; rank ``r`` of ``w`` computes every ``w``-th of them. Finished chunks go to a
:class:`ptqd.chunks.ChunkStore` when one is given, so an interrupted run resumes where it stopped.

The process group is set up only when launched under torchrun (``WORLD_SIZE`` > 1): gloo on the
CPU, NCCL when the work runs on CUDA. Multi-node runs need the output directory on a shared file
system (rank 0 merges the chunk files of every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ptqd.errors import PtqdError

Range = tuple[int, int]


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world`` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise PtqdError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def context() -> Context:
    """Rank and world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return Context(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def setup(device: str = "cpu") -> tuple[Context, str]:
    """Join the process group when launched by torchrun; return the context and this rank's device.

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` (one GPU per process) and selects NCCL; anything
    else uses gloo. Without torchrun nothing is initialised and ``device`` is returned unchanged.
    """
    import torch
    import torch.distributed as td

    ctx = context()
    if not ctx.active:
        return ctx, device
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise PtqdError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu (gloo)")
        if str(device) == "cuda":
            device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(torch.device(device))
    if not td.is_initialized():
        from datetime import timedelta

        # ranks wait for each other at the end of a run: allow for uneven chunks on slow models
        td.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return ctx, device


def teardown() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.active:
        import torch.distributed as td

        td.barrier()


def broadcast(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    import torch.distributed as td

    box = [obj if ctx.main else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, ctx: Context) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    import torch.distributed as td

    out = [None] * ctx.world
    td.all_gather_object(out, obj)
    return out


def chunk_ranges(num: int, size: int) -> list[Range]:
    """[0, num) cut into consecutive ranges of ``size`` (the last one shorter)."""
    if size < 1:
        raise PtqdError(f"chunk size must be at least 1, got {size}")
    return [(s, min(num, s + size)) for s in range(0, num, size)]


def run_chunks(
    ranges: list[Range],
    compute: Callable[[int, int, Callable[[], None]], dict[str, np.ndarray]],
    ctx: Context,
    store=None,
    collect: bool = True,
    progress: bool = True,
    desc: str = "chunks",
    units: int = 1,
    restart_on_mismatch: bool = False,
) -> dict[Range, dict[str, np.ndarray]] | None:
    """Compute every range of ``ranges`` once across all ranks; skip those already in ``store``.

    ``compute(start, stop, tick)`` returns arrays for that range and may call ``tick()`` up to
    ``units`` times to move the progress bar (rank 0's) within a chunk. With ``collect``, every rank gets all
    results (from the store or gathered from the other ranks) as {range: arrays}; without, ranks only
    wait for each other and rank 0 reads the store afterwards (for large outputs such as images).
    A store made for other settings is refused, or emptied with ``restart_on_mismatch``.
    """
    from tqdm import tqdm

    if not collect and store is None:
        raise ValueError("run_chunks needs a store when results are not collected")
    missing: list[Range] | PtqdError | None = None
    if ctx.main:
        try:
            if store is not None:
                store.prepare(restart_on_mismatch)
            missing = [r for r in ranges if store is None or not store.has(*r)]
        except PtqdError as e:  # refused store: every rank stops with the same message
            missing = e
    missing = broadcast(missing, ctx)
    if isinstance(missing, PtqdError):
        raise missing
    mine = missing[ctx.rank :: ctx.world]
    if ctx.main and progress and store is not None and len(missing) < len(ranges):
        print(f"resuming from {store.root}: {len(ranges) - len(missing)}/{len(ranges)} chunks already done")
    bar = tqdm(total=len(mine) * units, desc=f"{desc} (rank 0 of {ctx.world})" if ctx.active else desc,
               unit="chunk" if units == 1 else "step", disable=not (progress and ctx.main))
    computed: dict[Range, dict[str, np.ndarray]] = {}
    for i, (start, stop) in enumerate(mine):
        arrays = compute(start, stop, lambda: bar.update(1) if bar.n < (i + 1) * units else None)
        bar.update((i + 1) * units - bar.n)
        if store is not None:
            store.write(start, stop, arrays)
        if collect:
            computed[(start, stop)] = arrays
    bar.close()
    if not collect:
        barrier(ctx)
        return None
    results: dict[Range, dict[str, np.ndarray]] = {}
    for part in gather(computed, ctx):
        results.update(part)
    for r in ranges:
        if r not in results:
            results[r] = store.read(*r)
    return results
