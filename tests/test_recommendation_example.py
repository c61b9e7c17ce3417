"""examples/recommendation.py: the DLRM with EmbedBag tables learns the planted clicks.

The example's ``--quick`` run (small tables, 80 steps of 256) is run in-process: its loss falls
from log 2 on the training stream and on the held-out set, its held-out AUC is well above chance,
it prints its final losses and writes the loss-curve PNG where ``--out`` says.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
pytest.importorskip("sklearn", reason="scikit-learn is in the examples extra")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "recommendation.py"


def load_example() -> ModuleType:
    """Imports ``examples/recommendation.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("example_recommendation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    """``(run, png path, what main printed)`` of ``--quick``."""
    out = tmp_path_factory.mktemp("recommendation") / "loss.png"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = load_example().main(["--quick", "--out", str(out)])
    return run, out, printed.getvalue()


def test_loss_falls_on_the_stream_and_the_held_out_set(quick_run) -> None:
    run, _, _ = quick_run
    losses = run.losses
    assert len(losses) == 80 and np.all(np.isfinite(losses))
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # tables near zero: no signal yet
    assert losses[-20:].mean() < losses[:5].mean() - 0.1
    assert run.held_out_losses[0] == pytest.approx(math.log(2), abs=0.05)
    assert run.held_out["loss"] == pytest.approx(run.held_out_losses[-1])
    assert run.held_out["loss"] < math.log(2) - 0.1
    assert run.train["loss"] < math.log(2) - 0.1
    # Above chance, and not above the planted probabilities (the best any model can do).
    assert 0.7 < run.held_out["auc"] < run.planted["auc"] + 0.01


def test_writes_the_png_and_prints_the_final_losses(quick_run) -> None:
    run, out, printed = quick_run
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    held_out, train = run.held_out, run.train
    assert f"final held-out loss {held_out['loss']:.4f}  AUC {held_out['auc']:.4f}" in printed
    assert f"final train    loss {train['loss']:.4f}  AUC {train['auc']:.4f}" in printed
    assert f"loss curves written to {out}" in printed
