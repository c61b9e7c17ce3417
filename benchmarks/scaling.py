"""Scaling out: optimizer steps per second on 1, 2, 4 and 8 CPU devices, dense and sparse.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--rounds 3] [--json FILE]

The CPU device count is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_count``),
so each count runs in its own process, one after the other, in ``--rounds`` rounds over the
counts. Workloads, each a ``jax.jit``-compiled step with params and optimizer state donated, on a
1-D mesh of all the process's devices:

* dense, sharded: a 16M-parameter float32 tree (4 matrices) whose params, history and gradients are
  split by rows over the devices (``NamedSharding``); ``mx_adagrad.adagrad(wd=1e-4)``, which
  compiles to no collective: each device updates its 1/N of the parameters;
* dense, data-parallel: the same tree replicated on every device, one gradient per device (its
  slice of the batch) averaged over the devices (an all-reduce), then the same update on every
  replica: each device updates all 16M parameters;
* sparse, row-sharded: a 2,000,000 x 64 float32 table and its history split by rows, 8,192
  Zipf-distributed lookups per step (duplicates included), ``mx_adagrad.sharding.
  sharded_row_update``: each device updates the looked-up rows it holds.

A round's figure is the inverse of its median step time; the table shows each count's best round
(other load on a shared machine only ever slows a round down) and the JSON keeps every round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad
from mx_adagrad.sharding import sharded_row_update

DENSE_SHAPES = {"w1": (4096, 2048), "w2": (2048, 2048), "w3": (2048, 1024), "w4": (1024, 2048)}
ROWS, DIM, LOOKUPS = 2_000_000, 64, 8192
WARMUP, STEPS = 3, 15
WORKLOADS = ("dense, sharded", "dense, data-parallel", "sparse, row-sharded")


def median_seconds(run, steps: int = STEPS, warmup: int = WARMUP) -> float:
    """The median wall time of ``run(i)`` over ``steps`` calls, after ``warmup`` calls."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))


def dense_sharded(mesh) -> float:
    """Seconds per step: params, history and gradients split by rows over the mesh."""
    tx = mx_adagrad.adagrad(0.01, wd=1e-4)
    split = NamedSharding(mesh, P("x"))
    params = {k: jax.device_put(jnp.ones(s), split) for k, s in DENSE_SHAPES.items()}
    grads = {k: jax.device_put(jnp.full(s, 0.5), split) for k, s in DENSE_SHAPES.items()}
    buffers = [params, tx.init(params)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    def run(_):
        buffers[:] = step(*buffers, grads)
        jax.block_until_ready(buffers)

    return median_seconds(run)


def dense_data_parallel(mesh) -> float:
    """Seconds per step: replicated params, per-device gradients averaged, then the update."""
    tx = mx_adagrad.adagrad(0.01, wd=1e-4)
    devices = mesh.size
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))
    params = {k: jax.device_put(jnp.ones(s), replicated) for k, s in DENSE_SHAPES.items()}
    # Device d holds local_grads[k][d], the gradient of its slice of the batch.
    local_grads = {
        k: jax.device_put(jnp.full((devices, *s), 0.5), split) for k, s in DENSE_SHAPES.items()
    }
    buffers = [params, tx.init(params)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, local_grads):
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), local_grads)  # the all-reduce
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    def run(_):
        buffers[:] = step(*buffers, local_grads)
        jax.block_until_ready(buffers)

    return median_seconds(run)


def sparse_row_sharded(mesh) -> float:
    """Seconds per step: a table split by rows, 8,192 Zipf lookups through sharded_row_update."""
    tx = mx_adagrad.adagrad(0.01)
    table = jax.device_put(jnp.zeros((ROWS, DIM)), NamedSharding(mesh, P("x")))
    buffers = [table, tx.init(table)]
    step = jax.jit(sharded_row_update(tx, mesh, "x"), donate_argnums=(0, 1))
    rng, replicated = np.random.default_rng(0), NamedSharding(mesh, P())
    batches = [  # placed before timing: a step's cost, not the host-to-device copy
        jax.device_put(
            (
                ((rng.zipf(1.1, LOOKUPS) - 1) % ROWS).astype(np.int32),
                rng.normal(size=(LOOKUPS, DIM)).astype(np.float32),
            ),
            replicated,
        )
        for _ in range(4)
    ]

    def run(i):
        buffers[:] = step(*buffers, *batches[i % len(batches)])
        jax.block_until_ready(buffers)

    return median_seconds(run)


def worker() -> None:
    """Runs the workloads on all this process's devices; prints one JSON line."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    seconds = {}
    for name, workload in zip(WORKLOADS, (dense_sharded, dense_data_parallel, sparse_row_sharded)):
        seconds[name] = workload(mesh)
    print(json.dumps({"devices": jax.device_count(), "jax": jax.__version__, "seconds": seconds}))


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the number of cores."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    return f"{model}, {os.cpu_count()} cores"


def run_count(devices: int) -> dict:
    """One device count, in a fresh process with the XLA flag set."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    child = subprocess.run(
        [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, check=False
    )
    if child.returncode != 0:
        raise RuntimeError(f"{devices} devices: exit {child.returncode}\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return

    load_before = os.getloadavg()
    # Rounds over the counts in turn, so that other load on the machine spreads over all counts.
    rounds = [[run_count(devices) for devices in args.devices] for _ in range(args.rounds)]
    load_after = os.getloadavg()
    rates = {  # steps/s of each round, per device count and workload
        devices: {w: [1 / r[i]["seconds"][w] for r in rounds] for w in WORKLOADS}
        for i, devices in enumerate(args.devices)
    }
    best = {devices: {w: max(rates[devices][w]) for w in WORKLOADS} for devices in args.devices}
    base = best[args.devices[0]]
    print(f"Best of {args.rounds} rounds, steps/s (vs {args.devices[0]} device):\n")
    print("| CPU devices | " + " | ".join(WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for devices in args.devices:
        cells = [f"{best[devices][w]:.1f} ({best[devices][w] / base[w]:.2f}x)" for w in WORKLOADS]
        print(f"| {devices} | " + " | ".join(cells) + " |")
    print(f"\nload average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "jax": rounds[0][0]["jax"],
            "steps_timed": STEPS,
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "best_steps_per_second": {str(d): best[d] for d in args.devices},
            "rounds_steps_per_second": {str(d): rates[d] for d in args.devices},
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
