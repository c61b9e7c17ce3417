"""Comparisons with the bits XLA computed, pinned to the jaxlib they were matched on.

The native kernels (mx_adagrad/_native) repeat the roundings of the XLA programs that jaxlib
PINNED_JAXLIB compiles: where XLA contracts a multiply and an add into one FMA, and the order in
which it sums duplicate rows. That is the compiler's choice, not a contract: another jaxlib may
place one FMA elsewhere, and the results then differ by one rounding without anything being
wrong. So :func:`assert_xla_bits` asks for the same bits on PINNED_JAXLIB (the version in
requirements/constraints.txt, which ``make test`` installs) and, on any other jaxlib, for every
element within 1 ulp (NaN where the other is NaN). Moving the pin means matching the kernels to
the new jaxlib again: ``tests/test_xla_bits.py`` fails when the lock and the pin disagree.
"""

from __future__ import annotations

from typing import Any

import jax
import jaxlib
import numpy as np

PINNED_JAXLIB = "0.10.2"


def bits(x: Any) -> np.ndarray:
    """The array's bit patterns as unsigned integers (complex: two per element)."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        x = x.view(np.finfo(x.dtype).dtype)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def within_one_ulp(actual: Any, expected: Any) -> np.ndarray:
    """Elementwise: equal (+0 == -0), NaN for NaN, or a neighbour in the dtype's number line."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if np.iscomplexobj(expected):
        real = np.finfo(expected.dtype).dtype
        return within_one_ulp(actual.view(real), expected.view(real))
    if expected.dtype.kind in "biu":
        return actual == expected  # integers (row ids) are exact on any jaxlib
    up = np.nextafter(expected, np.array(np.inf, expected.dtype))
    down = np.nextafter(expected, np.array(-np.inf, expected.dtype))
    both_nan = np.isnan(actual) & np.isnan(expected)
    return (actual == expected) | (actual == up) | (actual == down) | both_nan


def assert_xla_bits(actual: Any, expected: Any, exact: bool | None = None) -> None:
    """Same pytree structure, dtypes and shapes, and the same bits on the pinned jaxlib (NaN for
    NaN, whatever its sign and payload; within 1 ulp elsewhere). ``exact`` overrides the version check (for this module's own tests)."""
    if exact is None:
        exact = jaxlib.__version__ == PINNED_JAXLIB
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
        if exact:
            # NaN for NaN: IEEE 754 leaves the sign and payload of a NaN result unspecified,
            # and which operand's NaN an addition keeps follows the operand order the compiler
            # picked for a commutative operation.
            if np.iscomplexobj(x):
                x, y = (z.view(np.finfo(z.dtype).dtype) for z in (x, y))
            nan = np.isnan(x) & np.isnan(y) if x.dtype.kind == "f" else False
            np.testing.assert_array_equal(np.where(nan, 0, bits(x)), np.where(nan, 0, bits(y)))
        else:
            close = within_one_ulp(x, y)
            assert close.all(), (
                f"{np.size(close) - np.count_nonzero(close)} elements more than 1 ulp apart "
                f"on jaxlib {jaxlib.__version__} (bitwise on {PINNED_JAXLIB}): first at "
                f"{np.argwhere(~close)[0].tolist()}, {x[~close][0]!r} vs {y[~close][0]!r}"
            )
