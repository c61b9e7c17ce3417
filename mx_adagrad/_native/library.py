"""Building and caching the native library: compile the sources once, load the checked file.

:func:`load_library` compiles ``SOURCES`` with the C++ compiler ``$CXX`` (else ``g++``, else
``c++``) against the FFI headers of the installed jaxlib (``jax.ffi.include_dir()``) into
:func:`cache_dir`, under the name :func:`library_name` keys by a hash of the sources, jaxlib's FFI
headers, the flags, the compiler's version and the CPU's feature flags, and loads it.

What a cached file can go through, and what a load then does:

* A build writes the library, then its SHA-256 in ``<library>.sha256``, each to a temporary file
  beside it renamed into place: a file in place is whole, and a library that another process has
  mapped is replaced, never rewritten.
* A load opens the library only if its bytes have the recorded SHA-256 (``dlopen`` of a truncated
  file dies of SIGBUS), and uses it only if ``dlopen`` succeeds. A library that fails either check
  (truncated, overwritten, without its digest) is rebuilt in its place, silently: it is a cache
  miss, and the next process loads the new file.
* Processes that find the library missing or bad take turns (``fcntl.flock`` on
  ``<library>.lock``): one builds, the others wait and load what it built. Where locks are
  unsupported, or after ``LOCK_TIMEOUT`` seconds, they build side by side, which is only slower.
* A cache dir that cannot be created or written gives way, with one warning, to
  :func:`temp_cache_dir`; if that fails too, :func:`load_library` raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

try:
    import fcntl
except ImportError:  # Windows: builds run unlocked
    fcntl = None

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
# How long a process waits for another's build before building beside it (a build takes ~10 s).
LOCK_TIMEOUT = 300.0


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MX_ADAGRAD_CACHE_DIR``, else the user's cache dir."""
    if "MX_ADAGRAD_CACHE_DIR" in os.environ:
        return Path(os.environ["MX_ADAGRAD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mx_adagrad"


def temp_cache_dir() -> Path:
    """The cache of last resort: ``mx_adagrad-<uid>`` in :func:`tempfile.gettempdir`, mode 0700.

    Raises:
      OSError: it cannot be created, or it is not a directory of this user's that no one else can
        write (in a shared temporary directory, another user could have put a library there).
    """
    uid = os.getuid()
    directory = Path(tempfile.gettempdir()) / f"mx_adagrad-{uid}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        raise OSError(f"{directory} is not a directory that only this user can write")
    return directory


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


def library_name(compiler: str) -> str:
    """The cached library's file name for this source, FFI headers, flags, compiler and CPU."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    headers = sorted(Path(jax.ffi.include_dir()).rglob("*.h"))
    key = hashlib.sha256()
    for part in (*SOURCES, *HEADERS, *headers, " ".join(FLAGS), version, _cpu_flags()):
        key.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    return f"mx_adagrad_native_{key.hexdigest()[:16]}.so"


def digest_path(path: Path) -> Path:
    """Where the build of the library at ``path`` records its SHA-256: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A new file beside ``path``, to write and rename onto it; removed if it is left over."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def build(compiler: str, path: Path) -> None:
    """Compiles the sources to the library at ``path``, then records its SHA-256 at
    :func:`digest_path`.

    Each file is written to a temporary file beside its place and renamed onto it, the library
    first: a reader finds either file whole, a library without its digest (or with an older one)
    fails the next load's check, and a library that another process has mapped is never rewritten.

    Raises:
      RuntimeError: the compiler failed.
      OSError: the directory cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary(path) as library:
        command = [
            compiler,
            *FLAGS,
            "-isystem",
            jax.ffi.include_dir(),
            *map(str, SOURCES),
            "-o",
            str(library),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        digest = _sha256(library)
        os.replace(library, path)
    with _temporary(digest_path(path)) as record:
        record.write_text(f"{digest}  {path.name}\n")
        os.replace(record, digest_path(path))


def _load_checked(path: Path) -> ctypes.CDLL | None:
    """The library at ``path``, loaded, if its SHA-256 is the recorded one and ``dlopen`` takes it;
    else None (missing, truncated, overwritten, without its digest, or not a library)."""
    try:
        if digest_path(path).read_bytes().split()[:1] == [_sha256(path).encode()]:
            return ctypes.CDLL(str(path))
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Holds ``fcntl.flock`` on ``<path>.lock`` (released when the file closes, or the process
    dies): other processes building ``path`` wait. Goes on unlocked where locks are unsupported,
    or after ``LOCK_TIMEOUT`` seconds.

    Raises:
      OSError: the directory cannot be created, or the lock file cannot be opened for writing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            except OSError:  # the file system has no locks
                break
        yield


def _load_or_build(compiler: str, path: Path) -> ctypes.CDLL:
    """The library at ``path`` if it passes :func:`_load_checked`, else built there and loaded."""
    library = _load_checked(path)
    if library is None:
        with _build_lock(path):
            library = _load_checked(path)  # built by a process this one waited for
            if library is None:
                build(compiler, path)
                library = ctypes.CDLL(str(path))
    return library


def load_library() -> ctypes.CDLL:
    """The native library from :func:`cache_dir`, built first if missing or failing its check;
    from :func:`temp_cache_dir`, with one warning, if the cache dir cannot be created or written.

    Raises:
      RuntimeError: no compiler, or the build failed.
      OSError: neither directory holds a library that loads or takes one.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++ or c++)")
    name = library_name(compiler)
    try:
        return _load_or_build(compiler, cache_dir() / name)
    except OSError as error:
        problem = error
    try:
        directory = temp_cache_dir()
        library = _load_or_build(compiler, directory / name)
    except OSError as error:
        raise OSError(f"{problem}; and in the temporary cache: {error}") from error
    warnings.warn(
        f"mx_adagrad: the cache dir cannot be used ({problem}); the native CPU kernel is cached "
        f"in {directory} instead (set MX_ADAGRAD_CACHE_DIR to a writable directory)",
        RuntimeWarning,
        stacklevel=3,
    )
    return library
