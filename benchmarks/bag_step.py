"""Embedding-bag train steps against FBGEMM's CPU table-batched embeddings and torch, side by side.

    python benchmarks/bag_step.py [--quick] [--rounds N] [--json benchmarks/results/bag_step.json]

Workloads (float32 tables, initialized uniform(-0.01, 0.01); every step a fresh batch of 2,048
bags x 20 ids per table from a pool of pre-generated batches, ids ``min(Zipf(1.2) - 1, rows - 1)``;
SUM pooling; ``loss = mean(tanh(concat of pooled) @ v)`` with a fixed, untrained vector ``v``;
lr 0.01, eps 1e-6):

1. one table 2,000,000 x 64;
2. one table 1,000,000 x 128;
3. eight tables of 250,000 x 64;
4. one table 1,000,000 x 64 unpooled: 2,048 x 20 lookups of one row each, ``loss = mean(tanh(rows)
   @ v)`` over the ``(N, dim)`` rows.

Contenders, for row-wise and element-wise AdaGrad (torch: element-wise only, it has no row-wise
AdaGrad), each on its own tables:

* FBGEMM: ``SplitTableBatchedEmbeddingBagsCodegen`` (``EXACT_ROWWISE_ADAGRAD`` /
  ``EXACT_ADAGRAD``, host tables, ``PoolingMode.SUM``, ``NONE`` for workload 4): ``out =
  tbe(ids, offsets)`` (table-major int64 ids), the loss, ``loss.backward()`` (which updates the
  tables in place);
* mx_adagrad: ``value_and_bag_grad(loss_fn, tables, mode="sum")`` (workload 4:
  ``value_and_row_grad``) + the one-pass step (``flat.fused_rowwise_adagrad(...).step`` /
  ``flat.fused_adagrad(...).step``), jitted with params and optimizer state donated, bags as
  ``{path: int32 (2048, 20)}``, blocking on the loss;
* torch: ``nn.EmbeddingBag(mode="sum", sparse=True)`` per table (workload 4:
  ``nn.Embedding(sparse=True)``) + ``torch.optim.Adagrad``: forward, backward, step, zero_grad.

torch runs on 2 threads. Every contender takes a few untimed steps first (a whole cycle of the
pool, so no first touch of a page is timed). Timing is ``benchmarks/timing.py``'s: rounds in a
random order, a pause, one untimed step, a block of timed steps; ratios are paired per round.
Workloads run one after the other (each its own rounds, its buffers freed after it).

Where FBGEMM runs, the first steps double as a check: from the same initial tables and the same
batches, mx_adagrad's tables after a few steps are compared with FBGEMM's (and torch's, for
element-wise): the max absolute difference is printed and recorded.

The floor of a step is the bytes it must move at this machine's streaming bandwidth (a 256 MB
``numpy.copyto``, measured before each workload): the ids read once (4 B each); each distinct
touched row's weight read and written (``2 * dim * 4`` B) and history read and written (row-wise
``2 * 4`` B, element-wise ``2 * dim * 4`` B); the looked-up rows read in the forward (``N * dim * 4``
B for the N ids, every lookup counted: the "floor"; counting each distinct row once, as if repeats
hit the cache: the "cached floor"); the pooled output and its gradient (``2 * out_rows * dim * 4``
B, ``out_rows = B * T``, or ``N`` unpooled). Also recorded: the compiled mx step's
``memory_analysis().temp_size_in_bytes`` next to ``N * dim * 4``. Prints Markdown tables, writes
JSON.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import timing  # benchmarks/ is the script's directory, so it is on sys.path
from sparse_step import cycle, streaming_gbps

import mx_adagrad
from mx_adagrad import flat

try:
    import torch
except ImportError:
    torch = None

LR, EPS = 0.01, 1e-6
BAGS, LENGTH, ZIPF = 2048, 20, 1.2
POOL = 8  # batches per workload, cycled
CHECK_STEPS = 3  # steps from the same tables before the tables are compared
CHECK_TOLERANCE = 1e-5  # max abs difference of the tables allowed after CHECK_STEPS
OPTIMIZERS = ("row-wise", "element-wise")
# The project's targets: mx / FBGEMM of the same optimizer, median of the per-round ratios.
TARGETS = {
    "pooled": {"row-wise": 0.8, "element-wise": 0.6},
    "unpooled": {"row-wise": 0.25, "element-wise": 0.25},
}


class Workload(NamedTuple):
    label: str
    tables: int
    rows: int
    dim: int
    pooled: bool


WORKLOADS = (
    Workload("1: 2M x 64", 1, 2_000_000, 64, True),
    Workload("2: 1M x 128", 1, 1_000_000, 128, True),
    Workload("3: 8 x 250k x 64", 8, 250_000, 64, True),
    Workload("4: 1M x 64 unpooled", 1, 1_000_000, 64, False),
)
QUICK_SCALE = 20  # --quick: tables of rows / QUICK_SCALE


def fbgemm_module():
    """FBGEMM's training TBE class and its enums, or the reason it cannot be imported."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            SplitTableBatchedEmbeddingBagsCodegen,
        )
        from fbgemm_gpu.tbe.config import (
            BoundsCheckMode,
            ComputeDevice,
            EmbeddingLocation,
            PoolingMode,
            WeightDecayMode,
        )
    except Exception as error:  # ImportError, or OSError from its native libraries
        return None, f"{type(error).__name__}: {error}"
    return (
        SplitTableBatchedEmbeddingBagsCodegen,
        EmbOptimType,
        BoundsCheckMode,
        ComputeDevice,
        EmbeddingLocation,
        PoolingMode,
        WeightDecayMode,
    ), None


def names(w: Workload) -> list[str]:
    return [f"t{k}" for k in range(w.tables)]


def batches(w: Workload, seed: int = 0) -> list[np.ndarray]:
    """POOL batches, each int32 ``(T, B, L)``: ``min(Zipf(1.2) - 1, rows - 1)``."""
    rng = np.random.default_rng(seed)
    shape = (w.tables, BAGS, LENGTH)
    return [np.minimum(rng.zipf(ZIPF, shape) - 1, w.rows - 1).astype(np.int32) for _ in range(POOL)]


def initial_tables(w: Workload, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-0.01, 0.01, size=(w.rows, w.dim)).astype(np.float32) for k in names(w)}


def loss_vector(w: Workload) -> np.ndarray:
    width = w.tables * w.dim if w.pooled else w.dim
    return np.random.default_rng(2).normal(size=width).astype(np.float32)


# mx_adagrad


class MxContender(NamedTuple):
    run: object  # () -> None, one step
    tables: object  # () -> {path: jax array}, the current tables
    memory: dict


def mx_contender(w: Workload, optimizer: str, init, pool, v) -> MxContender:
    paths = names(w)
    fused = flat.fused_rowwise_adagrad if optimizer == "row-wise" else flat.fused_adagrad
    opt = fused(LR, EPS)
    # A copy made by XLA: a buffer of its own (device_put may alias the numpy array), donated.
    params = {k: jnp.asarray(init[k]).copy() for k in paths}
    buffers = {"params": params, "state": opt.init(params)}
    device_pool = [{k: jnp.asarray(batch[t]) for t, k in enumerate(paths)} for batch in pool]
    v = jnp.asarray(v)

    if w.pooled:

        def loss_fn(_, pooled, v):
            return jnp.mean(jnp.tanh(jnp.concatenate([pooled[k] for k in paths], axis=1)) @ v)

        grad_fn = mx_adagrad.value_and_bag_grad(loss_fn, tables=paths, mode="sum")
    else:

        def loss_fn(_, rows, v):
            return jnp.mean(jnp.tanh(rows[paths[0]].reshape(-1, w.dim)) @ v)

        grad_fn = mx_adagrad.value_and_row_grad(loss_fn, tables=paths)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, bags, v):
        loss, grads = grad_fn(params, bags, v)
        params, state = opt.step(params, grads, state)
        return params, state, loss

    compiled = train_step.lower(buffers["params"], buffers["state"], device_pool[0], v).compile()
    m = compiled.memory_analysis()
    lookups = w.tables * BAGS * LENGTH
    memory = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "lookup_rows_bytes": lookups * w.dim * 4,
        "temp_over_lookup_rows": m.temp_size_in_bytes / (lookups * w.dim * 4),
        "argument_bytes": int(m.argument_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }
    next_batch = cycle(device_pool)

    def run():
        buffers["params"], buffers["state"], loss = compiled(
            buffers["params"], buffers["state"], next_batch(), v
        )
        loss.block_until_ready()

    return MxContender(run, lambda: buffers["params"], memory)


# FBGEMM


def offsets_of(w: Workload) -> np.ndarray:
    return np.arange(0, w.tables * BAGS * LENGTH + 1, LENGTH, dtype=np.int64)


def fbgemm_contender(w: Workload, optimizer: str, fbgemm, init, pool, v):
    """``(run, tables)``: one step of FBGEMM's TBE, and its tables (views of its weights)."""
    tbe_class, optim, bounds, device, location, pooling, decay = fbgemm
    tbe = tbe_class(
        embedding_specs=[(w.rows, w.dim, location.HOST, device.CPU)] * w.tables,
        optimizer=(optim.EXACT_ROWWISE_ADAGRAD if optimizer == "row-wise" else optim.EXACT_ADAGRAD),
        learning_rate=LR,
        eps=EPS,
        weight_decay=0.0,
        weight_decay_mode=decay.NONE,
        pooling_mode=pooling.SUM if w.pooled else pooling.NONE,
        bounds_check_mode=bounds.NONE,
        device="cpu",
    )
    with torch.no_grad():
        for weight, k in zip(tbe.split_embedding_weights(), names(w)):
            weight.copy_(torch.from_numpy(init[k]))
    offsets = torch.from_numpy(offsets_of(w))
    torch_pool = [torch.from_numpy(batch.reshape(-1).astype(np.int64)) for batch in pool]
    v = torch.from_numpy(v)
    next_batch = cycle(torch_pool)

    if w.pooled:

        def run():
            out = tbe(next_batch(), offsets)  # (B, T * dim)
            loss = (torch.tanh(out) @ v).mean()
            loss.backward()

    else:

        def run():
            out = tbe(next_batch(), offsets)  # (N, dim)
            loss = (torch.tanh(out) @ v).mean()
            loss.backward()

    def tables():
        return dict(zip(names(w), tbe.split_embedding_weights()))

    return run, tables


# torch


def torch_contender(w: Workload, init, pool, v):
    """``(run, tables)``: nn.EmbeddingBag (nn.Embedding unpooled) + torch.optim.Adagrad."""
    if w.pooled:
        modules = [torch.nn.EmbeddingBag(w.rows, w.dim, mode="sum", sparse=True) for _ in names(w)]
    else:
        modules = [torch.nn.Embedding(w.rows, w.dim, sparse=True)]
    with torch.no_grad():
        for module, k in zip(modules, names(w)):
            module.weight.copy_(torch.from_numpy(init[k]))
    optimizer = torch.optim.Adagrad(
        [m.weight for m in modules], lr=LR, eps=EPS, initial_accumulator_value=0.0
    )
    torch_pool = [torch.from_numpy(batch.astype(np.int64)) for batch in pool]  # (T, B, L)
    v = torch.from_numpy(v)
    next_batch = cycle(torch_pool)

    def run():
        batch = next_batch()
        if w.pooled:
            out = torch.cat([m(batch[t]) for t, m in enumerate(modules)], dim=1)
        else:
            out = modules[0](batch[0]).reshape(-1, w.dim)
        loss = (torch.tanh(out) @ v).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def tables():
        return {k: m.weight.detach() for k, m in zip(names(w), modules)}

    return run, tables


# Bytes and checks


def floor_bytes(w: Workload, pool) -> dict:
    """The bytes a step must move, per optimizer (median over the pool's batches)."""
    lookups = w.tables * BAGS * LENGTH
    distinct = float(np.median([sum(np.unique(t).size for t in batch) for batch in pool]))
    row = w.dim * 4
    out_rows = w.tables * BAGS if w.pooled else lookups
    out = {"lookups": lookups, "distinct_rows": distinct}
    for optimizer in OPTIMIZERS:
        history = 2 * 4 if optimizer == "row-wise" else 2 * row
        common = lookups * 4 + distinct * (2 * row + history) + 2 * out_rows * row
        out[optimizer] = {"bytes": common + lookups * row, "cached_bytes": common + distinct * row}
    return out


def max_abs_difference(ours: dict, theirs: dict) -> float:
    """The max over tables of ``max |ours - theirs|`` (ours: jax arrays; theirs: numpy arrays or
    torch tensors). Computed by XLA, from a zero-copy view of theirs: no view of ours is made (a
    live view would keep XLA from updating our tables in place)."""

    def host(x):
        return x.detach().numpy() if torch is not None and isinstance(x, torch.Tensor) else x

    return max(float(jnp.max(jnp.abs(ours[k] - jnp.asarray(host(theirs[k]))))) for k in ours)


# The run


def workload_contenders(w: Workload, fbgemm) -> tuple[dict, dict, dict]:
    """name -> run, the compiled mx steps' memory, and the table checks (run as warm-up)."""
    pool, init, v = batches(w), initial_tables(w), loss_vector(w)
    runs, tables, memory = {}, {}, {}
    for optimizer in OPTIMIZERS:
        mx = mx_contender(w, optimizer, init, pool, v)
        runs[f"mx {optimizer}"], tables[f"mx {optimizer}"] = mx.run, mx.tables
        memory[optimizer] = mx.memory
        if fbgemm is not None:
            name = f"FBGEMM {optimizer}"
            runs[name], tables[name] = fbgemm_contender(w, optimizer, fbgemm, init, pool, v)
    if torch is not None:
        runs["torch element-wise"], tables["torch element-wise"] = torch_contender(w, init, pool, v)
    for run in runs.values():  # every contender's first steps: the same batches, from one table
        for _ in range(CHECK_STEPS):
            run()
    # How far the steps moved mx's tables (the comparisons below mean something only if they did).
    checks = {
        f"{ours} moved": max_abs_difference(tables[ours](), init)
        for ours in tables
        if ours.startswith("mx ")
    }
    del init
    for theirs in ("FBGEMM row-wise", "FBGEMM element-wise", "torch element-wise"):
        if theirs in runs:
            ours = "mx " + theirs.split(" ", 1)[1]
            checks[f"{ours} vs {theirs}"] = max_abs_difference(tables[ours](), tables[theirs]())
    for run in runs.values():  # the rest of the pool: every page the steps touch is touched
        for _ in range(POOL):
            run()
    return runs, memory, checks


def measure_workload(w: Workload, fbgemm, count: int, block: int) -> dict:
    started = time.perf_counter()
    runs, memory, checks = workload_contenders(w, fbgemm)
    gbps = streaming_gbps()
    results = timing.rounds(runs, count, block)
    stats = timing.summarize(results, None)
    ratios = {}
    for optimizer in OPTIMIZERS:
        if f"FBGEMM {optimizer}" in runs:
            ratios[f"mx/FBGEMM {optimizer}"] = timing.paired_ratio(
                results, f"mx {optimizer}", f"FBGEMM {optimizer}"
            )
    if "torch element-wise" in runs:
        ratios["mx/torch element-wise"] = timing.paired_ratio(
            results, "mx element-wise", "torch element-wise"
        )
    bytes_ = floor_bytes(w, batches(w))
    floor = {
        optimizer: {
            **bytes_[optimizer],
            "ms": bytes_[optimizer]["bytes"] / (gbps * 1e9) * 1e3,
            "cached_ms": bytes_[optimizer]["cached_bytes"] / (gbps * 1e9) * 1e3,
        }
        for optimizer in OPTIMIZERS
    }
    targets = TARGETS["pooled" if w.pooled else "unpooled"]
    del runs
    gc.collect()
    return {
        "tables": w.tables,
        "rows": w.rows,
        "dim": w.dim,
        "pooling": "sum" if w.pooled else "none",
        "bags": BAGS,
        "ids_per_bag": LENGTH,
        "lookups": bytes_["lookups"],
        "distinct_rows": bytes_["distinct_rows"],
        "streaming_gbps": gbps,
        "stats": stats,
        "rounds_ms": {name: [r[name] * 1e3 for r in results] for name in results[0]},
        "ratios": ratios,
        "targets": {f"mx/FBGEMM {o}": t for o, t in targets.items()},
        "met": {
            f"mx/FBGEMM {o}": ratios[f"mx/FBGEMM {o}"]["median"] <= t
            for o, t in targets.items()
            if f"mx/FBGEMM {o}" in ratios
        },
        "floor": floor,
        "memory": memory,
        "checks": checks,
        "seconds": time.perf_counter() - started,
    }


def print_workload(label: str, r: dict) -> None:
    stats, ratios = r["stats"], r["ratios"]

    def ms(name):
        s = stats.get(name)
        return f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}-{s['p90_ms']:.2f})" if s else "-"

    def ratio(name):
        q = ratios.get(name)
        return f"{q['median']:.2f} ({q['p10']:.2f}-{q['p90']:.2f})" if q else "-"

    print(
        f"\n### {label}: {r['tables']} x {r['rows']:,} x {r['dim']}, {r['pooling']} pooling, "
        f"{r['lookups']:,} ids, {r['distinct_rows']:,.0f} distinct rows (median), "
        f"copy bandwidth {r['streaming_gbps']:.1f} GB/s\n"
    )
    print(
        "| optimizer | FBGEMM ms (p10-p90) | mx ms (p10-p90) | torch ms (p10-p90) | mx/FBGEMM "
        "| target | mx/torch | floor MB / ms | cached floor MB / ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for o in OPTIMIZERS:
        key = f"mx/FBGEMM {o}"
        target = r["targets"][key]
        met = r["met"].get(key)
        verdict = "" if met is None else (" met" if met else " MISSED")
        f = r["floor"][o]
        print(
            f"| {o} | {ms(f'FBGEMM {o}')} | {ms(f'mx {o}')} | "
            f"{ms('torch element-wise') if o == 'element-wise' else '-'} | {ratio(key)} | "
            f"<= {target}{verdict} | {ratio('mx/torch element-wise') if o == 'element-wise' else '-'} "
            f"| {f['bytes'] / 1e6:.1f} / {f['ms']:.2f} | {f['cached_bytes'] / 1e6:.1f} / "
            f"{f['cached_ms']:.2f} |"
        )
    print("\n| mx compiled step | temp MB | N * dim * 4 MB | temp / (N * dim * 4) | aliased MB |")
    print("|---|---|---|---|---|")
    for o, m in r["memory"].items():
        print(
            f"| {o} | {m['temp_bytes'] / 1e6:.2f} | {m['lookup_rows_bytes'] / 1e6:.2f} | "
            f"{m['temp_over_lookup_rows']:.3f} | {m['alias_bytes'] / 1e6:.1f} |"
        )
    if r["checks"]:
        print(f"\nTables after {CHECK_STEPS} steps from the same tables and batches:")
        for name, diff in r["checks"].items():
            if name.endswith(" moved"):
                print(f"- {name}: max |after - before| = {diff:.3g}")
                continue
            ok = "ok" if diff <= CHECK_TOLERANCE else f"EXCEEDS {CHECK_TOLERANCE:g}"
            print(f"- {name}: max |difference| = {diff:.3g} ({ok})")


def versions() -> dict:
    import jaxlib

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": None if torch is None else torch.__version__,
        "fbgemm_gpu": None,
    }
    try:
        import fbgemm_gpu

        out["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "unknown")
    except Exception:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"2 rounds, tables of rows / {QUICK_SCALE}"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 20, quick 2)")
    parser.add_argument("--block", type=int, default=None, help="timed steps per round (5)")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "bag_step.json"
    )
    args = parser.parse_args()
    started, load_at_start = time.perf_counter(), os.getloadavg()
    count = args.rounds or (2 if args.quick else 20)
    block = args.block or (2 if args.quick else 5)
    fbgemm, skipped = (None, "torch is not installed") if torch is None else fbgemm_module()
    if torch is None:
        print("torch is not installed: the torch and FBGEMM contenders are left out")
    else:
        torch.set_num_threads(2)
        # torch's Adagrad.step makes a sparse tensor without checking its invariants, and says so.
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        if fbgemm is None:
            print(f"fbgemm_gpu cannot be imported, the FBGEMM contenders are left out: {skipped}")
    workloads = [w._replace(rows=w.rows // QUICK_SCALE) if args.quick else w for w in WORKLOADS]
    print(
        f"{BAGS} bags x {LENGTH} ids per table per step, Zipf({ZIPF}), float32, lr {LR}, "
        f"eps {EPS}; {count} rounds of {block} steps; torch threads "
        f"{torch.get_num_threads() if torch is not None else '-'}"
    )
    results = {}
    for w in workloads:
        results[w.label] = measure_workload(w, fbgemm, count, block)
        print_workload(w.label, results[w.label])
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "rounds": count,
        "block": block,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "jax_devices": f"{jax.device_count()} {jax.devices()[0].platform}",
        },
        "versions": versions(),
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "fbgemm_skipped": skipped,
        "check_steps": CHECK_STEPS,
        "check_tolerance": CHECK_TOLERANCE,
        "workloads": results,
        "seconds": time.perf_counter() - started,
    }
    print(f"\n{record['seconds']:.0f} s in all")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
