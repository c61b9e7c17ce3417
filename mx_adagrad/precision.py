"""MXNet's ``multi_precision``: float32 master weights for float16 and bfloat16 parameters.

MXNet keeps, for every float16 weight, a float32 copy and a float32 optimizer state; the gradient
is cast to float32, the step runs on the copy, and the weight becomes the copy cast back::

    master = master + step(float32(grad), state, master)
    weight = master.astype(weight.dtype)

:func:`multi_precision` wraps any transformation that way (MXNet covers float16; bfloat16 gets the
same treatment here). Leaves of other dtypes pass through to the inner transformation unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mx_adagrad import _checks, sparse
from mx_adagrad.updates import apply_update

LOW_PRECISION_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


class MultiPrecisionState(NamedTuple):
    """State of :func:`multi_precision`.

    Attributes:
      master: a float32 copy of every float16/bfloat16 parameter; ``None`` for the other leaves.
      inner_state: the wrapped transformation's state, built on the float32 copies.
    """

    master: optax.Params
    inner_state: optax.OptState


def _is_none(x) -> bool:
    return x is None


def _working_params(params: optax.Params, master: optax.Params) -> optax.Params:
    """The parameters the inner transformation sees: the master copy where there is one."""
    return jax.tree.map(lambda p, m: p if m is None else m, params, master, is_leaf=_is_none)


def multi_precision(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on float32 master copies of the float16 and bfloat16 parameters.

    ::

        master = float32(weight)                            # at init, low-precision leaves only
        u, state = inner.update(float32(grad), state, master)
        master = master + u
        update = float32(master.astype(weight.dtype)) - float32(weight)

    The returned update is float32, so ``apply_updates`` (mx_adagrad's or optax's, which both add in
    the promoted dtype and cast back) leaves ``weight == master.astype(weight.dtype)``. That equality
    is exact whenever the float32 difference is: always, unless a weight shrinks by a factor of more
    than 2**13 (float16) or 2**16 (bfloat16) in one step, where it can be one low-precision ulp off;
    the master copy stays exact either way and the next step starts from it.

    MXNet equivalent: ``multi_precision=True`` (``create_state_multi_precision``,
    ``update_multi_precision``).

    Args:
      inner: the transformation to run in float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`MultiPrecisionState`.
      Its ``update`` needs ``params``; extra keyword arguments go to ``inner`` (as ``optax.chain``
      passes them).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        master = jax.tree.map(
            lambda p: p.astype(jnp.float32) if p.dtype in LOW_PRECISION_DTYPES else None, params
        )
        return MultiPrecisionState(master, inner.init(_working_params(params, master)))

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params("multi_precision", params)
        _checks.same_structure("multi_precision", "updates", updates, "params", params)
        grads = sparse.map_leaves(
            lambda g, m: g if m is None else sparse.on_rows(lambda v: v.astype(jnp.float32), g),
            updates,
            state.master,
        )
        steps, inner_state = inner.update(
            grads, state.inner_state, _working_params(params, state.master), **extra_args
        )
        master = sparse.map_leaves(
            lambda u, m: None if m is None else apply_update(m, u), steps, state.master
        )

        def low_precision_step(u, p, m):
            def difference(_, master, weight):
                return master.astype(weight.dtype).astype(jnp.float32) - weight.astype(jnp.float32)

            return u if m is None else sparse.on_rows(difference, u, m, p)

        updates = sparse.map_leaves(low_precision_step, steps, params, master)
        return updates, MultiPrecisionState(master, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
