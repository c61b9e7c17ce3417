"""A row-sharded embedding-bag table trained over 2 processes on this machine, like one process.

    python examples/sharded_bags_multihost.py [--processes 2] [--local-devices 2] [--steps 4]

The launcher starts ``--processes`` workers of ``--local-devices`` CPU devices each; they join
through ``jax.distributed.initialize`` (127.0.0.1, gloo collectives, as ``examples/multihost.py``)
and form one mesh axis "x" of all their devices. The table is split by rows over "x", the batch
of bags by batch: :func:`mx_adagrad.sharding.value_and_bag_grad` gathers the ids, each device
pools the ids it owns and a ``psum_scatter`` leaves it its own bags; the bag gradients go back to
the owners and :func:`mx_adagrad.sharding.sharded_step` runs ``fused_adagrad``'s one-pass step on
each shard. The head's bag gradients ``labels * v / B`` do not depend on the pooled values, so the
final table and history are bitwise those of the one-device run, which the launcher checks.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad
from mx_adagrad import sharding

ROWS, DIM, BAGS, LENGTH = 256, 8, 32, 5


def _multihost() -> object:
    """``examples/multihost.py`` (its port, loopback check and log helpers)."""
    spec = importlib.util.spec_from_file_location(
        "multihost", Path(__file__).with_name("multihost.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(steps: int):
    """The start table, the head ``v``, and ``steps`` batches of ``(bags, labels)``: Zipf ids
    with padding (-1) and an empty bag, the same in every process."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    v = rng.normal(size=DIM).astype(np.float32)
    batches = []
    for _ in range(steps):
        ids = ((rng.zipf(1.2, (BAGS, LENGTH)) - 1) % ROWS).astype(np.int32)
        ids[rng.random(ids.shape) < 0.2], ids[3] = -1, -1
        batches.append((ids, rng.normal(size=BAGS).astype(np.float32)))
    return table, v, batches


def loss_fn(params, pooled, labels, v):
    del params
    return jnp.mean(labels * (pooled["table"] @ v))


OPT = mx_adagrad.flat.fused_adagrad(0.1, wd=1e-3, clip_gradient=0.5)


def single_process_run(steps: int) -> dict[str, np.ndarray]:
    """The reference: ``mx_adagrad.value_and_bag_grad`` and the one-pass step on one device."""
    table, v, batches = make_data(steps)
    grad_fn = mx_adagrad.value_and_bag_grad(loss_fn, ["table"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, bags, labels):
        _, grads = grad_fn(params, {"table": bags}, labels, v)
        return OPT.step(params, grads, state)

    params = {"table": jnp.asarray(table)}
    state = OPT.init(params)
    for bags, labels in batches:
        params, state = step(params, state, bags, labels)
    return {"table": np.asarray(params["table"]), "history": np.asarray(state[3].history["table"])}


def sharded_run(steps: int) -> dict[str, np.ndarray]:
    """The same training on a mesh of every device of every process."""
    table, v, batches = make_data(steps)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    split = NamedSharding(mesh, P("x"))
    grad_fn = sharding.value_and_bag_grad(loss_fn, ["table"], mesh, "x")
    sharded_step = sharding.sharded_step(OPT)

    def place(a):  # each process supplies its own devices' shards of the global value
        return jax.make_array_from_callback(a.shape, split, lambda index: a[index])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, bags, labels):
        _, grads = grad_fn(params, {"table": bags}, labels, v)
        return sharded_step(params, grads, state)

    params = {"table": place(table)}
    state = OPT.init(params)
    for bags, labels in batches:
        params, state = step(params, state, place(bags), place(labels))
    found = {"table": params["table"], "history": state[3].history["table"]}
    return {
        k: np.asarray(multihost_utils.process_allgather(x, tiled=True)) for k, x in found.items()
    }


def worker(process_id: int, processes: int, port: int, steps: int, out: Path) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    try:
        np.savez(out / f"result_{process_id}.npz", **sharded_run(steps))
    finally:
        jax.distributed.shutdown()


def launch(
    processes: int = 2, local_devices: int = 2, steps: int = 4, timeout: float = 120.0
) -> list[dict[str, np.ndarray]]:
    """Runs :func:`worker` in ``processes`` processes; returns each one's table and history.
    Raises ``TimeoutError`` or ``RuntimeError`` with the workers' output; every worker is killed
    and reaped before this returns or raises."""
    helpers = _multihost()
    if not helpers.gloo_stays_on_loopback():
        raise RuntimeError("this machine's hostname does not resolve to a loopback address")
    port = helpers.free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
    }
    with tempfile.TemporaryDirectory(prefix="mx_adagrad_sharded_bags_") as tmp:
        out, procs, logs = Path(tmp), [], []
        try:
            for process_id in range(processes):
                logs.append(open(out / f"worker_{process_id}.log", "w"))  # closed in finally
                command = [sys.executable, __file__, "--worker", str(process_id), "--out", tmp]
                command += ["--processes", str(processes), "--port", str(port)]
                command += ["--steps", str(steps)]
                procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=logs[-1]))
            deadline = time.monotonic() + timeout
            while any(proc.poll() is None for proc in procs):
                if any(proc.returncode not in (None, 0) for proc in procs):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{processes} workers (coordinator 127.0.0.1:{port}) not done after "
                        f"{timeout:g} s; killed. Their output:\n{helpers._logs(out, processes)}"
                    )
                time.sleep(0.05)
            codes = [proc.poll() for proc in procs]
            if any(codes):
                raise RuntimeError(f"workers exited with {codes}:\n{helpers._logs(out, processes)}")
            return [dict(np.load(out / f"result_{i}.npz")) for i in range(processes)]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for log in logs:
                log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.processes, args.port, args.steps, args.out)
        return
    results = launch(args.processes, args.local_devices, args.steps)
    reference = single_process_run(args.steps)
    print(f"{args.processes} processes x {args.local_devices} CPU devices, {args.steps} steps")
    for name, want in reference.items():
        same = all(np.array_equal(r[name], want) for r in results)
        print(f"  {name:8s} bitwise the one-device run in every process: {same}")


if __name__ == "__main__":
    main()
