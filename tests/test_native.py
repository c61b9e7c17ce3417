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


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_kernel_is_bitwise_equal_to_xla(dtype, config):
    rng = np.random.default_rng(0)
    multi_precision = dtype != jnp.float32
    opt = flat.fused_adagrad(0.1, **config, multi_precision=multi_precision)
    params = random_tree(rng, dtype, edges=True)
    state = opt.init(params)
    fused, reference = jax.jit(opt.step), reference_step(opt.tx)
    for _ in range(3):
        grads = random_tree(rng, dtype, edges=True)
        expected = reference(params, grads, state)
        assert_xla_bits(fused(params, grads, state), expected)
        params, state = expected


def native_calls(compiled) -> list[str]:
    return re.findall(r'custom_call_target="(mx_adagrad_step_\w+)"', compiled.as_text())


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
    compiler = _native._compiler()
    path = _native.library_path(compiler)
    assert path.parent == tmp_path and not path.exists()
    _native.build(compiler, path)
    assert path.exists() and list(tmp_path.iterdir()) == [path]  # no temporary left behind
    assert _native.library_path(compiler) == path  # same key: a later process loads it


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
    monkeypatch.setattr(_native, "_compiler", lambda: None)
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
