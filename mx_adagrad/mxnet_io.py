"""Read MXNet checkpoints without MXNet: ``.params`` NDArray files and Gluon ``trainer.states``.

None of these functions imports mxnet or executes anything stored in the file:

* :func:`load_params` decodes the NDArray list written by ``mx.nd.save`` / ``mx.npx.save``, which
  is what Gluon's ``save_parameters``, ``HybridBlock.export`` and Module's ``save_checkpoint``
  write to ``.params`` files. It uses numpy only.
* :func:`load_trainer_states` reads the pickle written by Gluon's ``Trainer.save_states`` (MXNet's
  ``Updater.get_states``) with an unpickler that resolves a fixed list of MXNet classes to inert
  stand-ins and refuses every other global, so nothing in the file gets called.
* :func:`restore` and :func:`restore_functional` read both files of a Gluon checkpoint
  (``net.save_parameters`` and ``trainer.save_states``) and return an optimizer, weights and states
  that continue the training where MXNet stopped: MXNet's Optimizer API
  (:class:`mx_adagrad.AdaGrad`, :class:`mx_adagrad.legacy.AdaGrad`) or an optax transformation with
  its state.

NDArray list file (``.params``), every integer little-endian::

    uint64  0x112                       list magic
    uint64  reserved                    0 (not checked, as in MXNet)
    uint64  n                           number of arrays
    n       NDArray records             (below)
    uint64  k                           number of names: 0 (a saved list) or n (a saved dict)
    k x     uint64 length, UTF-8 bytes  the names, in record order

NDArray record (one array; the ``handle`` bytes of a pickled NDArray are exactly one record)::

    uint32  magic       0xF993FAC9 (V2), 0xF993FACA (V3: saved in NumPy shape mode, as MXNet 2.0
                        and ``npx.set_np()`` do) or 0xF993FAC8 (V1, before sparse storage existed)
    int32   stype       not in V1: 0 dense, 1 row_sparse, 2 csr
    shape   storage     sparse only: the shape of the stored values
    shape   shape       int32 ndim, then ndim x int64 dims
    int32   dev_type    the context it was saved from (1 cpu, 2 gpu, ...); the data is always
    int32   dev_id      host memory, so both are ignored here
    int32   dtype flag  0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64,
                        7 bool, 8 int16, 9 uint16, 10 uint32, 11 uint64, 12 bfloat16
    sparse only, per auxiliary array (1 for row_sparse, 2 for csr): int32 dtype flag, shape
    bytes   data        prod(shape) elements (prod(storage) for sparse), C order, little-endian
    sparse only, per auxiliary array: its data (row ids; csr: indptr, then column indices)

A shape with ndim -1 or a dim of -1 is unknown: MXNet's empty "none" array, whose record ends right
after the shape. Before V3, ndim 0 meant the same; in V3 it is a 0-d (scalar) array.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mx_adagrad import alias, compat, legacy, lr_scheduler
from mx_adagrad._checks import fail, shown
from mx_adagrad.precision import LOW_PRECISION_DTYPES

__all__ = ["State", "load_params", "load_trainer_states", "restore", "restore_functional"]

State: TypeAlias = "np.ndarray | tuple[State, ...] | None"
"""One parameter's optimizer state from a ``trainer.states`` file: an array, ``None``, or a tuple."""

_LIST_MAGIC = 0x112
_V1_MAGIC = 0xF993FAC8
_V2_MAGIC = 0xF993FAC9
_V3_MAGIC = 0xF993FACA
_MAX_NDIM = 32
# The smallest possible record: magic, stype and an ndim that marks an empty array.
_MIN_RECORD_BYTES = 12

# stype -> (name, number of auxiliary arrays)
_STYPES = {0: ("dense", 0), 1: ("row_sparse", 1), 2: ("csr", 2)}

# mshadow type flag -> (name, dtype of the bytes in the file)
_DTYPES = {
    0: ("float32", np.dtype("<f4")),
    1: ("float64", np.dtype("<f8")),
    2: ("float16", np.dtype("<f2")),
    3: ("uint8", np.dtype("u1")),
    4: ("int32", np.dtype("<i4")),
    5: ("int8", np.dtype("i1")),
    6: ("int64", np.dtype("<i8")),
    7: ("bool", np.dtype("u1")),
    8: ("int16", np.dtype("<i2")),
    9: ("uint16", np.dtype("<u2")),
    10: ("uint32", np.dtype("<u4")),
    11: ("uint64", np.dtype("<u8")),
    12: ("bfloat16", np.dtype("<u2")),
}
_BOOL_FLAG = 7
_BFLOAT16_FLAG = 12


class _Reader:
    """Sequential little-endian reads from a buffer; every error names the file being read."""

    def __init__(self, data: bytes | bytearray, where: str, source: str) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.where = where
        self.source = source

    def error(self, message: str) -> ValueError:
        return ValueError(f"mx_adagrad.{self.where}: {self.source}: {message}")

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining:
            raise self.error(
                f"truncated: {what} needs {size} bytes at offset {self.offset}, "
                f"but only {self.remaining} are left"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return value


class _SparseRecord(NamedTuple):
    """What :func:`_read_record` reports for a row_sparse or csr record (its data is skipped)."""

    stype: str
    shape: tuple[int, ...]
    dtype: str


def _read_shape(reader: _Reader, what: str, scalar_ok: bool) -> tuple[int, ...] | None:
    """A serialized shape; None if it is unknown (MXNet's empty "none" NDArray)."""
    ndim = reader.unpack("<i", f"{what} ndim")
    if ndim == -1 or (ndim == 0 and not scalar_ok):
        return None
    if not 0 <= ndim <= _MAX_NDIM:
        raise reader.error(f"{what}: ndim must be in [-1, {_MAX_NDIM}], got {ndim}")
    dims = struct.unpack(f"<{ndim}q", reader.take(8 * ndim, f"{what} dims"))
    if -1 in dims:
        return None
    if min(dims, default=0) < 0:
        raise reader.error(f"{what}: dims must be >= 0, got {dims}")
    return dims


def _read_dtype(reader: _Reader, what: str) -> int:
    flag = reader.unpack("<i", what)
    if flag not in _DTYPES:
        known = ", ".join(f"{k} {name}" for k, (name, _) in _DTYPES.items())
        raise reader.error(f"{what}: unknown dtype flag {flag} (known: {known})")
    return flag


def _read_data(reader: _Reader, flag: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``prod(shape)`` elements of dtype ``flag`` as a new native-endian array of that shape."""
    name, wire = _DTYPES[flag]
    raw = reader.take(math.prod(shape) * wire.itemsize, f"{what} ({name} {shape})")
    array = np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("="))
    if flag == _BOOL_FLAG:
        array = array != 0
    elif flag == _BFLOAT16_FLAG:
        array = array.view(jnp.bfloat16)
    return array.reshape(shape)


def _read_record(reader: _Reader, label: str) -> np.ndarray | _SparseRecord:
    """One NDArray record: the dense array, or a description of a sparse one."""
    start = reader.offset
    magic = reader.unpack("<I", f"{label} magic")
    if magic not in (_V1_MAGIC, _V2_MAGIC, _V3_MAGIC):
        raise reader.error(
            f"{label}: unknown NDArray record magic 0x{magic:08X} at offset {start} (expected "
            f"0x{_V2_MAGIC:08X} (V2), 0x{_V3_MAGIC:08X} (V3) or 0x{_V1_MAGIC:08X} (V1))"
        )
    stype = 0 if magic == _V1_MAGIC else reader.unpack("<i", f"{label} stype")
    if stype not in _STYPES:
        raise reader.error(
            f"{label}: unknown storage type (stype) {stype}, expected 0 (dense), "
            "1 (row_sparse) or 2 (csr)"
        )
    stype_name, num_aux = _STYPES[stype]
    scalar_ok = magic == _V3_MAGIC
    storage = _read_shape(reader, f"{label} storage shape", scalar_ok) if num_aux else None
    shape = _read_shape(reader, f"{label} shape", scalar_ok)
    if shape is None:
        raise reader.error(
            f"{label}: an empty NDArray (unknown shape, no data), as MXNet writes for an array "
            "that was never allocated"
        )
    reader.take(8, f"{label} context")
    flag = _read_dtype(reader, f"{label} dtype")
    if not num_aux:
        return _read_data(reader, flag, shape, f"{label} data")
    aux = [
        (
            _read_dtype(reader, f"{label} aux #{i} dtype"),
            _read_shape(reader, f"{label} aux #{i} shape", scalar_ok),
        )
        for i in range(num_aux)
    ]
    if storage is None or any(aux_shape is None for _, aux_shape in aux):
        raise reader.error(f"{label}: a {stype_name} NDArray with an unknown storage shape")
    _read_data(reader, flag, storage, f"{label} stored values")
    for i, (aux_flag, aux_shape) in enumerate(aux):
        _read_data(reader, aux_flag, aux_shape, f"{label} aux #{i} data")
    return _SparseRecord(stype_name, shape, _DTYPES[flag][0])


def _dense(record: np.ndarray | _SparseRecord, reader: _Reader, label: str) -> np.ndarray:
    if isinstance(record, _SparseRecord):
        raise reader.error(
            f"{label} is a {record.stype} NDArray ({record.dtype}, shape {record.shape}); only "
            "dense arrays can be read (densify it in MXNet with .tostype('default') and save "
            "it again)"
        )
    return record


def _open(where: str, path: str | os.PathLike[str]) -> _Reader:
    if not isinstance(path, (str, os.PathLike)):
        fail(where, "path", "a str or os.PathLike", path)
    return _Reader(Path(path).read_bytes(), where, repr(os.fspath(path)))


def _check_count(reader: _Reader, count: int, item_bytes: int, what: str) -> None:
    """Rejects counts the rest of the file cannot hold (before looping over them)."""
    if count * item_bytes > reader.remaining:
        raise reader.error(
            f"{what} is {count}, more than the {reader.remaining} bytes left in the file can hold"
        )


def load_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Reads an MXNet NDArray file (``.params``) into numpy arrays, without MXNet.

    Returns what ``mx.nd.load`` returns, as numpy: a dict ``{name: array}`` in file order when the
    file was saved from a dict (Gluon ``save_parameters``, ``export``, Module checkpoints), a list
    of arrays in file order when it was saved from a list (such a file has no names; a file with
    no arrays at all is also returned as ``[]``, as MXNet does).

    Names are kept exactly as stored, as ``mx.nd.load`` keeps them: ``save_parameters`` writes the
    structural names (``"0.weight"``, ``"features.3.bias"``); ``HybridBlock.export`` and Module's
    ``save_checkpoint`` write ``"arg:<name>"`` and ``"aux:<name>"`` (Gluon's ``load_parameters``
    strips those two prefixes when it matches names; do that yourself if you need it).

    Every array is a new, writable, native-endian numpy array with the stored dtype: float32,
    float64, float16, uint8, int8, int32, int64, bool, int16, uint16, uint32, uint64, or bfloat16
    (``jnp.bfloat16``). Files in MXNet's record formats V1, V2 (MXNet 1.x) and V3 (NumPy shape
    mode, MXNet 2.0) are read; V3 can hold 0-d arrays.

    Args:
      path: the ``.params`` file.

    Returns:
      ``dict[str, np.ndarray]`` for a file with names, ``list[np.ndarray]`` for one without.

    Raises:
      ValueError: naming the file and the entry, for anything that is not a dense NDArray file:
        a wrong magic number, an unknown record version, dtype flag or storage type, a
        row_sparse or csr entry, an empty (never allocated) array, truncated data, trailing
        bytes, a name count that is neither 0 nor the array count, names that are not UTF-8, or
        duplicate names.
      OSError: if the file cannot be read.
    """
    reader = _open("load_params", path)
    magic = reader.unpack("<Q", "the file magic")
    if magic != _LIST_MAGIC:
        raise reader.error(
            f"not an MXNet NDArray file: it must start with the magic 0x{_LIST_MAGIC:X} "
            f"(uint64), got 0x{magic:X}"
        )
    reader.take(8, "the reserved field")
    count = reader.unpack("<Q", "the array count")
    _check_count(reader, count, _MIN_RECORD_BYTES, "the array count")
    records = [_read_record(reader, f"record #{i}") for i in range(count)]
    num_names = reader.unpack("<Q", "the name count")
    if num_names not in (0, count):
        raise reader.error(f"the name count must be 0 or the array count {count}, got {num_names}")
    names = []
    for i in range(num_names):
        length = reader.unpack("<Q", f"the length of name #{i}")
        raw = reader.take(length, f"name #{i}")
        try:
            names.append(str(raw, "utf-8"))
        except UnicodeDecodeError as error:
            raise reader.error(f"name #{i} is not UTF-8: {bytes(raw)!r}") from error
    if reader.remaining:
        raise reader.error(
            f"{reader.remaining} unexpected bytes after the names, at offset {reader.offset}"
        )
    if not names:
        return [_dense(record, reader, f"entry #{i}") for i, record in enumerate(records)]
    params = {}
    for name, record in zip(names, records):
        if name in params:
            raise reader.error(f"the name {name!r} appears more than once")
        params[name] = _dense(record, reader, f"entry {name!r}")
    return params


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


_OPTIMIZERS = ("mxnet.optimizer.optimizer.AdaGrad", "mxnet.optimizer.adagrad.AdaGrad")
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
    **{name: _stand_in(name) for name in _OPTIMIZERS + _SCHEDULERS},
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


def _decode_ndarray(pickled: _PickledNDArray, reader: _Reader, label: str) -> np.ndarray:
    state = pickled.state
    handle = state.get("handle") if isinstance(state, dict) else None
    if not isinstance(handle, (bytes, bytearray)):
        got = f"'handle': {type(handle).__name__}" if isinstance(state, dict) else type(state)
        raise reader.error(
            f"{label}: a pickled NDArray must have the state {{'handle': bytearray}}, got {got}"
        )
    record_reader = _Reader(handle, reader.where, reader.source)
    array = _dense(_read_record(record_reader, f"{label} (NDArray)"), record_reader, label)
    if record_reader.remaining:
        raise reader.error(
            f"{label}: {record_reader.remaining} unexpected bytes after the NDArray record"
        )
    return array


def _plain(value: Any, reader: _Reader, label: str) -> Any:
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


def _state(value: Any, reader: _Reader, label: str) -> State:
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
      ``handle`` bytes, one NDArray record (see the module docstring), to numpy arrays.
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
    reader = _open("load_trainer_states", path)
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
        isinstance(optimizer, _PickledObject) and optimizer.mxnet_class in _OPTIMIZERS
    ):
        raise reader.error(
            f"the second item must be a pickled {' or '.join(_OPTIMIZERS)}, got "
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


# --------------------------------------------------------------------------------------------
# restore: a Gluon checkpoint (net.params + trainer.states) as an mx_adagrad optimizer

TrainerOrder: TypeAlias = "Sequence[str] | Mapping[str, str] | None"
"""``trainer_order`` of :func:`restore`: structural names by Trainer index, or {structural: full}."""

_MXNET1_ADAGRAD = _OPTIMIZERS[0]
# Entries listed in a pairing error before the rest are only counted.
_MAX_LISTED = 12


def _trainer_order(params: dict[str, np.ndarray], trainer_order: Any) -> list[str]:
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


def _pair(
    states: dict[int | str, State],
    names: list[str],
    params: dict[str, np.ndarray],
    explicit: bool,
    sources: str,
) -> list[int]:
    """The Trainer indices that have a state, sorted, after checking each against its weight."""
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
        if any(a.shape != shape for a in arrays):
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


def _remap(
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


def _attributes(pickled: dict[str, Any], names: str, sources: str) -> list[Any]:
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
    step, factor, stop, count, current, constructed = _attributes(
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
    steps, factor, index, current, constructed = _attributes(
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
    original, max_update, final_lr, current, constructed = _attributes(
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
        (power,) = _attributes(pickled, "power", sources)
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


def _scheduler(
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
    steps, begin, mode, constructed = _attributes(
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
    ) = _attributes(
        info,
        "lr lr_scheduler wd rescale_grad clip_gradient multi_precision begin_num_update "
        "num_update _index_update_count lr_mult wd_mult idx2name",
        sources,
    )
    if isinstance(num_update, bool) or not isinstance(num_update, int) or num_update < 0:
        fail("restore", "the pickled num_update", "an int >= 0", num_update)
    scheduler = _scheduler(scheduler, lr, num_update, sources)
    hyperparameters = dict(
        learning_rate=None if scheduler is not None else lr,
        lr_scheduler=scheduler,
        wd=wd,
        rescale_grad=rescale_grad,
        clip_gradient=clip_gradient,
        multi_precision=bool(multi_precision),
        begin_num_update=begin_num_update,
        param_idx2name=_remap(idx2name, "idx2name", positions, count, sources),
    )
    if info["class"] == _MXNET1_ADAGRAD:
        (eps,) = _attributes(info, "float_stable_eps", sources)
        optimizer: compat.Optimizer = legacy.AdaGrad(eps=eps, **hyperparameters)
    else:
        (epsilon,) = _attributes(info, "epsilon", sources)
        optimizer = compat.AdaGrad(epsilon=epsilon, **hyperparameters)
    # Assigned, not set_lr_mult/set_wd_mult: the pickled dicts already hold MXNet's defaults.
    optimizer.lr_mult = _remap(lr_mult, "lr_mult", positions, count, sources)
    optimizer.wd_mult = _remap(wd_mult, "wd_mult", positions, count, sources)
    optimizer.num_update = num_update
    optimizer._index_update_count = _remap(counts, "_index_update_count", positions, count, sources)
    return optimizer


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
        ``mxnet.optimizer.optimizer.AdaGrad`` (``float_stable_eps`` as ``eps``), or
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
    names = _trainer_order(params, trainer_order)
    indices = _pair(states, names, params, trainer_order is not None, sources)
    positions = {index: position for position, index in enumerate(indices)}
    optimizer = _optimizer(info, positions, len(names), sources)
    restored = [
        tuple(jnp.asarray(a) for a in state) if isinstance(state, tuple) else jnp.asarray(state)
        for state in (states[index] for index in indices)
    ]
    trained = [names[index] for index in indices]
    return optimizer, [jnp.asarray(params[name]) for name in trained], restored, trained


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

      * ``tx``: :func:`mx_adagrad.legacy.adagrad` (MXNet 1.x) or :func:`mx_adagrad.adagrad`
        (MXNet 2.0) with the pickled ``learning_rate`` or ``lr_scheduler`` (converted as in
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
    if optimizer.lr_scheduler is not None:
        counts = {
            name: optimizer._index_update_count.get(i, optimizer.begin_num_update)
            for i, name in enumerate(names)
        }
        behind = {name: n for name, n in counts.items() if n != optimizer.num_update}
        if behind:
            fail(
                where,
                "the update count of every parameter",
                f"the optimizer's num_update ({optimizer.num_update}) when there is an "
                "lr_scheduler (use restore, which keeps per-parameter counts)",
                shown(", ".join(f"{name!r}: {n}" for name, n in behind.items())),
            )

    def multipliers(table: dict[Any, float], attribute: str) -> dict[str, float] | None:
        values = {name: optimizer._multiplier(i, table, attribute) for i, name in enumerate(names)}
        return {name: value for name, value in values.items() if value != 1.0} or None

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
    if isinstance(optimizer, legacy.AdaGrad):
        tx = legacy.adagrad(learning_rate, optimizer.float_stable_eps, **hyperparameters)
    else:
        tx = alias.adagrad(learning_rate, optimizer.epsilon, **hyperparameters)
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
