"""mx_adagrad.flat: the fused step and flat parameters, checked bit for bit against the reference
path (``mx_adagrad.adagrad`` + ``apply_updates``), and the fused step on params sharded over 8 CPU
devices (in a child process, see ``tests/eight_devices.py``): no collective, every sharding kept,
the native kernel still called, bitwise the one-device step. Speed is never asserted. Where the
native kernel is compared with XLA, ``assert_xla_bits`` asks for the same bits on the jaxlib it was
matched on (``tests/xla_bits.py``) and for 1 ulp on another."""

from __future__ import annotations

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad import _native, flat, lr_scheduler
from tests import eight_devices
from tests.xla_bits import assert_xla_bits

EIGHT_DEVICES = eight_devices.Checks("tests.test_flat")


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bitwise(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


def model(dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "kernel": jnp.asarray(rng.normal(size=(30, 20)), dtype),
            "bias": jnp.asarray(rng.normal(size=(20,)), dtype),
        },
        "head": jnp.asarray(rng.normal(size=(20, 3)), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=()), dtype),
    }


def grads_like(params, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def reference_step(tx):
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    return jax.jit(step)


CONFIGS = {
    "defaults": dict(),
    "all_options": dict(rescale_grad=0.8, clip_gradient=0.5, wd=0.1, epsilon=1e-3),
    "rescale_no_clip": dict(rescale_grad=0.25, wd=0.01),
    "multipliers": dict(wd=0.1, lr_mult={"encoder/bias": 2.0}, wd_mult={"head": 0.0}),
    "callable_multiplier": dict(wd=0.1, wd_mult=lambda p: jax.tree.map(lambda x: x.ndim / 2, p)),
    "optax_schedule": dict(learning_rate=optax.cosine_decay_schedule(0.1, 10), wd=0.01),
    "mxnet_scheduler": dict(
        learning_rate=None,
        lr_scheduler=lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.1),
        begin_num_update=3,
        wd=0.01,
    ),
    "initial_accumulator": dict(initial_accumulator_value=0.1, wd=0.01),
}


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
@pytest.mark.parametrize("multi_precision", [False, True], ids=["float32", "bf16_multi_precision"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("form", ["element-wise", "mxnet1"])
def test_fused_step_is_bitwise_the_reference(form, config, multi_precision, native):
    dtype = jnp.bfloat16 if multi_precision else jnp.float32
    config = {"learning_rate": 0.01, **config}
    opt = DENSE_FORMS[form](**config, multi_precision=multi_precision, native=native)
    params = model(dtype)
    state = opt.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(opt.tx.init(params))
    fused, reference = jax.jit(opt.step), reference_step(opt.tx)
    for seed in range(4):
        grads = grads_like(params, seed)
        expected = reference(params, grads, state)
        assert_xla_bits(fused(params, grads, state), expected)
        params, state = expected


def test_leaves_the_kernel_does_not_take_use_the_xla_path():
    """float16 without multi_precision, and a RowSparse gradient of a bfloat16 table (multi-
    precision tables have no sparse kernel), next to kernel leaves."""
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.normal(size=(50, 4)), jnp.bfloat16),
        "half": jnp.asarray(rng.normal(size=(6,)), jnp.float16),
        "dense": jnp.asarray(rng.normal(size=(9,)), jnp.float32),
    }
    opt = flat.fused_adagrad(0.1, wd=0.01)
    state = opt.init(params)
    for seed in range(3):
        grads = grads_like(params, seed)
        grads["embed"] = mx_adagrad.RowSparse(
            jnp.array([3, 7, 3]), jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16), (50, 4)
        )
        expected = reference_step(opt.tx)(params, grads, state)
        assert_xla_bits(jax.jit(opt.step)(params, grads, state), expected)
        params, state = expected


SPARSE_CONFIGS = {
    "defaults": dict(),
    "lazy wd": dict(wd=0.05),
    "rescale": dict(rescale_grad=0.5, wd=0.01),  # the rescale's multiply contracted (f32)
    "clip, lr_mult": dict(clip_gradient=0.3, lr_mult=0.5),
    "rescale alone": dict(rescale_grad=0.3),  # no decay, no clip: XLA folds the rescale
    "initial history": dict(initial_accumulator_value=0.1, wd=0.01),
}


def legacy_form(learning_rate, epsilon=1e-7, native=True, **config):
    """MXNet 1.x's AdaGrad in its one-pass form (``sparse_wd="lazy"``: sparse rows decay too)."""
    transformation = mx_adagrad.legacy.adagrad(learning_rate, epsilon, sparse_wd="lazy", **config)
    return flat.one_pass(transformation, native=native)


def group_form(
    learning_rate,
    epsilon=1e-5,
    *,
    wd=0.0,
    wd_mult=None,
    initial_accumulator_value=0.0,
    native=True,
    **config,
):
    """GroupAdaGrad's one-pass form. It has no weight decay and its history starts at 0: those
    arguments of the shared configurations are dropped (its refusal of them is tested in
    tests/test_group_adagrad.py)."""
    transformation = mx_adagrad.contrib.group_adagrad(learning_rate, epsilon, **config)
    return flat.one_pass(transformation, native=native)


ONE_PASS_FORMS = {
    "element-wise": flat.fused_adagrad,
    "row-wise": flat.fused_rowwise_adagrad,
    "mxnet1": legacy_form,
    "group": group_form,
}
DENSE_FORMS = {"element-wise": flat.fused_adagrad, "mxnet1": legacy_form}


def sparse_gradient(rng, kind, rows, dim, n):
    """A RowSparse or BagGrad gradient with duplicates, padding ids and NaN, infinities, zeros
    of both signs and huge values in its first column."""
    ids = ((rng.zipf(1.3, n) - 1) % (rows + 3) - 1).astype(np.int32)  # -1 and >= rows: padding
    values = rng.normal(size=(n, dim)).astype(np.float32)
    values[:9, 0] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 3.0, -2.0]
    if kind == "RowSparse":
        return mx_adagrad.RowSparse.tree_unflatten(((rows, dim), False), (ids, values))
    bag = rng.integers(0, n // 3, n).astype(np.int32)
    scale = rng.uniform(0.1, 2.0, n).astype(np.float32)
    return mx_adagrad.BagGrad(ids, bag, scale, values[: n // 3], (rows, dim))


@pytest.mark.parametrize("kind", ["RowSparse", "BagGrad"])
@pytest.mark.parametrize("form", ONE_PASS_FORMS.values(), ids=ONE_PASS_FORMS)
@pytest.mark.parametrize("config", SPARSE_CONFIGS.values(), ids=SPARSE_CONFIGS)
def test_sparse_one_pass_step_is_its_optax_form_on_the_same_leaf(config, form, kind):
    """The native sparse step equals tx.update + apply_updates (the XLA program on the coalesced
    rows, then the scatter-add) bit for bit, step after step, NaN and infinities included."""
    rng = np.random.default_rng(2)
    opt = form(0.1, **config)
    table = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
    state = opt.init(table)
    expected = (table, state)
    for _ in range(4):
        grad = sparse_gradient(rng, kind, 40, 5, 30)
        expected = reference_step(opt.tx)(*expected[:1], grad, expected[1])
        table, state = jax.jit(opt.step)(table, grad, state)
        assert_xla_bits((table, state), expected)
    if _native.load():
        compiled = jax.jit(opt.step, donate_argnums=(0, 2)).lower(table, grad, state).compile()
        text = compiled.as_text()
        assert re.findall(r'custom_call_target="(\w+)"', text) == ["mx_adagrad_sparse_step_f32"]
        assert compiled.memory_analysis().temp_size_in_bytes <= 256  # in place, no row buffers


@pytest.mark.parametrize("kind", ["RowSparse", "BagGrad"])
@pytest.mark.parametrize("form", ONE_PASS_FORMS.values(), ids=ONE_PASS_FORMS)
@pytest.mark.parametrize("n", [9, 12, 64])
def test_sparse_one_pass_step_of_a_one_column_table_is_its_optax_form(n, form, kind):
    """One column: the row-wise history is the element-wise one, and the kernels step it so;
    the optax form must keep XLA's contraction of ``h + g * g`` there too (it once reshaped the
    gradient first, which XLA then did not contract)."""
    rng = np.random.default_rng(n)
    opt = form(0.1, epsilon=1e-3, initial_accumulator_value=0.1)
    table = jnp.asarray(rng.normal(size=(40, 1)), jnp.float32)
    state = opt.init(table)
    grad = sparse_gradient(rng, kind, 40, 1, n)
    assert_xla_bits(
        jax.jit(opt.step)(table, grad, state), reference_step(opt.tx)(table, grad, state)
    )


def test_a_row_sparse_gradient_does_not_shift_the_leaves_after_it():
    """A RowSparse gradient is one leaf of the gradient tree, not two (indices, values): the dense
    leaves after it meet their own gradients in the kernel (here "c" would take "b"'s)."""
    rng = np.random.default_rng(1)
    params = {
        name: jnp.asarray(rng.normal(size=s), jnp.float32)
        for name, s in [("a", (10, 3)), ("b", (3,)), ("c", (3,))]
    }
    grads = {
        "a": mx_adagrad.RowSparse(
            jnp.array([1, 4, 1]), jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), (10, 3)
        ),
        "b": jnp.asarray(rng.normal(size=3), jnp.float32),
        "c": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    opt = flat.fused_adagrad(0.1)
    state = opt.init(params)
    step = jax.jit(opt.step)
    new_params, new_state = step(params, grads, state)
    expected_params, expected_state = reference_step(opt.tx)(params, grads, state)
    for name in ("b", "c"):
        assert_xla_bits(new_params[name], expected_params[name])
        assert_xla_bits(new_state[3].history[name], expected_state[3].history[name])
    if _native.load():  # the dense leaves still take the kernel
        compiled = step.lower(params, grads, state).compile()
        assert eight_devices.native_calls(compiled) == ["mx_adagrad_step_f32"]


def test_state_is_interchangeable_with_the_transformation():
    """Steps may alternate between opt.step and opt.tx.update + apply_updates."""
    opt = flat.fused_adagrad(0.1, wd=0.01, multi_precision=True)
    params = model(jnp.bfloat16)
    state = opt.init(params)
    reference_params, reference_state = params, state
    for seed in range(4):
        grads = grads_like(params, seed)
        step = jax.jit(opt.step) if seed % 2 else reference_step(opt.tx)
        params, state = step(params, grads, state)
        reference_params, reference_state = reference_step(opt.tx)(
            reference_params, grads, reference_state
        )
    assert_xla_bits((params, state), (reference_params, reference_state))


def test_fused_adagrad_checks_its_arguments():
    with pytest.raises(ValueError, match="native must be a bool"):
        flat.fused_adagrad(native="yes")
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        flat.fused_adagrad(epsilon=-1.0)


def test_ravel_round_trip_and_groups():
    params = model(jnp.bfloat16)
    fp = flat.ravel(params, lr_mult={"encoder/bias": 2.0}, wd_mult={"head": 0.0})
    assert_bitwise(fp.unravel(), params)
    assert fp.layout.groups == (
        ("bfloat16", 2.0, 1.0),
        ("bfloat16", 1.0, 1.0),
        ("float32", 1.0, 0.0),
    )
    assert [b.shape for b in fp.buffers] == [(20,), (601,), (60,)]
    assert mx_adagrad._checks.leaf_paths(fp) == [
        "bfloat16/lr_mult=2",
        "bfloat16",
        "float32/wd_mult=0",
    ]
    assert_bitwise(fp.ravel_like(params), fp)
    assert_bitwise(jax.jit(lambda fp: fp.unravel())(fp), params)


def test_ravel_checks_its_arguments():
    with pytest.raises(ValueError, match="concrete numbers"):
        jax.jit(lambda p: flat.ravel(p, lr_mult=jax.tree.map(jnp.sum, p)).buffers)(model())
    with pytest.raises(ValueError, match="must be a floating-point array"):
        flat.ravel({"i": jnp.arange(3)})
    with pytest.raises(ValueError, match="a pytree with the structure"):
        flat.ravel(model()).ravel_like({"head": jnp.zeros((20, 3))})


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_flat_step_is_bitwise_the_per_leaf_step(native):
    """The flat buffers step exactly as the leaves would, multipliers included."""
    params = model()
    specs = dict(lr_mult={"encoder/bias": 2.0}, wd_mult={"head": 0.0})
    fp = flat.ravel(params, **specs)
    per_leaf = flat.fused_adagrad(0.1, wd=0.1, clip_gradient=1.0, native=native, **specs)
    flat_opt = flat.fused_adagrad(
        0.1, wd=0.1, clip_gradient=1.0, native=native, lr_mult=fp.lr_mult, wd_mult=fp.wd_mult
    )
    state, flat_state = per_leaf.init(params), flat_opt.init(fp)
    for seed in range(3):
        grads = grads_like(params, seed)
        params, state = jax.jit(per_leaf.step)(params, grads, state)
        fp, flat_state = jax.jit(flat_opt.step)(fp, fp.ravel_like(grads), flat_state)
    assert_bitwise(fp.unravel(), params)
    history = flat_state[3].history
    assert isinstance(history, flat.FlatParams)
    assert_bitwise(history.unravel(), state[3].history)


def test_train_step_on_flat_params():
    """Gradients taken with respect to FlatParams come flat, equal to the raveled tree gradients."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 30)), jnp.float32)

    def loss_fn(params):
        hidden = jnp.tanh(x @ params["encoder"]["kernel"] + params["encoder"]["bias"])
        return jnp.mean((hidden @ params["head"]) ** 2) * params["scale"]

    params = model()
    fp = flat.ravel(params)
    opt = flat.fused_adagrad(0.1, wd=1e-4)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(fp, state):
        loss, grads = jax.value_and_grad(lambda fp: loss_fn(fp.unravel()))(fp)
        fp, state = opt.step(fp, grads, state)
        return fp, state, loss

    flat_grads = jax.grad(lambda fp: loss_fn(fp.unravel()))(fp)
    np.testing.assert_allclose(
        flat_grads.buffers[0], fp.ravel_like(jax.grad(loss_fn)(params)).buffers[0], rtol=1e-6
    )
    state, losses = opt.init(fp), []
    for _ in range(5):
        fp, state, loss = train_step(fp, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_flat_step_has_no_temporaries_and_one_loop_pass():
    """A thousand leaves flattened: two buffers cross the jit boundary, nothing else is made."""
    params = {f"p{i}": jnp.ones((64,)) for i in range(1000)}
    fp = flat.ravel(params)
    opt = flat.fused_adagrad(0.1, wd=0.1)
    compiled = jax.jit(opt.step, donate_argnums=(0, 2)).lower(fp, fp, opt.init(fp)).compile()
    assert re.findall(r'custom_call_target="(mx_adagrad_\w+)"', compiled.as_text()) in (
        ["mx_adagrad_step_f32"],
        [],  # the native kernel is unavailable: the XLA path
    )
    assert compiled.memory_analysis().temp_size_in_bytes <= 256


def test_one_pass_finds_the_fused_step_of_its_transformation():
    opt = flat.fused_adagrad(0.1, wd=0.01, clip_gradient=0.5, multi_precision=True, native=False)
    assert flat.one_pass(opt) is opt
    again = flat.one_pass(opt.tx)  # the transformation alone: fused_adagrad recorded its arguments
    assert isinstance(again, flat.FusedAdaGrad)
    params = model(jnp.bfloat16)
    state = opt.init(params)
    for seed in range(2):
        grads = grads_like(params, seed)
        expected = reference_step(opt.tx)(params, grads, state)
        assert_bitwise(jax.jit(again.step)(params, grads, state), expected)
        params, state = expected
    assert flat.one_pass(optax.adagrad(0.1)) is None
    assert flat.one_pass(object()) is None


RECOGNIZED = {
    "adagrad": (mx_adagrad.adagrad, {"mx_adagrad_step_f32"}),
    "rowwise_adagrad": (
        mx_adagrad.rowwise_adagrad,
        {"mx_adagrad_step_f32", "mx_adagrad_rowwise_step_f32"},
    ),
    "legacy.adagrad": (mx_adagrad.legacy.adagrad, {"mx_adagrad_step_f32"}),
}


@pytest.mark.parametrize("name", RECOGNIZED)
def test_the_family_is_recognized_and_takes_the_one_pass_step(name):
    build, kernels = RECOGNIZED[name]
    tx = build(0.1, wd=0.01, rescale_grad=0.5)
    fused = flat.one_pass(tx)
    assert fused is not None and fused.tx.update is not tx.update
    assert flat.one_pass(optax.adagrad(0.1)) is None
    params = model()
    state = tx.init(params)
    grads = grads_like(params, 0)
    assert_xla_bits(
        jax.jit(fused.step)(params, grads, state), reference_step(tx)(params, grads, state)
    )
    if _native.load():  # every leaf of the model is float32: all of them in native calls
        calls = eight_devices.native_calls(
            jax.jit(fused.step).lower(params, grads, state).compile()
        )
        assert set(calls) == kernels


@pytest.mark.parametrize("form", ONE_PASS_FORMS.values(), ids=ONE_PASS_FORMS)
def test_with_epsilon_zero_both_forms_divide_exactly(form):
    """A concrete epsilon of 0 leaves a bare ``g / sqrt(h)``, which XLA would rewrite into ``g *
    rsqrt(h)``, an approximate reciprocal root (transforms._divide keeps the division); the
    kernels divide too. So the steps are bitwise equal, and correctly rounded divisions."""
    rng = np.random.default_rng(3)
    opt = form(0.1, epsilon=0.0)
    table = jnp.zeros((40, 5), jnp.float32)  # the new weights are the updates, to the last bit
    state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt.init(table))
    values = rng.normal(size=(30, 5)).astype(np.float32)
    grad = mx_adagrad.RowSparse(rng.integers(0, 40, 30).astype(np.int32), values, (40, 5))
    for g in (grad, grad.todense()):
        got = jax.jit(opt.step)(table, g, state)
        assert_xla_bits(got, reference_step(opt.tx)(table, g, state))
        exact = -0.1 * reference_update(g, state)
        np.testing.assert_allclose(got[0], exact, rtol=2.5e-7, atol=0)


def reference_update(grad, state):
    """``g / sqrt(h)`` of the float64 transcription, element-wise or row-wise."""
    dense = grad.todense() if isinstance(grad, mx_adagrad.RowSparse) else grad
    g = np.asarray(dense, np.float64)
    (h,) = np.asarray(optax.tree.get(state, "history"), np.float64)[None]
    if h.shape != g.shape:
        h = h.reshape(-1, 1) + np.mean(g * g, axis=1, keepdims=True)
    else:
        h = h + g * g
    return g / np.sqrt(h)


# Everything below the next test runs in the 8-device child process.


@pytest.fixture(scope="module")
def eight_device_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    return EIGHT_DEVICES.report(tmp_path_factory.mktemp("flat_8_devices"))


SHARDED_CONFIGS = {
    "wd, clip, lr_mult": dict(wd=1e-3, clip_gradient=0.5, lr_mult={"kernel": 0.5, "bias": 2.0}),
    "rescale, schedule": dict(
        rescale_grad=0.25, wd=1e-3, learning_rate=optax.linear_schedule(0.1, 0.01, 3)
    ),
    "multi_precision": dict(wd=1e-3, clip_gradient=0.5, multi_precision=True),
}


def param_mirrors(state) -> list[tuple[str, dict]]:
    """The state's histories and master copies: pytrees shaped like the params."""
    mirrors = [("history", optax.tree_utils.tree_get(state, "history"))]
    if isinstance(state, mx_adagrad.MultiPrecisionState):
        mirrors.append(("master", state.master))
    return mirrors


@EIGHT_DEVICES
def fused_step_keeps_shardings_adds_no_collectives_and_equals_one_device() -> None:
    for mesh in eight_devices.meshes((4, 2), ("data", "model")):
        for name, config in SHARDED_CONFIGS.items():
            opt = flat.fused_adagrad(**{"learning_rate": 0.1, **config})
            params = eight_devices.sharded_params(mesh)
            grads = jax.tree.map(lambda p: (p * 3.0 - 0.5).astype(p.dtype), params)
            local_params, local_grads = jax.tree.map(np.asarray, (params, grads))
            state = opt.init(params)
            step = jax.jit(opt.step, donate_argnums=(0, 2)).lower(params, grads, state).compile()
            where = f"{name} {mesh.axis_types}"
            assert eight_devices.collectives(step) == [], where
            if _native.load():
                assert eight_devices.native_calls(step), f"{where}: the native kernel is not called"
            one_device = jax.jit(opt.step)
            want = (jax.tree.map(jnp.asarray, local_params), opt.init(local_params))
            for _ in range(3):
                params, state = step(params, grads, state)
                want = one_device(*want[:1], local_grads, want[1])
            for key, leaf in params.items():
                assert leaf.sharding.is_equivalent_to(grads[key].sharding, leaf.ndim), (where, key)
            for what, mirror in param_mirrors(state):
                for key, leaf in mirror.items():
                    if leaf is not None:
                        sharding = grads[key].sharding
                        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
                            where,
                            what,
                            key,
                        )
            assert_bitwise(jax.device_get((params, state)), jax.device_get(want))


@pytest.mark.parametrize("name", EIGHT_DEVICES.functions)
def test_on_8_cpu_devices(eight_device_report: dict[str, str | None], name: str) -> None:
    eight_devices.assert_passed(eight_device_report, name)


if __name__ == "__main__":
    EIGHT_DEVICES.main(sys.argv[1])
