"""DatabaseWatcher: _db_updates (scripted, as CouchDB 3 sends it), _all_dbs polling (real server),
and stable, complete shard assignment."""

import json
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from changeloop import DatabaseWatcher, Loop, Server, shard_of

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
    paths = []
    while len(paths) < count:
        method, target = fake.next_request(loop)
        paths.append(target.split("?")[0])
    return paths


def test_db_updates_create_update_delete_and_reconnect(fake: FakeCouch) -> None:
    with Loop() as loop, Server(fake.url) as server:
        watcher = DatabaseWatcher(server, lambda name, change: None, loop, match="userdb-*")
        watcher.start()
        first = feeds_requested(fake, loop, 5)
        assert first[0] == "/_all_dbs"
        assert sorted(first[1:]) == [
            "/_db_updates",  # feed=normal&since=now: where "now" is
            "/_db_updates",
            "/userdb-a/_changes",
            "/userdb-b/_changes",
        ]
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
            with caplog.at_level("WARNING", logger="changeloop.watcher"):
                watcher.start()
                run_until(loop, lambda: watcher.mode == "polling" and len(seen) == 2)
            assert "polling _all_dbs" in caplog.text
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


def run_until(loop: Loop, done: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)
