"""A directory of finished work chunks, each a ``.npz`` for one index range, stamped with its config.

Layout: ``ROOT/config.json`` (what made the chunks and its hash) and ``ROOT/chunk_000001000.npz``
(the range starting at 1000). Chunk files are written atomically, so a killed process leaves whole
chunks or none; a chunk whose hash or range differs from what is asked counts as missing. A store
made with another configuration is refused with the field that differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.errors import PtqdError
from ptqd.io import write_json, write_npz


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k} is {va!r} there but {vb!r} here")
    return out


class ChunkStore:
    """Finished chunks of one job under ``root``; ``config`` (JSON-able) identifies the job."""

    def __init__(self, root: str | Path, config: dict[str, Any]) -> None:
        self.root = Path(root)
        self.config = json.loads(json.dumps(config, default=str))
        self.key = config_hash(self.config)

    def prepare(self, restart_on_mismatch: bool = False) -> None:
        """Create the directory, or check that an existing one holds chunks of the same job (rank 0).

        A store of another job is refused, or emptied with ``restart_on_mismatch``."""
        meta = self.root / "config.json"
        if meta.is_file():
            try:
                saved = json.loads(meta.read_text())
            except ValueError:
                saved = None
            if saved is not None and saved.get("hash") != self.key and restart_on_mismatch:
                self.remove()
            elif saved is not None and saved.get("hash") != self.key:
                diff = _differences(saved.get("config", {}), self.config)
                raise PtqdError(
                    f"{self.root} holds chunks of a different run ({'; '.join(diff[:3]) or 'other settings'}); "
                    f"rerun with the settings it was made with, or delete {self.root} (or choose another --out) to start over"
                )
        elif self.root.exists() and any(self.root.iterdir()):
            raise PtqdError(f"{self.root} exists and is not a ptqd chunk directory (no config.json); move it away or choose another --out")
        write_json(meta, {"hash": self.key, "config": self.config})

    def path(self, start: int) -> Path:
        return self.root / f"chunk_{start:09d}.npz"

    def has(self, start: int, stop: int) -> bool:
        """Whether a readable chunk for exactly [start, stop) of this job exists."""
        p = self.path(start)
        if not p.is_file():
            return False
        try:
            with np.load(p, allow_pickle=False) as z:
                return str(z["_hash"]) == self.key and int(z["_start"]) == start and int(z["_stop"]) == stop
        except Exception:
            return False  # damaged: compute again

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> Path:
        extra = {"_hash": np.array(self.key), "_start": np.array(start), "_stop": np.array(stop)}
        return write_npz(self.path(start), {**arrays, **extra}, compress=False)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        p = self.path(start)
        if not self.has(start, stop):
            raise PtqdError(f"chunk {p} for samples [{start}, {stop}) is missing or belongs to another run; rerun to recompute it")
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if not k.startswith("_")}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def remove_if_empty(self) -> None:
        """Remove the directory when it holds no finished chunk (a run that failed before its first)."""
        if self.root.is_dir() and not any(self.root.glob("chunk_*.npz")):
            self.remove()
