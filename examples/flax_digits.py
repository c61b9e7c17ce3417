"""Flax NNX: an MLP trained on scikit-learn's handwritten digits with MXNet's AdaGrad.

    python examples/flax_digits.py --steps 600 --learning-rate 0.1 --batch-size 64 \
        --out examples/out/flax_digits.png

The 8x8 digit images (1797 of them, bundled with scikit-learn: no download) are split 75/25 into
train and test sets, stratified by class. The model trains on shuffled minibatches with
``mx_adagrad.flax.Optimizer(model, mx_adagrad.flat.fused_adagrad(...))``: ``nnx.Optimizer``'s
interface with the one-pass AdaGrad step (on CPU, one native call updates every float32
parameter and its history in place; elsewhere XLA runs the same arithmetic, bitwise). As Gluon's
``trainer.step(batch_size)`` does, the loss is summed over the batch and the optimizer rescales the
gradient by ``1 / batch_size``. The script prints the test accuracy and writes the loss and accuracy
curves to ``--out`` as a PNG.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import History, batches, load_data, parse_args, plot
from flax import nnx
from tqdm import trange

import mx_adagrad
import mx_adagrad.flax

DEFAULT_OUT = pathlib.Path(__file__).parent / "out" / "flax_digits.png"


class MLP(nnx.Module):
    """64 pixels -> 128 ReLU units -> 10 class logits."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(jax.nn.relu(self.hidden(x)))


@nnx.jit(donate_argnames=("model", "optimizer"))  # update params and optimizer state in place
def train_step(
    model: MLP, optimizer: mx_adagrad.flax.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
    """One optimizer step on a batch; returns the batch's mean loss."""

    def loss_fn(model: MLP) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # one pass: update and apply, in place
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
    tx = mx_adagrad.flat.fused_adagrad(
        learning_rate, wd=1e-4, rescale_grad=1.0 / batch_size, clip_gradient=5.0
    )
    optimizer = mx_adagrad.flax.Optimizer(model, tx)  # wrt=nnx.Param
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


def main(argv: Sequence[str] | None = None) -> float:
    """Parses the flags, trains, prints the test accuracy, writes the curves; returns the accuracy."""
    args = parse_args(__doc__.splitlines()[0], DEFAULT_OUT, argv)

    history = train(args.steps, args.learning_rate, args.seed, args.batch_size)
    title = f"Flax NNX MLP on digits, mx_adagrad.flat.fused_adagrad(lr={args.learning_rate})"
    plot(history, args.out, title)
    print(f"test accuracy {history.test_accuracy:.4f}")
    print(f"curves written to {args.out}")
    return history.test_accuracy


if __name__ == "__main__":
    main()
