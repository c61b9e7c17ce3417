"""Opt-in fast paths: a fused AdaGrad step (update and apply in one call), and flat parameters.

``mx_adagrad.adagrad`` is an optax transformation: ``update`` returns updates and
``apply_updates`` adds them. Under ``jax.jit`` XLA fuses the two, but XLA CPU still makes two
passes over memory per parameter (it has no multi-output loop fusion by default: one loop writes
the history, the next reads it back to write the weight). And every leaf is its own pair of loops
and its own three arrays crossing the ``jit`` boundary: with a thousand small leaves that overhead
costs ten times the arithmetic. This module offers two opt-in remedies, each bitwise equal to
its optax form (``tx.update`` + ``apply_updates``):

* the one-pass forms :func:`fused_adagrad` (of ``mx_adagrad.adagrad``) and
  :func:`fused_rowwise_adagrad` (of ``mx_adagrad.rowwise_adagrad``); :func:`one_pass` finds the
  one of a transformation. ``step(params, grads, state) -> (params, state)``, with the optimizer
  state of the transformation (the same pytree: checkpoints and the two APIs are
  interchangeable). On the CPU backend every dense float32 leaf (and, with ``multi_precision``,
  every float16/bfloat16 leaf of the element-wise form) is updated in one pass over memory, up to
  64 leaves per native call, and every float32 table with a :class:`~mx_adagrad.RowSparse` or
  :class:`~mx_adagrad.BagGrad` gradient is updated on its touched rows in place, all tables in
  one native call (``mx_adagrad._native``); anywhere else (GPU, TPU, no C++ compiler, other
  dtypes) it is the XLA program of the transformation. The dense native call has a sharding
  rule: with parameters placed over a device mesh, each device steps its own shards, with no
  collective and every sharding kept. A variant is its transformation and its kernels' rule
  (element-wise or row-wise history), nothing else: the arithmetic lives in
  ``mx_adagrad/_native/step.h`` once.
* :func:`ravel` and :class:`FlatParams`: the parameters as one 1-D buffer per
  ``(dtype, lr_mult, wd_mult)`` group, kept flat across steps. Differentiate with respect to the
  :class:`FlatParams` (``loss_fn(flat.unravel(), ...)``) and the gradients come flat too; any
  optimizer then sees a handful of large leaves instead of thousands of small ones.

Example::

    fp = mx_adagrad.flat.ravel(params, wd_mult={"bias": 0.0})
    opt = mx_adagrad.flat.fused_adagrad(0.1, wd=1e-4, lr_mult=fp.lr_mult, wd_mult=fp.wd_mult)
    state = opt.init(fp)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(fp, state, x, y):
        loss, grads = jax.value_and_grad(lambda fp: loss_fn(fp.unravel(), x, y))(fp)
        fp, state = opt.step(fp, grads, state)
        return fp, state, loss
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mx_adagrad import _checks, _native, alias, multipliers, sharding, transforms
from mx_adagrad.bags import BagGrad
from mx_adagrad.lr_scheduler import LRScheduler
from mx_adagrad.precision import MultiPrecisionState
from mx_adagrad.updates import apply_updates


class FusedAdaGrad(NamedTuple):
    """What :func:`fused_adagrad` and :func:`fused_rowwise_adagrad` return.

    Attributes:
      init: ``init(params) -> state``, the ``init`` of ``tx``.
      step: ``step(params, grads, state) -> (params, state)``, one update applied.
      tx: the equivalent transformation (``mx_adagrad.adagrad`` or ``rowwise_adagrad`` of the
        same arguments, same state).
    """

    init: Callable[[optax.Params], optax.OptState]
    step: Callable[[optax.Params, optax.Updates, optax.OptState], tuple[optax.Params, Any]]
    tx: optax.GradientTransformation


def fused_adagrad(
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
    native: bool = True,
) -> FusedAdaGrad:
    """``mx_adagrad.adagrad`` with update and apply fused into one ``step`` call.

    ::

        params, state = opt.step(params, grads, state)
        # is bitwise equal to
        updates, state = opt.tx.update(grads, state, params)
        params = mx_adagrad.apply_updates(params, updates)

    The arguments are those of :func:`mx_adagrad.adagrad` (same names, defaults and checks),
    plus ``native``. Call ``step`` inside ``jax.jit`` with params and state donated, so the step
    writes in place. On the CPU backend, with ``native=True`` and the kernels available
    (``mx_adagrad._native`` builds them on first use):

    * the dense float32 leaves, and with ``multi_precision`` the float16/bfloat16 leaves with
      float32 gradients of their dtype, are updated by one native call that reads weight,
      gradient and history once and writes weight and history once (20 bytes per float32
      parameter; XLA's two loops move 32);
    * the float32 tables with a :class:`~mx_adagrad.RowSparse` or :class:`~mx_adagrad.BagGrad`
      gradient, all of them in one native call, have their terms summed per touched row and
      those rows updated in place: neither the coalesced rows nor (for a BagGrad) a row per
      lookup is formed.

    Every other leaf (float64, float16 without ``multi_precision``, sparse gradients with
    ``multi_precision``) and every other backend runs the XLA program of ``tx``.
    ``optax.inject_hyperparams`` does not apply here: use ``tx`` for traced hyperparameters.

    Sharded parameters: the dense native call is partitioned like an elementwise operation
    (``jax.experimental.custom_partitioning`` with a Shardy rule that maps every leaf's
    operands and results to the same factors). Under ``jax.jit`` with parameters placed with
    ``NamedSharding`` (``Explicit`` or ``Auto`` mesh axes), each device runs the kernel on its
    own shards: the step compiles to no collective operation and keeps every sharding, and its
    bits are those of the one-device step. Sparse gradients of tables placed over a mesh take
    the XLA program (inside ``jax.shard_map`` each device's call is native again).

    Args:
      learning_rate: as in :func:`mx_adagrad.adagrad`.
      epsilon: as in :func:`mx_adagrad.adagrad`.
      rescale_grad: as in :func:`mx_adagrad.adagrad`.
      clip_gradient: as in :func:`mx_adagrad.adagrad`.
      wd: as in :func:`mx_adagrad.adagrad`.
      lr_mult: as in :func:`mx_adagrad.adagrad` (for :class:`FlatParams`: ``fp.lr_mult``).
      wd_mult: as in :func:`mx_adagrad.adagrad` (for :class:`FlatParams`: ``fp.wd_mult``).
      lr_scheduler: as in :func:`mx_adagrad.adagrad`.
      begin_num_update: as in :func:`mx_adagrad.adagrad`.
      initial_accumulator_value: as in :func:`mx_adagrad.adagrad`.
      multi_precision: as in :func:`mx_adagrad.adagrad`.
      sparse_wd: as in :func:`mx_adagrad.adagrad`.
      native: use the native kernels on CPU when they are available; False: always the XLA
        program.

    Returns:
      A :class:`FusedAdaGrad` ``(init, step, tx)``.
    """
    return _one_pass_form("adagrad", alias.adagrad, **locals())


def fused_rowwise_adagrad(
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
    native: bool = True,
) -> FusedAdaGrad:
    """``mx_adagrad.rowwise_adagrad`` with update and apply fused into one ``step`` call.

    ::

        params, state = opt.step(params, grads, state)
        # equals (see below for the last bits)
        updates, state = opt.tx.update(grads, state, params)
        params = mx_adagrad.apply_updates(params, updates)

    As :func:`fused_adagrad`, for row-wise AdaGrad: on the CPU backend the dense float32 leaves
    of two or more axes are updated by one native call that reads each row once (its gradient,
    its mean square, its update), the float32 tables with RowSparse or BagGrad gradients by one
    native call for all of them, and the leaves of fewer axes (element-wise histories) by the
    element-wise kernel; everything else runs the XLA program of ``tx``. The kernels sum a row's
    squares in the order XLA CPU does (16 lanes, then halving), so the step is bitwise ``tx``'s
    with the pinned jaxlib (``tests/xla_bits.py``; within 1 ulp on another).

    Args:
      learning_rate: as in :func:`mx_adagrad.rowwise_adagrad`.
      epsilon: as in :func:`mx_adagrad.rowwise_adagrad`.
      rescale_grad: as in :func:`mx_adagrad.rowwise_adagrad`.
      clip_gradient: as in :func:`mx_adagrad.rowwise_adagrad`.
      wd: as in :func:`mx_adagrad.rowwise_adagrad`.
      lr_mult: as in :func:`mx_adagrad.rowwise_adagrad`.
      wd_mult: as in :func:`mx_adagrad.rowwise_adagrad`.
      lr_scheduler: as in :func:`mx_adagrad.rowwise_adagrad`.
      begin_num_update: as in :func:`mx_adagrad.rowwise_adagrad`.
      initial_accumulator_value: as in :func:`mx_adagrad.rowwise_adagrad`.
      multi_precision: as in :func:`mx_adagrad.rowwise_adagrad` (float16/bfloat16 tables then
        take the XLA program).
      sparse_wd: as in :func:`mx_adagrad.rowwise_adagrad`.
      native: use the native kernels on CPU when they are available; False: always the XLA
        program.

    Returns:
      A :class:`FusedAdaGrad` ``(init, step, tx)``.
    """
    return _one_pass_form("rowwise_adagrad", alias.rowwise_adagrad, **locals())


def one_pass(tx: Any, *, native: bool | None = None) -> FusedAdaGrad | None:
    """The one-pass form of ``tx``, or None when it has none.

    ``tx`` itself when it is a :class:`FusedAdaGrad`; the one-pass form of the same arguments
    when ``tx`` is what ``mx_adagrad.adagrad(...)``, ``mx_adagrad.rowwise_adagrad(...)``,
    ``mx_adagrad.legacy.adagrad(...)`` or ``mx_adagrad.contrib.group_adagrad(...)`` returned
    (:func:`fused_adagrad` and :func:`fused_rowwise_adagrad` for the first two), or the ``.tx``
    of a :class:`FusedAdaGrad`; None for any other transformation (optax's). The result's
    ``step`` equals ``tx.update`` followed by ``mx_adagrad.apply_updates``, with the same state,
    bit for bit; its native kernels are the same parametrized step for every kind
    (``mx_adagrad/_native/step.h``).

    Args:
      tx: any object.
      native: as in :func:`fused_adagrad`; ``None`` keeps what ``tx`` was built with (True for
        a transformation, the ``native`` of the one-pass form whose ``.tx`` it is).
    """
    if isinstance(tx, FusedAdaGrad):
        return tx
    found = alias.recorded(tx)
    if found is None:
        return None
    arguments = dict(found.arguments)
    if native is not None:
        arguments["native"] = native
    return _one_pass_form(found.kind, found.build, **arguments)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """What the kernels compute for one kind of transformation (``step.h``'s ``Rule``).

    Attributes:
      rowwise: one history number per row of the leaves of two or more axes.
      eps_inside: ``sqrt(history + epsilon)``, not ``sqrt(history) + epsilon``.
      decay_after: MXNet 1.x's weight decay, after the division.
      decay: the transformation has a weight-decay term at all.
      epsilon: the transformation's name for epsilon.
    """

    rowwise: bool
    eps_inside: bool = False
    decay_after: bool = False
    decay: bool = True
    epsilon: str = "epsilon"

    def form(self, dtype: Any, arguments: dict[str, Any]) -> _native.Form:
        """The kernels' attributes for weights of ``dtype``."""
        rescale, clip = arguments["rescale_grad"], arguments["clip_gradient"]
        return _native.Form(
            rescale_fma=self.decay
            and not self.decay_after
            and _native.rescale_fma(dtype, rescale, clip),
            decay=self.decay,
            eps_inside=self.eps_inside,
            decay_after=self.decay_after,
            fold_rescale=_native.fold_rescale(rescale, clip),
        )


_RULES = {
    "adagrad": _Rule(rowwise=False),
    "rowwise_adagrad": _Rule(rowwise=True),
    "legacy.adagrad": _Rule(rowwise=False, eps_inside=True, decay_after=True, epsilon="eps"),
    "contrib.group_adagrad": _Rule(rowwise=True, eps_inside=True, decay=False),
}


def _one_pass_form(
    kind: str,
    build: Callable[..., optax.GradientTransformation],
    native: bool = True,
    **arguments: Any,
) -> FusedAdaGrad:
    """The :class:`FusedAdaGrad` of the transformation ``build(**arguments)`` of ``kind``."""
    where = f"flat.one_pass({kind})"
    _checks.boolean(where, "native", native)
    rule = _RULES[kind]
    learning_rate = alias.resolve_learning_rate(
        where, arguments.pop("learning_rate"), arguments.pop("lr_scheduler", None)
    )
    tx = build(learning_rate, **arguments)
    arguments["learning_rate"] = learning_rate

    def step(params, grads, state):
        if sharding.is_owner_split(grads):  # tables pooled by their owners: step each shard
            return sharding.sharded_step(fused)(params, grads, state)
        updates, new_state = tx.update(grads, state, params)
        reference = (apply_updates(params, updates), new_state)
        if not native or not _native.load():
            return reference
        # Lowered for CPU, only the native branch is compiled, and XLA drops the reference's
        # computations for the leaves the kernels replaced; elsewhere only the reference is.
        return jax.lax.platform_dependent(
            cpu=lambda: _native_step(rule, arguments, params, grads, state, reference),
            default=lambda: reference,
        )

    alias.record(tx, kind, build, **arguments, native=native)
    fused = FusedAdaGrad(tx.init, step, tx)
    return fused


class _Leaf(NamedTuple):
    """One leaf of the step (a sparse gradient is one leaf)."""

    param: Any
    grad: Any
    history: Any
    master: Any
    lr_mult: Any
    wd_mult: Any


def _native_step(rule, arguments, params, grads, state, reference):
    """The reference step with every leaf that a kernel can update replaced by its result."""
    multi_precision = arguments["multi_precision"]
    new_params, new_state = reference
    inner, new_inner = (
        (state.inner_state, new_state.inner_state) if multi_precision else (state, new_state)
    )
    at = _position(inner, (transforms.ScaleByAdagradState, transforms.ScaleByRowwiseAdagradState))
    history = inner[at].history
    master = state.master if multi_precision else jax.tree.map(lambda _: None, params)
    working = jax.tree.map(lambda p, m: p if m is None else m, params, master, is_leaf=_none)
    count = inner[_position(inner, (transforms.ScaleByScheduleState,))].count
    lr = transforms.learning_rate_at(
        arguments["learning_rate"], count, arguments["begin_num_update"]
    )
    wd = 0.0 if arguments.get("wd") is None else arguments["wd"]  # GroupAdaGrad: None
    # As scale_by_schedule and add_decayed_weights resolve them (same trees, same order).
    lr_mults = multipliers.resolve("scale_by_schedule", "lr_mult", arguments["lr_mult"], history)
    wd_mults = multipliers.resolve(
        "add_decayed_weights", "wd_mult", arguments.get("wd_mult"), working
    )
    leaves = [
        _Leaf(*leaf)
        for leaf in zip(
            *(
                jax.tree.leaves(tree, is_leaf=_none_or_sparse)
                for tree in (params, grads, history, master, lr_mults, wd_mults)
            )
        )
    ]
    out_params = jax.tree.leaves(new_params)
    out_history = jax.tree.leaves(new_inner[at].history)
    out_master = jax.tree.leaves(new_state.master, is_leaf=_none) if multi_precision else []
    hyper = _native.hyper_array(
        arguments["rescale_grad"], arguments["clip_gradient"], arguments[rule.epsilon]
    )
    dense: dict[tuple[jnp.dtype, bool], list[int]] = {}
    tables: dict[bool, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if _dense_eligible(leaf, rule.rowwise):
            dense.setdefault((jnp.dtype(leaf.param.dtype), _rowwise(leaf)), []).append(i)
        elif _sparse_eligible(leaf):
            tables.setdefault(_rowwise(leaf), []).append(i)
    for (dtype, rowwise), indices in dense.items():
        group = [leaves[i] for i in indices]
        with_master = group[0].master is not None
        weights, masters, histories = _partitioned_native_step(
            hyper,
            _coefficients(lr, wd, [x.lr_mult for x in group], [x.wd_mult for x in group]),
            [x.param for x in group],
            [x.grad for x in group],
            [x.master for x in group] if with_master else None,
            [x.history for x in group],
            rowwise,
            rule.form(dtype, arguments),
        )
        for k, i in enumerate(indices):
            out_params[i], out_history[i] = weights[k], histories[k]
            if with_master:
                out_master[i] = masters[k]
    for rowwise, indices in tables.items():
        group = [leaves[i] for i in indices]
        coef = _coefficients(lr, wd, [x.lr_mult for x in group], [x.wd_mult for x in group])
        decays = [rule.decay and _checks.concrete_float(wd * x.wd_mult) != 0.0 for x in group]
        coef = jnp.concatenate([coef, jnp.asarray(decays, jnp.float32)[:, None]], axis=1)
        stepped = _native.sparse_step(
            hyper,
            coef,
            [_table_operands(x) for x in group],
            rowwise,
            rule.form(jnp.float32, arguments),
        )
        for i, (weight, hist) in zip(indices, stepped):
            out_params[i], out_history[i] = weight, hist
    treedef = jax.tree.structure(params)
    history_state = inner[at]._replace(history=jax.tree.unflatten(treedef, out_history))
    new_inner = (*new_inner[:at], history_state, *new_inner[at + 1 :])
    new_params = jax.tree.unflatten(treedef, out_params)
    if not multi_precision:
        return new_params, new_inner
    return new_params, MultiPrecisionState(jax.tree.unflatten(treedef, out_master), new_inner)


def _position(chain_state: tuple[Any, ...], types: tuple[type, ...]) -> int:
    """Where in a chain's state the state of one of ``types`` is."""
    return next(i for i, s in enumerate(chain_state) if isinstance(s, types))


def _table_operands(leaf: _Leaf) -> tuple[jax.Array, ...]:
    """``(ids, bag, scale, values, weight, history)`` of a sparse leaf for ``_native.sparse_step``."""
    grad = leaf.grad
    if isinstance(grad, BagGrad):
        terms = (grad.indices, grad.bag, grad.scale, grad.bag_grads)
    else:
        empty = jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.float32)
        terms = (grad.indices, *empty, grad.values)
    return (*terms, leaf.param, leaf.history)


def _rowwise(leaf: _Leaf) -> bool:
    """Whether the leaf's history is one number per row (else one per element)."""
    return np.shape(leaf.history) != np.shape(leaf.param)


def _one_per_row(leaf: _Leaf) -> bool:
    """Whether the leaf has two or more axes and its history one number per row, of shape
    ``(rows,)`` or (GroupAdaGrad's) ``(rows, 1, ...)``."""
    shape, rows = np.shape(leaf.param), np.shape(leaf.param)[:1]
    return len(shape) >= 2 and np.shape(leaf.history) in (rows, rows + (1,) * (len(shape) - 1))


def _partitioned_native_step(
    hyper: jax.Array,
    coef: jax.Array,
    weights: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    masters: Sequence[jax.Array] | None,
    histories: Sequence[jax.Array],
    rowwise: bool,
    form: _native.Form,
) -> tuple[list[jax.Array], list[jax.Array] | None, list[jax.Array]]:
    """``_native.step`` with a sharding rule: elementwise, so each device steps its shards.

    The kernel's operands are ``hyper``, ``coef`` (both replicated), then per leaf ``weight,
    grad, [master,] history``; its results per leaf ``weight, [master,] history``. The Shardy rule
    gives all of a leaf's operands and results one factor per dimension of the weight (a row-wise
    history has the first only: passthrough, so any sharding of the weight is kept), and
    ``hyper`` and ``coef`` factors that need replication; the partition callback shards every
    operand of a leaf like its weight and runs the unpartitioned kernel on the local shards. On
    one device the kernel is called as it is.
    """
    columns = [list(weights), list(grads), *([list(masters)] if masters is not None else [])]
    columns.append(list(histories))
    width, count = len(columns), len(weights)
    operands = [x for leaf in zip(*columns) for x in leaf]
    # Each result aliases an operand: weight, [master,] history of its leaf.
    aliased = [operands[i * width + k] for i in range(count) for k in (0, *range(2, width))]

    def kernel(hyper, coef, *operands):
        local = [list(operands[k::width]) for k in range(width)]
        out = _native.step(
            hyper,
            coef,
            local[0],
            local[1],
            local[2] if width == 4 else None,
            local[-1],
            rowwise,
            form,
        )
        return tuple(x for leaf in zip(*(o for o in out if o is not None)) for x in leaf)

    def like_weight(arg_shapes, mesh, shapes):
        """Per array of ``shapes``: its leaf's weight sharding on the axes it shares with the
        weight (a row-wise history's size-1 axes are whole)."""
        weights = [arg_shapes[2 + i * width] for i in range(count)]
        per_leaf = len(shapes) // count

        def spec(weight, shape):
            return P(
                *(
                    name if size == weight.shape[d] else None
                    for d, (name, size) in enumerate(zip(weight.sharding.spec, shape))
                )
            )

        return tuple(
            NamedSharding(mesh, spec(weights[j // per_leaf], s.shape)) for j, s in enumerate(shapes)
        )

    def infer(mesh, arg_shapes, result_shape):  # GSPMD (when Shardy is turned off)
        return like_weight(arg_shapes, mesh, result_shape)

    def partition(mesh, arg_shapes, result_shape):
        replicated = NamedSharding(mesh, P())
        leaf_operands = like_weight(arg_shapes, mesh, arg_shapes[2:])
        results = like_weight(arg_shapes, mesh, result_shape)
        return mesh, kernel, results, (replicated, replicated, *leaf_operands)

    def rule(mesh, operand_types, result_types):
        def mapping(i, x):
            weight = np.shape(operands[i * width])
            return ArrayMapping(
                *(
                    f"leaf{i}_{d}" if size == weight[d] else f"leaf{i}_{d}_whole"
                    for d, size in enumerate(np.shape(x))
                )
            )

        leaf_operands = [mapping(i // width, x) for i, x in enumerate(operands)]
        return SdyShardingRule(
            (ArrayMapping("hyper"), ArrayMapping("leaf", "column"), *leaf_operands),
            tuple(mapping(i // (width - 1), x) for i, x in enumerate(aliased)),
            need_replication_factors=("hyper", "leaf", "column"),
        )

    partitioned = custom_partitioning(kernel)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    results = partitioned(hyper, coef, *operands)
    # Typed like their inputs: under Explicit mesh axes the sharding is part of the type.
    results = [_typed_like(x, like) for x, like in zip(results, aliased)]
    by_output = [results[j :: width - 1] for j in range(width - 1)]
    return by_output[0], by_output[1] if masters is not None else None, by_output[-1]


def _typed_like(result: jax.Array, operand: jax.Array) -> jax.Array:
    """``result`` with the sharding type of ``operand`` where that type names mesh axes
    (``Explicit`` axes); the data already has that sharding, so this moves nothing."""
    want = jax.typeof(operand).sharding
    if all(axis is None for axis in want.spec) or jax.typeof(result).sharding.spec == want.spec:
        return result
    return jax.sharding.reshard(result, want)


def _coefficients(
    lr: chex.Numeric, wd: chex.Numeric, lr_mults: Sequence[Any], wd_mults: Sequence[Any]
) -> jax.Array:
    """float32 ``[-lr * lr_mult, wd * wd_mult]`` per leaf, each rounded as the XLA path rounds it.

    The expressions are those of ``scale_by_schedule`` and ``add_decayed_weights`` (Python
    arithmetic, then float32), evaluated once per distinct multiplier: a tree of a thousand leaves
    with one multiplier traces two scalars, not two thousand.
    """
    cache: dict[tuple[int, Any], Any] = {}

    def value(column: int, scale: chex.Numeric, mult: Any) -> Any:
        key = (column, mult if isinstance(mult, (int, float)) else id(mult))
        if key not in cache:
            cache[key] = jnp.asarray(scale * mult, jnp.float32)
        return cache[key]

    pairs = [(value(0, -lr, a), value(1, wd, b)) for a, b in zip(lr_mults, wd_mults)]
    if not any(isinstance(x, jax.core.Tracer) for pair in pairs for x in pair):
        return jnp.asarray(np.array(pairs, np.float32))
    unique = list({id(x): x for pair in pairs for x in pair}.values())
    position = {id(x): k for k, x in enumerate(unique)}
    index = np.array([[position[id(a)], position[id(b)]] for a, b in pairs])
    return jnp.stack(unique)[index]


def _none(x: Any) -> bool:
    return x is None


def _none_or_sparse(x: Any) -> bool:
    return x is None or _checks.is_sparse(x)


def _dense_eligible(leaf: _Leaf, rowwise_variant: bool) -> bool:
    """Whether a dense kernel updates this leaf (else the XLA program does): the element-wise
    kernel where the history is element-wise (also the leaves of fewer than two axes of a
    row-wise variant), the row-wise kernel for float32 leaves of two or more axes."""
    param, grad, history, master = leaf.param, leaf.grad, leaf.history, leaf.master
    if _checks.is_sparse(grad) or not hasattr(grad, "dtype") or grad.dtype != param.dtype:
        return False
    # A leaf of one element is left to XLA, whose simplifier treats one-element steps apart
    # (it rewrites (g * r) * (g * r) into (g * g) * r**2 there, another rounding).
    if np.shape(grad) != np.shape(param) or np.size(param) <= 1:
        return False
    if jnp.dtype(history.dtype) != jnp.float32:
        return False
    if _rowwise(leaf):
        return (
            rowwise_variant
            and master is None
            and _one_per_row(leaf)
            and jnp.dtype(param.dtype) == jnp.float32
        )
    if master is None:
        return jnp.dtype(param.dtype) == jnp.float32
    return jnp.dtype(param.dtype) in _native.TARGETS


def _sparse_eligible(leaf: _Leaf) -> bool:
    """Whether the sparse kernel updates this leaf: a RowSparse or BagGrad gradient of a float32
    table (no master copy), whole on each device (the kernel has no sharding rule)."""
    param, grad = leaf.param, leaf.grad
    if not _checks.is_sparse(grad) or leaf.master is not None:
        return False
    if grad.dense_shape != np.shape(param) or np.ndim(param) < 1 or np.size(param) == 0:
        return False
    if not _native.groupable(param.shape[0], grad.indices.shape[0]):
        return False
    # A gradient of one element is left to XLA, which compiles a one-element step with other
    # contractions (and so other last bits) than the kernel's.
    if grad.indices.shape[0] * np.prod(np.shape(param)[1:], dtype=int) <= 1:
        return False
    if _rowwise(leaf) and not _one_per_row(leaf):
        return False
    operands = _table_operands(leaf)
    if any(jnp.dtype(x.dtype) != jnp.float32 for x in (*operands[2:], param)):
        return False
    if jnp.dtype(grad.indices.dtype) not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64)):
        return False
    return _native.local(*operands)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each leaf of the original pytree lives in the flat buffers (static, hashable)."""

    treedef: Any
    groups: tuple[tuple[str, float, float], ...]  # (dtype, lr_mult, wd_mult) per buffer
    leaves: tuple[tuple[int, int, tuple[int, ...]], ...]  # (buffer, offset, shape) per leaf


@jax.tree_util.register_pytree_with_keys_class
class FlatParams:
    """Parameters kept as one 1-D buffer per ``(dtype, lr_mult, wd_mult)`` group.

    A pytree whose leaves are the buffers, so optax transformations, ``jax.grad`` and
    ``jax.jit`` treat it like any parameters: the gradient of ``loss_fn(fp.unravel())`` with
    respect to ``fp`` is a :class:`FlatParams` of flat gradients, and ``tx.init(fp)`` builds flat
    optimizer state. Its key paths name the groups (``"float32"``, ``"float32/lr_mult=0.1"``...).
    Build one with :func:`ravel`.
    """

    def __init__(self, buffers: tuple[Any, ...], layout: _Layout) -> None:
        self.buffers, self.layout = tuple(buffers), layout

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(_group_name(group)) for group in self.layout.groups]
        return list(zip(keys, self.buffers)), self.layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout: _Layout, buffers: Any) -> FlatParams:
        return cls(tuple(buffers), layout)

    def unravel(self) -> Any:
        """The parameters as the pytree :func:`ravel` was given (slices of the buffers)."""
        leaves = [
            jax.lax.slice(self.buffers[b], (offset,), (offset + int(np.prod(shape)),)).reshape(
                shape
            )
            for b, offset, shape in self.layout.leaves
        ]
        return jax.tree.unflatten(self.layout.treedef, leaves)

    def ravel_like(self, tree: Any) -> FlatParams:
        """``tree`` (e.g. gradients of the unraveled parameters) flattened with this layout."""
        if jax.tree.structure(tree) != self.layout.treedef:
            _checks.fail(
                "FlatParams.ravel_like",
                "tree",
                f"a pytree with the structure {self.layout.treedef}",
                jax.tree.structure(tree),
            )
        parts: list[list[Any]] = [[] for _ in self.layout.groups]
        for (b, _, _), leaf in zip(self.layout.leaves, jax.tree.leaves(tree)):
            parts[b].append(jnp.ravel(leaf))
        return FlatParams(tuple(_concatenate(p) for p in parts), self.layout)

    @property
    def lr_mult(self) -> FlatParams:
        """Each buffer's ``lr_mult``, as the multiplier pytree ``mx_adagrad.adagrad`` takes."""
        return FlatParams(tuple(group[1] for group in self.layout.groups), self.layout)

    @property
    def wd_mult(self) -> FlatParams:
        """Each buffer's ``wd_mult``, as the multiplier pytree ``mx_adagrad.adagrad`` takes."""
        return FlatParams(tuple(group[2] for group in self.layout.groups), self.layout)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{_group_name(g)}: {np.size(b)}" for g, b in zip(self.layout.groups, self.buffers)
        )
        return f"FlatParams({len(self.layout.leaves)} leaves in {{{sizes}}})"


def _group_name(group: tuple[str, float, float]) -> str:
    dtype, lr, wd = group
    return (
        dtype
        + (f"/lr_mult={lr:g}" if lr != 1.0 else "")
        + (f"/wd_mult={wd:g}" if wd != 1.0 else "")
    )


def _concatenate(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def ravel(
    params: Any,
    *,
    lr_mult: multipliers.MultiplierSpec = None,
    wd_mult: multipliers.MultiplierSpec = None,
) -> FlatParams:
    """Flattens ``params`` into one 1-D buffer per ``(dtype, lr_mult, wd_mult)`` group.

    Leaves are grouped in order of first appearance and laid out in ``jax.tree.leaves`` order
    within a group. A group of one leaf is a reshape of it, no copy. The multipliers take every
    form :func:`mx_adagrad.adagrad` accepts and must be concrete numbers (they fix the grouping);
    pass ``fp.lr_mult`` and ``fp.wd_mult`` to the optimizer.

    Args:
      params: a pytree of floating-point arrays.
      lr_mult: per-parameter learning-rate multipliers, as in :func:`mx_adagrad.adagrad`.
      wd_mult: per-parameter weight-decay multipliers, as in :func:`mx_adagrad.adagrad`.

    Returns:
      A :class:`FlatParams`; ``fp.unravel()`` gives ``params`` back, bitwise.
    """
    _checks.floating("flat.ravel", "params", params)
    lr = jax.tree.leaves(multipliers.resolve("flat.ravel", "lr_mult", lr_mult, params))
    wd = jax.tree.leaves(multipliers.resolve("flat.ravel", "wd_mult", wd_mult, params))
    groups: dict[tuple[str, float, float], list[Any]] = {}
    sizes: dict[tuple[str, float, float], int] = {}
    leaves = []
    for path, leaf, lr_m, wd_m in zip(_checks.leaf_paths(params), jax.tree.leaves(params), lr, wd):
        values = (_checks.concrete_float(lr_m), _checks.concrete_float(wd_m))
        if None in values:
            _checks.fail(
                "flat.ravel", f"lr_mult and wd_mult[{path!r}]", "concrete numbers", (lr_m, wd_m)
            )
        key = (jnp.dtype(leaf.dtype).name, *values)
        groups.setdefault(key, []).append(leaf)
        leaves.append((list(groups).index(key), sizes.get(key, 0), np.shape(leaf)))
        sizes[key] = sizes.get(key, 0) + np.size(leaf)
    layout = _Layout(jax.tree.structure(params), tuple(groups), tuple(leaves))
    buffers = tuple(_concatenate([jnp.ravel(x) for x in members]) for members in groups.values())
    return FlatParams(buffers, layout)
