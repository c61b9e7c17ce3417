"""Flax adapters: the one-pass step and sparse embedding tables where Flax users train.

Imported only when used (``import mx_adagrad.flax``), so flax stays an optional dependency.

* :class:`Optimizer`: ``nnx.Optimizer`` (same attributes, same ``update(model, grads)``) that adds
  updates with :func:`mx_adagrad.apply_updates`, so gradients may hold
  :class:`~mx_adagrad.RowSparse` and :class:`~mx_adagrad.BagGrad` leaves, and that takes the
  one-pass step of :func:`mx_adagrad.flat.fused_adagrad` or
  :func:`~mx_adagrad.flat.fused_rowwise_adagrad` when given one.
* :class:`Embed`, :class:`EmbedBag`, :func:`value_and_grad`, :func:`grad`: ``nnx.Embed``, an
  embedding bag (:func:`mx_adagrad.embedding_bag` as a module) and ``nnx.value_and_grad`` /
  ``nnx.grad``, except that the gradient of every ``Embed`` table ``f`` looked rows up in is a
  RowSparse of the ids and ``d loss / d rows``, and that of every ``EmbedBag`` table a BagGrad of
  the bags and ``d loss / d pooled``: a table-sized gradient is never formed.
* :class:`TrainState`: Linen's ``TrainState`` whose ``apply_gradients`` does the same.

Each gives the numbers of its Flax counterpart run with the same transformation: bitwise for
dense leaves (the one-pass step is bitwise ``tx.update`` + ``apply_updates``), a RowSparse
table's rows are those of ``mx_adagrad.value_and_row_grad`` + ``tx.update`` +
``mx_adagrad.apply_updates`` on the same ids, and a BagGrad table's those of
``mx_adagrad.value_and_bag_grad`` on the same bags.

Example::

    model = Model(nnx.Rngs(0))                    # holds an mx_adagrad.flax.Embed table
    optimizer = mx_adagrad.flax.Optimizer(model, mx_adagrad.flat.fused_adagrad(0.1, wd=1e-4))

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def train_step(model, optimizer, ids, labels):
        loss, grads = mx_adagrad.flax.value_and_grad(loss_fn)(model, ids, labels)
        optimizer.update(model, grads)            # RowSparse table rows, one-pass dense leaves
        return loss
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_embed_init
from flax.training import train_state

from mx_adagrad import _checks, flat
from mx_adagrad import bags as bags_lib
from mx_adagrad.bags import BagGrad, Bags, Lookup
from mx_adagrad.sparse import RowSparse
from mx_adagrad.updates import apply_updates


def _transformation(where: str, tx: Any) -> tuple[optax.GradientTransformation, Callable | None]:
    """``(transformation, one-pass step or None)`` for what a user passed as ``tx``."""
    fused = flat.one_pass(tx)
    if isinstance(tx, flat.FusedAdaGrad):
        return tx.tx, tx.step
    if not isinstance(tx, optax.GradientTransformation):
        _checks.fail(
            where,
            "tx",
            "an optax.GradientTransformation or what mx_adagrad.flat.fused_adagrad returns",
            tx,
        )
    return tx, None if fused is None else fused.step


class Optimizer(nnx.Optimizer):
    """``nnx.Optimizer`` that takes sparse gradients and the one-pass AdaGrad step.

    ::

        updates, opt_state = tx.update(grads, opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)   # sparse leaves: their rows only

    or, when ``tx`` has a one-pass form (what :func:`mx_adagrad.flat.fused_adagrad` or
    :func:`~mx_adagrad.flat.fused_rowwise_adagrad` returns, its ``.tx``, or
    ``mx_adagrad.adagrad(...)`` / ``mx_adagrad.rowwise_adagrad(...)``: see
    :func:`mx_adagrad.flat.one_pass`), ``params, opt_state = fused.step(params, grads,
    opt_state)``: on CPU, every float32 leaf (float16/bfloat16 with ``multi_precision``) is
    updated by the native kernel in one pass over memory, in place when the optimizer and model
    are donated to ``nnx.jit``, every float32 table with a RowSparse or BagGrad gradient (from
    :func:`value_and_grad`) on its touched rows by one native call for all tables, and on params
    sharded over a mesh each device steps its shards; every other leaf and backend runs the XLA
    program of ``fused.tx``. Both are bitwise ``nnx.Optimizer(model, fused.tx)``.

    Attributes are those of ``nnx.Optimizer``: ``step``, ``tx`` (the optax transformation, also
    for a fused ``tx``), ``opt_state`` (``tx``'s state, the same pytree as ``nnx.Optimizer``'s,
    so checkpoints are interchangeable), ``wrt``, ``graph``; plus ``one_pass`` (the fused step,
    or None).

    Args:
      model: the NNX module whose ``wrt`` variables are optimized.
      tx: an optax transformation (``mx_adagrad.adagrad(...)``, any other), or the
        :class:`~mx_adagrad.flat.FusedAdaGrad` of ``mx_adagrad.flat.fused_adagrad(...)``.
      wrt: the filter of the variables to optimize, as in ``nnx.Optimizer`` (default
        ``nnx.Param``).
      graph: graph mode (True) or tree mode (False), as in ``nnx.Optimizer``.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation | flat.FusedAdaGrad,
        *,
        wrt: nnx.filterlib.Filter = nnx.Param,
        graph: bool | None = None,
    ) -> None:
        transformation, one_pass = _transformation("flax.Optimizer", tx)
        super().__init__(model, transformation, wrt=wrt, graph=graph)
        self.one_pass = one_pass

    def update(self, model: nnx.Module, grads: Any, /, **kwargs: Any) -> optax.Updates:
        """One optimizer step: updates ``model``'s ``wrt`` variables and ``opt_state`` in place.

        Args:
          model: the module this optimizer was built for.
          grads: the gradients, as ``nnx.grad`` or :func:`value_and_grad` return them (dense
            arrays, RowSparse and BagGrad leaves), or their pure form ``nnx.as_pure(grads)`` (a State
            of arrays shaped like the ``wrt`` variables). Pass the pure form into an
            ``nnx.jit`` step that does not compute them: ``nnx.jit`` copies an undonated
            argument that holds Variables back out on every call.
          **kwargs: extra arguments of ``tx.update`` (``optax.GradientTransformationExtraArgs``);
            not accepted by the one-pass step.

        Returns:
          The updates of ``tx.update``, as ``nnx.Optimizer.update`` returns them (under ``jit``
          they cost nothing when unused).
        """
        if kwargs and self.one_pass is not None:
            _checks.fail(
                "flax.Optimizer.update", "kwargs", "empty with a one-pass tx", sorted(kwargs)
            )
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        if _holds_variables(grads):
            grads = nnx.state(grads, self.wrt, graph=self.graph)
        grads = nnx.as_pure(grads)
        opt_state = nnx.as_pure(self.opt_state)
        updates, new_opt_state = self.tx.update(grads, opt_state, params, **nnx.as_pure(kwargs))
        if self.one_pass is None:
            new_params = apply_updates(params, updates)
        else:
            new_params, new_opt_state = self.one_pass(params, grads, opt_state)
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
        self.step[...] += 1
        return updates


def _holds_variables(tree: Any) -> bool:
    def is_variable(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    return any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable))


class _Table:
    """The part of :class:`Embed` and :class:`EmbedBag` that :func:`value_and_grad` drives.

    Such a module holds its table as ``self.embedding`` (an ``nnx.Param`` of shape ``(rows,
    ...)``) and reads it, while a :func:`value_and_grad` call records it, only through
    :meth:`_look_up` with a ``compute(table) -> (out, context)``: the tape runs ``compute`` on the
    table, gives ``out`` a zero slot whose gradient is ``d loss / d out`` and keeps ``context``
    (what the gradient needs besides it: the ids, the bags). After differentiation
    :meth:`_gradient` makes the table's sparse gradient from the contexts and the slots' gradients
    of the module's calls, in call order.
    """

    embedding: nnx.Param

    def _taped(self) -> bool:
        """Whether a :func:`value_and_grad` call is recording this module's lookups."""
        tape = _TAPE.get()
        return tape is not None and id(self) in tape.indices

    def _look_up(self, compute: Callable[[jax.Array], tuple[jax.Array, Any]]) -> jax.Array:
        """``compute``'s ``out`` on the recording tape (call only where :meth:`_taped`)."""
        return _TAPE.get().look_up(self, compute)

    def _gradient(self, contexts: list[Any], grads: list[jax.Array]) -> _checks.SparseLeaf:
        """The table's gradient from each call's context and ``d loss / d out``."""
        raise NotImplementedError


class Embed(_Table, nnx.Embed):
    """``nnx.Embed`` whose table :func:`value_and_grad` differentiates as a RowSparse gradient.

    Same arguments, parameters and outputs as ``nnx.Embed``; outside :func:`value_and_grad`
    (and for ``nnx.grad``) it is ``nnx.Embed``. Inside, a call ``embed(ids)`` looks the rows up
    as ``nnx.Embed`` does (``jnp.take``; a negative id counts from the end, an id out of range
    gives a row of NaN and no gradient), and the table's gradient collects ``RowSparse(ids,
    d loss / d rows)`` over the calls.

    Args:
      num_embeddings: rows of the table.
      features: columns of the table.
      rngs: as in ``nnx.Embed``.
      **kwargs: the other arguments of ``nnx.Embed`` (``dtype``, ``param_dtype``,
        ``embedding_init``, ``promote_dtype``, ``embedding_metadata``).
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if not self._taped():
            return super().__call__(inputs, out_sharding)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        ids = jnp.zeros_like(inputs) if self.num_embeddings == 1 else inputs
        take = (
            _take
            if out_sharding is None
            else jax.sharding.auto_axes(out_sharding=out_sharding)(_take)
        )

        def compute(table: jax.Array) -> tuple[jax.Array, jax.Array]:
            # the rows, and the ids with negative ids counted from the end
            return take(table, ids), jnp.where(ids < 0, ids + self.num_embeddings, ids)

        (rows,) = self.promote_dtype((self._look_up(compute),), dtype=self.dtype, inexact=False)
        return rows

    def _gradient(self, ids: list[jax.Array], row_grads: list[jax.Array]) -> RowSparse:
        features = self.embedding.shape[1:]
        return RowSparse(
            jnp.concatenate([i.reshape(-1) for i in ids]),
            jnp.concatenate([r.reshape(-1, *features) for r in row_grads]),
            self.embedding.shape,
        )


def _take(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0)


class EmbedBag(_Table, nnx.Module):
    """An embedding table looked up in bags (:func:`mx_adagrad.embedding_bag`), as an NNX module.

    ::

        pooled[b] = sum(table[i] for i in bag b)                  # mode="sum"
        pooled[b] = sum(weights[j] * table[i] for i in bag b)     # Bags(..., weights), "sum"
        pooled[b] = sum(table[i] for i in bag b) / len(bag b)     # mode="mean"

    ``bag(bags)`` takes an int array ``(B, L)`` (ids outside ``[0, num_embeddings)`` are padding:
    they add nothing and do not count in the mean; an empty bag pools to zeros) or
    :class:`mx_adagrad.Bags` ``(ids, offsets, weights)``, and returns ``(B, features)``: the
    rows are pooled in ``param_dtype`` (on CPU a float32 table by the native kernel), then
    promoted to ``dtype``. Outside :func:`value_and_grad` (and for ``nnx.grad``) it is
    ``mx_adagrad.embedding_bag(bag.embedding[...], bags, mode)``, with its dense gradient.
    Inside, the table's gradient is a :class:`mx_adagrad.BagGrad` ``(ids, bag, scale, d loss /
    d pooled, table.shape)``, the calls concatenated (bags numbered on from the previous calls'),
    which the one-pass steps of :mod:`mx_adagrad.flat` update without forming a row per id; the
    gradient of ``Bags.weights`` is ``embedding_bag``'s.

    torch equivalent: ``nn.EmbeddingBag(num_embeddings, features, mode=mode, sparse=True)``
    (its ``padding_idx`` is an out-of-range id here).

    Args:
      num_embeddings: rows of the table.
      features: columns of the table.
      mode: ``"sum"`` or ``"mean"`` (Bags with weights: ``"sum"``).
      rngs: draws the initial table (``rngs.params()``).
      dtype: the dtype of the pooled rows (default: ``param_dtype``).
      param_dtype: the table's dtype (default float32).
      embedding_init: ``init(key, (num_embeddings, features), param_dtype)``; default
        ``nnx.Embed``'s (variance scaling 1, fan in, normal).
      promote_dtype: promotes ``(pooled,)`` to ``dtype``, as in ``nnx.Embed``.
      embedding_metadata: metadata of the ``embedding`` Param, as in ``nnx.Embed``.

    Example:
      >>> import jax.numpy as jnp, mx_adagrad.flax
      >>> from flax import nnx
      >>> def rows_0_to_7(key, shape, dtype):
      ...     return jnp.arange(8.0, dtype=dtype).reshape(shape)
      >>> bag = mx_adagrad.flax.EmbedBag(4, 2, rngs=nnx.Rngs(0), embedding_init=rows_0_to_7)
      >>> bag(jnp.array([[0, 1], [3, -1]]))
      Array([[2., 4.],
             [6., 7.]], dtype=float32)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        mode: str = "sum",
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Callable[..., jax.Array] = default_embed_init,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        embedding_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        _checks.integer("flax.EmbedBag", "num_embeddings", num_embeddings, minimum=1)
        _checks.integer("flax.EmbedBag", "features", features, minimum=1)
        _checks.one_of("flax.EmbedBag", "mode", mode, bags_lib.MODES)
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
            **embedding_metadata,
        )
        self.num_embeddings, self.features, self.mode = num_embeddings, features, mode
        self.dtype = dtype or self.embedding.dtype
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype

    def __call__(self, bags: jax.Array | Bags) -> jax.Array:
        """The pooled rows ``(B, features)`` of ``bags``."""
        # Only the table's shape and dtype are read here: the lookup is the table's one use.
        lk = bags_lib.lookup("flax.EmbedBag", self.embedding[...], bags, self.mode)
        if self._taped():
            pooled = self._look_up(lambda table: (bags_lib.pooled(table, lk), lk))
        else:
            pooled = bags_lib.pooled(self.embedding[...], lk)
        (pooled,) = self.promote_dtype((pooled,), dtype=self.dtype, inexact=False)
        return pooled

    def _gradient(self, lookups: list[Lookup], bag_grads: list[jax.Array]) -> BagGrad:
        starts = np.cumsum([0, *(g.shape[0] for g in bag_grads[:-1])])
        return BagGrad(
            jnp.concatenate([lk.ids for lk in lookups]),
            jnp.concatenate([lk.bag + int(s) if s else lk.bag for lk, s in zip(lookups, starts)]),
            jnp.concatenate([lk.scale for lk in lookups]),
            jnp.concatenate(bag_grads),
            self.embedding.shape,
        )


@jax.custom_vjp
def _with_slot(out: jax.Array, slot: jax.Array) -> jax.Array:
    """``out + slot`` for a ``slot`` of zeros: ``out``, unchanged; the cotangent goes to both, so
    ``slot``'s gradient is ``d loss / d out`` (and ``out`` passes its own on: to nothing for a
    table read through ``stop_gradient``, to ``Bags.weights`` for a weighted bag)."""
    del slot
    return out


def _with_slot_forward(out, slot):
    del slot
    return out, None


def _with_slot_backward(_, cotangent):
    return cotangent, cotangent


_with_slot.defvjp(_with_slot_forward, _with_slot_backward)


@dataclasses.dataclass
class _Tape:
    """What the lookups of one traced call of ``f`` (:class:`Embed`, :class:`EmbedBag`) read and
    record.

    Attributes:
      indices: ``id(module) -> k``, the k-th table of the call's table modules.
      trace: the trace ``f`` runs in; a lookup made in another one (inside ``jax.lax`` control
        flow or a transform) is refused.
      tables: the probe: the table values the lookups read (not the Variables, whose values are
        then guards that must stay unread).
      slots: the differentiated call: per table, one zero array per lookup, whose gradient is
        ``d loss / d out`` of that lookup.
      lookups: per table, per lookup: the output's shape and dtype (probe), or the lookup's
        context (differentiated call: what the module's ``_gradient`` takes).
    """

    indices: dict[int, int]
    trace: Any
    lookups: list[list[Any]]
    tables: list[jax.Array] | None = None
    slots: list[list[jax.Array]] | None = None

    def look_up(
        self, module: _Table, compute: Callable[[jax.Array], tuple[jax.Array, Any]]
    ) -> jax.Array:
        if jax.extend.core.get_opaque_trace_state() != self.trace:
            _checks.fail(
                "flax.value_and_grad",
                f"every {type(module).__name__} lookup",
                "made in f itself, not inside jax.lax control flow, jax.checkpoint or an nnx "
                "transform (use nnx.value_and_grad for such a model)",
                _checks.shown("a lookup inside one"),
            )
        index = self.indices[id(module)]
        calls = self.lookups[index]
        if self.slots is None:
            out, _ = compute(self.tables[index])
            calls.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
            return out
        slot = self.slots[index][len(calls)]
        out, context = compute(jax.lax.stop_gradient(module.embedding[...]))
        calls.append(context)
        return _with_slot(out, slot)


_TAPE: contextvars.ContextVar[_Tape | None] = contextvars.ContextVar(
    "mx_adagrad_tape", default=None
)


@contextlib.contextmanager
def _recording(tape: _Tape) -> Iterator[None]:
    token = _TAPE.set(tape)
    try:
        yield
    finally:
        _TAPE.reset(token)


def _tables(args: Sequence[Any], argnums: tuple[int, ...]) -> list[tuple[tuple, _Table]]:
    """``((argnum, *path), module)`` for every :class:`Embed` and :class:`EmbedBag` in the
    differentiated arguments."""
    return [
        ((i, *path), node)
        for i in argnums
        for path, node in nnx.iter_graph(args[i])
        if isinstance(node, _Table)
    ]


def _live(jaxpr: Any) -> set[Any]:
    """The variables of ``jaxpr`` its outputs depend on (or that feed an effect)."""
    live = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if isinstance(v, jax.extend.core.Var))
    return live


def _probe(
    f: Callable[..., Any],
    args: tuple,
    modules: list[tuple[tuple, _Table]],
    argnums: tuple[int, ...],
    has_aux: bool,
) -> list[list[jax.ShapeDtypeStruct]]:
    """Traces ``f`` once (no computation) to find each table's lookups; checks that the loss
    reads the tables through them only (else their gradient would not be sparse)."""
    graphdef, state = nnx.split(args)
    paths = [path for path, _ in modules]
    tables = [module.embedding.get_value() for _, module in modules]
    tapes = []

    def loss_of(state, guards):
        inner = nnx.merge(graphdef, state)
        found = dict(_tables(inner, argnums))
        indices, lookup_tables = {}, []
        for k, path in enumerate(paths):
            lookup_tables.append(found[path].embedding.get_value())
            found[path].embedding.set_value(guards[k])
            indices[id(found[path])] = k
        trace = jax.extend.core.get_opaque_trace_state()
        tape = _Tape(indices, trace, [[] for _ in paths], tables=lookup_tables)
        tapes.append(tape)
        with _recording(tape):
            out = f(*inner)
        return out[0] if has_aux else out

    closed = jax.make_jaxpr(loss_of)(state, tables)
    guards = closed.jaxpr.invars[-len(paths) :]
    live = _live(closed.jaxpr)
    for (path, module), guard in zip(modules, guards):
        if guard in live:
            kind = type(module).__name__
            _checks.fail(
                "flax.value_and_grad",
                f"the {kind} table {_path_name(path)}",
                f"read by the loss through {kind}.__call__ only (Embed.attend, reading "
                ".embedding or a lookup inside an nnx transform use the whole table; use "
                "nnx.value_and_grad for such a model)",
                _checks.shown("another read"),
            )
    return tapes[0].lookups


def _path_name(path: tuple) -> str:
    return f"args[{path[0]}]" + "".join(f".{key}" for key in path[1:]) + ".embedding"


def _set_table_gradient(grads: Any, path: tuple, sparse: _checks.SparseLeaf) -> None:
    for where, node in nnx.iter_graph(grads):
        if where == (*path, "embedding") and isinstance(node, nnx.Variable):
            node.set_value(sparse)
            return
    _checks.fail("flax.value_and_grad", "the gradient", f"to hold {(*path, 'embedding')}", grads)


def value_and_grad(
    f: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """``nnx.value_and_grad`` with sparse gradients for the :class:`Embed` and :class:`EmbedBag`
    tables ``f`` uses.

    ::

        loss, grads = value_and_grad(loss_fn)(model, ids, labels)
        # grads is nnx.value_and_grad(loss_fn)(model, ids, labels)[1], except that the gradient
        # of each Embed table looked up in loss_fn is
        RowSparse(concat(ids of its calls), concat(d loss / d rows of its calls), table.shape)
        # and that of each EmbedBag table (bag numbers go on from one call to the next)
        BagGrad(concat(ids), concat(bag + bags of the calls before), concat(scale),
                concat(d loss / d pooled of its calls), table.shape)

    The dense gradient of a table is never formed, so a step costs what its lookups cost,
    whatever the table's size. How: ``f`` is traced once (no computation) to find each table's
    lookups and to check that the loss reads the table through the module's ``__call__`` only;
    then each lookup's output (rows, pooled rows) gets a zero "slot" argument that
    ``nnx.value_and_grad`` differentiates (``d loss / d slot = d loss / d output``), while the
    table itself is read through ``stop_gradient`` (its dense zero gradient is dropped; under
    ``jit`` it is never computed). The ids are those ``f`` called the Embed with, negative ids
    counted from the end; an EmbedBag records its bags' ids, the bag of each id and its scale
    (:func:`mx_adagrad.bags.lookup`).

    ``f`` must make its lookups itself: a lookup inside ``jax.lax`` control flow, ``jax.checkpoint``
    or an nnx transform, ``Embed.attend`` (tied embeddings) or reading ``.embedding`` is a
    ``ValueError`` naming the table: use ``nnx.value_and_grad`` there. Tables ``f`` does not look
    up get ``nnx.value_and_grad``'s (zero) gradient.

    Args:
      f: the loss function, as for ``nnx.value_and_grad``.
      argnums: the positions of the arguments to differentiate (int or sequence of ints).
      has_aux: ``f`` returns ``(loss, aux)``.

    Returns:
      ``fn(*args) -> (loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``), ``grads`` as
      ``nnx.value_and_grad`` returns them (one per argnum when ``argnums`` is a sequence).
    """
    single = isinstance(argnums, int)
    positions = (argnums,) if single else tuple(argnums)
    if not positions or not all(isinstance(i, int) and i >= 0 for i in positions):
        _checks.fail("flax.value_and_grad", "argnums", "an int >= 0 or a sequence of them", argnums)

    def wrapped(*args: Any) -> Any:
        modules = _tables(args, positions)
        if not modules:
            return nnx.value_and_grad(f, argnums=argnums, has_aux=has_aux)(*args)
        paths = [path for path, _ in modules]
        shapes = _probe(f, args, modules, positions, has_aux)
        used = [k for k, calls in enumerate(shapes) if calls]
        slots = [[jnp.zeros(s.shape, s.dtype) for s in shapes[k]] for k in used]

        def with_slots(*inner_and_slots: Any) -> Any:
            *inner, slots = inner_and_slots
            found = dict(_tables(inner, positions))
            indices = {id(found[paths[k]]): j for j, k in enumerate(used)}
            trace = jax.extend.core.get_opaque_trace_state()
            tape = _Tape(indices, trace, [[] for _ in used], slots=slots)
            with _recording(tape):
                out = f(*inner)
            loss, aux = out if has_aux else (out, None)
            return loss, (aux, tape.lookups)

        value_and_grads = nnx.value_and_grad(
            with_slots, argnums=(*positions, len(args)), has_aux=True
        )
        (loss, (aux, contexts)), (*grads, slot_grads) = value_and_grads(*args, slots)
        for j, k in enumerate(used):
            sparse = modules[k][1]._gradient(contexts[j], slot_grads[j])
            _set_table_gradient(grads[positions.index(paths[k][0])], paths[k][1:], sparse)
        value = (loss, aux) if has_aux else loss
        return value, grads[0] if single else tuple(grads)

    return wrapped


def grad(
    f: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """``nnx.grad`` with sparse gradients for :class:`Embed` and :class:`EmbedBag` tables, as
    :func:`value_and_grad`.

    Returns:
      ``fn(*args) -> grads`` (``(grads, aux)`` with ``has_aux``).
    """
    value_and_grads = value_and_grad(f, argnums, has_aux)

    def wrapped(*args: Any) -> Any:
        value, grads = value_and_grads(*args)
        return (grads, value[1]) if has_aux else grads

    return wrapped


class TrainState(train_state.TrainState):
    """Linen's ``TrainState`` that takes RowSparse gradients and the one-pass AdaGrad step.

    ``TrainState.create(apply_fn=..., params=..., tx=...)`` takes an optax transformation or
    what :func:`mx_adagrad.flat.fused_adagrad` returns (then ``tx`` is its ``.tx`` and
    ``one_pass`` its step). ``apply_gradients(grads=...)`` is Flax's, with
    :func:`mx_adagrad.apply_updates` (gradients may hold RowSparse leaves, e.g. from
    ``mx_adagrad.value_and_row_grad``) or the one-pass step in place of ``optax.apply_updates``;
    the results are bitwise those of Flax's ``TrainState`` with ``tx``.

    Attributes:
      one_pass: the fused step ``(params, grads, opt_state) -> (params, opt_state)``, or None.
    """

    one_pass: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """``step + 1`` and the parameters and optimizer state after one update by ``grads``."""
        overwrite = OVERWRITE_WITH_GRADIENT in grads
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params
        if self.one_pass is None:
            updates, opt_state = self.tx.update(grads_with_opt, self.opt_state, params_with_opt)
            new_params = apply_updates(params_with_opt, updates)
        else:
            new_params, opt_state = self.one_pass(params_with_opt, grads_with_opt, self.opt_state)
        if overwrite:
            new_params = {
                "params": new_params,
                OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(step=self.step + 1, params=new_params, opt_state=opt_state, **kwargs)

    @classmethod
    def create(
        cls, *, apply_fn: Callable[..., Any], params: Any, tx: Any, **kwargs: Any
    ) -> TrainState:
        """A state with ``step=0`` and ``tx.init(params)``; ``tx`` may be a fused AdaGrad."""
        transformation, one_pass = _transformation("flax.TrainState.create", tx)
        return super().create(
            apply_fn=apply_fn, params=params, tx=transformation, one_pass=one_pass, **kwargs
        )
