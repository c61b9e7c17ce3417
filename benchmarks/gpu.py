"""The default path on a GPU: XLA's program for ``mx_adagrad.adagrad``, dense and sparse, with torch.

    MX_ADAGRAD_NATIVE=0 python benchmarks/gpu.py [--quick] [--json PATH]

On a GPU backend the step is the pure XLA program (the native kernels are CPU-only). Cases, timed
as ``benchmarks/timing.py`` times them, torch on the same GPU (synchronized after every step):

* dense: one 16M-parameter float32 leaf and the ResNet-50-shaped tree (161 leaves), params and
  state donated: ``mx_adagrad.adagrad``, ``optax.chain(add_decayed_weights, adagrad)``,
  ``torch.optim.Adagrad`` (foreach; fused too where torch has it: not on CUDA), and a device copy of the step's ideal bytes (read
  weight, gradient and history, write weight and history: 20 bytes per parameter);
* how many kernels XLA compiles the 16M step to (fusions in the optimized HLO);
* sparse: ``benchmarks/sparse_step.py``'s optimizer and train steps (250k, 2M and 10M rows x 64,
  8,192 Zipf lookups) against torch's sparse Adagrad and ``nn.Embedding(sparse=True)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparse_step  # benchmarks/ is the script's directory, so it is on sys.path
import timing
from run import EPS, LR, OPTAX, TORCH_FUSED, WD, resnet50_shapes, torch_contenders, tree

import mx_adagrad

try:
    import torch
except ImportError:
    torch = None


def transform_step(tx, apply=mx_adagrad.apply_updates):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return apply(params, updates), state

    return step


def dense_contenders(shapes, device: str):
    contenders, kernels = {}, {}
    grads = tree(shapes, jnp.float32, 0.5)
    optax_tx = optax.chain(
        optax.add_decayed_weights(WD), optax.adagrad(LR, initial_accumulator_value=0.0, eps=EPS)
    )
    for name, tx, apply in (
        ("mx_adagrad.adagrad", mx_adagrad.adagrad(LR, wd=WD), mx_adagrad.apply_updates),
        (OPTAX, optax_tx, optax.apply_updates),
    ):
        step, params = transform_step(tx, apply), tree(shapes, jnp.float32, 1.0)
        buffers = [params, tx.init(params)]
        hlo = step.lower(buffers[0], buffers[1], grads).compile().as_text()
        entry = hlo.split("ENTRY")[1]
        kernels[name] = len(re.findall(r"\bfusion\(|\bcustom-call\(", entry))

        def run(step=step, buffers=buffers):
            buffers[0], buffers[1] = step(buffers[0], buffers[1], grads)
            jax.block_until_ready(buffers)

        contenders[name] = run
    # torch's fused Adagrad is CPU-only: on CUDA its fastest is foreach.
    modes = ("foreach",) if device == "cuda" else ("foreach", "fused")
    contenders |= torch_contenders(shapes, "float32", modes, device=device)
    if torch is not None:
        count = sum(int(np.prod(s)) for s in shapes) * 20 // 8  # float32 copies: 20 B/param
        src = torch.ones(count, device=device)
        dst = torch.empty(count, device=device)

        def copy():
            dst.copy_(src)
            if device == "cuda":
                torch.cuda.synchronize()

        contenders["device copy, same bytes (torch copy_)"] = copy
    return contenders, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    count, block = (4, 3) if args.quick else (20, 10)
    results = {
        "jax_device": str(jax.devices()[0].device_kind),
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else device,
        "jax": jax.__version__,
        "torch": None if torch is None else torch.__version__,
        "dense": {},
        "kernels": {},
    }
    print(f"jax on {results['jax_device']}, torch on {results['torch_device']}")
    resnet = resnet50_shapes()
    cases = {"16M float32 leaf": [(16 * 1024 * 1024,)], "ResNet-50 tree (161 leaves)": resnet}
    for title, shapes in cases.items():
        contenders, kernels = dense_contenders(shapes, device)
        base = TORCH_FUSED if TORCH_FUSED in contenders else "torch.optim.Adagrad(foreach=True)"
        stats = timing.summarize(timing.rounds(contenders, count, block), base)
        results["dense"][title], results["kernels"][title] = stats, kernels
        size = sum(int(np.prod(s)) for s in shapes)
        print(f"\n### {title}: XLA fusions in the step {kernels}\n")
        print(f"| contender | ms / step | GB/s at 20 B/param | ÷ {base} (p10-p90) |")
        print("|---|---|---|---|")
        for name, s in stats.items():
            ratio = (
                f"{s['ratio_median']:.2f} ({s['ratio_p10']:.2f}-{s['ratio_p90']:.2f})"
                if "ratio_median" in s
                else ""
            )
            gbps = size * 20 / (s["median_ms"] * 1e-3) / 1e9
            print(f"| {name} | {s['median_ms']:.3f} | {gbps:.0f} | {ratio} |")
    copy = results["dense"]["16M float32 leaf"].get("device copy, same bytes (torch copy_)")
    gbps = 16 * 1024 * 1024 * 20 / (copy["median_ms"] * 1e-3) / 1e9 if copy else None
    sizes = dict(sparse_step.SIZES)
    if args.quick:
        sizes.pop("10M")
    results["sparse"] = sparse_step.measure(count, block, sizes=sizes, device=device, gbps=gbps)
    print()
    sparse_step.print_report(results["sparse"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("MX_ADAGRAD_NATIVE", "0")
    main()
