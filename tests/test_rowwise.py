"""Row-wise AdaGrad: one accumulator per row, against float64 references and TorchRec's formula."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from tests import reference
from tests.test_sparse import train

STEPS = 12
SHAPES = [(7, 5), (4, 3, 2), (6,), ()]
HYPER = {
    "defaults": dict(),
    "rescale, clip": dict(rescale_grad=0.5, clip_gradient=0.4),
    "wd, epsilon": dict(wd=0.05, epsilon=1e-3),
    "everything": dict(rescale_grad=2.0, clip_gradient=1.5, wd=0.01, epsilon=1e-8),
}


def problem(shape, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=shape).astype(np.float32)
    return weight, [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


def reference_run(weight, grads, *, lr, initial=0.0, **hyper):
    weight = np.asarray(weight, np.float64)
    rows = weight.shape[:1] if weight.ndim >= 2 else weight.shape
    history = np.full(rows, initial, np.float64)
    for grad in grads:
        weight, history = reference.rowwise_step(weight, grad, history, lr=lr, **hyper)
    return weight, history


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hyper", HYPER.values(), ids=HYPER.keys())
def test_matches_float64_reference(shape, hyper):
    weight, grads = problem(shape, seed=len(shape))
    got, state = train(mx_adagrad.rowwise_adagrad(0.1, **hyper), jnp.asarray(weight), grads)
    want, want_history = reference_run(weight, grads, lr=0.1, **hyper)
    # A dozen float32 operations per step (the row mean adds a sum of at most 6 terms), 12 steps.
    assert reference.relative_error(got, want) <= 1e-5
    assert reference.relative_error(state[3].history, want_history) <= 1e-5


def test_matches_torchrec_rowwise_adagrad_formula():
    weight, grads = problem((20, 16), seed=7, steps=30)
    got, state = train(
        mx_adagrad.rowwise_adagrad(0.05, epsilon=1e-10, wd=0.01), jnp.asarray(weight), grads
    )
    param, state_sum = weight.astype(np.float64), np.zeros(20)
    for grad in grads:
        param, state_sum = reference.torchrec_rowwise_step(
            param, grad, state_sum, lr=0.05, eps=1e-10, weight_decay=0.01
        )
    # float32 against float64 over 30 steps of a handful of operations each.
    assert reference.relative_error(got, param) <= 1e-5
    assert reference.relative_error(state[3].history, state_sum) <= 1e-5


def test_state_is_one_float_per_row_and_per_element_below_two_axes():
    params = {"table": jnp.zeros((1000, 64)), "cube": jnp.zeros((5, 4, 3)), "bias": jnp.zeros(64)}
    state = mx_adagrad.rowwise_adagrad(initial_accumulator_value=0.5).init(params)
    history = state[3].history
    assert isinstance(state[3], mx_adagrad.ScaleByRowwiseAdagradState)
    assert history["table"].shape == (1000,) and history["cube"].shape == (5,)
    assert history["bias"].shape == (64,)
    np.testing.assert_array_equal(history["table"], 0.5)
    assert history["table"].nbytes * 64 == params["table"].nbytes  # 64x less for a 64-wide table
    low = mx_adagrad.rowwise_adagrad(multi_precision=True).init(jnp.zeros((10, 8), jnp.bfloat16))
    assert low.inner_state[3].history.shape == (10,)
    assert low.inner_state[3].history.dtype == jnp.float32


def test_one_column_table_is_elementwise_adagrad_bitwise():
    weight, grads = problem((9, 1), seed=3)
    hyper = dict(rescale_grad=0.7, clip_gradient=0.5, wd=0.02)
    rowwise, _ = train(mx_adagrad.rowwise_adagrad(0.1, **hyper), jnp.asarray(weight), grads)
    elementwise, _ = train(mx_adagrad.adagrad(0.1, **hyper), jnp.asarray(weight), grads)
    np.testing.assert_array_equal(rowwise, elementwise)  # mean of one square is the square


def test_leaves_below_two_axes_are_elementwise_adagrad_bitwise():
    weight, grads = problem((6,), seed=4)
    rowwise, _ = train(mx_adagrad.rowwise_adagrad(0.1, wd=0.01), jnp.asarray(weight), grads)
    elementwise, _ = train(mx_adagrad.adagrad(0.1, wd=0.01), jnp.asarray(weight), grads)
    np.testing.assert_array_equal(rowwise, elementwise)


ROWS, DIM = 40, 6


def sparse_grads(seed, steps, n=16):
    rng = np.random.default_rng(seed)
    return [
        mx_adagrad.RowSparse(
            ((rng.zipf(1.3, n) - 1) % ROWS).astype(np.int32),
            rng.normal(size=(n, DIM)).astype(np.float32),
            (ROWS, DIM),
        )
        for _ in range(steps)
    ]


def test_row_sparse_equals_dense_path_and_leaves_untouched_rows_bit_identical():
    grads = sparse_grads(seed=1, steps=8)
    tx = mx_adagrad.rowwise_adagrad(0.1, clip_gradient=0.8, initial_accumulator_value=0.25)
    start = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)
    sparse_params, sparse_state = train(tx, jnp.asarray(start), grads)
    dense_params, dense_state = train(tx, jnp.asarray(start), [g.todense() for g in grads])
    # Without weight decay the dense path's untouched rows have zero gradients: same numbers, up
    # to the last bit of the duplicate sums (summed in another order).
    chex.assert_trees_all_close(sparse_params, dense_params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(sparse_state, dense_state, rtol=1e-6, atol=1e-7)
    touched = np.unique(np.concatenate([np.asarray(g.indices) for g in grads]))
    untouched = np.setdiff1d(np.arange(ROWS), touched)
    assert untouched.size > 0
    np.testing.assert_array_equal(np.asarray(sparse_params)[untouched], start[untouched])
    np.testing.assert_array_equal(np.asarray(sparse_state[3].history)[untouched], 0.25)


def test_row_sparse_lazy_weight_decay_matches_float64_reference_on_touched_rows():
    grads = sparse_grads(seed=2, steps=10)
    start = np.random.default_rng(1).normal(size=(ROWS, DIM)).astype(np.float32)
    got, state = train(mx_adagrad.rowwise_adagrad(0.1, wd=0.1), jnp.asarray(start), grads)
    weight, history = start.astype(np.float64), np.zeros(ROWS)
    for grad in grads:
        rows = np.unique(np.asarray(grad.indices))
        dense = np.asarray(grad.todense(), np.float64)
        weight[rows], history[rows] = reference.rowwise_step(
            weight[rows], dense[rows], history[rows], lr=0.1, wd=0.1
        )
    assert reference.relative_error(got, weight) <= 1e-5
    assert reference.relative_error(state[3].history, history) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_multi_precision_steps_a_float32_master_copy(dtype):
    weight, grads = problem((8, 4), seed=5)
    weight = np.asarray(jnp.asarray(weight, dtype).astype(jnp.float32))
    grads = [np.asarray(jnp.asarray(g, dtype).astype(jnp.float32)) for g in grads]
    tx = mx_adagrad.rowwise_adagrad(0.1, wd=0.01, multi_precision=True)
    got, state = train(tx, jnp.asarray(weight, dtype), [jnp.asarray(g, dtype) for g in grads])
    want, want_history = reference_run(weight, grads, lr=0.1, wd=0.01)
    # The master copy is float32 arithmetic on the low-precision inputs, as the reference.
    assert reference.relative_error(state.master, want) <= 1e-5
    assert reference.relative_error(state.inner_state[3].history, want_history) <= 1e-5
    np.testing.assert_array_equal(got, state.master.astype(dtype))


def test_inject_hyperparams_equals_fixed_hyperparameters_without_recompiling():
    weight, grads = problem((10, 3), seed=6)
    hyper = dict(learning_rate=0.1, epsilon=1e-6, rescale_grad=0.5, clip_gradient=1.0, wd=0.01)
    injected = optax.inject_hyperparams(mx_adagrad.rowwise_adagrad)(**hyper)
    state, params = injected.init(jnp.asarray(weight)), jnp.asarray(weight)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grad):
        updates, state = injected.update(grad, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    lrs = [0.1 / (k + 1) for k in range(len(grads))]
    for grad, lr in zip(grads, lrs):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        params, state = step(params, state, grad)
    history = np.zeros(10)
    want = weight.astype(np.float64)
    for grad, lr in zip(grads, lrs):
        want, history = reference.rowwise_step(
            want, grad, history, lr=lr, epsilon=1e-6, rescale_grad=0.5, clip_gradient=1.0, wd=0.01
        )
    assert reference.relative_error(params, want) <= 1e-5


BAD = [
    (dict(epsilon=-1.0), "rowwise_adagrad: epsilon must be >= 0, got -1.0"),
    (dict(epsilon=float("nan")), "epsilon must be finite"),
    (dict(initial_accumulator_value=-0.1), "initial_accumulator_value must be >= 0"),
    (dict(wd=-1.0), "wd must be >= 0"),
    (dict(clip_gradient=0.0), "clip_gradient must be > 0"),
    (dict(learning_rate=-0.1), "learning_rate must be >= 0"),
    (dict(multi_precision="yes"), "multi_precision must be a bool"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_at_construction_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mx_adagrad.rowwise_adagrad(**kwargs)


def test_integer_params_and_mismatched_state_raise_naming_the_leaf():
    tx = mx_adagrad.rowwise_adagrad()
    with pytest.raises(ValueError, match=r"params\['ids'\] must be a floating-point array"):
        tx.init({"ids": jnp.zeros((4, 2), jnp.int32)})
    state = tx.init({"emb": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match=r"updates\['emb'\] must be an array of 4 rows like state"):
        tx.update({"emb": jnp.zeros((5, 2))}, state, {"emb": jnp.zeros((5, 2))})
