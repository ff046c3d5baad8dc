"""What couchdbkit's generations of ``Consumer`` passed that changeloop's own API spells otherwise.

couchdbkit 0.4 registered callbacks and called ``wait(**params)``; 0.5 and 0.6 took a backend
name (``Consumer(db, backend="sync")``) and a callback as the first argument or ``cb=`` of every
call, plus ``wait_async``/``wait_once_async`` that ran on a gevent or eventlet hub. The
:class:`~changeloop.consumer.Consumer` accepts all of these; what it takes to do so lives here,
so the consumer keeps to its own API: the argument shuffles, the backend check, a one-shot
longpoll run on a loop (``wait_once_async``), and serving a consumer's private loop from a
background thread (what the gevent hub did for couchdbkit's ``*_async``).
"""

import threading
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from ._stream import FeedStream

__all__ = [
    "check_backend",
    "split_cb",
    "take_cb",
    "OneLongpoll",
    "longpoll_once",
    "serve_in_background",
    "stop_background",
]

_Once = TypeVar("_Once")

#: What to use instead of couchdbkit's other backends.
_INSTEAD = (
    "changeloop has no %r backend: one loop serves many feeds from one thread. Use "
    "Consumer.start() on a shared Loop served by Loop.run_in_thread() (or wait_async(), which "
    "does that for a consumer's own loop), or wait() to block"
)


def check_backend(backend: Any) -> None:
    """Accept couchdbkit's ``backend="sync"``, which is what changeloop does anyway.

    Raises:
        ValueError: any other backend (``"gevent"``, ``"eventlet"``...), with what to use instead.
    """
    if backend != "sync":
        raise ValueError(_INSTEAD % (backend,))


def split_cb(
    first: Any, cb: Optional[Callable[..., Any]], params: Dict[str, Any]
) -> Tuple[Any, Any]:
    """``(since, cb)`` of a ``fetch``/``wait_once`` call, whose first argument is positional-only.

    A callable first argument is couchdbkit 0.5's ``cb`` (a seq is never callable), so that
    ``wait_once(cb, since=seq)`` works as it did there; otherwise it is ``since``, which may
    also come as a keyword (in ``params``). ``since`` defaults to 0.

    Raises:
        TypeError: two callbacks, ``since`` twice, or a ``cb`` that is not callable.
    """
    since = params.pop("since", None)
    if callable(first):
        if cb is not None:
            raise TypeError("two callbacks: %r and cb=%r" % (first, cb))
        cb = first
    elif first is not None:
        if since is not None:
            raise TypeError("since given twice: %r and since=%r" % (first, since))
        since = first
    if cb is not None and not callable(cb):
        raise TypeError("cb must be callable, not %r" % (cb,))
    return (0 if since is None else since), cb


def take_cb(callback: Any, params: Dict[str, Any]) -> Any:
    """The callback of a ``start``/``wait`` call that may name it ``cb=`` (couchdbkit 0.5).

    Raises:
        TypeError: both ``callback`` and a different ``cb=`` were given.
    """
    cb = params.pop("cb", None)
    if cb is None:
        return callback
    if callback is not None and callback is not cb:
        raise TypeError("two callbacks: %r and cb=%r" % (callback, cb))
    return cb


class OneLongpoll:
    """Mixed into a consumer: one ``feed=longpoll`` request, run on the loop like a feed.

    The state machine asks for a stream, and gets a one-shot one (the whole answer decoded as one
    document, as for the ``since=now`` question); when the answer is there it is handed to the
    callbacks (the run's ``delivered`` is then 1) and the consumer stops, its ``last_seq`` at the
    answer's. A network failure before the answer reconnects and asks again, from the same seq.
    """

    __slots__ = ()

    # Provided by the consumer (declared here for the type checker only).
    _params: Dict[str, Any]
    _since: Any
    _request: Callable[..., Any]
    _stream_for: Callable[..., FeedStream]
    _close_stream: Callable[[], None]
    _deliver: Callable[[Any], bool]
    _finish: Callable[[Optional[BaseException]], None]

    def _open_stream(self, resolving: bool) -> FeedStream:
        # (since="now" is asked as it is: a longpoll since=now waits for the next change.)
        return self._stream_for(self._request("longpoll", self._since, self._params), True)

    def _on_resolved(self, document: Dict[str, Any]) -> None:
        self._close_stream()
        self._deliver([document])  # (its own stop or limit changes nothing: it stops anyway)
        if document.get("last_seq") is not None:
            self._since = document["last_seq"]
        self._finish(None)


def longpoll_once(
    consumer: Any, once_class: Callable[..., _Once], cb: Any, since: Any, params: Dict[str, Any]
) -> _Once:
    """``consumer.wait_once_async(cb, since, **params)``: a ``once_class`` (a consumer with
    :class:`OneLongpoll` mixed in) with the consumer's loop, settings and registered callbacks,
    started, and served (see :func:`serve_in_background`)."""
    once = once_class(
        consumer.db,
        consumer.loop,
        on_error=consumer.on_error,
        callback_errors=consumer.callback_errors,
        reconnect_base=consumer.reconnect_base,
        reconnect_cap=consumer.reconnect_cap,
        watchdog_heartbeats=consumer.watchdog_heartbeats,
        connect_timeout=consumer.connect_timeout,
        # the answer is one document, bounded as the blocking client bounds one
        max_line_bytes=max(consumer.max_line_bytes, consumer.db.server.max_body_bytes or 0),
        max_retries=consumer.max_retries,
        max_outage=consumer.max_outage,
        rng=consumer._rng,
    )
    once._callbacks = consumer._callbacks  # type: ignore[attr-defined]
    once.start(cb, since, **params)  # type: ignore[attr-defined]
    consumer._followers = [f for f in consumer._followers if f.running] + [once]
    serve_in_background(consumer)
    return once


def serve_in_background(consumer: Any) -> None:
    """Run a consumer's loop in a daemon thread if the consumer made it and nothing runs it.

    couchdbkit's ``wait_async`` ran on a gevent hub that something always served; a loop that the
    caller gave (``Consumer(db, loop)``) or already runs is left to whoever serves it.
    :meth:`~changeloop.consumer.Consumer.close` stops that thread.
    """
    loop = consumer.loop
    if not consumer._own_loop or loop.is_running():
        return
    thread = consumer._loop_thread
    if thread is not None and thread.is_alive():
        return
    consumer._loop_thread = loop.run_in_thread("changeloop %s" % consumer.db.name)


def stop_background(consumer: Any) -> None:
    """Stop the thread :func:`serve_in_background` started, once what was asked before ran."""
    thread: Optional[threading.Thread] = consumer._loop_thread
    loop = consumer._loop
    if thread is None or loop is None or loop.in_loop_thread():
        return  # (from a callback: the loop stops when the callback returns; close() is later)
    loop.stop()
    thread.join()
    consumer._loop_thread = None
