"""Step 8: a Gluon checkpoint in the JAX model's own layout: :func:`~mx_adagrad.mxnet_io.to_jax` and :func:`~mx_adagrad.mxnet_io.restore_into`.

:func:`~mx_adagrad.mxnet_io.to_jax` converts Gluon's arrays into a pytree shaped like the model's (Flax NNX state,
Linen variables, Haiku params or state); :func:`~mx_adagrad.mxnet_io.restore_into` does the same for a whole
checkpoint, optimizer included: each AdaGrad history (and ``multi_precision`` master copy) gets its
weight's permutation, and ``lr_mult``/``wd_mult`` follow the parameters to their new paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mx_adagrad import contrib
from mx_adagrad._checks import fail
from mx_adagrad.mxnet_io.layouts import Refused, Rule, rule_for
from mx_adagrad.mxnet_io.mapping import (
    entry,
    explicit_pairs,
    kept,
    listed,
    pairs_by_order,
    target_leaves,
)
from mx_adagrad.mxnet_io.optimizers import read_checkpoint, transformation
from mx_adagrad.mxnet_io.pairing import TrainerOrder

__all__ = ["restore_into", "to_jax"]


class _Plan(NamedTuple):
    """Where every mapped leaf of the target comes from: ``{path: (gluon name, rule)}``."""

    sources: dict[str, tuple[str, Rule]]

    def fill(self, fetch: Any, like: chex.ArrayTree) -> chex.ArrayTree:
        """``like`` with each mapped leaf replaced by ``rule.convert(fetch(gluon name))``.

        The converted array takes the dtype and sharding of ``like``'s leaf; ``None`` leaves
        (no master copy) and kept leaves stay as they are.
        """

        def leaf(key_path: Any, value: Any) -> Any:
            path = "/".join(jax.tree_util.keystr((key,), simple=True) for key in key_path)
            if value is None or path not in self.sources:
                return value
            gluon, rule = self.sources[path]
            array = np.asarray(rule.convert(np.asarray(fetch(gluon))), dtype=value.dtype)
            sharding = getattr(value, "sharding", None)
            return jnp.asarray(array) if sharding is None else jax.device_put(array, sharding)

        return jax.tree_util.tree_map_with_path(leaf, like, is_leaf=lambda x: x is None)


def _plan(
    where: str, arrays: Any, target: chex.ArrayTree, name_map: Any, keep: Sequence[str]
) -> _Plan:
    """Pairs every target leaf with a Gluon array and its rule; raises, listing every bad entry."""
    if not isinstance(arrays, Mapping):
        fail(where, "arrays", "a dict {gluon name: array} (load_params of a named file)", arrays)
    leaves = target_leaves(where, target)
    keep_paths = kept(where, keep, leaves)
    explicit = name_map is not None
    if explicit:
        pairs, problems = explicit_pairs(where, arrays, leaves, name_map, keep_paths)
    else:
        pairs, problems = pairs_by_order(where, arrays, leaves, keep_paths), []
    sources = {}
    for leaf in leaves:
        if leaf.path in keep_paths:
            if isinstance(leaf.value, jax.ShapeDtypeStruct):
                problems.append(
                    f"target leaf {leaf.path!r} must hold an array to stay as it is (keep), "
                    "got a jax.ShapeDtypeStruct"
                )
            continue
        gluon = pairs.get(leaf.path)
        if gluon is None:
            problems.append(
                f"target leaf {leaf.path!r} must be the place of a Gluon array (name_map) or be "
                "listed in keep, got no entry"
            )
        elif gluon in arrays:
            shape = tuple(np.shape(arrays[gluon]))
            try:
                sources[leaf.path] = (gluon, rule_for(gluon, shape, leaf.name, leaf.value.shape))
            except Refused as refused:
                problems.append(
                    f"{entry(gluon, leaf.path, explicit)} must {refused.expected}, "
                    f"got {refused.got}"
                )
    if problems:
        raise ValueError(f"mx_adagrad.{where}: " + "; ".join(problems))
    return _Plan(sources)


def to_jax(
    arrays: Mapping[str, Any],
    target: chex.ArrayTree,
    *,
    name_map: Mapping[str, str] | None = None,
    keep: Sequence[str] = (),
) -> chex.ArrayTree:
    """Gluon's arrays in a JAX model's own layout: a pytree like ``target``.

    MXNet equivalent: ``net.load_parameters(path)`` on the same net; here the net is a Flax or
    Haiku model and each array is permuted into that model's layout::

        Gluon                                    JAX (Flax NNX / Linen, Haiku)
        Dense weight (out, in)                -> kernel, w (in, out)
        Conv1D/2D/3D weight (O, I, *spatial)  -> kernel, w (*spatial, I, O)
        Embedding weight                      -> embedding, embeddings (unchanged)
        BatchNorm / LayerNorm gamma, beta     -> scale, bias / offset
        running_mean, running_var             -> mean, var (Haiku: mean_ema/average, ...)
        anything else                         -> unchanged (equal shapes)

    The rule of each leaf is chosen by the leaf's name and checked against the Gluon parameter's
    (see :mod:`mx_adagrad.mxnet_io.layouts`). Example::

        model = nnx.Sequential(nnx.Embed(20, 4, rngs=rngs), flatten, nnx.Linear(12, 3, rngs=rngs))
        state = to_jax(load_params("net.params"), nnx.to_pure_dict(nnx.state(model)))
        nnx.update(model, state)

    Args:
      arrays: ``{gluon name: array}``, what :func:`~mx_adagrad.mxnet_io.load_params` returns
        for Gluon's ``save_parameters`` (structural names such as ``"1.weight"``).
      target: a pytree of arrays or ``jax.ShapeDtypeStruct`` s in the JAX model's layout:
        ``nnx.to_pure_dict(nnx.state(model))``, Linen ``variables`` or ``variables["params"]``,
        Haiku ``params`` or ``state``; only its structure, shapes, dtypes and shardings are
        used (and the values of ``keep``'s leaves).
      name_map: ``{gluon name: path in target}``, the path joining dict keys, attribute names
        and sequence indices with ``"/"`` (``"layers/2/kernel"``, Haiku's
        ``"batch_norm/~/mean_ema/average"``); Gluon names it leaves out are not used. ``None``
        pairs the two by order, for plain sequential nets (the rule is in
        :mod:`mx_adagrad.mxnet_io.mapping`: ``nnx.Sequential``, Linen ``nn.Sequential``, one
        module type; anything else is refused as ambiguous).
      keep: paths of target leaves (or subtrees) that no Gluon array maps to and that stay as
        they are in ``target`` (Haiku's moving-average ``counter`` and ``hidden``, a new head).

    Returns:
      A pytree with ``target``'s structure: every mapped leaf is the converted Gluon array as a
      ``jax.Array`` with the target leaf's dtype (and sharding, when the target leaf has one);
      kept leaves are ``target``'s own.

    Raises:
      ValueError: naming each bad entry (Gluon name and path): a Gluon name not in ``arrays``,
        a path not in ``target`` (or in ``keep``, or given twice), a target leaf that no name
        maps to and ``keep`` does not list, a Gluon parameter sent to a leaf of another kind (a
        ``gamma`` to a ``bias``), or a shape that the leaf's rule does not turn into the
        target's; with ``name_map=None``, a target whose layers are not ordered by one number,
        or layers that do not pair.
    """
    plan = _plan("to_jax", arrays, target, name_map, keep)
    return plan.fill(arrays.__getitem__, target)


def _check_rows_kept(
    where: str, plan: _Plan, arrays: Mapping[str, np.ndarray], named: bool
) -> None:
    """GroupAdaGrad keeps one history number per row of MXNet's layout: refuses a mapping whose
    rule does not keep every row a row (Dense's transpose, Conv's permutation), since the rows'
    histories would become columns, which ``group_adagrad`` (per row of the target) cannot
    continue."""
    moved = []
    for path, (gluon, rule) in plan.sources.items():
        shape = arrays[gluon].shape
        order = np.arange(np.prod(shape)).reshape(shape)
        converted = rule.convert(order)
        if converted.shape[:1] != shape[:1] or not np.array_equal(converted.reshape(shape), order):
            moved.append(f"{entry(gluon, path, named)} ({rule.name})")
    if moved:
        raise ValueError(
            f"mx_adagrad.{where}: GroupAdaGrad keeps one history number per row of MXNet's "
            "layout, so each GroupAdaGrad parameter must map to a leaf of the same rows (an "
            "embedding table, or a leaf whose name takes it unchanged), got: " + "; ".join(moved)
        )


def restore_into(
    params_path: str | os.PathLike[str],
    states_path: str | os.PathLike[str],
    target: chex.ArrayTree,
    *,
    name_map: Mapping[str, str] | None = None,
    trainer_order: TrainerOrder = None,
    keep: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, chex.ArrayTree, optax.OptState]:
    """Resumes a Gluon checkpoint in a JAX model's own layout, optimizer state included.

    MXNet equivalent: ``net.load_parameters(params_path)`` and
    ``trainer.load_states(states_path)``, then ``trainer.step``. Here::

        tx, params, opt_state = restore_into("net.params", "trainer.states",
                                             nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        updates, opt_state = tx.update(grads, opt_state, params)  # grads like params
        params = mx_adagrad.apply_updates(params, updates)

    continues the training as MXNet would have: as :func:`~mx_adagrad.mxnet_io.restore_functional`
    (the same transformation, semantics and hyperparameters), with every array in the target's
    layout. Each AdaGrad history, and each float32 master copy of ``multi_precision``, is
    converted by its weight's rule (:func:`to_jax`), so that it stays aligned with the weight
    element for element.

    Args:
      params_path: the ``net.save_parameters`` file.
      states_path: the ``trainer.save_states`` file of the same step.
      target: the trainable parameters of the JAX model (arrays or ``jax.ShapeDtypeStruct`` s):
        ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, Linen ``variables["params"]``, Haiku
        ``params``. Every mapped leaf must come from a parameter the Trainer trained (one with
        a state in ``states_path``): load BatchNorm's running statistics with :func:`to_jax`.
      name_map: as in :func:`to_jax`.
      trainer_order: as in :func:`~mx_adagrad.mxnet_io.restore`: which state is whose.
      keep: as in :func:`to_jax`: leaves new to the JAX model; they start from ``tx.init``'s
        state (a zero history).

    Returns:
      ``(tx, params, opt_state)``:

      * ``tx``: as :func:`~mx_adagrad.mxnet_io.restore_functional`'s, with ``lr_mult`` and
        ``wd_mult`` as ``{path in target: value}``.
      * ``params``: a pytree like ``target``, in its dtypes. A weight trained with
        ``multi_precision`` comes from its float32 master copy (the exact value of the training),
        whatever the target's dtype.
      * ``opt_state``: ``tx.init(params)`` with the converted histories and, where
        ``tx`` keeps master copies (float16 and bfloat16 leaves with ``multi_precision``), the
        converted float32 master copies (or the float32 Gluon weights).

    Raises:
      ValueError: everything :func:`~mx_adagrad.mxnet_io.restore_functional` and
        :func:`to_jax` raise, a mapped Gluon parameter that has no optimizer state, and, for a
        GroupAdaGrad checkpoint, a parameter mapped by a rule that moves its rows (a Dense
        ``kernel``: its per-row histories would become per-column).
      OSError: if a file cannot be read.
    """
    where = "restore_into"
    optimizer, arrays, states, names = read_checkpoint(params_path, states_path, trainer_order)
    plan = _plan(where, arrays, target, name_map, keep)
    trained = {name: i for i, name in enumerate(names)}
    untrained = [(path, gluon) for path, (gluon, _) in plan.sources.items() if gluon not in trained]
    if untrained:
        raise ValueError(
            f"mx_adagrad.{where}: "
            + "; ".join(
                f"{entry(gluon, path, name_map is not None)} must have a Gluon parameter the "
                f"Trainer trained (one with a state in trainer.states: {listed(names)}), got "
                f"{gluon!r}, which has none (load it with to_jax)"
                for path, gluon in untrained
            )
        )
    if isinstance(optimizer, contrib.GroupAdaGrad):
        _check_rows_kept(where, plan, arrays, name_map is not None)
    tx = transformation(
        where, optimizer, {path: trained[gluon] for path, (gluon, _) in plan.sources.items()}
    )

    def state_of(gluon: str) -> tuple[np.ndarray, np.ndarray]:
        """(the weight's exact value: its master copy if it has one, the history)."""
        state = states[trained[gluon]]
        return (state[0], state[1]) if isinstance(state, tuple) else (arrays[gluon], state)

    params = plan.fill(lambda gluon: state_of(gluon)[0], target)
    opt_state = tx.init(params)
    history = plan.fill(lambda gluon: state_of(gluon)[1], optax.tree.get(opt_state, "history"))
    opt_state = optax.tree.set(opt_state, history=history)
    if optimizer.multi_precision:
        opt_state = opt_state._replace(
            master=plan.fill(lambda gluon: state_of(gluon)[0], opt_state.master)
        )
    return tx, params, opt_state
