"""Build a small C source into a shared library once per machine and load it with :mod:`ctypes`.

The book's CPU kernels (:mod:`qtutor.runtime.cpu_lut`, :mod:`qtutor.runtime.cpu_kmeans`) are
plain C compiled on first use with the system's C compiler (``cc -O3 -march=native``, with
OpenMP when the compiler has it) into a cache folder (``QTUTOR_CACHE``, else
``~/.cache/qtutor/kernels``), keyed by the source, the compiler, its flags and the processor.
Without a compiler (or on Windows) :meth:`CLibrary.load` returns None and
:attr:`CLibrary.reason` says why; callers then keep their PyTorch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional


def cache_dir() -> Path:
    root = os.environ.get("QTUTOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qtutor"
    )
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` compiles for (a home folder shared by several machines must not
    hand one of them another's build): the processor's flags where Linux lists them."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile(cc: str, source: str, flags: list, out: Path) -> Optional[str]:
    """Compile ``source`` into ``out`` (atomically: concurrent processes may race); -> error or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "src.c", Path(tmp) / out.name
        src.write_text(source)
        proc = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        os.replace(lib, out)
    return None


class CLibrary:
    """One C source, built and loaded on the first :meth:`load` (thread-safe), then kept.

    ``what`` names the kernel in the reasons (e.g. "the CPU LUT kernel"); ``bind(lib)`` sets the
    ctypes signatures; ``flags`` are added to ``-O3 -march=native -shared -fPIC -std=c99``."""

    def __init__(self, name: str, what: str, source: str, bind: Callable, flags: tuple = ()):
        self.name, self.what, self.source, self.bind, self.flags = name, what, source, bind, list(flags)
        self.lib, self.reason = None, None
        self._lock = threading.Lock()

    def load(self):
        """The compiled library (built on first use), or None with the reason in :attr:`reason`."""
        with self._lock:
            if self.lib is not None or self.reason is not None:
                return self.lib
            if sys.platform == "win32":
                self.reason = f"{self.what} is built with a Unix C compiler; not on Windows"
                return None
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if cc is None:
                self.reason = f"no C compiler (cc, gcc or clang) to build {self.what}"
                return None
            base = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99", *self.flags]
            key = hashlib.sha256((self.source + cc + " ".join(base) + _cpu_id()).encode()).hexdigest()[:16]
            error = None
            for extra, tag in ((["-fopenmp"], "omp"), ([], "serial")):  # without OpenMP if it is missing
                path = cache_dir() / f"{self.name}_{key}_{tag}.so"
                try:
                    if not path.exists():
                        error = _compile(cc, self.source, base + extra, path)
                        if error is not None:
                            continue
                    lib = ctypes.CDLL(str(path))
                except OSError as err:
                    error = str(err)
                    continue
                self.bind(lib)
                self.lib = lib
                return lib
            self.reason = f"could not build {self.what}: {error}"
            return None
