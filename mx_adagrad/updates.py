"""``apply_updates``: adds the optimizer's updates to the parameters."""

from __future__ import annotations

import optax


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
    """Returns ``params + updates``, leaf by leaf, in each parameter's own dtype.

    ::

        weight = (weight + update).astype(weight.dtype)

    The sum is taken in the promoted dtype, so the float32 updates of ``multi_precision=True`` land
    a float16/bfloat16 weight on its float32 master copy. For dense leaves this is
    ``optax.apply_updates``.

    Args:
      params: the parameters.
      updates: the updates from an mx_adagrad (or any optax) transformation.

    Returns:
      The new parameters, with the structure and dtypes of ``params``.
    """
    return optax.apply_updates(params, updates)
