"""Building and caching the native library: compile the sources once, load the cached file.

:func:`load_library` compiles ``SOURCES`` with the C++ compiler ``$CXX`` (else ``g++``, else
``c++``) against the FFI headers of the installed jaxlib (``jax.ffi.include_dir()``) into
:func:`cache_dir`, under a name keyed by a hash of the sources, jaxlib's FFI headers, the flags,
the compiler's version and the CPU's feature flags, and loads it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("adagrad.cc", "bags.cc", "coalesce.cc", "rows.cc", "sparse_step.cc")
)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("groups.h", "parallel.h", "step.h"))
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-std=c++17",
    "-shared",
    "-fPIC",
)


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MX_ADAGRAD_CACHE_DIR``, else the user's cache dir."""
    if "MX_ADAGRAD_CACHE_DIR" in os.environ:
        return Path(os.environ["MX_ADAGRAD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mx_adagrad"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` depends on them), or its machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def library_path(compiler: str) -> Path:
    """The cached library for this source, FFI headers, flags, compiler and CPU."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    headers = sorted(Path(jax.ffi.include_dir()).rglob("*.h"))
    key = hashlib.sha256()
    for part in (*SOURCES, *HEADERS, *headers, " ".join(FLAGS), version, _cpu_flags()):
        key.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    return cache_dir() / f"mx_adagrad_native_{key.hexdigest()[:16]}.so"


def build(compiler: str, path: Path) -> None:
    """Compiles the sources to one library at ``path`` (atomically: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        command = [
            compiler,
            *FLAGS,
            "-isystem",
            jax.ffi.include_dir(),
            *map(str, SOURCES),
            "-o",
            tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_library() -> ctypes.CDLL:
    """The native library, built into the cache first if it is not there.

    Raises:
      RuntimeError: no compiler, or the build failed.
      OSError: the library cannot be loaded.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++ or c++)")
    path = library_path(compiler)
    if not path.exists():
        build(compiler, path)
    return ctypes.cdll.LoadLibrary(str(path))
