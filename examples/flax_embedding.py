"""Flax NNX word2vec: Embed tables trained through mx_adagrad.flax.Optimizer, RowSparse against dense.

    python examples/flax_embedding.py --steps 3000 --dim 256 --batch-size 128 --negatives 5

The skip-gram model of ``examples/sparse_embedding.py`` (negative sampling on the standard
library's docstrings, same corpus, batches and loss) written as an NNX module with two
``mx_adagrad.flax.Embed`` tables, ``center`` and ``context``, and trained with
``mx_adagrad.flax.Optimizer(model, mx_adagrad.adagrad(learning_rate))`` twice, from the same
tables on the same batches:

* sparse: ``mx_adagrad.flax.value_and_grad`` gives each table's gradient as a
  :class:`mx_adagrad.RowSparse` of the rows looked up, so AdaGrad reads and writes those rows only;
* dense: ``nnx.value_and_grad`` gives table-sized gradients, so every step updates every row.

Both steps are ``nnx.jit``-ed with the model and optimizer donated. The script prints both loss
trajectories with their largest difference, the steps per second of each path (after compilation,
the first step excluded) and the nearest neighbours (cosine) of a few common words.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import sparse_embedding
from flax import nnx
from sparse_embedding import (
    Batches,
    Run,
    init_params,
    sgns_loss,
)

import mx_adagrad
import mx_adagrad.flax


class SkipGram(nnx.Module):
    """word2vec's two tables, initialized as ``sparse_embedding.init_params`` does: ``center``
    (the ``v``) uniform in +-0.5 / dim, ``context`` (the ``u``) zero."""

    def __init__(self, vocab: int, dim: int, seed: int):
        tables, rngs = init_params(vocab, dim, seed), nnx.Rngs(seed)
        self.center = mx_adagrad.flax.Embed(
            vocab, dim, rngs=rngs, embedding_init=lambda *_: tables["center"]
        )
        self.context = mx_adagrad.flax.Embed(
            vocab, dim, rngs=rngs, embedding_init=lambda *_: tables["context"]
        )

    def __call__(self, centers: jax.Array, contexts: jax.Array) -> jax.Array:
        """The mean negative-sampling loss of a batch (see ``sparse_embedding.sgns_loss``)."""
        return sgns_loss(self.center(centers), self.context(contexts))


def make_step(sparse: bool) -> Callable[..., jax.Array]:
    """The ``nnx.jit``-ed step ``(model, optimizer, centers, contexts) -> loss``."""
    value_and_grad = mx_adagrad.flax.value_and_grad if sparse else nnx.value_and_grad

    @nnx.jit(donate_argnames=("model", "optimizer"))  # tables and history updated in place
    def step(model, optimizer, centers, contexts):
        loss, grads = value_and_grad(lambda model: model(centers, contexts))(model)
        optimizer.update(model, grads)  # RowSparse tables: the rows looked up only
        return loss

    return step


def train(
    batches: Batches,
    vocab: int,
    dim: int = 256,
    learning_rate: float = 0.1,
    seed: int = 0,
    sparse: bool = True,
) -> Run:
    """Trains a :class:`SkipGram` on ``batches`` with ``mx_adagrad.adagrad(learning_rate)``.

    Args:
      batches: the data stream, one step per row.
      vocab: rows of each table.
      dim: columns of each table (the embedding size).
      learning_rate: AdaGrad's learning rate.
      seed: seeds the initial ``center`` table.
      sparse: RowSparse gradients (``mx_adagrad.flax.value_and_grad``) or dense ones
        (``nnx.value_and_grad``).

    Returns:
      The run; ``steps_per_second`` times every step after the first (which compiles), and
      ``params`` holds the trained tables.
    """
    steps = len(batches.centers)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first one compiles), got {steps}")
    model = SkipGram(vocab, dim, seed)
    optimizer = mx_adagrad.flax.Optimizer(model, mx_adagrad.adagrad(learning_rate))
    step = make_step(sparse)
    losses = [
        jax.block_until_ready(step(model, optimizer, batches.centers[0], batches.contexts[0]))
    ]
    start = time.perf_counter()
    for centers, contexts in zip(batches.centers[1:], batches.contexts[1:]):
        losses.append(step(model, optimizer, centers, contexts))
    jax.block_until_ready((nnx.state(model), losses))
    elapsed = time.perf_counter() - start
    tables = {"center": model.center.embedding[...], "context": model.context.embedding[...]}
    return Run(np.asarray(jax.device_get(losses)), (steps - 1) / elapsed, tables)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """``examples/sparse_embedding.py``'s flags, data, printout and result, with the NNX model's
    :func:`train`."""
    return sparse_embedding.main(argv, train_fn=train)


if __name__ == "__main__":
    main()
