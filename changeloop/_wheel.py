"""Deadlines for many objects on one loop timer: a timing wheel for watchdogs.

A feed's watchdog is a deadline that is pushed back far more often than it passes: every few
heartbeats, on every feed. As a heap timer each push costs a pop and a push through a heap as
large as the number of feeds, each step a comparison on memory no other feed touched lately;
at 10,000 feeds that was a quarter of a loop's idle CPU (benchmarks/RESULTS.md). Here a
deadline is rounded up to a slot of ``resolution`` seconds and setting it is a set insertion,
O(1) whatever the number of feeds (Varghese and Lauck's timing wheel, as in Netty's
``HashedWheelTimer``); one loop timer waits for the earliest slot that holds anything.

The price is precision: a deadline is met up to ``resolution`` late, never early. The module
knows nothing of feeds: it calls back with the objects whose slot came.
"""

import heapq
import math
from typing import Callable, Dict, Generic, Hashable, List, Optional, Set, TypeVar

from .loop import Loop, TimerHandle

__all__ = ["DeadlineWheel"]

T = TypeVar("T", bound=Hashable)


class DeadlineWheel(Generic[T]):
    """Objects with a deadline each; ``on_due(item)`` is called once the item's deadline passed.

    Loop thread only, like the loop's handlers. An item has at most one deadline: setting it
    again moves it, :meth:`discard` removes it, and an item is removed before ``on_due`` runs
    (which may set a new deadline for it).

    Args:
        loop: the loop whose clock and timer it uses.
        on_due: called with each item whose deadline passed.
        resolution: the slot width in seconds: deadlines are met up to this late.
    """

    __slots__ = (
        "_floor",
        "_loop",
        "_on_due",
        "_resolution",
        "_slot_of",
        "_slots",
        "_starts",
        "_timer",
        "_timer_slot",
        "__weakref__",
    )

    def __init__(self, loop: Loop, on_due: Callable[[T], None], resolution: float = 0.1) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self._loop = loop
        self._on_due = on_due
        self._resolution = resolution
        self._slots: Dict[int, Set[T]] = {}  # slot number -> its items
        self._slot_of: Dict[T, int] = {}  # item -> its slot number
        self._starts: List[int] = []  # a heap of slot numbers with items (and some emptied)
        self._timer: Optional[TimerHandle] = None  # set for the earliest slot in _starts
        self._timer_slot = 0  # the slot the timer is for (while there is one)
        self._floor = 0  # while firing: the first slot not due in this firing

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, item: object) -> bool:
        return item in self._slot_of

    def __repr__(self) -> str:
        return "<DeadlineWheel items=%d slots=%d resolution=%gs>" % (
            len(self._slot_of),
            len(self._slots),
            self._resolution,
        )

    def deadline(self, item: T) -> Optional[float]:
        """When ``item``'s slot comes (its deadline rounded up), or None if it has none."""
        slot = self._slot_of.get(item)
        return None if slot is None else slot * self._resolution

    def set(self, item: T, when: float) -> None:
        """Call back for ``item`` once the loop's clock reaches ``when`` (up to a slot late)."""
        slot = math.ceil(when / self._resolution)
        if slot < self._floor:
            slot = self._floor  # set from on_due, for a slot already due: the next firing
        old = self._slot_of.get(item)
        if old == slot:
            return
        if old is not None:
            self._remove(item, old)
        self._slot_of[item] = slot
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = set()
            heapq.heappush(self._starts, slot)
            if not self._floor and (self._timer is None or slot < self._timer_slot):
                self._schedule()  # earlier than the timer's slot, or no timer yet
        items.add(item)

    def discard(self, item: T) -> None:
        """Remove ``item``'s deadline, if it has one."""
        slot = self._slot_of.get(item)
        if slot is not None:
            self._remove(item, slot)
            del self._slot_of[item]
            if not self._slot_of:
                self.clear()  # nothing left to wait for: a loop's run() may return

    def clear(self) -> None:
        """Remove every deadline and the loop timer."""
        self._slots.clear()
        self._slot_of.clear()
        self._starts.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _remove(self, item: T, slot: int) -> None:
        items = self._slots[slot]
        items.discard(item)
        if not items:
            del self._slots[slot]  # its number stays in _starts until it comes up

    def _first_slot_after(self, now: float) -> int:
        # The slot whose time (slot * resolution, as _schedule computes it) is after now.
        slot = math.floor(now / self._resolution) + 1
        while slot * self._resolution <= now:
            slot += 1  # float rounding
        return slot

    def _schedule(self) -> None:
        starts = self._starts
        while starts and starts[0] not in self._slots:
            heapq.heappop(starts)  # emptied by discard() or a move
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        if starts and not loop.closed:
            self._timer_slot = starts[0]
            self._timer = loop.call_at(starts[0] * self._resolution, self._fire)

    def _fire(self) -> None:
        # One item at a time, each removed before its callback runs: whatever a callback does
        # (set or discard any item, raise), the wheel stays whole. Deadlines set meanwhile for
        # a slot already due wait for the next firing, so a callback that always sets its item
        # in the past cannot hold the loop here.
        self._timer = None
        self._floor = self._first_slot_after(self._loop.time())
        starts = self._starts
        slots = self._slots
        slot_of = self._slot_of
        on_due = self._on_due
        try:
            while starts and starts[0] < self._floor:
                slot = starts[0]
                items = slots.get(slot)
                if not items:
                    heapq.heappop(starts)
                    continue
                item = items.pop()
                if not items:
                    del slots[slot]
                    heapq.heappop(starts)
                del slot_of[item]
                on_due(item)
        finally:
            self._floor = 0
            self._schedule()
