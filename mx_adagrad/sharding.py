"""Embedding tables sharded by rows over a device mesh: lookups and RowSparse updates in place.

A table too large for one device is split by rows over a mesh axis of ``k`` devices: device ``d``
holds rows ``[d * r, (d + 1) * r)`` with ``r = num_rows / k``, and its AdaGrad history is split the
same way (``tx.init`` of a sharded table gives a history with the table's sharding). A step touches
a few thousand rows; each device updates the ones it holds, with the ordinary single-device code::

    local_ids = ids - d * r                       # on device d
    local_ids[(local_ids < 0) | (local_ids >= r)] = r       # another device's row: padding
    grad = RowSparse(local_ids, values, (r, *table.shape[1:]))
    updates, state = tx.update(grad, state, table)          # duplicates summed, rows updated
    table = apply_updates(table, updates)                   # this device's rows, in place

Padding ids touch nothing (see :mod:`mx_adagrad.sparse`), so each device reads and writes only its
own rows, the full table and a dense gradient never exist anywhere, and every row's numbers are
those of the single-device step: the same duplicates summed in the same order, then the same
elementwise arithmetic. The ids and values are taken replicated: every device sees the whole batch
of lookups (under ``jit``, batch-sharded ids and values are gathered first).

A lookup is the same split in reverse: each device reads the rows it holds (zeros for the others)
and a sum over the axis assembles them, one nonzero term per row, so it is exact::

    rows = psum(take(table, local_ids, fill_value=0), axis)

A train step differentiates with respect to the looked-up rows, as
:func:`~mx_adagrad.value_and_row_grad` does, and hands their gradient to the update::

    lookup = sharded_row_lookup(mesh, "x")
    update = sharded_row_update(tx, mesh, "x")

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(table, state, ids, labels):
        loss, d_rows = jax.value_and_grad(loss_fn)(lookup(table, ids), labels)
        table, state = update(table, state, ids.reshape(-1), d_rows.reshape(-1, table.shape[1]))
        return table, state, loss

Both are ``jax.shard_map`` functions: call them inside ``jax.jit`` (donate the table and state to
update them in place). They work on meshes of either axis type (``Explicit``, the default of
``jax.make_mesh``, or ``Auto``); the table may be replicated over the mesh's other axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mx_adagrad import _checks
from mx_adagrad.sparse import RowSparse
from mx_adagrad.updates import apply_updates


def _local_ids(ids: chex.Array, local_rows: int, axis: str) -> chex.Array:
    """Global row ids as row ids of this device's shard; rows held elsewhere become ``local_rows``
    (padding: one past the shard, touching nothing)."""
    local = ids - jax.lax.axis_index(axis).astype(ids.dtype) * local_rows
    return jnp.where((local >= 0) & (local < local_rows), local, local_rows)


def _replicated(x: chex.Array, mesh: Mesh) -> chex.Array:
    """``x`` whole on every device of ``mesh``: an array typed as split over ``Explicit`` mesh
    axes (a batch-sharded input under ``jit``) is gathered; ``shard_map`` replicates the others
    itself."""
    x = jnp.asarray(x)
    if any(names is not None for names in jax.typeof(x).sharding.spec):
        return jax.reshard(x, NamedSharding(mesh, P()))
    return x


def _per_row(leaf: Any, table: chex.Array) -> bool:
    """Whether a state leaf holds one entry (or row) per row of ``table``, so it is split with it."""
    return jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == table.shape[0]


def _check_table(where: str, table: Any, mesh: Mesh, axis: str) -> None:
    if axis not in mesh.shape:
        _checks.fail(where, "axis", f"an axis of the mesh {dict(mesh.shape)}", axis)
    shards = mesh.shape[axis]
    if table.ndim < 1 or table.shape[0] % shards:
        _checks.fail(
            where,
            "table",
            f"an array whose rows divide evenly over the {shards} devices of mesh axis {axis!r}",
            _checks.shown(f"shape {tuple(table.shape)}"),
        )


def sharded_row_lookup(mesh: Mesh, axis: str) -> Callable[[chex.Array, chex.Array], jax.Array]:
    """Looks up rows of a table sharded by rows over ``mesh`` axis ``axis``.

    ::

        rows = psum(take(table_shard, ids - d * r, fill_value=0), axis)   # == table[ids]

    Each device gathers the rows it holds, zeros for the others, and one sum over the axis (an
    all-reduce of the looked-up rows, never of the table) assembles them: exactly ``table[ids]``.

    Args:
      mesh: the device mesh.
      axis: the mesh axis the table's rows are split over.

    Returns:
      ``lookup(table, ids) -> rows`` with ``rows.shape == (*ids.shape, *table.shape[1:])``,
      replicated over the mesh. Ids outside ``[0, num_rows)`` give rows of zeros. Call it inside
      ``jax.jit``.
    """

    def local_lookup(table: chex.Array, ids: chex.Array) -> chex.Array:
        rows = jnp.take(
            table, _local_ids(ids, table.shape[0], axis), axis=0, mode="fill", fill_value=0
        )
        return jax.lax.psum(rows, axis)

    lookup = jax.shard_map(local_lookup, mesh=mesh, in_specs=(P(axis), P()), out_specs=P())

    def sharded_lookup(table: chex.Array, ids: chex.Array) -> jax.Array:
        _check_table("sharded_row_lookup", table, mesh, axis)
        return lookup(table, _replicated(ids, mesh))

    return sharded_lookup


def sharded_row_update(
    tx: optax.GradientTransformation, mesh: Mesh, axis: str
) -> Callable[..., tuple[jax.Array, optax.OptState]]:
    """Applies RowSparse updates to a table sharded by rows, on the devices that hold the rows.

    ::

        # on device d of mesh axis `axis`, holding rows [d * r, (d + 1) * r):
        grad = RowSparse(ids - d * r, values, (r, ...))   # other devices' rows become padding
        updates, state = tx.update(grad, state, table)
        table = apply_updates(table, updates)

    The result equals, bit for bit, ``tx.update`` and :func:`~mx_adagrad.apply_updates` with
    ``RowSparse(ids, values, table.shape)`` on the whole table on one device.

    Args:
      tx: the transformation for the table alone, e.g. ``mx_adagrad.adagrad(...)`` (``state`` is
        ``tx.init(table)``; any transformation that accepts RowSparse gradients works).
      mesh: the device mesh.
      axis: the mesh axis the table's rows are split over; the table's row count must be a
        multiple of its size.

    Returns:
      ``update(table, state, ids, values) -> (table, state)``: ``ids`` is a 1-D integer array of
      global row ids (duplicates summed, any order; ids outside ``[0, num_rows)`` update nothing)
      and ``values`` has shape ``(len(ids), *table.shape[1:])``. The table and every state leaf
      with one entry per row of the table (history, row-wise history, float32 master copy) are
      split by rows; the other state leaves (the step count) are replicated. Call it inside ``jax.jit``, with the table and state
      donated to update them in place.
    """

    def sharded_update(
        table: chex.Array, state: optax.OptState, ids: chex.Array, values: chex.Array
    ) -> tuple[jax.Array, optax.OptState]:
        _check_table("sharded_row_update", table, mesh, axis)
        state_specs = jax.tree.map(lambda leaf: P(axis) if _per_row(leaf, table) else P(), state)

        def local_update(table, state, ids, values):
            grad = RowSparse(_local_ids(ids, table.shape[0], axis), values, table.shape)
            updates, state = tx.update(grad, state, table)
            return apply_updates(table, updates), state

        update = jax.shard_map(
            local_update,
            mesh=mesh,
            in_specs=(P(axis), state_specs, P(), P()),
            out_specs=(P(axis), state_specs),
        )
        return update(table, state, _replicated(ids, mesh), _replicated(values, mesh))

    return sharded_update
