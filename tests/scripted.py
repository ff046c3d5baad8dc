"""A loopback HTTP server that plays scripts, for the faults a real server will not produce.

Each accepted connection plays the next script from the list (the last one repeats for any
further connections, so ``[broken, good]`` means "fail once, then behave"). A script is a list of
steps, played in order on that connection's own daemon thread::

    with ScriptedServer([[Read(), Send(response_head() + chunk(b'{"seq":1}\\n')), Stall()]]) as srv:
        ...  # point a client at srv.url
    assert srv.requests[0].target.startswith("/db/_changes")

A script that ends without ``Close()`` or ``Reset()`` closes the connection as ``Close()`` does.
Network errors on a connection (the client reset it, a TLS handshake failed) end that script and
are kept in ``server.errors``; a mistake in a script itself is raised in its thread, which pytest
reports as a failure. ``close()`` interrupts every step, closes every socket and joins the
threads, so nothing leaks into the warnings-as-errors test run.
"""

import http
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

__all__ = [
    "LAST_CHUNK",
    "Close",
    "Drip",
    "Pause",
    "Read",
    "Request",
    "Reset",
    "Script",
    "ScriptedServer",
    "Send",
    "Stall",
    "Step",
    "chunk",
    "response_head",
]

LAST_CHUNK = b"0\r\n\r\n"
# A test's request head is a few hundred bytes; anything near this is a runaway client.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
RECV_BYTES = 65536
# Safety net for a client that neither sends nor closes; close() normally ends waits first.
CONNECTION_TIMEOUT_S = 30.0
# How long Close() waits for the client's own FIN before closing with unread data (which would
# turn our FIN into an RST on Linux).
CLOSE_DRAIN_S = 2.0
ACCEPT_POLL_S = 0.05
JOIN_TIMEOUT_S = 5.0

HeaderInput = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one HTTP/1.1 chunk (RFC 9112 section 7.1)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def response_head(
    status: int = 200, headers: Optional[HeaderInput] = None, chunked: bool = True
) -> bytes:
    """Build a status line and header block, ending with the blank line.

    Args:
        status: the status code; the reason phrase comes from ``http.HTTPStatus``.
        headers: replaces the default ``Content-Type: application/json``.
        chunked: add ``Transfer-Encoding: chunked``; otherwise no framing header is added, so
            pass ``Content-Length`` yourself or let the close end the body.
    """
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    if headers is None:
        headers = {"Content-Type": "application/json"}
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if chunked:
        pairs.append(("Transfer-Encoding", "chunked"))
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in pairs)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Request:
    """One request as the scripted server received it."""

    connection: int  # 0-based index of the connection it arrived on
    method: str
    target: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """Return the first value of header ``name`` (case-insensitive), or None."""
        return _header(self.headers, name)


def _header(headers: Sequence[Tuple[str, str]], name: str) -> Optional[str]:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _split_header(line: str) -> Tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class _PeerClosed(Exception):
    """The client closed (or the server is closing) before a step could finish."""


class _Connection:
    """One accepted socket and the state the steps share: unread bytes, the stop signal."""

    def __init__(self, server: "ScriptedServer", index: int, sock: socket.socket) -> None:
        self.server = server
        self.index = index
        self.sock = sock
        self.buffer = b""
        self.finished = False

    def stopping(self) -> bool:
        return self.server._closing.is_set()

    def wait(self, seconds: float) -> None:
        """Sleep, but end the script at once if the server is closed meanwhile."""
        if self.server._closing.wait(seconds):
            raise _PeerClosed()

    def recv(self) -> bytes:
        data = self.sock.recv(RECV_BYTES)
        if not data or self.stopping():
            raise _PeerClosed()
        return data

    def send(self, data: bytes) -> None:
        if self.stopping():
            raise _PeerClosed()
        self.sock.sendall(data)

    def read_request(self) -> Request:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST_HEAD_BYTES:
                raise ValueError(f"request head larger than {MAX_REQUEST_HEAD_BYTES} bytes")
            self.buffer += self.recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = tuple(_split_header(line) for line in header_lines)
        if _header(headers, "Transfer-Encoding") is not None:
            raise ValueError("ScriptedServer does not decode chunked request bodies")
        length = int(_header(headers, "Content-Length") or 0)
        while len(self.buffer) < length:
            self.buffer += self.recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Request(self.index, method, target, headers, body)

    def close(self) -> None:
        """Send FIN, wait briefly for the client's, then close."""
        self.finished = True
        try:
            # shutdown() first so the FIN goes out even if unread bytes are still queued.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            self.server._sent_all(self.index)
            self.sock.settimeout(CLOSE_DRAIN_S)
            # Raw recv, also under TLS: whatever still arrives is discarded, not decrypted.
            while not self.stopping() and socket.socket.recv(self.sock, RECV_BYTES):
                pass
        except OSError:
            pass
        self.sock.close()

    def reset(self) -> None:
        """Close with SO_LINGER 0, which makes the kernel send RST instead of FIN."""
        self.finished = True
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.server._sent_all(self.index)


class Step:
    """One action of a script, played on a connection's thread."""

    #: True for steps that end the connection (Stall, Close, Reset): they must come last.
    ends_script = False

    def play(self, conn: _Connection) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Read(Step):
    """Read one request (head plus ``Content-Length`` body) and record it in ``requests``."""

    def play(self, conn: _Connection) -> None:
        conn.server._record(conn.read_request())


class Send(Step):
    """Send these exact bytes."""

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"Send() takes bytes, not {type(data).__name__}")
        self.data = data

    def play(self, conn: _Connection) -> None:
        conn.send(self.data)

    def __repr__(self) -> str:
        return f"Send({self.data[:40]!r})"


class Drip(Send):
    """Send these bytes one at a time, ``delay`` seconds apart (each in its own TCP segment)."""

    def __init__(self, data: bytes, delay: float = 0.01) -> None:
        super().__init__(data)
        self.delay = delay

    def play(self, conn: _Connection) -> None:
        for index in range(len(self.data)):
            if index:
                conn.wait(self.delay)
            conn.send(self.data[index : index + 1])

    def __repr__(self) -> str:
        return f"Drip({self.data[:40]!r}, delay={self.delay})"


class Pause(Step):
    """Send nothing for ``seconds`` (keep it short: tests wait for it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def play(self, conn: _Connection) -> None:
        conn.wait(self.seconds)

    def __repr__(self) -> str:
        return f"Pause({self.seconds})"


class Stall(Step):
    """Go silent but keep the connection open until the client closes it or the server closes.

    Whatever the client sends meanwhile is read and dropped.
    """

    ends_script = True

    def play(self, conn: _Connection) -> None:
        conn.sock.settimeout(None)  # close() wakes the recv by shutting the socket down
        conn.server._sent_all(conn.index)
        while True:
            conn.recv()


class Close(Step):
    """Close the connection with a FIN (over TLS: without close_notify, a "ragged" EOF)."""

    ends_script = True

    def play(self, conn: _Connection) -> None:
        conn.close()


class Reset(Step):
    """Abort the connection with an RST."""

    ends_script = True

    def play(self, conn: _Connection) -> None:
        conn.reset()


Script = Sequence[Step]


class ScriptedServer:
    """Listen on 127.0.0.1 and play one script per accepted connection, in order.

    Args:
        scripts: one script per successive connection; the last one repeats after that.
        ssl_context: a server-side context; accepted sockets are then wrapped and ``url`` is
            ``https://``. A failed handshake ends that connection and lands in ``errors``.

    ``requests`` and ``errors`` are lists that connection threads append to under a lock;
    reading them from the test's thread is safe. Always ``close()`` it (or use ``with``).
    """

    def __init__(
        self, scripts: Sequence[Script], ssl_context: Optional[ssl.SSLContext] = None
    ) -> None:
        if not scripts:
            raise ValueError("ScriptedServer needs at least one script")
        for script in scripts:
            for position, step in enumerate(script):
                if not isinstance(step, Step):
                    raise TypeError(f"script steps must be Step objects, got {step!r}")
                if step.ends_script and position != len(script) - 1:
                    raise ValueError(f"{step!r} must be the last step of its script")
        self._scripts = [list(script) for script in scripts]
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._open: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._accepted = 0
        self._done_sending: Set[int] = set()
        self.requests: List[Request] = []
        self.errors: List[BaseException] = []

        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(16)
            # accept() polls so close() can stop it portably (closing a socket does not wake a
            # thread blocked in accept() on Linux).
            self._listener.settimeout(ACCEPT_POLL_S)
        except BaseException:
            self._listener.close()
            raise
        self.port = int(self._listener.getsockname()[1])
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"ScriptedServer:{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def connections(self) -> int:
        """How many connections have been accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> int:
        """How many accepted connections the server has not closed yet.

        Drops when a script ends, or when a client closes a connection stalled in ``Stall()``:
        the way to check that a client gave up on a silent server.
        """
        with self._lock:
            return len(self._open)

    def __repr__(self) -> str:
        state = "closed" if self._closing.is_set() else "open"
        return (
            f"<ScriptedServer {self.url} connections={self.connections} "
            f"requests={len(self.requests)} errors={len(self.errors)} {state}>"
        )

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> List[Request]:
        """Wait until ``count`` requests were recorded and return them all.

        Raises:
            AssertionError: fewer arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected {count} requests within {timeout} s: {self!r}")
            time.sleep(ACCEPT_POLL_S)

    def wait_until_sent(self, connection: int, timeout: float = 5.0) -> None:
        """Wait until connection number ``connection`` (0 first) has sent everything its
        script sends: its last step (``Stall``, ``Close``, ``Reset``, or the end) has begun.
        On loopback the bytes are then in the client's receive buffer, FIN included.

        Raises:
            AssertionError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if connection in self._done_sending:
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"connection {connection} still sending: {self!r}")
            time.sleep(0.001)

    def close(self) -> None:
        """Stop accepting, end every script, close every socket and join the threads."""
        self._closing.set()
        self._acceptor.join(JOIN_TIMEOUT_S)
        with self._lock:
            sockets = list(self._open)
            threads = list(self._threads)
        for sock in sockets:
            try:
                # The plain-socket shutdown, also for TLS sockets: it wakes a thread blocked in
                # recv()/sendall() without touching the TLS state that thread is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        with self._lock:
            leftovers, self._open = list(self._open), []
        for sock in leftovers:  # only if a thread failed to finish in time
            sock.close()
        self._listener.close()

    def _sent_all(self, index: int) -> None:
        with self._lock:
            self._done_sending.add(index)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if not self._closing.is_set():
                    self._fail(exc)
                return
            with self._lock:
                if self._closing.is_set():
                    sock.close()
                    return
                index = self._accepted
                self._accepted += 1
                self._open.append(sock)
                thread = threading.Thread(
                    target=self._serve,
                    args=(index, sock),
                    name=f"ScriptedServer:{self.port}#{index}",
                    daemon=True,
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, index: int, sock: socket.socket) -> None:
        script = self._scripts[min(index, len(self._scripts) - 1)]
        # Without NODELAY, Nagle's algorithm would merge dripped bytes into one segment.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(CONNECTION_TIMEOUT_S)
        conn = _Connection(self, index, sock)
        try:
            if self._ssl_context is not None:
                self._wrap(conn)
            for step in script:
                step.play(conn)
        except _PeerClosed:
            pass
        except OSError as exc:  # includes ssl.SSLError and socket.timeout
            if not self._closing.is_set():  # errors caused by close() itself are expected
                self._fail(exc)
        finally:
            if not conn.finished:
                conn.close()
            with self._lock:
                for tracked in (sock, conn.sock):
                    if tracked in self._open:
                        self._open.remove(tracked)
            sock.close()  # a no-op unless the TLS wrap failed before taking it over

    def _wrap(self, conn: _Connection) -> None:
        assert self._ssl_context is not None
        raw = conn.sock
        # Handshake only once the TLS socket is registered and owned by conn, so close() can
        # interrupt a stuck handshake and a failed one still closes the right object.
        tls = self._ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        conn.sock = tls
        with self._lock:
            self._open.remove(raw)
            self._open.append(tls)
        if self._closing.is_set():  # close() may have shut down `raw` before the swap
            raise _PeerClosed()
        tls.do_handshake()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
