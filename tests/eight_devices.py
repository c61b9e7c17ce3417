"""Checks that need 8 CPU devices, run in one child process per test module.

The device count of the CPU backend is fixed by ``XLA_FLAGS`` before JAX starts, and the suite
shares one process with one device. A test module registers its checks on a :class:`Checks`,
calls :meth:`Checks.main` under ``if __name__ == "__main__"``, and has one parametrized test that
reads the report: the child process (``python -m <module> REPORT`` with
``--xla_force_host_platform_device_count=8``) records each check's traceback, or ``None``, in a
JSON file, and ``test_on_8_cpu_devices[<check>]`` fails with that traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8
COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute|collective-broadcast|reduce-scatter)"
    r"(-start)?\("
)


class Checks:
    """The 8-device checks of one test module."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.functions: dict[str, Callable[[], None]] = {}

    def __call__(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Registers ``fn`` (a decorator)."""
        self.functions[fn.__name__] = fn
        return fn

    def report(self, directory: Path, timeout: float = 300) -> dict[str, str | None]:
        """Runs every check once in a child process with 8 CPU devices; returns its report."""
        path = directory / "report.json"
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
            "JAX_PLATFORMS": "cpu",
        }
        try:
            child = subprocess.run(
                [sys.executable, "-m", self.module, str(path)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"the {DEVICES}-device child timed out after {timeout} s:\n{error.stderr}")
        if child.returncode != 0 or not path.exists():
            pytest.fail(
                f"the {DEVICES}-device child process failed (exit {child.returncode}):\n"
                f"{child.stdout}\n{child.stderr}"
            )
        return json.loads(path.read_text())

    def main(self, report_path: str) -> None:
        """The child process: runs every check and writes ``{name: traceback or None}``."""
        results = {}
        for name, fn in self.functions.items():
            try:
                fn()
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
        Path(report_path).write_text(json.dumps(results, indent=2))


def assert_passed(report: dict[str, str | None], name: str) -> None:
    assert name in report, f"the child process did not run {name}"
    if report[name] is not None:
        pytest.fail(f"{name} failed on {DEVICES} CPU devices:\n{report[name]}", pytrace=False)


def meshes(shape: tuple[int, ...], names: tuple[str, ...]) -> Iterator[Mesh]:
    """The same mesh with ``Explicit`` axes (``jax.make_mesh``'s default) and ``Auto`` axes."""
    assert jax.device_count() == DEVICES, f"expected {DEVICES} devices, got {jax.devices()}"
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        yield jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def collectives(compiled) -> list[str]:
    """The collective operations of a compiled program's HLO."""
    return [match.group(0) for match in COLLECTIVE.finditer(compiled.as_text())]


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4}
_BYTES.update({"f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?) ", re.M)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _bytes(hlo_type: str) -> int:
    """The bytes of an HLO type: an array ``f32[16,64]{1,0}`` or a tuple of them."""
    return sum(
        _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in _ARRAY.findall(hlo_type)
    )


def collective_bytes(compiled) -> dict[str, int]:
    """Bytes per device of each kind of collective in a compiled program: the operand bytes of
    every reduce-scatter (what each device contributes), the result bytes of the others (what
    each device receives, its own part included; an all-reduce's result is its operand)."""
    text = compiled.as_text()
    types = {name: hlo_type for name, hlo_type in _DEFINITION.findall(text)}
    totals: dict[str, int] = {}
    for line in text.splitlines():
        match = COLLECTIVE.search(line)
        definition = _DEFINITION.match(line)
        if not match or not definition:
            continue
        kind = match.group(1)
        if kind == "reduce-scatter":
            operands = line[match.end() :].split(")", 1)[0]
            size = sum(_bytes(types[name]) for name in re.findall(r"%([\w.-]+)", operands))
        else:
            size = _bytes(definition.group(2))
        totals[kind] = totals.get(kind, 0) + size
    return totals


def native_calls(compiled) -> list[str]:
    """The dense one-pass step kernels' custom calls in a compiled program's HLO."""
    return re.findall(
        r'custom_call_target="(mx_adagrad_(?:rowwise_)?step_\w+)"', compiled.as_text()
    )


def sharded_params(mesh: Mesh) -> dict[str, jax.Array]:
    """float32 leaves split over both axes of a ("data", "model") mesh, over one, or replicated,
    and a bfloat16 leaf."""
    rng = np.random.default_rng(0)
    specs = {
        "kernel": ((16, 8), jnp.float32, P("data", "model")),
        "rows": ((32, 4), jnp.float32, P("data")),
        "bias": ((8,), jnp.float32, P()),
        "half": ((8, 16), jnp.bfloat16, P(None, "model")),
    }
    return {
        name: jax.device_put(jnp.asarray(rng.normal(size=shape), dtype), NamedSharding(mesh, spec))
        for name, (shape, dtype, spec) in specs.items()
    }
