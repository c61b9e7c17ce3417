"""The benchmark harness's own claims, checked without timing anything.

``benchmarks/fused_vs_torch.py`` says torch's fused kernel and the native step alternate on the
very same buffers and that XLA still updates them in place; ``benchmarks/timing.py`` says its
ratios are paired per round. Both are checked here; no speed is asserted.
``benchmarks/bag_step.py --quick`` runs end to end in a subprocess: its JSON holds every
contender, and mx_adagrad's tables agree with FBGEMM's (and torch's) after the same steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx_adagrad import flat
from tests.reference import mxnet2_step

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import timing


def test_summarize_pairs_ratios_within_rounds():
    # The base is slow in round 0 and fast in round 1: unpaired medians would call a 2x faster
    # contender about as fast; paired ratios say 0.5 every round.
    rounds = [{"a": 1.0, "base": 2.0}, {"a": 0.1, "base": 0.2}, {"a": 0.5, "base": 1.0}]
    stats = timing.summarize(rounds, "base")
    assert stats["a"]["ratio_median"] == pytest.approx(0.5)
    assert stats["a"]["ratio_p10"] == pytest.approx(0.5)
    assert stats["a"]["median_ms"] == pytest.approx(500.0)
    assert stats["base"]["ratio_median"] == pytest.approx(1.0)
    assert "ratio_median" not in timing.summarize(rounds, None)["a"]


def test_rounds_runs_every_contender_once_per_call_and_block():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def run():
            calls[name] += 1

        return run

    results = timing.rounds({"a": counter("a"), "b": counter("b")}, 3, block=4, pause=0.0)
    assert len(results) == 3 and all(set(r) == {"a", "b"} for r in results)
    assert calls == {"a": 3 * 5, "b": 3 * 5}  # one untimed call plus the block, per round


@pytest.mark.parametrize("flat_mode", [False, True])
def test_torch_steps_the_native_steps_buffers_in_place(flat_mode):
    pytest.importorskip("torch", reason="torch is not installed")
    import fused_vs_torch

    shapes = [(5, 3), (7,), (1,)]
    rng = np.random.default_rng(0)
    params = {f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
    grads = {f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
    lr, wd, eps = fused_vs_torch.run.LR, fused_vs_torch.run.WD, fused_vs_torch.run.EPS
    raw_grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    weights = {k: np.asarray(v, np.float64) for k, v in params.items()}
    history = {k: np.zeros_like(v) for k, v in weights.items()}
    opt = flat.fused_adagrad(lr, wd=wd, epsilon=eps)
    if flat_mode:
        params, grads = flat.ravel(params), flat.ravel(params).ravel_like(grads)
        opt = flat.fused_adagrad(
            lr, wd=wd, epsilon=eps, lr_mult=params.lr_mult, wd_mult=params.wd_mult
        )
    shared = fused_vs_torch.SharedBuffers(opt, params, grads, shapes)
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((shared.params, shared.state))]
    # ours, torch's twice, ours, torch's, ours: the last drops torch's views first, as before
    # every native block. Six AdaGrad steps of the same formula on the same buffers.
    for step in (
        shared.ours,
        shared.theirs,
        shared.theirs,
        shared.ours,
        shared.theirs,
        shared.ours,
    ):
        step()
        for k in weights:
            weights[k], history[k] = mxnet2_step(
                weights[k], raw_grads[k], history[k], lr=lr, wd=wd, epsilon=eps
            )
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((shared.params, shared.state))]
    assert after == before  # every step, ours and torch's, wrote the same buffers
    final = shared.params.unravel() if flat_mode else shared.params
    for k, expected in weights.items():
        np.testing.assert_allclose(np.asarray(final[k], np.float64), expected, rtol=1e-5)


def test_bag_step_quick_runs_every_contender_and_agrees_with_fbgemm(tmp_path):
    """``benchmarks/bag_step.py --quick`` end to end (small tables, 2 rounds): every workload
    times its contenders (positive times, floors and ratios), records the compiled step's memory
    (temporaries well under the looked-up rows when pooled) and, where FBGEMM imports, mx's tables
    after a few steps agree with FBGEMM's (and torch's) within float32 tolerance."""

    root = Path(__file__).parents[1]
    out = tmp_path / "bag_step.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bag_step.py"), "--quick", "--json", str(out)],
        check=True,
        cwd=root,
        timeout=120,
    )
    record = json.loads(out.read_text())
    try:
        import torch  # noqa: F401
    except ImportError:
        torch_here = False
    else:
        torch_here = True
    try:  # the script's import: ImportError, or OSError from its native libraries
        with warnings.catch_warnings():  # its optional SSD lookups warn that they are absent
            warnings.simplefilter("ignore", DeprecationWarning)
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: F401
                SplitTableBatchedEmbeddingBagsCodegen,
            )
    except Exception:
        fbgemm_here = False
    else:
        fbgemm_here = True
    assert (record["fbgemm_skipped"] is None) == fbgemm_here
    assert record["quick"] and record["machine"]["cpu_count"] >= 1
    expected = {"mx row-wise", "mx element-wise"}
    if torch_here:
        expected.add("torch element-wise")
    if fbgemm_here:
        expected |= {"FBGEMM row-wise", "FBGEMM element-wise"}
    assert len(record["workloads"]) == 4
    for label, w in record["workloads"].items():
        assert set(w["stats"]) == expected, label
        for s in w["stats"].values():
            assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"], label
        assert all(len(ms) == record["rounds"] for ms in w["rounds_ms"].values())
        assert w["streaming_gbps"] > 0
        for optimizer in ("row-wise", "element-wise"):
            floor = w["floor"][optimizer]
            assert 0 < floor["cached_bytes"] <= floor["bytes"] and floor["ms"] > 0
            memory = w["memory"][optimizer]
            if w["pooling"] == "sum":  # never a row per lookup
                assert memory["temp_bytes"] < memory["lookup_rows_bytes"] / 2, label
            assert w["checks"][f"mx {optimizer} moved"] > 1e-3  # the steps did update the tables
            if fbgemm_here:
                assert w["ratios"][f"mx/FBGEMM {optimizer}"]["median"] > 0
                diff = w["checks"][f"mx {optimizer} vs FBGEMM {optimizer}"]
                assert diff <= record["check_tolerance"], (label, optimizer, diff)
        if torch_here:
            assert w["ratios"]["mx/torch element-wise"]["median"] > 0
            diff = w["checks"]["mx element-wise vs torch element-wise"]
            assert diff <= record["check_tolerance"], label
