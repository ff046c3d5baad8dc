"""Every code block of the README runs against the real server: the Python blocks in order,
and each `changeloop ...` line of the shell blocks as a command that must exit 0."""

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
    namespace: Dict[str, Any] = {"__name__": "readme"}
    source = code.replace(DEFAULT_URL, couchdb_url)
    exec(compile(source, "README.md[%d]" % index, "exec"), namespace)
    assert capsys.readouterr().out  # every block shows something


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
    result = subprocess.run(
        [sys.executable, "-m", "changeloop"] + argv[1:],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2  # the changes, one JSON line each
