"""Sharded embeddings on paper: collective bytes per device per step of each layout.

    python benchmarks/sharded_bags.py [--bags 2048] [--length 20] [--dim 64] [--json FILE]

Each layout's train step (a ``tanh`` head on the pooled bags, ``fused_rowwise_adagrad``, params
and state donated, the batch split over the devices: ``b`` bags of ``L`` ids per device, float32)
is compiled on 8 forced host CPU devices, and the bytes of its collectives are read from the HLO
(``tests/eight_devices.collective_bytes``: operand bytes of reduce-scatters, result bytes of the
others); the same formulas, checked against the compiled figures at k = 8, give k = 64 and 512.
Nothing is timed. The layouts:

* replicated: ``sharding.sharded_row_lookup`` / ``sharded_row_update``, the step of that module's
  older docstring: the looked-up rows of the global batch are psummed to every device, and the
  head runs on all ``B = k * b`` bags everywhere;
* row-wise: ``sharding.value_and_bag_grad(layout="row")`` + ``sharded_step``: ids gathered,
  owners pool, ``psum_scatter`` of ``(B, D)`` partial bags, bag gradients gathered to the owners;
* table-wise: ``layout="table"``, one table per device here (T = k): ids and pooled bags
  exchanged by all-to-alls with each table's owner;
* unpooled row-wise: ``sharding.value_and_row_grad``: the rows travel, ``(B, L, D)`` each way.

"wire" estimates what a ring moves per device: (k - 1) / k of an all-gather's result, a
reduce-scatter's operand and an all-to-all's buffer, twice that of an all-reduce.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
LAYOUTS = ("replicated", "row-wise", "table-wise", "unpooled row-wise")
WIRE = {"all-gather": 1, "reduce-scatter": 1, "all-to-all": 1, "all-reduce": 2}


def formula(layout: str, k: int, b: int, length: int, dim: int) -> dict[str, int]:
    """Bytes per device per step by kind of collective, for one table (table-wise: k tables, one
    per device), without the head's gradient all-reduce."""
    bags = k * b
    if layout == "replicated":  # ids twice (as (B, L) and flat), then the rows' all-reduce
        return {"all-gather": 2 * bags * length * 4, "all-reduce": bags * length * dim * 4}
    if layout == "row-wise":
        return {"all-gather": bags * length * 4 + bags * dim * 4, "reduce-scatter": bags * dim * 4}
    if layout == "table-wise":
        return {"all-to-all": k * b * (length + 2 * dim) * 4}
    return {  # unpooled row-wise: ids gathered, rows reduce-scattered, row gradients gathered
        "all-gather": bags * length * 4 + bags * length * dim * 4,
        "reduce-scatter": bags * length * dim * 4,
    }


def wire(kinds: dict[str, int], k: int) -> float:
    return sum(WIRE[kind] * (k - 1) / k * size for kind, size in kinds.items())


def train_step(layout: str, mesh, b: int, length: int, dim: int, rows: int = 1 << 14):
    """``(jitted step, example arguments)`` of ``layout`` on ``mesh`` (axis "x")."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import mx_adagrad
    from mx_adagrad import sharding

    k = mesh.shape["x"]
    tables = k if layout == "table-wise" else 1
    split, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    opt = mx_adagrad.flat.fused_rowwise_adagrad(0.05)
    params = {
        "table": jax.device_put(jnp.zeros((tables * rows, dim)), split),
        "w": jax.device_put(jnp.zeros(tables * dim), replicated),
    }
    shape = (k * b, tables, length) if layout == "table-wise" else (k * b, length)
    example = (
        params,
        opt.init(params),
        jax.device_put(jnp.zeros(shape, jnp.int32), split),
        jax.device_put(jnp.zeros(k * b), split),
    )

    def head(w, features, labels):
        logits = jnp.tanh(features.reshape(features.shape[0], -1)) @ w
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    if layout == "replicated":
        lookup = sharding.sharded_row_lookup(mesh, "x")
        update = sharding.sharded_row_update(opt.tx, mesh, "x")

        def step(params, state, ids, labels):
            looked_up = lookup(params["table"], ids)  # (B, L, D) on every device
            loss, (d_w, d_rows) = jax.value_and_grad(
                lambda w, r: head(w, jnp.sum(r, axis=1), labels), argnums=(0, 1)
            )(params["w"], looked_up)
            table, table_state = update(
                params["table"], state, ids.reshape(-1), d_rows.reshape(-1, dim)
            )
            return {"table": table, "w": params["w"] - 0.05 * d_w}, table_state, loss

        example = (example[0], opt.tx.init(example[0]["table"]), *example[2:])
        return jax.jit(step, donate_argnums=(0, 1)), example

    def loss_fn(params, looked_up, labels):
        features = looked_up["table"]
        if layout == "unpooled row-wise":
            features = jnp.sum(features, axis=1)
        return head(params["w"], features, labels)

    if layout == "unpooled row-wise":
        grad_fn = sharding.value_and_row_grad(loss_fn, ["table"], mesh, "x")
    else:
        grad_fn = sharding.value_and_bag_grad(
            loss_fn, ["table"], mesh, "x", layout="row" if layout == "row-wise" else "table"
        )
    sharded = sharding.sharded_step(opt)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, bags, labels):
        loss, grads = grad_fn(params, {"table": bags}, labels)
        params, state = sharded(params, grads, state)
        return params, state, loss

    return step, example


def compiled_bytes(layout: str, b: int, length: int, dim: int) -> dict[str, int]:
    """The collective bytes per device of ``layout``'s compiled step on this process's devices."""
    import jax

    sys.path.insert(0, str(ROOT))
    from tests.eight_devices import collective_bytes

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    step, example = train_step(layout, mesh, b, length, dim)
    return collective_bytes(step.lower(*example).compile())


def measure(b: int, length: int, dim: int) -> dict[str, dict[str, int]]:
    """``compiled_bytes`` of every layout, in a child process with 8 CPU devices."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
        "JAX_PLATFORMS": "cpu",
    }
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import sharded_bags as s; "
        f"print(json.dumps({{l: s.compiled_bytes(l, {b}, {length}, {dim}) for l in s.LAYOUTS}}))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(child.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bags", type=int, default=2048, help="bags per device (b)")
    parser.add_argument("--length", type=int, default=20, help="ids per bag (L)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (D)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    b, length, dim = args.bags, args.length, args.dim
    measured = measure(b, length, dim)
    results = {"b": b, "L": length, "D": dim, "compiled_k8": measured, "formula": {}}
    print(f"Collective bytes per device per step, b = {b} bags of L = {length} ids per device,")
    print(f"D = {dim}, float32, per table looked up (table-wise: k tables, one per device)\n")
    print("| layout | k = 8, compiled HLO | k = 8 | k = 64 | k = 512 |\n|---|---|---|---|---|")
    for layout in LAYOUTS:
        tables = DEVICES if layout == "table-wise" else 1
        hlo = sum(measured[layout].values()) / tables
        cells = [f"{hlo / 1e6:,.2f} MB"]
        results["formula"][layout] = {}
        for k in (8, 64, 512):
            kinds = formula(layout, k, b, length, dim)
            per_table = {
                kind: size / (k if layout == "table-wise" else 1) for kind, size in kinds.items()
            }
            results["formula"][layout][k] = {
                "bytes_per_table": sum(per_table.values()),
                "wire_per_table": wire(per_table, k),
            }
            cells.append(
                f"{sum(per_table.values()) / 1e6:,.2f} MB ({wire(per_table, k) / 1e6:,.2f} wire)"
            )
        print(f"| {layout} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
