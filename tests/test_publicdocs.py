"""The docs build's check that every public name has a docstring (docs/_ext/publicdocs.py).

``tox -e docs`` runs it inside Sphinx, where each name it finds is a warning and ``-W`` fails the
build; these tests show that it finds what it must (so the docs run can fail) and accepts each
documented form that autodoc renders. A throw-away package is written for each test.
"""

import importlib
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "_ext"))

import publicdocs  # noqa: E402

PACKAGE = '''
"""A package."""

from .things import Thing, helper, Alias, Plain, undocumented_helper, Bare

__all__ = ["Thing", "helper", "Alias", "Plain", "undocumented_helper", "Bare"]
'''

THINGS = '''
"""Things."""

from typing import Dict, List

#: A documented alias.
Alias = Dict[str, int]
Plain = List[int]


def helper() -> None:
    """Documented."""


def undocumented_helper() -> None:
    pass


class Bare:
    pass


class Base:
    """A base."""

    def hook(self) -> None:
        """The base documents the hook."""


class Thing(Base):
    """A thing.

    Attributes:
        listed: documented in the Attributes section.
        typed (int): documented with a type.
    """

    __slots__ = {"slotted": "documented by the slots dict", "bare_slot": ""}

    LIMIT = 3  #: documented on its line
    OTHER = 4

    def __init__(self) -> None:
        #: documented above
        self.above = 1
        self.after = 2
        """documented after"""
        self.listed = 3
        self.typed = 4
        self.naked = 5
        if self.above:
            self.nested_naked = 6
        self._private = 7

    def method(self) -> None:
        """Documented."""

    def naked_method(self) -> None:
        pass

    def hook(self) -> None:
        pass

    @property
    def prop(self) -> int:
        """Documented."""
        return 1

    @property
    def naked_prop(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "Thing"
'''


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    name = "docs_probe_%s" % uuid.uuid4().hex[:8]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    (folder / "things.py").write_text(textwrap.dedent(THINGS))
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module(name)
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def _names(package: str) -> List[str]:
    prefix = package + ".things."
    return sorted(m.name[len(prefix) :] for m in publicdocs.undocumented(package))


def test_finds_each_undocumented_public_name(package: str) -> None:
    assert _names(package) == [
        "Bare",
        "Plain",
        "Thing.OTHER",
        "Thing.bare_slot",
        "Thing.naked",
        "Thing.naked_method",
        "Thing.naked_prop",
        "Thing.nested_naked",
        "undocumented_helper",
    ]


def test_reports_where_a_name_is_defined(package: str) -> None:
    found = {m.name.rsplit(".", 1)[1]: m for m in publicdocs.undocumented(package)}
    assert found["naked"].kind == "attribute"
    assert found["naked"].path.endswith("things.py")
    lines = textwrap.dedent(THINGS).splitlines()  # as written, first line blank
    assert found["naked"].line == lines.index("        self.naked = 5") + 1
    assert found["naked_method"].kind == "method"
    assert found["Plain"].kind == "data"


def test_changeloop_check_runs() -> None:
    # The real package: whatever is missing today, the check itself must run through.
    assert all(m.name.startswith("changeloop.") for m in publicdocs.undocumented("changeloop"))
