"""A fault-injecting TCP proxy: the real server's bytes, cut, reset or stalled where it hurts.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every accepted connection to a target
(the real server) on a thread of its own. A *plan* gives each connection one :class:`Fault`:
pass through, or after ``after`` bytes cut the connection (FIN), reset it (RST, through
``SO_LINGER 0``) or stall it (stop forwarding either way, keep both sockets open: a half-open
connection); any of them may also delay every piece it forwards. A fault lands in one phase of
the exchange::

    Fault("stall", after=20, side="request")   # the request: 20 of its bytes reach the server
    Fault("stall")                             # before the head: the whole request goes, nothing
                                               # comes back (fires on the server's first byte)
    Fault("stall", after=9)                    # inside the status line: "HTTP/1.1 " and no more
    Fault("stall", after=40, inside="headers") # inside the header block
    Fault("stall", inside="chunk_size")        # after the head, before the first body line
    Fault("stall", after_rows=2)               # the body, once two feed rows went through

    with FaultProxy("127.0.0.1", port, seed=7, plan=Fault("cut", after=300)) as proxy:
        ...  # point a client at proxy.url
    print(proxy.faults_by_kind, proxy.faults_by_region)

A :class:`ResponseTracker` classifies the server's bytes as they pass (response head, chunk-size
line, feed line, heartbeat, the CRLF after a chunk) and counts the feed rows, so a fault can be
aimed *inside* a region (``Fault("cut", after=0, inside="chunk_size")`` cuts between two bytes of
the first chunk-size line at or after ``after``) or after some rows, and every fault records
where it landed (``request`` for the client's bytes, ``start`` before the server's first byte).
Once ``max_faults`` connection faults have fired, the proxy becomes a clean pass-through
(pending faults are dropped), so a consumer can catch up; :meth:`FaultProxy.inject_now` breaks
the connections open right now. ``close()`` closes every socket and joins every thread with
bounded waits, so nothing leaks into the warnings-as-errors test run.
"""

import collections
import dataclasses
import logging
import random
import re
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Counter, Dict, List, Optional, Tuple, Type, Union

__all__ = [
    "BREAKING_KINDS",
    "Fault",
    "FaultProxy",
    "FaultRecord",
    "KINDS",
    "REGIONS",
    "ResponseTracker",
    "SIDES",
    "find_fault_offset",
    "random_plan",
]

#: ``none`` passes through; ``delay`` passes through slowly; the others break the connection.
KINDS = ("none", "delay", "cut", "reset", "stall")
BREAKING_KINDS = ("cut", "reset", "stall")
#: What a byte from server to client can be; a fault between two regions is "a|b".
REGIONS = ("headers", "chunk_size", "json_line", "heartbeat", "chunk_crlf", "trailer", "body")
#: Whose bytes a fault's ``after`` counts: the server's response, or the client's request.
SIDES = ("response", "request")

logger = logging.getLogger(__name__)

RECV_BYTES = 65536
# A response head of a test server is a few hundred bytes; past this it is not HTTP we follow.
MAX_HEAD_BYTES = 64 * 1024
# An aimed fault that found no spot inside its region within this many bytes after `after`
# fires anyway (a region may never come again, e.g. the head): a plan must always end a
# connection it meant to break, or a long-lived feed would never see another fault.
INSIDE_WINDOW_BYTES = 16 * 1024
# How often a connection thread looks at close() and inject_now() while its sockets are idle.
POLL_S = 0.05
ACCEPT_POLL_S = 0.05
CONNECT_TIMEOUT_S = 5.0
# A client that stops reading blocks sendall(); close() unblocks it earlier by shutting down.
SEND_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Fault:
    """What to do to one connection.

    Attributes:
        kind: one of :data:`KINDS`.
        after: bytes of ``side`` forwarded before a breaking fault fires.
        inside: fire only strictly inside this region of the response (both neighbouring bytes
            in it), at the first such spot at or after ``after`` (best effort, see
            ``INSIDE_WINDOW_BYTES``).
        delay: seconds to wait before forwarding each piece from the server (any kind).
        side: ``"response"`` (the server's bytes) or ``"request"`` (the client's: a stall there
            stops forwarding the request, so the server never answers).
        after_rows: fire only once this many feed rows (non-empty lines of the body) have been
            forwarded whole, so a client has had them before the connection breaks.
    """

    kind: str = "none"
    after: int = 0
    inside: Optional[str] = None
    delay: float = 0.0
    side: str = "response"
    after_rows: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")
        if self.inside is not None and self.inside not in REGIONS:
            raise ValueError(f"unknown region {self.inside!r}; expected one of {REGIONS}")
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}; expected one of {SIDES}")
        if self.side == "request" and (self.inside is not None or self.after_rows):
            raise ValueError("inside and after_rows aim at the response, not the request")
        if self.after < 0 or self.delay < 0 or self.after_rows < 0:
            raise ValueError("after, delay and after_rows cannot be negative")

    @property
    def breaks(self) -> bool:
        return self.kind in BREAKING_KINDS


@dataclass(frozen=True)
class FaultRecord:
    """One fault that fired: on which connection, what, after how many bytes, where."""

    connection: int
    kind: str
    offset: int  # of the request's bytes if region is "request", else of the response's
    region: str
    at: float  # time.monotonic() when it fired
    rows: int = 0  # feed rows forwarded whole before it


Plan = Callable[[random.Random, int], Fault]


Span = Tuple[int, int, str]

_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked[ \t]*\r\n")


class ResponseTracker:
    """Sans-IO: say which region each byte of an HTTP/1.1 response (chunked or not) is in.

    :meth:`feed` takes the next bytes and returns spans ``(start, end, region)`` in absolute
    offsets, adjacent spans of one region merged. In chunk data (or an unframed body), the
    newline of an empty line is a ``heartbeat``; every other byte is a ``json_line``. A
    non-empty line is a *row*: ``rows`` counts them, ``row_ends`` says where those of the last
    :meth:`feed` ended (the offset after each one's newline).
    """

    def __init__(self) -> None:
        #: Bytes fed so far.
        self.offset = 0
        #: The region of the last byte fed (``None`` before any).
        self.last_region: Optional[str] = None
        self._base = 0
        self._state = "headers"
        self._head = b""
        self._size_line = b""
        self._remaining = 0
        self._line_bytes = 0  # bytes of the current feed line so far, across chunks
        #: Rows (non-empty feed lines) completed so far.
        self.rows = 0
        #: The offset after each row the last feed() completed.
        self.row_ends: List[int] = []

    def __repr__(self) -> str:
        return f"<ResponseTracker {self._state} offset={self.offset}>"

    def next_region(self) -> str:
        """The region of the next byte (a newline to come is taken for a line's end)."""
        return {"data": "json_line", "body": "json_line"}.get(self._state, self._state)

    def feed(self, data: bytes) -> List[Span]:
        """Classify the next bytes of the response."""
        spans: List[Span] = []
        self._base = self.offset
        self.row_ends = []
        pos = 0
        while pos < len(data):
            pos = self._step(data, pos, spans)
        self.offset += len(data)
        return spans

    def _emit(self, spans: List[Span], start: int, stop: int, region: str) -> None:
        if start == stop:
            return
        start += self._base
        stop += self._base
        if spans and spans[-1][2] == region and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop, region)
        else:
            spans.append((start, stop, region))
        self.last_region = region

    def _step(self, data: bytes, pos: int, spans: List[Span]) -> int:
        """Consume bytes from ``pos`` in the current state; return where it stopped."""
        state = self._state
        if state == "headers":
            seen = len(self._head)
            self._head += data[pos:]
            end = self._head.find(b"\r\n\r\n", max(0, seen - 3))
            if end < 0:
                if len(self._head) > MAX_HEAD_BYTES:  # not HTTP we follow: stop framing
                    self._state, self._head = "body", b""
                self._emit(spans, pos, len(data), "headers")
                return len(data)
            stop = pos + end + 4 - seen
            chunked = _CHUNKED.search(self._head[: end + 4].lower()) is not None
            self._state, self._head = ("chunk_size" if chunked else "body"), b""
            self._emit(spans, pos, stop, "headers")
            return stop
        if state == "chunk_size":
            newline = data.find(b"\n", pos)
            stop = len(data) if newline < 0 else newline + 1
            self._size_line += data[pos:stop]
            if newline >= 0:
                digits = self._size_line.split(b";", 1)[0].strip()
                self._size_line = b""
                try:
                    size = int(digits, 16)
                except ValueError:
                    size = -1
                if size > 0:
                    self._state, self._remaining = "data", size
                else:  # the last chunk, or framing we cannot follow
                    self._state = "trailer" if size == 0 else "body"
            self._emit(spans, pos, stop, "chunk_size")
            return stop
        if state == "data":
            stop = min(len(data), pos + self._remaining)
            self._remaining -= stop - pos
            self._lines(data, pos, stop, spans)
            if self._remaining == 0:
                self._state, self._remaining = "chunk_crlf", 2
            return stop
        if state == "chunk_crlf":
            stop = min(len(data), pos + self._remaining)
            self._remaining -= stop - pos
            if self._remaining == 0:
                self._state = "chunk_size"
            self._emit(spans, pos, stop, "chunk_crlf")
            return stop
        if state == "body":
            self._lines(data, pos, len(data), spans)
            return len(data)
        self._emit(spans, pos, len(data), "trailer")
        return len(data)

    def _lines(self, data: bytes, pos: int, stop: int, spans: List[Span]) -> None:
        while pos < stop:
            newline = data.find(b"\n", pos, stop)
            if newline < 0:
                self._emit(spans, pos, stop, "json_line")
                self._line_bytes += stop - pos
                return
            self._emit(spans, pos, newline, "json_line")
            self._line_bytes += newline - pos
            self._emit(
                spans, newline, newline + 1, "json_line" if self._line_bytes else "heartbeat"
            )
            if self._line_bytes:
                self.rows += 1
                self.row_ends.append(self._base + newline + 1)
            self._line_bytes = 0
            pos = newline + 1


def _region_of(offset: int, spans: List[Span]) -> str:
    for start, stop, region in spans:
        if start <= offset < stop:
            return region
    raise AssertionError(f"offset {offset} is not in {spans}")  # pragma: no cover - a bug here


def _join(before: Optional[str], after: str) -> str:
    if before is None:
        return "start"
    return before if before == after else f"{before}|{after}"


def find_fault_offset(
    fault: Fault, spans: List[Span], start: int, stop: int, before: Optional[str]
) -> Optional[Tuple[int, str]]:
    """Where in the piece ``[start, stop)`` a breaking fault fires, and in which region.

    The byte at the returned offset is withheld, so it must be in the piece (``< stop``): the
    region on both sides of the cut is then known. ``before`` is the region of byte
    ``start - 1``. Returns ``None`` when the fault does not fire in this piece.
    """
    if fault.after >= stop:
        return None
    if fault.inside is None or stop > fault.after + INSIDE_WINDOW_BYTES:
        offset = max(fault.after, start)
        previous = before if offset == start else _region_of(offset - 1, spans)
        return offset, _join(previous, _region_of(offset, spans))
    for first, last, region in spans:
        if region != fault.inside:
            continue
        # Strictly inside: the bytes on both sides of the cut are in the region.
        low = first if (first == start and before == region) else first + 1
        low = max(low, fault.after)
        if low < last:
            return low, region
    return None


def _armed_at(fault: Fault, tracker: ResponseTracker) -> Optional[int]:
    """The offset from which ``fault`` may fire, once ``after_rows`` rows passed; ``None`` while
    the rows of the piece the tracker was last fed do not complete them."""
    if not fault.after_rows:
        return 0
    needed = fault.after_rows - (tracker.rows - len(tracker.row_ends))
    if needed <= 0:
        return 0  # complete before this piece: every offset in it is past them
    if needed > len(tracker.row_ends):
        return None
    return tracker.row_ends[needed - 1]


def random_plan(
    kinds: Tuple[str, ...] = KINDS,
    offsets: Tuple[int, int] = (0, 4096),
    inside: Union[None, str, Tuple[Optional[str], ...]] = None,
    delays: Tuple[float, float] = (0.001, 0.01),
) -> Plan:
    """A plan: a kind drawn from ``kinds``, ``after`` from ``offsets``, a region from ``inside``.

    ``delay`` connections pass through with a per-piece delay drawn from ``delays``.
    """
    regions = inside if isinstance(inside, tuple) else (inside,)

    def plan(rng: random.Random, index: int) -> Fault:
        kind = rng.choice(kinds)
        if kind == "delay":
            return Fault("delay", delay=rng.uniform(*delays))
        if kind == "none":
            return Fault()
        return Fault(kind, after=rng.randint(*offsets), inside=rng.choice(regions))

    return plan


class _Link:
    """One proxied connection: its sockets, its fault, how far it got."""

    def __init__(self, index: int, client: socket.socket, fault: Fault) -> None:
        self.index = index
        self.client = client
        self.upstream: Optional[socket.socket] = None
        self.fault: Optional[Fault] = fault
        self.tracker = ResponseTracker()
        self.sent = 0  # server-to-client bytes forwarded
        self.received = 0  # client-to-server bytes forwarded
        self.stalled = False
        self.done = False
        self.delay_counted = False
        self.forced: Optional[str] = None  # set by inject_now()

    def is_done(self) -> bool:
        return self.done

    def __repr__(self) -> str:
        state = "stalled" if self.stalled else "done" if self.done else "open"
        return f"<_Link #{self.index} {state} sent={self.sent} fault={self.fault}>"


class FaultProxy:
    """Listen on 127.0.0.1 and forward each connection to the target, breaking some.

    Args:
        target_host, target_port: where to forward.
        seed: seeds the plan's ``random.Random``, so a run can be replayed.
        plan: a :class:`Fault` for every connection, or ``plan(rng, index) -> Fault``; by
            default :func:`random_plan` with ``kinds``, ``offsets`` and ``cut_inside``.
        max_faults: after this many breaking faults (cut, reset, stall) the proxy heals: pending
            faults are dropped and new connections pass through (see :meth:`heal`).

    Counters (``faults_by_kind``, ``faults_by_region``, ``records``) are updated under a lock by
    the connection threads; reading them from the test's thread is safe.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        seed: int,
        plan: Union[None, Fault, Plan] = None,
        max_faults: Optional[int] = None,
        kinds: Tuple[str, ...] = KINDS,
        offsets: Tuple[int, int] = (0, 4096),
        cut_inside: Union[None, str, Tuple[Optional[str], ...]] = None,
    ) -> None:
        if plan is None:
            plan = random_plan(kinds, offsets, cut_inside)
        if isinstance(plan, Fault):
            fixed = plan

            def plan(rng: random.Random, index: int) -> Fault:
                return fixed

        self.target = (target_host, target_port)
        self.max_faults = max_faults
        self._plan = plan
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._healed = False
        self._links: List[_Link] = []
        self._threads: List[threading.Thread] = []
        self._by_kind: Counter[str] = collections.Counter()
        self._by_region: Counter[str] = collections.Counter()
        self._records: List[FaultRecord] = []
        self.errors: List[BaseException] = []

        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(64)
            # accept() polls so close() can stop it portably (closing a socket does not wake a
            # thread blocked in accept() on Linux).
            self._listener.settimeout(ACCEPT_POLL_S)
        except BaseException:
            self._listener.close()
            raise
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"FaultProxy:{self.port}", daemon=True
        )
        self._acceptor.start()

    # -- what happened -------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._links)

    @property
    def faults_injected(self) -> int:
        """Every fault that fired, delays included."""
        with self._lock:
            return sum(self._by_kind.values())

    @property
    def connection_faults(self) -> int:
        """Faults that broke a connection: cuts, resets and stalls."""
        with self._lock:
            return sum(self._by_kind[kind] for kind in BREAKING_KINDS)

    @property
    def faults_by_kind(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._by_kind)

    @property
    def faults_by_region(self) -> Dict[str, int]:
        """Where the breaking faults landed: a region, ``a|b`` between two, or ``start``."""
        with self._lock:
            return dict(self._by_region)

    @property
    def records(self) -> List[FaultRecord]:
        with self._lock:
            return list(self._records)

    @property
    def healed(self) -> bool:
        with self._lock:
            return self._healed

    def summary(self) -> str:
        """One line for a test report: faults per kind and per region, connections."""
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.faults_by_kind.items()))
        regions = " ".join(f"{k}={v}" for k, v in sorted(self.faults_by_region.items()))
        return (
            f"{self.faults_injected} faults ({kinds}) on {self.connections} connections; "
            f"breaking faults by region: {regions}"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closing.is_set() else "healed" if self.healed else "open"
        return (
            f"<FaultProxy {self.url} -> {self.target[0]}:{self.target[1]} "
            f"connections={self.connections} faults={self.faults_by_kind} {state}>"
        )

    # -- control -------------------------------------------------------------------------------

    def heal(self) -> None:
        """Stop injecting: pending faults are dropped, new connections pass through cleanly."""
        with self._lock:
            self._healed = True

    def inject_now(self, kind: str = "cut") -> int:
        """Break every open connection now (``cut``, ``reset`` or ``stall``), healed or not.

        Returns how many connections were told; each fires within ``POLL_S``.
        """
        if kind not in BREAKING_KINDS:
            raise ValueError(f"inject_now() takes one of {BREAKING_KINDS}, not {kind!r}")
        with self._lock:
            links = [link for link in self._links if not link.done and not link.stalled]
            for link in links:
                link.forced = kind
        return len(links)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, close every socket, join every thread (bounded)."""
        self._closing.set()
        self._acceptor.join(JOIN_TIMEOUT_S)
        with self._lock:
            links = list(self._links)
            threads = list(self._threads)
        for link in links:
            for sock in (link.client, link.upstream):
                if sock is None:
                    continue
                try:  # wakes a thread blocked in sendall()
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        for link in links:  # only if a thread failed to finish in time
            _close(link.client)
            if link.upstream is not None:
                _close(link.upstream)
        self._listener.close()

    # -- the threads ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if not self._closing.is_set():
                    self._error(exc)
                return
            with self._lock:
                if self._closing.is_set():
                    client.close()
                    return
                index = len(self._links)
                fault = Fault() if self._healed else self._plan(self._rng, index)
                link = _Link(index, client, fault)
                self._links.append(link)
                thread = threading.Thread(
                    target=self._serve,
                    args=(link,),
                    name=f"FaultProxy:{self.port}#{index}",
                    daemon=True,
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, link: _Link) -> None:
        client = link.client
        selector = selectors.DefaultSelector()
        try:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self._error(exc)
            _close(client)
            selector.close()
            return
        link.upstream = upstream
        try:
            for sock in (client, upstream):
                sock.settimeout(SEND_TIMEOUT_S)
                # Forward small pieces as they come, so a fault offset means the same bytes.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(client, selectors.EVENT_READ, "client")
            selector.register(upstream, selectors.EVENT_READ, "upstream")
            while not link.done and not self._closing.is_set():
                if link.forced is not None:
                    self._break_now(link)
                    continue
                for key, _events in selector.select(POLL_S):
                    if link.is_done():  # the other socket's event broke the connection
                        break
                    if key.data == "client":
                        self._from_client(link)
                    else:
                        self._from_upstream(link, selector)
        except OSError:
            pass  # either peer went away: the connection is over
        finally:
            selector.close()
            _close(client)
            _close(upstream)

    def _from_client(self, link: _Link) -> None:
        assert link.upstream is not None
        data = link.client.recv(RECV_BYTES)
        if not data:
            link.done = True  # the client left: close the upstream too
            return
        if link.stalled:
            return  # swallowed: the server never sees the rest of the request
        fault = link.fault
        start = link.received
        if fault is not None and fault.breaks and fault.side == "request":
            if fault.after < start + len(data):
                offset = max(fault.after, start)
                link.upstream.sendall(data[: offset - start])
                link.received = offset
                if self._fired(link, fault.kind, offset, "request", link.tracker.rows):
                    self._apply(link, fault.kind)
                    return
                data = data[offset - start :]  # healed meanwhile: pass the rest through
        link.upstream.sendall(data)
        link.received += len(data)

    def _from_upstream(self, link: _Link, selector: selectors.BaseSelector) -> None:
        assert link.upstream is not None
        data = link.upstream.recv(RECV_BYTES)
        if not data:
            selector.unregister(link.upstream)
            if not link.stalled:
                link.client.shutdown(socket.SHUT_WR)  # pass the server's FIN on
            return
        if link.stalled:
            return  # swallowed: a half-open connection says nothing
        start = link.sent
        before = link.tracker.last_region
        spans = link.tracker.feed(data)
        fault = link.fault
        if fault is not None and fault.breaks and fault.side == "response":
            armed = _armed_at(fault, link.tracker)
            found = None
            if armed is not None:
                aimed = dataclasses.replace(fault, after=max(fault.after, armed))
                found = find_fault_offset(aimed, spans, start, start + len(data), before)
            if found is not None:
                offset, region = found
                self._forward(link, data[: offset - start])
                tracker = link.tracker
                rows = tracker.rows - sum(end > offset for end in tracker.row_ends)
                if self._fired(link, fault.kind, offset, region, rows):
                    self._apply(link, fault.kind)
                    return
                data = data[offset - start :]  # healed meanwhile: pass the rest through
        self._forward(link, data)

    def _forward(self, link: _Link, data: bytes) -> None:
        if not data:
            return
        fault = link.fault
        if fault is not None and fault.delay > 0:
            with self._lock:
                healed = self._healed
                if not healed and not link.delay_counted:
                    link.delay_counted = True
                    self._by_kind["delay"] += 1
            if not healed:
                self._closing.wait(fault.delay)
        link.client.sendall(data)
        link.sent += len(data)

    def _break_now(self, link: _Link) -> None:
        kind, link.forced = link.forced, None
        assert kind is not None
        region = _join(link.tracker.last_region, link.tracker.next_region())
        if self._fired(link, kind, link.sent, region, link.tracker.rows, forced=True):
            self._apply(link, kind)

    def _fired(
        self, link: _Link, kind: str, offset: int, region: str, rows: int, forced: bool = False
    ) -> bool:
        """Count a breaking fault, unless the proxy healed; return whether it fires."""
        with self._lock:
            if self._healed and not forced:
                link.fault = None
                return False
            self._by_kind[kind] += 1
            self._by_region[region] += 1
            record = FaultRecord(link.index, kind, offset, region, time.monotonic(), rows)
            self._records.append(record)
            logger.debug("connection #%d: %s after %d bytes (%s)", link.index, kind, offset, region)
            breaking = sum(self._by_kind[k] for k in BREAKING_KINDS)
            if self.max_faults is not None and breaking >= self.max_faults:
                self._healed = True
        link.fault = None
        return True

    def _apply(self, link: _Link, kind: str) -> None:
        if kind == "cut":
            link.client.shutdown(socket.SHUT_WR)  # FIN after the bytes already forwarded
            link.done = True
        elif kind == "reset":
            # SO_LINGER on, timeout 0: close() sends RST and drops whatever is still queued.
            link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            link.done = True
        else:
            link.stalled = True

    def _error(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
