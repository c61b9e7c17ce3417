"""The five gradient transformations that make up MXNet's AdaGrad step.

Each is an ``optax.GradientTransformation`` and can be used alone or inside ``optax.chain``. In
order, they compute MXNet 2.0's ``AdaGrad`` step::

    g = rescale_grad * grad                                 rescale
    g = clip(g, -clip_gradient, clip_gradient)              clip
    g = g + wd * wd_mult * weight                           add_decayed_weights
    history = history + g**2                                scale_by_adagrad
    g = g / (sqrt(history) + epsilon)
    update = -learning_rate(num_update) * lr_mult * g       scale_by_schedule
    weight = weight + update                                apply_updates

Hyperparameters may be Python numbers or (traced) JAX scalars, so every transform works under
``optax.inject_hyperparams``. Concrete values are validated when the transform is built.

Complex parameters take the same steps: the history is real, ``history + real(g * conj(g))`` (the
squared modulus) in the real dtype of the parameter (float32 for complex64), the root divides the
real and imaginary parts alike, and ``clip`` bounds the modulus of each element, keeping its phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mx_adagrad import _checks, multipliers, sparse
from mx_adagrad.lr_scheduler import LRScheduler

SPARSE_WD_MODES = ("lazy", "error")


def _like(value: chex.Numeric, array: chex.Array) -> chex.Array:
    """A scalar hyperparameter in the dtype of the array it multiplies (keeps bf16 bf16)."""
    return jnp.asarray(_real(value) if not jnp.iscomplexobj(array) else value, dtype=array.dtype)


def _real(value: chex.Numeric) -> chex.Numeric:
    """A real hyperparameter as a real number. ``optax.inject_hyperparams`` stores hyperparameters
    in the params' dtype, complex for complex params; concrete ones were checked to be real."""
    return jnp.real(value) if jnp.iscomplexobj(value) else value


def _real_dtype(param: chex.Array) -> jnp.dtype:
    """The dtype of a parameter's history: its own if real, float32 for complex64 and so on."""
    return jnp.finfo(jnp.result_type(param)).dtype


def rescale(rescale_grad: chex.Numeric = 1.0) -> optax.GradientTransformation:
    """Multiplies gradients by a constant, as MXNet's ``rescale_grad``.

    ::

        g = rescale_grad * g

    Gluon's ``Trainer.step(batch_size)`` sets ``rescale_grad = scale / batch_size`` before each step;
    pass a traced value (``optax.inject_hyperparams``) to change it without recompiling.

    Args:
      rescale_grad: the factor; any finite number (MXNet argument of the same name).

    Returns:
      An ``optax.GradientTransformation`` with an ``optax.EmptyState``.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.rescale(0.5)
      >>> tx.update({"w": jnp.ones(2)}, tx.init(None))[0]["w"]
      Array([0.5, 0.5], dtype=float32)
    """
    _checks.finite("rescale", "rescale_grad", rescale_grad)

    def update_fn(updates, state, params=None):
        del params
        return sparse.map_leaves(
            lambda g: sparse.on_rows(lambda v: v * _like(rescale_grad, v), g), updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip(clip_gradient: chex.Numeric | None = None) -> optax.GradientTransformation:
    """Clips every gradient element to ``[-clip_gradient, clip_gradient]``, as MXNet.

    ::

        g = min(max(g, -clip_gradient), clip_gradient)      # NaN stays NaN, as in MXNet
        g = g * clip_gradient / |g| where |g| > clip_gradient          # complex g

    A complex element is clipped by its modulus: one outside the disc ``|g| <= clip_gradient`` is
    moved onto its edge with its phase kept, so ``clip`` commutes with a common phase rotation and
    a complex gradient with zero imaginary parts is clipped exactly as the real one. An element
    with an infinite part points where its infinite parts point (``inf + 3j`` becomes
    ``clip_gradient``); one with a NaN part stays as it is. MXNet had no complex numbers.

    Args:
      clip_gradient: the bound, > 0; ``None`` turns clipping off (MXNet argument of the same name).

    Returns:
      An ``optax.GradientTransformation`` with an ``optax.EmptyState``.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.clip(0.5)
      >>> tx.update(jnp.array([-2.0, 0.25, 3.0]), tx.init(None))[0]
      Array([-0.5 ,  0.25,  0.5 ], dtype=float32)
    """
    if clip_gradient is None:
        return optax.identity()
    _checks.positive("clip", "clip_gradient", clip_gradient)

    def update_fn(updates, state, params=None):
        del params

        def clip_rows(v):
            if jnp.iscomplexobj(v):
                return _clip_modulus(v, _like(clip_gradient, jnp.real(v)))
            return jnp.clip(v, -_like(clip_gradient, v), _like(clip_gradient, v))

        return sparse.map_leaves(lambda g: sparse.on_rows(clip_rows, g), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _clip_modulus(v: chex.Array, bound: chex.Array) -> chex.Array:
    """``v * bound / |v|`` where ``|v| > bound``, elementwise, for complex ``v`` (see :func:`clip`).

    Each element is first divided by the larger magnitude of its two parts, so its modulus,
    ``larger * |unit|`` with ``|unit|`` in ``[1, sqrt(2)]``, is compared and divided without
    overflowing; with an infinite part, the infinite parts count as +-1 and the finite ones as 0.
    """
    re, im = jnp.real(v), jnp.imag(v)
    larger = jnp.maximum(jnp.abs(re), jnp.abs(im))  # NaN if a part is NaN
    infinite = jnp.isinf(larger)

    def unit_part(part):
        return jnp.where(infinite, jnp.where(jnp.isinf(part), jnp.sign(part), 0), part / larger)

    unit_re, unit_im = unit_part(re), unit_part(im)
    size = jnp.abs(jax.lax.complex(unit_re, unit_im))
    on_edge = jax.lax.complex(bound * (unit_re / size), bound * (unit_im / size))
    return jnp.where(larger * size > bound, on_edge, v)  # a NaN compares False: kept


def _decay(wd: chex.Numeric, grad: Any, weight: chex.Array, mult: chex.Numeric) -> Any:
    """``grad + wd * mult * weight``; a RowSparse gradient with no decay is left as it is (MXNet's
    sparse kernel has no decay term), so its weight rows are not even read."""
    if _checks.is_sparse(grad) and _checks.concrete_float(wd * mult) == 0.0:
        return sparse.coalesce(grad)

    def decay(v, w):
        if jnp.iscomplexobj(w):  # a real gradient of a complex weight: keep w's imaginary part
            v = v.astype(_complex_dtype(v.dtype))
        return v + _like(wd * mult, v) * w.astype(v.dtype)

    return sparse.on_rows(decay, grad, weight)


def _complex_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The complex dtype of ``dtype``'s precision (at least complex64): float64 -> complex128."""
    return jnp.promote_types(dtype, jnp.complex64)


def _refuse_sparse_decay(wd: chex.Numeric, updates: optax.Updates, mults: Any) -> None:
    """sparse_wd='error': MXNet's refusal of weight decay on row_sparse gradients."""
    for path, g, m in zip(
        _checks.leaf_paths(updates), _checks.leaves(updates), jax.tree.leaves(mults)
    ):
        if _checks.is_sparse(g) and _checks.concrete_float(wd * m) != 0.0:
            _checks.fail(
                "add_decayed_weights",
                f"wd * wd_mult for the sparse gradient {path!r}",
                "0 with sparse_wd='error' (MXNet refuses weight decay on row_sparse "
                "gradients; sparse_wd='lazy' decays the touched rows)",
                wd * m,
            )


def add_decayed_weights(
    wd: chex.Numeric = 0.0,
    wd_mult: multipliers.MultiplierSpec = None,
    sparse_wd: str = "lazy",
) -> optax.GradientTransformation:
    """Adds L2 weight decay to the gradient, before the history sees it (MXNet 2.0's placement).

    ::

        g = g + wd * wd_mult * weight

    Args:
      wd: the weight decay, >= 0 (MXNet ``wd``).
      wd_mult: per-parameter multipliers (MXNet ``set_wd_mult``): ``None``, a pytree like the
        params, a callable ``params -> pytree`` or a dict ``{path: value}``; see
        :mod:`mx_adagrad.multipliers`.
      sparse_wd: what weight decay does to a :class:`~mx_adagrad.RowSparse` gradient.
        ``"lazy"`` (default): decay the rows present only, ``g[ids] + wd * w[ids]``; rows a step
        does not touch are not decayed that step (the dense path decays every row every step).
        ``"error"``: refuse ``wd * wd_mult != 0`` for RowSparse gradients, as MXNet does.

    Returns:
      An ``optax.GradientTransformation`` with an ``optax.EmptyState``. Its ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.add_decayed_weights(0.1)
      >>> w = jnp.array([1.0, 2.0])
      >>> tx.update(jnp.zeros(2), tx.init(w), w)[0]
      Array([0.1, 0.2], dtype=float32)
    """
    _checks.non_negative("add_decayed_weights", "wd", wd)
    _checks.one_of("add_decayed_weights", "sparse_wd", sparse_wd, SPARSE_WD_MODES)

    def init_fn(params):
        multipliers.resolve("add_decayed_weights", "wd_mult", wd_mult, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _checks.require_params("add_decayed_weights", params)
        _checks.same_structure("add_decayed_weights", "updates", updates, "params", params)
        mults = multipliers.resolve("add_decayed_weights", "wd_mult", wd_mult, params)
        if sparse_wd == "error":
            _refuse_sparse_decay(wd, updates, mults)
        updates = sparse.map_leaves(partial(_decay, wd), updates, params, mults)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _divide(numerator: chex.Array, denominator: chex.Array) -> chex.Array:
    """``numerator / denominator``, one IEEE division, written as ``(-n) / (-d)`` (bit-identical:
    negation is exact) so that XLA keeps it one and fuses the step into two loops.

    * Left alone, XLA rewrites ``n / sqrt(x)`` (``epsilon`` inside the root, or a concrete
      ``epsilon=0``) into ``n * rsqrt(x)``, whose approximate reciprocal root differs from the
      division in the last bit; the negated denominator is no square root, so the division stays.
    * XLA will not duplicate a producer (the clipped, decayed gradient) into a consumer whose
      first use of it is a divide; starting with a negate lets the gradient's arithmetic be
      recomputed inside both the history loop and the weight loop instead of being written to a
      temporary buffer. Checked by ``tests/test_fusion.py``.

    A complex numerator has its real and imaginary parts divided by the real denominator (a
    complex division would round differently and could overflow in ``|denominator|**2``).
    """
    if jnp.iscomplexobj(numerator):
        return jax.lax.complex(
            _divide(jnp.real(numerator), denominator), _divide(jnp.imag(numerator), denominator)
        )
    return (-numerator) / (-denominator)


def _root(history: chex.Array, epsilon: chex.Numeric, eps_inside_sqrt: bool) -> chex.Array:
    """AdaGrad's denominator: ``sqrt(history) + epsilon`` (MXNet 2.0), or ``sqrt(history +
    epsilon)`` with ``eps_inside_sqrt`` (MXNet 1.x and its GroupAdaGrad)."""
    if eps_inside_sqrt:
        return jnp.sqrt(history + _like(epsilon, history))
    return jnp.sqrt(history) + _like(epsilon, history)


def _square(grad: chex.Array) -> chex.Array:
    """``grad**2``; for a complex gradient its squared modulus ``real(grad * conj(grad))``."""
    if jnp.iscomplexobj(grad):
        return jnp.real(grad * jnp.conj(grad))
    return grad * grad


def _accumulate_and_scale(
    grad: chex.Array | sparse.RowSparse,
    history: chex.Array,
    accumulate: Callable[[chex.Array, chex.Array], chex.Array],
    scale: Callable[[chex.Array, chex.Array], chex.Array],
) -> tuple[chex.Array | sparse.RowSparse, chex.Array]:
    """One leaf of an AdaGrad accumulator: ``h = accumulate(h, g)``, then ``scale(g, h)``.

    Returns ``(update, history)``. For a RowSparse gradient only its rows of the history are
    read, updated and written back (one gather, one scatter); the update is RowSparse too. The
    gradient is cast to the history's precision, staying complex if it is.
    """
    grad = sparse.on_rows(
        lambda v: v.astype(_complex_dtype(history.dtype) if jnp.iscomplexobj(v) else history.dtype),
        grad,
    )
    if not _checks.is_sparse(grad):
        history = accumulate(history, grad)
        return scale(grad, history), history
    rows = accumulate(sparse.gather(history, grad), grad.values)
    return grad.replace_values(scale(grad.values, rows)), sparse.scatter(history, grad, rows)


def _accumulator(
    where: str,
    updates: optax.Updates,
    history: optax.Updates,
    accumulate: Callable[[chex.Array, chex.Array], chex.Array],
    scale: Callable[[chex.Array, chex.Array], chex.Array],
    history_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape,
) -> tuple[optax.Updates, optax.Updates]:
    """:func:`_accumulate_and_scale` over every leaf: ``(updates, history)``.

    ``history_shape`` maps a gradient's shape to its history's, for the structure check.
    """
    _checks.same_structure(where, "updates", updates, "state", history, history_shape)
    pairs = [
        _accumulate_and_scale(g, h, accumulate, scale)
        for g, h in zip(_checks.leaves(updates), jax.tree.leaves(history))
    ]
    structure = _checks.structure(updates)
    return (
        jax.tree.unflatten(structure, [u for u, _ in pairs]),
        jax.tree.unflatten(jax.tree.structure(history), [h for _, h in pairs]),
    )


def _check_accumulator_args(where: str, epsilon: Any, initial_accumulator_value: Any) -> None:
    _checks.finite(where, "epsilon", epsilon)
    _checks.non_negative(where, "epsilon", epsilon)
    _checks.finite(where, "initial_accumulator_value", initial_accumulator_value)
    _checks.non_negative(where, "initial_accumulator_value", initial_accumulator_value)


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`: the running sum of squared gradients, one per parameter."""

    history: optax.Updates


def scale_by_adagrad(
    epsilon: chex.Numeric = 1e-6,
    initial_accumulator_value: chex.Numeric = 0.0,
    *,
    eps_inside_sqrt: bool = False,
) -> optax.GradientTransformation:
    """Accumulates squared gradients and divides by their root, with MXNet 2.0's epsilon placement.

    ::

        history = history + g**2                  # complex g: history + real(g * conj(g))
        g = g / (sqrt(history) + epsilon)

    The history has the parameters' dtype (as MXNet's ``create_state``; the real dtype of complex
    parameters, float32 for complex64) and starts at
    ``initial_accumulator_value`` (MXNet: 0; ``optax.adagrad``: 0.1). With
    ``eps_inside_sqrt=True`` the division is MXNet 1.x's (and ``optax.adagrad``'s)
    ``g / sqrt(history + epsilon)``.

    Args:
      epsilon: added to the root, >= 0 (MXNet ``epsilon``; default 1e-6 as MXNet 2.0).
      initial_accumulator_value: the history's first value, >= 0.
      eps_inside_sqrt: put ``epsilon`` under the square root (MXNet 1.x ``float_stable_eps``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdagradState`.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.scale_by_adagrad(epsilon=0.0)
      >>> tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))[0]
      Array([ 1., -1.], dtype=float32)
    """
    _check_accumulator_args("scale_by_adagrad", epsilon, initial_accumulator_value)
    _checks.boolean("scale_by_adagrad", "eps_inside_sqrt", eps_inside_sqrt)

    def init_fn(params):
        _checks.floating("scale_by_adagrad", "params", params)
        value = _real(initial_accumulator_value)
        return ScaleByAdagradState(
            jax.tree.map(lambda p: jnp.full_like(p, value, _real_dtype(p)), params)
        )

    def update_fn(updates, state, params=None):
        del params
        updates, history = _accumulator(
            "scale_by_adagrad",
            updates,
            state.history,
            lambda h, g: h + _square(g),
            lambda g, h: _divide(g, _root(h, epsilon, eps_inside_sqrt)),
        )
        return updates, ScaleByAdagradState(history)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRowwiseAdagradState(NamedTuple):
    """State of :func:`scale_by_rowwise_adagrad`: one running mean square per row (first axis) of
    every parameter with two or more axes, one per element of the others."""

    history: optax.Updates


def _row_vector(param: chex.Array, value: chex.Numeric, keepdims: bool) -> chex.Array:
    """``value`` once per row of ``param`` (per element for ndim < 2), in its (real) dtype and,
    when it is placed on a mesh, split along the mesh axes of its rows."""
    value = _real(value)
    shape = _row_shape(jnp.shape(param), keepdims)
    if shape == jnp.shape(param):
        return jnp.full_like(param, value, _real_dtype(param))
    sharding = getattr(param, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))
    else:
        sharding = None
    return jnp.full(shape, value, _real_dtype(param), device=sharding)


def _row_shape(shape: tuple[int, ...], keepdims: bool = False) -> tuple[int, ...]:
    """The shape of a row-wise history: ``(rows,)`` for two or more axes (``(rows, 1, ...)``
    with ``keepdims``), else the shape."""
    if len(shape) < 2:
        return shape
    return shape[:1] + (1,) * (len(shape) - 1) if keepdims else shape[:1]


def _row_mean_square(history: chex.Array, grad: chex.Array) -> chex.Array:
    """``history + mean(grad**2)`` over each row's other axes (elementwise below two axes); the
    squared modulus for a complex gradient. The sum is :func:`_row_sum_of_squares`'s, and the
    mean its product with ``1 / width``."""
    width = math.prod(grad.shape[1:])
    if grad.ndim < 2 or width == 1:  # the mean of one square is the square: element-wise
        return (history.reshape(grad.shape) + _square(grad)).reshape(history.shape)
    rows = history.reshape(grad.shape[0])
    total = _row_sum_of_squares(grad.reshape(grad.shape[0], width), jnp.minimum(rows, 0))
    return (rows + total * _like(1 / width, total)).reshape(history.shape)


# Partial sums of a row's squares (see _row_sum_of_squares): the native kernels use the same.
SUM_LANES = 16


def _row_sum_of_squares(rows: chex.Array, zero: chex.Array) -> chex.Array:
    """``sum(rows**2, axis=1)`` of a 2-D array, in an order of additions fixed here.

    ::

        lanes[j] = zero + rows[:, j]**2 + rows[:, j + 16]**2 + ...     # left to right, j < 16
        while len(lanes) > 1:           # halving: lane j += lane j + ceil(len / 2); an odd
            ...                         # count leaves the middle lane as it is

    XLA is free to sum a reduction in any order (and does, by shape and by fusion), so the
    order is written out in additions, which XLA keeps. ``zero`` (one per row:
    ``minimum(history, 0)``, a zero XLA cannot fold away, that stays 0 for an infinite history
    and NaN for a NaN one) starts every lane, so no addition ever has two bare squares
    for the compiler to contract into a multiply-add either way: each square is added to a sum,
    contracted. The native row-wise kernels (``mx_adagrad/_native/step.h``) do the same
    operations and so compute the same bits.
    """
    width = rows.shape[1]
    lanes = zero[:, None] + _square(rows[:, :SUM_LANES])
    for start in range(SUM_LANES, width, SUM_LANES):
        block = _square(rows[:, start : start + SUM_LANES])
        size = block.shape[1]
        lanes = jnp.concatenate([lanes[:, :size] + block, lanes[:, size:]], axis=1)
    while lanes.shape[1] > 1:
        count, half = lanes.shape[1], (lanes.shape[1] + 1) // 2
        paired = lanes[:, : count - half] + lanes[:, half:]
        lanes = jnp.concatenate([paired, lanes[:, count - half : half]], axis=1)
    return lanes[:, 0]


def _per_row(values: chex.Array, rows: chex.Array) -> chex.Array:
    """``rows`` (one value per row) broadcast against ``values`` (rows of any shape)."""
    return rows.reshape(rows.shape + (1,) * (values.ndim - rows.ndim))


def scale_by_rowwise_adagrad(
    epsilon: chex.Numeric = 1e-6,
    initial_accumulator_value: chex.Numeric = 0.0,
    *,
    eps_inside_sqrt: bool = False,
    keepdims: bool = False,
) -> optax.GradientTransformation:
    """Row-wise AdaGrad: one accumulator per row of a table, the mean of the row's squared
    gradient, as TorchRec's ``RowWiseAdagrad`` and FBGEMM's ``EXACT_ROWWISE_ADAGRAD``.

    For a parameter with two or more axes (rows along the first)::

        history[r] = history[r] + mean(g[r]**2)          # mean over the row's other axes
        g[r] = g[r] / (sqrt(history[r]) + epsilon)

    A parameter with fewer than two axes keeps one accumulator per element, as
    :func:`scale_by_adagrad`. The state of a ``(rows, dim)`` table is ``rows`` numbers instead of
    ``rows * dim``: 64x less optimizer memory for a 64-wide embedding. A
    :class:`~mx_adagrad.RowSparse` gradient updates the accumulators of its rows only.
    With ``eps_inside_sqrt=True`` and ``keepdims=True`` it is MXNet 1.x's GroupAdaGrad
    (:func:`mx_adagrad.contrib.group_adagrad`): ``g[r] / sqrt(history[r] + epsilon)``, with a
    history of shape ``(rows, 1)``.

    With ``dim == 1`` it is :func:`scale_by_adagrad`. For complex parameters ``g**2`` is
    ``real(g * conj(g))`` and the history is real, as in :func:`scale_by_adagrad`.

    Args:
      epsilon: added to the root, >= 0.
      initial_accumulator_value: the history's first value, >= 0.
      eps_inside_sqrt: put ``epsilon`` under the square root (MXNet 1.x's GroupAdaGrad).
      keepdims: keep the history of a ``(rows, ...)`` parameter as ``(rows, 1, ...)``, as
        MXNet's GroupAdaGrad does, instead of ``(rows,)``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByRowwiseAdagradState`.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.scale_by_rowwise_adagrad(epsilon=0.0)
      >>> g = jnp.array([[3.0, 4.0], [1.0, 1.0]])
      >>> updates, state = tx.update(g, tx.init(jnp.zeros((2, 2))))
      >>> state.history                       # mean of each row's squares
      Array([12.5,  1. ], dtype=float32)
    """
    where = "scale_by_rowwise_adagrad"
    _check_accumulator_args(where, epsilon, initial_accumulator_value)
    _checks.boolean(where, "eps_inside_sqrt", eps_inside_sqrt)
    _checks.boolean(where, "keepdims", keepdims)

    def init_fn(params):
        _checks.floating(where, "params", params)
        history = jax.tree.map(
            lambda p: _row_vector(p, initial_accumulator_value, keepdims), params
        )
        return ScaleByRowwiseAdagradState(history)

    def scale(g, h):
        root = _per_row(g, _root(h, epsilon, eps_inside_sqrt))
        if g.ndim < 2 or math.prod(g.shape[1:]) == 1:  # element-wise
            return _divide(g, root)
        # One division per row, as the native kernels take it (and as XLA rewrites a division
        # by a broadcast row value).
        return g * _divide(_like(1, root), root).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        updates, history = _accumulator(
            where,
            updates,
            state.history,
            _row_mean_square,
            scale,
            lambda shape: _row_shape(shape, keepdims),
        )
        return updates, ScaleByRowwiseAdagradState(history)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: how many updates it has made (optax's ``count``)."""

    count: chex.Array


LearningRate = chex.Numeric | optax.Schedule | LRScheduler


def _check_learning_rate(where: str, learning_rate: Any) -> None:
    if not callable(learning_rate):
        _checks.finite(where, "learning_rate", learning_rate)
        _checks.non_negative(where, "learning_rate", learning_rate)


def learning_rate_at(
    learning_rate: LearningRate, count: chex.Array, begin_num_update: chex.Numeric = 0
) -> chex.Numeric:
    """The learning rate of the update made when ``count`` updates have been made before it.

    A number is returned as is; an optax schedule is called with ``count`` (0 on the first
    update); an MXNet scheduler is called with MXNet's ``num_update = begin_num_update + count + 1``.
    """
    if isinstance(learning_rate, LRScheduler):
        return learning_rate(begin_num_update + count + 1)
    if callable(learning_rate):
        return learning_rate(count)
    return learning_rate


def scale_by_schedule(
    learning_rate: LearningRate,
    lr_mult: multipliers.MultiplierSpec = None,
    begin_num_update: chex.Numeric = 0,
) -> optax.GradientTransformation:
    """Scales updates by ``-learning_rate * lr_mult``, the last step before ``apply_updates``.

    ::

        update = -learning_rate(step) * lr_mult * g

    ``step`` follows the convention of the schedule: an optax schedule gets optax's ``count``
    (0 on the first update); an :mod:`mx_adagrad.lr_scheduler` scheduler gets MXNet's
    ``num_update = begin_num_update + n`` on the n-th update (n = 1, 2, ...).

    Args:
      learning_rate: a number >= 0, an optax schedule, or an MXNet-style scheduler.
      lr_mult: per-parameter multipliers (MXNet ``set_lr_mult``); see :mod:`mx_adagrad.multipliers`.
      begin_num_update: MXNet's ``begin_num_update``, the update count to resume from, >= 0.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByScheduleState`.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> tx = mx_adagrad.scale_by_schedule(0.1, lr_mult={"b": 0.5})
      >>> g = {"a": jnp.ones(1), "b": jnp.ones(1)}
      >>> tx.update(g, tx.init(g))[0]
      {'a': Array([-0.1], dtype=float32), 'b': Array([-0.05], dtype=float32)}
    """
    _check_learning_rate("scale_by_schedule", learning_rate)
    if not isinstance(begin_num_update, jax.Array):
        _checks.integer("scale_by_schedule", "begin_num_update", begin_num_update, minimum=0)

    def init_fn(params):
        multipliers.resolve("scale_by_schedule", "lr_mult", lr_mult, params)
        return ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lr = learning_rate_at(learning_rate, state.count, begin_num_update)
        mults = multipliers.resolve("scale_by_schedule", "lr_mult", lr_mult, updates)
        updates = sparse.map_leaves(
            lambda u, m: sparse.on_rows(lambda v: v * _like(-lr * m, v), u), updates, mults
        )
        return updates, ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
