"""Multi-process data-parallel training with mx_adagrad: 2 processes on this machine, one mesh.

    python examples/multihost.py [--processes 2] [--local-devices 2] [--steps 5]

The launcher starts ``--processes`` copies of this script, each with ``--local-devices`` CPU
devices. They meet through ``jax.distributed.initialize`` (coordinator on 127.0.0.1, on a port the
launcher finds free by binding port 0) and exchange data with gloo collectives
(``jax_cpu_collectives_implementation="gloo"``). Together their devices form one mesh; each batch
is split over it, each process feeding its own slice. Params and optimizer state are replicated:
under ``jax.jit`` XLA all-reduces the gradient over all devices of all processes (the model's one
collective), and every device runs the same ``mx_adagrad.adagrad`` step on the same averaged
gradient. Each worker saves its final params; the launcher checks that all processes hold
bitwise the same params and that they equal a single-process run on the whole batches (up to
float32 summation order: the gradient's sum is split into per-device partial sums).

On a real cluster the same worker code runs once per host, with the coordinator address of host 0
and no ``XLA_FLAGS``. Here nothing listens beyond 127.0.0.1: the coordinator binds 127.0.0.1 (by
default it binds every interface), and gloo binds the address this machine's hostname resolves to,
so the launcher refuses to start unless that is a loopback address.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mx_adagrad

BATCH, FEATURES, HIDDEN = 64, 12, 16
LEARNING_RATE, WD, CLIP = 0.1, 1e-4, 1.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gloo_stays_on_loopback() -> bool:
    """Whether gloo, which binds the address of this machine's hostname, stays on loopback."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
    except OSError:
        return False


def make_data(steps: int) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Initial params of a one-hidden-layer MLP and ``steps`` batches, the same in every process."""
    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.normal(size=(FEATURES, HIDDEN)) / 3).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN,)) / 4).astype(np.float32),
        "b2": np.zeros((), np.float32),
    }
    batches = []
    for _ in range(steps):
        x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
        batches.append((x, (x[:, 0] + x[:, 1] > 0).astype(np.float32)))
    return params, batches


def train(params, batches, place=lambda tree, split: tree) -> dict[str, np.ndarray]:
    """Trains on ``batches`` with ``mx_adagrad.adagrad``; ``place(tree, split)`` puts params
    (``split=False``) and batches (``split=True``) on devices. Returns the final params."""
    tx = mx_adagrad.adagrad(LEARNING_RATE, wd=WD, clip_gradient=CLIP)

    def loss_fn(params, x, y):
        logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        return jnp.mean(jax.nn.softplus(logits) - y * logits)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)  # mean over the whole (global) batch
        updates, opt_state = tx.update(grads, opt_state, params)
        return mx_adagrad.apply_updates(params, updates), opt_state

    params = place(params, False)
    opt_state = tx.init(params)
    for batch in batches:
        params, opt_state = step(params, opt_state, *place(batch, True))
    # Replicated: every device holds the whole value; read this process's first copy.
    return {name: np.asarray(leaf.addressable_data(0)) for name, leaf in params.items()}


def single_process_run(steps: int) -> dict[str, np.ndarray]:
    """The reference: the same training in this process, on one device, whole batches."""
    return train(*make_data(steps))


def worker(process_id: int, processes: int, port: int, steps: int, out: Path) -> None:
    """One process of the data-parallel run: joins the others, trains, saves its params."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",  # the default binds all interfaces
        num_processes=processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    try:
        mesh = jax.make_mesh((jax.device_count(),), ("data",))  # all devices of all processes

        def place(tree, split):
            # Each process supplies the shards of its own devices, sliced from the global value.
            sharding = NamedSharding(mesh, P("data") if split else P())
            return jax.tree.map(
                lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]),
                tree,
            )

        params = train(*make_data(steps), place=place)
        np.savez(out / f"params_{process_id}.npz", **params)
    finally:
        jax.distributed.shutdown()


def launch(
    processes: int = 2, local_devices: int = 2, steps: int = 5, timeout: float = 120.0
) -> list[dict[str, np.ndarray]]:
    """Runs :func:`worker` in ``processes`` processes of ``local_devices`` CPU devices each.

    Returns the final params of every process. Raises ``TimeoutError`` if they are not all done
    within ``timeout`` seconds, ``RuntimeError`` if one fails (both with the workers' output);
    every worker still running is killed and reaped before this returns or raises.
    """
    if not gloo_stays_on_loopback():
        raise RuntimeError(
            f"hostname {socket.gethostname()!r} does not resolve to a loopback address: gloo would "
            "listen beyond 127.0.0.1"
        )
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
    }
    with tempfile.TemporaryDirectory(prefix="mx_adagrad_multihost_") as tmp:
        out = Path(tmp)
        procs, logs = [], []
        try:
            for process_id in range(processes):
                logs.append(open(out / f"worker_{process_id}.log", "w"))  # closed in finally
                command = [sys.executable, __file__, "--worker", str(process_id)]
                command += ["--processes", str(processes), "--port", str(port)]
                command += ["--steps", str(steps), "--out", tmp]
                procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=logs[-1]))
            deadline = time.monotonic() + timeout
            while any(proc.poll() is None for proc in procs):
                codes = [proc.returncode for proc in procs]
                if any(code not in (None, 0) for code in codes):
                    raise RuntimeError(f"workers exited with {codes}:\n{_logs(out, processes)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{processes} workers (coordinator 127.0.0.1:{port}) not done after "
                        f"{timeout:g} s; killed. Their output:\n{_logs(out, processes)}"
                    )
                time.sleep(0.05)
            codes = [proc.returncode for proc in procs]
            if any(codes):
                raise RuntimeError(f"workers exited with {codes}:\n{_logs(out, processes)}")
            return [dict(np.load(out / f"params_{i}.npz")) for i in range(processes)]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for log in logs:
                log.close()


def _logs(out: Path, processes: int) -> str:
    """The last lines each worker wrote."""
    tails = []
    for process_id in range(processes):
        lines = (out / f"worker_{process_id}.log").read_text(errors="replace").splitlines()
        tails.append(f"--- worker {process_id} ---\n" + "\n".join(lines[-20:]))
    return "\n".join(tails)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
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
        same = all(np.array_equal(r[name], results[0][name]) for r in results)
        diff = max(float(np.max(np.abs(r[name] - want))) for r in results)
        print(f"  {name:3s} identical across processes: {same}; max |multi - single| = {diff:.2g}")


if __name__ == "__main__":
    main()
