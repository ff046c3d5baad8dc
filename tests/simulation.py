"""A simulated network and CouchDB 3 for the deterministic simulation test (test_simulation.py).

FoundationDB's simulation testing is the model: the real consumer runs on a fake clock against a
fake network whose every fault comes from one seed, so a failing seed replays exactly.

The pieces, all in the test's one thread:

* :class:`SimConnection` is what ``Consumer._connect_with`` returns instead of a
  ``NonBlockingConnection``: the same contract (``start``/``advance`` -> ``Want``, ``recv``,
  ``send``, ``pending``, ``close``...), over one end of a ``socket.socketpair`` so that the loop's
  selector sees a real descriptor. Over "TLS" (an ``ssl_context`` was given) ``recv`` drains the
  socket, hands out only a piece and holds the rest as ``pending()`` decrypted bytes, the path
  where ``select()`` reports nothing and the reader must come back by itself.
* :class:`Peer` is the server's side of one connection: it answers as CouchDB 3.5 does
  (``/work/shared/COUCHDB-WIRE.md``: head and a ``\\n`` chunk at once, rows packed 7 to a chunk,
  ``\\n`` heartbeats, ``since=now`` through ``feed=normal``, errors as JSON bodies), unless its
  :class:`Fate` says otherwise: refused, never connected, cut or reset or silent from a byte offset
  of the request or the response, an error status, a clean end.
* :class:`SimSelector` is the loop's selector (``Loop(selector=...)``, a public parameter). It
  decides the readiness of simulated descriptors (a socket "still connecting" is not writable, a
  server that stopped reading closes the send window), runs the world's due events at the start
  of every pass, and when a pass would wait (a ``timeout`` other than 0) moves the fake clock to
  the next loop timer or world event instead. So ``Consumer.wait()`` and ``Loop.run()`` can run
  as they are, and a driver that calls ``loop.run_once(0)`` advances time itself with
  :meth:`World.advance` when a pass found nothing to do.
* :class:`World` holds the clock, the event heap, the database (a growing list of changes) and
  the record of every connection, for the invariant checks.
"""

import collections
import functools
import heapq
import itertools
import json
import random
import selectors
import socket
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from couch3 import COUCH_HEAD, HEARTBEAT, FakeClock, doc_id
from scripted import LAST_CHUNK, chunk

from changeloop._transport import Want
from changeloop.errors import ConnectError, ConnectTimeout, ReadError

__all__ = ["Fate", "Peer", "SimConnection", "SimHang", "SimSelector", "World", "seq_n", "sim_seq"]

#: CouchDB packs up to this many rows in one chunk (about 1490 bytes).
ROWS_PER_CHUNK = 7
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# A server send that the socket buffer refused is retried this much later (never seen in
# practice: the responses here are far smaller than a socketpair's buffer).
_RETRY_SEND_S = 0.01

REASONS = {
    0: "Zero",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Object Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    999: "Nine",
}


class SimHang(Exception):
    """The simulation can make no more progress (nothing ready, no timer, no world event), or a
    pass budget ran out: raised from the selector, so it leaves ``Loop.run()``/``wait()``."""


@functools.lru_cache(maxsize=None)
def sim_seq(n: int) -> str:
    """A CouchDB 3 shaped opaque seq whose number is ``n`` (cheaper than couch3.seq)."""
    return "%d-g1AAAAE%s" % (n, ("%08x" % (n * 2654435761 % 2**32)) * 8)


def seq_n(value: Any) -> Optional[int]:
    """The number of a seq this world gave out (``0`` for ``0``), or None if it is not one."""
    if value == 0 or value == "0":
        return 0
    if not isinstance(value, str) or "-" not in value:
        return None
    head = value.split("-", 1)[0]
    return int(head) if head.isdigit() and sim_seq(int(head)) == value else None


@functools.lru_cache(maxsize=None)
def change_row(n: int) -> bytes:
    line = {"seq": sim_seq(n), "id": doc_id(n), "changes": [{"rev": "1-%032x" % n}]}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


class Fate:
    """What one connection's server side does; drawn from the seed when the client connects.

    ``kind`` is ``ok`` or the fault; the other attributes are its parameters (delays in
    seconds, offsets in bytes of the request or of the response as the server writes it).
    """

    def __init__(self, kind: str = "ok") -> None:
        self.kind = kind
        self.immediate = False  # connect() succeeds at once (as on loopback)
        self.connect_delay = 0.0
        self.hs_delay = 0.0  # TLS only
        self.think = 0.0  # from the whole request to the first byte of the answer
        self.request_at = -1  # request faults: after this many request bytes
        self.response_at = -1  # response faults: from this byte offset of the response...
        self.after = 0.0  # ... or, if this is set, this long after the answer began
        self.status = 0  # kind "status": the error status answered
        self.end_after = 0.0  # kind "end": the feed ends cleanly this long after it opened
        self.split = 0.0  # chance that a write reaches the client in two pieces
        self.reset_discards = False  # a reset also drops what the client had not read yet
        self.tls_pieces = 0.0  # TLS: chance that recv() hands out only a piece

    def __repr__(self) -> str:
        extra = ""
        if self.request_at >= 0:
            extra += " request_at=%d" % self.request_at
        if self.after:
            extra += " after=%.2f" % self.after
        elif self.response_at >= 0:
            extra += " response_at=%d" % self.response_at
        if self.kind == "status":
            extra += " status=%03d" % self.status
        if self.kind == "end":
            extra += " end_after=%.2f" % self.end_after
        return "<Fate %s%s connect=%.3f%s think=%.3f>" % (
            self.kind,
            extra,
            self.connect_delay,
            " immediate" if self.immediate else "",
            self.think,
        )


class Peer:
    """The server's side of one connection, and its record for the invariant checks."""

    def __init__(self, world: "World", number: int, fate: Fate, tls: bool) -> None:
        self.world = world
        self.number = number
        self.fate = fate
        self.tls = tls
        self.sock: Optional[socket.socket] = None
        self.opened_at = world.now()
        #: (time, phase after it) of every sign of life from the server: the connection opened,
        #: the TCP and TLS handshakes, request bytes taken in, response bytes written.
        self.activity: List[Tuple[float, str]] = [(self.opened_at, "connect")]
        self.phase = "connect"
        self.kind = ""  # "resolve" (feed=normal&since=now) or "feed", once the request is read
        self.connected = False  # the TCP connect has an outcome (see refused)
        self.refused = False
        self.handshaken = False  # the TLS handshake has an outcome (see hs_failed)
        self.hs_failed = False
        self.window = fate.request_at if fate.kind == "request_stall" else 1 << 62
        self.request = bytearray()
        self.request_done = False
        self.target = ""
        self.since: Any = None
        self.status = 0  # the status answered, once the head is written
        self.complete = False  # the whole answer was written (an error body, the feed's end)
        self.head_len = 0
        self.sent = 0  # response bytes written
        self.out = bytearray()
        self.flush_queued = False
        self.streaming = False  # a continuous feed that takes live changes
        self.next_n = 0
        self.silent = False  # stalled: says nothing more, ever
        self.reset = False
        self.closed_by_server: Optional[float] = None
        self.closed_by_client: Optional[float] = None
        self.heartbeat: Optional[float] = None
        self.read = 0  # response bytes the client's recv() handed out
        self._heartbeat_token = 0

    def __repr__(self) -> str:
        return "<Peer #%d %s %s %r sent=%d%s%s>" % (
            self.number,
            self.kind or "?",
            self.phase,
            self.fate,
            self.sent,
            " server-closed" if self.closed_by_server is not None else "",
            " client-closed" if self.closed_by_client is not None else "",
        )

    @property
    def gone(self) -> bool:
        return self.closed_by_server is not None or self.closed_by_client is not None

    def alive(self, phase: Optional[str] = None) -> None:
        if phase is not None:
            self.phase = phase
        self.activity.append((self.world.now(), self.phase))

    # -- connecting --------------------------------------------------------------------------

    def on_connected(self) -> None:
        if self.gone:
            return
        self.connected = True
        kind = self.fate.kind
        if kind == "refuse_later":
            self.refused = True
            return
        self.alive("tls" if self.tls else "request")
        if self.tls:
            if kind == "hs_never":
                return
            self.world.at(self.fate.hs_delay, self.on_handshaken)

    def on_handshaken(self) -> None:
        if self.gone:
            return
        self.handshaken = True
        if self.fate.kind == "hs_fail":
            self.hs_failed = True
            return
        self.alive("request")

    # -- the request ---------------------------------------------------------------------------

    def on_request_bytes(self) -> None:
        if self.gone or self.sock is None:
            return
        got = self.world.drain(self.sock)
        if got:
            self.request += got
            self.alive()
        fate = self.fate
        if fate.kind in ("request_cut", "request_reset") and len(self.request) >= fate.request_at:
            self.world.note(
                "#%d server %s after %d request bytes" % (self.number, fate.kind, len(self.request))
            )
            self.server_close(reset=fate.kind == "request_reset")
            return
        if not self.request_done and b"\r\n\r\n" in self.request:
            self.request_done = True
            self.alive("head")
            self.world.at(fate.think, self.answer)

    def answer(self) -> None:
        if self.gone:
            return
        world = self.world
        line = bytes(self.request).split(b"\r\n", 1)[0].decode("latin-1")
        self.target = line.split(" ")[1] if line.count(" ") == 2 else line
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}
        self.since = query.get("since")
        feed = query.get("feed")
        self.kind = "resolve" if feed == "normal" else "feed"
        if not urlsplit(self.target).path.endswith("/_changes") or feed not in (
            "normal",
            "continuous",
        ):
            world.observer.violation("protocol", "unexpected request %r" % line)
        world.observer.on_request(self)
        if self.gone:
            return
        if self.fate.after and self.fate.kind.startswith("response"):
            self.world.at(self.fate.after, self.fault_now)
        if self.fate.kind == "status":
            self.answer_error(self.fate.status)
        elif self.kind == "resolve":
            self.answer_resolve()
        else:
            self.answer_feed(query)

    def answer_error(self, status: int) -> None:
        body = json.dumps({"error": "sim_%d" % status, "reason": "simulated"}).encode() + b"\n"
        lines = [
            b"HTTP/1.1 %03d %s" % (status, REASONS.get(status, "Whatever").encode()),
            b"Cache-Control: must-revalidate",
            b"Content-Type: application/json",
            b"Server: CouchDB/3.5.0 (Erlang OTP/25)",
        ]
        if 300 <= status < 400:
            lines.append(b"Location: http://127.0.0.1:5984/elsewhere/_changes")
        if self.world.rng.random() < 0.5:
            lines.append(b"Content-Length: %d" % len(body))
            framed = body
        else:
            lines.append(b"Transfer-Encoding: chunked")
            framed = chunk(body) + LAST_CHUNK
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.status = status
        self.head_len = len(head)
        self.emit(head + framed, complete=True)

    def answer_resolve(self) -> None:
        n = self.world.n
        body = chunk(b'{"results":[\n') + chunk(
            b'\n],\n"last_seq":"%s","pending":0}\n' % sim_seq(n).encode()
        )
        self.status = 200
        self.head_len = len(COUCH_HEAD)
        self.world.now_answers.add(n)
        self.emit(COUCH_HEAD + body + HEARTBEAT + LAST_CHUNK, complete=True)

    def answer_feed(self, query: Dict[str, str]) -> None:
        since = seq_n(self.since)
        if since is None:  # CouchDB: 400 Malformed sequence supplied in 'since' parameter
            self.world.observer.violation("protocol", "since=%r is no seq of ours" % self.since)
            since = 0
        heartbeat = query.get("heartbeat")
        self.heartbeat = None if heartbeat is None else float(heartbeat) / 1000.0
        self.status = 200
        self.head_len = len(COUCH_HEAD)
        self.next_n = since + 1
        self.streaming = True
        # CouchDB 2+: the head and a newline at once, then the backlog.
        self.emit(COUCH_HEAD + HEARTBEAT + self.rows_upto(self.world.n))
        if self.fate.kind == "end":
            self.world.at(self.fate.end_after, self.end_feed)

    def fault_now(self) -> None:
        """A fault that comes with time rather than at a byte offset (a healthy feed dies)."""
        if self.gone or self.silent:
            return
        kind = self.fate.kind
        self.world.note(
            "#%d server %s after %.2f s (%s)" % (self.number, kind, self.fate.after, self.phase)
        )
        if kind == "response_stall":
            self.silent = True
            self.complete = False
        else:
            self.server_close(reset=kind == "response_reset")

    def rows_upto(self, n: int) -> bytes:
        numbers = list(range(self.next_n, n + 1))
        self.next_n = max(self.next_n, n + 1)
        return b"".join(
            chunk(b"".join(change_row(m) for m in numbers[i : i + ROWS_PER_CHUNK]))
            for i in range(0, len(numbers), ROWS_PER_CHUNK)
        )

    def on_change(self) -> None:
        """The database changed: a ``\\n`` chunk, then the new rows (CouchDB's wake-up)."""
        if self.streaming and not self.gone:
            self.emit(HEARTBEAT + self.rows_upto(self.world.n))

    def heartbeat_due(self, token: int) -> None:
        if token == self._heartbeat_token and self.streaming and not self.gone:
            self.emit(HEARTBEAT)

    def end_feed(self) -> None:
        """The end CouchDB sends on ``timeout``: the last_seq line, a newline, the last chunk."""
        if not self.streaming or self.gone:
            return
        self.streaming = False
        n = self.world.n
        body = self.rows_upto(n) + chunk(b'{"last_seq":"%s","pending":0}\n' % sim_seq(n).encode())
        self.emit(body + HEARTBEAT + LAST_CHUNK, complete=True)

    # -- writing, with the response faults ------------------------------------------------------

    def emit(self, data: bytes, complete: bool = False) -> None:
        if self.silent or self.gone:
            return
        self.out += data
        if complete:
            self.complete = True  # once written (an answer that is cut is not complete)
        if self.streaming and self.heartbeat:
            self._heartbeat_token += 1
            self.world.at(self.heartbeat, self.heartbeat_due, self._heartbeat_token)
        if not self.flush_queued:
            self.flush_queued = True
            self.world.soon(self.flush)

    def flush(self) -> None:
        self.flush_queued = False
        if self.silent or self.gone or not self.out:
            return
        data = bytes(self.out)
        if len(data) > 1 and self.world.rng.random() < self.fate.split:
            data = data[: self.world.rng.randint(1, len(data) - 1)]  # the rest: next pass
        fate = self.fate
        fault = fate.kind in ("response_cut", "response_reset", "response_stall") and not fate.after
        if fault and self.sent + len(data) >= fate.response_at:
            data = data[: fate.response_at - self.sent]
            fault_now = True
        else:
            fault_now = False
        if data:
            assert self.sock is not None
            try:
                written = self.sock.send(data)
            except BlockingIOError:
                written = 0
            except OSError:  # the client closed meanwhile
                return
            del self.out[:written]
            self.sent += written
            if written:
                if self.phase == "head" and self.sent >= self.head_len:
                    self.phase = "body"
                self.alive()
            if written < len(data):
                self.world.at(_RETRY_SEND_S, self.flush)
                return
        if fault_now:
            self.world.note(
                "#%d server %s at response byte %d (%s)"
                % (self.number, fate.kind, self.sent, self.phase)
            )
            if fate.kind == "response_stall":
                self.silent = True
                self.complete = False
            else:
                self.server_close(reset=fate.kind == "response_reset")
            return
        if self.out:
            self.flush_queued = True
            self.world.soon(self.flush)
        elif self.complete and self.status:
            self.world.observer.on_answered(self)

    def server_close(self, *, reset: bool) -> None:
        if self.gone:
            return
        self.reset = reset
        self.streaming = False
        self.complete = False
        self.closed_by_server = self.world.now()
        self.world.close_peer_socket(self)


class SimConnection:
    """The client side: what ``NonBlockingConnection`` promises, on a simulated network."""

    def __init__(
        self,
        world: "World",
        host: str,
        port: int,
        *,
        ssl_context: Any = None,
        server_hostname: Optional[str] = None,
    ) -> None:
        self.world = world
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.state = "new"
        self.wants_write = False
        self.sock: Optional[socket.socket] = None
        self.peer: Optional[Peer] = None
        self.number = 0  # the connection's number (its peer's)
        self._plain = b""  # TLS: decrypted bytes held (pending())
        self._deferred = ""  # TLS: "eof" or "reset" met after bytes, for the next recv()

    def __repr__(self) -> str:
        return "<SimConnection #%s %s %s>" % (
            "?" if self.peer is None else self.peer.number,
            "tls" if self.ssl_context is not None else "plain",
            self.state,
        )

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def _where(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def start(self) -> Want:
        if self.state != "new":
            raise RuntimeError("cannot start %r: start() runs once" % (self,))
        peer = self.peer = self.world.open_peer(self)
        if peer.fate.kind == "refuse_now":
            self.state = "closed"
            peer.closed_by_server = self.world.now()
            raise ConnectError(
                "could not connect to %s (connect): [Errno 111] Connection refused" % self._where()
            )
        self.sock, peer.sock = socket.socketpair()
        self.sock.setblocking(False)
        peer.sock.setblocking(False)
        self.number = peer.number
        self.world.live[self.sock.fileno()] = self
        self.state = "connecting"
        if peer.fate.immediate:
            peer.on_connected()
            return self.advance()
        if peer.fate.kind not in ("connect_never",):
            self.world.at(peer.fate.connect_delay, peer.on_connected)
        return Want.WRITE

    def advance(self) -> Want:
        peer = self.peer
        assert peer is not None
        if self.state == "connecting":
            if not peer.connected:
                return Want.WRITE  # a spurious wake-up: wait on
            if peer.refused:
                self.close()
                raise ConnectError(
                    "could not connect to %s (connect): [Errno 111] Connection "
                    "refused" % self._where()
                )
            if self.ssl_context is None:
                self.state = "open"
                return Want.DONE
            self.state = "handshaking"
        if self.state == "handshaking":
            if not peer.handshaken:
                return Want.READ
            if peer.hs_failed:
                self.close()
                raise ConnectError(
                    "connection closed during TLS handshake with %s: EOF "
                    "occurred in violation of protocol" % self._where()
                )
            self.state = "open"
            return Want.DONE
        if self.state == "open":
            return Want.DONE
        raise RuntimeError("cannot advance %r" % (self,))

    def connect_timeout_error(self) -> ConnectTimeout:
        phase = "TLS handshake" if self.state == "handshaking" else "connect"
        return ConnectTimeout("timed out during %s with %s" % (phase, self._where()))

    def readiness(self, real: int) -> int:
        """What the selector reports for this descriptor, given the socketpair's own state."""
        peer = self.peer
        if peer is None or self.state in ("new", "closed"):
            return 0
        if self.state == "connecting":
            return _WRITE if peer.connected else 0
        if self.state == "handshaking":
            return _READ | _WRITE if peer.handshaken else 0
        if peer.window <= 0 and not peer.gone:
            real &= ~_WRITE  # the server stopped taking the request: the send window is shut
        return real

    def pending(self) -> int:
        if self.ssl_context is None or self.state != "open":
            return 0
        return len(self._plain) or (1 if self._deferred else 0)

    def _reset_error(self) -> ReadError:
        return ReadError(
            "connection to %s broke during read: [Errno 104] Connection reset by "
            "peer" % self._where()
        )

    def recv(self, max_bytes: int) -> Optional[bytes]:
        if self.state != "open" or self.sock is None:
            raise RuntimeError("cannot recv on %r" % (self,))
        peer = self.peer
        assert peer is not None
        world = self.world
        self.wants_write = False
        world.reading = peer
        world.point("recv")
        if self.sock is None:  # closed by whatever ran at that point
            raise RuntimeError("cannot recv on %r" % (self,))
        if peer.reset and peer.fate.reset_discards:
            self._plain = b""
            raise self._reset_error()
        if self.ssl_context is None:
            try:
                data = self.sock.recv(max_bytes)
            except BlockingIOError:
                return None
            if not data and peer.reset:
                raise self._reset_error()
            peer.read += len(data)
            return data
        data = self._recv_tls(max_bytes)
        if data:
            peer.read += len(data)
        return data

    def _recv_tls(self, max_bytes: int) -> Optional[bytes]:
        assert self.sock is not None and self.peer is not None
        if not self._plain:
            if self._deferred:
                deferred, self._deferred = self._deferred, ""
                if deferred == "reset":
                    raise self._reset_error()
                return b""
            got = self.world.drain(self.sock)
            if got is None:  # EOF (the socket is drained)
                if self.peer.reset:
                    raise self._reset_error()
                return b""
            if not got:
                return None
            self._plain = got
            if self.world.eof(self.sock):
                self._deferred = "reset" if self.peer.reset else "eof"
        size = min(len(self._plain), max_bytes)
        if size > 1 and self.world.rng.random() < self.peer.fate.tls_pieces:
            size = self.world.rng.randint(1, size - 1)
        data, self._plain = self._plain[:size], self._plain[size:]
        return data

    def send(self, data: Any) -> int:
        if self.state != "open" or self.sock is None:
            raise RuntimeError("cannot send on %r" % (self,))
        peer = self.peer
        assert peer is not None
        if peer.gone:
            raise ReadError(
                "connection to %s broke during write: [Errno 32] Broken pipe" % self._where()
            )
        size = min(len(data), peer.window)
        if size <= 0:
            return 0
        try:
            sent = self.sock.send(data[:size])
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ReadError(
                "connection to %s broke during write: %s" % (self._where(), exc)
            ) from exc
        peer.window -= sent
        self.world.soon(peer.on_request_bytes)
        return sent

    def close(self) -> None:
        if self.state == "closed" and self.sock is None:
            return
        self.state = "closed"
        self._plain = b""
        sock, self.sock = self.sock, None
        if sock is not None:
            self.world.live.pop(sock.fileno(), None)
            sock.close()
        peer = self.peer
        if peer is not None and not peer.gone:
            peer.closed_by_client = self.world.now()
            peer.streaming = False
            self.world.close_peer_socket(peer)


class _NoObserver:
    """What the world reports to; the test's driver replaces it."""

    def violation(self, kind: str, message: str) -> None:
        raise AssertionError("%s: %s" % (kind, message))

    def on_request(self, peer: Peer) -> None:
        pass

    def on_answered(self, peer: Peer) -> None:
        pass

    def on_connection(self, peer: Peer) -> None:
        pass


class World:
    """The clock, the database, the event heap and every connection of one simulation run.

    Args:
        rng: the run's only random source (faults, timings, TLS pieces).
        fate: called with (world, tls) for every new connection; returns its :class:`Fate`.
    """

    def __init__(self, rng: random.Random, fate: Callable[["World", bool], Fate]) -> None:
        self.rng = rng
        self.clock = FakeClock()
        self.now: Callable[[], float] = self.clock
        self.fate = fate
        self.n = 0  # the database's update seq: changes 1..n exist
        self.written_at: List[float] = [0.0]  # written_at[k]: when change k was written
        self.now_answers: set = set()  # the seqs answered to since=now
        self.peers: List[Peer] = []
        self.live: Dict[int, SimConnection] = {}  # client descriptors the selector must judge
        self.reading: Optional[Peer] = None  # the peer whose bytes the client read last
        self.observer: Any = _NoObserver()
        self.on_point: Optional[Callable[[str], None]] = None
        self.passes = 0
        self.log: Deque[str] = collections.deque(maxlen=400)
        self._heap: List[Tuple[float, int, Callable[..., Any], Tuple[Any, ...]]] = []
        self._soon: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()
        self._order = itertools.count()

    # -- events --------------------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._heap, (self.now() + delay, next(self._order), fn, args))

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` at the start of the next pass, at the same simulated time."""
        self._soon.append((fn, args))

    def busy(self) -> bool:
        """Whether something is due without time passing."""
        return bool(self._soon) or bool(self._heap and self._heap[0][0] <= self.now())

    def run_due(self) -> None:
        for _ in range(len(self._soon)):  # only those queued before: each pass a step
            fn, args = self._soon.popleft()
            fn(*args)
        now = self.now()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, fn, args = heapq.heappop(heap)
            fn(*args)

    def advance(self, timeout: Optional[float]) -> bool:
        """Move the clock to the next world event or ``timeout`` from now, whichever is first.

        Returns False, without moving, if neither exists: nothing will ever happen.
        """
        target = None if timeout is None else self.now() + timeout + 1e-9
        if self._heap and (target is None or self._heap[0][0] < target):
            target = self._heap[0][0]
        if target is None:
            return False
        self.clock.now = max(self.clock.now, target)
        return True

    def point(self, name: str) -> None:
        """A place where the driver may act (stop from another thread, say)."""
        if self.on_point is not None:
            self.on_point(name)

    def note(self, text: str) -> None:
        self.log.append("%10.3f %s" % (self.now() - 1000.0, text))

    # -- the database ------------------------------------------------------------------------

    def write(self, count: int = 1) -> None:
        for _ in range(count):
            self.n += 1
            self.written_at.append(self.now())
        self.note("wrote changes up to %d" % self.n)
        for peer in self.peers:
            if peer.streaming:
                peer.on_change()

    # -- connections ---------------------------------------------------------------------------

    def connect(self, host: str, port: int, **kwargs: Any) -> SimConnection:
        """``Consumer._connect_with``."""
        return SimConnection(self, host, port, **kwargs)

    def open_peer(self, connection: SimConnection) -> Peer:
        fate = self.fate(self, connection.ssl_context is not None)
        peer = Peer(self, len(self.peers) + 1, fate, connection.ssl_context is not None)
        self.peers.append(peer)
        self.note("#%d connect %r" % (peer.number, fate))
        self.observer.on_connection(peer)
        return peer

    def drain(self, sock: socket.socket) -> Optional[bytes]:
        """All that ``sock`` holds now (b"" if nothing); None at EOF with nothing before it."""
        parts = []
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                if not parts:
                    return None
                break
            parts.append(data)
        return b"".join(parts)

    def eof(self, sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, OSError):
            return False

    def close_peer_socket(self, peer: Peer) -> None:
        sock, peer.sock = peer.sock, None
        if sock is not None:
            self.drain(sock)  # unread request bytes would turn the close into a reset
            sock.close()

    def close(self) -> None:
        for connection in list(self.live.values()):
            connection.close()
        for peer in self.peers:
            self.close_peer_socket(peer)


class SimSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector: real readiness for real sockets, simulated for simulated ones, and
    the world stepped at the start of every pass (see the module docstring)."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        #: Set by the driver: the most passes allowed (SimHang beyond).
        self.max_passes = 1 << 62
        #: Whether the last pass found nothing to do (for a run_once(0) driver).
        self.idle = False

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        world = self.world
        world.passes += 1
        if world.passes > self.max_passes:
            raise SimHang("more than %d loop passes" % self.max_passes)
        world.run_due()
        world.point("select")
        ready = self._ready()
        self.idle = not ready and not world.busy()
        if ready or timeout == 0 or world.busy():
            return ready
        if not world.advance(timeout):
            raise SimHang("nothing can happen: no timer, no world event, nothing ready")
        world.run_due()
        return self._ready()

    def _ready(self) -> List[Tuple[selectors.SelectorKey, int]]:
        real = {key.fd: (key, mask) for key, mask in super().select(0)}
        live = self.world.live
        if not live:
            return [real[fd] for fd in sorted(real)]
        out = []
        fd_map = self.get_map()
        # In connection order, not descriptor order: descriptor numbers differ between replays.
        items = list(live.items())
        if len(items) > 1:
            items.sort(key=lambda item: item[1].number)
        for fd, connection in items:
            key = fd_map.get(fd)
            entry = real.pop(fd, None)
            if key is None:
                continue
            mask = connection.readiness(0 if entry is None else entry[1]) & key.events
            if mask:
                out.append((key, mask))
        # What is left is real: the loop's wake-up socket.
        return [real[fd] for fd in sorted(real)] + out
