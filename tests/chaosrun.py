"""The chaos harness: consumers on one loop, each through a fault proxy of its own, and the rules.

A chaos run is several consumers following a feed that a writer keeps growing, all on one
:class:`~changeloop.Loop`, each through its own :class:`~faultproxy.FaultProxy`: their faults
overlap in time (fifty in ten seconds rather than one after the other), and every fault belongs
to one consumer, the proxy's connection ``i`` being the consumer's connection ``i + 1``.

The consumers keep the library's defaults; only ``heartbeat``, a CouchDB parameter, is asked
for. What they are held to is the library's contract with those defaults (issue 14):

* no phase of a connection stays silent longer than ``WATCHDOG_HEARTBEATS`` heartbeats before
  the connection is replaced (noticed up to ``WATCHDOG_LATE_S`` later);
* a reconnection resumes after the last delivered change, after a full-jitter backoff of at most
  ``RECONNECT_BASE_S * 2**n`` for the n-th failure in a row, the count starting again once a
  connection has delivered a change.

:func:`alternating_plan` breaks every connection: even ones before any row (in the request,
before the head, inside the status line or the headers, between head and body), odd ones in the
body once a few rows went through whole. So after any fault at most one more connection delivers
nothing, and the worst time from a fault to the next delivered change is bounded by
:data:`GAP_BOUND_S`. The run stops as soon as a consumer has waited longer than that (the bound
is broken already), so a stalled library fails in seconds, not at the suite's timeout.
"""

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from faultproxy import BREAKING_KINDS, Fault, FaultProxy, FaultRecord

from changeloop import Consumer, Database, FeedEvent, Loop

__all__ = [
    "GAP_BOUND_S",
    "HEARTBEAT_MS",
    "Delivery",
    "Follower",
    "Key",
    "alternating_plan",
    "body_fault",
    "delivery_problems",
    "phase_fault",
    "run_until",
    "seq_number",
]

#: Asked of the server (a CouchDB parameter, in ms): the only setting a chaos consumer gets.
HEARTBEAT_MS = 500
# -- the library's contract with its defaults (issue 14), not settings: nothing passes them on --
#: Silence allowed in any phase of a connection, in heartbeats.
WATCHDOG_HEARTBEATS = 3
#: The watchdog's resolution: a silence is noticed up to this much later.
WATCHDOG_LATE_S = 0.1
#: The backoff's base: the n-th failure in a row (0 first) waits up to this times 2**n.
RECONNECT_BASE_S = 0.1
#: The longest a stalled connection goes unnoticed.
SILENCE_NOTICED_S = HEARTBEAT_MS / 1000 * WATCHDOG_HEARTBEATS + WATCHDOG_LATE_S
#: Connect, send the request and receive the first row of a reconnection on loopback: the
#: servers answer in milliseconds; this is slack for a 2-core machine shared by other runs.
LATENCY_S = 0.5
#: The worst time from a fault to the next change delivered on a later connection, by the plan:
#: a body fault noticed late, its backoff (attempt 0), a next connection broken before any row
#: and noticed late, its backoff (attempt 1), then a connection that delivers.
GAP_BOUND_S = 2 * SILENCE_NOTICED_S + RECONNECT_BASE_S * (1 + 2) + 2 * LATENCY_S
#: How often the test's thread looks at the run between loop passes.
PASS_S = 0.05

#: A delivered change as the checks see it: (seq, id, rev).
Key = Tuple[Any, str, Optional[str]]


def seq_number(seq: Any) -> int:
    """pouchdb-server's seqs are integers; CouchDB 2+'s start with an increasing number."""
    if isinstance(seq, int):
        return seq
    return int(str(seq).split("-", 1)[0])


def change_key(change: Dict[str, Any]) -> Key:
    revs = change.get("changes") or [{}]
    return change["seq"], change["id"], revs[0].get("rev")


# -- the plan ------------------------------------------------------------------------------------

#: Where a fault before any row lands, and how often (stalls in the head weigh most: only a
#: watchdog notices them).
PHASES = ("request", "before_head", "status_line", "headers", "head_end")


def phase_fault(rng: random.Random) -> Fault:
    """A fault before the first row: the connection delivers nothing."""
    kind = rng.choices(BREAKING_KINDS, weights=(2, 2, 5))[0]  # cut, reset, stall
    phase = rng.choice(PHASES)
    if phase == "request":  # every request line is longer than 40 bytes
        return Fault(kind, after=rng.randint(0, 40), side="request")
    if phase == "before_head":  # the whole request went; the server's answer does not come back
        return Fault(kind)
    if phase == "status_line":  # "HTTP/1.1 200 OK\r\n" is 17 bytes
        return Fault(kind, after=rng.randint(1, 14))
    if phase == "headers":
        return Fault(kind, after=rng.randint(17, 60), inside="headers")
    return Fault(kind, inside="chunk_size")  # the head came, the body's first chunk-size did not


def body_fault(rng: random.Random) -> Fault:
    """A fault in the body once one to three rows went through whole: the connection delivers."""
    kind = rng.choices(BREAKING_KINDS, weights=(4, 1, 4))[0]
    # A heartbeat is one byte: no fault fits strictly inside it; the CRLF after a chunk is two.
    inside = rng.choice((None, "json_line", "chunk_size", "chunk_crlf"))
    return Fault(kind, after=rng.randint(0, 1500), inside=inside, after_rows=rng.randint(1, 3))


def alternating_plan(rng: random.Random, index: int) -> Fault:
    """Every connection breaks: even ones before any row, odd ones after some."""
    return phase_fault(rng) if index % 2 == 0 else body_fault(rng)


# -- a consumer and its proxy --------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One change handed to the callback."""

    at: float  # time.monotonic()
    connection: int  # the consumer's connection number, 1 for the first
    key: Key


class Follower:
    """A consumer with the defaults, through its own proxy, recording what it delivers and when.

    Args:
        index: names it in reports.
        proxy: the proxy its server URL points at, used by nothing else.
        db: the database to follow, on a ``Server`` whose URL is the proxy's.
        loop: the loop it shares with the other followers.
    """

    def __init__(self, index: int, proxy: FaultProxy, db: Database, loop: Loop) -> None:
        self.index = index
        self.proxy = proxy
        self.deliveries: List[Delivery] = []
        self.keys: Set[Key] = set()
        self.errors: Dict[str, int] = {}
        self.first_of_connection: Dict[int, float] = {}  # connection -> first delivery's time
        self.consumer = Consumer(db, loop, on_error=self._on_error)

    def __repr__(self) -> str:
        return f"<Follower #{self.index} {self.consumer!r} {self.proxy!r}>"

    def start(self) -> None:
        self.consumer.start(self._on_change, since=0, heartbeat=HEARTBEAT_MS)

    def _on_change(self, change: Dict[str, Any]) -> None:
        now = time.monotonic()
        connection = self.consumer.connections
        key = change_key(change)
        self.deliveries.append(Delivery(now, connection, key))
        self.keys.add(key)
        self.first_of_connection.setdefault(connection, now)

    def _on_error(self, event: FeedEvent) -> None:
        name = type(event.error).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def next_change_after(self, record: FaultRecord) -> Optional[float]:
        """When a change was first delivered on a connection after the one ``record`` broke."""
        broken = record.connection + 1  # the proxy counts from 0, the consumer from 1
        times = [at for number, at in self.first_of_connection.items() if number > broken]
        return min(times) if times else None

    def gaps(self, now: float) -> List[Tuple[float, FaultRecord, bool]]:
        """Per fault: seconds to the next delivered change (or so far), and whether it came."""
        result = []
        for record in self.proxy.records:
            answered = self.next_change_after(record)
            result.append(((answered or now) - record.at, record, answered is not None))
        return result

    def answered(self) -> bool:
        """Healed, and a change came after every fault."""
        return self.proxy.healed and all(came for _, _, came in self.gaps(time.monotonic()))

    def check(self, expected: Set[Key], replays: bool) -> List[str]:
        """What is wrong with the deliveries (see :func:`delivery_problems`), and whether every
        connection it made went through its proxy (which the fault times rely on)."""
        problems = delivery_problems(self.deliveries, expected, replays)
        if self.proxy.connections != self.consumer.connections:
            problems.append(
                f"{self.consumer.connections} connections made, {self.proxy.connections} proxied"
            )
        return problems

    def duplicates(self) -> int:
        return len(self.deliveries) - len(self.keys)

    def summary(self) -> str:
        worst = max((gap for gap, _, _ in self.gaps(time.monotonic())), default=0.0)
        return (
            f"#{self.index}: {len(self.proxy.records)} faults, {self.consumer.connections} "
            f"connections, {len(self.deliveries)} delivered ({self.duplicates()} again), worst "
            f"gap {worst:.2f} s, "
            f"errors {self.errors}"
        )


def delivery_problems(deliveries: List[Delivery], expected: Set[Key], replays: bool) -> List[str]:
    """What is wrong with one consumer's deliveries, at most five things.

    Every expected change must be there; a change seen for the first time must come after every
    earlier one (seqs increase); a change seen again must come on a later connection than its
    first delivery (a resume), and only if the server ``replays`` on a resume at all.
    """
    problems = []
    missing = expected - {delivery.key for delivery in deliveries}
    if missing:
        problems.append(f"{len(missing)} changes never delivered, e.g. {sorted(missing)[:3]}")
    first_connection: Dict[Key, int] = {}
    highest = -1
    for delivery in deliveries:
        number = seq_number(delivery.key[0])
        if delivery.key in first_connection:
            if delivery.connection <= first_connection[delivery.key] or not replays:
                problems.append(f"delivered again: {delivery}")
        elif number <= highest:
            problems.append(f"out of order: {delivery} after seq {highest}")
        else:
            first_connection[delivery.key] = delivery.connection
            highest = number
    return problems[:5]


def run_until(
    loop: Loop,
    followers: List[Follower],
    condition: Callable[[], bool],
    deadline: float,
    give_up_after: float,
) -> Optional[str]:
    """Run the loop until ``condition()``; return why it stopped otherwise.

    It stops early when a consumer stopped, or has waited longer than ``give_up_after`` seconds
    for a change after a fault: past the bound the test holds it to, waiting only costs time.
    """
    while not condition():
        now = time.monotonic()
        if now >= deadline:
            return "the deadline passed"
        for follower in followers:
            if not follower.consumer.running:
                return f"consumer #{follower.index} stopped: {follower.consumer.error!r}"
            for gap, record, came in follower.gaps(now):
                if not came and gap > give_up_after:
                    return (
                        f"consumer #{follower.index} has had no change for {gap:.1f} s since "
                        f"a {record.kind} at byte {record.offset} ({record.region}) of its "
                        f"connection {record.connection + 1}"
                    )
        loop.run_once(PASS_S)
    return None


def worst_gap(followers: List[Follower]) -> Tuple[float, str]:
    """The worst time from a fault to the next delivered change, and which fault it was."""
    now = time.monotonic()
    worst, where = 0.0, "no fault"
    for follower in followers:
        for gap, record, _ in follower.gaps(now):
            if gap >= worst:
                worst = gap
                where = (
                    f"consumer #{follower.index}, a {record.kind} in {record.region} of "
                    f"connection {record.connection + 1}"
                )
    return worst, where


def fault_mix(followers: List[Follower]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """All followers' faults by kind, and by phase (the request, before or in the head, body)."""
    kinds: Dict[str, int] = {}
    phases: Dict[str, int] = {}
    for follower in followers:
        for record in follower.proxy.records:
            kinds[record.kind] = kinds.get(record.kind, 0) + 1
            phase = phase_of(record)
            phases[phase] = phases.get(phase, 0) + 1
    return kinds, phases


def phase_of(record: FaultRecord) -> str:
    """``request``, ``before head``, ``head``, ``before the first row`` or ``body``."""
    if record.region == "request":
        return "request"
    if record.region == "start":
        return "before head"
    if record.region.startswith("headers"):  # inside the head, or right at its end
        return "head" if record.region == "headers" else "before the first row"
    return "body" if record.rows else "before the first row"
