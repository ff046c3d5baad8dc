"""The selectors loop: I/O readiness, timers, one thread-safe wake-up, and four ways to run it.

Strategy: one :class:`Loop` owns one :mod:`selectors` selector. A file object is registered once
with its handler kept in ``SelectorKey.data``, and ``modify()`` runs only when the interest really
changes, so a pass costs O(ready file objects), never a scan over all handlers (asyncore's
mistake). Timers are a heap of ``(deadline, sequence, handle)`` as in :mod:`sched`, on an injected
clock. Everything runs on the loop's thread except one door, :meth:`Loop.call_soon_threadsafe`
(which :meth:`Loop.stop` shares): append to a deque, write one byte to a wake-up socket that the
selector watches (pika's IOLoop). A failure stays where it happened (asyncore's one good idea): a
handler that raises gets its own ``handle_error``, and is removed if that raises too; a callback
that raises is logged. Only ``KeyboardInterrupt`` and ``SystemExit`` leave the loop.

Embedding tiers (after paho-mqtt): :meth:`Loop.run` blocks; :meth:`Loop.run_once` is one pass for
a legacy ``while`` loop; :meth:`Loop.run_in_thread` is a background thread fed through
:meth:`Loop.call_soon_threadsafe`; a host's own ``select()`` waits on :meth:`Loop.fileno` for
:meth:`Loop.next_timeout` seconds, then calls ``run_once(0)``. The two hand-driven tiers ask
:meth:`Loop.has_work` whether anything is left (what makes :meth:`Loop.run` return), so a host
whose last feed stopped does not wait for ever. The loop knows nothing of HTTP.
"""

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, Tuple, Union

__all__ = ["Handler", "Handle", "TimerHandle", "Loop"]

logger = logging.getLogger(__name__)

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# Bytes per recv() when draining the wake-up socket; any size works, the drain loops until empty.
WAKEUP_READ_BYTES = 4096


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileLike = Union[int, _HasFileno]


class Handler(Protocol):
    """What the loop calls when a registered file object is ready. Subclassing is optional."""

    def handle_read(self) -> None:
        """The file object is readable (or at EOF, or has an error pending)."""

    def handle_write(self) -> None:
        """The file object is writable."""

    def handle_error(self, exc: BaseException) -> None:
        """``handle_read`` or ``handle_write`` raised ``exc``: close or remove yourself here.

        If this returns, the handler stays registered; if it raises, the loop logs that and
        removes the handler.
        """


def _dropped_by_close(*args: object) -> None:
    """What a handle of a closed loop calls instead of its callback: nothing."""


class Handle:
    """A callback queued by :meth:`Loop.call_soon` or :meth:`Loop.call_soon_threadsafe`."""

    __slots__ = ("_fn", "_args", "_cancelled")

    def __init__(self, fn: Callable[..., object], args: Tuple[Any, ...]) -> None:
        self._fn = fn
        self._args = args
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Keep the callback from running if it has not run yet. Idempotent; not thread-safe."""
        self._cancelled = True
        self._args = ()  # see TimerHandle.cancel

    def _drop(self) -> None:
        # Its loop closed: cancelled, and holding neither the callback nor its arguments.
        self._cancelled = True
        self._fn = _dropped_by_close
        self._args = ()

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except Exception:
            logger.exception("callback %r raised", self)

    def __repr__(self) -> str:
        name = getattr(self._fn, "__qualname__", None) or repr(self._fn)
        return "<%s %s%s>" % (type(self).__name__, name, self._state())

    def _state(self) -> str:
        return " cancelled" if self._cancelled else ""


class TimerHandle(Handle):
    """A callback scheduled by :meth:`Loop.call_later` or :meth:`Loop.call_at`."""

    __slots__ = ("_when", "_loop", "_in_heap")

    def __init__(
        self, when: float, fn: Callable[..., object], args: Tuple[Any, ...], loop: "Loop"
    ) -> None:
        super().__init__(fn, args)
        self._when = when
        self._loop = loop
        self._in_heap = True

    @property
    def when(self) -> float:
        """The deadline, on the loop's clock (see :meth:`Loop.time`)."""
        return self._when

    def cancel(self) -> None:
        """Keep the timer from firing if it has not fired yet. Idempotent; not thread-safe."""
        if not self._cancelled:
            self._cancelled = True
            # A cancelled timer stays in the heap until it comes due or the heap is rebuilt
            # (lazy cancellation), up to connect_timeout later: let go of its arguments now,
            # or a consumer's cancelled connect timer keeps a whole closed FeedStream alive.
            self._args = ()
            if self._in_heap:
                self._loop._timer_cancelled()

    def _drop(self) -> None:
        super()._drop()
        self._in_heap = False  # the closed loop's heap is gone: a cancel() has nothing to tell

    def _state(self) -> str:
        return " when=%.3f%s" % (self._when, super()._state())


class _Waker:
    """The read end of the wake-up socketpair, served like any other handler."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def handle_read(self) -> None:
        try:  # drain it all: many wake-ups may have been written since the last pass
            while self._sock.recv(WAKEUP_READ_BYTES):
                pass
        except BlockingIOError:
            pass

    def handle_write(self) -> None:
        pass

    def handle_error(self, exc: BaseException) -> None:
        logger.error("wake-up socket failed: %r", exc)


def _events(read: bool, write: bool) -> int:
    return (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)


class Loop:
    """One thread's event loop: I/O handlers, timers, callbacks, and a thread-safe wake-up.

    Args:
        clock: returns seconds as a float; timers use it. Inject a fake one in tests.
        selector: the selector to use, owned and closed by the loop; ``DefaultSelector()`` if None.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        selector: Optional[selectors.BaseSelector] = None,
    ) -> None:
        #: ``time()`` returns the loop's clock, the time base of :meth:`call_at`. It is the clock
        #: itself, not a method that calls it: every read of a feed notes the time, and on a
        #: loop of thousands of idle feeds that is thousands of Python frames a second saved.
        self.time: Callable[[], float] = clock
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, TimerHandle]] = []
        self._cancelled_timers = 0  # cancelled entries still in self._timers
        self._sequence = itertools.count()
        # call_soon and call_soon_threadsafe share this deque: append and popleft are atomic,
        # and only the loop's thread pops.
        self._ready: Deque[Handle] = collections.deque()
        # Handlers with no interest: selectors cannot register zero events, so these leave the
        # selector and wait here, by the object given, until set_interest() asks for events.
        self._parked: Dict[FileLike, Handler] = {}
        # The fds registered, modified or removed during the current dispatch batch: only for
        # these can a selected key be stale (see _pass).
        self._touched: Set[int] = set()
        # call_threadsafe() holds it around a call (as the loop's owner); _claim() and close()
        # refuse that owner at once instead of waiting for the lock it holds.
        self._state_lock = threading.Lock()
        self._stats_sources: Dict[str, Callable[[], Any]] = {}
        self._running = False
        self._stopping = False
        self._owner: Optional[int] = None  # the thread id inside a run method, while it runs
        self._closed = False
        # A socketpair, not a pipe: it exists on Windows too, where select() takes sockets only.
        # Its read end sits in the selector, so the selector's own fd wakes on it as well.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _Waker(self._wake_r))

    # -- I/O handlers: loop thread only, not thread-safe ---------------------------------------

    def add_handler(
        self, fileobj: FileLike, handler: Handler, *, read: bool = True, write: bool = False
    ) -> None:
        """Call ``handler`` when ``fileobj`` is ready. Loop thread only; not thread-safe.

        Args:
            fileobj: a socket, anything with ``fileno()``, or a file descriptor.
            handler: see :class:`Handler`.
            read: watch for readability.
            write: watch for writability. With neither, the handler is added parked (see
                :meth:`set_interest`).

        Raises:
            ValueError: ``fileobj`` is already added, or is not a valid file object.
            RuntimeError: the loop is closed.
        """
        self._check_open()
        if self._handler_of(fileobj) is not None:
            raise ValueError("%r is already registered" % (fileobj,))
        events = _events(read, write)
        if events:
            self._touched.add(self._selector.register(fileobj, events, handler).fd)
        else:
            self._parked[fileobj] = handler

    def set_interest(self, fileobj: FileLike, *, read: bool, write: bool) -> None:
        """Change the readiness watched for on ``fileobj``. Loop thread only; not thread-safe.

        ``selector.modify()`` runs only if the interest changes. With neither read nor write the
        file object leaves the selector (which cannot hold zero events) but its handler is kept,
        parked, for a later ``set_interest``; a parked handler still keeps :meth:`run` going
        (its owner will come back to it: a paused feed).

        Args:
            fileobj: the same object that was given to :meth:`add_handler`.
            read: watch for readability.
            write: watch for writability.

        Raises:
            ValueError: ``fileobj`` was not added.
            RuntimeError: the loop is closed.
        """
        self._check_open()
        events = _events(read, write)
        key = self._key(fileobj)
        if key is not None:
            if not events:
                self._selector.unregister(key.fileobj)
                self._touched.add(key.fd)
                self._parked[key.fileobj] = key.data
            elif events != key.events:
                self._selector.modify(key.fileobj, events, key.data)
                self._touched.add(key.fd)
        elif fileobj not in self._parked:
            raise ValueError("%r is not registered" % (fileobj,))
        elif events:
            key = self._selector.register(fileobj, events, self._parked.pop(fileobj))
            self._touched.add(key.fd)

    def remove_handler(self, fileobj: FileLike) -> None:
        """Forget ``fileobj`` and its handler, without closing it. Idempotent; not thread-safe.

        Args:
            fileobj: the object given to :meth:`add_handler`; unknown ones are ignored.
        """
        key = None if self._closed else self._key(fileobj)
        if key is not None:
            self._selector.unregister(key.fileobj)
            self._touched.add(key.fd)
        self._parked.pop(fileobj, None)

    # -- timers and callbacks ----------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Schedule ``fn(*args)`` in ``delay`` seconds. Loop thread only; not thread-safe.

        Returns:
            a :class:`TimerHandle`; its ``cancel()`` keeps the timer from firing.

        Raises:
            RuntimeError: the loop is closed.
        """
        return self.call_at(self.time() + delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Schedule ``fn(*args)`` at ``when`` on :meth:`time`'s clock. Not thread-safe.

        Timers with equal deadlines fire in the order they were scheduled.

        Returns:
            a :class:`TimerHandle`; its ``cancel()`` keeps the timer from firing.

        Raises:
            RuntimeError: the loop is closed.
        """
        self._check_open()
        handle = TimerHandle(when, fn, args, self)
        heapq.heappush(self._timers, (when, next(self._sequence), handle))
        return handle

    def call_soon(self, fn: Callable[..., object], *args: Any) -> Handle:
        """Queue ``fn(*args)`` for the next pass. Loop thread only; not thread-safe.

        Returns:
            a :class:`Handle`; its ``cancel()`` keeps the callback from running.

        Raises:
            RuntimeError: the loop is closed.
        """
        self._check_open()
        handle = Handle(fn, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> Handle:
        """Queue ``fn(*args)`` and wake the loop. Any tier; thread-safe: the one door in.

        Returns:
            a :class:`Handle` (cancel it on the loop's thread only).

        Raises:
            RuntimeError: the loop is closed.
        """
        self._check_open()
        handle = Handle(fn, args)
        self._ready.append(handle)  # before waking, so the woken pass sees it
        self._wake()
        return handle

    def add_stats_source(self, name: str, source: Callable[[], Any]) -> None:
        """Add ``name: source()`` to what :meth:`stats` returns (how the consumers of a loop
        report their counts without the loop knowing them). Not thread-safe."""
        self._stats_sources[name] = source

    def stats(self) -> Dict[str, Any]:
        """A plain dict for a metrics system: handlers, timers, queued callbacks, whether it
        runs, and what the sources added (``feeds``: how many consumers are in each state).
        Thread-safe enough to read from another thread (the counts may be a pass old)."""
        handlers = 0 if self._closed else len(self._selector.get_map()) - 1 + len(self._parked)
        stats: Dict[str, Any] = {
            "running": self._running,
            "closed": self._closed,
            "handlers": handlers,
            "timers": len(self._timers) - self._cancelled_timers,
            "ready": len(self._ready),
        }
        for name, source in list(self._stats_sources.items()):
            stats[name] = source()
        return stats

    def call_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` as the loop's own thread would. Any tier; thread-safe.

        In the loop's thread, or while no run method is in progress (or the loop is closed), it
        runs at once, holding the loop so that no run can start in another thread meanwhile;
        while the loop runs in another thread, it is queued (:meth:`call_soon_threadsafe`) and
        runs in the next pass. Either way it never runs beside a pass: objects whose state only
        the loop's thread may change (a consumer) use it for every request from outside.
        Exceptions of an immediate call reach the caller.
        """
        if self._owner == threading.get_ident():
            fn(*args)
            return
        with self._state_lock:
            if self._running and not self._closed:
                # The run in progress will see it: its thread is the only one popping _ready,
                # and a run ending now leaves it for the next one, as call_soon_threadsafe does.
                self.call_soon_threadsafe(fn, *args)
                return
            self._owner = threading.get_ident()  # in_loop_thread() is true inside fn
            try:
                fn(*args)
            finally:
                self._owner = None

    # -- run tiers ---------------------------------------------------------------------------

    def run(self, *, forever: bool = False) -> None:
        """Run passes until :meth:`stop` or nothing is left to do. Tier: blocking; not thread-safe.

        Nothing left means no watched handlers, no live timers, no queued callbacks. A
        :meth:`stop` that arrives while no ``run()`` is in progress makes the next one return.

        Args:
            forever: keep waiting even with nothing to do (work may arrive through
                :meth:`call_soon_threadsafe`); only :meth:`stop` ends it.

        Raises:
            RuntimeError: the loop is closed, or already running (in any thread).
        """
        self._claim()
        self._run_claimed(forever)

    def run_once(self, timeout: Optional[float] = 0) -> None:
        """Do one pass: wait, dispatch I/O, fire due timers, run queued callbacks.

        Tier: a legacy program's own ``while`` loop, or after a host's ``select()`` on
        :meth:`fileno`; not thread-safe. The wait ends early at the next timer and is skipped when
        callbacks are queued. Only callbacks queued before the pass run in it, so a callback that
        re-queues itself cannot starve I/O.

        Loop while :meth:`has_work` is true (``while loop.has_work(): loop.run_once(0.1)``):
        once it is false (every consumer stopped, say after a 404), a pass only waits, and
        ``run_once(None)`` waits for ever unless another thread queues work.

        Args:
            timeout: the longest wait in seconds; ``0`` polls, ``None`` waits for work.

        Raises:
            RuntimeError: the loop is closed, or already running (in any thread).
        """
        self._claim()
        self._owner = threading.get_ident()
        try:
            self._pass(None if timeout is None else max(0.0, timeout))
        finally:
            self._owner = None
            self._running = False

    def run_in_thread(self, name: str = "changeloop") -> threading.Thread:
        """Start ``run(forever=True)`` in a daemon thread. Tier: background thread; thread-safe.

        Feed it with :meth:`call_soon_threadsafe`; end it with :meth:`stop`, then ``join()`` the
        thread before :meth:`close`.

        Args:
            name: the thread's name.

        Returns:
            the started daemon thread.

        Raises:
            RuntimeError: the loop is closed, or already running.
        """
        self._claim()  # here, not in the thread: is_running() is true at once, a 2nd call fails
        thread = threading.Thread(target=self._run_claimed, args=(True,), name=name, daemon=True)
        try:
            thread.start()
        except BaseException:
            self._running = False
            raise
        return thread

    def fileno(self) -> int:
        """Return an fd readable whenever the loop has I/O or a wake-up. Tier: host select.

        Thread-safe. It is the selector's own fd (epoll, kqueue); the wake-up socket is registered
        in it, so :meth:`call_soon_threadsafe` makes it readable too.

        Raises:
            RuntimeError: the selector has no fd of its own (select, poll), or the loop is closed.
        """
        fileno = getattr(self._selector, "fileno", None)
        if fileno is None:
            raise RuntimeError(
                "%s has no file descriptor of its own: the external select tier needs an epoll "
                "or kqueue selector" % type(self._selector).__name__
            )
        self._check_open()
        return int(fileno())

    def next_timeout(self) -> Optional[float]:
        """Return how long a host's ``select()`` may wait. Tier: host select; not thread-safe.

        Returns:
            ``0.0`` if callbacks are queued, else the seconds to the next timer (never negative),
            else ``None``: wait until :meth:`fileno` is readable. ``None`` is also the answer of
            a loop with nothing left to do, whose :meth:`fileno` only another thread can wake:
            check :meth:`has_work` first, and stop waiting when it is false.
        """
        return self._select_timeout(None)

    def has_work(self) -> bool:
        """Return whether anything is left to do. Tiers: own ``while`` loop, host select.

        Work is a watched handler (a feed's socket), a live timer (a backoff, a watchdog) or a
        queued callback: what keeps :meth:`run` going. False once every consumer on the loop
        has stopped (a 404, ``stop()``, a ``limit``): a host driving the loop by hand ends its
        own loop then (and looks at each consumer's ``error``), instead of waiting in
        ``select()`` on a :meth:`fileno` that nothing will make readable. A handler parked
        without interest counts (a paused feed: it waits to be resumed), as for :meth:`run`. A
        closed loop has none. Loop thread
        only; not thread-safe.
        """
        return not self._closed and self._has_work()

    def stop(self) -> None:
        """Make :meth:`run` return after the current pass. Any tier; thread-safe; idempotent.

        From another thread the request goes through :meth:`call_soon_threadsafe`, behind the
        work that thread queued before it: ``consumer.stop(); loop.stop()`` stops the consumer
        first. On a closed loop it does nothing.
        """
        if self._owner == threading.get_ident():
            self._stopping = True
            return
        try:
            self.call_soon_threadsafe(self._set_stopping)
        except RuntimeError:
            pass  # closed: nothing to stop

    def _set_stopping(self) -> None:
        self._stopping = True

    def is_running(self) -> bool:
        """Return whether a run method is in progress. Thread-safe."""
        return self._running

    def in_loop_thread(self) -> bool:
        """Return whether the caller is inside one of this loop's run methods. Thread-safe.

        Code that may be called from anywhere uses this to choose between acting at once and
        going through :meth:`call_soon_threadsafe`.
        """
        return self._owner == threading.get_ident()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called. Thread-safe."""
        return self._closed

    def close(self) -> None:
        """Close the selector and the wake-up sockets; drop timers and callbacks. Idempotent.

        The handlers' file objects are not closed: they belong to whoever added them.

        Raises:
            RuntimeError: the loop is running.
        """
        if self._owner is not None and self._owner == threading.get_ident() and not self._closed:
            raise RuntimeError("cannot close a running loop: stop() it and let run() return")
        with self._state_lock:
            if self._closed:
                return
            if self._running:
                raise RuntimeError("cannot close a running loop: stop() it and let run() return")
            self._closed = True
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        # A handle its owner still holds (a consumer's connect timer, a timing wheel's timer)
        # lets go of its callback too: whatever the callback would have kept alive, and any
        # cycle through it, goes with the loop, without waiting for the cycle collector.
        for _, _, timer in self._timers:
            timer._drop()
        for handle in self._ready:
            handle._drop()
        self._timers.clear()
        self._cancelled_timers = 0
        self._ready.clear()
        self._parked.clear()

    def __del__(self) -> None:
        # A loop dropped without close() (a Consumer's private loop, say) releases its selector
        # and wake-up sockets quietly instead of leaving them to ResourceWarnings.
        try:
            if not getattr(self, "_running", False):
                self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._running else "idle"
        handlers = 0 if self._closed else len(self._selector.get_map()) - 1 + len(self._parked)
        return "<Loop %s handlers=%d timers=%d ready=%d>" % (
            state,
            handlers,
            len(self._timers) - self._cancelled_timers,
            len(self._ready),
        )

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the loop is closed")

    def _claim(self) -> None:
        # Inside a run, or inside call_threadsafe(): refused at once (the lock is held). None is
        # tested first: the usual case, and a thread id compare costs a heartbeat 2% otherwise.
        if self._owner is not None and self._owner == threading.get_ident():
            raise RuntimeError("the loop is already running")
        with self._state_lock:
            self._check_open()
            if self._running:
                raise RuntimeError("the loop is already running")
            self._running = True

    def _run_claimed(self, forever: bool) -> None:
        self._owner = threading.get_ident()
        try:
            while not self._stopping and (forever or self._has_work()):
                self._pass(None)
        finally:
            self._owner = None
            self._stopping = False
            self._running = False

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # buffer full: wake-ups are already pending, and the reader drains them all
        except OSError:
            if not self._closed:
                raise  # else closed meanwhile: nobody is left to wake

    def _has_work(self) -> bool:
        # Asked before every pass of run(): the cheap tests first, as a loop of feeds nearly
        # always has a live timer; counting handlers costs three calls into selectors.
        if self._ready or len(self._timers) > self._cancelled_timers:
            return True
        # More than the wake-up socket, or a handler parked without interest: its owner means
        # to come back to it (a paused feed, resumed from another thread), so it is work too.
        return len(self._selector.get_map()) > 1 or bool(self._parked)

    def _key(self, fileobj: FileLike) -> Optional[selectors.SelectorKey]:
        try:
            return self._selector.get_key(fileobj)
        except (KeyError, ValueError):
            return None

    def _handler_of(self, fileobj: FileLike) -> Optional[Handler]:
        key = self._key(fileobj)
        handler: Optional[Handler] = self._parked.get(fileobj) if key is None else key.data
        return handler

    def _still_wants(self, key: selectors.SelectorKey, event: int) -> bool:
        # An earlier handler of this batch changed this file object's registration (removed it,
        # replaced its handler or its interest): ask the selector's map what holds now.
        current = self._selector.get_map().get(key.fd)
        return current is not None and current.data is key.data and bool(current.events & event)

    def _handler_failed(self, key: selectors.SelectorKey, exc: Exception) -> None:
        handler: Handler = key.data
        try:
            handler.handle_error(exc)
        except Exception:
            logger.exception("%r raised in handle_error; removing it", handler)
            if self._handler_of(key.fileobj) is handler:
                self.remove_handler(key.fileobj)

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        # Cancellation is lazy (a flag), so cancel() is O(1) and never searches the heap. But a
        # watchdog re-armed on every row would leave a trail of dead entries: rebuild the heap
        # once they are over half of it, keeping it O(live timers) at amortised O(1) per cancel.
        if self._cancelled_timers * 2 > len(self._timers):
            self._timers[:] = [entry for entry in self._timers if not entry[2]._cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def _select_timeout(self, timeout: Optional[float]) -> Optional[float]:
        if self._ready:
            return 0.0
        timers = self._timers
        while timers and timers[0][2]._cancelled:  # lazy cancellation: drop dead heads here
            heapq.heappop(timers)
            self._cancelled_timers -= 1
        if not timers:
            return timeout
        wait = timers[0][0] - self.time()
        if wait <= 0.0:
            return 0.0
        return wait if timeout is None or wait < timeout else timeout

    def _pass(self, timeout: Optional[float]) -> None:
        # Every pass runs this, and on a loop of many idle feeds nearly every pass is one
        # readiness event (a heartbeat): the dispatch is written out here, not in helpers.
        ready_count = len(self._ready)  # only callbacks queued before this pass run in it
        timers = self._timers
        if ready_count or not timers or timers[0][2]._cancelled:
            timeout = self._select_timeout(timeout)
        else:  # the usual case, written out: wait until the live timer at the head is due
            wait = timers[0][0] - self.time()
            if wait <= 0.0:
                timeout = 0.0
            elif timeout is None or wait < timeout:
                timeout = wait
        touched = self._touched  # file objects (re)registered since this batch was selected
        if touched:
            touched.clear()
        for key, mask in self._selector.select(timeout):
            # mask is already what the key asked for; only a key that an earlier handler of
            # this batch touched may be stale (removed, re-registered, interest changed).
            try:
                if mask & _READ and (
                    not touched or key.fd not in touched or self._still_wants(key, _READ)
                ):
                    key.data.handle_read()
                if mask & _WRITE and (
                    not touched or key.fd not in touched or self._still_wants(key, _WRITE)
                ):
                    key.data.handle_write()
            except Exception as exc:
                self._handler_failed(key, exc)
        if timers and timers[0][0] <= self.time():
            self._run_due_timers()
        if ready_count:
            self._run_ready(ready_count)

    def _run_due_timers(self) -> None:
        # Pop every due timer before running any (as pika does): all see the same "now", and a
        # timer that schedules another due one (call_later(0)) cannot stretch this pass forever.
        now = self.time()
        timers = self._timers
        due: List[TimerHandle] = []
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            if handle._cancelled:
                self._cancelled_timers -= 1
            else:
                handle._in_heap = False
                due.append(handle)
        for index, handle in enumerate(due):
            if handle._cancelled:
                continue  # cancelled by an earlier timer of this batch
            try:
                handle._run()
            except BaseException:  # KeyboardInterrupt: keep the rest for the next pass
                self._ready.extendleft(reversed(due[index + 1 :]))
                raise

    def _run_ready(self, count: int) -> None:
        ready = self._ready
        for _ in range(count):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()
