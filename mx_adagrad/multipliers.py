"""Per-parameter multipliers: MXNet's ``lr_mult`` and ``wd_mult`` for pytrees of parameters.

MXNet looks multipliers up by parameter index or name (``set_lr_mult({'fc1_weight': 0.5})``).
Here a multiplier spec is resolved against the pytree of parameters into one number per leaf:

* ``None``: every leaf gets 1.0;
* a pytree with the parameters' structure: taken leaf for leaf;
* a callable ``tree -> pytree``: called with the parameters (or the updates, which share their
  structure); it must depend on structure, names, shapes and dtypes only, as optax's mask callables;
* a dict ``{path: multiplier}``: ``path`` joins dict keys, attribute names and sequence indices with
  ``"/"`` (``{"params": {"Dense_0": {"kernel": w}}}`` has the path ``"params/Dense_0/kernel"``). A
  path names one leaf or a whole subtree; the longest matching path wins; leaves no path names
  get 1.0; a path that names nothing is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax

from mx_adagrad import _checks

MultiplierSpec = chex.ArrayTree | Callable[[chex.ArrayTree], chex.ArrayTree] | Mapping | None


def _check_value(where: str, name: str, path: str, value: Any) -> None:
    _checks.finite(where, f"{name}[{path!r}]", value)
    _checks.non_negative(where, f"{name}[{path!r}]", value)


def _from_paths(where: str, name: str, spec: Mapping, tree: chex.ArrayTree) -> chex.ArrayTree:
    paths = _checks.leaf_paths(tree)
    for key in spec:
        if not isinstance(key, str):
            _checks.fail(where, name, "a pytree like the parameters or a dict {path: value}", spec)
        if not any(path == key or path.startswith(key + "/") for path in paths):
            shown = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
            _checks.fail(where, f"{name} path {key!r}", f"the path of a parameter ({shown})", key)
        _check_value(where, name, key, spec[key])

    def lookup(path: str) -> Any:
        matches = [key for key in spec if path == key or path.startswith(key + "/")]
        return spec[max(matches, key=len)] if matches else 1.0

    return jax.tree.unflatten(_checks.structure(tree), [lookup(path) for path in paths])


def resolve(where: str, name: str, spec: MultiplierSpec, tree: chex.ArrayTree) -> chex.ArrayTree:
    """Returns one multiplier per leaf of ``tree`` (a pytree with ``tree``'s structure).

    Args:
      where: the public function resolving it, for error messages.
      name: the argument's name (``"lr_mult"`` or ``"wd_mult"``), for error messages.
      spec: ``None``, a pytree like ``tree``, a callable ``tree -> pytree`` or a dict ``{path: value}``.
      tree: the parameters, or anything with their structure (updates).

    Returns:
      A pytree with ``tree``'s structure whose leaves are the multipliers.
    """
    structure = _checks.structure(tree)
    if spec is None:
        return jax.tree.unflatten(structure, [1.0] * structure.num_leaves)
    if callable(spec):
        # A RowSparse gradient stands in as its dense shape and dtype (what the callable reads).
        spec = spec(
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _checks.is_sparse(x) else x,
                tree,
                is_leaf=_checks.is_sparse,
            )
        )
    if jax.tree.structure(spec) == structure:
        for path, value in zip(_checks.leaf_paths(tree), jax.tree.leaves(spec)):
            _check_value(where, name, path, value)
        return spec
    if isinstance(spec, Mapping):
        return _from_paths(where, name, spec, tree)
    _checks.fail(
        where,
        name,
        f"a pytree with the parameters' structure {structure}, a callable or a dict {{path: value}}",
        spec,
    )
