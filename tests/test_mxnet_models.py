"""Gluon checkpoints from real MXNet 1.9.1 in Flax NNX and Haiku models that were never MXNet nets.

Fixtures: tests/fixtures/gluon_migration (generator beside them): an Embedding + Dense net and a
Conv2D + BatchNorm + relu + MaxPool + Dense net, each trained by Gluon's Trainer with MXNet 1.x's
AdaGrad (``mx1``) and with MXNet 2.0's formula pickled as MXNet 2.0 pickles it (``mx2``), saved,
run in inference mode on an NCHW batch, then continued 3 steps.

* Forward: the JAX model with the converted weights, on the batch in NHWC, gives MXNet's output
  within 1e-5 relative (float32 in another summation order: a few ulps of the O(1) logits).
* Training: ``restore_into``'s ``tx.update`` on the JAX model's own gradients continues as MXNet
  did, within 1e-4 relative over 3 steps (the issue's bound: the gradients differ from MXNet's by
  float32 rounding, and AdaGrad divides them by the square root of a history of the same order);
  with MXNet's recorded gradients put into the JAX layout by hand, within 1e-5 (the optimizer
  alone, float32 against float32).

The JAX results are mapped back to Gluon's layout with the inverse permutations written out here
(``kernel.T``, HWIO -> OIHW), independently of mx_adagrad.mxnet_io.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad.mxnet_io import load_params, restore_into, to_jax
from tests import reference

nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
hk = pytest.importorskip("haiku", reason="dm-haiku is in the examples extra")

FIXTURES = Path(__file__).parent / "fixtures" / "gluon_migration"
DATA = np.load(FIXTURES / "steps.npz", allow_pickle=False)
CONFIG = json.loads(str(DATA["config_json"]))["cases"]
CASES = list(CONFIG)


def within(got, want, tolerance):
    assert reference.relative_error(got, want) <= tolerance


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Gluon's SoftmaxCrossEntropyLoss per sample, summed: what ``loss.backward()`` differentiates."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).sum()


def nhwc(x: np.ndarray) -> jax.Array:
    """An NCHW image batch in the JAX models' NHWC layout (token ids pass through)."""
    return jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)


def to_gluon(leaf_name: str, array: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A JAX leaf back in Gluon's layout: the inverse of the documented rules, written out."""
    array = np.asarray(array)
    if leaf_name in ("kernel", "w"):
        array = array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)  # (in, out), HWIO
    return array.reshape(shape)


def leaf(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[int(key) if key.isdigit() and int(key) in tree else key]
    return tree


def set_leaf(tree: Any, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree[int(key) if key.isdigit() and int(key) in tree else key]
    tree[last] = value


def to_layout(leaf_name: str, array: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """A Gluon array in the JAX layout by hand (for the recorded gradients)."""
    if leaf_name in ("kernel", "w"):
        array = array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)
    return jnp.asarray(array.reshape(shape))


# --------------------------------------------------------------------------------------------
# The JAX models


def flatten_nchw(x: jax.Array) -> jax.Array:
    """Gluon's Flatten after a convolution reads (C, H, W): NHWC must be put back in that order."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


class FlaxConvPool(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), padding="VALID", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(36, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
        return self.head(flatten_nchw(x))


def flax_embed_dense(rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(
        nnx.Embed(20, 4, rngs=rngs),
        lambda x: x.reshape(x.shape[0], -1),
        nnx.Linear(12, 8, rngs=rngs),
        nnx.tanh,
        nnx.Linear(8, 3, rngs=rngs),
    )


def haiku_embed_dense(x: jax.Array, is_training: bool) -> jax.Array:
    del is_training
    h = hk.Embed(20, 4)(x).reshape(x.shape[0], -1)
    h = jnp.tanh(hk.Linear(8)(h))  # built first: "linear", the next one "linear_1"
    return hk.Linear(3)(h)


def haiku_conv_pool(x: jax.Array, is_training: bool) -> jax.Array:
    h = hk.Conv2D(4, 3, padding="VALID", with_bias=False)(x)
    h = jax.nn.relu(hk.BatchNorm(True, True, decay_rate=0.9, eps=1e-5)(h, is_training))
    h = hk.max_pool(h, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return hk.Linear(3)(flatten_nchw(h))


# Which Gluon parameter is which JAX leaf (the expected pairing, written out; the Flax
# embed_dense model is paired by order, the others by these maps).
FLAX_PATHS = {
    "embed_dense": {
        "0.weight": "layers/0/embedding",
        "1.weight": "layers/2/kernel",
        "1.bias": "layers/2/bias",
        "2.weight": "layers/4/kernel",
        "2.bias": "layers/4/bias",
    },
    "conv_pool": {
        "0.weight": "conv/kernel",
        "1.gamma": "bn/scale",
        "1.beta": "bn/bias",
        "5.weight": "head/kernel",
        "5.bias": "head/bias",
    },
}
FLAX_STATISTICS = {"1.running_mean": "bn/mean", "1.running_var": "bn/var"}
HAIKU_PATHS = {
    "embed_dense": {
        "0.weight": "embed/embeddings",
        "1.weight": "linear/w",
        "1.bias": "linear/b",
        "2.weight": "linear_1/w",
        "2.bias": "linear_1/b",
    },
    "conv_pool": {
        "0.weight": "conv2_d/w",
        "1.gamma": "batch_norm/scale",
        "1.beta": "batch_norm/offset",
        "5.weight": "linear/w",
        "5.bias": "linear/b",
    },
}
HAIKU_STATISTICS = {
    "1.running_mean": "batch_norm/~/mean_ema/average",
    "1.running_var": "batch_norm/~/var_ema/average",
}
HAIKU_KEEP = [  # the moving averages' bookkeeping, which Gluon does not have
    "batch_norm/~/mean_ema/counter",
    "batch_norm/~/mean_ema/hidden",
    "batch_norm/~/var_ema/counter",
    "batch_norm/~/var_ema/hidden",
]


class Framework(NamedTuple):
    """One JAX model of a fixture net: its trainable target, forward and gradient."""

    paths: dict[str, str]  # Gluon name -> path, the trainable parameters
    name_map: dict[str, str] | None  # what restore_into gets (None: by order)
    target: Any  # the trainable parameters, as the framework lays them out
    infer: Callable[[str], jax.Array]  # case -> output on the inference batch, loaded with to_jax
    grad: Callable[[Any, jax.Array, jax.Array], Any]  # (params, x, y) -> grads like params


def flax(kind: str) -> Framework:
    model = flax_embed_dense(nnx.Rngs(0)) if kind == "embed_dense" else FlaxConvPool(nnx.Rngs(0))
    paths = FLAX_PATHS[kind]

    def infer(case: str) -> jax.Array:
        arrays = load_params(FIXTURES / f"{case}.params")
        name_map = None if kind == "embed_dense" else paths | FLAX_STATISTICS
        nnx.update(model, to_jax(arrays, nnx.to_pure_dict(nnx.state(model)), name_map=name_map))
        model.eval()
        return model(nhwc(DATA[f"{case}__x_infer"]))

    def grad(params: Any, x: jax.Array, y: jax.Array) -> Any:
        nnx.update(model, params)
        model.train()  # BatchNorm normalises with the batch's statistics, as Gluon's in training
        grads = nnx.grad(lambda m: cross_entropy_sum(m(x), y))(model)
        return nnx.to_pure_dict(grads)

    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return Framework(paths, None if kind == "embed_dense" else paths, target, infer, grad)


def haiku(kind: str) -> Framework:
    network = hk.transform_with_state(
        haiku_embed_dense if kind == "embed_dense" else haiku_conv_pool
    )
    x0 = nhwc(DATA[f"{kind}_mx1__x"][0])
    params, state = network.init(jax.random.key(0), x0, True)
    paths = HAIKU_PATHS[kind]

    def infer(case: str) -> jax.Array:
        arrays = load_params(FIXTURES / f"{case}.params")
        loaded = to_jax(arrays, params, name_map=paths)
        if state:
            loaded_state = to_jax(arrays, state, name_map=HAIKU_STATISTICS, keep=HAIKU_KEEP)
        else:
            loaded_state = state
        return network.apply(loaded, loaded_state, None, nhwc(DATA[f"{case}__x_infer"]), False)[0]

    @jax.jit
    def grad(params: Any, x: jax.Array, y: jax.Array) -> Any:
        return jax.grad(lambda p: cross_entropy_sum(network.apply(p, state, None, x, True)[0], y))(
            params
        )

    return Framework(paths, paths, params, infer, grad)


FRAMEWORKS = {"flax": flax, "haiku": haiku}


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("case", CASES)
def test_forward_gives_mxnets_output(framework, case):
    kind = case.rsplit("_", 1)[0]
    setup = FRAMEWORKS[framework](kind)
    within(setup.infer(case), DATA[f"{case}__out_infer"], 1e-5)


def restored(setup: Framework, case: str):
    return restore_into(
        FIXTURES / f"{case}.params",
        FIXTURES / f"{case}.states",
        setup.target,
        name_map=setup.name_map,
        trainer_order=CONFIG[case]["trainer_order"],
    )


def check_against_mxnet(setup, case, params, opt_state, step, tolerance):
    history = optax.tree.get(opt_state, "history")
    for gluon, path in setup.paths.items():
        name = path.rsplit("/", 1)[-1]
        shape = DATA[f"{case}__weights__{gluon}"].shape[1:]
        within(
            to_gluon(name, leaf(params, path), shape),
            DATA[f"{case}__weights__{gluon}"][step],
            tolerance,
        )
        within(
            to_gluon(name, leaf(history, path), shape),
            DATA[f"{case}__history__{gluon}"][step],
            tolerance,
        )


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("case", CASES)
def test_training_continues_as_mxnet_with_the_models_gradients(framework, case):
    kind = case.rsplit("_", 1)[0]
    setup = FRAMEWORKS[framework](kind)
    tx, params, opt_state = restored(setup, case)
    assert jax.tree.structure(params) == jax.tree.structure(setup.target)
    check_against_mxnet(setup, case, params, opt_state, 0, 0.0)  # the checkpoint, exactly
    update = jax.jit(tx.update)
    for step in range(3):
        x, y = nhwc(DATA[f"{case}__x"][step]), jnp.asarray(DATA[f"{case}__y"][step])
        grads = setup.grad(params, x, y)
        for gluon, path in setup.paths.items():
            name = path.rsplit("/", 1)[-1]
            recorded = DATA[f"{case}__grads__{gluon}"][step]
            within(to_gluon(name, leaf(grads, path), recorded.shape), recorded, 1e-4)
        updates, opt_state = update(grads, opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)
        check_against_mxnet(setup, case, params, opt_state, step + 1, 1e-4)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("case", CASES)
def test_training_continues_as_mxnet_with_the_recorded_gradients(framework, case):
    kind = case.rsplit("_", 1)[0]
    setup = FRAMEWORKS[framework](kind)
    tx, params, opt_state = restored(setup, case)
    update = jax.jit(tx.update)
    for step in range(3):
        grads = jax.tree.map(jnp.zeros_like, params)
        for gluon, path in setup.paths.items():
            recorded = DATA[f"{case}__grads__{gluon}"][step]
            set_leaf(
                grads, path, to_layout(path.rsplit("/", 1)[-1], recorded, leaf(params, path).shape)
            )
        updates, opt_state = update(grads, opt_state, params)
        params = mx_adagrad.apply_updates(params, updates)
        check_against_mxnet(setup, case, params, opt_state, step + 1, 1e-5)


def test_flattening_nhwc_directly_is_the_pitfall():
    """Every shape agrees without the transpose in flatten_nchw, and the outputs are wrong."""

    class NHWCFlatten(FlaxConvPool):
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
            return self.head(x.reshape(x.shape[0], -1))  # (H, W, C) order, not Gluon's (C, H, W)

    case = "conv_pool_mx1"
    model = NHWCFlatten(nnx.Rngs(0))
    name_map = FLAX_PATHS["conv_pool"] | FLAX_STATISTICS
    arrays = load_params(FIXTURES / f"{case}.params")
    nnx.update(model, to_jax(arrays, nnx.to_pure_dict(nnx.state(model)), name_map=name_map))
    model.eval()
    output = model(nhwc(DATA[f"{case}__x_infer"]))
    assert reference.relative_error(output, DATA[f"{case}__out_infer"]) > 0.1


@pytest.mark.parametrize("case", ["embed_dense_mx1", "conv_pool_mx1"])
def test_linen_variables_take_the_checkpoint(case):
    """Linen: nn.Sequential paired by order (params only), a compact module by name_map."""
    linen = pytest.importorskip("flax.linen", reason="flax is in the examples extra")
    arrays = load_params(FIXTURES / f"{case}.params")
    x = nhwc(DATA[f"{case}__x_infer"])
    if case.startswith("embed_dense"):
        model = linen.Sequential(
            [
                linen.Embed(20, 4),
                lambda h: h.reshape(h.shape[0], -1),
                linen.Dense(8),
                jnp.tanh,
                linen.Dense(3),
            ]
        )
        variables = model.init(jax.random.key(0), x)
        loaded = {"params": to_jax(arrays, variables["params"])}  # layers_0, layers_2, layers_4
        output = model.apply(loaded, x)
    else:

        class ConvPool(linen.Module):
            @linen.compact
            def __call__(self, h):
                h = linen.Conv(4, (3, 3), padding="VALID", use_bias=False)(h)
                h = linen.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(h)
                h = linen.max_pool(jax.nn.relu(h), (2, 2), strides=(2, 2))
                return linen.Dense(3)(flatten_nchw(h))

        model = ConvPool()
        variables = model.init(jax.random.key(0), x)
        name_map = {
            "0.weight": "params/Conv_0/kernel",
            "1.gamma": "params/BatchNorm_0/scale",
            "1.beta": "params/BatchNorm_0/bias",
            "1.running_mean": "batch_stats/BatchNorm_0/mean",
            "1.running_var": "batch_stats/BatchNorm_0/var",
            "5.weight": "params/Dense_0/kernel",
            "5.bias": "params/Dense_0/bias",
        }
        output = model.apply(to_jax(arrays, variables, name_map=name_map), x)
    within(output, DATA[f"{case}__out_infer"], 1e-5)
