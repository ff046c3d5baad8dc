"""Packaging invariants: no dependencies, stdlib-only and one-way imports, py.typed, the version.

Users vendor changeloop by copying the ``changeloop/`` folder, so the package may import nothing
but the standard library and itself, and itself only through relative imports. Inside it, data
flows one way (STYLE.md: loop -> consumer -> connection -> parser): every module has a layer in
``LAYERS`` below and may import only modules of a lower layer. The import checks read the source
with ``ast`` and never import the package, so they report precisely even when an import cycle or
a missing module breaks ``import changeloop``. Nothing connects anywhere; the file takes about a
second.

Under tox (``CHANGELOOP_EXPECT_INSTALLED=1``) ``changeloop`` must come from the installed wheel,
so the py.typed and "every module shipped" checks are about what users actually get.
"""

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "changeloop"
DIST_NAME = "changeloop"

# Low -> high. A module may import only modules of a strictly lower layer (or a pair listed in
# ALLOWED_SAME_LAYER). A new module needs a row here before its first test run: that row is the
# decision of where it sits, made once, in review, instead of by whoever adds an import.
LAYERS: Dict[str, int] = {
    "errors": 0,
    "_version": 0,
    "_events": 1,
    "_readers": 2,
    # sans-IO: the HTTP parser, the request serializer, the feed decoder
    "_http": 3,
    "_request": 3,
    "_feed": 3,
    "_params": 3,  # consumer arguments -> one _changes request (method, path, query, body)
    # sockets and TLS; knows nothing of HTTP or of the loop
    "_sockets": 3,  # socket helpers: TLS contexts, resolution, options, the error translation
    "_transport": 4,
    # HTTP proxies: which one, and the sans-IO CONNECT exchange (parser + serializer); the
    # transport drives the exchange without importing it
    "_proxy": 4,
    # one streaming _changes request on a non-blocking connection: parser + decoder + transport;
    # knows no loop, timers or callbacks
    "_stream": 5,
    "_connection": 5,  # the blocking client's connection: parser + serializer + transport
    "_handles": 3,  # what the loop holds and calls: the Handler protocol, the handles
    "_dispatch": 4,  # the loop's pass: dispatch, the timer heap, the ready queue
    "loop": 5,
    "_policy": 5,  # the feed's timings and failure rules: numbers with their reasons
    # the blocking client's exchanges: its connection pool, the session login; a base of Server
    "_pool": 6,
    "client": 7,
    "_wheel": 7,  # deadlines for many objects on one loop timer (the consumers' watchdogs)
    "_resolve": 7,  # name resolution off the loop: worker threads answering through the loop
    "checkpoint": 8,
    "_delivery": 8,  # rows to callbacks: the one place user code runs
    "_perloop": 8,  # what one loop's consumers share: the connect gate, the wheel, the counts
    "_states": 0,  # the feed's states and transitions, as a table (no imports)
    "_follow": 9,  # a continuous feed's state machine, the loop's handler; delivers via _delivery
    "_iterate": 9,  # Consumer.changes(): handed its consumer, it needs not import it
    "_legacy": 9,  # couchdbkit's argument forms, a longpoll on the loop: mixed into the consumer
    # the consumer's requests and the start of a run: a base class of the consumer
    "_requests": 10,
    "consumer": 11,
    "watcher": 12,
    "_cli_args": 13,  # the command's options: the parser, its usage rules, --param's typing
    "_cli_output": 13,  # what the command writes: change lines, progress, stats, its log
    "_cli_signals": 13,  # what a signal does to the command, and what it must not interrupt
    "__main__": 14,
    "__init__": 15,  # the public names; may import anything
}

# (importer, imported) pairs of one layer that may depend on each other. Keep it empty unless
# there is a reason, written beside the pair.
ALLOWED_SAME_LAYER: FrozenSet[Tuple[str, str]] = frozenset()

# Narrower than the layer rule: these modules may import only the listed ones.
ONLY_IMPORTS: Dict[str, Tuple[FrozenSet[str], str]] = {
    "loop": (
        frozenset({"errors", "_dispatch", "_handles"}),
        "the loop knows nothing of HTTP or CouchDB",
    ),
    "_dispatch": (frozenset({"errors", "_handles"}), "the loop knows nothing of HTTP or CouchDB"),
    "_handles": (frozenset({"errors"}), "the loop knows nothing of HTTP or CouchDB"),
}

# Removed from the standard library in Python 3.12 (PEP 632, PEP 594 stragglers) and 3.13
# (PEP 594): importing any of them breaks on the newest Pythons we support.
REMOVED_MODULES: FrozenSet[str] = frozenset(
    {
        # 3.12
        "asynchat",
        "asyncore",
        "distutils",
        "imp",
        "smtpd",
        # 3.13
        "aifc",
        "audioop",
        "cgi",
        "cgitb",
        "chunk",
        "crypt",
        "imghdr",
        "lib2to3",
        "mailcap",
        "msilib",
        "nis",
        "nntplib",
        "ossaudiodev",
        "pipes",
        "sndhdr",
        "spwd",
        "sunau",
        "telnetlib",
        "uu",
        "xdrlib",
    }
)

# PEP 440, appendix B: a canonical public version (N[.N]+[{a|b|rc}N][.postN][.devN]).
PEP440_PUBLIC = re.compile(
    r"([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
    r"((a|b|rc)(0|[1-9][0-9]*))?(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?"
)


# --- reading the package's source ----------------------------------------------------------------


def _module_name(path: Path) -> str:
    """``loop.py`` -> ``loop``; ``__init__.py`` -> ``__init__``; ``sub/__init__.py`` -> ``sub``."""
    parts = list(path.relative_to(SOURCE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _source_modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in sorted(SOURCE_DIR.rglob("*.py"))}


MODULES = _source_modules()


def _package_of(name: str) -> List[str]:
    """The package a module's relative imports start from, as a list of names."""
    path = MODULES[name]
    parts = name.split(".") if name != "__init__" else []
    return parts if path.name == "__init__.py" else parts[:-1]


def _dotted(parts: List[str]) -> str:
    return ".".join(parts) if parts else "__init__"


class Import:
    """One import statement's view of the package: where it is and what it pulls in."""

    def __init__(
        self, line: int, text: str, absolute_top: Optional[str], internal: List[str]
    ) -> None:
        self.line = line
        self.text = text
        self.absolute_top = absolute_top  # "json" for `import json.scanner`; None if relative
        self.internal = internal  # changeloop modules it depends on, as in LAYERS


def _imports(name: str) -> Iterator[Import]:
    """Every import in module ``name``, wherever it is (functions and TYPE_CHECKING included)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                internal = [_dotted(parts[1:])] if parts[0] == DIST_NAME else []
                yield Import(node.lineno, f"import {alias.name}", parts[0], internal)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            text = f"from {'.' * node.level}{module} import {', '.join(a.name for a in node.names)}"
            if node.level == 0:
                parts = module.split(".")
                if parts[0] != DIST_NAME:
                    yield Import(node.lineno, text, parts[0], [])
                    continue
                named = parts[1:]
                base = named
                top: Optional[str] = parts[0]
            else:
                package = _package_of(name)
                if node.level - 1 > len(package):
                    pytest.fail(
                        f"changeloop/{path.relative_to(SOURCE_DIR)}:{node.lineno}: {text} reaches "
                        "outside the package",
                        pytrace=False,
                    )
                named = module.split(".") if module else []
                base = package[: len(package) - (node.level - 1)] + named
                top = None
            internal: List[str] = []
            if named:
                internal.append(_dotted(base))  # `from .errors import X`: errors
            for alias in node.names:
                candidate = ".".join(base + [alias.name])
                if candidate in MODULES or candidate in LAYERS:
                    internal.append(candidate)  # `from . import loop`: the submodule
                elif not named:
                    internal.append(_dotted(base))  # `from . import X`: a name from __init__
            yield Import(node.lineno, text, top, internal)


def _where(name: str, line: int) -> str:
    return f"changeloop/{MODULES[name].relative_to(SOURCE_DIR).as_posix()}:{line}"


# --- no runtime dependencies ---------------------------------------------------------------------


def _installed_requirements() -> Optional[List[str]]:
    try:
        return importlib.metadata.requires(DIST_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        return None


def test_no_runtime_dependencies_in_installed_metadata() -> None:
    requirements = _installed_requirements()
    if requirements is None:
        pytest.skip("changeloop is not installed (no distribution metadata)")
    unconditional = [req for req in requirements if not re.search(r";.*\bextra\s*==", req)]
    assert unconditional == [], (
        f"changeloop must have no runtime dependencies (users vendor it), but its metadata "
        f"requires {unconditional}: move them to [project.optional-dependencies]"
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_no_runtime_dependencies_in_pyproject() -> None:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    assert project.get("dependencies", []) == [], (
        f"pyproject.toml [project] dependencies must stay empty, not {project['dependencies']}"
    )
    assert "dependencies" not in project.get("dynamic", []), "dependencies must not be dynamic"


# --- imports -------------------------------------------------------------------------------------


def test_package_modules_found() -> None:
    assert {"__init__", "errors", "_version"} <= set(MODULES), f"found only {sorted(MODULES)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_absolute_self_import(name: str) -> None:
    problems = [
        f"{_where(name, imp.line)}: `{imp.text}` is absolute; import changeloop's own modules "
        "relatively (`from .errors import ...`) so a copied changeloop/ folder works under any name"
        for imp in _imports(name)
        if imp.absolute_top == DIST_NAME
    ]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.skipif(
    sys.version_info < (3, 10), reason="sys.stdlib_module_names is new in Python 3.10"
)
@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_are_stdlib_only(name: str) -> None:
    stdlib: FrozenSet[str] = sys.stdlib_module_names
    problems = [
        f"{_where(name, imp.line)}: `{imp.text}` imports {imp.absolute_top!r}, which is not in "
        "the standard library; changeloop has no dependencies (it is vendored by copying)"
        for imp in _imports(name)
        if imp.absolute_top not in (None, DIST_NAME) and imp.absolute_top not in stdlib
    ]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _repo_python_files() -> Iterator[Path]:
    for folder in ("changeloop", "tests", "benchmarks", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "node_modules" not in path.parts:
                yield path


def test_no_modules_removed_from_newer_pythons() -> None:
    problems = []
    for path in _repo_python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in REMOVED_MODULES:
                    problems.append(
                        f"{path.relative_to(REPO).as_posix()}:{node.lineno}: imports {top}, "
                        "which Python 3.12/3.13 removed from the standard library"
                    )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --- layering ------------------------------------------------------------------------------------


def test_layer_table_is_consistent() -> None:
    for importer, imported in ALLOWED_SAME_LAYER:
        assert LAYERS[importer] == LAYERS[imported], f"{importer, imported} are not one layer"
    for name, (allowed, _) in ONLY_IMPORTS.items():
        assert name in LAYERS and allowed <= set(LAYERS), f"ONLY_IMPORTS[{name!r}] names unknowns"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_layers(name: str) -> None:
    where = f"changeloop/{MODULES[name].relative_to(SOURCE_DIR).as_posix()}"
    if name not in LAYERS:
        pytest.fail(
            f"{where} is a new module: add {name} to the layer table (LAYERS in "
            "tests/test_packaging.py), below every module that may import it and above every "
            "module it imports",
            pytrace=False,
        )
    layer = LAYERS[name]
    problems: List[str] = []
    seen: Set[str] = set()
    for imp in _imports(name):
        for target in imp.internal:
            if target == name or target in seen:
                continue
            seen.add(target)
            if target not in LAYERS:
                problems.append(
                    f"{where} imports {target}, which is not in the layer table: add {target} to "
                    "the layer table (LAYERS in tests/test_packaging.py)"
                )
                continue
            if name in ONLY_IMPORTS:
                allowed, reason = ONLY_IMPORTS[name]
                if target not in allowed:
                    problems.append(
                        f"{where} imports {target}, but {name} may import only "
                        f"{', '.join(sorted(allowed))} ({reason})"
                    )
                    continue
            target_layer = LAYERS[target]
            if target_layer < layer or (name, target) in ALLOWED_SAME_LAYER:
                continue
            problem = (
                f"{where} imports {target}, but {name} (layer {layer}) must not depend on "
                f"{target} (layer {target_layer})"
            )
            if target_layer == layer:
                problem += (
                    ": modules of one layer are independent (add the pair to "
                    "ALLOWED_SAME_LAYER only with a reason)"
                )
            problems.append(problem)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --- what the installed package ships ------------------------------------------------------------


def _package_dir() -> Path:
    """The directory `import changeloop` loads (the wheel's copy under tox), without importing."""
    spec = importlib.util.find_spec(DIST_NAME)
    assert spec is not None and spec.submodule_search_locations, "changeloop is not importable"
    for location in spec.submodule_search_locations:
        if (Path(location) / "__init__.py").is_file():
            return Path(location).resolve()
    raise AssertionError(f"no changeloop/__init__.py in {list(spec.submodule_search_locations)}")


def test_imported_from_the_install_under_tox() -> None:
    if os.environ.get("CHANGELOOP_EXPECT_INSTALLED") != "1":
        pytest.skip("CHANGELOOP_EXPECT_INSTALLED=1 is set by tox only")
    assert _package_dir() != SOURCE_DIR, (
        f"changeloop was imported from the source tree ({SOURCE_DIR}), not from the installed "
        "wheel: something put the repository root on sys.path (run pytest with `python -I -m`)"
    )


def test_py_typed_is_shipped() -> None:
    assert (_package_dir() / "py.typed").is_file(), (
        f"{_package_dir()} has no py.typed: type checkers would ignore changeloop's annotations "
        "(PEP 561); keep changeloop/py.typed and its [tool.setuptools.package-data] entry"
    )


def test_every_module_is_shipped() -> None:
    installed = _package_dir()
    if installed == SOURCE_DIR:
        pytest.skip("changeloop is imported from the source tree itself")
    missing = [
        path.relative_to(SOURCE_DIR).as_posix()
        for path in MODULES.values()
        if not (installed / path.relative_to(SOURCE_DIR)).is_file()
    ]
    assert missing == [], (
        f"the installed package ({installed}) lacks {missing}: list new subpackages in "
        "[tool.setuptools] packages in pyproject.toml"
    )


# --- version -------------------------------------------------------------------------------------


def test_version_without_metadata() -> None:
    changeloop = importlib.import_module(DIST_NAME)
    version_module = importlib.import_module(DIST_NAME + "._version")
    assert changeloop.__version__ == version_module.__version__
    assert PEP440_PUBLIC.fullmatch(changeloop.__version__), (
        f"__version__ {changeloop.__version__!r} is not a canonical PEP 440 public version"
    )


def test_version_matches_installed_metadata() -> None:
    try:
        installed = importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("changeloop is not installed (no distribution metadata)")
    version = importlib.import_module(DIST_NAME).__version__
    assert installed == version, (
        f"installed metadata says {installed} but changeloop/_version.py says {version}: "
        "reinstall (`pip install -e .`, or let tox rebuild)"
    )


# --- the public names ----------------------------------------------------------------------------


def test_every_public_name_is_importable_from_the_package() -> None:
    changeloop = importlib.import_module(DIST_NAME)
    missing = [name for name in changeloop.__all__ if not hasattr(changeloop, name)]
    assert missing == [], f"changeloop.__all__ names {missing}, which `changeloop` lacks"
    assert len(set(changeloop.__all__)) == len(changeloop.__all__), "changeloop.__all__ repeats"


def test_the_types_of_changes_and_callbacks_are_public() -> None:
    # Users annotate their callbacks with these; they must not have to know the submodule.
    changeloop = importlib.import_module(DIST_NAME)
    for name in ("Change", "FeedEvent", "Callback", "BatchCallback"):
        assert name in changeloop.__all__, f"{name} is not in changeloop.__all__"
