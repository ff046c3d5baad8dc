"""Never lose a change: the Consumer against servers that cut, reset, stall, lie and refuse.

Each fault is a scripted server. What every test checks: the error type *and* message the
consumer reports, whether it retries, where it resumes (the ``since`` of the next request, which
must be the seq of the last change *delivered*), and that a hostile peer cannot make it buffer
without bound. Timer-driven behaviour (backoff, watchdog) runs on a fake clock, advanced by hand
while real sockets deliver the bytes, so no test sleeps through a timeout.
"""

import contextlib
import json
import random
import ssl
import time
from typing import Any, Callable, Dict, List, Tuple, Type

import pytest
import trustme
from couch3 import (
    COUCH_HEAD,
    HEARTBEAT,
    FakeClock,
    couch_end,
    doc_id,
    feed,
    read_everything_at_once,
    rig,
    row,
    rows,
    run_until,
    seq,
    settle,
    since_of,
)
from scripted import (
    LAST_CHUNK,
    Close,
    Drip,
    Pause,
    Read,
    Reset,
    ScriptedServer,
    Send,
    Stall,
    chunk,
)

from changeloop import (
    BadRequest,
    CallbackError,
    Consumer,
    FeedError,
    FeedEvent,
    Forbidden,
    HTTPError,
    LineTooLongError,
    Loop,
    NotFound,
    ProtocolError,
    ReadError,
    ReadTimeout,
    Server,
    ServerError,
    TLSError,
    Unauthorized,
)
from changeloop._params import silence_allowance
from changeloop._readers import MAX_HEAD_BYTES
from changeloop._stream import RECV_BYTES
from changeloop.checkpoint import MemoryCheckpoint
from changeloop.consumer import RECONNECT_BASE_S, RECONNECT_CAP_S, WATCHDOG_RESOLUTION

pytestmark = pytest.mark.timeout(10)

Change = Dict[str, Any]
SEED = 20261122


def error_response(status: int, error: str, reason: str) -> bytes:
    """An error answer as CouchDB 3 sends it: Content-Length framing, JSON body plus newline."""
    body = json.dumps({"error": error, "reason": reason}).encode() + b"\n"
    phrases = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Object Not Found"}
    phrases.update({429: "Too Many Requests", 500: "Internal Server Error"})
    phrases.update({502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"})
    return (
        b"HTTP/1.1 %d %s\r\n" % (status, phrases[status].encode())
        + b"Cache-Control: must-revalidate\r\n"
        + b"Content-Length: %d\r\n" % len(body)
        + b"Content-Type: application/json\r\n"
        + b"Server: CouchDB/3.5.0 (Erlang OTP/25)\r\n"
        + b"\r\n"
        + body
    )


# -- the rig --------------------------------------------------------------------------------


# -- cuts and resets: resume after the last delivered change --------------------------------


def test_resume_after_a_cut_in_the_middle_of_a_chunk() -> None:
    framed = chunk(row(4))
    size_line = b"%x\r\n" % len(row(4))
    cut = [Read(), Send(COUCH_HEAD + chunk(rows(1, 2, 3)) + framed[:40]), Close()]
    with rig([cut, feed(chunk(rows(4, 5)))]) as r:
        r.start(since=0)
        read_everything_at_once(r)  # the rows and the cut are both there before the first read
        stream = r.stream()
        r.run_until(lambda: stream.error is not None)  # the rows' read, then the one seeing EOF
        assert stream.decoder.rows == 3 and len(r.changes) == 3
        r.run_until(lambda: len(r.changes) == 5)
        first, second = r.srv.requests
        (event,) = r.errors()
    # Rows 1-3 came in the same read as the cut: they are delivered, then the cut handled.
    assert r.ids == [doc_id(n) for n in range(1, 6)]  # each exactly once
    assert since_of(first) == "0" and since_of(second) == seq(3)
    short = len(row(4)) - (40 - len(size_line))
    assert isinstance(event.error, ProtocolError)
    assert "connection closed inside a chunk, %d bytes short" % short in str(event.error)
    assert event.will_retry and event.seq == seq(3)
    assert r.consumer.connections == 2 and r.consumer.last_seq == seq(5)


def test_a_reset_in_the_middle_of_a_line_reconnects() -> None:
    reset = [Read(), Send(COUCH_HEAD + chunk(row(1)) + chunk(row(2)[:30])), Pause(0.05), Reset()]
    with rig([reset, feed(chunk(rows(2, 3)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        second = r.srv.requests[1]
    assert isinstance(event.error, ReadError) and not isinstance(event.error, ReadTimeout)
    assert "broke during read" in str(event.error) and "reset" in str(event.error).lower()
    assert event.will_retry and since_of(second) == seq(1)
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)]


def test_a_feed_ending_without_last_seq_resumes_from_the_last_delivered_change() -> None:
    ended = feed(chunk(rows(1, 2)) + HEARTBEAT + LAST_CHUNK, then=Close())
    with rig([ended, feed(chunk(row(3)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        second = r.srv.requests[1]
    assert isinstance(event.error, FeedError)
    assert str(event.error) == "the server ended the feed without a last_seq line"
    assert event.will_retry and since_of(second) == seq(2)


# -- statuses: retry 429/5xx after a jittered backoff, stop on 4xx --------------------------


@pytest.mark.parametrize(
    "status, error, cls",
    [
        (429, "too_many_requests", HTTPError),
        (500, "unknown_error", ServerError),
        (502, "bad_gateway", ServerError),
        (503, "service_unavailable", ServerError),
        (504, "gateway_timeout", ServerError),
    ],
)
def test_retryable_status_reconnects_after_a_jittered_backoff(
    status: int, error: str, cls: Type[HTTPError]
) -> None:
    clock = FakeClock()
    refused = [Read(), Send(error_response(status, error, "try later")), Close()]
    with rig([refused, feed(chunk(row(1)))], clock=clock, rng=random.Random(SEED)) as r:
        r.start(since=0)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
        assert r.consumer.state == "backoff"
        expected = random.Random(SEED).uniform(0, RECONNECT_BASE_S)  # the first attempt
        assert event.retry_in == expected and 0 <= expected <= RECONNECT_BASE_S
        settle(r.loop)
        assert r.srv.connections == 1  # no reconnection before the delay has passed
        clock.advance(expected)
        r.run_until(lambda: r.changes)
        assert r.srv.connections == 2 and since_of(r.srv.requests[1]) == "0"
    assert type(event.error) is cls and event.error.status == status
    assert event.will_retry
    url = r.srv.url + "/db/_changes"
    assert str(event.error) == "HTTP %d %s: try later (GET %s)" % (status, error, url)


@pytest.mark.parametrize(
    "status, error, reason, cls",
    [
        (400, "bad_request", "Malformed sequence supplied in 'since' parameter.", BadRequest),
        (401, "unauthorized", "You are not a server admin.", Unauthorized),
        (403, "forbidden", "You are not allowed to access this db.", Forbidden),
        (404, "not_found", "Database does not exist.", NotFound),
    ],
)
def test_fatal_status_stops_and_wait_raises_it(
    status: int, error: str, reason: str, cls: Type[HTTPError]
) -> None:
    refused = [Read(), Send(error_response(status, error, reason)), Close()]
    with rig([refused]) as r:
        with pytest.raises(cls) as info:
            r.consumer.wait(r.changes.append, since=0)
        settle(r.loop)
        assert r.kinds() == ["error"]  # reported (once), never "connect"ed
    (event,) = r.events
    assert event.error is info.value and not event.will_retry and event.retry_in is None
    assert info.value.status == status and info.value.reason == reason
    url = r.srv.url + "/db/_changes"
    assert str(info.value) == "HTTP %d %s: %s (GET %s)" % (status, error, reason, url)
    assert r.srv.connections == 1 and r.consumer.connections == 1
    assert r.consumer.state == "stopped" and r.consumer.error is info.value


def test_an_error_head_arriving_before_its_body_is_not_a_connection() -> None:
    response = error_response(401, "unauthorized", "Name or password is incorrect.")
    head, body = response.split(b"\r\n\r\n", 1)
    refused = [Read(), Send(head + b"\r\n\r\n"), Pause(0.05), Send(body), Close()]
    with rig([refused]) as r:
        with pytest.raises(Unauthorized, match="Name or password is incorrect"):
            r.consumer.wait(r.changes.append, since=0)
    assert r.kinds() == ["error"]


def test_a_huge_error_page_is_kept_short() -> None:
    page = b"<html>" + b"x" * (1024 * 1024) + b"</html>"
    head = (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    framed = b"".join(chunk(page[i : i + 65536]) for i in range(0, len(page), 65536))
    with rig([[Read(), Send(head + framed + LAST_CHUNK), Close()], feed(HEARTBEAT)]) as r:
        r.start(since=0)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
    assert isinstance(event.error, ServerError) and event.will_retry
    assert event.error.error is None and event.error.reason == "<html>" + "x" * 194


# -- the backoff ----------------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    with Server("http://127.0.0.1:9") as server:
        db = server.get_db("db")
        defaults = Consumer(db)
        assert (defaults.reconnect_base, defaults.reconnect_cap) == (0.1, 60.0)
        assert (RECONNECT_BASE_S, RECONNECT_CAP_S) == (0.1, 60.0)
        consumer = Consumer(db, reconnect_base=0.5, reconnect_cap=4.0, rng=random.Random(SEED))
        delays = [consumer._backoff() for _ in range(8)]
        consumer._attempt = 10_000  # no overflow, however long the outage
        assert 0 <= consumer._backoff() <= 4.0
    replay = random.Random(SEED)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # min(cap, base * 2**n)
    assert delays == [replay.uniform(0, ceiling) for ceiling in ceilings]
    assert all(0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings))


def test_backoff_resets_after_a_healthy_period() -> None:
    clock = FakeClock()
    refused = [Read(), Send(error_response(503, "service_unavailable", "busy")), Close()]
    brief = feed(HEARTBEAT, then=Close())  # connects, then is cut at once
    healthy = feed(HEARTBEAT)  # connects and stays (silent: the watchdog ends it)
    scripts = [refused, refused, brief, healthy]
    options = {"healthy_after": 20.0, "rng": random.Random(SEED)}
    with rig(scripts, clock=clock, **options) as r:
        r.start(since=0, heartbeat=10_000)  # the watchdog allows 30 s of silence
        for count in (1, 2, 3):
            r.run_until(lambda: len(r.errors()) == count)  # noqa: B023 - called at once
            retry_in = r.errors()[-1].retry_in
            assert retry_in is not None
            clock.advance(retry_in)
        r.run_until(lambda: r.consumer.connections == 4 and r.consumer.state == "streaming")
        # Up for 30 s > healthy_after: then the watchdog fires (within its resolution).
        clock.advance(30.0 + WATCHDOG_RESOLUTION)
        r.run_until(lambda: len(r.errors()) == 4)
        events = r.errors()
    replay = random.Random(SEED)
    expected = [replay.uniform(0, ceiling) for ceiling in (0.1, 0.2, 0.4, 0.1)]
    assert [e.retry_in for e in events] == expected  # without the reset the last one is 0.8
    assert [type(e.error) for e in events] == [ServerError, ServerError, ProtocolError, ReadTimeout]


# -- the heartbeat watchdog -----------------------------------------------------------------


def test_watchdog_declares_a_silent_connection_dead_and_resumes() -> None:
    clock = FakeClock()
    with rig([feed(chunk(row(1)) + HEARTBEAT), feed(HEARTBEAT)], clock=clock) as r:
        r.start(since=0, heartbeat=1000)
        r.run_until(lambda: "caught_up" in r.kinds())
        clock.advance(2.9)  # within 3 heartbeats: fine
        settle(r.loop)
        assert r.errors() == [] and r.consumer.state == "streaming"
        clock.advance(0.2)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
        r.run_until(lambda: r.srv.open_connections == 0)  # the dead connection was closed
        assert event.retry_in is not None
        clock.advance(event.retry_in)
        r.run_until(lambda: len(r.srv.requests) == 2)
    assert isinstance(event.error, ReadTimeout) and isinstance(event.error, TimeoutError)
    assert str(event.error) == "no data for 3.1 s while streaming: the connection is presumed dead"
    assert event.will_retry and 0 <= event.retry_in <= RECONNECT_BASE_S
    assert since_of(r.srv.requests[1]) == seq(1)


def test_watchdog_allows_first_byte_timeout_before_the_first_body_byte() -> None:
    clock = FakeClock()
    with rig([feed()], clock=clock, first_byte_timeout=20.0) as r:  # the head, then nothing
        r.start(since=0, heartbeat=1000)
        r.run_until(lambda: r.consumer.state == "streaming")
        clock.advance(19.9)  # far beyond 3 heartbeats, but the feed has not started yet
        settle(r.loop)
        assert r.errors() == []
        clock.advance(0.2)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
    assert isinstance(event.error, ReadTimeout) and event.will_retry
    assert str(event.error) == "no data for 20.1 s while streaming: the connection is presumed dead"


def test_watchdog_allows_first_byte_timeout_for_a_server_that_sends_no_head() -> None:
    clock = FakeClock()
    with rig([[Read(), Stall()]], clock=clock, first_byte_timeout=20.0, connect_timeout=5.0) as r:
        r.start(since=0, heartbeat=1000)
        stream = r.stream()
        r.run_until(lambda: stream.state == "receiving" and r.srv.requests)
        clock.advance(5.1)  # the connect timer: connected, so the watchdog takes over
        settle(r.loop)
        clock.advance(14.8)
        settle(r.loop)
        assert r.errors() == []
        clock.advance(0.2)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
    assert isinstance(event.error, ReadTimeout)
    assert str(event.error) == (
        "no data for 20.1 s while waiting for the response: the connection is presumed dead"
    )


def test_watchdog_tightens_to_heartbeats_once_the_body_starts() -> None:
    clock = FakeClock()
    script = [Read(), Send(COUCH_HEAD), Pause(0.05), Send(HEARTBEAT), Stall()]
    with rig([script], clock=clock, first_byte_timeout=20.0) as r:
        r.start(since=0, heartbeat=1000)
        r.run_until(lambda: "caught_up" in r.kinds())  # the first heartbeat came
        clock.advance(3.1)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
    assert str(event.error) == "no data for 3.1 s while streaming: the connection is presumed dead"


@pytest.mark.parametrize(
    "query, seconds",
    [
        ({"heartbeat": 5000}, 15.0),
        ({"heartbeat": "true"}, 180.0),  # CouchDB's heartbeat=true is every 60 s
        ({"heartbeat": True, "timeout": 1000}, 180.0),  # a heartbeat overrides the timeout
        ({}, 150.0),  # no heartbeat: CouchDB's 60 s changes_timeout, plus 3 x 30 s
        ({"heartbeat": None, "timeout": 5000}, 95.0),
        ({"heartbeat": 0}, 150.0),  # no heartbeat either: never "dead after 0 s"
    ],
)
def test_silence_allowance(query: Dict[str, Any], seconds: float) -> None:
    assert silence_allowance(query, 3.0) == seconds


def test_without_heartbeats_the_watchdog_waits_for_the_servers_own_timeout() -> None:
    # heartbeat=None: CouchDB keeps a quiet feed open for `timeout` ms, then ends it with a
    # last_seq line. The watchdog allows that, plus the margin of three default heartbeats.
    clock = FakeClock()
    with rig([feed(HEARTBEAT)], clock=clock) as r:  # CouchDB's "\n" as a quiet feed opens
        r.start(since=0, heartbeat=None, timeout=120_000)
        r.run_until(lambda: "caught_up" in r.kinds())
        assert "heartbeat" not in r.srv.requests[0].target
        clock.advance(209.9)  # 120 s + 3 x 30 s
        settle(r.loop)
        assert r.errors() == [] and r.consumer.state == "streaming"
        clock.advance(0.2)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
    assert str(event.error) == (
        "no data for 210.1 s while streaming: the connection is presumed dead"
    )


def test_a_feed_that_ends_at_once_with_nothing_new_backs_off_instead_of_spinning() -> None:
    # timeout=0, or a proxy that cuts every response short: each feed ends cleanly (last_seq)
    # the moment it opens. Reconnecting at once would hammer the server in a tight loop.
    clock = FakeClock()
    with rig([feed(couch_end(seq(7)), then=Close())], clock=clock) as r:
        r.start(since=seq(7))
        r.run_until(lambda: r.consumer.state == "backoff")
        settle(r.loop, passes=20)  # no time passes: no reconnection either
        assert len(r.srv.requests) == 1 and r.errors() == []
        clock.advance(RECONNECT_CAP_S)
        r.run_until(lambda: len(r.srv.requests) == 2)
        r.run_until(lambda: r.consumer.state == "backoff")
        settle(r.loop, passes=20)
        assert len(r.srv.requests) == 2 and r.consumer.running
    assert "disconnect" in r.kinds() and r.errors() == []


# -- lifecycle callbacks --------------------------------------------------------------------


def test_lifecycle_callbacks_each_get_one_feed_event() -> None:
    calls: List[Any] = []

    def recorder(name: str) -> Callable[..., None]:
        def callback(*args: Any, **kwargs: Any) -> None:
            calls.append((name, args, kwargs))

        return callback

    cut = [Read(), Send(COUCH_HEAD + chunk(row(1)) + HEARTBEAT), Pause(0.05), Close()]
    with rig([cut, feed(chunk(row(2)))]) as r:
        for name in ("connect", "disconnect", "error", "caught_up"):
            setattr(r.consumer, "on_" + name, recorder(name))
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 2)
        r.consumer.stop()
    names = [name for name, _, _ in calls]
    assert names == ["connect", "caught_up", "disconnect", "error", "connect", "disconnect"]
    assert all(len(args) == 1 and not kwargs for _, args, kwargs in calls)
    events: List[FeedEvent] = [args[0] for _, args, _ in calls]
    assert all(isinstance(e, FeedEvent) and e.consumer is r.consumer for e in events)
    assert [e.kind for e in events] == names
    connect, caught_up, cut_off, error, reconnect, stopped = events
    assert (connect.seq, caught_up.seq, error.seq, stopped.seq) == (0, seq(1), seq(1), seq(2))
    assert isinstance(cut_off.error, ProtocolError) and error.error is cut_off.error
    assert error.will_retry and error.retry_in is not None and 0 <= error.retry_in <= 0.01
    assert stopped.error is None and not stopped.will_retry
    assert "error=ProtocolError" in repr(error) and "will_retry=True" in repr(error)


def test_a_failing_lifecycle_callback_is_logged_and_changes_flow_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(event: FeedEvent) -> None:
        raise RuntimeError("on_%s is broken" % event.kind)

    with rig([feed(chunk(row(1)) + HEARTBEAT + chunk(row(2)))]) as r:
        r.consumer.on_connect = r.consumer.on_caught_up = explode
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 2)
        assert r.consumer.state == "streaming" and r.consumer.error is None
    assert "the connect callback raised" in caplog.text
    assert "the caught_up callback raised" in caplog.text


# -- failing change callbacks ---------------------------------------------------------------


def test_a_failing_callback_stops_without_recording_that_change() -> None:
    store = MemoryCheckpoint()
    scripts = [feed(chunk(rows(1, 2, 3))), feed(chunk(rows(2, 3)))]
    broken = [True]
    with rig(scripts, checkpoint=store) as r:

        def callback(change: Change) -> None:
            if broken[0] and change["id"] == doc_id(2):
                raise ValueError("boom")
            r.changes.append(change)
            if change["id"] == doc_id(3):
                r.consumer.stop()

        with pytest.raises(CallbackError) as info:
            r.consumer.wait(callback, since=0)
        (event,) = r.errors()
        assert event.error is info.value and not event.will_retry  # reported, then raised
        assert r.consumer.last_seq == seq(1) and store.load() == seq(1)
        assert r.consumer.state == "stopped" and r.srv.connections == 1
        assert r.ids == [doc_id(1)]
        broken[0] = False  # the bug is fixed; the process restarts
        r.consumer.wait(callback, since=0)  # since=0 is ignored: the checkpoint has a seq
        second = r.srv.requests[1]
    assert str(info.value) == "a callback raised on change 'doc-002': ValueError('boom')"
    assert isinstance(info.value.__cause__, ValueError)
    assert since_of(second) == seq(1)  # the failing change is delivered again
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)] and store.load() == seq(3)


def test_a_failing_callback_under_skip_is_reported_and_passed() -> None:
    with rig([feed(chunk(rows(1, 2, 3, 4)))], callback_errors="skip") as r:

        def fragile(change: Change) -> None:
            if change["id"] == doc_id(2):
                raise KeyError("missing field")
            r.changes.append(change)

        r.consumer.start(fragile, since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        assert r.consumer.state == "streaming"
    assert r.ids == [doc_id(1), doc_id(3), doc_id(4)]
    assert isinstance(event.error, CallbackError) and not event.will_retry
    assert str(event.error) == "a callback raised on change 'doc-002': KeyError('missing field')"
    assert event.seq == seq(1) and r.consumer.last_seq == seq(4)


def test_one_consumers_failure_leaves_the_others_on_the_loop_alone() -> None:
    slow = [Read(), Send(COUCH_HEAD + chunk(rows(1, 2))), Pause(0.1), Send(chunk(row(3))), Stall()]
    seen: List[str] = []

    def explode(change: Change) -> None:
        raise RuntimeError("bug")

    with contextlib.ExitStack() as stack:
        bad_srv = stack.enter_context(ScriptedServer([feed(chunk(rows(1, 2)))]))
        srv = stack.enter_context(ScriptedServer([slow]))
        bad_server = stack.enter_context(Server(bad_srv.url))
        server = stack.enter_context(Server(srv.url))
        loop = stack.enter_context(Loop())
        broken = stack.enter_context(Consumer(bad_server.get_db("db"), loop))
        healthy = stack.enter_context(Consumer(server.get_db("db"), loop))
        broken.start(explode, since=0)
        healthy.start(lambda change: seen.append(change["id"]), since=0)
        run_until(loop, lambda: len(seen) == 3)
        assert broken.state == "stopped" and isinstance(broken.error, CallbackError)
        assert broken.last_seq == 0 and broken.delivered == 0
        assert healthy.state == "streaming" and healthy.error is None
    assert seen == [doc_id(1), doc_id(2), doc_id(3)]


# -- hostile bytes: typed errors, bounded memory --------------------------------------------


NEVER_ENDING = b'{"seq":"1-g1AAAA","id":"' + b"x" * (1024 * 1024)  # 1 MiB, no newline


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param(
            NEVER_ENDING,
            "a feed line exceeded 64 bytes without a newline (max_line_bytes)",
            id="never-ending",
        ),
        pytest.param(
            row(1),
            "a feed line of %d characters exceeds max_line_bytes (64)" % (len(row(1)) - 1),
            id="complete-but-long",
        ),
    ],
)
def test_a_line_over_max_line_bytes_is_fatal_and_bounded(body: bytes, message: str) -> None:
    framed = b"".join(chunk(body[i : i + 8192]) for i in range(0, len(body), 8192))
    with rig([feed(framed)], max_line_bytes=64) as r:
        r.start(since=0)
        stream = r.stream()
        r.run_until(lambda: r.consumer.state == "stopped")
        settle(r.loop)
    (event,) = r.errors()
    assert isinstance(event.error, LineTooLongError) and not event.will_retry
    assert str(event.error) == message
    assert stream.decoder.buffered <= 64
    assert stream.bytes_received <= len(COUCH_HEAD) + RECV_BYTES  # it stopped reading at once
    assert r.srv.connections == 1 and r.consumer.connections == 1  # not retried forever


def test_a_malformed_chunk_size_is_a_protocol_error_then_a_reconnect() -> None:
    # Row 1 comes in a read of its own: rows before a bad chunk *in the same read* are dropped
    # by the parser (at-least-once: they come again after the reconnect).
    bad = [Read(), Send(COUCH_HEAD + chunk(row(1))), Pause(0.05), Send(b"zz\r\n" + row(2)), Stall()]
    with rig([bad, feed(chunk(rows(2, 3)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        second = r.srv.requests[1]
    offset = len(COUCH_HEAD) + len(chunk(row(1)))
    assert isinstance(event.error, ProtocolError) and event.will_retry
    assert str(event.error) == "invalid chunk size 'zz' (at byte %d of the response)" % offset
    assert since_of(second) == seq(1) and r.ids == [doc_id(1), doc_id(2), doc_id(3)]


def test_a_line_that_is_not_json_is_a_feed_error_then_a_reconnect() -> None:
    # Row 1 comes in a read of its own (see above).
    bad = [Read(), Send(COUCH_HEAD + chunk(row(1))), Pause(0.05)]
    bad += [Send(chunk(b"<html>Bad Gateway</html>\n" + row(2))), Stall()]
    with rig([bad, feed(chunk(rows(2, 3)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        second = r.srv.requests[1]
    assert isinstance(event.error, FeedError) and event.will_retry
    assert str(event.error).startswith("a feed line is not JSON (Expecting value: ")
    assert str(event.error).endswith("): '<html>Bad Gateway</html>'")
    assert since_of(second) == seq(1) and r.ids == [doc_id(1), doc_id(2), doc_id(3)]


def test_rows_before_a_bad_line_in_the_same_read_are_delivered() -> None:
    bad = feed(chunk(row(1) + b"<html>Bad Gateway</html>\n" + row(2)))
    with rig([bad, feed(chunk(rows(2, 3)))]) as r:
        r.start(since=0)
        read_everything_at_once(r)
        r.run_until(lambda: len(r.srv.requests) == 2)
        second = r.srv.requests[1]
    assert since_of(second) == seq(1)  # row 1 is not delivered again


def test_rows_before_a_bad_chunk_in_the_same_read_are_delivered() -> None:
    bad = feed(chunk(row(1)) + b"zz\r\n" + row(2) + b"\r\n")
    with rig([bad, feed(chunk(rows(2, 3)))]) as r:
        r.start(since=0)
        read_everything_at_once(r)
        r.run_until(lambda: len(r.srv.requests) == 2)
        second = r.srv.requests[1]
    assert since_of(second) == seq(1)  # row 1 is not delivered again


def test_headers_that_never_end_are_a_protocol_error_and_bounded() -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    endless = [Read(), Send(b"HTTP/1.1 200 OK\r\n" + filler * 2048), Stall()]  # 2 MB of head
    with rig([endless, feed(chunk(row(1)))]) as r:
        r.start(since=0)
        stream = r.stream()
        r.run_until(lambda: len(r.changes) == 1)
        (event,) = r.errors()
    assert isinstance(event.error, ProtocolError) and event.will_retry
    assert str(event.error) == "response head is longer than 65536 bytes (MAX_HEAD_BYTES)"
    assert stream.bytes_received <= MAX_HEAD_BYTES + RECV_BYTES  # not the 2 MB sent


def test_a_dripping_server_is_slow_but_alive_and_the_loop_is_not_stuck() -> None:
    # One byte every 10 ms with a 300 ms watchdog (heartbeat=100 ms): the row takes longer
    # than the watchdog allows, yet each byte proves the peer alive.
    line = b'{"seq":"1-g1AAAA","id":"drip","changes":[]}\n'
    script = [Read(), Send(COUCH_HEAD + HEARTBEAT), Drip(chunk(line), 0.01), Stall()]
    with rig([script]) as r:
        ticks: List[float] = []

        def tick() -> None:
            ticks.append(time.monotonic())
            r.loop.call_later(0.02, tick)

        r.loop.call_soon(tick)
        r.start(since=0, heartbeat=100)
        stream = r.stream()
        started = time.monotonic()
        held = []
        while not r.changes:
            assert time.monotonic() - started < 3.0
            r.loop.run_once(0.01)
            held.append(stream.decoder.buffered)
        elapsed = time.monotonic() - started
        assert r.errors() == [] and r.consumer.connections == 1
    assert elapsed > 0.3  # longer than the watchdog's allowance
    assert r.ids == ["drip"] and max(held) < len(line)  # never more than the partial line
    assert len(ticks) >= 10  # other work on the loop ran all along


def test_a_dripped_line_without_end_stops_at_max_line_bytes() -> None:
    script = [Read(), Send(COUCH_HEAD + HEARTBEAT), Drip(chunk(b"{" + b"x" * 200), 0.002), Stall()]
    with rig([script], max_line_bytes=32) as r:
        r.start(since=0, heartbeat=100)
        stream = r.stream()
        r.run_until(lambda: r.consumer.state == "stopped")
    (event,) = r.errors()
    assert isinstance(event.error, LineTooLongError) and not event.will_retry
    assert str(event.error) == "a feed line exceeded 32 bytes without a newline (max_line_bytes)"
    assert stream.decoder.buffered <= 32 and stream.bytes_received < len(COUCH_HEAD) + 150


def test_a_content_length_response_still_delivers_its_rows() -> None:
    body = rows(1, 2)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    fixed = [Read(), Send(head % len(body) + body), Stall()]
    with rig([fixed, feed(chunk(row(3)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 3)
        (event,) = r.errors()
        second = r.srv.requests[1]
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)]
    assert str(event.error) == "the server ended the feed without a last_seq line"
    assert since_of(second) == seq(2)


def test_a_read_until_close_response_still_delivers_its_rows() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    end = b'{"last_seq":"%s","pending":0}\n' % seq(5).encode()
    unframed = [Read(), Send(head + rows(1, 2) + b"\n"), Pause(0.02), Send(end), Close()]
    with rig([unframed, feed(HEARTBEAT)]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.srv.requests) == 2)
        assert r.errors() == []  # the close ended the body, and it had its last_seq line
    assert r.ids == [doc_id(1), doc_id(2)]
    assert since_of(r.srv.requests[1]) == seq(5)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def test_a_bad_certificate_is_fatal_after_one_attempt(server_context: ssl.SSLContext) -> None:
    # The client trusts only the system CAs, which never signed this test certificate.
    with rig([feed(chunk(row(1)))], server_context=server_context) as r:
        with pytest.raises(TLSError) as info:
            r.consumer.wait(r.changes.append, since=0)
        settle(r.loop)
    (event,) = r.events
    assert event.kind == "error" and event.error is info.value and not event.will_retry
    port = r.srv.url.rsplit(":", 1)[1]
    assert str(info.value) == (
        "TLS handshake with 127.0.0.1:%s failed: certificate verify failed: "
        "unable to get local issuer certificate" % port
    )
    assert r.srv.connections == 1 and r.consumer.connections == 1 and r.changes == []


def test_a_trusted_certificate_streams(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    big = chunk(rows(*range(1, 200)))  # many TLS records, read in pieces
    with rig([feed(big)], server_context=server_context, client_context=client_context) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 199)
    assert r.ids == [doc_id(n) for n in range(1, 200)] and r.errors() == []


# -- sessions, interrupts ----------------------------------------------------------------------


def session_response(status: int) -> bytes:
    if status != 200:
        return error_response(status, "unauthorized", "Name or password is incorrect.")
    body = b'{"ok":true,"name":"admin","roles":["_admin"]}\n'
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Set-Cookie: AuthSession=YWRtaW46NjU3; Version=1; Path=/; HttpOnly\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def follow_with_a_session(
    scripts: List[Any], until: Callable[[Consumer, List[Change]], object]
) -> Tuple[ScriptedServer, Consumer, List[Change], List[FeedEvent]]:
    """Follow ``db`` on a scripted server as admin with a cookie session until ``until``."""
    events: List[FeedEvent] = []
    seen: List[Change] = []
    with ScriptedServer(scripts) as srv:
        with Server(srv.url, auth=("admin", "pw"), session=True) as server, Loop() as loop:
            with Consumer(
                server.get_db("db"), loop, on_error=events.append, reconnect_base=0.01
            ) as consumer:
                consumer.start(seen.append, since=0)
                run_until(loop, lambda: until(consumer, seen), timeout=5.0)
    return srv, consumer, seen, events


def test_a_refused_session_login_is_fatal_not_a_hang() -> None:
    with ScriptedServer([[Read(), Send(session_response(401)), Close()]]) as srv:
        with Server(srv.url, auth=("admin", "wrong"), session=True) as server, Loop() as loop:
            events: List[FeedEvent] = []
            with Consumer(server.get_db("db"), loop, on_error=events.append) as consumer:
                with pytest.raises(Unauthorized) as info:
                    consumer.wait(lambda change: None, since=0)
    (event,) = events
    assert event.error is info.value and not event.will_retry
    assert str(info.value) == (
        "HTTP 401 unauthorized: Name or password is incorrect. (POST %s/_session)" % srv.url
    )
    assert srv.requests[0].target == "/_session" and len(srv.requests) == 1


def test_a_failed_session_login_is_retried() -> None:
    busy = error_response(503, "service_unavailable", "starting").replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1
    )
    scripts = [
        [Read(), Send(busy), Close()],
        [Read(), Send(session_response(200)), Close()],
        feed(chunk(row(1))),
    ]
    srv, _, _, events = follow_with_a_session(scripts, lambda consumer, seen: seen)
    (event,) = events
    assert isinstance(event.error, ServerError) and event.will_retry
    assert [r.target for r in srv.requests[:2]] == ["/_session", "/_session"]
    assert srv.requests[2].header("Cookie") == "AuthSession=YWRtaW46NjU3"
    assert srv.requests[2].target.startswith("/db/_changes?feed=continuous&since=0")


def test_an_expired_session_cookie_is_renewed_once_then_a_401_is_fatal() -> None:
    # CouchDB's cookies expire after 10 minutes: a feed that reconnects later meets a 401.
    expired = error_response(401, "unauthorized", "You are not authorized to access this db.")
    renewed = session_response(200).replace(b"YWRtaW46NjU3", b"YWRtaW46OTk5")
    scripts = [
        [Read(), Send(session_response(200)), Close()],
        feed(chunk(row(1)), then=Close()),  # a cut: the reconnection is where the 401 comes
        [Read(), Send(expired), Close()],
        [Read(), Send(renewed), Close()],
        feed(chunk(row(2)), then=Close()),
        [Read(), Send(expired), Close()],  # renewed once per connection that opened: again
        [Read(), Send(renewed), Close()],
        [Read(), Send(expired), Close()],  # a 401 right after a login: the account is gone
    ]
    srv, consumer, seen, events = follow_with_a_session(
        scripts, lambda consumer, seen: not consumer.running
    )
    assert [c["id"] for c in seen] == [doc_id(1), doc_id(2)]
    targets = [r.target.split("?")[0] for r in srv.requests]
    assert targets == ["/_session"] + ["/db/_changes", "/db/_changes", "/_session"] * 2 + [
        "/db/_changes"
    ]
    cookies = [r.header("Cookie") for r in srv.requests if r.target.startswith("/db/")]
    assert cookies == ["AuthSession=YWRtaW46NjU3"] * 2 + ["AuthSession=YWRtaW46OTk5"] * 3
    assert [type(e.error) for e in events] == [ProtocolError, Unauthorized] * 2 + [Unauthorized]
    assert [e.will_retry for e in events] == [True, True, True, True, False]
    assert consumer.error is events[-1].error and consumer.state == "stopped"


def test_feeds_sharing_a_server_all_renew_an_expired_session() -> None:
    # The cookie expires for every feed of a server at once: the first 401 drops it, and the
    # other feeds, finding it dropped (or renewed already), must reconnect too, not stop.
    expired = error_response(401, "unauthorized", "You are not authorized to access this db.")
    login = [Read(), Send(session_response(200)), Close()]
    cut = feed(chunk(row(1)), then=Close())
    gone = [Read(), Send(expired), Close()]
    scripts = [login, cut, cut, gone, gone, login, feed(chunk(row(2)))]
    clock = FakeClock()  # backoffs wait for the test: both feeds reconnect in the same pass
    events: List[FeedEvent] = []
    seen: List[Tuple[str, str]] = []
    with ScriptedServer(scripts) as srv:
        with Server(srv.url, auth=("admin", "pw"), session=True) as server:
            with Loop(clock=clock) as loop:
                consumers = [
                    Consumer(server.get_db(name), loop, on_error=events.append)
                    for name in ("a", "b")
                ]
                for consumer in consumers:
                    name = consumer.db.name
                    consumer.start(lambda change, n=name: seen.append((n, change["id"])))
                for errors in (2, 4):  # the cuts, then the 401s: each time both back off
                    run_until(loop, lambda n=errors: len(events) == n)
                    assert all(c.state == "backoff" for c in consumers)
                    clock.advance(RECONNECT_CAP_S)
                run_until(loop, lambda: len(seen) == 4)
                for consumer in consumers:
                    consumer.close()
    assert sorted(seen) == [("a", doc_id(1)), ("a", doc_id(2)), ("b", doc_id(1)), ("b", doc_id(2))]
    unauthorized = [e for e in events if isinstance(e.error, Unauthorized)]
    assert len(unauthorized) == 2 and all(e.will_retry for e in unauthorized)
    targets = [r.target.split("?")[0] for r in srv.requests]  # each pair in either order
    both = ["/a/_changes", "/b/_changes"]
    assert targets[0] == targets[5] == "/_session"  # one login, one renewal, blocking
    assert sorted(targets[1:3]) == sorted(targets[3:5]) == sorted(targets[6:]) == both


def test_ctrl_c_in_wait_saves_and_leaves_the_loop_usable() -> None:
    store = MemoryCheckpoint()
    with rig([feed(chunk(rows(1, 2, 3)))], checkpoint=store) as r:

        def callback(change: Change) -> None:
            if change["id"] == doc_id(2):
                raise KeyboardInterrupt
            r.changes.append(change)

        with pytest.raises(KeyboardInterrupt):  # Ctrl-C stops the consumer, then goes on up
            r.consumer.wait(callback, since=0)
        assert r.consumer.state == "stopped" and r.consumer.error is None
        assert store.load() == seq(1)  # doc-002 was interrupted: it is not recorded
        fired: List[bool] = []
        r.loop.call_later(0.01, fired.append, True)
        r.loop.run()  # not ended at once by a stop() left over from the interrupt
        assert fired == [True]
    assert r.ids == [doc_id(1)]


def test_resolving_since_now_does_not_block_the_loop() -> None:
    # The server takes its time to say where "now" is; another feed on the loop flows meanwhile.
    with contextlib.ExitStack() as stack:
        slow_srv = stack.enter_context(ScriptedServer([[Read(), Stall()]]))
        srv = stack.enter_context(ScriptedServer([feed(chunk(rows(1, 2)))]))
        slow_server = stack.enter_context(Server(slow_srv.url))
        server = stack.enter_context(Server(srv.url))
        loop = stack.enter_context(Loop())
        waiting = stack.enter_context(Consumer(slow_server.get_db("db"), loop))
        flowing = stack.enter_context(Consumer(server.get_db("db"), loop))
        seen: List[str] = []
        waiting.start(lambda change: None, since="now")
        flowing.start(lambda change: seen.append(change["id"]), since=0)
        run_until(loop, lambda: len(seen) == 2)
        assert waiting.state == "connecting" and waiting.connections == 0
        # The server's thread records the request in its own time: wait for it (bounded).
        assert slow_srv.wait_for_requests(1)[0].target == "/db/_changes?feed=normal&since=now"
    assert seen == [doc_id(1), doc_id(2)]


def test_a_failed_since_now_answer_is_retried_and_never_becomes_a_seq() -> None:
    answer = b'{"results":[\n\n],\n"last_seq":"%s","pending":0}\n' % seq(7).encode()
    scripts = [
        [Read(), Send(error_response(503, "service_unavailable", "starting")), Close()],
        [Read(), Send(COUCH_HEAD + chunk(b'{"results":[]}\n') + LAST_CHUNK), Close()],
        [Read(), Send(COUCH_HEAD + chunk(answer) + HEARTBEAT + LAST_CHUNK), Close()],
        feed(chunk(row(8))),
    ]
    with rig(scripts) as r:
        r.start(since="now")
        r.run_until(lambda: r.changes)
        targets = [request.target for request in r.srv.requests]
        errors = r.errors()
    assert targets[:3] == ["/db/_changes?feed=normal&since=now"] * 3
    assert targets[3].startswith("/db/_changes?feed=continuous&since=%s&" % seq(7))
    assert [type(e.error) for e in errors] == [ServerError, FeedError]
    assert str(errors[1].error) == "the answer to since=now has no last_seq"
    assert all(e.will_retry and e.seq == "now" for e in errors)
    assert r.kinds().count("connect") == 1  # only the feed itself connects


def test_checkpoint_is_saved_every_n_changes_within_one_read() -> None:
    # Regression: the count was checked once per read, and one read can bring thousands of rows.
    body = b"".join(row(i) for i in range(1, 301))
    saved_while_delivering = []
    store = MemoryCheckpoint()
    with ScriptedServer([feed(chunk(body))]) as srv:
        with Server(srv.url) as server:
            consumer = Consumer(server.get_db("db"), checkpoint=store, checkpoint_every=10)

            def callback(change: Any) -> None:
                saved_while_delivering.append(store.seq)
                if change["seq"] == seq(300):
                    consumer.stop()

            consumer.wait(callback, since=0)
            consumer.close()
    assert store.saves >= 30
    # Before change n is delivered, at most checkpoint_every changes are unsaved.
    assert saved_while_delivering[100] == seq(100)
