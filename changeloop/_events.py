"""The events the HTTP parser emits: small, immutable, slotted values (as in h11).

A ``Response`` head, then ``Data`` events with de-framed body bytes, then one ``EndOfMessage``.
``ConnectionClosed`` means the peer closed the connection before sending any byte of a response,
which on a reused keep-alive connection means "stale; retry", not "broken".
"""

from typing import List, Optional, Tuple

__all__ = [
    "Headers",
    "Event",
    "Response",
    "Data",
    "EndOfMessage",
    "ConnectionClosed",
    "Sentinel",
    "NEED_DATA",
    "PAUSED",
]

#: Header fields as ``(lower-cased name, value)`` byte pairs, in the order received.
Headers = List[Tuple[bytes, bytes]]


class Event:
    """Base of the parser's events."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), repr(self._values())))

    def _values(self) -> Tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields())

    def _fields(self) -> Tuple[str, ...]:
        slots: Tuple[str, ...] = type(self).__slots__
        return slots

    def __repr__(self) -> str:
        fields = ", ".join("%s=%r" % (n, getattr(self, n)) for n in self._fields())
        return "%s(%s)" % (type(self).__name__, fields)


class Response(Event):
    """A final response head (1xx interim responses are skipped by the parser).

    Attributes:
        status_code: e.g. 200.
        reason: the reason phrase, e.g. ``b"OK"`` (may be empty).
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: ``(lower-cased name, value)`` pairs, in order.
        keep_alive: whether the connection may carry another request after this response.
    """

    __slots__ = ("status_code", "reason", "http_version", "headers", "keep_alive")

    def __init__(
        self,
        status_code: int,
        reason: bytes,
        http_version: bytes,
        headers: Headers,
        keep_alive: bool,
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        self.keep_alive = keep_alive

    def get_header(self, name: bytes, default: Optional[bytes] = None) -> Optional[bytes]:
        """Return the first value of header ``name`` (lower-case bytes), or ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


class Data(Event):
    """Body bytes with the transfer framing removed (several chunks may be joined in one)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class EndOfMessage(Event):
    """The body is complete. ``trailers`` holds the chunked trailer fields, if any."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: Optional[Headers] = None) -> None:
        self.trailers: Headers = trailers if trailers is not None else []


class ConnectionClosed(Event):
    """The peer closed the connection before the first byte of a response."""

    __slots__ = ()


class Sentinel:
    """A named marker value (``NEED_DATA``, ``PAUSED``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event()`` needs more bytes (call ``receive_data``) before it can say more.
NEED_DATA = Sentinel("NEED_DATA")
#: The response is complete; bytes after it wait for ``start_next_response()``.
PAUSED = Sentinel("PAUSED")
