"""mx_adagrad.mxnet_io.to_jax / restore_into: the layout rules, the pairing and every refusal.

Targets here are plain pytrees (dicts of arrays or ``jax.ShapeDtypeStruct`` s laid out as Flax and
Haiku lay them out); tests/test_mxnet_models.py runs real Flax NNX and Haiku models on the MXNet
fixtures. The layout rules are checked against JAX's own convolution with MXNet's layout
(``lax.conv_general_dilated`` with ``OIHW``-style dimension numbers), not against the code's
permutations.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mx_adagrad
from mx_adagrad.mxnet_io import load_params, restore_into, to_jax
from tests import reference

FIXTURES = Path(__file__).parent / "fixtures"
MIGRATION = FIXTURES / "gluon_migration"
SCHEDULERS = FIXTURES / "restore_schedulers"
CONFIG = json.loads(str(np.load(MIGRATION / "steps.npz")["config_json"]))["cases"]


def sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def within(got, want, tolerance=1e-5):
    assert reference.relative_error(got, want) <= tolerance


# The conv_pool fixture: Conv2D(4, 3, no bias) + BatchNorm + relu + MaxPool + Flatten + Dense(3).
CONV = {name: array for name, array in load_params(MIGRATION / "conv_pool_mx1.params").items()}
FLAX_CONV = {
    "conv": {"kernel": sds((3, 3, 2, 4))},
    "bn": {"scale": sds((4,)), "bias": sds((4,)), "mean": sds((4,)), "var": sds((4,))},
    "head": {"kernel": sds((36, 3)), "bias": sds((3,))},
}
FLAX_CONV_MAP = {
    "0.weight": "conv/kernel",
    "1.gamma": "bn/scale",
    "1.beta": "bn/bias",
    "1.running_mean": "bn/mean",
    "1.running_var": "bn/var",
    "5.weight": "head/kernel",
    "5.bias": "head/bias",
}


def message_of(error):
    return str(error.value)


# --------------------------------------------------------------------------------------------
# The rules


def test_dense_conv_and_norm_layouts():
    converted = to_jax(CONV, FLAX_CONV, name_map=FLAX_CONV_MAP)
    np.testing.assert_array_equal(converted["head"]["kernel"], CONV["5.weight"].T)
    np.testing.assert_array_equal(
        converted["conv"]["kernel"], np.transpose(CONV["0.weight"], (2, 3, 1, 0))
    )
    for gluon, path in FLAX_CONV_MAP.items():
        layer, leaf = path.split("/")
        assert converted[layer][leaf].dtype == jnp.float32
        assert isinstance(converted[layer][leaf], jax.Array)
        if leaf in ("scale", "bias", "mean", "var"):
            np.testing.assert_array_equal(converted[layer][leaf], CONV[gluon])


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_conv_kernels_compute_mxnets_convolution(spatial):
    """The converted kernel in channels-last layout gives the convolution of the Gluon weight."""
    rng = np.random.default_rng(spatial)
    weight = rng.standard_normal((5, 3, *range(2, 2 + spatial))).astype(np.float32)
    x = rng.standard_normal((2, 3, *(7,) * spatial)).astype(np.float32)
    letters = "DHW"[-spatial:]
    mxnet = jax.lax.conv_general_dilated(
        x,
        weight,
        (1,) * spatial,
        "VALID",
        dimension_numbers=(f"NC{letters}", f"OI{letters}", f"NC{letters}"),
    )
    kernel = to_jax({"0.weight": weight}, {"conv": {"kernel": sds((*weight.shape[2:], 3, 5))}})
    jax_layout = jax.lax.conv_general_dilated(
        np.moveaxis(x, 1, -1),
        kernel["conv"]["kernel"],
        (1,) * spatial,
        "VALID",
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
    )
    np.testing.assert_allclose(np.moveaxis(jax_layout, -1, 1), mxnet, rtol=1e-6, atol=1e-6)


def test_embedding_and_haiku_names():
    rng = np.random.default_rng(0)
    arrays = {
        "0.weight": rng.standard_normal((20, 4)).astype(np.float32),
        "1.gamma": rng.standard_normal(4).astype(np.float32),
        "1.beta": rng.standard_normal(4).astype(np.float32),
        "2.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "2.bias": rng.standard_normal(3).astype(np.float32),
    }
    target = {
        "embed": {"embeddings": sds((20, 4))},
        "batch_norm": {"scale": sds((1, 1, 1, 4)), "offset": sds((1, 1, 1, 4))},
        "linear": {"w": sds((4, 3)), "b": sds((3,))},
    }
    name_map = {
        "0.weight": "embed/embeddings",
        "1.gamma": "batch_norm/scale",
        "1.beta": "batch_norm/offset",
        "2.weight": "linear/w",
        "2.bias": "linear/b",
    }
    converted = to_jax(arrays, target, name_map=name_map)
    np.testing.assert_array_equal(converted["embed"]["embeddings"], arrays["0.weight"])
    np.testing.assert_array_equal(converted["batch_norm"]["scale"][0, 0, 0], arrays["1.gamma"])
    np.testing.assert_array_equal(converted["batch_norm"]["offset"][0, 0, 0], arrays["1.beta"])
    np.testing.assert_array_equal(converted["linear"]["w"], arrays["2.weight"].T)
    np.testing.assert_array_equal(converted["linear"]["b"], arrays["2.bias"])


def test_other_names_with_equal_shapes_are_unchanged():
    """Equinox's Linear keeps (out, in) under the name weight: the Gluon layout itself."""
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    converted = to_jax({"0.weight": weight}, {"linear": {"weight": sds((3, 2))}})
    np.testing.assert_array_equal(converted["linear"]["weight"], weight)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float64])
def test_leaves_take_the_targets_dtype(dtype):
    weight = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
    with jax.enable_x64(dtype == jnp.float64):
        converted = to_jax({"0.weight": weight}, {"dense": {"kernel": sds((2, 3), dtype)}})
        assert converted["dense"]["kernel"].dtype == dtype
        np.testing.assert_array_equal(converted["dense"]["kernel"], weight.T.astype(dtype))


def test_sharding_and_kept_leaves():
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = {
        "dense": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=sharding)},
        "head": {"kernel": jnp.full((3, 1), 7.0), "bias": jnp.zeros(1)},
    }
    converted = to_jax({"0.weight": np.ones((3, 2), np.float32)}, target, keep=["head"])
    assert converted["dense"]["kernel"].sharding == sharding
    assert converted["head"]["kernel"] is target["head"]["kernel"]
    assert converted["head"]["bias"] is target["head"]["bias"]


# --------------------------------------------------------------------------------------------
# Pairing by order


def test_by_order_for_numbered_layers():
    arrays = load_params(MIGRATION / "embed_dense_mx1.params")
    for layers in ({0: "", 2: "", 4: ""}, {"layers_0": "", "layers_1": "", "layers_2": ""}):
        first, second, third = layers
        target = {
            first: {"embedding": sds((20, 4))},
            second: {"kernel": sds((12, 8)), "bias": sds((8,))},
            third: {"kernel": sds((8, 3)), "bias": sds((3,))},
        }
        converted = to_jax(arrays, {"layers": target})
        np.testing.assert_array_equal(converted["layers"][first]["embedding"], arrays["0.weight"])
        np.testing.assert_array_equal(converted["layers"][second]["kernel"], arrays["1.weight"].T)
        np.testing.assert_array_equal(converted["layers"][third]["bias"], arrays["2.bias"])
    # Haiku's names for one module type: linear, linear_1 (ordered by number, not as strings).
    dense = {
        "linear_1": {"w": sds((8, 3)), "b": sds((3,))},
        "linear": {"w": sds((12, 8)), "b": sds((8,))},
    }
    converted = to_jax({k: v for k, v in arrays.items() if k != "0.weight"}, dense)
    np.testing.assert_array_equal(converted["linear"]["w"], arrays["1.weight"].T)
    np.testing.assert_array_equal(converted["linear_1"]["w"], arrays["2.weight"].T)


def test_by_order_skips_statistics_for_a_parameters_only_target():
    target = {
        "layers": {
            0: {"kernel": sds((3, 3, 2, 4))},
            1: {"scale": sds((4,)), "bias": sds((4,))},
            5: {"kernel": sds((36, 3)), "bias": sds((3,))},
        }
    }
    converted = to_jax(CONV, target)
    np.testing.assert_array_equal(converted["layers"][1]["scale"], CONV["1.gamma"])
    np.testing.assert_array_equal(converted["layers"][5]["kernel"], CONV["5.weight"].T)
    target["layers"][1] |= {"mean": sds((4,)), "var": sds((4,))}
    np.testing.assert_array_equal(to_jax(CONV, target)["layers"][1]["var"], CONV["1.running_var"])


def test_by_order_refusals():
    with pytest.raises(ValueError) as error:
        to_jax(CONV, FLAX_CONV)  # named attributes: nnx sorts them (bn, conv, head)
    assert message_of(error).startswith("mx_adagrad.to_jax: the target's layers (name_map=None")
    assert "got 'bn', 'conv', 'head'" in message_of(error)
    assert "pass name_map={gluon name: path in target}" in message_of(error)

    two = {"layers": {0: {"kernel": sds((3, 3, 2, 4))}, 1: {"scale": sds((4,)), "bias": sds((4,))}}}
    with pytest.raises(
        ValueError,
        match=r"must be as many as the Gluon layers with arrays \(3: '0', '1', '5'\).*got 2: 'layers/0', 'layers/1'",
    ):
        to_jax(CONV, two)

    no_bias = {
        "layers": {0: {"kernel": sds((12, 8))}, 1: {"kernel": sds((8, 3)), "bias": sds((3,))}}
    }
    arrays = {
        k: v
        for k, v in load_params(MIGRATION / "embed_dense_mx1.params").items()
        if k != "0.weight"
    }
    with pytest.raises(
        ValueError,
        match=r"every Gluon array of the layer '1' \(paired by order with the target layer 'layers/0'\) must be the source of a leaf .*no place for '1\.bias'",
    ):
        to_jax(arrays, no_bias)

    as_strings = {f"{i}.weight": np.ones((2, 2), np.float32) for i in (0, 1, 10, 2)}
    numbered = {"layers": {i: {"kernel": sds((2, 2))} for i in range(4)}}
    with pytest.raises(
        ValueError,
        match=r"Gluon layers of arrays .* must be in the order of the file .*got 0, 1, 10, 2",
    ):
        to_jax(as_strings, numbered)


# --------------------------------------------------------------------------------------------
# Every bad name_map entry is refused, naming the Gluon name and the path


def refused(name_map, target=FLAX_CONV, keep=()):
    with pytest.raises(ValueError) as error:
        to_jax(CONV, target, name_map=name_map, keep=keep)
    message = message_of(error)
    assert message.startswith("mx_adagrad.to_jax: ")
    return message


def test_a_gluon_name_not_in_arrays():
    name_map = {k: v for k, v in FLAX_CONV_MAP.items() if k != "5.weight"}
    message = refused(name_map | {"9.weight": "head/kernel"})
    assert (
        "name_map['9.weight'] = 'head/kernel' must have a Gluon name in arrays ('0.weight', '1.gamma',"
        in message
    )
    assert message.endswith("got '9.weight'")


def test_a_path_not_in_target():
    message = refused(FLAX_CONV_MAP | {"5.weight": "head/kernal"})
    assert (
        "name_map['5.weight'] = 'head/kernal' must have the path of a leaf of target ('bn/bias',"
        in message
    )
    assert "got 'head/kernal'" in message
    # ... and the leaf it should have filled is reported as unmapped.
    assert (
        "target leaf 'head/kernel' must be the place of a Gluon array (name_map) or be listed in keep, got no entry"
        in message
    )


def test_a_target_leaf_no_name_maps_to():
    name_map = {k: v for k, v in FLAX_CONV_MAP.items() if k != "5.bias"}
    message = refused(name_map)
    assert message == (
        "mx_adagrad.to_jax: target leaf 'head/bias' must be the place of a Gluon array (name_map) "
        "or be listed in keep, got no entry"
    )
    kept = to_jax(
        CONV,
        FLAX_CONV | {"head": {"kernel": sds((36, 3)), "bias": jnp.ones(3)}},
        name_map=name_map,
        keep=["head/bias"],
    )
    np.testing.assert_array_equal(kept["head"]["bias"], np.ones(3))


def test_a_shape_no_rule_turns_into_the_targets():
    transposed = FLAX_CONV | {"head": {"kernel": sds((3, 36)), "bias": sds((3,))}}
    message = refused(FLAX_CONV_MAP, transposed)
    assert message == (
        "mx_adagrad.to_jax: name_map['5.weight'] = 'head/kernel' must convert to the target's "
        "shape (3, 36) after the rule Dense (out, in) -> (in, out), got Gluon shape (3, 36), "
        "which the rule turns into (36, 3)"
    )
    oihw = FLAX_CONV | {"conv": {"kernel": sds((4, 2, 3, 3))}}
    message = refused(FLAX_CONV_MAP, oihw)
    assert (
        "name_map['0.weight'] = 'conv/kernel' must convert to the target's shape (4, 2, 3, 3) after the rule Conv2D (O, I, *spatial) -> (*spatial, I, O), got Gluon shape (4, 2, 3, 3), which the rule turns into (3, 3, 2, 4)"
        in message
    )
    wrong_channels = FLAX_CONV | {"bn": {**FLAX_CONV["bn"], "scale": sds((1, 5))}}
    message = refused(FLAX_CONV_MAP, wrong_channels)
    assert (
        "name_map['1.gamma'] = 'bn/scale' must convert to the target's shape (1, 5) up to dimensions of size 1 (same values, reshaped), got Gluon shape (4,)"
        in message
    )
    other = {"mystery": sds((2, 2))}
    with pytest.raises(
        ValueError,
        match=r"name_map\['1\.gamma'\] = 'mystery' must convert to the target's shape \(2, 2\) after the rule unchanged, got Gluon shape \(4,\)$",
    ):
        to_jax(CONV, other, name_map={"1.gamma": "mystery"})


def test_an_array_that_is_neither_dense_nor_conv_for_a_kernel():
    with pytest.raises(ValueError) as error:
        to_jax(
            {"0.alpha": np.ones(3, np.float32)},
            {"k": {"kernel": sds((3,))}},
            name_map={"0.alpha": "k/kernel"},
        )
    assert message_of(error) == (
        "mx_adagrad.to_jax: name_map['0.alpha'] = 'k/kernel' must be a Dense weight (out, in) or "
        "a Conv1D/2D/3D weight (O, I, *spatial) to go to a kernel, got Gluon shape (3,)"
    )


def test_a_parameter_sent_to_a_leaf_of_another_kind():
    message = refused(FLAX_CONV_MAP | {"1.gamma": "bn/bias", "1.beta": "bn/scale"})
    assert (
        "name_map['1.gamma'] = 'bn/bias' must go to a leaf named scale (the place of a Gluon gamma), got a leaf named bias"
        in message
    )
    assert (
        "name_map['1.beta'] = 'bn/scale' must go to a leaf named bias or b or offset (the place of a Gluon beta), got a leaf named scale"
        in message
    )


def test_a_path_given_twice_or_kept():
    message = refused(FLAX_CONV_MAP | {"1.running_mean": "bn/var"})
    assert (
        "name_map['1.running_var'] = 'bn/var' must have a path no other entry has, got 'bn/var' (also name_map['1.running_mean'])"
        in message
    )
    message = refused(FLAX_CONV_MAP, keep=["bn/mean"])
    assert (
        "name_map['1.running_mean'] = 'bn/mean' must have a path that keep does not list, got 'bn/mean'"
        in message
    )


def test_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"^mx_adagrad\.to_jax: every entry of keep must be the path of a leaf or subtree of target .*got 'nowhere'$",
    ):
        to_jax(CONV, FLAX_CONV, name_map=FLAX_CONV_MAP, keep=["nowhere"])
    with pytest.raises(
        ValueError,
        match=r"^mx_adagrad\.to_jax: keep must be a sequence of paths in target, got 'bn'$",
    ):
        to_jax(CONV, FLAX_CONV, name_map=FLAX_CONV_MAP, keep="bn")
    with pytest.raises(
        ValueError,
        match=r"target leaf 'head/bias' must hold an array to stay as it is \(keep\), got a jax\.ShapeDtypeStruct",
    ):
        to_jax(
            CONV,
            FLAX_CONV,
            name_map={k: v for k, v in FLAX_CONV_MAP.items() if k != "5.bias"},
            keep=["head/bias"],
        )
    with pytest.raises(
        ValueError, match=r"^mx_adagrad\.to_jax: arrays must be a dict \{gluon name: array\}"
    ):
        to_jax(list(CONV.values()), FLAX_CONV, name_map=FLAX_CONV_MAP)
    with pytest.raises(ValueError, match=r"^mx_adagrad\.to_jax: name_map must be None or a dict"):
        to_jax(CONV, FLAX_CONV, name_map=[("0.weight", "conv/kernel")])
    with pytest.raises(
        ValueError,
        match=r"^mx_adagrad\.to_jax: target leaf 'conv/kernel' must be an array or a jax\.ShapeDtypeStruct",
    ):
        to_jax(CONV, {"conv": {"kernel": "w"}}, name_map={"0.weight": "conv/kernel"})


def test_a_bare_array_is_not_a_target():
    with pytest.raises(
        ValueError,
        match=r"^mx_adagrad\.to_jax: target leaf '' must be an array or a jax\.ShapeDtypeStruct in a pytree of them",
    ):
        to_jax(CONV, jnp.ones(3))


def test_an_nnx_state_with_variables_is_refused_with_the_fix():
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"an nnx\.State holds Variables: pass nnx\.to_pure_dict\(nnx\.state\(model\)\)",
    ):
        to_jax({"0.weight": np.ones((3, 2), np.float32)}, nnx.state(model))


# --------------------------------------------------------------------------------------------
# restore_into: the optimizer state follows its weight


def test_restore_into_refuses_parameters_without_a_state():
    case = "conv_pool_mx1"
    with pytest.raises(ValueError) as error:
        restore_into(
            MIGRATION / f"{case}.params",
            MIGRATION / f"{case}.states",
            FLAX_CONV,
            name_map=FLAX_CONV_MAP,
            trainer_order=CONFIG[case]["trainer_order"],
        )
    message = message_of(error)
    assert message.startswith(
        "mx_adagrad.restore_into: name_map['1.running_mean'] = 'bn/mean' must have a Gluon parameter the Trainer trained (one with a state in trainer.states: '1.beta', '1.gamma', '0.weight', '5.bias', '5.weight'), got '1.running_mean', which has none (load it with to_jax)"
    )
    assert "name_map['1.running_var'] = 'bn/var'" in message


def test_restore_into_converts_histories_and_masters_of_multi_precision():
    """float16 weights with float32 masters (MXNet 1.9.1, multi_precision, FactorScheduler)."""
    case = "factor_float16"
    paths = SCHEDULERS / f"{case}.params", SCHEDULERS / f"{case}.states"
    data = np.load(SCHEDULERS / "steps.npz", allow_pickle=False)
    target = {
        "layers": {
            0: {"kernel": sds((4, 3), jnp.float16), "bias": sds((3,), jnp.float16)},
            1: {"kernel": sds((3, 2), jnp.float16), "bias": sds((2,), jnp.float16)},
        }
    }
    tx, params, opt_state = restore_into(*paths, target)
    assert isinstance(opt_state, mx_adagrad.MultiPrecisionState)

    def gluon(array, name):
        return np.asarray(array).T if name.endswith("weight") else np.asarray(array)

    def leaf(tree, name):
        layer, kind = name.split(".")
        return tree["layers"][int(layer)]["kernel" if kind == "weight" else "bias"]

    names = ["0.bias", "0.weight", "1.bias", "1.weight"]
    for name in names:
        np.testing.assert_array_equal(
            gluon(leaf(params, name), name), data[f"{case}__weights__{name}"][0], strict=True
        )
        np.testing.assert_array_equal(
            gluon(leaf(opt_state.master, name), name),
            data[f"{case}__master__{name}"][0],
            strict=True,
        )
        history = leaf(opt_state.inner_state[2].history, name)
        np.testing.assert_array_equal(
            gluon(history, name), data[f"{case}__history__{name}"][0], strict=True
        )
    update = jax.jit(tx.update)
    for step in range(3):
        grads = jax.tree.map(jnp.zeros_like, params)
        for name in names:
            layer, kind = name.split(".")
            grad = data[f"{case}__grads__{name}"][step]
            grads["layers"][int(layer)]["kernel" if kind == "weight" else "bias"] = jnp.asarray(
                grad.T if kind == "weight" else grad
            )
        updates, opt_state = update(grads, opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)
        for name in names:
            within(
                gluon(leaf(opt_state.master, name), name), data[f"{case}__master__{name}"][step + 1]
            )
            within(
                gluon(leaf(params, name), name), data[f"{case}__weights__{name}"][step + 1], 1e-3
            )  # float16 storage

    # A float32 target takes the master copies (the exact values), and keeps no master.
    target32 = jax.tree.map(lambda s: sds(s.shape), target)
    _, params32, opt_state32 = restore_into(*paths, target32)
    for name in names:
        np.testing.assert_array_equal(
            gluon(leaf(params32, name), name), data[f"{case}__master__{name}"][0], strict=True
        )
    assert all(m is None for m in jax.tree.leaves(opt_state32.master, is_leaf=lambda x: x is None))
