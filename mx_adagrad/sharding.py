"""Embedding tables sharded over a device mesh, trained data-parallel: owners pool, bags travel.

A table too large for one device is split by rows over a mesh axis of ``k`` devices (device ``d``
holds rows ``[d * r, (d + 1) * r)``, ``r = rows / k``; ``tx.init`` splits its history the same
way), and the batch is split over the same devices (``b = B / k`` bags each). One step, per
device ``d`` (TorchRec's row-wise sharding: input dist, owner pooling, reduce-scatter)::

    ids     = all_gather(bags, axis)                         # (B, L): every bag's ids
    partial = pool(table_shard, ids - d * r)                 # other devices' rows: padding
    pooled  = psum_scatter(partial, axis)                    # (b, D): this device's bags
    loss, d_pooled = value_and_grad(loss_fn)(pooled, ...)    # the dense model on b bags
    grad    = BagGrad(owned ids, bag, scale, all_gather(d_pooled, axis), (r, D))
    table_shard, state_shard = opt.step(table_shard, grad, state_shard)       # in place

No row per lookup is communicated: per device and step the collectives hold ``B * L * 4`` bytes
of ids and ``2 * B * D * 4`` of pooled bags and their gradients, whatever ``L``. Many tables of
one shape stacked into one ``(T * rows, D)`` table and split over the devices ``T / k`` whole
tables each (TorchRec's table-wise sharding) exchange ids and pooled bags with all-to-alls
instead, only with the owner of each table: ``T * b * (L + 2 * D) * 4`` bytes per device.
Unpooled lookups (:func:`value_and_row_grad`) move their rows, ``2 * B * L * D * 4`` bytes,
and keep the dense model on ``b`` examples per device.

:func:`value_and_bag_grad` and :func:`value_and_row_grad` are those of the package with a mesh
and an axis; their table gradients (:class:`ShardedBagGrad`, :class:`ShardedRowSparse`) are the
ordinary leaves split by owner, carrying their mesh and axis, and :func:`sharded_step` runs the
one-pass step (or any transformation) on each owner's rows::

    grad_fn = mx_adagrad.sharding.value_and_bag_grad(loss_fn, ["table"], mesh, "x")
    step = mx_adagrad.sharding.sharded_step(mx_adagrad.flat.fused_rowwise_adagrad(0.05))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, bags, labels):      # bags, labels: split over "x"
        loss, grads = grad_fn(params, bags, labels)
        params, state = step(params, grads, state)
        return params, state, loss

On an ``Explicit`` mesh axis (``jax.make_mesh``'s default) the placement is part of the table's
type, and :func:`mx_adagrad.value_and_bag_grad` itself pools a table split by rows this way
(:func:`row_split`); over ``Auto`` axes it is not known while tracing: name the mesh here.

Exactness: each owner sums a row's gradient terms in the order of their positions in the global
batch, so for the same ``d_pooled`` the tables and histories are bitwise the one-device step's.
The pooled rows are summed per owner, then across owners (``psum_scatter``): a bag whose ids live
on one device pools bitwise as on one device (the other terms are zeros), others within the
rounding of a reassociated float32 sum; table-wise pooling is bitwise (a table has one owner).

:func:`sharded_row_lookup` and :func:`sharded_row_update` are the replicated layout this
supersedes: the lookup psums the global batch's rows, ``(B, L, D)``, to every device, and the
dense model then runs on all ``B`` bags everywhere (``B * L * (8 + 4 * D)`` bytes per device:
ids gathered twice, the rows all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mx_adagrad import _checks, bags, sparse
from mx_adagrad.sparse import RowSparse
from mx_adagrad.updates import apply_updates

LAYOUTS = ("row", "table")


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


@jax.tree_util.register_pytree_node_class
class ShardedBagGrad(bags.BagGrad):
    """A :class:`~mx_adagrad.BagGrad` split by owner over ``mesh`` axis ``axis`` (``k`` devices).

    ::

        indices, bag, scale: (k * n,)    chunk d: the ids device d owns (num_rows elsewhere)
        bag_grads: (k * m, D)            chunk d: the bag gradients its ids refer to

    As a global array it is the ordinary gradient (each id's term appears once, on its owner's
    chunk, in the order of the batch), so any transform takes it; :func:`sharded_step` gives each
    device its chunk and the one-pass step updates the rows it holds. Made by
    :func:`value_and_bag_grad` (and by :func:`mx_adagrad.value_and_bag_grad` for tables split by
    rows over an ``Explicit`` mesh axis).
    """

    def __init__(self, indices, bag, scale, bag_grads, dense_shape, mesh: Mesh, axis: str):
        super().__init__(indices, bag, scale, bag_grads, dense_shape)
        self.mesh, self.axis = mesh, axis

    def tree_flatten(self):
        children, dense_shape = super().tree_flatten()
        return children, (dense_shape, self.mesh, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        grad = super().tree_unflatten(aux[0], children)
        grad.mesh, grad.axis = aux[1:]
        return grad


@jax.tree_util.register_pytree_node_class
class ShardedRowSparse(RowSparse):
    """A :class:`~mx_adagrad.RowSparse` split by owner over ``mesh`` axis ``axis``: chunk ``d`` of
    ``indices (k * n,)`` holds the ids device ``d`` owns (``num_rows`` elsewhere), chunk ``d`` of
    ``values (k * n, ...)`` their rows. Made by :func:`value_and_row_grad`."""

    def tree_flatten(self):
        children, aux = super().tree_flatten()
        return children, (*aux, self.mesh, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        grad = super().tree_unflatten(aux[:2], children)
        grad.mesh, grad.axis = aux[2:]
        return grad


SHARDED = (ShardedBagGrad, ShardedRowSparse)


class _Split(NamedTuple):
    """What a sharded lookup leaves for its gradient: the owners' chunks and the placement."""

    ids: jax.Array
    bag: jax.Array | None
    scale: jax.Array | None
    mesh: Mesh
    axis: str
    layout: str


def row_split(table: Any) -> tuple[Mesh, str] | None:
    """``(mesh, axis)`` when ``table`` is typed as split by rows over one ``Explicit`` mesh axis
    of size > 1 (its other dimensions whole), else None. Inside ``jit`` over ``Auto`` axes the
    placement is not known at trace time: use this module's functions with a mesh there."""
    if not hasattr(table, "shape"):
        return None
    sharding = getattr(jax.typeof(table), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if not spec or not isinstance(spec[0], str) or any(s is not None for s in spec[1:]):
        return None
    kinds = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types))
    if kinds[spec[0]] != jax.sharding.AxisType.Explicit or sharding.mesh.shape[spec[0]] < 2:
        return None
    return sharding.mesh, spec[0]


def is_owner_split(grads: Any) -> bool:
    """Whether ``grads`` holds a :class:`ShardedBagGrad` or :class:`ShardedRowSparse`."""
    return any(isinstance(g, SHARDED) for g in _checks.leaves(grads))


def _axis_size(where: str, mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        _checks.fail(where, "axis", f"an axis of the mesh {dict(mesh.shape)}", axis)
    return mesh.shape[axis]


def _check_batch(where: str, name: str, num: int, shards: int, axis: str) -> None:
    if num % shards:
        _checks.fail(
            where,
            name,
            f"a batch whose bags divide evenly over the {shards} devices of mesh axis {axis!r}",
            _checks.shown(f"{num} bags"),
        )


def _split(x: Any, mesh: Mesh, axis: str) -> Any:
    """``x`` split by its first axis over ``axis``: arrays typed otherwise over an ``Explicit``
    mesh axis are resharded (``shard_map`` does it itself over ``Auto`` axes)."""
    kind = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
    if kind != jax.sharding.AxisType.Explicit:
        return x
    split = NamedSharding(mesh, P(axis))
    return jax.tree.map(lambda leaf: jax.reshard(leaf, split), x)


def _owned(ids: chex.Array, local: chex.Array, local_rows: int, num_rows: int) -> chex.Array:
    """The global ids this device owns; ``num_rows`` (padding) where another device owns them."""
    return jnp.where(local < local_rows, ids, num_rows)


def _gather_chunks(x: chex.Array, mesh: Mesh, axis: str) -> jax.Array:
    """``x (B, ...)`` split by batch as ``(k * B, ...)``: chunk d is all of ``x``, on device d."""
    return jax.shard_map(
        lambda x: jax.lax.all_gather(x, axis, tiled=True),
        mesh=mesh,
        in_specs=P(axis),
        out_specs=P(axis),
    )(x)


def _row_bags(where: str, mesh: Mesh, axis: str, table: chex.Array, bag_ids: Any, mode: str):
    """Row-wise: ``pooled (B, D)`` split by batch, and the owners' ``(ids, bag, scale)``."""
    shards = _axis_size(where, mesh, axis)
    _check_table(where, table, mesh, axis)
    num_rows = table.shape[0]
    whole = jax.ShapeDtypeStruct(table.shape, table.dtype)
    given = isinstance(bag_ids, bags.Bags)
    num_bags = bag_ids.num_bags if given else jnp.shape(bag_ids)[0]
    _check_batch(where, "bags", num_bags, shards, axis)

    def local(shard, bag_ids):
        gathered = bag_ids if given else jax.lax.all_gather(bag_ids, axis, tiled=True)
        lk = bags.lookup(where, whole, gathered, mode)
        local_ids = _local_ids(lk.ids, shard.shape[0], axis)
        partial = bags.pool([shard], [lk._replace(ids=local_ids)])[0]
        pooled = jax.lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True)
        first_bag = jax.lax.axis_index(axis) * num_bags
        owned = _owned(lk.ids, local_ids, shard.shape[0], num_rows)
        return pooled, (owned, lk.bag + first_bag, lk.scale)

    # Bags of offsets are ragged: taken whole by every device (their ids are what travels).
    bag_spec = P() if given else P(axis)
    bag_ids = jax.lax.stop_gradient(bag_ids)
    bag_ids = jax.tree.map(lambda x: _replicated(x, mesh), bag_ids) if given else bag_ids
    pooled, context = jax.shard_map(
        local, mesh=mesh, in_specs=(P(axis), bag_spec), out_specs=(P(axis), P(axis))
    )(_split(table, mesh, axis), bag_ids if given else _split(bag_ids, mesh, axis))
    return pooled, context


def _table_bags(where: str, mesh: Mesh, axis: str, table: chex.Array, bag_ids: Any, mode: str):
    """Table-wise: ``pooled (B, T, D)`` split by batch, and the owners' ``(ids, bag, scale)``."""
    shards = _axis_size(where, mesh, axis)
    if isinstance(bag_ids, bags.Bags) or jnp.ndim(bag_ids) != 3:
        _checks.fail(
            where,
            "bags",
            "an int array (bags, tables, length) for a table-wise table",
            _checks.shown(bags._describe(bag_ids)),
        )
    num_bags, num_tables, _ = jnp.shape(bag_ids)
    if num_tables % shards or jnp.ndim(table) != 2 or table.shape[0] % num_tables:
        _checks.fail(
            where,
            "table",
            f"a (tables * rows, dim) array of {num_tables} stacked tables (the bags' axis 1), "
            f"tables a multiple of the {shards} devices of mesh axis {axis!r}",
            _checks.shown(bags._describe(table)),
        )
    _check_batch(where, "bags", num_bags, shards, axis)
    per_device, rows, dim = num_tables // shards, table.shape[0] // num_tables, table.shape[1]
    one_table = jax.ShapeDtypeStruct((rows, dim), table.dtype)

    def local(shard, bag_ids):  # shard: (per_device * rows, D); bag_ids: (b, T, L)
        mine = jax.lax.all_to_all(bag_ids, axis, split_axis=1, concat_axis=0, tiled=True)
        mine = jnp.swapaxes(mine, 0, 1)  # (per_device, B, L): this device's tables' bags
        lk = bags.lookup(where, one_table, mine.reshape(per_device * num_bags, -1), mode)
        valid = (lk.ids >= 0) & (lk.ids < rows)
        local_ids = jnp.where(valid, lk.ids + lk.bag // num_bags * rows, shard.shape[0])
        partial = bags.pool([shard], [lk._replace(ids=local_ids)])[0]
        pooled = jax.lax.all_to_all(
            partial.reshape(per_device, num_bags, dim), axis, 1, 0, tiled=True
        )  # (T, b, D)
        d = jax.lax.axis_index(axis)
        owned = jnp.where(valid, local_ids + d * shard.shape[0], table.shape[0])
        return jnp.swapaxes(pooled, 0, 1), (owned, lk.bag + d * per_device * num_bags, lk.scale)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=(P(axis), P(axis))
    )(_split(table, mesh, axis), _split(jax.lax.stop_gradient(bag_ids), mesh, axis))


def _table_bag_grads(d_pooled: chex.Array, mesh: Mesh, axis: str) -> jax.Array:
    """``d_pooled (B, T, D)`` split by batch as each owner's ``(per_device * B, D)`` chunk."""

    def local(g):  # (b, T, D)
        mine = jax.lax.all_to_all(g, axis, split_axis=1, concat_axis=0, tiled=True)
        return jnp.swapaxes(mine, 0, 1).reshape(-1, g.shape[-1])  # (per_device * B, D)

    return jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(axis))(d_pooled)


def value_and_bag_grad(
    loss_fn: Callable[..., Any],
    tables: Sequence[str],
    mesh: Mesh,
    axis: str,
    mode: str | Mapping[str, str] = "sum",
    layout: str | Mapping[str, str] = "row",
    has_aux: bool = False,
) -> Callable[..., Any]:
    """:func:`mx_adagrad.value_and_bag_grad` for tables sharded over ``mesh`` axis ``axis``.

    ::

        row:   ids = all_gather(bags); pooled = psum_scatter(pool(shard, ids - d * r))
        table: ids = all_to_all(bags); pooled = all_to_all(pool(shard, ids))
        grads[table] = ShardedBagGrad(owned ids, bag, scale, d_pooled at the owners, shape)

    The bags are split by batch over ``axis`` (``B`` bags, ``b = B / k`` per device) and
    ``loss_fn(params_without_tables, pooled, *args)`` runs on each device's ``b`` bags (pass
    the other batch inputs split the same way), so the dense model stays data-parallel.

    * ``layout="row"`` (TorchRec's row-wise sharding): a ``(rows, D)`` table split by rows,
      ``bags`` an int array ``(B, L)`` split by batch, or :class:`~mx_adagrad.Bags` (ragged:
      taken whole by every device); ``pooled[path]`` is ``(B, D)``.
    * ``layout="table"`` (TorchRec's table-wise sharding): ``T`` tables of ``rows`` rows stacked
      as one ``(T * rows, D)`` table split by rows, ``T / k`` whole tables per device (table
      ``t`` is rows ``[t * rows, (t + 1) * rows)``; a row-wise history stays per row); ``bags``
      an int array ``(B, T, L)`` of ids in ``[0, rows)``; ``pooled[path]`` is ``(B, T, D)``.

    Ids outside ``[0, rows)`` are padding and empty bags pool to zeros, as on one device.

    Args:
      loss_fn: as in :func:`mx_adagrad.value_and_bag_grad`.
      tables: the ``"/"``-joined paths of the tables in ``params``.
      mesh: the device mesh.
      axis: the mesh axis the tables' rows and the batch are split over.
      mode: ``"sum"`` or ``"mean"``, or a dict ``{path: mode}``.
      layout: ``"row"`` or ``"table"``, or a dict ``{path: layout}``.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      ``fn(params, bags, *args) -> (loss, grads)`` with a :class:`ShardedBagGrad` at each table,
      for :func:`sharded_step`. Call it inside ``jax.jit``.
    """
    where = "sharding.value_and_bag_grad"
    tables = tuple(tables)
    modes = _per_table(where, "mode", mode, tables, bags.MODES)
    layouts = _per_table(where, "layout", layout, tables, LAYOUTS)
    _axis_size(where, mesh, axis)

    def look_up(found: dict[str, Any], bag_ids: Mapping[str, Any]):
        pooled, context = {}, {}
        for p in tables:
            at = f"{where} (table {p!r})"
            pooled[p], context[p] = split_lookup(
                at, found[p], bag_ids[p], modes[p], mesh, axis, layouts[p]
            )
        return pooled, context

    return sparse._value_and_table_grad(
        where, loss_fn, tables, has_aux, "bags", look_up, split_grad
    )


def split_lookup(
    where: str, table: Any, bag_ids: Any, mode: str, mesh: Mesh, axis: str, layout: str = "row"
) -> tuple[jax.Array, _Split]:
    """The pooled bags of a sharded table, split by batch, and what its gradient needs."""
    pool = _row_bags if layout == "row" else _table_bags
    pooled, (ids, bag, scale) = pool(where, mesh, axis, table, bag_ids, mode)
    return pooled, _Split(ids, bag, scale, mesh, axis, layout)


def split_grad(table: Any, split: _Split, d_looked_up: chex.Array) -> Any:
    """The gradient of a :func:`split_lookup` (a :class:`ShardedBagGrad`: the bag gradients sent
    to the owners, all-gathered row-wise, all-to-all table-wise) or of a :func:`split_rows` (a
    :class:`ShardedRowSparse`: the rows' gradients all-gathered)."""
    shape, mesh, axis = jnp.shape(table), split.mesh, split.axis
    if split.layout == "unpooled":
        values = _gather_chunks(d_looked_up, mesh, axis).reshape(split.ids.shape[0], shape[1])
        return ShardedRowSparse.tree_unflatten((shape, False, mesh, axis), (split.ids, values))
    if split.layout == "row":
        owners = _gather_chunks(d_looked_up, mesh, axis)
    else:
        owners = _table_bag_grads(d_looked_up, mesh, axis)
    return ShardedBagGrad(split.ids, split.bag, split.scale, owners, shape, mesh, axis)


def _per_table(
    where: str, name: str, value: Any, tables: tuple[str, ...], choices: Sequence[str]
) -> dict[str, str]:
    found = dict(value) if isinstance(value, Mapping) else dict.fromkeys(tables, value)
    if set(found) != set(tables):
        _checks.fail(where, name, f"a str or a dict with the keys {list(tables)}", value)
    for path, v in found.items():
        _checks.one_of(where, f"{name}[{path!r}]", v, tuple(choices))
    return found


def value_and_row_grad(
    loss_fn: Callable[..., Any],
    tables: Sequence[str],
    mesh: Mesh,
    axis: str,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """:func:`mx_adagrad.value_and_row_grad` for tables split by rows over ``mesh`` axis ``axis``.

    ::

        ids  = all_gather(ids, axis)                                    # (B, ...)
        rows = psum_scatter(take(shard, ids - d * r, fill_value=0))     # (b, ..., D), exact
        grads[table] = ShardedRowSparse(owned ids, all_gather(d_rows), shape)

    ``ids`` is split by batch (its first axis) over ``axis``; ``loss_fn`` gets each device's
    ``b`` examples' rows (the dense model stays data-parallel). The rows themselves travel:
    ``2 * B * L * D * 4`` bytes per device and step (the pooled layouts of
    :func:`value_and_bag_grad` move ``2 * B * D * 4``). Ids outside ``[0, rows)`` read zeros and
    update nothing.

    Returns:
      ``fn(params, ids, *args) -> (loss, grads)`` with a :class:`ShardedRowSparse` at each table,
      for :func:`sharded_step`. Call it inside ``jax.jit``.
    """
    where = "sharding.value_and_row_grad"
    tables = tuple(tables)
    _axis_size(where, mesh, axis)

    def look_up(found: dict[str, Any], ids: Mapping[str, chex.Array]):
        looked_up = {p: split_rows(where, found[p], ids[p], mesh, axis) for p in tables}
        return {p: r for p, (r, _) in looked_up.items()}, {p: c for p, (_, c) in looked_up.items()}

    return sparse._value_and_table_grad(where, loss_fn, tables, has_aux, "ids", look_up, split_grad)


def split_rows(
    where: str, table: chex.Array, ids: chex.Array, mesh: Mesh, axis: str
) -> tuple[jax.Array, _Split]:
    """The rows ``table[ids]`` of a table split by rows, split by batch like ``ids``, and what
    their gradient needs."""
    shards = _axis_size(where, mesh, axis)
    _check_table(where, table, mesh, axis)
    if jnp.ndim(ids) < 1 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        _checks.fail(where, "ids", "an integer array (batch, ...)", bags._describe(ids))
    _check_batch(where, "ids", jnp.shape(ids)[0], shards, axis)

    def local(shard, ids):
        gathered = jax.lax.all_gather(ids, axis, tiled=True).reshape(-1)
        local_ids = _local_ids(gathered, shard.shape[0], axis)
        rows = sparse.take_rows(shard, local_ids)
        rows = rows.reshape((jnp.shape(ids)[0] * shards, *jnp.shape(ids)[1:], -1))
        owned = _owned(gathered, local_ids, shard.shape[0], table.shape[0])
        return jax.lax.psum_scatter(rows, axis, scatter_dimension=0, tiled=True), owned

    rows, owned = jax.shard_map(
        local, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=(P(axis), P(axis))
    )(_split(table, mesh, axis), _split(jax.lax.stop_gradient(ids), mesh, axis))
    return rows, _Split(owned, None, None, mesh, axis, "unpooled")


def sharded_step(opt: Any) -> Callable[..., tuple[Any, optax.OptState]]:
    """The step of ``opt`` with every sharded table updated on the devices that hold its rows.

    ::

        # on device d of the grads' mesh axis, holding rows [d * r, (d + 1) * r) of each table:
        grads[table] = BagGrad(ids - d * r, ...)    # its chunk of the ShardedBagGrad
        params, state = opt.step(params, grads, state)      # or opt.update + apply_updates

    Every param whose gradient is a :class:`ShardedBagGrad` or :class:`ShardedRowSparse` is a
    table split by rows over that gradient's mesh axis, and so is every state leaf of its path
    with one entry (or row) per row (history, row-wise history, master copy); every other leaf
    is replicated and stepped on every device, as in data-parallel training. No collective: the
    gradients came to their owners in :func:`value_and_bag_grad`. Each table's rows and history
    equal, bit for bit, ``opt``'s step on one device with the same gradient.

    Args:
      opt: a one-pass step (:func:`mx_adagrad.flat.fused_adagrad`,
        :func:`~mx_adagrad.flat.fused_rowwise_adagrad`: the native kernels run on each device's
        shard) or any transformation that takes BagGrad and RowSparse gradients.

    Returns:
      ``step(params, grads, state) -> (params, state)``, ``opt``'s own step where no gradient is
      sharded. Call it inside ``jax.jit`` with params and state donated, so each shard is
      updated in place.
    """
    where = "sharding.sharded_step"

    def plain(params: Any, grads: Any, state: optax.OptState):
        if hasattr(opt, "step"):
            return opt.step(params, grads, state)
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates), state

    def step(params: Any, grads: Any, state: optax.OptState):
        paths = _checks.leaf_paths(params)
        owned = {
            p: (g, x)
            for p, g, x in zip(paths, _checks.leaves(grads), jax.tree.leaves(params))
            if isinstance(g, SHARDED)
        }
        if not owned:
            return plain(params, grads, state)
        placements = {(g.mesh, g.axis) for g, _ in owned.values()}
        if len(placements) > 1:
            _checks.fail(
                where,
                "grads",
                "sharded tables of one mesh axis",
                _checks.shown(
                    ", ".join(sorted(f"axis {a!r} of {dict(m.shape)}" for m, a in placements))
                ),
            )
        ((mesh, axis),) = placements
        for p, (_, table) in owned.items():
            _check_table(f"{where} (table {p!r})", table, mesh, axis)
        param_specs = jax.tree.unflatten(
            jax.tree.structure(params), [P(axis) if p in owned else P() for p in paths]
        )
        grad_specs = jax.tree.unflatten(
            _checks.structure(grads), [P(axis) if p in owned else P() for p in paths]
        )
        state_specs = jax.tree.unflatten(
            jax.tree.structure(state),
            [
                P(axis) if _per_row_of(path, leaf, owned) else P()
                for path, leaf in zip(_checks.leaf_paths(state), jax.tree.leaves(state))
            ],
        )

        def local(params, grads, state):
            return plain(
                params, jax.tree.map(_owner_chunk, grads, is_leaf=_checks.is_sparse), state
            )

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(param_specs, grad_specs, state_specs),
            out_specs=(param_specs, state_specs),
        )(params, grads, state)

    return step


def _per_row_of(path: str, leaf: Any, owned: Mapping[str, tuple[Any, Any]]) -> bool:
    """Whether a state leaf at ``path`` is split with one of the ``owned`` tables: its path ends
    with the table's and it has one entry or row per row of the table."""
    return any(
        (path == p or path.endswith("/" + p)) and _per_row(leaf, table)
        for p, (_, table) in owned.items()
    )


def _owner_chunk(grad: Any) -> Any:
    """Inside the step's ``shard_map``: a sharded gradient's chunk on this device as the ordinary
    gradient of its shard; other gradients as they are."""
    if not isinstance(grad, SHARDED):
        return grad
    local_rows = grad.dense_shape[0] // jax.lax.axis_size(grad.axis)
    ids = _local_ids(grad.indices, local_rows, grad.axis)
    shape = (local_rows, *grad.dense_shape[1:])
    if isinstance(grad, ShardedRowSparse):
        return RowSparse.tree_unflatten((shape, False), (ids, grad.values))
    first_bag = jax.lax.axis_index(grad.axis) * grad.bag_grads.shape[0]
    children = (ids, grad.bag - first_bag, grad.scale, grad.bag_grads)
    return bags.BagGrad.tree_unflatten(shape, children)
