"""Row-sparse gradients: MXNet's ``row_sparse`` storage for embedding tables, as a JAX pytree.

An embedding lookup touches a few thousand rows of a table with millions. Its gradient, as a
:class:`RowSparse` leaf, holds only those rows: ``indices`` (which rows, duplicates allowed and
meaning "sum these", any order) and ``values`` (one row of gradient each). The transforms of this
package accept RowSparse leaves next to dense ones and update only the rows present::

    ids, rows = coalesce(grad)            # once: sort, sum duplicates (segment-sum), pad
    rows = clip(rescale_grad * rows)      # the summed rows, as the dense path would see them
    rows = rows + wd * weight[ids]        # lazy weight decay, touched rows only
    history[ids] += rows**2               # gather, update, scatter: O(rows touched)
    update[ids] = -lr * rows / (sqrt(history[ids]) + epsilon)
    weight[ids] += update[ids]            # apply_updates: one scatter

Shapes stay static under ``jax.jit``: a gradient with ``n`` index slots is coalesced into ``n``
slots, the unique ids first and padding after. Padding slots carry the id ``num_rows`` (one past
the table) and zero values; gathers read zeros there and scatters drop them, so padding touches
nothing. Ids that are negative or ``>= num_rows`` are treated like padding under ``jit`` (they
update nothing); with concrete values they are an error, and :func:`~mx_adagrad.check_indices` reports them
inside ``jit`` through ``jax.experimental.checkify``.

MXNet equivalent: ``mx.nd.sparse.row_sparse_array`` gradients and ``AdaGrad.fused_step``'s sparse
kernel (``_sparse_adagrad_update``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from mx_adagrad import _checks, _native


@jax.tree_util.register_pytree_node_class
class RowSparse(_checks.SparseLeaf):
    """A gradient (or update) that is zero outside the rows ``indices``.

    ``dense = zeros(dense_shape); dense[indices[i]] += values[i]`` for every ``i``.

    Args:
      indices: int32 or int64 array of shape ``(n,)``; duplicates are summed; any order.
      values: array of shape ``(n, *dense_shape[1:])``.
      dense_shape: the shape of the parameter (the table), static.
      unique: static; True when ``indices`` are known sorted and unique, with padding slots
        (``indices == dense_shape[0]``, zero values) at the end. Set by :func:`~mx_adagrad.sparse.coalesce`.

    MXNet equivalent: ``mx.nd.sparse.row_sparse_array((values, indices), shape=dense_shape)``.
    """

    def __init__(
        self,
        indices: chex.Array,
        values: chex.Array,
        dense_shape: Sequence[int],
        unique: bool = False,
    ) -> None:
        indices, values = jnp.asarray(indices), jnp.asarray(values)
        where = "RowSparse"
        if not (
            isinstance(dense_shape, (tuple, list))
            and len(dense_shape) >= 1
            and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dense_shape)
        ):
            _checks.fail(
                where, "dense_shape", "a tuple of ints >= 0 with at least one entry", dense_shape
            )
        dense_shape = tuple(int(d) for d in dense_shape)
        if not jnp.issubdtype(indices.dtype, jnp.integer) or indices.ndim != 1:
            _checks.fail(
                where,
                "indices",
                "a 1-D integer array",
                _checks.shown(f"{indices.dtype}{list(indices.shape)}"),
            )
        expected = (indices.shape[0], *dense_shape[1:])
        if values.shape != expected:
            _checks.fail(
                where, "values", f"of shape {expected}", _checks.shown(f"shape {values.shape}")
            )
        self.indices, self.values, self.dense_shape, self.unique = (
            indices,
            values,
            dense_shape,
            unique,
        )
        _check_concrete_indices(where, "indices", indices, dense_shape[0])

    def tree_flatten(self):
        return (self.indices, self.values), (self.dense_shape, self.unique)

    @classmethod
    def tree_unflatten(cls, aux, children):
        sparse = object.__new__(cls)
        sparse.indices, sparse.values = children
        sparse.dense_shape, sparse.unique = aux
        return sparse

    @property
    def dtype(self):
        return self.values.dtype

    def replace_values(self, values: chex.Array) -> RowSparse:
        """The same rows with other values (same slots, same padding)."""
        return RowSparse.tree_unflatten((self.dense_shape, self.unique), (self.indices, values))

    def todense(self) -> jax.Array:
        """The dense array (for tests and small tables; it materializes ``dense_shape``)."""
        zeros = jnp.zeros(self.dense_shape, self.values.dtype)
        return zeros.at[_padded(self.indices, self.dense_shape[0])].add(self.values, mode="drop")

    def __repr__(self) -> str:
        return (
            f"RowSparse(indices={self.indices!r}, values={self.values!r}, "
            f"dense_shape={self.dense_shape}, unique={self.unique})"
        )


def _check_concrete_indices(where: str, name: str, indices: chex.Array, num_rows: int) -> None:
    """With concrete ids, a negative or too-large id is an error naming it; traced ids pass."""
    if isinstance(indices, jax.core.Tracer):
        return
    ids = np.asarray(indices)
    bad = ids[(ids < 0) | (ids >= num_rows)]
    if bad.size:
        _checks.fail(where, name, f"row ids in [0, {num_rows})", _checks.shown(f"id {int(bad[0])}"))


def coalesce(grad: _checks.SparseLeaf) -> RowSparse:
    """Sorts the ids and sums duplicate rows (a segment-sum), keeping the static slot count.

    ::

        ids = unique(indices)                         # sorted, padded to n slots with num_rows
        values[k] = sum(values[i] for i where indices[i] == ids[k])   # in order of i, from +0.0

    Out-of-range ids (negative or ``>= num_rows``) become padding. The sum is a sequential
    reduction in the order of the positions, so the same input gives bitwise the same output. On
    the CPU backend, float32 rows are summed by a native kernel (``mx_adagrad._native``) that
    computes the same bits as the XLA program below, without its sort. A RowSparse that is already
    coalesced is returned as is; a :class:`~mx_adagrad.BagGrad` is summed by its own
    ``coalesce`` (the same rows as coalescing its expanded RowSparse).
    """
    if not isinstance(grad, RowSparse):
        return grad.coalesce()
    if grad.unique:
        return grad
    num_rows = grad.dense_shape[0]
    ids, summed = _native_on_cpu(
        functools.partial(_native.coalesce, num_rows=num_rows),
        functools.partial(_coalesce_xla, num_rows=num_rows),
        grad.indices,
        grad.values,
        # One slot is left to XLA, which turns that scatter-add into a copy (keeping a -0.0).
        eligible=grad.values.dtype == jnp.float32
        and grad.indices.shape[0] > 1
        and _native.groupable(num_rows, grad.indices.shape[0]),
    )
    return RowSparse.tree_unflatten((grad.dense_shape, True), (ids, summed))


def _native_on_cpu(
    native: Callable[..., Any], xla: Callable[..., Any], *args: chex.Array, eligible: bool
) -> Any:
    """``native(*args)`` when the program runs on the CPU backend, the kernels are built and the
    arrays are whole on each device (:func:`mx_adagrad._native.local`); else ``xla(*args)``, which
    computes the same bits. ``eligible``: whether the kernel handles these dtypes and shapes."""
    if eligible and _native.load() and _native.local(*args):
        return jax.lax.platform_dependent(*args, cpu=native, default=xla)
    return xla(*args)


def _padded(ids: chex.Array, num_rows: int) -> chex.Array:
    """``ids`` with every id outside ``[0, num_rows)`` replaced by ``num_rows``, so that XLA's
    gathers (``mode="fill"``) and scatters (``mode="drop"``) skip it: they count a negative index
    from the end."""
    return jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)


def _coalesce_xla(
    indices: chex.Array, values: chex.Array, num_rows: int
) -> tuple[chex.Array, chex.Array]:
    """:func:`~mx_adagrad.sparse.coalesce` in XLA operations, for every backend.

    The ids are sorted alone (a sort that carries a second operand, as ``jnp.unique`` and
    ``argsort`` emit, costs several times more on XLA CPU), the distinct ones compacted to the
    front, and each position finds its slot by binary search.
    """
    n = indices.shape[0]
    valid = (indices >= 0) & (indices < num_rows)
    indices = _padded(indices, num_rows)
    ordered = jnp.sort(indices)
    first = jnp.concatenate([jnp.ones(min(n, 1), bool), ordered[1:] != ordered[:-1]])
    ids = jnp.full(n, num_rows, indices.dtype).at[jnp.cumsum(first) - 1].set(ordered)
    slot = jnp.searchsorted(ids, indices)
    values = jnp.where(_rows_mask(valid, values), values, 0)
    summed = jax.ops.segment_sum(values, slot, num_segments=n)
    # Padding slots received nothing; invalid ids were zeroed above and land on a padding slot.
    return ids, jnp.where(_rows_mask(ids < num_rows, summed), summed, 0)


def _rows_mask(mask: chex.Array, rows: chex.Array) -> chex.Array:
    """A per-row mask of shape ``(n,)`` broadcast against rows of shape ``(n, ...)``."""
    return mask.reshape(mask.shape + (1,) * (rows.ndim - 1))


# Row copies the native gather and scatter make (any float dtype of whole bytes); adds: float32.
_ROW_COPY_DTYPES = tuple(
    jnp.dtype(t)
    for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128)
)


def _rows_kernel(dense: chex.Array, grad: RowSparse, dtypes: tuple[Any, ...]) -> bool:
    return jnp.ndim(dense) >= 1 and jnp.dtype(dense.dtype) in dtypes and grad.indices.shape[0] > 0


def take_rows(table: chex.Array, ids: chex.Array) -> chex.Array:
    """``table[ids]`` for integer ``ids`` of any shape: rows of shape ``(*ids.shape,
    *table.shape[1:])``, zeros for ids outside ``[0, num_rows)`` (padding, as in RowSparse)."""
    flat = jnp.reshape(ids, -1)
    rows = _native_on_cpu(
        _native.gather_rows,
        lambda table, ids: jnp.take(
            table, _padded(ids, jnp.shape(table)[0]), axis=0, mode="fill", fill_value=0
        ),
        table,
        flat,
        eligible=jnp.ndim(table) >= 1
        and jnp.dtype(table.dtype) in _ROW_COPY_DTYPES
        and flat.shape[0] > 0,
    )
    return rows.reshape((*jnp.shape(ids), *jnp.shape(table)[1:]))


def gather(dense: chex.Array, grad: RowSparse) -> chex.Array:
    """``dense[ids]`` for a coalesced ``grad``; zeros in the padding slots."""
    return take_rows(dense, grad.indices)


def scatter(dense: chex.Array, grad: RowSparse, rows: chex.Array) -> chex.Array:
    """``dense`` with ``dense[ids] = rows`` for a coalesced ``grad``; padding slots are dropped.

    In place when ``dense`` is a donated buffer under ``jax.jit``.
    """
    return _native_on_cpu(
        functools.partial(_native.scatter_rows, add=False),
        lambda dense, ids, rows: dense.at[ids].set(rows, mode="drop"),
        dense,
        grad.indices,
        rows.astype(dense.dtype),
        eligible=_rows_kernel(dense, grad, _ROW_COPY_DTYPES),
    )


def add(dense: chex.Array, update: RowSparse) -> chex.Array:
    """``(dense + update).astype(dense.dtype)``, computed and written for the rows present only.

    The sum is taken in the promoted dtype, as for dense leaves, then cast and scattered back.
    """
    update = coalesce(update)
    if update.values.dtype != dense.dtype:
        return scatter(dense, update, (gather(dense, update) + update.values).astype(dense.dtype))
    return _native_on_cpu(  # the sum needs no promotion: one scatter-add
        functools.partial(_native.scatter_rows, add=True),
        lambda dense, ids, rows: dense.at[ids].add(rows, mode="drop"),
        dense,
        update.indices,
        update.values,
        eligible=_rows_kernel(dense, update, (jnp.dtype(jnp.float32),)),
    )


def on_rows(fn: Callable[..., chex.Array], grad: Any, *dense: chex.Array) -> Any:
    """Applies the elementwise ``fn(grad, *dense)`` to a dense leaf, or to the summed rows of a
    RowSparse leaf (with each of ``dense`` gathered at its rows), returning the same kind."""
    if not _checks.is_sparse(grad):
        return fn(grad, *dense)
    grad = coalesce(grad)
    return grad.replace_values(fn(grad.values, *(gather(d, grad) for d in dense)))


def map_leaves(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
    """``jax.tree.map`` over ``updates`` with each RowSparse taken whole, as one leaf."""
    return jax.tree.map(fn, updates, *rest, is_leaf=_checks.is_sparse)


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def huge_pages(*arrays: jax.Array) -> int:
    """Asks Linux to back the memory of ``arrays`` (CPU arrays: embedding tables, their history)
    with 2 MB pages, now; returns how many bytes it moved.

    A sparse step reads and writes a few thousand rows scattered over the table; with 4 KB pages
    each one costs a TLB miss and a page walk, which on a table of gigabytes (and under a virtual
    machine's nested paging) takes longer than moving the row. Linux's transparent huge pages are
    usually enabled for memory that asks for them (``madvise`` mode); this asks, for the whole
    2 MB pages inside each array's buffer (``MADV_HUGEPAGE``), and has the kernel rebuild them at
    once (``MADV_COLLAPSE``, Linux >= 6.1: 1.5 to 2.5 s per GB here, once). Call it after ``init``,
    on the arrays a donated step updates in place (the step keeps their buffers); it changes no
    value. Where the platform, the kernel or the backend cannot, it returns 0 and does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except (OSError, TypeError):
        return 0
    moved = 0
    for array in arrays:
        if array.devices() != {jax.devices("cpu")[0]} or not array.is_fully_addressable:
            continue
        address = array.unsafe_buffer_pointer()
        start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
        end = (address + array.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end <= start:
            continue
        for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
            if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) != 0:
                break
        else:
            moved += end - start
    return moved


def check_indices(grads: Any) -> None:
    """Inside a ``checkify``-ed function: reports the first out-of-range id of every RowSparse
    and :class:`~mx_adagrad.BagGrad` (whose padding ids it reports too: use it where every id is
    meant to be a row).

    Example::

        @jax.jit
        @functools.partial(checkify.checkify, errors=checkify.user_checks)
        def train_step(params, opt_state, batch):
            loss, grads = ...
            mx_adagrad.sparse.check_indices(grads)
            ...

        error, (params, opt_state) = train_step(params, opt_state, batch)
        error.throw()   # ValueError naming the leaf and the offending id
    """
    for path, leaf in zip(_checks.leaf_paths(grads), _checks.leaves(grads)):
        if _checks.is_sparse(leaf) and not leaf.unique:
            num_rows = leaf.dense_shape[0]
            bad = (leaf.indices < 0) | (leaf.indices >= num_rows)
            first = leaf.indices[jnp.argmax(bad)]
            checkify.check(
                ~jnp.any(bad),
                f"mx_adagrad.{type(leaf).__name__}: grads[{path!r}] indices must be row ids in "
                f"[0, {num_rows}), got id {{bad_id}}",
                bad_id=first,
            )


def value_and_row_grad(
    loss_fn: Callable[..., Any], tables: Sequence[str], has_aux: bool = False
) -> Callable[..., Any]:
    """Differentiates ``loss_fn`` with RowSparse gradients for the embedding tables named.

    The returned function takes ``(params, ids, *args)`` with ``ids = {table_path: int array}``.
    It gathers ``rows[path] = params[path][ids[path]]``, calls ``loss_fn(params, rows, *args)`` with
    the tables removed from ``params`` (replaced by ``None``, so the model reads rows, never the
    table), and differentiates with respect to the other params and the gathered rows. The table's
    gradient is ``RowSparse(ids[path], d loss / d rows[path], table.shape)``: the dense gradient is
    never formed. ``ids`` may have any shape (it is flattened; rows have shape
    ``(*ids.shape, *table.shape[1:])``). An id outside ``[0, num_rows)`` (negative included) is
    padding, as in every RowSparse: its row reads as zeros and nothing is updated for it
    (:func:`~mx_adagrad.check_indices` reports such ids inside ``jit``).

    A table typed as split by rows over an ``Explicit`` mesh axis, with ids split by batch over
    the same axis, is looked up on its owners (:func:`mx_adagrad.sharding.value_and_row_grad`):
    the rows come split by batch (the dense model stays data-parallel) and the gradient is a
    :class:`~mx_adagrad.sharding.ShardedRowSparse`, which a one-pass ``opt.step`` steps on the
    owners.

    Args:
      loss_fn: ``loss_fn(params_without_tables, rows, *args) -> loss`` (or ``(loss, aux)``).
      tables: the ``"/"``-joined paths of the embedding tables in ``params``.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      ``fn(params, ids, *args) -> (loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``),
      ``grads`` shaped like ``params`` with a RowSparse at each table.
    """
    tables = tuple(tables)

    def look_up(found: dict[str, Any], ids: Mapping[str, chex.Array]):
        from mx_adagrad import sharding  # which builds on this module

        rows, context = {}, dict(ids)
        for p in tables:
            split = sharding.row_split(found[p])
            if split is None:
                rows[p] = take_rows(found[p], ids[p])
            else:  # split by rows over an Explicit mesh axis: rows split by batch, like ids
                rows[p], context[p] = sharding.split_rows(
                    f"value_and_row_grad (table {p!r})", found[p], ids[p], *split
                )
        return rows, context

    def leaf(table: Any, ids: Any, d_rows: chex.Array) -> RowSparse:
        if not hasattr(ids, "reshape"):  # a sharding split: the rows' owners
            from mx_adagrad import sharding

            return sharding.split_grad(table, ids, d_rows)
        flat_ids = ids.reshape(-1)
        values = d_rows.reshape((flat_ids.shape[0], *table.shape[1:]))
        return RowSparse(flat_ids, values, table.shape)

    return _value_and_table_grad(
        "value_and_row_grad", loss_fn, tables, has_aux, "ids", look_up, leaf
    )


def _value_and_table_grad(
    where: str,
    loss_fn: Callable[..., Any],
    tables: tuple[str, ...],
    has_aux: bool,
    inputs_name: str,
    look_up: Callable[
        [dict[str, Any], Mapping[str, Any]], tuple[dict[str, Any], Mapping[str, Any]]
    ],
    leaf: Callable[[Any, Any, chex.Array], _checks.SparseLeaf],
) -> Callable[..., Any]:
    """The differentiation shared by :func:`value_and_row_grad` and
    :func:`mx_adagrad.value_and_bag_grad`: ``look_up(tables_by_path, inputs) -> (looked_up,
    context)`` reads the tables, ``loss_fn`` gets what was looked up in place of them, and
    ``leaf(table, context[path], d loss / d looked_up[path])`` is each table's gradient."""

    def wrapped(params: Any, inputs: Mapping[str, Any], *args: Any):
        if not isinstance(inputs, Mapping) or set(inputs) != set(tables):
            _checks.fail(
                where,
                inputs_name,
                f"a dict with the keys {list(tables)}",
                list(inputs) if isinstance(inputs, Mapping) else inputs,
            )
        paths = _checks.leaf_paths(params)
        unknown = [t for t in tables if t not in paths]
        if unknown:
            _checks.fail(where, "tables", f"paths of params ({paths[:8]})", unknown)
        leaves = jax.tree.leaves(params)
        treedef = jax.tree.structure(params)
        found = {p: x for p, x in zip(paths, leaves) if p in tables}
        rest = jax.tree.unflatten(
            treedef, [None if p in tables else x for p, x in zip(paths, leaves)]
        )
        looked_up, context = look_up(found, inputs)
        out, (grad_rest, grad_looked_up) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=has_aux
        )(rest, looked_up, *args)
        others = iter(jax.tree.leaves(grad_rest))
        grads = [
            leaf(found[p], context[p], grad_looked_up[p]) if p in tables else next(others)
            for p in paths
        ]
        return out, jax.tree.unflatten(treedef, grads)

    return wrapped
