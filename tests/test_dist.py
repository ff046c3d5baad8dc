"""The sdist and the wheel as a user gets them: what each holds, and that each installs and imports.

``tox -e package`` builds both with ``python -m build`` into a directory, runs
``twine check --strict`` on them, and names that directory in ``CHANGELOOP_DIST_DIR`` for these
tests. Each archive is read for what it must hold (every module, py.typed, LICENSE, the metadata),
then installed into a clean virtual environment of its own, where ``import changeloop`` and the
``changeloop`` command must work from a directory away from the source tree. Elsewhere the tests
skip: building and installing takes some 20 seconds.
"""

import configparser
import email.message
import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "changeloop"
DIST_DIR = os.environ.get("CHANGELOOP_DIST_DIR")

pytestmark = pytest.mark.skipif(
    not DIST_DIR, reason="CHANGELOOP_DIST_DIR (the built sdist and wheel) is set by tox -e package"
)

# pip, venv creation and (for the sdist) a setuptools build: far more than a unit test's minute.
INSTALL_TIMEOUT_S = 300


def _one(pattern: str) -> Path:
    assert DIST_DIR is not None
    found = sorted(Path(DIST_DIR).glob(pattern))
    assert len(found) == 1, "expected one %s in %s, found %s" % (pattern, DIST_DIR, found)
    return found[0]


def _source_version() -> str:
    """The version in changeloop/_version.py, read without importing anything."""
    text = (SOURCE_DIR / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, "changeloop/_version.py has no __version__ line"
    return match.group(1)


def _source_modules() -> Set[str]:
    return {path.relative_to(REPO).as_posix() for path in SOURCE_DIR.rglob("*.py")}


def _tested_pythons() -> Set[str]:
    """The Pythons CI tests: tox.ini's ``pythons`` label (py38-min ... py313-min) as "3.8" ..."""
    config = configparser.ConfigParser()
    config.read(REPO / "tox.ini", encoding="utf-8")
    labels = config["tox"]["labels"]
    line = next(line for line in labels.splitlines() if line.strip().startswith("pythons"))
    return {"3.%s" % minor for minor in re.findall(r"\bpy3(\d+)-min\b", line)}


def _metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def _check_metadata(metadata: email.message.Message, where: str) -> None:
    assert metadata["Name"] == "changeloop", where
    assert metadata["Version"] == _source_version(), (
        "%s says version %s, changeloop/_version.py %s"
        % (where, metadata["Version"], _source_version())
    )
    assert metadata["Requires-Python"] == ">=3.8", where
    assert "Apache-2.0" in (metadata["License"] or metadata["License-Expression"] or ""), where
    requires = [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]
    assert requires == [], "%s: runtime dependencies %s" % (where, requires)
    urls: Dict[str, str] = {
        label.strip(): url.strip()
        for label, _, url in (
            entry.partition(",") for entry in metadata.get_all("Project-URL") or []
        )
    }
    assert {"Homepage", "Source", "Changelog", "Issues"} <= set(urls), "%s: %s" % (where, urls)
    assert all(url.startswith("https://") for url in urls.values()), urls
    classifiers = metadata.get_all("Classifier") or []
    declared = {
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert declared == _tested_pythons(), (
        "%s: the Python classifiers (%s) must be the Pythons CI tests (%s, tox.ini's pythons label)"
        % (where, sorted(declared), sorted(_tested_pythons()))
    )
    assert metadata["Description-Content-Type"] == "text/markdown", where
    assert "## Install" in metadata.get_payload(), (
        "%s: the long description is not the README" % where
    )


def test_wheel_holds_the_package_license_and_metadata() -> None:
    wheel = _one("changeloop-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = "changeloop-%s.dist-info/" % _source_version()
        metadata = _metadata(archive.read(dist_info + "METADATA").decode("utf-8"))
        licenses = [n for n in names if n.startswith(dist_info) and n.endswith("LICENSE")]
        assert licenses, "the wheel has no LICENSE in %s: %s" % (dist_info, sorted(names))
        assert b"Apache License" in archive.read(licenses[0])
    missing = sorted(_source_modules() - names)
    assert missing == [], "the wheel lacks %s" % missing
    assert "changeloop/py.typed" in names
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"changeloop", dist_info.rstrip("/")}, "the wheel installs more: %s" % tops
    _check_metadata(metadata, wheel.name)


def test_sdist_holds_the_project() -> None:
    sdist = _one("changeloop-*.tar.gz")
    root = "changeloop-%s/" % _source_version()
    with tarfile.open(sdist) as archive:
        names = {member.name for member in archive.getmembers()}
        pkg_info = archive.extractfile(root + "PKG-INFO")
        assert pkg_info is not None
        metadata = _metadata(pkg_info.read().decode("utf-8"))
    wanted = {root + path for path in _source_modules()} | {
        root + path
        for path in (
            "LICENSE",
            "CHANGELOG.md",
            "README.md",
            "pyproject.toml",
            "tox.ini",
            "changeloop/py.typed",
            "tests/conftest.py",
            "tests/testserver.py",
            "tests/testserver/package-lock.json",
            "docs/conf.py",
        )
    }
    missing = sorted(wanted - names)
    assert missing == [], "the sdist lacks %s (MANIFEST.in)" % missing
    stray = sorted(n for n in names if "__pycache__" in n or "/_build/" in n or "node_modules" in n)
    assert stray == [], "the sdist carries build leftovers: %s" % stray[:5]
    _check_metadata(metadata, sdist.name)


def _venv_bin(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin")


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_and_imports_in_a_clean_venv(kind: str, tmp_path: Path) -> None:
    archive = _one("changeloop-*-py3-none-any.whl" if kind == "wheel" else "changeloop-*.tar.gz")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(_venv_bin(venv) / "python")
    # The wheel needs nothing from an index; the sdist needs setuptools to build, like a user's.
    index: List[str] = ["--no-index"] if kind == "wheel" else []
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + index + [str(archive)], check=True, timeout=INSTALL_TIMEOUT_S)
    away = tmp_path / "elsewhere"  # not the repository: `import changeloop` must find the install
    away.mkdir()
    probe = (
        "import changeloop, sys\n"
        "missing = [n for n in changeloop.__all__ if not hasattr(changeloop, n)]\n"
        "assert not missing, missing\n"
        "from changeloop import BatchCallback, Callback, Change, Consumer, FeedEvent, Server\n"
        "print(changeloop.__version__)\n"
        "print(changeloop.__file__)\n"
    )
    result = subprocess.run(
        [python, "-I", "-c", probe], capture_output=True, text=True, cwd=away, timeout=60
    )
    assert result.returncode == 0, result.stderr
    version, location = result.stdout.split()
    assert version == _source_version()
    installed = str(Path(location).resolve())
    assert installed.startswith(str(venv.resolve()) + os.sep), (
        "imported %s, not the copy installed in %s" % (installed, venv)
    )
    command = subprocess.run(
        [str(_venv_bin(venv) / "changeloop"), "--help"],
        capture_output=True,
        text=True,
        cwd=away,
        timeout=60,
    )
    assert command.returncode == 0, command.stderr
    assert "changeloop" in command.stdout
