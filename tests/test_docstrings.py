"""Every example in the package's docstrings runs and prints what it says (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mx_adagrad

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(mx_adagrad.__path__, prefix="mx_adagrad.")
    if not info.name.rsplit(".", 1)[-1].startswith("_") or info.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, report=True)
    assert failures == 0, f"{failures} docstring example(s) of {name} failed (see the output)"
