"""The embedding-tier examples run against the real server and see the changes."""

import os
import subprocess
import sys
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


@pytest.mark.parametrize("name", TIERS)
def test_embedding_example(name: str, example_db: str) -> None:
    env = dict(os.environ)
    # The examples import the changeloop under test (the installed one under tox).
    env["PYTHONPATH"] = str(Path(changeloop.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / (name + ".py")), example_db, "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning (a leaked socket would show here)
    assert [line.split()[-1] for line in result.stdout.splitlines()] == [
        "doc-0",
        "doc-1",
        "doc-2",
    ]
