"""Sphinx configuration: the API reference from the docstrings, the tour from the README.

Built by ``tox -e docs`` with ``-W --keep-going``: a warning (a broken cross-reference, a bad
docstring, a public name without one: see _ext/publicdocs.py) fails the build, after all of them
are reported. changeloop is imported from the repository, not installed, so the docs describe
the source they are built with.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # changeloop itself
sys.path.insert(0, str(HERE / "_ext"))  # publicdocs, moduledoc

from changeloop import __version__  # noqa: E402

project = "changeloop"
author = "The changeloop authors"
copyright = "the changeloop authors; Apache-2.0"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Google style: Args:, Returns:, Raises:, Attributes:
    "sphinx.ext.viewcode",
    "myst_parser",  # the pages that include README.md
    "publicdocs",
    "moduledoc",
]
publicdocs_packages = ["changeloop"]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as :ivar: fields, so autodoc's own entries don't clash

# Every cross-reference must resolve (a renamed method fails the build), except those into the
# standard library (no intersphinx: the build reads nothing from the network) and into private
# modules, which the reference does not document.
nitpicky = True
_STDLIB = "|".join(sorted(sys.stdlib_module_names))  # Sphinx 9 needs 3.11+: the name exists
nitpick_ignore_regex = [
    (r"py:.*", r"(%s)(\..*)?" % _STDLIB),
    (r"py:.*", r"(.*\.)?_[A-Za-z]\w*(\..*)?"),  # anything private: _follow, Consumer._deliver
    (r"py:class", r"(T|FileLike|Matcher|ChangeCallback|Json|Row)"),  # local type aliases
]

myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # README sections start at ##, pages include them

html_theme = "alabaster"
html_title = "changeloop %s" % __version__
