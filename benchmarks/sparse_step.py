"""Sparse embedding step: cost follows the rows touched, not the table size.

    python benchmarks/sparse_step.py [--json benchmarks/results/sparse_step.json]

Tables of 250,000 and 2,000,000 rows x 64 float32, 8,192 Zipf-distributed lookups per step
(duplicates included, fresh ids every step). Contenders, interleaved in one process with params and
state donated: mx_adagrad with a RowSparse gradient, mx_adagrad with the dense gradient of the same
lookups (the whole table read and written), and torch.optim.Adagrad on an nn.Embedding(sparse=True)
gradient when torch is installed. Prints a Markdown table of median ms/step and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import PAUSE  # benchmarks/ is the script's directory, so it is on sys.path

import mx_adagrad

DIM, LOOKUPS = 64, 8192
STEPS, WARMUP = 30, 5


def zipf_ids(rng: np.random.Generator, rows: int) -> np.ndarray:
    return ((rng.zipf(1.1, LOOKUPS) - 1) % rows).astype(np.int32)


def jax_contender(rows: int, dense: bool):
    tx = mx_adagrad.adagrad(0.01)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(table, state, ids, values):
        grad = mx_adagrad.RowSparse(ids, values, (rows, DIM))
        if dense:
            grad = grad.todense()
        updates, state = tx.update(grad, state, table)
        return mx_adagrad.apply_updates(table, updates), state

    table = jnp.zeros((rows, DIM), jnp.float32)
    buffers = [table, tx.init(table)]

    def run(ids, values):
        buffers[0], buffers[1] = step(buffers[0], buffers[1], ids, values)
        buffers[0].block_until_ready()

    return run


def torch_contender(rows: int):
    import torch

    embedding = torch.nn.Embedding(rows, DIM, sparse=True)
    optimizer = torch.optim.Adagrad(embedding.parameters(), lr=0.01)

    def run(ids, values):
        optimizer.zero_grad(set_to_none=True)
        embedding(torch.from_numpy(np.asarray(ids, np.int64))).backward(torch.from_numpy(values))
        optimizer.step()

    return run


def measure(steps: int = STEPS, pause: float = PAUSE) -> dict[str, list[float]]:
    """Seconds per step of every contender, interleaved in this process (``benchmarks/run.py``
    reuses this)."""
    contenders = {}
    for rows in (250_000, 2_000_000):
        contenders[f"mx_adagrad RowSparse, {rows:,} rows"] = (rows, jax_contender(rows, False))
        contenders[f"mx_adagrad dense grad, {rows:,} rows"] = (rows, jax_contender(rows, True))
    try:
        import torch

        torch.set_num_threads(2)
        for rows in (250_000, 2_000_000):
            contenders[f"torch Adagrad sparse, {rows:,} rows"] = (rows, torch_contender(rows))
    except ImportError:
        print("torch is not installed: torch.optim.Adagrad is left out")

    rng = np.random.default_rng(0)
    times = {name: [] for name in contenders}
    for _ in range(steps):
        values = rng.normal(size=(LOOKUPS, DIM)).astype(np.float32)
        ids = {rows: zipf_ids(rng, rows) for rows in (250_000, 2_000_000)}
        for name, (rows, run) in contenders.items():
            time.sleep(pause)  # let the previous contender's worker threads go idle
            start = time.perf_counter()
            run(ids[rows], values)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    times = measure()
    medians = {name: float(np.median(t[WARMUP:])) * 1e3 for name, t in times.items()}
    small = medians["mx_adagrad RowSparse, 250,000 rows"]
    print(f"| step ({LOOKUPS:,} Zipf lookups x {DIM}) | ms / step | vs RowSparse 250k |")
    print("|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} | {ms / small:.2f} |")
    large = medians["mx_adagrad RowSparse, 2,000,000 rows"]
    dense = medians["mx_adagrad dense grad, 2,000,000 rows"]
    print(
        f"\n2M / 250k RowSparse: {large / small:.2f}x; dense / RowSparse at 2M: {dense / large:.1f}x"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": f"{platform.machine()} {platform.processor()}, {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s)",
            "jax": jax.__version__,
            "median_ms": medians,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
