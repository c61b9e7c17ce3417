"""Complex parameters: every optimizer and transform against a complex128 NumPy reference,
optax.adagrad, the real path, and the RowSparse and fused paths."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad import flat
from tests import reference


def complex_normal(rng, shape, dtype=np.complex64):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)


def problem(shape, steps, seed=0, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    weight = complex_normal(rng, shape, dtype) * 0.5
    return weight, [complex_normal(rng, shape, dtype) for _ in range(steps)]


def train(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    weights = []
    for grad in grads:
        updates, state = step(params, state, grad)
        params = mx_adagrad.apply_updates(params, updates)
        weights.append(params)
    return weights, state


def reference_run(step, weight, grads, history, **hyper):
    weights = []
    for grad in grads:
        weight, history = step(weight, grad, history, **hyper)
        weights.append(weight)
    return weights, history


def history_of(state):
    """The accumulator's history in the state of a chain."""
    return next(s.history for s in state if hasattr(s, "history"))


def rows_of(shape):
    return shape[:1] if len(shape) >= 2 else shape


# (optimizer, reference step, its epsilon's name, shape of the history for a parameter shape)
OPTIMIZERS = {
    "adagrad": (mx_adagrad.adagrad, reference.mxnet2_step, "epsilon", lambda s: s),
    "legacy.adagrad": (mx_adagrad.legacy.adagrad, reference.mxnet1_step, "eps", lambda s: s),
    "rowwise_adagrad": (mx_adagrad.rowwise_adagrad, reference.rowwise_step, "epsilon", rows_of),
}
HYPER = {
    "defaults": dict(),
    "clip": dict(clip_gradient=0.8),
    "all": dict(rescale_grad=0.7, clip_gradient=0.5, wd=0.1),
}
SHAPES = [(3, 4, 5), (10, 4), (7,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hyper", HYPER.values(), ids=HYPER.keys())
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_complex64_matches_complex128_reference(name, hyper, shape):
    optimizer, step, eps_name, history_shape = OPTIMIZERS[name]
    hyper = {**hyper, eps_name: 1e-6}
    weight, grads = problem(shape, steps=20)
    got, state = train(optimizer(0.1, **hyper), jnp.asarray(weight), list(map(jnp.asarray, grads)))
    want, want_history = reference_run(
        functools.partial(step, lr=0.1), weight, grads, np.zeros(history_shape(shape)), **hyper
    )
    # complex64 arithmetic (float32 parts) against complex128 over 20 steps: a few float32 ulps.
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == jnp.complex64
        assert reference.relative_error(a, b) <= 1e-5, f"step {k}"
    history = history_of(state)
    assert history.dtype == jnp.float32
    assert reference.relative_error(history, want_history) <= 1e-5


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_complex128_matches_reference_to_float64_rounding(name):
    optimizer, step, eps_name, history_shape = OPTIMIZERS[name]
    hyper = {"rescale_grad": 0.7, "clip_gradient": 0.5, "wd": 0.1, eps_name: 1e-6}
    with jax.enable_x64(True):
        weight, grads = problem((6, 3), steps=20, dtype=np.complex128)
        got, state = train(
            optimizer(0.1, **hyper), jnp.asarray(weight), list(map(jnp.asarray, grads))
        )
        assert got[-1].dtype == jnp.complex128
        assert history_of(state).dtype == jnp.float64
    want, _ = reference_run(
        functools.partial(step, lr=0.1), weight, grads, np.zeros(history_shape((6, 3))), **hyper
    )
    # The same formula in complex128 on both sides: float64 rounding, a few ulps over 20 steps.
    assert reference.relative_error(got[-1], want[-1]) <= 1e-13


@pytest.mark.parametrize(
    "tx",
    [
        mx_adagrad.scale_by_adagrad(initial_accumulator_value=0.5),
        mx_adagrad.scale_by_rowwise_adagrad(1e-6, 0.5),
    ],
    ids=["scale_by_adagrad", "scale_by_rowwise_adagrad"],
)
def test_history_is_real_in_the_parameters_precision(tx):
    params = {"table": jnp.ones((4, 3), jnp.complex64), "bias": jnp.ones(3, jnp.complex64)}
    history = tx.init(params).history
    assert {h.dtype for h in jax.tree.leaves(history)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(history["bias"], 0.5)
    with jax.enable_x64(True):
        history = tx.init(jax.tree.map(lambda p: p.astype(jnp.complex128), params)).history
        assert {h.dtype for h in jax.tree.leaves(history)} == {jnp.dtype(jnp.float64)}


def test_agrees_with_optax_adagrad_with_eps_inside_the_root():
    """optax.adagrad is ``g / sqrt(h + eps)`` with ``h`` starting at 0.1 and no rescale, clip or
    decay: ``legacy.adagrad`` with ``initial_accumulator_value=0.1`` (same eps, same place)."""
    weight, grads = problem((8, 3), steps=100, seed=5)
    params, grads = jnp.asarray(weight), list(map(jnp.asarray, grads))
    ours, our_state = train(
        mx_adagrad.legacy.adagrad(0.05, 1e-7, initial_accumulator_value=0.1), params, grads
    )
    theirs, their_state = train(
        optax.adagrad(0.05, initial_accumulator_value=0.1, eps=1e-7), params, grads
    )
    # optax multiplies by rsqrt, we divide by sqrt: one float32 rounding apart per step, 100 steps.
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert reference.relative_error(a, b) <= 1e-5, f"step {k}"
    their_history = their_state[0].sum_of_squares  # complex in optax, with zero imaginary part
    np.testing.assert_array_equal(np.imag(their_history), 0)
    np.testing.assert_allclose(our_state[2].history, np.real(their_history), rtol=1e-5)


def test_a_phase_rotation_of_weights_and_gradients_rotates_the_updates():
    """|g|**2, the modulus clip and the decay are all unchanged by a common phase: the updates
    turn with it and the history stays the same (an elementwise clip of the parts would not)."""
    weight, grads = problem((5, 4), steps=5, seed=7)
    turn = np.complex64(np.exp(0.7j))
    tx = mx_adagrad.adagrad(0.1, clip_gradient=0.6, wd=0.1, rescale_grad=0.9)
    got, state = train(tx, jnp.asarray(weight), list(map(jnp.asarray, grads)))
    turned, turned_state = train(
        tx, jnp.asarray(weight * turn), [jnp.asarray(g * turn) for g in grads]
    )
    # float32 rounding of the turned inputs and of every step: a few ulps after 5 steps.
    assert reference.relative_error(turned[-1], np.asarray(got[-1]) * turn) <= 1e-5
    assert reference.relative_error(turned_state[3].history, state[3].history) <= 1e-5


def test_zero_imaginary_parts_train_as_real_numbers():
    rng = np.random.default_rng(9)
    weight = rng.normal(size=(6,)).astype(np.float32)
    grads = [rng.normal(size=(6,)).astype(np.float32) for _ in range(10)]
    tx = mx_adagrad.adagrad(0.1, clip_gradient=0.5, wd=0.1, rescale_grad=0.8)
    real, _ = train(tx, jnp.asarray(weight), list(map(jnp.asarray, grads)))
    cplx, _ = train(
        tx, jnp.asarray(weight, jnp.complex64), [jnp.asarray(g, jnp.complex64) for g in grads]
    )
    np.testing.assert_array_equal(np.imag(cplx[-1]), 0)
    # The complex multiply (a + 0j) * (c + 0j) is exact, but XLA contracts multiply-adds into
    # FMAs in other places for complex and real code: one float32 rounding per step, 10 steps.
    np.testing.assert_allclose(np.real(cplx[-1]), real[-1], rtol=1e-6, atol=1e-7)


def row_mean(x):
    return x.reshape(x.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


# Each transform alone: (transform, its formula in complex128 NumPy of (g, w)).
TRANSFORMS = {
    "rescale": (mx_adagrad.rescale(0.3), lambda g, w: 0.3 * g),
    "clip": (mx_adagrad.clip(0.9), lambda g, w: reference.clip(g, 0.9)),
    "add_decayed_weights": (mx_adagrad.add_decayed_weights(0.1), lambda g, w: g + 0.1 * w),
    "scale_by_adagrad": (
        mx_adagrad.scale_by_adagrad(1e-3, 0.5),
        lambda g, w: g / (np.sqrt(0.5 + reference.square(g)) + 1e-3),
    ),
    "scale_by_adagrad_eps_inside_sqrt": (
        mx_adagrad.scale_by_adagrad(1e-3, 0.5, eps_inside_sqrt=True),
        lambda g, w: g / np.sqrt(0.5 + reference.square(g) + 1e-3),
    ),
    "scale_by_rowwise_adagrad": (
        mx_adagrad.scale_by_rowwise_adagrad(1e-3, 0.5),
        lambda g, w: g / (np.sqrt(0.5 + row_mean(reference.square(g))) + 1e-3),
    ),
    "scale_by_schedule": (mx_adagrad.scale_by_schedule(0.1), lambda g, w: -0.1 * g),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_alone_on_complex64(name):
    tx, formula = TRANSFORMS[name]
    rng = np.random.default_rng(3)
    weight, grad = complex_normal(rng, (6, 5)), complex_normal(rng, (6, 5))
    got, _ = tx.update(jnp.asarray(grad), tx.init(jnp.asarray(weight)), jnp.asarray(weight))
    assert got.dtype == jnp.complex64
    want = formula(grad.astype(np.complex128), weight.astype(np.complex128))
    # One step of float32 arithmetic against complex128: a few float32 ulps.
    assert reference.relative_error(got, want) <= 2e-6


# clip: the modulus of each element.


def test_clip_bounds_the_modulus_and_keeps_the_phase():
    rng = np.random.default_rng(11)
    grads = complex_normal(rng, (1000,))
    got = np.asarray(mx_adagrad.clip(0.8).update(jnp.asarray(grads), optax.EmptyState())[0])
    # float32 division, multiplication and abs against complex128: a few float32 ulps.
    np.testing.assert_allclose(got, reference.clip(grads.astype(np.complex128), 0.8), rtol=1e-6)
    inside = np.abs(grads.astype(np.complex128)) <= 0.8
    assert 0 < inside.sum() < grads.size  # both kinds of elements were there
    np.testing.assert_array_equal(got[inside], grads[inside])  # untouched bit for bit


def test_clip_of_zero_imaginary_parts_is_the_real_clip_bitwise():
    values = np.array([-3.0, -0.4, 0.0, -0.0, 0.39, 7.0, np.inf, -np.inf, 1e38, 1e-30], np.float32)
    real = np.asarray(mx_adagrad.clip(0.4).update(jnp.asarray(values), None)[0])
    cplx = np.asarray(mx_adagrad.clip(0.4).update(jnp.asarray(values, jnp.complex64), None)[0])
    np.testing.assert_array_equal(np.real(cplx), real)
    np.testing.assert_array_equal(np.imag(cplx), 0)


def test_clip_of_infinite_huge_and_nan_elements():
    inf, nan = np.inf, np.nan
    values = np.array(
        [
            complex(inf, 3),
            complex(-inf, inf),
            complex(3e38, 3e38),
            complex(nan, inf),
            complex(1, nan),
        ],
        np.complex64,
    )
    got = np.asarray(mx_adagrad.clip(2.0).update(jnp.asarray(values), None)[0])
    np.testing.assert_array_equal(got[0], np.complex64(2.0))  # infinite parts point the way
    root = np.float32(2.0) / np.abs(np.complex64(1 + 1j))
    np.testing.assert_allclose(got[1], np.complex64(complex(-root, root)), rtol=1e-7)
    np.testing.assert_allclose(got[2], np.complex64(complex(root, root)), rtol=1e-7)  # no overflow
    np.testing.assert_array_equal(got[3:], values[3:])  # a NaN part: left as it is


# Hyperparameters and dtypes at the boundary.


def test_complex_hyperparameters_are_refused_unless_real():
    with pytest.raises(ValueError, match="learning_rate must be a real scalar"):
        mx_adagrad.adagrad(learning_rate=0.1 + 0.1j)
    with pytest.raises(ValueError, match="clip_gradient must be a real scalar"):
        mx_adagrad.clip(np.complex64(1 + 1j))
    mx_adagrad.adagrad(learning_rate=np.complex64(0.1))  # zero imaginary part: a real number


def test_inject_hyperparams_with_complex_params_equals_the_plain_optimizer():
    """inject_hyperparams stores hyperparameters in the params' dtype, here complex64."""
    weight, grads = problem((4, 3), steps=3, seed=13)
    for factory in (mx_adagrad.adagrad, mx_adagrad.rowwise_adagrad):
        hyper = dict(learning_rate=0.1, clip_gradient=0.5, wd=0.1, epsilon=1e-6)
        injected = optax.inject_hyperparams(factory)(**hyper)
        assert injected.init(jnp.asarray(weight)).hyperparams["wd"].dtype == jnp.complex64
        got, _ = train(injected, jnp.asarray(weight), list(map(jnp.asarray, grads)))
        want, _ = train(factory(**hyper), jnp.asarray(weight), list(map(jnp.asarray, grads)))
        # Traced hyperparameters round as the constants do: identical arithmetic.
        chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_real_gradient_of_a_complex_weight_keeps_its_imaginary_part_in_the_decay():
    params = jnp.array([1 + 2j], jnp.complex64)
    got = mx_adagrad.add_decayed_weights(0.5).update(jnp.array([1.0]), None, params)[0]
    np.testing.assert_array_equal(got, np.complex64([1.5 + 1j]))


def test_complex_update_of_a_real_parameter_is_refused():
    params = {"w": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
    updates = {"w": jnp.ones(2, jnp.complex64), "z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(ValueError, match=r"updates\['w'\] must be real for the real parameter"):
        mx_adagrad.apply_updates(params, updates)


# RowSparse rows, multi_precision and the fused step.


@pytest.mark.parametrize("factory", [mx_adagrad.adagrad, mx_adagrad.rowwise_adagrad])
def test_row_sparse_complex_rows_equal_the_dense_path(factory):
    rng = np.random.default_rng(17)
    table = jnp.asarray(complex_normal(rng, (30, 4)))
    grads = [
        mx_adagrad.RowSparse(
            rng.integers(0, 10, 12).astype(np.int32), complex_normal(rng, (12, 4)), (30, 4)
        )
        for _ in range(8)
    ]
    tx = factory(0.1, clip_gradient=0.7, rescale_grad=0.8)
    sparse, sparse_state = train(tx, table, grads)
    dense, dense_state = train(tx, table, [g.todense() for g in grads])
    # Duplicates summed by a segment sum and by the dense scatter-add: the last bit may differ.
    chex.assert_trees_all_close(sparse[-1], dense[-1], rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(sparse_state, dense_state, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sparse[-1][10:], table[10:])  # rows never touched


def test_row_sparse_complex_rows_are_coalesced_by_xla_not_the_float32_kernel():
    tx = mx_adagrad.adagrad(0.1)
    table = jnp.zeros((100, 4), jnp.complex64)

    def step(table, state, ids, values):
        updates, state = tx.update(mx_adagrad.RowSparse(ids, values, table.shape), state, table)
        return mx_adagrad.apply_updates(table, updates), state

    args = (table, tx.init(table), jnp.zeros(16, jnp.int32), jnp.zeros((16, 4), jnp.complex64))
    text = jax.jit(step).lower(*args).compile().as_text()
    assert "mx_adagrad_coalesce" not in text


def test_multi_precision_passes_complex_leaves_through():
    params = {"half": jnp.ones(3, jnp.bfloat16), "z": jnp.full(3, 1 + 1j, jnp.complex64)}
    tx = mx_adagrad.adagrad(0.1, multi_precision=True)
    state = tx.init(params)
    assert state.master["z"] is None and state.master["half"].dtype == jnp.float32
    grads = {"half": jnp.ones(3, jnp.bfloat16), "z": jnp.full(3, 1 - 1j, jnp.complex64)}
    updates, _ = tx.update(grads, state, params)
    want, _ = mx_adagrad.adagrad(0.1).update(grads, mx_adagrad.adagrad(0.1).init(params), params)
    np.testing.assert_array_equal(updates["z"], want["z"])


@pytest.mark.parametrize("multi_precision", [False, True])
def test_fused_step_runs_complex_leaves_through_xla(multi_precision):
    rng = np.random.default_rng(19)
    params = {
        "w": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        "z": jnp.asarray(complex_normal(rng, (8, 3))),
    }
    opt = flat.fused_adagrad(0.1, wd=0.01, clip_gradient=1.0, multi_precision=multi_precision)
    state = opt.init(params)
    grads = {
        "w": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        "z": jnp.asarray(complex_normal(rng, (8, 3))),
    }

    def reference_step(params, grads, state):
        updates, state = opt.tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    got = jax.jit(opt.step)(params, grads, state)
    want = jax.jit(reference_step)(params, grads, state)
    # The complex leaf takes the XLA program of tx itself: the same bits.
    np.testing.assert_array_equal(got[0]["z"], want[0]["z"])
    text = jax.jit(opt.step).lower(params, grads, state).compile().as_text()
    calls = re.findall(r'custom_call_target="(mx_adagrad_step_\w+)"', text)
    assert calls in (["mx_adagrad_step_f32"], [])  # the float32 leaf only (or no kernel at all)


@pytest.mark.parametrize(
    "cls, factory",
    [
        (mx_adagrad.AdaGrad, mx_adagrad.adagrad),
        (mx_adagrad.legacy.AdaGrad, mx_adagrad.legacy.adagrad),
    ],
    ids=["AdaGrad", "legacy.AdaGrad"],
)
def test_optimizer_api_takes_complex_weights_like_the_functional_optimizer(cls, factory):
    weight, grads = problem((5, 2), steps=4, seed=23)
    opt = cls(learning_rate=0.1, wd=0.01, clip_gradient=0.5)
    weights = [jnp.asarray(weight)]
    states = [opt.create_state(0, weights[0])]
    assert states[0].dtype == jnp.float32
    for grad in grads:
        opt.update([0], weights, [jnp.asarray(grad)], states)
    want, _ = train(factory(0.1, wd=0.01, clip_gradient=0.5), jnp.asarray(weight), grads)
    # The Optimizer API traces its hyperparameters; the transformation has them as constants.
    np.testing.assert_allclose(weights[0], want[-1], rtol=1e-6)
