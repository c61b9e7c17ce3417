"""examples/sparse_embedding.py: word2vec with RowSparse gradients follows the dense path's losses.

The example trains the same skip-gram model twice, from the same tables on the same batches, once
with the tables' gradients as ``mx_adagrad.RowSparse`` rows and once with dense gradients. A short
run with small tables checks that it learns, that the two loss trajectories coincide, and that it
reports the speed of both paths.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sparse_embedding.py"
FLAGS = ["--steps", "150", "--dim", "32", "--batch-size", "64", "--vocab-size", "2000"]


def load_example() -> ModuleType:
    """Imports ``examples/sparse_embedding.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("example_sparse_embedding", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result() -> dict[str, object]:
    return load_example().main(FLAGS)


def test_loss_falls(result: dict[str, object]) -> None:
    losses = result["losses"]["sparse"]
    assert len(losses) == 150
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < 0.9 * losses[:20].mean()


def test_sparse_and_dense_losses_follow_the_same_trajectory(result: dict[str, object]) -> None:
    # The paths compute the same loss on the same rows; they differ only in how the gradient rows
    # of a word looked up several times in a batch are summed (RowSparse: a segment-sum after
    # sorting the ids; dense: the scatter-add into the table-sized gradient). That reorders float32
    # additions, so losses differ in their last bits (about 1e-6 relative), not bitwise; AdaGrad's
    # normalized steps do not amplify this over the run. rtol=1e-4 leaves that room and still fails
    # on any real divergence, such as an update to an untouched row or a lost duplicate.
    losses = result["losses"]
    np.testing.assert_allclose(losses["sparse"], losses["dense"], rtol=1e-4)
    assert result["max_loss_difference"] == pytest.approx(
        float(np.max(np.abs(losses["sparse"] - losses["dense"])))
    )


def test_reports_the_speed_of_both_paths(result: dict[str, object]) -> None:
    speeds = result["steps_per_second"]
    assert set(speeds) == {"sparse", "dense"}
    assert all(math.isfinite(speed) and speed > 0 for speed in speeds.values())
