"""mx_adagrad.mxnet_io reads MXNet's .params and trainer.states files without MXNet.

The fixtures in tests/fixtures/ were written by real MXNet 1.9.1. Other layouts (V1 and V3 records,
dtype flags MXNet 1.9.1's Python API cannot create, multi-precision states, schedulers) are built
here by two small writers, ``record`` and the ``fake_mxnet`` modules, that first have to reproduce
the MXNet-written fixtures byte for byte. The V1 and V3 layouts built by ``record`` were also loaded
with real MXNet 1.9.1 (``mx.nd.load`` / ``mx.npx.load`` in NumPy shape mode) when these tests were
written, and gave the same arrays.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import struct
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mx_adagrad.mxnet_io import load_params, load_trainer_states

FIXTURES = Path(__file__).parent / "fixtures"
GLUON_CASES = ("gluon_dense2", "gluon_convbn")

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
FLAGS = {
    "float32": 0,
    "float64": 1,
    "float16": 2,
    "uint8": 3,
    "int32": 4,
    "int8": 5,
    "int64": 6,
    "bool": 7,
    "int16": 8,
    "uint16": 9,
    "uint32": 10,
    "uint64": 11,
    "bfloat16": 12,
}


def shape_bytes(shape):
    return struct.pack(f"<i{len(shape)}q", len(shape), *shape)


def record(array, magic=V2, flag=None, dims=None, context=(1, 0)):
    """One dense NDArray record as MXNet's ``NDArray::Save`` writes it."""
    array = np.asarray(array)
    head = struct.pack("<I", magic) + (b"" if magic == V1 else struct.pack("<i", 0))
    head += shape_bytes(array.shape if dims is None else dims)
    head += struct.pack("<iii", *context, FLAGS[array.dtype.name] if flag is None else flag)
    return head + array.tobytes()


def params_file(records, names=()):
    """An NDArray list file (``mx.nd.save``) holding ``records`` and ``names``."""
    out = struct.pack("<QQQ", 0x112, 0, len(records)) + b"".join(records)
    out += struct.pack("<Q", len(names))
    for name in names:
        out += struct.pack("<Q", len(name.encode())) + name.encode()
    return out


def write(tmp_path, data, name="file.params"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# load_params on files written by MXNet 1.9.1


def test_load_params_every_dtype_exactly():
    expected = np.load(FIXTURES / "mx1_params_dtypes.npz", allow_pickle=False)
    params = load_params(FIXTURES / "mx1_params_dtypes.params")
    assert list(params) == ["f32", "f64", "f16", "i32", "i64", "u8", "i8", "f32_4d"]
    for name, array in params.items():
        assert isinstance(array, np.ndarray)
        assert array.dtype == expected[name].dtype, name
        assert array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array, expected[name], strict=True)
        assert array.flags.writeable and array.dtype.isnative
    assert np.abs(params["i64"]).max() > 2**49  # int64 values beyond float64's exact range


def test_load_params_list_file_has_no_names():
    expected = np.load(FIXTURES / "mx1_params_dtypes.npz", allow_pickle=False)
    arrays = load_params(FIXTURES / "mx1_params_list.params")
    assert isinstance(arrays, list) and len(arrays) == 2
    np.testing.assert_array_equal(arrays[0], expected["f32"], strict=True)
    np.testing.assert_array_equal(arrays[1], expected["i64"], strict=True)


@pytest.mark.parametrize("case", GLUON_CASES)
def test_load_params_gluon_checkpoint(case):
    steps = np.load(FIXTURES / case / "steps.npz", allow_pickle=False)
    params = load_params(str(FIXTURES / case / "net.params"))
    assert sorted(params) == sorted(steps["param_names"])  # structural names, no prefixes
    for name, array in params.items():
        np.testing.assert_array_equal(array, steps[f"weights__{name}"][0], strict=True)
        np.testing.assert_array_equal(array, steps[f"pre_weights__{name}"][3], strict=True)


@pytest.mark.parametrize(
    ("fixture", "entry", "stype", "shape"),
    [
        ("mx1_params_row_sparse.params", "embed_weight", "row_sparse", r"\(6, 2\)"),
        ("mx1_params_csr.params", "csr_weight", "csr", r"\(3, 3\)"),
    ],
    ids=["row_sparse", "csr"],
)
def test_load_params_rejects_sparse_entries(fixture, entry, stype, shape):
    message = (
        rf"mx_adagrad\.load_params: '.*{fixture}': entry '{entry}' is a {stype} NDArray "
        rf"\(float32, shape {shape}\); only dense arrays can be read"
    )
    with pytest.raises(ValueError, match=message):
        load_params(FIXTURES / fixture)


def test_record_writer_reproduces_mxnet_bytes():
    """The test-side writer is exact, so the hand-built files below are what MXNet would write."""
    expected = np.load(FIXTURES / "mx1_params_dtypes.npz", allow_pickle=False)
    written = params_file([record(expected[k]) for k in expected.files], expected.files)
    assert written == (FIXTURES / "mx1_params_dtypes.params").read_bytes()
    listed = params_file([record(expected["f32"]), record(expected["i64"])])
    assert listed == (FIXTURES / "mx1_params_list.params").read_bytes()


# --------------------------------------------------------------------------------------------
# load_params on other layouts


def test_load_params_v3_records(tmp_path):
    """NumPy shape mode (MXNet 2.0, npx.set_np()): 0-d and zero-size arrays."""
    arrays = {
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 2), np.float32),
        "flags": np.array([True, False, True]),
        "int": np.array(-7, np.int64),
    }
    path = write(tmp_path, params_file([record(a, V3) for a in arrays.values()], list(arrays)))
    params = load_params(path)
    for name, array in arrays.items():
        np.testing.assert_array_equal(params[name], array, strict=True)


def test_load_params_v1_record(tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    params = load_params(write(tmp_path, params_file([record(array, V1)], ["w"])))
    np.testing.assert_array_equal(params["w"], array, strict=True)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint32", "uint64"])
def test_load_params_mxnet2_dtypes(tmp_path, dtype):
    """Type flags 8 to 11 exist in MXNet 2.0 (mshadow); MXNet 1.9.1 cannot write them."""
    info = np.iinfo(dtype)
    array = np.array([info.min, 0, 3, info.max], dtype=dtype)
    params = load_params(write(tmp_path, params_file([record(array)], ["x"])))
    np.testing.assert_array_equal(params["x"], array, strict=True)


def test_load_params_bfloat16(tmp_path):
    array = np.array([[1.5, -2.0], [0.0078125, 3e38]], dtype=jnp.bfloat16)
    data = params_file([record(array.view(np.uint16), flag=FLAGS["bfloat16"])], ["x"])
    params = load_params(write(tmp_path, data))
    assert params["x"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["x"].view(np.uint16), array.view(np.uint16))


def test_load_params_nonzero_bool_bytes_are_true(tmp_path):
    data = params_file([record(np.array([0, 1, 2, 255], np.uint8), flag=FLAGS["bool"])], ["b"])
    params = load_params(write(tmp_path, data))
    np.testing.assert_array_equal(params["b"], np.array([False, True, True, True]), strict=True)


def test_load_params_keeps_names_as_stored(tmp_path):
    names = ["arg:fc_weight", "aux:bn_moving_mean", "ü名"]
    data = params_file([record(np.full(2, i, np.float32)) for i in range(3)], names)
    params = load_params(write(tmp_path, data))
    assert list(params) == names
    assert [float(a[0]) for a in params.values()] == [0.0, 1.0, 2.0]


def test_load_params_gpu_context_is_ignored(tmp_path):
    array = np.ones((2, 2), np.float64)
    params = load_params(write(tmp_path, params_file([record(array, context=(2, 3))], ["w"])))
    np.testing.assert_array_equal(params["w"], array, strict=True)


def test_load_params_empty_file_is_an_empty_list(tmp_path):
    assert load_params(write(tmp_path, params_file([]))) == []


# --------------------------------------------------------------------------------------------
# load_params errors


def test_load_params_every_truncation_is_a_clear_error(tmp_path):
    data = (FIXTURES / "mx1_params_dtypes.params").read_bytes()
    for size in range(len(data)):
        path = write(tmp_path, data[:size])
        with pytest.raises(ValueError, match=r"^mx_adagrad\.load_params: '.*file\.params': "):
            load_params(path)
    assert load_params(write(tmp_path, data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"truncated: the file magic needs 8 bytes at offset 0, but only 0 are left"),
        (b"PK\x03\x04 not a params file", r"not an MXNet NDArray file: .* got 0x"),
        (
            params_file([b"\x01\x02\x03\x04" + bytes(20)], ["w"]),
            r"record #0: unknown NDArray record magic 0x04030201 at offset 24",
        ),
        (
            params_file([record(np.zeros(2, np.float32), flag=13)], ["w"]),
            r"record #0 dtype: unknown dtype flag 13",
        ),
        (
            params_file([record(np.zeros(2, np.float32), flag=-1)], ["w"]),
            r"record #0 dtype: unknown dtype flag -1",
        ),
        (
            params_file([struct.pack("<Ii", V2, 3) + shape_bytes((2,))], ["w"]),
            r"record #0: unknown storage type \(stype\) 3",
        ),
        (params_file([record(np.zeros(2))], ["a", "b"]), r"name count must be 0 or .* 1, got 2"),
        (
            params_file([record(np.zeros(2))] * 2, ["a", "a"]),
            r"the name 'a' appears more than once",
        ),
        (params_file([record(np.zeros(2))], ["w"]) + b"\0", r"1 unexpected bytes after the names"),
        (params_file([struct.pack("<Iii", V2, 0, 0)], ["w"]), r"record #0: an empty NDArray"),
        (params_file([struct.pack("<Iii", V3, 0, -1)], ["w"]), r"record #0: an empty NDArray"),
        (
            params_file([record(np.zeros(2), dims=(-2,))], ["w"]),
            r"record #0 shape: dims must be >= 0, got \(-2,\)",
        ),
        (
            params_file([record(np.zeros(2), dims=(40,))], ["w"]),
            r"truncated: record #0 data \(float64 \(40,\)\) needs 320 bytes at offset 56",
        ),
        (
            params_file([struct.pack("<Iii", V2, 0, 40)], ["w"]),
            r"record #0 shape: ndim must be in \[-1, 32\], got 40",
        ),
        (
            struct.pack("<QQQ", 0x112, 0, 2**60),
            r"the array count is 1152921504606846976, more than",
        ),
    ],
    ids=[
        "empty-file",
        "zip-file",
        "record-magic",
        "dtype-flag-13",
        "dtype-flag-negative",
        "stype-3",
        "name-count",
        "duplicate-names",
        "trailing-bytes",
        "v2-none-array",
        "v3-none-array",
        "negative-dim",
        "short-data",
        "ndim-40",
        "huge-count",
    ],
)
def test_load_params_malformed_files(tmp_path, data, message):
    with pytest.raises(
        ValueError, match=r"^mx_adagrad\.load_params: '.*file\.params': .*" + message
    ):
        load_params(write(tmp_path, data))


def test_load_params_non_utf8_name(tmp_path):
    data = params_file([record(np.zeros(1))]).removesuffix(struct.pack("<Q", 0))
    data += struct.pack("<QQ", 1, 1) + b"\xff"
    with pytest.raises(ValueError, match=r"name #0 is not UTF-8: b'\\xff'"):
        load_params(write(tmp_path, data))


def test_load_params_path_argument(tmp_path):
    with pytest.raises(ValueError, match=r"^mx_adagrad\.load_params: path must be a str or"):
        load_params(b"file.params")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.params")


# --------------------------------------------------------------------------------------------
# load_trainer_states on files written by MXNet 1.9.1


@pytest.mark.parametrize("case", GLUON_CASES)
def test_load_trainer_states_gluon(case):
    index = json.loads((FIXTURES / case / "trainer_index.json").read_text())
    steps = np.load(FIXTURES / case / "steps.npz", allow_pickle=False)
    states, info = load_trainer_states(FIXTURES / case / "trainer.states")

    in_file = [e for e in index["trainer_index"] if e["state_in_file"]]
    assert list(states) == [e["index"] for e in in_file]
    for entry in in_file:
        history = states[entry["index"]]
        name = entry["structural_name"]
        assert history.shape == tuple(entry["state_shape"]) and history.dtype == np.float32
        np.testing.assert_array_equal(history, steps[f"history__{name}"][0], strict=True)
        np.testing.assert_array_equal(history, steps[f"pre_history__{name}"][3], strict=True)

    pickled = index["pickled_optimizer"]
    assert info["class"] == "mxnet.optimizer.optimizer.AdaGrad" == pickled["type"]
    assert set(info) - {"class"} == set(pickled["attributes"]) - {"param_dict"}
    assert info["rescale_grad"] == 0.25 == float(steps["rescale_grad"])
    assert info["num_update"] == 3 and info["begin_num_update"] == 0
    assert info["lr"] == 0.1 and info["wd"] == 0.01 and info["float_stable_eps"] == 1e-7
    assert info["clip_gradient"] == pickled["clip_gradient"] == float(steps["clip_gradient"])
    assert info["_index_update_count"] == {i: 3 for i in states}
    assert info["_all_index_update_counts"] == {0: {i: 3 for i in states}}
    assert info["lr_mult"] == info["wd_mult"] == info["idx2name"] == {}
    assert info["lr_scheduler"] is None and info["multi_precision"] is False


# --------------------------------------------------------------------------------------------
# A stand-in "mxnet" so that pickle writes MXNet's globals exactly as MXNet does


class _NDArrayReduce:
    """Pickles like MXNet's NDArray: ``NDArray(None)``, then ``{'handle': bytearray(record)}``."""

    def __init__(self, record=None):
        self.record = record

    def __reduce__(self):
        handle = None if self.record is None else bytearray(self.record)
        return type(self), (None,), {"handle": handle}


class _Attributes:
    """Pickles like MXNet's optimizers and schedulers: ``cls.__new__(cls)``, then its ``__dict__``."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@pytest.fixture
def fake_mxnet(monkeypatch):
    """Registers stand-in modules under mxnet's names, so pickle writes MXNet's globals."""
    classes = {
        ("mxnet.ndarray.ndarray", "NDArray"): _NDArrayReduce,
        ("mxnet.numpy", "ndarray"): _NDArrayReduce,
        ("mxnet.optimizer.optimizer", "AdaGrad"): _Attributes,
        ("mxnet.optimizer.adagrad", "AdaGrad"): _Attributes,
        ("mxnet.lr_scheduler", "FactorScheduler"): _Attributes,
    }
    modules = {}
    for module_name, _ in classes:
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            modules.setdefault(name, types.ModuleType(name))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    fake = types.SimpleNamespace()
    for (module_name, name), base in classes.items():
        cls = type(name, (base,), {"__module__": module_name, "__qualname__": name})
        setattr(modules[module_name], name, cls)
        setattr(fake, f"{module_name.rsplit('.', 1)[1]}_{name}", cls)
    return fake


def test_fake_mxnet_reproduces_the_trainer_states_bytes(fake_mxnet):
    """The stand-in writer is exact, so the pickles built below are the ones MXNet would write."""
    path = FIXTURES / "gluon_dense2" / "trainer.states"
    states, info = load_trainer_states(path)
    attributes = {k: v for k, v in info.items() if k != "class"}
    attributes["_index_update_count"] = attributes["_all_index_update_counts"][0]  # shared
    optimizer = fake_mxnet.optimizer_AdaGrad(**attributes)
    pickled = {i: fake_mxnet.ndarray_NDArray(record(h)) for i, h in states.items()}
    assert pickle.dumps((pickled, optimizer), protocol=4) == path.read_bytes()


def test_load_trainer_states_multi_precision_and_scheduler(tmp_path, fake_mxnet):
    master = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    history = np.full((2, 3), 0.25, np.float32)
    scheduler = fake_mxnet.lr_scheduler_FactorScheduler(
        base_lr=0.05, step=2, factor=0.5, stop_factor_lr=1e-8, count=2, warmup_steps=0
    )
    optimizer = fake_mxnet.adagrad_AdaGrad(
        lr=0.1, epsilon=1e-6, lr_scheduler=scheduler, multi_precision=True, num_update=3
    )
    states = {
        0: (
            fake_mxnet.ndarray_NDArray(record(master)),
            fake_mxnet.ndarray_NDArray(record(history)),
        ),
        3: fake_mxnet.numpy_ndarray(record(np.array(7.0, np.float32), V3)),
        "fc_bias": [fake_mxnet.ndarray_NDArray(record(history[0])), None],
        5: None,
    }
    path = write(tmp_path, pickle.dumps((states, optimizer)), "trainer.states")
    loaded, info = load_trainer_states(path)

    assert list(loaded) == [0, 3, "fc_bias", 5]
    np.testing.assert_array_equal(loaded[0][0], master, strict=True)
    np.testing.assert_array_equal(loaded[0][1], history, strict=True)
    assert isinstance(loaded[0], tuple) and loaded[3].shape == () and float(loaded[3]) == 7.0
    assert isinstance(loaded["fc_bias"], tuple) and loaded["fc_bias"][1] is None
    assert loaded[5] is None
    assert info == {
        "class": "mxnet.optimizer.adagrad.AdaGrad",
        "lr": 0.1,
        "epsilon": 1e-6,
        "lr_scheduler": {
            "class": "mxnet.lr_scheduler.FactorScheduler",
            "base_lr": 0.05,
            "step": 2,
            "factor": 0.5,
            "stop_factor_lr": 1e-8,
            "count": 2,
            "warmup_steps": 0,
        },
        "multi_precision": True,
        "num_update": 3,
    }


def test_load_trainer_states_without_optimizer(tmp_path, fake_mxnet):
    history = np.arange(4, dtype=np.float64)
    path = write(tmp_path, pickle.dumps({1: fake_mxnet.ndarray_NDArray(record(history))}))
    states, info = load_trainer_states(path)
    assert info is None
    np.testing.assert_array_equal(states[1], history, strict=True)


# --------------------------------------------------------------------------------------------
# load_trainer_states refuses what it does not know, and runs nothing


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _HandleOf:
    """An NDArray pickled as MXNet does, but whose 'handle' is ``payload``."""

    def __init__(self, cls, payload):
        self.cls, self.payload = cls, payload

    def __reduce__(self):
        return self.cls, (None,), {"handle": self.payload}


SYSTEM = r"'(posix|nt)\.system'"


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_RunsCommand(f"touch {shlex.quote(str(marker))}"))
    pickle.loads(data)  # the payload is live: plain pickle runs the command
    assert marker.exists()
    marker.unlink()

    path = write(tmp_path, data, "trainer.states")
    message = rf"^mx_adagrad\.load_trainer_states: '.*trainer\.states': .*refusing .*{SYSTEM}"
    with pytest.raises(ValueError, match=message):
        load_trainer_states(path)
    assert not marker.exists()


def test_hostile_global_nested_in_an_ndarray_is_refused(tmp_path, fake_mxnet):
    marker = tmp_path / "pwned"
    command = _RunsCommand(f"touch {shlex.quote(str(marker))}")
    states = {0: _HandleOf(fake_mxnet.ndarray_NDArray, command)}
    path = write(tmp_path, pickle.dumps((states, fake_mxnet.optimizer_AdaGrad(lr=0.1))))
    with pytest.raises(ValueError, match=rf"refusing to load the global {SYSTEM}"):
        load_trainer_states(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", r"refusing to load the global 'builtins\.eval'"),
        (b"cos\nsystem\n(S'true'\ntR.", r"refusing to load the global 'os\.system'"),
        (b"csubprocess\nPopen\n.", r"refusing to load the global 'subprocess\.Popen'"),
        (b"ccopyreg\n_reconstructor\n.", r"refusing to load the global 'copyreg\._reconstructor'"),
        (b"c__builtin__\ngetattr\n.", r"refusing to load the global '__builtin__\.getattr'"),
        (
            b"cmxnet.optimizer.optimizer\nSGD\n)\x81.",
            r"refusing to load the global 'mxnet\.optimizer\.optimizer\.SGD'",
        ),
        (
            b"cbuiltins\nbytearray\n(I1000000000000\ntR.",
            r"bytearray\(\.\.\.\) must be called with bytes",
        ),
        (
            b"cmxnet.ndarray.ndarray\nNDArray\n(I1\ntR.",
            r"NDArray\(\.\.\.\) must be called with None, as MXNet pickles it, got 1",
        ),
        (b"cmxnet.lr_scheduler\nFactorScheduler\n(I1\ntR.", r"takes no arguments"),
        (b"\x80\x02\x82\x01.", r"cannot unpickle: unregistered extension code 1"),
        (b"\x80\x04\x95", r"cannot unpickle"),
        (b"(I1\n", r"cannot unpickle"),
        (b"P1\n.", r"cannot unpickle: .*persistent"),
        (b"\x80\x04K\x01.", r"expected a pickled dict of states or \(states, optimizer\), got int"),
        (
            b"(}I1\ntp0\n.",
            r"the second item must be a pickled mxnet\.optimizer\.optimizer\.AdaGrad or",
        ),
        (
            b"(}cmxnet.lr_scheduler\nFactorScheduler\n)\x81t.",
            r"second item must be .*, got mxnet\.lr_scheduler\.FactorScheduler",
        ),
        (b"(dp0\nF1.5\nNs.", r"state keys must be int or str, got 1\.5"),
        (
            b"(dp0\nI1\nI7\ns.",
            r"the state for 1 must be an NDArray, None or a tuple of them, got int",
        ),
        (
            b"(dp0\nI1\ncmxnet.optimizer.optimizer\nAdaGrad\n)\x81s.",
            r"the state for 1: a pickled mxnet\.optimizer\.optimizer\.AdaGrad must have a dict",
        ),
        (
            b"(dp0\nI1\ncbuiltins\nbytearray\ns.",
            r"the state for 1: unexpected object of type function",
        ),
    ],
    ids=[
        "builtins.eval",
        "os.system",
        "subprocess.Popen",
        "copyreg._reconstructor",
        "__builtin__.getattr",
        "optimizer-SGD",
        "bytearray-size",
        "ndarray-args",
        "scheduler-args",
        "extension-code",
        "truncated-frame",
        "truncated-protocol-0",
        "persistent-id",
        "not-a-dict",
        "optimizer-not-an-object",
        "optimizer-is-a-scheduler",
        "float-key",
        "int-state",
        "object-without-dict",
        "class-as-state",
    ],
)
def test_load_trainer_states_refuses(tmp_path, data, message):
    path = write(tmp_path, data, "trainer.states")
    with pytest.raises(ValueError, match=r"^mx_adagrad\.load_trainer_states: '.*': .*" + message):
        load_trainer_states(path)


@pytest.mark.parametrize(
    ("handle", "message"),
    [
        (
            None,
            r"the state for 0: a pickled NDArray must have the state \{'handle': bytearray\}, "
            r"got 'handle': NoneType",
        ),
        (
            struct.pack("<Ii", V2, 1)
            + shape_bytes((2, 2))
            + shape_bytes((6, 2))
            + struct.pack("<iiiii", 1, 0, 0, 6, 1)
            + struct.pack("<q", 2)
            + bytes(16 + 16),
            r"the state for 0 is a row_sparse NDArray \(float32, shape \(6, 2\)\)",
        ),
        (
            record(np.zeros(3, np.float32)) + b"\0",
            r"the state for 0: 1 unexpected bytes after the NDArray record",
        ),
        (record(np.zeros(3, np.float32))[:-1], r"truncated: the state for 0 \(NDArray\) data"),
    ],
    ids=["handle-none", "row_sparse", "trailing-bytes", "truncated"],
)
def test_load_trainer_states_bad_ndarrays(tmp_path, fake_mxnet, handle, message):
    ndarray = fake_mxnet.ndarray_NDArray(handle)
    path = write(tmp_path, pickle.dumps(({0: ndarray}, fake_mxnet.optimizer_AdaGrad(lr=0.1))))
    with pytest.raises(ValueError, match=message):
        load_trainer_states(path)


def test_load_trainer_states_self_referencing_state(tmp_path):
    loop = []
    loop.append(loop)
    path = write(tmp_path, pickle.dumps({0: loop}), "trainer.states")
    with pytest.raises(ValueError, match=r"nested too deeply or contain themselves"):
        load_trainer_states(path)


def test_load_trainer_states_path_argument(tmp_path):
    with pytest.raises(
        ValueError, match=r"^mx_adagrad\.load_trainer_states: path must be a str or"
    ):
        load_trainer_states(3)
    with pytest.raises(FileNotFoundError):
        load_trainer_states(tmp_path / "missing.states")
