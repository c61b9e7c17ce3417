"""MXNet 1.x's GroupAdaGrad (``mx_adagrad.contrib``) against real MXNet 1.9.1 and float64.

The fixtures were made by ``tests/fixtures/make_group_adagrad_fixtures.py`` with mxnet 1.9.1
(``tests/fixtures/README.md``): ``mx.optimizer.contrib.GroupAdaGrad`` run through
``opt.update`` (dense and row_sparse gradients, schedulers, multipliers, multi_precision) and a
Gluon ``Trainer(..., 'groupadagrad')`` checkpoint with its continuation. MXNet computes
``lr * g / sqrt(h + eps)`` and mx_adagrad ``g / sqrt(h + eps) * -lr``: both float32, rounded in
another order, so trajectories agree within a few float32 ulps of the array's scale, not bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mx_adagrad
from mx_adagrad import contrib, flat, lr_scheduler, mxnet_io
from tests import reference
from tests.xla_bits import assert_xla_bits

FIXTURES = Path(__file__).parent / "fixtures"
DENSE = np.load(FIXTURES / "mx1_group_adagrad_dense.npz")
ROW_SPARSE = np.load(FIXTURES / "mx1_group_adagrad_row_sparse.npz")
GLUON = FIXTURES / "gluon_group_adagrad"


def configs(data) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(str(data["configs_json"]))}


DENSE_CONFIGS = configs(DENSE)
SPARSE_CONFIGS = configs(ROW_SPARSE)
# MXNet runs a clip_gradient of 0 or below (mx_adagrad refuses it: tested below).
REPLAYED = [
    name
    for name, c in DENSE_CONFIGS.items()
    if c["hyperparameters"]["clip_gradient"] is None or c["hyperparameters"]["clip_gradient"] > 0
]
# Float32 in another order, 5 steps: the weights within 4e-7 and the histories within 4e-7 of
# the array's scale (a few ulps).
WITHIN = 4e-7


def mxnet_keys(table: dict | None) -> dict:
    """A JSON dict of MXNet index (int) or name (str) keys back to MXNet's keys."""
    return {int(k) if k.isdigit() else k: v for k, v in (table or {}).items()}


def scheduler(config: dict):
    spec = config["scheduler"]
    return None if spec is None else getattr(lr_scheduler, spec["cls"])(**spec["kwargs"])


def optimizer(config: dict) -> contrib.GroupAdaGrad:
    kwargs = dict(config["optimizer_kwargs"])
    if "param_idx2name" in kwargs:
        kwargs["param_idx2name"] = mxnet_keys(kwargs["param_idx2name"])
    if config["scheduler"] is not None:
        kwargs["lr_scheduler"] = scheduler(config)
        kwargs.setdefault("learning_rate", None)
    opt = contrib.GroupAdaGrad(**kwargs)
    if config["set_lr_mult"]:
        opt.set_lr_mult(mxnet_keys(config["set_lr_mult"]))
    if config["set_wd_mult"]:
        opt.set_wd_mult(mxnet_keys(config["set_wd_mult"]))
    return opt


def within(actual, expected, bound=WITHIN) -> None:
    """Equal where MXNet's value is not finite (NaN, or an overflowed history's inf), within
    ``bound`` of the array's scale elsewhere."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    assert reference.relative_error(actual[finite], expected[finite]) <= bound


@pytest.mark.parametrize("name", REPLAYED)
def test_optimizer_api_replays_mxnet(name):
    config, data = DENSE_CONFIGS[name], DENSE
    opt = optimizer(config)
    indices = config["indices"]
    weights = [jnp.asarray(data[f"{name}__weights_p{i}"][0]) for i in indices]
    states = [opt.create_state_multi_precision(i, w) for i, w in zip(indices, weights)]
    for t in range(config["steps"]):
        grads = [jnp.asarray(data[f"{name}__grads_p{i}"][t]) for i in indices]
        opt.update_multi_precision(indices, weights, grads, states)
        lrs = [opt._get_lr(i) for i in indices]  # MXNet's per-index learning rates
        np.testing.assert_allclose(lrs, data[f"{name}__lr"][t], rtol=1e-12)
        for i, weight, state in zip(indices, weights, states):
            history = state[1] if isinstance(state, tuple) else state
            assert history.shape == data[f"{name}__history_p{i}"][t + 1].shape
            within(history, data[f"{name}__history_p{i}"][t + 1])
            if isinstance(state, tuple):  # multi_precision: the float32 master copy
                within(state[0], data[f"{name}__master_p{i}"][t + 1])
                assert weight.dtype == jnp.float16
            within(weight, data[f"{name}__weights_p{i}"][t + 1], 1e-3 if state is None else WITHIN)
    assert opt.num_update == config["num_update"][-1]


@pytest.mark.parametrize("name", [n for n in REPLAYED if "wd" not in n])
def test_functional_form_replays_mxnet(name):
    """``group_adagrad`` (and its one-pass form, bitwise) gives MXNet's trajectories."""
    config, data = DENSE_CONFIGS[name], DENSE
    hyper, indices = config["hyperparameters"], config["indices"]
    lr_mult = [
        config.get("lr_mult_effective", [1.0] * len(indices))[k] for k in range(len(indices))
    ]
    tx = contrib.group_adagrad(
        None if config["scheduler"] else hyper["learning_rate"],
        hyper["eps"],
        rescale_grad=hyper["rescale_grad"],
        clip_gradient=hyper["clip_gradient"],
        lr_scheduler=scheduler(config),
        begin_num_update=hyper["begin_num_update"],
        lr_mult=lr_mult,
        multi_precision=hyper["multi_precision"],
    )
    one_pass = flat.one_pass(tx)
    params = [jnp.asarray(data[f"{name}__weights_p{i}"][0]) for i in indices]
    state = tx.init(params)
    reference_step = jax.jit(lambda p, s, g: step(tx, p, s, g))
    for t in range(config["steps"]):
        grads = [jnp.asarray(data[f"{name}__grads_p{i}"][t]) for i in indices]
        if hyper["multi_precision"]:
            grads = [g.astype(jnp.float32) for g in grads]
        got = jax.jit(one_pass.step)(params, grads, state)
        params, state = reference_step(params, state, grads)
        assert_xla_bits(got, (params, state))
        histories = optax.tree.get(state, "history")
        for k, i in enumerate(indices):
            within(histories[k], data[f"{name}__history_p{i}"][t + 1])
            exact = data[
                f"{name}__master_p{i}" if hyper["multi_precision"] else f"{name}__weights_p{i}"
            ]
            working = state.master[k] if hyper["multi_precision"] else params[k]
            within(working, exact[t + 1])


def step(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return mx_adagrad.apply_updates(params, updates), state


SPARSE_REPLAYED = [n for n in SPARSE_CONFIGS if n != "sp_clip_zero"]  # clip 0: refused


@pytest.mark.parametrize("name", SPARSE_REPLAYED)
def test_row_sparse_gradients_replay_mxnet_and_leave_other_rows_untouched(name):
    config, data = SPARSE_CONFIGS[name], ROW_SPARSE
    config = {"scheduler": None, "set_wd_mult": None, **config}
    opt, indices = optimizer(config), config["indices"]
    weights = [jnp.asarray(data[f"{name}__weights_p{i}"][0]) for i in indices]
    states = [opt.create_state_multi_precision(i, w) for i, w in zip(indices, weights)]
    for t in range(config["steps"]):
        grads = []
        for k, i in enumerate(indices):
            count = int(data[f"{name}__count_p{i}"][t])
            rows = data[f"{name}__indices_p{i}"][t][:count].astype(np.int32)
            values = data[f"{name}__values_p{i}"][t][:count]
            grads.append(mx_adagrad.RowSparse(rows, values, weights[k].shape))
        before = [np.asarray(w) for w in weights], [np.asarray(s) for s in jax.tree.leaves(states)]
        opt.update_multi_precision(indices, weights, grads, states)
        for k, i in enumerate(indices):
            master = isinstance(states[k], tuple)
            history = states[k][1] if master else states[k]
            within(history, data[f"{name}__history_p{i}"][t + 1])
            if master:
                within(states[k][0], data[f"{name}__master_p{i}"][t + 1])
            within(weights[k], data[f"{name}__weights_p{i}"][t + 1], 1e-3 if master else WITHIN)
            untouched = np.setdiff1d(np.arange(weights[k].shape[0]), grads[k].indices)
            np.testing.assert_array_equal(
                np.asarray(weights[k])[untouched], before[0][k][untouched]
            )
        for new, old in zip(jax.tree.leaves(states), before[1]):
            rows = np.all(np.asarray(new) == old, axis=tuple(range(1, old.ndim)))
            assert rows.sum() >= old.shape[0] - max(
                int(data[f"{name}__count_p{i}"][t]) for i in indices
            )


def test_clip_gradient_of_zero_or_below_is_refused():
    """MXNet runs it (its dense path then clips everything to 0, or swaps signs below 0; its
    sparse kernel does not clip at all): mx_adagrad refuses it, naming the argument."""
    for name in ("clip_zero", "clip_negative"):
        kwargs = DENSE_CONFIGS[name]["optimizer_kwargs"]
        with pytest.raises(ValueError, match=r"clip_gradient must be > 0"):
            contrib.GroupAdaGrad(**kwargs)
    with pytest.raises(ValueError, match=r"clip_gradient must be > 0"):
        contrib.GroupAdaGrad(**SPARSE_CONFIGS["sp_clip_zero"]["optimizer_kwargs"])


@pytest.mark.parametrize("with_scheduler", [True, False], ids=["factor_scheduler", "constant"])
def test_gluon_checkpoint_restores_and_continues_as_mxnet(with_scheduler):
    """The embedding's gradient is given as Gluon's row_sparse rows (MXNet stepped it with its
    sparse kernel); Parameter.lr_mult, which neither file holds, is set again by position."""
    prefix = "" if with_scheduler else "nosched_"
    continuation = np.load(GLUON / f"{prefix}continuation.npz")
    facts = json.loads(str(continuation["config_json"]))
    order = dict(
        zip(map(str, continuation["structural_names"]), map(str, continuation["full_names"]))
    )
    paths = GLUON / f"{prefix}net.params", GLUON / f"{prefix}trainer.states"
    opt, weights, states, names = mxnet_io.restore(*paths, trainer_order=order)
    assert isinstance(opt, contrib.GroupAdaGrad)
    assert (opt.lr_scheduler is not None) == with_scheduler
    assert [s.shape for s in states] == [(w.shape[0], 1) for w in weights]
    opt.set_lr_mult({names.index(n): m for n, m in (facts.get("param_lr_mult") or {}).items()})
    tx = mxnet_io.optimizers.transformation("test", opt, {n: i for i, n in enumerate(names)})
    params = dict(zip(names, weights))
    opt_state = optax.tree.set(tx.init(params), history=dict(zip(names, states)))
    for t in range(len(continuation["num_update"])):
        grads = []
        for n in names:
            grad = continuation[f"grads__{n}"][t]
            if f"grad_rows__{n}" in continuation:
                rows = continuation[f"grad_rows__{n}"][t][: continuation[f"grad_row_count__{n}"][t]]
                grad = mx_adagrad.RowSparse(rows.astype(np.int32), grad[rows], grad.shape)
            grads.append(grad)
        params, opt_state = jax.jit(lambda p, s, g: step(tx, p, s, g))(
            params, opt_state, dict(zip(names, grads))
        )
        opt.update(list(range(len(names))), weights, grads, states)
        for k, n in enumerate(names):
            for got in (weights[k], params[n]):
                within(got, continuation[f"weights__{n}"][t + 1])
            for got in (states[k], optax.tree.get(opt_state, "history")[n]):
                within(got, continuation[f"history__{n}"][t + 1])


def test_restore_into_keeps_rows_and_refuses_a_transposed_layout():
    continuation = np.load(GLUON / "continuation.npz")
    order = dict(
        zip(map(str, continuation["structural_names"]), map(str, continuation["full_names"]))
    )
    paths = GLUON / "net.params", GLUON / "trainer.states"
    embedding, dense = (continuation[f"weights__{n}"][0] for n in ("0.weight", "1.weight"))
    target = {
        "embed": {"embedding": jnp.zeros(embedding.shape)},
        "out": {"w2": jnp.zeros(dense.shape)},
    }
    name_map = {"0.weight": "embed/embedding", "1.weight": "out/w2"}
    _, params, opt_state = mxnet_io.restore_into(
        *paths, target, name_map=name_map, trainer_order=order
    )
    np.testing.assert_array_equal(params["embed"]["embedding"], embedding)
    history = optax.tree.get(opt_state, "history")
    np.testing.assert_array_equal(
        history["embed"]["embedding"], continuation["history__0.weight"][0]
    )
    transposed = {
        "embed": {"embedding": jnp.zeros(embedding.shape)},
        "out": {"kernel": jnp.zeros(dense.shape[::-1])},
    }
    with pytest.raises(ValueError, match=r"GroupAdaGrad keeps one history number per row.*Dense"):
        mxnet_io.restore_into(
            *paths,
            transposed,
            name_map={"0.weight": "embed/embedding", "1.weight": "out/kernel"},
            trainer_order=order,
        )


SHAPES = [(7, 4), (10, 3), (5, 1), (3, 64), (2, 37)]


def random_tables(rng, shapes=SHAPES, scale=1.0):
    return [jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for s in shapes]


@pytest.mark.parametrize(
    "hyper",
    [dict(), dict(rescale_grad=0.3, clip_gradient=0.4), dict(lr_mult=[2.0, 0.5, 1.0, 1.0, 3.0])],
    ids=["defaults", "rescale_clip", "lr_mult"],
)
def test_against_a_float64_transcription(hyper):
    rng = np.random.default_rng(0)
    tx = contrib.group_adagrad(0.1, 1e-5, **hyper)
    params = random_tables(rng)
    state = tx.init(params)
    want = [(np.asarray(p, np.float64), np.zeros((p.shape[0], 1))) for p in params]
    mults = hyper.get("lr_mult", [1.0] * len(params))
    arguments = {k: v for k, v in hyper.items() if k != "lr_mult"}
    for _ in range(6):
        grads = random_tables(rng)
        params, state = jax.jit(lambda p, s, g: step(tx, p, s, g))(params, state, grads)
        want = [
            reference.group_adagrad_step(w, g, h, lr=0.1 * m, eps=1e-5, **arguments)
            for (w, h), g, m in zip(want, grads, mults)
        ]
        for got, (w, h), history in zip(params, want, optax.tree.get(state, "history")):
            within(got, w, 1e-6)
            within(history, h, 1e-6)


def test_rowwise_adagrad_differs_only_in_where_epsilon_sits():
    rng = np.random.default_rng(1)
    table, grad = random_tables(rng, [(6, 5)])[0], random_tables(rng, [(6, 5)])[0]
    group = contrib.group_adagrad(0.1, 0.5)
    state = group.init(table)
    new, _ = step(group, table, state, grad)
    history = np.mean(np.asarray(grad, np.float64) ** 2, axis=1, keepdims=True)
    inside = np.asarray(table) - 0.1 * np.asarray(grad) / np.sqrt(history + 0.5)
    outside = np.asarray(table) - 0.1 * np.asarray(grad) / (np.sqrt(history) + 0.5)
    within(new, inside, 1e-6)
    rowwise, _ = step(
        mx_adagrad.rowwise_adagrad(0.1, 0.5),
        table,
        mx_adagrad.rowwise_adagrad(0.1, 0.5).init(table),
        grad,
    )
    within(rowwise, outside, 1e-6)
    assert reference.relative_error(new, outside) > 1e-3


@pytest.mark.parametrize(
    "hyper",
    [dict(rescale_grad=0.5, clip_gradient=1.5), dict(rescale_grad=0.3)],
    ids=["clip", "rescale"],
)
@pytest.mark.parametrize("kind", ["dense", "RowSparse", "BagGrad"])
def test_one_pass_step_is_bitwise_the_transformation(kind, hyper):
    rng = np.random.default_rng(2)
    tx = contrib.group_adagrad(0.1, **hyper)
    opt = flat.one_pass(tx)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    state = tx.init(table)
    for _ in range(3):
        ids = rng.integers(-1, 52, 40).astype(np.int32)  # duplicates and padding ids
        values = rng.normal(size=(40, 8)).astype(np.float32) * 3
        values[0, :4] = [np.nan, np.inf, 0.0, -0.0]
        if kind == "dense":
            grad = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
        elif kind == "RowSparse":  # unchecked: ids outside [0, 50) are padding
            grad = mx_adagrad.RowSparse.tree_unflatten(((50, 8), False), (ids, values))
        else:
            bag = np.sort(rng.integers(0, 10, 40)).astype(np.int32)
            scale = rng.uniform(0.5, 2, 40).astype(np.float32)
            grad = mx_adagrad.BagGrad(ids, bag, scale, values[:10], table.shape)
        want = jax.jit(lambda p, s, g: step(tx, p, s, g))(table, state, grad)
        got = jax.jit(opt.step)(table, grad, state)
        assert_xla_bits(got, want)
        table, state = want
    assert optax.tree.get(state, "history").shape == (50, 1)


def test_inject_hyperparams_and_a_traced_learning_rate():
    tx = optax.inject_hyperparams(contrib.group_adagrad)(learning_rate=0.1, epsilon=1e-5)
    table = jnp.ones((4, 3))
    state = tx.init(table)
    state.hyperparams["learning_rate"] = jnp.float32(0.05)
    updates, _ = jax.jit(tx.update)(jnp.full((4, 3), 2.0), state)
    np.testing.assert_allclose(updates, -0.05 * 2 / np.sqrt(4 + 1e-5), rtol=1e-6)


def test_row_sharded_tables_keep_their_sharding():
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("rows",), devices=devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    table = jax.device_put(jnp.ones((4 * len(devices), 3)), sharding)
    tx = contrib.group_adagrad(0.1)
    state = tx.init(table)
    history = optax.tree.get(state, "history")
    assert history.shape == (table.shape[0], 1)
    assert history.sharding.spec[:1] == ("rows",)
    new, state = jax.jit(lambda p, s, g: step(tx, p, s, g))(table, state, jnp.ones_like(table))
    within(new, np.full(table.shape, 1 - 0.1 / np.sqrt(1 + 1e-5)))


def test_bad_arguments_raise_early_and_name_themselves():
    with pytest.raises(ValueError, match=r"contrib\.group_adagrad: wd .*no weight decay"):
        contrib.group_adagrad(0.1, wd=0.01)
    with pytest.raises(ValueError, match=r"params\['bias'\].*2-D weights.*shape \(3,\)"):
        contrib.group_adagrad().init({"bias": jnp.zeros(3), "w": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"clip_gradient"):
        contrib.group_adagrad(clip_gradient=0.0)
    with pytest.raises(ValueError, match=r"epsilon"):
        contrib.group_adagrad(epsilon=-1.0)
    with pytest.raises(ValueError, match=r"contrib\.GroupAdaGrad: clip_gradient"):
        contrib.GroupAdaGrad(clip_gradient=-0.5)
    opt = contrib.GroupAdaGrad(wd=0.1)
    with pytest.raises(ValueError, match=r"2-D weights"):
        opt.create_state(0, jnp.zeros((2, 3, 4)))
    weights, states = [jnp.ones((2, 2))], [opt.create_state(0, jnp.ones((2, 2)))]
    with pytest.raises(ValueError, match=r"wd \* wd_mult of index 0.*no weight decay"):
        opt.update([0], weights, [jnp.ones((2, 2))], states)
    np.testing.assert_array_equal(weights[0], 1.0)  # nothing changed


def test_a_masked_weight_decay_trains_as_mxnet():
    """``wd`` masked to 0 for every parameter (``param_idx2name`` and ``set_wd_mult``) is what
    MXNet accepts: the ``wd_masked`` fixture."""
    assert "wd_masked" in REPLAYED
    assert DENSE_CONFIGS["wd_masked"]["wd_effective"] == [0.0, 0.0]
