"""One pass of the loop: wait in the selector, dispatch readiness, fire due timers, run callbacks.

:class:`Dispatcher` is the part of :class:`~changeloop.loop.Loop` that every pass runs: the
dispatch over a selected batch (with the stale-key check for file objects an earlier handler of
the batch touched), a failing handler's route to its own ``handle_error``, the timer heap's lazy
cancellation and its due timers, and the ready queue. The loop's state (the selector, the heap,
the queue, the parked handlers) is built and owned by ``Loop``; this class only declares what it
reads. Why a separate class: loop.py stays the loop's public face (registration, scheduling, the
run tiers, the one thread-safe door, closing) at a readable length.
"""

import heapq
import logging
import selectors
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from ._handles import FileLike, Handle, Handler, TimerHandle

__all__ = ["Dispatcher"]

# The loop's logger (changeloop.loop, or the vendored package's own), not this module's.
logger = logging.getLogger(__name__.rpartition(".")[0] + ".loop")

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Dispatcher:
    """The passes of a :class:`~changeloop.loop.Loop`, which builds the state declared here."""

    time: Callable[[], float]
    _selector: selectors.BaseSelector
    _timers: List[Tuple[float, int, TimerHandle]]
    _cancelled_timers: int
    _ready: Deque[Handle]
    _parked: Dict[FileLike, Handler]
    _touched: Set[int]
    remove_handler: Callable[[FileLike], None]

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
