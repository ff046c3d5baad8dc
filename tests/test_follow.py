"""The continuous feed's state machine: its table, every phase's deadline with the defaults, the
one failure route, and the defects that one cause (state in scattered flags) once produced.

A scripted CouchDB 3 on loopback plays what a real server will not do on demand (stalls inside
the head, a normal answer to a continuous request, redirects); time is a fake clock advanced by
hand, so a 1.5 s allowance costs no real second. Each consumer here runs with the library's
defaults: only CouchDB's own ``heartbeat`` parameter is chosen.
"""

import threading
from typing import Any, Dict, List, Optional

import pytest
from couch3 import (
    COUCH_HEAD,
    HEARTBEAT,
    FakeClock,
    SaveFailsOnce,
    doc_id,
    feed,
    rig,
    row,
    rows,
    seq,
    settle,
    since_of,
)
from scripted import Close, Read, Send, Stall, chunk, response_head

from changeloop import (
    CallbackError,
    CheckpointError,
    Consumer,
    FeedError,
    HTTPError,
    Loop,
    ReadTimeout,
    Server,
)
from changeloop._states import STATES, TRANSITIONS
from changeloop._transport import NonBlockingConnection
from changeloop.checkpoint import MemoryCheckpoint
from changeloop.consumer import WATCHDOG_RESOLUTION

pytestmark = pytest.mark.timeout(20)

Change = Dict[str, Any]
HEARTBEAT_MS = 500
ALLOWANCE_S = 3 * HEARTBEAT_MS / 1000.0  # the library's default: three missed heartbeats


# -- the table ----------------------------------------------------------------------------------


def test_the_transition_table_names_only_known_states_and_reaches_every_state() -> None:
    reached = {"idle"}
    for (state, _event), new in TRANSITIONS.items():
        assert state in STATES and new in STATES
        reached.add(new)
    assert reached == set(STATES)
    # Every state but the two at rest can be stopped; no state is a dead end.
    for state in STATES:
        if state not in ("idle", "stopped"):
            assert TRANSITIONS[(state, "stop")] == "stopped"
        assert any(key[0] == state for key in TRANSITIONS)


# -- silence is bounded in every phase, with the defaults --------------------------------------

PHASE_SCRIPTS = {
    # The request read, then nothing at all: the status line never comes.
    "no head": [Read(), Stall()],
    # Half a status line, then nothing (a half-open connection inside the head).
    "inside the status line": [Read(), Send(COUCH_HEAD[:9]), Stall()],
    # The status line and some headers, then nothing.
    "inside the headers": [Read(), Send(COUCH_HEAD[:60]), Stall()],
    # The whole head, then no body at all (not even CouchDB 2+'s opening newline).
    "after the head": [Read(), Send(COUCH_HEAD), Stall()],
    # The body began, then went silent.
    "in the body": [Read(), Send(COUCH_HEAD + HEARTBEAT), Stall()],
}


@pytest.mark.parametrize("where", list(PHASE_SCRIPTS))
def test_a_stall_in_any_phase_is_replaced_after_the_heartbeat_allowance(where: str) -> None:
    # Was: a stall before the first body byte waited FIRST_BYTE_TIMEOUT_S (120 s) by default.
    clock = FakeClock()
    good = feed(HEARTBEAT + chunk(row(1)))
    with rig([PHASE_SCRIPTS[where], good], clock=clock) as r:
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: r.srv.requests)
        settle(r.loop)  # whatever the script sends has arrived and been read
        clock.advance(ALLOWANCE_S - 0.05)
        settle(r.loop)
        assert r.errors() == [], "replaced before its allowance"
        clock.advance(0.05 + WATCHDOG_RESOLUTION + 0.01)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
        assert isinstance(event.error, ReadTimeout) and event.will_retry
        assert event.retry_in is not None
        clock.advance(event.retry_in)
        r.run_until(lambda: r.ids == [doc_id(1)])


def test_a_connection_that_never_completes_is_replaced_after_the_allowance() -> None:
    # TCP connect to a peer that never answers, as a fake connection that stays "connecting".
    class NeverConnects(NonBlockingConnection):
        def start(self) -> Any:
            from changeloop._transport import Want

            self._sock_pair = __import__("socket").socketpair()
            return Want.READ  # nothing will ever be readable

        def fileno(self) -> int:
            return int(self._sock_pair[0].fileno())

        def close(self) -> None:
            for sock in getattr(self, "_sock_pair", ()):
                sock.close()

    clock = FakeClock()
    with rig([feed(chunk(row(1)))], clock=clock) as r:
        r.consumer._connect_with = NeverConnects  # type: ignore[misc]
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        settle(r.loop)
        assert r.consumer.phase == "connecting"
        clock.advance(ALLOWANCE_S + WATCHDOG_RESOLUTION + 0.01)
        r.run_until(lambda: r.errors())
        (event,) = r.errors()
        assert event.will_retry and "connect" in str(event.error).lower()
        r.consumer.stop()


# -- the one failure route ----------------------------------------------------------------------


class HeldBytes(NonBlockingConnection):
    """A plaintext connection that hands out at most 1,000 bytes a receive and holds the rest
    as TLS would (``pending()``), so the consumer must re-read without select()."""

    def recv(self, max_bytes: int) -> Optional[bytes]:
        held = getattr(self, "_held", b"")
        if not held:
            data = super().recv(max_bytes)
            if not data:
                return data
            held = data
        out, self._held = held[:1000], held[1000:]
        return out

    def pending(self) -> int:
        return len(getattr(self, "_held", b""))


def test_a_checkpoint_failure_on_the_tls_reread_path_loses_no_change() -> None:
    # Was: the re-read ran through loop.call_soon, whose exceptions were only logged: the rest of
    # that read's rows were dropped while the stream and the checkpoint went on past them.
    first = feed(chunk(rows(*range(1, 301))) + HEARTBEAT)
    second = feed(chunk(rows(*range(101, 301))) + HEARTBEAT)
    store = SaveFailsOnce()
    with rig([first, second], checkpoint=store) as r:
        r.consumer._connect_with = HeldBytes  # type: ignore[misc]
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: len(set(r.ids)) == 300, timeout=10)
        (event,) = r.errors()
        assert isinstance(event.error, CheckpointError) and event.will_retry
        assert isinstance(event.error.__cause__, OSError)
        assert since_of(r.srv.requests[1]) == seq(100)  # resumed after the last delivered one
        r.consumer.stop()
    delivered = [int(i.split("-")[1]) for i in r.ids]
    assert delivered == list(range(1, 101)) + list(range(101, 301))
    assert store.load() == seq(300)


def test_a_normal_answer_to_a_continuous_request_is_a_feed_error_not_an_end() -> None:
    # Was: its one line held a last_seq, read as "the feed ended at 500": 0 changes delivered
    # and the checkpoint saved at 500.
    normal = b'{"results":[%s],"last_seq":"%s","pending":0}\n' % (
        b",".join(row(n).strip() for n in (1, 2, 3)),
        seq(3).encode(),
    )
    store = MemoryCheckpoint()
    with rig([feed(chunk(normal)), feed(chunk(rows(1, 2, 3)) + HEARTBEAT)], checkpoint=store) as r:
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: len(r.ids) == 3)
        r.consumer.stop()
    (event,) = r.errors()
    assert isinstance(event.error, FeedError) and "normal" in str(event.error)
    assert since_of(r.srv.requests[1]) == "0"
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)] and store.load() == seq(3)


@pytest.mark.parametrize("feed_param", ["normal", "longpoll"])
def test_a_feed_parameter_of_a_continuous_consumer_is_refused(feed_param: str) -> None:
    with Server("http://127.0.0.1:9") as server, Consumer(server.get_db("db")) as consumer:
        with pytest.raises(ValueError, match="feed"):
            consumer.start(lambda change: None, since=0, feed=feed_param)
        assert consumer.state == "idle"


# -- which statuses are fatal ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, words",
    [
        (301, "redirected to 'https://couch.example/db/_changes'"),
        (302, "never redirects"),
        (307, "server URL is probably wrong"),
        (407, "HTTP 407"),
        (410, "HTTP 410"),
        (414, "POST body"),
        (431, "doc_ids="),
    ],
)
def test_statuses_that_will_never_work_stop_the_consumer_at_once(status: int, words: str) -> None:
    # Was: retried for ever at ~80 requests a second.
    headers = [("Content-Type", "application/json"), ("Content-Length", "0")]
    if 300 <= status < 400:
        headers.append(("Location", "https://couch.example/db/_changes"))
    answer = [Read(), Send(response_head(status, headers, chunked=False)), Close()]
    with rig([answer]) as r:
        with pytest.raises(HTTPError) as info:
            r.consumer.wait(r.changes.append, since=0, heartbeat=HEARTBEAT_MS)
    assert info.value.status == status and words in str(info.value)
    assert r.srv.connections == 1 and r.consumer.state == "stopped"
    (event,) = r.errors()
    assert event.error is info.value and not event.will_retry


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_statuses_that_say_try_again_are_retried(status: int) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", "2")]
    answer = [Read(), Send(response_head(status, headers, chunked=False) + b"{}"), Close()]
    with rig([answer, feed(chunk(row(1)) + HEARTBEAT)]) as r:
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: r.ids == [doc_id(1)])
        r.consumer.stop()
    (event,) = r.errors()
    assert isinstance(event.error, HTTPError) and event.error.status == status
    assert event.will_retry


# -- requests from outside the loop ----------------------------------------------------------------


def test_start_on_a_closed_loop_leaves_the_consumer_idle() -> None:
    # Was: it raised but left the consumer "connecting"; the next start() said "already running".
    with Server("http://127.0.0.1:9") as server:
        loop = Loop()
        loop.close()
        consumer = Consumer(server.get_db("db"), loop)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="closed"):
                consumer.start(lambda change: None, since=0)
            assert consumer.state == "idle" and not consumer.running


def _stop_while_delivering(attempt: int) -> None:
    body = chunk(rows(*range(1, 41))) + HEARTBEAT
    with rig([feed(body)]) as r:
        started = threading.Event()
        done = threading.Event()

        def callback(change: Change) -> None:
            started.set()

        def stop_soon() -> None:
            started.wait(5)
            r.consumer.stop()

        def follow() -> None:
            r.consumer.wait(callback, since=0, heartbeat=60_000)
            done.set()

        stopper = threading.Thread(target=stop_soon, daemon=True)
        waiter = threading.Thread(target=follow, daemon=True)
        stopper.start()
        waiter.start()
        assert done.wait(5), "wait() did not return after stop() (attempt %d)" % attempt
        waiter.join(5)
        stopper.join(5)
        assert r.consumer.state == "stopped" and r.consumer.error is None


def test_a_stop_from_another_thread_always_takes_effect_and_wait_returns() -> None:
    # An idle feed (heartbeats only): a stop that a delivery once swallowed was never looked at
    # again. Here stops come from another thread at every moment of a delivery and between.
    for attempt in range(20):
        _stop_while_delivering(attempt)


# -- callbacks given to wait() and start() ---------------------------------------------------------


def test_a_callback_given_to_wait_is_for_that_run_only() -> None:
    # Was: three wait(cb, limit=1) calls delivered [1, 2, 2, 3, 3, 3].
    scripts = [feed(chunk(row(n)) + HEARTBEAT) for n in (1, 2, 3)]
    with rig(scripts) as r:
        seen: List[str] = []
        for _ in range(3):
            r.consumer.wait(
                lambda change: seen.append(change["id"]), since=r.consumer.last_seq, limit=1
            )
    assert seen == [doc_id(1), doc_id(2), doc_id(3)]


def test_registering_the_same_callback_twice_adds_it_once() -> None:
    with rig([feed(chunk(row(1)) + HEARTBEAT)]) as r:
        r.consumer.register_callback(r.changes.append)
        r.consumer.register_callback(r.changes.append)
        r.consumer.wait(since=0, limit=1)
    assert r.ids == [doc_id(1)]


def test_a_callback_error_stops_once_and_is_reported_once() -> None:
    def broken(change: Change) -> None:
        raise ValueError("boom")

    with rig([feed(chunk(rows(1, 2)) + HEARTBEAT)]) as r:
        with pytest.raises(CallbackError):
            r.consumer.wait(broken, since=0, heartbeat=HEARTBEAT_MS)
    assert [e.kind for e in r.events].count("error") == 1
    assert r.consumer.last_seq == 0 and r.consumer.delivered == 0


# -- the backoff ----------------------------------------------------------------------------


def test_a_connection_that_delivered_resets_the_backoff() -> None:
    # Faults that still let changes through must not push the backoff to its 60 s cap.
    clock = FakeClock()
    scripts = [[Read(), Send(COUCH_HEAD + chunk(row(n))), Close()] for n in range(1, 13)]
    scripts.append(feed(HEARTBEAT))
    with rig(scripts, clock=clock) as r:
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        for n in range(1, 13):
            r.run_until(lambda n=n: len(r.errors()) == n)  # type: ignore[misc]
            event = r.errors()[-1]
            assert event.retry_in is not None and event.retry_in <= 0.1  # the base, every time
            clock.advance(event.retry_in)
        r.run_until(lambda: len(r.ids) == 12)
        r.consumer.stop()
    assert r.ids == [doc_id(n) for n in range(1, 13)]


def test_stop_and_start_during_a_backoff_leaves_one_reconnection_in_flight() -> None:
    clock = FakeClock()
    cut = [Read(), Close()]
    with rig([cut, cut, feed(chunk(row(1)) + HEARTBEAT)], clock=clock) as r:
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: r.errors())
        assert r.consumer.state == "backoff"
        r.consumer.stop()
        r.start(since=0, heartbeat=HEARTBEAT_MS)
        r.run_until(lambda: len(r.srv.requests) == 2)
        r.run_until(lambda: len(r.errors()) == 2)
        first_retry = r.errors()[-1].retry_in
        assert first_retry is not None
        clock.advance(60.0)  # far past the old backoff: its timer must not connect again
        r.run_until(lambda: r.ids == [doc_id(1)])
        settle(r.loop)
        r.consumer.stop()
    assert len(r.srv.requests) == 3
