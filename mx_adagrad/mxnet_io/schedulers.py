"""Step 4: a pickled MXNet ``lr_scheduler`` as the :mod:`mx_adagrad.lr_scheduler` class that
continues it exactly, or a ``ValueError`` saying why none can.
"""

from __future__ import annotations

import bisect
from typing import Any

from mx_adagrad import lr_scheduler


def pickled_attributes(pickled: dict[str, Any], names: str, sources: str) -> list[Any]:
    missing = [name for name in names.split() if name not in pickled]
    if missing:
        raise ValueError(
            f"mx_adagrad.restore: {sources}: the pickled {pickled['class']} has no attribute "
            f"{', '.join(missing)}"
        )
    return [pickled[name] for name in names.split()]


def _not_continued(pickled: dict[str, Any], sources: str, reason: str) -> ValueError:
    name = pickled["class"].rsplit(".", 1)[1]
    return ValueError(
        f"mx_adagrad.restore: {sources}: the pickled {pickled['class']} cannot be continued "
        f"exactly by mx_adagrad.lr_scheduler.{name}: {reason}. Read the file with "
        "load_trainer_states and build the optimizer with the schedule you want"
    )


def _factor(
    pickled: dict[str, Any], start: float, first: int, warmup: dict[str, Any], sources: str
) -> lr_scheduler.FactorScheduler:
    step, factor, stop, count, current, constructed = pickled_attributes(
        pickled, "step factor stop_factor_lr count base_lr warmup_final_lr", sources
    )
    scheduler = lr_scheduler.FactorScheduler(step, factor, stop, constructed, **warmup)
    if start != constructed:
        scheduler = scheduler.with_base_lr(start)
    if not isinstance(count, int) or count < 0 or count % step:
        raise _not_continued(pickled, sources, f"its count {count!r} is not a multiple of step")
    decays = count // step
    expected = scheduler._eager(count + 1) if decays else start
    if current != expected:
        raise _not_continued(
            pickled,
            sources,
            f"its base_lr {current!r} is not {start!r} decayed count/step = {decays} times "
            f"({expected!r})",
        )
    if (first - 1) // step < decays and scheduler(first) != current:
        raise _not_continued(
            pickled,
            sources,
            f"its count ({count}) is ahead of the update count (the object was called with a "
            f"larger num_update before this optimizer used it), so MXNet keeps {current!r} "
            f"through update {count + step}, where the schedule from base_lr {start!r} gives "
            f"{scheduler(first)!r} at update {first}",
        )
    return scheduler


def _multi_factor(
    pickled: dict[str, Any], start: float, first: int, warmup: dict[str, Any], sources: str
) -> lr_scheduler.MultiFactorScheduler:
    steps, factor, index, current, constructed = pickled_attributes(
        pickled, "step factor cur_step_ind base_lr warmup_final_lr", sources
    )
    scheduler = lr_scheduler.MultiFactorScheduler(steps, factor, constructed, **warmup)
    if start != constructed:
        scheduler = scheduler.with_base_lr(start)
    if not isinstance(index, int) or not 0 <= index <= len(scheduler.step):
        raise _not_continued(
            pickled, sources, f"its cur_step_ind {index!r} is not in [0, {len(scheduler.step)}]"
        )
    expected = scheduler._levels[index]
    if current != expected:
        raise _not_continued(
            pickled,
            sources,
            f"its base_lr {current!r} is not {start!r} decayed cur_step_ind = {index} times "
            f"({expected!r})",
        )
    if bisect.bisect_left(scheduler.step, first) < index and scheduler(first) != current:
        raise _not_continued(
            pickled,
            sources,
            f"it has passed step[{index - 1}] = {scheduler.step[index - 1]} already (the object "
            "was called with a larger num_update before this optimizer used it), so MXNet keeps "
            f"{current!r} where the schedule gives {scheduler(first)!r} at update {first}",
        )
    return scheduler


def _annealing(
    pickled: dict[str, Any], first: int, warmup: dict[str, Any], sources: str
) -> lr_scheduler.PolyScheduler | lr_scheduler.CosineScheduler:
    original, max_update, final_lr, current, constructed = pickled_attributes(
        pickled, "base_lr_orig max_update final_lr base_lr warmup_final_lr", sources
    )
    if original != constructed:
        raise _not_continued(
            pickled,
            sources,
            f"its base_lr_orig {original!r} differs from its warmup_final_lr {constructed!r} "
            "(MXNet sets both to the constructor's base_lr)",
        )
    kwargs = dict(max_update=max_update, base_lr=original, final_lr=final_lr, **warmup)
    if pickled["class"].endswith("PolyScheduler"):
        (power,) = pickled_attributes(pickled, "power", sources)
        scheduler = lr_scheduler.PolyScheduler(pwr=power, **kwargs)
    else:
        scheduler = lr_scheduler.CosineScheduler(**kwargs)
    if scheduler.max_steps < 0:
        # max_update < warmup_steps: after warmup MXNet returns base_lr, never recomputed.
        return scheduler.with_base_lr(current) if current != scheduler.base_lr else scheduler
    if first > max_update and scheduler(first) != current:
        raise _not_continued(
            pickled,
            sources,
            f"the updates go on past max_update ({max_update}), where MXNet keeps returning the "
            f"last value it computed, {current!r}; the schedule holds its value at max_update, "
            f"{scheduler(first)!r} (MXNet's object was not called at max_update)",
        )
    return scheduler


def restored_scheduler(
    pickled: dict[str, Any] | None, lr: float | None, num_update: int, sources: str
) -> lr_scheduler.LRScheduler | None:
    """The :mod:`mx_adagrad.lr_scheduler` scheduler that continues MXNet's pickled one exactly.

    MXNet's schedulers are stateful; the classes here are pure functions of ``num_update`` equal
    to a fresh MXNet object called with non-decreasing counts. The pickled object is continued
    exactly when its state is one that such a fresh object (with the optimizer's
    ``learning_rate`` as its ``base_lr``, as MXNet's Optimizer assigns) reaches by
    ``num_update``, or when the difference cannot show after ``num_update``; otherwise this
    raises.
    """
    if pickled is None:
        return None
    if pickled["class"] == "mxnet.lr_scheduler.LRScheduler":
        raise ValueError(
            f"mx_adagrad.restore: {sources}: the pickled lr_scheduler is MXNet's base class "
            "mxnet.lr_scheduler.LRScheduler, which has no schedule (MXNet raises "
            "NotImplementedError when it is called)"
        )
    steps, begin, mode, constructed = pickled_attributes(
        pickled, "warmup_steps warmup_begin_lr warmup_mode warmup_final_lr", sources
    )
    warmup = dict(warmup_steps=steps, warmup_begin_lr=begin, warmup_mode=mode)
    # The first update the restored optimizer makes, or the end of the warmup if that is later:
    # before it both give the warmup values, which depend on the constructor's arguments only.
    first = max(num_update + 1, steps)
    start = constructed if lr is None else lr
    if pickled["class"] == "mxnet.lr_scheduler.FactorScheduler":
        return _factor(pickled, start, first, warmup, sources)
    if pickled["class"] == "mxnet.lr_scheduler.MultiFactorScheduler":
        return _multi_factor(pickled, start, first, warmup, sources)
    return _annealing(pickled, first, warmup, sources)
