"""MXNet's ``Optimizer`` API (``mxnet.optimizer.AdaGrad``) over the functional core.

People porting an MXNet training loop keep it: ``create_state``, ``update(indices, weights, grads,
states)``, ``set_lr_mult``, ``lr_scheduler``, per-index update counts. JAX arrays are immutable,
so ``step``/``fused_step``/``update`` put the new arrays into the ``weights`` and ``states`` lists
they were given (``weights[i] = new_weight``) and return them, and an MXNet loop that keeps using
its lists works unchanged.

The arithmetic is the functional chain (:func:`mx_adagrad.adagrad`,
:func:`mx_adagrad.legacy.adagrad` for MXNet 1.x, :func:`mx_adagrad.contrib.group_adagrad`) in its
one-pass form (:func:`mx_adagrad.flat.one_pass`: native kernels on CPU). This module only keeps
MXNet's bookkeeping (update counts, scheduler, multiplier lookup) in Python and hands the
per-parameter learning rates and weight decays to one jitted computation as traced values, so a
changing learning rate never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mx_adagrad import _checks, alias, flat, sparse
from mx_adagrad.lr_scheduler import LRScheduler
from mx_adagrad.precision import LOW_PRECISION_DTYPES

State = Any  # a history array, or (float32 master, float32 history) with multi_precision


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Optimizer:
    """MXNet's ``mxnet.optimizer.Optimizer`` bookkeeping, for the AdaGrad classes.

    Subclasses say which functional chain runs the step (:meth:`_transform`). Arguments are MXNet's:
    ``rescale_grad``, ``param_idx2name`` (index -> name, for ``set_lr_mult``/``set_wd_mult`` by
    name), ``wd``, ``clip_gradient``, ``learning_rate``, ``lr_scheduler``, ``begin_num_update``,
    ``multi_precision``, ``param_dict`` (index -> an object with ``lr_mult`` and ``wd_mult``, as
    Gluon's Parameters), ``aggregate_num`` (kept for compatibility: ``fused_step`` updates every
    parameter it is given in one computation anyway). ``sym`` is not supported: symbol attributes
    have no JAX equivalent; pass the multipliers with ``set_lr_mult``/``set_wd_mult``.
    """

    _where = "Optimizer"

    def __init__(
        self,
        rescale_grad: float = 1.0,
        param_idx2name: dict[int, str] | None = None,
        wd: float = 0.0,
        clip_gradient: float | None = None,
        learning_rate: float | None = None,
        lr_scheduler: LRScheduler | None = None,
        sym: Any = None,
        begin_num_update: int = 0,
        multi_precision: bool = False,
        param_dict: dict[int, Any] | None = None,
        aggregate_num: int | None = None,
        use_fused_step: bool | None = None,
    ) -> None:
        where = self._where
        if sym is not None:
            _checks.fail(
                where,
                "sym",
                "None (symbol attributes are not supported; use set_lr_mult/set_wd_mult)",
                sym,
            )
        _checks.finite(where, "rescale_grad", rescale_grad)
        _checks.non_negative(where, "wd", wd)
        if clip_gradient is not None:
            _checks.positive(where, "clip_gradient", clip_gradient)
        _checks.integer(where, "begin_num_update", begin_num_update, minimum=0)
        if param_idx2name is not None and not isinstance(param_idx2name, dict):
            _checks.fail(where, "param_idx2name", "a dict {index: name}", param_idx2name)
        if lr_scheduler is None and learning_rate is None:
            learning_rate = 0.01
        self.lr_scheduler = lr_scheduler
        if lr_scheduler is not None:
            self.lr_scheduler = alias.resolve_learning_rate(where, learning_rate, lr_scheduler)
            if not isinstance(self.lr_scheduler, LRScheduler):  # learning_rate=None: keep base_lr
                self.lr_scheduler = lr_scheduler
        else:
            _checks.finite(where, "learning_rate", learning_rate)
            _checks.non_negative(where, "learning_rate", learning_rate)
        self.lr = learning_rate
        self.rescale_grad = rescale_grad
        self.wd = wd
        self.clip_gradient = clip_gradient
        self.begin_num_update = begin_num_update
        self.num_update = begin_num_update
        self._index_update_count: dict[Any, int] = {}
        self.multi_precision = bool(multi_precision)
        self.aggregate_num = 4 if aggregate_num is None else aggregate_num
        self.idx2name = dict(param_idx2name or {})
        self.param_dict = dict(param_dict or {})
        self.use_fused_step = bool(use_fused_step)
        self.lr_mult: dict[Any, float] = {}
        self.wd_mult: dict[Any, float] = {}
        self.set_lr_mult({})
        self.set_wd_mult({})

    # -- MXNet's bookkeeping ------------------------------------------------------------------

    @property
    def learning_rate(self) -> float:
        """The current learning rate, the scheduler's value at ``num_update`` or ``lr``."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler(self.num_update)
        return self.lr

    def set_learning_rate(self, lr: float) -> None:
        """Sets the learning rate; with an ``lr_scheduler`` this raises, as in MXNet."""
        if self.lr_scheduler is not None:
            raise UserWarning(
                f"mx_adagrad.{self._where}: set_learning_rate cannot change the learning rate of "
                "an lr_scheduler; build the optimizer with the scheduler you want"
            )
        _checks.finite(self._where, "lr", lr)
        _checks.non_negative(self._where, "lr", lr)
        self.lr = lr

    def set_lr_mult(self, args_lr_mult: dict[Any, float]) -> None:
        """Sets learning-rate multipliers by index or by name (through ``param_idx2name``)."""
        self.lr_mult = dict(args_lr_mult)

    def set_wd_mult(self, args_wd_mult: dict[Any, float]) -> None:
        """Sets weight-decay multipliers by index or name. As MXNet 1.9, names from
        ``param_idx2name`` that end in neither ``_weight`` nor ``_gamma`` default to 0."""
        self.wd_mult = {
            name: 0.0
            for name in self.idx2name.values()
            if not (name.endswith("_weight") or name.endswith("_gamma"))
        }
        self.wd_mult.update(args_wd_mult)

    def _update_count(self, index: Any) -> None:
        count = self._index_update_count.get(index, self.begin_num_update) + 1
        self._index_update_count[index] = count
        self.num_update = max(count, self.num_update)

    def _multiplier(self, index: Any, table: dict[Any, float], attribute: str) -> float:
        if index in self.param_dict:
            return getattr(self.param_dict[index], attribute)
        if index in table:
            return table[index]
        if index in self.idx2name:
            return table.get(self.idx2name[index], 1.0)
        return 1.0

    def _get_lr(self, index: Any) -> float:
        return self.learning_rate * self._multiplier(index, self.lr_mult, "lr_mult")

    def _get_wd(self, index: Any) -> float:
        return self.wd * self._multiplier(index, self.wd_mult, "wd_mult")

    # -- states -------------------------------------------------------------------------------

    def create_state(self, index: Any, weight: jax.Array) -> State:
        """The AdaGrad history for one weight: zeros of its shape and dtype (the real dtype of a
        complex weight, as :func:`mx_adagrad.scale_by_adagrad`)."""
        del index
        return jnp.zeros_like(weight, jnp.finfo(jnp.result_type(weight)).dtype)

    def _uses_master(self, weight: jax.Array) -> bool:
        return self.multi_precision and jnp.asarray(weight).dtype in LOW_PRECISION_DTYPES

    def create_state_multi_precision(self, index: Any, weight: jax.Array) -> State:
        """With ``multi_precision`` and a float16/bfloat16 weight: ``(float32 master, history)``."""
        if self._uses_master(weight):
            master = jnp.asarray(weight, jnp.float32)
            return (master, self.create_state(index, master))
        return self.create_state(index, weight)

    # -- steps --------------------------------------------------------------------------------

    def _transform(self, lr_mult: list, wd_mult: list) -> optax.GradientTransformation:
        raise NotImplementedError

    def _hyperparameters(self, indices: list, grads: list) -> tuple[list[float], list[float]]:
        """MXNet's per-index order: count the update, then read lr and wd for that index."""
        lrs, wds = [], []
        for index, grad in zip(indices, grads):
            self._update_count(index)
            lrs.append(self._get_lr(index))
            wds.append(self._get_wd(index))
            if _checks.is_sparse(grad) and wds[-1] != 0.0:
                _checks.fail(
                    self._where,
                    f"wd for the row_sparse gradient of index {index!r}",
                    "0 (MXNet's sparse AdaGrad kernel has no weight decay)",
                    wds[-1],
                )
        return lrs, wds

    def _run(self, indices: list, weights: list, grads: list, states: list) -> tuple[list, list]:
        lrs, wds = self._hyperparameters(indices, grads)
        new_weights, new_states = _fused(
            self._transform,
            self.clip_gradient is not None,
            list(weights),
            list(grads),
            list(states),
            jnp.asarray(lrs, jnp.float32),
            jnp.asarray(wds, jnp.float32),
            jnp.float32(self.rescale_grad),
            jnp.float32(self.clip_gradient if self.clip_gradient is not None else 0.0),
            jnp.float32(self._epsilon),
        )
        for i, (weight, state) in enumerate(zip(new_weights, new_states)):
            weights[i], states[i] = weight, state
        return weights, states

    def step(self, indices, weights: list, grads: list, states: list) -> tuple[list, list]:
        """Updates each parameter in turn (one jitted computation per parameter)."""
        indices = _as_list(indices)
        for i, index in enumerate(indices):
            one_weight, one_state = [weights[i]], [states[i]]
            self._run([index], one_weight, [grads[i]], one_state)
            weights[i], states[i] = one_weight[0], one_state[0]
        return weights, states

    def fused_step(self, indices, weights: list, grads: list, states: list) -> tuple[list, list]:
        """Updates every parameter given, dense and RowSparse, in one jitted computation (cached
        across calls; learning rates, weight decays and ``rescale_grad`` are traced values)."""
        return self._run(_as_list(indices), weights, grads, states)

    def update(self, indices, weights: list, grads: list, states: list) -> tuple[list, list]:
        """``fused_step`` (the default, ``use_fused_step=True``) or ``step``."""
        if self.use_fused_step:
            return self.fused_step(indices, weights, grads, states)
        return self.step(indices, weights, grads, states)

    def update_multi_precision(self, indices, weights, grads, states) -> tuple[list, list]:
        """As ``update``; the float32 master copies in ``states`` carry float16/bfloat16 weights."""
        return self.update(indices, weights, grads, states)


def _split(weight: jax.Array, state: State) -> tuple[jax.Array, jax.Array, bool]:
    """(the weight the step runs on, its history, whether it is a float32 master copy)."""
    if isinstance(state, (tuple, list)):
        return state[0], state[1], True
    return weight, state, False


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _fused(
    make_transform: Callable,
    has_clip: bool,
    weights,
    grads,
    states,
    lrs,
    wds,
    rescale,
    clip_gradient,
    epsilon,
):
    """One step for a list of parameters, with the one-pass form of the functional chain
    (:func:`mx_adagrad.flat.one_pass`, bitwise the chain); hyperparameters traced."""
    split = [_split(w, s) for w, s in zip(weights, states)]
    working = [w for w, _, _ in split]
    grads = [
        sparse.on_rows(lambda v: v.astype(jnp.float32), g) if master else g
        for g, (_, _, master) in zip(grads, split)
    ]
    tx = make_transform(
        rescale_grad=rescale,
        clip_gradient=clip_gradient if has_clip else None,
        epsilon=epsilon,
        lr_mult=[lrs[i] for i in range(len(working))],
        wd_mult=[wds[i] for i in range(len(working))],
    )
    state = optax.tree.set(tx.init(working), history=[h for _, h, _ in split])
    working, state = flat.one_pass(tx).step(working, grads, state)
    histories = optax.tree.get(state, "history")
    new_weights, new_states = [], []
    for weight, new, history, (_, _, master) in zip(weights, working, histories, split):
        new_weights.append(new.astype(weight.dtype) if master else new)
        new_states.append((new, history) if master else history)
    return new_weights, new_states


class Mxnet1Optimizer(Optimizer):
    """MXNet 1.x's optimizers (AdaGrad, GroupAdaGrad): their epsilon is ``eps``, which MXNet keeps
    as ``float_stable_eps``, and ``update`` runs ``fused_step`` by default."""

    def __init__(self, eps: float, **kwargs: Any) -> None:
        _checks.finite(self._where, "eps", eps)
        _checks.non_negative(self._where, "eps", eps)
        kwargs.setdefault("use_fused_step", True)
        super().__init__(**kwargs)
        self.float_stable_eps = eps

    @property
    def _epsilon(self) -> float:
        return self.float_stable_eps


class AdaGrad(Optimizer):
    """MXNet 2.0's ``mxnet.optimizer.AdaGrad``: the Optimizer API over :func:`mx_adagrad.adagrad`.

    ::

        grad = clip(grad * rescale_grad, clip_gradient) + wd * weight
        history += square(grad)
        weight -= lr * grad / (sqrt(history) + epsilon)

    Args:
      learning_rate: 0.01 by default; next to an ``lr_scheduler`` a value replaces its ``base_lr``
        (with a warning), ``None`` keeps it.
      epsilon: 1e-6. MXNet 2.0 renamed ``eps``; passing ``eps=`` raises, as there.
      use_fused_step: True (``update`` runs ``fused_step``).
      **kwargs: MXNet's Optimizer arguments (see :class:`~mx_adagrad.compat.Optimizer`).

    Example:
      >>> import jax.numpy as jnp, mx_adagrad
      >>> opt = mx_adagrad.AdaGrad(learning_rate=0.1)
      >>> weights, grads = [jnp.ones(2)], [jnp.ones(2)]
      >>> states = [opt.create_state(0, weights[0])]
      >>> _ = opt.update([0], weights, grads, states)
      >>> weights[0]
      Array([0.9000001, 0.9000001], dtype=float32)
    """

    _where = "AdaGrad"

    def __init__(
        self,
        learning_rate: float | None = 0.01,
        epsilon: float = 1e-6,
        use_fused_step: bool = True,
        **kwargs: Any,
    ) -> None:
        if "eps" in kwargs:
            raise DeprecationWarning(
                "mx_adagrad.AdaGrad: parameter 'eps' is deprecated (MXNet 2.0); use 'epsilon', "
                "or mx_adagrad.legacy.AdaGrad for MXNet 1.x's eps inside the square root"
            )
        _checks.finite(self._where, "epsilon", epsilon)
        _checks.non_negative(self._where, "epsilon", epsilon)
        super().__init__(learning_rate=learning_rate, use_fused_step=use_fused_step, **kwargs)
        self.epsilon = epsilon

    @property
    def _epsilon(self) -> float:
        return self.epsilon

    @staticmethod
    def _transform(**hyper: Any) -> optax.GradientTransformation:
        return alias.adagrad(learning_rate=1.0, wd=1.0, **hyper)
