"""multi_precision: float32 master weights and history for float16 / bfloat16 parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mx_adagrad
from tests import reference


def train(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    for grad in grads:
        params, state = step(params, state, grad)
    return params, state


def _step(tx, params, state, grad):
    updates, state = tx.update(grad, state, params)
    return mx_adagrad.apply_updates(params, updates), state


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_master_and_history_are_float32_and_track_the_reference(dtype):
    rng = np.random.default_rng(1)
    weight = rng.uniform(-1, 1, (5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(20)]
    params = {"w": jnp.asarray(weight, dtype), "f32": jnp.asarray(weight)}
    low_grads = [{"w": jnp.asarray(g, dtype), "f32": jnp.asarray(g)} for g in grads]
    tx = mx_adagrad.adagrad(0.1, wd=0.01, clip_gradient=1.0, multi_precision=True)
    params, state = train(tx, params, low_grads)

    assert state.master["w"].dtype == jnp.float32 and state.master["f32"] is None
    assert state.inner_state[3].history["w"].dtype == jnp.float32
    assert params["w"].dtype == dtype and params["f32"].dtype == jnp.float32
    # The params are the master copy cast to their dtype, exactly.
    np.testing.assert_array_equal(params["w"], state.master["w"].astype(dtype))
    # The master follows the float64 reference run on the same (low-precision) gradients and the
    # low-precision starting weight, to float32 accuracy.
    start = np.asarray(jnp.asarray(weight, dtype), np.float64)
    want, _ = reference.mxnet2_run(
        start,
        [np.asarray(g["w"], np.float64) for g in low_grads],
        lr=0.1,
        wd=0.01,
        clip_gradient=1.0,
    )
    assert reference.relative_error(state.master["w"], want[-1]) <= 1e-5
    want32, _ = reference.mxnet2_run(weight, grads, lr=0.1, wd=0.01, clip_gradient=1.0)
    assert reference.relative_error(params["f32"], want32[-1]) <= 1e-5


def test_without_multi_precision_history_has_param_dtype():
    params = {"w": jnp.ones(4, jnp.float16)}
    state = mx_adagrad.adagrad().init(params)
    assert state[3].history["w"].dtype == jnp.float16


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([jnp.float16, jnp.bfloat16]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    lr=st.sampled_from([1e-3, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_params_equal_master_cast_exactly(dtype, scale, lr, seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(0, scale, (64,)), dtype)}
    grads = [{"w": jnp.asarray(rng.normal(0, 1, (64,)), dtype)} for _ in range(3)]
    params, state = train(mx_adagrad.adagrad(lr, multi_precision=True), params, grads)
    np.testing.assert_array_equal(params["w"], state.master["w"].astype(dtype))
