"""Argument validation shared by every public entry point.

Every message has one shape, ``mx_adagrad.<where>: <argument> must be <expected>, got <value>``, and
every check runs at construction or at the first ``init``/``update``, on concrete values. Values that
are still abstract (tracers inside ``jax.jit`` or ``optax.inject_hyperparams``) are let through: they
were checked when they were concrete, or they are the user's own traced arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def fail(where: str, name: str, expected: str, value: Any) -> None:
    """Raises the one ValueError shape used across the package."""
    raise ValueError(f"mx_adagrad.{where}: {name} must be {expected}, got {value!r}")


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is a concrete scalar, else None (traced or array)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # anything numpy cannot read is not a concrete scalar
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array)


def _scalar(where: str, name: str, value: Any) -> float | None:
    if isinstance(value, bool) or isinstance(value, str):
        fail(where, name, "a real number", value)
    number = concrete_float(value)
    if number is None and not isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0:
            fail(where, name, "a scalar", value)
    return number


def finite(where: str, name: str, value: Any) -> None:
    number = _scalar(where, name, value)
    if number is not None and not math.isfinite(number):
        fail(where, name, "finite", value)


def non_negative(where: str, name: str, value: Any) -> None:
    number = _scalar(where, name, value)
    if number is not None and not number >= 0:
        fail(where, name, ">= 0", value)


def positive(where: str, name: str, value: Any) -> None:
    number = _scalar(where, name, value)
    if number is not None and not number > 0:
        fail(where, name, "> 0", value)


def integer(where: str, name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        fail(where, name, "an int", value)
    if minimum is not None and value < minimum:
        fail(where, name, f"an int >= {minimum}", value)


def one_of(where: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        fail(where, name, "one of " + ", ".join(repr(c) for c in choices), value)
