"""Resume training from an MXNet checkpoint and continue in JAX.

A Gluon training run leaves two files per checkpoint: ``net.save_parameters(...)`` (the weights,
under structural names such as ``0.weight`` and ``1.gamma``) and ``trainer.save_states(...)`` (the
AdaGrad histories, keyed by Trainer index, and the pickled optimizer with its hyperparameters and
update counts). ``mx_adagrad.mxnet_io.restore`` reads both, without MXNet, and returns an optimizer
with MXNet's Optimizer API, the weights and the states; ``restore_functional`` returns the same
checkpoint as an optax transformation, a dict of parameters and the optimizer state.

The checkpoint used here is ``tests/fixtures/gluon_convbn``, written by real MXNet 1.9.1 after 3
steps of ``Sequential(Conv2D(4, 3), BatchNorm(), Flatten(), Dense(3))`` trained with
``gluon.Trainer(net.collect_params(), 'adagrad', {'learning_rate': 0.1, 'wd': 0.01,
'clip_gradient': 0.3})``; ``steps.npz`` records the 3 steps MXNet took after it (inputs, raw
gradients, weights). This script takes those 3 steps again in JAX, twice: with the gradients
MXNet recorded (the optimizer alone: the result equals MXNet's to float32 rounding), and with
gradients from a JAX re-implementation of the net (the whole training step), and prints the
largest relative difference ``max|jax - mxnet| / max|mxnet|`` to MXNet's weights.

Why ``trainer_order``: the Trainer numbers its parameters by their sorted *full* names
(``batchnorm0_beta, batchnorm0_gamma, batchnorm0_running_mean, batchnorm0_running_var,
conv0_bias, conv0_weight, dense0_bias, dense0_weight``), and the states file keys the histories by
that number. Neither file stores the full names, and the sorted structural names (``0.bias,
0.weight, 1.beta, 1.gamma, ...``) put the conv layer first, so the default pairing (index ``i`` =
``i``-th sorted structural name) would give the conv weight the BatchNorm's history; ``restore``
sees the shapes disagree and refuses it. The fixture's ``trainer_index.json`` lists the structural
names in the Trainer's order (in MXNet 1.x, ``{name: p.name for name, p in
net._collect_params_with_prefix().items()}`` gives the same order as a dict). Its ``0.bias`` (the
conv bias) has a true gradient of zero, as BatchNorm follows it: both frameworks compute rounding
noise of about 1e-6 there, which AdaGrad's normalisation turns into steps of about 1e-4, so with
gradients computed in JAX that one parameter differs from MXNet by noise.

The script ends with a model that was never an MXNet net: a Flax NNX ``ConvPoolNet`` (NHWC, named
``conv``, ``bn``, ``head``) takes the Gluon checkpoint ``tests/fixtures/gluon_migration/conv_pool_mx1``
(``Sequential(Conv2D(4, 3, use_bias=False), BatchNorm(), Activation('relu'), MaxPool2D(2),
Flatten(), Dense(3))``, trained by MXNet 1.9.1's Trainer) with ``mxnet_io.restore_into``: its
weights and AdaGrad histories in the model's own layout (Dense ``(out, in)`` -> kernel ``(in,
out)``, Conv ``OIHW`` -> ``HWIO``, ``gamma``/``beta`` -> ``scale``/``bias``; BatchNorm's running
statistics with ``mxnet_io.to_jax``). Its forward pass on the recorded batch, in NHWC, gives
MXNet's output; then ``nnx.Optimizer`` continues the training from the restored state for the 3
steps MXNet recorded, and the weights and histories follow MXNet's.

Run: ``.venv/bin/python examples/mxnet_migration.py``
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mx_adagrad
from mx_adagrad import mxnet_io

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CHECKPOINT = FIXTURES / "gluon_convbn"
MIGRATION = FIXTURES / "gluon_migration"
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.9  # Gluon BatchNorm's defaults
RUNNING = ("1.running_mean", "1.running_var")

Params = dict[str, jax.Array]


def loss_fn(
    params: Params, running: Params, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, Params]:
    """The Gluon net in training mode and ``SoftmaxCrossEntropyLoss``, summed over the batch.

    ``loss.backward()`` on Gluon's per-sample loss vector differentiates its sum; the Trainer then
    multiplies by ``rescale_grad = 1 / batch_size``. BatchNorm normalises with the batch statistics
    and moves its running statistics (not trained: read with ``load_params``) towards them.
    """
    h = jax.lax.conv_general_dilated(
        x, params["0.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    h = h + params["0.bias"][:, None, None]
    mean, var = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
    h = (h - mean[:, None, None]) / jnp.sqrt(var[:, None, None] + BN_EPSILON)
    h = h * params["1.gamma"][:, None, None] + params["1.beta"][:, None, None]
    logits = h.reshape(h.shape[0], -1) @ params["3.weight"].T + params["3.bias"]
    labels = y.astype(jnp.int32)[:, None]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels, axis=1).sum()
    running = {
        "1.running_mean": BN_MOMENTUM * running["1.running_mean"] + (1 - BN_MOMENTUM) * mean,
        "1.running_var": BN_MOMENTUM * running["1.running_var"] + (1 - BN_MOMENTUM) * var,
    }
    return loss, running


grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))


def relative_difference(
    got: Params, want: dict[str, np.ndarray], names: Sequence[str] | None = None
) -> float:
    """The largest ``max|got - want| / max|want|`` over ``names`` (default: those of ``got``)."""
    return max(
        float(np.max(np.abs(np.asarray(got[name], np.float64) - want[name])))
        / float(np.max(np.abs(want[name])))
        for name in (got if names is None else names)
    )


class Run:
    """One continuation of the checkpoint: what each step produced."""

    def __init__(self) -> None:
        self.weights: list[Params] = []
        self.grads: list[Params] = []
        self.running: list[Params] = []


def optimizer_api(
    checkpoint: pathlib.Path, order: list[str], batches: list, recorded: list[Params] | None
) -> Run:
    """MXNet's Optimizer API: ``update(indices, weights, grads, states)`` on lists, in place."""
    optimizer, weights, states, names = mxnet_io.restore(
        checkpoint / "net.params", checkpoint / "trainer.states", trainer_order=order
    )
    stored = mxnet_io.load_params(checkpoint / "net.params")
    running = {name: jnp.asarray(stored[name]) for name in RUNNING}
    run = Run()
    for step, (x, y) in enumerate(batches):
        if recorded is None:
            grads, running = grad_fn(dict(zip(names, weights)), running, x, y)
        else:
            grads = recorded[step]
        optimizer.update(list(range(len(weights))), weights, [grads[n] for n in names], states)
        # Copies: the next update donates these arrays to its computation (updates in place).
        run.weights.append({name: np.asarray(w) for name, w in zip(names, weights)})
        run.grads.append(grads)
        run.running.append(running)
    return run


def functional(
    checkpoint: pathlib.Path, order: list[str], batches: list, recorded: list[Params] | None
) -> Run:
    """The functional API: the optax transformation inside one jitted training step."""
    tx, params, opt_state = mxnet_io.restore_functional(
        checkpoint / "net.params", checkpoint / "trainer.states", trainer_order=order
    )
    stored = mxnet_io.load_params(checkpoint / "net.params")
    running = {name: jnp.asarray(stored[name]) for name in RUNNING}

    @jax.jit
    def train_step(params, opt_state, running, x, y, grads):
        if grads is None:  # a static choice: None is an empty pytree
            grads, running = jax.grad(loss_fn, has_aux=True)(params, running, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state, running, grads

    run = Run()
    for step, (x, y) in enumerate(batches):
        grads = None if recorded is None else recorded[step]
        params, opt_state, running, grads = train_step(params, opt_state, running, x, y, grads)
        run.weights.append(params)
        run.grads.append(grads)
        run.running.append(running)
    return run


# --------------------------------------------------------------------------------------------
# A Flax NNX model that was never an MXNet net


class ConvPoolNet(nnx.Module):
    """The Gluon net of ``gluon_migration/conv_pool_mx1``, written for Flax: NHWC, named layers."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(2, 4, (3, 3), padding="VALID", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.head = nnx.Linear(36, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
        # Gluon's Flatten reads NCHW as (C, H, W); an NHWC flatten would feed the Dense layer
        # the same numbers in another order. Put the channels first, then flatten.
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return self.head(x)


# Gluon structural name -> path in the model's state: the layers are named, not numbered, so the
# pairing is given (Gluon's blocks 2, 3 and 4, relu, pooling and flatten, have no parameters).
PARAMETERS = {
    "0.weight": "conv/kernel",
    "1.gamma": "bn/scale",
    "1.beta": "bn/bias",
    "5.weight": "head/kernel",
    "5.bias": "head/bias",
}
STATISTICS = {"1.running_mean": "bn/mean", "1.running_var": "bn/var"}


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Gluon's ``SoftmaxCrossEntropyLoss`` per sample, summed (what ``loss.backward()`` sees)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).sum()


@nnx.jit(donate_argnames=("model", "optimizer"))
def train_step(model: ConvPoolNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    grads = nnx.grad(lambda model: cross_entropy_sum(model(x), y))(model)
    optimizer.update(model, grads)


def load_optimizer_state(optimizer: nnx.Optimizer, opt_state: optax.OptState) -> None:
    """Puts a restored optax state into an ``nnx.Optimizer`` built with the same transformation.

    Both states have the same leaves in the same order (the parameters' paths, sorted); only
    their containers differ (``nnx.Optimizer`` wraps each leaf in a Variable).
    """
    variables = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = jax.tree.leaves(opt_state)
    shapes = [v.shape for v in variables], [v.shape for v in values]
    if shapes[0] != shapes[1]:
        raise ValueError(f"the optimizer's state has shapes {shapes[0]}, the restored {shapes[1]}")
    for variable, value in zip(variables, values):
        variable.set_value(value)


def flax_model(case: str = "conv_pool_mx1") -> dict[str, float]:
    """Loads a Gluon checkpoint into :class:`ConvPoolNet` and continues its training.

    Returns the largest relative differences to MXNet: ``nnx/forward`` (the inference output on
    the recorded batch), ``nnx/weights`` and ``nnx/history`` (after each of the 3 steps, in the
    model's layout).
    """
    data = np.load(MIGRATION / "steps.npz", allow_pickle=False)
    config = json.loads(str(data["config_json"]))["cases"][case]
    model = ConvPoolNet(nnx.Rngs(0))
    params_path, states_path = MIGRATION / f"{case}.params", MIGRATION / f"{case}.states"

    # The trainable parameters and their AdaGrad state, in the model's layout...
    tx, params, opt_state = mxnet_io.restore_into(
        params_path,
        states_path,
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        name_map=PARAMETERS,
        trainer_order=config["trainer_order"],  # Trainer index order (batchnorm0_* first)
    )
    # ... and BatchNorm's running statistics, which the optimizer does not train.
    statistics = mxnet_io.to_jax(
        mxnet_io.load_params(params_path),
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        name_map=STATISTICS,
    )
    nnx.update(model, params, statistics)

    model.eval()  # BatchNorm normalises with the running statistics, as Gluon outside training
    x_infer = jnp.asarray(data[f"{case}__x_infer"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    results = {"nnx/forward": relative(model(x_infer), data[f"{case}__out_infer"])}

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    load_optimizer_state(optimizer, opt_state)
    model.train()
    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    results["nnx/weights"] = results["nnx/history"] = 0.0
    for step in range(data[f"{case}__y"].shape[0]):
        x = jnp.asarray(data[f"{case}__x"][step].transpose(0, 2, 3, 1))
        train_step(model, optimizer, x, jnp.asarray(data[f"{case}__y"][step]))
        # MXNet's weights and histories after this step, in the model's layout, to compare.
        mxnet = {
            kind: mxnet_io.to_jax(
                {name: data[f"{case}__{kind}__{name}"][step + 1] for name in PARAMETERS},
                target,
                name_map=PARAMETERS,
            )
            for kind in ("weights", "history")
        }
        weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        history = nnx.to_pure_dict(optax.tree.get(optimizer.opt_state, "history"))
        for key, got in (("weights", weights), ("history", history)):
            differences = jax.tree.leaves(jax.tree.map(relative, got, mxnet[key]))
            results[f"nnx/{key}"] = max(results[f"nnx/{key}"], *differences)
    return results


def relative(got: jax.Array, want: np.ndarray) -> float:
    """``max|got - want| / max|want|``."""
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Continues the checkpoint for the recorded steps; returns the largest differences to MXNet.

    Keys (each the largest relative difference over the steps and the parameters):
    ``recorded/optimizer`` and ``recorded/functional``: the weights, with MXNet's recorded
    gradients, through ``restore``'s Optimizer API and ``restore_functional``'s transformation;
    ``jax/optimizer`` and ``jax/functional``: the weights, conv bias left out, with gradients from
    :func:`loss_fn`; ``jax/conv_bias``: the conv bias (noise, see the module docstring);
    ``jax/gradients``: the JAX gradients against MXNet's, conv bias left out; ``jax/running``:
    BatchNorm's running statistics (they follow the conv bias, so they carry its noise too);
    ``nnx/forward``, ``nnx/weights``, ``nnx/history``: the Flax NNX model (:func:`flax_model`).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, default=CHECKPOINT)
    args = parser.parse_args(argv)
    order = json.loads((args.checkpoint / "trainer_index.json").read_text())[
        "structural_names_in_trainer_order"
    ]
    data = np.load(args.checkpoint / "steps.npz", allow_pickle=False)
    trainable = [str(name) for name in data["trainable_names"]]
    count = data["grads__0.weight"].shape[0]  # steps recorded after the checkpoint
    done = data["X"].shape[0] - count  # steps MXNet took before it
    batches = [
        (jnp.asarray(data["X"][done + k]), jnp.asarray(data["y"][done + k])) for k in range(count)
    ]
    recorded = [
        {name: jnp.asarray(data[f"grads__{name}"][k]) for name in trainable} for k in range(count)
    ]
    mxnet = [
        {str(name): data[f"weights__{name}"][k + 1] for name in data["param_names"]}
        for k in range(count)
    ]
    mxnet_grads = [{name: data[f"grads__{name}"][k] for name in trainable} for k in range(count)]
    others = [name for name in trainable if name != "0.bias"]

    def largest(run: Run, names: Sequence[str] | None = None) -> float:
        return max(relative_difference(w, m, names) for w, m in zip(run.weights, mxnet))

    apis = (("optimizer", optimizer_api), ("functional", functional))
    results = {
        f"recorded/{api}": largest(continue_(args.checkpoint, order, batches, recorded))
        for api, continue_ in apis
    }
    for api, continue_ in apis:
        run = continue_(args.checkpoint, order, batches, None)
        results[f"jax/{api}"] = largest(run, others)
        results["jax/conv_bias"] = max(results.get("jax/conv_bias", 0.0), largest(run, ["0.bias"]))
        results["jax/gradients"] = max(
            relative_difference(g, m, others) for g, m in zip(run.grads, mxnet_grads)
        )
        results["jax/running"] = max(relative_difference(r, m) for r, m in zip(run.running, mxnet))

    results.update(flax_model())

    print(f"resumed {args.checkpoint} after {done} MXNet steps, continued {count} in JAX")
    print("and loaded gluon_migration/conv_pool_mx1 into a Flax NNX model, continued 3 steps")
    print("largest relative difference to MXNet (max|jax - mxnet| / max|mxnet|):")
    for key, value in results.items():
        print(f"  {key:<20} {value:.2e}")
    return results


if __name__ == "__main__":
    main()
