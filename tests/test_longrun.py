"""Running for months at scale: the give-up policy, name resolution off the loop, pause/resume
backpressure and the stats an operator reads (issue 15).

Scripted CouchDB 3 servers on loopback; time is a fake clock wherever a backoff would make a test
wait, and a resolver whose lookups the test controls stands in for a slow or broken DNS.
"""

import socket
import threading
import time
import tracemalloc
from typing import Any, Dict, List

import pytest
from couch3 import COUCH_HEAD, HEARTBEAT, FakeClock, doc_id, feed, rig, row, run_until, seq
from scripted import Close, Pause, Read, ScriptedServer, Send, Stall, chunk

from changeloop import (
    Consumer,
    GaveUpError,
    Loop,
    NameResolutionError,
    ReadError,
    Server,
    _resolve,
)
from changeloop._resolve import Resolver

pytestmark = pytest.mark.timeout(30)

Change = Dict[str, Any]
CUT = [Read(), Close()]  # a connection that answers nothing: a FeedError, retried


def fail_through_backoffs(r: Any, clock: FakeClock, failures: int) -> None:
    """Let ``failures`` connections fail, skipping each backoff on the fake clock."""
    for count in range(1, failures + 1):
        r.run_until(lambda count=count: len(r.errors()) >= count or not r.consumer.running)
        if not r.consumer.running:
            return
        retry_in = r.errors()[-1].retry_in
        clock.advance((retry_in or 0.0) + 0.001)


# -- the give-up policy ----------------------------------------------------------------------


def test_by_default_a_consumer_never_gives_up() -> None:
    clock = FakeClock()
    with rig([CUT], clock=clock) as r:
        r.start(since=0, heartbeat=500)
        fail_through_backoffs(r, clock, 25)  # backoffs up to the 60 s cap: about 15 minutes
        assert r.consumer.running and r.consumer.error is None
        assert all(e.will_retry for e in r.errors())
        r.consumer.stop()


def test_max_retries_gives_up_with_a_typed_error_that_says_how_often() -> None:
    clock = FakeClock()
    with rig([CUT], clock=clock, max_retries=3) as r:
        r.start(since=0, heartbeat=500)
        fail_through_backoffs(r, clock, 4)
        r.run_until(lambda: not r.consumer.running)
        error = r.consumer.error
        assert r.srv.connections == 4  # the first attempt and 3 retries
    assert isinstance(error, GaveUpError) and error.attempts == 4
    assert isinstance(error.__cause__, ReadError)  # closed before answering
    assert "gave up after 4 failed attempts in a row" in str(error)
    assert r.consumer.state == "stopped" and not r.errors()[-1].will_retry


def test_max_outage_gives_up_after_that_long_without_a_healthy_connection() -> None:
    clock = FakeClock()
    with rig([CUT], clock=clock, max_outage=20.0) as r:
        r.start(since=0, heartbeat=500)
        fail_through_backoffs(r, clock, 40)
        r.run_until(lambda: not r.consumer.running)
        error = r.consumer.error
    assert isinstance(error, GaveUpError) and error.outage >= 20.0
    assert "s without a healthy connection" in str(error)


def test_a_connection_that_delivers_resets_the_count_toward_giving_up() -> None:
    clock = FakeClock()
    delivering = [Read(), Send(COUCH_HEAD + chunk(row(1))), Close()]
    with rig([CUT, CUT, delivering, CUT, CUT, feed(HEARTBEAT)], clock=clock, max_retries=2) as r:
        r.start(since=0, heartbeat=500)
        fail_through_backoffs(r, clock, 5)
        r.run_until(lambda: r.srv.connections == 6)
        assert r.consumer.running and r.ids == [doc_id(1)]
        r.consumer.stop()


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_max_retries_must_be_a_count(bad: Any) -> None:
    with Server("http://127.0.0.1:9") as server:
        with pytest.raises(ValueError, match="max_retries"):
            Consumer(server.get_db("db"), max_retries=bad)


# -- name resolution off the loop ------------------------------------------------------------


class SlowDNS:
    """A getaddrinfo that blocks for the names the test holds, and counts its lookups."""

    def __init__(self, answers: Dict[str, Any]) -> None:
        self.answers = answers
        self.release = threading.Event()
        self.calls: List[str] = []
        self.slow = {"slow.example"}

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(host)
        if host in self.slow:
            self.release.wait(10)
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return socket.getaddrinfo(answer, port, type=socket.SOCK_STREAM)


def test_a_blocking_resolver_leaves_the_other_feeds_of_the_loop_delivering() -> None:
    trickle = [Read(), Send(COUCH_HEAD)]
    for n in range(1, 6):
        trickle += [Send(chunk(row(n))), Pause(0.1)]
    trickle.append(Stall())
    with ScriptedServer([trickle, feed(chunk(row(1)) + HEARTBEAT)]) as srv, Loop() as loop:
        port = int(srv.url.rsplit(":", 1)[1])
        dns = SlowDNS({"slow.example": "127.0.0.1"})
        _resolve._RESOLVERS[loop] = Resolver(loop, getaddrinfo=dns)
        fast_seen: List[str] = []
        slow_seen: List[str] = []
        with Server(srv.url) as fast_server, Server("http://slow.example:%d" % port) as slow:
            fast = Consumer(fast_server.get_db("fast"), loop)
            blocked = Consumer(slow.get_db("slow"), loop)
            blocked.start(lambda c: slow_seen.append(c["id"]), since=0, heartbeat=10_000)
            fast.start(lambda c: fast_seen.append(c["id"]), since=0, heartbeat=10_000)
            run_until(loop, lambda: len(fast_seen) == 5, timeout=5)
            # All five came while the slow name was still being looked up.
            assert dns.calls == ["slow.example"] and blocked.phase == "connecting"
            assert slow_seen == [] and not dns.release.is_set()
            dns.release.set()
            run_until(loop, lambda: slow_seen == [doc_id(1)], timeout=5)
            fast.stop()
            blocked.stop()


def test_feeds_of_one_server_resolve_its_name_once() -> None:
    with ScriptedServer([feed(HEARTBEAT)]) as srv, Loop() as loop:
        port = int(srv.url.rsplit(":", 1)[1])
        dns = SlowDNS({"couch.example": "127.0.0.1"})
        dns.slow = set()
        _resolve._RESOLVERS[loop] = Resolver(loop, getaddrinfo=dns)
        with Server("http://couch.example:%d" % port) as server:
            consumers = [Consumer(server.get_db("db%d" % n), loop) for n in range(20)]
            for consumer in consumers:
                consumer.start(lambda c: None, since=0, heartbeat=10_000)
            run_until(loop, lambda: all(c.state == "streaming" for c in consumers), timeout=10)
            for consumer in consumers:
                consumer.stop()
    assert dns.calls == ["couch.example"]


def test_a_name_that_does_not_exist_is_reported_as_such_and_retried() -> None:
    with Loop() as loop:
        gone = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        _resolve._RESOLVERS[loop] = Resolver(loop, getaddrinfo=SlowDNS({"gone.invalid": gone}))
        errors: List[Any] = []
        with Server("http://gone.invalid:5984") as server:
            consumer = Consumer(server.get_db("db"), loop, on_error=errors.append)
            consumer.start(lambda c: None, since=0)
            run_until(loop, lambda: errors, timeout=5)
            consumer.stop()
    (event,) = errors
    assert isinstance(event.error, NameResolutionError) and event.will_retry
    assert "gone.invalid:5984: name does not exist" in str(event.error)


def test_address_literals_are_never_sent_to_the_resolver() -> None:
    assert _resolve.is_literal("127.0.0.1") and _resolve.is_literal("::1")
    assert _resolve.is_literal("fe80::1%eth0")
    assert not _resolve.is_literal("localhost") and not _resolve.is_literal("couch.example")


def test_the_resolver_caches_for_a_while_then_asks_again() -> None:
    clock = FakeClock()
    with Loop(clock=clock) as loop:
        dns = SlowDNS({"couch.example": "127.0.0.1"})
        dns.slow = set()
        resolver = Resolver(loop, getaddrinfo=dns, cache_s=30.0)
        answers: List[Any] = []
        assert resolver.lookup("couch.example", 5984, answers.append) is None
        run_until(loop, lambda: answers)
        assert resolver.lookup("couch.example", 5984, answers.append) == answers[0]
        clock.advance(30.0)
        assert resolver.lookup("couch.example", 5984, answers.append) is None  # stale: again
        run_until(loop, lambda: len(answers) == 2)
        resolver.close()
    assert dns.calls == ["couch.example", "couch.example"]


# -- pause and resume ------------------------------------------------------------------------

ROWS = 100_000


def test_a_paused_feed_holds_the_server_back_in_flat_memory_and_loses_nothing() -> None:
    body = chunk(b"".join(row(n) for n in range(1, ROWS + 1)))  # about 21 MB
    with ScriptedServer([feed(body + HEARTBEAT)]) as srv, Server(srv.url) as server:
        with Loop() as loop:
            consumer = Consumer(server.get_db("db"), loop)
            seen: List[str] = []

            def callback(change: Change) -> None:
                seen.append(change["id"])
                if len(seen) == 1000:
                    consumer.pause()  # the queue downstream is full

            consumer.start(callback, since=0, heartbeat=10_000)
            run_until(loop, lambda: consumer.paused and len(seen) >= 1000, timeout=10)
            stream = consumer._stream
            assert stream is not None
            for _ in range(20):  # let what the kernel holds settle
                loop.run_once(0.01)
            received, delivered = stream.bytes_received, len(seen)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    loop.run_once(0.05)
                after, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # Paused: nothing read, nothing delivered, the Python heap flat, and the server
            # held back by TCP (it could not send most of the body).
            assert stream.bytes_received == received and len(seen) == delivered
            assert peak - before < 256 * 1024 and after - before < 64 * 1024
            assert received < len(body) // 4
            assert consumer.state == "streaming" and consumer.stats()["paused"] is True
            consumer.resume()
            run_until(loop, lambda: len(seen) == ROWS, timeout=20)
            consumer.stop()
    assert seen == [doc_id(n) for n in range(1, ROWS + 1)]
    assert consumer.last_seq == seq(ROWS)


def test_a_paused_feed_is_not_declared_dead_by_its_watchdog() -> None:
    clock = FakeClock()
    with rig([feed(chunk(row(1)) + HEARTBEAT)], clock=clock) as r:
        r.start(since=0, heartbeat=500)
        r.run_until(lambda: r.ids == [doc_id(1)])
        r.consumer.pause()
        clock.advance(60.0)  # 40 allowances of silence
        for _ in range(5):
            r.loop.run_once(0.01)
        assert r.errors() == [] and r.consumer.state == "streaming"
        r.consumer.resume()
        clock.advance(1.6)  # the watchdog counts again, from the resume
        r.run_until(lambda: r.errors())
        r.consumer.stop()


def test_pause_and_resume_are_idempotent_and_work_before_the_feed_streams() -> None:
    later = [Read(), Send(COUCH_HEAD + HEARTBEAT), Pause(0.2), Send(chunk(row(1))), Stall()]
    with rig([later]) as r:
        r.consumer.start(r.changes.append, since=0, heartbeat=500)
        r.consumer.pause()
        r.consumer.pause()
        r.run_until(lambda: r.consumer.state == "streaming")
        for _ in range(10):
            r.loop.run_once(0.01)
        assert r.ids == [] and r.consumer.paused
        r.consumer.resume()
        r.consumer.resume()
        r.run_until(lambda: r.ids == [doc_id(1)])
        r.consumer.stop()


# -- stats ----------------------------------------------------------------------------------


def test_stats_say_what_an_operator_asks() -> None:
    broken = [Read(), Send(COUCH_HEAD + chunk(row(1))), Close()]
    with rig([broken, feed(chunk(row(2)) + HEARTBEAT)]) as r:
        r.start(since=0, heartbeat=500)
        r.run_until(lambda: r.ids == [doc_id(1), doc_id(2)])
        stats = r.consumer.stats()
        feeds = r.loop.stats()["feeds"]
        r.consumer.stop()
        stopped = r.loop.stats()["feeds"]
    assert stats["state"] == stats["phase"] == "streaming" and stats["paused"] is False
    assert stats["connections"] == 2 and stats["delivered"] == 2
    assert stats["last_seq"] == seq(2) and "closed" in stats["last_error"]
    assert abs(stats["last_error_at"] - time.time()) < 60
    assert 0 <= stats["since_last_byte"] < 5 and stats["db"] == "db"
    assert feeds == {"streaming": 1} and stopped == {"stopped": 1}


def test_loop_stats_count_feeds_by_state() -> None:
    with ScriptedServer([feed(HEARTBEAT)]) as srv, Server(srv.url) as server, Loop() as loop:
        consumers = [Consumer(server.get_db("db%d" % n), loop) for n in range(3)]
        for consumer in consumers:
            consumer.start(lambda c: None, since=0, heartbeat=10_000)
        run_until(loop, lambda: all(c.state == "streaming" for c in consumers))
        consumers[0].stop()
        stats = loop.stats()
        for consumer in consumers[1:]:
            consumer.stop()
    assert stats["feeds"] == {"streaming": 2, "stopped": 1}
    assert stats["handlers"] == 2 and stats["running"] is False
