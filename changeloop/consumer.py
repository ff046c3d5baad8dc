"""``Consumer``: follow a database's ``_changes`` feed, the couchdbkit way, losing no change.

``fetch`` (feed=normal) and ``wait_once`` (feed=longpoll) are one-shot requests on the blocking
client. ``start`` attaches a continuous feed to a :class:`~changeloop.loop.Loop`, where many
consumers share one thread; ``wait`` is ``start`` plus running the loop until this consumer stops;
``changes`` is the same as an iterator.

A continuous consumer is the loop's handler for its socket. On readiness it asks its
:class:`~changeloop._stream.FeedStream` for rows (a return value) and hands them to the callbacks,
in :meth:`Consumer._deliver`, the one place user code runs. Any network, protocol or feed failure,
an EOF without ``last_seq``, a 429 or a 5xx closes the stream (after delivering the rows that came
before it) and reconnects after a full-jitter exponential backoff, resuming after the last change
*delivered*; 400/401/403/404 and TLS failures are fatal. ``since="now"`` is first turned into a
real seq, so no reconnection ever says "now" again. A heartbeat watchdog declares a silent
connection dead. A ``checkpoint`` store saves the
last delivered seq (throttled, and on stop), so a restarted consumer resumes there: delivery is
at-least-once.
"""

import collections
import logging
import random
import weakref
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Union

from ._feed import MAX_LINE_BYTES, decode_document
from ._params import (
    DEFAULT_HEARTBEAT_MS,
    ChangesRequest,
    changes_request,
    heartbeat_seconds,
    silence_allowance,
)
from ._request import serialize_request
from ._stream import FeedStream
from ._transport import NonBlockingConnection, Want
from ._wheel import DeadlineWheel
from .client import Database, encode_query
from .errors import (
    CallbackError,
    ChangeloopError,
    FeedError,
    HTTPError,
    LineTooLongError,
    ReadTimeout,
    TLSError,
)
from .loop import Loop, TimerHandle

__all__ = ["Consumer", "FeedEvent", "Change", "Callback", "BatchCallback"]

logger = logging.getLogger(__name__)

Change = Dict[str, Any]
Callback = Callable[[Change], Any]
#: A callback of a consumer with a ``batch_size``: it receives a list of changes.
BatchCallback = Callable[[List[Change]], Any]

#: Backoff before reconnecting: a random delay in [0, min(cap, base * 2**attempt)] seconds.
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 60.0
#: A connection that stayed up this long resets the backoff to its base.
HEALTHY_AFTER_S = 30.0
#: Silence, in heartbeats, after which a connection is declared dead: one lost heartbeat is
#: normal jitter, three in a row is a dead peer or a half-open connection.
WATCHDOG_HEARTBEATS = 3.0
#: How long the first byte of the *body* may take, until the heartbeat allowance applies: some
#: servers send nothing (or only the headers) until the first change or heartbeat, and
#: ``_db_updates`` holds its headers back. CouchDB 2+ sends a newline as soon as a feed opens,
#: so there the tighter heartbeat allowance applies at once.
FIRST_BYTE_TIMEOUT_S = 120.0
#: Seconds to connect (TCP and TLS).
CONNECT_TIMEOUT_S = 30.0
#: A feed that the server ends cleanly (with ``last_seq``) sooner than this after it opened, and
#: with no change, is followed again only after a backoff, as after a failure.
QUICK_END_S = 1.0
#: Checkpoint after this many changes or this many seconds, whichever comes first.
CHECKPOINT_EVERY_CHANGES = 100
CHECKPOINT_EVERY_S = 5.0
#: The backoff jitter's random source when none is given: one for all consumers, since a
#: ``random.Random`` holds a 2.5 KB Mersenne Twister state, more than the rest of an idle feed.
_SHARED_RNG = random.Random()

#: How many consumers of one loop may be connecting at once (TCP, TLS, the request, the response
#: head, and the since=now question); the others wait their turn, in order. Starting 10,000
#: feeds would otherwise open 10,000 connections in one pass: the server's listen backlog
#: overflows (dropped SYNs are retried a second later), CouchDB gets a thundering herd, and the
#: short-lived objects of 10,000 simultaneous connections fragment the heap for good (about 2 KB
#: of resident memory per feed, measured by benchmarks/bench_scale.py).
MAX_CONNECTING_PER_LOOP = 100

#: Statuses after which retrying is pointless: the request itself is wrong or not allowed.
FATAL_STATUSES = frozenset([400, 401, 403, 404, 405, 406, 409, 412, 413, 415])

_IDLE, _CONNECTING, _STREAMING, _BACKOFF, _STOPPED = (
    "idle",
    "connecting",
    "streaming",
    "backoff",
    "stopped",
)


class _ConnectGate:
    """The consumers of one loop that are connecting, and those waiting for their turn."""

    __slots__ = ("connecting", "waiting", "__weakref__")

    def __init__(self) -> None:
        self.connecting: Set[Consumer] = set()
        # In turn; a consumer's _in_waiting says it is here (a set for that would keep, once
        # drained, the table of its largest size: some 60 bytes a feed, if all started at once).
        self.waiting: Deque[Consumer] = collections.deque()


#: One gate per loop, kept as long as the loop lives.
_GATES: "weakref.WeakKeyDictionary[Loop, _ConnectGate]" = weakref.WeakKeyDictionary()

#: How late a watchdog may notice a dead connection: its deadlines are rounded up to this.
WATCHDOG_RESOLUTION = 0.1


#: The watchdogs of each loop's consumers on one timing wheel (see _wheel): re-arming one is
#: O(1), where a heap timer per consumer cost O(log n) comparisons on cold memory. Only the loop's
#: pending timer keeps a wheel alive; this registry and the consumers refer to it weakly. The
#: wheel holds the consumers themselves, as the loop's selector does while they stream, so a loop
#: closed (its timers dropped) or dropped lets go of its wheel, and the wheel of its consumers.
_WATCHDOGS: "weakref.WeakKeyDictionary[Loop, weakref.ReferenceType[_Watchdogs]]" = (
    weakref.WeakKeyDictionary()
)
_Watchdogs = DeadlineWheel["Consumer"]


def _no_wheel() -> Optional[_Watchdogs]:
    """A consumer's wheel reference before it armed a watchdog: like a dead weak reference."""
    return None


def _watchdogs_of(loop: Loop) -> "_Watchdogs":
    ref = _WATCHDOGS.get(loop)
    wheel = None if ref is None else ref()
    if wheel is None:
        # Called unbound, one call less per firing: no subclass overrides _watchdog.
        wheel = DeadlineWheel(loop, Consumer._watchdog, WATCHDOG_RESOLUTION)
        _WATCHDOGS[loop] = weakref.ref(wheel)
    return wheel


class FeedEvent:
    """What a lifecycle callback receives: one object, so fields can be added later.

    Attributes:
        consumer: the consumer it happened to.
        kind: ``"connect"``, ``"disconnect"``, ``"error"`` or ``"caught_up"``.
        error: the exception, for ``error`` (and ``disconnect`` after a failure).
        will_retry: for ``error``: whether the consumer reconnects after ``retry_in`` seconds.
        retry_in: seconds until the reconnection, or ``None``.
        seq: the last delivered seq at the time.
        pending: for ``caught_up``, the server's ``pending`` count when it sent one.
    """

    __slots__ = ("consumer", "kind", "error", "will_retry", "retry_in", "seq", "pending")

    def __init__(
        self,
        consumer: "Consumer",
        kind: str,
        *,
        error: Optional[BaseException] = None,
        will_retry: bool = False,
        retry_in: Optional[float] = None,
        pending: Optional[int] = None,
    ) -> None:
        self.consumer = consumer
        self.kind = kind
        self.error = error
        self.will_retry = will_retry
        self.retry_in = retry_in
        self.seq = consumer.last_seq
        self.pending = pending

    def __repr__(self) -> str:
        extra = ""
        if self.error is not None:
            extra += " error=%r will_retry=%s" % (self.error, self.will_retry)
        return "<FeedEvent %s %s seq=%r%s>" % (self.kind, self.consumer.db.name, self.seq, extra)


class Consumer:
    """Follow the changes of one database.

    Args:
        db: the database to follow.
        loop: the loop continuous feeds run on; by default a private one, created on first use.
        checkpoint: a store with ``load() -> seq or None`` and ``save(seq)`` (see
            :mod:`changeloop.checkpoint`): where to resume from, and where the last delivered seq
            is saved (every ``checkpoint_every`` changes or ``checkpoint_interval`` seconds, and
            on stop). A stored seq takes precedence over ``since``.
        on_error, on_connect, on_disconnect, on_caught_up: lifecycle callbacks, each called with
            a :class:`FeedEvent`.
        callback_errors: what a callback that raises does: ``"stop"`` (the default: stop this
            consumer without moving past that change, so it is delivered again next time) or
            ``"skip"`` (report it through ``on_error`` and go on with the next change).
        reconnect_base, reconnect_cap: the backoff range in seconds.
        healthy_after: seconds a connection must stay up to reset the backoff.
        watchdog_heartbeats: heartbeats of silence that declare a connection dead (noticed
            up to :data:`WATCHDOG_RESOLUTION` later).
        first_byte_timeout: seconds the first byte of a feed may take.
        connect_timeout: seconds to connect (TCP and TLS).
        max_line_bytes: the longest feed line accepted.
        batch_size: deliver changes in lists of at most this many, one callback call per list
            (for consumers that write in bulk). A batch holds the changes that are there at
            once: while catching up it fills, when changes trickle in it may hold one, and it
            is never held back waiting for more. The batch is the unit of delivery: it counts
            as delivered when the callbacks return, checkpoints fall between batches, and a
            failing callback stops (or, with ``"skip"``, skips) the whole batch.
        rng: the random source of the backoff jitter (for tests).
    """

    # Slots, not a per-instance dict: CPython 3.11+ stores up to 30 attributes inline in the
    # object (shared keys) but gives every instance of a class with more its own full dict,
    # about 1.6 KB; a consumer has 40. "__dict__" stays in the slots, so a subclass's or a
    # user's extra attributes still work (that dict is created only when one is set).
    __slots__ = (
        "_attempt",
        "_blocking",
        "_body_seen",
        "_callbacks",
        "_caught_up",
        "_connected_at",
        "_delivering",
        "_fd",
        "_followers",
        "_in_waiting",
        "_last_activity",
        "_limit",
        "_loop",
        "_own_loop",
        "_params",
        "_rng",
        "_saved_at",
        "_sent_cookie",
        "_session_renewed",
        "_silence",
        "_since",
        "_state",
        "_stop_requested",
        "_stream",
        "_timer",
        "_unsaved",
        "_watchdogs",
        "batch_size",
        "callback_errors",
        "checkpoint",
        "checkpoint_every",
        "checkpoint_interval",
        "connect_timeout",
        "connections",
        "db",
        "delivered",
        "error",
        "first_byte_timeout",
        "healthy_after",
        "max_line_bytes",
        "on_caught_up",
        "on_connect",
        "on_disconnect",
        "on_error",
        "reconnect_base",
        "reconnect_cap",
        "watchdog_heartbeats",
        "__dict__",
        "__weakref__",
    )

    #: How a feed's connection is made: the seam where the simulation tests put a fake network.
    _connect_with: Callable[..., NonBlockingConnection] = NonBlockingConnection

    def __init__(
        self,
        db: Database,
        loop: Optional[Loop] = None,
        *,
        checkpoint: Any = None,
        on_error: Optional[Callable[[FeedEvent], Any]] = None,
        on_connect: Optional[Callable[[FeedEvent], Any]] = None,
        on_disconnect: Optional[Callable[[FeedEvent], Any]] = None,
        on_caught_up: Optional[Callable[[FeedEvent], Any]] = None,
        callback_errors: str = "stop",
        reconnect_base: float = RECONNECT_BASE_S,
        reconnect_cap: float = RECONNECT_CAP_S,
        healthy_after: float = HEALTHY_AFTER_S,
        watchdog_heartbeats: float = WATCHDOG_HEARTBEATS,
        first_byte_timeout: float = FIRST_BYTE_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        checkpoint_every: int = CHECKPOINT_EVERY_CHANGES,
        checkpoint_interval: float = CHECKPOINT_EVERY_S,
        max_line_bytes: int = MAX_LINE_BYTES,
        batch_size: Optional[int] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        if callback_errors not in ("stop", "skip"):
            raise ValueError("callback_errors must be 'stop' or 'skip'")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError("batch_size must be a positive integer or None")
        self.db = db
        self._loop = loop
        self._own_loop = loop is None
        self.checkpoint = checkpoint
        self.on_error = on_error
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_caught_up = on_caught_up
        self.callback_errors = callback_errors
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.healthy_after = healthy_after
        self.watchdog_heartbeats = watchdog_heartbeats
        self.first_byte_timeout = first_byte_timeout
        self.connect_timeout = connect_timeout
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.max_line_bytes = max_line_bytes
        self.batch_size = batch_size
        self._rng = rng or _SHARED_RNG
        self._callbacks: List[Callable[[Any], Any]] = []
        self._state = _IDLE
        self._stream: Optional[FeedStream] = None
        self._fd = -1
        self._in_waiting = False  # in its loop's _ConnectGate.waiting
        self._params: Dict[str, Any] = {}
        self._since: Any = None
        self._silence = 0.0  # the watchdog's allowance once the body flows, set by start()
        self._sent_cookie: Optional[str] = None  # the session cookie of the last feed request
        self._session_renewed = False  # a 401 dropped the session cookie since the last connect
        self._limit: Optional[int] = None
        self._timer: Optional[TimerHandle] = None  # connect timeout or backoff
        #: The loop's watchdog wheel, once this consumer armed its watchdog: a weak reference
        #: (only the loop's timer may keep a wheel alive, see _WATCHDOGS); _no_wheel before.
        self._watchdogs: Callable[[], Optional[_Watchdogs]] = _no_wheel
        self._last_activity = 0.0
        self._connected_at: Optional[float] = None
        self._attempt = 0
        self._caught_up = False
        self._blocking = False
        self._delivering = False
        self._stop_requested = False
        self._unsaved = 0
        self._saved_at = 0.0  # on the loop's clock, like every other time here
        self._followers: Sequence[Consumer] = ()  # the consumers of changes() iterators
        #: Changes delivered to the callbacks since ``start``. Counted once the callbacks have
        #: returned for all the changes of one read (of one batch in batch mode), and before a
        #: checkpoint: inside a callback it does not count the changes of the current read yet.
        self.delivered = 0
        #: Connections made since ``start`` (1 + reconnections).
        self.connections = 0
        #: The exception that stopped the consumer, if one did.
        self.error: Optional[BaseException] = None

    def __repr__(self) -> str:
        return "<Consumer %s/%s %s since=%r delivered=%d connections=%d>" % (
            self.db.server.url,
            self.db.name,
            self._state,
            self._since,
            self.delivered,
            self.connections,
        )

    @property
    def loop(self) -> Loop:
        """The loop continuous feeds run on (created on first use if none was given)."""
        if self._loop is None:
            self._loop = Loop()
        return self._loop

    @property
    def last_seq(self) -> Any:
        """The seq of the last change delivered (or where the feed will start).

        Brought up to date as :attr:`delivered` is (inside a callback, the change itself has
        its ``seq``); the checkpoint always stores it after the changes it covers.
        """
        return self._since

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``streaming``, ``backoff`` or ``stopped``."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether a continuous feed is started and not stopped."""
        return self._state not in (_IDLE, _STOPPED)

    def close(self) -> None:
        """Stop the feed and any ``changes()`` iteration, and close the loop if the consumer
        created it."""
        self.stop()
        for follower in self._followers:
            follower.stop()
        self._followers = ()
        if self._own_loop and self._loop is not None and not self._loop.is_running():
            self._loop.close()
            self._loop = None
            self._watchdogs = _no_wheel
            self._in_waiting = False  # the closed loop's gate went with it

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one-shot feeds (blocking) -------------------------------------------------------------

    def fetch(self, since: Any = 0, **params: Any) -> Dict[str, Any]:
        """Return the changes since ``since`` at once (``feed=normal``).

        Args:
            since: the seq to start after (``0``, ``"now"``, or a seq as the server gave it).
            params: filters (``filter_name``, ``doc_ids``, ``selector``, ``view``) and any
                ``_changes`` parameter (``include_docs=True``, ``limit``, ``descending``...).

        Returns:
            CouchDB's answer: ``{"results": [...], "last_seq": ..., "pending": ...}``.

        Raises:
            HTTPError: e.g. ``NotFound`` for a missing database or filter.
            NetworkError, ProtocolError, FeedError: the request failed.
        """
        return self._one_shot("normal", since, params)

    def wait_once(self, since: Any = 0, **params: Any) -> Dict[str, Any]:
        """Wait for the next changes after ``since`` and return them (``feed=longpoll``).

        Blocks until a change arrives or the server's ``timeout`` (milliseconds, CouchDB's
        parameter) passes. A heartbeat (``heartbeat=`` in ms, 30 s by default) keeps a silent
        wait alive; the read gives up after :data:`WATCHDOG_HEARTBEATS` missed heartbeats.
        Arguments, return value and errors are those of :meth:`fetch`.
        """
        params.setdefault("heartbeat", DEFAULT_HEARTBEAT_MS)
        return self._one_shot("longpoll", since, params)

    def _one_shot(self, feed: str, since: Any, params: Dict[str, Any]) -> Dict[str, Any]:
        request = self._request(feed, since, params)
        timeout = self.db.server.timeout
        heartbeat = heartbeat_seconds(request.query)
        if heartbeat is not None:
            timeout = max(heartbeat * self.watchdog_heartbeats, timeout or 0.0)
        elif feed == "longpoll":
            timeout = (
                None
                if "timeout" not in request.query
                else (float(request.query["timeout"]) / 1000.0 + (timeout or 0.0))
            )
        # The body goes to decode_document as its only reference, so it can drop it early.
        return decode_document(
            self.db.server.raw_request(
                request.method,
                request.path,
                params=request.query,
                body=request.body,
                timeout=timeout,
            )[2]
        )

    # -- continuous feeds ---------------------------------------------------------------------

    def register_callback(self, callback: Union[Callback, BatchCallback]) -> None:
        """Add a callback for continuous feeds; callbacks run in the order they were added.

        A callback receives one change (a dict), or with ``batch_size`` a list of changes.
        """
        if not callable(callback):
            raise TypeError("a callback must be callable")
        self._callbacks.append(callback)

    def start(
        self,
        callback: Optional[Union[Callback, BatchCallback]] = None,
        since: Any = 0,
        **params: Any,
    ) -> "Consumer":
        """Attach a continuous feed to the loop and return at once. Thread-safe.

        The loop's :meth:`~changeloop.loop.Loop.run` (or any run tier) then serves this feed
        beside every other consumer on it.

        Args:
            callback: added with :meth:`register_callback`.
            since: where to start when the checkpoint store has nothing: ``0``, ``"now"``, a seq.
                ``"now"`` is first turned into the current seq (a ``feed=normal&since=now``
                request on the loop): a reconnection or a checkpoint that said "now" again
                would skip whatever changed in between.
            params: as for :meth:`fetch`; ``heartbeat`` (ms) defaults to 30 s; ``limit`` stops
                the consumer after that many changes.

        Raises:
            RuntimeError: the consumer is already running, or has no callback.
        """
        if self.running:
            raise RuntimeError("the consumer is already running")
        if callback is not None:
            self.register_callback(callback)
        if not self._callbacks:
            raise RuntimeError("register a callback before starting a continuous feed")
        params.setdefault("heartbeat", DEFAULT_HEARTBEAT_MS)
        changes_request(self.db.path, "continuous", since, params)  # validate now, not later
        stored = self.checkpoint.load() if self.checkpoint is not None else None
        self._since = stored if stored is not None else since
        self._limit = params.get("limit")
        self._params = params
        self._silence = silence_allowance(params, self.watchdog_heartbeats)
        self._state = _CONNECTING
        self.error = None
        self._stop_requested = False
        self.delivered = 0
        self.connections = 0
        self._attempt = 0
        self._caught_up = False
        self._session_renewed = False
        loop = self.loop
        self._saved_at = loop.time()
        if loop.in_loop_thread() or not loop.is_running():
            loop.call_soon(self._connect)
        else:
            loop.call_soon_threadsafe(self._connect)
        return self

    def wait(
        self,
        callback: Optional[Union[Callback, BatchCallback]] = None,
        since: Any = 0,
        **params: Any,
    ) -> None:
        """Follow the continuous feed, calling the callbacks per change (or per batch, with
        ``batch_size``), until :meth:`stop`.

        Runs the loop in this thread (serving every other consumer on it too). Returns when the
        consumer is stopped: by :meth:`stop` from a callback or another thread, by ``limit``, or
        by Ctrl-C (the checkpoint is saved first).

        Raises:
            HTTPError, TLSError, CallbackError...: the fatal error that stopped the consumer.
            RuntimeError: the loop already runs, in another thread or around this call (use
                :meth:`start` there).
        """
        loop = self.loop
        if loop.is_running():  # before start(): a refused wait() must not leave a feed behind
            raise RuntimeError("the loop is already running: use start() on a running loop")
        self.start(callback, since, **params)
        self._blocking = True
        try:
            loop.run(forever=True)
        except KeyboardInterrupt:
            logger.info("%s: interrupted; stopping", self.db.name)
            self._blocking = False  # run() has returned: a loop.stop() now would end the next one
            self._finish(None)
        finally:
            self._blocking = False
        if self.error is not None:
            raise self.error

    def changes(self, since: Any = 0, feed: str = "continuous", **params: Any) -> "ChangesIterator":
        """Iterate over changes lazily: ``for change in consumer.changes(since=0): ...``.

        A continuous feed runs on the consumer's loop while the iteration asks for more; a
        ``normal`` or ``longpoll`` feed yields the rows of one request. Close the iterator (or
        use it as a context manager) to stop early.
        """
        iterator = ChangesIterator(self, since, feed, params)
        if iterator._follower is not None:
            running = [f for f in self._followers if f.running]
            self._followers = running + [iterator._follower]
        return iterator

    def stop(self) -> None:
        """Stop the continuous feed and save the checkpoint. Thread-safe; idempotent.

        From a callback, the change being delivered counts as delivered: the stop takes effect
        when the callbacks for it have returned.
        """
        if self._state in (_IDLE, _STOPPED):
            return
        if self._delivering:
            self._stop_requested = True
            return
        loop = self.loop
        if loop.in_loop_thread() or not loop.is_running():
            self._finish(None)
        else:
            loop.call_soon_threadsafe(self._finish, None)

    # -- the loop's handler -------------------------------------------------------------------

    def handle_write(self) -> None:
        self.handle_read()

    def handle_error(self, exc: BaseException) -> None:
        self._fail(exc)

    def _connect(self) -> None:
        if (self._state != _CONNECTING and self._state != _BACKOFF) or self._stream is not None:
            return  # stopped meanwhile, or a stale call from before a stop() and a new start()
        self._state = _CONNECTING
        self._timer = None
        loop = self.loop
        gate = _GATES.get(loop)
        if gate is None:
            gate = _GATES[loop] = _ConnectGate()
        if self not in gate.connecting:
            if len(gate.connecting) >= MAX_CONNECTING_PER_LOOP:
                if not self._in_waiting:  # _leave_gate() calls _connect again in turn
                    self._in_waiting = True
                    gate.waiting.append(self)
                return
            gate.connecting.add(self)
        self._connected_at = None
        self._body_seen = False
        self._last_activity = loop.time()
        resolving = self._since == "now"  # ask where "now" is first; follow from there next
        try:
            # Any step may fail, the session login of Server(session=True) (a blocking
            # request) included: report it and retry or stop, never stay "connecting" for ever.
            stream = self._stream = self._open_stream(resolving)
            if not resolving:
                self.connections += 1
            stream.start()
        except Exception as exc:
            self._fail(exc)
            return
        self._register(stream)
        self._timer = loop.call_later(self.connect_timeout, self._check_connect, stream)
        logger.debug("%s: connecting (since=%r)", self.db.name, self._since)

    def _leave_gate(self) -> None:
        """Connected, failed or stopped: let the next waiting consumer of the loop connect."""
        gate = _GATES.get(self.loop)
        if gate is None or self not in gate.connecting:
            return
        gate.connecting.discard(self)
        while gate.waiting and len(gate.connecting) < MAX_CONNECTING_PER_LOOP:
            successor = gate.waiting.popleft()
            successor._in_waiting = False
            if successor._state in (_CONNECTING, _BACKOFF) and successor._stream is None:
                gate.connecting.add(successor)
                self.loop.call_soon(successor._connect)

    def _feed_path(self) -> str:
        """The path of the feed followed; a subclass may follow another one (``_db_updates``)."""
        return self.db.path + "/_changes"

    def _request(self, feed: str, since: Any, params: Dict[str, Any]) -> ChangesRequest:
        return changes_request(self.db.path, feed, since, params)._replace(path=self._feed_path())

    def _open_stream(self, resolving: bool) -> FeedStream:
        server = self.db.server
        endpoint = server._endpoint
        if resolving:
            request = self._request("normal", "now", {})
        else:
            request = self._request("continuous", self._since, self._params)
        target = endpoint.prefix + request.path + "?" + encode_query(request.query)
        self._sent_cookie = None  # until the headers are there: a refused login sends none
        headers = server.request_headers()
        self._sent_cookie = next((v for k, v in headers if k == "Cookie"), None)
        if request.body is not None:
            headers.append(("Content-Type", "application/json"))
        data = serialize_request(
            request.method, target, endpoint.host_header, headers, request.body
        )
        connection = self._connect_with(
            endpoint.host, endpoint.port, ssl_context=endpoint.ssl_context
        )
        return FeedStream(
            connection,
            data,
            server.url + request.path,
            max_line_bytes=self.max_line_bytes,
            method=request.method,
            min_rows=self.batch_size or 1,
            document=resolving,
        )

    def _register(self, stream: FeedStream) -> None:
        want = stream.want()
        fd = stream.fileno()
        loop = self.loop
        if fd != self._fd:
            if self._fd >= 0:
                loop.remove_handler(self._fd)
            self._fd = fd
            loop.add_handler(fd, self, read=want is Want.READ, write=want is Want.WRITE)
        else:
            loop.set_interest(fd, read=want is Want.READ, write=want is Want.WRITE)

    def handle_read(self) -> None:
        stream = self._stream
        if stream is None:
            return
        loop = self._loop
        assert loop is not None  # a stream runs on the loop: it exists
        rows = stream.on_ready()
        self._last_activity = loop.time()
        if rows is None:  # a lone heartbeat: what an idle feed's every read brings
            if self._body_seen and self._caught_up:
                return  # nothing to act on: the watchdog already allows for heartbeats
            rows = []
        decoder = stream.decoder
        if stream.document is not None:
            self._on_resolved(stream.document)
            return
        # Every user callback below may stop the consumer (or, failing, make it stop): after
        # each one, a stream that is no longer ours means there is nothing left to do.
        if self._connected_at is None:
            if stream.streaming and not stream.one_shot:
                self._on_connected()
                if stream is not self._stream:
                    return
        elif not self._body_seen and (decoder.rows or decoder.heartbeats):
            self._arm_watchdog()  # the first body line came: the heartbeat allowance applies
        if rows:
            self._deliver(rows)
            if stream is not self._stream:
                return
        last = stream.last_seq
        if last is not None and last.seq is not None:
            self._since = last.seq  # every row before it is delivered: resume from here
        if not self._caught_up and (decoder.heartbeats or (last is not None and last.pending == 0)):
            self._report_caught_up(None if last is None else last.pending)
            if stream is not self._stream:
                return
        if stream.error is not None:
            self._fail(stream.error)  # after what the same read brought before it
            return
        if stream.ended:
            self._on_end(stream)
            return
        if self._state == _CONNECTING:  # only then can the fd (next address) or interest change
            self._register(stream)
        if stream.has_buffered_bytes():
            loop.call_soon(self.handle_read)  # TLS holds bytes that select() will not report

    def _on_resolved(self, document: Dict[str, Any]) -> None:
        """``since="now"`` has an answer: follow the continuous feed from that seq."""
        seq = document.get("last_seq")
        if seq is None:
            self._fail(FeedError("the answer to since=now has no last_seq"))
            return
        self._close_stream()
        self._since = seq
        self._connect()

    def _on_connected(self) -> None:
        loop = self.loop
        self._connected_at = loop.time()
        self._session_renewed = False
        self._state = _STREAMING
        self._leave_gate()
        self._arm_watchdog()  # replaces the connect timer
        logger.info("%s: following changes since %r", self.db.name, self._since)
        self._report(self.on_connect, FeedEvent(self, "connect"))

    def _deliver(self, rows: List[Change]) -> None:
        """Hand rows to the callbacks: the one place user code runs.

        Per row, only the callbacks run: the counters and the seq are brought up to date by
        :meth:`_account` once per batch, and before anything that reads them (a failing
        callback, a checkpoint, a stop, an exception escaping a callback).
        """
        if self._limit is not None:
            rows = rows[: max(0, self._limit - self.delivered)]
        if self.batch_size is not None:
            self._deliver_batches(rows, self.batch_size)
            return
        callbacks = self._callbacks
        single = callbacks[0] if len(callbacks) == 1 else None
        accounted = 0  # rows[:accounted] are counted already
        done = 0  # rows[:done] went through every callback (or were skipped)
        # Per change, not per batch: a read can bring hundreds of rows, and a crash must not
        # replay more than checkpoint_every of them.
        save_at = (
            max(1, self.checkpoint_every - self._unsaved)
            if self.checkpoint is not None
            else len(rows) + 1
        )
        self._delivering = True
        try:
            for row in rows:
                try:
                    if single is not None:
                        single(row)
                    else:
                        for callback in callbacks:
                            callback(row)
                except Exception as exc:
                    self._account(rows, accounted, done)
                    accounted = done
                    if not self._callback_failed("change %r" % (row.get("id"),), exc):
                        return
                done += 1
                if done == save_at:
                    self._account(rows, accounted, done)
                    accounted = done
                    self._save_checkpoint()
                    save_at = done + self.checkpoint_every
                if self._stop_requested:
                    break
        finally:
            self._account(rows, accounted, done)
            self._delivering = False
        self._after_delivery()

    def _deliver_batches(self, rows: List[Change], size: int) -> None:
        """Hand rows to the callbacks in lists of at most ``size``: batch mode's ``_deliver``."""
        callbacks = self._callbacks
        self._delivering = True
        try:
            for start in range(0, len(rows), size):
                batch = rows[start : start + size]
                try:
                    for callback in callbacks:
                        callback(batch)
                except Exception as exc:
                    what = "a batch of %d changes (the first %r)" % (len(batch), batch[0].get("id"))
                    if not self._callback_failed(what, exc):
                        return
                self._account(batch, 0, len(batch))
                if self.checkpoint is not None and self._unsaved >= self.checkpoint_every:
                    self._save_checkpoint()
                if self._stop_requested:
                    break
        finally:
            self._delivering = False
        self._after_delivery()

    def _after_delivery(self) -> None:
        """Stop when asked or when the limit is reached; save the checkpoint when it is time."""
        if self._stop_requested or (self._limit is not None and self.delivered >= self._limit):
            self._finish(None)  # after the bookkeeping, so the checkpoint includes it
            return
        if (
            self.checkpoint is not None
            and self._unsaved
            and self.loop.time() - self._saved_at >= self.checkpoint_interval
        ):
            self._save_checkpoint()

    def _account(self, rows: List[Change], start: int, stop: int) -> None:
        """Count ``rows[start:stop]`` as delivered and move ``last_seq`` to the last real seq."""
        if stop <= start:
            return
        self.delivered += stop - start
        self._unsaved += stop - start
        for index in range(stop - 1, start - 1, -1):
            seq = rows[index].get("seq")
            if seq is not None:  # with seq_interval most rows have none: keep the last real one
                self._since = seq
                return

    def _callback_failed(self, what: str, exc: Exception) -> bool:
        """Report a failing callback (on ``what``); return whether to go on with the next."""
        error = CallbackError("a callback raised on %s: %r" % (what, exc))
        error.__cause__ = exc
        if self.callback_errors == "skip":
            logger.warning("%s: %s; skipping it", self.db.name, error)
            self._report(self.on_error, FeedEvent(self, "error", error=error, will_retry=False))
            return True
        logger.error("%s: %s; stopping", self.db.name, error)
        self._report(self.on_error, FeedEvent(self, "error", error=error, will_retry=False))
        self._finish(error)
        return False

    def _on_end(self, stream: FeedStream) -> None:
        last = stream.last_seq
        if last is None:  # a proxy's cut, or a server that is not CouchDB: resume after a backoff
            self._fail(FeedError("the server ended the feed without a last_seq line"))
            return
        if self._limit is not None:
            self._finish(None)  # the server applied the limit
            return
        loop = self.loop
        lasted = loop.time() - (self._connected_at or loop.time())
        idle = stream.decoder.rows == 0 and lasted < QUICK_END_S
        self._close_stream()
        logger.debug("%s: the server ended the feed at %r; resuming", self.db.name, last.seq)
        self._report(self.on_disconnect, FeedEvent(self, "disconnect"))
        if self._state == _STOPPED:
            return  # stopped by the on_disconnect callback
        self._state = _BACKOFF
        if not idle:
            self._attempt = 0  # a feed that ran its course: follow on at once
            loop.call_soon(self._connect)
            return
        # Ended at once with nothing new (timeout=0, a proxy that cuts every response short):
        # reconnecting at once would spin, so these ends back off as failures do.
        delay = self._backoff()
        logger.info(
            "%s: the server ended the feed after %.2f s with nothing new; reconnecting in %.2f s",
            self.db.name,
            lasted,
            delay,
        )
        self._timer = loop.call_later(delay, self._connect)

    def _report_caught_up(self, pending: Optional[int]) -> None:
        self._caught_up = True
        self._report(self.on_caught_up, FeedEvent(self, "caught_up", pending=pending))

    # -- failure, backoff and the watchdog --------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Close the stream; reconnect after a backoff, or stop if ``exc`` is fatal."""
        if self._state in (_IDLE, _STOPPED):
            return
        self._leave_gate()
        connected_at = self._connected_at
        was_connected = connected_at is not None
        if connected_at is not None and self.loop.time() - connected_at >= self.healthy_after:
            self._attempt = 0
        self._close_stream()
        fatal = _is_fatal(exc) and not self._renews_session(exc)
        delay = None if fatal else self._backoff()
        if fatal:
            logger.error("%s: %s; stopping", self.db.name, exc)
        else:
            logger.warning("%s: %s; reconnecting in %.2f s", self.db.name, exc, delay or 0.0)
        if was_connected:
            self._report(self.on_disconnect, FeedEvent(self, "disconnect", error=exc))
        self._report(
            self.on_error, FeedEvent(self, "error", error=exc, will_retry=not fatal, retry_in=delay)
        )
        if self._state == _STOPPED:
            return  # an on_error callback stopped the consumer
        if fatal:
            self._finish(exc)
            return
        self._state = _BACKOFF
        self._timer = self.loop.call_later(delay or 0.0, self._connect)

    def _renews_session(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a 401 for an expired session cookie, dropped now so that the next
        connection logs in again. Once: a 401 again before a feed opens (a login refused, a
        password changed) is fatal."""
        if not isinstance(exc, HTTPError) or exc.status != 401:
            return False
        if self._session_renewed or self._sent_cookie is None:
            return False  # refused right after a login, or no cookie was sent at all
        # Every feed of the server meets the expiry at once: the first of them drops the cookie,
        # the others find it dropped (or renewed already) and simply reconnect.
        self.db.server.expire_session(self._sent_cookie)
        self._session_renewed = True
        logger.info("%s: the session cookie was refused; logging in again", self.db.name)
        return True

    def _backoff(self) -> float:
        ceiling = min(self.reconnect_cap, self.reconnect_base * (2 ** min(self._attempt, 32)))
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def _check_connect(self, stream: FeedStream) -> None:
        self._timer = None
        if stream is self._stream and self._connected_at is None:
            if stream.state in ("connecting",):
                self._fail(stream.connect_timeout_error())
            else:
                self._arm_watchdog()  # connected, waiting for the head: the watchdog takes over

    def _arm_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()  # the connect timer: the watchdog takes over
            self._timer = None
        decoder = None if self._stream is None else self._stream.decoder
        self._body_seen = decoder is not None and bool(decoder.rows or decoder.heartbeats)
        wheel = self._watchdogs()
        if wheel is None:  # the first time, or the loop's wheel emptied and went
            wheel = _watchdogs_of(self.loop)
            self._watchdogs = weakref.ref(wheel)  # the registry's own reference: no new object
        wheel.set(self, self._last_activity + self._allowance())

    def _allowance(self) -> float:
        stream = self._stream
        if stream is None or stream.decoder.rows or stream.decoder.heartbeats:
            return self._silence
        return max(self._silence, self.first_byte_timeout)  # nothing of the body yet

    def _watchdog(self) -> None:
        """Fire at most once per allowance: O(1) per feed, whatever the traffic.

        On a loop of idle feeds this runs for every feed once in two or three heartbeats, so
        the usual case (the body began: the heartbeat allowance) reads no more than it needs.
        """
        watchdogs = self._watchdogs()
        loop = self._loop
        if self._stream is None or watchdogs is None or loop is None:
            return
        allowance = self._silence if self._body_seen else self._allowance()
        last = self._last_activity
        idle = loop.time() - last
        if idle >= allowance:
            self._fail(ReadTimeout("no data for %.1f s: the connection is presumed dead" % idle))
        else:
            watchdogs.set(self, last + allowance)

    def _close_stream(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        watchdogs = self._watchdogs()
        if watchdogs is not None:
            watchdogs.discard(self)
        if self._fd >= 0:
            self.loop.remove_handler(self._fd)
            self._fd = -1
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _finish(self, error: Optional[BaseException]) -> None:
        """Stop for good: close, save the checkpoint, tell a blocking ``wait`` to return."""
        if self._state in (_IDLE, _STOPPED):
            return
        was_connected = self._stream is not None and self._connected_at is not None
        self._close_stream()
        self._state = _STOPPED
        self._leave_gate()
        self.error = error
        if self.checkpoint is not None:
            try:
                self._save_checkpoint()
            except Exception:
                logger.exception("%s: saving the checkpoint on stop failed", self.db.name)
        if was_connected and error is None:
            self._report(self.on_disconnect, FeedEvent(self, "disconnect"))
        logger.info("%s: stopped after %d changes", self.db.name, self.delivered)
        if self._blocking:
            self.loop.stop()

    def _save_checkpoint(self) -> None:
        self._unsaved = 0
        self._saved_at = self.loop.time()
        if self._since not in (None, "now") and self.checkpoint is not None:
            self.checkpoint.save(self._since)

    def _report(self, callback: Optional[Callable[[FeedEvent], Any]], event: FeedEvent) -> None:
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            logger.exception("%s: the %s callback raised", self.db.name, event.kind)


def _is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, HTTPError):
        return exc.status in FATAL_STATUSES
    if isinstance(exc, (TLSError, LineTooLongError, CallbackError)):
        return True
    return not isinstance(exc, ChangeloopError)  # a bug of ours, not the network's: don't spin


class ChangesIterator:
    """The iterator :meth:`Consumer.changes` returns; see there.

    A continuous feed runs on a second consumer with the first one's settings (its callbacks
    queue the rows here). With a checkpoint store, what is saved is the seq of the last change
    :meth:`__next__` *returned*, not the last one queued: changes dropped by :meth:`close` are
    delivered again next time.
    """

    def __init__(self, consumer: Consumer, since: Any, feed: str, params: Dict[str, Any]) -> None:
        self._queue: Deque[Change] = collections.deque()
        self._one_shot: Optional[Iterator[Change]] = None
        self._follower: Optional[Consumer] = None
        self._returned_seq: Any = None  # the seq of the last change handed out
        if feed == "continuous":
            checkpoint = consumer.checkpoint
            follower = Consumer(
                consumer.db,
                consumer.loop,
                checkpoint=None if checkpoint is None else _ReturnedSeq(checkpoint, self),
                on_error=consumer.on_error,
                on_connect=consumer.on_connect,
                on_disconnect=consumer.on_disconnect,
                on_caught_up=consumer.on_caught_up,
                reconnect_base=consumer.reconnect_base,
                reconnect_cap=consumer.reconnect_cap,
                healthy_after=consumer.healthy_after,
                watchdog_heartbeats=consumer.watchdog_heartbeats,
                first_byte_timeout=consumer.first_byte_timeout,
                connect_timeout=consumer.connect_timeout,
                checkpoint_every=consumer.checkpoint_every,
                checkpoint_interval=consumer.checkpoint_interval,
                max_line_bytes=consumer.max_line_bytes,
                rng=consumer._rng,
            )
            follower.start(self._queue.append, since, **params)
            self._follower = follower
        elif feed == "longpoll":
            self._one_shot = iter(consumer.wait_once(since, **params)["results"])
        else:
            self._one_shot = iter(consumer._one_shot(feed, since, params)["results"])

    def __iter__(self) -> "ChangesIterator":
        return self

    def __next__(self) -> Change:
        if self._one_shot is not None:
            return next(self._one_shot)
        follower = self._follower
        assert follower is not None
        while not self._queue:
            if not follower.running:
                if follower.error is not None:
                    raise follower.error
                raise StopIteration
            follower.loop.run_once(None)
        change = self._queue.popleft()
        if change.get("seq") is not None:
            self._returned_seq = change["seq"]
        return change

    def close(self) -> None:
        """Stop following; the changes already received but not returned are dropped."""
        if self._follower is not None:
            self._follower.stop()
        self._queue.clear()

    def __enter__(self) -> "ChangesIterator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ReturnedSeq:
    """A checkpoint store seen through a :class:`ChangesIterator`: it saves the seq of the last
    change the iteration returned, whatever seq the consumer behind it has reached."""

    def __init__(self, store: Any, iterator: ChangesIterator) -> None:
        self._store = store
        self._iterator = iterator

    def load(self) -> Any:
        return self._store.load()

    def save(self, seq: Any) -> None:
        returned = self._iterator._returned_seq
        if returned is not None:
            self._store.save(returned)
