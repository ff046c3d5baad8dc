"""The Consumer against the real server: the couchdbkit walkthrough, filters, many feeds, stop."""

import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from testserver import server_url_from_env

from changeloop import Consumer, Database, Loop, NotFound, Server

Change = Dict[str, Any]


def ids(changes: List[Change]) -> List[str]:
    return [c["id"] for c in changes]


def save_later(db: Database, docs: List[Dict[str, Any]], delay: float = 0.2) -> threading.Thread:
    """Save ``docs`` from another thread after ``delay`` (with its own connection)."""

    def run() -> None:
        time.sleep(delay)
        with Server(db.server.url) as other:
            for doc in docs:
                other.get_db(db.name).save_doc(doc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_couchdbkit_walkthrough(server: Server, db_name: str) -> None:
    db = server.create_db(db_name)
    try:
        with Consumer(db) as c:
            db.save_doc({})
            db.save_doc({})
            result = c.fetch(since=0)
            assert len(result["results"]) == 2
            assert {"changes", "id", "seq"} <= set(result["results"][0])
            assert result["results"][0]["changes"][0]["rev"].startswith("1-")
            last_seq = result["last_seq"]

            thread = save_later(db, [{"_id": "later"}])
            once = c.wait_once(since=last_seq)  # blocks until the other thread saves
            thread.join()
            assert ids(once["results"]) == ["later"]

            seen: List[Change] = []

            def print_line(line: Change) -> None:
                seen.append(line)
                if len(seen) == 3:
                    c.stop()

            c.register_callback(print_line)
            c.wait()
            assert sorted(ids(seen)[2:]) == ["later"]
            assert c.state == "stopped" and c.delivered == 3
    finally:
        server.delete_db(db_name)


def test_wait_with_a_js_filter(db: Database) -> None:
    db.save_doc(
        {
            "_id": "_design/mydesign",
            "filters": {"filtername": "function(doc, req) { return doc.type === req.query.type; }"},
        }
    )
    db.bulk_save([{"type": "a", "n": 1}, {"type": "b", "n": 2}, {"type": "a", "n": 3}])
    seen: List[Change] = []
    consumer = Consumer(db)
    consumer.register_callback(seen.append)
    consumer.wait(filter_name="mydesign/filtername", type="a", include_docs=True, limit=2)
    assert sorted(c["doc"]["n"] for c in seen) == [1, 3]
    consumer.close()


def test_fetch_filters(db: Database) -> None:
    db.save_doc(
        {
            "_id": "_design/d",
            "views": {"typed": {"map": "function(doc) { if (doc.type === 'a') emit(doc._id); }"}},
        }
    )
    db.bulk_save([{"_id": "x1", "type": "a"}, {"_id": "x2", "type": "b"}, {"_id": "x3"}])
    c = Consumer(db)
    assert sorted(ids(c.fetch(doc_ids=["x1", "x3"])["results"])) == ["x1", "x3"]
    assert ids(c.fetch(selector={"type": "b"})["results"]) == ["x2"]
    assert ids(c.fetch(view="d/typed")["results"]) == ["x1"]
    if server_url_from_env():  # pouchdb-server has no built-in _design filter (it 404s)
        assert ids(c.fetch(filter_name="_design")["results"]) == ["_design/d"]
    everything = c.fetch(include_docs=True, conflicts=True, style="all_docs")["results"]
    assert {r["id"]: r["doc"].get("type") for r in everything}["x2"] == "b"
    assert len(c.fetch(limit=2)["results"]) == 2
    descending = ids(c.fetch(descending=True)["results"])
    assert descending == list(reversed(ids(c.fetch()["results"])))
    assert c.fetch(since="now")["results"] == []
    c.close()


def test_continuous_filters(db: Database) -> None:
    db.bulk_save([{"_id": "x1", "type": "a"}, {"_id": "x2", "type": "b"}, {"_id": "x3"}])
    for params, expected in (
        ({"doc_ids": ["x3", "x1"]}, ["x1", "x3"]),
        ({"selector": {"type": "b"}}, ["x2"]),
    ):
        with Consumer(db) as c:
            seen = list(_take(c.changes(since=0, **params), len(expected)))
        assert sorted(ids(seen)) == expected


def _take(iterator: Any, count: int) -> Iterator[Change]:
    with iterator:
        for _ in range(count):
            yield next(iterator)


def test_since_now_sees_only_new_changes(db: Database) -> None:
    db.save_doc({"_id": "old"})
    with Consumer(db) as c:
        changes = c.changes(since="now")
        thread = save_later(db, [{"_id": "new"}])
        first = next(changes)
        changes.close()
        thread.join()
    assert first["id"] == "new"


def test_stop_from_another_thread(db: Database) -> None:
    consumer = Consumer(db)
    seen: List[Change] = []
    timer = threading.Timer(0.3, consumer.stop)
    timer.start()
    started = time.monotonic()
    consumer.wait(seen.append, since=0)
    timer.join()
    assert time.monotonic() - started < 5
    assert consumer.state == "stopped" and consumer.error is None
    consumer.close()


def test_missing_database_is_a_clear_error(server: Server, db_name: str) -> None:
    missing = server.get_db(db_name)
    consumer = Consumer(missing)
    with pytest.raises(NotFound):
        consumer.fetch()
    with pytest.raises(NotFound):
        consumer.wait(lambda change: None)
    consumer.close()


def test_missing_filter_is_a_clear_error(db: Database) -> None:
    consumer = Consumer(db)
    with pytest.raises(NotFound):
        consumer.fetch(filter_name="nope/nothing")
    consumer.close()


def test_fifty_consumers_on_one_loop_each_see_their_own_database(server: Server) -> None:
    names = ["many-%02d-%d" % (i, time.monotonic_ns()) for i in range(50)]
    databases = [server.create_db(name) for name in names]
    try:
        received: Dict[str, List[Change]] = {name: [] for name in names}
        threads = set()

        def collector(name: str) -> Any:
            def collect(change: Change) -> None:
                threads.add(threading.get_ident())
                received[name].append(change)

            return collect

        with Loop() as loop:
            consumers = []
            for database in databases:
                consumer = Consumer(database, loop)
                consumer.start(collector(database.name), since="now", heartbeat=1000)
                consumers.append(consumer)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(c.state != "streaming" for c in consumers):
                loop.run_once(0.05)
            for index, database in enumerate(databases):
                database.save_doc({"_id": "doc-%d" % index})
            while time.monotonic() < deadline and not all(received.values()):
                loop.run_once(0.05)
            for consumer in consumers:
                consumer.stop()
        assert threads == {threading.get_ident()}  # every callback ran on this one thread
        for index, name in enumerate(names):
            assert ids(received[name]) == ["doc-%d" % index], name
    finally:
        for name in names:
            server.delete_db(name)
