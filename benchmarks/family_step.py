"""The AdaGrad family's dense step: each one-pass form against its optax (XLA) form and torch.

One float32 parameter of 16M elements, a (262144, 64) table, and for each of ``adagrad``,
``legacy.adagrad`` (MXNet 1.x), ``rowwise_adagrad`` and ``contrib.group_adagrad``: its optax
form (``tx.update`` + ``apply_updates`` under ``jax.jit``, params and state donated: XLA's two
loops) and ``flat.one_pass(tx).step`` (the native one-pass kernel on CPU), next to
``torch.optim.Adagrad(fused=True)`` on the same shape. Timing: ``benchmarks/timing.py`` rounds,
ratios to torch paired within each round.

    .venv/bin/python benchmarks/family_step.py --json benchmarks/results/family_step.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import run  # benchmarks/run.py: the contenders
import timing

import mx_adagrad
from mx_adagrad import contrib, flat

SHAPES = [(262_144, 64)]
FAMILY = {
    "adagrad": lambda: mx_adagrad.adagrad(run.LR, wd=run.WD),
    "legacy.adagrad": lambda: mx_adagrad.legacy.adagrad(run.LR, wd=run.WD),
    "rowwise_adagrad": lambda: mx_adagrad.rowwise_adagrad(run.LR, wd=run.WD),
    "contrib.group_adagrad": lambda: contrib.group_adagrad(run.LR),
}
TORCH = "torch.optim.Adagrad(fused=True)"


def contenders() -> dict:
    params = lambda: run.tree(SHAPES, jnp.float32, 1.0)  # noqa: E731
    grads = run.tree(SHAPES, jnp.float32, 0.5)
    found = {}
    for name, make in FAMILY.items():
        found[f"{name} (XLA)"] = run.transform_contender(make(), params(), grads)
        found[f"one_pass({name}) (native)"] = run.fused_contender(
            flat.one_pass(make()), params(), grads
        )
    found.update({k: v for k, v in run.torch_contenders(SHAPES, "float32").items() if k == TORCH})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = timing.rounds(contenders(), args.rounds, 5)
    table = {}
    print(f"{'contender':42s} {'ms/step':>8s}  ÷ torch fused (p10-p90)")
    for name in results[0]:
        ms = float(np.median([r[name] for r in results]) * 1e3)
        ratio = timing.paired_ratio(results, name, TORCH)
        table[name] = {"ms": ms, "vs_torch_fused": ratio}
        print(
            f"{name:42s} {ms:8.2f}  {ratio['median']:.2f} ({ratio['p10']:.2f}-{ratio['p90']:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps({"shape": SHAPES[0], "results": table}, indent=1))


if __name__ == "__main__":
    main()
