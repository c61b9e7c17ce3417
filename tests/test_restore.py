"""mx_adagrad.mxnet_io.restore / restore_functional resume real MXNet 1.9.1 Gluon checkpoints.

Each fixture holds a checkpoint (``net.save_parameters`` + ``trainer.save_states``) and the steps
MXNet took after it, with the raw gradients it used. Resuming from the files and replaying those
gradients must give MXNet's weights and histories (relative error <= 1e-5, float32 against
float32 in another operation order). ``gluon_dense2`` pairs by the default rule; ``gluon_convbn``
(Conv2D + BatchNorm + Dense) needs ``trainer_order``. ``restore_schedulers/`` adds learning-rate
schedulers and float16 ``multi_precision`` (generator script beside the files). Checkpoints MXNet
cannot have written (MXNet 2.0's AdaGrad, multipliers, bad orders) are pickled here with stand-in
classes registered under MXNet's module names, as MXNet pickles them.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad import legacy, lr_scheduler
from mx_adagrad.mxnet_io import (
    load_params,
    load_trainer_states,
    restore,
    restore_functional,
    restore_into,
)
from tests import reference

FIXTURES = Path(__file__).parent / "fixtures"
SCHEDULERS = FIXTURES / "restore_schedulers"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mxnet_migration.py"


def within(got, want, tolerance=1e-5):
    assert reference.relative_error(got, want) <= tolerance


def gluon(case):
    """(params path, states path, steps.npz, trainer_index.json) of a gluon_* fixture."""
    folder = FIXTURES / case
    index = json.loads((folder / "trainer_index.json").read_text())
    return (
        folder / "net.params",
        folder / "trainer.states",
        np.load(folder / "steps.npz", allow_pickle=False),
        index,
    )


CONVBN_ORDER = gluon("gluon_convbn")[3]["structural_names_in_trainer_order"]
CONVBN_FULL_NAMES = {
    entry["structural_name"]: entry["full_name"]
    for entry in gluon("gluon_convbn")[3]["trainer_index"]
}
ORDERS = {
    "dense2 default": ("gluon_dense2", None),
    "convbn list": ("gluon_convbn", CONVBN_ORDER),
    "convbn mapping": ("gluon_convbn", CONVBN_FULL_NAMES),
}


def replay_optimizer_api(optimizer, weights, states, names, data, prefix=""):
    """Runs the recorded steps through ``optimizer.update`` and checks each against MXNet."""
    for step in range(1, data[f"{prefix}weights__{names[0]}"].shape[0]):
        grads = [jnp.asarray(data[f"{prefix}grads__{name}"][step - 1]) for name in names]
        optimizer.update(list(range(len(weights))), weights, grads, states)
        for weight, state, name in zip(weights, states, names):
            history = state[1] if isinstance(state, tuple) else state
            within(history, data[f"{prefix}history__{name}"][step])
            if isinstance(state, tuple):
                within(state[0], data[f"{prefix}master__{name}"][step])
                np.testing.assert_array_equal(weight, state[0].astype(weight.dtype))
                within(weight, data[f"{prefix}weights__{name}"][step], 1e-3)  # float16 storage
            else:
                within(weight, data[f"{prefix}weights__{name}"][step])
        yield step


def replay_functional(tx, params, opt_state, data, prefix=""):
    """Runs the recorded steps through the jitted ``tx.update`` and checks each against MXNet."""
    update = jax.jit(tx.update)
    names = list(params)
    for step in range(1, data[f"{prefix}weights__{names[0]}"].shape[0]):
        grads = {name: jnp.asarray(data[f"{prefix}grads__{name}"][step - 1]) for name in names}
        updates, opt_state = update(grads, opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)
        histories = optax.tree.get(opt_state, "history")
        for name in names:
            float16 = params[name].dtype == jnp.float16
            within(params[name], data[f"{prefix}weights__{name}"][step], 1e-3 if float16 else 1e-5)
            within(histories[name], data[f"{prefix}history__{name}"][step])


# --------------------------------------------------------------------------------------------
# The Gluon checkpoints: default rule (dense2), explicit order (convbn)


@pytest.mark.parametrize("order", list(ORDERS))
def test_optimizer_api_resumes_exactly(order):
    case, trainer_order = ORDERS[order]
    params_path, states_path, data, index = gluon(case)
    optimizer, weights, states, names = restore(
        params_path, states_path, trainer_order=trainer_order
    )
    trainable = [e["structural_name"] for e in index["trainer_index"] if e["state_in_file"]]
    assert names == trainable  # Trainer index order, only the parameters with a state
    for weight, state, name in zip(weights, states, names):
        np.testing.assert_array_equal(weight, data[f"weights__{name}"][0], strict=True)
        np.testing.assert_array_equal(state, data[f"history__{name}"][0], strict=True)
    assert list(replay_optimizer_api(optimizer, weights, states, names, data)) == [1, 2, 3]
    assert optimizer.num_update == 6
    assert optimizer._index_update_count == {i: 6 for i in range(len(names))}


@pytest.mark.parametrize("order", list(ORDERS))
def test_functional_api_resumes_exactly(order):
    case, trainer_order = ORDERS[order]
    params_path, states_path, data, _ = gluon(case)
    tx, params, opt_state = restore_functional(
        params_path, states_path, trainer_order=trainer_order
    )
    _, _, states, names = restore(params_path, states_path, trainer_order=trainer_order)
    assert list(params) == names
    history = opt_state[2].history
    for name, state in zip(names, states):
        np.testing.assert_array_equal(history[name], state, strict=True)
    assert int(opt_state[4].count) == 0
    replay_functional(tx, params, opt_state, data)


def test_restored_optimizer_carries_the_pickled_hyperparameters():
    optimizer, weights, states, names = restore(*gluon("gluon_dense2")[:2])
    assert type(optimizer) is legacy.AdaGrad
    assert optimizer.learning_rate == optimizer.lr == 0.1
    assert optimizer.rescale_grad == 0.25  # 1 / batch_size, set by trainer.step(4)
    assert optimizer.clip_gradient == 0.2 and optimizer.wd == 0.01
    assert optimizer.float_stable_eps == 1e-7
    assert optimizer.num_update == 3 and optimizer.begin_num_update == 0
    assert optimizer._index_update_count == {0: 3, 1: 3, 2: 3, 3: 3}
    assert optimizer.lr_scheduler is None and optimizer.multi_precision is False
    assert optimizer.lr_mult == optimizer.wd_mult == optimizer.idx2name == {}
    assert names == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert all(isinstance(w, jax.Array) and w.dtype == jnp.float32 for w in weights)
    assert all(isinstance(s, jax.Array) and s.shape == w.shape for s, w in zip(states, weights))

    optimizer, _, _, names = restore(*gluon("gluon_convbn")[:2], trainer_order=CONVBN_ORDER)
    # Trainer indices 0, 1, 4, 5, 6, 7 (2 and 3 are BatchNorm's running statistics) -> 0..5.
    assert names == ["1.beta", "1.gamma", "0.bias", "0.weight", "3.bias", "3.weight"]
    assert optimizer._index_update_count == {i: 3 for i in range(6)}
    assert optimizer.clip_gradient == 0.3


def test_convbn_default_rule_is_refused_with_the_entries():
    params_path, states_path, _, _ = gluon("gluon_convbn")
    for function in (restore, restore_functional):
        with pytest.raises(ValueError) as error:
            function(params_path, states_path)
        message = str(error.value)
        assert message.startswith("mx_adagrad.restore: ")
        assert "under the default rule (Trainer index i = the i-th sorted structural name)" in (
            message
        )
        assert "index 1 -> '0.weight': weight shape (4, 1, 3, 3), state shape (4,)" in message
        assert "index 5 -> '1.running_var': weight shape (4,), state shape (4, 1, 3, 3)" in message
        assert "index 0 " not in message and "index 4 " not in message  # shapes that agree
        assert "trainer_order=[structural names in the Trainer's index order]" in message
        assert "trainer_order={structural name: full name}" in message


def test_an_order_without_the_stateless_parameters_is_refused():
    """The Trainer's indices count BatchNorm's running statistics, which have no state."""
    params_path, states_path, _, _ = gluon("gluon_convbn")
    trainable = {k: v for k, v in CONVBN_FULL_NAMES.items() if "running" not in k}
    with pytest.raises(ValueError) as error:
        restore(params_path, states_path, trainer_order=trainable)
    message = str(error.value)
    assert "under the trainer_order given" in message
    assert "index 6: no parameter (6 names in the order)" in message
    assert "index 7: no parameter (6 names in the order)" in message


@pytest.mark.parametrize(
    "trainer_order, message",
    [
        ("0.weight", r"trainer_order must be None, a list of structural names"),
        (["0.weight", "2.weight"], r"every name in trainer_order must be a name in the \.params"),
        (["0.weight", "0.weight"], r"every name in trainer_order must be listed once, got 0\.w"),
        ({"0.weight": "a", "0.bias": "a"}, r"the full names \(values\) of trainer_order must be"),
        ({"0.weight": 1}, r"the full names \(values\) of trainer_order must be distinct strings"),
    ],
)
def test_bad_trainer_order(trainer_order, message):
    with pytest.raises(ValueError, match=r"^mx_adagrad\.restore: " + message):
        restore(*gluon("gluon_dense2")[:2], trainer_order=trainer_order)


def test_files_restore_cannot_read():
    states_path = gluon("gluon_dense2")[1]
    with pytest.raises(ValueError, match=r"params_path must be a \.params file with names"):
        restore(FIXTURES / "mx1_params_list.params", states_path)


# --------------------------------------------------------------------------------------------
# Learning-rate schedulers and multi_precision (tests/fixtures/restore_schedulers)

STEPS = np.load(SCHEDULERS / "steps.npz", allow_pickle=False)
CASES = json.loads(str(STEPS["config_json"]))["cases"]
REPRODUCIBLE = [case for case, spec in CASES.items() if spec["reproducible"]]


def scheduler_files(case):
    return SCHEDULERS / f"{case}.params", SCHEDULERS / f"{case}.states"


@pytest.mark.parametrize("case", REPRODUCIBLE)
def test_scheduler_continues_as_mxnet(case):
    spec = CASES[case]
    optimizer, weights, states, names = restore(*scheduler_files(case))
    assert type(optimizer.lr_scheduler).__name__ == spec["scheduler"]
    assert optimizer.num_update == spec["pre"] + spec["optimizer"].get("begin_num_update", 0)
    prefix = f"{case}__"
    for step in replay_optimizer_api(optimizer, weights, states, names, STEPS, prefix):
        assert optimizer.num_update == STEPS[f"{prefix}num_update"][step - 1]
        assert optimizer.learning_rate == STEPS[f"{prefix}lr"][step - 1]  # float64, bit for bit
    tx, params, opt_state = restore_functional(*scheduler_files(case))
    replay_functional(tx, params, opt_state, STEPS, prefix)


def test_scheduler_conversions():
    factor = restore(*scheduler_files("factor_override"))[0].lr_scheduler
    # MXNet's optimizer assigned learning_rate=0.3 to base_lr; warmup still ends at the
    # constructor's 0.2, as in MXNet.
    assert repr(factor) == (
        "FactorScheduler(step=3, factor=0.5, stop_factor_lr=0.02, base_lr=0.2, warmup_steps=2, "
        "warmup_begin_lr=0.05, warmup_mode='linear').with_base_lr(0.3)"
    )
    poly = restore(*scheduler_files("poly_warmup"))[0].lr_scheduler
    assert repr(poly) == (
        "PolyScheduler(max_update=8, base_lr=0.1, pwr=2.0, final_lr=0.01, warmup_steps=2, "
        "warmup_begin_lr=0.02, warmup_mode='constant')"
    )


def test_float16_multi_precision_states():
    optimizer, weights, states, _ = restore(*scheduler_files("factor_float16"))
    assert optimizer.multi_precision is True
    for weight, (master, history) in zip(weights, states):
        assert weight.dtype == jnp.float16 and master.dtype == history.dtype == jnp.float32
    _, params, opt_state = restore_functional(*scheduler_files("factor_float16"))
    assert isinstance(opt_state, mx_adagrad.MultiPrecisionState)
    for (master, history), name in zip(states, params):
        np.testing.assert_array_equal(opt_state.master[name], master, strict=True)
        np.testing.assert_array_equal(opt_state.inner_state[2].history[name], history, strict=True)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "factor_ahead",
            r"FactorScheduler cannot be continued exactly by mx_adagrad\.lr_scheduler\."
            r"FactorScheduler: its count \(18\) is ahead of the update count .* MXNet keeps "
            r"0\.0001953125 through update 20, where the schedule from base_lr 0\.1 gives 0\.05 "
            r"at update 4",
        ),
        (
            "poly_fresh_past_end",
            r"PolyScheduler cannot be continued exactly by mx_adagrad\.lr_scheduler\."
            r"PolyScheduler: the updates go on past max_update \(3\), where MXNet keeps returning "
            r"the last value it computed, 0\.1; the schedule holds its value at max_update, 0\.01",
        ),
    ],
)
def test_scheduler_states_that_cannot_be_continued(case, message):
    # What MXNet did after these checkpoints, which no function of num_update reproduces:
    assert set(STEPS[f"{case}__lr"]) == {0.0001953125 if case == "factor_ahead" else 0.1}
    for function in (restore, restore_functional):
        with pytest.raises(ValueError, match=message):
            function(*scheduler_files(case))


# --------------------------------------------------------------------------------------------
# Checkpoints pickled with stand-ins for MXNet's classes


def record(array):
    """One dense NDArray record (V2), as MXNet's ``NDArray::Save`` writes it."""
    array = np.ascontiguousarray(array)
    flag = {"float32": 0, "float16": 2}[array.dtype.name]
    head = struct.pack("<Ii", 0xF993FAC9, 0)
    head += struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape)
    return head + struct.pack("<iii", 1, 0, flag) + array.tobytes()


class _NDArray:
    def __init__(self, array):
        self.handle = bytearray(record(array))

    def __reduce__(self):
        return type(self), (None,), {"handle": self.handle}


class _Attributes:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@pytest.fixture
def write_states(monkeypatch, tmp_path):
    """``write_states(states, optimizer_class, **attributes)``: a trainer.states file."""
    classes = {}
    for qualified, base in (
        ("mxnet.ndarray.ndarray.NDArray", _NDArray),
        ("mxnet.optimizer.optimizer.AdaGrad", _Attributes),
        ("mxnet.optimizer.adagrad.AdaGrad", _Attributes),
        ("mxnet.lr_scheduler.FactorScheduler", _Attributes),
        ("mxnet.lr_scheduler.LRScheduler", _Attributes),
    ):
        module_name, name = qualified.rsplit(".", 1)
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) not in classes:
                module = types.ModuleType(".".join(parts[:i]))
                monkeypatch.setitem(sys.modules, module.__name__, module)
                classes[module.__name__] = module
        cls = type(name, (base,), {"__module__": module_name, "__qualname__": name})
        setattr(classes[module_name], name, cls)
        classes[qualified] = cls

    def write(states, optimizer_class, **attributes):
        pickled = {
            key: tuple(classes["mxnet.ndarray.ndarray.NDArray"](a) for a in value)
            if isinstance(value, tuple)
            else classes["mxnet.ndarray.ndarray.NDArray"](value)
            for key, value in states.items()
        }
        for key, value in attributes.items():
            if isinstance(value, dict) and "class" in value:
                spec = dict(value)
                attributes[key] = classes[spec.pop("class")](**spec)
        optimizer = None if optimizer_class is None else classes[optimizer_class](**attributes)
        path = tmp_path / "trainer.states"
        payload = pickled if optimizer is None else (pickled, optimizer)
        path.write_bytes(pickle.dumps(payload, protocol=4))
        return path

    return write


def dense2_attributes(**changes):
    """The pickled attributes of gluon_dense2's optimizer, with ``changes``."""
    _, info = load_trainer_states(gluon("gluon_dense2")[1])
    return {k: v for k, v in info.items() if k != "class"} | changes


def test_the_stand_in_pickles_load_as_the_fixture(write_states):
    states_path = gluon("gluon_dense2")[1]
    states, _ = load_trainer_states(states_path)
    path = write_states(states, "mxnet.optimizer.optimizer.AdaGrad", **dense2_attributes())
    assert load_trainer_states(path)[1] == load_trainer_states(states_path)[1]


def test_mxnet2_adagrad_becomes_mx_adagrad_adagrad(write_states):
    """MXNet 2.0's class: epsilon outside the root, decay in the history (the 2.0 formula)."""
    params_path, states_path, data, _ = gluon("gluon_dense2")
    states, _ = load_trainer_states(states_path)
    attributes = dense2_attributes(epsilon=1e-6, lr_mult={3: 0.5})
    del attributes["float_stable_eps"]
    path = write_states(states, "mxnet.optimizer.adagrad.AdaGrad", **attributes)
    optimizer, weights, opt_states, names = restore(params_path, path)
    assert type(optimizer) is mx_adagrad.AdaGrad and optimizer.epsilon == 1e-6
    tx, params, opt_state = restore_functional(params_path, path)
    update = jax.jit(tx.update)
    want = {name: (data[f"weights__{name}"][0], states[i]) for i, name in enumerate(names)}
    for step in range(3):
        grads = [jnp.asarray(data[f"grads__{name}"][step]) for name in names]
        optimizer.update(list(range(4)), weights, grads, opt_states)
        updates, opt_state = update(dict(zip(names, grads)), opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)
        for i, name in enumerate(names):
            weight, history = reference.mxnet2_step(
                want[name][0],
                data[f"grads__{name}"][step],
                want[name][1],
                lr=0.1 * (0.5 if name == "1.weight" else 1.0),
                rescale_grad=0.25,
                clip_gradient=0.2,
                wd=0.01,
            )
            want[name] = (weight, history)
            within(weights[i], weight)
            within(opt_states[i], history)
            within(params[name], weight)


def test_multipliers_and_idx2name_are_keyed_by_position(write_states):
    params_path, states_path, _, _ = gluon("gluon_convbn")
    file_states, _ = load_trainer_states(states_path)
    idx2name = {i: CONVBN_FULL_NAMES[name] for i, name in enumerate(CONVBN_ORDER)}
    attributes = dense2_attributes(
        idx2name=idx2name,
        # Index 7 (dense0_weight) by index; conv0_weight by name; index 2 has no state.
        lr_mult={7: 0.5, "conv0_weight": 2.0, 2: 9.0},
        wd_mult={"batchnorm0_beta": 0.0, 6: 3.0},
        _index_update_count={i: 3 for i in file_states},
    )
    path = write_states(file_states, "mxnet.optimizer.optimizer.AdaGrad", **attributes)
    optimizer, _, _, names = restore(params_path, path, trainer_order=CONVBN_ORDER)
    assert names == ["1.beta", "1.gamma", "0.bias", "0.weight", "3.bias", "3.weight"]
    assert optimizer.idx2name == {i: idx2name[j] for i, j in enumerate((0, 1, 4, 5, 6, 7))}
    assert optimizer.lr_mult == {5: 0.5, "conv0_weight": 2.0}
    assert optimizer.wd_mult == {"batchnorm0_beta": 0.0, 4: 3.0}
    assert [optimizer._get_lr(i) for i in range(6)] == [0.1, 0.1, 0.1, 0.2, 0.1, 0.05]
    assert [optimizer._get_wd(i) for i in range(6)] == [0.0, 0.01, 0.01, 0.01, 0.03, 0.01]

    tx, params, opt_state = restore_functional(params_path, path, trainer_order=CONVBN_ORDER)
    grads = {name: jnp.ones_like(p) for name, p in params.items()}
    updates, _ = tx.update(grads, opt_state, params)
    optimizer, weights, states, _ = restore(params_path, path, trainer_order=CONVBN_ORDER)
    optimizer.update(list(range(6)), weights, [grads[n] for n in names], states)
    for name, weight in zip(names, weights):
        within(mx_adagrad.apply_updates(params, updates)[name], weight)

    attributes["lr_mult"] = {8: 0.5}
    path = write_states(file_states, "mxnet.optimizer.optimizer.AdaGrad", **attributes)
    with pytest.raises(ValueError, match=r"pickled lr_mult has an entry for Trainer index 8, but"):
        restore(params_path, path, trainer_order=CONVBN_ORDER)


def test_functional_refuses_unequal_counts_with_a_scheduler(write_states):
    params_path, states_path, _, _ = gluon("gluon_dense2")
    states, _ = load_trainer_states(states_path)
    scheduler = {
        "class": "mxnet.lr_scheduler.FactorScheduler",
        "base_lr": 0.1,
        "warmup_steps": 0,
        "warmup_final_lr": 0.1,
        "warmup_begin_lr": 0,
        "warmup_mode": "linear",
        "step": 10,
        "factor": 0.5,
        "stop_factor_lr": 1e-8,
        "count": 0,
    }
    counts = {0: 3, 1: 3, 2: 2, 3: 3}
    path = write_states(
        states,
        "mxnet.optimizer.optimizer.AdaGrad",
        **dense2_attributes(lr=None, lr_scheduler=scheduler, _index_update_count=counts),
    )
    optimizer = restore(params_path, path)[0]
    assert optimizer._index_update_count == counts
    assert isinstance(optimizer.lr_scheduler, lr_scheduler.FactorScheduler)
    with pytest.raises(ValueError, match=r"update count of every parameter must be .*'1\.bias': 2"):
        restore_functional(params_path, path)


def test_base_scheduler_and_missing_optimizer_are_refused(write_states):
    params_path, states_path, _, _ = gluon("gluon_dense2")
    states, _ = load_trainer_states(states_path)
    base = {"class": "mxnet.lr_scheduler.LRScheduler", "base_lr": 0.1}
    path = write_states(
        states, "mxnet.optimizer.optimizer.AdaGrad", **dense2_attributes(lr_scheduler=base)
    )
    with pytest.raises(ValueError, match=r"MXNet's base class .* which has no schedule"):
        restore(params_path, path)
    path = write_states(states, None)
    with pytest.raises(ValueError, match=r"states_path must be a trainer\.states file that holds"):
        restore(params_path, path)
    attributes = dense2_attributes()
    del attributes["float_stable_eps"]
    path = write_states(states, "mxnet.optimizer.optimizer.AdaGrad", **attributes)
    with pytest.raises(ValueError, match=r"has no attribute float_stable_eps"):
        restore(params_path, path)


def test_states_that_are_not_adagrad_states(write_states):
    params_path, states_path, _, _ = gluon("gluon_dense2")
    states, _ = load_trainer_states(states_path)
    states[1] = (states[1], states[1], states[1])
    path = write_states(states, "mxnet.optimizer.optimizer.AdaGrad", **dense2_attributes())
    with pytest.raises(ValueError, match=r"the state of Trainer index 1 must be an AdaGrad"):
        restore(params_path, path)


def test_functional_refuses_masters_multi_precision_would_not_keep(write_states):
    """A float32 weight with a (master, history) pair: the Optimizer API takes it as it is."""
    params_path, states_path, _, _ = gluon("gluon_dense2")
    states, _ = load_trainer_states(states_path)
    states[0] = (load_params(params_path)["0.bias"], states[0])
    path = write_states(
        states, "mxnet.optimizer.optimizer.AdaGrad", **dense2_attributes(multi_precision=True)
    )
    assert isinstance(restore(params_path, path)[2][0], tuple)
    with pytest.raises(ValueError, match=r"'0\.bias' \(float32, with a master copy\)"):
        restore_functional(params_path, path)


def test_restore_into_rekeys_multipliers_to_paths(write_states):
    """lr_mult / wd_mult of the checkpoint follow their parameters to the target's paths."""
    params_path, states_path, _, _ = gluon("gluon_convbn")
    file_states, _ = load_trainer_states(states_path)
    attributes = dense2_attributes(
        lr_mult={7: 0.5, 5: 2.0}, wd_mult={6: 3.0}, _index_update_count={i: 3 for i in file_states}
    )
    path = write_states(file_states, "mxnet.optimizer.optimizer.AdaGrad", **attributes)

    def f32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    target = {
        "conv": {"kernel": f32(3, 3, 1, 4), "bias": f32(4)},
        "bn": {"scale": f32(4), "bias": f32(4)},
        "head": {"kernel": f32(64, 3), "bias": f32(3)},
    }
    name_map = {
        "0.weight": "conv/kernel",
        "0.bias": "conv/bias",
        "1.gamma": "bn/scale",
        "1.beta": "bn/bias",
        "3.weight": "head/kernel",
        "3.bias": "head/bias",
    }
    tx, params, opt_state = restore_into(
        params_path, path, target, name_map=name_map, trainer_order=CONVBN_ORDER
    )
    assert opt_state[4].count == 0
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = mx_adagrad.apply_updates(params, updates)

    tx_f, params_f, state_f = restore_functional(params_path, path, trainer_order=CONVBN_ORDER)
    updates_f, _ = tx_f.update(jax.tree.map(jnp.ones_like, params_f), state_f, params_f)
    want = mx_adagrad.apply_updates(params_f, updates_f)
    np.testing.assert_array_equal(new["head"]["kernel"], np.asarray(want["3.weight"]).T)
    np.testing.assert_array_equal(
        new["conv"]["kernel"], np.transpose(want["0.weight"], (2, 3, 1, 0))
    )
    for gluon_name, target_path in name_map.items():
        layer, leaf = target_path.split("/")
        if leaf in ("bias", "scale"):
            np.testing.assert_array_equal(new[layer][leaf], want[gluon_name])


# --------------------------------------------------------------------------------------------
# examples/mxnet_migration.py


def test_migration_example():
    spec = importlib.util.spec_from_file_location("example_mxnet_migration", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main([])
    assert results["recorded/optimizer"] <= 1e-6 and results["recorded/functional"] <= 1e-6
    assert results["jax/optimizer"] <= 1e-5 and results["jax/functional"] <= 1e-5
    assert results["jax/gradients"] <= 1e-5
    assert results["jax/conv_bias"] <= 1e-3 and results["jax/running"] <= 1e-3
    # The Flax NNX model: forward within 1e-5, 3 steps on its own gradients within 1e-4 (as
    # tests/test_mxnet_models.py, which explains both bounds).
    assert results["nnx/forward"] <= 1e-5
    assert results["nnx/weights"] <= 1e-4 and results["nnx/history"] <= 1e-4
