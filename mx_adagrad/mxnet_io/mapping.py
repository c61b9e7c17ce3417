"""Step 7: which Gluon array goes to which leaf of the JAX model: ``name_map``, or pairing by order.

A target leaf is named by its path: dict keys, attribute names and sequence indices joined with
``"/"`` (``{"layers": {0: {"kernel": w}}}`` has the path ``"layers/0/kernel"``), as everywhere in
mx_adagrad. A Gluon array is named by its structural name (``"1.weight"``).

**Pairing by order** (``name_map=None``), for plain sequential nets:

* Gluon's layers are the structural prefixes (``"1"`` for ``"1.weight"``) in the order of
  ``arrays``; :func:`~mx_adagrad.mxnet_io.load_params` keeps the file's order, which is the order
  Gluon registered the blocks. Numeric prefixes must increase (a dict sorted as strings, with
  ``"10"`` before ``"2"``, is refused).
* The target's layers are the paths that hold its leaves. They are ordered only when they are one
  path with one varying number: ``layers/0, layers/1, ...`` (``nnx.Sequential``, ``nnx.List``),
  ``layers_0, layers_1, ...`` (Linen ``nn.Sequential``), ``Dense_0, Dense_1, ...`` (one Linen module
  type), ``linear, linear_1, ...`` (one Haiku module type; no number counts as 0). Anything else
  (named attributes, which ``nnx`` sorts alphabetically; modules of several types, each numbered
  on its own) is ambiguous and refused: pass ``name_map``.
* The ``i``-th Gluon layer pairs with the ``i``-th target layer, and within a layer each target
  leaf takes the Gluon parameter its name takes (a ``kernel`` the ``weight``, a ``scale`` the
  ``gamma``, see :mod:`.layouts`; a leaf with another name the parameter of the same name). Every
  Gluon array must find a leaf, except BatchNorm's ``running_mean``/``running_var`` when the
  target holds no statistics at all (no leaf named ``mean``, ``var`` or ``average``: a
  parameters-only target such as ``nnx.state(model, nnx.Param)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

from mx_adagrad._checks import fail, shown
from mx_adagrad.mxnet_io.layouts import SOURCES, STATISTICS, parameter_name

# Entries listed in a message before the rest are only counted.
_MAX_LISTED = 8
_NUMBERED = re.compile(r"(.*?)_?(\d+)")


class Leaf(NamedTuple):
    """One leaf of the target: its path, the keys along it, and what it holds."""

    path: str
    keys: tuple[str, ...]
    value: Any

    @property
    def name(self) -> str:
        return self.keys[-1]

    @property
    def layer(self) -> tuple[str, ...]:
        return self.keys[:-1]


def listed(items: Sequence[Any]) -> str:
    """``'a', 'b', ... and 3 more``: the first entries of a list, for messages."""
    shown_items = ", ".join(repr(item) for item in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown_items + (f" and {more} more" if more > 0 else "")


def entry(gluon: str, path: str, explicit: bool) -> str:
    """How a message names one pairing: the name_map entry, or the pair found by order."""
    if explicit:
        return f"name_map[{gluon!r}] = {path!r}"
    return f"{gluon!r} -> {path!r} (paired by order)"


def target_leaves(where: str, target: Any) -> list[Leaf]:
    """The target's leaves in ``jax.tree.leaves`` order; each must have a shape and a dtype."""
    flat, _ = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for key_path, value in flat:
        keys = tuple(jax.tree_util.keystr((key,), simple=True) for key in key_path)
        leaf = Leaf("/".join(keys), keys, value)
        if keys and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
            fail(
                where,
                "target",
                "a pytree of arrays (an nnx.State holds Variables: pass "
                "nnx.to_pure_dict(nnx.state(model)))",
                shown(f"a leaf at {leaf.path!r}"),
            )
        if not (hasattr(value, "shape") and hasattr(value, "dtype")) or not keys:
            fail(
                where,
                f"target leaf {leaf.path!r}",
                "an array or a jax.ShapeDtypeStruct in a pytree of them",
                value,
            )
        leaves.append(leaf)
    return leaves


def kept(where: str, keep: Any, leaves: list[Leaf]) -> set[str]:
    """The paths of the leaves that ``keep`` names (a leaf's path, or a subtree's)."""
    if isinstance(keep, str) or not isinstance(keep, Sequence):
        fail(where, "keep", "a sequence of paths in target", keep)
    paths = set()
    for prefix in keep:
        named = [
            leaf.path
            for leaf in leaves
            if isinstance(prefix, str)
            and (leaf.path == prefix or leaf.path.startswith(prefix + "/"))
        ]
        if not named:
            fail(
                where,
                "every entry of keep",
                f"the path of a leaf or subtree of target ({listed([x.path for x in leaves])})",
                prefix,
            )
        paths.update(named)
    return paths


def explicit_pairs(
    where: str, arrays: Mapping[str, Any], leaves: list[Leaf], name_map: Any, keep: set[str]
) -> tuple[dict[str, str], list[str]]:
    """``{path: gluon name}`` from ``name_map``, and the problems with its entries."""
    if not isinstance(name_map, Mapping):
        fail(where, "name_map", "None or a dict {gluon name: path in target}", name_map)
    paths = {leaf.path for leaf in leaves}
    pairs: dict[str, str] = {}
    problems = []
    for gluon, path in name_map.items():
        if not isinstance(gluon, str) or not isinstance(path, str):
            fail(where, f"name_map entry {gluon!r}: {path!r}", "a str: str pair", (gluon, path))
        named = entry(gluon, path, explicit=True)
        if gluon not in arrays:
            problems.append(
                f"{named} must have a Gluon name in arrays ({listed(list(arrays))}), got {gluon!r}"
            )
        if path not in paths:
            problems.append(
                f"{named} must have the path of a leaf of target "
                f"({listed(sorted(paths))}), got {path!r}"
            )
        elif path in keep:
            problems.append(f"{named} must have a path that keep does not list, got {path!r}")
        elif path in pairs:
            problems.append(
                f"{named} must have a path no other entry has, got {path!r} "
                f"(also name_map[{pairs[path]!r}])"
            )
        else:
            pairs[path] = gluon
    return pairs, problems


def _layer_numbers(layers: list[tuple[str, ...]]) -> list[int] | None:
    """The number of each target layer, or None unless the layers differ by one number only."""
    if len(layers) == 1:
        return [0]
    if len({len(layer) for layer in layers}) != 1:
        return None
    varying = [i for i in range(len(layers[0])) if len({layer[i] for layer in layers}) > 1]
    if len(varying) != 1:
        return None
    stems, numbers = set(), []
    for layer in layers:
        match = _NUMBERED.fullmatch(layer[varying[0]])
        stems.add(match.group(1) if match else layer[varying[0]])
        numbers.append(int(match.group(2)) if match else 0)
    if len(stems) != 1 or len(set(numbers)) != len(numbers):
        return None
    return numbers


def _gluon_layers(where: str, names: list[str]) -> dict[str, list[str]]:
    """The Gluon arrays grouped by structural prefix, in the order of ``names``."""
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    numbers = [int(prefix) for prefix in layers if prefix.isdigit()]
    if len(numbers) == len(layers) and numbers != sorted(numbers):
        fail(
            where,
            "the Gluon layers of arrays (name_map=None pairs them in the order of arrays)",
            "in the order of the file (load_params keeps it), with increasing numbers",
            shown(", ".join(layers)),
        )
    return layers


def pairs_by_order(
    where: str, arrays: Mapping[str, Any], leaves: list[Leaf], keep: set[str]
) -> dict[str, str]:
    """``{path: gluon name}`` for a plain sequential net (the rule in the module docstring)."""
    leaves = [leaf for leaf in leaves if leaf.path not in keep]
    target_layers: dict[tuple[str, ...], list[Leaf]] = {}
    for leaf in leaves:
        target_layers.setdefault(leaf.layer, []).append(leaf)
    statistics = any(leaf.name in ("mean", "var", "average") for leaf in leaves)
    names = [n for n in arrays if statistics or parameter_name(n) not in STATISTICS]
    gluon_layers = _gluon_layers(where, names)
    shown_target = ", ".join(repr("/".join(layer)) for layer in target_layers)
    shown_gluon = ", ".join(repr(prefix) for prefix in gluon_layers)
    numbers = _layer_numbers(list(target_layers))
    if numbers is None:
        fail(
            where,
            "the target's layers (name_map=None pairs layers by order)",
            "one path with one varying number, as in a plain sequential net (layers/0, "
            "layers/1, ...; layers_0, layers_1, ...; linear, linear_1, ...): pass "
            "name_map={gluon name: path in target}",
            shown(shown_target),
        )
    ordered = [layer for _, layer in sorted(zip(numbers, target_layers))]
    if len(ordered) != len(gluon_layers):
        fail(
            where,
            "the target's layers (name_map=None pairs layers by order)",
            f"as many as the Gluon layers with arrays ({len(gluon_layers)}: {shown_gluon}); "
            "pass name_map={gluon name: path in target}",
            shown(f"{len(ordered)}: {shown_target}"),
        )
    pairs = {}
    for prefix, layer in zip(gluon_layers, ordered):
        gluon = list(gluon_layers[prefix])
        for leaf in target_layers[layer]:
            takes = SOURCES.get(leaf.name, (leaf.name,))
            candidates = [name for name in gluon if parameter_name(name) in takes]
            if len(candidates) != 1:
                fail(
                    where,
                    f"target leaf {leaf.path!r} (paired by order with the Gluon layer {prefix!r})",
                    f"the place of exactly one Gluon array of that layer ({', '.join(takes)}); "
                    "pass name_map={gluon name: path in target}",
                    shown(f"{len(candidates)} among {listed(gluon_layers[prefix])}"),
                )
            pairs[leaf.path] = candidates[0]
            gluon.remove(candidates[0])
        if gluon:
            fail(
                where,
                f"every Gluon array of the layer {prefix!r} (paired by order with the target "
                f"layer {'/'.join(layer)!r})",
                "the source of a leaf of that layer; pass name_map={gluon name: path in target}",
                shown(f"no place for {listed(gluon)}"),
            )
    return pairs
