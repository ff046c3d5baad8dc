"""Library manners: silent unless logging is configured, levels by meaning, Ctrl-C re-raised after
the checkpoints are saved."""

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import changeloop
from changeloop import DatabaseWatcher, Loop, MemoryCheckpoint, Server

PACKAGE_PARENT = str(Path(changeloop.__file__).resolve().parent.parent)


def refused_port() -> int:
    with socket.socket() as probe:  # bound, then closed: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_script(code: str, *args: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


# -- logging: a NullHandler, so nothing is printed unless the application asks --------------------

FAILING_APPLICATION = """
    import sys
    from changeloop import Consumer, Loop, Server

    url, missing, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loop = Loop()
    server, nowhere = Server(url), Server("http://127.0.0.1:%d" % port)
    failures = []
    # A feed that keeps failing and retrying (warnings), then one that fails for good (an error).
    retrying = Consumer(
        nowhere.get_db("db"), loop, on_error=failures.append, reconnect_base=0.01,
        reconnect_cap=0.02,
    )
    retrying.start(print)
    while len(failures) < 3:
        loop.run_once(0.1)
    try:
        Consumer(server.get_db(missing), loop).wait(print)  # raises NotFound
    finally:
        retrying.stop()
        loop.close()
        server.close()
        nowhere.close()
"""


def test_an_application_without_logging_sees_only_the_error_raised(
    couchdb_url: str, db_name: str
) -> None:
    result = run_script(FAILING_APPLICATION, couchdb_url, db_name, str(refused_port()))
    assert result.returncode == 1 and result.stdout == ""
    # The traceback of the NotFound, and nothing else: no "reconnecting" warnings, no
    # "stopping" error printed by Python's last-resort handler before the same error is raised.
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):", result.stderr
    assert lines[-1].startswith("changeloop.errors.NotFound: HTTP 404"), result.stderr
    assert result.stderr.count("HTTP 404") == 1, result.stderr
    assert "reconnecting" not in result.stderr and "could not connect" not in result.stderr


def test_the_package_logger_has_a_null_handler_only() -> None:
    handlers = logging.getLogger("changeloop").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


# -- Ctrl-C: checkpoints saved, then KeyboardInterrupt re-raised ----------------------------------


def test_watcher_run_saves_the_checkpoints_then_re_raises_keyboard_interrupt(
    couchdb_url: str, db_name: str
) -> None:
    stores: Dict[str, MemoryCheckpoint] = {}
    seen: List[Tuple[str, Any]] = []

    def on_change(name: str, change: Dict[str, Any]) -> None:
        if len(seen) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does inside a callback
        seen.append((name, change["seq"]))

    with Server(couchdb_url) as server, Loop() as loop:
        server.create_db(db_name).bulk_save([{"_id": "doc-%d" % i} for i in range(5)])
        try:
            watcher = DatabaseWatcher(
                server, on_change, loop, match=db_name,
                checkpoint=lambda db: stores.setdefault(db.name, MemoryCheckpoint()),
            )  # fmt: skip
            with pytest.raises(KeyboardInterrupt):
                watcher.run()
            assert not loop.is_running() and watcher.consumers == {}
            # The two changes delivered are checkpointed; the interrupted one comes again.
            assert stores[db_name].seq == seen[-1][1] and len(seen) == 2
        finally:
            server.delete_db(db_name)
