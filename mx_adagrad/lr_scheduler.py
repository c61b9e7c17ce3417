"""MXNet's learning-rate schedulers (``mxnet.lr_scheduler``) as pure functions of the update count.

MXNet's ``LRScheduler`` objects are stateful: ``FactorScheduler`` and ``MultiFactorScheduler`` decay
``self.base_lr`` in place, ``PolyScheduler`` and ``CosineScheduler`` overwrite it with their latest
value and keep returning it once ``num_update`` passes ``max_update``. The classes here hold no
schedule state: ``sched(num_update)`` depends only on the constructor arguments and ``num_update``,
and returns what MXNet's object returns when it is called with a non-decreasing sequence of update
counts that ends in ``num_update``, which is how MXNet's ``Optimizer`` calls it. (For Poly and
Cosine the sequence must also visit ``max_update`` if it runs past it; see their docstrings.) Where
MXNet's object is called with a decreasing count it keeps the decays it already applied; these
functions do not.

``sched(num_update)`` has two modes:

* ``num_update`` a Python or NumPy integer (``>= 0``): returns a Python float computed with float64
  arithmetic in MXNet's operation order, bit-for-bit what MXNet returns.
* ``num_update`` an integer ``jax.Array`` or tracer: returns a float32 array of the same shape from
  ``jnp`` operations only, so it can run under ``jax.jit``/``jax.vmap`` with the count traced (no
  retracing when it changes). Values are within a few float32 roundings of the exact ones (for
  values in float32's normal range): the formulas are rearranged to avoid float32 cancellation.
  They match the eager values to that accuracy, except where MXNet's float64 formula itself
  cancels (``CosineScheduler`` near ``max_update``; see there).

``num_update`` is MXNet's 1-based count (the first update is ``num_update == 1``); Optax's update
``count`` is 0-based, so the Optax schedule equal to MXNet's is ``lambda count: sched(count + 1)``.

MXNet's ``Optimizer``, given both a scheduler and a different ``learning_rate``, assigns
``lr_scheduler.base_lr = learning_rate`` after the scheduler was built. ``sched.with_base_lr(lr)``
returns the scheduler that behaves like MXNet's after that assignment; values captured at
construction (``warmup_final_lr``, ``base_lr_orig``) keep the constructor's ``base_lr`` as in MXNet.

Argument checks: every check MXNet makes (by ``raise ValueError`` or ``assert``) raises
``ValueError`` here, and a few cases MXNet accepts but that are never meaningful are rejected as
well: non-finite numbers, negative learning rates (``base_lr``, ``warmup_begin_lr``, ``final_lr``,
``stop_factor_lr``), a negative ``factor`` or ``pwr``, ``step`` values that are not ints, and
``max_update == warmup_steps`` (MXNet divides by zero at that update).
"""

from __future__ import annotations

import abc
import bisect
import functools
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from mx_adagrad._checks import concrete_float, fail, finite, integer, non_negative, one_of

__all__ = [
    "CosineScheduler",
    "FactorScheduler",
    "LRScheduler",
    "MultiFactorScheduler",
    "PolyScheduler",
]

_WARMUP_MODES = ("linear", "constant")
_Scheduler = TypeVar("_Scheduler", bound="LRScheduler")
# Largest number of decays a traced int32 count can ask FactorScheduler for.
_INT32_MAX = 2**31 - 1
# float32 rounds every magnitude at or below 2**-150 to zero.
_FLOAT32_ZERO = 2.0**-150


def _real(where: str, name: str, value: Any) -> float:
    """Returns ``value`` as a Python float after checking it is a finite, concrete real scalar."""
    finite(where, name, value)
    if concrete_float(value) is None:
        fail(where, name, "a concrete number (schedulers are built outside jax.jit)", value)
    return float(value)


def _learning_rate(where: str, name: str, value: Any) -> float:
    """Returns ``value`` as a Python float after checking it is a finite number ``>= 0``."""
    number = _real(where, name, value)
    non_negative(where, name, number)
    return number


def _decay_factor(where: str, value: Any) -> float:
    """Checks MXNet's ``factor > 1.0`` rule, plus finite and ``>= 0``."""
    factor = _real(where, "factor", value)
    if factor > 1.0:
        fail(where, "factor", "<= 1 (the schedule only reduces the learning rate)", value)
    non_negative(where, "factor", factor)
    return factor


class LRScheduler:
    """Base class with MXNet's warmup; mirrors ``mxnet.lr_scheduler.LRScheduler``.

    During warmup (``num_update < warmup_steps``) every scheduler returns::

        linear:   warmup_begin_lr + (warmup_final_lr - warmup_begin_lr) * num_update / warmup_steps
        constant: warmup_begin_lr

    where ``warmup_final_lr`` is the constructor's ``base_lr`` (MXNet captures it at construction,
    so :meth:`~LRScheduler.with_base_lr` does not move the end of the warmup ramp). As in MXNet, calling the
    base class raises ``NotImplementedError``, and ``warmup_begin_lr <= base_lr`` is required even
    when ``warmup_steps == 0``.

    Attributes are read-only (``base_lr`` is the value the schedule starts from, not MXNet's
    running value); use :meth:`~LRScheduler.with_base_lr` instead of assigning ``base_lr``.
    """

    def __init__(
        self,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        where = type(self).__name__
        base_lr = _learning_rate(where, "base_lr", base_lr)
        integer(where, "warmup_steps", warmup_steps, minimum=0)
        warmup_begin_lr = _learning_rate(where, "warmup_begin_lr", warmup_begin_lr)
        if warmup_begin_lr > base_lr:
            fail(where, "warmup_begin_lr", f"<= base_lr ({base_lr!r})", warmup_begin_lr)
        one_of(where, "warmup_mode", warmup_mode, _WARMUP_MODES)
        self._set(
            base_lr=base_lr,
            warmup_steps=int(warmup_steps),
            warmup_begin_lr=warmup_begin_lr,
            warmup_final_lr=base_lr,
            warmup_mode=warmup_mode,
        )

    def __call__(self, num_update: int | jax.Array) -> float | jax.Array:
        """MXNet's base class has no schedule: raises ``NotImplementedError``."""
        raise NotImplementedError("must override this")

    def with_base_lr(self: _Scheduler, base_lr: float) -> _Scheduler:
        """Returns a copy behaving like MXNet's scheduler after ``scheduler.base_lr = base_lr``.

        This is what MXNet's ``Optimizer`` does when given both ``lr_scheduler`` and a different
        ``learning_rate``. Only ``base_lr`` changes: ``warmup_final_lr`` (and ``base_lr_orig`` of
        Poly/Cosine) keep their constructor values, and MXNet's ``warmup_begin_lr <= base_lr``
        check is not repeated. ``self`` is not modified.
        """
        base_lr = _learning_rate(type(self).__name__, "base_lr", base_lr)
        copy = object.__new__(type(self))
        # Public attributes are the whole configuration; private ones are caches derived from it.
        vars(copy).update({k: v for k, v in vars(self).items() if not k.startswith("_")})
        vars(copy)["base_lr"] = base_lr
        return copy

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable; use with_base_lr() instead of assigning {name}"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._constructor_args().items())
        text = f"{type(self).__name__}({args})"
        if self.base_lr != self.warmup_final_lr:
            text += f".with_base_lr({self.base_lr!r})"
        return text

    def _set(self, **attributes: Any) -> None:
        vars(self).update(attributes)

    def _constructor_args(self) -> dict[str, Any]:
        return {
            "base_lr": self.warmup_final_lr,
            "warmup_steps": self.warmup_steps,
            "warmup_begin_lr": self.warmup_begin_lr,
            "warmup_mode": self.warmup_mode,
        }


class _Schedule(LRScheduler, abc.ABC):
    """Dispatches ``__call__`` to the eager (Python float) or traced (jnp float32) formula."""

    def __call__(self, num_update: int | jax.Array) -> float | jax.Array:
        """Returns the learning rate for MXNet's 1-based update count ``num_update``.

        A Python/NumPy integer gives a Python float equal to MXNet's; an integer ``jax.Array``
        (traced or not) gives a float32 array of its shape.
        """
        where = type(self).__name__
        if isinstance(num_update, jax.Array):
            if not jnp.issubdtype(num_update.dtype, jnp.integer):
                fail(where, "num_update", "an integer array", num_update)
            lr = self._traced(num_update)
            if self.warmup_steps > 0:
                warm = self._traced_warmup(num_update)
                lr = jnp.where(num_update < self.warmup_steps, warm, lr)
            return lr
        integer(where, "num_update", num_update, minimum=0)
        num_update = int(num_update)
        if num_update < self.warmup_steps:
            return self._eager_warmup(num_update)
        return self._eager(num_update)

    def _eager_warmup(self, num_update: int) -> float:
        # MXNet's get_warmup_lr, same operation order.
        if self.warmup_mode == "linear":
            increase = (
                (self.warmup_final_lr - self.warmup_begin_lr)
                * float(num_update)
                / float(self.warmup_steps)
            )
            return self.warmup_begin_lr + increase
        return self.warmup_begin_lr

    def _traced_warmup(self, num_update: jax.Array) -> jax.Array:
        begin = jnp.float32(self.warmup_begin_lr)
        if self.warmup_mode == "constant":
            return begin
        # Both terms are >= 0, so float32 adds no cancellation.
        span = jnp.float32(self.warmup_final_lr - self.warmup_begin_lr)
        return begin + span * num_update.astype(jnp.float32) / jnp.float32(self.warmup_steps)

    @abc.abstractmethod
    def _eager(self, num_update: int) -> float:
        """The schedule after warmup, as MXNet computes it."""

    @abc.abstractmethod
    def _traced(self, num_update: jax.Array) -> jax.Array:
        """The schedule after warmup, as float32 ``jnp`` operations."""


class FactorScheduler(_Schedule):
    """Multiplies the learning rate by ``factor`` every ``step`` updates, down to a floor.

    Equivalent to ``mxnet.lr_scheduler.FactorScheduler``. After warmup, with
    ``d = max(0, floor((num_update - 1) / step))``::

        lr_0 = base_lr
        lr_k = max(lr_{k-1} * factor, stop_factor_lr)   (MXNet: lr *= factor; floor if below)
        lr   = lr_d

    Quirks of MXNet kept here:

    * The first decay happens at ``num_update == step + 1``, not ``step`` as MXNet's docstring's
      ``base_lr * pow(factor, floor(num_update / step))`` says: MXNet loops while
      ``num_update > count + step``.
    * Decays are counted from update 0, not from the end of warmup: the first post-warmup value
      is already decayed ``d`` times.
    * The eager value is ``d`` repeated multiplications, which rounds differently from
      ``base_lr * factor ** d``; it stops once the value stops changing (the floor), and resumes
      from its last result when called with a larger count, so increasing calls cost O(1) each.
    * ``stop_factor_lr`` only floors decayed values: if ``base_lr < stop_factor_lr`` the schedule
      returns ``base_lr`` until the first decay and ``stop_factor_lr`` after it, even with
      ``factor == 1``.
    * MXNet's object never un-decays, so called with a smaller count than before it returns the
      later value; this function returns the value for the count it is given.

    Traced, ``base_lr * factor ** d`` is read from two float32 tables (``factor ** j`` and
    ``base_lr * factor ** (block * i)``, built in float64) and floored, so it stays within a few
    float32 roundings of the eager value for every int32 ``num_update``.
    """

    def __init__(
        self,
        step: int,
        factor: float = 1,
        stop_factor_lr: float = 1e-8,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        where = type(self).__name__
        integer(where, "step", step, minimum=1)
        self._set(
            step=int(step),
            factor=_decay_factor(where, factor),
            stop_factor_lr=_learning_rate(where, "stop_factor_lr", stop_factor_lr),
        )

    def _constructor_args(self) -> dict[str, Any]:
        own = {"step": self.step, "factor": self.factor, "stop_factor_lr": self.stop_factor_lr}
        return own | super()._constructor_args()

    def _eager(self, num_update: int) -> float:
        decays = max(0, (num_update - 1) // self.step)
        # (decays applied, lr after them, whether lr is a fixed point of the decay)
        done, lr, fixed = vars(self).get("_resume", (0, self.base_lr, False))
        if decays < done:
            done, lr, fixed = 0, self.base_lr, False
        while done < decays and not fixed:
            decayed = lr * self.factor
            if decayed < self.stop_factor_lr:
                decayed = self.stop_factor_lr
            fixed = decayed == lr
            lr = decayed
            done += 1
        vars(self)["_resume"] = (done, lr, fixed)
        return lr

    @functools.cached_property
    def _tables(self) -> tuple[int, int, np.ndarray, np.ndarray]:
        """``(last, block, fine, coarse)`` with ``base_lr * factor**k`` close to
        ``coarse[k // block] * fine[k % block]`` for ``k <= last``.

        ``last`` bounds the decays after which the floored value no longer changes in float32.
        """
        last = 1
        if 0.0 < self.factor < 1.0 and self.base_lr > 0.0:
            floor = max(self.stop_factor_lr, _FLOAT32_ZERO)
            # Differences of logs: floor / base_lr can overflow for a subnormal base_lr.
            orders = (math.log(floor) - math.log(self.base_lr)) / math.log(self.factor)
            needed = math.ceil(orders) + 1
            last = min(_INT32_MAX, max(1, needed))
        block = math.isqrt(last) + 1
        fine = np.power(self.factor, np.arange(block, dtype=np.float64))
        starts = block * np.arange(last // block + 1, dtype=np.float64)
        coarse = self.base_lr * np.power(self.factor, starts)
        return last, block, fine.astype(np.float32), coarse.astype(np.float32)

    def _traced(self, num_update: jax.Array) -> jax.Array:
        last, block, fine, coarse = self._tables
        decays = jnp.maximum(num_update - 1, 0) // self.step
        k = jnp.minimum(decays, last)
        lr = jnp.asarray(coarse)[k // block] * jnp.asarray(fine)[k % block]
        stop = jnp.float32(self.stop_factor_lr)
        lr = jnp.where(lr < stop, stop, lr)
        return jnp.where(decays == 0, jnp.float32(self.base_lr), lr)


class MultiFactorScheduler(_Schedule):
    """Multiplies the learning rate by ``factor`` each time ``num_update`` passes a ``step`` entry.

    Equivalent to ``mxnet.lr_scheduler.MultiFactorScheduler``. After warmup, with
    ``k = #{i : num_update > step[i]}``::

        lr = base_lr * factor * factor * ... (k multiplications, MXNet's lr *= factor)

    Quirks of MXNet kept here: a decay applies from ``num_update == step[i] + 1`` (MXNet's
    docstring says ``step[i] <= num_update``); there is no ``stop_factor_lr`` floor; steps that
    fall inside the warmup are all applied at once when warmup ends; the eager value is repeated
    multiplication, not ``factor ** k``. ``step`` is stored as a tuple (MXNet requires a list and
    keeps it). Traced values are float32 roundings of the eager ones, read from a table.
    """

    def __init__(
        self,
        step: Sequence[int],
        factor: float = 1,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        where = type(self).__name__
        if not isinstance(step, (list, tuple)) or not step:
            fail(where, "step", "a non-empty list of ints", step)
        for i, update in enumerate(step):
            integer(where, f"step[{i}]", update)
            if i and update <= step[i - 1]:
                fail(where, f"step[{i}]", f"> step[{i - 1}] ({step[i - 1]!r})", update)
            if update < 1:
                fail(where, f"step[{i}]", ">= 1", update)
        self._set(step=tuple(int(s) for s in step), factor=_decay_factor(where, factor))

    def _constructor_args(self) -> dict[str, Any]:
        return {"step": self.step, "factor": self.factor} | super()._constructor_args()

    @functools.cached_property
    def _levels(self) -> tuple[float, ...]:
        """The learning rate after 0, 1, ..., len(step) decays, by repeated multiplication."""
        levels = [self.base_lr]
        for _ in self.step:
            levels.append(levels[-1] * self.factor)
        return tuple(levels)

    def _eager(self, num_update: int) -> float:
        return self._levels[bisect.bisect_left(self.step, num_update)]

    def _traced(self, num_update: jax.Array) -> jax.Array:
        passed = jnp.searchsorted(jnp.asarray(self.step), num_update, side="left")
        return jnp.asarray(self._levels, dtype=jnp.float32)[passed]


class _Annealing(_Schedule):
    """Poly and Cosine: a decay from ``base_lr_orig`` to ``final_lr`` over ``max_steps`` updates."""

    def __init__(
        self,
        max_update: int,
        base_lr: float,
        final_lr: float,
        warmup_steps: int,
        warmup_begin_lr: float,
        warmup_mode: str,
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        where = type(self).__name__
        integer(where, "max_update", max_update, minimum=1)
        if max_update == self.warmup_steps:
            expected = f"!= warmup_steps ({self.warmup_steps}; MXNet divides by zero there)"
            fail(where, "max_update", expected, max_update)
        self._set(
            base_lr_orig=self.base_lr,
            max_update=int(max_update),
            final_lr=_learning_rate(where, "final_lr", final_lr),
            max_steps=int(max_update) - self.warmup_steps,
        )

    def _eager(self, num_update: int) -> float:
        if self.max_steps < 0:
            # max_update < warmup_steps: MXNet never updates self.base_lr, so it returns it.
            return self.base_lr
        return self._eager_decay(min(num_update, self.max_update))

    def _traced(self, num_update: jax.Array) -> jax.Array:
        if self.max_steps < 0:
            return jnp.full(num_update.shape, self.base_lr, dtype=jnp.float32)
        num_update = jnp.minimum(num_update, self.max_update)
        # Both fractions have exact integer numerators, so neither suffers from 1 - x cancellation.
        done = (num_update - self.warmup_steps).astype(jnp.float32) / self.max_steps
        left = (self.max_update - num_update).astype(jnp.float32) / self.max_steps
        start_weight, final_weight = self._traced_weights(done, left)
        # Two terms >= 0: no cancellation, whichever of base_lr_orig and final_lr is larger.
        return (
            jnp.float32(self.base_lr_orig) * start_weight
            + jnp.float32(self.final_lr) * final_weight
        )

    @abc.abstractmethod
    def _eager_decay(self, num_update: int) -> float:
        """MXNet's formula at ``warmup_steps <= num_update <= max_update``."""

    @abc.abstractmethod
    def _traced_weights(self, done: jax.Array, left: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(w, 1 - w)`` with ``lr = final_lr + (base_lr_orig - final_lr) * w``, both accurate."""


class PolyScheduler(_Annealing):
    """Polynomial decay from ``base_lr`` to ``final_lr`` after warmup.

    Equivalent to ``mxnet.lr_scheduler.PolyScheduler``. With ``max_steps = max_update -
    warmup_steps`` and ``warmup_steps <= num_update <= max_update``::

        fraction = (num_update - warmup_steps) / max_steps
        lr = final_lr + (base_lr_orig - final_lr) * (1 - fraction) ** pwr

    Quirks of MXNet kept here:

    * ``base_lr_orig`` is the constructor's ``base_lr``: :meth:`~LRScheduler.with_base_lr` (MXNet's optimizer
      overriding ``base_lr``) does not change the schedule, except when ``max_update <
      warmup_steps``, where MXNet returns ``base_lr`` after warmup.
    * Past ``max_update`` MXNet returns the last value it computed. Here that is the value at
      ``max_update`` (``final_lr``, or ``base_lr_orig`` if ``pwr == 0``), which is what MXNet
      returns whenever it was called at ``max_update``; a fresh MXNet object first called past
      ``max_update`` instead returns ``base_lr``.

    The power is stored as ``power`` (MXNet's attribute name). Traced, the weights ``(1 -
    fraction) ** pwr`` and ``1 - (1 - fraction) ** pwr`` are computed separately (``pow``, or
    ``exp``/``expm1`` of ``pwr * log(1 - fraction)``) so neither cancels. The float32 rounding of
    ``1 - fraction`` is raised to ``pwr`` too, so the relative error is about ``max(1, pwr)``
    float32 roundings: within 1e-6 for ``pwr <= 5``, larger for steeper decays.
    """

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        pwr: float = 2,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        where = type(self).__name__
        power = _real(where, "pwr", pwr)
        non_negative(where, "pwr", power)
        self._set(power=power)

    def _constructor_args(self) -> dict[str, Any]:
        warmup = super()._constructor_args()
        return {
            "max_update": self.max_update,
            "base_lr": warmup.pop("base_lr"),
            "pwr": self.power,
            "final_lr": self.final_lr,
            **warmup,
        }

    def _eager_decay(self, num_update: int) -> float:
        fraction = float(num_update - self.warmup_steps) / float(self.max_steps)
        return self.final_lr + (self.base_lr_orig - self.final_lr) * pow(1 - fraction, self.power)

    def _traced_weights(self, done: jax.Array, left: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.power == 0:
            return jnp.ones_like(left), jnp.zeros_like(left)
        # Beyond these bounds the float32 weights no longer change; within them pwr stays a normal
        # float32 number (a subnormal one would be flushed to 0 and give 0 * log(0) at the end).
        power = min(max(self.power, 2.0**-100), 2.0**100)
        if power.is_integer() and power <= _INT32_MAX:
            power = int(power)  # jnp.power then multiplies: a few roundings, however small left
        # log(left), taken as log1p(-done) where done is the smaller, more accurate fraction;
        # exp/expm1 of it are accurate where left ** power is near 1, jnp.power where it is not.
        small = left < 0.5
        exponent = power * jnp.where(small, jnp.log(left), jnp.log1p(-done))
        return jnp.where(small, jnp.power(left, power), jnp.exp(exponent)), -jnp.expm1(exponent)


class CosineScheduler(_Annealing):
    """Half-cosine decay from ``base_lr`` to ``final_lr`` after warmup.

    Equivalent to ``mxnet.lr_scheduler.CosineScheduler``. With ``max_steps = max_update -
    warmup_steps`` and ``warmup_steps <= num_update <= max_update``::

        fraction = (num_update - warmup_steps) / max_steps
        lr = final_lr + (base_lr_orig - final_lr) * (1 + cos(pi * fraction)) / 2

    MXNet's quirks are those of :class:`PolyScheduler`: ``with_base_lr`` leaves the schedule on
    the constructor's ``base_lr`` (``base_lr_orig``) unless ``max_update < warmup_steps``, and past
    ``max_update`` the value is the one at ``max_update`` (``final_lr``), not a fresh MXNet
    object's ``base_lr``.

    Near ``max_update`` MXNet's ``1 + cos(...)`` cancels: its float64 value carries an absolute
    error of about ``2**-53 * |base_lr_orig - final_lr|``, which is a large relative error once
    the learning rate is tiny (1e-3 at ``num_update = max_update - 1`` for ``max_update = 1e7``
    and ``final_lr = 0``); the eager value reproduces that error bit for bit. Traced, the weights
    are ``sin(pi/2 * left) ** 2`` and ``sin(pi/2 * done) ** 2`` (``left = 1 - done`` taken from
    exact integer differences), equal to ``(1 +- cos(pi * done)) / 2`` without the cancellation,
    so traced values are within float32 rounding of the exact value.
    """

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)

    def _constructor_args(self) -> dict[str, Any]:
        warmup = super()._constructor_args()
        return {
            "max_update": self.max_update,
            "base_lr": warmup.pop("base_lr"),
            "final_lr": self.final_lr,
            **warmup,
        }

    def _eager_decay(self, num_update: int) -> float:
        cosine = math.cos(math.pi * (num_update - self.warmup_steps) / self.max_steps)
        return self.final_lr + (self.base_lr_orig - self.final_lr) * (1 + cosine) / 2

    def _traced_weights(self, done: jax.Array, left: jax.Array) -> tuple[jax.Array, jax.Array]:
        half_pi = jnp.float32(math.pi / 2)
        return jnp.square(jnp.sin(half_pi * left)), jnp.square(jnp.sin(half_pi * done))
