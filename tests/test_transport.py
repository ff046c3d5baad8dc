"""Tests for changeloop._transport: loopback servers in threads, trustme certificates, no network.

Each scripted server accepts one connection, optionally does the TLS handshake, runs a handler,
then closes gracefully (FIN, then drain until the client closes) so the client never sees a reset
it did not ask for. Clients are closed before servers are joined (``with`` nesting order).
"""

import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Iterator, List, Optional

import pytest
import trustme

from changeloop import _sockets, _transport
from changeloop._transport import (
    NonBlockingConnection,
    Want,
    connect_blocking,
    make_ssl_context,
    map_socket_error,
    resolve,
    tune_socket,
)
from changeloop.errors import (
    ConnectError,
    ConnectTimeout,
    NameResolutionError,
    NetworkError,
    ReadError,
    ReadTimeout,
    TLSError,
)

pytestmark = pytest.mark.timeout(5)

Handler = Callable[[socket.socket], None]


def linger_close(conn: socket.socket) -> None:
    """Send FIN, read until the client closes, then close: no surprise resets."""
    if conn.fileno() == -1:
        return
    try:
        # On an SSLSocket, shutdown() also drops the TLS layer, so the drain below reads raw.
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def wait_for_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


class Server:
    """Accept one connection on loopback in a thread, do TLS if asked, run ``handler``."""

    def __init__(
        self, handler: Handler, *, tls: Optional[ssl.SSLContext] = None, host: str = "127.0.0.1"
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(4)
        self.listener.settimeout(3)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.tls = tls
        self.errors: List[BaseException] = []
        self.handshake_errors: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.thread.join(4)
        self.listener.close()
        assert not self.thread.is_alive()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            self.errors.append(exc)
            return
        try:
            conn.settimeout(3)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                try:
                    conn.do_handshake()
                except OSError as exc:
                    self.handshake_errors.append(exc)
                    return
            self.handler(conn)
        except Exception as exc:  # reported by the test, not as a thread warning
            self.errors.append(exc)
        finally:
            linger_close(conn)


def send_hello(conn: socket.socket) -> None:
    conn.sendall(b"hello")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("cannot bind ::1")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    return make_ssl_context(cadata=ca.cert_pem.bytes().decode("ascii"))


@pytest.fixture
def mtls_server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def recv_all_blocking(sock: socket.socket) -> bytes:
    chunks: List[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# -- make_ssl_context, resolve, tune_socket, map_socket_error --------------------------------


def test_ssl_context_defaults_are_strict() -> None:
    ctx = make_ssl_context()
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_ssl_context_verify_false_turns_checks_off() -> None:
    ctx = make_ssl_context(verify=False)
    assert ctx.check_hostname is False
    assert ctx.verify_mode == ssl.CERT_NONE


def test_ssl_context_keyfile_needs_certfile() -> None:
    with pytest.raises(ValueError):
        make_ssl_context(keyfile="key.pem")


def test_resolve_ipv4_literal() -> None:
    infos = resolve("127.0.0.1", 5984)
    assert infos and all(info[1] == socket.SOCK_STREAM for info in infos)
    assert infos[0][4] == ("127.0.0.1", 5984)


def test_resolve_ipv6_literal() -> None:
    ipv6_loopback()
    assert resolve("::1", 5984)[0][4][:2] == ("::1", 5984)


def test_resolve_failure_is_connect_error_without_network() -> None:
    # An empty label fails in the IDNA codec before any resolver is asked.
    with pytest.raises(ConnectError, match=r"could not resolve bad\.\.name:80") as info:
        resolve("bad..name", 80)
    assert isinstance(info.value.__cause__, UnicodeError)


def test_tune_socket_sets_nodelay_and_keepalive() -> None:
    with socket.socket() as sock:
        tune_socket(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            assert idle == _sockets.KEEPALIVE_IDLE_S


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no AF_UNIX")
def test_tune_socket_ignores_unsupported_options() -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        tune_socket(sock)  # TCP options make no sense here; must not raise


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    "exc, phase, expected",
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "resolve",
            NameResolutionError,
        ),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), "resolve", ConnectError),
        (ConnectionRefusedError(111, "Connection refused"), "connect", ConnectError),
        (socket.timeout("timed out"), "connect", ConnectTimeout),
        (socket.timeout("timed out"), "TLS handshake", ConnectTimeout),
        (socket.timeout("timed out"), "read", ReadTimeout),
        (socket.timeout("timed out"), "write", ReadTimeout),
        (_verify_error("unable to get local issuer certificate"), "TLS handshake", TLSError),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            "TLS handshake",
            TLSError,
        ),
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"), "read", TLSError),
        (
            ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
            "TLS handshake",
            ConnectError,
        ),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "read", ReadError),
        (ConnectionResetError(104, "Connection reset by peer"), "TLS handshake", ConnectError),
        (ConnectionResetError(104, "Connection reset by peer"), "read", ReadError),
        (ConnectionAbortedError(103, "Software caused connection abort"), "read", ReadError),
        (BrokenPipeError(32, "Broken pipe"), "write", ReadError),
    ],
)
def test_map_socket_error(exc: OSError, phase: str, expected: type) -> None:
    err = map_socket_error(exc, host="db.example", port=6984, phase=phase)
    assert type(err) is expected
    assert "db.example:6984" in str(err) and phase in str(err)


def test_map_socket_error_messages() -> None:
    err = map_socket_error(
        _verify_error("unable to get local issuer certificate"),
        host="::1",
        port=6984,
        phase="TLS handshake",
    )
    assert str(err) == (
        "TLS handshake with [::1]:6984 failed: certificate verify failed: "
        "unable to get local issuer certificate"
    )
    assert isinstance(
        map_socket_error(socket.timeout(), host="h", port=1, phase="read"), TimeoutError
    )
    already = ReadError("x")
    assert map_socket_error(already, host="h", port=1, phase="read") is already
    with pytest.raises(ValueError):
        map_socket_error(OSError(), host="h", port=1, phase="dance")


# -- connect_blocking -------------------------------------------------------------------------


def test_blocking_plain_connect_and_recv() -> None:
    with Server(send_hello) as server:
        with connect_blocking(server.host, server.port, timeout=2) as sock:
            assert sock.gettimeout() == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert recv_all_blocking(sock) == b"hello"
    assert not server.errors


def test_blocking_ipv6_connect() -> None:
    ipv6_loopback()
    with Server(send_hello, host="::1") as server:
        with connect_blocking("::1", server.port, timeout=2) as sock:
            assert sock.family == socket.AF_INET6
            assert recv_all_blocking(sock) == b"hello"


def test_blocking_refused() -> None:
    port = unused_port()
    with pytest.raises(ConnectError, match=r"127\.0\.0\.1:%d" % port) as info:
        connect_blocking("127.0.0.1", port, timeout=1)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_blocking_tries_next_address(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = unused_port()
    with Server(send_hello) as server:
        infos = resolve("127.0.0.1", refused) + resolve("127.0.0.1", server.port)
        monkeypatch.setattr(_transport, "resolve", lambda host, port: infos)
        with connect_blocking("127.0.0.1", server.port, timeout=2) as sock:
            assert recv_all_blocking(sock) == b"hello"


def test_blocking_rejects_nonpositive_timeout() -> None:
    with pytest.raises(ValueError):
        connect_blocking("127.0.0.1", 1, timeout=0)


def test_blocking_tls_verified(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    with Server(send_hello, tls=server_ctx) as server:
        with connect_blocking(server.host, server.port, ssl_context=client_ctx, timeout=2) as sock:
            assert isinstance(sock, ssl.SSLSocket)
            assert recv_all_blocking(sock) == b"hello"  # ragged EOF reads as b""
    assert not server.errors and not server.handshake_errors


def test_blocking_tls_ca_file(ca: trustme.CA, server_ctx: ssl.SSLContext) -> None:
    with ca.cert_pem.tempfile() as cafile, Server(send_hello, tls=server_ctx) as server:
        ctx = make_ssl_context(cafile=cafile)
        with connect_blocking("127.0.0.1", server.port, ssl_context=ctx, timeout=2) as sock:
            assert recv_all_blocking(sock) == b"hello"


def test_blocking_tls_untrusted_ca(server_ctx: ssl.SSLContext) -> None:
    other = make_ssl_context(cadata=trustme.CA().cert_pem.bytes().decode("ascii"))
    with Server(send_hello, tls=server_ctx) as server:
        with pytest.raises(TLSError, match="certificate verify failed") as info:
            connect_blocking(server.host, server.port, ssl_context=other, timeout=2)
    assert "unable to get local issuer certificate" in str(info.value)
    assert "TLS handshake" in str(info.value)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


def test_blocking_tls_wrong_hostname(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with Server(send_hello, tls=server_ctx) as server:
        with pytest.raises(TLSError, match="(?i)hostname") as info:
            connect_blocking(
                server.host,
                server.port,
                ssl_context=client_ctx,
                server_hostname="wrong.example",
                timeout=2,
            )
    assert "wrong.example" in str(info.value)


def test_blocking_tls_verify_false_accepts_anything(server_ctx: ssl.SSLContext) -> None:
    ctx = make_ssl_context(verify=False)
    with Server(send_hello, tls=server_ctx) as server:
        with connect_blocking(
            server.host, server.port, ssl_context=ctx, server_hostname="wrong.example", timeout=2
        ) as sock:
            assert recv_all_blocking(sock) == b"hello"


def test_blocking_tls_client_cert(ca: trustme.CA, mtls_server_ctx: ssl.SSLContext) -> None:
    cadata = ca.cert_pem.bytes().decode("ascii")
    with ca.issue_cert("client@example").private_key_and_cert_chain_pem.tempfile() as pem:
        ctx = make_ssl_context(cadata=cadata, certfile=pem)
    with Server(send_hello, tls=mtls_server_ctx) as server:
        with connect_blocking(server.host, server.port, ssl_context=ctx, timeout=2) as sock:
            assert recv_all_blocking(sock) == b"hello"
    assert not server.handshake_errors


def test_blocking_tls_client_cert_missing_tls12(
    mtls_server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # TLS 1.2: the server checks the client certificate inside the handshake, so the
    # handshake itself fails with the server's alert.
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with Server(send_hello, tls=mtls_server_ctx) as server:
        with pytest.raises(TLSError, match="TLS handshake"):
            connect_blocking(server.host, server.port, ssl_context=client_ctx, timeout=2)


def test_blocking_tls_client_cert_missing_tls13(
    mtls_server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # TLS 1.3: the client finishes its side of the handshake before the server has looked at
    # the (missing) certificate, so connecting succeeds and the server's alert arrives on the
    # first read. map_socket_error turns it into TLSError there (not ReadError: retrying the
    # same configuration cannot help).
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with Server(send_hello, tls=mtls_server_ctx) as server:
        with connect_blocking(server.host, server.port, ssl_context=client_ctx, timeout=2) as sock:
            with pytest.raises(ssl.SSLError) as info:
                sock.recv(100)
            err = map_socket_error(info.value, host=server.host, port=server.port, phase="read")
    assert isinstance(err, TLSError) and "certificate required" in str(err)


def test_blocking_tls_handshake_stall(client_ctx: ssl.SSLContext) -> None:
    with Server(wait_for_eof) as server:  # TCP only: never answers the ClientHello
        started = time.monotonic()
        with pytest.raises(ConnectTimeout, match="TLS handshake") as info:
            connect_blocking(server.host, server.port, ssl_context=client_ctx, timeout=0.3)
        assert time.monotonic() - started < 0.8
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, (socket.timeout, TimeoutError))


def test_blocking_read_timeout_maps_to_read_timeout() -> None:
    with Server(wait_for_eof) as server:
        with connect_blocking(server.host, server.port, timeout=0.1) as sock:
            with pytest.raises((socket.timeout, TimeoutError)) as info:
                sock.recv(10)
    err = map_socket_error(info.value, host=server.host, port=server.port, phase="read")
    assert isinstance(err, ReadTimeout)


# -- NonBlockingConnection --------------------------------------------------------------------


def wait(conn: NonBlockingConnection, want: Want, timeout: float = 1.0) -> bool:
    fd = conn.fileno()
    readers = [fd] if want is Want.READ else []
    writers = [fd] if want is Want.WRITE else []
    ready = select.select(readers, writers, [], timeout)
    return bool(ready[0] or ready[1])


def drive(conn: NonBlockingConnection, timeout: float = 2.0) -> List[int]:
    """A tiny selector loop: start, then advance on readiness; returns the fds seen."""
    deadline = time.monotonic() + timeout
    want = conn.start()
    fds = [conn.fileno()]
    while want is not Want.DONE:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            err = conn.connect_timeout_error()
            conn.close()
            raise err
        wait(conn, want, remaining)
        want = conn.advance()
        if conn.fileno() not in (fds[-1], -1):
            fds.append(conn.fileno())
    return fds


def wait_for_records_behind(conn: NonBlockingConnection, big: int, count: int) -> None:
    """Wait until ``count`` TLS records of at least ``big`` bytes, and one whole record behind
    them, sit unread in the kernel's buffer.

    ``sendall`` on the server returning does not mean every byte has reached the client's
    socket (a busy machine delivers loopback traffic later), and a test about what one
    ``recv`` takes must first know that it is all there. Peeks at the raw bytes; reads nothing.
    """
    raw = socket.socket(fileno=os.dup(conn.fileno()))
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            select.select([raw], [], [], 0.05)
            try:
                queued = raw.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            lengths = []  # of the whole records queued
            at = 0
            while at + 5 <= len(queued):
                length = struct.unpack("!H", queued[at + 3 : at + 5])[0]
                if at + 5 + length > len(queued):
                    break
                lengths.append(length)
                at += 5 + length
            bigs = [i for i, length in enumerate(lengths) if length >= big]
            if len(bigs) >= count and bigs[count - 1] + 1 < len(lengths):
                return
            time.sleep(0.005)  # some are there, so select() would not wait: leave the CPU
        raise AssertionError("the server's records never all reached the client")
    finally:
        raw.close()


def read_until_eof(conn: NonBlockingConnection, max_bytes: int = 65536) -> bytes:
    chunks: List[bytes] = []
    while True:
        if not conn.pending():
            wait(conn, Want.WRITE if conn.wants_write else Want.READ)
        data = conn.recv(max_bytes)
        if data == b"":
            return b"".join(chunks)
        if data is not None:
            chunks.append(data)


def hello_after_go(conn: socket.socket) -> None:
    assert conn.recv(2) == b"go"
    conn.sendall(b"hello")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_nonblocking_connect_recv_eof(
    tls: bool, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with Server(hello_after_go, tls=server_ctx if tls else None) as server:
        with NonBlockingConnection(
            server.host, server.port, ssl_context=client_ctx if tls else None
        ) as conn:
            drive(conn)
            assert conn.advance() is Want.DONE
            assert conn.recv(100) is None  # the server waits for "go"
            assert conn.send(b"go") == 2
            assert read_until_eof(conn) == b"hello"
            assert conn.recv(100) == b""  # EOF stays EOF
            assert conn.pending() == 0
    assert not server.errors


def test_nonblocking_ipv6_tls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    ipv6_loopback()
    with Server(send_hello, tls=server_ctx, host="::1") as server:
        with NonBlockingConnection("::1", server.port, ssl_context=client_ctx) as conn:
            drive(conn)
            assert "[::1]:%d tls open" % server.port in repr(conn)
            assert read_until_eof(conn) == b"hello"


def test_nonblocking_untrusted_ca(server_ctx: ssl.SSLContext) -> None:
    other = make_ssl_context(cadata=trustme.CA().cert_pem.bytes().decode("ascii"))
    with Server(send_hello, tls=server_ctx) as server:
        conn = NonBlockingConnection(server.host, server.port, ssl_context=other)
        with pytest.raises(TLSError, match="unable to get local issuer certificate") as info:
            drive(conn)
        assert conn.closed and conn.fileno() == -1
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


def test_nonblocking_refused() -> None:
    port = unused_port()
    conn = NonBlockingConnection("127.0.0.1", port)
    with pytest.raises(ConnectError, match=r"could not connect to 127\.0\.0\.1:%d" % port) as info:
        drive(conn)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert conn.closed
    conn.close()  # idempotent


def test_nonblocking_tries_next_address(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = unused_port()
    with Server(send_hello) as server:
        infos = resolve("127.0.0.1", refused) + resolve("127.0.0.1", server.port)
        monkeypatch.setattr(_transport, "resolve", lambda host, port: infos)
        with NonBlockingConnection("127.0.0.1", server.port) as conn:
            fds = drive(conn)
            assert read_until_eof(conn) == b"hello"
    # Whether the refusal came at once or after a wait, the second socket got a new number.
    assert len(set(fds)) == len(fds)


def test_nonblocking_handshake_stall_times_out(client_ctx: ssl.SSLContext) -> None:
    with Server(wait_for_eof) as server:
        conn = NonBlockingConnection(server.host, server.port, ssl_context=client_ctx)
        with pytest.raises(ConnectTimeout, match="TLS handshake with 127.0.0.1"):
            drive(conn, timeout=0.3)
        assert conn.closed


def test_nonblocking_resolve_failure() -> None:
    conn = NonBlockingConnection("bad..name", 80)
    with pytest.raises(ConnectError, match="could not resolve"):
        conn.start()
    assert conn.closed


def reset_after_ok(conn: socket.socket) -> None:
    conn.sendall(b"x" * 100)
    assert conn.recv(2) == b"ok"
    # Linger on, timeout 0: close() sends RST instead of FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def read_then_reset(conn: NonBlockingConnection) -> Optional[bytes]:
    """Read the 100 bytes, say "ok", then read on until recv raises or returns EOF."""
    drive(conn)
    received = b""
    while len(received) < 100:
        wait(conn, Want.READ)
        received += conn.recv(1000) or b""
    assert received == b"x" * 100
    assert conn.send(b"ok") == 2
    while True:
        wait(conn, Want.READ)
        data = conn.recv(1000)
        if data is not None:
            return data


def test_nonblocking_reset_is_read_error() -> None:
    with Server(reset_after_ok) as server:
        with NonBlockingConnection(server.host, server.port) as conn:
            with pytest.raises(ReadError, match="during read") as info:
                read_then_reset(conn)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert not server.errors


def test_nonblocking_tls_reset_reads_as_eof_or_read_error(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # CPython 3.10+ with OpenSSL 3 loses the errno of a reset under TLS and raises SSLEOFError,
    # which recv() treats like a ragged EOF (b""); where the errno survives it is a ReadError.
    # Either way the stream ends; the HTTP parser decides whether the message was complete.
    with Server(reset_after_ok, tls=server_ctx) as server:
        with NonBlockingConnection(server.host, server.port, ssl_context=client_ctx) as conn:
            try:
                assert read_then_reset(conn) == b""
            except ReadError as exc:
                assert isinstance(exc.__cause__, ConnectionResetError)
    assert not server.errors


def test_nonblocking_tls_close_notify_is_eof(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    def hello_then_close_notify(conn: socket.socket) -> None:
        assert isinstance(conn, ssl.SSLSocket)
        conn.sendall(b"hello")
        conn.setblocking(False)
        try:
            conn.unwrap()  # sends close_notify, then would wait for the client's
        except ssl.SSLWantReadError:
            pass
        conn.settimeout(3)

    with Server(hello_then_close_notify, tls=server_ctx) as server:
        with NonBlockingConnection(server.host, server.port, ssl_context=client_ctx) as conn:
            drive(conn)
            assert read_until_eof(conn) == b"hello"
    assert not server.errors


def test_nonblocking_tls_reads_several_records_then_the_eof_behind_them(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # One recv() takes every record already there (a catching-up feed gets as much per call as
    # in plaintext); the close_notify behind them is kept for the next call, so the bytes
    # before it are handed over first, and pending() says to call again.
    records = [bytes([65 + i]) * 10_000 for i in range(3)]  # one TLS record each
    sent = threading.Event()

    def records_then_close_notify(conn: socket.socket) -> None:
        assert isinstance(conn, ssl.SSLSocket)
        for record in records:
            conn.sendall(record)
        conn.setblocking(False)
        try:
            conn.unwrap()
        except ssl.SSLWantReadError:
            pass
        sent.set()
        conn.settimeout(3)

    with Server(records_then_close_notify, tls=server_ctx) as server:
        with NonBlockingConnection(server.host, server.port, ssl_context=client_ctx) as conn:
            drive(conn)
            assert sent.wait(5)
            wait_for_records_behind(conn, big=10_000, count=len(records))
            assert conn.recv(1 << 20) == b"".join(records)
            assert conn.pending() == 1  # the EOF, met after the records and held back
            assert conn.recv(1 << 20) == b""
    assert not server.errors


@pytest.mark.parametrize("max_bytes", [1000, 65536])
def test_nonblocking_tls_large_payload_drains_pending(
    max_bytes: int, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # The server keeps the connection open until the client has everything, so the last
    # record's bytes can only be read through pending(): select() would never wake for them.
    payload = bytes(range(256)) * 4096  # 1 MiB

    def send_payload(conn: socket.socket) -> None:
        conn.sendall(payload)
        assert conn.recv(4) == b"done"

    saw_pending = False
    with Server(send_payload, tls=server_ctx) as server:
        with NonBlockingConnection(server.host, server.port, ssl_context=client_ctx) as conn:
            drive(conn)
            received = bytearray()
            while len(received) < len(payload):
                if not conn.pending():
                    assert wait(conn, Want.READ), "stalled at %d bytes" % len(received)
                data = conn.recv(max_bytes)
                assert data != b""
                if data:
                    assert len(data) <= max_bytes
                    received += data
                    saw_pending = saw_pending or conn.pending() > 0
            assert conn.send(b"done") == 4
            assert bytes(received) == payload
    assert saw_pending is (max_bytes < 16384)  # recv drains a record when max_bytes allows
    assert not server.errors


def test_nonblocking_tls_send_is_capped_at_one_record(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with Server(wait_for_eof, tls=server_ctx) as server:
        with NonBlockingConnection(server.host, server.port, ssl_context=client_ctx) as conn:
            drive(conn)
            assert conn.send(b"y" * 100000) == _transport.MAX_TLS_WRITE_BYTES


def test_nonblocking_repr_state_and_misuse() -> None:
    with Server(send_hello) as server:
        conn = NonBlockingConnection(server.host, server.port)
        assert repr(conn) == "<NonBlockingConnection 127.0.0.1:%d plain new fd=-1>" % server.port
        with pytest.raises(RuntimeError):
            conn.advance()
        with pytest.raises(RuntimeError):
            conn.recv(10)
        with conn:
            drive(conn)
            assert "127.0.0.1:%d plain open fd=" % server.port in repr(conn)
            with pytest.raises(RuntimeError):
                conn.start()
            assert read_until_eof(conn) == b"hello"
        assert conn.closed and "closed fd=-1" in repr(conn)
        conn.close()
        assert conn.closed
        with pytest.raises(RuntimeError):
            conn.send(b"x")


def test_connect_timeout_error_names_phase() -> None:
    conn = NonBlockingConnection("db.example", 6984)
    err = conn.connect_timeout_error()
    assert isinstance(err, ConnectTimeout) and isinstance(err, NetworkError)
    assert str(err) == "timed out during connect with db.example:6984"


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before
