"""Integrity records: byte counts and SHA-256 of the files of a run directory, and of JSON manifests.

A run directory's ``integrity.json`` lists ``{file: {"sha256", "bytes"}}`` for what ptqd wrote there
(config, quantizer state, summary, calibration data, noise statistics) and a SHA-256 of the record
itself; it is updated whenever ptqd rewrites one of those files (under the run directory's lock),
and checked when a file is read back. It catches accidental edits and damage (a changed ``qmin``,
a truncated copy), not deliberate ones: anyone can recompute a SHA-256. Run directories made before
the record existed have none and load with the checks that are possible without it.

:func:`seal` / :func:`check_seal` give a JSON document (a checkpoint manifest) a checksum of its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ptqd.errors import PtqdError

RECORD = "integrity.json"
FORMAT = "ptqd-run-integrity"
SEAL = "manifest_sha256"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(data: dict[str, Any], skip: str) -> str:
    """SHA-256 of ``data`` without the key ``skip``, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in data.items() if k != skip}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its own checksum under ``manifest_sha256``."""
    return {**data, SEAL: digest(data, SEAL)}


def check_seal(data: dict[str, Any], file: Path, fix: str) -> bool:
    """Refuse ``data`` whose ``manifest_sha256`` does not match its content; False when it has none (older files)."""
    stored = data.get(SEAL)
    if stored is None:
        return False
    if stored != digest(data, SEAL):
        raise PtqdError(f"{file} was changed after ptqd wrote it: its content does not match its own checksum ({SEAL}); {fix}")
    return True


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _read(directory: Path) -> dict[str, Any] | None:
    f = directory / RECORD
    if not f.is_file():
        return None
    fix = f"delete {directory} (or choose a new --out) and quantize again"
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PtqdError(f"{f} is damaged ({e}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise PtqdError(f"{f} is not a ptqd integrity record (field 'format' or 'files' is wrong); {fix}")
    if data.get("sha256") != digest(data, "sha256"):
        raise PtqdError(f"{f} was changed after ptqd wrote it (its checksum does not match); {fix}")
    for name, e in data["files"].items():
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)):
            raise PtqdError(f"{f}: field 'files.{name}' must hold sha256 and bytes; {fix}")
    return data


def record(directory: str | Path, names: list[str], create: bool = True) -> None:
    """Add (or refresh) ``names`` in ``directory``'s record; without ``create`` only when a record exists."""
    from ptqd.io import write_json

    directory = Path(directory)
    data = _read(directory)
    if data is None:
        if not create:
            return
        data = {"format": FORMAT, "version": 1, "files": {}}
    for name in names:
        f = directory / name
        if f.is_file():
            data["files"][name] = _entry(f)
        else:
            data["files"].pop(name, None)
    data.pop("sha256", None)
    data["sha256"] = digest(data, "sha256")
    write_json(directory / RECORD, data)


def has_record(directory: str | Path) -> bool:
    return (Path(directory) / RECORD).is_file()


def verify(path: str | Path, fix: str) -> bool:
    """Check ``path`` against its directory's record: True when checked, False when not recorded."""
    path = Path(path)
    data = _read(path.parent)
    if data is None or path.name not in data["files"]:
        return False
    want = data["files"][path.name]
    if not path.is_file():
        raise PtqdError(f"{path} is missing (the run's {RECORD} lists it); {fix}")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise PtqdError(f"{path} was changed after ptqd wrote it: {size} bytes, {RECORD} records {want['bytes']}; {fix}")
    if sha256_file(path) != want["sha256"]:
        raise PtqdError(f"{path} was changed after ptqd wrote it: its SHA-256 differs from the one in {RECORD}; {fix}")
    return True
