"""Sans-IO HTTP/1.1 request serialization: validated bytes for the wire, nothing else.

Every string that reaches the wire is checked here, once: a CR or LF smuggled into a header value
or target would let a caller's data inject headers or a second request (RFC 9112 §2.2), so such
input raises ``ValueError`` before a byte is sent.
"""

import base64
import json
from typing import Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["serialize_request", "basic_auth_value", "Secret", "Credentials", "PreparedRequest"]

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


class Secret:
    """A credential (a password, an ``Authorization`` value, a session cookie or login body).

    Its ``repr`` and ``str`` hide it, so that an error tracker recording the locals of the frames
    of a traceback (as Sentry does, by ``repr``) records ``<secret>``, not the credential; only
    :meth:`reveal` gives the value, and only :meth:`PreparedRequest.wire` calls it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: Union[str, bytes]) -> None:
        self._value = value

    def reveal(self) -> Union[str, bytes]:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Credentials:
    """A user name and password, the password held out of every ``repr``.

    Raises:
        ValueError: the user name contains a colon, which Basic auth cannot carry.
    """

    __slots__ = ("username", "_password")

    def __init__(self, username: str, password: str) -> None:
        if ":" in username:
            raise ValueError("a Basic auth user name cannot contain ':'")
        self.username = username
        self._password = Secret(password)

    def __repr__(self) -> str:
        return "<Credentials user=%r>" % self.username

    def authorization(self) -> Secret:
        """The ``Authorization`` value for Basic auth (RFC 7617), still hidden."""
        return Secret(basic_auth_value(self.username, str(self._password.reveal())))

    def session_body(self) -> Secret:
        """The JSON body of a ``POST /_session`` login, still hidden."""
        login = {"name": self.username, "password": self._password.reveal()}
        return Secret(json.dumps(login).encode("utf-8"))

    def as_tuple(self) -> Tuple[str, str]:
        """``(user, password)`` in the clear: for code that must hand them on."""
        return self.username, str(self._password.reveal())


class PreparedRequest:
    """One validated HTTP/1.1 request whose credentials are written in only by :meth:`wire`.

    Everything that is not secret is checked and serialized at once. Header values and a body
    given as :class:`Secret` stay hidden until :meth:`wire` builds the bytes, which should go
    straight to the socket (``sock.sendall(request.wire())``) without being bound to a name:
    a request error then leaves no ``Authorization`` header in the locals of any frame of its
    traceback.

    Args:
        method, target, host, headers, body: as for :func:`serialize_request`; a header value or
            the body may be a :class:`Secret`.

    Raises:
        ValueError: a method, target, name or value would break the message framing.
    """

    __slots__ = ("method", "target", "cookie", "_head", "_secrets", "_body")

    def __init__(
        self,
        method: str,
        target: str,
        host: str,
        headers: Iterable[Tuple[str, Union[str, Secret]]] = (),
        body: Union[bytes, Secret, None] = None,
    ) -> None:
        _check_token("method", method)
        _check_target(method, target)
        _check_value("Host", host)
        lines = ["%s %s HTTP/1.1" % (method, target), "Host: " + host]
        secrets: List[Tuple[str, Secret]] = []
        for name, value in headers:
            _check_token("header name", name)
            if isinstance(value, Secret):
                _check_secret(name, value)
                secrets.append((name, value))
                continue
            _check_value("header value", value)
            lines.append("%s: %s" % (name, value))
        lines.append("")
        self.method = method
        self.target = target
        #: The session cookie the request carries, set by ``Server.prepare_request``.
        self.cookie: Optional[str] = None
        self._head = _latin1("\r\n".join(lines))
        self._secrets: Sequence[Tuple[str, Secret]] = secrets
        self._body = body

    def __repr__(self) -> str:
        return "<PreparedRequest %s %s>" % (self.method, self.target)

    def wire(self) -> bytes:
        """Return the request's bytes, credentials included: send them, keep no name for them."""
        parts = [self._head]
        for name, secret in self._secrets:
            parts.append(_latin1("%s: %s\r\n" % (name, _as_text(secret.reveal()))))
        body = self._body
        if isinstance(body, Secret):
            body = _as_bytes(body.reveal())
        if body is not None:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        return b"".join(parts)


def _check_target(method: str, target: str) -> None:
    """Accept the three forms of RFC 9112 §3.2 we send: origin-form (``/db?x=1``), absolute-form
    (``http://host/db``, to a proxy) and authority-form (``host:port``, only for ``CONNECT``)."""
    if method == "CONNECT":
        valid = bool(target) and "/" not in target and "@" not in target and ":" in target
    else:
        valid = target.startswith(("/", "http://"))
    if not valid or any(c <= " " or c == "\x7f" for c in target):
        raise ValueError(
            "invalid request target %r (origin-form, absolute-form to a proxy, or host:port for "
            "CONNECT; percent-encoded)" % target
        )


def _check_secret(name: str, secret: Secret) -> None:
    # The value is never put in the message: it is a credential.
    text = _as_text(secret.reveal())
    if any(c in text for c in _FORBIDDEN_IN_VALUES):
        raise ValueError("CR, LF or NUL in the value of HTTP header %s" % name)
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("the value of HTTP header %s is not Latin-1 text" % name) from None


def _latin1(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError("HTTP request head must be Latin-1 text: %s" % exc) from None


def _as_text(value: Union[str, bytes]) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _as_bytes(value: Union[str, bytes]) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


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
    return PreparedRequest(method, target, host, headers, body).wire()


def basic_auth_value(username: str, password: str) -> str:
    """Return the ``Authorization`` value for Basic auth (RFC 7617), UTF-8 encoded.

    Raises:
        ValueError: the user name contains a colon, which Basic auth cannot carry.
    """
    if ":" in username:
        raise ValueError("a Basic auth user name cannot contain ':'")
    token = base64.b64encode(("%s:%s" % (username, password)).encode("utf-8")).decode("ascii")
    return "Basic " + token
