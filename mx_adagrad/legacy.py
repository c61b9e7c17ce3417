"""MXNet 1.x's AdaGrad (1.9.1, the releases most people ran): epsilon inside the square root and
weight decay outside the history.

::

    g = clip(grad * rescale_grad, clip_gradient)
    history += square(g)
    weight -= lr * (g / sqrt(history + eps) + wd * weight)

The same five transforms as :func:`mx_adagrad.adagrad`, in another order and with
``eps_inside_sqrt=True``. Row-sparse gradients use the same formula and refuse ``wd != 0``, as
MXNet 1.9.1's ``sparse.adagrad_update`` does. With ``param_idx2name``, :class:`AdaGrad` gives names
that end in neither ``_weight`` nor ``_gamma`` a weight-decay multiplier of 0, as MXNet 1.9.1.
"""

from __future__ import annotations

from typing import Any

import chex
import optax

from mx_adagrad import _checks, alias, compat, multipliers, precision, transforms
from mx_adagrad.alias import resolve_learning_rate
from mx_adagrad.lr_scheduler import LRScheduler


def adagrad(
    learning_rate: transforms.LearningRate | None = 0.01,
    eps: chex.Numeric = 1e-7,
    *,
    rescale_grad: chex.Numeric = 1.0,
    clip_gradient: chex.Numeric | None = None,
    wd: chex.Numeric = 0.0,
    lr_mult: multipliers.MultiplierSpec = None,
    wd_mult: multipliers.MultiplierSpec = None,
    lr_scheduler: LRScheduler | None = None,
    begin_num_update: int = 0,
    initial_accumulator_value: chex.Numeric = 0.0,
    multi_precision: bool = False,
    sparse_wd: str = "error",
) -> optax.GradientTransformation:
    """MXNet 1.9.1's ``mx.optimizer.AdaGrad`` as an optax gradient transformation.

    ::

        g = clip(rescale_grad * grad, clip_gradient)
        history = history + g**2
        weight = weight - lr * lr_mult * (g / sqrt(history + eps) + wd * wd_mult * weight)

    It is ``optax.chain(rescale, clip, scale_by_adagrad(eps, eps_inside_sqrt=True),
    add_decayed_weights, scale_by_schedule)``. Arguments as :func:`mx_adagrad.adagrad`, with
    MXNet 1.x's ``eps`` (default 1e-7, MXNet's ``float_stable_eps``). RowSparse gradients refuse
    ``wd * wd_mult != 0``, as MXNet 1.9.1 (``sparse_wd="lazy"`` decays their rows instead).
    The division is one IEEE division, ``g / sqrt(history + eps)``, as MXNet's; ``flat.one_pass``
    of it is its one-pass step.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.legacy.adagrad(learning_rate=0.1, wd=0.1)
      >>> w = jnp.array([1.0])
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(w), w)
      >>> mx_adagrad.apply_updates(w, u)   # 1 - 0.1 * (3 / sqrt(9 + 1e-7) + 0.1 * 1)
      Array([0.89], dtype=float32)
    """
    arguments = dict(locals())
    arguments["learning_rate"] = resolve_learning_rate(
        "legacy.adagrad", learning_rate, lr_scheduler
    )
    del arguments["lr_scheduler"]
    _checks.boolean("legacy.adagrad", "multi_precision", multi_precision)
    chain = optax.chain(
        transforms.rescale(rescale_grad),
        transforms.clip(clip_gradient),
        transforms.scale_by_adagrad(eps, initial_accumulator_value, eps_inside_sqrt=True),
        transforms.add_decayed_weights(wd, wd_mult, sparse_wd),
        transforms.scale_by_schedule(arguments["learning_rate"], lr_mult, begin_num_update),
    )
    tx = precision.multi_precision(chain) if multi_precision else chain
    return alias.record(tx, "legacy.adagrad", adagrad, **arguments)


class AdaGrad(compat.Mxnet1Optimizer):
    """MXNet 1.9.1's ``mxnet.optimizer.AdaGrad``, with the Optimizer API of :class:`mx_adagrad.AdaGrad`.

    Args:
      eps: 1e-7, inside the square root (MXNet 1.x's ``float_stable_eps``).
      **kwargs: MXNet's Optimizer arguments (``learning_rate``, ``rescale_grad``, ``wd``,
        ``clip_gradient``, ``lr_scheduler``, ``begin_num_update``, ``multi_precision``,
        ``param_idx2name``, ``param_dict``, ...).

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> opt = mx_adagrad.legacy.AdaGrad(learning_rate=0.1)
      >>> weights, grads = [jnp.ones(1)], [jnp.full(1, 3.0)]
      >>> states = [opt.create_state(0, weights[0])]
      >>> _ = opt.update([0], weights, grads, states)
      >>> weights[0]
      Array([0.9], dtype=float32)
    """

    _where = "legacy.AdaGrad"

    def __init__(self, eps: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(eps, **kwargs)

    @staticmethod
    def _transform(epsilon: Any, **hyper: Any) -> optax.GradientTransformation:
        # The Optimizer has refused row_sparse decay already, with the concrete values.
        return adagrad(learning_rate=1.0, eps=epsilon, wd=1.0, sparse_wd="lazy", **hyper)
