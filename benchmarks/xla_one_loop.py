"""Pure-XLA formulations of the dense AdaGrad step tried for "one pass over memory" on CPU.

    python benchmarks/xla_one_loop.py

One 16M float32 leaf, ``wd=1e-4``, params and history donated. For each formulation: how many
loops over the parameters XLA CPU emits, its temporary bytes, and median ms/step next to
``torch.optim.Adagrad(fused=True)`` in the same process (contenders interleaved). The last group
runs in a child process with ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
(a process-wide flag: ``jax.jit(..., compiler_options=...)`` cannot set this map-valued option,
so a library cannot turn it on for its own computation).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

N = 16 * 1024 * 1024
LR, WD, EPS = 0.01, 1e-4, 1e-6
STEPS, WARMUP, PAUSE = 15, 3, 0.05
MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def seed(p, h, g):
    """mx_adagrad's formulation: history first, then the weight from the new history."""
    gg = g + WD * p
    hn = h + gg * gg
    return p + (-LR) * (-(-gg / (jnp.sqrt(hn) + EPS))), hn


def old_history(p, h, g):
    """The weight from the old history, ``g / (sqrt(h + g*g) + eps)``.

    XLA's CSE merges ``h + g*g`` with the new history, so this is the seed step again, without the
    negation of ``transforms._divide``: XLA then materializes the gradient in a temporary.
    """
    gg = g + WD * p
    return p + (-LR) * (gg / (jnp.sqrt(h + gg * gg) + EPS)), h + gg * gg


def barrier(p, h, g):
    """The weight computed from optimization_barrier'd copies, so CSE cannot merge the two."""
    gg = g + WD * p
    hn = h + gg * gg
    p2, h2, g2 = lax.optimization_barrier((p, h, g))
    gg2 = g2 + WD * p2
    return p2 + (-LR) * (gg2 / (jnp.sqrt(h2 + gg2 * gg2) + EPS)), hn


def packed(ph, _, g):
    """Weight and history interleaved in one complex64 buffer: one output, one loop."""
    p, h = jnp.real(ph), jnp.imag(ph)
    gg = g + WD * p
    hn = h + gg * gg
    return lax.complex(p + (-LR) * (gg / (jnp.sqrt(hn) + EPS)), hn), _


def scan_chunks(p, h, g, chunk: int = 1 << 18):
    """Cache blocking with lax.scan over 256k-element chunks."""
    n = N // chunk
    xs = (p.reshape(n, chunk), h.reshape(n, chunk), g.reshape(n, chunk))
    _, (pn, hn) = lax.scan(lambda c, x: (c, seed(*x)), None, xs)
    return pn.reshape(N), hn.reshape(N)


def fori_chunks(p, h, g, chunk: int = 1 << 20):
    """Cache blocking with fori_loop and dynamic_update_slice over 1M-element chunks."""

    def body(i, carry):
        p, h = carry
        start = (i * chunk,)
        pn, hn = seed(*(lax.dynamic_slice(x, start, (chunk,)) for x in (p, h, g)))
        return lax.dynamic_update_slice(p, pn, start), lax.dynamic_update_slice(h, hn, start)

    return lax.fori_loop(0, N // chunk, body, (p, h))


def contender(f: Callable, packed_state: bool = False) -> tuple[Callable[[], None], int, int]:
    """The timed step, its number of loops over N elements, and its temporary bytes."""
    step = jax.jit(f, donate_argnums=(0, 1))
    make = (lambda: jnp.ones(N, jnp.complex64)) if packed_state else (lambda: jnp.ones(N))
    buffers, g = [make(), jnp.zeros(1) if packed_state else jnp.zeros(N)], jnp.full(N, 0.5)
    compiled = step.lower(buffers[0], buffers[1], g).compile()
    entry = compiled.as_text().split("ENTRY", 1)[1]
    # Loop fusions (single- or multi-output) and while loops whose result holds N-element arrays.
    shapes = re.findall(r"^\s*(?:ROOT )?%\S+ = (.+?) (?:fusion|while)\(", entry, re.MULTILINE)
    loops = sum(
        any(
            np.prod([int(d) for d in dims.split(",")]) == N
            for dims in re.findall(r"\[([\d,]+)\]", s)
        )
        for s in shapes
    )

    def run() -> None:
        buffers[0], buffers[1] = step(buffers[0], buffers[1], g)
        jax.block_until_ready(buffers)

    return run, loops, compiled.memory_analysis().temp_size_in_bytes


def measure(formulations: dict[str, tuple[Callable, bool]]) -> None:
    rows, runs = {}, {}
    for name, (f, packed_state) in formulations.items():
        runs[name], loops, temp = contender(f, packed_state)
        rows[name] = (loops, temp)
    try:
        import torch
    except ImportError:
        print("torch is not installed: no torch fused reference")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        weight = torch.ones(N)
        weight.grad = torch.full((N,), 0.5)
        runs["torch.optim.Adagrad(fused=True)"] = torch.optim.Adagrad(
            [weight], lr=LR, weight_decay=WD, eps=EPS, fused=True
        ).step
        rows["torch.optim.Adagrad(fused=True)"] = (1, 0)
    times = {name: [] for name in runs}
    for _ in range(STEPS):
        for name, run in runs.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t[WARMUP:])) * 1e3 for name, t in times.items()}
    base = medians.get("torch.optim.Adagrad(fused=True)")
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"\nXLA_FLAGS={flags!r}\n")
    print("| formulation | loops over N | temp bytes | ms / step | ÷ torch fused |")
    print("|---|---|---|---|---|")
    for name, ms in medians.items():
        loops, temp = rows[name]
        ratio = f"{ms / base:.2f}" if base else "n/a"
        print(f"| {name} | {loops} | {temp:,} | {ms:.1f} | {ratio} |")


def main() -> None:
    if "--mof" in sys.argv:
        measure({"seed": (seed, False), "barrier": (barrier, False)})
        return
    measure(
        {
            "seed (mx_adagrad today)": (seed, False),
            "old history": (old_history, False),
            "optimization_barrier": (barrier, False),
            "complex64 (w, h) packing": (packed, True),
            "lax.scan, 256k chunks": (scan_chunks, False),
            "fori_loop + dynamic_update_slice, 1M chunks": (fori_chunks, False),
        }
    )
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + MOF_FLAG).strip()}
    subprocess.run([sys.executable, __file__, "--mof"], env=env, check=True)


if __name__ == "__main__":
    main()
