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

Where the parts live: this module is the loop's public face; :mod:`changeloop._dispatch` is the
pass itself (the dispatch, the timer heap, the ready queue) and :mod:`changeloop._handles` the
objects the loop holds (the handler protocol, the handles, the wake-up handler).
"""

import collections
import heapq
import itertools
import selectors
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from ._dispatch import Dispatcher
from ._handles import FileLike, Handle, Handler, TimerHandle, _Waker

__all__ = ["Handler", "Handle", "TimerHandle", "Loop"]


def _events(read: bool, write: bool) -> int:
    return (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)


class Loop(Dispatcher):
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
