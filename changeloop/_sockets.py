"""Socket helpers shared by both kinds of connection: TLS contexts, name resolution, socket
options, the file-descriptor budget, and the one translation of socket failures into our errors.

Every ``OSError``/``ssl.SSLError`` becomes a :class:`~changeloop.errors.NetworkError` here, in
:func:`map_socket_error`, whose messages name ``host:port`` and the phase, never credentials.
The connections themselves are in :mod:`changeloop._transport`.
"""

import enum
import errno
import logging
import os
import socket
import ssl
from typing import Any, Callable, List, Optional, Protocol, Tuple, Union

from .errors import (
    ConnectError,
    ConnectTimeout,
    NameResolutionError,
    NetworkError,
    ReadError,
    ReadTimeout,
    ResourceLimitError,
    TLSError,
)

__all__ = [
    "AddrInfo",
    "PHASES",
    "Want",
    "Tunnel",
    "make_ssl_context",
    "resolve",
    "tune_socket",
    "map_socket_error",
    "ensure_fd_capacity",
]

# The connections' logger: these helpers log on their behalf.
logger = logging.getLogger("changeloop._transport")

# Half-open connections (a NAT box or load balancer silently forgot us, the server host died) are
# the most common failure of a long-lived changes follower: without keepalive the socket waits
# forever. These notice a dead peer after about 60 + 10 * 5 = 110 s of silence. (The consumer's
# heartbeat watchdog usually notices sooner; keepalive also covers idle pooled sockets.)
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 5

#: The phases a network failure happens in, as error messages name them.
PHASES = ("resolve", "connect", "proxy CONNECT", "TLS handshake", "read", "write")
_CONNECT_PHASES = PHASES[:4]
AddrInfo = Tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


class Want(enum.Enum):
    """What a :class:`NonBlockingConnection` needs before it can make progress."""

    READ = "read"  # wait until the socket is readable, then call advance() again
    WRITE = "write"  # wait until the socket is writable, then call advance() again
    DONE = "done"  # connected (and handshaken): use recv() and send()


class Tunnel(Protocol):
    """A ``CONNECT`` exchange without IO (``_proxy.Tunnel``): what the transport needs of it."""

    host: str  # the origin, whose name TLS sends and verifies inside the tunnel
    port: int
    request_bytes: int  # the length of the request
    sent: int  # how much of it was written; kept by the transport

    def wire(self, offset: int = 0) -> bytes:
        """The request's bytes from ``offset``, credentials included."""

    def receive(self, data: bytes) -> bool:
        """Take the proxy's bytes (``b""``: EOF); ``True`` once the tunnel is open."""


def _where(host: str, port: int) -> str:
    # An IPv6 literal needs brackets, or "::1:5984" would be ambiguous.
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def make_ssl_context(
    *,
    cafile: Optional[str] = None,
    capath: Optional[str] = None,
    cadata: Optional[Union[str, bytes]] = None,
    certfile: Optional[str] = None,
    keyfile: Optional[str] = None,
    key_password: Optional[str] = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """Build a client TLS context: certificate verified, host name checked, TLS 1.2 or newer.

    Args:
        cafile, capath, cadata: trust these CAs instead of the system store.
        certfile, keyfile, key_password: a PEM client certificate, for servers that ask for one.
        verify: ``False`` turns off certificate *and* host name checks. Dangerous: anyone on the
            path can then read and change the traffic, credentials included. For tests only.
    Returns:
        A new ``ssl.SSLContext``, to be shared by many connections.
    Raises:
        ssl.SSLError, OSError: a CA or certificate file is missing or malformed.
        ValueError: ``keyfile`` or ``key_password`` without ``certfile``.
    """
    if certfile is None and (keyfile is not None or key_password is not None):
        raise ValueError("keyfile and key_password need a certfile")
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=cafile, capath=capath, cadata=cadata
    )
    # Current Pythons already do this; say it anyway, so an old OpenSSL default or a
    # distribution's patch cannot let TLS 1.0/1.1 back in.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile, password=key_password)
    if not verify:
        # check_hostname must go first: the ssl module refuses CERT_NONE while it is on.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        logger.warning("TLS certificate verification is disabled")
    return context


def resolve(
    host: str, port: int, getaddrinfo: Callable[..., Any] = socket.getaddrinfo
) -> List[AddrInfo]:
    """Resolve ``host`` to TCP addresses, IPv4 and IPv6, in the resolver's preferred order.

    Args:
        host, port: a name or address literal (IPv6 without brackets: ``"::1"``); a TCP port.
        getaddrinfo: the lookup (the resolver's workers pass theirs; tests a slow one).
    Returns:
        ``socket.getaddrinfo`` tuples ``(family, type, proto, canonname, sockaddr)``.
    Raises:
        ConnectError: the name did not resolve.
    """
    try:
        # No AI_ADDRCONFIG: glibc ignores loopback when deciding whether IPv6 is "configured",
        # so it would make "::1" unresolvable on hosts whose only IPv6 address is loopback.
        return list(getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except OSError as exc:
        raise map_socket_error(exc, host=host, port=port, phase="resolve") from exc
    except UnicodeError as exc:  # the IDNA codec rejected the name
        raise ConnectError("could not resolve %s: %s" % (_where(host, port), exc)) from exc


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and TCP keepalive on ``sock``, skipping what the platform lacks.

    Args:
        sock: a TCP socket, connected or not.
    """
    # Requests are small and written in one go; Nagle's algorithm would only delay them.
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    # macOS spells the idle time TCP_KEEPALIVE; Linux, the BSDs and Windows 10 say TCP_KEEPIDLE.
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    for name, value in (
        (idle, KEEPALIVE_IDLE_S),
        (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
        (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
    ):
        if name is not None:
            options.append((socket.IPPROTO_TCP, name, value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            # Best effort: old kernels, WSL and some sandboxes reject some of these options
            # (ENOPROTOOPT, EINVAL), and the connection works without them.
            logger.debug("setsockopt(%d, %d) not supported; skipped", level, option)


def map_socket_error(exc: BaseException, *, host: str, port: int, phase: str) -> NetworkError:
    """Translate a socket or TLS failure into the matching :class:`NetworkError`.

    Args:
        exc: the caught ``OSError`` (``ssl.SSLError``, ``socket.timeout``, ...).
        host, port: where the connection goes, for the message.
        phase: one of ``PHASES``: "resolve", "connect", "TLS handshake", "read", "write".
    Returns:
        The error, for the caller to raise ``from exc``; a ``NetworkError`` comes back unchanged.
    Raises:
        ValueError: ``phase`` is not one of ``PHASES``.
    """
    if phase not in PHASES:
        raise ValueError("unknown phase %r" % (phase,))
    if isinstance(exc, NetworkError):
        return exc
    where = _where(host, port)
    connecting = phase in _CONNECT_PHASES
    # Before Python 3.10 socket.timeout was only an OSError, not a TimeoutError: check both.
    if isinstance(exc, (socket.timeout, TimeoutError)):
        cls = ConnectTimeout if connecting else ReadTimeout
        return cls("timed out during %s with %s" % (phase, where))
    if isinstance(exc, ssl.SSLCertVerificationError):
        # verify_message is OpenSSL's reason: "unable to get local issuer certificate",
        # "Hostname mismatch, certificate is not valid for 'x'.", "certificate has expired".
        detail = "certificate verify failed: %s" % (exc.verify_message or exc,)
        return TLSError("%s with %s failed: %s" % (phase, where, detail))
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
        # The TCP connection closed under TLS: a broken connection, not a certificate problem,
        # so it gets the retryable error of its phase rather than the fatal TLSError.
        if connecting:
            return ConnectError("connection closed during %s with %s: %s" % (phase, where, exc))
        return ReadError("connection to %s closed during %s: %s" % (where, phase, exc))
    if isinstance(exc, ssl.SSLError):
        # Alerts and protocol failures: wrong version, no shared cipher, a client certificate the
        # server wanted (with TLS 1.3 that alert arrives on the first read, not in the handshake).
        return TLSError("TLS failure during %s with %s: %s" % (phase, where, exc))
    if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE):
        return ResourceLimitError(
            "out of file descriptors during %s with %s (%s); open-file limit: %s"
            % (phase, where, exc, _fd_limit_text())
        )
    if isinstance(exc, socket.gaierror) and exc.errno == getattr(socket, "EAI_NONAME", None):
        return NameResolutionError("could not resolve %s: name does not exist" % (where,))
    if phase == "resolve" or isinstance(exc, socket.gaierror):
        return ConnectError("could not resolve %s: %s" % (where, exc))
    if connecting:
        return ConnectError("could not connect to %s (%s): %s" % (where, phase, exc))
    return ReadError("connection to %s broke during %s: %s" % (where, phase, exc))



#: Descriptors left free for everything else a process opens (files, logs, the loop's own).
FD_HEADROOM = 64


def _open_fd_count() -> int:
    # Linux and the BSDs list a process's descriptors here; elsewhere we cannot count cheaply
    # and count none, which only makes the check below more lenient.
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return 0


def _fd_limit_text() -> str:
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE
        return "unknown"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "soft %s, hard %s" % (
        "unlimited" if soft == resource.RLIM_INFINITY else soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
    )


def ensure_fd_capacity(extra: int) -> None:
    """Make room for ``extra`` more sockets: raise the soft open-file limit toward the hard one.

    Many feeds on one thread means one descriptor each; the default soft limit (often 1024) is
    far below the hard one (often 524288), so it is raised as far as needed, never lowered.

    Raises:
        ResourceLimitError: even the hard limit is too low; the message says how many
            descriptors are needed and what the limits are.
    """
    try:
        import resource
    except ImportError:  # Windows: sockets are not bounded by RLIMIT_NOFILE
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = _open_fd_count() + extra + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ResourceLimitError(
            "%d file descriptors are needed (%d more sockets, %d in use, %d spare) but the "
            "open-file limit is %d (hard %d): raise it with `ulimit -n` or limits.conf"
            % (needed, extra, needed - extra - FD_HEADROOM, FD_HEADROOM, soft, hard)
        )
    target = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, 2 * soft))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    logger.info("raised the open-file soft limit from %d to %d for %d feeds", soft, target, extra)
