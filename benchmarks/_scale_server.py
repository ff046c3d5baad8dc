"""A loopback server that keeps many CouchDB 3 continuous feeds open, for ``bench_scale.py``.

One thread, one :mod:`selectors` loop, any number of connections (up to the open-file limit,
which it raises to the hard limit). Each ``GET /<db>/_changes?feed=continuous...`` is answered as
CouchDB 3 answers it: the head at once with ``Transfer-Encoding: chunked``, then a ``\\n`` chunk
(CouchDB's immediate heartbeat for ``since=now``), then a ``\\n`` heartbeat chunk every
``heartbeat`` ms (the query's, else ``--heartbeat-ms``). Heartbeats are staggered: each feed's
first one comes after a random fraction of the interval, and its phase is kept, so with N feeds
about N / heartbeat heartbeats go out per second, evenly, rather than N at once. Every feed is
live only, whatever its ``since``. A ``feed=normal`` request (a client asking where "now" is)
gets CouchDB 3's empty answer, ``{"results":[\n\n],\n"last_seq":"<seq>-g1AAAAbench",
"pending":0}``, in its chunks, on a kept-alive connection. Anything else gets a 404.

On command it sends a trickle of change rows to random feeds, one row every 1 / rate seconds::

    {"seq":<n>,"id":"<db>-<n>","changes":[{"rev":"1-x"}],"t":<time.time_ns() just before send>}

each preceded by a ``\\n`` chunk, as CouchDB 3 sends one before every batch of live rows, the two
chunks in one ``send``. The client's latency is its receive time minus ``t`` (one machine, one
clock).

    python benchmarks/_scale_server.py [--heartbeat-ms MS] [--seed N] [--max-seconds S]

It prints ``port PORT`` and ``ready``, then reads commands from its standard input, one a line:

    trickle SECONDS RATE   send RATE rows/s for SECONDS; prints ``trickle-done sent=K late_ms=L``
                           when done (L: how far the server's own schedule fell behind, at most)
    stats                  prints ``stats connections=C streams=S heartbeats=H dropped=D
                           refused=R`` (dropped: stalled clients cut off; refused: 404s)
    quit                   (or end of input) close everything and exit

It also exits after ``--max-seconds``, so a forgotten server cannot outlive its benchmark.
"""

import argparse
import heapq
import os
import random
import resource
import selectors
import socket
import sys
import time
from typing import Dict, List, Optional, Tuple

#: The longest request head read; the benchmark's clients send a few hundred bytes.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
#: Unsent bytes a connection may hold before the server gives up on it (a stalled client):
#: enough for minutes of heartbeats, small enough that a stuck client cannot eat the server.
MAX_UNSENT_BYTES = 1024 * 1024
#: Connections accepted per readiness event of the listener, so a burst of connects cannot
#: hold off heartbeats and rows for long.
ACCEPTS_PER_EVENT = 256
#: The listen backlog; Linux caps it at net.core.somaxconn (4096 by default).
BACKLOG = 4096
#: The longest sleep in select(): commands and the lifetime limit are checked at least this often.
MAX_WAIT_S = 0.5

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Cache-Control: must-revalidate\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: CouchDB/3.5.0 (Erlang OTP/25)\r\n"
    b"X-Couch-Request-ID: 5b4ac2f1e4\r\n"
    b"X-CouchDB-Body-Time: 0\r\n"
    b"\r\n"
)
HEARTBEAT = b"1\r\n\n\r\n"
NOT_FOUND = (
    b"HTTP/1.1 404 Object Not Found\r\nContent-Type: application/json\r\n"
    b"Content-Length: 41\r\nConnection: close\r\n\r\n"
    b'{"error":"not_found","reason":"missing"}\n'
)


class Conn:
    """One client connection: reading its request, then streaming its feed."""

    __slots__ = ("sock", "fd", "head", "out", "db", "heartbeat_s", "index", "closed", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.head = b""
        self.out = bytearray()
        self.db = b""
        self.heartbeat_s = 0.0
        self.index = -1  # position in Server.streams while streaming
        self.closed = False
        self.writing = False


class Server:
    def __init__(self, heartbeat_ms: int, seed: int) -> None:
        self.default_heartbeat_s = heartbeat_ms / 1000.0
        self.rng = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(BACKLOG)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.stdin_fd = sys.stdin.fileno()
        os.set_blocking(self.stdin_fd, False)
        self.selector.register(self.stdin_fd, selectors.EVENT_READ, "stdin")
        self.stdin_buf = b""
        self.conns: Dict[int, Conn] = {}
        self.streams: List[Conn] = []  # streaming connections, for a random pick in O(1)
        self.heap: List[Tuple[float, int, Conn]] = []  # (due, fd, conn): the next heartbeats
        self.heartbeats = 0
        self.dropped = 0
        self.refused = 0
        self.seq = 0
        self.trickle_next = 0.0
        self.trickle_end = 0.0
        self.trickle_interval = 0.0
        self.trickle_sent = 0
        self.trickle_late = 0.0
        self.running = True

    # -- connections -------------------------------------------------------------------------

    def accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE: leave the rest in the backlog, say so once
                print("accept failed: %s" % exc, file=sys.stderr, flush=True)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True  # its heap entry is dropped lazily, when it comes due
        self.selector.unregister(conn.sock)
        del self.conns[conn.fd]
        if conn.index >= 0:  # swap-remove from the streams list
            last = self.streams.pop()
            if last is not conn:
                last.index = conn.index
                self.streams[conn.index] = last
            conn.index = -1
        conn.sock.close()

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.index >= 0:
            return  # a streaming client has nothing more to say; ignore it
        conn.head += data
        while conn.index < 0 and not conn.closed:  # keep-alive: one request after another
            end = conn.head.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.head) > MAX_REQUEST_HEAD_BYTES:
                    self.close(conn)
                return
            head, conn.head = conn.head[:end], conn.head[end + 4 :]
            self.request(conn, head)

    def request(self, conn: Conn, head: bytes) -> None:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        target = parts[1] if len(parts) == 3 else b""
        path, _, query = target.partition(b"?")
        segments = path.split(b"/")
        params = dict(p.partition(b"=")[::2] for p in query.split(b"&") if p)
        feed = params.get(b"feed", b"normal")
        if parts[0] != b"GET" or len(segments) != 3 or segments[2] != b"_changes":
            feed = b""
        if feed == b"normal":
            # Where "now" is (a consumer may ask before following since=now): CouchDB 3's
            # chunks for a normal feed with nothing to report. Any since is accepted.
            last = b'\n],\n"last_seq":"%d-g1AAAAbench","pending":0}\n' % self.seq
            self.send(conn, b'%sd\r\n{"results":[\n\r\n' % HEAD)
            self.send(conn, b"%x\r\n%s\r\n%s0\r\n\r\n" % (len(last), last, HEARTBEAT))
            return
        if feed != b"continuous":
            if not self.refused:
                print("404 for %r (and maybe more)" % head[:200], file=sys.stderr, flush=True)
            self.refused += 1
            self.send(conn, NOT_FOUND)
            self.close(conn)
            return
        conn.db = segments[1]
        try:
            conn.heartbeat_s = int(params[b"heartbeat"]) / 1000.0
        except (KeyError, ValueError):
            conn.heartbeat_s = self.default_heartbeat_s
        conn.index = len(self.streams)
        self.streams.append(conn)
        # Live changes only, whatever the since: the feed starts with CouchDB 3's immediate \n.
        self.send(conn, HEAD + HEARTBEAT)
        due = time.monotonic() + self.rng.uniform(0.0, conn.heartbeat_s)
        heapq.heappush(self.heap, (due, conn.fd, conn))

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        if conn.out:
            conn.out += data
        else:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            if sent == len(data):
                return
            conn.out += data[sent:]
        if len(conn.out) > MAX_UNSENT_BYTES:
            self.dropped += 1
            self.close(conn)
        elif not conn.writing:
            conn.writing = True
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def writable(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            conn.writing = False
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    # -- commands ----------------------------------------------------------------------------

    def read_commands(self) -> None:
        try:
            data = os.read(self.stdin_fd, 4096)
        except BlockingIOError:
            return
        if not data:
            self.running = False  # the benchmark went away: so do we
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            self.command(line.decode("ascii", "replace").split())

    def command(self, words: List[str]) -> None:
        if not words:
            return
        if words[0] == "trickle" and len(words) == 3:
            seconds, rate = float(words[1]), float(words[2])
            now = time.monotonic()
            self.trickle_interval = 1.0 / rate
            self.trickle_next = now
            self.trickle_end = now + seconds
            self.trickle_sent = 0
            self.trickle_late = 0.0
        elif words[0] == "stats":
            print(
                "stats connections=%d streams=%d heartbeats=%d dropped=%d refused=%d"
                % (
                    len(self.conns),
                    len(self.streams),
                    self.heartbeats,
                    self.dropped,
                    self.refused,
                ),
                flush=True,
            )
        elif words[0] == "quit":
            self.running = False
        else:
            print("error unknown command %r" % " ".join(words), flush=True)

    # -- timers ------------------------------------------------------------------------------

    def fire_heartbeats(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            due, fd, conn = heapq.heappop(heap)
            if conn.closed:
                continue
            self.send(conn, HEARTBEAT)
            self.heartbeats += 1
            # Keep the phase (due + interval, not now + interval), so feeds stay spread out;
            # but never schedule into the past after a long stall.
            heapq.heappush(heap, (max(due + conn.heartbeat_s, now), fd, conn))

    def fire_trickle(self, now: float) -> None:
        while self.trickle_end and self.trickle_next <= now:
            if self.trickle_next >= self.trickle_end:
                self.trickle_end = 0.0
                print(
                    "trickle-done sent=%d late_ms=%.3f"
                    % (self.trickle_sent, self.trickle_late * 1000.0),
                    flush=True,
                )
                return
            self.trickle_late = max(self.trickle_late, now - self.trickle_next)
            self.trickle_next += self.trickle_interval
            if not self.streams:
                continue
            conn = self.streams[self.rng.randrange(len(self.streams))]
            self.seq += 1
            seq = self.seq
            prefix = b'{"seq":%d,"id":"%s-%d","changes":[{"rev":"1-x"}],"t":' % (seq, conn.db, seq)
            row = prefix + b"%d}\n" % time.time_ns()  # stamped last, right before the send
            self.send(conn, HEARTBEAT + b"%x\r\n%s\r\n" % (len(row), row))
            self.trickle_sent += 1
            now = time.monotonic()

    def next_timeout(self, now: float) -> float:
        wait = MAX_WAIT_S
        if self.heap:
            wait = min(wait, self.heap[0][0] - now)
        if self.trickle_end:
            wait = min(wait, self.trickle_next - now)
        return max(0.0, wait)

    # -- the loop ----------------------------------------------------------------------------

    def serve(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        now = time.monotonic()
        while self.running and now < deadline:
            for key, mask in self.selector.select(self.next_timeout(now)):
                data = key.data
                if data == "listener":
                    self.accept()
                elif data == "stdin":
                    self.read_commands()
                else:
                    if mask & selectors.EVENT_WRITE and not data.closed:
                        self.writable(data)
                    if mask & selectors.EVENT_READ and not data.closed:
                        self.readable(data)
            now = time.monotonic()
            self.fire_trickle(now)
            self.fire_heartbeats(now)
            now = time.monotonic()

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.selector.close()
        self.listener.close()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeat-ms", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    server = Server(args.heartbeat_ms, args.seed)
    try:
        print("port %d" % server.listener.getsockname()[1])
        print("ready", flush=True)
        server.serve(args.max_seconds)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
