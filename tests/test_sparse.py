"""RowSparse gradients: the same numbers as the dense path, only the rows present touched."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import mx_adagrad
from tests import reference

ROWS, DIM = 40, 3


def zipf_ids(rng, n, rows=ROWS):
    """Embedding-lookup-like ids: skewed, with many duplicates, in arbitrary order."""
    return (rng.zipf(1.3, n) - 1) % rows


def sparse_grads(seed, steps, n=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = zipf_ids(rng, n).astype(np.int32)
        out.append(
            mx_adagrad.RowSparse(ids, rng.normal(size=(n, DIM)).astype(np.float32), (ROWS, DIM))
        )
    return out


def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return step


def train(tx, params, grads):
    state, step = tx.init(params), make_step(tx)
    for grad in grads:
        params, state = step(params, state, grad)
    return params, state


def table(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(ROWS, DIM)), jnp.float32)


HYPER = [
    dict(),
    dict(rescale_grad=0.5, clip_gradient=0.3),
    dict(clip_gradient=0.1, epsilon=1e-8),
    dict(lr_mult={"emb": 0.5}, rescale_grad=2.0),
]


@pytest.mark.parametrize("hyper", HYPER)
def test_equals_dense_path_on_the_densified_gradient(hyper):
    grads = sparse_grads(seed=1, steps=15)
    tx = mx_adagrad.adagrad(0.1, **hyper)
    sparse_params, sparse_state = train(tx, {"emb": table()}, [{"emb": g} for g in grads])
    dense_params, dense_state = train(tx, {"emb": table()}, [{"emb": g.todense()} for g in grads])
    # Same float32 operations on the same summed rows: a duplicate sum may round differently from
    # the dense scatter-add order only in the last bit.
    chex.assert_trees_all_close(sparse_params, dense_params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(sparse_state, dense_state, rtol=1e-6, atol=1e-7)


def test_matches_float64_reference():
    grads = sparse_grads(seed=2, steps=20)
    hyper = dict(rescale_grad=0.7, clip_gradient=0.4)
    got, _ = train(mx_adagrad.adagrad(0.1, **hyper), table(), grads)
    want, _ = reference.mxnet2_run(
        table(), [np.asarray(g.todense()) for g in grads], lr=0.1, **hyper
    )
    assert reference.relative_error(got, want[-1]) <= 1e-5


TRANSFORMS = {
    "rescale": mx_adagrad.rescale(0.3),
    "clip": mx_adagrad.clip(0.2),
    "add_decayed_weights": mx_adagrad.add_decayed_weights(0.1),
    "scale_by_adagrad": mx_adagrad.scale_by_adagrad(1e-6, 0.5),
    "scale_by_schedule": mx_adagrad.scale_by_schedule(0.1, lr_mult={"emb": 0.5}),
}


@pytest.mark.parametrize("tx", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_each_transform_alone_equals_dense_on_the_rows_present(tx):
    grad = sparse_grads(seed=10, steps=1)[0]
    params = {"emb": table()}
    state = tx.init(params)
    got, _ = tx.update({"emb": grad}, state, params)
    want, _ = tx.update({"emb": grad.todense()}, state, params)
    assert isinstance(got["emb"], mx_adagrad.RowSparse)
    rows = np.unique(np.asarray(grad.indices))
    # Same operations on the same summed rows (duplicates summed by a different reduction order).
    np.testing.assert_allclose(
        np.asarray(got["emb"].todense())[rows], np.asarray(want["emb"])[rows], rtol=1e-6, atol=1e-7
    )


def test_untouched_rows_stay_bit_identical():
    grads = sparse_grads(seed=3, steps=5)
    touched = np.unique(np.concatenate([np.asarray(g.indices) for g in grads]))
    untouched = np.setdiff1d(np.arange(ROWS), touched)
    assert untouched.size > 0
    tx = mx_adagrad.adagrad(0.1, wd=0.1, initial_accumulator_value=0.25)
    start = np.asarray(table())
    params, state = train(tx, table(), grads)
    np.testing.assert_array_equal(np.asarray(params)[untouched], start[untouched])
    np.testing.assert_array_equal(np.asarray(state[3].history)[untouched], 0.25)


def test_mixed_dense_and_sparse_leaves_under_jit():
    grads = sparse_grads(seed=4, steps=6)
    rng = np.random.default_rng(4)
    dense = [jnp.asarray(rng.normal(size=(5,)), jnp.float32) for _ in grads]
    params = {"emb": table(), "w": jnp.linspace(-1, 1, 5)}
    want_w, _ = reference.mxnet2_run(params["w"], dense, lr=0.1, clip_gradient=0.5, wd=0.01)
    tx = mx_adagrad.adagrad(0.1, clip_gradient=0.5, wd=0.01)
    got, _ = train(tx, params, [{"emb": g, "w": d} for g, d in zip(grads, dense)])
    assert reference.relative_error(got["w"], want_w[-1]) <= 1e-5


def lazy_reference(weight, grads, *, lr, wd):
    """The float64 step applied to the touched rows only: MXNet 2.0's formula, lazily decayed."""
    weight = np.asarray(weight, np.float64)
    history = np.zeros_like(weight)
    for grad in grads:
        rows = np.unique(np.asarray(grad.indices))
        dense = np.asarray(grad.todense(), np.float64)
        weight[rows], history[rows] = reference.mxnet2_step(
            weight[rows], dense[rows], history[rows], lr=lr, wd=wd
        )
    return weight, history


def test_lazy_weight_decay_decays_touched_rows_only():
    grads = sparse_grads(seed=5, steps=10)
    got, state = train(mx_adagrad.adagrad(0.1, wd=0.2), table(), grads)
    want, want_history = lazy_reference(table(), grads, lr=0.1, wd=0.2)
    assert reference.relative_error(got, want) <= 1e-5
    assert reference.relative_error(state[3].history, want_history) <= 1e-5


def test_sparse_wd_error_reproduces_mxnet_refusal():
    grad = {"emb": sparse_grads(seed=6, steps=1)[0], "w": jnp.ones(2)}
    params = {"emb": table(), "w": jnp.ones(2)}
    tx = mx_adagrad.adagrad(0.1, wd=0.1, sparse_wd="error")
    with pytest.raises(ValueError, match=r"wd \* wd_mult for the sparse gradient 'emb' must be 0"):
        tx.update(grad, tx.init(params), params)
    # No decay on the table: allowed, and the dense leaf still decays.
    tx = mx_adagrad.adagrad(0.1, wd=0.1, wd_mult={"emb": 0.0}, sparse_wd="error")
    tx.update(grad, tx.init(params), params)
    with pytest.raises(ValueError, match="sparse_wd must be one of 'lazy', 'error', got 'eager'"):
        mx_adagrad.adagrad(sparse_wd="eager")


def test_multi_precision_with_a_bfloat16_table():
    grads = sparse_grads(seed=7, steps=8)
    params = table().astype(jnp.bfloat16)
    start = np.asarray(params.astype(jnp.float32), np.float64)
    got, state = train(mx_adagrad.adagrad(0.1, multi_precision=True), params, grads)
    np.testing.assert_array_equal(got, state.master.astype(jnp.bfloat16))
    dense_bf16 = [np.asarray(g.todense().astype(jnp.bfloat16), np.float64) for g in grads]
    want, _ = reference.mxnet2_run(start, dense_bf16, lr=0.1)
    # The RowSparse values are summed in bfloat16 before the float32 cast, the reference sums the
    # bfloat16-rounded dense gradient: one bfloat16 rounding (2**-8) of difference on duplicates.
    assert reference.relative_error(state.master, want[-1]) <= 1e-2


def test_same_inputs_give_bitwise_same_outputs():
    grads = sparse_grads(seed=8, steps=6, n=64)
    tx = mx_adagrad.adagrad(0.1, wd=0.01)
    first = train(tx, table(), grads)
    second = train(tx, table(), grads)
    chex.assert_trees_all_equal(first, second)


def test_coalesce_sums_duplicates_and_pads():
    grad = mx_adagrad.RowSparse(np.int32([5, 2, 5, 5]), np.float32([[1], [2], [3], [4]]), (8, 1))
    summed = mx_adagrad.sparse.coalesce(grad)
    np.testing.assert_array_equal(summed.indices, [2, 5, 8, 8])
    np.testing.assert_array_equal(summed.values[:, 0], [2, 8, 0, 0])
    assert summed.unique


def test_bad_rowsparse_input_fails_with_clear_errors():
    with pytest.raises(ValueError, match=r"indices must be row ids in \[0, 4\), got id 4"):
        mx_adagrad.RowSparse(np.int32([0, 4]), np.zeros((2, 2)), (4, 2))
    with pytest.raises(ValueError, match=r"indices must be row ids in \[0, 4\), got id -1"):
        mx_adagrad.RowSparse(np.int32([-1]), np.zeros((1, 2)), (4, 2))
    with pytest.raises(ValueError, match=r"values must be of shape \(2, 2\), got shape \(2, 3\)"):
        mx_adagrad.RowSparse(np.int32([0, 1]), np.zeros((2, 3)), (4, 2))
    with pytest.raises(ValueError, match="indices must be a 1-D integer array, got float32"):
        mx_adagrad.RowSparse(np.float32([0, 1]), np.zeros((2, 2)), (4, 2))
    params = {"emb": jnp.zeros((5, 2))}
    tx = mx_adagrad.adagrad()
    grad = {"emb": mx_adagrad.RowSparse(np.int32([0]), np.zeros((1, 2)), (4, 2))}
    with pytest.raises(ValueError, match=r"updates\['emb'\] must be of shape \(5, 2\)"):
        tx.update(grad, tx.init(params), params)


def test_out_of_range_ids_under_jit_update_nothing_and_checked_mode_reports_them():
    tx = mx_adagrad.adagrad(0.1)
    params = table()

    @jax.jit
    @functools.partial(checkify.checkify, errors=checkify.user_checks)
    def checked_step(params, state, ids, values):
        grad = mx_adagrad.RowSparse(ids, values, (ROWS, DIM))
        mx_adagrad.check_indices(grad)
        updates, state = tx.update(grad, state, params)
        return mx_adagrad.apply_updates(params, updates)

    values = jnp.ones((3, DIM))
    error, _ = checked_step(params, tx.init(params), jnp.int32([1, 2, 3]), values)
    error.throw()  # all in range: no error
    error, out = checked_step(params, tx.init(params), jnp.int32([1, ROWS + 7, 3]), values)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"grads\[''\].*got id {ROWS + 7}"):
        error.throw()
    # Unchecked, the bad id updated nothing: rows 1 and 3 moved, every other row is unchanged.
    moved = np.flatnonzero(np.any(np.asarray(out) != np.asarray(params), axis=1))
    np.testing.assert_array_equal(moved, [1, 3])


def test_value_and_row_grad_equals_dense_gradient():
    rng = np.random.default_rng(9)
    params = {"emb": table(), "proj": jnp.asarray(rng.normal(size=(DIM,)), jnp.float32)}
    ids = jnp.asarray(zipf_ids(rng, (4, 5)).astype(np.int32))

    def dense_loss(params, ids):
        return jnp.sum(jnp.tanh(params["emb"][ids] @ params["proj"]) ** 2)

    def row_loss(params, rows, ids):
        del ids
        return jnp.sum(jnp.tanh(rows["emb"] @ params["proj"]) ** 2)

    loss, grads = jax.jit(mx_adagrad.value_and_row_grad(row_loss, ["emb"]))(
        params, {"emb": ids}, ids
    )
    want_loss, want = jax.value_and_grad(dense_loss)(params, ids)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert isinstance(grads["emb"], mx_adagrad.RowSparse)
    np.testing.assert_allclose(grads["emb"].todense(), want["emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["proj"], want["proj"], rtol=1e-5)


def test_sparse_step_has_no_table_sized_temporaries():
    rows = 1 << 16
    params = {"emb": jnp.zeros((rows, 8))}
    tx = mx_adagrad.adagrad(0.1, wd=0.01)
    grad = {"emb": mx_adagrad.RowSparse(jnp.zeros(256, jnp.int32), jnp.ones((256, 8)), (rows, 8))}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grad).compile()
    table_bytes = rows * 8 * 4
    # Temporaries follow the 256 gradient rows, not the 65536-row table (scatters are in place).
    assert compiled.memory_analysis().temp_size_in_bytes < table_bytes // 16


BIG_ROWS = 10_000_000


def embedding_train_step(tx):
    """A jitted, donated train step: look rows up, differentiate a nonlinear loss, update."""

    def loss_fn(params, rows, labels):
        del params
        return jnp.mean(jnp.logaddexp(0.0, jnp.sum(rows["table"], axis=-1)) * labels)

    grad_fn = mx_adagrad.value_and_row_grad(loss_fn, tables=["table"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, ids, labels):
        loss, grads = grad_fn(params, {"table": ids}, labels)
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state, loss

    return step


@pytest.mark.parametrize("optimizer", [mx_adagrad.adagrad, mx_adagrad.rowwise_adagrad])
def test_ten_million_row_table_step_needs_no_table_sized_temporary(optimizer):
    tx, dim, lookups = optimizer(0.1, wd=1e-4), 64, 8192
    params = {"table": jax.ShapeDtypeStruct((BIG_ROWS, dim), jnp.float32)}
    state = jax.eval_shape(tx.init, params)
    ids, labels = (
        jax.ShapeDtypeStruct((lookups,), jnp.int32),
        jax.ShapeDtypeStruct((lookups,), jnp.float32),
    )
    memory = embedding_train_step(tx).lower(params, state, ids, labels).compile().memory_analysis()
    table = BIG_ROWS * dim * 4
    history = table if optimizer is mx_adagrad.adagrad else BIG_ROWS * 4  # one float per row
    batch = lookups * 4 * 2 + 4  # ids, labels, step count
    assert memory.argument_size_in_bytes == table + history + batch
    assert memory.alias_size_in_bytes >= table + history  # both updated in place
    # Scratch follows the lookups (8,192 rows of 64 floats, a few copies), not the table.
    assert memory.temp_size_in_bytes < 16 * lookups * dim * 4  # 33.5 MB, against 2.56 GB


def test_ten_million_row_table_trains_its_touched_rows_only():
    tx = mx_adagrad.rowwise_adagrad(0.5)
    rng = np.random.default_rng(11)
    ids = np.concatenate([[0, BIG_ROWS - 1], rng.integers(0, BIG_ROWS, 30)]).astype(np.int32)
    labels = rng.random(ids.size).astype(np.float32)
    params = {"table": jnp.full((BIG_ROWS, 2), 0.25, jnp.float32)}
    state = tx.init(params)
    assert state[3].history["table"].shape == (BIG_ROWS,)
    step = embedding_train_step(tx)
    params, state, _ = step(params, state, jnp.asarray(ids), jnp.asarray(labels))
    table = np.asarray(params["table"])
    # The float64 step of the touched rows: each lookup's gradient is sigmoid(0.25 + 0.25) *
    # label / n in both columns, summed over the lookups of a row.
    d_lookup = labels.astype(np.float64) / (1.0 + np.exp(-0.5)) / ids.size
    rows = np.unique(ids)
    summed = np.zeros((rows.size, 2))
    np.add.at(summed, np.searchsorted(rows, ids), d_lookup[:, None])
    want, _ = reference.rowwise_step(
        np.full((rows.size, 2), 0.25), summed, np.zeros(rows.size), lr=0.5
    )
    # float32 forward and backward of a few operations, then one step.
    np.testing.assert_allclose(table[rows], want, rtol=1e-6)
    untouched = np.ones(BIG_ROWS, bool)
    untouched[rows] = False
    assert np.all(table[untouched] == 0.25)
    assert np.all(np.asarray(state[3].history["table"])[untouched] == 0.0)


def test_huge_pages_changes_no_value_and_keeps_the_step_in_place():
    tx = mx_adagrad.adagrad(0.1)
    table = jnp.asarray(np.random.default_rng(12).normal(size=(1 << 16, 32)), jnp.float32)
    state = tx.init(table)
    before = np.asarray(table).copy()
    moved = mx_adagrad.sparse.huge_pages(table, state[3].history, jnp.ones(3))
    # Whole 2 MB pages inside the two 8 MB buffers, or 0 where Linux cannot (older kernel).
    assert moved % (1 << 21) == 0 and moved <= 2 * table.nbytes
    np.testing.assert_array_equal(np.asarray(table), before)
    address = table.unsafe_buffer_pointer()
    step = make_step(tx)  # donated
    grad = mx_adagrad.RowSparse(jnp.array([1, 5, 1]), jnp.ones((3, 32)), table.shape)
    table, state = step(table, state, grad)
    assert table.unsafe_buffer_pointer() == address  # the advised buffer is the one updated
    assert mx_adagrad.sparse.huge_pages(jnp.ones(3)) == 0  # no whole 2 MB page inside
