"""``apply_updates``: adds the optimizer's updates to the parameters."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from mx_adagrad import _checks, sparse


def apply_update(param: chex.Array | None, update: Any) -> chex.Array | None:
    """One leaf of :func:`apply_updates`."""
    if param is None:
        return None
    if _checks.is_sparse(update):
        return sparse.add(param, update)
    return jnp.asarray(param + update).astype(jnp.asarray(param).dtype)


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
    """Returns ``params + updates``, leaf by leaf, in each parameter's own dtype.

    ::

        weight = (weight + update).astype(weight.dtype)          # dense update
        weight[ids] = (weight[ids] + rows).astype(weight.dtype)  # RowSparse update: rows only

    The sum is taken in the promoted dtype, so the float32 updates of ``multi_precision=True`` land
    a float16/bfloat16 weight on its float32 master copy. For dense leaves this is
    ``optax.apply_updates``; a :class:`~mx_adagrad.RowSparse` update writes its rows only (in
    place when ``params`` are donated under ``jax.jit``), leaving every other row bit-identical.

    Args:
      params: the parameters.
      updates: the updates from an mx_adagrad (or any optax) transformation.

    Returns:
      The new parameters, with the structure and dtypes of ``params``.

    Raises:
      ValueError: a complex update for a real parameter (its imaginary part would be dropped).
    """
    if _checks.structure(updates) == _checks.structure(params):  # else map_leaves says so
        _refuse_complex_updates_of_real_params(updates, params)
    return sparse.map_leaves(lambda u, p: apply_update(p, u), updates, params)


def _refuse_complex_updates_of_real_params(updates: optax.Updates, params: optax.Params) -> None:
    """Adding a complex update to a real parameter would drop its imaginary part."""
    for path, u, p in zip(
        _checks.leaf_paths(updates), _checks.leaves(updates), jax.tree.leaves(params)
    ):
        if jnp.iscomplexobj(u) and not jnp.iscomplexobj(p):
            _checks.fail(
                "apply_updates",
                f"updates[{path!r}]",
                f"real for the real parameter of dtype {jnp.result_type(p)}",
                _checks.shown(f"dtype {u.dtype}"),
            )
