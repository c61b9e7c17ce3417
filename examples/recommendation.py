"""A DLRM-style click model in Flax NNX: four EmbedBag tables trained with row-wise AdaGrad.

    python examples/recommendation.py --steps 3000 --batch 2048 \
        --out examples/out/recommendation_loss.png

The model is Naumov et al.'s DLRM (2019) in small: each example has 13 dense features and four
sparse ones, each a *bag* of ids looked up in its own table (``mx_adagrad.flax.EmbedBag``: the
pooled rows, torch's ``nn.EmbeddingBag``):

=============  =========  ============  ====  ==============================================
feature        rows       ids per bag   mode  given as
=============  =========  ============  ====  ==============================================
user           1,000,000  1             sum   ``(B, 1)`` int array
history        500,000    1 to 20       mean  :class:`mx_adagrad.Bags` (flat ids, offsets)
category       100,000    1 to 4        sum   ``(B, 4)``, padded with -1
query          200,000    0 to 6        mean  ``(B, 6)``, padded with -1 (empty bags: zeros)
=============  =========  ============  ====  ==============================================

The dense features go through a bottom MLP (13 -> 64 -> 32), the four pooled rows (32 each) and
its output interact by their 10 pairwise dot products (DLRM's dot interaction), and a top MLP
(42 -> 64 -> 1) gives the click logit; the loss is the sigmoid binary cross-entropy.

The data are synthetic, with a planted signal: each table's row ``i`` has a hidden score, ids are
drawn from a Zipf law over a shuffled order of the rows (a few rows are most of the lookups, as in
real click logs), and the click probability is the sigmoid of a mix of the bags' mean hidden
scores, of the dense features and of one product of the two. The loss falls from log 2 as the
tables learn the popular rows; rare rows are seldom seen, so the held-out loss stays above the
planted one.

Training: ``mx_adagrad.flax.value_and_grad`` gives each table's gradient as a
:class:`mx_adagrad.BagGrad` (the bags and ``d loss / d pooled``; no table-sized gradient, no row
per lookup), and ``mx_adagrad.flax.Optimizer(model, mx_adagrad.flat.fused_rowwise_adagrad(...))``
steps every parameter inside an ``nnx.jit`` step with the model and optimizer donated: on the CPU
one native call updates the looked-up rows of all four tables in place, another every dense
parameter. One optimizer updates all the parameters, so they share its rule. Row-wise AdaGrad
(TorchRec's and FBGEMM's default for embedding tables) keeps one history number per row of a
two-axis parameter: 1.8 million numbers for the tables instead of 58 million, and for the MLP
kernels one per input unit, a coarser but adequate preconditioner for layers this small; the
biases (one axis) keep element-wise histories. ``mx_adagrad.flat.fused_adagrad`` (element-wise
everywhere) is a drop-in replacement at 32 times the tables' optimizer memory. The learning rate
warms up linearly over the first 5% of the steps: AdaGrad's first step moves every parameter by
about the learning rate, which would jolt the MLPs.

The script prints the final loss and ROC AUC on the stream's last 16384 training examples and on
16384 held-out ones (and those of the planted probabilities, the best any model can do), and
writes the loss curves (per step, and held-out at intervals) to ``--out`` as a PNG (matplotlib's
Agg renderer, no display). The default run (3000 steps of 2048, 1.8 million table rows) takes
about half a minute on two CPU cores; ``--quick`` shrinks the tables and the run to a few seconds
(the tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from tqdm import trange

import mx_adagrad
import mx_adagrad.flax

DEFAULT_OUT = pathlib.Path(__file__).parent / "out" / "recommendation_loss.png"
DENSE_FEATURES = 13
HELD_OUT = 16384  # examples in the held-out set, and in the training sample evaluated at the end


@dataclasses.dataclass(frozen=True)
class Feature:
    """One sparse feature: its table's ``rows``, ``length`` ids per bag at most (``min_length``
    at least), the pooling ``mode``, and whether its bags come as :class:`mx_adagrad.Bags`."""

    rows: int
    min_length: int
    length: int
    mode: str
    flat: bool = False


FEATURES = {
    "user": Feature(1_000_000, 1, 1, "sum"),
    "history": Feature(500_000, 1, 20, "mean", flat=True),
    "category": Feature(100_000, 1, 4, "sum"),
    "query": Feature(200_000, 0, 6, "mean"),
}
QUICK_ROWS = {"user": 20_000, "history": 10_000, "category": 2_000, "query": 4_000}


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of a run."""

    features: dict[str, Feature]
    dim: int = 32
    bottom: tuple[int, ...] = (64, 32)
    top: tuple[int, ...] = (64,)


class MLP(nnx.Module):
    """Linear layers with ReLU between them (and after the last one when ``final_relu``)."""

    def __init__(self, sizes: Sequence[int], rngs: nnx.Rngs, final_relu: bool = False):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.final_relu = final_relu

    def __call__(self, x: jax.Array) -> jax.Array:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1 or self.final_relu:
                x = jax.nn.relu(x)
        return x


class DLRM(nnx.Module):
    """Bottom MLP on the dense features, one EmbedBag per sparse feature, dot interactions of
    the ``1 + len(features)`` vectors, top MLP to one click logit."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
        dim = config.dim
        self.bottom = MLP((DENSE_FEATURES, *config.bottom[:-1], dim), rngs, final_relu=True)
        self.tables = nnx.Dict(
            {
                name: mx_adagrad.flax.EmbedBag(
                    f.rows, dim, f.mode, rngs=rngs, embedding_init=small_uniform
                )
                for name, f in config.features.items()
            }
        )
        vectors = 1 + len(config.features)
        self.pairs = tuple(tuple(int(i) for i in axis) for axis in np.triu_indices(vectors, k=1))
        self.top = MLP((dim + len(self.pairs[0]), *config.top, 1), rngs)

    def __call__(self, dense: jax.Array, bags: dict[str, jax.Array | mx_adagrad.Bags]):
        """The click logits ``(B,)`` of a batch."""
        bottom = self.bottom(dense)
        pooled = [self.tables[name](bags[name]) for name in self.tables]  # (B, dim) each
        vectors = jnp.stack([bottom, *pooled], axis=1)  # (B, 1 + tables, dim)
        dots = jnp.einsum("bid,bjd->bij", vectors, vectors)
        dots = dots[:, np.array(self.pairs[0]), np.array(self.pairs[1])]  # i < j
        return self.top(jnp.concatenate([bottom, dots], axis=1))[:, 0]


def small_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Tables drawn uniform in +-0.01 (DLRM draws them in +-sqrt(1 / rows)): rows no bag has
    touched yet add little noise to the dot interactions."""
    return jax.random.uniform(key, shape, dtype, -0.01, 0.01)


def bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The mean sigmoid binary cross-entropy."""
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


@nnx.jit(donate_argnames=("model", "optimizer"))  # tables, MLPs and histories updated in place
def train_step(model: DLRM, optimizer: mx_adagrad.flax.Optimizer, dense, bags, labels):
    """One optimizer step on a batch; returns its mean loss."""

    def loss_fn(model: DLRM) -> jax.Array:
        return bce(model(dense, bags), labels)

    loss, grads = mx_adagrad.flax.value_and_grad(loss_fn)(model)  # BagGrad tables
    optimizer.update(model, grads)  # one pass: the looked-up rows of every table, every MLP param
    return loss


@nnx.jit
def predict(model: DLRM, dense, bags) -> jax.Array:
    """The click logits of a batch."""
    return model(dense, bags)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Examples: ``dense`` ``(B, 13)``, ``bags`` per feature, ``labels`` (click: 1) and the
    planted click ``probability`` the labels were drawn from."""

    dense: np.ndarray
    bags: dict[str, np.ndarray | mx_adagrad.Bags]
    labels: np.ndarray
    probability: np.ndarray

    @property
    def inputs(self) -> tuple:
        return self.dense, self.bags, self.labels


class Data:
    """The synthetic click stream: Zipf ids, a hidden score per row, clicks drawn from them."""

    def __init__(self, features: dict[str, Feature], seed: int, zipf: float = 1.1):
        rng = np.random.default_rng(seed)
        self.features = features
        self.rng = np.random.default_rng(seed + 1)
        # Rank r of the Zipf law is row order[r]: popularity unrelated to the row number.
        self.orders = {name: rng.permutation(f.rows) for name, f in features.items()}
        self.cdfs = {
            name: np.cumsum(1 / np.arange(1, f.rows + 1) ** zipf) for name, f in features.items()
        }
        for cdf in self.cdfs.values():
            cdf /= cdf[-1]
        self.scores = {name: rng.normal(size=f.rows) for name, f in features.items()}
        self.mix = {"user": 1.0, "history": 1.5, "category": 1.0, "query": 0.8}
        self.dense_weights = rng.normal(size=DENSE_FEATURES) * 0.4

    def ids(self, name: str, count: int) -> np.ndarray:
        rank = np.searchsorted(self.cdfs[name], self.rng.random(count))
        return self.orders[name][np.minimum(rank, len(self.cdfs[name]) - 1)]

    def batch(self, size: int) -> Batch:
        """``size`` examples."""
        dense = self.rng.normal(size=(size, DENSE_FEATURES)).astype(np.float32)
        logit = dense @ self.dense_weights - 0.5
        bags = {}
        for name, f in self.features.items():
            lengths = self.rng.integers(f.min_length, f.length + 1, size)
            ids = self.ids(name, int(lengths.sum()))
            starts = np.concatenate([[0], np.cumsum(lengths)])
            of_bag = np.repeat(np.arange(size), lengths)
            sums = np.bincount(of_bag, weights=self.scores[name][ids], minlength=size)
            mean = sums / np.maximum(lengths, 1)  # 0 for an empty bag
            logit += self.mix[name] * mean
            if name == "history":  # an interaction the dot products can find
                logit += 0.5 * mean * dense[:, 0]
            if f.flat:
                # Bags of varying length: a fixed total (padded at the end with -1) so that
                # every batch has the shapes of the first and the step compiles once.
                total = size * f.length
                flat_ids = np.full(total, -1, np.int32)
                flat_ids[: len(ids)] = ids
                offsets = starts.astype(np.int32)
                offsets[-1] = total
                bags[name] = mx_adagrad.Bags(jnp.asarray(flat_ids), jnp.asarray(offsets))
            else:
                padded = np.full((size, f.length), -1, np.int32)
                padded[np.arange(f.length) < lengths[:, None]] = ids
                bags[name] = padded
        probability = 1 / (1 + np.exp(-logit))
        labels = (self.rng.random(size) < probability).astype(np.float32)
        return Batch(dense, bags, labels, probability)


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The mean sigmoid binary cross-entropy and the ROC AUC of click logits."""
    loss = float(np.mean(np.logaddexp(0.0, logits) - labels * logits))
    return {"loss": loss, "auc": float(roc_auc_score(labels, logits))}


def evaluate(model: DLRM, batch: Batch) -> dict[str, float]:
    """The mean loss and the ROC AUC of the model's click logits on ``batch``."""
    return scores(np.asarray(predict(model, batch.dense, batch.bags)), batch.labels)


def planted(batch: Batch) -> dict[str, float]:
    """The scores of the planted probabilities: the best a model can do on ``batch``."""
    return scores(np.log(batch.probability) - np.log1p(-batch.probability), batch.labels)


@dataclasses.dataclass(frozen=True)
class Run:
    """What :func:`train` returns: ``losses`` per step (each on its batch before the update),
    the final ``train`` (the last batches of the stream) and ``held_out`` loss and AUC, those of
    the ``planted`` probabilities on the held-out set, the ``held_out_losses`` at
    ``eval_steps``, and the training time in ``seconds``."""

    losses: np.ndarray
    train: dict[str, float]
    held_out: dict[str, float]
    planted: dict[str, float]
    eval_steps: list[int]
    held_out_losses: list[float]
    seconds: float


def train(
    features: dict[str, Feature],
    steps: int,
    batch_size: int,
    learning_rate: float = 0.05,
    seed: int = 0,
) -> Run:
    """Trains a :class:`DLRM` on ``steps`` fresh batches of the synthetic stream.

    Args:
      features: the sparse features (:data:`FEATURES`, or smaller tables).
      steps: optimizer steps, >= 1.
      batch_size: examples per step.
      learning_rate: row-wise AdaGrad's learning rate, for every parameter.
      seed: seeds the data and the initialization.
    """
    data = Data(features, seed)
    held_out = data.batch(HELD_OUT)
    model = DLRM(Config(features), nnx.Rngs(seed))
    # A linear warm-up: AdaGrad's first step moves every parameter by about the learning rate
    # (its gradient divided by its own size), which would jolt the MLPs.
    warmup = optax.linear_schedule(0.0, learning_rate, max(1, steps // 20))
    tx = mx_adagrad.flat.fused_rowwise_adagrad(warmup)
    optimizer = mx_adagrad.flax.Optimizer(model, tx)  # wrt=nnx.Param: the tables and the MLPs

    losses, recent = [], []
    eval_steps, held_out_losses = [0], [evaluate(model, held_out)["loss"]]
    eval_every = max(1, steps // 10)
    start = time.perf_counter()
    progress = trange(1, steps + 1, desc="DLRM", unit="step")
    for step in progress:
        batch = data.batch(batch_size)
        losses.append(train_step(model, optimizer, *batch.inputs))
        recent = [*recent, batch][-max(1, HELD_OUT // batch_size) :]
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            held_out_losses.append(evaluate(model, held_out)["loss"])
            progress.set_postfix(
                loss=f"{float(losses[-1]):.4f}", held_out=f"{held_out_losses[-1]:.4f}"
            )
    losses = np.asarray(jax.device_get(losses))
    seconds = time.perf_counter() - start
    # The training sample: the stream's last batches, which the model has just been fitted to.
    sample = Batch(
        np.concatenate([b.dense for b in recent]),
        {name: _concatenate([b.bags[name] for b in recent]) for name in features},
        np.concatenate([b.labels for b in recent]),
        np.concatenate([b.probability for b in recent]),
    )
    return Run(
        losses,
        evaluate(model, sample),
        evaluate(model, held_out),
        planted(held_out),
        eval_steps,
        held_out_losses,
        seconds,
    )


def plot(run: Run, out: pathlib.Path) -> None:
    """Writes the per-step training loss, its moving average and the held-out loss to ``out``."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(1, len(run.losses) + 1)
    ax.plot(steps, run.losses, lw=0.5, alpha=0.4, label="train (batch, before its step)")
    window = max(1, len(run.losses) // 30)
    smooth = np.convolve(run.losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"train ({window}-step mean)")
    ax.plot(run.eval_steps, run.held_out_losses, marker="o", label="held-out")
    ax.axhline(np.log(2), color="gray", ls=":", lw=1, label="log 2 (no signal)")
    ax.axhline(run.planted["loss"], color="black", ls="--", lw=1, label="planted probabilities")
    low = min(run.planted["loss"], float(np.min(run.losses)))
    ax.set(xlabel="step", ylabel="binary cross-entropy", ylim=(low - 0.05, np.log(2) + 0.1))
    ax.set_title("DLRM with four EmbedBag tables, mx_adagrad.flat.fused_rowwise_adagrad")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default 3000 (--quick: 80)")
    parser.add_argument("--batch", type=int, default=None, help="default 2048 (--quick: 256)")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--quick", action="store_true", help="small tables and a short run (for tests)"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (80 if args.quick else 3000)
    args.batch = args.batch or (256 if args.quick else 2048)
    if args.steps < 1 or args.batch < 2:
        parser.error(f"--steps must be >= 1 and --batch >= 2, got {args.steps}, {args.batch}")
    return args


def main(argv: Sequence[str] | None = None) -> Run:
    """Parses the flags, trains, prints the final losses and AUCs, writes the loss curves."""
    args = parse_args(argv)
    features = FEATURES
    if args.quick:
        features = {n: dataclasses.replace(f, rows=QUICK_ROWS[n]) for n, f in FEATURES.items()}
    run = train(features, args.steps, args.batch, args.learning_rate, args.seed)
    plot(run, args.out)
    rows = sum(f.rows for f in features.values())
    print(
        f"trained {args.steps} steps of {args.batch} examples, {rows:,} table rows, in "
        f"{run.seconds:.1f} s"
    )
    for name, result in (("train", run.train), ("held-out", run.held_out)):
        print(f"final {name:8} loss {result['loss']:.4f}  AUC {result['auc']:.4f}")
    print(
        f"planted probabilities on the held-out set: loss {run.planted['loss']:.4f}  "
        f"AUC {run.planted['auc']:.4f}"
    )
    print(f"loss curves written to {args.out}")
    return run


def _concatenate(parts: list) -> np.ndarray | mx_adagrad.Bags:
    """Batches' bags of one feature as one: arrays stacked, Bags' ids and offsets joined."""
    if not isinstance(parts[0], mx_adagrad.Bags):
        return np.concatenate(parts)
    ids = jnp.concatenate([p.ids for p in parts])
    starts = np.cumsum([0, *(p.ids.shape[0] for p in parts)])
    offsets = [p.offsets[:-1] + s for p, s in zip(parts, starts)]
    return mx_adagrad.Bags(ids, jnp.concatenate([*offsets, jnp.asarray([starts[-1]])]))


if __name__ == "__main__":
    main()
