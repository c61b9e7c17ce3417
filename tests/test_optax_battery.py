"""The checks optax runs on each of its own optimizers (optax/_src/alias_test.py), written here for
mx_adagrad's: convergence on a parabola and on Rosenbrock in float32 and complex64, no retracing on
the second call, extra keyword arguments to ``update``, ``optax.inject_hyperparams``, dtype
preservation, shape and dtype stability under ``lax.cond`` and ``optax.MultiSteps``.

Each check runs over the optimizers (``adagrad``, ``legacy.adagrad``, ``rowwise_adagrad``, and
``adagrad`` with every option on) and, where a check applies to a transform alone, over the
transforms.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad

# name: (factory, keyword arguments); every factory builds a whole optimizer.
OPTIMIZERS = {
    "adagrad": (mx_adagrad.adagrad, dict(learning_rate=1.0)),
    "adagrad_all_options": (
        mx_adagrad.adagrad,
        dict(learning_rate=1.0, rescale_grad=0.5, clip_gradient=20.0, wd=1e-6, epsilon=1e-7),
    ),
    "legacy.adagrad": (mx_adagrad.legacy.adagrad, dict(learning_rate=1.0)),
    "rowwise_adagrad": (mx_adagrad.rowwise_adagrad, dict(learning_rate=1.0)),
}

# name: (factory, keyword arguments); a transform alone. The numbers are the ones
# optax.inject_hyperparams turns into state.
TRANSFORMS = {
    "rescale": (mx_adagrad.rescale, dict(rescale_grad=0.5)),
    "clip": (mx_adagrad.clip, dict(clip_gradient=0.3)),
    "add_decayed_weights": (mx_adagrad.add_decayed_weights, dict(wd=0.1)),
    "scale_by_adagrad": (
        mx_adagrad.scale_by_adagrad,
        dict(epsilon=1e-6, initial_accumulator_value=0.1),
    ),
    "scale_by_rowwise_adagrad": (
        mx_adagrad.scale_by_rowwise_adagrad,
        dict(epsilon=1e-6, initial_accumulator_value=0.1),
    ),
    "scale_by_schedule": (mx_adagrad.scale_by_schedule, dict(learning_rate=0.1)),
}
EVERYTHING = {**OPTIMIZERS, **TRANSFORMS}

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128]


def build(name: str) -> optax.GradientTransformation:
    factory, kwargs = EVERYTHING[name]
    return factory(**kwargs)


def conjugate(grads):
    """``jax.grad`` of a real loss gives the conjugate of the steepest ascent for complex params;
    conjugated, it is the direction to step against (as optax's tests do)."""
    return jax.tree.map(jnp.conj, grads)


def parabola(dtype):
    """A quadratic bowl over a 2 x 3 matrix, so the row-wise history has rows."""
    start = jnp.array([[-1.0, 10.0, 1.0], [2.0, -3.0, 0.5]], dtype)
    target = jnp.array([[1.0, -1.0, 1.0], [0.5, 2.0, -1.0]], dtype)
    if jnp.iscomplexobj(start):
        target = target * (1 + 1j)

    def loss(params):
        return jnp.sum(jnp.abs(params - target) ** 2)

    return start, target, loss


def rosenbrock(dtype):
    """Rosenbrock's valley, minimum at ``(a, a**2)``; complex for complex dtypes."""
    a = 1.0 + 1j if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0
    start = jnp.zeros(2, dtype)
    target = jnp.array([a, a**2], dtype)

    def loss(params):
        return jnp.abs(a - params[0]) ** 2 + 100.0 * jnp.abs(params[1] - params[0] ** 2) ** 2

    return start, target, loss


def training_step(tx, loss):
    def step(params, state):
        grads = conjugate(jax.grad(loss)(params))
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["float32", "complex64"])
@pytest.mark.parametrize("target", [parabola, rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_converges(name, target, dtype):
    tx = build(name)
    start, want, loss = target(dtype)
    step = training_step(tx, loss)
    run = jax.jit(lambda p, s: jax.lax.fori_loop(0, 10_000, lambda _, ps: step(*ps), (p, s)))
    params, _ = run(start, tx.init(start))
    assert params.dtype == dtype
    # optax's own bar for its optimizers on these problems (alias_test.py): 3e-2.
    chex.assert_trees_all_close(params, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", EVERYTHING)
def test_second_call_does_not_retrace(name):
    tx = build(name)
    start, _, loss = parabola(jnp.float32)
    chex.clear_trace_counter()  # chex counts traces by source: one count per test case

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        return training_step(tx, loss)(params, state)

    params, state = step(start, tx.init(start))
    params, state = step(params, state)  # the state it returned: same types, no retrace
    step(params, state)


@pytest.mark.parametrize("name", EVERYTHING)
def test_update_takes_extra_keyword_arguments(name):
    """Optimizers take them as optax's do; a transform alone once wrapped, as optax's are."""
    tx = build(name)
    if name in TRANSFORMS:
        tx = optax.with_extra_args_support(tx)
    start, _, loss = rosenbrock(jnp.float32)
    grads = jax.grad(loss)(start)
    state = tx.init(start)
    updates, new_state = jax.jit(tx.update)(grads, state, start, some_value=1.0, another=None)
    want_updates, want_state = jax.jit(tx.update)(grads, state, start)
    chex.assert_trees_all_equal((updates, new_state), (want_updates, want_state))


def test_multi_precision_passes_extra_keyword_arguments_to_its_inner_chain():
    tx = mx_adagrad.adagrad(0.1, multi_precision=True)
    params = jnp.ones(3, jnp.bfloat16)
    state = tx.init(params)
    updates, _ = tx.update(jnp.ones(3, jnp.bfloat16), state, params, loss=jnp.float32(1.0))
    assert updates.dtype == jnp.float32


@pytest.mark.parametrize("name", EVERYTHING)
def test_inject_hyperparams_gives_the_same_updates_and_state(name):
    factory, kwargs = EVERYTHING[name]
    tx, injected = factory(**kwargs), optax.inject_hyperparams(factory)(**kwargs)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    injected_state = jax.jit(injected.init)(params)
    injected_updates, injected_state = jax.jit(injected.update)(grads, injected_state, params)
    # Float32 arrays there, Python numbers here, rounded to the same float32 values (the
    # multipliers are 1, so no product rounds differently): the same bits.
    chex.assert_trees_all_equal(injected_updates, updates)
    chex.assert_trees_all_equal(injected_state.inner_state, state)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("name", EVERYTHING)
def test_updates_have_the_gradients_dtype(name, dtype):
    tx = build(name)
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert updates.dtype == grads.dtype
    # The history keeps the parameters' dtype too (multi_precision=False).
    for leaf in jax.tree.leaves(state):
        assert leaf.dtype in (jnp.dtype(dtype), jnp.dtype(jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", EVERYTHING)
def test_shapes_and_dtypes_are_stable_under_lax_cond(name, dtype):
    """Both branches of a ``lax.cond`` must agree: ``update`` against passing params and state
    through unchanged, for the step's outputs and again for the state it carries."""
    with jax.enable_x64(dtype in (jnp.float64, jnp.complex128)):
        tx = build(name)
        start, _, loss = parabola(dtype)

        @jax.jit
        def step(params, state):
            grads = conjugate(jax.grad(loss)(params))
            # A condition XLA cannot fold away, as optax's test does.
            take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, new_state = jax.lax.cond(
                take, lambda: tx.update(grads, state, params), lambda: (params, state)
            )
            return mx_adagrad.apply_updates(params, updates), new_state

        params, state = start, tx.init(start)
        for _ in range(2):
            params, new_state = step(params, state)
            assert params.dtype == dtype and params.shape == start.shape
            keep = jax.random.randint(jax.random.key(1), (), 0, 2) == 0
            state = jax.lax.cond(keep, lambda s=state: s, lambda n=new_state: n)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("name", EVERYTHING)
def test_multi_steps_accumulates_before_the_first_update(name, dtype):
    tx = optax.MultiSteps(build(name), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(grads, state, params)
        chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))  # nothing before the 4th
    updates, state = update(grads, state, params)
    inner = build(name)
    want, _ = jax.jit(inner.update)(grads, inner.init(params), params)  # the mean of 4 equal grads
    chex.assert_trees_all_equal(updates, want)
    np.testing.assert_array_equal(state.mini_step, 0)
