"""Head to head on one 16M-parameter float32 leaf: the native fused step against torch's fused one.

    python benchmarks/fused_vs_torch.py [--rounds 40]

Only the two one-pass kernels, interleaved with a 50 ms pause between them (so neither runtime's
spinning worker threads steal the other's cores), params and state donated. Prints the medians and
the 10th percentiles, and their ratios.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mx_adagrad import flat

N = 16 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    opt = flat.fused_adagrad(0.01, wd=1e-4)
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    params, grads = jnp.ones(N), jnp.full(N, 0.5)
    state = opt.init(params)
    weight = torch.ones(N)
    weight.grad = torch.full((N,), 0.5)
    torch_opt = torch.optim.Adagrad([weight], lr=0.01, weight_decay=1e-4, fused=True)

    ours, theirs = [], []
    for _ in range(args.rounds + 1):  # the first round compiles and warms up; dropped
        time.sleep(0.05)
        start = time.perf_counter()
        params, state = step(params, grads, state)
        params.block_until_ready()
        ours.append(time.perf_counter() - start)
        time.sleep(0.05)
        start = time.perf_counter()
        torch_opt.step()
        theirs.append(time.perf_counter() - start)
    ours, theirs = np.array(ours[1:]) * 1e3, np.array(theirs[1:]) * 1e3
    print("| | median ms | p10 ms |\n|---|---|---|")
    print(
        f"| flat.fused_adagrad (native) | {np.median(ours):.2f} | {np.percentile(ours, 10):.2f} |"
    )
    print(
        f"| torch Adagrad(fused=True) | {np.median(theirs):.2f} | {np.percentile(theirs, 10):.2f} |"
    )
    print(
        f"| ratio | {np.median(ours) / np.median(theirs):.2f} | "
        f"{np.percentile(ours, 10) / np.percentile(theirs, 10):.2f} |"
    )


if __name__ == "__main__":
    main()
