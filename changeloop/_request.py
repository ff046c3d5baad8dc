"""Sans-IO HTTP/1.1 request serialization: validated bytes for the wire, nothing else.

Every string that reaches the wire is checked here, once: a CR or LF smuggled into a header value
or target would let a caller's data inject headers or a second request (RFC 9112 §2.2), so such
input raises ``ValueError`` before a byte is sent.
"""

import base64
from typing import Iterable, Optional, Tuple

__all__ = ["serialize_request", "basic_auth_value"]

_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_FORBIDDEN_IN_VALUES = ("\r", "\n", "\x00")


def _check_token(kind: str, value: str) -> None:
    if not value or not _TOKEN_CHARS.issuperset(value):
        raise ValueError("invalid HTTP %s %r" % (kind, value))


def _check_value(kind: str, value: str) -> None:
    if any(c in value for c in _FORBIDDEN_IN_VALUES):
        raise ValueError("CR, LF or NUL in HTTP %s %r" % (kind, value))


def serialize_request(
    method: str,
    target: str,
    host: str,
    headers: Iterable[Tuple[str, str]] = (),
    body: Optional[bytes] = None,
) -> bytes:
    """Return the bytes of one HTTP/1.1 request.

    Args:
        method: e.g. ``"GET"``; must be an HTTP token.
        target: the origin-form target, already percent-encoded: ``"/db/_changes?feed=normal"``.
        host: the ``Host`` header value (``host``, ``host:port`` or ``[v6]:port``).
        headers: further ``(name, value)`` pairs; ``Host`` and ``Content-Length`` are added here.
        body: the request body, sent with ``Content-Length``; ``None`` sends no body.

    Raises:
        ValueError: a method, target, name or value would break the message framing.
    """
    _check_token("method", method)
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise ValueError("invalid request target %r (origin-form, percent-encoded)" % target)
    _check_value("Host", host)
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: " + host]
    for name, value in headers:
        _check_token("header name", name)
        _check_value("header value", value)
        lines.append("%s: %s" % (name, value))
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError("HTTP request head must be Latin-1 text: %s" % exc) from None
    return head + body if body else head


def basic_auth_value(username: str, password: str) -> str:
    """Return the ``Authorization`` value for Basic auth (RFC 7617), UTF-8 encoded.

    Raises:
        ValueError: the user name contains a colon, which Basic auth cannot carry.
    """
    if ":" in username:
        raise ValueError("a Basic auth user name cannot contain ':'")
    token = base64.b64encode(("%s:%s" % (username, password)).encode("utf-8")).decode("ascii")
    return "Basic " + token
