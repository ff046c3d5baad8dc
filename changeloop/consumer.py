"""``Consumer``: follow a database's ``_changes`` feed, the couchdbkit way, losing no change.

``fetch`` (feed=normal) and ``wait_once`` (feed=longpoll) are one-shot requests on the blocking
client. ``start`` attaches a continuous feed to a :class:`~changeloop.loop.Loop`, where many
consumers share one thread; ``wait`` is ``start`` plus running the loop until this consumer stops;
``changes`` is the same as an iterator.

A continuous feed is a state machine (:mod:`changeloop._follow`: its states, deadlines and the one
failure route), whose rows reach the callbacks in :mod:`changeloop._delivery`, the one place user
code runs. Any network, protocol or feed failure, an end without ``last_seq``, a 408/429 or a 5xx
closes the connection (after delivering the rows that came before it) and reconnects after a
full-jitter exponential backoff, resuming after the last change *delivered*; other statuses and
TLS failures are fatal. ``since="now"`` is first turned into a real seq, so no reconnection ever
says "now" again. Every phase of a connection is watched for silence: with heartbeats, three
missed heartbeats replace it. A ``checkpoint`` store saves the last delivered seq (throttled, and
on stop), so a restarted consumer resumes there: delivery is at-least-once.
"""

import logging
import random
from typing import Any, Callable, Dict, Optional, Union

from . import _legacy, _states
from ._delivery import (
    CHECKPOINT_EVERY_CHANGES,
    CHECKPOINT_EVERY_S,
    BatchCallback,
    Callback,
    Change,
)
from ._feed import MAX_LINE_BYTES
from ._iterate import ChangesIterator
from ._params import (
    DEFAULT_HEARTBEAT_MS,
)
from ._perloop import BLOCKING, no_wheel
from ._policy import (
    _SHARED_RNG,
    CONNECT_TIMEOUT_S,
    HEALTHY_AFTER_S,
    MAX_CONNECTING_PER_LOOP,
    RECONNECT_BASE_S,
    RECONNECT_CAP_S,
    RETRY_FOREVER,
    WATCHDOG_HEARTBEATS,
    WATCHDOG_RESOLUTION,
)
from ._requests import _Requests
from .client import Database
from .loop import Loop

__all__ = [
    "Consumer",
    "FeedEvent",
    "Change",
    "Callback",
    "BatchCallback",
    "ChangesIterator",
    "CHECKPOINT_EVERY_CHANGES",
    "CHECKPOINT_EVERY_S",
    "CONNECT_TIMEOUT_S",
    "HEALTHY_AFTER_S",
    "MAX_CONNECTING_PER_LOOP",
    "RECONNECT_BASE_S",
    "RECONNECT_CAP_S",
    "WATCHDOG_HEARTBEATS",
    "WATCHDOG_RESOLUTION",
]

logger = logging.getLogger(__name__)

#: The public :attr:`Consumer.state` of each state of the machine (:attr:`Consumer.phase` tells
#: which connection phase ``connecting`` is in).
_PUBLIC_STATE = {
    _states.IDLE: "idle",
    _states.WAITING: "connecting",
    _states.CONNECTING: "connecting",
    _states.SENDING: "connecting",
    _states.AWAITING: "connecting",
    _states.STREAMING: "streaming",
    _states.BACKOFF: "backoff",
    _states.STOPPED: "stopped",
}


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


class Consumer(_Requests):
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
        healthy_after: seconds a connection must stay up to reset the backoff (a connection
            that delivered a change resets it too).
        watchdog_heartbeats: heartbeats of silence that declare a connection dead, in every
            phase of it (noticed up to ``WATCHDOG_RESOLUTION`` later).
        first_byte_timeout: seconds a server may take to start its response, instead of the
            heartbeat allowance; ``None`` (the default) holds that phase to the same allowance as
            every other, which every known server meets (CouchDB 2+ answers at once, older
            servers and ``_db_updates`` with the first heartbeat).
        connect_timeout: the most seconds to connect (TCP and TLS), if the heartbeat allowance
            is longer still.
        max_line_bytes: the longest feed line accepted.
        batch_size: deliver changes in lists of at most this many, one callback call per list
            (for consumers that write in bulk). A batch holds the changes that are there at
            once: while catching up it fills, when changes trickle in it may hold one, and it
            is never held back waiting for more. The batch is the unit of delivery: it counts
            as delivered when the callbacks return, checkpoints fall between batches, and a
            failing callback stops (or, with ``"skip"``, skips) the whole batch.
        max_retries: give up after this many failed attempts in a row (connections that
            failed, or ended at once with nothing new), stopping with
            :class:`~changeloop.errors.GaveUpError`; ``None`` (the default) retries for ever,
            so a long outage is survived. Fatal errors (a 404, a refused login) stop at once
            whatever this says.
        max_outage: give up once this many seconds passed without a healthy connection (one
            that delivered a change or stayed up ``healthy_after``); ``None``: never.
        rng: the random source of the backoff jitter (for tests).
        backend: couchdbkit's, accepted as ``"sync"`` only (which is what a loop is; also as
            the second positional argument, where couchdbkit had it): ``"gevent"`` and
            ``"eventlet"`` raise ``ValueError``, saying what to use instead.
    """

    # Slots, not a per-instance dict: CPython 3.11+ stores up to 30 attributes inline in the
    # object (shared keys) but gives every instance of a class with more its own full dict,
    # about 1.6 KB; a consumer has 40. "__dict__" stays in the slots, so a subclass's or a
    # user's extra attributes still work (that dict is created only when one is set).
    __slots__ = (
        "_loop",
        "_loop_thread",
        "_own_loop",
        "_rng",
        "_followers",
        "connect_timeout",
        "db",
        "first_byte_timeout",
        "healthy_after",
        "max_line_bytes",
        "reconnect_base",
        "reconnect_cap",
        "watchdog_heartbeats",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        db: Database,
        loop: Optional[Loop] = None,
        *,
        backend: str = "sync",
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
        first_byte_timeout: Optional[float] = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        checkpoint_every: int = CHECKPOINT_EVERY_CHANGES,
        checkpoint_interval: float = CHECKPOINT_EVERY_S,
        max_line_bytes: int = MAX_LINE_BYTES,
        batch_size: Optional[int] = None,
        max_retries: Optional[int] = None,
        max_outage: Optional[float] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        given: Any = loop
        if isinstance(given, str):  # Consumer(db, "sync"), as couchdbkit 0.5 took its backend
            loop, backend = None, given
        _legacy.check_backend(backend)
        if callback_errors not in ("stop", "skip"):
            raise ValueError("callback_errors must be 'stop' or 'skip'")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError("batch_size must be a positive integer or None")
        if max_retries is not None and (type(max_retries) is not int or max_retries < 0):
            raise ValueError("max_retries must be a count (0 or more) or None")
        if max_outage is not None and not max_outage > 0:
            raise ValueError("max_outage must be a positive number of seconds or None")
        self._init_requests()
        # Each setting keeps its constructor argument's name and meaning (see the class's Args);
        # changing one takes effect at the next start() or connection.
        self.db = db  #: The database followed.
        self._loop = loop
        self._own_loop = loop is None
        self._loop_thread: Any = None  # serving the own loop for wait_async() (see _legacy)
        self.checkpoint = checkpoint  #: The checkpoint store, or ``None``.
        self.on_error = on_error  #: Called with a :class:`FeedEvent` on each error.
        self.on_connect = on_connect  #: Called with a :class:`FeedEvent` when a feed opens.
        self.on_disconnect = on_disconnect  #: Called with a :class:`FeedEvent` when one closes.
        self.on_caught_up = on_caught_up  #: Called once a run has caught up with the server.
        self.callback_errors = callback_errors  #: ``"stop"`` or ``"skip"``.
        self.reconnect_base = reconnect_base  #: The backoff's first ceiling, in seconds.
        self.reconnect_cap = reconnect_cap  #: The backoff's largest ceiling, in seconds.
        self.healthy_after = healthy_after  #: Seconds up that reset the backoff.
        self.watchdog_heartbeats = watchdog_heartbeats  #: Silent heartbeats that end a connection.
        self.first_byte_timeout = first_byte_timeout  #: A first-byte allowance, or ``None``.
        self.connect_timeout = connect_timeout  #: The most seconds to connect.
        self.checkpoint_every = checkpoint_every  #: Changes between checkpoints.
        self.checkpoint_interval = checkpoint_interval  #: Seconds between checkpoints.
        self.max_line_bytes = max_line_bytes  #: The longest feed line accepted.
        self.batch_size = batch_size  #: Changes per callback call, or ``None`` for one.
        self.max_retries = max_retries
        self.max_outage = max_outage
        self._rng = rng or _SHARED_RNG
        self._followers: Any = ()  # the consumers of changes() iterators (a tuple until one)

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
    def loop(self) -> Loop:  # type: ignore[override]
        """The loop continuous feeds run on (created on first use if none was given)."""
        if self._loop is None:
            self._loop = Loop()
        return self._loop

    @property
    def last_seq(self) -> Any:
        """The seq of the last change delivered (or where the feed will start).

        Brought up to date as ``delivered`` is (inside a callback, the change itself has
        its ``seq``); the checkpoint always stores it after the changes it covers.
        """
        return self._since

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``streaming``, ``backoff`` or ``stopped``."""
        state: str = _PUBLIC_STATE[self._state]
        return state

    @property
    def phase(self) -> str:
        """The state machine's own state, finer than :attr:`state`.

        ``connecting`` is told apart as ``waiting`` (for a turn to connect), ``connecting``,
        ``sending`` or ``awaiting`` (the response); see "How it works" in the docs."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether a continuous feed is started and not stopped."""
        return self._state != _states.IDLE and self._state != _states.STOPPED

    def close(self) -> None:
        """Stop the feed, any ``changes()`` iteration and ``wait_once_async()`` request, and
        close the loop if the consumer created it (stopping the thread ``wait_async`` ran it in
        first)."""
        self.stop()
        for follower in self._followers:
            follower.stop()
        self._followers = ()
        _legacy.stop_background(self)
        if self._own_loop and self._loop is not None and not self._loop.is_running():
            self._loop.close()
            self._loop = None
            self._watchdogs = no_wheel

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one-shot feeds (blocking) -------------------------------------------------------------

    def fetch(
        self, since: Any = None, /, cb: Optional[Callback] = None, **params: Any
    ) -> Dict[str, Any]:
        """Return the changes since ``since`` at once (``feed=normal``).

        Args:
            since: the seq to start after (``0``, the default, ``"now"``, or a seq as the
                server gave it), by position or keyword. A callable first argument is
                couchdbkit 0.5's ``cb`` (``fetch(cb, since=seq)``).
            cb: called with the answer before it is returned (couchdbkit 0.5's form).
            params: filters (``filter_name`` or ``filter``, ``doc_ids``, ``selector``,
                ``view``) and any ``_changes`` parameter (``include_docs=True``, ``limit``,
                ``descending``, ``heartbeat=True``...); never a callable (``TypeError``).

        Returns:
            dict: CouchDB's answer, ``{"results": [...], "last_seq": ..., "pending": ...}``.

        Raises:
            HTTPError: e.g. ``NotFound`` for a missing database or filter.
            NetworkError, ProtocolError, FeedError: the request failed.
        """
        since, cb = _legacy.split_cb(since, cb, params)
        answer = self._one_shot("normal", since, params)
        if cb is not None:
            cb(answer)
        return answer

    def wait_once(
        self, since: Any = None, /, cb: Optional[Callback] = None, **params: Any
    ) -> Dict[str, Any]:
        """Wait for the next changes after ``since`` and return CouchDB's whole answer
        (``feed=longpoll``): ``{"results": [...], "last_seq": ...}``.

        Blocks until a change arrives or the server's ``timeout`` (milliseconds, CouchDB's
        parameter) passes. A heartbeat (``heartbeat=`` in ms, 30 s by default) keeps a silent
        wait alive; the read gives up after ``WATCHDOG_HEARTBEATS`` missed heartbeats.

        As couchdbkit's did, it hands the whole answer to every registered callback (see
        :meth:`register_callback`), then to ``cb``, before returning it. Arguments and errors
        are those of :meth:`fetch`.
        """
        since, cb = _legacy.split_cb(since, cb, params)
        params.setdefault("heartbeat", DEFAULT_HEARTBEAT_MS)
        answer = self._one_shot("longpoll", since, params)
        callbacks = self._callbacks
        if cb is not None and cb not in callbacks:
            callbacks += (cb,)
        for callback in callbacks:
            callback(answer)
        return answer

    # -- continuous feeds ---------------------------------------------------------------------

    def register_callback(self, callback: Union[Callback, BatchCallback]) -> None:
        """Add a callback for every continuous feed of this consumer; callbacks run in the
        order they were added. Registering the same callable again adds nothing.

        A callback receives one change (a dict), or with ``batch_size`` a list of changes;
        from :meth:`wait_once` (and :meth:`wait_once_async`), the whole answer.
        """
        if not callable(callback):
            raise TypeError("a callback must be callable")
        if callback in self._callbacks:
            return
        self._callbacks += (callback,)
        if self.running and callback not in self._active:
            self._active += (callback,)

    def start(
        self,
        callback: Optional[Union[Callback, BatchCallback]] = None,
        since: Any = 0,
        **params: Any,
    ) -> "Consumer":
        """Attach a continuous feed to the loop and return at once. Thread-safe.

        The loop's :meth:`~changeloop.loop.Loop.run` (or any run tier) then serves this feed
        beside every other consumer on it. Called from another thread while the loop runs, the
        feed starts in the loop's next pass (:attr:`running` becomes true then).

        Args:
            callback: a callback for this run only, after the registered ones (see
                :meth:`register_callback`): a second ``start`` or ``wait`` with the same
                callback does not call it twice. ``cb=`` (couchdbkit 0.5) names it too.
            since: where to start when the checkpoint store has nothing: ``0``, ``"now"``, a seq.
                ``"now"`` is first turned into the current seq (a ``feed=normal&since=now``
                request on the loop): a reconnection or a checkpoint that said "now" again
                would skip whatever changed in between.
            params: as for :meth:`fetch`, but for ``feed``, which is ``continuous`` here;
                ``heartbeat`` (ms) defaults to 30 s; ``limit`` stops the consumer after that
                many changes, counted across reconnections.

        Raises:
            RuntimeError: the consumer is already running, has no callback, or its loop is
                closed.
            ValueError: a ``feed`` parameter, or parameters CouchDB would refuse.
        """
        self._start(callback, since, params)
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
        consumer is stopped: by :meth:`stop` from a callback or another thread, or by ``limit``.
        Ctrl-C stops it too, saves the checkpoint, and re-raises ``KeyboardInterrupt``.

        Raises:
            HTTPError, TLSError, CallbackError...: the fatal error that stopped the consumer.
            RuntimeError: the loop already runs, in another thread or around this call (use
                :meth:`start` there).
        """
        loop = self.loop
        if loop.is_running():  # before start(): a refused wait() must not leave a feed behind
            raise RuntimeError("the loop is already running: use start() on a running loop")
        BLOCKING[loop] = self  # before start(): a stop() from elsewhere must end the run
        try:
            self.start(callback, since, **params)
        except BaseException:
            BLOCKING.pop(loop, None)
            raise
        try:
            loop.run(forever=True)
        except KeyboardInterrupt:
            logger.info("%s: interrupted; stopping", self.db.name)
            BLOCKING.pop(loop, None)  # run() has returned: a loop.stop() now would end the next
            loop.call_threadsafe(self._finish, None)  # the checkpoint is saved, then:
            raise
        finally:
            BLOCKING.pop(loop, None)
        if self.error is not None:
            raise self.error

    def wait_async(
        self,
        callback: Optional[Union[Callback, BatchCallback]] = None,
        since: Any = 0,
        **params: Any,
    ) -> "Consumer":
        """Follow the continuous feed without blocking (couchdbkit 0.5): :meth:`start`, and if
        the consumer made its own loop and nothing runs it, that loop run in a daemon thread
        (:meth:`~changeloop.loop.Loop.run_in_thread`), where the callbacks then run. A loop
        given to the consumer is served by whoever serves it. :meth:`close` stops both.

        Returns:
            this consumer (``stop()`` ends the feed). Arguments are those of :meth:`start`.
        """
        self.start(callback, since, **params)
        _legacy.serve_in_background(self)
        return self

    def wait_once_async(
        self, cb: Optional[Callback] = None, since: Any = 0, **params: Any
    ) -> "Consumer":
        """Ask for the next changes (``feed=longpoll``) without blocking (couchdbkit 0.5).

        The request runs on this consumer's loop, served as for :meth:`wait_async`; the
        registered callbacks and then ``cb`` receive the whole answer, as from
        :meth:`wait_once`, on the loop's thread. A network failure before the answer asks again.

        Returns:
            Consumer: the consumer of that one request (on this consumer's loop), ``running``
            until the answer was handed over; ``stop()`` cancels it, ``error`` tells why it
            stopped if it failed, ``last_seq`` is then the answer's. :meth:`close` stops it too.
        """
        return _legacy.longpoll_once(self, _LongpollOnce, cb, since, params)

    def changes(self, since: Any = 0, feed: str = "continuous", **params: Any) -> ChangesIterator:
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
        when the callbacks for it have returned. From another thread while the loop runs, it
        takes effect in the loop's next pass, behind anything that thread asked before.
        """
        loop = self._loop
        if loop is not None:
            loop.call_threadsafe(self._request_stop)

    def pause(self) -> None:
        """Stop reading this feed: TCP's flow control then holds the server back, and the
        silence watchdog rests. Thread-safe; idempotent.

        For backpressure: a callback that hands changes to a bounded queue served by another
        thread pauses when the queue is full, and that thread resumes when it has drained it.
        The changes of the read in progress are still delivered. A feed paused while it
        connects is paused once it streams.
        """
        self.loop.call_threadsafe(self._set_paused, True)

    def resume(self) -> None:
        """Read this feed again, from where it stopped. Thread-safe; idempotent."""
        self.loop.call_threadsafe(self._set_paused, False)

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` holds this feed."""
        return self._paused

    @property
    def max_retries(self) -> Optional[int]:
        """Failed attempts in a row before giving up, or ``None`` (the default): for ever."""
        return self._give_up[0]

    @max_retries.setter
    def max_retries(self, value: Optional[int]) -> None:
        self._set_give_up(value, self._give_up[1])

    @property
    def max_outage(self) -> Optional[float]:
        """Seconds without a healthy connection before giving up, or ``None``: never."""
        return self._give_up[1]

    @max_outage.setter
    def max_outage(self, value: Optional[float]) -> None:
        self._set_give_up(self._give_up[0], value)

    def _set_give_up(self, max_retries: Optional[int], max_outage: Optional[float]) -> None:
        # One slot for the two, and one shared tuple for the default: 16 bytes a feed less.
        default = max_retries is None and max_outage is None
        self._give_up = RETRY_FOREVER if default else (max_retries, max_outage)

    def stats(self) -> Dict[str, Any]:
        """What an operator asks at 3 a.m., as a plain dict (for any metrics system).

        Keys: ``state``, ``phase``, ``paused``, ``connections``, ``delivered``, ``last_seq``,
        ``last_error`` (its text, or ``None``), ``last_error_at`` (``time.time()`` then),
        ``since_last_byte`` (seconds, while connected; else ``None``), ``pending`` (the
        changes the server last said were left, CouchDB 2+; else ``None``). Reading it costs
        nothing per change: these are kept anyway. Safe to read from any thread.
        """
        loop = self._loop
        connected = self._state in _states.CONNECTED_STATES and loop is not None
        last_error = self._last_error
        return {
            "db": self.db.name,
            "state": self.state,
            "phase": self._state,
            "paused": self._paused,
            "connections": self.connections,
            "delivered": self.delivered,
            "last_seq": self._since,
            "last_error": None if last_error is None else str(last_error[0]),
            "last_error_at": None if last_error is None else last_error[1],
            "since_last_byte": loop.time() - self._last_activity if connected else None,  # type: ignore[union-attr]
            "pending": self._pending,
        }

    def _event(self, kind: str, **fields: Any) -> FeedEvent:
        return FeedEvent(self, kind, **fields)


class _LongpollOnce(_legacy.OneLongpoll, Consumer):
    """The consumer of one :meth:`Consumer.wait_once_async` request."""

    __slots__ = ()


#: ``Database.changes(feed="continuous")`` follows with a consumer: the client sits below this
#: module, so it is handed the class rather than importing it.
Database.consumer_class = Consumer
