"""Step 1: reading MXNet NDArray files (``.params``) into numpy arrays, without MXNet.

:func:`~mx_adagrad.mxnet_io.load_params` decodes the NDArray list written by ``mx.nd.save`` / ``mx.npx.save``, which is
what Gluon's ``save_parameters``, ``HybridBlock.export`` and Module's ``save_checkpoint`` write to
``.params`` files. It uses numpy only. The record decoder is shared with :mod:`.trainer_states`,
whose pickled NDArrays carry one record each.

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

import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mx_adagrad._checks import fail

__all__ = ["load_params"]

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


class Reader:
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
    """What :func:`read_record` reports for a row_sparse or csr record (its data is skipped)."""

    stype: str
    shape: tuple[int, ...]
    dtype: str


def _read_shape(reader: Reader, what: str, scalar_ok: bool) -> tuple[int, ...] | None:
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


def _read_dtype(reader: Reader, what: str) -> int:
    flag = reader.unpack("<i", what)
    if flag not in _DTYPES:
        known = ", ".join(f"{k} {name}" for k, (name, _) in _DTYPES.items())
        raise reader.error(f"{what}: unknown dtype flag {flag} (known: {known})")
    return flag


def _read_data(reader: Reader, flag: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``prod(shape)`` elements of dtype ``flag`` as a new native-endian array of that shape."""
    name, wire = _DTYPES[flag]
    raw = reader.take(math.prod(shape) * wire.itemsize, f"{what} ({name} {shape})")
    array = np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("="))
    if flag == _BOOL_FLAG:
        array = array != 0
    elif flag == _BFLOAT16_FLAG:
        array = array.view(jnp.bfloat16)
    return array.reshape(shape)


def read_record(reader: Reader, label: str) -> np.ndarray | _SparseRecord:
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


def dense(record: np.ndarray | _SparseRecord, reader: Reader, label: str) -> np.ndarray:
    if isinstance(record, _SparseRecord):
        raise reader.error(
            f"{label} is a {record.stype} NDArray ({record.dtype}, shape {record.shape}); only "
            "dense arrays can be read (densify it in MXNet with .tostype('default') and save "
            "it again)"
        )
    return record


def open_file(where: str, path: str | os.PathLike[str]) -> Reader:
    if not isinstance(path, (str, os.PathLike)):
        fail(where, "path", "a str or os.PathLike", path)
    return Reader(Path(path).read_bytes(), where, repr(os.fspath(path)))


def _check_count(reader: Reader, count: int, item_bytes: int, what: str) -> None:
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
    reader = open_file("load_params", path)
    magic = reader.unpack("<Q", "the file magic")
    if magic != _LIST_MAGIC:
        raise reader.error(
            f"not an MXNet NDArray file: it must start with the magic 0x{_LIST_MAGIC:X} "
            f"(uint64), got 0x{magic:X}"
        )
    reader.take(8, "the reserved field")
    count = reader.unpack("<Q", "the array count")
    _check_count(reader, count, _MIN_RECORD_BYTES, "the array count")
    records = [read_record(reader, f"record #{i}") for i in range(count)]
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
        return [dense(record, reader, f"entry #{i}") for i, record in enumerate(records)]
    params = {}
    for name, record in zip(names, records):
        if name in params:
            raise reader.error(f"the name {name!r} appears more than once")
        params[name] = dense(record, reader, f"entry {name!r}")
    return params
