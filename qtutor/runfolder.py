"""The output folder of ``qtutor bench``: a finished method's result is never lost.

* **One run per folder at a time.** A run holds an exclusive OS lock on ``OUT/.qtutor-bench.lock``
  from before it reads ``results.json`` until it ends; a second run on the same folder (resumed or
  not, in this process or another) is refused. The operating system drops the lock of a killed
  process, so a kill never leaves the folder locked.
* **Whole files only.** ``results.json`` is written to a fresh temporary file in the same folder,
  flushed to disk, then renamed over the old one: a kill, a full disk or a read-only folder
  leaves the previous complete file (and no temporary file behind).
* **Nothing replaced by surprise.** A folder whose ``results.json`` holds finished methods is
  continued with ``--resume`` (only with the same settings) or started afresh with
  ``--overwrite``, which first moves the old file to ``results.previous-N.json`` with an ``N``
  not used before; no file of that name is ever overwritten.
* **Strict JSON.** Non-finite numbers are written as ``null`` (and reported); reading rejects
  ``NaN``/``Infinity``, arrays, and method entries without the numbers the tables need.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import QtutorError
from .plots import COLUMNS as ENTRY_NUMBERS  # what every method entry holds: the CSV's columns

RESULTS = "results.json"
LOCK = ".qtutor-bench.lock"


# --------------------------------------------------------------------------- the folder
def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a writable folder, before any work is done."""
    if out.exists() and not out.is_dir():
        raise QtutorError(f"--out {out} is a file, not a folder; choose a folder path")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise QtutorError(f"--out {out} lies under {existing}, which is a file; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QtutorError(f"--out {out}: {existing} is not writable; choose another --out or make it writable")


def os_error(err: OSError, what: str) -> QtutorError:
    """A one-line error for a failed file operation, with what to do about it."""
    advice = {
        errno.ENOSPC: "free some disk space or use another --out",
        errno.EDQUOT: "free some disk space or use another --out",
        errno.EACCES: "make it writable or use another --out",
        errno.EPERM: "make it writable or use another --out",
        errno.EROFS: "the file system is read-only: use another --out",
        errno.ENOTDIR: "a part of the path is a file: use another --out",
        errno.EEXIST: "a file is in the way: use another --out",
        errno.ENOLCK: "use a folder on a local disk",
    }.get(err.errno, "use another --out")
    return QtutorError(f"cannot {what}: {err.strerror or err}; {advice}")


@contextmanager
def locked(out: Path):
    """Hold ``out``'s lock for the body; refuse at once if another run holds it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise os_error(err, f"create the output folder {out}") from err
    try:
        _lock(fd)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise os_error(err, f"lock the output folder {out}") from err  # e.g. no locks on NFS
        holder = _lock_holder(out / LOCK)
        raise QtutorError(
            f"another qtutor bench{holder} is writing to {out}; wait for it to finish, or use another --out"
        ) from err
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _remove_stale_temporaries(out)
        yield
    finally:
        _unlock(fd)
        os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive, non-blocking lock on the open file ``fd`` (OSError if held elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of killed runs (under the lock no other run is writing one)."""
    for tmp in out.glob(f"{RESULTS}.*.tmp"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- writing
def write_json(path: Path, data) -> None:
    """Replace ``path`` with ``data`` as strict JSON, whole or not at all."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            _fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, f"write {path} (the version written before is intact)") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(fd: int) -> None:
    """Flush to disk; file systems that cannot (some network or FUSE ones) are let be."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def finite_or_none(data, where: str = "") -> tuple:
    """``data`` with every NaN or infinite float replaced by ``None``, and the paths replaced."""
    if isinstance(data, float) and not math.isfinite(data):
        return None, [f"{where} = {data}"]
    if isinstance(data, dict):
        pairs = [(k, finite_or_none(v, f"{where}.{k}" if where else str(k))) for k, v in data.items()]
        return {k: v for k, (v, _) in pairs}, [w for _, (_, ws) in pairs for w in ws]
    if isinstance(data, (list, tuple)):
        items = [finite_or_none(v, f"{where}[{i}]") for i, v in enumerate(data)]
        return [v for v, _ in items], [w for _, ws in items for w in ws]
    return data, []


def archive(path: Path) -> Path:
    """Move ``path`` to ``results.previous-N.json`` with the first unused ``N`` (under the lock)."""
    n = 1
    while (target := path.with_name(f"{path.stem}.previous-{n}{path.suffix}")).exists():
        n += 1
    try:
        os.replace(path, target)
    except OSError as err:
        raise os_error(err, f"move {path} to {target}") from err
    return target


# --------------------------------------------------------------------------- reading
def read_results(path: Path) -> dict:
    """The results file at ``path``, checked: a JSON object with a ``methods`` object whose
    entries hold every number the tables need. ``ValueError`` says what is wrong."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(err.strerror or str(err)) from err
    data = json.loads(text, parse_constant=_refuse_constant)
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    methods = data.get("methods")
    if not isinstance(methods, dict):
        raise ValueError("no 'methods' object")
    for name, entry in methods.items():
        _check_entry(name, entry)
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def _check_entry(name: str, entry) -> None:
    from .quant.base import METHOD_NAMES, split_head

    if split_head(name)[0] not in METHOD_NAMES:  # a method, or its +head row (--quantize-head)
        raise ValueError(f"unknown method {name!r}")
    if not isinstance(entry, dict):
        raise ValueError(f"method {name!r} is a JSON {type(entry).__name__}, not an object")
    missing = [k for k in (*ENTRY_NUMBERS, "config") if k not in entry]
    if missing:
        raise ValueError(f"method {name!r} lacks {', '.join(missing)}")
    for k in ENTRY_NUMBERS:
        v = entry[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"method {name!r} has {k}={v!r}, not a number")
