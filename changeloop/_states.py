"""One continuous feed as an explicit state machine: its states, their deadlines, one failure route.

Theory of operation
-------------------
A consumer following a continuous feed is always in exactly one of these states::

                start                turn                connected           sent
    idle/stopped ───▶ waiting ─────────────▶ connecting ─────────▶ sending ───────▶ awaiting
                        ▲                        ▲                                   │    │
                        │ retry                  │ resolved (since=now answered)     │    │
                        │                        └───────────────────────────────────┘    │
                     backoff ◀──── fail (retryable), end (the server ended the feed) ─┐    │ head
                        │                                                             │    ▼
                        └── stop, or fail (fatal), from any state ──▶ stopped     streaming

``waiting`` waits for a turn at the loop's connect gate (at most
``MAX_CONNECTING_PER_LOOP`` consumers of a loop connect at once). ``connecting`` covers name
resolution (by worker threads, :mod:`changeloop._resolve`), TCP, a proxy's ``CONNECT`` and TLS;
``sending`` writes the request; ``awaiting`` waits for the status line
and headers (for the ``since=now`` question, for its whole answer); ``streaming`` reads the feed.
Every way out of a connection is ``fail`` or ``end``, both of which go through ``backoff`` (with
no delay for a feed that ran its course), so reconnecting is one path, not several.

Each state owns one deadline, armed when the state is entered and disarmed when it is left:

=============  ==============================================================================
state          deadline
=============  ==============================================================================
idle, stopped  none
waiting        none: its turn comes when another consumer of the loop leaves the gate
connecting     ``min(connect_timeout, allowance)`` of silence
sending        the silence allowance (a server that stops reading)
awaiting       the silence allowance (a ``first_byte_timeout``, if one is given, until the
               first line of the body)
streaming      the silence allowance: ``watchdog_heartbeats`` heartbeats, or without
               heartbeats the server's own ``timeout`` plus that margin; none while paused
               (``pause()``: the socket is not read, so TCP holds the server back)
backoff        the backoff delay; then ``retry``
=============  ==============================================================================

The connection phases' deadlines are silence deadlines, kept on the loop's timing wheel
(:mod:`changeloop._wheel`): every read or write notes the time, and the wheel's check fires at most
once per allowance, whatever the traffic. The backoff is a plain loop timer.

Every entry from the loop is guarded: the handler (``handle_read``), the re-read of bytes that
TLS holds, the watchdog, the backoff timer, the resolver's answer, the connect gate's turn and a
start posted from another thread all catch what they raise
and hand it to :meth:`_Follow._fail`, the one failure route, which reconnects after a backoff or
stops for good. Nothing is only logged. Requests from other threads (``start``, ``stop``,
``pause``, ``resume``) reach the state only through
:meth:`~changeloop.loop.Loop.call_threadsafe`. A transition missing from ``TRANSITIONS`` is a
bug: it raises, and so stops the consumer through the same route. The policy (timings, which
failures are retried, when to give up) is :mod:`changeloop._policy`.
"""

from typing import Dict, FrozenSet, Tuple

__all__ = [
    "STATES",
    "TRANSITIONS",
    "CONNECTED_STATES",
    "GATED_STATES",
    "IDLE",
    "WAITING",
    "CONNECTING",
    "SENDING",
    "AWAITING",
    "STREAMING",
    "BACKOFF",
    "STOPPED",
]

IDLE, WAITING, CONNECTING, SENDING, AWAITING, STREAMING, BACKOFF, STOPPED = STATES = (
    "idle",
    "waiting",
    "connecting",
    "sending",
    "awaiting",
    "streaming",
    "backoff",
    "stopped",
)
#: The states of an open connection, each with a silence deadline on the watchdog wheel.
CONNECTED_STATES: FrozenSet[str] = frozenset([CONNECTING, SENDING, AWAITING, STREAMING])
#: The states that hold a turn at the loop's connect gate.
GATED_STATES: FrozenSet[str] = frozenset([CONNECTING, SENDING, AWAITING])
#: Where ``stop`` and a fatal ``fail`` lead from: every state but the two at rest.
_ACTIVE = (WAITING, CONNECTING, SENDING, AWAITING, STREAMING, BACKOFF)

#: (state, event) -> the next state. Nothing else may happen.
TRANSITIONS: Dict[Tuple[str, str], str] = {
    (IDLE, "start"): WAITING,
    (STOPPED, "start"): WAITING,
    (WAITING, "turn"): CONNECTING,
    (CONNECTING, "connected"): SENDING,
    (SENDING, "sent"): AWAITING,
    (AWAITING, "head"): STREAMING,
    (AWAITING, "resolved"): CONNECTING,  # since=now answered: follow from there, same turn
    (STREAMING, "end"): BACKOFF,  # the server ended the feed: follow on
    (BACKOFF, "retry"): WAITING,
}
for _state in _ACTIVE:
    TRANSITIONS[(_state, "stop")] = STOPPED
    if _state != BACKOFF:
        TRANSITIONS[(_state, "fail")] = BACKOFF
