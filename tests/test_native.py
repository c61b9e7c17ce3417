"""The native CPU kernel (mx_adagrad/_native): bitwise equal to the XLA path, in place, built once.

The reference is ``mx_adagrad.adagrad`` + ``apply_updates`` compiled by XLA CPU. The kernel repeats
its operations and roundings, including the multiply-adds XLA contracts into FMAs, so every
comparison here is bit for bit (NaN payloads and signed zeros included). Speed is never asserted.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mx_adagrad
from mx_adagrad import _native, flat

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
        assert_bitwise(fused(params, grads, state), expected)
        params, state = expected


def native_calls(compiled) -> list[str]:
    return re.findall(r'custom_call_target="(mx_adagrad_step_\w+)"', compiled.as_text())


def test_large_trees_are_split_into_calls_of_64_leaves():
    rng = np.random.default_rng(1)
    shapes = [(3, i + 1) for i in range(150)]
    opt = flat.fused_adagrad(0.1, wd=0.01)
    params, grads = random_tree(rng, jnp.float32, shapes), random_tree(rng, jnp.float32, shapes)
    state = opt.init(params)
    assert_bitwise(
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
