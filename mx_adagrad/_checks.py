"""Argument validation shared by every public entry point.

Every message has one shape, ``mx_adagrad.<where>: <argument> must be <expected>, got <value>``, and
every check runs at construction or at the first ``init``/``update``, on concrete values. Values that
are still abstract (tracers inside ``jax.jit`` or ``optax.inject_hyperparams``) are let through: they
were checked when they were concrete, or they are the user's own traced arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def fail(where: str, name: str, expected: str, value: Any) -> None:
    """Raises the one ValueError shape used across the package."""
    raise ValueError(f"mx_adagrad.{where}: {name} must be {expected}, got {value!r}")


class shown(str):
    """A description to show as is in an error message (its repr has no quotes)."""

    def __repr__(self) -> str:
        return str(self)


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is a concrete real scalar, else None (traced,
    array, or complex with a nonzero imaginary part; ``optax.inject_hyperparams`` stores real
    hyperparameters as complex numbers when the params are complex)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # anything numpy cannot read is not a concrete scalar
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    if np.iscomplexobj(array):
        return float(array.real) if array.imag == 0 else None
    return float(array)


def _scalar(where: str, name: str, value: Any) -> float | None:
    """The value as a float if concrete, None if traced; fails for anything but a real scalar."""
    if isinstance(value, jax.core.Tracer):
        return None
    number = concrete_float(value)
    if number is None:
        fail(where, name, "a real scalar", value)
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


def boolean(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(where, name, "a bool", value)


def one_of(where: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        fail(where, name, "one of " + ", ".join(repr(c) for c in choices), value)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_paths(tree: Any) -> list[str]:
    """The ``"/"``-joined key path of every leaf of ``tree``, in ``jax.tree.leaves`` order.

    Dict keys, attribute names and sequence indices are joined with ``"/"``:
    ``{"params": {"Dense_0": {"kernel": w}}}`` has the one path ``"params/Dense_0/kernel"``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)
    return ["/".join(_key_name(key) for key in path) for path, _ in flat]


class SparseLeaf:
    """Base of the sparse gradient leaves (:class:`mx_adagrad.RowSparse`, :class:`mx_adagrad.BagGrad`):
    pytree nodes that stand for one dense array of shape ``dense_shape``, taken whole by every
    tree map of the package. Defined here, so that checks need not import the modules that
    define the leaves."""

    dense_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape, so shape checks treat the leaf like the parameter it updates."""
        return self.dense_shape


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is one of the package's sparse gradient leaves."""
    return isinstance(x, SparseLeaf)


def structure(tree: Any) -> Any:
    """The tree structure with every sparse gradient counted as one leaf."""
    return jax.tree.structure(tree, is_leaf=is_sparse)


def leaves(tree: Any) -> list[Any]:
    """The leaves, with every sparse gradient counted as one leaf."""
    return jax.tree.leaves(tree, is_leaf=is_sparse)


def same_structure(
    where: str,
    name: str,
    tree: Any,
    reference_name: str,
    reference: Any,
    shape_of: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape,
) -> None:
    """Checks that ``tree`` has ``reference``'s structure and that ``shape_of`` of each leaf's
    shape is the reference leaf's shape (``shape_of``: identity; a row-wise history's is the
    number of rows); names the first bad path."""
    if structure(tree) != structure(reference):
        paths, reference_paths = leaf_paths(tree), leaf_paths(reference)
        missing = [p for p in reference_paths if p not in paths]
        extra = [p for p in paths if p not in reference_paths]
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {extra[:4]}" if extra else "",
            )
            if part
        )
        fail(
            where,
            name,
            f"a pytree with the structure of {reference_name}",
            shown(detail) if detail else structure(tree),
        )
    for path, leaf, reference_leaf in zip(leaf_paths(reference), leaves(tree), leaves(reference)):
        if shape_of(np.shape(leaf)) != np.shape(reference_leaf):
            expected = (
                f"of shape {np.shape(reference_leaf)} like {reference_name}"
                if shape_of(np.shape(leaf)) == np.shape(leaf)
                else f"an array of {np.shape(reference_leaf)[0]} rows like {reference_name}"
            )
            fail(where, f"{name}[{path!r}]", expected, shown(f"shape {np.shape(leaf)}"))


def floating(where: str, name: str, tree: Any) -> None:
    """Checks that every leaf of ``tree`` has a floating dtype, real or complex (AdaGrad cannot
    update integers)."""
    for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree)):
        if not jax.numpy.issubdtype(jax.numpy.result_type(leaf), jax.numpy.inexact):
            fail(
                where,
                f"{name}[{path!r}]",
                "a floating-point array (real or complex)",
                shown(f"dtype {leaf.dtype}"),
            )


def require_params(where: str, params: Any) -> None:
    """Transformations that read the weights say so when ``update`` is called without them."""
    if params is None:
        raise ValueError(
            f"mx_adagrad.{where}: params must be passed to update(updates, state, params) "
            "(this transformation reads the current parameter values), got None"
        )
