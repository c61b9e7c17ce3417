"""Step 3: pairing the optimizer states of ``trainer.states`` with the weights of ``net.params``.

``trainer.states`` keys each state by its Gluon Trainer index; ``net.params`` names each weight by
its structural name (``0.weight``). ``trainer_order`` turns the user's ``trainer_order`` into
the structural names by index, ``pair`` checks every state against its weight, and
``remap`` re-keys the optimizer's index tables by position among the trained parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from mx_adagrad._checks import fail, shown
from mx_adagrad.mxnet_io.trainer_states import State

TrainerOrder: TypeAlias = "Sequence[str] | Mapping[str, str] | None"
"""``trainer_order`` of :func:`~mx_adagrad.mxnet_io.restore`: structural names by Trainer index, or {structural: full}."""

# Entries listed in a pairing error before the rest are only counted.
_MAX_LISTED = 12


def trainer_order_names(params: dict[str, np.ndarray], trainer_order: Any) -> list[str]:
    """The structural names in the Trainer's index order (``names[i]`` has Trainer index ``i``)."""
    if trainer_order is None:
        return sorted(params)
    if isinstance(trainer_order, Mapping):
        full_names = list(trainer_order.values())
        strings = all(isinstance(full, str) for full in full_names)
        if not strings or len(set(full_names)) != len(full_names):
            fail(
                "restore",
                "the full names (values) of trainer_order",
                "distinct strings",
                full_names,
            )
        names = sorted(trainer_order, key=trainer_order.__getitem__)
    elif isinstance(trainer_order, Sequence) and not isinstance(trainer_order, str):
        names = list(trainer_order)
    else:
        fail(
            "restore",
            "trainer_order",
            "None, a list of structural names in the Trainer's index order, or a dict "
            "{structural name: full name}",
            trainer_order,
        )
    unknown = [name for name in names if not isinstance(name, str) or name not in params]
    if unknown:
        fail(
            "restore",
            "every name in trainer_order",
            f"a name in the .params file ({', '.join(map(repr, params))})",
            shown(", ".join(map(repr, unknown))),
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        fail("restore", "every name in trainer_order", "listed once", shown(", ".join(repeated)))
    return names


def _check_state(index: int, state: State) -> tuple[np.ndarray, ...]:
    """The arrays of one AdaGrad state: ``(history,)`` or ``(master, history)``."""
    arrays = state if isinstance(state, tuple) else (state,)
    if len(arrays) not in (1, 2) or not all(isinstance(a, np.ndarray) for a in arrays):
        fail(
            "restore",
            f"the state of Trainer index {index}",
            "an AdaGrad history array, or a (float32 master, history) pair (multi_precision)",
            shown(repr(state) if state is None else f"a {type(state).__name__} of {len(arrays)}"),
        )
    return arrays


def pair(
    states: dict[int | str, State],
    names: list[str],
    params: dict[str, np.ndarray],
    explicit: bool,
    sources: str,
    history_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape,
) -> list[int]:
    """The Trainer indices that have a state, sorted, after checking each against its weight:
    a master copy has the weight's shape, a history ``history_shape(weight shape)`` (the
    weight's, or GroupAdaGrad's ``(rows, 1)``)."""
    keys = list(states)
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, int):
            fail(
                "restore",
                "every key of the trainer.states file",
                "a Gluon Trainer index (int; a Module updating on a kvstore keys states by name, "
                "which restore does not read)",
                key,
            )
    problems = []
    for index in sorted(keys):
        arrays = _check_state(index, states[index])
        if not 0 <= index < len(names):
            problems.append(f"index {index}: no parameter ({len(names)} names in the order)")
            continue
        name = names[index]
        shape = params[name].shape
        if tuple(a.shape for a in arrays) != (
            (shape,) * (len(arrays) - 1) + (history_shape(shape),)
        ):
            state_shapes = ", ".join(str(a.shape) for a in arrays)
            problems.append(
                f"index {index} -> {name!r}: weight shape {shape}, state shape {state_shapes}"
            )
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        if len(problems) > _MAX_LISTED:
            listed += f"; and {len(problems) - _MAX_LISTED} more"
        rule = (
            "the trainer_order given"
            if explicit
            else "the default rule (Trainer index i = the i-th sorted structural name)"
        )
        raise ValueError(
            f"mx_adagrad.restore: {sources}: the optimizer states do not pair with the weights "
            f"under {rule}: {listed}. Gluon's Trainer numbers parameters by their sorted full "
            "names (e.g. conv0_weight), which neither file stores, and that order can differ "
            "from the sorted structural names. Pass trainer_order=[structural names in the "
            "Trainer's index order], or trainer_order={structural name: full name} (sorted by "
            "full name); for Trainer(net.collect_params()) in MXNet 1.x that dict is "
            "{name: p.name for name, p in net._collect_params_with_prefix().items()}"
        )
    return sorted(keys)


def remap(
    table: Any, what: str, positions: dict[int, int], count: int, sources: str
) -> dict[Any, Any]:
    """An index-keyed optimizer table with Trainer indices replaced by positions 0..n-1.

    Names (str keys) are kept. Indices of parameters without a state are dropped: they are not
    among the returned lists and never updated.
    """
    if not isinstance(table, dict):
        fail("restore", f"the pickled {what}", "a dict", table)
    remapped = {}
    for key, value in table.items():
        if isinstance(key, bool) or not isinstance(key, int):
            remapped[key] = value
        elif key in positions:
            remapped[positions[key]] = value
        elif not 0 <= key < count:
            raise ValueError(
                f"mx_adagrad.restore: {sources}: the pickled {what} has an entry for Trainer "
                f"index {key}, but the order has {count} parameters; pass trainer_order with "
                "every parameter the Trainer was given"
            )
    return remapped
