"""The state machine against an adversarial review: each test here reproduced a defect found by
attacking the first version of issue 14's rework (a stop lost to a failing save, a wait() that
never returned, limit=0 followed for ever, an unguarded start posted from another thread...).
"""

import logging
import threading
import time
from typing import Any

import pytest
from couch3 import (
    COUCH_HEAD,
    HEARTBEAT,
    FakeClock,
    SaveFailsOnce,
    couch_end,
    doc_id,
    feed,
    rig,
    row,
    rows,
    seq,
)
from scripted import Close, Read, Send, Stall, chunk, response_head

import changeloop._follow as follow
from changeloop import Consumer
from changeloop.checkpoint import MemoryCheckpoint

pytestmark = pytest.mark.timeout(30)


# -- stop lost checkpoint ----------------------------------------------------
# A stop() asked from inside a change callback is lost when the checkpoint save that follows
# that change fails (a retryable CheckpointError): the consumer reconnects and, on an idle feed,
# never stops; wait() never returns.
def test_stop_from_callback_survives_a_failing_save() -> None:
    clock = FakeClock()
    # first connection: one change; every later connection: idle (heartbeats only)
    scripts = [feed(chunk(rows(1)) + HEARTBEAT), feed(HEARTBEAT)]
    store = SaveFailsOnce()
    with rig(scripts, clock=clock, checkpoint=store, checkpoint_every=1) as r:

        def cb(change: Any) -> None:
            r.changes.append(change)
            r.consumer.stop()  # "stop after this change"

        r.consumer.start(cb, since=0, heartbeat=500)
        r.run_until(lambda: r.changes)
        for _ in range(50):
            clock.advance(1.0)
            r.loop.run_once(0.01)
        state = r.consumer.state
        conns = r.srv.connections
        r.consumer.stop()
    assert state == "stopped", (state, conns, [e.kind for e in r.events])


def test_wait_returns_after_stop_from_callback_with_failing_save() -> None:
    scripts = [feed(chunk(rows(1)) + HEARTBEAT), feed(HEARTBEAT)]
    store = SaveFailsOnce()
    with rig(scripts, checkpoint=store, checkpoint_every=1) as r:

        def cb(change: Any) -> None:
            r.consumer.stop()

        done = threading.Event()

        def follow() -> None:
            try:
                r.consumer.wait(cb, since=0, heartbeat=500)
            finally:
                done.set()

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        returned = done.wait(5)
        if not returned:
            r.consumer.stop()  # rescue
            t.join(5)
    assert returned, "wait() did not return after stop() from the callback"


def test_no_change_delivered_after_stop_from_callback() -> None:
    # Busy feed: the stale _stop_requested is honoured only after one more change, on the
    # next connection: a change is delivered after the callback asked to stop.
    scripts = [feed(chunk(rows(1, 2, 3)) + HEARTBEAT), feed(chunk(rows(2, 3)) + HEARTBEAT)]
    store = SaveFailsOnce()
    with rig(scripts, checkpoint=store, checkpoint_every=1) as r:

        def cb(change: Any) -> None:
            r.changes.append(change)
            if change["id"] == doc_id(1):
                r.consumer.stop()

        r.consumer.start(cb, since=0, heartbeat=500)
        r.run_until(lambda: r.consumer.state == "stopped")
    assert r.ids == [doc_id(1)], r.ids


# -- wait race ---------------------------------------------------------------
# wait() sets _blocking only after start() returned. A stop() from another thread that lands in
# between runs at once (call_threadsafe: the loop is not running), finishes the consumer, but does
# not stop the loop because _blocking is still False; wait() then runs the loop forever.
def test_stop_between_start_and_blocking_still_ends_wait() -> None:
    with rig([feed(HEARTBEAT)]) as r:
        consumer = r.consumer

        class Preempted(Consumer):
            # The waiting thread is preempted right after start() returns; another thread
            # calls stop() meanwhile (here: run to completion before wait() goes on).
            def start(self, *a: Any, **k: Any) -> "Consumer":
                result = super().start(*a, **k)
                t = threading.Thread(target=self.stop)
                t.start()
                t.join()
                return result

        consumer.__class__ = Preempted
        done = threading.Event()

        def follow() -> None:
            try:
                consumer.wait(lambda c: None, since=0, heartbeat=500)
            finally:
                done.set()

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        returned = done.wait(3)
        state = consumer.state
        if not returned:
            r.loop.stop()
            t.join(5)
    assert returned, "wait() did not return; consumer state=%s" % state


# -- limit zero --------------------------------------------------------------
# limit=0 (CouchDB answers a continuous limit=0 with its last_seq line at once): the client
# never checks delivered >= limit before connecting, and an end with no rows is a 'quick end':
# it reconnects for ever with a growing backoff; wait() never returns.
def test_limit_zero_stops() -> None:
    answer = [Read(), Send(COUCH_HEAD + couch_end(seq(5), pending=5)), Close()]
    with rig([answer]) as r:
        done = threading.Event()

        def follow() -> None:
            try:
                r.consumer.wait(r.changes.append, since=0, heartbeat=500, limit=0)
            finally:
                done.set()

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        returned = done.wait(3)
        conns = r.srv.connections
        if not returned:
            r.consumer.stop()
            t.join(5)
    assert returned, "wait(limit=0) did not return after %d connections" % conns


# -- begin unguarded ---------------------------------------------------------
# start() from another thread while the loop runs posts _begin; whatever _begin raises (here a
# heartbeat CouchDB would refuse, which start() does not validate) is only logged by the loop:
# start() returned normally, the consumer never starts and nobody is told.
def test_start_from_other_thread_with_bad_heartbeat(caplog: Any) -> None:
    with rig([feed(chunk(row(1)) + HEARTBEAT)]) as r:
        keepalive = r.loop.call_later(3600, lambda: None)
        thread = r.loop.run_in_thread()
        try:
            raised = None
            try:
                r.consumer.start(r.changes.append, since=0, heartbeat="30s")
            except Exception as exc:  # noqa: BLE001
                raised = exc
            time.sleep(0.3)
            state = r.consumer.state
            errors = [e for e in r.events if e.kind == "error"]
        finally:
            r.consumer.stop()
            r.loop.stop()
            thread.join(5)
            keepalive.cancel()
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert raised is not None or state != "idle" or errors, (
        "start() returned, consumer %r, no error event; only logged: %r" % (state, logged)
    )


# -- closed loop stop --------------------------------------------------------
# A loop closed (not running) while consumers hold/await turns at the connect gate: stop() of
# the turn holder hands the turn to the next in line with loop.call_soon, which raises on a closed
# loop, in the middle of _finish: stop() raises, the checkpoint is not saved on stop.
def test_stop_after_loop_closed_with_gate_waiters(monkeypatch: Any) -> None:
    monkeypatch.setattr(follow, "MAX_CONNECTING_PER_LOOP", 1)
    stalled = [Read(), Send(COUCH_HEAD[:20]), Stall()]  # holds its turn in 'awaiting'
    store = MemoryCheckpoint()
    with rig([stalled]) as r:
        a = r.consumer
        a.checkpoint = store
        b = Consumer(r.consumer.db, r.loop)
        a.start(lambda c: None, since="5-abc", heartbeat=500)
        b.start(lambda c: None, since=0, heartbeat=500)
        r.run_until(lambda: a.phase == "awaiting")
        assert b.phase == "waiting"
        r.loop.close()
        err = None
        try:
            a.stop()
        except Exception as exc:  # noqa: BLE001
            err = exc
        state = a.state
        saved = store.load()
        b.stop()
    assert err is None, "stop() raised %r (state now %s, checkpoint %r)" % (err, state, saved)
    assert saved == "5-abc"


# -- restart other thread ----------------------------------------------------
# stop() then start() from another thread while the loop runs: stop() is posted, but start()
# decides 'already running' in the calling thread from feed state the loop has not updated yet.
def test_restart_from_other_thread() -> None:
    with rig([feed(chunk(row(1)) + HEARTBEAT), feed(chunk(rows(1, 2)) + HEARTBEAT)]) as r:
        r.start(since=0, heartbeat=500)
        thread = r.loop.run_in_thread()
        try:
            deadline = time.monotonic() + 5
            while not r.changes and time.monotonic() < deadline:
                time.sleep(0.01)
            r.consumer.stop()
            raised = None
            try:
                r.consumer.start(r.changes.append, since=r.consumer.last_seq, heartbeat=500)
            except RuntimeError as exc:
                raised = exc
        finally:
            r.consumer.stop()
            r.loop.stop()
            thread.join(5)
    assert raised is None, "stop(); start() from another thread: %r" % raised


# -- limit as a string ------------------------------------------------------
# limit passed as a string (as a query parameter often is; fetch() accepts it): the first
# connection attempt died with a TypeError (a 'bug', so fatal). Digits are a count now; anything
# else is refused by start() itself.
def test_limit_as_string() -> None:
    with rig([feed(chunk(rows(1, 2)) + HEARTBEAT)]) as r:
        r.consumer.wait(r.changes.append, since=0, heartbeat=500, limit="1")
    assert r.ids == [doc_id(1)] and r.consumer.error is None


@pytest.mark.parametrize("bad", ["x", "-1", -1, 1.5, True])
def test_a_limit_that_is_not_a_count_is_refused_by_start(bad: Any) -> None:
    with rig([feed(HEARTBEAT)]) as r:
        with pytest.raises(ValueError, match="limit must be a count"):
            r.consumer.start(r.changes.append, since=0, limit=bad)
        assert r.consumer.state == "idle"


# -- an on_error that restarts after a fatal error ---------------------------
# wait() returned normally (the restart cleared the error) while the consumer ran on a loop
# nobody ran. Now wait() follows the restarted run until it stops.
def test_an_on_error_restart_after_a_fatal_error_is_followed_by_wait() -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", "0")]
    forbidden = [Read(), Send(response_head(403, headers, chunked=False)), Close()]
    with rig([forbidden, feed(chunk(row(1)) + HEARTBEAT)]) as r:
        errors: list = []

        def on_error(event: Any) -> None:
            errors.append(event.error)
            if len(errors) == 1:
                r.consumer.start(r.changes.append, since=0, heartbeat=500, limit=1)

        r.consumer.on_error = on_error
        r.consumer.wait(r.changes.append, since=0, heartbeat=500)
    assert [getattr(e, "status", None) for e in errors] == [403]
    assert r.ids == [doc_id(1)] and r.consumer.state == "stopped" and r.consumer.error is None
