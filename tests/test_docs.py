"""The documentation cannot drift from the code.

* Every ```python block of README.md and of each page under docs/ runs, in order, in one namespace
  per page (as a reader would run them), from the repository root.
* The Sphinx site builds with warnings as errors (broken cross-references included), and its API
  reference holds every public name of the package.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
# The modules whose public names the API reference must hold: __all__ where a module has one,
# else every name without a leading underscore defined in the module itself.
API_MODULES = [
    "mx_adagrad",
    "mx_adagrad.bags",
    "mx_adagrad.compat",
    "mx_adagrad.contrib",
    "mx_adagrad.flat",
    "mx_adagrad.flax",
    "mx_adagrad.legacy",
    "mx_adagrad.lr_scheduler",
    "mx_adagrad.multipliers",
    "mx_adagrad.mxnet_io",
    "mx_adagrad.sharding",
    "mx_adagrad.sparse",
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_pages_have_code():
    """The README and every guide show runnable code (a regex that silently matched nothing
    would make the test below vacuous)."""
    for page in [ROOT / "README.md", *sorted((DOCS / "guides").glob("*.md"))]:
        if page.stem not in ("performance", "differences", "testing"):
            assert python_blocks(page), f"{page.relative_to(ROOT)} has no ```python block"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # the blocks name files relative to the repository root
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for number, block in enumerate(python_blocks(page), start=1):
        where = f"{page.relative_to(ROOT)} python block {number}"
        exec(compile(block, where, "exec"), namespace)


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", None) == module_name
        and (inspect.isfunction(value) or inspect.isclass(value))
    ]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site built as `make docs` builds it (`-W`: a warning fails the build)."""
    pytest.importorskip("sphinx", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("html")
    # In a child process: autodoc rewrites the signatures of what it documents (preserved
    # defaults), which would leak into every later test of this process.
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", DOCS, out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"the Sphinx build failed or warned:\n{build.stderr}"
    return out


def test_docs_build_without_warnings(built_site):
    assert (built_site / "index.html").exists()
    assert (built_site / "api" / "mx_adagrad.html").exists()


def test_api_reference_holds_every_public_name(built_site):
    from sphinx.util.inventory import InventoryFile

    with open(built_site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for entries in inventory.values() for name in entries}
    # A name re-exported at the top level (mx_adagrad.sparse.RowSparse is mx_adagrad.RowSparse) is
    # documented once, there.
    top = importlib.import_module("mx_adagrad")
    missing = [
        f"{module}.{name}"
        for module in API_MODULES
        for name in public_names(module)
        if f"{module}.{name}" not in documented
        and not (
            f"mx_adagrad.{name}" in documented
            and getattr(top, name, None) is getattr(importlib.import_module(module), name)
        )
    ]
    assert not missing, f"public names without an entry in the API reference: {missing}"
