"""Embedding bags (mx_adagrad.bags): the pooled lookup, its never-expanded gradient and the steps
that take it, against float64 transcriptions (tests/reference.py), against the expanded RowSparse
(bit for bit), against FBGEMM's table-batched embeddings and torch's EmbeddingBag + Adagrad, and
the compiled train step's memory and native calls.

The XLA path is the one ``MX_ADAGRAD_NATIVE=0`` selects: the ``xla_path`` context sets it and
reloads ``mx_adagrad._native.load`` (cached per process) for the length of a block, so the code
under test takes the XLA programs in this process; functions jitted inside the block are fresh,
so no trace of the native path is reused. Where the native kernels are compared with XLA,
``assert_xla_bits`` asks for the same bits on the pinned jaxlib (tests/xla_bits.py)."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import mx_adagrad
from mx_adagrad import _native, bags, flat
from tests import reference
from tests.xla_bits import assert_xla_bits

ROOT = Path(__file__).resolve().parent.parent
F32_EPS = 2.0**-24  # float32 unit roundoff

native_only = pytest.mark.skipif(
    not _native.load(), reason="the native kernels are unavailable here (no C++ compiler?)"
)


@contextlib.contextmanager
def xla_path():
    """Inside: ``MX_ADAGRAD_NATIVE=0``, with ``_native.load`` reloaded so that it reads it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MX_ADAGRAD_NATIVE", "0")
        patch.setattr(_native, "load", functools.cache(_native.load.__wrapped__))
        assert not _native.load()
        yield


def x64_if(id_dtype):
    """int64 ids exist in JAX only with x64 enabled."""
    return jax.enable_x64(True) if id_dtype == np.int64 else contextlib.nullcontext()


def custom_calls(compiled) -> list[str]:
    return re.findall(r'custom_call_target="(mx_adagrad_\w+)"', compiled.as_text())


def skewed_ids(rng, shape, rows, padding=True):
    """Embedding-lookup-like ids: skewed (many duplicates, within and across bags), and with
    ``padding`` some ids outside ``[0, rows)``: -2, -1, rows and rows + 1."""
    if not padding:
        return (rng.zipf(1.3, shape) - 1) % rows
    return (rng.zipf(1.3, shape) - 1) % (rows + 4) - 2


def jagged_offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


# Bag lengths with empty bags first, last and in a run (repeated offsets).
LENGTHS = [0, 3, 1, 0, 0, 6, 2, 5, 0]


def bag_problem(rng, form, mode, id_dtype=np.int32, rows=30, dim=5):
    """A table and its bags in ``form`` ("(B, L)" or "Bags"), and ``(ids, offsets, weights)`` for
    the transcription (offsets None for (B, L)); every kind of padding and empty bag."""
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    if form == "(B, L)":
        ids = skewed_ids(rng, (7, 6), rows).astype(id_dtype)
        ids[2] = [-1, rows, -2, rows + 1, -1, -1]  # all padding: an empty bag
        ids[4] = [3, 3, 3, -1, 3, 5]  # a duplicate within a bag
        return table, jnp.asarray(ids), (ids, None, None)
    ids = skewed_ids(rng, sum(LENGTHS), rows).astype(id_dtype)
    ids[:4] = [4, -1, 4, rows]  # bag 1: a duplicate and padding; bag 2: padding only
    offsets = jagged_offsets(LENGTHS).astype(id_dtype)
    weights = rng.uniform(-2.0, 2.0, ids.size).astype(np.float32) if mode == "weighted" else None
    return table, mx_adagrad.Bags(ids, offsets, weights), (ids, offsets, weights)


def pool_mode(mode: str) -> str:
    return "sum" if mode == "weighted" else mode


POOL_CASES = [
    ("(B, L)", "sum"),
    ("(B, L)", "mean"),
    ("Bags", "sum"),
    ("Bags", "mean"),
    ("Bags", "weighted"),
]


def pooling_bound(table, ids, offsets, weights, mode, terms):
    """How far float32 pooling may be from the float64 sums: each of at most ``terms`` products
    rounded, each addition rounded (and 1 / count rounded in the mean): ``(terms + 2) * 2**-24``
    times the sum of the terms' magnitudes."""
    magnitude = reference.pool_bags(
        np.abs(table), ids, offsets, None if weights is None else np.abs(weights), mode
    )
    return (terms + 2) * F32_EPS * magnitude


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize(("form", "mode"), POOL_CASES, ids=[f"{f} {m}" for f, m in POOL_CASES])
def test_pooling_matches_the_float64_transcription_on_the_native_and_xla_paths(
    form, mode, id_dtype
):
    """sum, mean over the non-padding ids, weighted sum; padding ids (negative and >= rows),
    empty bags, duplicates within and across bags, jagged offsets. The native pooled lookup is
    the XLA program's bits (both the whole XLA path and ``_pool_xla`` called directly)."""
    rng = np.random.default_rng(len(form) + len(mode))
    with x64_if(id_dtype):
        table, bag_input, (ids, offsets, weights) = bag_problem(rng, form, mode, id_dtype)
        assert jax.tree.leaves(bag_input)[0].dtype == id_dtype
        want = reference.pool_bags(table, ids, offsets, weights, mode)
        bound = pooling_bound(table, ids, offsets, weights, mode, terms=6)

        def pool(t, b):
            return mx_adagrad.embedding_bag(t, b, pool_mode(mode))

        results = {}
        if _native.load():
            compiled = jax.jit(pool).lower(table, bag_input).compile()
            assert "mx_adagrad_bag_pool_f32" in custom_calls(compiled)
            results["native"] = compiled(table, bag_input)
            results["_pool_xla"] = jax.jit(
                lambda t, b: bags._pool_xla(t, bags.lookup("test", t, b, pool_mode(mode)))
            )(table, bag_input)
        with xla_path():
            compiled = jax.jit(lambda t, b: pool(t, b)).lower(table, bag_input).compile()
            assert custom_calls(compiled) == []
            results["xla"] = compiled(table, bag_input)
    counts = np.diff(offsets) if offsets is not None else None
    for name, got in results.items():
        assert got.dtype == jnp.float32 and got.shape == want.shape, name
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound), name
        if counts is not None:
            np.testing.assert_array_equal(np.asarray(got)[counts == 0], 0.0)  # empty bags
    # The all-padding bag of the (B, L) form pools to zeros too.
    if form == "(B, L)":
        np.testing.assert_array_equal(np.asarray(results["xla"])[2], 0.0)
    if "native" in results:
        assert_xla_bits(results["native"], results["xla"])
        assert_xla_bits(results["native"], results["_pool_xla"])


@pytest.mark.parametrize("path", ["native", "xla"])
def test_bags_without_ids_pool_to_zeros(path):
    """No ids at all (every bag empty: offsets all 0), and no bag: the shapes stay (bags, dim)."""
    if path == "native" and not _native.load():
        pytest.skip("the native kernels are unavailable here")
    table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
    cases = {
        "3 empty bags": (mx_adagrad.Bags(jnp.zeros(0, jnp.int32), jnp.zeros(4, jnp.int32)), 3),
        "no bag": (mx_adagrad.Bags(jnp.zeros(0, jnp.int32), jnp.zeros(1, jnp.int32)), 0),
        "(0, 4)": (jnp.zeros((0, 4), jnp.int32), 0),
    }
    context = xla_path() if path == "xla" else contextlib.nullcontext()
    with context:
        for name, (bag_input, num_bags) in cases.items():
            for mode in ("sum", "mean"):
                got = jax.jit(lambda t, b, m=mode: mx_adagrad.embedding_bag(t, b, m))(
                    table, bag_input
                )
                assert got.shape == (num_bags, 4), (name, mode, got.shape)
                np.testing.assert_array_equal(got, 0.0)


def test_bags_of_length_zero_pool_to_one_zero_row_per_bag():
    """(B, 0) ids: B bags, each empty, as for Bags with B + 1 zero offsets (the shape of the
    pooled rows is (B, dim) whatever the length)."""
    table = jnp.ones((10, 4), jnp.float32)
    for mode in ("sum", "mean"):
        got = mx_adagrad.embedding_bag(table, jnp.zeros((3, 0), jnp.int32), mode)
        assert got.shape == (3, 4), (mode, got.shape)
        np.testing.assert_array_equal(got, 0.0)


@pytest.mark.parametrize("path", ["native", "xla"])
@pytest.mark.parametrize(("form", "mode"), POOL_CASES, ids=[f"{f} {m}" for f, m in POOL_CASES])
def test_grad_through_embedding_bag_is_the_transposed_pooling(form, mode, path):
    """``jax.grad`` of ``sum(pooled * r)`` with respect to the table is the dense scatter of
    ``scale[i] * r[bag[i]]`` at the valid ids (the transcription's transpose)."""
    if path == "native" and not _native.load():
        pytest.skip("the native kernels are unavailable here")
    rng = np.random.default_rng(7)
    table, bag_input, (ids, offsets, weights) = bag_problem(rng, form, mode)
    r = rng.normal(size=(len(reference.flat_bags(ids, offsets)[1]) - 1, 5)).astype(np.float32)
    context = xla_path() if path == "xla" else contextlib.nullcontext()
    with context:
        got = jax.jit(
            jax.grad(lambda t: jnp.sum(mx_adagrad.embedding_bag(t, bag_input, pool_mode(mode)) * r))
        )(table)
    want = reference.bag_table_grad(table.shape, ids, offsets, weights, mode, r)
    # Each row a float32 sum of at most 7 rounded products (a row's ids; 1 / count rounded).
    abs_weights = None if weights is None else np.abs(weights)
    bound = (
        9
        * F32_EPS
        * reference.bag_table_grad(table.shape, ids, offsets, abs_weights, mode, np.abs(r))
    )
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)
    untouched = np.setdiff1d(np.arange(len(table)), np.asarray(ids).reshape(-1))
    np.testing.assert_array_equal(np.asarray(got)[untouched], 0.0)


@pytest.mark.parametrize("path", ["native", "xla"])
def test_grad_of_bag_weights_is_the_dot_product_of_each_row_with_its_bag_gradient(path):
    """``jax.grad`` with respect to ``Bags.weights`` (and the table, together): ``d w[i] =
    <r[bag[i]], table[ids[i]]>``, 0 at padding ids."""
    if path == "native" and not _native.load():
        pytest.skip("the native kernels are unavailable here")
    rng = np.random.default_rng(8)
    table, bag_input, (ids, offsets, weights) = bag_problem(rng, "Bags", "weighted")
    r = rng.normal(size=(len(offsets) - 1, 5)).astype(np.float32)

    def loss(t, w):
        pooled = mx_adagrad.embedding_bag(t, mx_adagrad.Bags(bag_input.ids, bag_input.offsets, w))
        return jnp.sum(pooled * r)

    context = xla_path() if path == "xla" else contextlib.nullcontext()
    with context:
        d_table, d_weights = jax.jit(jax.grad(loss, argnums=(0, 1)))(table, weights)
    want = reference.bag_weights_grad(table, ids, offsets, r)
    # A float32 dot product of 5 rounded products: (5 + 1) * 2**-24 of the sum of magnitudes.
    bound = 6 * F32_EPS * reference.bag_weights_grad(np.abs(table), ids, offsets, np.abs(r))
    assert np.all(np.abs(np.asarray(d_weights, np.float64) - want) <= bound)
    np.testing.assert_array_equal(np.asarray(d_weights)[(ids < 0) | (ids >= len(table))], 0.0)
    want_table = reference.bag_table_grad(table.shape, ids, offsets, weights, "sum", r)
    bound = (
        9
        * F32_EPS
        * reference.bag_table_grad(table.shape, ids, offsets, np.abs(weights), "sum", np.abs(r))
    )
    assert np.all(np.abs(np.asarray(d_table, np.float64) - want_table) <= bound)


# Steps: the float64 transcription, applied lazily to the summed rows of the bag gradients.

VARIANTS = {
    "element-wise": (flat.fused_adagrad, mx_adagrad.adagrad, False),
    "row-wise": (flat.fused_rowwise_adagrad, mx_adagrad.rowwise_adagrad, True),
}

STEP_CONFIGS = {
    "defaults": dict(),
    "rescale, clip": dict(rescale_grad=0.5, clip_gradient=0.4),
    "lazy wd": dict(wd=0.05),
    "lr_mult, epsilon": dict(lr_mult={"user": 0.5}, epsilon=1e-3),
}

TABLE_SHAPES = {"user": (60, 4), "item": (80, 20)}  # 20 wide: more than the kernels' 16 lanes
MODES = {"user": "mean", "item": "sum"}


def two_table_bags(rng):
    """A (B, L) batch of the user table (mean) and jagged weighted Bags of the item table."""
    user = skewed_ids(rng, (8, 3), TABLE_SHAPES["user"][0]).astype(np.int32)
    lengths = [2, 0, 4, 1, 3, 0, 5, 1]
    item = skewed_ids(rng, sum(lengths), TABLE_SHAPES["item"][0]).astype(np.int32)
    offsets = jagged_offsets(lengths).astype(np.int32)
    weights = rng.uniform(0.2, 1.5, item.size).astype(np.float32)
    model = {"user": jnp.asarray(user), "item": mx_adagrad.Bags(item, offsets, weights)}
    transcription = {"user": (user, None, None), "item": (item, offsets, weights)}
    return model, transcription


def linear_loss(params, pooled, r):
    """``sum(pooled * r)``: its gradient with respect to the pooled rows is ``r``, exactly."""
    del params
    return sum(jnp.sum(pooled[k] * r[k]) for k in sorted(pooled))


def bag_train_step(opt, form):
    """A jitted train step: the bag gradients of ``linear_loss``, then ``opt.step`` (a one-pass
    form) or, for ``form="optax"``, ``opt.update`` + ``apply_updates`` (a transformation)."""
    grad_fn = mx_adagrad.value_and_bag_grad(linear_loss, list(TABLE_SHAPES), mode=MODES)

    @jax.jit
    def step(params, state, bag_inputs, r):
        _, grads = grad_fn(params, bag_inputs, r)
        if form == "one-pass":
            return opt.step(params, grads, state)
        updates, state = opt.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("form", ["one-pass", "optax"])
@pytest.mark.parametrize("config", STEP_CONFIGS.values(), ids=STEP_CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_bag_steps_match_the_float64_lazy_transcription(variant, config, form):
    """Several steps of two tables (a mean over (B, L) bags, a weighted sum over jagged Bags, with
    padding, empty bags and duplicates): the touched rows follow the float64 step of their summed
    gradient (lazy weight decay included), the other rows keep their bits."""
    fused, alias, rowwise = VARIANTS[variant]
    opt = fused(0.1, **config) if form == "one-pass" else alias(0.1, **config)
    rng = np.random.default_rng(11)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in TABLE_SHAPES.items()}
    start = {k: np.asarray(v) for k, v in params.items()}
    want = {
        k: (v.astype(np.float64), np.zeros(v.shape[:1] if rowwise else v.shape))
        for k, v in start.items()
    }
    r = {k: rng.normal(size=(8, s[1])).astype(np.float32) for k, s in TABLE_SHAPES.items()}
    state, step = opt.init(params), bag_train_step(opt, form)
    hyper = {k: v for k, v in config.items() if k != "lr_mult"}
    touched = {k: set() for k in TABLE_SHAPES}
    for _ in range(5):
        model_bags, transcription = two_table_bags(rng)
        params, state = step(params, state, model_bags, r)
        for k, (ids, offsets, weights) in transcription.items():
            lr_mult = config.get("lr_mult", {}).get(k, 1.0)
            want[k] = reference.lazy_bag_step(
                *want[k],
                ids,
                offsets,
                weights,
                MODES[k],
                r[k],
                rowwise=rowwise,
                lr=0.1,
                lr_mult=lr_mult,
                **hyper,
            )
            valid = ids[(ids >= 0) & (ids < TABLE_SHAPES[k][0])]
            touched[k].update(valid.tolist())
    history = state[3].history
    for k in TABLE_SHAPES:
        # The gradient is exact (r), summed in float32 over a few terms; a dozen float32
        # operations per step, 5 steps: 1e-5 of the scale, as every step test of the package.
        assert reference.relative_error(params[k], want[k][0]) <= 1e-5, k
        assert reference.relative_error(history[k], want[k][1]) <= 1e-5, k
        untouched = np.setdiff1d(np.arange(TABLE_SHAPES[k][0]), sorted(touched[k]))
        assert untouched.size > 0
        np.testing.assert_array_equal(np.asarray(params[k])[untouched], start[k][untouched])
        np.testing.assert_array_equal(np.asarray(history[k])[untouched], 0.0)


# Bit for bit: the one-pass step on a BagGrad, its optax form, and both on grad.expand().


@functools.cache
def step_forms(variant, hyper):
    """The one-pass step and the optax form of ``variant`` with ``hyper``, jitted once."""
    opt = VARIANTS[variant][0](**dict(hyper))

    def optax_form(params, grads, state):
        updates, state = opt.tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return opt, jax.jit(opt.step), jax.jit(optax_form)


@st.composite
def bag_tables(draw):
    """One table with its bags: small shapes (so that compilations repeat), ids with padding and
    duplicates, (B, L) or jagged Bags, sum, mean or weighted sum."""
    rows = draw(st.sampled_from([1, 6, 40]))
    dim = draw(st.sampled_from([1, 3, 16, 21]))
    form = draw(st.sampled_from(["(B, L)", "Bags"]))
    mode = draw(st.sampled_from(["sum", "mean", "weighted"] if form == "Bags" else ["sum", "mean"]))
    one_id = st.one_of(st.integers(-2, rows + 1), st.sampled_from([0, rows - 1, -1, rows]))
    if form == "(B, L)":
        num_bags, length = draw(st.integers(1, 5)), draw(st.integers(1, 4))
        ids = draw(st.lists(one_id, min_size=num_bags * length, max_size=num_bags * length))
        return rows, dim, mode, np.array(ids, np.int32).reshape(num_bags, length), None
    lengths = draw(st.lists(st.integers(0, 4), max_size=5))
    ids = draw(st.lists(one_id, min_size=sum(lengths), max_size=sum(lengths)))
    return rows, dim, mode, np.array(ids, np.int32), jagged_offsets(lengths).astype(np.int32)


HYPERPARAMETERS = st.fixed_dictionaries(
    {
        "learning_rate": st.sampled_from([0.1, 0.7]),
        "epsilon": st.sampled_from([1e-6, 1e-3]),
        "rescale_grad": st.sampled_from([1.0, 0.5]),
        "clip_gradient": st.sampled_from([None, 0.4]),
        "wd": st.sampled_from([0.0, 0.05]),
        "initial_accumulator_value": st.sampled_from([0.0, 0.1]),
    }
)


# No shrinking: each candidate compiles four programs (a failure took 100 s to shrink); the
# two smallest cases it has found are the two tests after this one.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    tables=st.lists(bag_tables(), min_size=1, max_size=2),
    variant=st.sampled_from(list(VARIANTS)),
    hyper=HYPERPARAMETERS,
    seed=st.integers(0, 2**16),
)
def test_one_pass_bag_step_is_bitwise_its_optax_form_and_the_steps_on_the_expanded_rows(
    tables, variant, hyper, seed
):
    """Two steps of one or two tables: ``opt.step`` on the BagGrads equals ``tx.update`` +
    ``apply_updates`` on them, and both on ``grad.expand()`` (the RowSparse of a row per id)."""
    rng = np.random.default_rng(seed)
    params, bag_inputs, modes = {}, {}, {}
    for k, (rows, dim, mode, ids, offsets) in enumerate(tables):
        name = f"t{k}"
        params[name] = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
        if offsets is None:
            bag_inputs[name] = jnp.asarray(ids)
        else:
            weights = rng.normal(size=ids.size).astype(np.float32) if mode == "weighted" else None
            bag_inputs[name] = mx_adagrad.Bags(ids, offsets, weights)
        modes[name] = pool_mode(mode)
    grad_fn = mx_adagrad.value_and_bag_grad(linear_loss, list(params), mode=modes)
    opt, one_pass, optax_form = step_forms(variant, tuple(sorted(hyper.items())))
    state = opt.init(params)
    for _ in range(2):
        r = {
            k: jnp.asarray(rng.normal(size=(num_bags(bag_inputs[k]), p.shape[1])), jnp.float32)
            for k, p in params.items()
        }
        _, grads = grad_fn(params, bag_inputs, r)
        assert all(isinstance(g, mx_adagrad.BagGrad) for g in grads.values())
        expanded = {k: g.expand() for k, g in grads.items()}
        want = one_pass(params, grads, state)
        assert_xla_bits(optax_form(params, grads, state), want)
        assert_xla_bits(one_pass(params, expanded, state), want)
        assert_xla_bits(optax_form(params, expanded, state), want)
        params, state = want


@pytest.mark.parametrize("kind", ["BagGrad", "RowSparse"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_one_pass_step_of_one_id_into_a_one_column_table_is_its_optax_form(variant, kind):
    """The smallest case the property test above finds: one id (one slot), a table of one
    column, rescale_grad != 1 and no clip; 50 random draws, each the same bits both ways."""
    rng = np.random.default_rng(5)
    opt, one_pass, optax_form = step_forms(
        variant, (("initial_accumulator_value", 0.1), ("learning_rate", 0.1), ("rescale_grad", 0.5))
    )
    for _ in range(50):
        table = jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(1, 1)), jnp.float32)
        ids = jnp.array([2], jnp.int32)
        if kind == "BagGrad":
            grad = mx_adagrad.BagGrad(ids, jnp.zeros(1, jnp.int32), jnp.ones(1), values, (4, 1))
        else:
            grad = mx_adagrad.RowSparse(ids, values, (4, 1))
        state = opt.init(table)
        assert_xla_bits(one_pass(table, grad, state), optax_form(table, grad, state))


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_the_optax_form_decays_a_bag_grad_of_one_id_as_its_expanded_row_sparse(wd):
    """The other case the property test finds: a BagGrad of one id (one slot, which coalesce
    leaves to XLA) with weight decay; its term ``scale * bag_grads[bag]`` must be rounded as
    ``expand()`` rounds it, before the decay is added. 50 random draws."""
    rng = np.random.default_rng(6)
    tx = mx_adagrad.adagrad(0.1, wd=wd)

    @jax.jit
    def optax_form(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    for _ in range(50):
        table = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
        scale = jnp.asarray(rng.uniform(0.1, 2.0, 1), jnp.float32)
        bag_grads = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
        grad = mx_adagrad.BagGrad(jnp.array([7]), jnp.array([1]), scale, bag_grads, (40, 5))
        state = tx.init(table)
        assert_xla_bits(optax_form(table, grad, state), optax_form(table, grad.expand(), state))


@native_only
def test_int64_ids_step_as_int32_ids():
    """The same bags with int64 ids (x64): the same pooled rows, gradient and one-pass step."""
    rng = np.random.default_rng(9)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in TABLE_SHAPES.items()}
    model_bags, _ = two_table_bags(rng)
    r = {k: jnp.asarray(rng.normal(size=(8, s[1])), jnp.float32) for k, s in TABLE_SHAPES.items()}
    results = []
    for id_dtype in (np.int32, np.int64):
        with x64_if(id_dtype):
            opt = flat.fused_rowwise_adagrad(0.1, wd=0.01)
            item = model_bags["item"]
            inputs = {
                "user": jnp.asarray(np.asarray(model_bags["user"]).astype(id_dtype)),
                "item": mx_adagrad.Bags(
                    np.asarray(item.ids).astype(id_dtype),
                    np.asarray(item.offsets).astype(id_dtype),
                    item.weights,
                ),
            }
            assert inputs["user"].dtype == id_dtype and inputs["item"].ids.dtype == id_dtype
            step = bag_train_step(opt, "one-pass")
            results.append(jax.device_get(step(params, opt.init(params), inputs, r)))
    assert_xla_bits(*results)


def num_bags(bag_input) -> int:
    return bag_input.num_bags if isinstance(bag_input, mx_adagrad.Bags) else bag_input.shape[0]


# Thread counts: the native kernels split bags and rows over XLA's intra-op pool, whose size
# the CPU client takes from the CPUs the process may run on (its affinity mask): a child pinned
# to one CPU has a pool of one thread (counted below by the pool's thread names).

BIG_ROWS, BIG_DIM, BIG_BAGS, BIG_LENGTH = 50_000, 64, 4096, 20


def xla_pool_threads() -> int:
    """The threads of XLA's intra-op pool in this process (named ``tf_XLAEigen``)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
    return collections.Counter(names)["tf_XLAEigen"]


def big_bag_steps() -> dict[str, np.ndarray]:
    """Pooling and one-pass steps of a 50,000 x 64 table in 4,096 bags of 20 ids (sum) and a
    jagged table (weighted sum), element-wise and row-wise: every result, and the pool size."""
    rng = np.random.default_rng(2024)
    table = rng.normal(size=(BIG_ROWS, BIG_DIM)).astype(np.float32)
    jagged = rng.normal(size=(5_000, 24)).astype(np.float32)
    ids = skewed_ids(rng, (BIG_BAGS, BIG_LENGTH), BIG_ROWS).astype(np.int32)
    ids[:, ::2] = rng.integers(0, BIG_ROWS, (BIG_BAGS, BIG_LENGTH // 2))  # spread over the table
    lengths = rng.integers(0, 12, BIG_BAGS)
    jagged_ids = skewed_ids(rng, int(lengths.sum()), 5_000).astype(np.int32)
    bag_inputs = {
        "big": jnp.asarray(ids),
        "jagged": mx_adagrad.Bags(
            jagged_ids,
            jagged_offsets(lengths).astype(np.int32),
            rng.uniform(0.5, 1.5, jagged_ids.size).astype(np.float32),
        ),
    }

    def loss(params, pooled, labels):
        del params
        logits = jnp.sum(pooled["big"], axis=1) + jnp.sum(pooled["jagged"], axis=1)
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    grad_fn = mx_adagrad.value_and_bag_grad(loss, ["big", "jagged"])
    labels = jnp.asarray(rng.integers(0, 2, BIG_BAGS), jnp.float32)
    out = {}
    for variant in VARIANTS:
        opt = VARIANTS[variant][0](0.1, wd=1e-3, clip_gradient=0.02)
        params = {"big": jnp.asarray(table), "jagged": jnp.asarray(jagged)}

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, bag_inputs, labels, opt=opt):
            loss, grads = grad_fn(params, bag_inputs, labels)
            params, state = opt.step(params, grads, state)
            return params, state, loss

        state = opt.init(params)
        for k in range(2):
            params, state, loss_value = step(params, state, bag_inputs, labels)
            out[f"{variant} loss {k}"] = np.asarray(loss_value)
        for name in params:
            out[f"{variant} {name}"] = np.asarray(params[name])
            out[f"{variant} {name} history"] = np.asarray(state[3].history[name])
    out["pooled"] = np.asarray(
        jax.jit(lambda t, b: mx_adagrad.embedding_bag(t, b))(table, bag_inputs["big"])
    )
    out["pool threads"] = np.asarray(xla_pool_threads())
    return out


# Pinned to one CPU before JAX starts (so before XLA sizes its pool).
CHILD = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
import numpy
from tests import test_bags
numpy.savez(sys.argv[1], **test_bags.big_bag_steps())
"""


@native_only
def test_big_bag_steps_are_bitwise_the_same_on_one_thread(tmp_path):
    """The same pooling and steps in a child pinned to one CPU (an intra-op pool of one thread):
    every bit equal, for both variants and the losses."""
    cpus = sorted(os.sched_getaffinity(0))
    here = big_bag_steps()
    if here["pool threads"] < 2:
        pytest.skip(f"XLA's pool has {here['pool threads']} thread here: no other count to try")
    path = tmp_path / "one_thread.npz"
    env = {k: v for k, v in os.environ.items() if k != "MX_ADAGRAD_NATIVE"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(cpus[0])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    there = dict(np.load(path))
    assert int(there.pop("pool threads")) == 1
    assert set(there) == set(here) - {"pool threads"}
    for name, value in there.items():
        assert_xla_bits(here[name], value, exact=True)  # the same kernels: no jaxlib excuse


# The compiled train step: no (lookups, dim) array, one pooled lookup and one step for all tables.


@native_only
@pytest.mark.parametrize("num_tables", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_compiled_train_step_holds_no_row_per_lookup_and_calls_two_kernels(variant, num_tables):
    """2,048 bags of 20 ids into 64-wide tables: the donated step's temporaries are far below the
    (40,960, 64) float32 rows of an expanded gradient, and its native calls are one pooled lookup
    and one sparse step for every table together."""
    num_bags, length, dim = 2048, 20, 64
    names = [f"table{k}" for k in range(num_tables)]
    params = {k: jax.ShapeDtypeStruct((100_000, dim), jnp.float32) for k in names}
    opt = VARIANTS[variant][0](0.1, wd=1e-4, clip_gradient=1.0)
    state = jax.eval_shape(opt.init, params)
    bag_inputs = {k: jax.ShapeDtypeStruct((num_bags, length), jnp.int32) for k in names}
    labels = jax.ShapeDtypeStruct((num_bags,), jnp.float32)

    def loss(params, pooled, labels):
        del params
        logits = sum(jnp.sum(p, axis=1) for p in pooled.values())
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    grad_fn = mx_adagrad.value_and_bag_grad(loss, names, mode="mean")

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, bag_inputs, labels):
        loss_value, grads = grad_fn(params, bag_inputs, labels)
        params, state = opt.step(params, grads, state)
        return params, state, loss_value

    compiled = step.lower(params, state, bag_inputs, labels).compile()
    expanded = num_bags * length * dim * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < expanded // 2, (temp, expanded)
    assert sorted(custom_calls(compiled)) == [
        "mx_adagrad_bag_pool_f32",
        "mx_adagrad_sparse_step_f32",
    ]


# Every transform takes a BagGrad as it takes the expanded RowSparse: the same bits.

TRANSFORMS = {
    "rescale": lambda: mx_adagrad.rescale(0.3),
    "clip": lambda: mx_adagrad.clip(0.2),
    "add_decayed_weights (lazy)": lambda: mx_adagrad.add_decayed_weights(0.1),
    "scale_by_adagrad": lambda: mx_adagrad.scale_by_adagrad(1e-6, 0.5),
    "scale_by_rowwise_adagrad": lambda: mx_adagrad.scale_by_rowwise_adagrad(1e-6, 0.5),
    "scale_by_schedule (lr_mult)": lambda: mx_adagrad.scale_by_schedule(0.1, lr_mult={"emb": 0.5}),
    "chain": lambda: optax.chain(
        mx_adagrad.rescale(0.5),
        mx_adagrad.clip(0.3),
        mx_adagrad.add_decayed_weights(0.01, wd_mult={"w": 0.0}),
        mx_adagrad.scale_by_adagrad(),
        mx_adagrad.scale_by_schedule(0.1, lr_mult={"emb": 2.0}),
    ),
    "adagrad, every option": lambda: mx_adagrad.adagrad(
        0.1, rescale_grad=0.5, clip_gradient=0.3, wd=0.01, lr_mult={"emb": 0.5}
    ),
    "rowwise_adagrad, every option": lambda: mx_adagrad.rowwise_adagrad(
        0.1, rescale_grad=0.5, clip_gradient=0.3, wd=0.01, lr_mult={"emb": 0.5}
    ),
    "inject_hyperparams(adagrad)": lambda: optax.inject_hyperparams(mx_adagrad.adagrad)(
        learning_rate=0.1, rescale_grad=0.5, clip_gradient=0.3, wd=0.01
    ),
    "multi_precision(chain)": lambda: mx_adagrad.multi_precision(
        optax.chain(
            mx_adagrad.clip(0.3), mx_adagrad.scale_by_adagrad(), mx_adagrad.scale_by_schedule(0.1)
        )
    ),
    "adagrad(multi_precision=True)": lambda: mx_adagrad.adagrad(0.1, wd=0.01, multi_precision=True),
}

LOW_PRECISION = ("multi_precision(chain)", "adagrad(multi_precision=True)")


def emb_problem(rng, dtype=jnp.float32, rows=40, dim=6):
    """A table "emb" looked up in (B, L) bags (mean, padding, duplicates) and a dense leaf "w"."""
    params = {
        "emb": jnp.asarray(rng.normal(size=(rows, dim)), dtype),
        "w": jnp.asarray(rng.normal(size=(dim,)), jnp.float32),
    }
    ids = skewed_ids(rng, (6, 4), rows).astype(np.int32)
    ids[0] = [5, 5, -1, 5]
    return params, jnp.asarray(ids)


def emb_loss(params, pooled, r):
    return jnp.sum(jnp.tanh(pooled["emb"].astype(jnp.float32) @ params["w"] + r))


@pytest.mark.parametrize("name", TRANSFORMS, ids=TRANSFORMS)
def test_each_transform_takes_a_bag_grad_as_its_expanded_row_sparse(name):
    """Two steps (update, then apply_updates) of the transform on the BagGrad and on its
    expanded RowSparse: the same updates, state and params, bit for bit (the BagGrad is summed
    into the same rows by its own kernel, the same bits by contract)."""
    rng = np.random.default_rng(21)
    dtype = jnp.bfloat16 if name in LOW_PRECISION else jnp.float32
    params, ids = emb_problem(rng, dtype)
    tx = TRANSFORMS[name]()
    grad_fn = mx_adagrad.value_and_bag_grad(emb_loss, ["emb"], mode="mean")

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return updates, mx_adagrad.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(2):
        r = jnp.asarray(rng.normal(size=6), jnp.float32)
        _, grads = jax.jit(grad_fn)(params, {"emb": ids}, r)
        assert isinstance(grads["emb"], mx_adagrad.BagGrad) and grads["emb"].dtype == dtype
        want = step(params, state, {**grads, "emb": grads["emb"].expand()})
        got = step(params, state, grads)
        assert isinstance(got[0]["emb"], mx_adagrad.RowSparse)
        assert_xla_bits(got, want)
        _, params, state = got
    if name in LOW_PRECISION:
        master = state.master["emb"]
        np.testing.assert_array_equal(params["emb"], master.astype(jnp.bfloat16))


def test_one_pass_multi_precision_step_takes_a_bfloat16_bag_grad_by_its_optax_form():
    """A bfloat16 table has no sparse kernel: the one-pass step is its optax form's XLA
    program, on the BagGrad as on the expanded rows."""
    rng = np.random.default_rng(22)
    params, ids = emb_problem(rng, jnp.bfloat16)
    opt = flat.fused_adagrad(0.1, wd=0.01, clip_gradient=0.5, multi_precision=True)
    grad_fn = mx_adagrad.value_and_bag_grad(emb_loss, ["emb"], mode="sum")
    _, grads = grad_fn(params, {"emb": ids}, jnp.float32(0.3))
    state = opt.init(params)
    _, one_pass, optax_form = step_forms_of(opt)
    want = optax_form(params, grads, state)
    assert_xla_bits(one_pass(params, grads, state), want)
    assert_xla_bits(one_pass(params, {**grads, "emb": grads["emb"].expand()}, state), want)


def step_forms_of(opt):
    def optax_form(params, grads, state):
        updates, state = opt.tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return opt, jax.jit(opt.step), jax.jit(optax_form)


def test_sparse_wd_error_refuses_a_bag_grad_and_allows_it_without_decay():
    rng = np.random.default_rng(23)
    params, ids = emb_problem(rng)
    _, grads = mx_adagrad.value_and_bag_grad(emb_loss, ["emb"])(params, {"emb": ids}, 0.0)
    tx = mx_adagrad.adagrad(0.1, wd=0.1, sparse_wd="error")
    with pytest.raises(
        ValueError,
        match=r"wd \* wd_mult for the sparse gradient 'emb' must be 0 with sparse_wd='error'",
    ):
        tx.update(grads, tx.init(params), params)
    tx = mx_adagrad.adagrad(0.1, wd=0.1, wd_mult={"emb": 0.0}, sparse_wd="error")
    got = tx.update(grads, tx.init(params), params)
    want = tx.update({**grads, "emb": grads["emb"].expand()}, tx.init(params), params)
    assert_xla_bits(got, want)


def test_check_indices_reports_an_out_of_range_bag_id_inside_jit():
    """Under checkify, a BagGrad's id outside the table is reported with its leaf and value, as
    for the expanded RowSparse; unchecked, the two steps are the same bits."""
    rng = np.random.default_rng(24)
    params, _ = emb_problem(rng)
    tx = mx_adagrad.adagrad(0.1)
    grad_fn = mx_adagrad.value_and_bag_grad(emb_loss, ["emb"])

    def checked_step(expand):
        @jax.jit
        @functools.partial(checkify.checkify, errors=checkify.user_checks)
        def step(params, state, ids):
            _, grads = grad_fn(params, {"emb": ids}, 0.0)
            if expand:
                grads = {**grads, "emb": grads["emb"].expand()}
            mx_adagrad.check_indices(grads)
            updates, state = tx.update(grads, state, params)
            return mx_adagrad.apply_updates(params, updates)

        return step

    good = jnp.asarray(skewed_ids(rng, (4, 3), 40, padding=False), jnp.int32)
    error, _ = checked_step(False)(params, tx.init(params), good)
    error.throw()  # every id in range: no error
    bad = good.at[2, 1].set(47)
    outs = {}
    for expand, kind in ((False, "BagGrad"), (True, "RowSparse")):
        error, outs[kind] = checked_step(expand)(params, tx.init(params), bad)
        message = (
            rf"mx_adagrad\.{kind}: grads\['emb'\] indices must be row ids in \[0, 40\), got id 47"
        )
        with pytest.raises(checkify.JaxRuntimeError, match=message):
            error.throw()
    assert_xla_bits(outs["BagGrad"], outs["RowSparse"])


# Agreement with FBGEMM and torch.


def fbgemm():
    """FBGEMM's training TBE module and its enums, or a skip saying why not."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as error:  # ImportError, or OSError from its native libraries
        pytest.skip(f"fbgemm_gpu cannot be imported: {error}")
    return (
        SplitTableBatchedEmbeddingBagsCodegen,
        EmbOptimType,
        EmbeddingLocation,
        ComputeDevice,
        BoundsCheckMode,
        PoolingMode,
    )


FBGEMM_TABLES = {"t0": (30, 8), "t1": (50, 20)}


@pytest.mark.filterwarnings("ignore:(?s).*Failed to import:DeprecationWarning")  # its SSD ops
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_agrees_with_fbgemm_table_batched_embeddings(variant, pooling):
    """FBGEMM's CPU TBE (EXACT_ADAGRAD or EXACT_ROWWISE_ADAGRAD, eps outside the root as here)
    and the one-pass step, 2 tables, 4 steps of jagged bags with empty ones and duplicates (no
    padding: BoundsCheckMode.NONE reads any id it is given): the same pooled rows, tables and
    optimizer states."""
    import torch

    tbe, optim, location, device, bounds, pooling_mode = fbgemm()
    rng = np.random.default_rng(31)
    lr, batch = 0.1, 6
    tables = {k: rng.normal(size=s).astype(np.float32) for k, s in FBGEMM_TABLES.items()}
    theirs = tbe(
        [(rows, dim, location.HOST, device.CPU) for rows, dim in FBGEMM_TABLES.values()],
        optimizer=optim.EXACT_ADAGRAD if variant == "element-wise" else optim.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=1e-6,
        pooling_mode=pooling_mode.SUM if pooling == "sum" else pooling_mode.MEAN,
        bounds_check_mode=bounds.NONE,
    )
    with torch.no_grad():
        for weight, table in zip(theirs.split_embedding_weights(), tables.values()):
            weight.copy_(torch.from_numpy(table))
    opt = VARIANTS[variant][0](lr, epsilon=1e-6)
    params = {k: jnp.asarray(t) for k, t in tables.items()}
    state = opt.init(params)
    grad_fn = mx_adagrad.value_and_bag_grad(
        lambda _, pooled, r: linear_loss(None, pooled, r), list(FBGEMM_TABLES), mode=pooling
    )

    @jax.jit
    def step(params, state, bag_inputs, r):
        _, grads = grad_fn(params, bag_inputs, r)
        pooled = {k: mx_adagrad.embedding_bag(params[k], bag_inputs[k], pooling) for k in params}
        return *opt.step(params, grads, state), pooled

    for _ in range(4):
        ids, offsets, bag_inputs = [], [np.zeros(1, np.int64)], {}
        for k, (rows, _) in FBGEMM_TABLES.items():
            lengths = rng.integers(0, 5, batch)
            lengths[rng.integers(batch)] = 0
            table_ids = skewed_ids(rng, int(lengths.sum()), rows, padding=False).astype(np.int64)
            bag_inputs[k] = mx_adagrad.Bags(table_ids.astype(np.int32), jagged_offsets(lengths))
            offsets.append(np.cumsum(lengths) + sum(map(len, ids)))  # table-major
            ids.append(table_ids)
        r = {
            k: rng.normal(size=(batch, dim)).astype(np.float32)
            for k, (_, dim) in FBGEMM_TABLES.items()
        }
        pooled_theirs = theirs(
            torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(offsets))
        )
        (
            pooled_theirs * torch.from_numpy(np.concatenate(list(r.values()), axis=1))
        ).sum().backward()
        params, state, pooled = step(params, state, bag_inputs, r)
        # The pooled rows: float32 sums of at most 4 rows, each side in its own order.
        np.testing.assert_allclose(
            np.concatenate([pooled[k] for k in FBGEMM_TABLES], axis=1),
            pooled_theirs.detach().numpy(),
            rtol=1e-6,
            atol=1e-6,
        )
        weights = theirs.split_embedding_weights()
        moments = [s[0] for s in theirs.split_optimizer_states()]
        for k, weight, moment in zip(FBGEMM_TABLES, weights, moments):
            # Both sides are float32 roundings of the same formula on the same exact gradient
            # (r, summed over at most a dozen terms, in orders of their own): a few ulps per
            # step, 4 steps (measured: at most 1.1e-7 of the scale, 2 ulps of the largest).
            assert reference.relative_error(params[k], weight.detach().numpy()) <= 1e-6, k
            assert reference.relative_error(state[3].history[k], moment.numpy()) <= 1e-6, k


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's Adagrad
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_agrees_with_torch_embedding_bag_and_sparse_adagrad(mode):
    """``nn.EmbeddingBag(mode, sparse=True)`` with ``torch.optim.Adagrad(lr, eps=1e-6,
    initial_accumulator_value=0)`` (eps outside the root; element-wise), 4 steps. torch has one
    padding index: every id outside the table is given to it as an extra row ``padding_idx``
    (which pools as nothing, does not count in the mean and is never updated)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(41)
    rows, dim, batch, lr = 40, 6, 8, 0.1
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    theirs = torch.nn.EmbeddingBag(
        rows + 1,
        dim,
        mode=pool_mode(mode),
        sparse=True,
        padding_idx=rows,
        include_last_offset=True,
    )
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(np.concatenate([table, np.zeros((1, dim))])))
    torch_opt = torch.optim.Adagrad(
        theirs.parameters(), lr=lr, eps=1e-6, initial_accumulator_value=0.0
    )
    opt = flat.fused_adagrad(lr, epsilon=1e-6)
    params = {"emb": jnp.asarray(table)}
    state = opt.init(params)
    grad_fn = mx_adagrad.value_and_bag_grad(
        lambda p, pooled, r: jnp.sum(pooled["emb"] * r), ["emb"], mode=pool_mode(mode)
    )
    step = jax.jit(lambda p, s, b, r: opt.step(p, grad_fn(p, {"emb": b}, r)[1], s))
    for _ in range(4):
        lengths = rng.integers(0, 6, batch)
        ids = skewed_ids(rng, int(lengths.sum()), rows).astype(np.int64)
        offsets = jagged_offsets(lengths)
        weights = rng.uniform(0.2, 2.0, ids.size).astype(np.float32) if mode == "weighted" else None
        r = rng.normal(size=(batch, dim)).astype(np.float32)
        padded = np.where((ids >= 0) & (ids < rows), ids, rows)
        pooled_theirs = theirs(
            torch.from_numpy(padded),
            torch.from_numpy(offsets),
            per_sample_weights=None if weights is None else torch.from_numpy(weights),
        )
        pooled = mx_adagrad.embedding_bag(
            params["emb"], mx_adagrad.Bags(ids.astype(np.int32), offsets, weights), pool_mode(mode)
        )
        # Float32 sums of at most 5 rows (weighted: products), each side in its order.
        np.testing.assert_allclose(pooled, pooled_theirs.detach().numpy(), rtol=1e-6, atol=1e-6)
        torch_opt.zero_grad()
        (pooled_theirs * torch.from_numpy(r)).sum().backward()
        torch_opt.step()
        params, state = step(
            params, state, mx_adagrad.Bags(ids.astype(np.int32), offsets, weights), r
        )
        weight = theirs.weight.detach().numpy()
        # float32 roundings of the same formula on the same gradient, a few ulps a step
        # (measured: at most 6.5e-8 of the scale).
        assert reference.relative_error(params["emb"], weight[:rows]) <= 1e-6
        np.testing.assert_array_equal(weight[rows], 0.0)  # the padding row never moves
        history = torch_opt.state[theirs.weight]["sum"].numpy()
        assert reference.relative_error(state[3].history["emb"], history[:rows]) <= 1e-6


# Bad input: a ValueError at the call, naming the argument, its value and what it must be.

TABLE = jnp.zeros((10, 4), jnp.float32)
IDS = jnp.array([1, 2, 3, 4, 5], jnp.int32)


def call_value_and_bag_grad(bag_inputs, mode="sum", params=None):
    fn = mx_adagrad.value_and_bag_grad(lambda p, pooled: jnp.sum(pooled["a"]), ["a"], mode=mode)
    return fn({"a": TABLE} if params is None else params, bag_inputs)


BAD_INPUTS = {
    "float (B, L) ids": (
        lambda: mx_adagrad.embedding_bag(TABLE, jnp.zeros((2, 3))),
        r"embedding_bag: bags must be a 2-D integer array, got float32\[2, 3\]",
    ),
    "1-D ids as bags": (
        lambda: mx_adagrad.embedding_bag(TABLE, IDS),
        r"embedding_bag: bags must be a 2-D integer array, got int32\[5\]",
    ),
    "2-D Bags.ids": (
        lambda: mx_adagrad.Bags(jnp.zeros((2, 3), jnp.int32), jnp.array([0, 6])),
        r"Bags: ids must be a 1-D integer array, got int32\[2, 3\]",
    ),
    "float Bags.ids": (
        lambda: mx_adagrad.Bags(jnp.zeros(3), jnp.array([0, 3])),
        r"Bags: ids must be a 1-D integer array, got float32\[3\]",
    ),
    "float offsets": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([0.0, 5.0])),
        r"Bags: offsets must be a 1-D integer array, got float32\[2\]",
    ),
    "no offsets": (
        lambda: mx_adagrad.Bags(IDS, jnp.zeros(0, jnp.int32)),
        r"Bags: offsets must be of length bags \+ 1 >= 1, got int32\[0\]",
    ),
    "decreasing offsets": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([0, 3, 2, 5])),
        r"Bags: offsets must be non-decreasing, got offsets\[1\] = 3 > offsets\[2\] = 2",
    ),
    "offsets not from 0": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([1, 3, 5])),
        r"Bags: offsets must be 0 first, got offsets\[0\] = 1",
    ),
    "offsets not to len(ids)": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([0, 3, 4])),
        r"Bags: offsets must be len\(ids\) = 5 last, got offsets\[-1\] = 4",
    ),
    "weights of another shape": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([0, 5]), jnp.ones(4)),
        r"Bags: weights must be None or a float array of the shape of ids \(5,\), got float32\[4\]",
    ),
    "integer weights": (
        lambda: mx_adagrad.Bags(IDS, jnp.array([0, 5]), jnp.ones(5, jnp.int32)),
        r"Bags: weights must be None or a float array of the shape of ids \(5,\), got int32\[5\]",
    ),
    "weights with mean": (
        lambda: mx_adagrad.embedding_bag(TABLE, mx_adagrad.Bags(IDS, [0, 5], jnp.ones(5)), "mean"),
        r"embedding_bag: mode must be 'sum' for Bags with weights \(a weighted sum\), got 'mean'",
    ),
    "unknown mode": (
        lambda: mx_adagrad.embedding_bag(TABLE, mx_adagrad.Bags(IDS, [0, 5]), "max"),
        r"embedding_bag: mode must be one of 'sum', 'mean', got 'max'",
    ),
    "1-D table": (
        lambda: mx_adagrad.embedding_bag(jnp.zeros(10), jnp.zeros((2, 3), jnp.int32)),
        r"embedding_bag: table must be a 2-D float array \(rows, dim\), got float32\[10\]",
    ),
    "integer table": (
        lambda: mx_adagrad.embedding_bag(jnp.zeros((10, 2), jnp.int32), jnp.zeros((2, 3), int)),
        r"embedding_bag: table must be a 2-D float array \(rows, dim\), got int32\[10, 2\]",
    ),
    "value_and_bag_grad: unknown mode": (
        lambda: mx_adagrad.value_and_bag_grad(lambda p, x: 0.0, ["a"], mode="max"),
        r"value_and_bag_grad: mode\['a'\] must be one of 'sum', 'mean', got 'max'",
    ),
    "value_and_bag_grad: unknown mode in the dict": (
        lambda: mx_adagrad.value_and_bag_grad(lambda p, x: 0.0, ["a"], mode={"a": "max"}),
        r"value_and_bag_grad: mode\['a'\] must be one of 'sum', 'mean', got 'max'",
    ),
    "value_and_bag_grad: mode keys": (
        lambda: mx_adagrad.value_and_bag_grad(lambda p, x: 0.0, ["a"], mode={"b": "sum"}),
        r"value_and_bag_grad: mode must be a str or a dict with the keys \['a'\], got \{'b': 'sum'\}",
    ),
    "value_and_bag_grad: bags keys": (
        lambda: call_value_and_bag_grad({"b": jnp.zeros((2, 3), jnp.int32)}),
        r"value_and_bag_grad: bags must be a dict with the keys \['a'\], got \['b'\]",
    ),
    "value_and_bag_grad: bags not a dict": (
        lambda: call_value_and_bag_grad(jnp.zeros((2, 3), jnp.int32)),
        r"value_and_bag_grad: bags must be a dict with the keys \['a'\], got",
    ),
    "value_and_bag_grad: float ids": (
        lambda: call_value_and_bag_grad({"a": jnp.zeros((2, 3))}),
        r"value_and_bag_grad \(table 'a'\): bags must be a 2-D integer array, got float32\[2, 3\]",
    ),
    "value_and_bag_grad: weights with mean": (
        lambda: call_value_and_bag_grad({"a": mx_adagrad.Bags(IDS, [0, 5], jnp.ones(5))}, "mean"),
        r"value_and_bag_grad \(table 'a'\): mode must be 'sum' for Bags with weights",
    ),
    "value_and_bag_grad: 1-D table": (
        lambda: call_value_and_bag_grad({"a": jnp.zeros((2, 3), int)}, params={"a": jnp.ones(3)}),
        r"value_and_bag_grad \(table 'a'\): table must be a 2-D float array \(rows, dim\), "
        r"got float32\[3\]",
    ),
    "value_and_bag_grad: table not in params": (
        lambda: call_value_and_bag_grad({"a": jnp.zeros((2, 3), int)}, params={"b": TABLE}),
        r"value_and_bag_grad: tables must be paths of params \(\['b'\]\), got \['a'\]",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS, ids=BAD_INPUTS)
def test_bad_input_raises_a_value_error_naming_argument_value_and_expectation(name):
    call, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match="^mx_adagrad." + message):
        call()
