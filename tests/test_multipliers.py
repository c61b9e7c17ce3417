"""lr_mult / wd_mult specs resolved against a params pytree."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import pytest

from mx_adagrad import multipliers

PARAMS = {"enc": {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}, "head": jnp.ones(3)}


def resolve(spec):
    return multipliers.resolve("test", "lr_mult", spec, PARAMS)


def test_none_means_one_everywhere():
    assert resolve(None) == {"enc": {"dense": {"kernel": 1.0, "bias": 1.0}}, "head": 1.0}


def test_pytree_is_taken_leaf_for_leaf():
    spec = {"enc": {"dense": {"kernel": 0.1, "bias": 0.2}}, "head": 0.3}
    assert resolve(spec) == spec


def test_callable_receives_the_tree():
    got = resolve(lambda tree: {"enc": {"dense": {"kernel": 2.0, "bias": 0.0}}, "head": 1.0})
    assert got["enc"]["dense"]["kernel"] == 2.0


def test_paths_name_leaves_or_subtrees_and_longest_wins():
    got = resolve({"enc": 0.5, "enc/dense/bias": 0.0})
    assert got == {"enc": {"dense": {"kernel": 0.5, "bias": 0.0}}, "head": 1.0}


def test_top_level_key_is_its_own_path():
    assert resolve({"head": 4.0})["head"] == 4.0


def test_attribute_and_index_paths():
    class Layer(NamedTuple):
        kernel: jnp.ndarray
        bias: jnp.ndarray

    tree = [jnp.ones(1), (jnp.ones(1), Layer(jnp.ones(1), jnp.ones(1)))]
    got = multipliers.resolve("test", "lr_mult", {"1/0": 3.0, "1/1/bias": 0.0}, tree)
    assert got == [1.0, (3.0, Layer(1.0, 0.0))]


def test_unknown_path_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"lr_mult path 'enc/dense/kern' must be the path of a"):
        resolve({"enc/dense/kern": 0.5})


def test_bad_values_are_errors_naming_the_path():
    with pytest.raises(ValueError, match=r"lr_mult\['head'\] must be >= 0, got -1.0"):
        resolve({"head": -1.0})
    with pytest.raises(ValueError, match=r"lr_mult\['enc/dense/bias'\] must be finite"):
        resolve({"enc": {"dense": {"kernel": 1.0, "bias": float("nan")}}, "head": 1.0})


def test_wrong_structure_is_an_error():
    with pytest.raises(ValueError, match="lr_mult must be a pytree with the parameters' structure"):
        resolve([1.0, 2.0])
