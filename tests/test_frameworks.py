"""mx_adagrad.adagrad inside Flax NNX, Flax Linen, Haiku and Equinox training loops, and the examples.

Each framework trains the same small MLP (4 -> 8 ReLU -> 3, softmax cross-entropy) for a few
jitted steps the way that framework is normally used with an optax optimizer. Its params are then
compared with a plain-JAX reference run: the same initial params as a list of ``(W, b)`` layers,
gradients from ``jax.grad`` of the same loss in plain JAX, and every leaf updated by the float64
``tests.reference.mxnet2_step``. Agreement to float32 rounding (relative error <= 1e-5) shows that
the framework hands ``mx_adagrad`` the right gradients and params and applies its updates as MXNet
would.

flax, dm-haiku, equinox, scikit-learn, matplotlib and tqdm come with the ``examples`` extra; each
test is skipped, with the reason, when what it needs is missing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from tests import reference

STEPS = 5
HYPER = {"lr": 0.1, "wd": 0.01, "clip_gradient": 0.05}
SIZES = (4, 8, 3)
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

Layers = list[tuple[Any, Any]]


def make_tx() -> optax.GradientTransformation:
    """The optimizer every framework uses: MXNet's AdaGrad with weight decay and clipping."""
    return mx_adagrad.adagrad(HYPER["lr"], wd=HYPER["wd"], clip_gradient=HYPER["clip_gradient"])


def make_data() -> tuple[jax.Array, jax.Array]:
    """A fixed batch of 16 inputs and integer labels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=16).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """The mean softmax cross-entropy of integer labels: the loss of every framework."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def plain_loss(layers: Layers, x: jax.Array, y: jax.Array) -> jax.Array:
    """The MLP in plain JAX: ``layers`` is ``[(W1, b1), (W2, b2)]``, ``W`` shaped (in, out)."""
    (w1, b1), (w2, b2) = layers
    return cross_entropy(jax.nn.relu(x @ w1 + b1) @ w2 + b2, y)


def reference_run(layers: Layers, x: jax.Array, y: jax.Array) -> Layers:
    """``STEPS`` steps of the float64 reference from ``layers``; gradients from plain JAX.

    The weights and histories are float64; each step's gradient is ``jax.grad(plain_loss)`` at the
    weights rounded to float32, the precision the frameworks compute in.
    """
    weights = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(layers)]
    histories = [np.zeros_like(w) for w in weights]
    treedef = jax.tree.structure(layers)
    grad_fn = jax.grad(plain_loss)
    for _ in range(STEPS):
        point = jax.tree.unflatten(treedef, [jnp.asarray(w, jnp.float32) for w in weights])
        grads = jax.tree.leaves(grad_fn(point, x, y))
        for i, grad in enumerate(grads):
            weights[i], histories[i] = reference.mxnet2_step(
                weights[i], grad, histories[i], **HYPER
            )
    return jax.tree.unflatten(treedef, weights)


def assert_matches_reference(initial: Layers, trained: Layers, x: jax.Array, y: jax.Array) -> None:
    """The framework's trained layers equal the reference run from its initial layers."""
    assert jax.tree.structure(trained) == jax.tree.structure(initial)
    want = reference_run(initial, x, y)
    for (path, got), expected in zip(
        jax.tree_util.tree_leaves_with_path(trained), jax.tree.leaves(want)
    ):
        assert got.dtype == jnp.float32
        assert reference.relative_error(got, expected) <= 1e-5, jax.tree_util.keystr(path)
    # The weights moved: the optimizer really ran.
    assert not np.allclose(jax.tree.leaves(trained)[0], jax.tree.leaves(initial)[0])


def test_flax_nnx_optimizer() -> None:
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
            self.output = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.output(jax.nn.relu(self.hidden(x)))

    def layers(model: MLP) -> Layers:
        return [(m.kernel[...], m.bias[...]) for m in (model.hidden, model.output)]

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
        grads = nnx.grad(lambda model: cross_entropy(model(x), y))(model)
        optimizer.update(model, grads)

    x, y = make_data()
    model = MLP(nnx.Rngs(0))
    initial = jax.tree.map(np.array, layers(model))  # a copy: train_step donates the model
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    for _ in range(STEPS):
        train_step(model, optimizer, x, y)
    assert int(optimizer.step[...]) == STEPS
    assert_matches_reference(initial, layers(model), x, y)


def test_flax_linen_train_state() -> None:
    nn = pytest.importorskip("flax.linen", reason="flax is in the examples extra")
    train_state = pytest.importorskip("flax.training.train_state", reason="flax: examples extra")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            hidden = nn.relu(nn.Dense(SIZES[1], name="hidden")(x))
            return nn.Dense(SIZES[2], name="output")(hidden)

    def layers(params: dict) -> Layers:
        return [(params[name]["kernel"], params[name]["bias"]) for name in ("hidden", "output")]

    @jax.jit
    def train_step(state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(lambda p: cross_entropy(state.apply_fn({"params": p}, x), y))(state.params)
        return state.apply_gradients(grads=grads)

    x, y = make_data()
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=make_tx())
    for _ in range(STEPS):
        state = train_step(state, x, y)
    assert int(state.step) == STEPS
    assert_matches_reference(layers(params), layers(state.params), x, y)


def test_haiku_transform() -> None:
    hk = pytest.importorskip("haiku", reason="dm-haiku is in the examples extra")
    model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP(SIZES[1:])(x)))
    tx = make_tx()

    def layers(params: dict) -> Layers:
        return [
            (params[f"mlp/~/linear_{i}"]["w"], params[f"mlp/~/linear_{i}"]["b"]) for i in (0, 1)
        ]

    @jax.jit
    def train_step(params: dict, opt_state: optax.OptState, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state

    x, y = make_data()
    initial = model.init(jax.random.key(0), x)
    params, opt_state = initial, tx.init(initial)
    for _ in range(STEPS):
        params, opt_state = train_step(params, opt_state, x, y)
    assert_matches_reference(layers(initial), layers(params), x, y)


def test_equinox_partition() -> None:
    eqx = pytest.importorskip("equinox", reason="equinox is in the examples extra")
    tx = make_tx()

    def layers(model: Any) -> Layers:
        # Equinox stores Linear weights as (out, in); the reference uses (in, out).
        return [(layer.weight.T, layer.bias) for layer in model.layers]

    @eqx.filter_jit
    def train_step(model: Any, opt_state: optax.OptState, x: jax.Array, y: jax.Array) -> Any:
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = jax.grad(lambda p: cross_entropy(jax.vmap(eqx.combine(p, static))(x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.combine(mx_adagrad.apply_updates(params, updates), static), opt_state

    x, y = make_data()
    model = eqx.nn.MLP(SIZES[0], SIZES[2], SIZES[1], depth=1, key=jax.random.key(0))
    initial = layers(model)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(STEPS):
        model, opt_state = train_step(model, opt_state, x, y)
    assert_matches_reference(initial, layers(model), x, y)


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:  # the examples import their shared module, digits.py
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "needs"),
    [("flax_digits", "flax"), ("haiku_digits", "haiku")],
)
def test_example_trains_to_95_percent_and_writes_curves(
    name: str, needs: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in (needs, "sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module, reason="the examples extra installs it")
    out = tmp_path / "curves.png"
    main: Callable[[list[str]], float] = load_example(name).main
    accuracy = main(["--out", str(out)])
    assert accuracy >= 0.95
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
