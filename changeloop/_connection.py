"""The blocking client's connections: where a server is, and one kept-alive connection to it.

A :class:`Connection` sends one :class:`~changeloop._request.PreparedRequest` at a time and reads
the answer with the sans-IO parser in a plain ``recv`` loop, bounding what it keeps of the body;
``Server`` in ``client`` pools them. Nothing here retries: the connection reports what happened
(closed before answering, reusable or not) and the pool decides.
"""

import select
import socket
import ssl
import traceback
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

from . import _transport
from ._events import NEED_DATA, ConnectionClosed, Data, EndOfMessage, Response
from ._http import ResponseParser
from ._proxy import ProxySetting, Tunnel, choose_proxy
from ._request import PreparedRequest, Secret
from .errors import ResponseTooLargeError

__all__ = ["Endpoint", "Connection", "redact_url", "RECV_BYTES"]

#: Bytes asked of ``recv`` at a time: large enough that a big response takes few system calls.
RECV_BYTES = 256 * 1024


class Endpoint:
    """Where a server is and how to reach it; shared with the consumers of its databases.

    Through a proxy (``proxy``: see ``_proxy.choose_proxy``), :meth:`route` says where each
    connection goes and how; a plain ``http`` server's requests then carry absolute-form targets
    (:attr:`target_base`) and the proxy's login (:meth:`proxy_headers`).
    """

    def __init__(
        self, url: str, ssl_context: Optional[ssl.SSLContext], proxy: ProxySetting = None
    ) -> None:
        # No message may show the URL as given: it can hold a password. The checks raise outside
        # of any ``except`` block, so that urllib's own message (which quotes a bad "port", that
        # is, the start of a password holding a raw "/") is not chained as the context.
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        # An "@" after the host means a password holding a raw "/", "?" or "#" ended the user
        # info early: the host would be the user's name and the rest of the password the path.
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in url[url.find(parts.netloc) + len(parts.netloc) :]
        ):
            hint = " (a password holding '/', '?', '#' or '@' must be percent-encoded)"
            raise ValueError(
                "expected http[s]://[user:password@]host[:port][/prefix], not %s%s"
                % (redact_url(url), hint if "@" in url else "")
            )
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None
        bracketed = "[%s]" % self.host if ":" in self.host else self.host
        default_port = 443 if self.tls else 80
        self.host_header = (
            bracketed if self.port == default_port else "%s:%d" % (bracketed, self.port)
        )
        #: The URL with any credentials removed: safe for messages and logs.
        self.url = "%s://%s%s" % (parts.scheme, self.host_header, self.prefix)
        self.ssl_context = (ssl_context or _transport.make_ssl_context()) if self.tls else None
        #: The HTTP proxy in the way, or ``None``.
        self.proxy = choose_proxy(proxy, parts.scheme, self.host, self.port)
        # Plain HTTP goes to the proxy as absolute-form requests (RFC 9112 §3.2.2); TLS goes
        # through a CONNECT tunnel, inside which requests are as without a proxy.
        forwarded = self.proxy is not None and not self.tls
        #: What a request target starts with before the prefix: "" or ``http://host:port``.
        self.target_base = "http://" + self.host_header if forwarded else ""

    def route(self) -> Tuple[str, int, Dict[str, Any]]:
        """Where a new connection goes: ``(host, port, options)``, with ``options`` for
        ``connect_blocking`` or ``NonBlockingConnection`` beside ``ssl_context`` (empty without
        a proxy, a fresh ``CONNECT`` tunnel for TLS through one)."""
        proxy = self.proxy
        if proxy is None:
            return self.host, self.port, {}
        if not self.tls:
            return proxy.host, proxy.port, {"proxy_url": proxy.url}
        return proxy.host, proxy.port, {"tunnel": Tunnel(proxy, self.host, self.port)}

    def proxy_headers(self) -> List[Tuple[str, Union[str, Secret]]]:
        """The headers a request carries for the proxy: its login, for plain HTTP through it."""
        if self.proxy is None or self.tls:
            return []  # a tunnel's login went with its CONNECT
        return self.proxy.headers()


def redact_url(url: str) -> str:
    """Return ``url`` with everything up to its last ``@`` after the scheme shown as ``***``.

    Cut at the last ``@`` rather than where a URL parser ends the user info, because a password
    holding a raw ``/``, ``?`` or ``#`` ends it early: the parser would show the rest.
    """
    at = url.rfind("@")
    if at < 0:
        return url
    scheme_end = url.find("://")
    prefix = url[: scheme_end + 3] if 0 <= scheme_end < at else ""
    return prefix + "***@" + url[at + 1 :]


class Connection:
    """One blocking keep-alive connection and the parser reading it."""

    def __init__(self, endpoint: Endpoint, timeout: Optional[float]) -> None:
        self.endpoint = endpoint
        host, port, options = endpoint.route()
        options.pop("proxy_url", None)  # the client knows its proxy: see Server.raw_request
        self.sock = _transport.connect_blocking(
            host, port, ssl_context=endpoint.ssl_context, timeout=timeout, **options
        )
        self.parser = ResponseParser()
        self.used = False

    def exchange(
        self,
        request: PreparedRequest,
        timeout: Optional[float],
        max_body: Optional[int],
        max_error_body: int,
    ) -> Tuple[Optional[Response], bytes, bool]:
        """Send a request and read the whole response: ``(head, body, reusable)``.

        ``head`` is ``None`` if the connection closed before the response started. ``reusable``
        is false when the connection must not carry another request: the server said so, bytes
        are left after the response, or an error body was cut at ``max_error_body`` bytes (the rest
        is not read: it may never end).

        Raises:
            ResponseTooLargeError: a success body is larger than ``max_body``.
        """
        endpoint = self.endpoint
        if self.used:
            self.parser.start_next_response(request.method)
        else:
            self.parser = ResponseParser(request.method)
        self.used = True
        self.sock.settimeout(timeout)
        try:
            _send_request(self.sock, request)
        except OSError as exc:
            if _is_reset(exc):
                return None, b"", False  # a stale keep-alive connection: the caller may retry
            raise _transport.map_socket_error(
                exc, host=endpoint.host, port=endpoint.port, phase="write"
            ) from exc
        parser = self.parser
        head: Optional[Response] = None
        body: List[bytes] = []
        size = 0
        limit = max_body
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except OSError as exc:
                    if head is None and not parser.trailing_data[0] and _is_reset(exc):
                        return None, b"", False  # a stale keep-alive connection
                    raise _transport.map_socket_error(
                        exc, host=endpoint.host, port=endpoint.port, phase="read"
                    ) from exc
                parser.receive_data(data)
            elif isinstance(event, Response):
                head = event
                if head.status_code >= 400:
                    limit = None  # cut at max_error_body below, not refused
                elif limit is not None:
                    declared = _declared_length(head)
                    if declared is not None and declared > limit:
                        raise self._too_large(request, declared, limit, "announces")
            elif isinstance(event, Data):
                size += len(event.data)
                body.append(event.data)
                if limit is not None and size > limit:
                    raise self._too_large(request, size, limit, "sent at least")
                assert head is not None
                if head.status_code >= 400 and size >= max_error_body:
                    # Enough to show the error; the rest (possibly endless) is not read.
                    return head, b"".join(body)[:max_error_body], False
            elif isinstance(event, EndOfMessage):
                assert head is not None
                leftover, eof = parser.trailing_data
                return head, b"".join(body), head.keep_alive and not (leftover or eof)
            elif isinstance(event, ConnectionClosed):
                return None, b"", False

    def _too_large(
        self, request: PreparedRequest, size: int, limit: int, verb: str
    ) -> ResponseTooLargeError:
        url = self.endpoint.url  # it ends with the prefix, which the target starts with
        origin = url[: len(url) - len(self.endpoint.prefix)]
        if not request.target.startswith("/"):
            origin = ""  # an absolute-form target, to a proxy: it names the origin itself
        return ResponseTooLargeError(
            "%s %s%s: the answer %s %d body bytes, over the limit of %d (max_body_bytes)"
            % (request.method, origin, request.target, verb, size, limit),
            limit=limit,
        )

    def has_unread(self) -> bool:
        """Whether anything waits to be read: bytes the server sent unasked, or its close.

        Either way the connection cannot carry a request: unasked bytes would be read as its
        answer, and a closed connection would fail it.
        """
        pending = getattr(self.sock, "pending", None)  # TLS: bytes decrypted but not read
        if pending is not None and pending():
            return True
        return _readable(self.sock)

    def close(self) -> None:
        self.sock.close()


def _send_request(sock: socket.socket, request: PreparedRequest) -> None:
    """Write ``request``, its credentials included, leaving no trace of them in a traceback.

    The bytes are never bound to a name in our frames; but the stdlib's TLS ``sendall`` is Python
    code that keeps them as a local, so the locals of the frames below this one are cleared
    before an exception goes on up.
    """
    try:
        sock.sendall(request.wire())
    except BaseException as exc:
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__.tb_next)
        raise


def _declared_length(head: Response) -> Optional[int]:
    """The body length a ``Content-Length`` announces (the parser validated it), if it rules."""
    if head.get_header(b"transfer-encoding") is not None:
        return None
    value = head.get_header(b"content-length")
    return None if value is None else int(value.split(b",", 1)[0])


def _readable(sock: socket.socket) -> bool:
    if hasattr(select, "poll"):  # select() cannot watch a descriptor above FD_SETSIZE (1024)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _is_reset(exc: OSError) -> bool:
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))
