"""The digits data, batching, run history and plots shared by the Flax and Haiku examples.

scikit-learn's 8x8 handwritten digits (1797 images, bundled: no download), split 75/25 into train
and test sets, stratified by class, pixels scaled to [0, 1].
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclasses.dataclass(frozen=True)
class Digits:
    """The digits data set, split into train and test sets; pixels scaled to [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass(frozen=True)
class History:
    """What a training run recorded: the loss of every step and the periodic test accuracy."""

    losses: np.ndarray
    eval_steps: list[int]
    accuracies: list[float]

    @property
    def test_accuracy(self) -> float:
        """The test accuracy at the end of training."""
        return self.accuracies[-1]


def load_data(seed: int) -> Digits:
    """Loads the digits and splits them 75/25, stratified by class."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32),
        y.astype(np.int32),
        test_size=0.25,
        stratify=y,
        random_state=seed,
    )
    return Digits(x_train, y_train, x_test, y_test)


def batches(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Yields index batches over ``n`` examples forever, reshuffled every epoch.

    The last, incomplete batch of an epoch is dropped so that every batch has the same shape and
    the train step compiles once.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def plot(history: History, out: pathlib.Path, title: str) -> None:
    """Writes the training loss and test accuracy curves to ``out`` (PNG, rendered by Agg)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(1, len(history.losses) + 1), history.losses, lw=0.8)
    loss_ax.set(xlabel="step", ylabel="train loss (batch mean)", yscale="log", title="loss")
    acc_ax.plot(history.eval_steps, history.accuracies, marker=".")
    acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(0.0, 1.0), title="test accuracy")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def parse_args(description: str, default_out: pathlib.Path, argv: Sequence[str] | None):
    """The examples' flags: --steps, --learning-rate, --seed, --batch-size, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=default_out)
    return parser.parse_args(argv)
