"""Opt-in fast paths: a fused AdaGrad step (update and apply in one call), and flat parameters.

``mx_adagrad.adagrad`` is an optax transformation: ``update`` returns updates and
``apply_updates`` adds them. Under ``jax.jit`` XLA fuses the two, but XLA CPU still makes two
passes over memory per parameter (it has no multi-output loop fusion by default: one loop writes
the history, the next reads it back to write the weight). And every leaf is its own pair of loops
and its own three arrays crossing the ``jit`` boundary: with a thousand small leaves that overhead
costs ten times the arithmetic. This module offers two opt-in remedies, each bitwise equal to
``mx_adagrad.adagrad`` + ``apply_updates``:

* :func:`fused_adagrad`: ``step(params, grads, state) -> (params, state)``, with the optimizer
  state of ``mx_adagrad.adagrad`` (the same pytree: one history per parameter, plus the float32
  master copies with ``multi_precision``; checkpoints and the two APIs are interchangeable). On the
  CPU backend it updates every dense float32 leaf (and, with ``multi_precision``, every
  float16/bfloat16 leaf) in one pass over memory, up to 64 leaves per native call
  (:mod:`mx_adagrad._native`); anywhere else (GPU, TPU, no C++ compiler, RowSparse gradients,
  other dtypes) it is the XLA program of ``mx_adagrad.adagrad``. The native call has a sharding
  rule: with parameters placed over a device mesh, each device steps its own shards, with no
  collective and every sharding kept.
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

from mx_adagrad import _checks, _native, alias, multipliers, transforms
from mx_adagrad.lr_scheduler import LRScheduler
from mx_adagrad.precision import MultiPrecisionState
from mx_adagrad.transforms import ScaleByAdagradState
from mx_adagrad.updates import apply_updates


class FusedAdaGrad(NamedTuple):
    """What :func:`fused_adagrad` returns.

    Attributes:
      init: ``init(params) -> state``, the ``init`` of ``tx``.
      step: ``step(params, grads, state) -> (params, state)``, one update applied.
      tx: the equivalent ``mx_adagrad.adagrad`` transformation (same arguments, same state).
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
    writes in place. On the CPU backend, with ``native=True`` and the kernel available
    (:mod:`mx_adagrad._native` builds it on first use), the dense float32 leaves, and with
    ``multi_precision`` the float16/bfloat16 leaves with float32 gradients of their dtype, are
    updated by one native call that reads weight, gradient and history once and writes weight and
    history once (20 bytes per float32 parameter; XLA's two loops move 32). Every other leaf
    (RowSparse gradients, float64, float16 without ``multi_precision``) and every other backend
    runs the XLA program of ``tx``. ``optax.inject_hyperparams`` does not apply here: use ``tx``
    for traced hyperparameters.

    Sharded parameters: the native call is partitioned like an elementwise operation
    (``jax.experimental.custom_partitioning`` with a Shardy rule that maps every leaf's
    operands and results to the same factors). Under ``jax.jit`` with parameters placed with
    ``NamedSharding`` (``Explicit`` or ``Auto`` mesh axes), each device runs the kernel on its
    own shards: the step compiles to no collective operation and keeps every sharding, and its
    bits are those of the one-device step.

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
      native: use the native kernel on CPU when it is available; False: always the XLA program.

    Returns:
      A :class:`FusedAdaGrad` ``(init, step, tx)``.
    """
    if not isinstance(native, bool):
        _checks.fail("fused_adagrad", "native", "a bool", native)
    learning_rate = alias.resolve_learning_rate("fused_adagrad", learning_rate, lr_scheduler)
    tx = alias.adagrad(
        learning_rate,
        epsilon,
        rescale_grad=rescale_grad,
        clip_gradient=clip_gradient,
        wd=wd,
        lr_mult=lr_mult,
        wd_mult=wd_mult,
        begin_num_update=begin_num_update,
        initial_accumulator_value=initial_accumulator_value,
        multi_precision=multi_precision,
        sparse_wd=sparse_wd,
    )

    def native_step(params, grads, state, reference):
        """The reference step with every eligible leaf replaced by the native kernel's result."""
        new_params, new_state = reference
        inner, new_inner = (
            (state.inner_state, new_state.inner_state) if multi_precision else (state, new_state)
        )
        history = inner[3].history
        master = state.master if multi_precision else jax.tree.map(lambda _: None, params)
        working = jax.tree.map(lambda p, m: p if m is None else m, params, master, is_leaf=_none)
        lr = transforms.learning_rate_at(learning_rate, inner[4].count, begin_num_update)
        # As scale_by_schedule and add_decayed_weights resolve them (same trees, same order).
        lr_mults = multipliers.resolve("scale_by_schedule", "lr_mult", lr_mult, history)
        wd_mults = multipliers.resolve("add_decayed_weights", "wd_mult", wd_mult, working)
        # One (param, grad, history, master, lr_mult, wd_mult) per leaf; a RowSparse is one leaf.
        leaves = list(
            zip(
                *(
                    jax.tree.leaves(tree, is_leaf=_none_or_row_sparse)
                    for tree in (params, grads, history, master, lr_mults, wd_mults)
                )
            )
        )
        out_params = jax.tree.leaves(new_params)
        out_history = jax.tree.leaves(new_inner[3].history)
        out_master = jax.tree.leaves(new_state.master, is_leaf=_none) if multi_precision else []
        groups: dict[jnp.dtype, list[int]] = {}
        for i, leaf in enumerate(leaves):
            if _eligible(*leaf[:4]):
                groups.setdefault(jnp.dtype(leaf[0].dtype), []).append(i)
        for dtype, indices in groups.items():
            weight, grad, hist, mast, lr_m, wd_m = zip(*(leaves[i] for i in indices))
            with_master = mast[0] is not None
            weights, masters, histories = _partitioned_native_step(
                _native.hyper_array(dtype, rescale_grad, clip_gradient, epsilon),
                _coefficients(lr, wd, lr_m, wd_m),
                weight,
                grad,
                mast if with_master else None,
                hist,
            )
            for k, i in enumerate(indices):
                out_params[i], out_history[i] = weights[k], histories[k]
                if with_master:
                    out_master[i] = masters[k]
        for i, (weight, grad, hist, mast, lr_m, wd_m) in enumerate(leaves):
            if _sparse_eligible(weight, grad, hist, mast):
                out_params[i], out_history[i] = _native.sparse_step(
                    _native.hyper_array(jnp.float32, rescale_grad, clip_gradient, epsilon),
                    _coefficients(lr, wd, [lr_m], [wd_m])[0],
                    grad.indices,
                    grad.values,
                    weight,
                    hist,
                )
        treedef = jax.tree.structure(params)
        history_state = ScaleByAdagradState(jax.tree.unflatten(treedef, out_history))
        new_inner = (*new_inner[:3], history_state, *new_inner[4:])
        new_params = jax.tree.unflatten(treedef, out_params)
        if not multi_precision:
            return new_params, new_inner
        return new_params, MultiPrecisionState(jax.tree.unflatten(treedef, out_master), new_inner)

    def step(params, grads, state):
        updates, new_state = tx.update(grads, state, params)
        reference = (apply_updates(params, updates), new_state)
        if not native or not _native.load():
            return reference
        # Lowered for CPU, only the native branch is compiled, and XLA drops the reference's
        # computations for the leaves the kernel replaced; elsewhere only the reference is.
        return jax.lax.platform_dependent(
            cpu=lambda: native_step(params, grads, state, reference), default=lambda: reference
        )

    alias.record(tx, **alias.recorded(tx), native=native)  # adagrad recorded the rest
    return FusedAdaGrad(tx.init, step, tx)


def one_pass(tx: Any) -> FusedAdaGrad | None:
    """The one-pass form of ``tx``, or None when it has none.

    ``tx`` itself when it is a :class:`FusedAdaGrad`; ``fused_adagrad(...)`` of the same
    arguments when ``tx`` is what ``mx_adagrad.adagrad(...)`` returned (or the ``.tx`` of a
    :class:`FusedAdaGrad`); None for any other transformation (``legacy.adagrad``,
    ``rowwise_adagrad``, optax's). The result's ``step`` is bitwise ``tx.update`` followed by
    ``mx_adagrad.apply_updates``, with the same state.
    """
    if isinstance(tx, FusedAdaGrad):
        return tx
    arguments = alias.recorded(tx)
    return None if arguments is None else fused_adagrad(**arguments)


def _partitioned_native_step(
    hyper: jax.Array,
    coef: jax.Array,
    weights: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    masters: Sequence[jax.Array] | None,
    histories: Sequence[jax.Array],
) -> tuple[list[jax.Array], list[jax.Array] | None, list[jax.Array]]:
    """``_native.step`` with a sharding rule: elementwise, so each device steps its shards.

    The kernel's operands are ``hyper``, ``coef`` (both replicated), then per leaf ``weight,
    grad, [master,] history``; its results per leaf ``weight, [master,] history``. The Shardy rule
    gives all of a leaf's operands and results one factor per dimension (passthrough: any
    sharding of the weight is kept), and ``hyper`` and ``coef`` factors that need replication;
    the partition callback shards every operand of a leaf like its weight and runs the
    unpartitioned kernel on the local shards. On one device the kernel is called as it is.
    """
    columns = [list(weights), list(grads), *([list(masters)] if masters is not None else [])]
    columns.append(list(histories))
    width, count = len(columns), len(weights)

    def kernel(hyper, coef, *operands):
        local = [list(operands[k::width]) for k in range(width)]
        out = _native.step(
            hyper, coef, local[0], local[1], local[2] if width == 4 else None, local[-1]
        )
        return tuple(x for leaf in zip(*(o for o in out if o is not None)) for x in leaf)

    def leaf_shardings(arg_shapes):
        return [arg_shapes[2 + i * width].sharding for i in range(count)]

    def infer(mesh, arg_shapes, result_shape):  # GSPMD (when Shardy is turned off)
        return tuple(s for s in leaf_shardings(arg_shapes) for _ in range(width - 1))

    def partition(mesh, arg_shapes, result_shape):
        shardings = leaf_shardings(arg_shapes)
        replicated = NamedSharding(mesh, P())
        operands = (replicated, replicated, *(s for s in shardings for _ in range(width)))
        results = tuple(s for s in shardings for _ in range(width - 1))
        return mesh, kernel, results, operands

    def rule(mesh, operand_types, result_types):
        leaves = [
            ArrayMapping(*(f"leaf{i}_{d}" for d in range(w.ndim))) for i, w in enumerate(weights)
        ]
        return SdyShardingRule(
            (
                ArrayMapping("hyper"),
                ArrayMapping("leaf", "column"),
                *(m for m in leaves for _ in range(width)),
            ),
            tuple(m for m in leaves for _ in range(width - 1)),
            need_replication_factors=("hyper", "leaf", "column"),
        )

    partitioned = custom_partitioning(kernel)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    results = partitioned(hyper, coef, *(x for leaf in zip(*columns) for x in leaf))
    # Typed like their inputs: under Explicit mesh axes the sharding is part of the type.
    results = [_typed_like(x, columns[0][i // (width - 1)]) for i, x in enumerate(results)]
    by_output = [results[j :: width - 1] for j in range(width - 1)]
    return by_output[0], by_output[1] if masters is not None else None, by_output[-1]


def _typed_like(result: jax.Array, weight: jax.Array) -> jax.Array:
    """``result`` with the sharding type of ``weight`` where that type names mesh axes
    (``Explicit`` axes); the data already has that sharding, so this moves nothing."""
    want = jax.typeof(weight).sharding
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


def _none_or_row_sparse(x: Any) -> bool:
    return x is None or _checks.is_row_sparse(x)


def _eligible(param: Any, grad: Any, history: Any, master: Any) -> bool:
    """Whether the native kernel updates this leaf (else the XLA program does)."""
    if _checks.is_row_sparse(grad) or not hasattr(grad, "dtype") or grad.dtype != param.dtype:
        return False
    if np.shape(grad) != np.shape(param) or np.size(param) == 0:
        return False
    if jnp.dtype(history.dtype) != jnp.float32:
        return False
    if master is None:
        return jnp.dtype(param.dtype) == jnp.float32
    return jnp.dtype(param.dtype) in _native.TARGETS


def _sparse_eligible(param: Any, grad: Any, history: Any, master: Any) -> bool:
    """Whether the sparse kernel updates this leaf: a RowSparse gradient of a float32 table with
    an element-wise history, whole on each device (the kernel has no sharding rule)."""
    if not _checks.is_row_sparse(grad) or master is not None:
        return False
    if grad.dense_shape != np.shape(param) or np.ndim(param) < 1 or np.size(param) == 0:
        return False
    if np.shape(history) != np.shape(param) or grad.indices.shape[0] == 0:
        return False
    dtypes = (param.dtype, grad.values.dtype, history.dtype)
    if any(jnp.dtype(d) != jnp.float32 for d in dtypes):
        return False
    return _native.local(param, history, grad.indices, grad.values)


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
