"""The functional API replays trajectories recorded from real MXNet (tests/fixtures/).

The fixtures were made by ``tests/fixtures/make_mxnet_fixtures.py`` with mxnet 1.9.1: MXNet 2.0's
AdaGrad step written as an ``mx.optimizer.Optimizer`` subclass and run through MXNet's Updater.
"""

from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp
import pytest

import mx_adagrad
from mx_adagrad import lr_scheduler
from tests import reference
from tests.mxnet_fixtures import load, optional


def replay(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (mx_adagrad.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    out = [params]
    for grad in grads:
        params, state = step(params, state, grad)
        out.append(params)
    return out, state


@pytest.mark.parametrize("shape", ["7", "10x4", "3x4x5"])
def test_mxnet_test_matrix(shape):
    data, _ = load(f"mx2_step_matrix_{shape}")
    for combo in range(len(data["epsilon"])):
        tx = mx_adagrad.adagrad(
            float(data["lr"]),
            float(data["epsilon"][combo]),
            clip_gradient=optional(data["clip_gradient"][combo]),
            rescale_grad=float(data["rescale_grad"][combo]),
            wd=float(data["wd"][combo]),
        )
        got, state = replay(tx, jnp.asarray(data["weight0"]), jnp.asarray(data["grads"]))
        for step in range(1, len(got)):
            # Both float32 with different operation order: within 1e-5 of the array's scale.
            assert reference.relative_error(got[step], data["weights"][combo, step]) <= 1e-5
        assert reference.relative_error(state[3].history, data["history"][combo, -1]) <= 1e-5


def test_lr_and_wd_multipliers():
    data, config = load("mx2_step_mults")
    hyper = config["hyperparameters"]
    n = len(data["param_names"])
    params = [jnp.asarray(data[f"weight0_p{i}"]) for i in range(n)]
    grads = [[jnp.asarray(data[f"grads_p{i}"][t]) for i in range(n)] for t in range(20)]
    tx = mx_adagrad.adagrad(
        hyper["learning_rate"],
        hyper["epsilon"],
        rescale_grad=hyper["rescale_grad"],
        clip_gradient=hyper["clip_gradient"],
        wd=hyper["wd"],
        lr_mult=[float(m) for m in data["lr_mult_effective"]],
        wd_mult=[float(m) for m in data["wd_mult_effective"]],
    )
    got, _ = replay(tx, params, grads)
    for i in range(n):
        for step in range(1, 21):
            assert reference.relative_error(got[step][i], data[f"weights_p{i}"][step]) <= 1e-5


SCHEDULER_CASES = [
    "factor_linear",
    "factor_constant",
    "multifactor_linear",
    "multifactor_constant",
    "poly_linear",
    "poly_constant",
    "cosine_linear",
    "cosine_constant",
    "poly_linear_lr_override",
]


@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_schedulers_with_warmup_and_begin_num_update(case):
    data, config = load("mx2_step_schedulers")
    spec = config["cases"][case]
    scheduler = getattr(lr_scheduler, spec["scheduler"])(**spec["scheduler_kwargs"])
    kwargs = dict(lr_scheduler=scheduler, begin_num_update=int(data["begin_num_update"]))
    overrides = spec["optimizer_learning_rate"] is not None
    with pytest.warns(UserWarning, match="overrides the base_lr") if overrides else nullcontext():
        tx = mx_adagrad.adagrad(
            spec["optimizer_learning_rate"], **config["hyperparameters"], **kwargs
        )
    got, _ = replay(tx, jnp.asarray(data["weight0"]), jnp.asarray(data["grads"]))
    for step in range(1, len(got)):
        assert reference.relative_error(got[step], data[f"{case}__weights"][step]) <= 1e-5, step


def test_multi_precision_float16():
    data, _ = load("mx2_step_multi_precision")
    tx = mx_adagrad.adagrad(
        float(data["lr"]),
        float(data["epsilon"]),
        rescale_grad=float(data["rescale_grad"]),
        clip_gradient=float(data["clip_gradient"]),
        wd=float(data["wd"]),
        multi_precision=True,
    )
    params = jnp.asarray(data["weight0"])
    assert params.dtype == jnp.float16
    state = tx.init(params)
    for step, grad in enumerate(data["grads"], start=1):
        updates, state = tx.update(jnp.asarray(grad), state, params)
        params = mx_adagrad.apply_updates(params, updates)
        # float32 master: float32 rounding only. float16 weights: the master rounded to float16,
        # where one float32 ulp of difference can flip the last float16 bit (1e-3).
        assert reference.relative_error(state.master, data["mp__master32"][step]) <= 1e-5
        assert reference.relative_error(params, data["mp__weights16"][step]) <= 1e-3
        assert (
            reference.relative_error(state.inner_state[3].history, data["mp__history"][step])
            <= 1e-5
        )
