"""What the consumers of one loop share: the connect gate, the watchdogs' wheel, counts by state.

Each is kept per loop in a registry that is weak on the loop's side, so a loop that goes lets
go of what its consumers shared; the loop itself knows nothing of them (it knows no CouchDB).
"""

import collections
import weakref
from typing import Any, Callable, Deque, Iterable, Optional, Set

from ._policy import WATCHDOG_RESOLUTION
from ._wheel import DeadlineWheel
from .loop import Loop

__all__ = [
    "ConnectGate",
    "gate_of",
    "watchdogs_of",
    "no_wheel",
    "counts_of",
    "Watchdogs",
    "BLOCKING",
]

#: The consumer whose ``wait()`` runs each loop, if one does: a loop runs once at a time, so
#: this is the loop's, not a flag on every consumer (8 bytes a feed).
BLOCKING: "weakref.WeakKeyDictionary[Loop, Any]" = weakref.WeakKeyDictionary()

class ConnectGate:
    """The consumers of one loop holding a turn to connect, and those waiting for one, in order."""

    __slots__ = ("connecting", "waiting", "__weakref__")

    def __init__(self) -> None:
        self.connecting: Set[Any] = set()
        self.waiting: Deque[Any] = collections.deque()


#: One gate per loop, kept as long as the loop lives.
_GATES: "weakref.WeakKeyDictionary[Loop, ConnectGate]" = weakref.WeakKeyDictionary()

Watchdogs = DeadlineWheel[Any]
#: The watchdogs of each loop's consumers on one timing wheel (see _wheel): re-arming one is
#: O(1), where a heap timer per consumer cost O(log n) comparisons on cold memory. Only the loop's
#: pending timer keeps a wheel alive; this registry and the consumers refer to it weakly. The
#: wheel holds the consumers themselves, as the loop's selector does while they stream, so a loop
#: closed (its timers dropped) or dropped lets go of its wheel, and the wheel of its consumers.
_WATCHDOGS: "weakref.WeakKeyDictionary[Loop, weakref.ReferenceType[Watchdogs]]" = (
    weakref.WeakKeyDictionary()
)


def no_wheel() -> Optional[Watchdogs]:
    """A consumer's wheel reference before it armed a watchdog: like a dead weak reference."""
    return None


def watchdogs_of(loop: Loop, on_due: Callable[[Any], None]) -> Watchdogs:
    """The wheel of ``loop``'s watchdogs (made on first use, calling ``on_due(consumer)``)."""
    ref = _WATCHDOGS.get(loop)
    wheel = None if ref is None else ref()
    if wheel is None:
        wheel = DeadlineWheel(loop, on_due, WATCHDOG_RESOLUTION)
        _WATCHDOGS[loop] = weakref.ref(wheel)
    return wheel


#: How many of each loop's consumers are in each state, for Loop.stats() (kept per transition).
_COUNTS: "weakref.WeakKeyDictionary[Loop, collections.Counter[str]]" = weakref.WeakKeyDictionary()


def counts_of(loop: Loop, shown: Iterable[str]) -> "collections.Counter[str]":
    """How many of ``loop``'s consumers are in each state; ``loop.stats()["feeds"]`` shows the
    ``shown`` states (in that order) that have any."""
    counts = _COUNTS.get(loop)
    if counts is None:
        counts = _COUNTS[loop] = collections.Counter()
        order = tuple(shown)
        loop.add_stats_source("feeds", lambda: {s: counts[s] for s in order if counts[s] > 0})
    return counts


def gate_of(loop: Loop) -> ConnectGate:
    """The connect gate of ``loop``'s consumers (made on first use)."""
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = ConnectGate()
    return gate
