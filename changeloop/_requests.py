"""What a consumer asks of the server, and how a run starts: a base class of the consumer.

The requests (the feed's, the one-shot ``normal``/``longpoll`` ones, the ``since=now`` question),
the streams and connections they go out on, the renewal of an expired session cookie, and the
state a continuous run starts from on the loop's thread. :class:`_Requests` sits between the
state machine (:mod:`changeloop._follow`), which calls these, and the public
:class:`~changeloop.consumer.Consumer`, so a feed is still one object.
"""

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from . import _legacy, _states
from ._feed import decode_document
from ._follow import _Follow
from ._params import (
    DEFAULT_HEARTBEAT_MS,
    ChangesRequest,
    changes_request,
    heartbeat_seconds,
    silence_allowance,
)
from ._stream import FeedStream
from ._transport import NonBlockingConnection
from .errors import HTTPError

logger = logging.getLogger("changeloop.consumer")


class _Requests(_Follow):
    """The consumer's requests and the start of its runs (see the module's docstring).

    A base class of :class:`~changeloop.consumer.Consumer` rather than an object of its own: one
    object per feed (see benchmarks/bench_scale.py).
    """

    __slots__ = ("_params", "_sent_cookie", "_session_renewed")

    #: How a feed's connection is made: the seam where the simulation tests put a fake network.
    _connect_with: Callable[..., NonBlockingConnection] = NonBlockingConnection

    # Set by the consumer's constructor (its arguments of the same names).
    max_line_bytes: int
    watchdog_heartbeats: float

    if TYPE_CHECKING:  # the consumer's property (declared here for the type checker only)

        @property
        def running(self) -> bool: ...

    def _init_requests(self) -> None:
        self._init_follow()
        self._params: Dict[str, Any] = {}
        self._sent_cookie: Optional[str] = None  # the session cookie of the last feed request
        self._session_renewed = False  # a 401 dropped the session cookie since the last connect

    # -- the requests ---------------------------------------------------------------------------

    def _feed_path(self) -> str:
        """The path of the feed followed; a subclass may follow another one (``_db_updates``)."""
        return self.db.path + "/_changes"

    def _request(self, feed: str, since: Any, params: Dict[str, Any]) -> ChangesRequest:
        return changes_request(self.db.path, feed, since, params)._replace(path=self._feed_path())

    def _open_stream(self, resolving: bool) -> FeedStream:
        if resolving:
            return self._stream_for(self._request("normal", "now", {}), True)
        params = self._params
        if self._limit is not None:  # what is left of it: the limit spans reconnections
            params = dict(params, limit=max(0, self._limit - self.delivered))
        return self._stream_for(self._request("continuous", self._since, params), False)

    def _stream_for(self, request: ChangesRequest, document: bool) -> FeedStream:
        """A stream for ``request``: a feed, or with ``document`` a one-shot answer."""
        server = self.db.server
        endpoint = server._endpoint
        self._sent_cookie = None  # until the request is built: a refused login sends none
        # Credentials stay hidden in the prepared request until wire() writes them into the
        # stream's bytes: no frame's locals hold them should anything here raise.
        prepared = server.prepare_request(
            request.method, request.path, params=request.query, body=request.body
        )
        self._sent_cookie = prepared.cookie
        host, port, options = endpoint.route()  # a proxy's, and its CONNECT tunnel, if any
        connection = self._connect_with(host, port, ssl_context=endpoint.ssl_context, **options)
        return FeedStream(
            connection,
            prepared.wire(),
            server.url + request.path,
            max_line_bytes=self.max_line_bytes,
            method=request.method,
            min_rows=self.batch_size or 1,
            document=document,
        )

    def _connected(self) -> None:
        self._session_renewed = False

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

    # -- one-shot feeds (blocking) -------------------------------------------------------------

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

    # -- the start of a continuous run ---------------------------------------------------------

    def _start(self, callback: Any, since: Any, params: Dict[str, Any]) -> None:
        """``start()``: check the arguments on the caller's thread, begin the run on the loop's."""
        callback = _legacy.take_cb(callback, params)
        loop = self.loop
        if self.running and (loop.in_loop_thread() or not loop.is_running()):
            # (From another thread while the loop runs, a stop() posted just before may still
            # be queued: the loop's thread decides then, in _begin.)
            raise RuntimeError("the consumer is already running")
        if callback is not None and not callable(callback):
            raise TypeError("a callback must be callable")
        if params.get("feed", "continuous") != "continuous":
            raise ValueError(
                "a consumer's start() and wait() follow feed=continuous: use fetch() for "
                "feed=normal and wait_once() for feed=longpoll, not feed=%r" % (params["feed"],)
            )
        params.pop("feed", None)
        params.setdefault("heartbeat", DEFAULT_HEARTBEAT_MS)
        limit = params.get("limit")
        if limit is not None:
            params["limit"] = _count("limit", limit)
        changes_request(self.db.path, "continuous", since, params)  # validate now, not later
        if callback is None and not self._callbacks:  # (after: a misnamed callback says so)
            raise RuntimeError("register a callback before starting a continuous feed")
        try:
            silence = silence_allowance(params, self.watchdog_heartbeats)
        except (TypeError, ValueError) as exc:
            raise ValueError("heartbeat and timeout are milliseconds: %s" % exc) from None
        if loop.closed:
            raise RuntimeError("the consumer's loop is closed")
        stored = self.checkpoint.load() if self.checkpoint is not None else None
        active = self._callbacks
        if callback is not None and callback not in active:
            active += (callback,)
        start = stored if stored is not None else since
        loop.call_threadsafe(self._begin, start, params, active, silence)

    def _begin(self, since: Any, params: Dict[str, Any], active: Any, silence: float) -> None:
        """On the loop's thread: the state a run starts with, then the machine's ``start``."""
        if self.running:
            logger.warning("%s: started while running; that start() is ignored", self.db.name)
            return
        try:
            self._begin_run(since, params, active, silence)
        except Exception as exc:  # a guarded door too: reported, never only logged
            if self._state != _states.IDLE and self._state != _states.STOPPED:
                self._fail(exc)
            else:
                logger.error("%s: could not start: %s", self.db.name, exc)
                self.error = exc
                self._report(self.on_error, self._event("error", error=exc))

    def _begin_run(self, since: Any, params: Dict[str, Any], active: Any, silence: float) -> None:
        self._since = since
        self._limit = params.get("limit")
        self._params = params
        self._active = active
        self._silence = silence
        self.error = None
        self._stop_requested = False
        self.delivered = 0
        self.connections = 0
        self._attempt = 0
        self._caught_up = False
        self._session_renewed = False
        self._pending = None
        self._saved_at = self._healthy_at = self.loop.time()
        self._move("start")
        self._want_turn()


def _count(name: str, value: Any) -> int:
    """``value`` as a count (0 or more): an int, or digits as a string (as query strings have
    them).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("%s must be a count (0 or more), not %r" % (name, value))
    return value
