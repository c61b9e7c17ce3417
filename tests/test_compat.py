"""mx_adagrad.AdaGrad and legacy.AdaGrad (the MXNet Optimizer API) against real MXNet fixtures."""

from __future__ import annotations

import types
from contextlib import nullcontext

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mx_adagrad
from mx_adagrad import compat, legacy, lr_scheduler
from tests import reference
from tests.mxnet_fixtures import load, optional


def keys(mapping):
    """JSON object keys back to MXNet's: digit strings are parameter indices."""
    return {int(k) if k.isdigit() else k: v for k, v in mapping.items()}


def within(got, want, tolerance=1e-5):
    # float32 against MXNet's float32 with another operation order: within 1e-5 of the scale.
    assert reference.relative_error(got, want) <= tolerance


@pytest.mark.parametrize("shape", ["7", "10x4"])
def test_mxnet2_matrix_through_update(shape):
    data, _ = load(f"mx2_step_matrix_{shape}")
    for combo in range(len(data["epsilon"])):
        opt = mx_adagrad.AdaGrad(
            learning_rate=float(data["lr"]),
            epsilon=float(data["epsilon"][combo]),
            clip_gradient=optional(data["clip_gradient"][combo]),
            rescale_grad=float(data["rescale_grad"][combo]),
            wd=float(data["wd"][combo]),
        )
        weights = [jnp.asarray(data["weight0"])]
        states = [opt.create_state(0, weights[0])]
        for step, grad in enumerate(data["grads"], start=1):
            opt.update([0], weights, [jnp.asarray(grad)], states)
            within(weights[0], data["weights"][combo, step])
            within(states[0], data["history"][combo, step])


def test_multipliers_by_index_and_by_name():
    data, config = load("mx2_step_mults")
    hyper = config["hyperparameters"]
    names = [str(n) for n in data["param_names"]]
    opt = mx_adagrad.AdaGrad(
        learning_rate=hyper["learning_rate"],
        epsilon=hyper["epsilon"],
        rescale_grad=hyper["rescale_grad"],
        clip_gradient=hyper["clip_gradient"],
        wd=hyper["wd"],
        param_idx2name=keys(config["param_idx2name"]),
    )
    opt.set_lr_mult(keys(config["set_lr_mult"]))
    opt.set_wd_mult(keys(config["set_wd_mult"]))
    n = len(names)
    weights = [jnp.asarray(data[f"weight0_p{i}"]) for i in range(n)]
    states = [opt.create_state(i, w) for i, w in enumerate(weights)]
    for step in range(20):
        grads = [jnp.asarray(data[f"grads_p{i}"][step]) for i in range(n)]
        np.testing.assert_allclose(
            [opt._get_lr(i) for i in range(n)], data["lr_used"][step], rtol=1e-12
        )
        np.testing.assert_allclose(
            [opt._get_wd(i) for i in range(n)], data["wd_used"][step], rtol=1e-12
        )
        opt.update(list(range(n)), weights, grads, states)
        for i in range(n):
            within(weights[i], data[f"weights_p{i}"][step + 1])


def scheduler(spec):
    return getattr(lr_scheduler, spec["scheduler"])(**spec["scheduler_kwargs"])


@pytest.mark.parametrize(
    "case", ["factor_linear", "multifactor_constant", "poly_linear_lr_override"]
)
def test_schedulers_through_the_optimizer(case):
    data, config = load("mx2_step_schedulers")
    spec = config["cases"][case]
    overrides = spec["optimizer_learning_rate"] is not None
    with pytest.warns(UserWarning, match="overrides") if overrides else nullcontext():
        opt = mx_adagrad.AdaGrad(
            learning_rate=spec["optimizer_learning_rate"],
            lr_scheduler=scheduler(spec),
            begin_num_update=int(data["begin_num_update"]),
            **config["hyperparameters"],
        )
    weights = [jnp.asarray(data["weight0"])]
    states = [opt.create_state(0, weights[0])]
    for step, grad in enumerate(data["grads"], start=1):
        opt.update([0], weights, [jnp.asarray(grad)], states)
        assert opt.num_update == data[f"{case}__num_update"][step - 1]
        assert opt.learning_rate == data[f"{case}__lr"][step - 1]  # eager scheduler: bit-exact
        within(weights[0], data[f"{case}__weights"][step])


def test_per_index_counts_and_num_update_is_their_max():
    data, config = load("mx2_step_schedulers")
    case = "cosine_linear_two_params"
    opt = mx_adagrad.AdaGrad(
        learning_rate=None,
        lr_scheduler=scheduler(config["cases"][case]),
        begin_num_update=int(data["begin_num_update"]),
        **config["hyperparameters"],
    )
    weights = [jnp.asarray(data["weight0"]), jnp.asarray(data["weight0"][::-1])]
    states = [opt.create_state(i, w) for i, w in enumerate(weights)]
    for step, grad in enumerate(data["grads"]):
        if data[f"{case}__b_updated"][step]:
            pair_w, pair_s = weights, states
            opt.update([0, 1], pair_w, [jnp.asarray(grad), jnp.asarray(-grad)], pair_s)
        else:
            one_w, one_s = weights[:1], states[:1]
            opt.update([0], one_w, [jnp.asarray(grad)], one_s)
            weights[0], states[0] = one_w[0], one_s[0]
        within(weights[0], data[f"{case}__weights_a"][step + 1])
        within(weights[1], data[f"{case}__weights_b"][step + 1])
    assert opt.num_update == max(opt._index_update_count.values())


def test_multi_precision_float16_states_are_master_and_history():
    data, config = load("mx2_step_multi_precision")
    opt = mx_adagrad.AdaGrad(multi_precision=True, **config["hyperparameters"])
    weights = [jnp.asarray(data["weight0"])]
    states = [opt.create_state_multi_precision(0, weights[0])]
    master, history = states[0]
    assert master.dtype == history.dtype == jnp.float32
    for step, grad in enumerate(data["grads"], start=1):
        opt.update_multi_precision([0], weights, [jnp.asarray(grad)], states)
        assert weights[0].dtype == jnp.float16
        within(states[0][0], data["mp__master32"][step])
        within(states[0][1], data["mp__history"][step])
        np.testing.assert_array_equal(weights[0], states[0][0].astype(jnp.float16))
        # float16 storage: the master rounded to float16 (one float16 ulp, 1e-3 of the scale).
        within(weights[0], data["mp__weights16"][step], 1e-3)


def test_step_and_fused_step_agree_and_fused_step_does_not_recompile():
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,), (20, 2)]
    make = lambda: [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]  # noqa: E731
    start, grads_seq = make(), [make() for _ in range(5)]
    sparse = [
        mx_adagrad.RowSparse(
            np.int32([3, 1, 3]), rng.normal(size=(3, 2)).astype(np.float32), (20, 2)
        )
        for _ in grads_seq
    ]
    sched = lr_scheduler.FactorScheduler(step=1, factor=0.9, base_lr=0.1)
    results = {}
    for mode in ("step", "fused_step"):
        opt = mx_adagrad.AdaGrad(
            learning_rate=None, lr_scheduler=sched, clip_gradient=1.0, rescale_grad=0.5
        )
        opt.set_wd_mult({0: 2.0})
        opt.wd = 0.0
        weights = [jnp.array(w) for w in start]
        states = [opt.create_state(i, w) for i, w in enumerate(weights)]
        size = compat._fused._cache_size()
        for grads, rows in zip(grads_seq, sparse):
            out = getattr(opt, mode)([0, 1, 2], weights, [grads[0], grads[1], rows], states)
            assert out[0] is weights and out[1] is states  # the lists, updated in place
            opt.rescale_grad = opt.rescale_grad * 0.9  # Gluon changes it every step
        if mode == "fused_step":
            assert compat._fused._cache_size() - size <= 1  # one compile for all 5 steps
        results[mode] = weights
    chex.assert_trees_all_close(results["step"], results["fused_step"], rtol=1e-6, atol=1e-7)


def test_mxnet_rules_and_errors():
    with pytest.raises(DeprecationWarning, match="'eps' is deprecated"):
        mx_adagrad.AdaGrad(eps=1e-7)
    sched = lr_scheduler.FactorScheduler(step=2, base_lr=0.3)
    opt = mx_adagrad.AdaGrad(learning_rate=None, lr_scheduler=sched)
    assert opt.learning_rate == 0.3
    with pytest.raises(UserWarning, match="set_learning_rate"):
        opt.set_learning_rate(0.1)
    plain = mx_adagrad.AdaGrad(learning_rate=0.2)
    plain.set_learning_rate(0.05)
    assert plain.learning_rate == 0.05
    with pytest.raises(ValueError, match="sym must be None"):
        mx_adagrad.AdaGrad(sym=object())
    # Multiplier lookup: param_dict > index > name.
    opt = mx_adagrad.AdaGrad(
        learning_rate=1.0,
        param_idx2name={0: "fc_weight", 1: "fc_bias", 2: "bn_gamma"},
        param_dict={0: types.SimpleNamespace(lr_mult=0.25, wd_mult=3.0)},
        wd=1.0,
    )
    opt.set_lr_mult({0: 0.5, 1: 0.7, "fc_bias": 0.9, "bn_gamma": 2.0})
    assert [opt._get_lr(i) for i in range(3)] == [0.25, 0.7, 2.0]
    # 1.9's default: names ending in neither _weight nor _gamma get wd_mult 0.
    assert [opt._get_wd(i) for i in range(3)] == [3.0, 0.0, 1.0]


def test_row_sparse_with_weight_decay_is_refused_as_in_mxnet():
    opt = mx_adagrad.AdaGrad(wd=0.1)
    weights = [jnp.zeros((4, 2))]
    grad = mx_adagrad.RowSparse(np.int32([1]), np.ones((1, 2), np.float32), (4, 2))
    with pytest.raises(ValueError, match="wd for the row_sparse gradient of index 0 must be 0"):
        opt.update([0], weights, [grad], [opt.create_state(0, weights[0])])


def test_legacy_dense_matches_mxnet_1_9_1():
    data, config = load("mx1_adagrad_dense")
    idx2name = keys(config["param_idx2name"])
    for combo in range(len(data["wd"])):
        hyper = dict(
            learning_rate=float(data["lr"]),
            clip_gradient=optional(data["clip_gradient"][combo]),
            rescale_grad=float(data["rescale_grad"][combo]),
            wd=float(data["wd"][combo]),
        )
        opt = legacy.AdaGrad(eps=float(data["eps"]), param_idx2name=idx2name, **hyper)
        weights = [jnp.asarray(data[f"weight0_p{i}"]) for i in range(2)]
        states = [opt.create_state(i, w) for i, w in enumerate(weights)]
        tx = legacy.adagrad(
            eps=float(data["eps"]),
            wd_mult=list(data["wd_effective"][combo] / max(hyper["wd"], 1e-30))
            if hyper["wd"]
            else None,
            **hyper,
        )
        params = [jnp.asarray(data[f"weight0_p{i}"]) for i in range(2)]
        tx_state = tx.init(params)
        for step in range(20):
            grads = [jnp.asarray(data[f"grads_p{i}"][step]) for i in range(2)]
            opt.update([0, 1], weights, grads, states)
            updates, tx_state = tx.update(grads, tx_state, params)
            params = mx_adagrad.apply_updates(params, updates)
            for i in range(2):
                within(weights[i], data[f"weights_p{i}"][combo, step + 1])
                within(params[i], data[f"weights_p{i}"][combo, step + 1])
                within(states[i], data[f"history_p{i}"][combo, step + 1])


def test_legacy_row_sparse_matches_mxnet_1_9_1():
    data, _ = load("mx1_adagrad_row_sparse")
    for combo in range(len(data["clip_gradient"])):
        hyper = dict(
            learning_rate=float(data["lr"]),
            clip_gradient=optional(data["clip_gradient"][combo]),
            rescale_grad=float(data["rescale_grad"][combo]),
        )
        opt = legacy.AdaGrad(eps=float(data["eps"]), **hyper)
        tx = jax.jit(legacy.adagrad(eps=float(data["eps"]), **hyper).update)
        weights = [jnp.asarray(data["weight0"])]
        states = [opt.create_state(0, weights[0])]
        params = jnp.asarray(data["weight0"])
        tx_state = legacy.adagrad(eps=float(data["eps"]), **hyper).init(params)
        for step in range(20):
            grad = mx_adagrad.RowSparse(
                data["grad_indices"][step], data["grad_values"][step], params.shape
            )
            opt.update([0], weights, [grad], states)
            updates, tx_state = tx(grad, tx_state, params)
            params = mx_adagrad.apply_updates(params, updates)
            within(weights[0], data["weights"][combo, step + 1])
            within(params, data["weights"][combo, step + 1])
            within(states[0], data["history"][combo, step + 1])


def test_legacy_refuses_row_sparse_weight_decay():
    grad = mx_adagrad.RowSparse(np.int32([1]), np.ones((1, 2), np.float32), (4, 2))
    tx = legacy.adagrad(wd=0.1)
    params = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="MXNet refuses weight decay on row_sparse"):
        tx.update(grad, tx.init(params), params)


@pytest.mark.parametrize("eps", [1e-7, 1e-2, 1.0])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_legacy_matches_the_float64_1x_formula(eps, wd):
    """Large eps and wd make the 1.x placements (eps under the root, decay outside the history)
    visible: MXNet 2.0's formula fails this test."""
    rng = np.random.default_rng(11)
    weight = rng.uniform(-1, 1, (6,)).astype(np.float32)
    grads = [rng.normal(size=(6,)).astype(np.float32) for _ in range(15)]
    hyper = dict(rescale_grad=0.7, clip_gradient=0.8, wd=wd)
    tx = legacy.adagrad(0.1, eps, **hyper)
    params, state = jnp.asarray(weight), tx.init(jnp.asarray(weight))
    want, history = weight, np.zeros(6)
    for grad in grads:
        updates, state = tx.update(jnp.asarray(grad), state, params)
        params = mx_adagrad.apply_updates(params, updates)
        want, history = reference.mxnet1_step(want, grad, history, lr=0.1, eps=eps, **hyper)
    within(params, want)


def test_multi_precision_row_sparse_table_through_fused_step():
    rng = np.random.default_rng(12)
    table = jnp.asarray(rng.normal(size=(10, 3)), jnp.float16)
    grads = [
        mx_adagrad.RowSparse(
            rng.integers(0, 10, 4).astype(np.int32),
            rng.normal(size=(4, 3)).astype(np.float16),
            (10, 3),
        )
        for _ in range(5)
    ]
    opt = mx_adagrad.AdaGrad(learning_rate=0.1, multi_precision=True)
    weights = [table]
    states = [opt.create_state_multi_precision(0, table)]
    tx = mx_adagrad.adagrad(0.1, multi_precision=True)
    params, tx_state = table, tx.init(table)
    for grad in grads:
        opt.update([0], weights, [grad], states)
        updates, tx_state = tx.update(grad, tx_state, params)
        params = mx_adagrad.apply_updates(params, updates)
    # The Optimizer API and the functional API: the same arithmetic on the same master copy.
    np.testing.assert_array_equal(states[0][0], tx_state.master)
    np.testing.assert_array_equal(weights[0], params)
