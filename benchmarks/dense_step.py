"""One 16M-parameter float32 dense step: mx_adagrad vs optax vs torch's fused kernel.

    python benchmarks/dense_step.py

Contenders are interleaved in one process (machine drift hits all alike); params and state are
donated. Prints a Markdown table of median ms/step and the ratio to torch's fused kernel.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mx_adagrad

N = 16 * 1024 * 1024
STEPS, WARMUP = 25, 5


def jax_contender(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return mx_adagrad.apply_updates(params, updates), state

    params, grads = jnp.ones(N), jnp.full(N, 0.5)
    buffers = [params, tx.init(params)]

    def run():
        buffers[0], buffers[1] = step(buffers[0], buffers[1], grads)
        buffers[0].block_until_ready()

    return run


def main() -> None:
    contenders = {
        "mx_adagrad.adagrad(wd=1e-4)": jax_contender(mx_adagrad.adagrad(0.01, wd=1e-4)),
        "optax.chain(add_decayed_weights, adagrad)": jax_contender(
            optax.chain(
                optax.add_decayed_weights(1e-4),
                optax.adagrad(0.01, initial_accumulator_value=0.0, eps=1e-6),
            )
        ),
    }
    try:
        import torch
    except ImportError:
        print("torch is not installed: torch.optim.Adagrad is left out")
    else:
        torch.set_num_threads(2)
        weight = torch.ones(N)
        weight.grad = torch.full((N,), 0.5)
        optimizer = torch.optim.Adagrad([weight], lr=0.01, weight_decay=1e-4, fused=True)
        contenders["torch.optim.Adagrad(weight_decay=1e-4, fused=True)"] = optimizer.step

    times = {name: [] for name in contenders}
    for _ in range(STEPS):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t[WARMUP:])) for name, t in times.items()}
    base = medians.get("torch.optim.Adagrad(weight_decay=1e-4, fused=True)")
    print("| step | ms / step | vs torch fused |\n|---|---|---|")
    for name, median in medians.items():
        ratio = f"{median / base:.2f}" if base else "n/a"
        print(f"| `{name}` | {median * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
