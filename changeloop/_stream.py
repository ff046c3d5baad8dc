"""One streaming ``_changes`` request on a non-blocking connection: readiness in, rows out.

A :class:`FeedStream` connects (TCP, then TLS), writes its request, and turns what it reads into
feed rows with the HTTP parser and the line decoder. It is driven by whoever owns the event loop
(the consumer): that caller asks :meth:`FeedStream.want` which readiness to wait for, calls
:meth:`FeedStream.on_ready` when it comes, and gets the decoded rows back as a return value. The
stream itself knows no loop, no timers and no user callbacks; failures are raised as typed errors.
"""

import sys
from typing import Any, Dict, List, Optional, Sequence

from . import _transport
from ._events import NEED_DATA, ConnectionClosed, Data, EndOfMessage, Response
from ._feed import LastSeq, LineDecoder, decode_document
from ._http import ResponseParser
from ._proxy import refused_by_proxy
from ._transport import NonBlockingConnection, Want
from .errors import (
    ChangeloopError,
    HTTPError,
    LineTooLongError,
    ReadError,
    http_error_for,
    http_error_from_body,
)

__all__ = ["FeedStream", "RECV_BYTES", "MAX_RECVS_PER_READ"]

#: Bytes asked of one ``recv``. A catching-up feed is bound by JSON decoding, not by system
#: calls, and the rows of one receive are delivered before the next receive (unless a batch
#: consumer asks for more rows at once: see ``min_rows``): 48 KiB
#: (about 260 short rows, or 50 with documents) keeps those rows within a core's L2 cache and
#: under the 700 live containers that start a generation-0 GC pass, where 256 KiB x 8 (about
#: 11,000 rows alive at once) measured 1.5x slower (benchmarks/bench_throughput.py). It also
#: stays under glibc's 128 KiB mmap threshold, so each receive buffer is not a fresh mapping.
#: PyPy keeps 256 KiB: its JIT makes the rows cheap and each receive comparatively dear there.
RECV_BYTES = 48 * 1024 if sys.implementation.name == "cpython" else 256 * 1024
_SENT = memoryview(b"")

#: ``recv`` calls per readiness event before yielding to other feeds on the loop (fairness):
#: a feed that is catching up cannot hold the loop for more than this many buffers. A short
#: receive, or one that completed ``min_rows`` rows, ends the readiness event at once (see
#: RECV_BYTES), so this bounds the receives of a line longer than a buffer and of a batch.
MAX_RECVS_PER_READ = 8
#: The most bytes of an error response body kept, for the error's ``reason``.
MAX_ERROR_BODY_BYTES = 64 * 1024

Row = Dict[str, Any]

_CONNECTING, _SENDING, _RECEIVING, _ENDED, _CLOSED = (
    "connecting",
    "sending",
    "receiving",
    "ended",
    "closed",
)


class FeedStream:
    """Connect, send one request, and decode the continuous feed that answers it.

    Args:
        connection: a connection not yet started.
        request: the serialized request bytes.
        url: the request's URL without credentials, for error messages.
        max_line_bytes: passed to the line decoder; with ``document``, the longest body.
        method: the request's method.
        min_rows: keep receiving (within :data:`MAX_RECVS_PER_READ` receives) until this many
            rows are decoded or nothing more is there: a batch consumer's batch size.
        document: the answer is one JSON document (``feed=normal``), not a feed of lines: it is
            decoded whole into :attr:`document` when it ends, and no rows are returned.
    """

    __slots__ = (
        "_body",
        "_body_bytes",
        "_error_status",
        "_feeding",
        "_location",
        "_method",
        "_min_rows",
        "_parser",
        "_plaintext",
        "_request",
        "_want",
        "bytes_received",
        "connection",
        "decoder",
        "document",
        "error",
        "one_shot",
        "state",
        "status_code",
        "url",
    )

    def __init__(
        self,
        connection: NonBlockingConnection,
        request: bytes,
        url: str,
        *,
        max_line_bytes: int,
        method: str = "GET",
        min_rows: int = 1,
        document: bool = False,
    ) -> None:
        self.connection = connection
        self._plaintext = connection.ssl_context is None  # no decrypted bytes held by TLS
        self.url = url
        self._request = memoryview(request)
        self._method = method
        self._parser = ResponseParser(method)
        self.decoder = LineDecoder(max_line_bytes)
        self.state = _CONNECTING
        self._want = Want.WRITE
        self._min_rows = min_rows
        self._feeding = False  # whether body bytes are feed lines (a 200, not a document)
        #: The response's status code, once its head arrived (0 before). Only the status is
        #: kept: the head's header list would cost about 1 KB for as long as the feed lives.
        self.status_code = 0
        #: Bytes received so far, framing included.
        self.bytes_received = 0
        self._error_status = 0
        #: A failure met while receiving. It is kept here rather than raised, so that what the
        #: same read brought before it (the head, rows, heartbeats, the last_seq line) is still
        #: handed over and acted on: a cut often arrives together with the last good rows.
        #: Check it after each :meth:`on_ready`; a further call raises it.
        self.error: Optional[ChangeloopError] = None
        #: Whether this is a ``document`` stream: a one-shot answer, not a feed.
        self.one_shot = document
        # The parts of a one-shot answer or of an error status's body (never both), held until
        # the response ends: one list for either, as a feed that streams needs neither.
        self._body: List[bytes] = []
        self._body_bytes = 0
        self._location = b""  # a redirect's Location, for the error that names it
        #: With ``document=True``: the decoded answer, once the response ended.
        self.document: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return "<FeedStream %s %s received=%d rows=%d>" % (
            self.state,
            self.url,
            self.bytes_received,
            self.decoder.rows,
        )

    @property
    def ended(self) -> bool:
        """Whether the response ended cleanly (the last chunk arrived)."""
        return self.state == _ENDED

    @property
    def streaming(self) -> bool:
        """Whether a ``200`` response head arrived: the feed itself is flowing."""
        return self.status_code != 0 and not self._error_status

    @property
    def last_seq(self) -> Optional[LastSeq]:
        """The ``last_seq`` line, if the server ended the feed with one."""
        return self.decoder.last_seq

    def fileno(self) -> int:
        return self.connection.fileno()

    def want(self) -> Want:
        """The readiness to wait for next: ``READ``, ``WRITE``, or ``DONE`` once ended/closed."""
        if self.state in (_ENDED, _CLOSED):
            return Want.DONE
        return self._want

    def start(self, addrs: Optional[Sequence[Any]] = None) -> Want:
        """Begin connecting (to ``addrs``, resolved already, if given); return the readiness
        to wait for.

        Raises:
            ConnectError: the name did not resolve or the connection failed at once.
        """
        self._want = self.connection.start() if addrs is None else self.connection.start(addrs)
        if self._want is Want.DONE:
            self._begin_sending()
        return self.want()

    def connect_timeout_error(self) -> Exception:
        """The error to raise when the caller's connect timer fires first."""
        return self.connection.connect_timeout_error()

    def on_ready(self) -> Optional[List[Row]]:
        """Make progress on readiness; return the rows decoded (often none).

        ``None`` means the read brought a lone heartbeat and nothing else to act on: still
        receiving, no error, no ``last_seq`` line, no TLS bytes held. That is every read of an
        idle feed, thousands a second on a loop of many feeds, so it is answered first, with the
        fewest steps, and without a list.

        Failures while receiving are not raised but kept in :attr:`error` (see there): a
        ``NetworkError`` (the connection broke), ``ProtocolError`` (not valid HTTP/1.1),
        ``FeedError`` (a malformed feed, a line too long) or ``HTTPError`` (an error status).

        Raises:
            NetworkError: connecting, TLS or sending failed.
            ChangeloopError: the :attr:`error` of an earlier call.
        """
        if self.state == _RECEIVING and self.error is None:
            # Receiving, written out here rather than in a helper: an idle feed's every read.
            connection = self.connection
            rows: List[Row] = []
            try:
                data = connection.recv(RECV_BYTES)
                if data is None:
                    return rows
                self.bytes_received += len(data)
                if self._feeding and self._parser.receive_heartbeat(data):
                    decoder = self.decoder
                    if not decoder.take_heartbeat():
                        decoder.feed_into(b"\n", rows)  # it ends the partial line held
                    elif decoder.last_seq is None and (self._plaintext or not connection.pending()):
                        return None  # an idle feed's every read
                    return rows
                self._receive_more(data, rows)
            except ChangeloopError as exc:
                self.error = exc
            return rows
        if self.error is not None:
            raise self.error
        if self.state == _CONNECTING:
            self._want = self.connection.advance()
            if self._want is Want.DONE:
                self._begin_sending()
        elif self.state == _SENDING:
            self._send()
        return []

    def has_buffered_bytes(self) -> bool:
        """Whether TLS holds decrypted bytes that ``select()`` will not report: read again."""
        return self.state == _RECEIVING and self.connection.pending() > 0

    def close(self) -> None:
        """Close the connection; idempotent."""
        self.connection.close()
        if self.state != _ENDED:
            self.state = _CLOSED

    # -- internals -------------------------------------------------------------------------------

    def _begin_sending(self) -> None:
        self.state = _SENDING
        self._want = Want.WRITE
        self._send()

    def _send(self) -> None:
        try:
            sent = self.connection.send(self._request)
        except OSError as exc:  # pragma: no cover - the transport maps its own errors
            raise _transport.map_socket_error(
                exc, host=self.connection.host, port=self.connection.port, phase="write"
            ) from exc
        self._request = self._request[sent:]
        if not self._request:
            self._request = _SENT  # the empty slice would keep the whole request alive
            self.state = _RECEIVING
            self._want = Want.READ
        elif self.connection.wants_write:
            self._want = Want.WRITE

    def _receive_more(self, data: bytes, rows: List[Row]) -> None:
        """Parse ``data``, not a lone heartbeat, and go on receiving while more is there."""
        parser = self._parser
        received = 1
        while True:
            parser.receive_data(data)
            self._process(rows)
            if len(data) < RECV_BYTES or self.state == _ENDED:
                # EOF, or the socket is drained: another recv() would only fail with EAGAIN
                # (an exception, and an idle feed's every heartbeat would pay it), and the
                # selector reports what arrives later. Bytes TLS holds decrypted are the
                # caller's has_buffered_bytes() check.
                return
            if len(rows) >= self._min_rows or received == MAX_RECVS_PER_READ:
                return  # hand these over before reading more (see RECV_BYTES)
            more = self.connection.recv(RECV_BYTES)
            if more is None:
                return
            data = more
            received += 1
            self.bytes_received += len(data)
            if self._feeding and parser.receive_heartbeat(data):
                self.decoder.feed_into(b"\n", rows)  # a heartbeat after a full buffer
                return

    def _process(self, rows: List[Row]) -> None:
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                return
            if type(event) is Data:
                if self._error_status:
                    if self._body_bytes < MAX_ERROR_BODY_BYTES:
                        self._body_bytes += len(event.data)
                        self._body.append(event.data)
                elif self.one_shot:
                    self._hold_document(event.data)
                else:
                    self.decoder.feed_into(event.data, rows)
            elif isinstance(event, Response):
                self.status_code = event.status_code
                if event.status_code != 200:
                    self._error_status = event.status_code
                    if 300 <= event.status_code < 400:  # kept for the error's message
                        self._location = next(
                            (v for k, v in event.headers if k == b"location"), b""
                        )
                self._feeding = not self._error_status and not self.one_shot
            elif isinstance(event, EndOfMessage):
                self.state = _ENDED
                if self._error_status:
                    raise self._http_error()
                if self.one_shot:
                    self.document = decode_document(self._take_body())
                self.decoder.close()
                return
            elif isinstance(event, ConnectionClosed):
                raise ReadError("%s closed the connection before answering" % self.url)
            else:  # PAUSED: bytes after the end of the message; nothing more to read
                return

    def _hold_document(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > self.decoder.max_line_bytes:
            raise LineTooLongError(
                "a _changes answer exceeded %d bytes (max_line_bytes)" % self.decoder.max_line_bytes
            )
        self._body.append(data)

    def _take_body(self) -> bytes:
        """The held body, joined; the parts are let go (see decode_document)."""
        body, self._body = b"".join(self._body), []
        return body

    def _http_error(self) -> HTTPError:
        status = self._error_status
        # (getattr: test doubles of the connection need not know of proxies)
        proxy: Optional[str] = getattr(self.connection, "proxy_url", None)
        if proxy is not None and refused_by_proxy(status, b"".join(self._body)):
            reason = (
                "the proxy %s refused the login, or wants one: check the user and password of "
                "the proxy URL" % proxy
            )
            return http_error_for(
                status, "proxy_auth_required", reason, method=self._method, url=self.url
            )
        if 300 <= status < 400:
            location = self._location.decode("latin-1")
            return http_error_for(
                status,
                "redirect",
                "redirected to %r: CouchDB never redirects _changes, so the server URL is "
                "probably wrong (http for https, a missing path prefix?)" % location,
                method=self._method,
                url=self.url,
            )
        error = http_error_from_body(status, self._take_body(), method=self._method, url=self.url)
        if status in (414, 431):
            hint = (
                "the request line or its headers are too long: long doc_ids or selectors go in "
                "a POST body (pass them as doc_ids= or selector=, not as query parameters)"
            )
            reason = hint if not error.reason else "%s; %s" % (error.reason, hint)
            error = http_error_for(status, error.error, reason, method=self._method, url=self.url)
        return error
