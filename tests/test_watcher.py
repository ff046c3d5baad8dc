"""DatabaseWatcher: _db_updates (scripted, as CouchDB 3 sends it), _all_dbs polling (real server),
and stable, complete shard assignment."""

import json
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from couch3 import FakeClock
from faultproxy import Fault, FaultProxy

from changeloop import DatabaseWatcher, Forbidden, Loop, NotFound, Server, shard_of
from changeloop.watcher import DropEvent

Change = Dict[str, Any]


# -- shards ----------------------------------------------------------------------------------------


def test_shards_are_stable_and_complete() -> None:
    names = ["userdb-%x" % i for i in range(2000)]
    for shards in (1, 2, 3, 7):
        buckets = [[n for n in names if shard_of(n, shards) == i] for i in range(shards)]
        assert sorted(sum(buckets, [])) == sorted(names)  # each name in exactly one shard
        assert min(map(len, buckets)) > len(names) / shards * 0.8  # and spread evenly
    # Stable across processes (hash() is salted per process; CRC-32 is not).
    code = (
        "from changeloop import shard_of; print([shard_of('userdb-%x' % i, 7) for i in range(50)])"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        timeout=30,
    )
    assert child.stdout.strip() == str([shard_of("userdb-%x" % i, 7) for i in range(50)])


def test_watcher_wants_by_match_and_shard() -> None:
    server = Server("http://127.0.0.1:9")
    watcher = DatabaseWatcher(server, lambda name, change: None, match="userdb-*", shard=(1, 3))
    wanted = [n for n in ("userdb-%d" % i for i in range(30)) if watcher.wants(n)]
    assert wanted == [n for n in ("userdb-%d" % i for i in range(30)) if shard_of(n, 3) == 1]
    assert not watcher.wants("other")
    assert not DatabaseWatcher(server, lambda name, change: None).wants("_users")
    with pytest.raises(ValueError):
        DatabaseWatcher(server, lambda name, change: None, shard=(3, 3))
    watcher.loop.close()


# -- _db_updates against a routed scripted server -----------------------------------------------


class FakeCouch:
    """A loopback server that routes by path, as much of CouchDB 3 as the watcher needs."""

    HEAD = (
        b"HTTP/1.1 200 OK\r\nServer: CouchDB/3.5.0 (Erlang OTP/25)\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def __init__(self, dbs: List[str]) -> None:
        self.dbs = list(dbs)
        #: Called when the watcher asks where "now" is on _db_updates (a race can go there).
        self.on_resolve: Callable[[], None] = lambda: None
        self.requests: queue.Queue[Tuple[str, str]] = queue.Queue()
        self.updates: queue.Queue[Optional[bytes]] = queue.Queue()
        self.closed_feeds: queue.Queue[str] = queue.Queue()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._sockets: List[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def close(self) -> None:
        self._stop.set()
        self.updates.put(None)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        buffer = b""
        while not self._stop.is_set():
            while b"\r\n\r\n" not in buffer:
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    if self._stop.is_set():
                        return
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            method, target = head.split(b" ")[:2]
            path = target.decode().split("?")[0]
            self.requests.put((method.decode(), target.decode()))
            if path == "/_all_dbs":
                body = json.dumps(self.dbs).encode()
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            elif path == "/_db_updates" and "feed=normal" in target.decode():
                self.on_resolve()
                body = b'{"results":[\n\n],\n"last_seq":"0-g1AAAA"}\n'
                sock.sendall(self.HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            elif path == "/_db_updates":
                self._stream_updates(sock)
                return
            else:
                self._hold_feed(sock, path.split("/")[1])
                return

    def _stream_updates(self, sock: socket.socket) -> None:
        # CouchDB 3 delays the head of _db_updates until the first event or heartbeat.
        sock.sendall(self.HEAD + b"1\r\n\n\r\n")
        while not self._stop.is_set():
            try:
                item = self.updates.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            if item == b"CUT":
                sock.close()
                return
            sock.sendall(b"%x\r\n%s\r\n" % (len(item), item))

    def _hold_feed(self, sock: socket.socket, db: str) -> None:
        sock.sendall(self.HEAD + b"1\r\n\n\r\n")
        while not self._stop.is_set():
            try:
                if sock.recv(1) == b"":
                    self.closed_feeds.put(db)  # the client let go of this feed
                    return
            except socket.timeout:
                continue
            except OSError:
                self.closed_feeds.put(db)
                return

    def push(self, db_name: str, kind: str, seq: str) -> None:
        row = {"db_name": db_name, "type": kind, "seq": seq}
        self.updates.put(json.dumps(row).encode() + b"\n")

    def next_request(self, loop: Loop, timeout: float = 5.0) -> Tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.requests.get_nowait()
            except queue.Empty:
                loop.run_once(0.02)
        raise AssertionError("no request arrived")


@pytest.fixture
def fake() -> Iterator[FakeCouch]:
    server = FakeCouch(["userdb-a", "userdb-b", "_users", "other"])
    yield server
    server.close()


def feeds_requested(fake: FakeCouch, loop: Loop, count: int) -> List[str]:
    return [target.split("?")[0] for target in targets_requested(fake, loop, count)]


def targets_requested(fake: FakeCouch, loop: Loop, count: int) -> List[str]:
    return [fake.next_request(loop)[1] for _ in range(count)]


def request_for(fake: FakeCouch, loop: Loop, path: str, contains: str = "") -> str:
    """The target of the next request for ``path`` (holding ``contains``), others skipped."""
    return targets_until(fake, loop, path, contains)[-1]


def targets_until(fake: FakeCouch, loop: Loop, path: str, contains: str = "") -> List[str]:
    """The targets requested up to the first for ``path`` (holding ``contains``)."""
    deadline = time.monotonic() + 5.0
    targets: List[str] = []
    while not targets or not (targets[-1].split("?")[0] == path and contains in targets[-1]):
        targets.append(fake.next_request(loop, max(0.0, deadline - time.monotonic()))[1])
    return targets


class FailingStore:
    """A checkpoint store that cannot load: a 403 on the database it lives in."""

    loads = 0

    def load(self) -> Any:
        FailingStore.loads += 1
        raise Forbidden(403, "forbidden", "You are not allowed to access this db.")

    def save(self, seq: Any) -> None:
        raise AssertionError("never started, never saved")


def test_db_updates_create_update_delete_and_reconnect(fake: FakeCouch) -> None:
    with Loop() as loop, Server(fake.url) as server:
        watcher = DatabaseWatcher(server, lambda name, change: None, loop, match="userdb-*")
        watcher.start()
        first = feeds_requested(fake, loop, 6)
        # A listing, where "now" is (feed=normal&since=now), a listing again: no gap between.
        assert first[:3] == ["/_all_dbs", "/_db_updates", "/_all_dbs"]
        assert sorted(first[3:]) == ["/_db_updates", "/userdb-a/_changes", "/userdb-b/_changes"]
        assert watcher.mode == "db_updates" and watcher.active() == ["userdb-a", "userdb-b"]

        fake.push("userdb-c", "created", "1-g1AAAA")
        fake.push("other-db", "created", "2-g1AAAA")  # not matched: ignored
        fake.push("userdb-a", "updated", "3-g1AAAA")  # followed already: nothing new
        assert feeds_requested(fake, loop, 1) == ["/userdb-c/_changes"]
        assert watcher.active() == ["userdb-a", "userdb-b", "userdb-c"]

        fake.push("userdb-b", "deleted", "4-g1AAAA")
        deadline = time.monotonic() + 5
        while "userdb-b" in watcher.active() and time.monotonic() < deadline:
            loop.run_once(0.02)
        assert watcher.active() == ["userdb-a", "userdb-c"]
        assert fake.closed_feeds.get(timeout=5) == "userdb-b"

        fake.updates.put(b"CUT")  # the _db_updates connection breaks: resume after seq 4
        method, target = fake.next_request(loop, timeout=10)
        assert target.startswith("/_db_updates?")
        assert "since=4-g1AAAA" in target
        watcher.stop()


def test_since_now_is_the_watchers_start(fake: FakeCouch) -> None:
    # A database created while "now" is being resolved is in neither the first listing nor the
    # feed: the second listing finds it, and like any database created after the start it is
    # followed from its beginning; those there at the start begin at now.
    fake.on_resolve = lambda: fake.dbs.append("userdb-race")
    with Loop() as loop, Server(fake.url) as server:
        watcher = DatabaseWatcher(
            server, lambda name, change: None, loop, match="userdb-*", since="now"
        )
        watcher.start()
        targets = targets_until(fake, loop, "/userdb-race/_changes")
        targets += targets_requested(fake, loop, 7 - len(targets))
        feeds = {t.split("?")[0]: t for t in targets[3:]}
        assert sorted(feeds) == [
            "/_db_updates",
            "/userdb-a/_changes",
            "/userdb-b/_changes",
            "/userdb-race/_changes",
        ]
        assert "since=0-g1AAAA" in feeds["/_db_updates"]  # the seq resolved before the listing
        assert "since=now" in feeds["/userdb-a/_changes"]
        assert "since=now" not in feeds["/userdb-race/_changes"]
        assert "since=0" in feeds["/userdb-race/_changes"]
        fake.push("userdb-new", "created", "1-g1AAAA")
        assert "since=0" in request_for(fake, loop, "/userdb-new/_changes")
        assert watcher.active() == ["userdb-a", "userdb-b", "userdb-new", "userdb-race"]
        watcher.stop()


def test_db_updates_survive_a_database_that_cannot_start(fake: FakeCouch) -> None:
    # A store that cannot load (a 403) used to escape from the _db_updates callback, which
    # stopped that feed for good: databases created later were never followed.
    drops: List[DropEvent] = []
    FailingStore.loads = 0

    def store(db: Any) -> Any:
        return FailingStore() if db.name == "userdb-bad" else None

    with Loop() as loop, Server(fake.url) as server:
        watcher = DatabaseWatcher(
            server,
            lambda name, change: None,
            loop,
            match="userdb-*",
            checkpoint=store,
            poll_interval=0.2,
            on_drop=drops.append,
        )
        watcher.start()
        fake.push("userdb-bad", "created", "1-g1AAAA")
        fake.push("userdb-c", "created", "2-g1AAAA")
        request_for(fake, loop, "/userdb-c/_changes")
        assert watcher.mode == "db_updates" and "userdb-c" in watcher.active()
        # The failing one is reported, and retried with a backoff that doubles.
        run_until(loop, lambda: len(drops) >= 3)
        assert [d.name for d in drops] == ["userdb-bad"] * len(drops)
        assert all(isinstance(d.error, Forbidden) and d.consumer is None for d in drops)
        assert [(d.failures, d.retry_in) for d in drops[:3]] == [(1, 0.2), (2, 0.4), (3, 0.8)]
        assert FailingStore.loads == len(drops)
        assert watcher.dropped() == ["userdb-bad"] and "userdb-bad" not in watcher.active()
        fake.push("userdb-d", "created", "3-g1AAAA")  # the feed still works
        request_for(fake, loop, "/userdb-d/_changes")
        fake.push("userdb-bad", "deleted", "4-g1AAAA")  # a deleted database is forgotten
        run_until(loop, lambda: watcher.dropped() == [])
        watcher.stop()


def test_a_db_updates_feed_that_stops_for_good_falls_back_to_polling(fake: FakeCouch) -> None:
    # Whatever stops the _db_updates feed for good (here a match predicate that raises once,
    # which makes the feed's callback fail), the watch goes on by polling _all_dbs at once.
    raised: List[str] = []

    def match(name: str) -> bool:
        if name == "userdb-boom" and not raised:
            raised.append(name)
            raise ValueError("a buggy predicate")
        return name.startswith("userdb-")

    with Loop() as loop, Server(fake.url) as server:
        watcher = DatabaseWatcher(
            server, lambda name, change: None, loop, match=match, poll_interval=0.2
        )
        watcher.start()
        request_for(fake, loop, "/_db_updates", "feed=continuous")
        fake.dbs.append("userdb-c")
        fake.push("userdb-boom", "created", "1-g1AAAA")
        request_for(fake, loop, "/userdb-c/_changes")  # found by a poll
        assert watcher.mode == "polling" and raised == ["userdb-boom"]
        assert "userdb-c" in watcher.active()
        watcher.stop()


# -- _all_dbs polling against the real server -----------------------------------------------------


def test_polling_fallback_against_the_real_server(
    couchdb_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = "wtest-%s-" % uuid.uuid4().hex[:8]
    seen: List[Tuple[str, str]] = []
    with Server(couchdb_url) as server, Loop() as loop:
        for suffix in ("a", "b"):
            server.create_db(prefix + suffix).save_doc({"_id": "doc-" + suffix})
        server.create_db("unrelated-" + prefix)
        watcher = DatabaseWatcher(
            server,
            lambda name, change: seen.append((name, change["id"])),
            loop,
            match=prefix + "*",
            poll_interval=0.2,
            params={"heartbeat": 1000},
        )
        try:
            with caplog.at_level("DEBUG", logger="changeloop"):
                watcher.start()
                run_until(loop, lambda: watcher.mode == "polling" and len(seen) == 2)
            # pouchdb-server has no _db_updates: an expected fallback, said at INFO, and nothing
            # on the way is a warning or an error.
            fallback = [r for r in caplog.records if "polling _all_dbs" in r.getMessage()]
            assert [r.levelname for r in fallback] == ["INFO"]
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
            assert sorted(seen) == [(prefix + "a", "doc-a"), (prefix + "b", "doc-b")]

            server.create_db(prefix + "c").save_doc({"_id": "doc-c"})
            run_until(loop, lambda: (prefix + "c", "doc-c") in seen)
            server.delete_db(prefix + "a")
            run_until(loop, lambda: prefix + "a" not in watcher.active())
            assert watcher.active() == [prefix + "b", prefix + "c"]
        finally:
            watcher.stop()
            for name in (prefix + "b", prefix + "c", "unrelated-" + prefix):
                server.delete_db(name)


def run_until(
    loop: Loop, done: Any, timeout: float = 10.0, tick: Callable[[], None] = lambda: None
) -> None:
    """Run the loop until ``done()``; ``tick()`` (a fake clock moving on) between passes."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)
        tick()


@pytest.fixture
def prefix(couchdb_url: str) -> Iterator[str]:
    """A unique database name prefix; the test's databases are deleted afterwards."""
    prefix = "wtest-%s-" % uuid.uuid4().hex[:8]
    yield prefix
    with Server(couchdb_url) as server:
        for name in server.all_dbs():
            if name.startswith(prefix):
                server.delete_db(name)


def test_since_now_follows_a_database_created_later_from_its_beginning(
    couchdb_url: str, prefix: str
) -> None:
    # "now" is the watcher's start: a database there then begins at now, one created after
    # it from its first change, even when the poll finds it with changes already made.
    clock = FakeClock()
    seen: List[Tuple[str, str]] = []
    with Server(couchdb_url) as server, Loop(clock=clock) as loop:
        server.create_db(prefix + "old").save_doc({"_id": "before"})
        watcher = DatabaseWatcher(
            server, lambda name, change: seen.append((name, change["id"])), loop,
            match=prefix + "*", since="now",
        )  # fmt: skip
        watcher.start()
        try:
            run_until(loop, lambda: watcher.consumers[prefix + "old"].last_seq != "now")
            assert watcher.mode == "polling"  # pouchdb-server has no _db_updates
            new = server.create_db(prefix + "new")
            new.bulk_save([{"_id": "welcome"}, {"_id": "profile"}])
            run_until(
                loop, lambda: prefix + "new" in watcher.active(), tick=lambda: clock.advance(1)
            )
            new.save_doc({"_id": "later"})
            server.get_db(prefix + "old").save_doc({"_id": "after"})
            run_until(loop, lambda: len(seen) == 4)
            assert sorted(seen) == sorted(
                [(prefix + "new", i) for i in ("welcome", "profile", "later")]
                + [(prefix + "old", "after")]
            )
        finally:
            watcher.stop()


def test_polling_survives_a_database_that_cannot_start(
    couchdb_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A store that cannot load (a 403) used to escape from the poll, which was never armed
    # again: databases created later were never followed.
    clock = FakeClock()
    seen: List[Tuple[str, str]] = []
    drops: List[DropEvent] = []
    FailingStore.loads = 0
    with Server(couchdb_url) as server, Loop(clock=clock) as loop:
        watcher = DatabaseWatcher(
            server, lambda name, change: seen.append((name, change["id"])), loop,
            match=prefix + "*", on_drop=drops.append,
            checkpoint=lambda db: FailingStore() if db.name.endswith("bad") else None,
        )  # fmt: skip
        watcher.start()
        try:
            server.create_db(prefix + "bad").save_doc({"_id": "unseen"})
            server.create_db(prefix + "later").save_doc({"_id": "doc"})  # after "bad" in a poll
            run_until(loop, lambda: seen, tick=lambda: clock.advance(1))
            assert seen == [(prefix + "later", "doc")]
            assert (drops[0].name, drops[0].failures, drops[0].retry_in) == (prefix + "bad", 1, 10)
            assert isinstance(drops[0].error, Forbidden)
            assert watcher.active() == [prefix + "later"] and watcher.dropped() == [prefix + "bad"]
            # Said once, as a warning (it is retried), not once as an error and again as that.
            said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno > 20]
            assert [level for level, message in said if prefix + "bad" in message] == ["WARNING"]
        finally:
            watcher.stop()


def test_a_database_deleted_and_re_created_between_two_polls_is_followed_again(
    couchdb_url: str, prefix: str
) -> None:
    # Its consumer stops on the 404 of a reconnection; that used to keep the name taken for
    # ever, so the new database was never followed. Now it is dropped, and the next poll that
    # lists it follows it again, from its beginning (its seqs start over).
    name = prefix + "x"
    clock = FakeClock()
    seen: List[Tuple[str, str]] = []
    drops: List[DropEvent] = []
    with Server(couchdb_url) as admin:
        admin.create_db(name).save_doc({"_id": "old"})
        port = int(couchdb_url.rsplit(":", 1)[1])
        with FaultProxy("127.0.0.1", port, seed=1, plan=Fault("none")) as proxy, Server(
            proxy.url
        ) as server, Loop(clock=clock) as loop:
            recreated: List[str] = []

            def on_error(event: Any) -> None:
                if isinstance(event.error, NotFound) and not recreated:
                    admin.create_db(name).save_doc({"_id": "new"})  # before any poll
                    recreated.append(name)

            def tick() -> None:  # the reconnection's backoff is under 0.1 s, the poll 10 s away
                clock.advance(1.0 if recreated else 0.02)

            watcher = DatabaseWatcher(
                server, lambda db, change: seen.append((db, change["id"])), loop,
                match=name, on_drop=drops.append, consumer_options={"on_error": on_error},
            )  # fmt: skip
            watcher.start()
            try:
                run_until(loop, lambda: seen == [(name, "old")])
                admin.delete_db(name)
                # CouchDB ends the feed of a deleted database (pouchdb-server keeps it open:
                # the proxy cuts it), and the reconnection meets the 404.
                proxy.inject_now("cut")
                run_until(loop, lambda: len(seen) == 2, tick=tick)
                assert seen == [(name, "old"), (name, "new")] and recreated
                assert len(drops) == 1 and isinstance(drops[0].error, NotFound)
                assert drops[0].consumer is not None and drops[0].name == name
                assert watcher.active() == [name] and watcher.dropped() == []
            finally:
                watcher.stop()


def test_a_consumer_that_keeps_failing_is_retried_with_a_backoff(
    couchdb_url: str, prefix: str
) -> None:
    # A callback that raises stops its consumer for good: the watcher drops it, retries it
    # after 10 s, 20 s, 40 s... while the others go on, and once the callback is repaired the
    # change it failed on is delivered: nothing is lost.
    clock = FakeClock()
    seen: List[Tuple[str, str]] = []
    drops: List[DropEvent] = []
    broken = [True]

    def callback(name: str, change: Dict[str, Any]) -> None:
        if name.endswith("bad") and broken[0]:
            raise RuntimeError("cannot handle %s" % change["id"])
        seen.append((name, change["id"]))

    with Server(couchdb_url) as server, Loop(clock=clock) as loop:
        server.create_db(prefix + "bad").bulk_save([{"_id": "b1"}, {"_id": "b2"}])
        server.create_db(prefix + "good").save_doc({"_id": "g1"})
        watcher = DatabaseWatcher(server, callback, loop, match=prefix + "*", on_drop=drops.append)
        watcher.start()
        try:
            server.create_db(prefix + "later").save_doc({"_id": "l1"})
            started = clock.now
            run_until(loop, lambda: clock.now - started > 75, tick=lambda: clock.advance(2))
            assert sorted(seen) == [(prefix + "good", "g1"), (prefix + "later", "l1")]
            broken[0] = False
            run_until(loop, lambda: len(seen) == 4, tick=lambda: clock.advance(2))
            assert seen[2:] == [(prefix + "bad", "b1"), (prefix + "bad", "b2")]
            assert [(d.failures, d.retry_in) for d in drops] == [(1, 10), (2, 20), (3, 40)]
            assert all(d.consumer is not None and d.consumer.delivered == 0 for d in drops)
            assert len(drops) == 3 and watcher.dropped() == []
        finally:
            watcher.stop()
