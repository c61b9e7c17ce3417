"""mx_adagrad.flax: the NNX Optimizer, Embed + value_and_grad, and Linen's TrainState.

What is checked, each against an independent path run with the same transformation:

* ``Optimizer`` equals ``nnx.Optimizer`` bit for bit (params, optimizer state, step, returned
  updates) for every transform argument (wd, clip, rescale, lr_mult/wd_mult, optax and MXNet
  schedules, multi_precision), with ``tx`` given as ``mx_adagrad.adagrad(...)``, as
  ``flat.fused_adagrad(...)`` (the one-pass step) and as its ``.tx``, in graph mode and tree mode;
  and a run matches the float64 reference of ``tests/reference.py``. Bitwise is expected: both
  compute ``tx.update`` and add the updates in the parameter's dtype, and the one-pass step is
  bitwise that (``tests/test_flat.py``, ``tests/test_native.py``).
* ``value_and_grad`` gives the dense leaves ``nnx.value_and_grad``'s gradients bit for bit and the
  Embed tables a RowSparse whose dense form is ``nnx.value_and_grad``'s table gradient.
* An NNX model with an ``Embed`` table trained with ``value_and_grad`` + ``Optimizer`` equals the
  plain-JAX RowSparse step (``mx_adagrad.value_and_row_grad`` + ``tx.update`` +
  ``mx_adagrad.apply_updates``) bit for bit; rows no step touched stay bit-identical.
* ``TrainState`` equals Flax's ``TrainState`` bit for bit, dense and with RowSparse gradients.
* Orbax: an NNX model and optimizer saved mid-training and restored continue bit for bit.
* On 8 CPU devices (child process, ``tests/eight_devices.py``): the one-pass ``Optimizer`` step on
  sharded params compiles to no collective, keeps every sharding, calls the native kernel and
  equals the one-device step bitwise.
* Bad input is a ValueError naming it.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad
from mx_adagrad import _native, flat, lr_scheduler
from tests import eight_devices
from tests.test_frameworks import (
    EXAMPLES,
    HYPER,
    SIZES,
    assert_matches_reference,
    cross_entropy,
    load_example,
    make_data,
)

nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
mxf = pytest.importorskip("mx_adagrad.flax", reason="flax is in the examples extra")
train_state = pytest.importorskip("flax.training.train_state", reason="flax: examples extra")

EIGHT_DEVICES = eight_devices.Checks("tests.test_flax")


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bitwise(actual, expected) -> None:
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for x, y in zip(actual, expected):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


def leaves(node) -> list:
    """The arrays of an NNX object (or State), in a fixed order."""
    return jax.tree.leaves(nnx.as_pure(nnx.state(node)))


# Parameters are stored in ``dtype`` (bfloat16 for multi_precision) and computed with in float32:
# XLA CPU computes bfloat16 arithmetic in float32 and rounds where its fusions end, so the same
# bfloat16 model compiled into two different programs (one with the native kernel's call, one
# without) can round its gradients differently. The optimizer is what these tests compare.
class MLP(nnx.Module):
    """6 -> 8 tanh -> 3; parameters in ``dtype``, arithmetic in float32."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.hidden = nnx.Linear(6, 8, param_dtype=dtype, dtype=jnp.float32, rngs=rngs)
        self.output = nnx.Linear(8, 3, param_dtype=dtype, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return self.output(jnp.tanh(self.hidden(x)))


def batches(count: int, dtype=jnp.float32):
    rng = np.random.default_rng(1)
    return [
        (jnp.asarray(rng.normal(size=(16, 6)), dtype), jnp.asarray(rng.integers(0, 3, 16)))
        for _ in range(count)
    ]


def mlp_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


CONFIGS = {
    "defaults": (dict(), jnp.float32),
    "wd, clip, rescale": (dict(wd=0.01, clip_gradient=0.05, rescale_grad=0.5), jnp.float32),
    "lr_mult, wd_mult": (
        dict(wd=0.1, lr_mult={"hidden/bias": 2.0}, wd_mult={"output/kernel": 0.0}),
        jnp.float32,
    ),
    "optax schedule": (dict(learning_rate=optax.cosine_decay_schedule(0.1, 5)), jnp.float32),
    "mxnet scheduler": (
        dict(
            learning_rate=None,
            lr_scheduler=lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.1),
            wd=0.01,
        ),
        jnp.float32,
    ),
    "multi_precision bfloat16": (dict(wd=0.01, multi_precision=True), jnp.bfloat16),
}
TX_KINDS = ("adagrad", "fused_adagrad", "fused_adagrad.tx")


def transformations(kind: str, config: dict):
    """(what mx_adagrad.flax.Optimizer is given, the transformation nnx.Optimizer is given)."""
    config = {"learning_rate": 0.1, **config}
    if kind == "adagrad":
        tx = mx_adagrad.adagrad(**config)
        return tx, tx
    fused = flat.fused_adagrad(**config)
    return (fused if kind == "fused_adagrad" else fused.tx), fused.tx


def dense_step():
    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, x, y):
        grads = nnx.grad(mlp_loss)(model, x, y)
        return optimizer.update(model, grads)

    return step


# Every config and kind in graph mode (Flax's default); tree mode on the configs that change the
# state's structure (multipliers, the multi_precision wrapper).
MODES = [(name, kind, True) for name in CONFIGS for kind in TX_KINDS] + [
    (name, kind, False)
    for name in ("lr_mult, wd_mult", "multi_precision bfloat16")
    for kind in ("adagrad", "fused_adagrad")
]


@pytest.mark.parametrize(
    ("name", "kind", "graph"),
    MODES,
    ids=[f"{n}-{k}-{'graph' if g else 'tree'} mode" for n, k, g in MODES],
)
def test_optimizer_equals_nnx_optimizer_bitwise(name, kind, graph):
    config, dtype = CONFIGS[name]
    ours, theirs = transformations(kind, config)
    with nnx.set_graph_mode(graph):
        model, reference = MLP(nnx.Rngs(0), dtype), MLP(nnx.Rngs(0), dtype)
        optimizer = mxf.Optimizer(model, ours)
        reference_optimizer = nnx.Optimizer(reference, theirs, wrt=nnx.Param)
        assert optimizer.one_pass is not None  # fused_adagrad, its .tx and adagrad(...) alike
        assert optimizer.tx is theirs
        step, reference_step = dense_step(), dense_step()
        for x, y in batches(4, dtype):
            updates = step(model, optimizer, x, y)
            reference_updates = reference_step(reference, reference_optimizer, x, y)
            assert_bitwise(updates, reference_updates)
        assert_bitwise(leaves(model), leaves(reference))
        assert_bitwise(leaves(optimizer), leaves(reference_optimizer))
        assert int(optimizer.step[...]) == 4


def test_one_pass_optimizer_trains_as_the_float64_reference():
    """The MLP of tests/test_frameworks.py, trained with the one-pass step, against the float64
    transcription of MXNet's formula (relative error <= 1e-5: float32 rounding over 5 steps)."""

    class FrameworkMLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
            self.output = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs)

        def __call__(self, x):
            return self.output(jax.nn.relu(self.hidden(x)))

    def layers(model):
        return [(m.kernel[...], m.bias[...]) for m in (model.hidden, model.output)]

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(lambda m: cross_entropy(m(x), y))(model))

    x, y = make_data()
    model = FrameworkMLP(nnx.Rngs(0))
    initial = jax.tree.map(np.array, layers(model))
    fused = flat.fused_adagrad(HYPER["lr"], wd=HYPER["wd"], clip_gradient=HYPER["clip_gradient"])
    optimizer = mxf.Optimizer(model, fused)
    for _ in range(5):
        step(model, optimizer, x, y)
    assert_matches_reference(initial, layers(model), x, y)


def test_one_pass_step_under_nnx_jit_is_the_native_kernel_in_place():
    model = MLP(nnx.Rngs(0))
    optimizer = mxf.Optimizer(model, flat.fused_adagrad(0.1, wd=1e-4))
    x, y = batches(1)[0]
    compiled = dense_step().lower(model, optimizer, x, y).compile()
    if _native.load():
        assert eight_devices.native_calls(compiled) == ["mx_adagrad_step_f32"]
    # Donated: weights and histories are written where they are; what remains is the MLP's own
    # forward and backward scratch (activations of 16 x 8), far below one parameter copy.
    assert compiled.memory_analysis().temp_size_in_bytes < 4096


def test_optimizer_takes_pure_gradients():
    """``nnx.as_pure(grads)`` (arrays, no Variables) is the same update as ``grads``."""
    model, reference = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    fused = flat.fused_adagrad(0.1, wd=0.01)
    optimizer, reference_optimizer = mxf.Optimizer(model, fused), mxf.Optimizer(reference, fused)
    for x, y in batches(2):
        grads = nnx.grad(mlp_loss)(model, x, y)
        optimizer.update(model, nnx.as_pure(grads))
        reference_optimizer.update(reference, nnx.grad(mlp_loss)(reference, x, y))
    assert_bitwise(leaves(model), leaves(reference))
    assert_bitwise(leaves(optimizer), leaves(reference_optimizer))


def test_optimizer_checks_its_arguments():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"flax\.Optimizer: tx must be an optax"):
        mxf.Optimizer(model, "adagrad")
    optimizer = mxf.Optimizer(model, flat.fused_adagrad(0.1))
    grads = nnx.grad(mlp_loss)(model, *batches(1)[0])
    with pytest.raises(ValueError, match=r"Optimizer\.update: kwargs must be empty"):
        optimizer.update(model, grads, value=1.0)


# RowSparse embedding tables.

ROWS, DIM, BAG = 500, 8, 4


class Recommender(nnx.Module):
    """A bag of embeddings (``Embed``) and a dense scoring vector."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embed = mxf.Embed(ROWS, DIM, param_dtype=dtype, rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (DIM,), dtype))

    def __call__(self, ids):  # float32 arithmetic, as MLP's
        rows = self.embed(ids).astype(jnp.float32)
        return jnp.mean(jnp.tanh(rows), axis=1) @ self.w[...].astype(jnp.float32)


def logistic(logits, labels):
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def nnx_loss(model, ids, labels):
    return logistic(model(ids), labels)


def plain_loss(params, rows, labels):
    """The same model as ``Recommender`` on a dict of params; ``rows`` looked up already."""
    rows, w = rows["embed"].astype(jnp.float32), params["w"].astype(jnp.float32)
    return logistic(jnp.mean(jnp.tanh(rows), axis=1) @ w, labels)


def lookups(count: int, batch: int = 32):
    """Zipf ids with duplicates (rows 0..ROWS/2 only: the rest must stay untouched)."""
    rng = np.random.default_rng(2)
    return [
        (
            jnp.asarray((rng.zipf(1.3, (batch, BAG)) - 1) % (ROWS // 2), jnp.int32),
            jnp.asarray(rng.integers(0, 2, batch), jnp.float32),
        )
        for _ in range(count)
    ]


SPARSE_CONFIGS = {
    "defaults": (dict(), jnp.float32),
    "lazy wd, clip, rescale": (dict(wd=0.01, clip_gradient=0.05, rescale_grad=0.5), jnp.float32),
    "lr_mult": (dict(lr_mult={"embed": 2.0}), jnp.float32),
    "multi_precision bfloat16": (dict(wd=0.01, multi_precision=True), jnp.bfloat16),
}


def sparse_nnx_step():
    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, ids, labels):
        loss, grads = mxf.value_and_grad(nnx_loss)(model, ids, labels)
        optimizer.update(model, grads)
        return loss

    return step


def sparse_plain_step(tx):
    """The plain-JAX RowSparse step with ``tx``'s one-pass step, as Optimizer and TrainState take
    it (``tx.update`` + ``apply_updates`` for a transformation without one)."""
    grad_fn = mx_adagrad.value_and_row_grad(plain_loss, tables=["embed"])
    one_pass = flat.one_pass(tx)

    def step(params, state, ids, labels):
        loss, grads = grad_fn(params, {"embed": ids}, labels)
        if one_pass is not None:
            return (*one_pass.step(params, grads, state), loss)
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


SPARSE_MODES = [(name, kind, True) for name in SPARSE_CONFIGS for kind in TX_KINDS[:2]] + [
    ("lazy wd, clip, rescale", kind, False) for kind in TX_KINDS[:2]
]


@pytest.mark.parametrize(
    ("name", "kind", "graph"),
    SPARSE_MODES,
    ids=[f"{n}-{k}-{'graph' if g else 'tree'} mode" for n, k, g in SPARSE_MODES],
)
def test_nnx_sparse_step_equals_plain_jax_row_sparse_step(name, kind, graph):
    config, dtype = SPARSE_CONFIGS[name]
    ours, tx = transformations(kind, config)
    with nnx.set_graph_mode(graph):
        model = Recommender(nnx.Rngs(0), dtype)
        initial = {"embed": np.array(model.embed.embedding[...]), "w": np.array(model.w[...])}
        params = jax.tree.map(jnp.asarray, initial)
        optimizer = mxf.Optimizer(model, ours)
        state = tx.init(params)
        step, plain_step = sparse_nnx_step(), sparse_plain_step(tx)
        for ids, labels in lookups(5):
            loss = step(model, optimizer, ids, labels)
            params, state, plain = plain_step(params, state, ids, labels)
            assert_bitwise(loss, plain)
        table = model.embed.embedding[...]
        assert_bitwise([table, model.w[...]], [params["embed"], params["w"]])
        assert_bitwise(nnx.as_pure(optimizer.opt_state), state)
    # The rows no lookup touched: bit-identical to the initial table, history still zero.
    assert_bitwise(table[ROWS // 2 :], initial["embed"][ROWS // 2 :])
    history = optax.tree_utils.tree_get(state, "history")["embed"]
    assert not np.any(np.asarray(history[ROWS // 2 :]))
    assert np.any(np.asarray(history[: ROWS // 2]))


def test_value_and_grad_is_nnx_value_and_grad_with_row_sparse_tables():
    model = Recommender(nnx.Rngs(0))
    ids, labels = lookups(1)[0]
    ids = ids.at[0, 0].set(-1)  # counted from the end, as jnp.take (and nnx.Embed) count it
    (loss, aux), grads = mxf.value_and_grad(
        lambda m, i, y: (nnx_loss(m, i, y), "aux"), has_aux=True
    )(model, ids, labels)
    want_loss, want = nnx.value_and_grad(nnx_loss)(model, ids, labels)
    assert aux == "aux"
    assert_bitwise(loss, want_loss)
    assert_bitwise(grads["w"][...], want["w"][...])
    sparse = grads["embed"]["embedding"].get_value()
    assert isinstance(sparse, mx_adagrad.RowSparse)
    assert sparse.dense_shape == (ROWS, DIM) and sparse.indices.shape == (ids.size,)
    np.testing.assert_array_equal(sparse.indices, jnp.where(ids < 0, ids + ROWS, ids).reshape(-1))
    # Duplicate ids: the RowSparse keeps one row per lookup; nnx sums them into the table in the
    # scatter-add's order, todense in its own: float32 sums of the same terms, at most a few ulps.
    np.testing.assert_allclose(
        sparse.todense(), want["embed"]["embedding"][...], rtol=1e-6, atol=1e-9
    )
    only_grads = mxf.grad(nnx_loss)(model, ids, labels)
    assert_bitwise(only_grads["w"][...], want["w"][...])


class TwoTables(nnx.Module):
    """Two Embeds, one called twice and one not at all, next to a dense layer."""

    def __init__(self, rngs):
        self.words = mxf.Embed(40, 4, rngs=rngs)
        self.tags = mxf.Embed(30, 4, rngs=rngs)
        self.unused = mxf.Embed(20, 4, rngs=rngs)
        self.dense = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, words, tags):
        summed = self.words(words).sum(1) + self.words(words[:, :1]).sum(1) + self.tags(tags)
        return self.dense(summed).sum()


def test_value_and_grad_with_several_tables_calls_and_argnums():
    model = TwoTables(nnx.Rngs(0))
    words, tags = jnp.array([[1, 2, 3], [3, 39, 0]]), jnp.array([5, 29])
    scale = jnp.float32(0.5)

    def loss_fn(model, scale):
        return model(words, tags) * scale

    _, (grads, scale_grad) = mxf.value_and_grad(loss_fn, argnums=(0, 1))(model, scale)
    _, (want, want_scale) = nnx.value_and_grad(loss_fn, argnums=(0, 1))(model, scale)
    assert_bitwise(scale_grad, want_scale)
    assert_bitwise(grads["dense"]["kernel"][...], want["dense"]["kernel"][...])
    words_grad = grads["words"]["embedding"].get_value()
    np.testing.assert_array_equal(words_grad.indices, [1, 2, 3, 3, 39, 0, 1, 3])  # both calls
    for name in ("words", "tags"):
        np.testing.assert_allclose(
            grads[name]["embedding"].get_value().todense(),
            want[name]["embedding"][...],
            rtol=1e-6,  # duplicate rows summed in another order (see above)
        )
    # A table f does not look up keeps nnx's dense (zero) gradient.
    assert_bitwise(grads["unused"]["embedding"][...], want["unused"]["embedding"][...])


def test_value_and_grad_refuses_whole_table_reads_and_lookups_in_control_flow():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = mxf.Embed(10, 4, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.embed(ids)).sum()

    with pytest.raises(ValueError, match=r"the Embed table args\[0\]\.embed\.embedding must be"):
        mxf.value_and_grad(lambda m: m(jnp.array([1, 2])))(Tied(nnx.Rngs(0)))

    model = Recommender(nnx.Rngs(0))

    def scanned(model):
        def body(carry, ids):
            return carry + model.embed(ids).sum(), None

        return jax.lax.scan(body, 0.0, jnp.array([[1, 2], [3, 4]]))[0]

    with pytest.raises(ValueError, match="every Embed lookup must be made in f itself"):
        mxf.value_and_grad(scanned)(model)
    with pytest.raises(ValueError, match="argnums must be an int >= 0"):
        mxf.value_and_grad(nnx_loss, argnums=-1)


def test_embed_outside_value_and_grad_is_nnx_embed():
    ids = jnp.array([[0, 3], [-1, 9]])
    ours, theirs = mxf.Embed(10, 3, rngs=nnx.Rngs(0)), nnx.Embed(10, 3, rngs=nnx.Rngs(0))
    assert_bitwise(ours(ids), theirs(ids))
    assert_bitwise(ours.attend(jnp.ones((2, 3))), theirs.attend(jnp.ones((2, 3))))


def test_orbax_resume_of_the_nnx_optimizer_is_bitwise(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint: examples extra")
    fused = flat.fused_adagrad(0.1, wd=0.01, lr_scheduler=None, clip_gradient=0.1)
    batches_ = lookups(6)

    def build():
        model = Recommender(nnx.Rngs(0))
        return model, mxf.Optimizer(model, fused)

    step = sparse_nnx_step()
    model, optimizer = build()
    for ids, labels in batches_:
        step(model, optimizer, ids, labels)

    model, optimizer = build()
    for ids, labels in batches_[:3]:
        step(model, optimizer, ids, labels)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", nnx.state((model, optimizer)))
    del model, optimizer
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    resumed_model, resumed_optimizer = nnx.merge(graphdef, restored)
    assert resumed_optimizer.one_pass is not None
    for ids, labels in batches_[3:]:
        step(resumed_model, resumed_optimizer, ids, labels)

    want_model, want_optimizer = build()
    for ids, labels in batches_:
        step(want_model, want_optimizer, ids, labels)
    assert_bitwise(leaves(resumed_model), leaves(want_model))
    assert_bitwise(leaves(resumed_optimizer), leaves(want_optimizer))
    assert int(resumed_optimizer.step[...]) == len(batches_)


# Linen's TrainState.


def linen_setup(dtype=jnp.float32):
    import flax.linen as nn

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            # float32 arithmetic on parameters stored in dtype, as MLP's
            dense = functools.partial(nn.Dense, param_dtype=dtype, dtype=jnp.float32)
            return dense(3, name="output")(jnp.tanh(dense(8, name="hidden")(x)))

    model = Dense()
    params = model.init(jax.random.key(0), jnp.ones((1, 6), dtype))["params"]
    return model, params


@pytest.mark.parametrize("kind", TX_KINDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_train_state_equals_flax_train_state_bitwise(config, kind):
    config, dtype = config
    if "lr_mult" in config:  # Linen names the layers' params the same way
        config = {**config, "lr_mult": {"hidden/bias": 2.0}, "wd_mult": {"output/kernel": 0.0}}
    ours, theirs = transformations(kind, config)
    model, params = linen_setup(dtype)
    state = mxf.TrainState.create(apply_fn=model.apply, params=params, tx=ours)
    reference = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=theirs)
    assert state.one_pass is not None and state.tx is theirs

    @jax.jit
    def step(state, x, y):
        def loss(p):
            logits = state.apply_fn({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    for x, y in batches(4, dtype):
        state, reference = step(state, x, y), step(reference, x, y)
    assert int(state.step) == 4
    assert_bitwise((state.params, state.opt_state), (reference.params, reference.opt_state))


@pytest.mark.parametrize("kind", ["adagrad", "fused_adagrad"])
def test_train_state_takes_row_sparse_gradients(kind):
    """The plain-JAX RowSparse step, written as TrainState.apply_gradients: bitwise."""
    ours, tx = transformations(kind, dict(wd=0.01, clip_gradient=0.05))
    model = Recommender(nnx.Rngs(0))
    params = {"embed": model.embed.embedding[...], "w": model.w[...]}
    state = mxf.TrainState.create(apply_fn=None, params=params, tx=ours)
    grad_fn = mx_adagrad.value_and_row_grad(plain_loss, tables=["embed"])

    @jax.jit
    def step(state, ids, labels):
        _, grads = grad_fn(state.params, {"embed": ids}, labels)
        return state.apply_gradients(grads=grads)

    plain_step, plain_params, plain_state = sparse_plain_step(tx), params, tx.init(params)
    for ids, labels in lookups(4):
        state = step(state, ids, labels)
        plain_params, plain_state, _ = plain_step(plain_params, plain_state, ids, labels)
    assert_bitwise((state.params, state.opt_state), (plain_params, plain_state))


def test_train_state_checks_its_tx():
    with pytest.raises(ValueError, match=r"flax\.TrainState\.create: tx must be"):
        mxf.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=None)


# examples/flax_embedding.py

EXAMPLE_FLAGS = ["--steps", "150", "--dim", "32", "--batch-size", "64", "--vocab-size", "2000"]


@pytest.fixture(scope="module")
def embedding_example() -> dict:
    return load_example("flax_embedding").main(EXAMPLE_FLAGS)


def test_embedding_example_learns_and_reports_both_paths(embedding_example):
    losses = embedding_example["losses"]
    assert len(losses["sparse"]) == 150 and np.all(np.isfinite(losses["sparse"]))
    assert losses["sparse"][-20:].mean() < 0.9 * losses["sparse"][:20].mean()
    # As in tests/test_sparse_example.py: the paths sum a word's duplicate rows in another order
    # (segment-sum after sorting against the dense scatter-add), so the losses differ in their
    # last bits (about 1e-6 relative); rtol=1e-4 still fails on any update to an untouched row.
    np.testing.assert_allclose(losses["sparse"], losses["dense"], rtol=1e-4)
    speeds = embedding_example["steps_per_second"]
    assert set(speeds) == {"sparse", "dense"} and all(s > 0 for s in speeds.values())


def test_embedding_example_sparse_run_is_the_plain_jax_example_bitwise(embedding_example):
    """The NNX model trained through mx_adagrad.flax equals examples/sparse_embedding.py's
    plain-JAX RowSparse run (value_and_row_grad + tx.update + apply_updates) on the same data."""
    plain = load_example("sparse_embedding").main(EXAMPLE_FLAGS)
    assert_bitwise(embedding_example["losses"]["sparse"], plain["losses"]["sparse"])


def test_flax_step_benchmark_contenders_run():
    """benchmarks/flax_step.py's sparse contenders, on a small table: each form runs a step."""
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    import flax_step

    for form in ("nnx.jit", "cached_partial", "tree mode", "dense", "no-op"):
        flax_step.nnx_sparse_contender(1000, form)()
    flax_step.plain_sparse_contender(1000)()


# On 8 CPU devices (the child process).


@pytest.fixture(scope="module")
def eight_device_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    return EIGHT_DEVICES.report(tmp_path_factory.mktemp("flax_8_devices"))


SHARDINGS = {  # MLP params: split over both axes, over one, replicated
    ("hidden", "kernel"): P(None, "model"),
    ("hidden", "bias"): P(("data", "model")),
    ("output", "kernel"): P("data"),
    ("output", "bias"): P(),
}


def sharded_mlp(mesh, dtype) -> MLP:
    model = MLP(nnx.Rngs(0), dtype)
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        sharding = NamedSharding(mesh, SHARDINGS[path])
        variable.set_value(jax.device_put(variable.get_value(), sharding))
    nnx.update(model, state)
    return model


@EIGHT_DEVICES
def one_pass_optimizer_keeps_shardings_adds_no_collectives_and_equals_one_device() -> None:
    @nnx.jit(donate_argnames=("model", "optimizer"))
    def update(model, optimizer, grads):
        optimizer.update(model, grads)

    for mesh in eight_devices.meshes((4, 2), ("data", "model")):
        for dtype, config in (
            (jnp.float32, dict(wd=1e-3, clip_gradient=0.5)),
            (jnp.bfloat16, dict(wd=1e-3, multi_precision=True)),
        ):
            fused = flat.fused_adagrad(0.1, **config)
            model = sharded_mlp(mesh, dtype)
            local = MLP(nnx.Rngs(0), dtype)
            grads = jax.tree.map(  # a State of Params, as nnx.grad returns
                lambda p: (p * 3.0 - 0.5).astype(p.dtype), nnx.state(model, nnx.Param)
            )
            local_grads = jax.tree.map(lambda g: jnp.asarray(np.asarray(g)), grads)
            optimizer, local_optimizer = mxf.Optimizer(model, fused), mxf.Optimizer(local, fused)
            compiled = update.lower(model, optimizer, grads).compile()
            where = f"{dtype.__name__} {mesh.axis_types}"
            assert eight_devices.collectives(compiled) == [], where
            if _native.load():
                assert eight_devices.native_calls(compiled), f"{where}: no native kernel call"
            for _ in range(3):
                update(model, optimizer, grads)
                update(local, local_optimizer, local_grads)
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                sharding = variable.get_value().sharding
                assert sharding.is_equivalent_to(NamedSharding(mesh, SHARDINGS[path]), 2), path
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.as_pure(optimizer.opt_state)):
                if leaf.ndim:  # histories and master copies: sharded like their parameter
                    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
                    spec = next(s for p, s in SHARDINGS.items() if keys[-2:] == p)
                    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), path
            assert_bitwise(jax.device_get(leaves(model)), jax.device_get(leaves(local)))
            assert_bitwise(
                jax.device_get(leaves(optimizer)), jax.device_get(leaves(local_optimizer))
            )


@pytest.mark.parametrize("name", EIGHT_DEVICES.functions)
def test_on_8_cpu_devices(eight_device_report: dict[str, str | None], name: str) -> None:
    eight_devices.assert_passed(eight_device_report, name)


if __name__ == "__main__":
    EIGHT_DEVICES.main(sys.argv[1])
