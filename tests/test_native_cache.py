"""The native library's cache under damage, contention and unwritable directories.

Each load runs in a child process, so that one dying of SIGBUS (what ``dlopen`` of a truncated
library did) fails its test rather than pytest. The compiler is ``cxx``, a g++ wrapper that logs
each build to ``$CXX_LOG`` and, with ``$CXX_REPLAY``, writes that file instead of compiling, as a
compiler cache would: the module's fixture compiles the library once, for real, and a rebuild
then costs milliseconds. A rebuild of a damaged library is a cache miss and warns nothing; a cache
dir that cannot be written warns once per process.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mx_adagrad
from mx_adagrad._native import library

CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from mx_adagrad import _native
    native = _native.load()
messages = [str(w.message) for w in caught if "mx_adagrad" in str(w.message)]
print(json.dumps({"native": native, "warnings": messages}))
"""
NO_LOCKS = """
import errno, fcntl
def flock(file, operation):
    raise OSError(errno.ENOLCK, "no locks on this file system")
fcntl.flock = flock
"""
NATIVE = {"native": True, "warnings": []}

CXX = """#!/bin/sh
case "$*" in *--version*) exec {gxx} "$@";; esac
echo "$*" >> "$CXX_LOG"
[ -n "$CXX_REPLAY" ] || exec {gxx} "$@"
while [ "$#" -gt 0 ]; do [ "$1" = -o ] && cp "$CXX_REPLAY" "$2"; shift; done
"""


def environment(tmp_path: Path, cache: Path, cxx: Path, replay: Path | None) -> dict[str, str]:
    """A child's environment: ``cache`` as the cache dir, ``tmp_path/tmp`` as the temporary
    directory, ``cxx`` as the compiler, logging to ``tmp_path/cxx.log`` (and writing ``replay``
    if given)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MX_ADAGRAD_NATIVE"}
    env.update(
        MX_ADAGRAD_CACHE_DIR=str(cache),
        TMPDIR=str(tmp_path / "tmp"),
        CXX=str(cxx),
        CXX_LOG=str(tmp_path / "cxx.log"),
        CXX_REPLAY=str(replay or ""),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(Path(mx_adagrad.__file__).parents[1]),
    )
    return env


# As root, a child that must obey file modes runs without the two capabilities that override
# them (util-linux's setpriv).
_DAC = "-dac_override,-dac_read_search"
OBEY_MODES = (
    ["setpriv", f"--inh-caps={_DAC}", f"--bounding-set={_DAC}"] if os.geteuid() == 0 else []
)


def load(
    env: dict[str, str], prelude: str = "", processes: int = 1, obey_modes: bool = False
) -> list[dict]:
    """``_native.load()`` (after ``prelude``) in ``processes`` children started at once: each
    one's ``{"native": bool, "warnings": [message, ...]}``. With ``obey_modes`` the children
    cannot write where the file modes forbid it, even as root."""
    command = (OBEY_MODES if obey_modes else []) + [sys.executable, "-c", prelude + CHILD]
    children = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate()
        assert child.returncode == 0, (child.returncode, stderr[-3000:])
        results.append(json.loads(stdout.splitlines()[-1]))
    return results


def builds(tmp_path: Path) -> int:
    """How many times the compiler wrapper has built, by its log."""
    log = tmp_path / "cxx.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def cxx(tmp_path_factory) -> Path:
    """The compiler wrapper."""
    path = tmp_path_factory.mktemp("cxx") / "cxx"
    path.write_text(CXX.format(gxx=shutil.which("g++")))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def good(cxx, tmp_path_factory) -> Path:
    """A library built for real, with its digest."""
    root = tmp_path_factory.mktemp("good")
    assert load(environment(root, root / "cache", cxx, replay=None)) == [NATIVE]
    assert builds(root) == 1
    (path,) = (root / "cache").glob("*.so")
    assert library.digest_path(path).exists()
    return path


@pytest.fixture
def cache(good, tmp_path) -> Path:
    """``tmp_path/cache``, holding a copy of the good library and its digest."""
    directory = tmp_path / "cache"
    directory.mkdir()
    for path in (good, library.digest_path(good)):
        shutil.copy2(path, directory / path.name)
    return directory


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def scramble(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def drop_digest(path: Path) -> None:
    library.digest_path(path).unlink()


def wrong_digest(path: Path) -> None:
    library.digest_path(path).write_text(f"{'0' * 64}  {path.name}\n")


def unloadable(path: Path) -> None:
    """Not a library, with its digest recorded: the digest check passes, ``dlopen`` fails."""
    scramble(path)
    library.digest_path(path).write_text(f"{library._sha256(path)}  {path.name}\n")


DAMAGE = {
    f.__name__: f for f in (truncate, zero, scramble, empty, drop_digest, wrong_digest, unloadable)
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_library_is_replaced_by_a_rebuild(damage, cxx, good, cache, tmp_path):
    env = environment(tmp_path, cache, cxx, replay=good)
    path = cache / good.name
    damage(path)
    mapped = tmp_path / "mapped"  # the damaged file, as a process that has it mapped sees it
    os.link(path, mapped)
    damaged = mapped.read_bytes()

    assert load(env) == [NATIVE]
    assert builds(tmp_path) == 1
    assert path.read_bytes() == good.read_bytes()
    assert library.digest_path(path).read_bytes() == library.digest_path(good).read_bytes()
    assert not path.samefile(mapped) and mapped.read_bytes() == damaged  # replaced, not rewritten
    assert sorted(p.name for p in cache.iterdir()) == [
        path.name,
        f"{path.name}.lock",
        f"{path.name}.sha256",
    ]  # no temporary left behind

    inode = path.stat().st_ino
    assert load(env) == [NATIVE]
    assert builds(tmp_path) == 1 and path.stat().st_ino == inode  # loaded as it was


def test_three_cold_starts_at_once_build_once(cxx, good, tmp_path):
    env = environment(tmp_path, tmp_path / "cache", cxx, replay=None)  # a real build, ~10 s
    assert load(env, processes=3) == [NATIVE] * 3
    assert builds(tmp_path) == 1  # the other two waited on the lock, then loaded its library
    (path,) = (tmp_path / "cache").glob("*.so")
    inode = path.stat().st_ino
    assert load(env) == [NATIVE]
    assert builds(tmp_path) == 1 and path.stat().st_ino == inode


def test_without_locks_three_cold_starts_at_once_build_side_by_side(cxx, good, tmp_path):
    env = environment(tmp_path, tmp_path / "cache", cxx, replay=good)
    assert load(env, NO_LOCKS, processes=3) == [NATIVE] * 3
    assert 1 <= builds(tmp_path) <= 3
    built = builds(tmp_path)
    assert load(env, NO_LOCKS) == [NATIVE]
    assert builds(tmp_path) == built


def test_a_stuck_build_lock_is_waited_for_only_lock_timeout(cxx, good, cache, tmp_path):
    env = environment(tmp_path, cache, cxx, replay=good)
    truncate(cache / good.name)
    with open(cache / f"{good.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held by a process that never finishes its build
        timeout = "from mx_adagrad._native import library; library.LOCK_TIMEOUT = 1.0\n"
        assert load(env, timeout) == [NATIVE]
    assert builds(tmp_path) == 1
    assert load(env) == [NATIVE]
    assert builds(tmp_path) == 1


def test_a_good_library_loads_from_a_read_only_cache_without_writing(cxx, good, cache, tmp_path):
    env = environment(tmp_path, cache, cxx, replay=good)
    listing = sorted(cache.iterdir())
    cache.chmod(0o555)
    try:
        assert load(env) == [NATIVE]
    finally:
        cache.chmod(0o755)
    assert builds(tmp_path) == 0 and sorted(cache.iterdir()) == listing  # no lock file either


def assert_cached_in_temp_dir(
    env: dict[str, str], tmp_path: Path, good: Path, obey_modes: bool = False
) -> None:
    """Two loads: the first builds into the temporary cache, the second loads it; each native,
    with one warning naming the temporary cache."""
    temp = tmp_path / "tmp" / f"mx_adagrad-{os.getuid()}"
    for _ in range(2):
        (result,) = load(env, obey_modes=obey_modes)
        assert result["native"] and len(result["warnings"]) == 1
        assert "cache dir cannot be used" in result["warnings"][0]
        assert str(temp) in result["warnings"][0]
        assert builds(tmp_path) == 1
        assert (temp / good.name).read_bytes() == good.read_bytes()
        assert stat.S_IMODE(temp.stat().st_mode) == 0o700


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="root writes to read-only directories, and setpriv is missing to drop that right",
)
def test_a_read_only_cache_with_a_damaged_library_falls_back_to_a_temp_dir(
    cxx, good, cache, tmp_path
):
    truncate(cache / good.name)
    listing = {p.name: p.read_bytes() for p in cache.iterdir()}
    cache.chmod(0o555)
    try:
        env = environment(tmp_path, cache, cxx, replay=good)
        assert_cached_in_temp_dir(env, tmp_path, good, obey_modes=True)
    finally:
        cache.chmod(0o755)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == listing


def test_a_cache_dir_that_cannot_be_created_falls_back_to_a_temp_dir(cxx, good, tmp_path):
    (tmp_path / "file").write_text("a file where the cache dir's parent should be")
    env = environment(tmp_path, tmp_path / "file" / "cache", cxx, replay=good)
    assert_cached_in_temp_dir(env, tmp_path, good)


def test_a_temp_dir_others_can_write_is_refused_for_the_xla_path(cxx, good, tmp_path):
    (tmp_path / "file").write_text("a file where the cache dir's parent should be")
    env = environment(tmp_path, tmp_path / "file" / "cache", cxx, replay=good)
    temp = tmp_path / "tmp" / f"mx_adagrad-{os.getuid()}"
    temp.mkdir(parents=True)
    temp.chmod(0o777)
    (result,) = load(env)
    assert not result["native"] and len(result["warnings"]) == 1
    assert "native CPU kernel is unavailable" in result["warnings"][0]
    assert "only this user can write" in result["warnings"][0]
    assert builds(tmp_path) == 0 and list(temp.iterdir()) == []
