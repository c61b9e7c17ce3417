"""Step 2: the restricted unpickler that reads Gluon's ``trainer.states`` without MXNet.

:func:`~mx_adagrad.mxnet_io.load_trainer_states` reads the pickle written by Gluon's ``Trainer.save_states`` (MXNet's
``Updater.get_states``) with an unpickler that resolves a fixed list of MXNet classes to inert
stand-ins and refuses every other global, so nothing in the file gets called.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, ClassVar, TypeAlias

import numpy as np

from mx_adagrad.mxnet_io.ndarray_files import Reader, dense, open_file, read_record

__all__ = ["State", "load_trainer_states"]

State: TypeAlias = "np.ndarray | tuple[State, ...] | None"
"""One parameter's optimizer state from a ``trainer.states`` file: an array, ``None``, or a tuple."""


class _PickledNDArray:
    """Stand-in for MXNet's NDArray classes: keeps the pickled state, runs no MXNet code.

    MXNet pickles an NDArray as ``NDArray(None)`` followed by ``__setstate__({'handle':
    bytearray(record)})``; the record is decoded after unpickling.
    """

    state: Any = None

    def __init__(self, handle: None = None) -> None:
        if handle is not None:
            raise pickle.UnpicklingError(
                f"NDArray(...) must be called with None, as MXNet pickles it, got {handle!r}"
            )

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _PickledObject:
    """Stand-in for an allowed MXNet Python object: keeps the pickled ``__dict__`` and nothing else."""

    mxnet_class: ClassVar[str]
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(mxnet_class: str) -> type[_PickledObject]:
    return type(
        mxnet_class.rsplit(".", 1)[1],
        (_PickledObject,),
        {"mxnet_class": mxnet_class, "__module__": __name__},
    )


def _bytearray(data: Any) -> bytearray:
    """``builtins.bytearray`` as pickles call it (from bytes), never with a size to allocate."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(
            f"bytearray(...) must be called with bytes, got {type(data).__name__}"
        )
    return bytearray(data)


OPTIMIZERS = (
    "mxnet.optimizer.optimizer.AdaGrad",
    "mxnet.optimizer.adagrad.AdaGrad",
    "mxnet.optimizer.contrib.GroupAdaGrad",
)
_SCHEDULERS = tuple(
    f"mxnet.lr_scheduler.{name}"
    for name in (
        "LRScheduler",
        "FactorScheduler",
        "MultiFactorScheduler",
        "PolyScheduler",
        "CosineScheduler",
    )
)
# Every global a trainer.states file may name, and what it resolves to.
_ALLOWED_GLOBALS: dict[str, Any] = {
    "builtins.bytearray": _bytearray,
    "mxnet.ndarray.ndarray.NDArray": _PickledNDArray,
    "mxnet.numpy.ndarray": _PickledNDArray,
    **{name: _stand_in(name) for name in OPTIMIZERS + _SCHEDULERS},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; every other global is refused, never imported."""

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load the global {qualified!r}: a trainer.states file may only "
                f"reference {', '.join(_ALLOWED_GLOBALS)}"
            )
        return _ALLOWED_GLOBALS[qualified]


def _decode_ndarray(pickled: _PickledNDArray, reader: Reader, label: str) -> np.ndarray:
    state = pickled.state
    handle = state.get("handle") if isinstance(state, dict) else None
    if not isinstance(handle, (bytes, bytearray)):
        got = f"'handle': {type(handle).__name__}" if isinstance(state, dict) else type(state)
        raise reader.error(
            f"{label}: a pickled NDArray must have the state {{'handle': bytearray}}, got {got}"
        )
    record_reader = Reader(handle, reader.where, reader.source)
    array = dense(read_record(record_reader, f"{label} (NDArray)"), record_reader, label)
    if record_reader.remaining:
        raise reader.error(
            f"{label}: {record_reader.remaining} unexpected bytes after the NDArray record"
        )
    return array


def _plain(value: Any, reader: Reader, label: str) -> Any:
    """The unpickled ``value`` with every stand-in replaced: NDArrays by numpy arrays, objects by
    ``{"class": ..., **attributes}``; only builtin scalars and containers are let through."""
    if isinstance(value, _PickledNDArray):
        return _decode_ndarray(value, reader, label)
    if isinstance(value, _PickledObject):
        if not isinstance(value.state, dict) or not all(isinstance(k, str) for k in value.state):
            raise reader.error(
                f"{label}: a pickled {value.mxnet_class} must have a dict of attributes as its "
                f"state, got {type(value.state).__name__}"
            )
        attributes = {k: _plain(v, reader, f"{label}.{k}") for k, v in value.state.items()}
        return {"class": value.mxnet_class, **attributes}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int, float, type(None))):
                raise reader.error(f"{label}: unexpected dict key of type {type(key).__name__}")
        return {k: _plain(v, reader, f"{label}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v, reader, f"{label}[{i}]") for i, v in enumerate(value))
    if isinstance(value, (str, int, float, bytes, bytearray, type(None))):
        return value
    raise reader.error(f"{label}: unexpected object of type {type(value).__name__}")


def _state(value: Any, reader: Reader, label: str) -> State:
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_state(v, reader, f"{label}[{i}]") for i, v in enumerate(value))
    raise reader.error(
        f"{label} must be an NDArray, None or a tuple of them, got {type(value).__name__}"
    )


def load_trainer_states(
    path: str | os.PathLike[str],
) -> tuple[dict[int | str, State], dict[str, Any] | None]:
    """Reads a Gluon ``Trainer.save_states`` file (a pickle) safely, without MXNet.

    The file is ``pickle.dumps((states, optimizer))`` (``Updater.get_states(dump_optimizer=True)``,
    what ``Trainer.save_states`` writes) or ``pickle.dumps(states)`` (``dump_optimizer=False``).
    It is read with an unpickler that accepts only these globals, each mapped to an inert
    stand-in so that no code from the file or from MXNet runs:

    * ``mxnet.ndarray.ndarray.NDArray`` and ``mxnet.numpy.ndarray``: decoded from their pickled
      ``handle`` bytes, one NDArray record (see :mod:`.ndarray_files`), to numpy arrays.
    * ``builtins.bytearray``, only called with bytes (the ``handle`` payload).
    * ``mxnet.optimizer.optimizer.AdaGrad`` (MXNet 1.x), ``mxnet.optimizer.adagrad.AdaGrad``
      (MXNet 2.0) and ``mxnet.lr_scheduler.{LRScheduler, FactorScheduler, MultiFactorScheduler,
      PolyScheduler, CosineScheduler}``: their pickled attributes are recorded, nothing is built.

    Returns:
      ``(states, optimizer_info)``.

      ``states`` maps each key of MXNet's ``Updater.states`` to that parameter's state, in file
      order. Gluon's Trainer keys are ints: the parameter's position in
      ``trainer._params``, which is ``net.collect_params()`` in MXNet 1.x sorted by full
      (prefixed) name; parameters that were never updated (``grad_req='null'``) have no entry.
      (A Module that updates on a kvstore keys by parameter name, a str.) A state is a numpy array
      (AdaGrad: the history, with the weight's shape and dtype), ``None``, or a tuple of states
      (``multi_precision``: ``(float32 master weight, float32 history)``); pickled lists become
      tuples.

      ``optimizer_info`` is ``None`` when the file holds only the states; otherwise the
      optimizer's pickled ``__dict__`` plus ``"class"``, its qualified MXNet class name. For
      MXNet 1.9.1's AdaGrad the keys are ``class, lr, wd, rescale_grad`` (``1/batch_size`` after
      ``trainer.step``), ``clip_gradient`` (``None``: off), ``float_stable_eps`` (MXNet 2.0:
      ``epsilon``), ``num_update``, ``begin_num_update``, ``_index_update_count`` (``{key:
      updates}``, the per-parameter counts), ``_all_index_update_counts``, ``lr_mult``,
      ``wd_mult``, ``idx2name``, ``multi_precision``, ``aggregate_num``, ``allow_np_array``,
      ``sym_info`` and ``lr_scheduler``: ``None`` or the scheduler's attributes in the same
      ``{"class": ..., **attributes}`` form, including the state it had mutated at save time
      (``base_lr``, and ``count`` for Factor/MultiFactor). Arrays anywhere become numpy arrays.

    Raises:
      ValueError: naming the file, for a global outside the list above (the message names it, e.g.
        ``'posix.system'``; nothing is imported or called), a malformed pickle, a top-level
        object that is not ``states`` or ``(states, AdaGrad)``, a state that is not an array,
        ``None`` or a tuple, or an NDArray record :func:`load_params` would reject.
      OSError: if the file cannot be read.
    """
    reader = open_file("load_trainer_states", path)
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(reader.data)).load()
    except Exception as error:  # whatever the failing opcode raised: a corrupt or refused pickle
        raise reader.error(f"cannot unpickle: {error}") from error
    states, optimizer = loaded if isinstance(loaded, tuple) and len(loaded) == 2 else (loaded, None)
    if not isinstance(states, dict):
        raise reader.error(
            f"expected a pickled dict of states or (states, optimizer), got {type(loaded).__name__}"
        )
    if optimizer is not None and not (
        isinstance(optimizer, _PickledObject) and optimizer.mxnet_class in OPTIMIZERS
    ):
        raise reader.error(
            f"the second item must be a pickled {' or '.join(OPTIMIZERS)}, got "
            f"{getattr(optimizer, 'mxnet_class', type(optimizer).__name__)}"
        )
    result: dict[int | str, State] = {}
    try:
        for key, value in states.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise reader.error(f"state keys must be int or str, got {key!r}")
            label = f"the state for {key!r}"
            result[key] = _state(_plain(value, reader, label), reader, label)
        info = None if optimizer is None else _plain(optimizer, reader, "optimizer")
    except RecursionError as error:
        raise reader.error(
            "the pickled objects are nested too deeply or contain themselves"
        ) from error
    return result, info
