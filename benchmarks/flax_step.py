"""Flax NNX steps through mx_adagrad.flax: the one-pass dense update and the RowSparse train step.

    python benchmarks/flax_step.py [--rounds 30] [--json benchmarks/results/flax_step.json]

Dense: the update step of a 4096 x 4096 ``nnx.Linear`` (16.8M float32 parameters) through
``mx_adagrad.flax.Optimizer(model, flat.fused_adagrad(0.01, wd=1e-4))`` under ``nnx.jit`` with the
model and optimizer donated, the gradients passed in their pure form (``nnx.as_pure``: an argument
holding Variables would be copied back out by ``nnx.jit`` on every call); against
``torch.optim.Adagrad(fused=True)``'s ``step()`` on a ``torch.nn.Linear(4096, 4096)`` with the same
hyperparameters, and ``flat.fused_adagrad``'s step under ``jax.jit`` on the same arrays as a dict
(the same kernel without NNX). Ratios to torch.

Sparse: a whole train step (lookup, loss, gradient, update) of an NNX model with an
``mx_adagrad.flax.Embed`` table of 250,000 or 2,000,000 rows x 32 float32 and a 32-vector, on 4,096
Zipf-distributed lookups (fresh ids each step from a pool of 16 batches, duplicates included):
``mx_adagrad.flax.value_and_grad`` + ``Optimizer(model, mx_adagrad.adagrad(0.01))`` under
``nnx.jit`` (graph mode, Flax's default), the same under ``nnx.cached_partial`` and in tree mode
(``nnx.set_graph_mode(False)``), against the plain-JAX RowSparse step
(``mx_adagrad.value_and_row_grad`` + ``tx.update`` + ``mx_adagrad.apply_updates`` under ``jax.jit``,
donated) and, for scale, the dense NNX step (``nnx.value_and_grad`` + ``nnx.Optimizer``) on the
250k table, and an ``nnx.jit`` call that computes nothing on the 2M step's arguments (what NNX's
own per-call work costs). Ratios: NNX / plain JAX at each size, and NNX 2M / NNX 250k.

Timing: ``benchmarks/timing.py`` (interleaved rounds, each contender a pause, one untimed call and
5 timed calls; ratios paired within each round, then their median and p10-p90 over rounds).
Prints Markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import timing  # benchmarks/ is the script's directory, so it is on sys.path
from flax import nnx

import mx_adagrad
import mx_adagrad.flax as mxf
from mx_adagrad import _native, flat

try:
    import torch
except ImportError:
    torch = None

LR, WD, EPS = 0.01, 1e-4, 1e-6
FEATURES = 4096
DIM, LOOKUPS, POOL = 32, 4096, 16
SIZES = (250_000, 2_000_000)
RESULTS = Path(__file__).with_name("results")
TORCH = "torch.optim.Adagrad(fused=True).step()"
NNX_DENSE = "flax.Optimizer(fused_adagrad).update, nnx.jit"


def block(x) -> None:
    jax.block_until_ready(x)


def dense_contenders() -> dict[str, Callable[[], None]]:
    fused = flat.fused_adagrad(LR, wd=WD, epsilon=EPS)
    model = nnx.Linear(FEATURES, FEATURES, rngs=nnx.Rngs(0))
    optimizer = mxf.Optimizer(model, fused)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), nnx.as_pure(nnx.state(model, nnx.Param)))

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def update(model, optimizer, grads):
        optimizer.update(model, grads)

    def nnx_run() -> None:
        update(model, optimizer, grads)
        block(model.kernel[...])

    params = {"kernel": jnp.full((FEATURES, FEATURES), 0.1), "bias": jnp.zeros(FEATURES)}
    plain_grads = {"kernel": grads["kernel"], "bias": grads["bias"]}
    step = jax.jit(fused.step, donate_argnums=(0, 2))
    buffers = [params, fused.init(params)]

    def plain_run() -> None:
        buffers[0], buffers[1] = step(buffers[0], plain_grads, buffers[1])
        block(buffers)

    contenders = {NNX_DENSE: nnx_run, "flat.fused_adagrad step, jax.jit (no NNX)": plain_run}
    if torch is not None:
        linear = torch.nn.Linear(FEATURES, FEATURES)
        for p in linear.parameters():
            p.grad = torch.full_like(p, 0.5)
        torch_optimizer = torch.optim.Adagrad(
            linear.parameters(), lr=LR, weight_decay=WD, eps=EPS, fused=True
        )
        contenders[TORCH] = torch_optimizer.step
    return contenders


class Recommender(nnx.Module):
    """An Embed table of ``rows`` x DIM and a DIM-vector: ``logit = table[id] . w``."""

    def __init__(self, rows: int, rngs: nnx.Rngs, embed=mxf.Embed):
        self.embed = embed(rows, DIM, rngs=rngs, embedding_init=nnx.initializers.zeros)
        self.w = nnx.Param(jnp.full((DIM,), 0.1))

    def __call__(self, ids):
        return self.embed(ids) @ self.w[...]


def logistic(logits, labels):
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def nnx_loss(model, ids, labels):
    return logistic(model(ids), labels)


def plain_loss(params, rows, labels):
    return logistic(rows["embed"] @ params["w"], labels)


class Stream:
    """The batches of a contender: POOL batches of Zipf ids and labels, cycled."""

    def __init__(self, rows: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.batches = [
            (
                jnp.asarray(((rng.zipf(1.1, LOOKUPS) - 1) % rows).astype(np.int32)),
                jnp.asarray(rng.integers(0, 2, LOOKUPS).astype(np.float32)),
            )
            for _ in range(POOL)
        ]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % POOL
        return self.batches[self.i]


def nnx_sparse_contender(rows: int, form: str) -> Callable[[], None]:
    """``value_and_grad`` + ``Optimizer`` in one of the NNX forms: "nnx.jit", "cached_partial",
    "tree mode"; "dense": ``nnx.value_and_grad`` + ``nnx.Optimizer`` on an ``nnx.Embed``; or
    "no-op": an ``nnx.jit`` call on the same arguments that computes nothing (NNX's own cost)."""
    tx = mx_adagrad.adagrad(LR)
    graph = form != "tree mode"
    with nnx.set_graph_mode(graph):
        if form == "dense":
            model = Recommender(rows, nnx.Rngs(0), embed=nnx.Embed)
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
            grad_fn = nnx.value_and_grad
        else:
            model = Recommender(rows, nnx.Rngs(0))
            optimizer = mxf.Optimizer(model, tx)
            grad_fn = mxf.value_and_grad

        @nnx.jit(donate_argnames=("model", "optimizer"), graph=graph)
        def step(model, optimizer, ids, labels):
            if form == "no-op":
                return labels[0]
            loss, grads = grad_fn(nnx_loss)(model, ids, labels)
            optimizer.update(model, grads)
            return loss

    call = nnx.cached_partial(step, model, optimizer) if form == "cached_partial" else None
    stream = Stream(rows, seed=0)

    def run() -> None:
        if call is not None:
            block(call(*stream.next()))
            return
        with nnx.set_graph_mode(graph):
            block(step(model, optimizer, *stream.next()))

    return run


def plain_sparse_contender(rows: int) -> Callable[[], None]:
    tx = mx_adagrad.adagrad(LR)
    grad_fn = mx_adagrad.value_and_row_grad(plain_loss, tables=["embed"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, ids, labels):
        loss, grads = grad_fn(params, {"embed": ids}, labels)
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state, loss

    params = {"embed": jnp.zeros((rows, DIM)), "w": jnp.full((DIM,), 0.1)}
    buffers = [params, tx.init(params)]
    stream = Stream(rows, seed=0)

    def run() -> None:
        buffers[0], buffers[1], loss = step(buffers[0], buffers[1], *stream.next())
        block(loss)

    return run


def sparse_contenders() -> dict[str, Callable[[], None]]:
    contenders = {}
    for rows in SIZES:
        for form in ("nnx.jit", "cached_partial", "tree mode"):
            contenders[f"NNX sparse, {form}, {rows:,} rows"] = nnx_sparse_contender(rows, form)
        contenders[f"plain JAX RowSparse, {rows:,} rows"] = plain_sparse_contender(rows)
    contenders[f"NNX dense (nnx.Optimizer), {SIZES[0]:,} rows"] = nnx_sparse_contender(
        SIZES[0], "dense"
    )
    contenders[f"nnx.jit no-op on the NNX sparse step's arguments, {SIZES[1]:,} rows"] = (
        nnx_sparse_contender(SIZES[1], "no-op")
    )
    return contenders


def paired(results: list[dict[str, float]], name: str, base: str) -> dict[str, float]:
    """Median and p10/p90 over rounds of ``name / base`` within each round."""
    ratio = np.array([r[name] / r[base] for r in results])
    return {
        "median": float(np.median(ratio)),
        "p10": float(np.percentile(ratio, 10)),
        "p90": float(np.percentile(ratio, 90)),
    }


def show(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.3f} ({ratio['p10']:.2f}-{ratio['p90']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, default=RESULTS / "flax_step.json")
    args = parser.parse_args()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "torch": None if torch is None else torch.__version__,
        "native_kernel": _native.load(),
        "rounds": args.rounds,
    }

    dense = timing.rounds(dense_contenders(), args.rounds)
    stats = timing.summarize(dense, TORCH if torch is not None else None)
    record["dense"] = stats
    print(f"\n### Dense update step, 4096 x 4096 nnx.Linear, {args.rounds} rounds\n")
    print("| contender | median ms | p10 ms | ÷ torch fused: median (p10-p90) |")
    print("|---|---|---|---|")
    for name, s in stats.items():
        ratio = (
            f"{s['ratio_median']:.3f} ({s['ratio_p10']:.2f}-{s['ratio_p90']:.2f})" if torch else ""
        )
        print(f"| {name} | {s['median_ms']:.2f} | {s['p10_ms']:.2f} | {ratio} |")

    sparse = timing.rounds(sparse_contenders(), args.rounds)
    stats = timing.summarize(sparse, None)
    small, large = (f"{rows:,} rows" for rows in SIZES)
    ratios = {}
    for form in ("nnx.jit", "cached_partial", "tree mode"):
        for rows in (small, large):
            name = f"NNX sparse, {form}, {rows}"
            ratios[f"{name} ÷ plain JAX, {rows}"] = paired(
                sparse, name, f"plain JAX RowSparse, {rows}"
            )
        ratios[f"NNX sparse, {form}: {large} ÷ {small}"] = paired(
            sparse, f"NNX sparse, {form}, {large}", f"NNX sparse, {form}, {small}"
        )
    ratios[f"plain JAX RowSparse: {large} ÷ {small}"] = paired(
        sparse, f"plain JAX RowSparse, {large}", f"plain JAX RowSparse, {small}"
    )
    record["sparse"] = {"stats": stats, "paired_ratios": ratios}
    print(f"\n### Sparse train step, {LOOKUPS:,} Zipf lookups x {DIM}, {args.rounds} rounds\n")
    print("| contender | median ms | p10 ms |")
    print("|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['median_ms']:.2f} | {s['p10_ms']:.2f} |")
    print("\n| ratio (paired per round) | median (p10-p90) |")
    print("|---|---|")
    for name, ratio in ratios.items():
        print(f"| {name} | {show(ratio)} |")

    record["load_average_at_end"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min): {record['load_average_at_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
