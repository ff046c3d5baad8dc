"""The embedding-tier examples run against the real server and see the changes."""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import changeloop
from changeloop import Server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIERS = [
    "embed_while_loop",
    "embed_own_select",
    "embed_thread",
    "embed_blocking",
    "bounded_queue",
]


@pytest.fixture(scope="module")
def example_db(couchdb_url: str) -> Iterator[str]:
    with Server(couchdb_url) as server:
        db = server.create_db("examples-db")
        db.bulk_save([{"_id": "doc-%d" % i} for i in range(3)])
        yield couchdb_url + "/examples-db"
        server.delete_db("examples-db")


def run_example(name: str, url: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    # The examples import the changeloop under test (the installed one under tox).
    env["PYTHONPATH"] = str(Path(changeloop.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / (name + ".py")), url, "3"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("name", TIERS)
def test_embedding_example(name: str, example_db: str) -> None:
    result = run_example(name, example_db)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning (a leaked socket would show here)
    assert [line.split()[-1] for line in result.stdout.splitlines()] == [
        "doc-0",
        "doc-1",
        "doc-2",
    ]


@pytest.mark.parametrize("name", TIERS)
def test_embedding_example_exits_on_a_missing_database(
    name: str, couchdb_url: str, db_name: str
) -> None:
    # The feed stops for good at once (a 404): every tier notices and exits non-zero with the
    # error, promptly; the own-select tier used to wait in select() for ever, the others for
    # their 30 s deadline.
    started = time.monotonic()
    result = run_example(name, couchdb_url + "/" + db_name, timeout=20)
    assert time.monotonic() - started < 10, result.stderr
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: HTTP 404") and result.stderr.count("\n") == 1
