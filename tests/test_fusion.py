"""The compiled step: how many loops XLA emits per parameter, and no temporary buffers.

Under jit with params and state donated, the ideal step reads w, g, history once and writes w,
history once. XLA on CPU emits two elementwise loops per leaf (history, then weight, each
recomputing the clipped, decayed gradient from w and g) and no temporary buffer: these tests pin
that, so a change that adds a loop or a temporary fails here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import mx_adagrad

N = 1 << 16  # large enough that a temporary would show as ~N bytes


def compile_step(tx, params):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    grads = jax.tree.map(jnp.ones_like, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()


def loop_fusions(compiled, shape):
    """The fusions of the entry computation whose output is an array of ``shape``."""
    entry = compiled.as_text().split("ENTRY", 1)[1]
    dims = ",".join(map(str, shape))
    pattern = re.compile(r"= \w+\[" + re.escape(dims) + r"\]\{[^}]*\} fusion\(")
    return [line for line in entry.splitlines() if pattern.search(line)]


CONFIGS = {
    "defaults": dict(),
    "all_options": dict(rescale_grad=0.8, clip_gradient=0.5, wd=0.1),
    "multipliers": dict(wd=0.1, lr_mult={"a": 0.5}, wd_mult={"b": 2.0}),
    "optax_schedule": dict(learning_rate=optax.cosine_decay_schedule(0.1, 100), wd=0.1),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_two_loops_per_leaf_and_no_temporaries(config):
    params = {"a": jnp.ones((N,)), "b": jnp.ones((N // 4, 4))}
    compiled = compile_step(mx_adagrad.adagrad(**config), params)
    assert len(loop_fusions(compiled, (N,))) == 2
    assert len(loop_fusions(compiled, (N // 4, 4))) == 2
    # Scalars only (the step count, a schedule's value): nothing proportional to N.
    assert compiled.memory_analysis().temp_size_in_bytes <= 64


def test_traced_hyperparameters_fuse_the_same_way():
    tx = optax.inject_hyperparams(mx_adagrad.adagrad)(
        learning_rate=0.1, clip_gradient=0.5, wd=0.1, rescale_grad=0.5
    )
    compiled = compile_step(tx, {"a": jnp.ones((N,))})
    assert len(loop_fusions(compiled, (N,))) == 2
    assert compiled.memory_analysis().temp_size_in_bytes <= 64


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_multi_precision_is_one_loop_per_output_and_no_temporaries(dtype):
    compiled = compile_step(
        mx_adagrad.adagrad(0.1, wd=0.1, multi_precision=True), {"a": jnp.ones((N,), dtype)}
    )
    # Three outputs per leaf (weight, float32 master, float32 history): three loops.
    assert len(loop_fusions(compiled, (N,))) == 3
    assert compiled.memory_analysis().temp_size_in_bytes <= 64


def test_donated_buffers_are_reused_for_params_and_history():
    compiled = compile_step(mx_adagrad.adagrad(0.1), {"a": jnp.ones((N,))})
    header = compiled.as_text().split("\n", 1)[0]
    # input_output_alias maps the donated weight and history onto the outputs (updated in place).
    assert header.count("may-alias") >= 2
