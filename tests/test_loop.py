"""Tests for changeloop.loop: timers on a fake clock, isolation, wake-ups, and every run tier.

Timer tests never sleep: the clock is a :class:`FakeClock` advanced by hand and the loop is
stepped with ``run_once(0)``. Thread tests use real time with generous bounds, and first prove the
loop really was blocked in ``select()`` (a spy selector records when it enters with no timeout).
"""

import gc
import logging
import select
import selectors
import socket
import threading
import time
import weakref
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from changeloop.loop import Handle, Handler, Loop, TimerHandle

pytestmark = pytest.mark.timeout(10)

# Bounds for real-time waits: a wake-up takes well under a millisecond, but a loaded 2-core CI
# machine can stall a thread for a while. A broken wake-up would hang for the full bound.
WAKE_BOUND_S = 1.0
SETTLE_S = 0.02  # time for a thread that announced a select() to actually be inside it

SocketPair = Tuple[socket.socket, socket.socket]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SpySelector(selectors.DefaultSelector):
    """The default selector, announcing when it enters an unbounded select() and counting."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking = threading.Event()
        self.returned = 0
        self.modifies = 0

    def select(self, timeout: Optional[float] = None) -> Any:
        if timeout is None:
            self.blocking.set()
        try:
            return super().select(timeout)
        finally:
            self.returned += 1

    def modify(self, fileobj: Any, events: int, data: Any = None) -> Any:
        self.modifies += 1
        return super().modify(fileobj, events, data)


class Recorder(Handler):
    """Reads whatever arrives, counts write readiness, keeps the errors it is given."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.writes = 0
        self.errors: List[BaseException] = []

    def handle_read(self) -> None:
        self.data += self.sock.recv(4096)

    def handle_write(self) -> None:
        self.writes += 1

    def handle_error(self, exc: BaseException) -> None:
        self.errors.append(exc)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loop(clock: FakeClock) -> Iterator[Loop]:
    with Loop(clock=clock) as lp:
        yield lp


@pytest.fixture
def socketpair() -> Iterator[Callable[[], SocketPair]]:
    """A factory of non-blocking socket pairs, all closed after the test."""
    opened: List[socket.socket] = []

    def make() -> SocketPair:
        a, b = socket.socketpair()
        opened.extend((a, b))
        a.setblocking(False)
        b.setblocking(False)
        return a, b

    yield make
    for sock in opened:
        sock.close()


def run_until(loop: Loop, done: Callable[[], bool], bound: float = WAKE_BOUND_S) -> None:
    """Step the loop with real waits until ``done()``; fail after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not done():
        assert time.monotonic() < deadline, "condition not met in time: %r" % (loop,)
        loop.run_once(0.05)


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# -- timers --------------------------------------------------------------------------------------


def test_timers_fire_in_deadline_order_ties_by_insertion(loop: Loop, clock: FakeClock) -> None:
    fired: List[str] = []
    loop.call_at(clock.now + 5, fired.append, "a")
    loop.call_at(clock.now + 1, fired.append, "b")
    loop.call_at(clock.now + 5, fired.append, "c")
    loop.call_later(3, fired.append, "d")
    loop.call_later(5, fired.append, "e")
    clock.advance(4.9)
    loop.run_once(0)
    assert fired == ["b", "d"]
    clock.advance(0.1)
    loop.run_once(0)
    assert fired == ["b", "d", "a", "c", "e"]


def test_cancelled_timer_does_not_fire(loop: Loop, clock: FakeClock) -> None:
    fired: List[int] = []
    handle = loop.call_later(1, fired.append, 1)
    assert isinstance(handle, TimerHandle)
    assert handle.when == clock.now + 1
    assert "cancelled" not in repr(handle)
    handle.cancel()
    handle.cancel()  # idempotent
    assert handle.cancelled
    assert "cancelled" in repr(handle)
    clock.advance(2)
    loop.run_once(0)
    assert fired == []
    assert loop._timers == []


def test_cancelled_timers_do_not_keep_run_alive(loop: Loop) -> None:
    loop.call_later(3600, pytest.fail, "must not fire").cancel()
    started = time.monotonic()
    loop.run()  # would sleep in select() for an hour if the cancelled timer counted
    fired: List[str] = []
    loop.call_later(0, fired.append, "a")
    loop.call_later(0, fired.append, "b")
    loop.call_later(0, fired.append, "c")
    loop.call_later(3600, pytest.fail, "must not fire").cancel()  # too few to compact: stays
    assert len(loop._timers) == 4
    loop.run()  # after a, b, c only a dead entry is left: run() must return, not block
    assert fired == ["a", "b", "c"]
    assert time.monotonic() - started < 0.5


def test_has_work_says_when_nothing_is_left(
    loop: Loop, clock: FakeClock, socketpair: Callable[[], SocketPair]
) -> None:
    # The hand-driven tiers' answer to "is anything left?": next_timeout() is None both for a
    # loop waiting on sockets and for one with nothing left; has_work() tells them apart.
    assert not loop.has_work() and loop.next_timeout() is None
    timer = loop.call_later(5, pytest.fail, "cancelled")
    assert loop.has_work()
    timer.cancel()
    assert not loop.has_work()  # a cancelled timer still in the heap is not work
    loop.call_soon(lambda: None)
    assert loop.has_work() and loop.next_timeout() == 0.0
    loop.run_once(0)
    assert not loop.has_work()
    a, b = socketpair()
    loop.add_handler(a, Recorder(a))
    assert loop.has_work() and loop.next_timeout() is None  # waiting on a socket: work
    loop.set_interest(a, read=False, write=False)
    # Parked (a paused feed): still work, for run() too; its owner resumes it from elsewhere.
    assert loop.has_work()
    loop.set_interest(a, read=True, write=False)
    assert loop.has_work()
    loop.remove_handler(a)
    fired: List[int] = []
    loop.call_later(1, fired.append, 1)
    clock.advance(1)
    while loop.has_work():  # the documented host loop ends once the last timer fired
        loop.run_once(0)
    assert fired == [1]
    loop.close()
    assert not loop.has_work()


def test_watchdog_rearm_keeps_heap_bounded(loop: Loop) -> None:
    for i in range(50):
        loop.call_later(100 + i, pytest.fail, "not reached")
    watchdog = loop.call_later(30, pytest.fail, "not reached")
    for _ in range(10_000):
        watchdog.cancel()
        watchdog = loop.call_later(30, pytest.fail, "not reached")
    # Compaction happens when cancelled entries are over half the heap: 51 live entries can
    # never drag more than 51 dead ones along.
    assert len(loop._timers) <= 2 * 51 + 1
    assert "timers=51" in repr(loop)


def test_lone_watchdog_rearm_keeps_heap_tiny(loop: Loop) -> None:
    watchdog = loop.call_later(30, pytest.fail, "not reached")
    for _ in range(1000):
        watchdog.cancel()
        watchdog = loop.call_later(30, pytest.fail, "not reached")
        assert len(loop._timers) <= 2


def test_all_due_timers_are_popped_before_any_runs(loop: Loop, clock: FakeClock) -> None:
    fired: List[str] = []
    later: List[TimerHandle] = []

    def first() -> None:
        fired.append("first")
        loop.call_later(0, fired.append, "scheduled-by-first")  # due now, but next pass
        later[0].cancel()  # due in this batch, cancelled before its turn

    loop.call_later(1, first)
    later.append(loop.call_later(1, fired.append, "cancelled-in-batch"))
    loop.call_later(1, fired.append, "third")
    clock.advance(1)
    loop.run_once(0)
    assert fired == ["first", "third"]
    loop.run_once(0)
    assert fired == ["first", "third", "scheduled-by-first"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), max_size=25))
def test_timer_order_property(specs: List[Tuple[int, bool]]) -> None:
    clock = FakeClock()
    with Loop(clock=clock) as loop:
        fired: List[int] = []
        handles = [loop.call_later(delay, fired.append, i) for i, (delay, _) in enumerate(specs)]
        for handle, (_, cancel) in zip(handles, specs):
            if cancel:
                handle.cancel()
        clock.advance(5)
        loop.run_once(0)
        order = sorted(range(len(specs)), key=lambda i: (specs[i][0], i))
        assert fired == [i for i in order if not specs[i][1]]
        assert loop._timers == []
        assert "timers=0" in repr(loop)


def test_timer_exceptions_are_logged_and_the_loop_goes_on(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    fired: List[str] = []

    def boom() -> None:
        raise ValueError("timer failed")

    loop.call_later(0, boom)
    loop.call_later(0, fired.append, "after")
    loop.call_soon(boom)
    loop.call_soon(fired.append, "soon")
    with caplog.at_level(logging.ERROR, logger="changeloop.loop"):
        loop.run()
    assert fired == ["after", "soon"]
    failures = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert len(failures) == 2
    assert all(r.name == "changeloop.loop" for r in failures)


def test_keyboard_interrupt_escapes_run_and_keeps_the_rest(loop: Loop) -> None:
    fired: List[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    loop.call_later(0, interrupt)
    loop.call_later(0, fired.append, "second timer")
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert not loop.is_running()
    assert fired == []
    loop.run()  # the interrupted batch's remaining timer was kept
    assert fired == ["second timer"]


def test_keyboard_interrupt_in_a_handler_escapes(
    loop: Loop, socketpair: Callable[[], SocketPair]
) -> None:
    a, b = socketpair()

    class Interrupting(Recorder):
        def handle_read(self) -> None:
            raise KeyboardInterrupt

    handler = Interrupting(a)
    loop.add_handler(a, handler)
    b.send(b"x")
    assert readable(a.fileno(), WAKE_BOUND_S)
    with pytest.raises(KeyboardInterrupt):
        loop.run_once(0)
    assert handler.errors == []
    assert not loop.is_running()


# -- ready callbacks -----------------------------------------------------------------------------


def test_self_requeueing_callback_cannot_starve_io(
    loop: Loop, socketpair: Callable[[], SocketPair]
) -> None:
    a, b = socketpair()
    handler = Recorder(a)
    loop.add_handler(a, handler)
    runs: List[int] = []

    def again() -> None:
        runs.append(1)
        loop.call_soon(again)

    loop.call_soon(again)
    b.send(b"io")
    assert readable(a.fileno(), WAKE_BOUND_S)
    loop.run_once(0)
    assert (len(runs), handler.data) == (1, b"io")
    loop.run_once(0)
    assert len(runs) == 2
    assert loop.next_timeout() == 0.0


def test_cancelled_soon_callback_does_not_run(loop: Loop) -> None:
    handle = loop.call_soon(pytest.fail, "must not run")
    assert isinstance(handle, Handle)
    handle.cancel()
    loop.run()
    assert "ready=0" in repr(loop)


# -- I/O handlers and isolation -----------------------------------------------------------------


def test_failing_handler_gets_handle_error_others_keep_receiving(
    loop: Loop, socketpair: Callable[[], SocketPair]
) -> None:
    (a, a_peer), (b, b_peer) = socketpair(), socketpair()

    class Failing(Recorder):
        def handle_read(self) -> None:
            raise ValueError("bad bytes")

        def handle_error(self, exc: BaseException) -> None:
            super().handle_error(exc)
            loop.remove_handler(self.sock)

    bad, good = Failing(a), Recorder(b)
    loop.add_handler(a, bad)
    loop.add_handler(b, good)
    a_peer.send(b"x")
    b_peer.send(b"hello")
    run_until(loop, lambda: bool(bad.errors) and good.data == b"hello")
    assert isinstance(bad.errors[0], ValueError)
    assert "handlers=1" in repr(loop)
    b_peer.send(b" again")
    run_until(loop, lambda: good.data == b"hello again")
    assert len(bad.errors) == 1


def test_handler_whose_handle_error_raises_is_removed_and_logged(
    loop: Loop, socketpair: Callable[[], SocketPair], caplog: pytest.LogCaptureFixture
) -> None:
    (a, a_peer), (b, b_peer) = socketpair(), socketpair()
    calls: List[str] = []

    class Hopeless(Recorder):
        def handle_read(self) -> None:
            calls.append("read")
            raise ValueError("read failed")

        def handle_error(self, exc: BaseException) -> None:
            calls.append("error")
            raise RuntimeError("and so did handle_error")

    good = Recorder(b)
    loop.add_handler(a, Hopeless(a))
    loop.add_handler(b, good)
    a_peer.send(b"x")
    with caplog.at_level(logging.ERROR, logger="changeloop.loop"):
        run_until(loop, lambda: bool(calls))
    assert calls == ["read", "error"]
    assert "handlers=1" in repr(loop)
    [record] = [r for r in caplog.records if "handle_error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    b_peer.send(b"still served")
    run_until(loop, lambda: good.data == b"still served")
    assert calls == ["read", "error"]  # removed: never called again though still readable
    assert a.fileno() != -1  # the loop removes handlers, it does not close their sockets


def test_handler_removed_in_the_same_batch_is_not_called(
    loop: Loop, socketpair: Callable[[], SocketPair]
) -> None:
    (a, a_peer), (b, b_peer) = socketpair(), socketpair()
    called: List[str] = []

    class RemovesOther(Recorder):
        def __init__(self, sock: socket.socket, name: str, other: socket.socket) -> None:
            super().__init__(sock)
            self.name, self.other = name, other

        def handle_read(self) -> None:
            called.append(self.name)
            loop.remove_handler(self.other)

    loop.add_handler(a, RemovesOther(a, "a", b))
    loop.add_handler(b, RemovesOther(b, "b", a))
    a_peer.send(b"x")
    b_peer.send(b"y")
    assert select.select([a, b], [], [], WAKE_BOUND_S)[0]
    deadline = time.monotonic() + WAKE_BOUND_S
    while len(select.select([a, b], [], [], 0.01)[0]) < 2:
        assert time.monotonic() < deadline
    loop.run_once(0)  # both are ready in this one select() batch
    assert len(called) == 1


@pytest.mark.parametrize("reuse", [False, True], ids=["interest-dropped", "fd-reused"])
def test_stale_events_of_a_batch_reach_no_handler(
    reuse: bool, loop: Loop, socketpair: Callable[[], SocketPair]
) -> None:
    # Both sockets are readable in one select() batch; the first handler to run stops the
    # other's read interest, or closes it and registers a new socket that reuses its fd
    # number. Neither the old handler nor the new one may get the batch's stale read event.
    (a, a_peer), (b, b_peer) = socketpair(), socketpair()
    calls: List[str] = []
    newcomer = Recorder(a)

    class First(Recorder):
        def handle_read(self) -> None:
            calls.append("first")
            other = b if self.sock is a else a
            if not reuse:
                loop.set_interest(other, read=False, write=False)
                return
            loop.remove_handler(other)
            fd = other.fileno()
            other.close()
            c, c_peer = socketpair()  # the lowest free fd: the one just closed
            assert c.fileno() == fd
            c_peer.send(b"not yet")
            newcomer.sock = c
            loop.add_handler(c, newcomer)

    loop.add_handler(a, First(a))
    loop.add_handler(b, First(b))
    a_peer.send(b"x")
    b_peer.send(b"y")
    deadline = time.monotonic() + WAKE_BOUND_S
    while len(select.select([a, b], [], [], 0.01)[0]) < 2:
        assert time.monotonic() < deadline
    loop.run_once(0)  # both are ready in this one select() batch
    assert calls == ["first"] and newcomer.data == b""


def test_set_interest_modifies_only_on_change_and_parks_on_none(
    socketpair: Callable[[], SocketPair],
) -> None:
    a, a_peer = socketpair()
    spy = SpySelector()
    with Loop(clock=FakeClock(), selector=spy) as loop:
        handler = Recorder(a)
        loop.add_handler(a, handler, read=False, write=True)
        loop.run_once(0)
        assert handler.writes == 1
        loop.set_interest(a, read=False, write=True)
        assert spy.modifies == 0
        loop.set_interest(a, read=True, write=False)
        assert spy.modifies == 1
        loop.run_once(0)
        assert handler.writes == 1  # no longer watched for writing

        loop.set_interest(a, read=False, write=False)  # parked: out of the selector, kept here
        assert "handlers=1" in repr(loop)
        a_peer.send(b"waiting")
        loop.run_once(0)
        assert handler.data == b""
        assert loop.has_work()  # parked, not gone: run() waits for its owner to come back
        loop.set_interest(a, read=True, write=False)
        run_until(loop, lambda: handler.data == b"waiting")

        loop.set_interest(a, read=False, write=False)
        loop.remove_handler(a)
        loop.remove_handler(a)  # idempotent
        assert "handlers=0" in repr(loop)
        with pytest.raises(ValueError):
            loop.set_interest(a, read=True, write=False)


def test_add_handler_twice_is_refused(loop: Loop, socketpair: Callable[[], SocketPair]) -> None:
    a, _ = socketpair()
    loop.add_handler(a, Recorder(a))
    with pytest.raises(ValueError):
        loop.add_handler(a, Recorder(a))
    loop.set_interest(a, read=False, write=False)
    with pytest.raises(ValueError):
        loop.add_handler(a, Recorder(a), read=False)


# -- wake-ups from other threads ----------------------------------------------------------------


def test_stop_from_another_thread_wakes_a_blocked_loop() -> None:
    spy = SpySelector()
    with Loop(selector=spy) as loop:
        thread = loop.run_in_thread()
        assert spy.blocking.wait(WAKE_BOUND_S)
        time.sleep(SETTLE_S)
        assert spy.returned == 0 and thread.is_alive()  # really blocked, with no timeout
        started = time.monotonic()
        threading.Thread(target=loop.stop).start()
        thread.join(WAKE_BOUND_S)
        assert not thread.is_alive()
        assert time.monotonic() - started < WAKE_BOUND_S
        assert not loop.is_running()


def test_call_soon_threadsafe_wakes_a_blocked_run(socketpair: Callable[[], SocketPair]) -> None:
    a, _ = socketpair()  # an idle socket keeps run() waiting, with no timer to wake it
    spy = SpySelector()
    with Loop(selector=spy) as loop:
        loop.add_handler(a, Recorder(a))
        ran = threading.Event()

        def on_loop_thread() -> None:
            ran.set()
            loop.remove_handler(a)  # nothing left to do: run() returns

        runner = threading.Thread(target=loop.run)
        runner.start()
        assert spy.blocking.wait(WAKE_BOUND_S)
        time.sleep(SETTLE_S)
        assert spy.returned == 0 and not ran.is_set()
        started = time.monotonic()
        caller = threading.Thread(target=loop.call_soon_threadsafe, args=(on_loop_thread,))
        caller.start()
        assert ran.wait(WAKE_BOUND_S)
        assert time.monotonic() - started < WAKE_BOUND_S
        runner.join(WAKE_BOUND_S)
        caller.join(WAKE_BOUND_S)
        assert not runner.is_alive()


def test_run_in_thread_serves_threadsafe_calls_until_stopped() -> None:
    with Loop() as loop:
        thread = loop.run_in_thread(name="bg-loop")
        assert thread.daemon and thread.name == "bg-loop"
        assert loop.is_running()
        with pytest.raises(RuntimeError):
            loop.run_in_thread()
        with pytest.raises(RuntimeError):
            loop.run()
        with pytest.raises(RuntimeError):
            loop.run_once(0)
        with pytest.raises(RuntimeError):
            loop.close()
        seen: List[str] = []
        done = threading.Event()

        def later() -> None:
            seen.append(threading.current_thread().name)
            done.set()

        # Work added from outside: a timer, scheduled on the loop's thread through the door.
        loop.call_soon_threadsafe(loop.call_later, 0.01, later)
        assert done.wait(WAKE_BOUND_S)
        assert seen == ["bg-loop"]
        loop.stop()
        thread.join(WAKE_BOUND_S)
        assert not thread.is_alive() and not loop.is_running()


def test_stop_right_after_run_in_thread_is_not_lost() -> None:
    with Loop() as loop:
        thread = loop.run_in_thread()
        loop.stop()
        thread.join(WAKE_BOUND_S)
        assert not thread.is_alive()


def test_wakeup_socket_full_is_not_an_error() -> None:
    with Loop() as loop:
        try:
            while True:
                loop._wake_w.send(b"\0" * 65536)
        except BlockingIOError:
            pass
        ran: List[int] = []
        loop.call_soon_threadsafe(ran.append, 1)  # the byte does not fit; the call still counts
        loop.run_once(0)
        assert ran == [1]
        assert not readable(loop._wake_r.fileno(), 0)  # drained completely


# -- run tiers -----------------------------------------------------------------------------------


def test_run_returns_when_nothing_is_left(loop: Loop) -> None:
    loop.run()  # empty: returns at once
    fired: List[str] = []
    loop.call_later(0, lambda: loop.call_soon(fired.append, "chained"))
    loop.run()
    assert fired == ["chained"]
    assert not loop.is_running()


def test_run_is_not_reentrant(loop: Loop) -> None:
    errors: List[str] = []

    def nested() -> None:
        assert loop.is_running()
        assert "running" in repr(loop)
        for attempt in (loop.run, lambda: loop.run_once(0), loop.run_in_thread, loop.close):
            try:
                attempt()
            except RuntimeError as exc:
                errors.append(str(exc))

    loop.call_soon(nested)
    loop.run()
    assert len(errors) == 4
    assert not loop.is_running()


def test_run_once_from_a_plain_while_loop(socketpair: Callable[[], SocketPair]) -> None:
    a, b = socketpair()
    with Loop() as loop:
        handler = Recorder(a)
        loop.add_handler(a, handler)
        b.sendall(b"legacy program data")
        deadline = time.monotonic() + WAKE_BOUND_S
        while handler.data != b"legacy program data":
            assert time.monotonic() < deadline
            loop.run_once(0.05)


def test_external_select_tier(socketpair: Callable[[], SocketPair]) -> None:
    a, b = socketpair()
    with Loop() as loop:
        try:
            fd = loop.fileno()
        except RuntimeError:
            pytest.skip("the default selector has no fd of its own here")
        handler = Recorder(a)
        loop.add_handler(a, handler)
        assert loop.next_timeout() is None
        assert not readable(fd, 0)

        b.send(b"ping")
        assert readable(fd, WAKE_BOUND_S)
        loop.run_once(0)
        assert handler.data == b"ping"
        assert not readable(fd, 0)

        ran: List[int] = []
        caller = threading.Thread(target=loop.call_soon_threadsafe, args=(ran.append, 1))
        caller.start()
        caller.join(WAKE_BOUND_S)
        assert readable(fd, WAKE_BOUND_S)
        assert loop.next_timeout() == 0.0
        loop.run_once(0)
        assert ran == [1]
        assert not readable(fd, 0)  # the wake-up byte was drained

        loop.call_later(0.03, ran.append, 2)  # the host sleeps in its own select() until due
        timeout = loop.next_timeout()
        assert timeout is not None and 0 < timeout <= 0.03
        select.select([fd], [], [], timeout)
        deadline = time.monotonic() + WAKE_BOUND_S
        while ran != [1, 2]:
            assert time.monotonic() < deadline
            select.select([fd], [], [], loop.next_timeout())
            loop.run_once(0)


def test_next_timeout_follows_the_nearest_timer(loop: Loop, clock: FakeClock) -> None:
    assert loop.next_timeout() is None
    far = loop.call_later(5, lambda: None)
    assert loop.next_timeout() == 5.0
    clock.advance(2)
    assert loop.next_timeout() == 3.0
    near = loop.call_later(1, lambda: None)
    assert loop.next_timeout() == 1.0
    near.cancel()
    assert loop.next_timeout() == 3.0
    loop.call_soon(lambda: None)
    assert loop.next_timeout() == 0.0
    loop.run_once(0)
    clock.advance(10)
    assert loop.next_timeout() == 0.0  # overdue: never negative
    far.cancel()
    assert loop.next_timeout() is None
    assert loop.time() == clock.now


def test_fileno_needs_a_selector_with_its_own_fd() -> None:
    with Loop(selector=selectors.SelectSelector()) as loop:
        with pytest.raises(RuntimeError, match="no file descriptor"):
            loop.fileno()


# -- state, repr, close -------------------------------------------------------------------------


def test_repr_shows_state_and_counts(loop: Loop, socketpair: Callable[[], SocketPair]) -> None:
    a, _ = socketpair()
    assert repr(loop) == "<Loop idle handlers=0 timers=0 ready=0>"
    loop.add_handler(a, Recorder(a))
    loop.call_later(1, lambda: None)
    loop.call_later(2, lambda: None).cancel()
    loop.call_soon(lambda: None)
    assert repr(loop) == "<Loop idle handlers=1 timers=1 ready=1>"
    loop.close()
    assert repr(loop) == "<Loop closed handlers=0 timers=0 ready=0>"


def test_close_is_idempotent_and_a_closed_loop_refuses_work(
    socketpair: Callable[[], SocketPair],
) -> None:
    a, _ = socketpair()
    loop = Loop()
    loop.add_handler(a, Recorder(a))
    assert "idle" in repr(loop)
    loop.close()
    loop.close()
    assert loop.closed
    assert a.fileno() != -1  # the handler's socket is the caller's to close
    for call in (
        loop.run,
        lambda: loop.run_once(0),
        loop.run_in_thread,
        lambda: loop.call_soon(print),
        lambda: loop.call_later(1, print),
        lambda: loop.call_soon_threadsafe(print),
        lambda: loop.add_handler(a, Recorder(a)),
        loop.fileno,
    ):
        with pytest.raises(RuntimeError):
            call()
    loop.stop()  # harmless once closed
    loop.remove_handler(a)


def test_a_closed_loop_lets_go_of_the_callbacks_of_handles_still_held() -> None:
    # A timer's owner often holds its handle (to cancel it) while the handle holds the owner's
    # bound method: a cycle. Closing the loop empties the handles, so the owner goes with the
    # loop by reference counting alone, as anything the callbacks' arguments held.
    class Owner:
        def __init__(self, loop: Loop) -> None:
            self.timer = loop.call_later(60, self.fire)
            self.soon = loop.call_soon(self.fire)

        def fire(self) -> None:
            pass

    loop = Loop()
    owner = Owner(loop)
    kept = owner.timer
    ref = weakref.ref(owner)
    gc.disable()  # reference counting, not the cycle collector
    try:
        loop.close()
        del owner
        assert ref() is None
    finally:
        gc.enable()
    assert kept.cancelled and "cancelled" in repr(kept)
    kept.cancel()  # harmless once its loop is closed


def test_context_manager_closes() -> None:
    with Loop() as loop:
        assert not loop.closed
    assert loop.closed


def test_stop_from_another_thread_runs_after_work_queued_before_it() -> None:
    # Regression: stop() only set a flag, so `consumer.stop(); loop.stop()` from another thread
    # could end run() before the consumer's queued stop ran, leaving its socket open.
    with Loop() as loop:
        thread = loop.run_in_thread()
        ran = []
        for index in range(50):
            loop.call_soon_threadsafe(ran.append, index)
        loop.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert ran == list(range(50))


# -- call_threadsafe: requests from outside, never beside a pass ---------------------------------


def test_call_threadsafe_runs_at_once_on_an_idle_loop_holding_it() -> None:
    with Loop() as loop:
        seen: List[object] = []

        def inside() -> None:
            seen.append(loop.in_loop_thread())
            # Holding the loop: a run cannot start, and neither can close (no deadlock either).
            with pytest.raises(RuntimeError, match="already running"):
                loop.run_once(0)
            with pytest.raises(RuntimeError, match="running"):
                loop.close()

        loop.call_threadsafe(inside)
        assert seen == [True] and not loop.in_loop_thread()
        loop.run_once(0)  # and the loop is free again afterwards


def test_call_threadsafe_queues_while_the_loop_runs_in_another_thread() -> None:
    with Loop() as loop:
        ran_in: List[str] = []
        thread = loop.run_in_thread("loop")
        try:
            loop.call_threadsafe(lambda: ran_in.append(threading.current_thread().name))
            deadline = time.monotonic() + 5
            while not ran_in and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            loop.stop()
            thread.join(5)
        assert ran_in == ["loop"]


def test_call_threadsafe_from_the_loops_thread_runs_at_once() -> None:
    with Loop() as loop:
        order: List[str] = []

        def outer() -> None:
            loop.call_threadsafe(order.append, "inner")
            order.append("after")

        loop.call_soon(outer)
        loop.run_once(0)
        assert order == ["inner", "after"]


def test_call_threadsafe_on_a_closed_loop_runs_at_once() -> None:
    loop = Loop()
    loop.close()
    seen: List[int] = []
    loop.call_threadsafe(seen.append, 1)
    assert seen == [1]
