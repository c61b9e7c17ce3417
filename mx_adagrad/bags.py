"""Embedding bags: pooled lookups of many ids per example, and their never-expanded gradient.

A recommendation model looks each of its tables up as *bags*: example ``b`` holds a few ids, and
its embedding is the sum, the mean or a weighted sum of their rows (torch's ``nn.EmbeddingBag``,
TorchRec's ``EmbeddingBagCollection``, FBGEMM's table-batched embeddings)::

    pooled[b] = sum(scale[i] * table[ids[i]] for i in bag b)
    scale[i]  = 1 (sum), 1 / (valid ids in bag b) (mean), weights[i] (weighted sum)

Ids outside ``[0, num_rows)`` are padding: they add nothing and count for nothing. The table's
gradient is, per id, ``scale[i] * d_pooled[bag[i]]``: the rows of a RowSparse of ``len(ids)`` rows
that :class:`BagGrad` never forms. It holds the ids, the bag of each id, the scales and the
gradient of the pooled rows ``(bags, dim)``, and every transform of the package takes it: where a
transform needs rows it sums the terms into the rows they touch (:func:`mx_adagrad.sparse.coalesce`)::

    ids = unique(ids)                                                  # sorted, padded
    rows[k] = sum(scale[i] * d_pooled[bag[i]] for i where ids[i] == ids[k])   # in order of i

which is the coalesced RowSparse of the expanded gradient, bit for bit. The one-pass steps of
:mod:`mx_adagrad.flat` go further: one native call sums every table's terms and updates the
touched rows in place, so neither the expanded rows nor the coalesced ones exist.

Bags come in two forms: an int array ``(bags, length)`` (pad short bags with an out-of-range id
such as -1), or :class:`Bags` ``(ids, offsets, weights)``, the flat ids with offsets that torch's
``EmbeddingBag`` and FBGEMM take.

MXNet has no pooled lookup (Gluon models sum ``Embedding`` outputs); torch equivalent:
``nn.EmbeddingBag(mode="sum" | "mean", sparse=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mx_adagrad import _checks, _native, sparse

MODES = ("sum", "mean")


@jax.tree_util.register_pytree_node_class
class Bags:
    """Bags of ids as flat ids and offsets: bag ``b`` is ``ids[offsets[b]:offsets[b + 1]]``.

    Args:
      ids: int32 or int64 array ``(n,)``. Ids outside ``[0, num_rows)`` are padding.
      offsets: int32 or int64 array ``(bags + 1,)``: 0 first, non-decreasing, ``n`` last (torch's
        ``EmbeddingBag(include_last_offset=True)`` and FBGEMM's offsets, for one table).
      weights: None, or a float array ``(n,)``: the weight of each id in a weighted sum (torch's
        ``per_sample_weights``); only with ``mode="sum"``.

    Concrete offsets are checked here; traced ones cannot be (a kernel given bad offsets clamps
    them into ``[0, n]``: wrong bags, never a bad read).
    """

    def __init__(
        self, ids: chex.Array, offsets: chex.Array, weights: chex.Array | None = None
    ) -> None:
        ids, offsets = jnp.asarray(ids), jnp.asarray(offsets)
        _integer_array("Bags", "ids", ids, ndim=1)
        _integer_array("Bags", "offsets", offsets, ndim=1)
        if offsets.shape[0] < 1:
            _checks.fail("Bags", "offsets", "of length bags + 1 >= 1", _shown_shape(offsets))
        if weights is not None:
            weights = jnp.asarray(weights)
            if weights.shape != ids.shape or not jnp.issubdtype(weights.dtype, jnp.floating):
                _checks.fail(
                    "Bags",
                    "weights",
                    f"None or a float array of the shape of ids {ids.shape}",
                    _checks.shown(f"{weights.dtype}{list(weights.shape)}"),
                )
        if not isinstance(offsets, jax.core.Tracer):
            _check_offsets(np.asarray(offsets), ids.shape[0])
        self.ids, self.offsets, self.weights = ids, offsets, weights

    def tree_flatten(self):
        return (self.ids, self.offsets, self.weights), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        bags = object.__new__(cls)
        bags.ids, bags.offsets, bags.weights = children
        return bags

    @property
    def num_bags(self) -> int:
        return self.offsets.shape[0] - 1

    def __repr__(self) -> str:
        return f"Bags(ids={self.ids!r}, offsets={self.offsets!r}, weights={self.weights!r})"


def _shown_shape(x: chex.Array) -> _checks.shown:
    return _checks.shown(f"{x.dtype}{list(x.shape)}")


def _integer_array(where: str, name: str, x: chex.Array, ndim: int) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim != ndim:
        _checks.fail(where, name, f"a {ndim}-D integer array", _shown_shape(x))


def _check_offsets(offsets: np.ndarray, n: int) -> None:
    if offsets[0] != 0:
        _checks.fail("Bags", "offsets", "0 first", _checks.shown(f"offsets[0] = {offsets[0]}"))
    steps = np.diff(offsets)
    if np.any(steps < 0):
        b = int(np.argmax(steps < 0))
        _checks.fail(
            "Bags",
            "offsets",
            "non-decreasing",
            _checks.shown(f"offsets[{b}] = {offsets[b]} > offsets[{b + 1}] = {offsets[b + 1]}"),
        )
    if offsets[-1] != n:
        _checks.fail(
            "Bags", "offsets", f"len(ids) = {n} last", _checks.shown(f"offsets[-1] = {offsets[-1]}")
        )


class Lookup(NamedTuple):
    """One table's bags, normalized: what the pooled lookup and its gradient need.

    Attributes:
      ids: ``(n,)`` the ids, flat.
      offsets: ``(bags + 1,)``.
      bag: int32 ``(n,)``, the bag of each id.
      scale: ``(n,)`` in the table's dtype: 1, ``1 / len(bag)`` (valid ids) or the weights; 0 at
        padding ids.
    """

    ids: chex.Array
    offsets: chex.Array
    bag: chex.Array
    scale: chex.Array


def lookup(where: str, table: Any, bags: Any, mode: str) -> Lookup:
    """Checks ``table``, ``bags`` and ``mode`` (errors name them) and normalizes the bags."""
    _checks.one_of(where, "mode", mode, MODES)
    if jnp.ndim(table) != 2 or not jnp.issubdtype(jnp.result_type(table), jnp.inexact):
        _checks.fail(
            where, "table", "a 2-D float array (rows, dim)", _checks.shown(_describe(table))
        )
    num_rows = jnp.shape(table)[0]
    dtype = jnp.result_type(table)
    mean = mode == "mean"
    if isinstance(bags, Bags):
        if bags.weights is not None and mode != "sum":
            _checks.fail(where, "mode", "'sum' for Bags with weights (a weighted sum)", mode)
        ids, offsets = bags.ids, bags.offsets
        weights = jnp.zeros(0, dtype) if bags.weights is None else bags.weights.astype(dtype)
        bag, scale = sparse._native_on_cpu(
            functools.partial(_native.bag_terms, num_rows=num_rows, mean=mean),
            functools.partial(_bag_terms_xla, num_rows=num_rows, mean=mean),
            ids,
            offsets,
            jax.lax.stop_gradient(weights),
            eligible=dtype == jnp.float32 and ids.shape[0] > 0,
        )
        if bags.weights is not None:  # the same values, with the weights' gradient
            scale = jnp.where((ids >= 0) & (ids < num_rows), weights, 0).astype(dtype)
        return Lookup(ids, offsets, bag, scale)
    bags = jnp.asarray(bags)
    _integer_array(where, "bags", bags, ndim=2)
    num_bags, length = bags.shape
    ids, n = bags.reshape(-1), num_bags * length
    offsets = jnp.arange(num_bags + 1, dtype=jnp.int32) * length
    bag = jax.lax.broadcasted_iota(jnp.int32, (num_bags, length), 0).reshape(n)
    valid = (ids >= 0) & (ids < num_rows)
    if mean:
        counts = jnp.sum(valid.reshape(num_bags, length), axis=1, dtype=jnp.int32)
        scale = jnp.repeat(1 / jnp.maximum(counts, 1).astype(dtype), length)
    else:
        scale = jnp.ones(n, dtype)
    return Lookup(ids, offsets, bag, jnp.where(valid, scale, 0).astype(dtype))


def _bag_terms_xla(
    ids: chex.Array, offsets: chex.Array, weights: chex.Array, num_rows: int, mean: bool
) -> tuple[chex.Array, chex.Array]:
    """The bag of each id and its scale (0 at padding ids), from offsets: XLA operations."""
    n, num_bags = ids.shape[0], offsets.shape[0] - 1
    positions = jnp.arange(n, dtype=offsets.dtype)
    bag = jnp.searchsorted(offsets[1:], positions, side="right", method="scan_unrolled")
    bag = bag.astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_rows)
    if mean:
        counts = jax.ops.segment_sum(valid.astype(jnp.int32), bag, num_segments=num_bags)
        scale = 1 / jnp.maximum(counts, 1).astype(weights.dtype)[jnp.minimum(bag, num_bags - 1)]
    else:
        scale = jnp.ones(n, weights.dtype) if weights.shape[0] == 0 else weights
    return bag, jnp.where(valid, scale, 0).astype(weights.dtype)


def _describe(x: Any) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}" if hasattr(x, "shape") else repr(x)


def _pool_xla(table: chex.Array, lookup: Lookup) -> chex.Array:
    """The pooled lookup in XLA operations: a segment-sum of the scaled rows, in position order."""
    rows = sparse.take_rows(table, lookup.ids)
    return jax.ops.segment_sum(
        lookup.scale[:, None] * rows, lookup.bag, num_segments=lookup.offsets.shape[0] - 1
    )


def pool(tables: Sequence[chex.Array], lookups: Sequence[Lookup]) -> list[chex.Array]:
    """The pooled rows of every table (not differentiable; :func:`embedding_bag` is).

    On the CPU backend the float32 tables are pooled by one native call (``bags.cc``) with the
    bits of the XLA program (a segment-sum of the scaled rows, positions in order); the others,
    and every table on other backends, by that program.
    """
    native = [
        k
        for k, (t, lk) in enumerate(zip(tables, lookups))
        if jnp.result_type(t) == jnp.float32 and lk.ids.shape[0] > 0
    ]
    out = [_pool_xla(t, lk) for t, lk in zip(tables, lookups)]
    operands = [x for k in native for x in (tables[k], *_native_operands(lookups[k]))]
    if native and _native.load() and _native.local(*operands):
        pooled = jax.lax.platform_dependent(
            *operands,
            cpu=lambda *ops: tuple(_native.bag_pool(list(zip(*[iter(ops)] * 4)))),
            default=lambda *ops: tuple(out[k] for k in native),
        )
        for k, p in zip(native, pooled):
            out[k] = p
    return out


def _native_operands(lookup: Lookup) -> tuple[chex.Array, chex.Array, chex.Array]:
    return lookup.ids, lookup.offsets, lookup.scale


@jax.custom_vjp
def _embedding_bag(table, ids, offsets, bag, scale):
    return pool([table], [Lookup(ids, offsets, bag, scale)])[0]


def _embedding_bag_forward(table, ids, offsets, bag, scale):
    out = _embedding_bag(table, ids, offsets, bag, scale)
    return out, (table, ids, bag, scale)


def _embedding_bag_backward(residuals, d_pooled):
    """The dense gradients: ``d_table[ids[i]] += scale[i] * d_pooled[bag[i]]`` and
    ``d_scale[i] = <d_pooled[bag[i]], table[ids[i]]>`` (zero at padding ids)."""
    table, ids, bag, scale = residuals
    terms = d_pooled[bag]
    at = sparse._padded(ids, table.shape[0])
    d_table = jnp.zeros_like(table).at[at].add(scale[:, None] * terms, mode="drop")
    d_scale = jnp.sum(terms * sparse.take_rows(table, ids), axis=1).astype(scale.dtype)
    return d_table, None, None, None, d_scale


_embedding_bag.defvjp(_embedding_bag_forward, _embedding_bag_backward)


def embedding_bag(table: chex.Array, bags: chex.Array | Bags, mode: str = "sum") -> jax.Array:
    """The pooled lookup: one row per bag, the sum or mean of its ids' rows.

    ::

        pooled[b] = sum(table[i] for i in bag b)                  # mode="sum"
        pooled[b] = sum(weights[j] * table[i] for i in bag b)     # Bags(..., weights), "sum"
        pooled[b] = sum(table[i] for i in bag b) / len(bag b)     # mode="mean"

    Ids outside ``[0, num_rows)`` are padding (they add nothing and do not count in the mean);
    an empty bag pools to zeros. Differentiable: ``jax.grad`` gives the dense gradient of the
    table (and of ``Bags.weights``); use :func:`value_and_bag_grad` to get a :class:`BagGrad`
    instead, which never forms a table-sized array. On CPU a float32 table is pooled by a native
    kernel (the bits of the XLA program used elsewhere).

    torch equivalent: ``nn.EmbeddingBag(mode=mode)(ids, offsets, per_sample_weights)``.

    Args:
      table: ``(rows, dim)`` float array.
      bags: int array ``(bags, length)``, or :class:`Bags` ``(ids, offsets, weights)``.
      mode: ``"sum"`` or ``"mean"``.

    Returns:
      ``(bags, dim)`` in the table's dtype.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> table = jnp.arange(8.0).reshape(4, 2)
      >>> mx_adagrad.embedding_bag(table, jnp.array([[0, 1], [3, -1]]))
      Array([[2., 4.],
             [6., 7.]], dtype=float32)
    """
    return pooled(jnp.asarray(table), lookup("embedding_bag", table, bags, mode))


def pooled(table: chex.Array, lookup: Lookup) -> jax.Array:
    """:func:`embedding_bag` of bags already normalized by :func:`lookup`: differentiable with
    respect to the table and to the scales (which hold the weights of a weighted sum)."""
    return _embedding_bag(table, lookup.ids, lookup.offsets, lookup.bag, lookup.scale)


@jax.tree_util.register_pytree_node_class
class BagGrad(_checks.SparseLeaf):
    """The gradient of a table looked up in bags, kept as the gradient of its pooled rows.

    ::

        dense = zeros(dense_shape)
        dense[indices[i]] += scale[i] * bag_grads[bag[i]]       for every i (padding: nothing)

    Args:
      indices: int32 or int64 ``(n,)``: the ids of every bag, flat.
      bag: int32 ``(n,)``: the bag each id belongs to.
      scale: ``(n,)``: each id's factor (1 for ``"sum"``, ``1 / len(bag)`` for ``"mean"``, its
        weight for a weighted sum; 0 at padding ids).
      bag_grads: ``(bags, dim)``: ``d loss / d pooled``.
      dense_shape: the table's shape ``(rows, dim)``, static.

    Every transform of the package accepts it, summing it into the rows it touches where rows
    are needed (:func:`mx_adagrad.sparse.coalesce`, which returns a RowSparse). Made by
    :func:`value_and_bag_grad`.
    """

    def __init__(
        self,
        indices: chex.Array,
        bag: chex.Array,
        scale: chex.Array,
        bag_grads: chex.Array,
        dense_shape: Sequence[int],
    ) -> None:
        indices, bag, scale, bag_grads = map(jnp.asarray, (indices, bag, scale, bag_grads))
        where = "BagGrad"
        if not (
            isinstance(dense_shape, (tuple, list))
            and len(dense_shape) == 2
            and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dense_shape)
        ):
            _checks.fail(where, "dense_shape", "a tuple of two ints >= 0", dense_shape)
        _integer_array(where, "indices", indices, ndim=1)
        n = indices.shape[0]
        if bag.dtype != jnp.int32 or bag.shape != (n,):
            _checks.fail(where, "bag", f"an int32 array of shape {(n,)}", _shown_shape(bag))
        if scale.shape != (n,):
            _checks.fail(where, "scale", f"an array of shape {(n,)}", _shown_shape(scale))
        if bag_grads.ndim != 2 or bag_grads.shape[1] != dense_shape[1]:
            _checks.fail(
                where,
                "bag_grads",
                f"an array of shape (bags, {dense_shape[1]})",
                _shown_shape(bag_grads),
            )
        self.indices, self.bag, self.scale, self.bag_grads = indices, bag, scale, bag_grads
        self.dense_shape = (int(dense_shape[0]), int(dense_shape[1]))

    unique = False  # its ids are never known unique: check_indices reads them

    def tree_flatten(self):
        return (self.indices, self.bag, self.scale, self.bag_grads), self.dense_shape

    @classmethod
    def tree_unflatten(cls, dense_shape, children):
        grad = object.__new__(cls)
        grad.indices, grad.bag, grad.scale, grad.bag_grads = children
        grad.dense_shape = dense_shape
        return grad

    @property
    def dtype(self):
        return self.bag_grads.dtype

    def expand(self) -> sparse.RowSparse:
        """The RowSparse of one row per id, ``scale[i] * bag_grads[bag[i]]`` (materializes
        ``(n, dim)``: for tests and the XLA path). Padding ids stay padding (a RowSparse made
        from concrete values would refuse them)."""
        rows = self.scale.astype(self.dtype)[:, None] * self.bag_grads[self.bag]
        return sparse.RowSparse.tree_unflatten((self.dense_shape, False), (self.indices, rows))

    def coalesce(self) -> sparse.RowSparse:
        """The touched rows, summed: the coalesced RowSparse of :meth:`expand`, bit for bit.

        On CPU a float32 gradient is summed by a native kernel (``coalesce.cc``) that reads the
        bag gradients where they are, without forming the expanded rows."""
        num_rows = self.dense_shape[0]
        ids, rows = sparse._native_on_cpu(
            functools.partial(_native.coalesce_bags, num_rows=num_rows),
            lambda i, b, s, g: _coalesce_expanded(i, b, s, g, self.dense_shape),
            self.indices,
            self.bag,
            self.scale,
            self.bag_grads,
            eligible=self.dtype == jnp.float32
            and self.scale.dtype == jnp.float32
            and _native.groupable(num_rows, self.indices.shape[0])
            and self.indices.shape[0] > 0,
        )
        return sparse.RowSparse.tree_unflatten((self.dense_shape, True), (ids, rows))

    def todense(self) -> jax.Array:
        """The dense gradient (for tests and small tables)."""
        return self.expand().todense()

    def __repr__(self) -> str:
        return (
            f"BagGrad(indices={self.indices!r}, bag={self.bag!r}, scale={self.scale!r}, "
            f"bag_grads={self.bag_grads!r}, dense_shape={self.dense_shape})"
        )


def _coalesce_expanded(indices, bag, scale, bag_grads, dense_shape):
    grad = BagGrad.tree_unflatten(dense_shape, (indices, bag, scale, bag_grads)).expand()
    return sparse._coalesce_xla(grad.indices, grad.values, dense_shape[0])


def value_and_bag_grad(
    loss_fn: Callable[..., Any],
    tables: Sequence[str],
    mode: str | Mapping[str, str] = "sum",
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Differentiates ``loss_fn`` with :class:`BagGrad` gradients for the tables looked up in bags.

    The returned function takes ``(params, bags, *args)`` with ``bags = {table_path: bags}``
    (an int array ``(B, L)`` or :class:`Bags`). It pools every table's bags (one native call for
    all of them on CPU), calls ``loss_fn(params_without_tables, pooled, *args)`` with
    ``pooled[path]`` of shape ``(B, dim)`` and the tables replaced by ``None`` in ``params``, and
    differentiates with respect to the other params and the pooled rows. The table's gradient is
    ``BagGrad(ids, bag, scale, d loss / d pooled[path], table.shape)``: neither the dense
    gradient nor a row per lookup is formed. A :func:`mx_adagrad.flat.one_pass` step then updates
    every table in one native call.

    A table typed as split by rows over an ``Explicit`` mesh axis (``NamedSharding(mesh,
    P(axis))``, ``jax.make_mesh``'s default axis type) with the bags split by batch over the same
    axis is pooled by its owners (:mod:`mx_adagrad.sharding`, row-wise): ``pooled[path]`` is split
    by batch, the dense model runs on each device's bags, and the gradient is a
    :class:`~mx_adagrad.sharding.ShardedBagGrad` for :func:`mx_adagrad.sharding.sharded_step`.

    Args:
      loss_fn: ``loss_fn(params_without_tables, pooled, *args) -> loss`` (or ``(loss, aux)``).
      tables: the ``"/"``-joined paths of the tables in ``params``.
      mode: ``"sum"`` or ``"mean"``, for every table, or a dict ``{path: mode}``.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      ``fn(params, bags, *args) -> (loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``),
      ``grads`` shaped like ``params`` with a :class:`BagGrad` at each table.

    Example::

        grad_fn = mx_adagrad.value_and_bag_grad(loss_fn, tables=["user", "item"])
        opt = mx_adagrad.flat.fused_adagrad(0.01)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def train_step(params, state, bags, labels):
            loss, grads = grad_fn(params, bags, labels)
            params, state = opt.step(params, grads, state)
            return params, state, loss
    """
    tables = tuple(tables)
    modes = dict(mode) if isinstance(mode, Mapping) else dict.fromkeys(tables, mode)
    if set(modes) != set(tables):
        _checks.fail(
            "value_and_bag_grad", "mode", f"a str or a dict with the keys {list(tables)}", mode
        )
    for path, m in modes.items():
        _checks.one_of("value_and_bag_grad", f"mode[{path!r}]", m, MODES)

    def look_up(found: dict[str, Any], bags: Mapping[str, Any]):
        from mx_adagrad import sharding  # which builds on this module

        pooled, lookups = {}, {}
        for p in tables:
            where = f"value_and_bag_grad (table {p!r})"
            split = sharding.row_split(found[p])
            if split is None:
                lookups[p] = lookup(where, found[p], bags[p], modes[p])
            else:  # split by rows over an Explicit mesh axis: owners pool, bags travel
                pooled[p], lookups[p] = sharding.split_lookup(
                    where, found[p], bags[p], modes[p], *split
                )
        whole = [p for p in tables if p not in pooled]
        pooled.update(zip(whole, pool([found[p] for p in whole], [lookups[p] for p in whole])))
        return pooled, lookups

    def leaf(table: Any, lk: Any, d_pooled: chex.Array) -> BagGrad:
        if not isinstance(lk, Lookup):
            from mx_adagrad import sharding

            return sharding.split_grad(table, lk, d_pooled)
        return BagGrad(lk.ids, lk.bag, lk.scale, d_pooled, jnp.shape(table))

    return sparse._value_and_table_grad(
        "value_and_bag_grad", loss_fn, tables, has_aux, "bags", look_up, leaf
    )
