"""Timing for the benchmarks: steady-state blocks, interleaved rounds, ratios paired per round.

A round runs every contender once, in a fresh random order: a pause (the previous contender's
worker threads go idle: XLA's and OpenMP's spin for a while after work), one untimed call (wakes
this contender's threads, as the backward pass does in a training loop), then ``block`` timed calls
back to back; the round's figure is their mean. Rounds repeat, so drift on a shared machine hits
every contender alike, and a ratio is taken within each round (both contenders ran seconds apart)
before its median over rounds is taken.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np

PAUSE = 0.05  # seconds before each contender's block


def rounds(
    contenders: dict[str, Callable[[], object]],
    count: int,
    block: int = 5,
    pause: float = PAUSE,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Seconds per call of each contender, one entry per round (the mean of its timed block)."""
    order, shuffle = list(contenders), random.Random(seed).shuffle
    results = []
    for _ in range(count):
        shuffle(order)
        times = {}
        for name in order:
            run = contenders[name]
            time.sleep(pause)
            run()
            start = time.perf_counter()
            for _ in range(block):
                run()
            times[name] = (time.perf_counter() - start) / block
        results.append({name: times[name] for name in contenders})
    return results


def summarize(results: list[dict[str, float]], base: str | None) -> dict[str, dict[str, float]]:
    """Per contender: median, p10 and p90 ms per call over rounds and, when ``base`` ran, the
    median and p10/p90 of the per-round ratio contender / base."""
    out = {}
    for name in results[0]:
        ms = np.array([r[name] for r in results]) * 1e3
        stats = {
            "median_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
        }
        if base is not None and base in results[0]:
            stats |= {f"ratio_{k}": v for k, v in paired_ratio(results, name, base).items()}
        out[name] = stats
    return out


def paired_ratio(results: list[dict[str, float]], name: str, base: str) -> dict[str, float]:
    """The median, p10 and p90 over rounds of ``name``'s time divided by ``base``'s in the same
    round."""
    ratio = np.array([r[name] / r[base] for r in results])
    return {
        "median": float(np.median(ratio)),
        "p10": float(np.percentile(ratio, 10)),
        "p90": float(np.percentile(ratio, 90)),
    }
