"""Sphinx configuration of the mx_adagrad site (``make docs``; warnings are errors there)."""

from __future__ import annotations

import mx_adagrad

project = "mx_adagrad"
author = "mx_adagrad contributors"
copyright = "the mx_adagrad contributors, Apache-2.0"
release = version = mx_adagrad.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

# MyST: `[text](page.md#a-heading)` links resolve against headings up to level 3; `$` math off.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Every reference must resolve (`-W` turns a broken one into a failed build). Names from other
# libraries appear in signatures (optax, chex, jax); without intersphinx (the build is offline)
# they are left as text rather than reported.
nitpicky = True
# Private names (a component starting with "_": `_checks.SparseLeaf`, `sharding._Split`) are not
# in the reference by design; a signature that names one shows it as text.
_EXTERNAL = (
    "optax|chex|jax|jaxlib|jnp|np|numpy|flax|nnx|typing|collections|os|pathlib|enum|types|abc"
)
nitpick_ignore_regex = [
    (r"py:(class|obj|data|exc|func)", rf"({_EXTERNAL})(\..*)?"),
    (
        r"py:(class|obj)",
        r"Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|Path|PathLike",
    ),
    (r"py:(class|obj)", r"ArrayLike|Array|ArrayTree|Numeric|PRNGKey|Mesh|State"),
    (r"py:(class|obj|mod|meth|func|data)", r"(.*\.)?_[A-Za-z]\w*(\..*)?"),
    # Type aliases as the signatures spell them; each is described under "Types" in the reference.
    (r"py:(class|obj)", r"transforms\.LearningRate|multipliers\.MultiplierSpec|TrainerOrder"),
]

autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
# A long signature gets one parameter a line.
python_maximum_signature_line_length = 90
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as fields of the class, not second descriptions of the members autodoc lists.
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"mx_adagrad {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}
pygments_style = "friendly"
highlight_language = "text"  # an unlabelled block is a formula, not Python
