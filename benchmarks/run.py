"""The benchmark suite: mx_adagrad against optax, torch and a memory copy, in one process.

    python benchmarks/run.py [--quick] [--json PATH] [--png PATH]

Cases (params and optimizer state donated, gradients fixed):

* one 16M-parameter float32 leaf; a ResNet-50-shaped pytree (161 leaves, 25.6M parameters); 1000
  tiny leaves (227k parameters), next to one leaf of the same size;
* the 16M leaf and the ResNet tree in bfloat16 with ``multi_precision`` (float32 master + history);
* compile time of the step for the 161- and 1000-leaf trees.

Contenders: ``mx_adagrad.adagrad(wd=1e-4)`` (``update`` + ``apply_updates``), the fused step
``mx_adagrad.flat.fused_adagrad`` (native kernel on CPU), the flat-buffer mode
(``mx_adagrad.flat.ravel``), ``optax.chain(add_decayed_weights, adagrad)``,
``torch.optim.Adagrad`` (foreach and fused; left out with a note if torch is absent) and a
memory-bandwidth reference: a copy moving the same bytes as one ideal step (read weight, gradient
and state once, write weight and state once).

Timing (``benchmarks/timing.py``): rounds of every contender in a fresh random order, each a pause,
one untimed call, then a block of timed steps back to back (a training loop's steady state); the
ratio to torch's fused step is taken within each round, then its median over rounds. Prints
Markdown tables (median ms/step, the ratio's median and p10-p90 range), writes JSON and a PNG
chart (matplotlib, Agg). A full run takes about 4 minutes on a 2-core machine, ``--quick`` 1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mx_adagrad
from mx_adagrad import _native, flat

try:
    import torch
except ImportError:
    torch = None

import timing  # benchmarks/ is the script's directory, so it is on sys.path

LR, WD, EPS = 0.01, 1e-4, 1e-6
RESULTS = Path(__file__).with_name("results")
TORCH_FUSED = "torch.optim.Adagrad(fused=True)"
OPTAX = "optax.chain(add_decayed_weights, adagrad)"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of ResNet-50 (torchvision), convolutions as HWIO: 161 leaves."""
    shapes: list[tuple[int, ...]] = [(7, 7, 3, 64), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            for kernel, cin, cout in (
                (1, inplanes, planes),
                (3, planes, planes),
                (1, planes, 4 * planes),
            ):
                shapes += [(kernel, kernel, cin, cout), (cout,), (cout,)]
            if block == 0:
                shapes += [(1, 1, inplanes, 4 * planes), (4 * planes,), (4 * planes,)]
            inplanes = 4 * planes
    return [*shapes, (2048, 1000), (1000,)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """1000 small leaves (1 to 1024 elements each)."""
    cycle = [(1,), (4,), (4, 4), (64,), (16, 16), (32, 32)]
    return [cycle[i % len(cycle)] for i in range(1000)]


def tree(shapes: list[tuple[int, ...]], dtype, value: float) -> dict[str, jax.Array]:
    return {f"p{i:04d}": jnp.full(shape, value, dtype) for i, shape in enumerate(shapes)}


def block(x) -> None:
    jax.block_until_ready(x)


def transform_contender(
    tx: optax.GradientTransformation, params, grads, apply=mx_adagrad.apply_updates
) -> Callable[[], None]:
    """``tx.update`` + ``apply`` under jit, params and state donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return apply(params, updates), state

    buffers = [params, tx.init(params)]

    def run() -> None:
        buffers[0], buffers[1] = step(buffers[0], buffers[1], grads)
        block(buffers)

    return run


def fused_contender(opt: flat.FusedAdaGrad, params, grads) -> Callable[[], None]:
    """``opt.step`` under jit, params and state donated."""
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    buffers = [params, opt.init(params)]

    def run() -> None:
        buffers[0], buffers[1] = step(buffers[0], grads, buffers[1])
        block(buffers)

    return run


def unravel_contender(fp: flat.FlatParams) -> Callable[[], None]:
    """``fp.unravel()``: what a train step pays to hand the flat parameters to the model."""
    unravel = jax.jit(lambda fp: fp.unravel())
    return lambda: block(unravel(fp))


def torch_contenders(
    shapes, dtype: str, modes=("foreach", "fused"), device: str = "cpu"
) -> dict[str, Callable[[], None]]:
    """``torch.optim.Adagrad`` in each of ``modes`` on the same shapes; empty without torch."""
    if torch is None:
        return {}
    contenders = {}
    for mode in modes:
        params = [torch.ones(s, dtype=getattr(torch, dtype), device=device) for s in shapes]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        optimizer = torch.optim.Adagrad(params, lr=LR, weight_decay=WD, eps=EPS, **{mode: True})

        def run(optimizer=optimizer):
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()

        contenders[f"torch.optim.Adagrad({mode}=True)"] = run
    return contenders


def copy_contender(nbytes: int) -> tuple[str, Callable[[], None]]:
    """A copy that reads and writes ``nbytes`` in all: the memory-bandwidth reference.

    Its destination is another buffer, so the CPU also reads each destination line before
    writing it (write-allocate): a step that writes back the lines it has just read moves fewer
    bytes and can beat this reference.
    """
    count = nbytes // 8  # float32 elements: half the bytes are read, half written
    if torch is not None:
        src, dst = torch.ones(count), torch.empty(count)
        return "memory copy, same bytes (torch copy_)", lambda: dst.copy_(src)
    src, dst = np.ones(count, np.float32), np.empty(count, np.float32)
    return "memory copy, same bytes (numpy, 1 thread)", lambda: np.copyto(dst, src)


def dense_case(shapes, dtype, *, tiny: bool) -> dict[str, Callable[[], None]]:
    """The contenders of one dense case: ``shapes`` of ``dtype`` (bfloat16: multi_precision)."""
    multi_precision = jnp.dtype(dtype) != jnp.float32
    kwargs = dict(wd=WD, multi_precision=multi_precision)
    params = functools.partial(tree, shapes, dtype, 1.0)
    grads = tree(shapes, dtype, 0.5)
    size = sum(int(np.prod(s)) for s in shapes)
    contenders = {
        "mx_adagrad.adagrad": transform_contender(
            mx_adagrad.adagrad(LR, **kwargs), params(), grads
        ),
        "flat.fused_adagrad (native)": fused_contender(
            flat.fused_adagrad(LR, **kwargs), params(), grads
        ),
        "mx_adagrad.legacy.adagrad (MXNet 1.x)": transform_contender(
            mx_adagrad.legacy.adagrad(LR, **kwargs), params(), grads
        ),
        "flat.one_pass(legacy.adagrad) (native)": fused_contender(
            flat.one_pass(mx_adagrad.legacy.adagrad(LR, **kwargs)), params(), grads
        ),
    }
    if len(shapes) > 1:
        fp = flat.ravel(params())
        flat_grads = fp.ravel_like(grads)
        mults = dict(lr_mult=fp.lr_mult, wd_mult=fp.wd_mult)
        contenders["flat mode: mx_adagrad.adagrad on FlatParams"] = transform_contender(
            mx_adagrad.adagrad(LR, **kwargs, **mults), flat.ravel(params()), flat_grads
        )
        contenders["flat mode + fused (native)"] = fused_contender(
            flat.fused_adagrad(LR, **kwargs, **mults), flat.ravel(params()), flat_grads
        )
        contenders["FlatParams.unravel() (not a step)"] = unravel_contender(fp)
    if tiny:
        one = [(size,)]
        contenders["mx_adagrad.adagrad, one leaf of the same size"] = transform_contender(
            mx_adagrad.adagrad(LR, **kwargs), tree(one, dtype, 1.0), tree(one, dtype, 0.5)
        )
        contenders["flat.fused_adagrad (native), one leaf of the same size"] = fused_contender(
            flat.fused_adagrad(LR, **kwargs), tree(one, dtype, 1.0), tree(one, dtype, 0.5)
        )
    optax_tx = optax.chain(
        optax.add_decayed_weights(WD), optax.adagrad(LR, initial_accumulator_value=0.0, eps=EPS)
    )
    name = OPTAX + (" (no master copy)" if multi_precision else "")
    contenders[name] = transform_contender(optax_tx, params(), grads, optax.apply_updates)
    torch_dtype = jnp.dtype(dtype).name
    for name, run in torch_contenders(shapes, torch_dtype).items():
        contenders[name + (" (no master copy)" if multi_precision else "")] = run
    # Ideal traffic per parameter: read w, g, history (+ master), write w, history (+ master).
    width = jnp.dtype(dtype).itemsize
    state_bytes = 8 if multi_precision else width
    per_param = (2 * width + state_bytes) + (width + state_bytes)
    name, run = copy_contender(size * per_param)
    contenders[name] = run
    return contenders


def compile_seconds(shapes, repeats: int) -> dict[str, float]:
    """Median seconds to trace, lower and compile one jitted step, per contender, for ``shapes``."""
    params, grads = tree(shapes, jnp.float32, 1.0), tree(shapes, jnp.float32, 0.5)
    fp = flat.ravel(params)
    mults = dict(lr_mult=fp.lr_mult, wd_mult=fp.wd_mult)
    optax_tx = optax.chain(
        optax.add_decayed_weights(WD), optax.adagrad(LR, initial_accumulator_value=0.0, eps=EPS)
    )

    def transform_step(tx, apply=mx_adagrad.apply_updates):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return apply(params, updates), state

        return step

    reference, flat_tx = mx_adagrad.adagrad(LR, wd=WD), mx_adagrad.adagrad(LR, wd=WD, **mults)
    fused = flat.fused_adagrad(LR, wd=WD)
    cases = {
        "mx_adagrad.adagrad": (transform_step(reference), reference.init, params, grads),
        "flat.fused_adagrad (native)": (
            lambda params, state, grads: fused.step(params, grads, state),
            fused.init,
            params,
            grads,
        ),
        "flat mode: mx_adagrad.adagrad on FlatParams": (
            transform_step(flat_tx),
            flat_tx.init,
            fp,
            fp.ravel_like(grads),
        ),
        OPTAX: (transform_step(optax_tx, optax.apply_updates), optax_tx.init, params, grads),
    }
    seconds = {}
    for name, (step, init, p, g) in cases.items():
        state = init(p)
        samples = []
        for _ in range(repeats):
            jax.clear_caches()  # else XLA's in-memory cache returns the executables compiled above
            start = time.perf_counter()
            jax.jit(step, donate_argnums=(0, 1)).lower(p, state, g).compile()
            samples.append(time.perf_counter() - start)
        seconds[name] = statistics.median(samples)
    return seconds


def torch_base(names) -> str | None:
    """The contender every ratio is taken against: torch's fused step, when it ran."""
    return next((n for n in names if n.startswith(TORCH_FUSED)), None)


def print_case(title: str, stats: dict[str, dict[str, float]]) -> None:
    optax_ms = next((s["median_ms"] for n, s in stats.items() if n.startswith(OPTAX)), None)
    print(f"\n### {title}\n")
    print("| contender | ms / step | p10 ms | ÷ torch fused (p10-p90) | optax ÷ this |")
    print("|---|---|---|---|---|")
    for name, s in stats.items():
        ms = s["median_ms"]
        vs_torch = (
            f"{s['ratio_median']:.2f} ({s['ratio_p10']:.2f}-{s['ratio_p90']:.2f})"
            if "ratio_median" in s
            else "n/a"
        )
        vs_optax = f"{optax_ms / ms:.2f}" if optax_ms else "n/a"
        print(f"| {name} | {ms:.3f} | {s['p10_ms']:.3f} | {vs_torch} | {vs_optax} |")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(11, 2.2 + 0.42 * sum(map(len, cases.values())))
    )
    for ax, (title, stats) in zip(np.atleast_1d(axes), cases.items()):
        names = list(stats)
        ms = [stats[n]["median_ms"] for n in names]
        colors = [
            "tab:blue" if n.startswith(("mx_adagrad", "flat", "FlatParams")) else "tab:gray"
            for n in names
        ]
        ax.barh(names, ms, color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        ax.tick_params(labelsize=8)
        for y, value in enumerate(ms):
            ax.text(value, y, f" {value:.3g}", va="center", fontsize=7)
    np.atleast_1d(axes)[-1].set_xlabel("ms / step (median, log scale)")
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds and one compile per contender (about a minute)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "bench.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "bench.png")
    args = parser.parse_args()
    count, block, repeats = (6, 3, 1) if args.quick else (20, 5, 3)
    if torch is None:
        print("torch is not installed: torch.optim.Adagrad and torch copy_ are left out")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    if not _native.load():
        print("the native kernel is unavailable: 'native' rows run the XLA path")

    resnet, tiny = resnet50_shapes(), tiny_shapes()
    sizes = {
        "resnet": sum(int(np.prod(s)) for s in resnet),
        "tiny": sum(int(np.prod(s)) for s in tiny),
    }
    dense = {
        "16M float32 leaf": ([(16 * 1024 * 1024,)], jnp.float32, False),
        f"ResNet-50 tree, float32 ({len(resnet)} leaves, {sizes['resnet'] / 1e6:.1f}M)": (
            resnet,
            jnp.float32,
            False,
        ),
        f"1000 tiny float32 leaves ({sizes['tiny'] / 1e3:.0f}k params)": (tiny, jnp.float32, True),
        "16M bfloat16 leaf, multi_precision": ([(16 * 1024 * 1024,)], jnp.bfloat16, False),
        "ResNet-50 tree, bfloat16, multi_precision": (resnet, jnp.bfloat16, False),
    }
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
        "jax": jax.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "quick": args.quick,
        "rounds": count,
        "block": block,
        "cases": {},
        "compile_s": {},
    }
    for title, (shapes, dtype, is_tiny) in dense.items():
        contenders = dense_case(shapes, dtype, tiny=is_tiny)
        stats = timing.summarize(timing.rounds(contenders, count, block), torch_base(contenders))
        results["cases"][title] = stats
        print_case(title, stats)
        gc.collect()

    print("\n### compile time (trace + lower + compile, caches cleared), seconds\n")
    print("| tree | contender | s |\n|---|---|---|")
    for label, shapes in (("ResNet-50 (161 leaves)", resnet), ("1000 tiny leaves", tiny)):
        seconds = compile_seconds(shapes, repeats)
        results["compile_s"][label] = seconds
        for name, s in seconds.items():
            print(f"| {label} | {name} | {s:.2f} |")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    chart(results, args.png)
    print(f"\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
