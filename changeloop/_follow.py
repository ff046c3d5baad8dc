"""The state machine of a continuous feed at work: the loop's handler for its socket.

It runs the table of :mod:`changeloop._states` (read the theory of operation there): each
event of the loop (readiness, a deadline, the backoff's timer, a turn at the connect gate, the
resolver's answer, a request from another thread) enters through a guarded door, moves the state
along the table, and anything raised goes to :meth:`_Follow._fail`, the one failure route.
"""

import collections
import functools
import logging
import random
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._delivery import Change, _Delivery
from ._perloop import BLOCKING, Watchdogs, counts_of, gate_of, no_wheel, watchdogs_of
from ._policy import (
    MAX_CONNECTING_PER_LOOP,
    QUICK_END_S,
    RETRY_FOREVER,
    backoff_delay,
    gave_up,
    is_fatal,
)
from ._resolve import is_literal, resolver_of
from ._states import (
    AWAITING,
    BACKOFF,
    CONNECTED_STATES,
    CONNECTING,
    GATED_STATES,
    IDLE,
    SENDING,
    STATES,
    STOPPED,
    STREAMING,
    TRANSITIONS,
    WAITING,
)
from ._stream import FeedStream
from ._transport import Want
from .errors import (
    FeedError,
    GaveUpError,
    ReadTimeout,
)
from .loop import Loop, TimerHandle

__all__ = ["TRANSITIONS", "STATES", "CONNECTED_STATES"]  # (from _states, for the consumer)

logger = logging.getLogger("changeloop.consumer")

_CONNECTED = CONNECTED_STATES
_GATED = GATED_STATES


#: The states loop.stats() counts (idle consumers are not the loop's yet).
_COUNTED = tuple(state for state in STATES if state != IDLE)


def _counts_of_states(loop: Loop) -> "collections.Counter[str]":
    return counts_of(loop, _COUNTED)


class _Follow(_Delivery):
    """The state machine of a continuous feed, and the loop's handler for its socket.

    A base class of :class:`~changeloop.consumer.Consumer` (one object per feed); the consumer
    provides the configuration and opens the stream (:meth:`_open_stream`).
    """

    __slots__ = (
        "_attempt",
        "_caught_up",
        "_connected_at",
        "_fd",
        "_give_up",
        "_healthy_at",
        "_last_activity",
        "_last_error",
        "_paused",
        "_pending",
        "_silence",
        "_state",
        "_stream",
        "_timer",
        "_watchdogs",
        "connections",
        "error",
    )

    # Provided by the consumer (declared here for the type checker only).
    connect_timeout: float
    first_byte_timeout: Optional[float]
    healthy_after: float
    reconnect_base: float
    reconnect_cap: float
    _rng: random.Random
    loop: Loop

    def _init_follow(self) -> None:
        self._init_delivery()
        self._state = IDLE
        self._stream: Optional[FeedStream] = None
        self._fd = -1
        self._silence = 0.0  # the watchdog's allowance, set by start()
        self._timer: Optional[TimerHandle] = None  # the backoff's, the one timer of a state
        #: The loop's watchdog wheel, once this consumer armed its watchdog: a weak reference
        #: (only the loop's timer may keep a wheel alive, see _WATCHDOGS); _no_wheel before.
        self._watchdogs: Callable[[], Optional[Watchdogs]] = no_wheel
        self._last_activity = 0.0  # the last byte read or written, or the phase's start
        self._connected_at: Optional[float] = None  # when the feed's 200 head arrived
        self._attempt = 0  # failed attempts since the last healthy connection
        self._healthy_at = 0.0  # when the last healthy connection was (or the run started)
        #: (max_retries, max_outage): the give-up policy (the consumer's properties of those
        #: names), the two in one slot; (None, None) retries for ever.
        self._give_up: Tuple[Optional[int], Optional[float]] = RETRY_FOREVER
        self._last_error: Optional[Tuple[BaseException, float]] = None  # and when (wall clock)
        self._pending: Optional[int] = None  # the server's last pending count
        self._paused = False  # pause(): the socket is not read and the watchdog rests
        self._caught_up = False  # on_caught_up reported in this run
        #: Connections made since ``start`` (1 + reconnections).
        self.connections = 0
        #: The exception that stopped the consumer, if one did.
        self.error: Optional[BaseException] = None

    # -- transitions ---------------------------------------------------------------------------

    def _move(self, event: str) -> str:
        """Take ``event`` from the current state: disarm the old state's deadline, arm the new.

        Raises:
            RuntimeError: ``event`` has no transition from the current state (a bug).
        """
        old = self._state
        new = TRANSITIONS.get((old, event))
        if new is None:
            raise RuntimeError("no transition for %r in state %r" % (event, old))
        self._state = new
        counts = _counts_of_states(self.loop)
        counts[old] -= 1
        counts[new] += 1
        if old == BACKOFF and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if old == WAITING and new != CONNECTING:
            self._leave_gate()  # the turn it was given, if it was given one already
            try:
                gate_of(self.loop).waiting.remove(self)  # rare (a stop), and O(waiting)
            except ValueError:
                pass
        elif old in _GATED and new not in _GATED:
            self._leave_gate()
        if new in _CONNECTED:
            self._last_activity = self.loop.time()  # silence counts from the phase's start
            if not (self._paused and new == STREAMING):
                self._arm_watchdog(new)
        elif old in _CONNECTED:
            watchdogs = self._watchdogs()
            if watchdogs is not None:
                watchdogs.discard(self)
        return new

    def _allowance(self, state: str) -> float:
        """The silence a connection may keep in ``state`` (see the table above)."""
        if state == CONNECTING:
            return min(self.connect_timeout, self._silence)
        first_byte = self.first_byte_timeout
        if first_byte is not None and (state == AWAITING or state == STREAMING):
            stream = self._stream  # given a first-byte allowance, it lasts until the first line
            decoder = None if stream is None else stream.decoder
            if decoder is None or not (decoder.rows or decoder.heartbeats):
                return max(self._silence, first_byte)
        return self._silence

    def _arm_watchdog(self, state: str) -> None:
        wheel = self._watchdogs()
        if wheel is None:  # the first time, or the loop's wheel emptied and went
            wheel = watchdogs_of(self.loop, _Follow._watchdog)  # unbound: one call less
            self._watchdogs = weakref.ref(wheel)  # the registry's own reference: no new object
        wheel.set(self, self._last_activity + self._allowance(state))

    # -- the guarded doors: every entry from the loop ------------------------------------------

    def handle_read(self) -> None:
        """The loop's handler protocol: the socket is ready. Not for application use."""
        stream = self._stream
        if stream is None:
            return
        try:
            rows = stream.on_ready()
            # The slot, not the consumer's loop property: one Python call less per heartbeat
            # (about 1,000 instructions, 3% of one: benchmarks/bench_idle_path.py).
            self._last_activity = self._loop.time()  # type: ignore[union-attr]
            if rows is None:  # a lone heartbeat: what an idle feed's every read brings
                if self._caught_up:
                    return  # nothing to act on: the watchdog already allows for heartbeats
                rows = []
            self._on_read(stream, rows)
        except Exception as exc:
            self._fail(exc)

    def handle_write(self) -> None:
        """The loop's handler protocol: the socket is writable. Not for application use."""
        self.handle_read()

    def handle_error(self, exc: BaseException) -> None:
        """The loop's handler protocol: the handler raised. Not for application use."""
        self._fail(exc)

    def _watchdog(self) -> None:
        """The wheel's check, at most once per allowance: O(1) per feed, whatever the traffic.

        On a loop of idle feeds this runs for every feed once in two or three heartbeats, so
        the usual case (streaming: the heartbeat allowance) reads no more than it needs.
        """
        try:
            state = self._state
            if state not in _CONNECTED:
                return
            allowance = (
                self._silence
                if state == STREAMING and self.first_byte_timeout is None
                else self._allowance(state)
            )
            last = self._last_activity
            idle = self._loop.time() - last  # type: ignore[union-attr]  # (see handle_read)
            if idle < allowance:
                wheel = self._watchdogs()
                if wheel is not None:
                    wheel.set(self, last + allowance)
                return
            stream = self._stream
            if state == CONNECTING and stream is not None:
                self._fail(stream.connect_timeout_error())
            else:
                self._fail(
                    ReadTimeout(
                        "no data for %.1f s while %s: the connection is presumed dead"
                        % (idle, _PHASE_WORDS[state])
                    )
                )
        except Exception as exc:
            self._fail(exc)

    def _retry(self) -> None:
        """The backoff's timer: ask for a turn to connect again."""
        try:
            if self._state == BACKOFF:
                self._timer = None
                self._move("retry")
                self._want_turn()
        except Exception as exc:
            self._fail(exc)

    def _take_turn(self) -> None:
        """The connect gate's call: this consumer holds a turn, so open a connection."""
        try:
            if self._state != WAITING or self not in gate_of(self.loop).connecting:
                return  # a stale turn: stopped since (and maybe started anew, queued again)
            self._move("turn")
            self._open_connection()
        except Exception as exc:
            self._fail(exc)

    # -- the connect gate ----------------------------------------------------------------------

    def _want_turn(self) -> None:
        """In ``waiting``: take a turn at once if the gate has room, else queue for one."""
        if self._limit is not None and self.delivered >= self._limit:
            self._finish(None)  # limit=0, or reached exactly when a feed ended
            return
        gate = gate_of(self.loop)
        if len(gate.connecting) < MAX_CONNECTING_PER_LOOP:
            gate.connecting.add(self)
            self.loop.call_soon(self._take_turn)
        else:
            gate.waiting.append(self)

    def _leave_gate(self) -> None:
        """Give back this consumer's turn, if it holds one: the next waiting one takes it."""
        loop = self._loop
        gate = None if loop is None else gate_of(loop)
        if gate is None or self not in gate.connecting:
            return
        gate.connecting.discard(self)
        if loop is None or loop.closed:
            return  # nobody will run a turn: the waiting consumers stop with their loop
        while gate.waiting and len(gate.connecting) < MAX_CONNECTING_PER_LOOP:
            successor = gate.waiting.popleft()
            if successor._state == WAITING and successor not in gate.connecting:
                gate.connecting.add(successor)
                self.loop.call_soon(successor._take_turn)

    # -- a connection's life -------------------------------------------------------------------

    def _open_connection(self) -> None:
        """In ``connecting``: start a stream (the since=now question first, if it is asked)."""
        resolving = self._since == "now"  # ask where "now" is first; follow from there next
        self._connected_at = None
        # Any step may fail, the session login of Server(session=True) (a blocking request)
        # included: the caller's guard sends it to the failure route.
        stream = self._stream = self._open_stream(resolving)
        if not resolving:
            self.connections += 1
        logger.debug("%s: connecting (since=%r)", self.db.name, self._since)
        host, port = stream.connection.host, stream.connection.port
        if is_literal(host):
            self._start_stream(stream, None)
            return
        # Names are resolved off the loop's thread (see _resolve); the connecting deadline
        # runs meanwhile, so a resolver that never answers is a connection that never opens.
        callback = functools.partial(self._on_addresses, stream)
        addrs = resolver_of(self.loop).lookup(host, port, callback)
        if addrs is not None:  # cached
            self._start_stream(stream, addrs)

    def _on_addresses(self, stream: FeedStream, result: Any) -> None:
        """The resolver's answer for ``stream``'s host, on the loop's thread."""
        try:
            if stream is not self._stream or self._state != CONNECTING:
                return  # the consumer moved on (a deadline, a stop) while it was resolving
            if isinstance(result, BaseException):
                error = type(result)(*result.args)  # each consumer its own, as each raises it
                error.__cause__ = result.__cause__
                self._fail(error)
                return
            self._start_stream(stream, result)
        except Exception as exc:
            self._fail(exc)

    def _start_stream(self, stream: FeedStream, addrs: Optional[List[Any]]) -> None:
        stream.start(addrs)
        self._register(stream)
        self._follow_phase(stream)

    def _open_stream(self, resolving: bool) -> FeedStream:
        raise NotImplementedError  # the consumer builds the request

    def _register(self, stream: FeedStream) -> None:
        want = stream.want()
        if self._paused and self._state == STREAMING:
            want = Want.DONE  # paused: no interest, so TCP's flow control holds the server
        fd = stream.fileno()
        loop = self.loop
        if fd != self._fd:
            if self._fd >= 0:
                loop.remove_handler(self._fd)
            self._fd = fd
            loop.add_handler(fd, self, read=want is Want.READ, write=want is Want.WRITE)
        else:
            loop.set_interest(fd, read=want is Want.READ, write=want is Want.WRITE)

    def _follow_phase(self, stream: FeedStream) -> None:
        """Move through the connection's phases as far as the stream has come."""
        phase = stream.state
        if self._state == CONNECTING and phase != "connecting":
            self._move("connected")
        if self._state == SENDING and phase != "sending":
            self._move("sent")
        if self._state == AWAITING and stream.streaming and not stream.one_shot:
            self._move("head")
            if self._paused:
                self._register(stream)
            self._on_connected()

    def _on_read(self, stream: FeedStream, rows: List[Change]) -> None:
        """What a read brought, in order: phases, rows, the resume point, the end or an error."""
        if self._state != STREAMING:
            connecting = True
            self._follow_phase(stream)
            if stream is not self._stream:
                return  # a callback (on_connect) stopped the consumer
            if stream.document is not None:
                self._on_resolved(stream.document)
                return
        else:
            connecting = False
        if rows:
            if self._deliver(rows):
                self._finish(None)
                return
            if stream is not self._stream:
                return  # a callback stopped (or restarted) the consumer
        if self.first_byte_timeout is not None and self._state == STREAMING:
            self._arm_watchdog(STREAMING)  # the first line may end the first-byte allowance
        decoder = stream.decoder
        last = stream.last_seq
        if last is not None:
            self._pending = last.pending
            if last.seq is not None:
                self._since = last.seq  # every row before it is delivered: resume from here
        if not self._caught_up and (decoder.heartbeats or (last is not None and last.pending == 0)):
            self._caught_up = True
            pending = None if last is None else last.pending
            self._report(self.on_caught_up, self._event("caught_up", pending=pending))
            if stream is not self._stream:
                return
        if stream.error is not None:
            self._fail(stream.error)  # after what the same read brought before it
            return
        if stream.ended:
            self._on_end(stream)
            return
        if connecting:  # only then can the fd (next address) or the interest change
            self._register(stream)
        if stream.has_buffered_bytes() and not self._paused:
            self.loop.call_soon(self.handle_read)  # TLS holds bytes that select() will not report

    def _on_resolved(self, document: Dict[str, Any]) -> None:
        """``since="now"`` has an answer: follow the continuous feed from that seq."""
        seq = document.get("last_seq")
        if seq is None:
            self._fail(FeedError("the answer to since=now has no last_seq"))
            return
        self._close_stream()
        self._since = seq
        self._move("resolved")
        self._open_connection()

    def _on_connected(self) -> None:
        self._connected_at = self.loop.time()
        self._connected()
        logger.info("%s: following changes since %r", self.db.name, self._since)
        self._report(self.on_connect, self._event("connect"))

    def _connected(self) -> None:
        """A feed's 200 head arrived (the consumer renews its session flag here)."""

    def _on_end(self, stream: FeedStream) -> None:
        """The server ended the feed: with ``last_seq``, follow on; without, it is a cut."""
        last = stream.last_seq
        if last is None:  # a proxy's cut, or a server that is not CouchDB: resume after a backoff
            self._fail(FeedError("the server ended the feed without a last_seq line"))
            return
        now = self.loop.time()
        lasted = now - (self._connected_at or now)
        quick = stream.decoder.rows == 0 and lasted < QUICK_END_S
        self._close_stream()
        if quick:
            # Ended at once with nothing new (timeout=0, a proxy that cuts every response short):
            # reconnecting at once would spin, so these ends back off (and count) as failures do.
            gave_up = self._gives_up(FeedError("the server ended every feed at once"), now)
            if gave_up is not None:
                self._finish(gave_up)
                return
            delay = self._backoff()
            logger.info(
                "%s: the server ended the feed after %.2f s with nothing new; reconnecting in "
                "%.2f s",
                self.db.name,
                lasted,
                delay,
            )
        else:
            self._attempt = 0  # a feed that ran its course: follow on at once
            self._healthy_at = now
            delay = 0.0
            logger.debug("%s: the server ended the feed at %r; resuming", self.db.name, last.seq)
        self._move("end")
        self._timer = self.loop.call_later(delay, self._retry)
        self._report(self.on_disconnect, self._event("disconnect"))

    # -- the one failure route -----------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Close the connection; reconnect after a backoff, or stop if ``exc`` is fatal."""
        state = self._state
        if state == IDLE or state == STOPPED:
            logger.debug("%s: %r after the consumer stopped; ignored", self.db.name, exc)
            return
        now = self.loop.time()
        self._last_error = (exc, time.time())
        if self._stop_requested:  # stop() was asked while delivering: it wins over a retry
            self._finish(exc if is_fatal(exc) else None)
            return
        if is_fatal(exc) and not self._renews_session(exc):
            logger.error("%s: %s; stopping", self.db.name, exc)
            self._finish(exc)
            return
        was_streaming = state == STREAMING
        stream = self._stream
        connected_at = self._connected_at
        healthy = connected_at is not None and (
            (stream is not None and stream.decoder.rows)  # it delivered: the path works
            or now - connected_at >= self.healthy_after
        )
        if healthy:
            self._attempt = 0
            self._healthy_at = now
        else:
            gave_up = self._gives_up(exc, now)
            if gave_up is not None:
                logger.error("%s: %s; stopping", self.db.name, gave_up)
                self._finish(gave_up)
                return
        self._close_stream()
        delay = self._backoff()
        if healthy:
            self._attempt = 0  # not a failed attempt: the next failure is the first in a row
        logger.warning("%s: %s; reconnecting in %.2f s", self.db.name, exc, delay)
        if state != BACKOFF:  # (in backoff: a failure on the way out of it, before "retry")
            self._move("fail")
        self._timer = self.loop.call_later(delay, self._retry)
        if was_streaming:
            self._report(self.on_disconnect, self._event("disconnect", error=exc))
        self._report(
            self.on_error, self._event("error", error=exc, will_retry=True, retry_in=delay)
        )

    def _gives_up(self, exc: BaseException, now: float) -> Optional[GaveUpError]:
        """The error to stop with if the give-up policy says so after failure ``exc``."""
        outage = now - self._healthy_at
        max_retries, max_outage = self._give_up
        return gave_up(exc, self._attempt + 1, outage, max_retries, max_outage)

    def _renews_session(self, exc: BaseException) -> bool:
        return False  # the consumer knows about sessions

    def _backoff(self) -> float:
        delay = backoff_delay(self._rng, self.reconnect_base, self.reconnect_cap, self._attempt)
        self._attempt += 1
        return delay

    def _close_stream(self) -> None:
        if self._fd >= 0:
            self.loop.remove_handler(self._fd)
            self._fd = -1
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _set_paused(self, paused: bool) -> None:
        """On the loop's thread: stop reading the socket (and rest the watchdog), or resume."""
        if paused == self._paused:
            return
        self._paused = paused
        stream = self._stream
        if self._state != STREAMING or stream is None:
            return  # applied when the feed reaches streaming (see _follow_phase)
        if paused:
            watchdogs = self._watchdogs()
            if watchdogs is not None:
                watchdogs.discard(self)
            self._register(stream)
            return
        self._last_activity = self.loop.time()  # the silence counts from the resume
        self._arm_watchdog(STREAMING)
        self._register(stream)
        if stream.has_buffered_bytes():
            self.loop.call_soon(self.handle_read)

    def _request_stop(self) -> None:
        """On the loop's thread: stop now, or once the change being delivered is done."""
        if self._state == IDLE or self._state == STOPPED:
            return
        if self._delivering:
            self._stop_requested = True
            return
        self._finish(None)

    def _finish(self, error: Optional[BaseException]) -> None:
        """Stop for good: close, save the checkpoint, tell a blocking ``wait`` to return."""
        state = self._state
        if state == IDLE or state == STOPPED:
            return
        was_streaming = state == STREAMING
        self._close_stream()
        self._move("stop")
        if self.checkpoint is not None:
            try:
                self._save_checkpoint()
            except Exception as exc:
                logger.error("%s: %s", self.db.name, exc)
                if error is None:
                    error = exc  # wait() raises it: a lost checkpoint is not a clean stop
        self.error = error
        logger.info("%s: stopped after %d changes", self.db.name, self.delivered)
        # The callbacks below may start the consumer again (self.error is then reset): they
        # are told of this stop's error, and a blocking wait() ends only if it stays stopped.
        if was_streaming:
            self._report(self.on_disconnect, self._event("disconnect", error=error))
        if error is not None:
            self._report(self.on_error, self._event("error", error=error))
        if self._state == STOPPED and BLOCKING.get(self.loop) is self:  # wait() ends
            self.loop.stop()


_PHASE_WORDS = {
    CONNECTING: "connecting",
    SENDING: "sending the request",
    AWAITING: "waiting for the response",
    STREAMING: "streaming",
}
