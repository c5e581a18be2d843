"""Small file helpers: atomic writes, JSON, and output locations checked before work starts."""

from __future__ import annotations

import errno
import json
import os
import stat
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


class WriteError(PtqdError):
    """An output could not be written (disk full, read-only, permission, name too long, ...).

    The CLI adds what an interrupted command keeps (what can be resumed) to the message."""


# errno -> (what happened, what to do); {path} is filled in
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space there (or choose another --out on a disk with room)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space (or choose another --out)"),
    errno.EROFS: ("the file system is read-only", "choose another --out on a writable file system"),
    errno.EACCES: ("permission denied", "choose another --out, or fix the permissions of {dir}"),
    errno.EPERM: ("operation not permitted (the file or its directory may be immutable, `chattr +i`, or owned by "
                  "someone else)", "check `lsattr`/`ls -l` of {path} and {dir}, or choose another --out"),
    errno.ENAMETOOLONG: ("the file name or path is too long (at most {name_max} bytes per name and {path_max} bytes per path)",
                         "choose a shorter --out"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop)", "fix the symbolic links in {path}, or choose another --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another --out"),
    errno.EISDIR: ("it is a directory", "choose another --out"),
    errno.EEXIST: ("something else already exists there", "choose another --out"),
    errno.EIO: ("an input/output error from the device", "check the disk, or choose another --out"),
    errno.EFBIG: ("the file is too large for this file system", "choose another --out on a file system that allows large files"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun"),
}


def _limit(path: Path, name: str, default: int) -> int:
    p = path
    while True:
        try:
            return os.pathconf(p, name)
        except (OSError, ValueError):
            if p == p.parent:
                return default
            p = p.parent


def name_max(directory: str | Path) -> int:
    """Longest file name (bytes) ``directory``'s file system takes (255 where it cannot be asked)."""
    return _limit(Path(directory), "PC_NAME_MAX", 255)


def os_error(e: OSError, path: str | Path | None = None, action: str = "write", label: str | None = None) -> WriteError:
    """The one translation of an OSError on an output into a PtqdError naming the path, the cause and
    the fix (to raise). ``path``: the output being written (else the error's own file name);
    ``label``: how to name it (e.g. ``--out PATH``)."""
    where = Path(e.filename) if getattr(e, "filename", None) else (Path(path) if path is not None else None)
    target = Path(path) if path is not None else where
    if where is not None and target is not None and where.name.startswith(".") and where.name.endswith(".tmp") \
            and where.parent == target.parent:
        where = target  # the temporary file of an atomic write: name the output
    code = e.errno
    text = where if where is not None else "an output"
    directory = where.parent if where is not None else "its directory"
    if code in _OS_ERRORS:
        cause, fix = _OS_ERRORS[code]
        fill = dict(path=text, dir=directory, name_max=name_max(directory) if where is not None else 255,
                    path_max=_limit(Path(directory), "PC_PATH_MAX", 4096) if where is not None else 4096)
        cause, fix = cause.format(**fill), fix.format(**fill)
    else:
        cause, fix = (e.strerror or str(e)), "choose another --out, or fix the cause and rerun"
    return WriteError(f"cannot {action} {label or text}: {cause}; {fix}")


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_space(path: str | Path, nbytes: int, what: str = "output", option: str = "--out") -> None:
    """Refuse before work when the file system of ``path`` has less than ``nbytes`` (+1 MiB) free."""
    free = free_bytes(path)
    need = int(nbytes) + (1 << 20)
    if free is not None and free < need:
        raise PtqdError(
            f"{option} {path}: the {what} needs about {_size(need)} but only {_size(free)} are free on its file system; "
            f"free some space or choose another {option} (nothing was written)"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems cannot fsync a directory (or at all); a file's failed fsync (ENOSPC, EIO on
        # network file systems that write late) is a failed write
        if directory or e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            pass
        else:
            raise
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    """``.NAME.`` shortened so that mkstemp's ``.NAME.XXXXXXXX.tmp`` fits the file system's NAME_MAX."""
    room = name_max(path.parent) - len(".") - len(".") - 8 - len(".tmp") - 2
    name = path.name.encode()
    if len(name) > room:
        name = name[: max(1, room)].decode(errors="ignore").encode()
    return f".{name.decode(errors='ignore')}."


def _nearly_full(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < (1 << 16)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    A crash leaves either the old file or the new one, never a half-written file: the temporary
    file is flushed to disk (fsync) before the rename and the directory after it. The written file
    gets the mode any tool would give it, 0666 minus the process umask (not mkstemp's 0600). Its
    name fits the file system's NAME_MAX whenever ``path``'s does. Any failure removes the
    temporary file; an OSError (a full disk, a read-only or immutable target, a name too long, a
    symlink loop) becomes a :class:`WriteError` naming ``path``, the cause and the fix, as does a
    writer's own error (torch, safetensors) when the disk is full afterwards.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        if path.exists() and not path.is_file() and not path.is_symlink():
            raise WriteError(f"cannot write {path}: it exists and is not a regular file (a directory, FIFO or device); choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
        except (OSError, PtqdError, KeyboardInterrupt, GeneratorExit):
            raise
        except Exception as e:
            if _nearly_full(path.parent):  # a writer that wraps ENOSPC in its own error type
                raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)), path) from e
            raise
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~process_umask())
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            try:
                tmp_path.unlink()
            except OSError:
                pass


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


def text_starting(prefix: str) -> Callable[[Path], bool]:
    """A text file whose first line starts with ``prefix`` (a report: ``# ptqd``)."""

    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read(len(prefix)) == prefix
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def json_list(path: Path) -> bool:
    """A JSON list of objects (``ptqd compare --out``'s rows)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, list) and all(isinstance(r, dict) for r in data)


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
    st = _probe(path, label)
    if kind == "file":
        if suffix is not None and path.suffix.lower() != suffix:
            raise PtqdError(f"{label}: ptqd writes a {suffix} file here; give a name ending in {suffix}")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise PtqdError(f"{label} is an existing directory; give a {suffix or 'file'} name (e.g. {path / ('out' + (suffix or ''))})")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise PtqdError(f"{label} exists and is not a regular file (a FIFO, socket or device); ptqd writes files only: choose another {option}")
    elif kind == "dir":
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise PtqdError(f"{label} is an existing file, but ptqd writes a directory here; choose another {option}")
    else:
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if len(path.name.encode()) > name_max(path.parent if path.parent.exists() else Path(".")):
        e = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
        raise PtqdError(str(os_error(e, path, label=label))) from None  # before any work: not a failed write
    parent = path if kind == "dir" and st is not None else path.parent
    while _probe(parent, label) is None and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PtqdError(f"{label}: {parent} is a file, not a directory; choose another {option}")
    if not _writable(parent):
        raise PtqdError(f"{label}: cannot write in {parent} (permission denied, read-only or immutable); choose another {option}")
    if st is None:
        return path
    if kind == "file":
        _check_replaceable(path, label, option)
    if kind == "dir" and not any(path.iterdir()):
        return path
    if overwrite:
        if kind == "file":
            _note_replace(path, label, "a file ptqd did not write (--overwrite)")
        return path
    if ours is None or not ours(path):
        what = "a directory that ptqd did not write" if kind == "dir" else "a file that ptqd did not write"
        raise PtqdError(f"{label} exists and is {what}; choose another {option}, or pass --overwrite to write over it")
    if kind == "file":
        _note_replace(path, label, "a file ptqd wrote earlier")
    return path


def _probe(path: Path, label: str) -> os.stat_result | None:
    """``os.stat`` of ``path`` (None when it does not exist); a symlink loop or a name too long is refused."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise PtqdError(str(os_error(e, path, label=label))) from None  # before any work: not a failed write


def _check_replaceable(path: Path, label: str, option: str) -> None:
    """An existing file that the final rename could not replace (immutable, append-only) is refused now,
    not after the work."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError as e:
        if e.errno == errno.EPERM:
            raise PtqdError(
                f"{label} cannot be replaced: operation not permitted (it is immutable or append-only, `chattr +i`/`+a`; "
                f"see `lsattr {path}`); remove the attribute or choose another {option}"
            ) from None
        return  # EACCES on a read-only file: the rename in a writable directory still replaces it
    except OSError:
        return
    os.close(fd)


_noted: set[str] = set()


def _note_replace(path: Path, label: str, what: str) -> None:
    """One printed line per output per process when ``--out`` replaces an existing file."""
    key = str(path.resolve())
    if label.startswith("--out") and key not in _noted:
        _noted.add(key)
        print(f"note: {label} exists ({what}); it will be replaced")


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header written in sorted key order, metadata included
    (safetensors writes ``__metadata__`` in hash order, so the same tensors can give different bytes)."""
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write torch ``tensors`` as safetensors, atomically and byte-for-byte reproducible (sorted header)."""
    from safetensors.torch import save

    path = Path(path)
    data = canonical_safetensors(save(tensors, metadata=metadata))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path
