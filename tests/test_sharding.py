"""Sharded training on a mesh of 8 CPU devices: dense, data-parallel, and row-sharded tables.

The device count of the CPU backend is fixed by ``XLA_FLAGS`` before JAX starts, and the rest of
the suite shares one process with one device. So the checks below run in one child process
(``python -m tests.test_sharding REPORT``, with ``--xla_force_host_platform_device_count=8``),
which records each check's traceback, or ``None``, in a JSON report; the test
``test_on_8_cpu_devices[<check>]`` fails with that traceback. Every check runs on an
``Explicit`` mesh (``jax.make_mesh``'s default) and an ``Auto`` one.

What is checked:

* dense params placed with ``NamedSharding`` on a 4 x 2 mesh: ``tx.init`` gives the history
  (and the ``multi_precision`` master copy) the sharding of its parameter; the jitted, donated step
  keeps every sharding, compiles to no collective operation, and equals the one-device step
  bitwise (all elementwise);
* data parallel, batch split over 8 devices, params replicated: the step's only collectives are
  the all-reduces of the gradient (as many as the gradient alone compiles to), params stay
  replicated, and 10 steps equal the one-device run within float32 summation-order rounding;
* a table split by rows, updated with :func:`mx_adagrad.sharding.sharded_row_update`: bitwise the
  single-device RowSparse step (table and history, element-wise or row-wise) over steps with duplicates, ids at shard
  boundaries and out-of-range ids, also on a 2-D mesh with the batch split over the other axis; no
  collective; per-device memory of one shard, and no array with the table's row count anywhere in
  the compiled program;
* :func:`mx_adagrad.sharding.sharded_row_lookup` is exactly ``table[ids]``, and a whole
  embedding train step (lookup, gradient of the rows, row-sharded update, batch split over the
  mesh) equals the one-device step with ``value_and_row_grad``;
* bad tables and axes are ``ValueError`` naming them.
"""

from __future__ import annotations

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad
from mx_adagrad.sharding import sharded_row_lookup, sharded_row_update
from tests import eight_devices
from tests.eight_devices import DEVICES, collectives, meshes

CHECKS = eight_devices.Checks("tests.test_sharding")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    return CHECKS.report(tmp_path_factory.mktemp("sharding"), timeout=120)


@pytest.mark.parametrize("name", CHECKS.functions)
def test_on_8_cpu_devices(report: dict[str, str | None], name: str) -> None:
    eight_devices.assert_passed(report, name)


# Everything below runs in the child process.


def assert_trees_equal(actual, expected, what: str) -> None:
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)
    ):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(e), err_msg=f"{what}{jax.tree_util.keystr(path)}"
        )


DENSE_CONFIGS = {
    "wd, clip, lr_mult": dict(wd=1e-3, clip_gradient=0.5, lr_mult={"kernel": 0.5, "bias": 2.0}),
    "multi_precision": dict(wd=1e-3, clip_gradient=0.5, multi_precision=True),
}


def param_shaped_state(state, params) -> list[tuple[str, object]]:
    """(path, leaf) for every state leaf that mirrors a parameter: histories, master copies."""
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if any(leaf.shape == p.shape for p in jax.tree.leaves(params))
    ]


def matching_param(path: str, params):
    """The parameter a state leaf mirrors: the one whose key ends the leaf's path."""
    return next(p for name, p in params.items() if path.endswith(f"['{name}']"))


@CHECKS
def init_gives_state_the_param_sharding() -> None:
    for mesh in meshes((4, 2), ("data", "model")):
        params = eight_devices.sharded_params(mesh)
        for config in DENSE_CONFIGS.values():
            state = mx_adagrad.adagrad(0.1, **config).init(params)
            mirrored = param_shaped_state(state, params)
            # A history per parameter, and a master copy of the bfloat16 one with multi_precision.
            assert len(mirrored) == len(params) + config.get("multi_precision", False), mirrored
            for path, leaf in mirrored:
                param = matching_param(path, params)
                assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
                    f"{mesh.axis_types} {path}: {leaf.sharding} != {param.sharding}"
                )


def dense_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return step


@CHECKS
def dense_step_keeps_shardings_adds_no_collectives_and_equals_one_device() -> None:
    for mesh in meshes((4, 2), ("data", "model")):
        for name, config in DENSE_CONFIGS.items():
            tx = mx_adagrad.adagrad(0.1, **config)
            params = eight_devices.sharded_params(mesh)
            grads = jax.tree.map(lambda p: (p * 3.0 - 0.5).astype(p.dtype), params)
            local = {k: np.asarray(v) for k, v in params.items()}
            local_grads = {k: np.asarray(v) for k, v in grads.items()}
            state = tx.init(params)
            step = dense_step(tx).lower(params, state, grads).compile()
            assert collectives(step) == [], f"{name} {mesh.axis_types}: {collectives(step)}"

            one_device_step = dense_step(tx)
            want_params, want_state = local, tx.init(local)
            for _ in range(3):
                params, state = step(params, state, grads)
                want_params, want_state = one_device_step(want_params, want_state, local_grads)
            for key, leaf in params.items():
                assert leaf.sharding.is_equivalent_to(grads[key].sharding, leaf.ndim), key
            for path, leaf in param_shaped_state(state, params):
                param = matching_param(path, params)
                assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), path
            assert_trees_equal(params, want_params, f"{name} params")
            assert_trees_equal(state, want_state, f"{name} state")
        # The detector's control: a global gradient norm needs an all-reduce over the shards.
        norm_tx = optax.chain(optax.clip_by_global_norm(1.0), mx_adagrad.adagrad(0.1))
        params = eight_devices.sharded_params(mesh)
        compiled = dense_step(norm_tx).lower(params, norm_tx.init(params), params).compile()
        assert "all-reduce(" in collectives(compiled), collectives(compiled)


BATCH, FEATURES, HIDDEN, DP_STEPS = 64, 12, 16, 10


def mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


def mlp_data():
    rng = np.random.default_rng(1)
    params = {
        "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / 3,
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(size=(HIDDEN,)).astype(np.float32) / 4,
        "b2": np.zeros((), np.float32),
    }
    batches = []
    for _ in range(DP_STEPS):
        x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
        batches.append((x, (x[:, 0] + x[:, 1] > 0).astype(np.float32)))
    return params, batches


def train_step(tx, with_optimizer: bool = True):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        if not with_optimizer:
            return grads
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return step


# Data-parallel tolerance. The batch mean's gradient is a sum over the examples: on one device in
# one order, on 8 devices as 8 partial sums then an all-reduce of the 8. Reassociating a float32 sum
# of n terms changes it by at most about n * 2**-24 * sum(|terms|): delta ~ 4e-6 relative for n =
# 64. Since |g| <= sqrt(history), AdaGrad's step lr * g / (sqrt(history) + eps) changes by at most
# about lr * delta when every g changes by delta: 4e-7 a step at lr 0.1, < 1e-5 over 10 steps.
# Observed: at most 2.4e-7, one or two float32 ulps of these weights.
DP_RTOL, DP_ATOL = 1e-5, 1e-5


@CHECKS
def data_parallel_equals_one_device() -> None:
    tx = mx_adagrad.adagrad(0.1, wd=1e-4, clip_gradient=1.0)
    start, batches = mlp_data()
    one_device_step, want, want_state = train_step(tx), start, tx.init(start)
    for x, y in batches:
        want, want_state = one_device_step(want, want_state, x, y)

    for mesh in meshes((DEVICES,), ("data",)):
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        params = jax.device_put(start, replicated)
        state = tx.init(params)
        step = train_step(tx)
        example = jax.device_put(batches[0], split)
        compiled = step.lower(params, state, *example).compile()
        gradient_only = train_step(tx, with_optimizer=False).lower(params, state, *example)
        gradient_collectives = collectives(gradient_only.compile())
        # The gradient's all-reduce is the model's; the optimizer adds nothing to it.
        assert set(gradient_collectives) == {"all-reduce("}, gradient_collectives
        step_collectives = collectives(compiled)
        assert sorted(step_collectives) == sorted(gradient_collectives), step_collectives
        for x, y in batches:
            params, state = step(params, state, *jax.device_put((x, y), split))
        for key, leaf in params.items():
            assert leaf.sharding.is_fully_replicated, (key, leaf.sharding)
            np.testing.assert_allclose(
                np.asarray(leaf), want[key], rtol=DP_RTOL, atol=DP_ATOL, err_msg=key
            )


ROWS, DIM, LOOKUPS = 1024, 16, 256  # 128 rows per device

SPARSE_CONFIGS = {
    "defaults": (mx_adagrad.adagrad, dict(), "float32"),
    "wd, clip, rescale": (
        mx_adagrad.adagrad,
        dict(wd=0.01, clip_gradient=0.3, rescale_grad=0.5),
        "float32",
    ),
    "lr_mult, initial history": (
        mx_adagrad.adagrad,
        dict(lr_mult=0.5, initial_accumulator_value=0.1),
        "float32",
    ),
    "multi_precision bfloat16": (
        mx_adagrad.adagrad,
        dict(wd=0.01, multi_precision=True),
        "bfloat16",
    ),
    "rowwise, wd, clip": (mx_adagrad.rowwise_adagrad, dict(wd=0.01, clip_gradient=0.3), "float32"),
    "group_adagrad, clip": (mx_adagrad.contrib.group_adagrad, dict(clip_gradient=0.3), "float32"),
    "rowwise multi_precision bfloat16": (
        mx_adagrad.rowwise_adagrad,
        dict(initial_accumulator_value=0.1, multi_precision=True),
        "bfloat16",
    ),
}


def row_state(state, table) -> list[tuple[str, object]]:
    """(path, leaf) for every state leaf with one entry or row per table row (split with it)."""
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if leaf.ndim >= 1 and leaf.shape[0] == table.shape[0]
    ]


def lookups(rng, rows: int = ROWS, n: int = LOOKUPS):
    """Zipf ids with duplicates, the rows either side of every shard boundary, and two ids outside
    the table (padding: they update nothing)."""
    boundaries = np.arange(rows // DEVICES, rows, rows // DEVICES)
    special = np.concatenate([boundaries - 1, boundaries, [rows, rows + 7]])
    zipf = (rng.zipf(1.3, n - special.size) - 1) % rows
    ids = rng.permutation(np.concatenate([zipf, special])).astype(np.int32)
    return ids, rng.normal(size=(n, DIM)).astype(np.float32)


def single_device_sparse_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(table, state, ids, values):
        updates, state = tx.update(mx_adagrad.RowSparse(ids, values, table.shape), state, table)
        return mx_adagrad.apply_updates(table, updates), state

    return step


@CHECKS
def row_sharded_update_equals_single_device_bitwise() -> None:
    rng = np.random.default_rng(2)
    batches = [lookups(rng) for _ in range(4)]
    for name, (optimizer, config, dtype) in SPARSE_CONFIGS.items():
        tx = optimizer(0.1, **config)
        start = np.asarray(jnp.asarray(rng.normal(size=(ROWS, DIM)), dtype))  # host copy: kept
        one_device_step, want = single_device_sparse_step(tx), jnp.asarray(start)
        want_state = tx.init(want)
        for ids, values in batches:
            want, want_state = one_device_step(want, want_state, ids, values)
        for mesh in meshes((DEVICES,), ("x",)):
            table = jax.device_put(start, NamedSharding(mesh, P("x")))
            state = tx.init(table)
            step = jax.jit(sharded_row_update(tx, mesh, "x"), donate_argnums=(0, 1))
            step = step.lower(table, state, *batches[0]).compile()
            assert collectives(step) == [], f"{name}: {collectives(step)}"
            for ids, values in batches:
                table, state = step(table, state, ids, values)
            assert table.sharding.spec[0] == "x", table.sharding
            # History (per element or per row) and master copy: split by rows, as the table.
            per_row = row_state(state, table)
            assert len(per_row) == 1 + config.get("multi_precision", False), per_row
            for path, leaf in per_row:
                assert leaf.sharding.is_equivalent_to(table.sharding, leaf.ndim), path
            assert_trees_equal(table, want, f"{name} table")
            assert_trees_equal(state, want_state, f"{name} state")


@CHECKS
def row_sharded_update_on_a_2d_mesh_with_the_batch_split() -> None:
    tx = mx_adagrad.adagrad(0.1, wd=0.01, clip_gradient=0.3)
    rng = np.random.default_rng(5)
    start = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    batches = [lookups(rng) for _ in range(3)]
    one_device_step, want = single_device_sparse_step(tx), jnp.asarray(start)
    want_state = tx.init(want)
    for ids, values in batches:
        want, want_state = one_device_step(want, want_state, ids, values)
    # Rows split over "rows" and replicated over "data"; ids and values split over "data".
    for mesh in meshes((2, 4), ("data", "rows")):
        table = jax.device_put(start, NamedSharding(mesh, P("rows")))
        state = tx.init(table)
        step = jax.jit(sharded_row_update(tx, mesh, "rows"), donate_argnums=(0, 1))
        batch_split = NamedSharding(mesh, P("data"))
        for ids, values in batches:
            table, state = step(table, state, *jax.device_put((ids, values), batch_split))
        assert table.sharding.spec[0] == "rows", table.sharding
        assert_trees_equal(table, want, "table")
        assert_trees_equal(state, want_state, "state")
        # The lookup: table[ids], and rows of zeros for the ids outside the table.
        ids = batches[0][0]
        rows = jax.jit(sharded_row_lookup(mesh, "rows"))(table, jax.device_put(ids, batch_split))
        expected = np.where((ids < ROWS)[:, None], np.asarray(want)[np.minimum(ids, ROWS - 1)], 0)
        np.testing.assert_array_equal(np.asarray(rows), expected)


@CHECKS
def row_sharded_update_memory_is_one_shard_per_device() -> None:
    rows = 1 << 16  # 4 MiB per float32 table, 512 KiB per shard
    tx = mx_adagrad.adagrad(0.1, wd=0.01)
    for mesh in meshes((DEVICES,), ("x",)):
        table = jax.device_put(jnp.zeros((rows, DIM)), NamedSharding(mesh, P("x")))
        state = tx.init(table)
        ids, values = lookups(np.random.default_rng(3), rows=rows)
        step = jax.jit(sharded_row_update(tx, mesh, "x"), donate_argnums=(0, 1))
        compiled = step.lower(table, state, ids, values).compile()
        shard = rows // DEVICES * DIM * 4
        memory = compiled.memory_analysis()
        # Per device: one shard of the table and of the history, the lookups, the step count.
        assert memory.argument_size_in_bytes == 2 * shard + ids.nbytes + values.nbytes + 4, memory
        assert memory.alias_size_in_bytes >= 2 * shard, memory  # updated in place
        assert memory.temp_size_in_bytes < shard, memory  # scratch follows the lookups, not rows
        hlo = compiled.as_text()
        assert f"[{rows // DEVICES},{DIM}]" in hlo
        assert not re.search(rf"\[{rows}(,|\])", hlo), "an array with the full table's rows"


def embedding_loss(w, rows, labels):
    """A bag-of-embeddings logistic regression: ``rows`` is ``(batch, bag, DIM)``."""
    logits = jnp.mean(rows, axis=1) @ w
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def sharded_embedding_step(mesh, table_tx, dense_tx):
    """A train step of :func:`embedding_loss` with the table split by rows over ``mesh`` axis x."""
    lookup = sharded_row_lookup(mesh, "x")
    update = sharded_row_update(table_tx, mesh, "x")

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def step(table, table_state, w, w_state, ids, labels):
        d_w, d_rows = jax.grad(embedding_loss, argnums=(0, 1))(w, lookup(table, ids), labels)
        updates, w_state = dense_tx.update(d_w, w_state, w)
        table, table_state = update(table, table_state, ids.reshape(-1), d_rows.reshape(-1, DIM))
        return table, table_state, mx_adagrad.apply_updates(w, updates), w_state

    return step


@CHECKS
def sharded_lookup_equals_take_and_embedding_train_step_equals_one_device() -> None:
    rng = np.random.default_rng(4)
    start = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    w0 = rng.normal(size=(DIM,)).astype(np.float32)
    batches = [
        (((rng.zipf(1.3, (32, 4)) - 1) % ROWS).astype(np.int32), rng.integers(0, 2, 32) * 1.0)
        for _ in range(5)
    ]
    # One transformation for both leaves on one device; one for each when the table is sharded.
    tx = dense_tx = table_tx = mx_adagrad.adagrad(0.1, clip_gradient=0.05)
    grad_fn = mx_adagrad.value_and_row_grad(
        lambda p, rows, labels: embedding_loss(p["w"], rows["table"], labels), tables=["table"]
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def one_device_step(params, state, ids, labels):
        _, grads = grad_fn(params, {"table": ids}, labels)
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    want = {"table": jnp.asarray(start), "w": jnp.asarray(w0)}
    want_state = tx.init(want)
    for ids, labels in batches:
        want, want_state = one_device_step(want, want_state, ids, labels)

    for mesh in meshes((DEVICES,), ("x",)):
        step = sharded_embedding_step(mesh, table_tx, dense_tx)
        table = jax.device_put(start, NamedSharding(mesh, P("x")))
        np.testing.assert_array_equal(
            np.asarray(jax.jit(sharded_row_lookup(mesh, "x"))(table, batches[0][0])),
            start[batches[0][0]],
        )
        w = jax.device_put(w0, NamedSharding(mesh, P()))
        table_state, w_state = table_tx.init(table), dense_tx.init(w)
        split = NamedSharding(mesh, P("x"))
        for ids, labels in batches:
            table, table_state, w, w_state = step(
                table, table_state, w, w_state, *jax.device_put((ids, labels), split)
            )
        assert table.sharding.spec[0] == "x", table.sharding
        # The loss's batch mean is split over the devices: float32 summation order, as above.
        np.testing.assert_allclose(np.asarray(table), want["table"], rtol=DP_RTOL, atol=DP_ATOL)
        np.testing.assert_allclose(np.asarray(w), want["w"], rtol=DP_RTOL, atol=DP_ATOL)


@CHECKS
def bad_tables_and_axes_are_value_errors() -> None:
    tx = mx_adagrad.adagrad(0.1)
    table, ids, values = jnp.zeros((12, 4)), jnp.zeros(3, jnp.int32), jnp.zeros((3, 4))
    for mesh in meshes((DEVICES,), ("x",)):
        update, lookup = sharded_row_update(tx, mesh, "x"), sharded_row_lookup(mesh, "x")
        cases = [  # (the message's start, function, arguments)
            ("sharded_row_update: table", update, (table, tx.init(table), ids, values)),
            ("sharded_row_lookup: table", lookup, (table, ids)),
            ("sharded_row_lookup: axis", sharded_row_lookup(mesh, "y"), (jnp.zeros((16, 4)), ids)),
        ]
        for start, fn, args in cases:
            try:
                jax.jit(fn)(*args)
            except ValueError as error:
                assert str(error).startswith(f"mx_adagrad.{start} must be"), error
            else:
                raise AssertionError(f"no ValueError: mx_adagrad.{start}")


if __name__ == "__main__":
    CHECKS.main(sys.argv[1])
