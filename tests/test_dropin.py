"""changeloop as a drop-in for couchdbkit's Consumer (0.4 to 0.6) and couchdb-python's changes().

couchdbkit's own consumer tests (tests/test_consumer.py of benoitc/couchdbkit, 0.4 and 0.6) are
re-expressed here against the real test server: same calls, same expectations, but without their
sleeps (an event says when the callback saw enough) and without their reliance on integer seqs
(CouchDB 2+ has strings). Then the 0.5/0.6 ``cb=`` forms and ``*_async`` calls, the parameters as
couchdbkit passed them, couchdb-python's ``Database.changes`` loop, and the README's guide.
"""

import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from faultproxy import Fault, FaultProxy

from changeloop import Consumer, Database, Loop, Server
from changeloop._params import COUCHDB_TRUE_HEARTBEAT_MS, changes_request

Change = Dict[str, Any]
#: Generous for a loopback server; a failure shows up long before pytest-timeout's 60 s.
WAIT_S = 15.0


class Seen:
    """A callback that records what it is given and says when it has seen ``count`` things."""

    def __init__(self, count: int = 1, then: Optional[Callable[[], None]] = None) -> None:
        self.items: List[Any] = []
        self.count = count
        self.then = then
        self.threads: List[int] = []
        self.enough = threading.Event()

    def __call__(self, item: Any) -> None:
        self.items.append(item)
        self.threads.append(threading.get_ident())
        if len(self.items) >= self.count:
            self.enough.set()
            if self.then is not None:
                self.then()

    def wait(self, count: Optional[int] = None) -> List[Any]:
        if count is not None:
            self.count = count
            if len(self.items) >= count:
                return self.items
            self.enough.clear()
        assert self.enough.wait(WAIT_S), "saw only %r" % (self.items,)
        return self.items


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "Returning":
    thread = Returning(fn, args, kwargs)
    thread.start()
    return thread


class Returning(threading.Thread):
    """A thread that keeps what its function returned or raised."""

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the test by outcome()
            self.error = exc

    def outcome(self) -> Any:
        self.join(WAIT_S)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def kit(server: Server, db_name: str) -> Iterator[Any]:
    """couchdbkit's setUp/tearDown: a fresh database and a Consumer; close(), then del."""

    class Case:
        pass

    case = Case()
    case.server = server  # type: ignore[attr-defined]
    case.db = server.create_db(db_name)  # type: ignore[attr-defined]
    case.consumer = Consumer(case.db)  # type: ignore[attr-defined]
    yield case
    case.consumer.close()  # type: ignore[attr-defined]
    # (No check that it is gone: pouchdb-server creates a database again for a request that a
    # closed feed left behind. test_04_del_server_item checks the deletion.)
    del server[db_name]


# --- couchdbkit 0.4's test cases --------------------------------------------------------------


def test_04_fetch(kit: Any) -> None:
    res1 = kit.consumer.fetch()  # since is optional
    assert "last_seq" in res1 and res1["results"] == []
    doc: Dict[str, Any] = {}
    kit.db.save_doc(doc)
    res2 = kit.consumer.fetch()
    assert res2["last_seq"] != res1["last_seq"]
    assert [line["id"] for line in res2["results"]] == [doc["_id"]]


def test_04_longpoll_hands_the_answer_to_the_registered_callbacks(kit: Any) -> None:
    seen = Seen()
    kit.consumer.register_callback(seen)
    waiting = in_thread(kit.consumer.wait_once)  # no since: from 0, an empty database
    kit.db.save_doc({})
    answer = waiting.outcome()
    assert seen.items == [answer]  # the whole longpoll answer, once, and returned too
    assert len(answer["results"]) == 1 and answer["last_seq"] == answer["results"][0]["seq"]


def test_04_continuous(kit: Any) -> None:
    seen = Seen(5)
    kit.consumer.register_callback(seen)
    waiting = in_thread(kit.consumer.wait)
    for i in range(5):
        kit.db.save_doc({"_id": "test%s" % i})
    lines = seen.wait()
    assert len(lines) == 5 and lines[4]["id"] == "test4"
    kit.db.save_doc({"_id": "test5"})
    lines = seen.wait(6)
    assert len(lines) == 6 and lines[5]["id"] == "test5"
    kit.consumer.close()  # couchdbkit's tearDown: from another thread, it ends wait()
    assert waiting.outcome() is None


def test_04_del_server_item(server: Server, db_name: str) -> None:
    server.create_db(db_name)
    del server[db_name]
    assert db_name not in server


# --- couchdbkit 0.5/0.6: a backend, and the callback as an argument ---------------------------


def test_06_backend(db: Database) -> None:
    Consumer(db, backend="sync").close()
    Consumer(db, "sync").close()  # couchdbkit's second positional argument
    for backend in ("gevent", "eventlet", "egg:mypackage#worker"):
        with pytest.raises(ValueError, match="run_in_thread"):
            Consumer(db, backend=backend)


def test_06_fetch_cb(kit: Any) -> None:
    kit.db.save_doc({"_id": "a"})
    seen = Seen()
    answer = kit.consumer.fetch(cb=seen)
    assert seen.items == [answer] and [r["id"] for r in answer["results"]] == ["a"]
    seen2 = Seen()
    assert kit.consumer.fetch(seen2, include_docs=True) == seen2.items[0]  # cb first
    assert seen2.items[0]["results"][0]["doc"]["_id"] == "a"
    with pytest.raises(TypeError):
        kit.consumer.fetch(seen, cb=seen2)
    with pytest.raises(TypeError):
        kit.consumer.fetch(cb="not callable")


def test_06_longpoll_cb(kit: Any) -> None:
    seen = Seen()
    waiting = in_thread(kit.consumer.wait_once, cb=seen)  # as couchdbkit 0.6's test passes it
    kit.db.save_doc({})
    answer = waiting.outcome()
    assert seen.items == [answer] and len(answer["results"]) == 1


def test_06_longpoll_cb_and_registered(kit: Any) -> None:
    registered, extra = Seen(), Seen()
    kit.consumer.register_callback(registered)
    kit.db.save_doc({})
    answer = kit.consumer.wait_once(extra, since=0)
    assert registered.items == [answer] and extra.items == [answer]
    kit.consumer.wait_once(registered, since=0)  # the registered one is not called twice
    assert len(registered.items) == 2


def test_06_continuous_cb(kit: Any) -> None:
    seen = Seen(5)
    waiting = in_thread(kit.consumer.wait, cb=seen)  # as couchdbkit 0.6's test passes it
    for i in range(5):
        kit.db.save_doc({"_id": "test%s" % i})
    assert seen.wait()[4]["id"] == "test4"
    kit.db.save_doc({"_id": "test5"})
    assert seen.wait(6)[5]["id"] == "test5"
    kit.consumer.stop()
    assert waiting.outcome() is None


def test_06_wait_callback_first(kit: Any) -> None:
    kit.db.bulk_save([{"_id": "x"}, {"_id": "y"}])
    seen = Seen()
    kit.consumer.wait(seen, since=0, limit=2)
    assert sorted(change["id"] for change in seen.items) == ["x", "y"]
    with pytest.raises(TypeError, match="two callbacks"):
        kit.consumer.wait(seen, cb=Seen(), since=0)


def test_06_wait_async_serves_its_own_loop_in_a_thread(kit: Any) -> None:
    kit.db.save_doc({"_id": "before"})
    seen = Seen(2)
    assert kit.consumer.wait_async(seen, since=0) is kit.consumer  # returns at once
    kit.db.save_doc({"_id": "after"})
    assert [change["id"] for change in seen.wait()] == ["before", "after"]
    assert set(seen.threads) != {threading.get_ident()}  # the loop's thread
    thread = kit.consumer._loop_thread
    kit.consumer.close()
    assert not thread.is_alive() and kit.consumer.state == "stopped"
    assert kit.consumer._loop is None  # its own loop, closed


def test_06_wait_async_on_a_given_loop_is_served_by_its_owner(db: Database) -> None:
    db.save_doc({"_id": "one"})
    seen = Seen()
    with Loop() as loop:
        consumer = Consumer(db, loop)
        consumer.wait_async(seen, since=0, limit=1)
        assert not loop.is_running() and seen.items == []  # nothing served it yet
        loop.run()  # returns once the consumer stopped, at its limit
    assert [change["id"] for change in seen.items] == ["one"]
    assert set(seen.threads) == {threading.get_ident()}


def test_06_wait_once_async(kit: Any) -> None:
    registered, seen = Seen(), Seen()
    kit.consumer.register_callback(registered)
    start = kit.consumer.fetch()["last_seq"]
    once = kit.consumer.wait_once_async(seen, since=start)
    assert once is not kit.consumer and once.loop is kit.consumer.loop
    kit.db.save_doc({"_id": "next"})
    answer = seen.wait()[0]
    assert registered.wait() == [answer]
    assert [change["id"] for change in answer["results"]] == ["next"]
    assert set(seen.threads) != {threading.get_ident()}
    kit.consumer.close()
    assert not once.running and once.error is None and once.last_seq == answer["last_seq"]


def test_06_wait_once_async_is_stopped_by_close(kit: Any) -> None:
    seen = Seen()
    once = kit.consumer.wait_once_async(seen, since="now")
    deadline = time.monotonic() + WAIT_S
    while once.phase != "awaiting" and time.monotonic() < deadline:  # the request is out
        threading.Event().wait(0.01)
    assert once.phase == "awaiting"
    kit.consumer.close()
    assert not once.running and once.error is None and seen.items == []


def test_06_wait_once_async_asks_again_after_a_cut(db: Database, couchdb_url: str) -> None:
    """The longpoll's answer is cut after its first bytes: no half answer reaches the callback,
    and the request is sent again from the same seq, whose answer then arrives whole."""
    parts = urllib.parse.urlsplit(couchdb_url)
    start = db.server.request("GET", db.path)["update_seq"]
    with FaultProxy(parts.hostname or "", parts.port or 80, seed=17, plan=Fault("cut", 10),
                    max_faults=1) as proxy:
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(
            "%s:%s" % (parts.hostname, parts.port), "127.0.0.1:%d" % proxy.port)))
        with Server(url) as through, Consumer(through.get_db(db.name)) as consumer:
            seen = Seen()
            once = consumer.wait_once_async(seen, since=start, heartbeat=1000)
            db.save_doc({"_id": "after-the-cut"})
            answer = seen.wait()[0]
            assert [c["id"] for c in answer["results"]] == ["after-the-cut"]
            assert proxy.faults_injected == 1 and proxy.connections >= 2
            assert once.connections >= 2 and len(seen.items) == 1


# --- CouchDB parameters as couchdbkit passed them ----------------------------------------------


def test_heartbeat_true_is_couchdbs_interval_and_false_none() -> None:
    query = changes_request("/db", "longpoll", 0, {"heartbeat": True}).query
    assert query["heartbeat"] == COUCHDB_TRUE_HEARTBEAT_MS
    assert "heartbeat" not in changes_request("/db", "longpoll", 0, {"heartbeat": False}).query


def test_heartbeat_true_against_the_server(kit: Any) -> None:
    start = kit.consumer.fetch(heartbeat=True)["last_seq"]
    waiting = in_thread(kit.consumer.wait_once, since=start, heartbeat=True)
    kit.db.save_doc({"_id": "beat"})
    assert [c["id"] for c in waiting.outcome()["results"]] == ["beat"]
    seen = Seen()
    kit.consumer.wait(seen, since=0, heartbeat=True, limit=1)
    assert seen.items[0]["id"] == "beat"


def test_since_as_int_or_string(kit: Any) -> None:
    kit.db.save_doc({"_id": "a"})
    first = kit.consumer.fetch()["last_seq"]
    kit.db.save_doc({"_id": "b"})
    as_given = kit.consumer.fetch(since=first)
    as_string = kit.consumer.fetch(since=str(first))
    assert [c["id"] for c in as_given["results"]] == ["b"]
    assert [c["id"] for c in as_string["results"]] == ["b"]


def test_filter_as_couchdbkit_named_it(kit: Any) -> None:
    kit.db.save_doc(
        {
            "_id": "_design/d",
            "filters": {"typed": "function(doc, req) { return doc.type === req.query.type; }"},
        }
    )
    kit.db.bulk_save([{"_id": "a1", "type": "a"}, {"_id": "b1", "type": "b"}])
    for name in ("filter", "filter_name"):
        answer = kit.consumer.fetch(**{name: "d/typed", "type": "a"})
        assert [c["id"] for c in answer["results"]] == ["a1"], name
    seen = Seen()
    kit.consumer.wait(seen, since=0, filter="d/typed", type="b", limit=1)
    assert seen.items[0]["id"] == "b1"
    answer = kit.consumer.fetch(filter="_doc_ids", doc_ids=["b1"])  # CouchDB's own spelling
    assert [c["id"] for c in answer["results"]] == ["b1"]
    with pytest.raises(ValueError, match="two filters"):
        kit.consumer.fetch(filter="d/typed", filter_name="d/other")


@pytest.mark.parametrize("call", ["fetch", "wait_once", "start", "wait", "changes"])
def test_a_callable_parameter_is_refused_not_sent(call: str, db: Database) -> None:
    consumer = Consumer(db)
    with pytest.raises(TypeError, match="on_change=.*not a _changes parameter"):
        getattr(consumer, call)(since=0, on_change=print)
    assert consumer.state == "idle"  # nothing was started
    consumer.close()


def test_filter_query_parameters_still_pass() -> None:
    query = changes_request("/db", "normal", 0, {"filter": "d/f", "type": "a", "n": 2}).query
    assert query["filter"] == "d/f" and query["type"] == "a" and query["n"] == 2


# --- couchdb-python's Database.changes ---------------------------------------------------------


def test_couchdb_python_normal_and_longpoll_return_the_answer(db: Database) -> None:
    db.save_doc({"_id": "a"})
    answer = db.changes()  # couchdb-python's default: feed=normal
    assert isinstance(answer, dict) and [c["id"] for c in answer["results"]] == ["a"]
    assert db.changes(feed="normal", since=answer["last_seq"])["results"] == []  # type: ignore[index]
    waiting = in_thread(db.changes, feed="longpoll", since=answer["last_seq"])
    db.save_doc({"_id": "b"})
    assert [c["id"] for c in waiting.outcome()["results"]] == ["b"]
    with pytest.raises(ValueError, match="feed"):
        db.changes(feed="eventsource")


def test_couchdb_python_continuous_loop(db: Database) -> None:
    db.save_doc(
        {
            "_id": "_design/d",
            "filters": {"typed": "function(doc, req) { return doc.type === req.query.type; }"},
        }
    )
    db.bulk_save([{"_id": "a1", "type": "a"}, {"_id": "b1", "type": "b"}])
    seen = []
    # timeout=300 without heartbeats: the server ends the feed with a last_seq line after 0.3 s
    # of silence, which couchdb-python yielded as its last item; here the loop goes on.
    changes = db.changes(
        feed="continuous", since=0, heartbeat=False, timeout=300, include_docs=True,
        filter="d/typed", type="a",
    )
    saver = None
    for change in changes:  # type: ignore[union-attr]
        assert "last_seq" not in change and change["doc"]["type"] == "a"
        seen.append(change["id"])
        if len(seen) == 1:
            saver = in_thread(_save_after_a_feed_ended, db)
        if len(seen) == 2:
            break
    assert saver is not None and saver.outcome() is None
    assert seen == ["a1", "a2"]
    changes.close()  # type: ignore[union-attr]


def _save_after_a_feed_ended(db: Database) -> None:
    threading.Event().wait(0.8)  # the server's timeout (0.3 s) ends at least one feed first
    with Server(db.server.url) as other:
        other.get_db(db.name).bulk_save([{"_id": "b2", "type": "b"}, {"_id": "a2", "type": "a"}])


def test_couchdb_python_selector_form(db: Database) -> None:
    db.bulk_save([{"_id": "a1", "type": "a"}, {"_id": "b1", "type": "b"}])
    answer = db.changes(filter="_selector", _selector={"type": "b"})
    assert [c["id"] for c in answer["results"]] == ["b1"]  # type: ignore[index]


def test_couchdb_python_loop_left_early_closes_its_consumer(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: List[Consumer] = []

    class Recorded(Consumer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(Database, "consumer_class", Recorded)
    db.bulk_save([{"_id": "a"}, {"_id": "b"}])
    changes = db.changes(feed="continuous", since=0)
    assert next(changes)["id"] in ("a", "b")  # type: ignore[arg-type]
    consumer, follower = made  # the one changes() made, and the one following for its iterator
    assert follower.running
    changes.close()  # type: ignore[union-attr]
    assert not follower.running and consumer._loop is None  # its own loop, closed


# --- the guide ---------------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def guide() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Coming from couchdbkit.*?\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match is not None, "the README has no 'Coming from couchdbkit' section"
    return match.group(1)


def test_the_guide_names_every_call_it_replaces() -> None:
    text = guide()
    for name in (
        "register_callback", "wait_once", "fetch", "wait_async", "wait_once_async", "cb=",
        "backend=", "del server", "db.changes", "infinite_changes", "Feed", "heartbeat=True",
    ):
        assert name in text, name
    assert "```python" in text  # examples, run twice each by tests/test_readme.py


def test_the_tour_links_to_the_guide() -> None:
    text = README.read_text(encoding="utf-8")
    tour = text.split("## A one-minute tour", 1)[1].split("\n## ", 1)[0]
    assert "(#coming-from-couchdbkit" in tour
