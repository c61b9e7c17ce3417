"""Sparse embedding steps against torch, side by side: optimizer step with optimizer step, train step
with train step, and each against the bytes it must move.

    python benchmarks/sparse_step.py [--quick] [--json benchmarks/results/sparse_step.json]

Tables of 250,000, 2,000,000 and 10,000,000 rows x 64 float32; 8,192 Zipf-distributed lookups per
step (duplicates included; a pool of batches is cycled, fresh ids on every step). Contenders, in one
process, timed as ``benchmarks/timing.py`` times them (rounds in a random order; a pause, one
untimed step, a block of timed steps; ratios taken within each round):

* optimizer step, given the gradient as a ``RowSparse`` (jitted, table and state donated), in
  both forms of ``mx_adagrad.adagrad``: the one-pass step (``flat.fused_adagrad(...).step``, what
  ``mx_adagrad.flax.Optimizer`` takes) and the optax form (``tx.update`` + ``apply_updates``); the
  one-pass step on the dense gradient of the same lookups, and on tables moved to 2 MB pages
  (``mx_adagrad.sparse.huge_pages``); ``rowwise_adagrad``;
  ``torch.optim.Adagrad.step()`` on the same gradient as a sparse COO tensor;
* train step (lookup, backward, update) of ``loss = sum(tanh(table[ids]) * values)``:
  ``mx_adagrad.value_and_row_grad`` + either form of the update, jitted; torch's
  ``nn.Embedding(sparse=True)`` forward + backward + ``Adagrad.step()``.

The floor of a step is the bytes it must move at this machine's streaming bandwidth (a 256 MB
``numpy.copyto``, measured in the same run): the gradient rows read once, and the weight and
history rows of the distinct ids read and written once. Prints Markdown tables, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import timing  # benchmarks/ is the script's directory, so it is on sys.path

import mx_adagrad

try:
    import torch
except ImportError:
    torch = None

DIM, LOOKUPS, POOL = 64, 8192, 16
SIZES = {"250k": 250_000, "2M": 2_000_000, "10M": 10_000_000}
LR = 0.01
ONE_PASS_OPTIMIZER = "optimizer step: mx_adagrad one pass (fused_adagrad.step)"
OPTAX_OPTIMIZER = "optimizer step: mx_adagrad tx.update + apply_updates"
ONE_PASS_TRAIN = "train step: value_and_row_grad + one-pass step"
OPTAX_TRAIN = "train step: value_and_row_grad + tx.update + apply_updates"
TORCH_OPTIMIZER = "optimizer step: torch Adagrad.step, sparse COO grad"
TORCH_TRAIN = "train step: torch nn.Embedding(sparse=True) + Adagrad"


def zipf_ids(rng: np.random.Generator, rows: int) -> np.ndarray:
    return ((rng.zipf(1.1, LOOKUPS) - 1) % rows).astype(np.int32)


def batches(rows: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (zipf_ids(rng, rows), rng.normal(size=(LOOKUPS, DIM)).astype(np.float32))
        for _ in range(POOL)
    ]


def cycle(items):
    """A function returning the next item on every call, round and round."""
    state = {"i": -1}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def jax_steps(tx, rows: int, pool, one_pass_step=None, huge_pages: bool = False):
    """Optimizer steps and train steps on one shared table and state, in both forms of the step:
    the optax one (``tx.update`` + ``apply_updates``) and, given ``one_pass_step``, that one.
    With ``huge_pages`` the table and its history are moved to 2 MB pages first."""
    table = jnp.zeros((rows, DIM), jnp.float32)
    buffers = {"table": table, "state": tx.init(table)}
    if huge_pages:
        mx_adagrad.sparse.huge_pages(*jax.tree.leaves(buffers))
    device_pool = [(jnp.asarray(ids), jnp.asarray(values)) for ids, values in pool]

    def update(table, state, grad, one_pass):
        if one_pass:
            return one_pass_step(table, grad, state)
        updates, state = tx.update(grad, state, table)
        return mx_adagrad.apply_updates(table, updates), state

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("dense", "one_pass"))
    def optimizer_step(table, state, ids, values, dense=False, one_pass=False):
        grad = mx_adagrad.RowSparse(ids, values, table.shape)
        return update(table, state, grad.todense() if dense else grad, one_pass)

    def loss_fn(params, rows, values):
        del params  # the table is looked up by value_and_row_grad
        return jnp.sum(jnp.tanh(rows["table"]) * values)

    grad_fn = mx_adagrad.value_and_row_grad(loss_fn, tables=["table"])

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="one_pass")
    def train_step(table, state, ids, values, one_pass=False):
        loss, grads = grad_fn({"table": table}, {"table": ids}, values)
        return (*update(table, state, grads["table"], one_pass), loss)

    def runner(kind: str, one_pass: bool = False):
        next_batch = cycle(device_pool)

        def run():
            ids, values = next_batch()
            args = (buffers["table"], buffers["state"], ids, values)
            if kind == "train":
                buffers["table"], buffers["state"], _ = train_step(*args, one_pass=one_pass)
            else:
                buffers["table"], buffers["state"] = optimizer_step(
                    *args, dense=kind == "dense", one_pass=one_pass
                )
            buffers["table"].block_until_ready()

        return run

    compiled = optimizer_step.lower(
        buffers["table"], buffers["state"], *device_pool[0], one_pass=one_pass_step is not None
    ).compile()
    return runner, compiled.memory_analysis()


def torch_steps(rows: int, pool, device: str = "cpu"):
    """torch.optim.Adagrad on a sparse COO gradient, and the nn.Embedding(sparse=True) step."""
    embedding = torch.nn.Embedding(rows, DIM, sparse=True, device=device)
    torch.nn.init.zeros_(embedding.weight)
    optimizer = torch.optim.Adagrad(embedding.parameters(), lr=LR)
    torch_pool = [
        (torch.from_numpy(ids.astype(np.int64)).to(device), torch.from_numpy(v).to(device))
        for ids, v in pool
    ]
    coo = [
        torch.sparse_coo_tensor(ids[None], values, (rows, DIM), check_invariants=False)
        for ids, values in torch_pool
    ]
    done = torch.cuda.synchronize if device == "cuda" else lambda: None

    def optimizer_step():
        next_grad = cycle(coo)

        def run():
            embedding.weight.grad = next_grad()
            optimizer.step()
            done()

        return run

    def train_step():
        next_batch = cycle(torch_pool)

        def run():
            ids, values = next_batch()
            optimizer.zero_grad(set_to_none=True)
            (torch.tanh(embedding(ids)) * values).sum().backward()
            optimizer.step()
            done()

        return run

    return optimizer_step(), train_step()


def streaming_gbps(repeats: int = 10) -> float:
    """This machine's copy bandwidth, GB/s counting bytes read and written (256 MB numpy copy)."""
    src, dst = np.ones(1 << 26, np.float32), np.empty(1 << 26, np.float32)
    np.copyto(dst, src)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        seconds.append(time.perf_counter() - start)
    return 2 * src.nbytes / np.median(seconds) / 1e9


def floor_ms(pool, gbps: float) -> float:
    """The bytes a step must move at ``gbps``: gradient rows read; weight and history rows of the
    distinct ids read and written (median over the pool)."""
    row = DIM * 4
    bytes_ = [LOOKUPS * row + 4 * len(np.unique(ids)) * row for ids, _ in pool]
    return float(np.median(bytes_)) / (gbps * 1e9) * 1e3


def contenders(sizes: dict[str, int], device: str = "cpu"):
    """name -> run (torch on ``device``), and the compiled step's memory per table size."""
    runs, memory = {}, {}
    adagrad = mx_adagrad.flat.fused_adagrad(LR)
    for label, rows in sizes.items():
        pool = batches(rows)
        runner, memory[label] = jax_steps(adagrad.tx, rows, pool, adagrad.step)
        runs[f"{ONE_PASS_OPTIMIZER}, {label}"] = runner("sparse", one_pass=True)
        runs[f"{OPTAX_OPTIMIZER}, {label}"] = runner("sparse")
        runs[f"{ONE_PASS_TRAIN}, {label}"] = runner("train", one_pass=True)
        runs[f"{OPTAX_TRAIN}, {label}"] = runner("train")
        if label == "2M":
            runs[f"optimizer step: mx_adagrad dense gradient, {label}"] = runner(
                "dense", one_pass=True
            )
            runs[f"optimizer step: rowwise_adagrad, tx.update + apply_updates, {label}"] = (
                jax_steps(mx_adagrad.rowwise_adagrad(LR), rows, pool)[0]("sparse")
            )
        if label in ("250k", "10M"):
            runs[f"{ONE_PASS_OPTIMIZER}, huge pages, {label}"] = jax_steps(
                adagrad.tx, rows, pool, adagrad.step, huge_pages=True
            )[0]("sparse", one_pass=True)
        if torch is not None and rows <= 2_000_000:
            optimizer_run, train_run = torch_steps(rows, pool, device)
            runs[f"{TORCH_OPTIMIZER}, {label}"] = optimizer_run
            runs[f"{TORCH_TRAIN}, {label}"] = train_run
    return runs, memory


def measure(
    count: int,
    block: int,
    sizes: dict[str, int] = SIZES,
    device: str = "cpu",
    gbps: float | None = None,
) -> dict:
    """Runs every contender; returns the summary (also used by ``benchmarks/gpu.py``, which
    passes torch's ``device`` and the GPU's copy bandwidth ``gbps``)."""
    runs, memory = contenders(sizes, device)
    gbps = streaming_gbps() if gbps is None else gbps
    results = timing.rounds(runs, count, block)
    stats = timing.summarize(results, None)
    floors = {label: floor_ms(batches(rows), gbps) for label, rows in sizes.items()}
    ratios = {}
    pairs = (
        ("optimizer step, one pass", ONE_PASS_OPTIMIZER, TORCH_OPTIMIZER),
        ("optimizer step, optax form", OPTAX_OPTIMIZER, TORCH_OPTIMIZER),
        ("train step, one pass", ONE_PASS_TRAIN, TORCH_TRAIN),
        ("train step, optax form", OPTAX_TRAIN, TORCH_TRAIN),
    )
    for label in sizes:
        for kind, ours, theirs in pairs:
            if f"{theirs}, {label}" in runs:
                ratios[f"{kind} ÷ torch, {label}"] = timing.paired_ratio(
                    results, f"{ours}, {label}", f"{theirs}, {label}"
                )
    smallest, *_, largest = sizes
    for kind in (ONE_PASS_OPTIMIZER, f"{ONE_PASS_OPTIMIZER}, huge pages", ONE_PASS_TRAIN):
        if f"{kind}, {largest}" in runs and f"{kind}, {smallest}" in runs:
            ratios[f"{kind}, {largest} ÷ {smallest}"] = timing.paired_ratio(
                results, f"{kind}, {largest}", f"{kind}, {smallest}"
            )
    return {
        "stats": stats,
        "ratios": ratios,
        "streaming_gbps": gbps,
        "floor_ms": floors,
        "memory": {
            label: {
                "table_bytes": rows * DIM * 4,
                "argument_bytes": m.argument_size_in_bytes,
                "alias_bytes": m.alias_size_in_bytes,
                "temp_bytes": m.temp_size_in_bytes,
            }
            for (label, rows), m in zip(sizes.items(), memory.values())
        },
    }


def print_report(summary: dict) -> None:
    print(f"copy bandwidth: {summary['streaming_gbps']:.1f} GB/s (read + write)\n")
    print("| step (8,192 Zipf lookups x 64, float32) | ms / step | p10-p90 ms | floor ms |")
    print("|---|---|---|---|")
    for name, s in summary["stats"].items():
        label = name.rsplit(", ", 1)[-1]
        floor = summary["floor_ms"].get(label) if name.startswith(ONE_PASS_OPTIMIZER) else None
        floor_text = f"{floor:.3g}" if floor is not None else ""
        print(
            f"| {name} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}-{s['p90_ms']:.2f} | "
            f"{floor_text} |"
        )
    print("\n| paired ratio (per round) | median | p10-p90 |\n|---|---|---|")
    for name, r in summary["ratios"].items():
        print(f"| {name} | {r['median']:.2f} | {r['p10']:.2f}-{r['p90']:.2f} |")
    print("\n| table | table MB | step arguments MB | updated in place MB | temporaries MB |")
    print("|---|---|---|---|---|")
    for label, m in summary["memory"].items():
        print(
            f"| {label} | {m['table_bytes'] / 1e6:.0f} | {m['argument_bytes'] / 1e6:.0f} | "
            f"{m['alias_bytes'] / 1e6:.0f} | {m['temp_bytes'] / 1e6:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no 10M table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if torch is None:
        print("torch is not installed: its rows are left out")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    sizes = {k: v for k, v in SIZES.items() if not (args.quick and k == "10M")}
    summary = measure(*((4, 3) if args.quick else (20, 5)), sizes=sizes)
    print_report(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary["machine"] = (
            f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s)"
        )
        summary["jax"] = jax.__version__
        summary["torch"] = None if torch is None else torch.__version__
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
