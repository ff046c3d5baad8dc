"""Every code block of the README runs against the real server, twice in a row: each Python block
standalone (a fresh namespace each time, in one working directory), and each `changeloop ...` line
of the shell blocks as a command that must exit 0.

Twice, because a reader runs a block again: a block that creates a database it never deletes, or
saves a document whose id the first run already used, fails the second time (409, 412), and a
block that waits for more changes than it makes never returns."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import changeloop
from changeloop import Server

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "http://127.0.0.1:5984"


def blocks(language: str) -> List[str]:
    pattern = r"```%s\n(.*?)```" % language
    return re.findall(pattern, README.read_text(encoding="utf-8"), re.S)


def commands() -> List[str]:
    return [
        line
        for block in blocks("sh")
        for line in block.splitlines()
        if line.startswith("changeloop ")
    ]


def test_readme_has_code() -> None:
    assert len(blocks("python")) >= 4 and len(commands()) >= 3


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs(
    index: int, couchdb_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (a checkpoint)
    code = blocks("python")[index]
    assert DEFAULT_URL in code, "README blocks talk to the default URL, replaced here"
    source = code.replace(DEFAULT_URL, couchdb_url)
    for run in ("first", "second"):
        namespace: Dict[str, Any] = {"__name__": "readme"}
        exec(compile(source, "README.md[%d], %s run" % (index, run), "exec"), namespace)
        assert capsys.readouterr().out, "the %s run printed nothing" % run  # blocks show something


def section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## %s\n(.*?)(?=^## |\Z)" % re.escape(title), text, re.S | re.M)
    assert match is not None, "the README has no '## %s' section" % title
    return match.group(1)


def test_readme_errors_section_names_every_exception() -> None:
    from changeloop import errors

    listed = set(re.findall(r"`(\w+)`", section("Errors")))
    missing = [name for name in errors.__all__ if name not in listed]
    assert missing == [], "the README's Errors section does not mention %s" % missing


def test_readme_names_the_generator() -> None:
    # couchdb-python users look for a generator first; the README must show them where it is.
    assert "Consumer.changes()" in README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cli_db(couchdb_url: str) -> Iterator[None]:
    with Server(couchdb_url) as server:
        server.create_db("readme-cli").bulk_save([{"_id": "a"}, {"_id": "b"}, {"_id": "c"}])
        yield
        server.delete_db("readme-cli")


@pytest.mark.parametrize("command", commands())
def test_readme_command_runs(command: str, couchdb_url: str, cli_db: None, tmp_path: Path) -> None:
    argv = shlex.split(command.replace(DEFAULT_URL, couchdb_url))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(changeloop.__file__).resolve().parent.parent)
    seen: List[List[str]] = []
    for run in ("first", "second"):  # in one directory: a checkpoint file is still there
        result = subprocess.run(
            [sys.executable, "-m", "changeloop"] + argv[1:],
            capture_output=True,
            text=True,
            timeout=15,  # each takes well under a second
            cwd=tmp_path,
            env=env,
        )
        assert result.returncode == 0, "%s run: %s" % (run, result.stderr)
        lines = result.stdout.splitlines()
        seen.append([json.loads(line)["id"] for line in lines if line.startswith("{")])
        if "--checkpoint" not in argv or run == "first":
            assert len(lines) >= 2, "%s run: %r" % (run, result.stdout)
    if "--checkpoint" in argv:  # the second run goes on where the first one stopped
        assert seen == [["a", "b"], ["c"]], seen
