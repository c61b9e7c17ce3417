"""Sharded embedding bags on 8 CPU devices: owner pooling, data-parallel dense, exact updates.

Run in one child process with 8 CPU devices (see ``tests/eight_devices.py``); every check runs on
an ``Explicit`` mesh and an ``Auto`` one unless it says otherwise. What is checked:

* row-wise (:func:`mx_adagrad.sharding.value_and_bag_grad`, ``layout="row"``) and table-wise
  (``layout="table"``) train steps with :func:`~mx_adagrad.sharding.sharded_step`, for the
  one-pass steps (element-wise, row-wise) and an optax transformation, sum, mean and weighted
  bags, ``(B, L)`` arrays and offsets, padding ids, ids at shard boundaries and empty bags: with a
  head whose bag gradients do not depend on the pooled values, the tables and histories are
  bitwise the one-device step's over several steps; with a trained tanh head, within float32
  reassociation (the pooled rows and the head's gradient are sums split over devices);
* :func:`mx_adagrad.value_and_bag_grad` itself on a table split by rows over an ``Explicit`` axis
  pools on the owners (a ``ShardedBagGrad``, the row-wise collectives, bitwise steps);
* the pooled rows: bitwise where each bag's ids live on one device, and always table-wise; else
  within the rounding of a reassociated sum. Unpooled lookups
  (:func:`~mx_adagrad.sharding.value_and_row_grad`): bitwise steps;
* the compiled step's collectives, in bytes per device (exact, from the HLO), in the issue's
  configuration (8 devices, 2,048 bags of 20 ids per device, ``D = 64``, float32; the builders of
  ``benchmarks/sharded_bags.py``): row-wise 9,699,588 bytes (<= 10 MB; the replicated lookup of
  ``sharding.sharded_row_lookup``: 86.6 MB), going to 80 ids adds exactly the extra ids;
  table-wise, 8 tables: 9,701,380 bytes at 2,048 bags per device (each device must receive its
  ``T * b * D`` pooled rows and send their gradients back) and 1,214,468 at 256 (<= 2.5 MB);
  unpooled 169 MB (the rows travel); the dense head's ops carry ``b`` rows, not ``k * b``;
* bad tables, batches, layouts and axes are ``ValueError`` naming them.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad
from mx_adagrad import sharding
from tests import eight_devices
from tests.eight_devices import DEVICES, collective_bytes, meshes
from tests.xla_bits import assert_xla_bits

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import sharded_bags  # benchmarks/ is not a package

CHECKS = eight_devices.Checks("tests.test_sharded_bags")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    return CHECKS.report(tmp_path_factory.mktemp("sharded_bags"), timeout=240)


@pytest.mark.parametrize("name", CHECKS.functions)
def test_on_8_cpu_devices(report: dict[str, str | None], name: str) -> None:
    eight_devices.assert_passed(report, name)


# Everything below runs in the child process.

ROWS, DIM, BAGS, LENGTH, STEPS = 1024, 16, 64, 6, 3  # 128 rows and 8 bags per device
# The trained head's tolerance: the pooled rows are summed per owner, then across the 8 owners,
# and the head's gradient over 8 partial batch sums: float32 reassociation of sums of <= 64 terms,
# ~64 * 2**-24 relative, which AdaGrad's step lr * g / sqrt(history) passes on at most scaled by
# lr (0.1): < 1e-6 a step. Observed after 3 steps: at most 2.7e-7 (1,059 of 16,384 table elements
# differ, by up to 1,156 ulps near zero), the head's weights 3 ulps.
RTOL, ATOL = 1e-5, 1e-6

OPTIMIZERS = {
    "fused_adagrad": lambda: mx_adagrad.flat.fused_adagrad(0.1, wd=1e-3, clip_gradient=0.5),
    "fused_rowwise_adagrad": lambda: mx_adagrad.flat.fused_rowwise_adagrad(0.1, epsilon=1e-7),
    "optax adagrad": lambda: mx_adagrad.adagrad(0.1, wd=1e-3, rescale_grad=0.5),
}


def one_device_step(opt, grad_fn):
    """The reference: ``grad_fn`` and ``opt``'s step on one device."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, inputs, *args):
        loss, grads = grad_fn(params, inputs, *args)
        if hasattr(opt, "step"):
            params, state = opt.step(params, grads, state)
        else:
            updates, state = opt.update(grads, state, params)
            params = mx_adagrad.apply_updates(params, updates)
        return params, state, loss

    return step


def sharded_train_step(opt, grad_fn):
    step = sharding.sharded_step(opt)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, inputs, *args):
        loss, grads = grad_fn(params, inputs, *args)
        params, state = step(params, grads, state)
        return params, state, loss

    return train_step


def placed(mesh, tree, specs):
    """``tree`` on ``mesh``, each leaf with its spec (or all with one)."""
    if isinstance(specs, P):
        return jax.device_put(tree, NamedSharding(mesh, specs))
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def row_bags(rng, bags: int = BAGS, length: int = LENGTH, rows: int = ROWS) -> np.ndarray:
    """Zipf ids with duplicates, ids either side of every shard boundary, padding (-1 and
    ``rows``) and two empty bags (all padding)."""
    ids = ((rng.zipf(1.2, (bags, length)) - 1) % rows).astype(np.int32)
    boundaries = np.arange(rows // DEVICES, rows, rows // DEVICES)
    ids[1, :2], ids[2, :2] = boundaries[:2] - 1, boundaries[:2]
    ids[rng.random((bags, length)) < 0.15] = -1
    ids[3, 0], ids[5, :], ids[bags - 1, :] = rows, -1, rows
    return ids


def offsets_bags(rng, bags: int = BAGS) -> mx_adagrad.Bags:
    """Ragged bags (some empty) with weights, as flat ids and offsets."""
    lengths = rng.integers(0, 2 * LENGTH, bags)
    lengths[[0, 7, 40]] = 0
    ids = ((rng.zipf(1.2, lengths.sum()) - 1) % ROWS).astype(np.int32)
    ids[::11] = -1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    weights = rng.normal(size=ids.shape).astype(np.float32)
    return mx_adagrad.Bags(ids, offsets, weights)


def fixed_head_loss(params, pooled, labels, v):
    """A head whose bag gradients ``labels[b] * v / B`` do not depend on the pooled rows, so they
    are the same bits on 1 and 8 devices (the batch mean is of per-bag terms)."""
    del params
    return jnp.mean(labels * (pooled["table"] @ v))


def tanh_head_loss(params, pooled, labels):
    logits = jnp.tanh(pooled["table"]) @ params["w"]
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def assert_state_split(state, table, mesh) -> None:
    for leaf in jax.tree.leaves(state):
        if leaf.ndim >= 1 and leaf.shape[0] == table.shape[0]:
            assert leaf.sharding.spec[:1] == ("x",), leaf.sharding


@CHECKS
def row_wise_bag_steps_are_bitwise_the_one_device_steps() -> None:
    rng = np.random.default_rng(0)
    start = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    v = rng.normal(size=DIM).astype(np.float32)
    cases = {  # (bags of each step, mode)
        "(B, L) sum": ([row_bags(rng) for _ in range(STEPS)], "sum"),
        "(B, L) mean": ([row_bags(rng) for _ in range(STEPS)], "mean"),
        "offsets, weighted sum": ([offsets_bags(rng) for _ in range(STEPS)], "sum"),
    }
    labels = [rng.normal(size=BAGS).astype(np.float32) for _ in range(STEPS)]
    for case, (batches, mode) in cases.items():
        for name, make in OPTIMIZERS.items():
            opt = make()
            grad_fn = mx_adagrad.value_and_bag_grad(fixed_head_loss, ["table"], mode=mode)
            step, want = one_device_step(opt, grad_fn), {"table": jnp.asarray(start)}
            want_state = opt.init(want)
            for bag_ids, y in zip(batches, labels):
                want, want_state, _ = step(want, want_state, {"table": bag_ids}, y, v)
            for mesh in meshes((DEVICES,), ("x",)):
                grad_fn = sharding.value_and_bag_grad(
                    fixed_head_loss, ["table"], mesh, "x", mode=mode
                )
                step = sharded_train_step(opt, grad_fn)
                params = placed(mesh, {"table": start}, {"table": P("x")})
                state = opt.init(params)
                for bag_ids, y in zip(batches, labels):
                    # (B, L) ids and labels split by batch; Bags (ragged) whole on every device.
                    split = (
                        bag_ids
                        if isinstance(bag_ids, mx_adagrad.Bags)
                        else placed(mesh, bag_ids, P("x"))
                    )
                    params, state, _ = step(
                        params, state, {"table": split}, placed(mesh, y, P("x")), v
                    )
                what = f"{case}, {name}, {mesh.axis_types[0]}"
                assert params["table"].sharding.spec[:1] == ("x",), what
                assert_state_split(state, params["table"], mesh)
                assert_xla_bits(jax.device_get(params), jax.device_get(want))
                assert_xla_bits(jax.device_get(state), jax.device_get(want_state))


@CHECKS
def table_wise_bag_steps_are_bitwise_the_one_device_steps() -> None:
    rng = np.random.default_rng(1)
    tables, rows = 16, 64  # 2 tables of 64 rows per device, stacked as (1024, D)
    start = rng.normal(size=(tables * rows, DIM)).astype(np.float32)
    v = rng.normal(size=DIM).astype(np.float32)
    batches = [
        np.stack([row_bags(rng, rows=rows) for _ in range(tables)], axis=1) for _ in range(STEPS)
    ]  # (B, T, L)
    labels = [rng.normal(size=BAGS).astype(np.float32) for _ in range(STEPS)]

    def loss(params, pooled, labels, v):  # pooled["table"]: (B, T, D)
        del params
        return jnp.mean(labels[:, None] * (pooled["table"] @ v))

    def one_device_loss(params, pooled, labels, v):  # pooled: (T * B, D), table-major
        return loss(
            params, {"table": pooled["table"].reshape(tables, BAGS, DIM).swapaxes(0, 1)}, labels, v
        )

    def stacked(bag_ids):  # (B, T, L) -> (T * B, L) ids of the stacked table
        offset = np.arange(tables)[None, :, None] * rows
        ids = np.where((bag_ids >= 0) & (bag_ids < rows), bag_ids + offset, -1)
        return ids.swapaxes(0, 1).reshape(tables * BAGS, -1)

    for mode in ("sum", "mean"):
        for make in OPTIMIZERS.values():
            opt = make()
            grad_fn = mx_adagrad.value_and_bag_grad(one_device_loss, ["table"], mode=mode)
            step, want = one_device_step(opt, grad_fn), {"table": jnp.asarray(start)}
            want_state = opt.init(want)
            for bag_ids, y in zip(batches, labels):
                want, want_state, _ = step(want, want_state, {"table": stacked(bag_ids)}, y, v)
            for mesh in meshes((DEVICES,), ("x",)):
                grad_fn = sharding.value_and_bag_grad(
                    loss, ["table"], mesh, "x", mode=mode, layout="table"
                )
                step = sharded_train_step(opt, grad_fn)
                params = placed(mesh, {"table": start}, {"table": P("x")})
                state = opt.init(params)
                for bag_ids, y in zip(batches, labels):
                    inputs = placed(mesh, ({"table": bag_ids}, y), P("x"))
                    params, state, _ = step(params, state, *inputs, v)
                assert_state_split(state, params["table"], mesh)
                assert_xla_bits(jax.device_get(params), jax.device_get(want))
                assert_xla_bits(jax.device_get(state), jax.device_get(want_state))


@CHECKS
def pooled_rows_are_exact_where_the_summation_order_is_kept() -> None:
    rng = np.random.default_rng(2)
    table = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    bag_ids = row_bags(rng)
    one_shard = (bag_ids % (ROWS // DEVICES)) + (np.arange(BAGS) % DEVICES * ROWS // DEVICES)[
        :, None
    ]  # every bag's ids on one device

    def pooled_of(params, pooled):
        del params
        return jnp.sum(pooled["table"]), pooled["table"]

    for mesh in meshes((DEVICES,), ("x",)):
        grad_fn = sharding.value_and_bag_grad(pooled_of, ["table"], mesh, "x", has_aux=True)
        lookup = jax.jit(lambda params, bag_ids, fn=grad_fn: fn(params, bag_ids)[0][1])
        params = placed(mesh, {"table": table}, {"table": P("x")})
        for ids in (one_shard, bag_ids):
            got = lookup(params, {"table": placed(mesh, ids, P("x"))})
            assert got.shape == (BAGS, DIM) and got.sharding.spec[:1] == ("x",), got.sharding
            want = mx_adagrad.embedding_bag(jnp.asarray(table), ids)
            if ids is one_shard:  # the other devices' partial bags are zeros: x + 0 == x
                assert_xla_bits(np.asarray(got), np.asarray(want))
            else:  # partial sums over 8 owners, then across: L = 6 terms reassociated
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
        # Table-wise: each table's bags are pooled whole by its owner, in order: bitwise.
        stacked = np.tile(table, (2, 1))  # 16 tables of 128 rows, 2 per device
        tables_bags = np.stack([row_bags(rng, rows=128) for _ in range(16)], axis=1)
        grad_fn = sharding.value_and_bag_grad(
            pooled_of, ["table"], mesh, "x", layout="table", has_aux=True
        )
        lookup = jax.jit(lambda params, bag_ids, fn=grad_fn: fn(params, bag_ids)[0][1])
        got = lookup(
            placed(mesh, {"table": stacked}, {"table": P("x")}),
            {"table": placed(mesh, tables_bags, P("x"))},
        )
        want = [
            mx_adagrad.embedding_bag(
                jnp.asarray(stacked[t * 128 : (t + 1) * 128]), tables_bags[:, t]
            )
            for t in range(16)
        ]
        assert_xla_bits(np.asarray(got), np.stack([np.asarray(w) for w in want], axis=1))


@CHECKS
def a_trained_head_matches_the_one_device_run_within_reassociation() -> None:
    rng = np.random.default_rng(3)
    start = {
        "table": rng.normal(size=(ROWS, DIM)).astype(np.float32),
        "w": rng.normal(size=DIM).astype(np.float32),
    }
    batches = [(row_bags(rng), (rng.random(BAGS) < 0.5).astype(np.float32)) for _ in range(STEPS)]
    opt = mx_adagrad.flat.fused_rowwise_adagrad(0.1)
    step = one_device_step(opt, mx_adagrad.value_and_bag_grad(tanh_head_loss, ["table"]))
    want = jax.tree.map(jnp.asarray, start)
    want_state = opt.init(want)
    for bag_ids, y in batches:
        want, want_state, want_loss = step(want, want_state, {"table": bag_ids}, y)
    for mesh in meshes((DEVICES,), ("x",)):
        grad_fn = sharding.value_and_bag_grad(tanh_head_loss, ["table"], mesh, "x")
        step = sharded_train_step(opt, grad_fn)
        params = placed(mesh, start, {"table": P("x"), "w": P()})
        state = opt.init(params)
        for bag_ids, y in batches:
            params, state, loss = step(
                params, state, *placed(mesh, ({"table": bag_ids}, y), P("x"))
            )
        assert params["w"].sharding.is_fully_replicated, params["w"].sharding
        np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
        for key in start:
            np.testing.assert_allclose(
                np.asarray(params[key]), want[key], rtol=RTOL, atol=ATOL, err_msg=key
            )


def fixed_rows_loss(params, rows, labels, v):
    """Unpooled: ``rows["table"]`` is ``(B, L, D)``; its gradient does not depend on the rows."""
    del params
    return jnp.mean(labels[:, None] * (rows["table"] @ v))


@CHECKS
def unpooled_lookups_are_data_parallel_and_bitwise() -> None:
    rng = np.random.default_rng(4)
    start = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    v = rng.normal(size=DIM).astype(np.float32)
    batches = [(row_bags(rng), rng.normal(size=BAGS).astype(np.float32)) for _ in range(STEPS)]
    for make in OPTIMIZERS.values():
        opt = make()
        step = one_device_step(opt, mx_adagrad.value_and_row_grad(fixed_rows_loss, ["table"]))
        want = {"table": jnp.asarray(start)}
        want_state = opt.init(want)
        for ids, y in batches:
            want, want_state, _ = step(want, want_state, {"table": ids}, y, v)
        for mesh in meshes((DEVICES,), ("x",)):
            grad_fn = sharding.value_and_row_grad(fixed_rows_loss, ["table"], mesh, "x")
            step = sharded_train_step(opt, grad_fn)
            params = placed(mesh, {"table": start}, {"table": P("x")})
            state = opt.init(params)
            for ids, y in batches:
                params, state, _ = step(
                    params, state, *placed(mesh, ({"table": ids}, y), P("x")), v
                )
            assert_state_split(state, params["table"], mesh)
            assert_xla_bits(jax.device_get(params), jax.device_get(want))
            assert_xla_bits(jax.device_get(state), jax.device_get(want_state))


@CHECKS
def plain_value_and_bag_grad_pools_on_owners_over_explicit_axes() -> None:
    """``mx_adagrad.value_and_bag_grad`` and ``opt.step`` themselves, the train step of one
    device unchanged, on a table split by rows over an Explicit axis: the pooled bags come split
    by batch, the gradient is a ShardedBagGrad that the one-pass step hands to ``sharded_step``,
    and the step is bitwise the one-device step and compiles to the row-wise layout's
    collectives."""
    rng = np.random.default_rng(5)
    start = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    v = rng.normal(size=DIM).astype(np.float32)
    batches = [(row_bags(rng), rng.normal(size=BAGS).astype(np.float32)) for _ in range(STEPS)]
    opt = mx_adagrad.flat.fused_adagrad(0.1, wd=1e-3)
    grad_fn = mx_adagrad.value_and_bag_grad(fixed_head_loss, ["table"], mode="mean")
    step, want = one_device_step(opt, grad_fn), {"table": jnp.asarray(start)}
    want_state = opt.init(want)
    for bag_ids, y in batches:
        want, want_state, _ = step(want, want_state, {"table": bag_ids}, y, v)
    mesh = jax.make_mesh((DEVICES,), ("x",))  # Explicit axes
    step = one_device_step(opt, grad_fn)  # the same code, placed over the mesh
    params = placed(mesh, {"table": start}, {"table": P("x")})
    state = opt.init(params)
    inputs = placed(mesh, ({"table": batches[0][0]}, batches[0][1]), P("x"))
    grads = jax.jit(lambda p, b, y: grad_fn(p, b, y, v)[1])(params, *inputs)
    assert isinstance(grads["table"], sharding.ShardedBagGrad), grads
    assert (grads["table"].mesh.shape, grads["table"].axis) == (mesh.shape, "x")
    compiled = step.lower(params, state, *inputs, v).compile()
    n = BAGS * LENGTH
    assert collective_bytes(compiled) == {
        "all-gather": n * 4 + BAGS * DIM * 4,
        "reduce-scatter": BAGS * DIM * 4,
        "all-reduce": 4,  # the loss
    }, collective_bytes(compiled)
    for bag_ids, y in batches:
        params, state, _ = step(params, state, *placed(mesh, ({"table": bag_ids}, y), P("x")), v)
    assert_xla_bits(jax.device_get(params), jax.device_get(want))
    assert_xla_bits(jax.device_get(state), jax.device_get(want_state))


def head_rows(compiled) -> set[int]:
    """The leading dimension of every ``tanh`` (the dense head) in a compiled program."""
    return {int(n) for n in re.findall(r"= f32\[(\d+)[,\]][^=]*? tanh\(", compiled.as_text())}


def step_bytes(layout: str, b: int, length: int, mesh) -> tuple[dict[str, int], object]:
    step, example = sharded_bags.train_step(layout, mesh, b, length, 64)
    compiled = step.lower(*example).compile()
    return collective_bytes(compiled), compiled


@CHECKS
def collectives_hold_pooled_bags_not_rows() -> None:
    b, length, dim, k = 2048, 20, 64, DEVICES
    for mesh in meshes((DEVICES,), ("x",)):
        what = str(mesh.axis_types[0])
        today, _ = step_bytes("replicated", b, length, mesh)  # sharding.sharded_row_lookup's
        assert sum(today.values()) > 86e6, (what, today)
        row, compiled = step_bytes("row-wise", b, length, mesh)
        # ids (B, L) gathered, (B, D) partial bags reduce-scattered, (B, D) bag gradients
        # gathered, the head's (D,) gradient and the loss all-reduced: 9,699,588 bytes.
        head = (dim + 1) * 4
        expected = {
            "all-gather": k * b * length * 4 + k * b * dim * 4,
            "reduce-scatter": k * b * dim * 4,
            "all-reduce": head,
        }
        assert row == expected, (what, row, expected)
        assert sum(row.values()) <= 10e6, (what, row)
        assert head_rows(compiled) == {b}, (what, head_rows(compiled))
        native = set(re.findall(r'custom_call_target="(mx_adagrad_\w+)"', compiled.as_text()))
        assert {"mx_adagrad_bag_pool_f32", "mx_adagrad_sparse_step_f32"} <= native, native
        longer, _ = step_bytes("row-wise", b, 4 * length, mesh)
        extra_ids = k * b * 3 * length * 4
        assert sum(longer.values()) - sum(row.values()) == extra_ids, (what, longer)
        assert sum(longer.values()) <= 1.1 * (sum(row.values()) + extra_ids)
        # Table-wise, 8 tables: ids to their owners, pooled bags back, their gradients to the
        # owners, all by all-to-all; the head's (T * D,) gradient and the loss all-reduced.
        for bags_per_device, bound in ((2048, 9.71e6), (256, 2.5e6)):
            tables, compiled = step_bytes("table-wise", bags_per_device, length, mesh)
            expected = {
                "all-to-all": k * bags_per_device * (length + 2 * dim) * 4,
                "all-reduce": (k * dim + 1) * 4,
            }
            assert tables == expected, (what, tables, expected)
            assert sum(tables.values()) <= bound, (what, tables)
        unpooled, compiled = step_bytes("unpooled row-wise", b, length, mesh)
        rows_bytes = k * b * length * dim * 4
        assert unpooled == {
            "all-gather": k * b * length * 4 + rows_bytes,
            "reduce-scatter": rows_bytes,
            "all-reduce": head,
        }, (what, unpooled)
        assert head_rows(compiled) == {b}, (what, head_rows(compiled))


@CHECKS
def bad_tables_batches_layouts_and_axes_are_value_errors() -> None:
    def loss(params, pooled):
        del params
        return jnp.sum(pooled["table"])

    ids = jnp.zeros((16, 3), jnp.int32)
    for mesh in meshes((DEVICES,), ("x",)):
        bag_grad = functools.partial(sharding.value_and_bag_grad, loss, ["table"], mesh)
        cases = [  # (the message's start, function, params, inputs)
            ("table", bag_grad("x"), jnp.zeros((12, 4)), ids),
            ("bags", bag_grad("x"), jnp.zeros((16, 4)), jnp.zeros((12, 3), jnp.int32)),
            (
                "table",
                bag_grad("x", layout="table"),
                jnp.zeros((20, 4)),
                jnp.zeros((8, 8, 2), jnp.int32),
            ),
            ("bags", bag_grad("x", layout="table"), jnp.zeros((64, 4)), ids),
            (
                "ids",
                sharding.value_and_row_grad(loss, ["table"], mesh, "x"),
                jnp.zeros((16, 4)),
                jnp.zeros((12,), jnp.int32),
            ),
        ]
        for name, fn, table, inputs in cases:
            try:
                jax.jit(fn)({"table": table}, {"table": inputs})
            except ValueError as error:
                assert re.match(
                    rf"mx_adagrad\.sharding\.value_and_\w+_grad( \(table 'table'\))?: {name} must be",
                    str(error),
                ), error
            else:
                raise AssertionError(f"no ValueError for {name}: {table.shape}, {inputs.shape}")
        for where, make, args in (
            ("axis", bag_grad, ("y",)),
            ("layout['table']", functools.partial(bag_grad, layout="rows"), ("x",)),
        ):
            try:
                make(*args)
            except ValueError as error:
                assert f": {where} must be" in str(error), error
            else:
                raise AssertionError(f"no ValueError for {where}")


if __name__ == "__main__":
    CHECKS.main(sys.argv[1])
