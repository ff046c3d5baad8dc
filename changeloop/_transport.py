"""Sockets in, sockets out: connecting, TLS, and the proxy tunnel, blocking and non-blocking.

Strategy: this module knows nothing of HTTP, CouchDB or the event loop; it wraps sockets. The
blocking client gets :func:`connect_blocking` (each resolved address in turn, then the TLS
handshake, all within one deadline). The selectors loop gets :class:`NonBlockingConnection`:
its ``start()``/``advance()`` return the readiness (:class:`Want`) they need next, so neither
connecting nor the TLS handshake ever blocks; the loop owns the timers, it owns the socket.
Every ``OSError``/``ssl.SSLError`` is translated here by :func:`map_socket_error` (which the
blocking client also uses for its reads) and chained with ``from``. Messages name ``host:port``
and the phase, never credentials: callers pass bare host names.

Through an HTTP proxy, a TLS connection has one more phase between TCP and TLS: the ``CONNECT``
exchange, driven here but spoken by a sans-IO :class:`Tunnel` the caller passes in (see
``_proxy``), so this module still parses no HTTP. Its deadline is the connection's.
"""

import logging
import os
import socket
import ssl
import time
from typing import Any, Optional, Sequence, Tuple, Union

from ._sockets import (
    AddrInfo,
    Tunnel,
    Want,
    _where,
    ensure_fd_capacity,
    make_ssl_context,
    map_socket_error,
    resolve,
    tune_socket,
)
from .errors import (
    ConnectError,
    ConnectTimeout,
)

# The connections, and (from _sockets) what their users need with them.
__all__ = [
    "NonBlockingConnection",
    "connect_blocking",
    "Want",
    "Tunnel",
    "make_ssl_context",
    "resolve",
    "tune_socket",
    "map_socket_error",
    "ensure_fd_capacity",
]

logger = logging.getLogger(__name__)

# Python does not enable OpenSSL's partial writes, and OpenSSL wants a write that failed with
# WANT_WRITE retried with the same bytes. Capping each TLS send at one record's plaintext (RFC
# 8446 section 5.1) keeps retries identical as long as the caller resends from the same offset.
MAX_TLS_WRITE_BYTES = 16384
#: Bytes asked of one ``recv`` while reading a proxy's answer to CONNECT (a short head).
TUNNEL_RECV_BYTES = 4096


def connect_blocking(
    host: str,
    port: int,
    *,
    ssl_context: Optional[ssl.SSLContext] = None,
    server_hostname: Optional[str] = None,
    timeout: Optional[float],
    tunnel: Optional[Tunnel] = None,
) -> socket.socket:
    """Open a blocking TCP connection, TLS-handshaken if ``ssl_context`` is given.

    Args:
        host, port: where to connect; IPv6 literals without brackets.
        ssl_context: wrap the socket in TLS with this context (see :func:`make_ssl_context`).
        server_hostname: the name to send (SNI) and verify; defaults to ``host``.
        timeout: seconds for all addresses, the tunnel and the handshake together, or ``None``
            to wait forever. It then stays the socket's timeout for each read (``settimeout``
            changes it).
        tunnel: ``host:port`` is an HTTP proxy: open this ``CONNECT`` tunnel through it before
            TLS (``server_hostname`` then names the origin).
    Returns:
        The connected socket (an ``ssl.SSLSocket`` with TLS); the caller closes it.
    Raises:
        ConnectError: the name did not resolve or no address took the connection (the last
            error is chained).
        ConnectTimeout: connecting or the handshake did not finish within ``timeout``.
        TLSError: the handshake failed, e.g. an untrusted certificate or the wrong host name.
        HTTPError, ConnectError, ProtocolError: the proxy refused the tunnel (see ``Tunnel``).
        ValueError: ``timeout`` is not positive.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive or None, not %r" % (timeout,))
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining() -> Optional[float]:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise socket.timeout("timed out")
        return left

    last_exc: BaseException = OSError("no address to connect to")
    sock: Optional[socket.socket] = None
    for family, type_, proto, _, sockaddr in resolve(host, port):
        try:
            sock = socket.socket(family, type_, proto)
            tune_socket(sock)
            sock.settimeout(remaining())
            sock.connect(sockaddr)
            break
        except OSError as exc:  # also EAFNOSUPPORT: an IPv6 address on a host without IPv6
            logger.debug("connect to %s via %r failed: %s", _where(host, port), sockaddr, exc)
            last_exc = exc
            if sock is not None:
                sock.close()
                sock = None
            if isinstance(exc, socket.timeout):
                break  # the deadline covers all addresses, so none is left for the next one
    if sock is None:
        raise map_socket_error(last_exc, host=host, port=port, phase="connect") from last_exc
    if tunnel is not None:
        try:
            sock.settimeout(remaining())
            _open_tunnel_blocking(sock, tunnel)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                err = map_socket_error(exc, host=host, port=port, phase="proxy CONNECT")
                raise err from exc
            raise
        host, port = tunnel.host, tunnel.port  # TLS runs to the origin: its errors name it
    if ssl_context is not None:
        try:
            sock.settimeout(remaining())
            # wrap_socket detaches the plain socket object: from here on, sock owns the fd.
            sock = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname or host, do_handshake_on_connect=False
            )
            # The ssl module gives the whole handshake one deadline, not each record a timeout.
            sock.do_handshake()
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                err = map_socket_error(exc, host=host, port=port, phase="TLS handshake")
                raise err from exc
            raise
    sock.settimeout(timeout)
    return sock


def _open_tunnel_blocking(sock: socket.socket, tunnel: Tunnel) -> None:
    # The request's bytes go straight to the (plain) socket, never bound to a name.
    sock.sendall(tunnel.wire())
    tunnel.sent = tunnel.request_bytes
    while not tunnel.receive(sock.recv(TUNNEL_RECV_BYTES)):
        pass


class NonBlockingConnection:
    """One non-blocking TCP (optionally TLS) connection, driven by a selectors loop.

    Call :meth:`start`, then :meth:`advance` each time the socket shows the readiness the last
    call returned, until ``Want.DONE``; the caller owns the connect timer and, when it fires,
    raises :meth:`connect_timeout_error` and closes. Register ``fileno()`` (the int) and compare
    it after every ``start``/``advance``: when an address fails and the next one is tried, a new
    socket is opened *before* the old one is closed, so the number always changes; unregister the
    old number, register the new one. If ``start``/``advance`` raise, the connection is closed.
    After ``Want.DONE``, :meth:`recv` and :meth:`send` never block. Not thread-safe.

    With a ``tunnel``, ``host:port`` is an HTTP proxy: once TCP is up, the ``CONNECT`` request is
    written and the proxy's answer read (state ``tunnelling``), each step on the readiness it
    needs like the others, and then TLS runs to the origin the tunnel names. Plain HTTP through
    a proxy is an ordinary connection to it; ``proxy_url`` says so, for messages.
    """

    __slots__ = (
        "_addrs",
        "_deferred",
        "_last_exc",
        "_tls",
        "host",
        "port",
        "server_hostname",
        "sock",
        "ssl_context",
        "state",
        "wants_write",
    )

    # Through a proxy only, so held by _ProxiedConnection's slots: a direct connection, as
    # almost every one of 10,000 feeds is, reads these class attributes (16 bytes a feed less).
    _tunnel: Optional[Tunnel] = None
    #: The URL of the HTTP proxy ``host:port`` is, when it forwards this plain connection's
    #: requests (so that an answer may be the proxy's own); for messages.
    proxy_url: Optional[str] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "NonBlockingConnection":
        if cls is NonBlockingConnection and (kwargs.get("tunnel") or kwargs.get("proxy_url")):
            cls = _ProxiedConnection
        return super().__new__(cls)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        tunnel: Optional[Tunnel] = None,
        proxy_url: Optional[str] = None,
    ) -> None:
        if tunnel is not None and ssl_context is None:
            raise ValueError("a CONNECT tunnel is for TLS to the origin: give its ssl_context")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or (host if tunnel is None else tunnel.host)
        self.sock: Optional[socket.socket] = None
        # then resolving, connecting, (tunnelling,) handshaking, open; closed at any point
        self.state = "new"
        if tunnel is not None or proxy_url is not None:  # a _ProxiedConnection (see __new__)
            self._tunnel = tunnel  # type: ignore[misc]  # (slots of _ProxiedConnection)
            self.proxy_url = proxy_url  # type: ignore[misc]
        #: Set by recv() when TLS must write before it can read: wait for writable, then recv().
        self.wants_write = False
        self._tls: Optional[ssl.SSLSocket] = None
        self._deferred: Optional[OSError] = None  # met by recv() after some bytes; raised next
        # The addresses left to try; an empty tuple once connected, not a list kept per feed.
        self._addrs: Sequence[AddrInfo] = ()
        self._last_exc: Optional[BaseException] = None

    def __repr__(self) -> str:
        return "<%s %s %s %s fd=%d>" % (
            type(self).__name__,
            _where(self.host, self.port),
            "plain" if self.ssl_context is None else self._tls_words(),
            self.state,
            self.fileno(),
        )

    def _tls_words(self) -> str:
        tunnel = self._tunnel
        return "tls" if tunnel is None else "tls to %s" % _where(tunnel.host, tunnel.port)

    def __enter__(self) -> "NonBlockingConnection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran or connecting failed."""
        return self.state == "closed"

    def fileno(self) -> int:
        """Return the socket's descriptor, or -1 before :meth:`start` and after :meth:`close`."""
        return self.sock.fileno() if self.sock is not None else -1

    def start(self, addrs: Optional[Sequence[AddrInfo]] = None) -> Want:
        """Resolve the host and start connecting to its first address.

        ``getaddrinfo`` blocks (the stdlib has no non-blocking resolver); it is instant for
        address literals and usually quick with a local cache. A caller on an event loop
        resolves elsewhere (:mod:`changeloop._resolve`) and passes the answer as ``addrs``.

        Returns:
            The readiness to wait for before calling :meth:`advance` (usually ``Want.WRITE``).
        Raises:
            ConnectError: the name did not resolve, or every address failed at once.
            RuntimeError: already started.
        """
        if self.state != "new":
            raise RuntimeError("cannot start %r: start() runs once" % (self,))
        self.state = "resolving"
        try:
            self._addrs = tuple(addrs if addrs is not None else resolve(self.host, self.port))
        except ConnectError:
            self.close()
            raise
        self.state = "connecting"
        return self._connect_next()

    def advance(self) -> Want:
        """Make progress after the readiness the last call asked for.

        Returns:
            ``Want.READ`` or ``Want.WRITE`` to wait for, or ``Want.DONE`` once open.
        Raises:
            ConnectError: every address failed (the last error is chained).
            TLSError: the handshake failed: untrusted certificate, wrong host name, an alert.
            RuntimeError: :meth:`start` was not called, or the connection is closed.
        """
        if self.state == "connecting":
            assert self.sock is not None
            # Windows reports a failed connect in select()'s exception set, not as writable;
            # selectors.SelectSelector folds that set into EVENT_WRITE, so WRITE covers both.
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                # OSError(errno, ...) builds the matching subclass, e.g. ConnectionRefusedError.
                self._last_exc = OSError(err, os.strerror(err))
                return self._connect_next()
            try:
                self.sock.getpeername()
            except OSError:  # called before the connect finished (a spurious wake-up): wait on
                return Want.WRITE
            return self._connected()
        if self.state == "handshaking":
            return self._handshake()
        if self.state == "tunnelling":
            return self._tunnel_step()
        if self.state == "open":
            return Want.DONE
        raise RuntimeError("cannot advance %r" % (self,))

    def connect_timeout_error(self) -> ConnectTimeout:
        """Return a :class:`ConnectTimeout` naming the current phase, for the caller to raise."""
        phase = {"handshaking": "TLS handshake", "tunnelling": "proxy CONNECT"}.get(
            self.state, "connect"
        )
        host, port = self._tls_peer() if self.state == "handshaking" else (self.host, self.port)
        return ConnectTimeout("timed out during %s with %s" % (phase, _where(host, port)))

    def _tls_peer(self) -> Tuple[str, int]:
        """Who TLS talks to, for messages: the origin at the end of a tunnel, else the peer."""
        tunnel = self._tunnel
        return (self.host, self.port) if tunnel is None else (tunnel.host, tunnel.port)

    def _connect_next(self) -> Want:
        while self._addrs:
            family, type_, proto, _, sockaddr = self._addrs[0]
            self._addrs = self._addrs[1:]
            try:
                new = socket.socket(family, type_, proto)
            except OSError as exc:  # e.g. EAFNOSUPPORT: an IPv6 address on a host without IPv6
                self._last_exc = exc
                continue
            old, self.sock = self.sock, new  # see the class docstring: close the old one after
            if old is not None:
                old.close()
            new.setblocking(False)
            tune_socket(new)
            try:
                new.connect(sockaddr)
            except (BlockingIOError, InterruptedError):
                # EINPROGRESS (Windows' WSAEWOULDBLOCK maps to BlockingIOError too): the usual
                # case. After EINTR the connect also carries on in the background (PEP 475).
                return Want.WRITE
            except OSError as exc:
                logger.debug("connect to %r failed at once: %s", sockaddr, exc)
                self._last_exc = exc
                continue
            return self._connected()  # immediate success happens on loopback
        last = self._last_exc or OSError("no address to connect to")
        self.close()
        raise map_socket_error(last, host=self.host, port=self.port, phase="connect") from last

    def _connected(self) -> Want:
        logger.debug("connected to %s", _where(self.host, self.port))
        self._addrs = ()
        if self.ssl_context is None:
            self.state = "open"
            return Want.DONE
        if self._tunnel is not None:
            self.state = "tunnelling"
            return self._tunnel_step()
        self.state = "handshaking"
        return self._handshake()

    def _tunnel_step(self) -> Want:
        """Write what is left of the CONNECT request, then read the answer as far as it came."""
        sock, tunnel = self.sock, self._tunnel
        assert sock is not None and tunnel is not None
        try:
            while tunnel.sent < tunnel.request_bytes:
                # The bytes (credentials included) go straight to the plain socket, unnamed.
                tunnel.sent += sock.send(tunnel.wire(tunnel.sent))
            while not tunnel.receive(sock.recv(TUNNEL_RECV_BYTES)):
                pass
        except (BlockingIOError, InterruptedError):
            return Want.WRITE if tunnel.sent < tunnel.request_bytes else Want.READ
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                err = map_socket_error(exc, host=self.host, port=self.port, phase="proxy CONNECT")
                raise err from exc
            raise
        where = _where(tunnel.host, tunnel.port)
        logger.debug("tunnel to %s open through %s", where, _where(self.host, self.port))
        self.state = "handshaking"
        return self._handshake()

    def _handshake(self) -> Want:
        assert self.sock is not None and self.ssl_context is not None
        try:
            if self._tls is None:
                # Same descriptor: wrap_socket detaches the plain socket object and takes its fd.
                self.sock = self._tls = self.ssl_context.wrap_socket(
                    self.sock, server_hostname=self.server_hostname, do_handshake_on_connect=False
                )
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return Want.READ
        except ssl.SSLWantWriteError:
            return Want.WRITE
        except BaseException as exc:
            host, port = self._tls_peer()
            self.close()
            if isinstance(exc, OSError):
                err = map_socket_error(exc, host=host, port=port, phase="TLS handshake")
                raise err from exc
            raise
        self.state = "open"
        logger.debug("TLS with %s: %s", _where(*self._tls_peer()), self._tls.version())
        return Want.DONE

    def pending(self) -> int:
        """Return how many decrypted bytes wait inside the TLS object (always 0 without TLS).

        ``select()`` cannot see these bytes: while this is non-zero, call :meth:`recv` again
        instead of waiting for readiness, or the connection stalls with data in hand. A failure
        that :meth:`recv` met after reading some records, and raises on its next call, counts
        as one byte for the same reason.
        """
        if self._tls is None or self.state != "open":
            return 0
        return self._tls.pending() or (1 if self._deferred is not None else 0)

    def recv(self, max_bytes: int) -> Optional[bytes]:
        """Read what is available now, up to ``max_bytes``.

        With TLS one call reads the records already there, up to ``max_bytes``; when
        ``max_bytes`` cuts a record short, ``pending()`` stays non-zero and the caller must call
        ``recv`` again before sleeping in ``select()``.

        Args:
            max_bytes: the most bytes to return; positive.
        Returns:
            The bytes; ``b""`` at end of stream (also a TLS EOF without close_notify); ``None``
            if nothing is available yet; then see :attr:`wants_write` for which readiness to await.
        Raises:
            ReadError: the connection was reset or aborted.
            TLSError: a TLS alert or a corrupt record arrived.
            RuntimeError: the connection is not open.
        """
        if self.state != "open" or self.sock is None:
            raise RuntimeError("cannot recv on %r" % (self,))
        self.wants_write = False
        try:
            if self._deferred is not None:
                deferred, self._deferred = self._deferred, None
                raise deferred
            data = self.sock.recv(max_bytes)
            if self._tls is not None and data:
                data = self._recv_more_records(data, max_bytes)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            # EOF without close_notify ("ragged") counts as end of stream, like close_notify:
            # servers and proxies often close that way, and the HTTP parser above knows from
            # the framing whether the message was complete. CPython 3.10+ with OpenSSL 3 also
            # reports a TCP reset under TLS as SSLEOFError (the errno is lost), so over TLS a
            # reset reads as EOF too.
            return b""
        except OSError as exc:
            err = map_socket_error(exc, host=self.host, port=self.port, phase="read")
            raise err from exc
        return data

    def _recv_more_records(self, data: bytes, max_bytes: int) -> bytes:
        # One TLS read returns at most one record (16 KiB): read on while whole records are
        # there, up to max_bytes, so that a catching-up feed gets as much per call (and per
        # pass of the loop) as in plaintext. Whatever stops the reading after the first record
        # (EOF, an alert, a reset, a write the session needs) is kept for the next call to
        # raise, so the bytes read before it are handed over first.
        assert self._tls is not None
        chunks = [data]
        size = len(data)
        while size < max_bytes:
            try:
                more = self._tls.recv(max_bytes - size)
            except ssl.SSLWantReadError:
                break  # nothing more yet
            except OSError as exc:
                self._deferred = exc
                break
            if not more:
                self._deferred = ssl.SSLZeroReturnError("TLS connection closed")  # EOF
                break
            chunks.append(more)
            size += len(more)
        return b"".join(chunks)

    def send(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Write as much of ``data`` as fits now.

        With TLS one call writes at most ``MAX_TLS_WRITE_BYTES``; after a 0, call again with the
        same unsent bytes (OpenSSL insists on an identical retry).

        Args:
            data: the bytes to write.
        Returns:
            How many bytes were written; 0 if the socket would block: wait for writable (TLS may
            instead need a read, which a feed consumer's standing read interest provides).
        Raises:
            ReadError: the connection was reset or the pipe broke; either way it is broken.
            TLSError: the TLS session failed.
            RuntimeError: the connection is not open.
        """
        if self.state != "open" or self.sock is None:
            raise RuntimeError("cannot send on %r" % (self,))
        try:
            return self.sock.send(data[:MAX_TLS_WRITE_BYTES] if self._tls is not None else data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as exc:
            err = map_socket_error(exc, host=self.host, port=self.port, phase="write")
            raise err from exc

    def close(self) -> None:
        """Close the socket; calling it again does nothing.

        No TLS close_notify exchange: it could block or fail on a broken connection, and HTTP
        framing, not the TLS shutdown, tells the peer the request was complete.
        """
        self.state = "closed"
        self._addrs = ()
        sock, self.sock, self._tls = self.sock, None, None
        if sock is not None:
            sock.close()


class _ProxiedConnection(NonBlockingConnection):
    """A connection through an HTTP proxy: the same, with slots for the proxy's part."""

    __slots__ = ("_tunnel", "proxy_url")
