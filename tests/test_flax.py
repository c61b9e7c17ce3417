"""mx_adagrad.flax: the NNX Optimizer, Embed/EmbedBag + value_and_grad, and Linen's TrainState.

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
* ``EmbedBag`` pools as a float64 transcription of ``embedding_bag`` (sum, mean, padding, Bags with
  weights); under ``value_and_grad`` its table's gradient is a ``BagGrad`` (calls concatenated)
  whose dense form is ``nnx.value_and_grad``'s, the other leaves bit for bit. Two EmbedBag tables
  and a Linear trained with ``Optimizer`` + ``fused_adagrad`` or ``fused_rowwise_adagrad`` equal
  the plain-pytree ``value_and_bag_grad`` + ``fused.step`` bit for bit and the float64 AdaGrad
  step within float32 rounding; the compiled step calls the native sparse kernel and holds no
  table-sized array and no row per lookup.
* ``TrainState`` equals Flax's ``TrainState`` bit for bit, dense and with RowSparse gradients.
* Orbax: an NNX model and optimizer saved mid-training and restored continue bit for bit.
* On 8 CPU devices (child process, ``tests/eight_devices.py``): the one-pass ``Optimizer`` step on
  sharded params compiles to no collective, keeps every sharding, calls the native kernel and
  equals the one-device step bitwise.
* Bad input is a ValueError naming it.
"""

from __future__ import annotations

import functools
import itertools
import re
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


# Embedding bags: EmbedBag tables and their BagGrad gradients.

BAG_ROWS, BAG_DIM = 300, 8
BAG_IDS = np.array([5, 5, 9, -1, 2, 11, BAG_ROWS, 4], np.int32)
BAG_OFFSETS = np.array([0, 3, 3, 7, 8], np.int32)  # bags of 3, 0, 4 and 1 ids
BAG_WEIGHTS = np.array([0.5, 2.0, -1.0, 3.0, 1.5, 0.25, 4.0, 1.0], np.float32)


def numpy_pool(table, bags, mode):
    """float64 transcription of embedding_bag on bags given as ``[(ids, weights)]``: padding ids
    (outside ``[0, rows)``) add and count nothing; an empty bag pools to zeros."""
    table = np.asarray(table, np.float64)
    out = np.zeros((len(bags), table.shape[1]))
    for b, (ids, weights) in enumerate(bags):
        valid = [(i, w) for i, w in zip(ids, weights) if 0 <= i < table.shape[0]]
        for i, w in valid:
            out[b] += w * table[i]
        if mode == "mean" and valid:
            out[b] /= len(valid)
    return out


def bag_inputs(kind: str):
    """``(bags as EmbedBag takes them, the same bags as [(ids, weights)])``; every kind has
    padding ids (-1 and ``BAG_ROWS``), duplicates and a bag of padding only or an empty bag."""
    if kind == "array":
        ids = np.array([[3, 3, 7, -1], [-1, -1, -1, -1], [0, BAG_ROWS - 1, BAG_ROWS, 12]])
        return jnp.asarray(ids, jnp.int32), [(row, np.ones(4)) for row in ids]
    weights = BAG_WEIGHTS if kind == "Bags with weights" else None
    bags = mx_adagrad.Bags(BAG_IDS, BAG_OFFSETS, weights)
    ones = np.ones(len(BAG_IDS)) if weights is None else weights.astype(np.float64)
    return bags, [(BAG_IDS[s:e], ones[s:e]) for s, e in itertools.pairwise(BAG_OFFSETS)]


BAG_CASES = [
    ("sum", "array"),
    ("mean", "array"),
    ("sum", "Bags"),
    ("mean", "Bags"),
    ("sum", "Bags with weights"),
]


@pytest.mark.parametrize(("mode", "kind"), BAG_CASES, ids=[f"{m}-{k}" for m, k in BAG_CASES])
def test_embed_bag_pools_as_the_float64_transcription(mode, kind):
    bag = mxf.EmbedBag(BAG_ROWS, BAG_DIM, mode, rngs=nnx.Rngs(0))
    bags, python_bags = bag_inputs(kind)
    pooled = bag(bags)
    assert pooled.shape == (len(python_bags), BAG_DIM) and pooled.dtype == jnp.float32
    want = numpy_pool(bag.embedding[...], python_bags, mode)
    np.testing.assert_allclose(pooled, want, rtol=1e-6, atol=1e-6)  # float32 sums of <= 4 rows
    # Outside value_and_grad it is embedding_bag of its table, bit for bit.
    assert_bitwise(pooled, mx_adagrad.embedding_bag(bag.embedding[...], bags, mode))


def test_embed_bag_table_is_initialized_like_nnx_embed():
    ours, theirs = mxf.EmbedBag(50, 6, rngs=nnx.Rngs(3)), nnx.Embed(50, 6, rngs=nnx.Rngs(3))
    assert_bitwise(ours.embedding[...], theirs.embedding[...])
    half = mxf.EmbedBag(50, 6, param_dtype=jnp.bfloat16, dtype=jnp.float32, rngs=nnx.Rngs(3))
    assert half.embedding.dtype == jnp.bfloat16
    assert half(jnp.array([[1, 2]])).dtype == jnp.float32  # pooled in bfloat16, then promoted


class Bagged(nnx.Module):
    """Two EmbedBag tables, ``user`` called twice, and a Linear on the pooled rows."""

    def __init__(self, rngs):
        self.user = mxf.EmbedBag(BAG_ROWS, BAG_DIM, rngs=rngs)
        self.item = mxf.EmbedBag(BAG_ROWS // 2, BAG_DIM, "mean", rngs=rngs)
        self.linear = nnx.Linear(2 * BAG_DIM, 1, rngs=rngs)

    def __call__(self, user, item, extra):
        pooled = jnp.concatenate([self.user(user), self.item(item)], axis=1)
        return self.linear(jnp.tanh(pooled))[:, 0], self.user(extra)


def bagged_inputs():
    user, _ = bag_inputs("array")
    item = jnp.array([[1, 2, -1], [2, 2, 2], [BAG_ROWS // 2, 0, 149]])  # 150 is padding there
    return user, item, jnp.array([1.0, 0.0, 1.0])


def bagged_loss(model, weights=BAG_WEIGHTS):
    user, item, labels = bagged_inputs()
    logits, extra = model(user, item, mx_adagrad.Bags(BAG_IDS, BAG_OFFSETS, weights))
    return logistic(logits, labels) + 0.1 * jnp.sum(jnp.sin(extra))


def test_value_and_grad_gives_embed_bag_tables_a_bag_grad_of_nnx_grads_dense_gradient():
    model = Bagged(nnx.Rngs(0))
    loss, grads = mxf.value_and_grad(bagged_loss)(model)
    want_loss, want = nnx.value_and_grad(bagged_loss)(model)
    assert_bitwise(loss, want_loss)
    assert_bitwise(nnx.as_pure(grads["linear"]), nnx.as_pure(want["linear"]))
    for name, rows in (("user", BAG_ROWS), ("item", BAG_ROWS // 2)):
        grad = grads[name]["embedding"].get_value()
        assert isinstance(grad, mx_adagrad.BagGrad) and grad.dense_shape == (rows, BAG_DIM)
        # nnx.grad scatter-adds the terms into the table, todense in its own order: a few ulps.
        np.testing.assert_allclose(
            grad.todense(), want[name]["embedding"][...], rtol=1e-6, atol=1e-9
        )
    # user's two calls, concatenated: 3 bags of 4 ids, then the 4 weighted bags numbered from 3.
    user, _, _ = bagged_inputs()
    grad = grads["user"]["embedding"].get_value()
    np.testing.assert_array_equal(grad.indices, np.concatenate([np.ravel(user), BAG_IDS]))
    np.testing.assert_array_equal(grad.bag, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 + [5] * 4 + [6])
    ids = np.concatenate([np.ravel(user), BAG_IDS])
    weights = np.concatenate([np.ones(12), BAG_WEIGHTS])
    np.testing.assert_array_equal(grad.scale, np.where((ids >= 0) & (ids < BAG_ROWS), weights, 0))
    assert grad.bag_grads.shape == (3 + 4, BAG_DIM)
    item_scale = grads["item"]["embedding"].get_value().scale
    np.testing.assert_allclose(item_scale, [0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0.5, 0.5])
    assert_bitwise(
        mxf.grad(bagged_loss)(model)["linear"]["kernel"][...], want["linear"]["kernel"][...]
    )


def test_value_and_grad_passes_the_gradient_of_bag_weights_on():
    """Differentiated weights of a weighted bag get embedding_bag's gradient, as under nnx."""
    model, weights = Bagged(nnx.Rngs(1)), jnp.asarray(BAG_WEIGHTS)
    _, (grads, weights_grad) = mxf.value_and_grad(bagged_loss, argnums=(0, 1))(model, weights)
    _, (want, want_weights) = nnx.value_and_grad(bagged_loss, argnums=(0, 1))(model, weights)
    assert_bitwise(weights_grad, want_weights)
    assert np.any(np.asarray(weights_grad))
    np.testing.assert_allclose(
        grads["user"]["embedding"].get_value().todense(),
        want["user"]["embedding"][...],
        rtol=1e-6,
        atol=1e-9,
    )


TWO_TABLE_ROWS = {"user": 400, "item": 250}


class TwoBagTables(nnx.Module):
    """The model of the training tests: two EmbedBag tables, one bag array and one Bags per
    example, and a Linear on their pooled rows; ``params`` is it as a plain pytree."""

    def __init__(self, rngs):
        self.user = mxf.EmbedBag(TWO_TABLE_ROWS["user"], BAG_DIM, rngs=rngs)
        self.item = mxf.EmbedBag(TWO_TABLE_ROWS["item"], BAG_DIM, "mean", rngs=rngs)
        self.linear = nnx.Linear(2 * BAG_DIM, 1, rngs=rngs)

    def __call__(self, user, item):
        return two_table_logits(self.user(user), self.item(item), self.linear)

    def params(self) -> dict:
        return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(self, nnx.Param)))


def two_table_logits(user, item, linear):
    pooled = jnp.tanh(jnp.concatenate([user, item], axis=1))
    if isinstance(linear, dict):
        return pooled @ linear["kernel"][:, 0] + linear["bias"][0]
    return linear(pooled)[:, 0]


TWO_TABLES = ("user/embedding", "item/embedding")


def two_table_plain_loss(params, pooled, labels):
    logits = two_table_logits(pooled[TWO_TABLES[0]], pooled[TWO_TABLES[1]], params["linear"])
    return logistic(logits, labels)


def two_table_batches(count: int, batch: int = 16):
    """Zipf ids (rows past half of each table never looked up), padding, bags of 0..4 ids."""
    rng = np.random.default_rng(4)
    out = []
    for _ in range(count):
        rows = TWO_TABLE_ROWS
        user = (rng.zipf(1.3, (batch, 3)) - 1) % (rows["user"] // 2)
        user[rng.random(user.shape) < 0.2] = -1
        n = 3 * batch
        ids = (rng.zipf(1.3, n) - 1) % (rows["item"] // 2)
        ids[rng.random(n) < 0.1] = rows["item"]
        offsets = np.concatenate([[0], np.sort(rng.integers(0, n + 1, batch - 1)), [n]])
        item = mx_adagrad.Bags(jnp.asarray(ids, jnp.int32), jnp.asarray(offsets, jnp.int32))
        labels = jnp.asarray(rng.integers(0, 2, batch), jnp.float32)
        out.append((jnp.asarray(user, jnp.int32), item, labels))
    return out


def numpy_adagrad_step(weight, grad, history, lr, epsilon, rowwise):
    """float64: ``h += g**2`` (row-wise: the mean of the row's ``g**2``, below two axes
    element-wise); ``w -= lr * g / (sqrt(h) + epsilon)``."""
    square = grad**2
    if rowwise and grad.ndim >= 2:
        history = history + square.mean(axis=tuple(range(1, grad.ndim)))
        root = (np.sqrt(history) + epsilon).reshape(-1, *[1] * (grad.ndim - 1))
    else:
        history = history + square
        root = np.sqrt(history) + epsilon
    return weight - lr * grad / root, history


@pytest.mark.parametrize("rowwise", [False, True], ids=["fused_adagrad", "fused_rowwise_adagrad"])
def test_embed_bag_training_equals_value_and_bag_grad_and_the_float64_reference(rowwise):
    lr, epsilon = 0.1, 1e-6
    fused = (flat.fused_rowwise_adagrad if rowwise else flat.fused_adagrad)(lr, epsilon)
    model = TwoBagTables(nnx.Rngs(0))
    initial = model.params()
    optimizer = mxf.Optimizer(model, fused)

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, user, item, labels):
        def loss_fn(model):
            return logistic(model(user, item), labels)

        loss, grads = mxf.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    grad_fn = mx_adagrad.value_and_bag_grad(
        two_table_plain_loss, TWO_TABLES, mode={TWO_TABLES[0]: "sum", TWO_TABLES[1]: "mean"}
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def plain_step(params, state, user, item, labels):
        bags = {TWO_TABLES[0]: user, TWO_TABLES[1]: item}
        loss, grads = grad_fn(params, bags, labels)
        return (*fused.step(params, grads, state), loss, grads)

    params = jax.tree.map(jnp.asarray, initial)
    state = fused.init(params)
    reference = jax.tree.map(lambda w: np.asarray(w, np.float64), initial)
    histories = jax.tree.map(
        lambda w: np.zeros(w.shape[:1] if rowwise and w.ndim >= 2 else w.shape), reference
    )
    for user, item, labels in two_table_batches(4):
        loss = step(model, optimizer, user, item, labels)
        params, state, plain_loss, grads = plain_step(params, state, user, item, labels)
        assert_bitwise(loss, plain_loss)
        dense = jax.tree.map(
            lambda g: np.asarray(g.todense() if isinstance(g, mx_adagrad.BagGrad) else g, float),
            grads,
            is_leaf=lambda g: isinstance(g, mx_adagrad.BagGrad),
        )
        stepped = jax.tree.map(
            lambda w, g, h: numpy_adagrad_step(w, g, h, lr, epsilon, rowwise),
            reference,
            dense,
            histories,
        )
        reference = jax.tree.map(lambda _, s: s[0], reference, stepped)
        histories = jax.tree.map(lambda _, s: s[1], histories, stepped)
    # NNX and plain pytrees: the same program, bit for bit.
    assert_bitwise(model.params(), params)
    assert_bitwise(nnx.as_pure(optimizer.opt_state), state)
    # The float64 reference, from the float32 run's gradients: float32 rounding over 4 steps.
    history = optax.tree_utils.tree_get(state, "history")
    for path, (actual, want) in zip(
        ("params", "history"), ((params, reference), (history, histories))
    ):
        for got, expected in zip(jax.tree.leaves(actual), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=path)
    # The rows no bag touched: bit-identical, history zero.
    for name, rows in TWO_TABLE_ROWS.items():
        table = params[name]["embedding"]
        assert_bitwise(table[rows // 2 :], initial[name]["embedding"][rows // 2 :])
        assert not np.any(np.asarray(history[name]["embedding"][rows // 2 :]))


@pytest.mark.parametrize(
    "tx",
    [
        flat.fused_adagrad(0.1, wd=1e-4),
        flat.fused_rowwise_adagrad(0.1, wd=1e-4),
        mx_adagrad.rowwise_adagrad(0.1, wd=1e-4),
    ],
    ids=["fused_adagrad", "fused_rowwise_adagrad", "rowwise_adagrad"],
)
def test_embed_bag_one_pass_step_is_the_native_sparse_kernel_without_per_lookup_rows(tx):
    rows, dim, batch, length = 1 << 16, 32, 64, 16

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.bag = mxf.EmbedBag(rows, dim, "mean", rngs=rngs)
            self.w = nnx.Param(jnp.ones(dim))

        def __call__(self, bags):
            return self.bag(bags) @ self.w[...]

    model = Model(nnx.Rngs(0))
    optimizer = mxf.Optimizer(model, tx)
    assert optimizer.one_pass is not None

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, bags, labels):
        loss, grads = mxf.value_and_grad(lambda m: logistic(m(bags), labels))(model)
        optimizer.update(model, grads)
        return loss

    bags = jnp.zeros((batch, length), jnp.int32)
    compiled = step.lower(model, optimizer, bags, jnp.zeros(batch)).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    table_bytes, lookup_rows_bytes = rows * dim * 4, batch * length * dim * 4
    if _native.load():
        targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
        assert "mx_adagrad_sparse_step_f32" in targets
        # Neither the table-sized gradient (8 MiB) nor a row per lookup (128 KiB): what remains
        # is the bags' ids, bag and scale (4 KiB each) and the pooled rows and their gradient.
        assert temporaries < lookup_rows_bytes // 2 < table_bytes // 64, temporaries
    else:  # the XLA program: a row per lookup, still nothing table-sized
        assert temporaries < table_bytes // 16, temporaries


def test_embed_bag_checks_its_arguments():
    with pytest.raises(ValueError, match=r"flax\.EmbedBag: mode must be one of 'sum', 'mean'"):
        mxf.EmbedBag(10, 3, "max", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"flax\.EmbedBag: num_embeddings must be an int >= 1"):
        mxf.EmbedBag(0, 3, rngs=nnx.Rngs(0))
    bag = mxf.EmbedBag(10, 3, "mean", rngs=nnx.Rngs(0))
    one_dimensional = r"flax\.EmbedBag: bags must be a 2-D integer array, got int32\[3\]"
    with pytest.raises(ValueError, match=one_dimensional):
        bag(jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=one_dimensional):  # and inside value_and_grad
        mxf.value_and_grad(lambda m: m(jnp.array([1, 2, 3])).sum())(bag)
    with pytest.raises(ValueError, match=r"bags must be a 2-D integer array, got float32\[1, 2\]"):
        bag(jnp.ones((1, 2)))
    with pytest.raises(ValueError, match=r"flax\.EmbedBag: mode must be 'sum' for Bags with"):
        bag(mx_adagrad.Bags(BAG_IDS, BAG_OFFSETS, BAG_WEIGHTS))


def test_value_and_grad_refuses_whole_table_reads_of_an_embed_bag():
    class Reads(nnx.Module):
        def __init__(self, rngs):
            self.bag = mxf.EmbedBag(10, 4, rngs=rngs)

        def __call__(self, bags):
            return (self.bag(bags) @ self.bag.embedding[...].T).sum()

    with pytest.raises(
        ValueError,
        match=r"the EmbedBag table args\[0\]\.bag\.embedding must be read by the loss through "
        r"EmbedBag\.__call__ only",
    ):
        mxf.value_and_grad(lambda m: m(jnp.array([[1, 2]])))(Reads(nnx.Rngs(0)))

    bag = mxf.EmbedBag(10, 4, rngs=nnx.Rngs(0))

    def scanned(bag):
        def body(carry, bags):
            return carry + bag(bags).sum(), None

        return jax.lax.scan(body, 0.0, jnp.array([[[1, 2]], [[3, 4]]]))[0]

    with pytest.raises(ValueError, match="every EmbedBag lookup must be made in f itself"):
        mxf.value_and_grad(scanned)(bag)


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
