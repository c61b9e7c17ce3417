"""adagrad(...) against the float64 reference, torch.optim.Adagrad, and optax's wrappers."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mx_adagrad
from tests import reference


def run(tx, params, grads, *, jit=False):
    """Applies ``tx`` over a list of gradient pytrees; returns the params after each step."""
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    history = []
    for grad in grads:
        updates, state = update(grad, state, params)
        params = mx_adagrad.apply_updates(params, updates)
        history.append(params)
    return history, state


def random_problem(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.uniform(-1, 1, shape).astype(np.float32)
    grads = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(steps)]
    return weight, grads


# MXNet's own AdaGrad test matrix (tests/python/unittest/test_optimizer.py::test_adagrad).
MXNET_MATRIX = list(
    itertools.product(
        [(3, 4, 5), (10, 4), (7,)],  # shape
        [1e-6, 1e-8],  # epsilon (default, and MXNet's other value)
        [None, 0.4, 0.5],  # clip_gradient
        [1.0, 0.14, 0.8],  # rescale_grad
        [0.0, 0.1],  # wd
    )
)


@pytest.mark.parametrize("shape,epsilon,clip_gradient,rescale_grad,wd", MXNET_MATRIX)
def test_matches_float64_reference_over_mxnet_test_matrix(
    shape, epsilon, clip_gradient, rescale_grad, wd
):
    hyper = dict(epsilon=epsilon, clip_gradient=clip_gradient, rescale_grad=rescale_grad, wd=wd)
    weight, grads = random_problem(shape, steps=20)
    tx = mx_adagrad.adagrad(learning_rate=0.1, **hyper)
    got, state = run(tx, jnp.asarray(weight), [jnp.asarray(g) for g in grads], jit=True)
    want, want_history = reference.mxnet2_run(weight, grads, lr=0.1, **hyper)
    # float32 arithmetic against float64 over 20 steps: a few ulps of accumulated rounding.
    for step, (a, b) in enumerate(zip(got, want)):
        assert reference.relative_error(a, b) <= 1e-5, f"step {step}"
    assert reference.relative_error(state[3].history, want_history) <= 1e-5


def test_defaults_are_mxnet_defaults():
    weight, grads = random_problem((5,), steps=3)
    got, _ = run(mx_adagrad.adagrad(), jnp.asarray(weight), [jnp.asarray(g) for g in grads])
    want, _ = reference.mxnet2_run(weight, grads, lr=0.01, epsilon=1e-6)
    assert reference.relative_error(got[-1], want[-1]) <= 1e-6


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("eps", [1e-6, 1e-10])
def test_matches_torch_adagrad_over_300_steps(wd, eps):
    torch = pytest.importorskip("torch", reason="torch parity needs torch (CI installs 2.13.0)")
    weight, grads = random_problem((6, 5), steps=300, seed=3)
    tensor = torch.tensor(weight, requires_grad=True)
    opt = torch.optim.Adagrad(
        [tensor], lr=0.05, lr_decay=0, weight_decay=wd, initial_accumulator_value=0, eps=eps
    )
    tx = mx_adagrad.adagrad(learning_rate=0.05, epsilon=eps, wd=wd)
    got, _ = run(tx, jnp.asarray(weight), [jnp.asarray(g) for g in grads], jit=True)
    for step, grad in enumerate(grads):
        tensor.grad = torch.tensor(grad)
        opt.step()
        # Both float32, different operation order: rounding drifts by a few ulps over 300 steps.
        assert reference.relative_error(got[step], tensor.detach().numpy()) <= 1e-5, step


def test_is_the_chain_of_the_five_transforms():
    params = {"a": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.arange(3.0)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(5)]
    hyper = dict(rescale_grad=0.5, clip_gradient=0.3, wd=0.1)
    chain = optax.chain(
        mx_adagrad.rescale(0.5),
        mx_adagrad.clip(0.3),
        mx_adagrad.add_decayed_weights(0.1, wd_mult={"b": 2.0}),
        mx_adagrad.scale_by_adagrad(1e-6),
        mx_adagrad.scale_by_schedule(0.05, lr_mult={"a": 0.5}),
    )
    alias = mx_adagrad.adagrad(0.05, **hyper, lr_mult={"a": 0.5}, wd_mult={"b": 2.0})
    chex.assert_trees_all_equal(run(chain, params, grads)[0], run(alias, params, grads)[0])


def test_jit_and_eager_agree():
    params = {"w": jnp.linspace(-1, 1, 20)}
    grads = [{"w": jnp.cos(params["w"] * i)} for i in range(6)]
    tx = mx_adagrad.adagrad(0.1, clip_gradient=0.5, wd=0.01, rescale_grad=0.7)
    eager, _ = run(tx, params, grads)
    jitted, _ = run(tx, params, grads, jit=True)
    # XLA may contract a*b+c into an FMA under jit: one float32 rounding apart at most per op.
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_lr_and_wd_multipliers_follow_mxnet_meaning():
    weight, grads = random_problem((4,), steps=10)
    params = {"fc": {"weight": jnp.asarray(weight), "bias": jnp.asarray(weight)}}
    tx = mx_adagrad.adagrad(0.1, wd=0.1, lr_mult={"fc/weight": 0.5}, wd_mult={"fc/bias": 0.0})
    got, _ = run(tx, params, [{"fc": {"weight": g, "bias": g}} for g in map(jnp.asarray, grads)])
    want_weight, _ = reference.mxnet2_run(weight, grads, lr=0.05, wd=0.1)
    want_bias, _ = reference.mxnet2_run(weight, grads, lr=0.1, wd=0.0)
    assert reference.relative_error(got[-1]["fc"]["weight"], want_weight[-1]) <= 1e-5
    assert reference.relative_error(got[-1]["fc"]["bias"], want_bias[-1]) <= 1e-5


def test_optax_schedule_is_called_with_optax_count():
    weight, grads = random_problem((5,), steps=8)
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    got, _ = run(mx_adagrad.adagrad(schedule), jnp.asarray(weight), list(map(jnp.asarray, grads)))
    want, _ = reference.mxnet2_run(weight, grads, lrs=[0.1 * 0.5**n for n in range(8)])
    assert reference.relative_error(got[-1], want[-1]) <= 1e-5


def test_inject_hyperparams_changes_values_without_recompiling():
    weight, grads = random_problem((6,), steps=6)
    tx = optax.inject_hyperparams(mx_adagrad.adagrad)(
        learning_rate=0.1, epsilon=1e-6, rescale_grad=1.0, clip_gradient=0.5, wd=0.0
    )
    params = jnp.asarray(weight)
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grad):
        updates, state = tx.update(grad, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    schedule = [
        dict(
            learning_rate=0.1 / (k + 1),
            rescale_grad=1.0 / (k + 2),
            wd=0.01 * k,
            clip_gradient=0.3 + 0.1 * k,
            epsilon=1e-6 * (k + 1),
        )
        for k in range(6)
    ]
    want, history = np.asarray(weight, np.float64), np.zeros(6)
    for grad, hyper in zip(grads, schedule):
        for name, value in hyper.items():
            state.hyperparams[name] = jnp.asarray(value, jnp.float32)
        params, state = step(params, state, jnp.asarray(grad))
        hyper = dict(hyper)
        want, history = reference.mxnet2_step(
            want, grad, history, lr=hyper.pop("learning_rate"), **hyper
        )
    # Hyperparameters are float32 in the state: their rounding adds a few ulps.
    assert reference.relative_error(params, want) <= 1e-5


def test_composes_with_optax_wrappers():
    params = {"w": jnp.linspace(-1, 1, 8), "frozen": jnp.ones(3)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(4)]

    masked = optax.masked(mx_adagrad.adagrad(0.1, wd=0.1), {"w": True, "frozen": False})
    got, _ = run(masked, params, grads)
    want, _ = reference.mxnet2_run(params["w"], [g["w"] for g in grads], lr=0.1, wd=0.1)
    assert reference.relative_error(got[-1]["w"], want[-1]) <= 1e-5
    # optax.masked passes the unmasked gradient through as the update.
    np.testing.assert_array_equal(
        got[-1]["frozen"], params["frozen"] + sum(g["frozen"] for g in grads)
    )

    clipped = optax.chain(optax.clip_by_global_norm(0.5), mx_adagrad.adagrad(0.1))
    got, _ = run(clipped, params, grads)
    norm_clipped = []
    for g in grads:
        norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
        norm_clipped.append(np.asarray(g["w"]) * min(1.0, 0.5 / norm))
    want, _ = reference.mxnet2_run(params["w"], norm_clipped, lr=0.1)
    assert reference.relative_error(got[-1]["w"], want[-1]) <= 1e-5


def test_multisteps_accumulates_then_steps_like_mxnet_on_the_mean_gradient():
    weight, grads = random_problem((5,), steps=6)
    tx = optax.MultiSteps(mx_adagrad.adagrad(0.1, wd=0.1), every_k_schedule=3)
    got, _ = run(tx, jnp.asarray(weight), list(map(jnp.asarray, grads)))
    means = [np.mean(grads[0:3], axis=0), np.mean(grads[3:6], axis=0)]
    want, _ = reference.mxnet2_run(weight, means, lr=0.1, wd=0.1)
    np.testing.assert_array_equal(got[0], weight)  # no step until k gradients are in
    assert reference.relative_error(got[2], want[0]) <= 1e-5
    assert reference.relative_error(got[5], want[1]) <= 1e-5


def test_apply_if_finite_skips_nan_steps_and_nan_propagates_without_it():
    weight, grads = random_problem((4,), steps=3)
    grads[1] = grads[1].copy()
    grads[1][2] = np.nan
    guarded = optax.apply_if_finite(mx_adagrad.adagrad(0.1), max_consecutive_errors=5)
    got, state = run(guarded, jnp.asarray(weight), list(map(jnp.asarray, grads)))
    want, _ = reference.mxnet2_run(weight, [grads[0], grads[2]], lr=0.1)
    assert reference.relative_error(got[-1], want[-1]) <= 1e-5
    assert int(state.total_notfinite) == 1

    plain, _ = run(mx_adagrad.adagrad(0.1), jnp.asarray(weight), list(map(jnp.asarray, grads)))
    assert np.isnan(plain[1][2]) and np.isfinite(np.delete(np.asarray(plain[1]), 2)).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16]),
    lr=st.floats(1e-4, 1.0),
    epsilon=st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]),
    rescale_grad=st.floats(0.01, 4.0),
    clip_gradient=st.one_of(st.none(), st.floats(0.05, 5.0)),
    wd=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    shape, dtype, lr, epsilon, rescale_grad, clip_gradient, wd, seed
):
    """float32 params directly; float16/bfloat16 through multi_precision's float32 master copy,
    started from the low-precision weight and fed the low-precision gradients."""
    hyper = dict(epsilon=epsilon, rescale_grad=rescale_grad, clip_gradient=clip_gradient, wd=wd)
    weight, grads = random_problem(shape, steps=4, seed=seed)
    weight = np.asarray(jnp.asarray(weight, dtype).astype(jnp.float32))
    grads = [np.asarray(jnp.asarray(g, dtype).astype(jnp.float32)) for g in grads]
    low = dtype != jnp.float32
    tx = mx_adagrad.adagrad(lr, **hyper, multi_precision=low)
    got, state = run(tx, jnp.asarray(weight, dtype), [jnp.asarray(g, dtype) for g in grads])
    want, _ = reference.mxnet2_run(weight, grads, lr=lr, **hyper)
    master = state.master if low else got[-1]
    # A handful of float32 operations per step, 4 steps: well inside 1e-5 of the scale of the
    # trajectory (a weight that cancels to near 0 in the last step keeps the absolute float32
    # error of the larger values it came from, so the last weight alone is not the scale).
    scale = np.max(np.abs(np.asarray(want)), initial=np.finfo(np.float64).tiny)
    assert np.max(np.abs(np.asarray(master, np.float64) - want[-1])) <= 1e-5 * scale
    if low:
        np.testing.assert_array_equal(got[-1], state.master.astype(dtype))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=-0.1), "learning_rate must be >= 0, got -0.1"),
        (dict(epsilon=-1.0), "epsilon must be >= 0, got -1.0"),
        (dict(wd=-0.5), "wd must be >= 0, got -0.5"),
        (dict(clip_gradient=0.0), "clip_gradient must be > 0, got 0.0"),
        (dict(clip_gradient=-1.0), "clip_gradient must be > 0, got -1.0"),
        (dict(rescale_grad=float("inf")), "rescale_grad must be finite, got inf"),
        (dict(rescale_grad=float("nan")), "rescale_grad must be finite, got nan"),
        (dict(learning_rate="0.1"), "learning_rate must be a real scalar, got '0.1'"),
        (dict(begin_num_update=-1), "begin_num_update must be an int >= 0, got -1"),
        (dict(multi_precision=1), "multi_precision must be a bool, got 1"),
        (dict(learning_rate=None), "learning_rate must be a number or schedule"),
        (dict(lr_scheduler=0.1), "lr_scheduler must be an mx_adagrad.lr_scheduler.LRScheduler"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        mx_adagrad.adagrad(**kwargs)


def test_bad_trees_fail_at_first_call_naming_the_path():
    params = {"a": jnp.ones(3), "b": {"c": jnp.ones((2, 2))}}
    tx = mx_adagrad.adagrad()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"updates\['b/c'\] must be of shape \(2, 2\)"):
        tx.update({"a": jnp.ones(3), "b": {"c": jnp.ones(4)}}, state, params)
    with pytest.raises(ValueError, match=r"missing \['b/c'\]"):
        tx.update({"a": jnp.ones(3), "b": {}}, state, params)
    with pytest.raises(ValueError, match="params must be passed to update"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"params\['a'\] must be a floating-point array"):
        tx.init({"a": jnp.ones(3, jnp.int32)})
    with pytest.raises(ValueError, match=r"lr_mult path 'nope' must be the path of a parameter"):
        mx_adagrad.adagrad(lr_mult={"nope": 0.5}).init(params)
    with pytest.raises(
        ValueError, match=r"wd_mult must be a pytree with the parameters' structure"
    ):
        mx_adagrad.adagrad(wd_mult=[0.5]).init(params)
