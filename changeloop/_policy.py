"""A continuous feed's policy: its timings, which failures are retried, when to give up.

Numbers with their reasons, and the few decisions made from them, apart from the state machine
that applies them (:mod:`changeloop._follow`): a reader checks the policy here in one place, and
the defaults are the product (tests never tune them away).
"""

import random
from typing import FrozenSet, Optional, Tuple

from .errors import (
    CallbackError,
    ChangeloopError,
    GaveUpError,
    HTTPError,
    LineTooLongError,
    TLSError,
)

__all__ = [
    "RECONNECT_BASE_S",
    "RECONNECT_CAP_S",
    "HEALTHY_AFTER_S",
    "WATCHDOG_HEARTBEATS",
    "CONNECT_TIMEOUT_S",
    "QUICK_END_S",
    "WATCHDOG_RESOLUTION",
    "MAX_CONNECTING_PER_LOOP",
    "RETRY_STATUSES",
    "is_fatal",
    "backoff_delay",
    "gave_up",
]

#: Backoff before reconnecting: a random delay in [0, min(cap, base * 2**attempt)] seconds.
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 60.0
#: A connection that stayed up this long, or delivered a change, resets the backoff to its base.
HEALTHY_AFTER_S = 30.0
#: Silence, in heartbeats, after which a connection is declared dead: one lost heartbeat is
#: normal jitter, three in a row is a dead peer or a half-open connection.
WATCHDOG_HEARTBEATS = 3.0
#: The longest a connection may take to connect (TCP and TLS), if the heartbeat allowance is
#: longer still.
CONNECT_TIMEOUT_S = 30.0
#: A feed that the server ends cleanly (with ``last_seq``) sooner than this after it opened, and
#: with no change, is followed again only after a backoff, as after a failure: reconnecting at
#: once would spin against ``timeout=0`` or a proxy that cuts every response short.
QUICK_END_S = 1.0
#: How late a watchdog may notice a dead connection: its deadlines are rounded up to this.
WATCHDOG_RESOLUTION = 0.1
#: How many consumers of one loop may be connecting at once (TCP, TLS, the request, the response
#: head, and the since=now question); the others wait their turn, in order. Starting 10,000
#: feeds would otherwise open 10,000 connections in one pass: the server's listen backlog
#: overflows (dropped SYNs are retried a second later), CouchDB gets a thundering herd, and the
#: short-lived objects of 10,000 simultaneous connections fragment the heap for good (about 2 KB
#: of resident memory per feed, measured by benchmarks/bench_scale.py).
MAX_CONNECTING_PER_LOOP = 100

#: Statuses that say "try again later": 408, 425, 429 and the 5xx family but for 501 and 505,
#: which say the request will never work. Every other status (a 3xx: CouchDB never redirects
#: ``_changes``; a 4xx: the request is wrong or not allowed) stops the consumer.
RETRY_STATUSES: FrozenSet[int] = frozenset(
    [408, 425, 429] + [s for s in range(500, 600) if s not in (501, 505)]
)
#: The backoff jitter's random source when none is given: one for all consumers, since a
#: ``random.Random`` holds a 2.5 KB Mersenne Twister state, more than the rest of an idle feed.
_SHARED_RNG = random.Random()


def is_fatal(exc: BaseException) -> bool:
    """Whether a feed stops for good on ``exc`` rather than reconnecting after a backoff."""
    if isinstance(exc, HTTPError):
        return exc.status not in RETRY_STATUSES
    if isinstance(exc, (TLSError, LineTooLongError, CallbackError)):
        return True
    return not isinstance(exc, ChangeloopError)  # a bug of ours, not the network's: don't spin


#: The give-up policy ``(max_retries, max_outage)`` of a consumer that retries for ever: one
#: tuple shared by every such consumer.
RETRY_FOREVER: Tuple[Optional[int], Optional[float]] = (None, None)


def backoff_delay(rng: random.Random, base: float, cap: float, attempt: int) -> float:
    """Full-jitter exponential backoff: a random delay in ``[0, min(cap, base * 2**attempt)]``.

    Full jitter spreads the reconnections of thousands of feeds after a server restart over the
    whole window, where equal or no jitter would have them arrive together.
    """
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 32))))


def gave_up(
    exc: BaseException,
    attempts: int,
    outage: float,
    max_retries: Optional[int],
    max_outage: Optional[float],
) -> Optional[GaveUpError]:
    """The error to stop with if the give-up policy says so after failure ``exc`` (the
    ``attempts``-th failed attempt in a row, ``outage`` seconds since a healthy connection)."""
    if (max_retries is None or attempts <= max_retries) and (
        max_outage is None or outage < max_outage
    ):
        return None
    error = GaveUpError(
        "gave up after %d failed attempts in a row and %.1f s without a healthy connection; "
        "the last: %s" % (attempts, outage, exc),
        attempts=attempts,
        outage=outage,
    )
    error.__cause__ = exc
    return error
