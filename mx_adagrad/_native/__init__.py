"""The native CPU kernels: built on first use, loaded, registered with XLA.

* ``adagrad.cc``, the one-pass step of :mod:`mx_adagrad.flat`: one XLA FFI handler per weight
  dtype that reads ``weight, grad, [master,] history`` once and writes ``weight, [master,]
  history`` once, for any number of parameters in one call. XLA CPU compiles the same step to two
  loops over memory (it has no multi-output loop fusion by default); the kernel is one, and it is
  bitwise equal to the XLA program of ``mx_adagrad.adagrad`` + ``apply_updates``.
* ``coalesce.cc``, the duplicate-row sum of :func:`mx_adagrad.sparse.coalesce` for float32 rows
  of a RowSparse or the terms of a BagGrad (``groups.h``): a radix sort and a sum in position
  order, bitwise equal to the XLA program (which pays for a two-operand sort).
* ``bags.cc``, the pooled lookup of :mod:`mx_adagrad.bags`: every table's bags in one call.
* ``rows.cc``, the row gather and the in-place row scatters of :mod:`mx_adagrad.sparse`: a
  ``memcpy`` (or a vectorized add) per row where XLA CPU moves one element at a time.
* ``sparse_step.cc``, the one-pass step of :mod:`mx_adagrad.flat` for RowSparse and BagGrad
  gradients of float32 tables, element-wise or row-wise, every table in one call: the terms
  grouped by row (``groups.h``), then ``step.h``'s arithmetic on each touched row, in place.

Building: the first :func:`load` in a process builds the library once into a cache directory
(:mod:`mx_adagrad._native.library`), so a later process loads it without compiling (about 12 s
the first time). ``MX_ADAGRAD_NATIVE=0`` turns the kernels off. If they cannot be built or loaded,
:func:`load` warns once and returns False, and :mod:`mx_adagrad.flat` uses its XLA path, which
computes the same bits.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mx_adagrad import _checks
from mx_adagrad._native.library import load_library

# XLA's compile time grows with the square of a custom call's operand count (20 s for one call
# of 1000 leaves, 1 s for 16 calls of 64): larger trees are split into several calls.
MAX_LEAVES_PER_CALL = 64
# The sparse kernels pack a row and a position in one 64-bit word (groups.h): tables of fewer rows,
# gradients of fewer terms than this.
MAX_GROUPED = 2**32 - 1


def groupable(num_rows: int, terms: int) -> bool:
    """Whether the grouping kernels take a table of ``num_rows`` rows and ``terms`` terms."""
    return num_rows < MAX_GROUPED and terms < MAX_GROUPED


# FFI target name and exported handler symbol, per weight dtype.
TARGETS = {
    jnp.dtype(jnp.float32): ("mx_adagrad_step_f32", "MxAdagradStepF32"),
    jnp.dtype(jnp.bfloat16): ("mx_adagrad_step_bf16", "MxAdagradStepBF16"),
    jnp.dtype(jnp.float16): ("mx_adagrad_step_f16", "MxAdagradStepF16"),
}
ROWWISE_TARGET = ("mx_adagrad_rowwise_step_f32", "MxAdagradRowwiseStepF32")
COALESCE_TARGET = ("mx_adagrad_coalesce_f32", "MxAdagradCoalesceF32")
COALESCE_BAGS_TARGET = ("mx_adagrad_coalesce_bags_f32", "MxAdagradCoalesceBagsF32")
SPARSE_STEP_TARGET = ("mx_adagrad_sparse_step_f32", "MxAdagradSparseStepF32")
BAG_POOL_TARGET = ("mx_adagrad_bag_pool_f32", "MxAdagradBagPoolF32")
BAG_TERMS_TARGET = ("mx_adagrad_bag_terms_f32", "MxAdagradBagTermsF32")
ROWS_TARGETS = {
    "gather": ("mx_adagrad_gather_rows", "MxAdagradGatherRows"),
    "scatter": ("mx_adagrad_scatter_rows", "MxAdagradScatterRows"),
    "scatter_add": ("mx_adagrad_scatter_add_rows_f32", "MxAdagradScatterAddRowsF32"),
}


@functools.cache
def load() -> bool:
    """Builds (if not cached), loads and registers the kernel once per process.

    Returns:
      True when the FFI targets are registered for the CPU platform; False (with one warning
      saying why) when the kernel is turned off or cannot be built or loaded.
    """
    if os.environ.get("MX_ADAGRAD_NATIVE", "1") == "0":
        return False
    try:
        library = load_library()
        for target, symbol in (
            *TARGETS.values(),
            ROWWISE_TARGET,
            COALESCE_TARGET,
            COALESCE_BAGS_TARGET,
            SPARSE_STEP_TARGET,
            BAG_POOL_TARGET,
            BAG_TERMS_TARGET,
            *ROWS_TARGETS.values(),
        ):
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
    except Exception as error:  # any failure means: use the XLA path, and say so once
        warnings.warn(
            f"mx_adagrad: the native CPU kernel is unavailable ({error}); using the XLA path, "
            "which gives the same results more slowly",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


class Form(NamedTuple):
    """What a step kernel computes (its call's attributes; ``step.h``'s ``Rule``).

    Attributes:
      rescale_fma: XLA CPU contracts ``g * rescale_grad + wd * w`` on the rescale's multiply
        (:func:`rescale_fma`).
      decay: the step has a weight-decay term (a sparse step also drops it per table, where the
        decay is a concrete 0).
      eps_inside: divide by ``sqrt(history + epsilon)`` (MXNet 1.x, GroupAdaGrad), not
        ``sqrt(history) + epsilon``.
      decay_after: MXNet 1.x's weight decay, ``g / root + wd * w``, outside the history.
      fold_rescale: the rescale is a constant other than 1 and nothing clips the gradient:
        without a decay term, XLA folds it into the row-wise step's reciprocal root
        (:func:`fold_rescale`).
    """

    rescale_fma: bool
    decay: bool = True
    eps_inside: bool = False
    decay_after: bool = False
    fold_rescale: bool = False

    def attributes(self) -> dict[str, np.int64]:
        return {name: np.int64(value) for name, value in self._asdict().items()}


def step(
    hyper: jax.Array,
    coef: jax.Array,
    weights: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    masters: Sequence[jax.Array] | None,
    histories: Sequence[jax.Array],
    rowwise: bool,
    form: Form,
) -> tuple[list[jax.Array], list[jax.Array] | None, list[jax.Array]]:
    """One in-place AdaGrad step of same-dtype leaves (CPU only), in calls of at most
    ``MAX_LEAVES_PER_CALL`` leaves.

    Args:
      hyper: the operand :func:`hyper_array` makes.
      coef: float32 ``[n, 2]``: ``-learning_rate * lr_mult`` and ``wd * wd_mult`` per leaf.
      weights: n weights of one dtype (float32; float16/bfloat16 with ``masters``).
      grads: n gradients, each of its weight's shape and dtype.
      masters: n float32 master copies (multi_precision), or None for float32 weights.
      histories: n float32 histories: of the weight's shape, or with ``rowwise`` one number per
        row of a float32 weight of two or more axes (``adagrad.cc``'s row-wise step).
      rowwise: row-wise AdaGrad (float32, no masters).
      form: the variant of the step.

    Returns:
      ``(weights, masters, histories)`` after the step; each output aliases its input, so with
      donated buffers the step writes in place.
    """
    target = ROWWISE_TARGET[0] if rowwise else TARGETS[jnp.dtype(weights[0].dtype)][0]
    columns = [weights, grads, *([masters] if masters is not None else []), histories]
    width, outputs = len(columns), len(columns) - 1
    results: list[jax.Array] = []
    for start in range(0, len(weights), MAX_LEAVES_PER_CALL):
        leaves = list(zip(*(c[start : start + MAX_LEAVES_PER_CALL] for c in columns)))
        # Operands: hyper, coef, then per leaf (weight, grad, [master,] history); results per
        # leaf (weight, [master,] history), each aliasing its operand.
        aliases = {
            2 + i * width + k: i * outputs + j
            for i in range(len(leaves))
            for j, k in enumerate([0, *range(2, width)])
        }
        shapes = [
            jax.ShapeDtypeStruct(x.shape, x.dtype) for leaf in leaves for x in (leaf[0], *leaf[2:])
        ]
        results += jax.ffi.ffi_call(target, shapes, input_output_aliases=aliases)(
            hyper,
            coef[start : start + MAX_LEAVES_PER_CALL],
            *(x for leaf in leaves for x in leaf),
            **form.attributes(),
        )
    by_output = [results[j::outputs] for j in range(outputs)]
    return by_output[0], by_output[1] if masters is not None else None, by_output[-1]


def hyper_array(
    rescale_grad: chex.Numeric, clip_gradient: chex.Numeric | None, epsilon: chex.Numeric
) -> jax.Array:
    """The step kernels' ``hyper`` operand, float32 ``[rescale_grad, clip_gradient (inf: none),
    epsilon]``, each rounded as the XLA path rounds it."""
    clip = np.inf if clip_gradient is None else clip_gradient
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in (rescale_grad, clip, epsilon)])


def rescale_fma(dtype: Any, rescale_grad: chex.Numeric, clip_gradient: chex.Numeric | None) -> bool:
    """Which multiply XLA CPU contracts with the add in ``g * rescale_grad + wd * w`` for weights
    of ``dtype``: the rescale's (True) when the gradient is not clipped, the rescale is not a
    constant 1 (XLA drops a multiplication by a constant 1, leaving ``g + wd * w``) and the
    gradient is not a bfloat16 converted to float32 (LLVM then contracts the decay's multiply
    instead). Measured with jaxlib 0.10.2 and pinned by ``tests/test_native.py``, which compares
    the kernels with XLA bit for bit.
    """
    rescale = _checks.concrete_float(rescale_grad)
    return (
        clip_gradient is None
        and (rescale is None or np.float32(rescale) != 1.0)
        and jnp.dtype(dtype) != jnp.bfloat16
    )


def fold_rescale(rescale_grad: chex.Numeric, clip_gradient: chex.Numeric | None) -> bool:
    """Whether XLA CPU rewrites ``(g * rescale_grad) * reciprocal`` (the row-wise update of a
    step without weight decay) into ``g * (reciprocal * rescale_grad)``: for a constant rescale
    other than 1 with no clipping in between (measured with jaxlib 0.10.2, pinned by
    ``tests/test_flat.py``)."""
    rescale = _checks.concrete_float(rescale_grad)
    return clip_gradient is None and rescale is not None and np.float32(rescale) != 1.0


def coalesce(indices: jax.Array, values: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``coalesce.cc``'s duplicate-row sum (CPU only): ``(ids, rows)`` as
    :func:`mx_adagrad.sparse.coalesce` computes them, for float32 ``values`` of shape ``(n, ...)``
    and int32/int64 ``indices`` of shape ``(n,)``."""
    indices, values = _varying_alike(indices, values)
    shapes = (jax.ShapeDtypeStruct.like(indices), jax.ShapeDtypeStruct.like(values))
    call = jax.ffi.ffi_call(COALESCE_TARGET[0], shapes, vmap_method="sequential")
    return call(indices, values, num_rows=np.int64(num_rows))


def local(*arrays: jax.Array) -> bool:
    """Whether a call on ``arrays`` runs whole on each device: outside ``jit`` over a mesh, or
    inside ``jax.shard_map`` over every mesh axis of size > 1.

    The kernels have no sharding rule: where XLA partitions the program (a mesh axis that is
    ``Auto`` or ``Explicit``), it would replicate their operands to call them, gathering a sharded
    table onto every device. There the XLA program runs instead, which XLA partitions.
    """
    for x in arrays:
        mesh = jax.typeof(x).sharding.mesh
        for kind, size in zip(mesh.axis_types, mesh.axis_sizes):
            if size > 1 and kind != jax.sharding.AxisType.Manual:
                return False
    return True


def _varying_alike(*operands: jax.Array) -> list[jax.Array]:
    """Inside ``jax.shard_map``: the operands, each marked as varying over every mesh axis that
    any of them varies over, so the call's results can be typed like them (outside: as given)."""
    axes = set().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    return [
        jax.lax.pcast(x, tuple(axes - jax.typeof(x).manual_axis_type.varying), to="varying")
        if axes - jax.typeof(x).manual_axis_type.varying
        else x
        for x in operands
    ]


def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``rows.cc``'s gather (CPU only): ``table[ids]``, zeros for ids outside the table."""
    table, ids = _varying_alike(table, ids)
    rows = jax.ShapeDtypeStruct.like(table).update(shape=(ids.shape[0], *table.shape[1:]))
    return jax.ffi.ffi_call(ROWS_TARGETS["gather"][0], rows, vmap_method="sequential")(table, ids)


def scatter_rows(table: jax.Array, ids: jax.Array, rows: jax.Array, add: bool) -> jax.Array:
    """``rows.cc``'s in-place scatter (CPU only): ``table.at[ids].set(rows, mode="drop")``, or
    ``.add`` with ``add`` (float32 only). The result aliases ``table``: with a donated table the
    rows are written where it lies."""
    table, ids, rows = _varying_alike(table, ids, rows)
    target = ROWS_TARGETS["scatter_add" if add else "scatter"][0]
    call = jax.ffi.ffi_call(
        target,
        jax.ShapeDtypeStruct.like(table),
        input_output_aliases={0: 0},
        vmap_method="sequential",
    )
    return call(table, ids, rows)


def coalesce_bags(
    indices: jax.Array, bag: jax.Array, scale: jax.Array, bag_grads: jax.Array, num_rows: int
) -> tuple[jax.Array, jax.Array]:
    """``coalesce.cc``'s duplicate-row sum of a BagGrad (CPU only): ``(ids, rows)`` as
    :func:`mx_adagrad.sparse.coalesce` computes them from int32/int64 ``indices (n,)``, int32
    ``bag (n,)``, float32 ``scale (n,)`` and float32 ``bag_grads (bags, width)``."""
    indices, bag, scale, bag_grads = _varying_alike(indices, bag, scale, bag_grads)
    rows = jax.ShapeDtypeStruct.like(bag_grads).update(shape=(indices.shape[0], bag_grads.shape[1]))
    call = jax.ffi.ffi_call(
        COALESCE_BAGS_TARGET[0],
        (jax.ShapeDtypeStruct.like(indices), rows),
        vmap_method="sequential",
    )
    return call(indices, bag, scale, bag_grads, num_rows=np.int64(num_rows))


def bag_terms(
    ids: jax.Array, offsets: jax.Array, weights: jax.Array, num_rows: int, mean: bool
) -> tuple[jax.Array, jax.Array]:
    """``bags.cc``'s bag of each id and its scale (CPU only), as
    :func:`mx_adagrad.bags._bag_terms_xla` computes them: int32 ``bag (n,)``, the number of
    ``offsets[1:]`` at or below each position, and float32 ``scale (n,)``: ``weights`` (1 when
    ``weights`` has size 0), or with ``mean`` one over the bag's count of ids in ``[0,
    num_rows)``; 0 at the other ids."""
    ids, offsets, weights = _varying_alike(ids, offsets, weights)
    shapes = (
        jax.ShapeDtypeStruct.like(ids).update(dtype=jnp.int32),
        jax.ShapeDtypeStruct.like(ids).update(dtype=jnp.float32),
    )
    call = jax.ffi.ffi_call(BAG_TERMS_TARGET[0], shapes, vmap_method="sequential")
    return call(ids, offsets, weights, num_rows=np.int64(num_rows), mean=np.int64(mean))


def bag_pool(
    lookups: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
) -> list[jax.Array]:
    """``bags.cc``'s pooled lookup of several tables in one call (CPU only).

    Args:
      lookups: per table ``(table, ids, offsets, scale)``: a float32 table ``(rows, width)``,
        int32/int64 ``ids (n,)`` and ``offsets (bags + 1,)``, float32 ``scale (n,)``.

    Returns:
      Per table the float32 ``(bags, width)`` sums of ``scale[i] * table[ids[i]]`` over each
      bag's valid ids.
    """
    operands = _varying_alike(*(x for lookup in lookups for x in lookup))
    shapes = [
        jax.ShapeDtypeStruct.like(table).update(shape=(offsets.shape[0] - 1, table.shape[1]))
        for table, _, offsets, _ in zip(*[iter(operands)] * 4)
    ]
    return list(jax.ffi.ffi_call(BAG_POOL_TARGET[0], shapes)(*operands))


def sparse_step(
    hyper: jax.Array,
    coef: jax.Array,
    tables: Sequence[tuple[jax.Array, ...]],
    rowwise: bool,
    form: Form,
) -> list[tuple[jax.Array, jax.Array]]:
    """``sparse_step.cc`` (CPU only): one AdaGrad step of float32 tables on their sparse
    gradients, all tables in one call, written in place of the touched rows.

    Args:
      hyper: the operand :func:`hyper_array` makes.
      coef: float32 ``[tables, 3]``: ``-learning_rate * lr_mult``, ``wd * wd_mult``, and 1 where
        the step has a decay term (0 where the weight decay is a concrete 0).
      tables: per table ``(ids, bag, scale, values, weight, history)``: int32/int64 ``ids (n,)``;
        for a BagGrad int32 ``bag (n,)``, float32 ``scale (n,)`` and ``values (bags, width)``,
        for a RowSparse ``bag`` and ``scale`` of size 0 and ``values (n, width)``; the float32
        ``weight``; its ``history``: of the weight's shape, or ``(rows,)`` with ``rowwise``.
      rowwise: row-wise AdaGrad (one history number per row).
      form: the variant of the step.

    Returns:
      Per table ``(weight, history)``, aliasing the operands: with donated buffers the step
      writes in place.
    """
    operands = _varying_alike(hyper, coef, *(x for table in tables for x in table))
    aliases = {2 + 6 * i + k: 2 * i + j for i in range(len(tables)) for j, k in ((0, 4), (1, 5))}
    shapes = [
        jax.ShapeDtypeStruct.like(x)
        for i in range(len(tables))
        for x in operands[2 + 6 * i + 4 : 2 + 6 * i + 6]
    ]
    call = jax.ffi.ffi_call(
        SPARSE_STEP_TARGET[0], shapes, input_output_aliases=aliases, vmap_method="sequential"
    )
    results = call(*operands, rowwise=np.int64(rowwise), **form.attributes())
    return list(zip(results[::2], results[1::2]))
