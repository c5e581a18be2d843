"""Small file helpers: atomic writes, JSON, and output locations checked before work starts."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ptqd.errors import PtqdError


def process_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    A crash leaves either the old file or the new one, never a half-written file: the temporary
    file is flushed to disk (fsync) before the rename and the directory after it. The written file
    gets the mode any tool would give it, 0666 minus the process umask (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~process_umask())
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any, strict: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically; ``strict``: NaN and infinities become null (strict JSON)."""
    path = Path(path)
    if strict:
        data = _finite(json.loads(json.dumps(data, default=_jsonable)))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable, allow_nan=not strict) + "\n")
    return path


def _finite(obj: Any) -> Any:
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_npz(path: str | Path, arrays: dict[str, Any], compress: bool = True) -> Path:
    """Write arrays as an ``.npz`` atomically, byte-for-byte reproducible (fixed zip timestamps,
    arrays in the given order), readable by ``numpy.load``."""
    import numpy as np

    path = Path(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
    return path


# ------------------------------------------------------------------------------ output locations
# How ptqd recognises an output it wrote itself (so rerunning a command may replace it):


def npz_with(*arrays: str) -> Callable[[Path], bool]:
    """A ``.npz`` holding all of ``arrays`` (samples files: ``images`` + ``config``)."""

    def ours(path: Path) -> bool:
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
        return all(f"{a}.npy" in names for a in arrays)

    return ours


def json_with(*keys: str) -> Callable[[Path], bool]:
    """A JSON object holding all of ``keys`` (a samples config: ``model_fingerprint``; metrics: ``samples``)."""

    def ours(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    return ours


def dir_with(*markers: tuple[str, Callable[[Path], bool] | None]) -> Callable[[Path], bool]:
    """A directory holding any of ``markers`` (file name, optional check of that file)."""

    def ours(path: Path) -> bool:
        return any((path / name).is_file() and (check is None or check(path / name)) for name, check in markers)

    return ours


SAMPLES = npz_with("images", "config")
SAMPLES_CONFIG = json_with("model_fingerprint")
METRICS = json_with("samples")
# a run directory: its config.json (written last) has a "ptqd" version key; an interrupted run has its calibration data
RUN_DIR = dir_with(("config.json", json_with("ptqd")), ("calibration.safetensors", None))


def _writable(directory: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ptqd-write-test.", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_output(
    path: str | Path,
    suffix: str | None = None,
    overwrite: bool = False,
    kind: str = "file",
    ours: Callable[[Path], bool] | None = None,
    option: str = "--out",
) -> Path:
    """Check before any work that ``path`` can take an output; return it as a Path, else raise PtqdError.

    ``kind="file"``: the name must end with ``suffix`` (the format ptqd writes there) and must not be
    an existing directory. ``kind="dir"``: it must not be an existing file. The nearest existing
    parent must be a directory that this process can write to (tested by creating and removing a
    temporary file; for an existing directory, in it). An existing output is written over only when
    ``ours(path)`` says ptqd wrote it (e.g. :data:`SAMPLES`: a .npz with ``images`` and ``config``
    arrays; :data:`RUN_DIR`: a ``config.json`` with a ``ptqd`` key), or an empty directory, or when
    ``overwrite`` is set (the CLI's ``--overwrite``); without ``ours`` any existing file needs it.
    """
    path = Path(path)
    label = f"{option} {path}"
    if kind == "file":
        if suffix is not None and path.suffix.lower() != suffix:
            raise PtqdError(f"{label}: ptqd writes a {suffix} file here; give a name ending in {suffix}")
        if path.is_dir():
            raise PtqdError(f"{label} is an existing directory; give a {suffix or 'file'} name (e.g. {path / ('out' + (suffix or ''))})")
    elif kind == "dir":
        if path.exists() and not path.is_dir():
            raise PtqdError(f"{label} is an existing file, but ptqd writes a directory here; choose another {option}")
    else:
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    parent = path if kind == "dir" and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PtqdError(f"{label}: {parent} is a file, not a directory; choose another {option}")
    if not _writable(parent):
        raise PtqdError(f"{label}: cannot write in {parent} (permission denied or read-only); choose another {option}")
    if overwrite or not path.exists():
        return path
    if kind == "dir" and not any(path.iterdir()):
        return path
    if ours is None or not ours(path):
        what = "a directory that ptqd did not write" if kind == "dir" else "a file that ptqd did not write"
        raise PtqdError(f"{label} exists and is {what}; choose another {option}, or pass --overwrite to write over it")
    return path
