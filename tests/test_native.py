"""The native CPU kernels (mx_adagrad/_native): bitwise equal to the XLA path, in place, built once.

The step kernel's reference is ``mx_adagrad.adagrad`` + ``apply_updates`` compiled by XLA CPU. It
repeats their operations and roundings, including the multiply-adds XLA contracts into FMAs, so every
comparison here is bit for bit (NaN payloads and signed zeros included). The coalesce kernel's
references are the XLA program of ``sparse.coalesce`` and a NumPy transcription of its contract.
Speed is never asserted. Comparisons with what XLA computed go through ``assert_xla_bits``: bit for
bit on the jaxlib the kernels were matched on (``tests/xla_bits.py``), within 1 ulp on another.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mx_adagrad
from mx_adagrad import _native, flat, sparse
from mx_adagrad._native import library
from tests.eight_devices import native_calls
from tests.xla_bits import assert_xla_bits

pytestmark = pytest.mark.skipif(
    not _native.load(), reason="the native kernel is unavailable (no C++ compiler?)"
)

# Edge values: NaN, infinities, signed zeros, a float32 subnormal, overflow when squared.
EDGES = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-45, 3.0, -2.0], np.float32)
# One leaf big enough for the multi-threaded path (kMinParallel = 2**17 elements), odd sizes.
SHAPES = [(300_001,), (7, 3), (1,), (64, 65)]
CONFIGS = {
    "defaults": dict(),
    "wd": dict(wd=0.1),
    "rescale_wd": dict(rescale_grad=0.5, wd=0.1),  # rescale contracted into the FMA (f32, f16)
    "rescale_wd_0.7": dict(rescale_grad=0.7, wd=1e-3),
    "clip_rescale_wd": dict(rescale_grad=0.7, clip_gradient=0.3, wd=0.1),
    "mults": dict(wd=0.1, lr_mult={"0": 0.5}, wd_mult={"1": 2.0}),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bits(x: jax.Array) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bitwise(actual, expected) -> None:
    a, e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(a, e):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


def random_tree(rng: np.random.Generator, dtype, shapes=SHAPES, edges: bool = False) -> list:
    leaves = []
    for shape in shapes:
        values = rng.normal(size=shape).astype(np.float32)
        if edges:
            values.reshape(-1)[: EDGES.size] = EDGES[: values.size]
        leaves.append(jnp.asarray(values).astype(dtype))
    return leaves


def reference_step(tx):
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return jax.jit(step)


# The element-wise transformations whose one-pass form the dense kernels take.
ELEMENTWISE = {"mxnet2": mx_adagrad.adagrad, "mxnet1": mx_adagrad.legacy.adagrad}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kind", ELEMENTWISE)
def test_kernel_is_bitwise_equal_to_xla(kind, dtype, config):
    rng = np.random.default_rng(0)
    multi_precision = dtype != jnp.float32
    opt = flat.one_pass(ELEMENTWISE[kind](0.1, **config, multi_precision=multi_precision))
    params = random_tree(rng, dtype, edges=True)
    state = opt.init(params)
    fused, reference = jax.jit(opt.step), reference_step(opt.tx)
    for _ in range(3):
        grads = random_tree(rng, dtype, edges=True)
        expected = reference(params, grads, state)
        assert_xla_bits(fused(params, grads, state), expected)
        params, state = expected


def test_large_trees_are_split_into_calls_of_64_leaves():
    rng = np.random.default_rng(1)
    shapes = [(3, i + 1) for i in range(150)]
    opt = flat.fused_adagrad(0.1, wd=0.01)
    params, grads = random_tree(rng, jnp.float32, shapes), random_tree(rng, jnp.float32, shapes)
    state = opt.init(params)
    assert_xla_bits(
        jax.jit(opt.step)(params, grads, state), reference_step(opt.tx)(params, grads, state)
    )
    compiled = jax.jit(opt.step).lower(params, grads, state).compile()
    assert native_calls(compiled) == ["mx_adagrad_step_f32"] * 3


N = 1 << 16


@pytest.mark.parametrize(
    "dtype, multi_precision, outputs",
    [(jnp.float32, False, 2), (jnp.bfloat16, True, 3)],
    ids=["float32", "bfloat16_multi_precision"],
)
def test_in_place_one_call_no_loops_no_temporaries(dtype, multi_precision, outputs):
    params = {"a": jnp.ones((N,), dtype), "b": jnp.ones((N // 4, 4), dtype)}
    opt = flat.fused_adagrad(0.1, wd=0.1, clip_gradient=1.0, multi_precision=multi_precision)
    compiled = (
        jax.jit(opt.step, donate_argnums=(0, 2))
        .lower(params, jax.tree.map(jnp.ones_like, params), opt.init(params))
        .compile()
    )
    text = compiled.as_text()
    assert len(native_calls(compiled)) == 1
    # No elementwise loop over the parameters is left: XLA dropped the reference's.
    assert not re.search(r"\[" + str(N) + r"\]\{0\} fusion\(", text.split("ENTRY", 1)[1])
    # Weight, [master,] history of both leaves are updated in the donated buffers.
    assert text.split("\n", 1)[0].count("may-alias") >= 2 * outputs
    # Only the output tuples' pointer tables: nothing proportional to N.
    assert compiled.memory_analysis().temp_size_in_bytes <= 256


def test_build_into_a_fresh_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MX_ADAGRAD_CACHE_DIR", str(tmp_path))
    assert library.cache_dir() == tmp_path
    compiler = library._compiler()
    path = tmp_path / library.library_name(compiler)
    library.build(compiler, path)
    digest = library.digest_path(path)
    # The library and its digest, no temporary left behind.
    assert sorted(tmp_path.iterdir()) == [path, digest]
    assert digest.read_text().split()[1:] == [path.name]  # `sha256sum -c` reads it
    assert library.library_name(compiler) == path.name  # same key: a later process loads it


@pytest.fixture
def reload_native():
    """Lets a test call _native.load() afresh, and restores the kernel afterwards (request it
    before monkeypatch, so it runs after monkeypatch has undone its patches)."""
    _native.load.cache_clear()
    yield
    _native.load.cache_clear()
    assert _native.load()


def test_without_a_compiler_warns_and_uses_the_xla_path(reload_native, monkeypatch, tmp_path):
    monkeypatch.setenv("MX_ADAGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(library, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable"):
        assert not _native.load()
    opt = flat.fused_adagrad(0.1, wd=0.1)
    params = {"a": jnp.ones((N,))}
    state = opt.init(params)
    compiled = jax.jit(opt.step).lower(params, params, state).compile()
    assert native_calls(compiled) == []
    grads = {"a": jnp.full((N,), 0.5)}
    assert_bitwise(
        jax.jit(opt.step)(params, grads, state), reference_step(opt.tx)(params, grads, state)
    )


def test_turned_off_by_environment(reload_native, monkeypatch):
    monkeypatch.setenv("MX_ADAGRAD_NATIVE", "0")
    assert not _native.load()


# The duplicate-row sum of RowSparse gradients (coalesce.cc).


def numpy_coalesce(ids: np.ndarray, values: np.ndarray, num_rows: int):
    """The coalesce contract in NumPy: distinct valid ids ascending, then padding; each row the
    float32 sum of its duplicates in order of position, starting from +0.0 (``np.add.at`` adds
    sequentially in index order)."""
    valid = (ids >= 0) & (ids < num_rows)
    unique = np.unique(ids[valid])
    out_ids = np.full(ids.shape, num_rows, ids.dtype)
    out_ids[: unique.size] = unique
    rows = np.zeros(values.shape, np.float32)
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as it should be
        np.add.at(rows, np.searchsorted(unique, ids[valid]), values[valid])
    return out_ids, rows


def coalesce_case(
    rng: np.random.Generator, n: int, row_shape: tuple[int, ...], num_rows: int, edges=EDGES
):
    ids = ((rng.zipf(1.2, n) - 1) % num_rows).astype(np.int32)
    ids[rng.random(n) < 0.1] = -3  # negative: padding
    ids[rng.random(n) < 0.1] = num_rows + 5  # past the table: padding
    values = rng.normal(size=(n, *row_shape)).astype(np.float32)
    flat = values.reshape(n, -1)
    flat[rng.random(n) < 0.2] = -0.0  # rows of -0.0 alone and next to others
    flat[:, 0][: edges.size] = edges[:n]
    return ids, values


# XLA CPU runs with subnormals flushed to zero, the kernel on its threads too; NumPy does not.
NORMAL_EDGES = EDGES[np.isnan(EDGES) | (np.abs(EDGES) >= np.finfo(np.float32).tiny) | (EDGES == 0)]


def coalesce_both_ways(ids, values, num_rows):
    xla = jax.jit(lambda i, v: sparse._coalesce_xla(i, v, num_rows))
    native = jax.jit(lambda i, v: _native.coalesce(i, v, num_rows))
    return xla(ids, values), native(ids, values)


@pytest.mark.parametrize("n", [2, 3, 17, 300, 5000])
@pytest.mark.parametrize("row_shape", [(1,), (8,), (2, 3)], ids=str)
def test_coalesce_kernel_is_bitwise_the_xla_program_and_numpy(n, row_shape):
    rng = np.random.default_rng(n)
    ids, values = coalesce_case(rng, n, row_shape, num_rows=50)
    (xla_ids, xla_rows), (ids_out, rows_out) = coalesce_both_ways(ids, values, 50)
    np.testing.assert_array_equal(ids_out, xla_ids)
    assert_xla_bits(rows_out, xla_rows)
    ids, values = coalesce_case(rng, n, row_shape, num_rows=50, edges=NORMAL_EDGES)
    want_ids, want_rows = numpy_coalesce(ids, values, 50)
    (xla_ids, xla_rows), (ids_out, rows_out) = coalesce_both_ways(ids, values, 50)
    np.testing.assert_array_equal(xla_ids, want_ids)
    assert_xla_bits(xla_rows, want_rows)  # XLA's summation order
    np.testing.assert_array_equal(ids_out, want_ids)
    np.testing.assert_array_equal(bits(rows_out), bits(jnp.asarray(want_rows)))  # the kernel's own


def test_coalesce_kernel_takes_int64_ids():
    rng = np.random.default_rng(9)
    ids, values = coalesce_case(rng, 400, (4,), num_rows=2000, edges=NORMAL_EDGES)
    ids = ids.astype(np.int64) * 1_000_003  # ids past 2**31, and past the table
    with jax.enable_x64(True):
        (xla_ids, xla_rows), (ids_out, rows_out) = coalesce_both_ways(ids, values, 3_000_000_000)
        assert ids_out.dtype == jnp.int64
    want_ids, want_rows = numpy_coalesce(ids, values, 3_000_000_000)
    np.testing.assert_array_equal(ids_out, want_ids)
    np.testing.assert_array_equal(bits(rows_out), bits(jnp.asarray(want_rows)))
    np.testing.assert_array_equal(xla_ids, ids_out)
    assert_xla_bits(rows_out, xla_rows)


def test_sparse_step_on_cpu_calls_the_kernel_and_sorts_nothing():
    tx = mx_adagrad.adagrad(0.1, wd=0.01, clip_gradient=1.0)
    table = jnp.zeros((1000, 8))

    def step(table, state, ids, values):
        updates, state = tx.update(mx_adagrad.RowSparse(ids, values, table.shape), state, table)
        return mx_adagrad.apply_updates(table, updates), state

    ids, values = jnp.zeros(64, jnp.int32), jnp.zeros((64, 8))
    text = jax.jit(step).lower(table, tx.init(table), ids, values).compile().as_text()
    assert text.count('custom_call_target="mx_adagrad_coalesce_f32"') == 1  # once per step
    assert " sort(" not in text


# (optimizer, arguments, dtype, bitwise). The row kernels only copy rows and add two numbers, but
# they change where XLA's fusions begin, and XLA CPU's own choices depend on that: whether the
# decay's multiply-add is contracted into an FMA (the pure-XLA program itself computes the decayed
# gradient with an FMA in one of its fusions and without in the other) and in which order a row
# mean is summed. Where the step has neither (no decay, element-wise history, float32), the bits
# are the XLA program's; elsewhere they differ from it in the last bits (both are roundings of the
# same formula, checked against the float64 reference in test_sparse.py and test_rowwise.py).
SPARSE_CONFIGS = {
    "defaults": (mx_adagrad.adagrad, dict(), jnp.float32, True),
    "rescale, clip": (
        mx_adagrad.adagrad,
        dict(rescale_grad=0.7, clip_gradient=0.3),
        jnp.float32,
        True,
    ),
    "lr_mult, initial history, epsilon 0": (
        mx_adagrad.adagrad,
        dict(lr_mult=0.5, initial_accumulator_value=0.1, epsilon=0.0),
        jnp.float32,
        True,
    ),
    "legacy": (mx_adagrad.legacy.adagrad, dict(clip_gradient=1.0), jnp.float32, True),
    "lazy wd": (mx_adagrad.adagrad, dict(wd=0.1, lr_mult=0.5), jnp.float32, False),
    "rowwise, wd": (
        mx_adagrad.rowwise_adagrad,
        dict(wd=0.05, clip_gradient=1.0),
        jnp.float32,
        False,
    ),
    "multi_precision bfloat16": (
        mx_adagrad.adagrad,
        dict(wd=0.01, multi_precision=True),
        jnp.bfloat16,
        False,
    ),
    "rowwise multi_precision float16": (
        mx_adagrad.rowwise_adagrad,
        dict(multi_precision=True),
        jnp.float16,
        False,
    ),
}


def sparse_run(tx, table, batches):
    @jax.jit
    def step(table, state, ids, values):
        updates, state = tx.update(mx_adagrad.RowSparse(ids, values, table.shape), state, table)
        return mx_adagrad.apply_updates(table, updates), state

    state = tx.init(table)
    for ids, values in batches:
        table, state = step(table, state, ids, values)
    return table, state


@pytest.mark.parametrize(
    ("optimizer", "config", "dtype", "bitwise"), SPARSE_CONFIGS.values(), ids=SPARSE_CONFIGS
)
def test_sparse_step_with_kernels_equals_the_xla_program(
    optimizer, config, dtype, bitwise, reload_native, monkeypatch
):
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(60, 5)), dtype)
    batches = [coalesce_case(rng, 40, (5,), num_rows=60, edges=NORMAL_EDGES) for _ in range(4)]
    batches = [(ids, jnp.asarray(values).astype(dtype)) for ids, values in batches]
    tx = optimizer(0.1, **config)
    with_kernels = sparse_run(tx, table, batches)
    monkeypatch.setenv("MX_ADAGRAD_NATIVE", "0")
    _native.load.cache_clear()
    xla = sparse_run(tx, table, batches)
    if bitwise:
        assert_xla_bits(with_kernels, xla)
        return
    for got, want in zip(jax.tree.leaves(with_kernels), jax.tree.leaves(xla)):
        low = jnp.dtype(got.dtype)
        if not jnp.issubdtype(low, jnp.floating):  # the step count
            np.testing.assert_array_equal(got, want)
            continue
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        finite = np.isfinite(want)
        np.testing.assert_array_equal(
            got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]
        )
        # Last-bit differences: a few roundings in the leaf's dtype per step, 4 steps.
        scale = max(np.max(np.abs(want[finite]), initial=0.0), 1.0)
        error = np.max(np.abs(got[finite] - want[finite]), initial=0.0)
        assert error <= 8 * float(jnp.finfo(low).eps) * scale, (low, error, scale)


def test_row_kernels_write_donated_tables_in_place():
    tx = mx_adagrad.adagrad(0.1, wd=0.01)
    rows, dim, n = 1 << 15, 16, 256
    table = jax.ShapeDtypeStruct((rows, dim), jnp.float32)

    def step(table, state, ids, values):
        updates, state = tx.update(mx_adagrad.RowSparse(ids, values, table.shape), state, table)
        return mx_adagrad.apply_updates(table, updates), state

    args = (table, jax.eval_shape(tx.init, table))
    args += (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n, dim), jnp.float32))
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    text = compiled.as_text()
    for target in ("gather_rows", "scatter_rows", "scatter_add_rows_f32"):
        assert f'custom_call_target="mx_adagrad_{target}"' in text
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= 2 * rows * dim * 4  # table and history, in place
    assert memory.temp_size_in_bytes < 16 * n * dim * 4  # scratch follows the lookups
