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

import argparse
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from sparse_embedding import (
    PROBE_WORDS,
    Batches,
    Run,
    init_params,
    load_corpus,
    make_batches,
    nearest_neighbours,
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
    """Parses the flags, trains both paths, prints losses, speeds and neighbours; returns them.

    Returns:
      ``{"losses": {"sparse": ..., "dense": ...}, "steps_per_second": {"sparse": ..., "dense":
      ...}, "max_loss_difference": ..., "vocab": ..., "neighbours": {word: [...]}}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--subsample", type=float, default=1e-3)
    args = parser.parse_args(argv)

    corpus = load_corpus(args.vocab_size)
    vocab = len(corpus.words)
    print(
        f"corpus: {corpus.tokens.size:,} tokens of the standard library's docstrings, "
        f"vocabulary {vocab:,} words, NNX tables {vocab:,} x {args.dim}"
    )
    rng = np.random.default_rng(args.seed)
    batches = make_batches(corpus, args.steps, args.batch_size, args.negatives, args.subsample, rng)
    runs = {
        path: train(batches, vocab, args.dim, args.learning_rate, args.seed, path == "sparse")
        for path in ("sparse", "dense")
    }
    sparse, dense = runs["sparse"].losses, runs["dense"].losses
    every = max(1, args.steps // 10)
    print(f"{'steps':>11}  {'sparse loss':>11}  {'dense loss':>11}  (mean over the steps)")
    for start in range(0, args.steps, every):
        window = slice(start, min(start + every, args.steps))
        print(
            f"{start + 1:>5}-{window.stop:<5}  {sparse[window].mean():11.6f}  "
            f"{dense[window].mean():11.6f}"
        )
    max_difference = float(np.max(np.abs(sparse - dense)))
    print(f"max |sparse loss - dense loss| over the {args.steps} steps: {max_difference:.3g}")
    speeds = {path: run.steps_per_second for path, run in runs.items()}
    print(
        f"steps/s: sparse {speeds['sparse']:.1f}, dense {speeds['dense']:.1f} "
        f"(sparse {speeds['sparse'] / speeds['dense']:.1f}x; {jax.devices()[0].platform})"
    )
    neighbours = nearest_neighbours(runs["sparse"].params["center"], corpus.words, PROBE_WORDS)
    for word, similar in neighbours.items():
        print(f"  {word}: {', '.join(similar)}")
    return {
        "losses": {"sparse": sparse, "dense": dense},
        "steps_per_second": speeds,
        "max_loss_difference": max_difference,
        "vocab": vocab,
        "neighbours": neighbours,
        "tables": {path: run.params for path, run in runs.items()},
    }


if __name__ == "__main__":
    main()
