"""Step 6: the layout rules that turn one Gluon array into one leaf of a JAX model.

A rule is chosen by the target leaf's name (the last key of its path) and checked against the
Gluon parameter's name (the part after the last ``.`` of its structural name)::

    target leaf            Gluon parameter        conversion
    kernel, w              weight (out, in)       Dense: transpose -> (in, out)
    kernel, w              weight (O, I, *sp)     Conv1D/2D/3D: -> (*sp, I, O)
    embedding, embeddings  weight                 Embedding: unchanged
    scale                  gamma                  BatchNorm / LayerNorm: same values, reshaped
    bias, b, offset        bias, beta             same values, reshaped
    mean, var, average     running_mean/_var      BatchNorm statistics: same values, reshaped
    any other name         any                    unchanged (the shapes must be equal)

"Reshaped" adds or removes dimensions of size 1 only (Haiku's BatchNorm keeps ``scale``,
``offset`` and its moving averages as (1, ..., 1, C)). A Gluon parameter whose name is one of
``weight, bias, gamma, beta, running_mean, running_var`` must go to a leaf whose name takes it
(a ``gamma`` to a ``scale``, never to a ``bias``); other names (a custom Block's parameters) follow
the target leaf's rule. The same rule converts the weight, its AdaGrad history and its
``multi_precision`` master copy, so that the three stay aligned element for element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

# Target leaf name -> the Gluon parameter names it takes.
SOURCES = {
    "kernel": ("weight",),
    "w": ("weight",),
    "embedding": ("weight",),
    "embeddings": ("weight",),
    "scale": ("gamma",),
    "bias": ("bias", "beta"),
    "b": ("bias", "beta"),
    "offset": ("beta", "bias"),
    "mean": ("running_mean",),
    "var": ("running_var",),
    "average": ("running_mean", "running_var"),
}
GLUON_PARAMETERS = ("weight", "bias", "gamma", "beta", "running_mean", "running_var")
STATISTICS = ("running_mean", "running_var")
_KERNELS = ("kernel", "w")
_EMBEDDINGS = ("embedding", "embeddings")


class Rule(NamedTuple):
    """How one Gluon array becomes one target leaf: ``convert`` maps the Gluon layout to the target's.

    Attributes:
      name: the layer and its layout, for messages (``"Dense (out, in) -> (in, out)"``).
      convert: the permutation or reshape, on a numpy array of the Gluon shape.
    """

    name: str
    convert: Callable[[np.ndarray], np.ndarray]


class Refused(Exception):
    """No rule turns the Gluon array into the target leaf: what it must do, and what was found."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(expected, got)
        self.expected = expected
        self.got = got


def _transpose(weight: np.ndarray) -> np.ndarray:
    return weight.T


def _channels_last(weight: np.ndarray) -> np.ndarray:
    """(O, I, *spatial) -> (*spatial, I, O)."""
    return weight.transpose(*range(2, weight.ndim), 1, 0)


def _unchanged(array: np.ndarray) -> np.ndarray:
    return array


def _without_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def parameter_name(gluon_name: str) -> str:
    """``"features.3.gamma"`` -> ``"gamma"``: the parameter's name within its Gluon block."""
    return gluon_name.rsplit(".", 1)[-1]


def rule_for(
    gluon_name: str, shape: tuple[int, ...], leaf_name: str, target_shape: tuple[int, ...]
) -> Rule:
    """The rule that turns the Gluon array ``gluon_name`` of ``shape`` into a leaf ``leaf_name``.

    Raises:
      Refused: when the two names do not belong together, or the rule does not give
        ``target_shape``.
    """
    parameter = parameter_name(gluon_name)
    takes = SOURCES.get(leaf_name)
    if takes is not None and parameter in GLUON_PARAMETERS and parameter not in takes:
        leaves = [leaf for leaf, sources in SOURCES.items() if parameter in sources]
        raise Refused(
            f"go to a leaf named {' or '.join(leaves)} (the place of a Gluon {parameter})",
            f"a leaf named {leaf_name}",
        )
    if leaf_name in _KERNELS:
        if len(shape) == 2:
            rule = Rule("Dense (out, in) -> (in, out)", _transpose)
        elif 3 <= len(shape) <= 5:
            rule = Rule(
                f"Conv{len(shape) - 2}D (O, I, *spatial) -> (*spatial, I, O)", _channels_last
            )
        else:
            raise Refused(
                "be a Dense weight (out, in) or a Conv1D/2D/3D weight (O, I, *spatial) to go to "
                f"a {leaf_name}",
                f"Gluon shape {shape}",
            )
    elif leaf_name in _EMBEDDINGS:
        rule = Rule("Embedding (unchanged)", _unchanged)
    elif takes is not None:
        if _without_ones(shape) != _without_ones(target_shape):
            raise Refused(
                f"convert to the target's shape {target_shape} up to dimensions of size 1 (same "
                "values, reshaped)",
                f"Gluon shape {shape}",
            )
        return Rule("same values, reshaped", lambda array: array.reshape(target_shape))
    else:
        rule = Rule("unchanged", _unchanged)
    # A zero-byte array of the Gluon shape: the rule's shape without touching the data.
    converted = tuple(rule.convert(np.broadcast_to(np.empty((), np.bool_), shape)).shape)
    if converted != tuple(target_shape):
        became = "" if converted == tuple(shape) else f", which the rule turns into {converted}"
        raise Refused(
            f"convert to the target's shape {target_shape} after the rule {rule.name}",
            f"Gluon shape {shape}{became}",
        )
    return rule
