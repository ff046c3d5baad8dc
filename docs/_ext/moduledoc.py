"""``.. module-docstring:: dotted.name``: a module's docstring as part of a page, or the
directive's own content while that module does not exist yet.

The "how it works" page shows the feed's state diagram from the docstring of the module that
implements it, so the diagram is kept beside the code it describes; until the module is there,
the page builds with the placeholder text instead of failing on an import.
"""

import importlib
import inspect
from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["ModuleDocstring", "setup"]


class ModuleDocstring(SphinxDirective):
    """Parse the named module's docstring as reST here; without the module, the content."""

    required_arguments = 1
    has_content = True

    def run(self) -> List[nodes.Node]:
        try:
            module = importlib.import_module(self.arguments[0])
        except ImportError:
            lines, source = list(self.content), self.get_source_info()[0]
        else:
            lines = (inspect.getdoc(module) or "").splitlines()
            source = getattr(module, "__file__", self.arguments[0])
            self.env.note_dependency(source)
        # A section node, as autodoc uses: the docstring may have headings of its own.
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=source), node)
        return list(node.children)


def setup(app: Any) -> Dict[str, Any]:
    """Register ``module-docstring``."""
    app.add_directive("module-docstring", ModuleDocstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
