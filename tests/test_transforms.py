"""Each of the five transforms alone, against NumPy, and inside optax.chain with optax's own."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad


@pytest.fixture
def tree():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }


def numpy_map(fn, *trees):
    return jax.tree.map(lambda *xs: fn(*(np.asarray(x, np.float64) for x in xs)), *trees)


def apply(tx, updates, params=None):
    return tx.update(updates, tx.init(params if params is not None else updates), params)[0]


def test_rescale_multiplies(tree):
    got = apply(mx_adagrad.rescale(0.14), tree)
    chex.assert_trees_all_close(got, numpy_map(lambda g: g * 0.14, tree), rtol=1e-7)


def test_clip_bounds_each_element_and_keeps_nan():
    grads = jnp.array([-3.0, -0.4, 0.0, 0.39, 7.0, jnp.nan])
    got = np.asarray(apply(mx_adagrad.clip(0.4), grads))
    np.testing.assert_array_equal(got[:5], np.float32([-0.4, -0.4, 0.0, 0.39, 0.4]))
    assert np.isnan(got[5])


def test_clip_none_is_identity(tree):
    chex.assert_trees_all_equal(apply(mx_adagrad.clip(None), tree), tree)


def test_add_decayed_weights_uses_params_and_multipliers(tree):
    params = jax.tree.map(lambda g: g + 1.0, tree)
    got = apply(mx_adagrad.add_decayed_weights(0.1, wd_mult={"b": 3.0}), tree, params)
    want = {
        "w": np.asarray(tree["w"], np.float64) + 0.1 * np.asarray(params["w"], np.float64),
        "b": np.asarray(tree["b"], np.float64) + 0.3 * np.asarray(params["b"], np.float64),
    }
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_scale_by_adagrad_accumulates_squares(tree):
    tx = mx_adagrad.scale_by_adagrad(epsilon=1e-3, initial_accumulator_value=0.5)
    state = tx.init(tree)
    history = numpy_map(lambda g: np.full_like(g, 0.5), tree)
    for _ in range(3):
        got, state = tx.update(tree, state)
        history = jax.tree.map(lambda h, g: h + np.asarray(g, np.float64) ** 2, history, tree)
        want = jax.tree.map(
            lambda g, h: np.asarray(g, np.float64) / (np.sqrt(h) + 1e-3), tree, history
        )
        chex.assert_trees_all_close(got, want, rtol=1e-6)
        chex.assert_trees_all_close(state.history, history, rtol=1e-6)


def test_scale_by_adagrad_history_has_param_dtype():
    state = mx_adagrad.scale_by_adagrad().init({"h": jnp.ones(2, jnp.float16)})
    assert state.history["h"].dtype == jnp.float16
    np.testing.assert_array_equal(state.history["h"], 0)


def test_scale_by_schedule_negates_and_counts(tree):
    tx = mx_adagrad.scale_by_schedule(lambda count: 0.1 * (count + 1))
    state = tx.init(tree)
    for step in range(3):
        got, state = tx.update(tree, state)
        chex.assert_trees_all_close(
            got, numpy_map(lambda g, s=step: -0.1 * (s + 1) * g, tree), rtol=1e-6
        )
    assert int(state.count) == 3


def test_transforms_sit_in_an_optax_chain_next_to_optax_transforms(tree):
    tx = optax.chain(optax.scale(2.0), mx_adagrad.clip(0.5), optax.scale(-1.0))
    want = numpy_map(lambda g: -np.clip(2 * g, -0.5, 0.5), tree)
    chex.assert_trees_all_close(apply(tx, tree), want, rtol=1e-7)


def test_states_are_named_tuples(tree):
    assert isinstance(mx_adagrad.scale_by_adagrad().init(tree), mx_adagrad.ScaleByAdagradState)
    assert isinstance(mx_adagrad.scale_by_schedule(0.1).init(tree), mx_adagrad.ScaleByScheduleState)
    assert isinstance(mx_adagrad.rescale(1.0).init(tree), optax.EmptyState)
