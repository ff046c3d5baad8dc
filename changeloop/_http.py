"""Sans-IO HTTP/1.1 response parser (RFC 9112): bytes in, events out, no sockets, no clocks.

The whole API is two verbs, as in h11: :meth:`ResponseParser.receive_data` (``b""`` means EOF)
and :meth:`ResponseParser.next_event`, which returns a :class:`Response` head, :class:`Data`,
:class:`EndOfMessage`, :class:`ConnectionClosed`, or one of the sentinels :data:`NEED_DATA` and
:data:`PAUSED`. One shortcut stands beside them, for what an idle feed receives all day:
:meth:`ResponseParser.receive_heartbeat` takes a lone heartbeat chunk in one call.

Strategy. Received bytes accumulate in one ``bytearray`` (deleting a consumed prefix of a
``bytearray`` is amortised O(1) in CPython). The head is found by a line scan that remembers how
far it got, so feeding one byte at a time stays O(n). The body is read by one of three small
readers picked by the framing rules of RFC 9112 §6.3: Content-Length, chunked, or until close.
The chunked reader removes the framing of *every complete chunk in the buffer* in one call and
returns their data as a single :class:`Data` event: CouchDB sends one row per chunk, so one event
per chunk would cost a Python round trip per change. Chunk data is sliced through a
``memoryview`` and joined once, so each body byte is copied once on its way out.
"""

from typing import Optional, Tuple, Union

from ._events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    EndOfMessage,
    Event,
    Headers,
    Response,
    Sentinel,
)
from ._readers import (
    HEARTBEAT_CHUNK,
    MAX_HEAD_BYTES,
    BodyReader,
    excerpt,
    find_blank_line,
    has_control_char,
    parse_fields,
    pick_reader,
    split_lines,
    tokens,
)
from .errors import ProtocolError

__all__ = ["ResponseParser"]

# Parser states.
_HEAD, _BODY, _DONE, _CLOSED, _ERROR = "head", "body", "done", "closed", "error"


class ResponseParser:
    """Turn the bytes of one connection into HTTP/1.1 response events.

    Args:
        method: the method of the request this response answers (``HEAD`` responses have no
            body). Call :meth:`start_next_response` with the next request's method to read the
            next response on a kept-alive connection.
    """

    __slots__ = (
        "_between_chunks",
        "_buf",
        "_consumed",
        "_eof",
        "_head_scan",
        "_method",
        "_reader",
        "_received_any",
        "_state",
        "_status",
    )

    def __init__(self, method: Union[str, bytes] = b"GET") -> None:
        self._buf = bytearray()
        self._eof = False
        self._state = _HEAD
        self._method = _as_bytes(method).upper()
        self._head_scan = 0  # where the blank-line search resumes
        self._reader: Optional[BodyReader] = None
        self._status: Optional[int] = None  # not the Response: its headers would outlive it
        self._received_any = False  # any byte of this response (for ConnectionClosed)
        self._consumed = 0  # bytes of this response consumed, for error positions
        # True only while the body is chunked, between two chunks, with nothing buffered and no
        # EOF: set when next_event() leaves the parser so (at the head's end, or answering
        # NEED_DATA), cleared by every receive_data(). It is the one state in which
        # receive_heartbeat() may take a chunk without parsing it.
        self._between_chunks = False

    def __repr__(self) -> str:
        status = self._status
        return "<ResponseParser state=%s status=%s buffered=%d eof=%s>" % (
            self._state,
            status,
            len(self._buf),
            self._eof,
        )

    @property
    def state(self) -> str:
        """One of ``"head"``, ``"body"``, ``"done"``, ``"closed"``, ``"error"``."""
        return self._state

    @property
    def trailing_data(self) -> Tuple[bytes, bool]:
        """Bytes received beyond the current message, and whether EOF was seen after them."""
        return bytes(self._buf), self._eof

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed the connection.

        Raises:
            RuntimeError: data after EOF was already reported.
        """
        self._between_chunks = False
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        self._buf += data

    def receive_heartbeat(self, data: bytes) -> bool:
        """Take ``data`` if it is a lone heartbeat chunk at a chunk boundary; say whether it was.

        True means exactly what :meth:`receive_data` followed by :meth:`next_event` would have
        done: :class:`Data` ``b"\\n"``, then :data:`NEED_DATA`; the caller counts the newline
        itself. False means nothing was taken: feed ``data`` to :meth:`receive_data` as usual.
        An idle continuous feed receives nothing else (``1\\r\\n\\n\\r\\n`` every heartbeat,
        thousands a second on a loop of many feeds), and this costs one call instead of five.
        """
        if data != HEARTBEAT_CHUNK or not self._between_chunks:
            return False
        self._consumed += len(data)  # and still between chunks: the flag stays
        return True

    def start_next_response(self, method: Union[str, bytes] = b"GET") -> None:
        """Reset after :class:`EndOfMessage` to read the next response on the same connection.

        Raises:
            RuntimeError: the current response is not finished.
        """
        if self._state != _DONE:
            raise RuntimeError("cannot start a new response in state %r" % self._state)
        self._state = _HEAD
        self._method = _as_bytes(method).upper()
        self._head_scan = 0
        self._reader = None
        self._status = None
        self._received_any = bool(self._buf)
        self._consumed = 0
        self._between_chunks = False

    def next_event(self) -> Union[Event, Sentinel]:
        """Return the next event, :data:`NEED_DATA`, or :data:`PAUSED` after the message ended.

        Raises:
            ProtocolError: the bytes are not a valid HTTP/1.1 response, a limit was exceeded, or
                the connection closed in the middle of a message. The parser then stays broken.
        """
        try:
            if self._state == _HEAD:
                return self._next_head()
            if self._state == _BODY:
                return self._next_body()
            if self._state == _DONE:
                return PAUSED
            if self._state == _CLOSED:
                return ConnectionClosed()
            raise ProtocolError("the parser already failed on an earlier error")
        except ProtocolError:
            self._state = _ERROR
            raise

    # -- head ------------------------------------------------------------------------------

    def _next_head(self) -> Union[Event, Sentinel]:
        while True:  # loops only to skip 1xx interim responses
            if self._buf:
                self._received_any = True
            end = find_blank_line(self._buf, self._head_scan)
            if end < 0:
                self._head_scan = max(0, len(self._buf) - 1)
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ProtocolError(
                        "response head is longer than %d bytes (MAX_HEAD_BYTES)" % MAX_HEAD_BYTES
                    )
                if self._eof:
                    if not self._received_any:
                        self._state = _CLOSED
                        return ConnectionClosed()
                    raise ProtocolError(
                        "connection closed in the response head after %d bytes" % len(self._buf)
                    )
                return NEED_DATA
            if end > MAX_HEAD_BYTES:
                raise ProtocolError(
                    "response head is longer than %d bytes (MAX_HEAD_BYTES)" % MAX_HEAD_BYTES
                )
            head = bytes(self._buf[:end])
            del self._buf[:end]
            self._head_scan = 0
            self._consumed += end
            version, status, reason, headers = _parse_head(head)
            if 100 <= status < 200:
                if status == 101:
                    raise ProtocolError("unexpected 101 Switching Protocols: no upgrade was asked")
                continue  # RFC 9110 §15.2: interim responses precede the final one; skip them
            self._reader, reusable = pick_reader(version, status, headers, self._method)
            keep_alive = reusable and _keep_alive(version, headers)
            self._status = status
            self._state = _BODY
            self._between_chunks = not (self._buf or self._eof) and self._reader.at_chunk_boundary()
            return Response(status, reason, version, headers, keep_alive)

    # -- body ------------------------------------------------------------------------------

    def _next_body(self) -> Union[Event, Sentinel]:
        reader = self._reader
        assert reader is not None
        before = len(self._buf)
        event = reader.read(self._buf, self._consumed)
        self._consumed += before - len(self._buf)
        if event is None:
            if self._eof:
                event = reader.read_eof(self._consumed)
            else:
                self._between_chunks = not self._buf and reader.at_chunk_boundary()
                return NEED_DATA
        if isinstance(event, EndOfMessage):
            self._state = _DONE
        return event


# -- head parsing -----------------------------------------------------------------------------


def _parse_head(head: bytes) -> Tuple[bytes, int, bytes, Headers]:
    lines = split_lines(head)
    if not lines or not lines[0]:
        raise ProtocolError("empty response head")
    version, status, reason = _parse_status_line(lines[0])
    return version, status, reason, parse_fields(lines[1:], "header")


def _parse_status_line(line: bytes) -> Tuple[bytes, int, bytes]:
    # RFC 9112 §4: HTTP-version SP 3DIGIT SP [reason-phrase]. A missing SP before an empty
    # reason is tolerated, as deployed servers omit it.
    parts = line.split(b" ", 2)
    if (
        len(parts) < 2
        or len(parts[0]) != 8
        or not parts[0].startswith(b"HTTP/")
        or parts[0][6:7] != b"."
        or not parts[0][5:6].isdigit()
        or not parts[0][7:8].isdigit()
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise ProtocolError("malformed status line %r" % excerpt(line))
    reason = parts[2] if len(parts) == 3 else b""
    if has_control_char(reason):  # RFC 9112 §4: HTAB, SP, VCHAR and obs-text only
        raise ProtocolError("control character in status line %r" % excerpt(line))
    if parts[0][5:6] != b"1":
        raise ProtocolError("unsupported HTTP version %r" % parts[0].decode("ascii", "replace"))
    status = int(parts[1])
    if not 100 <= status <= 599:
        # RFC 9110 §15: status codes are 100-599. Anything else ("000" from a broken proxy,
        # "999") is not an answer we can classify: never read it as success or as an error body.
        raise ProtocolError("status code %d is outside 100-599 in %r" % (status, excerpt(line)))
    return parts[0][5:], status, reason


def _keep_alive(version: bytes, headers: Headers) -> bool:
    options = tokens(headers, b"connection")
    if version == b"1.0":
        return b"keep-alive" in options
    return b"close" not in options


def _as_bytes(value: Union[str, bytes]) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value
