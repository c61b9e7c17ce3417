"""Flax NNX: an MLP trained on scikit-learn's handwritten digits with mx_adagrad.adagrad.

    python examples/flax_digits.py --steps 600 --learning-rate 0.1 --batch-size 64 \
        --out examples/out/flax_digits.png

The 8x8 digit images (1797 of them, bundled with scikit-learn: no download) are split 75/25 into
train and test sets, stratified by class. The model trains on shuffled minibatches with
``nnx.Optimizer(model, mx_adagrad.adagrad(...), wrt=nnx.Param)``; as Gluon's
``trainer.step(batch_size)`` does, the loss is summed over the batch and the optimizer rescales the
gradient by ``1 / batch_size``. The script prints the test accuracy and writes the loss and accuracy
curves to ``--out`` as a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import trange

import mx_adagrad

DEFAULT_OUT = pathlib.Path(__file__).parent / "out" / "flax_digits.png"


@dataclasses.dataclass(frozen=True)
class Digits:
    """The digits data set, split into train and test sets; pixels scaled to [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass(frozen=True)
class History:
    """What a training run recorded: the loss of every step and the periodic test accuracy."""

    losses: np.ndarray
    eval_steps: list[int]
    accuracies: list[float]

    @property
    def test_accuracy(self) -> float:
        """The test accuracy at the end of training."""
        return self.accuracies[-1]


def load_data(seed: int) -> Digits:
    """Loads the digits and splits them 75/25, stratified by class."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32),
        y.astype(np.int32),
        test_size=0.25,
        stratify=y,
        random_state=seed,
    )
    return Digits(x_train, y_train, x_test, y_test)


def batches(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Yields index batches over ``n`` examples forever, reshuffled every epoch.

    The last, incomplete batch of an epoch is dropped so that every batch has the same shape and
    the train step compiles once.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


class MLP(nnx.Module):
    """64 pixels -> 128 ReLU units -> 10 class logits."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(jax.nn.relu(self.hidden(x)))


@nnx.jit(donate_argnames=("model", "optimizer"))  # update params and optimizer state in place
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One optimizer step on a batch; returns the batch's mean loss."""

    def loss_fn(model: MLP) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # tx.update(grads, state, params), then apply the updates
    return loss / x.shape[0]


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The fraction of ``x`` the model classifies correctly."""
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def train(
    steps: int = 600,
    learning_rate: float = 0.1,
    seed: int = 0,
    batch_size: int = 64,
    eval_every: int | None = None,
) -> History:
    """Trains the MLP for ``steps`` minibatch steps; evaluates on the test set as it goes.

    Args:
      steps: the number of optimizer steps, >= 1.
      learning_rate: AdaGrad's learning rate.
      seed: seeds the data split, the initialization and the batch order.
      batch_size: examples per step.
      eval_every: steps between test-set evaluations (default: about 30 evaluations per run); the
        initial model and the last step are always evaluated.

    Returns:
      The :class:`History` of the run.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data = load_data(seed)
    model = MLP(nnx.Rngs(seed))
    tx = mx_adagrad.adagrad(
        learning_rate, wd=1e-4, rescale_grad=1.0 / batch_size, clip_gradient=5.0
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    eval_every = eval_every or max(1, steps // 30)

    losses, eval_steps, accuracies = [], [0], [float(accuracy(model, x_test, y_test))]
    order = batches(np.random.default_rng(seed), len(data.y_train), batch_size)
    progress = trange(1, steps + 1, desc="flax nnx", unit="step")
    for step in progress:
        index = next(order)
        losses.append(train_step(model, optimizer, data.x_train[index], data.y_train[index]))
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            accuracies.append(float(accuracy(model, x_test, y_test)))
            progress.set_postfix(loss=f"{float(losses[-1]):.4f}", test_acc=f"{accuracies[-1]:.3f}")
    return History(np.asarray(jax.device_get(losses)), eval_steps, accuracies)


def plot(history: History, out: pathlib.Path, title: str) -> None:
    """Writes the training loss and test accuracy curves to ``out`` (PNG, rendered by Agg)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(1, len(history.losses) + 1), history.losses, lw=0.8)
    loss_ax.set(xlabel="step", ylabel="train loss (batch mean)", yscale="log", title="loss")
    acc_ax.plot(history.eval_steps, history.accuracies, marker=".")
    acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(0.0, 1.0), title="test accuracy")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main(argv: Sequence[str] | None = None) -> float:
    """Parses the flags, trains, prints the test accuracy, writes the curves; returns the accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    history = train(args.steps, args.learning_rate, args.seed, args.batch_size)
    plot(history, args.out, f"Flax NNX MLP on digits, mx_adagrad.adagrad(lr={args.learning_rate})")
    print(f"test accuracy {history.test_accuracy:.4f}")
    print(f"curves written to {args.out}")
    return history.test_accuracy


if __name__ == "__main__":
    main()
