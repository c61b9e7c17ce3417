"""Word2vec on the standard library's docstrings: RowSparse AdaGrad updates versus dense ones.

    python examples/sparse_embedding.py --steps 3000 --dim 256 --batch-size 128 --negatives 5

Skip-gram with negative sampling (Mikolov et al., 2013). The corpus is the docstrings of the
Python standard library (every importable public module, its functions and classes, and their
methods, read with ``inspect.getdoc``: no download), split into lowercase words; the vocabulary is
the ``--vocab-size`` most frequent words and frequent words are subsampled. Each step takes a batch
of (center word, context word within a window of 5, ``--negatives`` words drawn from the unigram
distribution to the 3/4 power) and minimizes
``-log sigmoid(u_context . v_center) - sum(log sigmoid(-u_negative . v_center))`` with
``mx_adagrad.adagrad`` over two tables, ``center`` (the ``v``) and ``context`` (the ``u``), taken
as its one-pass step (``mx_adagrad.flat.fused_adagrad``: on the CPU, native kernels update the
touched rows of a RowSparse table in place, and every element of a dense one, in one pass).

The same training runs twice, from the same initial tables on the same batches:

* sparse: ``mx_adagrad.value_and_row_grad`` returns each table's gradient as a
  :class:`mx_adagrad.RowSparse` of the rows looked up, so AdaGrad reads and writes those rows only
  and the dense gradient of a table is never formed;
* dense: ``jax.value_and_grad`` of the same loss on the full tables, so every step scatters the
  gradient into a table-sized array and AdaGrad updates every row (the rows not looked up get a
  zero gradient, which leaves them and their history unchanged).

Both steps are jitted with the tables and the optimizer state donated. The script prints both loss
trajectories with their largest difference, the steps per second of each path (after compilation,
the first step excluded) and the nearest neighbours (cosine) of a few common words.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib
import inspect
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mx_adagrad

# Standard-library modules left unread: importing ``this`` prints and ``antigravity`` opens a
# browser; the Tk modules import only where Tk is installed, so the corpus is the same without it.
SKIPPED_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})
WORD = re.compile(r"[a-z]+")
WINDOW = 5  # the context word is at most this many words before or after the center word
PROBE_WORDS = ("file", "string", "socket", "thread", "integer", "error", "directory", "week")
TABLES = ("center", "context")

Params = dict[str, jax.Array]
Step = Callable[
    [Params, optax.OptState, np.ndarray, np.ndarray], tuple[Params, optax.OptState, jax.Array]
]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The tokenized docstrings: ``words`` most frequent first, ``counts`` their occurrences,
    ``tokens`` the text as word ids, words outside the vocabulary dropped."""

    words: list[str]
    counts: np.ndarray
    tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class Batches:
    """The data stream of a run: ``centers[step]`` of shape (batch,); ``contexts[step]`` of shape
    (batch, 1 + negatives), the true context word in column 0 and the negatives after it."""

    centers: np.ndarray
    contexts: np.ndarray


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run returns: the loss of every step, its speed and the trained tables."""

    losses: np.ndarray
    steps_per_second: float
    params: Params


def stdlib_docstrings() -> list[str]:
    """The docstrings of the standard library, in a fixed order, each distinct text once.

    For every public module of ``sys.stdlib_module_names`` that imports on this platform (sorted
    by name; :data:`SKIPPED_MODULES` left out): the module, the functions and classes it defines,
    and the attributes of those classes.
    """
    docs: dict[str, None] = {}  # insertion-ordered set

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc:
            docs.setdefault(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and names warn when imported or read
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIPPED_MODULES:
                continue
            try:
                module = importlib.import_module(name)
            except ImportError:  # another platform's module (winreg, msvcrt, ...)
                continue
            add(module)
            for _, obj in sorted(vars(module).items()):
                defined_here = name == "builtins" or getattr(obj, "__module__", None) == name
                if defined_here and (inspect.isclass(obj) or inspect.isroutine(obj)):
                    add(obj)
                    if inspect.isclass(obj):
                        for _, member in sorted(vars(obj).items()):
                            add(member)
    return list(docs)


def load_corpus(vocab_size: int) -> Corpus:
    """Tokenizes the standard library's docstrings and keeps the ``vocab_size`` most common words.

    Ties in frequency are broken alphabetically, so the vocabulary is the same on every run.
    """
    words = [w for doc in stdlib_docstrings() for w in WORD.findall(doc.lower())]
    counter = collections.Counter(words)
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]
    index = {word: i for i, (word, _) in enumerate(ranked)}
    tokens = np.asarray([index[w] for w in words if w in index], np.int32)
    counts = np.asarray([count for _, count in ranked], np.int64)
    return Corpus([word for word, _ in ranked], counts, tokens)


def make_batches(
    corpus: Corpus,
    steps: int,
    batch_size: int,
    negatives: int,
    subsample: float,
    rng: np.random.Generator,
) -> Batches:
    """Draws the (center, context, negatives) ids of every step.

    Frequent words are first subsampled as in word2vec: a token of frequency ``f`` is kept with
    probability ``min(1, sqrt(subsample / f) + subsample / f)`` (``subsample=0`` keeps all). Each
    example is then a uniformly drawn position of the kept text, a context word within
    :data:`WINDOW` words of it, and ``negatives`` ids drawn from the unigram distribution raised to
    the 3/4 power.
    """
    tokens = corpus.tokens
    if subsample > 0:
        ratio = subsample / (corpus.counts / corpus.counts.sum())
        keep = np.minimum(1.0, np.sqrt(ratio) + ratio)
        tokens = tokens[rng.random(tokens.size) < keep[tokens]]
    if tokens.size <= 2 * WINDOW:
        raise ValueError(f"the corpus keeps {tokens.size} tokens, too few for a window of {WINDOW}")
    positions = rng.integers(WINDOW, tokens.size - WINDOW, size=(steps, batch_size))
    offsets = rng.integers(1, WINDOW + 1, size=(steps, batch_size))
    offsets *= rng.choice(np.array([-1, 1]), size=(steps, batch_size))
    noise = corpus.counts**0.75
    cdf = np.cumsum(noise / noise.sum())
    noise_ids = np.searchsorted(cdf, rng.random((steps, batch_size, negatives)) * cdf[-1])
    contexts = np.concatenate([tokens[positions + offsets][..., None], noise_ids], axis=-1)
    return Batches(tokens[positions], contexts.astype(np.int32))


def sgns_loss(center_rows: jax.Array, context_rows: jax.Array) -> jax.Array:
    """The mean negative-sampling loss of a batch.

    Args:
      center_rows: ``v``, shape (batch, dim).
      context_rows: ``u``, shape (batch, 1 + negatives, dim): the true context first.
    """
    scores = jnp.einsum("bd,bkd->bk", center_rows, context_rows)
    signs = jnp.ones(scores.shape[-1]).at[1:].set(-1.0)
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(signs * scores), axis=-1))


def init_params(vocab: int, dim: int, seed: int) -> Params:
    """word2vec's initialization: ``center`` uniform in +-0.5 / dim, ``context`` zero."""
    bound = 0.5 / dim
    center = jax.random.uniform(jax.random.key(seed), (vocab, dim), minval=-bound, maxval=bound)
    return {"center": center, "context": jnp.zeros((vocab, dim))}


def row_loss(params: Params, rows: Params) -> jax.Array:
    """The loss from the rows looked up (the form ``mx_adagrad.value_and_row_grad`` takes).

    ``params`` holds no other parameters here: its tables are ``None``, the model reads ``rows``.
    """
    del params
    return sgns_loss(rows["center"], rows["context"])


def dense_loss(params: Params, centers: jax.Array, contexts: jax.Array) -> jax.Array:
    """The same loss, looking the rows up in the full tables."""
    return sgns_loss(params["center"][centers], params["context"][contexts])


def make_step(opt: mx_adagrad.flat.FusedAdaGrad, sparse: bool) -> Step:
    """The jitted train step ``(params, state, centers, contexts) -> (params, state, loss)``.

    With ``sparse`` the gradients of the tables are RowSparse rows; without it, dense tables.
    """
    row_value_and_grad = mx_adagrad.value_and_row_grad(row_loss, tables=TABLES)
    dense_value_and_grad = jax.value_and_grad(dense_loss)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # tables and history updated in place
    def step(
        params: Params, state: optax.OptState, centers: jax.Array, contexts: jax.Array
    ) -> tuple[Params, optax.OptState, jax.Array]:
        if sparse:  # a RowSparse per table: the rows looked up and their gradients
            ids = {"center": centers, "context": contexts}
            loss, grads = row_value_and_grad(params, ids)
        else:  # a table-sized array per table, zero outside the rows looked up
            loss, grads = dense_value_and_grad(params, centers, contexts)
        params, state = opt.step(params, grads, state)  # tx.update + apply_updates, in one pass
        return params, state, loss

    return step


def train(
    batches: Batches,
    vocab: int,
    dim: int = 256,
    learning_rate: float = 0.1,
    seed: int = 0,
    sparse: bool = True,
) -> Run:
    """Trains the two tables on ``batches`` with ``mx_adagrad.adagrad(learning_rate)``.

    Args:
      batches: the data stream, one step per row.
      vocab: rows of each table.
      dim: columns of each table (the embedding size).
      learning_rate: AdaGrad's learning rate.
      seed: seeds the initial ``center`` table.
      sparse: RowSparse gradients (True) or dense gradients of the full tables (False).

    Returns:
      The :class:`Run`; ``steps_per_second`` times every step after the first (which compiles).
    """
    steps = len(batches.centers)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first one compiles), got {steps}")
    opt = mx_adagrad.flat.fused_adagrad(learning_rate)
    step = make_step(opt, sparse)
    params = init_params(vocab, dim, seed)
    state = opt.init(params)
    params, state, loss = step(params, state, batches.centers[0], batches.contexts[0])
    losses = [jax.block_until_ready(loss)]
    start = time.perf_counter()
    for centers, contexts in zip(batches.centers[1:], batches.contexts[1:]):
        params, state, loss = step(params, state, centers, contexts)
        losses.append(loss)
    jax.block_until_ready((params, state, losses))
    elapsed = time.perf_counter() - start
    return Run(np.asarray(jax.device_get(losses)), (steps - 1) / elapsed, params)


def nearest_neighbours(
    table: jax.Array, words: list[str], queries: Sequence[str], k: int = 5
) -> dict[str, list[str]]:
    """The ``k`` words of highest cosine similarity to each query word found in ``words``."""
    index = {word: i for i, word in enumerate(words)}
    table = np.asarray(table)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    found = {}
    for query in queries:
        if query in index:
            order = np.argsort(-(unit @ unit[index[query]]), kind="stable")
            found[query] = [words[i] for i in order if i != index[query]][:k]
    return found


def main(
    argv: Sequence[str] | None = None, train_fn: Callable[..., Run] = train
) -> dict[str, object]:
    """Parses the flags, trains both paths with ``train_fn`` (this module's :func:`train`, or
    ``examples/flax_embedding.py``'s), prints losses, speeds and neighbours; returns them.

    Returns:
      ``{"losses": {"sparse": ..., "dense": ...}, "steps_per_second": {"sparse": ..., "dense":
      ...}, "max_loss_difference": ..., "vocab": ..., "neighbours": {word: [...]}, "tables":
      {"sparse": ..., "dense": ...}}``.
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
        f"vocabulary {vocab:,} words (--vocab-size {args.vocab_size:,}), tables {vocab:,} x {args.dim}"
    )
    rng = np.random.default_rng(args.seed)
    batches = make_batches(corpus, args.steps, args.batch_size, args.negatives, args.subsample, rng)
    runs = {
        path: train_fn(batches, vocab, args.dim, args.learning_rate, args.seed, path == "sparse")
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
