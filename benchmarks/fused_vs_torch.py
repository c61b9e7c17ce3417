"""Head to head: the native fused step against torch's fused Adagrad, on the very same memory.

    python benchmarks/fused_vs_torch.py [--rounds 60] [--json PATH]

Both kernels make one pass over memory, so what separates them on a shared virtual machine is
often not the code but the memory each was given: two sets of buffers of one size, allocated in
one process, can step at speeds 1.4x apart for the whole run (the host's backing of the guest's
pages, seen here as stable per-buffer speeds that differ between processes). This script removes
that: torch's fused kernel (``torch.optim.adagrad.adagrad(..., fused=True)``, what
``Adagrad(fused=True).step()`` calls) steps the native step's own weight, gradient and history
buffers, through zero-copy DLPack views made before its block and dropped before the native
step runs (a live view would keep XLA from updating in place). The two alternate on the same
bytes, so the ratio measures the kernels and their dispatch. For comparison, torch's fused step
on its own tensors runs in the same rounds ("own buffers").

Cases (float32, lr 0.01, wd 1e-4): one 16M-parameter leaf; the ResNet-50-shaped tree (161
leaves; torch gets the same 161 buffers); the same tree in flat mode (``flat.ravel``: one buffer
for ours, 161 views into it for torch). Timing as in ``benchmarks/run.py``
(``benchmarks/timing.py``). Prints, per case, the median ms, the per-round ratio to torch on the
same memory (median, p10-p90) and the share of rounds in which the native step was faster;
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import run  # benchmarks/ is the script's directory, so it is on sys.path
import timing

from mx_adagrad import flat

try:
    import torch
    from torch.optim.adagrad import adagrad as torch_adagrad
except ImportError:
    torch = None

SAME = "torch fused, same memory"


class SharedBuffers:
    """The native step's buffers, which torch's fused kernel also steps through DLPack views."""

    def __init__(self, opt: flat.FusedAdaGrad, params, grads, shapes) -> None:
        self.step = jax.jit(opt.step, donate_argnums=(0, 2))
        self.params, self.grads, self.state = params, grads, opt.init(params)
        self.shapes = shapes  # the parameters' shapes (params may be one flat buffer)
        self.views = None
        self.steps = [torch.tensor(0.0) for _ in self.shapes]

    def ours(self) -> None:
        self.views = None  # no view may be alive while XLA donates the buffers
        self.params, self.state = self.step(self.params, self.grads, self.state)
        jax.block_until_ready((self.params, self.state))

    def theirs(self) -> None:
        if self.views is None:  # the block's first, untimed call
            history = optax.tree_utils.tree_get(self.state, "history")
            self.views = [self.torch_leaves(t) for t in (self.params, self.grads, history)]
        weights, grads, sums = self.views
        torch_adagrad(
            weights,
            grads,
            sums,
            self.steps,
            fused=True,
            lr=run.LR,
            weight_decay=run.WD,
            lr_decay=0.0,
            eps=run.EPS,
            maximize=False,
        )

    def torch_leaves(self, tree) -> list[torch.Tensor]:
        """Zero-copy torch views of ``tree``'s parameters (a flat buffer cut at the leaf sizes)."""
        buffers = [torch.from_dlpack(x) for x in jax.tree.leaves(tree)]
        if len(buffers) == len(self.shapes):
            return buffers
        (buffer,) = buffers  # flat mode, one float32 group
        return list(buffer.split([int(np.prod(s)) for s in self.shapes]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--json", type=Path, default=run.RESULTS / "fused_vs_torch.json")
    args = parser.parse_args()
    if torch is None:
        print("torch is not installed: there is nothing to compare against")
        return
    torch.set_num_threads(os.cpu_count() or 1)

    resnet = run.resnet50_shapes()
    cases = {
        "16M float32 leaf": ([(16 * 1024 * 1024,)], False),
        "ResNet-50 tree, float32, 161 leaves": (resnet, False),
        "ResNet-50 tree, float32, flat mode": (resnet, True),
    }
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "cases": {},
    }
    for title, (shapes, flat_mode) in cases.items():
        params = run.tree(shapes, jnp.float32, 1.0)
        grads = run.tree(shapes, jnp.float32, 0.5)
        opt = flat.fused_adagrad(run.LR, wd=run.WD)
        if flat_mode:
            params, grads = flat.ravel(params), flat.ravel(params).ravel_like(grads)
            mults = dict(lr_mult=params.lr_mult, wd_mult=params.wd_mult)
            opt = flat.fused_adagrad(run.LR, wd=run.WD, **mults)
        shared = SharedBuffers(opt, params, grads, shapes)
        own = run.torch_contenders(shapes, "float32", ["fused"])[run.TORCH_FUSED]
        contenders = {
            "flat.fused_adagrad (native)": shared.ours,
            SAME: shared.theirs,
            "torch fused, own buffers": own,
        }
        rounds = timing.rounds(contenders, args.rounds)
        stats = timing.summarize(rounds, SAME)
        for name in contenders:
            stats[name]["faster_share"] = float(np.mean([r[name] < r[SAME] for r in rounds]))
        results["cases"][title] = stats
        print(f"\n### {title}, {args.rounds} rounds\n")
        print("| contender | median ms | ÷ torch, same memory: median (p10-p90) | rounds faster |")
        print("|---|---|---|---|")
        for name, s in stats.items():
            ratio = f"{s['ratio_median']:.3f} ({s['ratio_p10']:.2f}-{s['ratio_p90']:.2f})"
            faster = "" if name == SAME else f"{s['faster_share']:.0%}"
            print(f"| {name} | {s['median_ms']:.2f} | {ratio} | {faster} |")
        del shared, contenders
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
