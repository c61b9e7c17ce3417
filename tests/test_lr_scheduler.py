"""mx_adagrad.lr_scheduler against a stateful transcription of MXNet's schedulers.

Eager values must equal MXNet's bit for bit (``==``). Traced values are float32 and are compared
with ``rtol=1e-6``: float32 rounds to a relative 2**-24 (about 6e-8) per operation, and each traced
formula takes a handful of operations.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_adagrad import lr_scheduler
from tests import mxnet_lr_reference as mx

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "factor": ("FactorScheduler", {"step": 7, "factor": 0.9}),
    "factor_floor": (
        "FactorScheduler",
        {"step": 3, "factor": 0.5, "stop_factor_lr": 1e-3, "base_lr": 0.1},
    ),
    "factor_floor_linear_warmup": (
        "FactorScheduler",
        {
            "step": 5,
            "factor": 0.7,
            "stop_factor_lr": 1e-4,
            "base_lr": 0.1,
            "warmup_steps": 20,
            "warmup_begin_lr": 0.001,
        },
    ),
    "factor_constant_warmup": (
        "FactorScheduler",
        {
            "step": 10,
            "factor": 0.5,
            "base_lr": 0.05,
            "warmup_steps": 30,
            "warmup_begin_lr": 0.01,
            "warmup_mode": "constant",
        },
    ),
    "factor_base_below_floor": (
        "FactorScheduler",
        {"step": 4, "factor": 1, "stop_factor_lr": 0.02, "base_lr": 0.01},
    ),
    "factor_zero": ("FactorScheduler", {"step": 2, "factor": 0.0, "stop_factor_lr": 1e-3}),
    "multi": ("MultiFactorScheduler", {"step": [10, 25, 60, 150], "factor": 0.3}),
    "multi_linear_warmup": (
        "MultiFactorScheduler",
        {
            "step": [5, 12, 40, 90, 200],
            "factor": 0.5,
            "base_lr": 0.1,
            "warmup_steps": 20,
            "warmup_begin_lr": 0.001,
        },
    ),
    "multi_constant_warmup": (
        "MultiFactorScheduler",
        {
            "step": [50, 51, 52],
            "factor": 0.1,
            "warmup_steps": 10,
            "warmup_begin_lr": 0.005,
            "warmup_mode": "constant",
        },
    ),
    "poly": ("PolyScheduler", {"max_update": 200}),
    "poly_final_linear_warmup": (
        "PolyScheduler",
        {
            "max_update": 220,
            "base_lr": 0.1,
            "pwr": 3,
            "final_lr": 1e-3,
            "warmup_steps": 25,
            "warmup_begin_lr": 0.01,
        },
    ),
    "poly_sqrt_constant_warmup": (
        "PolyScheduler",
        {
            "max_update": 150,
            "base_lr": 0.1,
            "pwr": 0.5,
            "warmup_steps": 12,
            "warmup_begin_lr": 0.002,
            "warmup_mode": "constant",
        },
    ),
    "poly_max_update_before_warmup_end": (
        "PolyScheduler",
        {"max_update": 30, "base_lr": 0.1, "warmup_steps": 60, "warmup_begin_lr": 0.01},
    ),
    "cosine": ("CosineScheduler", {"max_update": 180}),
    "cosine_final_linear_warmup": (
        "CosineScheduler",
        {"max_update": 240, "base_lr": 0.1, "final_lr": 1e-3, "warmup_steps": 30},
    ),
    "cosine_constant_warmup": (
        "CosineScheduler",
        {
            "max_update": 130,
            "base_lr": 0.02,
            "final_lr": 5e-4,
            "warmup_steps": 12,
            "warmup_begin_lr": 0.002,
            "warmup_mode": "constant",
        },
    ),
    "cosine_rising": ("CosineScheduler", {"max_update": 200, "base_lr": 0.001, "final_lr": 0.01}),
}
BEGINS = (0, 7, 100)  # MXNet's begin_num_update: the first call is num_update = begin + 1
LENGTH = 260
OVERRIDES = (None, 0.05, 0.002)


def build(name: str, override: float | None = None) -> tuple[Any, Any]:
    """Returns (ours, MXNet reference) for CONFIGS[name], with MXNet's base_lr assignment."""
    cls, kwargs = CONFIGS[name]
    ours = getattr(lr_scheduler, cls)(**kwargs)
    ref = getattr(mx, cls)(**kwargs)
    if override is not None:
        ours = ours.with_base_lr(override)
        ref.base_lr = override
    return ours, ref


def counts(begin: int) -> list[int]:
    return list(range(begin + 1, begin + 1 + LENGTH))


def reference_values(name: str, override: float | None, begin: int) -> list[float]:
    _, ref = build(name, override)
    return [ref(n) for n in counts(begin)]


@pytest.mark.parametrize("override", OVERRIDES)
@pytest.mark.parametrize("begin", BEGINS)
@pytest.mark.parametrize("name", CONFIGS)
def test_eager_equals_mxnet(name: str, begin: int, override: float | None) -> None:
    ours, _ = build(name, override)
    values = [ours(n) for n in counts(begin)]
    assert all(type(v) is float for v in values)
    assert values == reference_values(name, override, begin)


@pytest.mark.parametrize("override", OVERRIDES[:2])
@pytest.mark.parametrize("name", CONFIGS)
def test_traced_matches_mxnet(name: str, override: float | None) -> None:
    ours, _ = build(name, override)
    ns = [n for begin in BEGINS for n in counts(begin)]
    expected = [v for begin in BEGINS for v in reference_values(name, override, begin)]
    traced = jax.jit(jax.vmap(ours))(jnp.asarray(ns, dtype=jnp.int32))
    assert traced.dtype == jnp.float32
    # float32 rounding of a few operations; see the module docstring.
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name", ["factor_floor_linear_warmup", "multi_linear_warmup", "poly", "cosine"]
)
def test_traced_count_does_not_retrace(name: str) -> None:
    ours, _ = build(name)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def lr_at(num_update: jax.Array) -> jax.Array:
        return ours(num_update)

    for n in range(50):
        lr = lr_at(jnp.int32(n))
        assert lr.shape == () and lr.dtype == jnp.float32
        np.testing.assert_allclose(float(lr), ours(n), rtol=1e-6)


def test_traced_inside_jitted_loop() -> None:
    ours, _ = build("cosine_final_linear_warmup")

    @jax.jit
    def schedule(first: jax.Array) -> jax.Array:
        def body(n: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
            return n + 1, ours(n)

        return jax.lax.scan(body, first, length=LENGTH)[1]

    np.testing.assert_allclose(
        np.asarray(schedule(jnp.int32(1))), [ours(n) for n in counts(0)], rtol=1e-6
    )


MXNET_LOG = Path(__file__).parent / "fixtures" / "mx2_step_schedulers.npz"


def test_equals_learning_rates_logged_by_mxnet() -> None:
    # Learning rates MXNet 2 itself used in an optimizer run with begin_num_update = 3 (one case
    # with two weights, where num_update repeats); made by tests/fixtures/make_mxnet_fixtures.py.
    log = np.load(MXNET_LOG)
    cases = json.loads(str(log["config_json"]))["cases"]
    assert len(cases) == 10
    for case, spec in cases.items():
        ours = getattr(lr_scheduler, spec["scheduler"])(**spec["scheduler_kwargs"])
        if spec.get("optimizer_learning_rate") is not None:
            ours = ours.with_base_lr(spec["optimizer_learning_rate"])
        prefix = f"{case}__log_" if f"{case}__log_lr" in log else f"{case}__"
        ns, logged = log[prefix + "num_update"].tolist(), log[prefix + "lr"].tolist()
        assert [ours(n) for n in ns] == logged, case
        traced = jax.jit(ours)(jnp.asarray(ns, dtype=jnp.int32))
        np.testing.assert_allclose(np.asarray(traced), logged, rtol=1e-6, err_msg=case)


def test_factor_traced_long_slow_decay() -> None:
    # About 1.6e5 decays before the 1e-8 floor: the traced two-level tables span ~400 blocks.
    ours = lr_scheduler.FactorScheduler(step=1, factor=0.9999, base_lr=0.1)
    ns = [1, 2, 3, 1000, 4097, 50_000, 120_000, 160_000, 161_000, 170_000, 2**31 - 1]
    eager = [ours(n) for n in ns]
    assert eager[-1] == 1e-8
    traced = jax.jit(ours)(jnp.asarray(ns, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(traced), eager, rtol=1e-6)


@pytest.mark.parametrize(
    "ours",
    [
        lr_scheduler.FactorScheduler(1, 0.5, 0.0625).with_base_lr(5e-324),  # subnormal base_lr
        lr_scheduler.PolyScheduler(1, base_lr=0.1, pwr=1.4e-45),  # pwr flushed to 0 in float32
        lr_scheduler.PolyScheduler(50, base_lr=0.1, pwr=1e300, final_lr=1e-3),
        lr_scheduler.PolyScheduler(50, base_lr=0.1, pwr=2**40, final_lr=1e-3),
    ],
    ids=repr,
)
def test_traced_extreme_arguments(ours: Any) -> None:
    ns = [0, 1, 2, 3, 49, 50, 51, 1000]
    traced = np.asarray(jax.jit(ours)(jnp.asarray(ns, dtype=jnp.int32)))
    np.testing.assert_allclose(traced, [ours(n) for n in ns], rtol=1e-6, atol=2.0**-126)


def test_factor_first_decay_is_after_step() -> None:
    ours = lr_scheduler.FactorScheduler(step=10, factor=0.5, base_lr=1.0)
    assert (ours(0), ours(10), ours(11), ours(20), ours(21)) == (1.0, 1.0, 0.5, 0.5, 0.25)
    multi = lr_scheduler.MultiFactorScheduler(step=[10, 20], factor=0.5, base_lr=1.0)
    assert (multi(10), multi(11), multi(20), multi(21)) == (1.0, 0.5, 0.5, 0.25)


def test_factor_decays_count_from_zero_not_from_warmup_end() -> None:
    ours = lr_scheduler.FactorScheduler(step=10, factor=0.5, base_lr=1.0, warmup_steps=25)
    assert ours(24) == 24 / 25
    assert ours(25) == 0.25  # already decayed floor((25 - 1) / 10) = 2 times


def test_factor_uses_repeated_multiplication_not_pow() -> None:
    ours = lr_scheduler.FactorScheduler(step=1, factor=0.1, stop_factor_lr=0.0, base_lr=1.0)
    repeated = [1.0]
    for _ in range(40):
        repeated.append(repeated[-1] * 0.1)
    assert [ours(d + 1) for d in range(41)] == repeated
    assert any(0.1**d != lr for d, lr in enumerate(repeated))  # the test can tell them apart


def test_eager_is_pure_where_mxnet_is_stateful() -> None:
    ours, ref = build("factor_floor")
    assert ref(50) == ours(50)
    assert ref(10) == ours(50) != ours(10)  # MXNet keeps decays already applied
    assert ours(10) == build("factor_floor")[1](10)


@pytest.mark.parametrize("cls", ["PolyScheduler", "CosineScheduler"])
def test_past_max_update_holds_the_value_at_max_update(cls: str) -> None:
    kwargs = {"max_update": 100, "base_lr": 0.1, "final_lr": 0.01}
    ours = getattr(lr_scheduler, cls)(**kwargs)
    visited = getattr(mx, cls)(**kwargs)
    visited(100)
    assert ours(150) == visited(150) == 0.01
    # A fresh MXNet object first called past max_update never computed a value: it returns
    # base_lr. That history cannot be expressed as a function of num_update.
    assert getattr(mx, cls)(**kwargs)(150) == 0.1


@pytest.mark.parametrize("name", ["poly_final_linear_warmup", "cosine_final_linear_warmup"])
def test_with_base_lr_does_not_move_poly_or_cosine(name: str) -> None:
    ours, _ = build(name)
    moved = ours.with_base_lr(0.5)
    assert moved.base_lr == 0.5 and moved.base_lr_orig == ours.base_lr_orig == 0.1
    assert [moved(n) for n in range(300)] == [ours(n) for n in range(300)]


def test_with_base_lr_keeps_warmup_target_and_copies() -> None:
    ours, _ = build("factor_floor_linear_warmup")
    ours(100)  # fill the eager cache; the copy must not reuse it
    moved = ours.with_base_lr(0.2)
    assert (ours.base_lr, moved.base_lr, moved.warmup_final_lr) == (0.1, 0.2, 0.1)
    assert moved(19) == ours(19) < 0.1  # the warmup still ramps towards the constructor's base_lr
    assert moved(20) == 0.2 * 0.7 * 0.7 * 0.7  # then decays start from the new base_lr


def test_attributes_are_read_only() -> None:
    ours, _ = build("factor")
    with pytest.raises(AttributeError, match="with_base_lr"):
        ours.base_lr = 0.1
    assert ours.base_lr == 0.01


@pytest.mark.parametrize("name", CONFIGS)
def test_repr_round_trips(name: str) -> None:
    ours, _ = build(name, 0.05)
    again = eval(repr(ours), vars(lr_scheduler))
    assert repr(again) == repr(ours)
    assert [again(n) for n in range(300)] == [ours(n) for n in range(300)]


def test_mxnet_attribute_names() -> None:
    poly = lr_scheduler.PolyScheduler(100, base_lr=0.1, pwr=3, warmup_steps=10)
    assert (poly.power, poly.base_lr_orig, poly.max_update, poly.max_steps) == (3.0, 0.1, 100, 90)
    assert (poly.warmup_steps, poly.warmup_begin_lr, poly.warmup_final_lr) == (10, 0.0, 0.1)
    factor = lr_scheduler.FactorScheduler(5, 0.5, 1e-4)
    assert (factor.step, factor.factor, factor.stop_factor_lr, factor.warmup_mode) == (
        5,
        0.5,
        1e-4,
        "linear",
    )


def test_base_class_raises_like_mxnet() -> None:
    with pytest.raises(NotImplementedError):
        lr_scheduler.LRScheduler()(1)


def message(where: str, name: str, expected: str, value: str) -> str:
    return re.escape(f"mx_adagrad.{where}: {name} must be {expected}, got {value}")


Factor = lr_scheduler.FactorScheduler
Multi = lr_scheduler.MultiFactorScheduler
Poly = lr_scheduler.PolyScheduler
Cosine = lr_scheduler.CosineScheduler
REDUCE = "<= 1 (the schedule only reduces the learning rate)"


@pytest.mark.parametrize(
    ("make", "where", "name", "expected", "value"),
    [
        # MXNet's own rules.
        (lambda: Factor(step=0), "FactorScheduler", "step", "an int >= 1", "0"),
        (lambda: Factor(step=5, factor=1.5), "FactorScheduler", "factor", REDUCE, "1.5"),
        (lambda: Multi(step=[10], factor=2), "MultiFactorScheduler", "factor", REDUCE, "2"),
        (lambda: Multi(step=[]), "MultiFactorScheduler", "step", "a non-empty list of ints", "[]"),
        (lambda: Multi(step=5), "MultiFactorScheduler", "step", "a non-empty list of ints", "5"),
        (lambda: Multi(step=[10, 10]), "MultiFactorScheduler", "step[1]", "> step[0] (10)", "10"),
        (lambda: Multi(step=[10, 4]), "MultiFactorScheduler", "step[1]", "> step[0] (10)", "4"),
        (lambda: Multi(step=[0, 4]), "MultiFactorScheduler", "step[0]", ">= 1", "0"),
        (lambda: Poly(max_update=0), "PolyScheduler", "max_update", "an int >= 1", "0"),
        (lambda: Poly(max_update=10.0), "PolyScheduler", "max_update", "an int", "10.0"),
        (lambda: Cosine(max_update=-3), "CosineScheduler", "max_update", "an int >= 1", "-3"),
        (lambda: Cosine(max_update=9.5), "CosineScheduler", "max_update", "an int", "9.5"),
        (
            lambda: Factor(step=5, warmup_begin_lr=0.1),
            "FactorScheduler",
            "warmup_begin_lr",
            "<= base_lr (0.01)",
            "0.1",
        ),
        (
            lambda: Cosine(10, base_lr=0.1, warmup_begin_lr=0.2, warmup_steps=0),
            "CosineScheduler",
            "warmup_begin_lr",
            "<= base_lr (0.1)",
            "0.2",
        ),
        (lambda: Poly(10, warmup_steps=-1), "PolyScheduler", "warmup_steps", "an int >= 0", "-1"),
        (
            lambda: Multi([5], warmup_steps=2.0),
            "MultiFactorScheduler",
            "warmup_steps",
            "an int",
            "2.0",
        ),
        (
            lambda: Factor(5, warmup_mode="cosine"),
            "FactorScheduler",
            "warmup_mode",
            "one of 'linear', 'constant'",
            "'cosine'",
        ),
        # Rules added here (MXNet accepts these and misbehaves or divides by zero later).
        (lambda: Factor(step=2.5), "FactorScheduler", "step", "an int", "2.5"),
        (lambda: Multi(step=[1, 2.5]), "MultiFactorScheduler", "step[1]", "an int", "2.5"),
        (lambda: Factor(5, factor=-0.5), "FactorScheduler", "factor", ">= 0", "-0.5"),
        (lambda: Factor(5, factor=math.nan), "FactorScheduler", "factor", "finite", "nan"),
        (
            lambda: Factor(5, stop_factor_lr=-1.0),
            "FactorScheduler",
            "stop_factor_lr",
            ">= 0",
            "-1.0",
        ),
        (lambda: Poly(10, base_lr=-0.1), "PolyScheduler", "base_lr", ">= 0", "-0.1"),
        (lambda: Poly(10, base_lr=math.inf), "PolyScheduler", "base_lr", "finite", "inf"),
        (lambda: Poly(10, base_lr="0.1"), "PolyScheduler", "base_lr", "a real scalar", "'0.1'"),
        (lambda: Poly(10, base_lr=None), "PolyScheduler", "base_lr", "a real scalar", "None"),
        (lambda: Poly(10, pwr=-1), "PolyScheduler", "pwr", ">= 0", "-1.0"),
        (lambda: Cosine(10, final_lr=-1e-3), "CosineScheduler", "final_lr", ">= 0", "-0.001"),
        (
            lambda: Cosine(10, warmup_steps=10),
            "CosineScheduler",
            "max_update",
            "!= warmup_steps (10; MXNet divides by zero there)",
            "10",
        ),
        (lambda: Factor(5).with_base_lr(-1.0), "FactorScheduler", "base_lr", ">= 0", "-1.0"),
        (lambda: Factor(5)(1.5), "FactorScheduler", "num_update", "an int", "1.5"),
        (lambda: Factor(5)(True), "FactorScheduler", "num_update", "an int", "True"),
        (lambda: Poly(5)(-1), "PolyScheduler", "num_update", "an int >= 0", "-1"),
        (
            lambda: Cosine(5)(jnp.float32(2.0)),
            "CosineScheduler",
            "num_update",
            "an integer array",
            "Array(2., dtype=float32)",
        ),
    ],
)
def test_invalid_arguments(make: Any, where: str, name: str, expected: str, value: str) -> None:
    with pytest.raises(ValueError, match=message(where, name, expected, value)):
        make()


# Hypothesis: random valid schedulers, random non-decreasing update counts.

learning_rates = st.floats(0.0, 1.0)


@st.composite
def schedulers(draw: st.DrawFn) -> tuple[str, dict[str, Any], float | None]:
    cls = draw(
        st.sampled_from(
            ["FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler"]
        )
    )
    base_lr = draw(learning_rates)
    kwargs: dict[str, Any] = {
        "base_lr": base_lr,
        "warmup_steps": draw(st.integers(0, 40)),
        "warmup_begin_lr": draw(st.floats(0.0, base_lr)),
        "warmup_mode": draw(st.sampled_from(["linear", "constant"])),
    }
    if cls == "FactorScheduler":
        kwargs["step"] = draw(st.integers(1, 30))
        kwargs["factor"] = draw(st.floats(0.0, 1.0))
        kwargs["stop_factor_lr"] = draw(st.floats(0.0, 0.1))
    elif cls == "MultiFactorScheduler":
        kwargs["step"] = sorted(
            draw(st.lists(st.integers(1, 300), min_size=1, max_size=6, unique=True))
        )
        kwargs["factor"] = draw(st.floats(0.0, 1.0))
    else:
        kwargs["max_update"] = draw(
            st.integers(1, 300).filter(lambda m: m != kwargs["warmup_steps"])
        )
        kwargs["final_lr"] = draw(learning_rates)
        if cls == "PolyScheduler":
            kwargs["pwr"] = draw(st.one_of(st.integers(0, 5), st.floats(0.0, 5.0)))
    override = draw(st.one_of(st.none(), learning_rates))
    return cls, kwargs, override


@st.composite
def update_counts(draw: st.DrawFn) -> list[int]:
    first = draw(st.integers(0, 350))
    steps = draw(st.lists(st.integers(0, 25), min_size=1, max_size=60))
    return [first + sum(steps[:i]) for i in range(len(steps))]


def pair(cls: str, kwargs: dict[str, Any], override: float | None) -> tuple[Any, Any]:
    ours = getattr(lr_scheduler, cls)(**kwargs)
    ref = getattr(mx, cls)(**kwargs)
    if override is not None:
        ours = ours.with_base_lr(override)
        ref.base_lr = override
    return ours, ref


def visit_max_update(kwargs: dict[str, Any], ns: list[int]) -> list[int]:
    """Poly/Cosine hold their last value: our value past max_update is the one at max_update."""
    max_update = kwargs.get("max_update")
    if max_update is not None and ns[-1] > max_update:
        return sorted([*ns, max_update])
    return ns


@settings(max_examples=300, deadline=None)
@given(schedulers(), update_counts())
def test_property_eager_equals_mxnet(scheduler: tuple, ns: list[int]) -> None:
    cls, kwargs, override = scheduler
    ours, ref = pair(cls, kwargs, override)
    ns = visit_max_update(kwargs, ns)
    assert [ours(n) for n in ns] == [ref(n) for n in ns]


@settings(max_examples=25, deadline=None)
@given(schedulers(), update_counts())
def test_property_traced_close_to_eager(scheduler: tuple, ns: list[int]) -> None:
    cls, kwargs, override = scheduler
    ours, _ = pair(cls, kwargs, override)
    eager = np.array([ours(n) for n in ns])
    traced = np.asarray(jax.jit(ours)(jnp.asarray(ns, dtype=jnp.int32)))
    # rtol: float32 rounding. atol: float32's smallest normal number (tiny results lose relative
    # precision), and MXNet's float64 cancellation in Cosine's 1 + cos near max_update.
    largest = max(kwargs["base_lr"], kwargs.get("final_lr", 0.0), override or 0.0)
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=2.0**-126 + 4 * 2.0**-53 * largest)
