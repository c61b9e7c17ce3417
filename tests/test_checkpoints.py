"""Orbax checkpoints of params and mx_adagrad state, saved mid-training and resumed bit for bit.

The optimizer state of ``mx_adagrad.adagrad`` is a tuple of NamedTuples and ``optax.EmptyState``
(``MultiPrecisionState(master, inner_state)`` around it with ``multi_precision=True``, where
``master`` has ``None`` for the float32 leaves). Orbax saves the arrays; the NamedTuple types come
back only when the restore is given a target pytree of that structure. Without one, Orbax returns
plain dicts and lists, which ``tx.update`` cannot use. The pattern::

    import jax
    import orbax.checkpoint as ocp

    # Save, e.g. every N steps:
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        manager.wait_until_finished()

    # Restore, e.g. in a new process: the target is abstract (shapes and dtypes, no arrays).
    tx = mx_adagrad.adagrad(...)  # the same configuration as the run that saved
    abstract_params = jax.eval_shape(init_params, key)
    target = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(
            manager.latest_step(), args=ocp.args.StandardRestore(target)
        )
    params, opt_state = restored["params"], restored["opt_state"]

``ocp.StandardCheckpointer().save(path, tree)`` / ``.restore(path, target)`` work the same way for
a single checkpoint. The step count lives in the state (``ScaleByScheduleState.count``), so a
learning-rate schedule resumes where it stopped. The tests check that a run saved after
``SAVE_AT`` steps and resumed from the restored checkpoint equals the uninterrupted run exactly
after ``MORE`` further steps.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad import lr_scheduler

ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is in the examples extra")

SAVE_AT, MORE = 4, 6
IN, OUT = 6, 3


def init_params(key: jax.Array, low: Any) -> dict:
    """A linear layer and a scalar gain; ``low`` is the dtype of the kernel and the gain."""
    k_kernel, k_bias = jax.random.split(key)
    return {
        "dense": {
            "kernel": jax.random.normal(k_kernel, (IN, OUT)).astype(low),
            "bias": 0.1 * jax.random.normal(k_bias, (OUT,)),  # float32 in every configuration
        },
        "gain": jnp.ones((), low),
    }


def make_tx(
    multi_precision: bool, optimizer: Any = mx_adagrad.adagrad
) -> optax.GradientTransformation:
    """AdaGrad with every stateful part in use: history, step count, a decaying schedule."""
    schedule = lr_scheduler.FactorScheduler(step=3, factor=0.5, base_lr=0.1)
    return optimizer(
        None,
        lr_scheduler=schedule,
        wd=1e-3,
        clip_gradient=1.0,
        multi_precision=multi_precision,
    )


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The data of a step: a function of the step alone, so a resumed run sees the same data."""
    rng = np.random.default_rng(step)
    return rng.normal(size=(8, IN)).astype(np.float32), rng.normal(size=(8, OUT)).astype(np.float32)


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error, computed in float32 whatever the params' dtypes."""
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    return jnp.mean(((x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["gain"] - y) ** 2)


def train(
    tx: optax.GradientTransformation, params: dict, opt_state: optax.OptState, steps: range
) -> tuple[dict, optax.OptState]:
    """Runs the jitted train step over ``steps`` (the step numbers choose the batches)."""

    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state

    for step in steps:
        params, opt_state = train_step(params, opt_state, *batch(step))
    return params, opt_state


def roundtrip_standard_checkpointer(
    directory: pathlib.Path, step: int, tree: Any, target: Any
) -> Any:
    """Saves ``tree`` with ``ocp.StandardCheckpointer``; restores it with a fresh one."""
    path = directory / f"step_{step}"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def roundtrip_checkpoint_manager(directory: pathlib.Path, step: int, tree: Any, target: Any) -> Any:
    """Saves ``tree`` with ``ocp.CheckpointManager``; restores its latest step with a fresh one."""
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    with ocp.CheckpointManager(directory) as manager:
        assert manager.latest_step() == step
        return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))


def assert_bitwise_equal(actual: Any, expected: Any) -> None:
    """Same pytree structure (NamedTuple types and ``None`` leaves included), dtypes and bits."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize(
    "roundtrip",
    [roundtrip_standard_checkpointer, roundtrip_checkpoint_manager],
    ids=["StandardCheckpointer", "CheckpointManager"],
)
@pytest.mark.parametrize(
    ("low", "multi_precision"),
    [(jnp.float32, False), (jnp.bfloat16, True)],
    ids=["float32", "bfloat16-multi_precision"],
)
def test_resumed_run_is_bitwise_identical(
    roundtrip: Any, low: Any, multi_precision: bool, tmp_path: pathlib.Path
) -> None:
    key = jax.random.key(0)
    tx = make_tx(multi_precision)
    params = init_params(key, low)
    full = train(tx, params, tx.init(params), range(SAVE_AT + MORE))

    # Train, save mid-way, and restore into an abstract target built as a new process would.
    saved = dict(zip(("params", "opt_state"), train(tx, params, tx.init(params), range(SAVE_AT))))
    resumed_tx = make_tx(multi_precision)
    abstract_params = jax.eval_shape(functools.partial(init_params, low=low), key)
    target = {
        "params": abstract_params,
        "opt_state": jax.eval_shape(resumed_tx.init, abstract_params),
    }
    restored = roundtrip(tmp_path / "checkpoints", SAVE_AT, saved, target)
    assert_bitwise_equal(restored, saved)
    if multi_precision:
        state = restored["opt_state"]
        assert isinstance(state, mx_adagrad.MultiPrecisionState)
        assert state.master["dense"]["bias"] is None
        assert state.master["dense"]["kernel"].dtype == jnp.float32
        assert restored["params"]["dense"]["kernel"].dtype == jnp.bfloat16
        count = state.inner_state[4].count
    else:
        assert isinstance(restored["opt_state"][3], mx_adagrad.ScaleByAdagradState)
        count = restored["opt_state"][4].count
    assert int(count) == SAVE_AT

    resumed = train(
        resumed_tx,
        restored["params"],
        restored["opt_state"],
        range(SAVE_AT, SAVE_AT + MORE),
    )
    assert_bitwise_equal(resumed, full)


ROWS = 32


def init_embedding(key: jax.Array) -> dict:
    """An embedding table trained with RowSparse gradients, next to a dense projection."""
    k_table, k_proj = jax.random.split(key)
    return {
        "embed": jax.random.normal(k_table, (ROWS, IN)),
        "proj": jax.random.normal(k_proj, (IN, OUT)),
    }


def sparse_train(
    tx: optax.GradientTransformation, params: dict, opt_state: optax.OptState, steps: range
) -> tuple[dict, optax.OptState]:
    """Like ``train``, with the table's gradient a RowSparse of the looked-up rows."""

    def row_loss(params, rows, y):
        return jnp.mean((rows["embed"] @ params["proj"] - y) ** 2)

    grad_fn = mx_adagrad.value_and_row_grad(row_loss, ["embed"])

    @jax.jit
    def train_step(params, opt_state, ids, y):
        _, grads = grad_fn(params, {"embed": ids}, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state

    for step in steps:
        rng = np.random.default_rng(step)
        ids = rng.integers(0, ROWS, 8).astype(np.int32)
        params, opt_state = train_step(params, opt_state, ids, batch(step)[1])
    return params, opt_state


@pytest.mark.parametrize(
    "roundtrip",
    [roundtrip_standard_checkpointer, roundtrip_checkpoint_manager],
    ids=["StandardCheckpointer", "CheckpointManager"],
)
@pytest.mark.parametrize(
    ("optimizer", "state_type"),
    [
        (mx_adagrad.adagrad, mx_adagrad.ScaleByAdagradState),
        (mx_adagrad.rowwise_adagrad, mx_adagrad.ScaleByRowwiseAdagradState),
        (
            lambda *a, wd, **k: mx_adagrad.contrib.group_adagrad(*a, **k),  # it has no decay
            mx_adagrad.ScaleByRowwiseAdagradState,
        ),
    ],
    ids=["adagrad", "rowwise_adagrad", "group_adagrad"],
)
def test_row_sparse_table_run_resumes_bitwise(
    roundtrip: Any, optimizer: Any, state_type: type, tmp_path: pathlib.Path
) -> None:
    key = jax.random.key(1)
    tx = make_tx(multi_precision=False, optimizer=optimizer)
    params = init_embedding(key)
    full = sparse_train(tx, params, tx.init(params), range(SAVE_AT + MORE))
    saved = dict(
        zip(("params", "opt_state"), sparse_train(tx, params, tx.init(params), range(SAVE_AT)))
    )
    abstract_params = jax.eval_shape(init_embedding, key)
    target = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
    restored = roundtrip(tmp_path / "checkpoints", SAVE_AT, saved, target)
    assert_bitwise_equal(restored, saved)
    assert any(isinstance(part, state_type) for part in restored["opt_state"])
    resumed = sparse_train(
        tx, restored["params"], restored["opt_state"], range(SAVE_AT, SAVE_AT + MORE)
    )
    assert_bitwise_equal(resumed, full)
