"""Haiku: an MLP trained on scikit-learn's handwritten digits with mx_adagrad.adagrad.

    python examples/haiku_digits.py --steps 600 --learning-rate 0.1 --batch-size 64 \
        --out examples/out/haiku_digits.png

The model and data of ``examples/flax_digits.py``, written with ``hk.transform`` and an
optax-style train step: ``tx.update(grads, opt_state, params)`` then
``mx_adagrad.apply_updates(params, updates)``, jitted with the params and optimizer state donated.
The 8x8 digit images (bundled with scikit-learn: no download) are split 75/25 into train and test
sets, stratified by class; as Gluon's ``trainer.step(batch_size)`` does, the loss is summed over the
batch and the optimizer rescales the gradient by ``1 / batch_size``. The script prints the test
accuracy and writes the loss and accuracy curves to ``--out`` as a PNG.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import History, batches, load_data, parse_args, plot
from tqdm import trange

import mx_adagrad

DEFAULT_OUT = pathlib.Path(__file__).parent / "out" / "haiku_digits.png"


def forward(x: jax.Array) -> jax.Array:
    """64 pixels -> 128 ReLU units -> 10 class logits."""
    return hk.nets.MLP([128, 10])(x)


model = hk.without_apply_rng(hk.transform(forward))


def loss_fn(params: hk.Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The cross-entropy summed over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).sum()


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))  # update in place
def train_step(
    tx: optax.GradientTransformation,
    params: hk.Params,
    opt_state: optax.OptState,
    x: jax.Array,
    y: jax.Array,
) -> tuple[hk.Params, optax.OptState, jax.Array]:
    """One optimizer step on a batch; returns the new params and state and the batch's mean loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)  # params: needed for weight decay
    return mx_adagrad.apply_updates(params, updates), opt_state, loss / x.shape[0]


@jax.jit
def accuracy(params: hk.Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The fraction of ``x`` the model classifies correctly."""
    return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y)


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
    params = model.init(jax.random.key(seed), data.x_train[:1])
    tx = mx_adagrad.adagrad(
        learning_rate, wd=1e-4, rescale_grad=1.0 / batch_size, clip_gradient=5.0
    )
    opt_state = tx.init(params)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    eval_every = eval_every or max(1, steps // 30)

    losses, eval_steps, accuracies = [], [0], [float(accuracy(params, x_test, y_test))]
    order = batches(np.random.default_rng(seed), len(data.y_train), batch_size)
    progress = trange(1, steps + 1, desc="haiku", unit="step")
    for step in progress:
        index = next(order)
        params, opt_state, loss = train_step(
            tx, params, opt_state, data.x_train[index], data.y_train[index]
        )
        losses.append(loss)
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            accuracies.append(float(accuracy(params, x_test, y_test)))
            progress.set_postfix(loss=f"{float(loss):.4f}", test_acc=f"{accuracies[-1]:.3f}")
    return History(np.asarray(jax.device_get(losses)), eval_steps, accuracies)


def main(argv: Sequence[str] | None = None) -> float:
    """Parses the flags, trains, prints the test accuracy, writes the curves; returns the accuracy."""
    args = parse_args(__doc__.splitlines()[0], DEFAULT_OUT, argv)

    history = train(args.steps, args.learning_rate, args.seed, args.batch_size)
    plot(history, args.out, f"Haiku MLP on digits, mx_adagrad.adagrad(lr={args.learning_rate})")
    print(f"test accuracy {history.test_accuracy:.4f}")
    print(f"curves written to {args.out}")
    return history.test_accuracy


if __name__ == "__main__":
    main()
