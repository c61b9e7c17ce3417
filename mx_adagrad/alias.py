"""``adagrad(...)``: MXNet 2.0's AdaGrad optimizer as one chain of the five transforms, and
``rowwise_adagrad(...)``, the same chain with one accumulator per row."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import optax

from mx_adagrad import _checks, multipliers, precision, transforms
from mx_adagrad.lr_scheduler import LRScheduler


def resolve_learning_rate(
    where: str, learning_rate: transforms.LearningRate | None, lr_scheduler: LRScheduler | None
) -> transforms.LearningRate:
    """MXNet's rule for ``learning_rate`` next to ``lr_scheduler``.

    Without a scheduler the learning rate is used as given. With one, ``learning_rate=None`` keeps
    the scheduler's ``base_lr``; any other value replaces it (MXNet warns and assigns
    ``lr_scheduler.base_lr = learning_rate``; here the scheduler is copied, never mutated).
    """
    if lr_scheduler is None:
        if learning_rate is None:
            _checks.fail(
                where, "learning_rate", "a number or schedule when lr_scheduler is None", None
            )
        return learning_rate
    if not isinstance(lr_scheduler, LRScheduler):
        _checks.fail(
            where,
            "lr_scheduler",
            "an mx_adagrad.lr_scheduler.LRScheduler (with optax.inject_hyperparams, "
            "pass static_args=('lr_scheduler',))",
            lr_scheduler,
        )
    if learning_rate is None:
        return lr_scheduler
    _checks.finite(where, "learning_rate", learning_rate)
    _checks.non_negative(where, "learning_rate", learning_rate)
    if _checks.concrete_float(learning_rate) != lr_scheduler.base_lr:
        warnings.warn(
            f"mx_adagrad.{where}: learning_rate={learning_rate!r} overrides the base_lr="
            f"{lr_scheduler.base_lr!r} of lr_scheduler (as in MXNet); pass learning_rate=None "
            "to keep the scheduler's base_lr",
            UserWarning,
            stacklevel=3,
        )
    return lr_scheduler.with_base_lr(learning_rate)


def adagrad(
    learning_rate: transforms.LearningRate | None = 0.01,
    epsilon: chex.Numeric = 1e-6,
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
    sparse_wd: str = "lazy",
) -> optax.GradientTransformation:
    """MXNet 2.0's AdaGrad (``mxnet.optimizer.AdaGrad``) as an optax gradient transformation.

    ::

        g = clip(rescale_grad * grad, clip_gradient) + wd * wd_mult * weight
        history = history + g**2
        weight = weight - learning_rate * lr_mult * g / (sqrt(history) + epsilon)

    It is ``optax.chain(rescale, clip, add_decayed_weights, scale_by_adagrad, scale_by_schedule)``;
    under ``jax.jit`` the chain and ``apply_updates`` fuse into elementwise loops per parameter.
    Gradients may mix dense arrays and :class:`~mx_adagrad.RowSparse` rows (embedding tables):
    a RowSparse leaf's duplicates are summed, and only its rows are read and written.
    Complex parameters train too: the history is real, ``history + real(g * conj(g))``.
    The arguments keep MXNet's names and defaults; ``optax.adagrad`` differs (epsilon inside the
    root, history starting at 0.1, no rescale/clip/decay).

    Args:
      learning_rate: a number >= 0, an optax schedule (called with optax's count, 0 first), or
        ``None`` to take the ``base_lr`` of ``lr_scheduler``. Next to an ``lr_scheduler``, a number
        replaces its ``base_lr``, as in MXNet (with a warning when they differ).
      epsilon: added to ``sqrt(history)``, >= 0.
      rescale_grad: gradient multiplier, finite (Gluon: ``1 / batch_size``).
      clip_gradient: elementwise clipping bound, > 0, or ``None`` for no clipping; it bounds the
        modulus of a complex element, keeping its phase.
      wd: L2 weight decay, >= 0, added to the gradient before the history.
      lr_mult: per-parameter learning-rate multipliers (pytree, callable or ``{path: value}``).
      wd_mult: per-parameter weight-decay multipliers (pytree, callable or ``{path: value}``).
      lr_scheduler: an :mod:`mx_adagrad.lr_scheduler` scheduler, called with MXNet's
        ``num_update = begin_num_update + n`` on the n-th update.
      begin_num_update: the update count to resume from, >= 0.
      initial_accumulator_value: the history's first value, >= 0 (MXNet: 0).
      multi_precision: keep float32 master weights and history for float16/bfloat16 parameters.
      sparse_wd: weight decay on :class:`~mx_adagrad.RowSparse` gradients: ``"lazy"`` decays the
        rows present only; ``"error"`` refuses ``wd != 0`` for them, as MXNet does.

    Returns:
      An ``optax.GradientTransformation``. Its ``update`` needs ``params`` (weight decay). Apply
      its updates with :func:`mx_adagrad.apply_updates`.

    Example:
      >>> import jax, jax.numpy as jnp, mx_adagrad
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = mx_adagrad.adagrad(learning_rate=0.1, wd=0.01)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> mx_adagrad.apply_updates(params, updates)["w"]
      Array([ 0.90000004, -1.9       ], dtype=float32)
    """
    return _mxnet2_chain("adagrad", adagrad, transforms.scale_by_adagrad, **locals())


class Recorded(NamedTuple):
    """What :func:`record` keeps of a transformation: its ``kind`` (``"adagrad"``,
    ``"rowwise_adagrad"``, ``"legacy.adagrad"``, ``"contrib.group_adagrad"``), the function that
    built it and the keyword ``arguments`` it was built from."""

    kind: str
    build: Callable[..., optax.GradientTransformation]
    arguments: dict[str, Any]


# ``tx.update`` -> what built it, for every transformation of the family (and the ``.tx`` of their
# one-pass forms): ``mx_adagrad.flat.one_pass`` builds the one-pass form of the same kind from it.
# Weak keys: an entry lives as long as its transformation.
_RECORDED: weakref.WeakKeyDictionary[Callable[..., Any], Recorded] = weakref.WeakKeyDictionary()


def record(
    tx: optax.GradientTransformation,
    kind: str,
    build: Callable[..., optax.GradientTransformation],
    **arguments: Any,
) -> optax.GradientTransformation:
    """Records that ``tx`` is ``build(**arguments)``, a transformation of ``kind``; returns ``tx``."""
    _RECORDED[tx.update] = Recorded(kind, build, arguments)
    return tx


def recorded(tx: Any) -> Recorded | None:
    """What :func:`record` recorded for ``tx``, or None for any other transformation."""
    try:
        return _RECORDED.get(tx.update)
    except (AttributeError, TypeError):  # no update, or one that cannot be weakly referenced
        return None


def rowwise_adagrad(
    learning_rate: transforms.LearningRate | None = 0.01,
    epsilon: chex.Numeric = 1e-6,
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
    sparse_wd: str = "lazy",
) -> optax.GradientTransformation:
    """Row-wise AdaGrad for embedding tables: :func:`adagrad` with one accumulator per row.

    ::

        g = clip(rescale_grad * grad, clip_gradient) + wd * wd_mult * weight
        history[r] = history[r] + mean(g[r]**2)        # one number per row r (first axis)
        weight[r] = weight[r] - learning_rate * lr_mult * g[r] / (sqrt(history[r]) + epsilon)

    It is :func:`adagrad` with :func:`~mx_adagrad.scale_by_rowwise_adagrad` in place of
    :func:`~mx_adagrad.scale_by_adagrad`: the same arguments, defaults and checks; rescale, clip
    and weight decay come first exactly as there. Parameters with fewer than two axes (biases)
    keep one accumulator per element. The optimizer memory of a ``(rows, dim)`` table is ``rows``
    numbers instead of ``rows * dim`` (``multi_precision`` adds the float32 master copy). This is
    TorchRec's ``RowWiseAdagrad`` / FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` update
    (``state_sum += grad.pow(2).mean(1)``; ``param -= lr * grad / (sqrt(state_sum) + eps)``);
    MXNet has no row-wise AdaGrad.

    Args:
      learning_rate: as in :func:`adagrad`.
      epsilon: added to ``sqrt(history)``, >= 0.
      rescale_grad: as in :func:`adagrad`.
      clip_gradient: as in :func:`adagrad`.
      wd: as in :func:`adagrad`.
      lr_mult: as in :func:`adagrad`.
      wd_mult: as in :func:`adagrad`.
      lr_scheduler: as in :func:`adagrad`.
      begin_num_update: as in :func:`adagrad`.
      initial_accumulator_value: the history's first value, >= 0.
      multi_precision: as in :func:`adagrad` (the row-wise history is float32 too).
      sparse_wd: as in :func:`adagrad`.

    Returns:
      An ``optax.GradientTransformation``. Its ``update`` needs ``params``; apply its updates with
      :func:`mx_adagrad.apply_updates`.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> table = jnp.ones((3, 4))
      >>> tx = mx_adagrad.rowwise_adagrad(learning_rate=0.1)
      >>> state = tx.init(table)
      >>> state[3].history.shape                      # one accumulator per row
      (3,)
    """
    return _mxnet2_chain(
        "rowwise_adagrad", rowwise_adagrad, transforms.scale_by_rowwise_adagrad, **locals()
    )


def _mxnet2_chain(
    kind: str,
    build: Callable[..., optax.GradientTransformation],
    accumulator: Callable[[chex.Numeric, chex.Numeric], optax.GradientTransformation],
    *,
    learning_rate: transforms.LearningRate | None,
    epsilon: chex.Numeric,
    lr_scheduler: LRScheduler | None,
    initial_accumulator_value: chex.Numeric,
    multi_precision: bool,
    **chain_arguments: Any,
) -> optax.GradientTransformation:
    """MXNet 2.0's chain around ``accumulator(epsilon, initial_accumulator_value)``: rescale,
    clip, decay first, the schedule last; recorded as ``kind``, built by ``build`` (see
    :func:`record`)."""
    learning_rate = resolve_learning_rate(kind, learning_rate, lr_scheduler)
    _checks.boolean(kind, "multi_precision", multi_precision)
    arguments = dict(chain_arguments)
    chain = optax.chain(
        transforms.rescale(arguments["rescale_grad"]),
        transforms.clip(arguments["clip_gradient"]),
        transforms.add_decayed_weights(
            arguments["wd"], arguments["wd_mult"], arguments["sparse_wd"]
        ),
        accumulator(epsilon, initial_accumulator_value),
        transforms.scale_by_schedule(
            learning_rate, arguments["lr_mult"], arguments["begin_num_update"]
        ),
    )
    tx = precision.multi_precision(chain) if multi_precision else chain
    return record(
        tx,
        kind,
        build,
        learning_rate=learning_rate,
        epsilon=epsilon,
        initial_accumulator_value=initial_accumulator_value,
        multi_precision=multi_precision,
        **arguments,
    )
