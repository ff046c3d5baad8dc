"""Many consumers on one loop against the real server, added and removed while it runs."""

import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from changeloop import Consumer, Database, Loop, Server

Change = Dict[str, Any]


@pytest.fixture
def databases(couchdb_url: str) -> Iterator[List[Database]]:
    prefix = "many-%s-" % uuid.uuid4().hex[:8]
    with Server(couchdb_url) as server:
        dbs = [server.create_db(prefix + "%03d" % i) for i in range(100)]
        yield dbs
        for db in dbs:
            server.delete_db(db.name)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_five_hundred_consumers_on_one_loop(databases: List[Database]) -> None:
    received: Dict[Tuple[str, int], List[str]] = {}
    threads = set()

    def collector(key: Tuple[str, int]) -> Callable[[Change], None]:
        def collect(change: Change) -> None:
            threads.add(threading.get_ident())
            received[key].append(change["id"])

        return collect

    with Loop() as loop:
        thread = loop.run_in_thread()
        consumers = []
        try:
            for db in databases:  # 100 databases x 5 consumers each
                for copy in range(5):
                    received[(db.name, copy)] = []
                    consumer = Consumer(db, loop)
                    consumer.start(collector((db.name, copy)), since=0, heartbeat=2000)
                    consumers.append(consumer)
            for index, db in enumerate(databases):
                db.save_doc({"_id": "own-%03d" % index})
            wait_for(lambda: all(received.values()))
            time.sleep(0.3)  # any stray change would arrive now
        finally:
            for consumer in consumers:
                consumer.stop()
            loop.stop()
            thread.join(10)
    assert threads == {thread.ident}  # every callback ran on the loop's one thread
    for (name, _copy), ids in received.items():
        index = [db.name for db in databases].index(name)
        assert ids == ["own-%03d" % index], name  # exactly its own database's change


def test_consumers_added_and_removed_from_another_thread(databases: List[Database]) -> None:
    first, second = databases[:10], databases[10:20]
    received: Dict[str, List[Change]] = {db.name: [] for db in first + second}
    with Loop() as loop:
        thread = loop.run_in_thread()
        try:
            consumers = {db.name: Consumer(db, loop) for db in first}
            for db in first:  # Consumer.start is thread-safe: the loop runs in `thread`
                consumers[db.name].start(received[db.name].append, since=0, heartbeat=2000)
            wait_for(lambda: all(c.state == "streaming" for c in consumers.values()))
            removed = [consumers.pop(db.name) for db in first[:5]]
            for consumer in removed:  # remove half of them while the loop runs
                consumer.stop()
            wait_for(lambda: all(c.state == "stopped" for c in removed))
            for db in second:  # and add new ones
                consumers[db.name] = Consumer(db, loop)
                consumers[db.name].start(received[db.name].append, since=0, heartbeat=2000)
            wait_for(lambda: all(c.state == "streaming" for c in consumers.values()))
            for db in first + second:
                db.save_doc({"_id": "after-" + db.name})
            wait_for(lambda: all(received[name] for name in consumers))
            time.sleep(0.3)
            for consumer in consumers.values():
                consumer.stop()
        finally:
            loop.stop()
            thread.join(10)
    for db in first[:5]:
        assert received[db.name] == []  # stopped before the write: saw nothing
    for name in consumers:
        assert [change["id"] for change in received[name]] == ["after-" + name]
