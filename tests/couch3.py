"""What Apache CouchDB 3.5 sends on a ``_changes`` feed, byte for byte, for scripted servers.

pouchdb-server (the suite's real server) lacks CouchDB 2/3's opaque string seqs, ``last_seq``
endings and ``pending``; these helpers reproduce them as observed on a real CouchDB 3.5.0.
Shared by test_consumer_scripted.py and test_hostile.py, with a helper that drives a loop.
"""

import base64
import contextlib
import hashlib
import json
import ssl
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence
from urllib.parse import parse_qs, urlsplit

from scripted import LAST_CHUNK, Read, Request, Script, ScriptedServer, Send, Stall, chunk

from changeloop import Consumer, FeedEvent, Loop, Server
from changeloop._stream import FeedStream
from changeloop.checkpoint import MemoryCheckpoint
from changeloop.consumer import Change

# -- the bytes --------------------------------------------------------------------

#: The head of every CouchDB 3.5 ``_changes`` response, in CouchDB's header order.
COUCH_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Cache-Control: must-revalidate\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Sun, 22 Nov 2026 17:00:00 GMT\r\n"
    b"Server: CouchDB/3.5.0 (Erlang OTP/25)\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"X-Couch-Request-ID: 5b6f0c2d9e\r\n"
    b"X-CouchDB-Body-Time: 0\r\n"
    b"\r\n"
)
#: A heartbeat, and also the chunk CouchDB sends when a feed opens idle or a batch follows.
HEARTBEAT = b"1\r\n\n\r\n"
assert chunk(b"\n") == HEARTBEAT
#: Every row of these scripts is this long, so 7 rows make CouchDB's usual 1484-byte chunk.
ROW_BYTES = 212


def seq(n: int) -> str:
    """A CouchDB 3 seq: ``<sum of shard seqs>-g1AAAA<base64url of the shard vector>``."""
    prefix = "%d-g1AAAA" % n
    digest = hashlib.sha512(str(n).encode()).digest() * 2
    vector = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return prefix + vector[: 129 - len(prefix)]  # fixed length: see ROW_BYTES


def doc_id(n: int) -> str:
    return "doc-%03d" % n


def row(n: int, seq_value: Any = "", *, crlf: bool = False) -> bytes:
    """One continuous-feed row as CouchDB writes it, newline included."""
    rev = "1-" + hashlib.md5(str(n).encode()).hexdigest()
    value = seq(n) if seq_value == "" else seq_value
    line = json.dumps(
        {"seq": value, "id": doc_id(n), "changes": [{"rev": rev}]}, separators=(",", ":")
    ).encode()
    return line + (b"\r\n" if crlf else b"\n")


def rows(*numbers: int) -> bytes:
    return b"".join(row(n) for n in numbers)


def end_line(last_seq: str, pending: int = 0) -> bytes:
    """The line that ends a continuous feed on ``timeout`` or ``limit``."""
    return b'{"last_seq":"%s","pending":%d}\n' % (last_seq.encode(), pending)


def couch_end(last_seq: str, pending: int = 0) -> bytes:
    """CouchDB's timeout end: the last_seq chunk, a ``\\n`` chunk, the last chunk."""
    return chunk(end_line(last_seq, pending)) + HEARTBEAT + LAST_CHUNK


def normal_since_now(last_seq: str, pending: int = 0) -> Script:
    """CouchDB's answer to ``feed=normal&since=now`` (no results, the current seq), which is
    also its answer to ``limit=0`` (no results, and how many changes are ``pending``)."""
    body = chunk(b'{"results":[\n') + chunk(
        b'\n],\n"last_seq":"%s","pending":%d}\n' % (last_seq.encode(), pending)
    )
    return [Read(), Send(COUCH_HEAD + body + HEARTBEAT + LAST_CHUNK), Stall()]


def feed(*body: bytes, then: Optional[Any] = None) -> Script:
    """Read the request, send the head and ``body``, then stall (or ``then``)."""
    return [Read(), Send(COUCH_HEAD + b"".join(body)), then if then is not None else Stall()]


# -- driving a loop ----------------------------------------------------------------------------


def run_until(loop: Loop, condition: Callable[[], object], timeout: float = 3.0) -> None:
    """Run loop passes until ``condition()`` holds; fail after ``timeout`` real seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        loop.run_once(0.01)


def settle(loop: Loop, passes: int = 5) -> None:
    """Give the loop a few real passes in which nothing should happen."""
    for _ in range(passes):
        loop.run_once(0.01)


def since_of(request: Request) -> str:
    """The ``since`` a request asked for."""
    (value,) = parse_qs(urlsplit(request.target).query)["since"]
    return value


class SaveFailsOnce(MemoryCheckpoint):
    """A checkpoint store whose first save fails (a disk that blinked)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def save(self, seq: Any) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise OSError("the disk blinked")
        super().save(seq)


# -- a scripted server, a loop and a consumer --------------------------------------------------


class FakeClock:
    """The loop's clock, moved by hand: timers fire only when a test says time has passed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Rig:
    """A scripted server, a loop and a consumer that records changes and lifecycle events."""

    def __init__(self, srv: ScriptedServer, loop: Loop, consumer: Consumer) -> None:
        self.srv = srv
        self.loop = loop
        self.consumer = consumer
        self.changes: List[Change] = []
        self.events: List[FeedEvent] = []

    @property
    def ids(self) -> List[str]:
        return [c["id"] for c in self.changes]

    def kinds(self) -> List[str]:
        return [e.kind for e in self.events]

    def errors(self) -> List[FeedEvent]:
        return [e for e in self.events if e.kind == "error"]

    def start(self, since: Any = 0, **params: Any) -> None:
        self.consumer.start(self.changes.append, since, **params)

    def run_until(self, condition: Callable[[], object], timeout: float = 3.0) -> None:
        run_until(self.loop, condition, timeout)

    def stream(self) -> FeedStream:
        """The consumer's current stream (to look at what it buffers)."""
        self.run_until(lambda: self.consumer._stream is not None)
        stream = self.consumer._stream
        assert stream is not None
        return stream


def read_everything_at_once(r: Rig) -> None:
    """Let the whole first response (and its end) arrive before the consumer reads any of it."""
    stream = r.stream()
    r.run_until(lambda: stream.state == "receiving")
    r.srv.wait_until_sent(0)


@contextlib.contextmanager
def rig(
    scripts: Sequence[Script],
    *,
    clock: Optional[FakeClock] = None,
    server_context: Optional[ssl.SSLContext] = None,
    client_context: Optional[ssl.SSLContext] = None,
    **options: Any,
) -> Iterator[Rig]:
    if clock is None:
        options.setdefault("reconnect_base", 0.01)  # real backoff sleeps stay short
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(ScriptedServer(scripts, ssl_context=server_context))
        server = stack.enter_context(Server(srv.url, ssl_context=client_context))
        loop = stack.enter_context(Loop() if clock is None else Loop(clock=clock))
        events: List[FeedEvent] = []
        consumer = stack.enter_context(
            Consumer(
                server.get_db("db"),
                loop,
                on_error=events.append,
                on_connect=events.append,
                on_disconnect=events.append,
                on_caught_up=events.append,
                **options,
            )
        )
        the_rig = Rig(srv, loop, consumer)
        the_rig.events = events
        yield the_rig
