"""MXNet 1.x's contributed AdaGrad, ``mx.optimizer.contrib.GroupAdaGrad``: one accumulator per row.

::

    g = clip(rescale_grad * grad, clip_gradient)
    history = history + mean(g**2, axis=1, keepdims=True)      # history: (rows, 1)
    weight = weight - lr * lr_mult * g / sqrt(history + eps)   # eps = 1e-5, inside the root

MXNet's word-embedding and recommendation scripts train sparse embeddings with it
(``Trainer(..., 'groupadagrad')``). It is :func:`mx_adagrad.rowwise_adagrad` (TorchRec's row-wise
AdaGrad) with epsilon inside the root, without weight decay, and with MXNet's ``(rows, 1)``
history: the same transforms, :func:`~mx_adagrad.scale_by_rowwise_adagrad` with
``eps_inside_sqrt=True, keepdims=True``. Only 2-D weights; a row-sparse gradient updates its rows
only (MXNet's ``contrib.group_adagrad_update``).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from mx_adagrad import _checks, alias, compat, multipliers, precision, transforms
from mx_adagrad.lr_scheduler import LRScheduler

__all__ = ["GroupAdaGrad", "group_adagrad"]

_NO_DECAY = "0: GroupAdaGrad has no weight decay (MXNet asserts wd == 0 at its first update)"


def _two_dimensional(where: str, params: Any) -> None:
    """GroupAdaGrad's weights are tables: refuses any other shape, naming the leaf."""
    for path, leaf in zip(_checks.leaf_paths(params), jax.tree.leaves(params)):
        if jnp.ndim(leaf) != 2:
            _checks.fail(
                where,
                f"params{path and '[' + repr(path) + ']'}",
                "2-D weights (MXNet's GroupAdaGrad keeps one history number per row)",
                _checks.shown(f"shape {tuple(jnp.shape(leaf))}"),
            )


def group_adagrad(
    learning_rate: transforms.LearningRate | None = 0.01,
    epsilon: chex.Numeric = 1e-5,
    *,
    rescale_grad: chex.Numeric = 1.0,
    clip_gradient: chex.Numeric | None = None,
    wd: float | None = None,
    lr_scheduler: LRScheduler | None = None,
    begin_num_update: int = 0,
    lr_mult: multipliers.MultiplierSpec = None,
    multi_precision: bool = False,
) -> optax.GradientTransformation:
    """MXNet 1.x's ``mx.optimizer.contrib.GroupAdaGrad`` as an optax gradient transformation.

    ::

        g = clip(rescale_grad * grad, clip_gradient)
        history = history + mean(g**2, axis=1, keepdims=True)
        weight = weight - learning_rate * lr_mult * g / sqrt(history + epsilon)

    It is ``optax.chain(rescale, clip, scale_by_rowwise_adagrad(epsilon, eps_inside_sqrt=True,
    keepdims=True), scale_by_schedule)``: :func:`mx_adagrad.rowwise_adagrad` with epsilon inside
    the root (TorchRec's is outside) and no weight decay. The state holds one ``(rows, 1)``
    history per weight, as MXNet's ``create_state``. Gradients may be dense,
    :class:`~mx_adagrad.RowSparse` (only their rows are read and written, as MXNet's
    ``contrib.group_adagrad_update``) or :class:`~mx_adagrad.BagGrad`.
    ``mx_adagrad.flat.one_pass`` of it is its one-pass step.

    Args:
      learning_rate: a number >= 0, an optax schedule, or ``None`` to take the ``base_lr`` of
        ``lr_scheduler`` (as in :func:`mx_adagrad.adagrad`).
      epsilon: added to the history under the root, >= 0 (MXNet ``eps``, default 1e-5).
      rescale_grad: gradient multiplier, finite (Gluon: ``1 / batch_size``).
      clip_gradient: elementwise clipping bound, > 0, or ``None``.
      wd: ``None`` or a concrete 0: GroupAdaGrad has no weight decay (MXNet fails at its first
        update, with a bare assert; here the construction raises).
      lr_scheduler: an :mod:`mx_adagrad.lr_scheduler` scheduler, called with MXNet's
        ``num_update = begin_num_update + n`` on the n-th update.
      begin_num_update: the update count to resume from, >= 0.
      lr_mult: per-parameter learning-rate multipliers (pytree, callable or ``{path: value}``).
      multi_precision: keep float32 master weights and history for float16/bfloat16 weights.

    Returns:
      An ``optax.GradientTransformation``; its ``init`` refuses weights that are not 2-D.

    Raises:
      ValueError: at construction for a bad argument or ``wd != 0``; at ``init`` for a weight
        that is not 2-D.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.contrib.group_adagrad(learning_rate=0.1, epsilon=0.0)
      >>> table = jnp.ones((2, 2))
      >>> state = tx.init(table)
      >>> state[2].history.shape                     # one accumulator per row, as MXNet
      (2, 1)
      >>> updates, state = tx.update(jnp.array([[3.0, 4.0], [1.0, 1.0]]), state)
      >>> state[2].history[:, 0]                     # mean of each row's squares
      Array([12.5,  1. ], dtype=float32)
    """
    arguments = dict(locals())
    where = "contrib.group_adagrad"
    arguments["learning_rate"] = alias.resolve_learning_rate(where, learning_rate, lr_scheduler)
    del arguments["lr_scheduler"]
    _checks.boolean(where, "multi_precision", multi_precision)
    if wd is not None and _checks.concrete_float(wd) != 0.0:
        _checks.fail(where, "wd", _NO_DECAY, wd)
    chain = optax.chain(
        transforms.rescale(rescale_grad),
        transforms.clip(clip_gradient),
        transforms.scale_by_rowwise_adagrad(epsilon, eps_inside_sqrt=True, keepdims=True),
        transforms.scale_by_schedule(arguments["learning_rate"], lr_mult, begin_num_update),
    )
    tx = precision.multi_precision(chain) if multi_precision else chain

    def init_fn(params):
        _two_dimensional(where, params)
        return tx.init(params)

    checked = optax.GradientTransformation(init_fn, tx.update)
    return alias.record(checked, "contrib.group_adagrad", group_adagrad, **arguments)


class GroupAdaGrad(compat.Mxnet1Optimizer):
    """MXNet 1.x's ``mx.optimizer.contrib.GroupAdaGrad``, with the Optimizer API of
    :class:`mx_adagrad.AdaGrad` (``create_state``, ``update``, ``step``, ``fused_step``,
    ``set_lr_mult``, ...).

    ::

        grad = clip(grad * rescale_grad, clip_gradient)
        history += mean(square(grad), axis=1, keepdims=True)
        weight -= lr * grad / sqrt(history + eps)

    Args:
      eps: 1e-5, inside the square root.
      **kwargs: MXNet's Optimizer arguments (``learning_rate``, ``rescale_grad``,
        ``clip_gradient``, ``lr_scheduler``, ``begin_num_update``, ``multi_precision``,
        ``param_idx2name``, ``param_dict``, ...). As in MXNet, every parameter's weight decay
        ``wd * wd_mult`` must be 0 when it is updated (a ``wd`` masked to 0 by
        ``param_idx2name``'s ``_weight``/``_gamma`` rule or ``set_wd_mult`` is accepted): the
        update raises a ValueError naming the index before any weight changes (MXNet fails with
        a bare assert).

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> opt = mx_adagrad.contrib.GroupAdaGrad(learning_rate=0.1, eps=0.0)
      >>> weights, grads = [jnp.ones((1, 2))], [jnp.array([[3.0, 4.0]])]
      >>> states = [opt.create_state(0, weights[0])]
      >>> states[0].shape
      (1, 1)
      >>> _ = opt.update([0], weights, grads, states)
      >>> weights[0]                    # 1 - 0.1 * g / sqrt(12.5)
      Array([[0.9151472 , 0.88686293]], dtype=float32)
    """

    _where = "contrib.GroupAdaGrad"

    def __init__(self, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(eps, **kwargs)

    def create_state(self, index: Any, weight: jax.Array) -> jax.Array:
        """The history of one weight: zeros of shape ``(rows, 1)`` in its dtype, as MXNet."""
        _two_dimensional(self._where, {str(index): weight})
        return jnp.zeros((jnp.shape(weight)[0], 1), jnp.result_type(weight))

    def _hyperparameters(self, indices: list, grads: list) -> tuple[list[float], list[float]]:
        """As every Optimizer's, then MXNet's refusal of a parameter whose weight decay
        (``wd * wd_mult``, after ``param_idx2name``'s masks) is not 0, before anything is
        updated."""
        lrs, wds = super()._hyperparameters(indices, grads)
        for index, wd in zip(indices, wds):
            if wd != 0.0:
                _checks.fail(self._where, f"wd * wd_mult of index {index!r}", _NO_DECAY, wd)
        return lrs, wds

    @staticmethod
    def _transform(epsilon: Any, wd_mult: Any, **hyper: Any) -> optax.GradientTransformation:
        del wd_mult  # all 0: there is no weight decay
        return group_adagrad(learning_rate=1.0, epsilon=epsilon, **hyper)
