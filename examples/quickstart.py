"""Quick start: a plain-JAX logistic regression trained with mx_adagrad.adagrad.

    python examples/quickstart.py --steps 200 --learning-rate 0.1

Prints the loss falling and the final training accuracy.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import mx_adagrad


def make_data(key, n=512, features=10):
    """Two Gaussian blobs labelled by a hidden linear rule."""
    key_x, key_w = jax.random.split(key)
    x = jax.random.normal(key_x, (n, features))
    hidden = jax.random.normal(key_w, (features,))
    return x, (x @ hidden > 0).astype(jnp.float32)


def loss_fn(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y = make_data(jax.random.key(args.seed))
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    tx = mx_adagrad.adagrad(learning_rate=args.learning_rate, wd=1e-4, clip_gradient=5.0)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # update params and state in place
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state, loss

    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state)
        if step == 1 or step % max(1, args.steps // 10) == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    accuracy = jnp.mean((x @ params["w"] + params["b"] > 0) == (y > 0))
    print(f"training accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
    main()
