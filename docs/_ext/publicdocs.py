"""Every public name of a package has a docstring: a Sphinx extension, and a script.

The public names are the package's ``__all__`` and, for each class in it, the methods,
properties and attributes that the class itself defines without a leading underscore, including
the instance attributes its methods assign (``self.error = None``) and its ``__slots__``. Dunder
methods are left out: Python documents them.

What counts as a docstring, in the forms Sphinx's autodoc renders:

- a class, function, method or property: its ``__doc__`` (a method may inherit its base's);
- an attribute or a module-level name (a type alias, a constant): a ``#:`` comment on the lines
  right above its assignment or after it on the same line, a string literal right after it, a
  ``__slots__`` dict's value, or an entry in the class docstring's ``Attributes:`` section
  (Google style, as napoleon reads it) or an ``:ivar name:`` field.

As a Sphinx extension (``extensions = ["publicdocs"]``, ``publicdocs_packages = ["changeloop"]``)
it warns once per undocumented name when the build finishes reading, so ``sphinx-build -W`` fails.
As a script, ``python docs/_ext/publicdocs.py changeloop`` prints them and exits 1 if any.
Only the standard library is used here, so tests can run the check without Sphinx.
"""

import ast
import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

__all__ = ["Missing", "undocumented"]

# Google-style "Attributes:" entries (``name: text`` or ``name (type): text``) and reST fields.
_SECTION = re.compile(r"^(\s*)Attributes:\s*$")
_ENTRY = re.compile(r"^\s*\*?([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:")
_IVAR = re.compile(r":(?:ivar|var|cvar)\s+(?:[^:]*\s)?([A-Za-z_]\w*)\s*:")


class Missing(NamedTuple):
    """One public name without a docstring, and where it is defined."""

    name: str  # dotted: changeloop.consumer.Consumer.error
    kind: str  # class, function, method, property, attribute, data
    path: str  # the source file
    line: int  # its line there, 0 if unknown


class _Source:
    """One module's source, read with ``ast``: its documented attributes and assignments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        text = path.read_text(encoding="utf-8")
        self.lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        #: (class name or "", attribute) -> line of its first assignment
        self.assigned: Dict[Tuple[str, str], int] = {}
        #: (class name or "", attribute) that have a docstring or a ``#:`` comment
        self.documented: Set[Tuple[str, str]] = set()
        self._scan(tree.body, "", in_method=False)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        for body in _bodies(item):
                            self._scan(body, node.name, in_method=True)
                self._scan(node.body, node.name, in_method=False)

    def _scan(self, body: List[ast.stmt], owner: str, in_method: bool) -> None:
        for index, stmt in enumerate(body):
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, ast.AnnAssign):
                targets = [stmt.target]
            else:
                continue
            names = []
            for target in targets:
                if in_method:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        names.append(target.attr)
                elif isinstance(target, ast.Name):
                    names.append(target.id)
            following = body[index + 1] if index + 1 < len(body) else None
            documented = self._has_comment(stmt) or (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            )
            for name in names:
                self.assigned.setdefault((owner, name), stmt.lineno)
                if documented:
                    self.documented.add((owner, name))

    def _has_comment(self, stmt: ast.stmt) -> bool:
        """A ``#:`` comment on the lines right above ``stmt``, or after it on its first line."""
        if "#:" in self.lines[stmt.lineno - 1]:
            return True
        above = stmt.lineno - 2
        return above >= 0 and self.lines[above].strip().startswith("#:")


def _bodies(function: ast.AST) -> Iterator[List[ast.stmt]]:
    """Every statement list inside a function, nested blocks included (not nested functions)."""
    for field in ("body", "orelse", "finalbody"):
        body = getattr(function, field, None)
        if body:
            yield body
            for stmt in body:
                if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    yield from _bodies(stmt)
    for handler in getattr(function, "handlers", ()):
        yield from _bodies(handler)


_sources: Dict[str, Optional[_Source]] = {}


def _source_of(module: types.ModuleType) -> Optional[_Source]:
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    if path not in _sources:
        _sources[path] = _Source(Path(path))
    return _sources[path]


def _docstring_attributes(doc: Optional[str]) -> Set[str]:
    """The names an ``Attributes:`` section or ``:ivar:`` fields of a docstring document."""
    names = set(_IVAR.findall(doc or ""))
    lines = inspect.cleandoc(doc or "").splitlines()
    for index, line in enumerate(lines):
        match = _SECTION.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        for entry in lines[index + 1 :]:
            if entry.strip() and len(entry) - len(entry.lstrip()) <= indent:
                break  # the section ended
            found = _ENTRY.match(entry)
            if found and len(entry) - len(entry.lstrip()) <= indent + 4:
                names.add(found.group(1))
    return names


def _has_doc(obj: Any) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def _line_of(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


def _class_members(cls: type, module: types.ModuleType) -> Iterator[Missing]:
    source = _source_of(module)
    path = source.path.as_posix() if source else "?"
    qualname = "%s.%s" % (cls.__module__, cls.__qualname__)
    mro = [c for c in cls.__mro__ if c is not object]
    in_docstrings: Set[str] = set()
    for klass in mro:
        in_docstrings |= _docstring_attributes(klass.__dict__.get("__doc__"))
    slots = cls.__dict__.get("__slots__", ())
    slot_docs = slots if isinstance(slots, dict) else {}
    names: Dict[str, int] = {}
    for name in cls.__dict__:
        names[name] = 0
    if isinstance(slots, str):
        slots = (slots,)
    for name in slots:
        names.setdefault(name, 0)
    if source is not None:
        for (owner, name), line in source.assigned.items():
            if owner == cls.__name__:
                names[name] = line
    for name, line in sorted(names.items()):
        if name.startswith("_"):
            continue
        raw = cls.__dict__.get(name)
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        if isinstance(raw, property) or inspect.isfunction(raw):
            if not _has_doc(getattr(cls, name)):
                kind = "property" if isinstance(raw, property) else "method"
                yield Missing(qualname + "." + name, kind, path, _line_of(raw))
            continue
        if inspect.isclass(raw):
            if not raw.__dict__.get("__doc__"):
                yield Missing(qualname + "." + name, "class", path, _line_of(raw))
            continue
        documented = (
            name in in_docstrings
            or bool(slot_docs.get(name))
            or any(
                (k.__name__, name) in (_source_of(sys.modules[k.__module__]) or source).documented
                for k in mro
                if k.__module__ in sys.modules and _source_of(sys.modules[k.__module__])
            )
        )
        if not documented:
            yield Missing(qualname + "." + name, "attribute", path, line)


def undocumented(package: str) -> List[Missing]:
    """The public names of ``package`` (see the module docstring) that have no docstring."""
    root = importlib.import_module(package)
    missing: List[Missing] = []
    seen: Set[type] = set()
    for name in getattr(root, "__all__", ()):
        obj = getattr(root, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            module = sys.modules[obj.__module__]
            source = _source_of(module)
            path = source.path.as_posix() if source else "?"
            own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not (own or "").strip():
                kind = "class" if inspect.isclass(obj) else "function"
                missing.append(Missing("%s.%s" % (obj.__module__, name), kind, path, _line_of(obj)))
            if inspect.isclass(obj) and obj not in seen:
                seen.add(obj)
                missing.extend(_class_members(obj, module))
            continue
        # Data (a constant, a type alias): documented where it is assigned at module level.
        homes = [
            (module, _source_of(module))
            for module_name, module in sorted(sys.modules.items())
            if (module_name == package or module_name.startswith(package + "."))
            and module is not None
            and getattr(module, name, _ABSENT) is obj
        ]
        assigned = [(m, s) for m, s in homes if s is not None and ("", name) in s.assigned]
        if not any(("", name) in s.documented for _, s in assigned):
            module, source = assigned[0] if assigned else (root, _source_of(root))
            line = source.assigned.get(("", name), 0) if source else 0
            path = source.path.as_posix() if source else "?"
            missing.append(Missing("%s.%s" % (module.__name__, name), "data", path, line))
    return missing


_ABSENT = object()


def _check(app: Any, env: Any) -> None:
    """Sphinx's ``env-updated``, once every source is read: one warning per undocumented name."""
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for package in app.config.publicdocs_packages:
        for item in undocumented(package):
            logger.warning(
                "public %s %s has no docstring",
                item.kind,
                item.name,
                location=(item.path, item.line),
            )


def setup(app: Any) -> Dict[str, Any]:
    """Register the check with Sphinx (``publicdocs_packages``: the packages to check)."""
    app.add_config_value("publicdocs_packages", [], "env")
    app.connect("env-updated", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    found = [m for package in sys.argv[1:] for m in undocumented(package)]
    for item in found:
        print("%s:%d: public %s %s has no docstring" % (item.path, item.line, item.kind, item.name))
    sys.exit(1 if found else 0)
