"""Step 5: restoring the optimizer of a Gluon checkpoint (``net.params`` + ``trainer.states``).

:func:`~mx_adagrad.mxnet_io.restore` gives MXNet's Optimizer API (:class:`mx_adagrad.AdaGrad`,
:class:`mx_adagrad.legacy.AdaGrad`) with the weights and states, in Trainer index order;
:func:`~mx_adagrad.mxnet_io.restore_functional` gives the same checkpoint as an optax transformation with its state,
keyed by structural name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mx_adagrad import alias, compat, contrib, legacy
from mx_adagrad._checks import fail, shown
from mx_adagrad.mxnet_io.ndarray_files import load_params
from mx_adagrad.mxnet_io.pairing import TrainerOrder, pair, remap, trainer_order_names
from mx_adagrad.mxnet_io.schedulers import pickled_attributes, restored_scheduler
from mx_adagrad.mxnet_io.trainer_states import OPTIMIZERS, State, load_trainer_states
from mx_adagrad.precision import LOW_PRECISION_DTYPES

__all__ = ["restore", "restore_functional"]

_MXNET1_ADAGRAD, _MXNET2_ADAGRAD, _GROUP_ADAGRAD = OPTIMIZERS


def _optimizer(
    info: dict[str, Any], positions: dict[int, int], count: int, sources: str
) -> compat.Optimizer:
    """The MXNet optimizer pickled in ``info``, with its tables keyed by positions."""
    (
        lr,
        scheduler,
        wd,
        rescale_grad,
        clip_gradient,
        multi_precision,
        begin_num_update,
        num_update,
        counts,
        lr_mult,
        wd_mult,
        idx2name,
    ) = pickled_attributes(
        info,
        "lr lr_scheduler wd rescale_grad clip_gradient multi_precision begin_num_update "
        "num_update _index_update_count lr_mult wd_mult idx2name",
        sources,
    )
    if isinstance(num_update, bool) or not isinstance(num_update, int) or num_update < 0:
        fail("restore", "the pickled num_update", "an int >= 0", num_update)
    scheduler = restored_scheduler(scheduler, lr, num_update, sources)
    hyperparameters = dict(
        learning_rate=None if scheduler is not None else lr,
        lr_scheduler=scheduler,
        wd=wd,
        rescale_grad=rescale_grad,
        clip_gradient=clip_gradient,
        multi_precision=bool(multi_precision),
        begin_num_update=begin_num_update,
        param_idx2name=remap(idx2name, "idx2name", positions, count, sources),
    )
    if info["class"] in (_MXNET1_ADAGRAD, _GROUP_ADAGRAD):
        (eps,) = pickled_attributes(info, "float_stable_eps", sources)
        optimizer_class = (
            legacy.AdaGrad if info["class"] == _MXNET1_ADAGRAD else contrib.GroupAdaGrad
        )
        optimizer: compat.Optimizer = optimizer_class(eps=eps, **hyperparameters)
    else:
        (epsilon,) = pickled_attributes(info, "epsilon", sources)
        optimizer = compat.AdaGrad(epsilon=epsilon, **hyperparameters)
    # Assigned, not set_lr_mult/set_wd_mult: the pickled dicts already hold MXNet's defaults.
    optimizer.lr_mult = remap(lr_mult, "lr_mult", positions, count, sources)
    optimizer.wd_mult = remap(wd_mult, "wd_mult", positions, count, sources)
    optimizer.num_update = num_update
    optimizer._index_update_count = remap(counts, "_index_update_count", positions, count, sources)
    return optimizer


def read_checkpoint(
    params_path: str | os.PathLike[str],
    states_path: str | os.PathLike[str],
    trainer_order: TrainerOrder,
) -> tuple[compat.Optimizer, dict[str, np.ndarray], list[State], list[str]]:
    """What :func:`restore` returns, as read from the files: the optimizer, every array of
    ``params_path`` (numpy, by structural name), and the states and names of the trained
    parameters (numpy), in Trainer index order."""
    sources = f"{os.fspath(params_path)!r} and {os.fspath(states_path)!r}"
    params = load_params(params_path)
    if not isinstance(params, dict):
        fail(
            "restore",
            "params_path",
            "a .params file with names (Gluon's save_parameters)",
            shown(f"{os.fspath(params_path)!r}, a list of {len(params)} unnamed arrays"),
        )
    states, info = load_trainer_states(states_path)
    if info is None:
        fail(
            "restore",
            "states_path",
            "a trainer.states file that holds the optimizer (Trainer.save_states)",
            shown(f"{os.fspath(states_path)!r}, which holds the states only"),
        )
    names = trainer_order_names(params, trainer_order)
    rows = info["class"] == _GROUP_ADAGRAD  # GroupAdaGrad's (rows, 1) histories
    indices = pair(
        states,
        names,
        params,
        trainer_order is not None,
        sources,
        (lambda shape: (*shape[:1], 1)) if rows else (lambda shape: shape),
    )
    positions = {index: position for position, index in enumerate(indices)}
    optimizer = _optimizer(info, positions, len(names), sources)
    return optimizer, params, [states[index] for index in indices], [names[i] for i in indices]


def transformation(
    where: str, optimizer: compat.Optimizer, positions: Mapping[str, int]
) -> optax.GradientTransformation:
    """The optax form of a restored ``optimizer``, for parameters keyed as ``positions``.

    ``positions[key]`` is the position of a parameter in the optimizer's tables (its index in
    :func:`restore`'s lists); the multipliers become ``{key: value}`` dicts and the next update
    is MXNet's next ``num_update``.
    """
    if optimizer.lr_scheduler is not None:
        counts = {
            key: optimizer._index_update_count.get(i, optimizer.begin_num_update)
            for key, i in positions.items()
        }
        behind = {key: n for key, n in counts.items() if n != optimizer.num_update}
        if behind:
            fail(
                where,
                "the update count of every parameter",
                f"the optimizer's num_update ({optimizer.num_update}) when there is an "
                "lr_scheduler (use restore, which keeps per-parameter counts)",
                shown(", ".join(f"{key!r}: {n}" for key, n in behind.items())),
            )

    def multipliers(table: dict[Any, float], attribute: str) -> dict[str, float] | None:
        values = {key: optimizer._multiplier(i, table, attribute) for key, i in positions.items()}
        return {key: value for key, value in values.items() if value != 1.0} or None

    hyperparameters = dict(
        rescale_grad=optimizer.rescale_grad,
        clip_gradient=optimizer.clip_gradient,
        wd=optimizer.wd,
        lr_mult=multipliers(optimizer.lr_mult, "lr_mult"),
        wd_mult=multipliers(optimizer.wd_mult, "wd_mult"),
        lr_scheduler=optimizer.lr_scheduler,
        begin_num_update=optimizer.num_update,
        multi_precision=optimizer.multi_precision,
    )
    learning_rate = None if optimizer.lr_scheduler is not None else optimizer.lr
    if isinstance(optimizer, contrib.GroupAdaGrad):
        del hyperparameters["wd"], hyperparameters["wd_mult"]  # 0: GroupAdaGrad refused others
        return contrib.group_adagrad(learning_rate, optimizer.float_stable_eps, **hyperparameters)
    if isinstance(optimizer, legacy.AdaGrad):
        return legacy.adagrad(learning_rate, optimizer.float_stable_eps, **hyperparameters)
    return alias.adagrad(learning_rate, optimizer.epsilon, **hyperparameters)


def restore(
    params_path: str | os.PathLike[str],
    states_path: str | os.PathLike[str],
    *,
    trainer_order: TrainerOrder = None,
) -> tuple[compat.Optimizer, list[jax.Array], list[Any], list[str]]:
    """Resumes a Gluon checkpoint with MXNet's Optimizer API, without MXNet.

    MXNet equivalent: ``net.load_parameters(params_path)`` and ``trainer.load_states(states_path)``
    on a ``gluon.Trainer(net.collect_params(), 'adagrad', ...)``, then ``trainer.step``. Here::

        optimizer, weights, states, names = restore("net.params", "trainer.states")
        optimizer.update(list(range(len(weights))), weights, grads, states)  # grads[i]: names[i]

    continues the training as MXNet would have: ``grads`` are the raw gradients (the pickled
    ``rescale_grad``, ``1 / batch_size`` after Gluon's ``trainer.step(batch_size)``, is applied by
    the optimizer; change ``optimizer.rescale_grad`` if the batch size changes, as
    ``trainer.step`` does).

    **Pairing.** ``trainer.states`` keys each state by its Trainer index, the parameter's position
    in ``Trainer(net.collect_params())``, which MXNet 1.x sorts by *full* name (``conv0_weight``,
    ``dense0_bias``). Neither file stores full names: ``save_parameters`` writes structural names
    (``0.weight``, ``1.gamma``). By default index ``i`` is paired with the ``i``-th sorted
    structural name, which is the Trainer's order for common layouts (a stack of Dense layers,
    where both sorts agree) but not for others (a Conv2D followed by BatchNorm: ``batchnorm0_*``
    sorts before ``conv0_*``, ``0.*`` before ``1.*``). Every pair is checked: each state (and
    master copy) must have its weight's shape and each index must name a parameter; otherwise a
    ``ValueError`` lists the entries (index, structural name, shapes) and asks for
    ``trainer_order``. The check cannot catch a swap of two parameters of the same shape: pass
    ``trainer_order`` whenever the two sorts may disagree. Parameters with ``grad_req='null'``
    (BatchNorm's running mean and variance) take an index but have no state.

    Args:
      params_path: the ``net.save_parameters`` file (names are the structural names).
      states_path: the ``trainer.save_states`` file of the same step (it must hold the optimizer,
        as ``save_states`` writes it).
      trainer_order: ``None`` (the default rule above); the structural names in the Trainer's
        index order, every parameter the Trainer was given (those without a state included); or
        a dict ``{structural name: full name}``, which is sorted by full name. In MXNet 1.x,
        ``{name: p.name for name, p in net._collect_params_with_prefix().items()}`` is that dict
        for ``Trainer(net.collect_params())``. The dict form also pairs an ``export`` file:
        ``{"arg:dense0_weight": "dense0_weight", ...}``.

    Returns:
      ``(optimizer, weights, states, names)``, the lists covering the parameters that have a
      state (the trainable ones), in Trainer index order:

      * ``optimizer``: :class:`mx_adagrad.legacy.AdaGrad` for a pickled MXNet 1.x
        ``mxnet.optimizer.optimizer.AdaGrad`` (``float_stable_eps`` as ``eps``),
        :class:`mx_adagrad.contrib.GroupAdaGrad` for ``mxnet.optimizer.contrib.GroupAdaGrad``
        (``Trainer(..., 'groupadagrad')``; its states are the ``(rows, 1)`` histories), or
        :class:`mx_adagrad.AdaGrad` for MXNet 2.0's ``mxnet.optimizer.adagrad.AdaGrad``
        (``epsilon``), with the pickled ``lr``, ``wd``, ``rescale_grad``, ``clip_gradient``,
        ``multi_precision``, ``begin_num_update`` and ``num_update``. Everything MXNet keys by
        Trainer index is keyed by position ``0..n-1`` here: the per-parameter update counts
        (``_index_update_count``), the ``lr_mult``/``wd_mult`` index entries and ``idx2name``
        (name entries are kept). A pickled ``lr_scheduler`` becomes the
        :mod:`mx_adagrad.lr_scheduler` class that gives MXNet's values for every later
        ``num_update`` (see Raises).
      * ``weights``: ``jax.Array`` s, with the stored dtypes.
      * ``states``: the AdaGrad history of each weight, or ``(float32 master, history)`` for a
        float16 weight trained with ``multi_precision``.
      * ``names``: the structural names, ``names[i]`` for ``weights[i]``.

      The parameters without a state (BatchNorm running statistics, frozen parameters) are not
      returned: read them with :func:`load_params`.

      Gluon's per-parameter ``Parameter.lr_mult`` / ``wd_mult`` live in ``optimizer.param_dict``,
      which MXNet does not save (and which, in a Trainer, takes precedence over the pickled
      ``lr_mult``/``wd_mult`` dicts, normally empty in Gluon); if the net set them, set them
      again by position: ``optimizer.set_lr_mult({i: value})``.

    Raises:
      ValueError: for a file :func:`load_params` or :func:`load_trainer_states` rejects, a
        ``.params`` file without names, a ``trainer.states`` file without the optimizer, a bad
        ``trainer_order``, states that do not pair with the weights (see above), or a pickled
        ``lr_scheduler`` whose saved state no :mod:`mx_adagrad.lr_scheduler` scheduler continues
        exactly (a scheduler object that was called with a larger ``num_update`` before this
        optimizer used it; a Poly or Cosine scheduler first called after its ``max_update``).
      OSError: if a file cannot be read.
    """
    optimizer, params, states, names = read_checkpoint(params_path, states_path, trainer_order)
    restored = [
        tuple(jnp.asarray(a) for a in state) if isinstance(state, tuple) else jnp.asarray(state)
        for state in states
    ]
    return optimizer, [jnp.asarray(params[name]) for name in names], restored, names


def restore_functional(
    params_path: str | os.PathLike[str],
    states_path: str | os.PathLike[str],
    *,
    trainer_order: TrainerOrder = None,
) -> tuple[optax.GradientTransformation, dict[str, jax.Array], optax.OptState]:
    """Resumes a Gluon checkpoint as an optax transformation, its parameters and its state.

    MXNet equivalent: as :func:`restore` (``load_parameters`` and ``load_states``, then
    ``trainer.step``); the same files, paired by the same rule, give::

        tx, params, opt_state = restore_functional("net.params", "trainer.states")
        updates, opt_state = tx.update(grads, opt_state, params)  # grads: {name: raw grad}
        params = mx_adagrad.apply_updates(params, updates)

    Args:
      params_path: the ``net.save_parameters`` file.
      states_path: the ``trainer.save_states`` file of the same step.
      trainer_order: as in :func:`restore`.

    Returns:
      ``(tx, params, opt_state)``:

      * ``tx``: :func:`mx_adagrad.legacy.adagrad` (MXNet 1.x),
        :func:`mx_adagrad.contrib.group_adagrad` (GroupAdaGrad: no ``wd``) or
        :func:`mx_adagrad.adagrad` (MXNet 2.0) with the pickled ``learning_rate`` or ``lr_scheduler`` (converted as in
        :func:`restore`), ``eps``/``epsilon``, ``rescale_grad``, ``clip_gradient``, ``wd``,
        ``multi_precision``, the effective multipliers as ``lr_mult``/``wd_mult`` dicts
        ``{structural name: value}`` (``None`` when all are 1), and ``begin_num_update`` set to
        the pickled ``num_update``, so that the next update is MXNet's next ``num_update``.
      * ``params``: ``{structural name: jax.Array}`` for the parameters that have a state; read
        the others (BatchNorm running statistics) with :func:`load_params`.
      * ``opt_state``: ``tx.init(params)`` with the saved histories (and, with
        ``multi_precision``, the saved float32 master copies in ``MultiPrecisionState.master``).

    Raises:
      ValueError: everything :func:`restore` raises; with an ``lr_scheduler``, per-parameter
        update counts that differ from ``num_update`` (one optax state counts the updates of
        all parameters: use :func:`restore`, which keeps MXNet's per-parameter counts); states
        whose master copies are not where ``mx_adagrad.multi_precision`` keeps them (it keeps
        one for every float16 and bfloat16 parameter, MXNet 1.x for float16 only).
      OSError: if a file cannot be read.
    """
    optimizer, weights, states, names = restore(
        params_path, states_path, trainer_order=trainer_order
    )
    where = "restore_functional"
    tx = transformation(where, optimizer, {name: i for i, name in enumerate(names)})
    params = dict(zip(names, weights))
    masters = {name: s[0] if isinstance(s, tuple) else None for name, s in zip(names, states)}
    kept = {
        name: optimizer.multi_precision and weight.dtype in LOW_PRECISION_DTYPES
        for name, weight in params.items()
    }
    different = [name for name in names if (masters[name] is not None) != kept[name]]
    if different:
        fail(
            where,
            "the states",
            "a (float32 master, history) pair exactly for the float16/bfloat16 parameters of a "
            "multi_precision optimizer, as mx_adagrad.multi_precision keeps them (use restore, "
            "which takes the states as they are)",
            shown(
                ", ".join(
                    f"{name!r} ({params[name].dtype}, "
                    f"{'with' if masters[name] is not None else 'without'} a master copy)"
                    for name in different
                )
            ),
        )
    opt_state = tx.init(params)
    histories = {name: s[1] if isinstance(s, tuple) else s for name, s in zip(names, states)}
    opt_state = optax.tree.set(opt_state, history=histories)
    if optimizer.multi_precision:
        opt_state = opt_state._replace(master=masters)
    return tx, params, opt_state
