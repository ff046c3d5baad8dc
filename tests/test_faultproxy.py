"""The fault proxy's own tests, so the chaos runs can trust it.

``faultproxy.py`` is tested against scripted servers: the tracker's regions and row counts, then
pass-through, a cut after exactly N bytes, a reset, a stall, faults aimed at a region, at the
request, before the head, inside the status line, after some rows, and healing.
"""

import random
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from faultproxy import (
    Fault,
    FaultProxy,
    ResponseTracker,
    find_fault_offset,
)
from scripted import (
    LAST_CHUNK,
    Close,
    Pause,
    Read,
    ScriptedServer,
    Send,
    Stall,
    Step,
    chunk,
    response_head,
)

REQUEST = b"GET /db/_changes?feed=continuous HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
ROWS = [
    b'{"seq":1,"id":"a","changes":[{"rev":"1-a"}]}\n',
    b"\n",
    b'{"seq":2,"id":"b","changes":[{"rev":"1-b"}]}\n{"seq":3,"id":"c","changes":[]}\n',
    b"\n",
]
# A feed response: the head, then one chunk per entry of ROWS (two rows share the third chunk).
FEED = response_head(chunked=True) + b"".join(chunk(row) for row in ROWS)
READ_TIMEOUT_S = 5.0


def classify(parts: List[Tuple[bytes, str]]) -> Tuple[bytes, List[str]]:
    """Join labelled parts; return the bytes and each byte's region, independently of the proxy."""
    data = b"".join(part for part, _ in parts)
    regions = [region for part, region in parts for _ in part]
    return data, regions


def feed_parts() -> List[Tuple[bytes, str]]:
    """FEED, labelled by hand: what ResponseTracker must find."""
    parts = [(response_head(chunked=True), "headers")]
    for row in ROWS:
        parts.append((b"%x\r\n" % len(row), "chunk_size"))
        for line in row.splitlines(keepends=True):
            parts.append((line, "heartbeat" if line == b"\n" else "json_line"))
        parts.append((b"\r\n", "chunk_crlf"))
    return parts


def row_ends_of(parts: List[Tuple[bytes, str]]) -> List[int]:
    """The offset after each row of labelled parts (a row: a json_line part ending a line)."""
    ends, offset = [], 0
    for part, region in parts:
        offset += len(part)
        if region == "json_line" and part.endswith(b"\n"):
            ends.append(offset)
    return ends


def fetch(url_port: int, timeout: float = READ_TIMEOUT_S) -> Tuple[bytes, Optional[BaseException]]:
    """Send REQUEST through the proxy; read until EOF or an error; return bytes and error."""
    received = b""
    with socket.create_connection(("127.0.0.1", url_port), timeout=timeout) as sock:
        sock.sendall(REQUEST)
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:  # socket.timeout and ConnectionResetError included
                return received, exc
            if not data:
                return received, None
            received += data


# -- the tracker --------------------------------------------------------------------------------


def spans_to_regions(spans: List[Tuple[int, int, str]]) -> List[str]:
    regions: List[str] = []
    for start, stop, region in spans:
        assert start == len(regions), spans
        regions.extend([region] * (stop - start))
    return regions


@pytest.mark.parametrize("split", ["whole", "bytewise", "random"])
def test_tracker_classifies_every_byte(split: str) -> None:
    data, expected = classify(feed_parts())
    tracker = ResponseTracker()
    if split == "whole":
        pieces = [data]
    elif split == "bytewise":
        pieces = [data[i : i + 1] for i in range(len(data))]
    else:
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(data)), 25))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    spans: List[Tuple[int, int, str]] = []
    row_ends: List[int] = []
    for piece in pieces:
        spans.extend(tracker.feed(piece))
        row_ends.extend(tracker.row_ends)
    assert spans_to_regions(spans) == expected
    assert tracker.offset == len(data)
    assert tracker.rows == 3 and row_ends == row_ends_of(feed_parts())


def test_tracker_unframed_body_and_last_chunk() -> None:
    head = response_head(chunked=False)
    tracker = ResponseTracker()
    regions = spans_to_regions(tracker.feed(head + b'{"a":1}\n\n'))
    assert regions == ["headers"] * len(head) + ["json_line"] * 8 + ["heartbeat"]
    tracker = ResponseTracker()
    head = response_head(chunked=True)
    regions = spans_to_regions(tracker.feed(head + LAST_CHUNK))
    assert regions[len(head) :] == ["chunk_size"] * 3 + ["trailer"] * 2


def test_aimed_offsets_land_strictly_inside() -> None:
    data, regions = classify(feed_parts())
    spans = ResponseTracker().feed(data)
    for region in ("headers", "chunk_size", "json_line"):
        for after in range(0, len(data), 7):
            found = find_fault_offset(Fault("cut", after, region), spans, 0, len(data), None)
            if found is None:
                continue
            offset, where = found
            assert where == region and offset >= max(after, 1)
            assert regions[offset - 1] == regions[offset] == region, (region, after, offset)


# -- the proxy, against scripted servers ----------------------------------------------------------


@pytest.mark.parametrize("plan", [Fault(), Fault("delay", delay=0.01)], ids=["none", "delay"])
def test_pass_through(plan: Fault) -> None:
    pieces = [Send(FEED[:100]), Pause(0.02), Send(FEED[100:])]
    with ScriptedServer([[Read(), *pieces, Close()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan) as proxy:
            received, error = fetch(proxy.port)
            assert (received, error) == (FEED, None)
            assert proxy.connections == 1 and proxy.connection_faults == 0
            assert proxy.faults_by_kind == ({"delay": 1} if plan.delay else {})
        assert server.requests[0].target == "/db/_changes?feed=continuous"
    assert "connections=1" in repr(proxy) and "closed" in repr(proxy)


@pytest.mark.parametrize("after", [0, 1, 60, len(FEED) - 1])
def test_cut_delivers_exactly_n_bytes_then_eof(after: int) -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("cut", after)) as proxy:
            received, error = fetch(proxy.port)
            assert error is None  # a clean FIN, not a reset
            assert received == FEED[:after]
            [record] = proxy.records
            assert (record.kind, record.offset) == ("cut", after)
            assert proxy.faults_by_kind == {"cut": 1}


def test_reset_gives_connection_reset_error() -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("reset", 40)) as proxy:
            received, error = fetch(proxy.port)
            assert isinstance(error, ConnectionResetError), error
            assert len(received) <= 40 and FEED.startswith(received)
            assert proxy.faults_by_kind == {"reset": 1}


@pytest.mark.parametrize(
    "after, where",
    [(0, "start"), (9, "headers"), (100, "json_line")],
    ids=["before-the-head", "status-line", "body"],
)
def test_stall_delivers_n_bytes_then_nothing(after: int, where: str) -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("stall", after)) as proxy:
            received, error = fetch(proxy.port, timeout=0.3)
            assert isinstance(error, socket.timeout), error
            assert received == FEED[:after]
            # The whole request went through: the server answered, the proxy swallowed it.
            assert [request.target for request in server.requests] == [
                "/db/_changes?feed=continuous"
            ]
            [record] = proxy.records
            assert (record.kind, record.offset, record.region) == ("stall", after, where)


@pytest.mark.parametrize("kind", ["stall", "cut", "reset"])
@pytest.mark.parametrize("after", [0, 20])
def test_request_fault_forwards_n_request_bytes(kind: str, after: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        target.settimeout(READ_TIMEOUT_S)
        plan = Fault(kind, after, side="request")
        port = target.getsockname()[1]
        with FaultProxy("127.0.0.1", port, seed=1, plan=plan) as proxy:
            received, error = fetch(proxy.port, timeout=0.3)
            upstream, _ = target.accept()
            with upstream:
                upstream.settimeout(0.3)
                reached = b""
                while True:  # until the proxy closes it (cut, reset) or stays silent (stall)
                    try:
                        data = upstream.recv(65536)
                    except OSError:
                        break
                    if not data:
                        break
                    reached += data
            [record] = proxy.records
    assert reached == REQUEST[:after]
    assert received == b""
    expected = {"stall": socket.timeout, "reset": ConnectionResetError}.get(kind)
    assert (error is None) if expected is None else isinstance(error, expected), error
    assert (record.kind, record.offset, record.region) == (kind, after, "request")


@pytest.mark.parametrize("splits", [(), (60,), (120,), (30, 140, 150)], ids=str)
def test_after_rows_fires_once_the_rows_went_through(splits: Tuple[int, ...]) -> None:
    """Wherever TCP splits the response, the cut comes right after the second row."""
    second_row_end = row_ends_of(feed_parts())[1]
    pieces: List[Step] = []
    for start, stop in zip((0, *splits), (*splits, len(FEED))):
        pieces += [Send(FEED[start:stop]), Pause(0.02)]
    with ScriptedServer([[Read(), *pieces, Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("cut", after_rows=2)) as proxy:
            received, error = fetch(proxy.port)
            assert (received, error) == (FEED[:second_row_end], None)
            [record] = proxy.records
            assert (record.offset, record.region, record.rows) == (second_row_end, "json_line", 2)


def test_after_rows_and_inside_aim_at_a_later_row() -> None:
    data, regions = classify(feed_parts())
    first_row_end = row_ends_of(feed_parts())[0]
    with ScriptedServer([[Read(), Send(data), Stall()]]) as server:
        plan = Fault("cut", after_rows=1, inside="json_line")
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan) as proxy:
            received, _ = fetch(proxy.port)
    cut = len(received)
    # Not inside the first row: strictly inside the next one, one byte into it.
    assert cut > first_row_end and regions[cut - 1] == regions[cut] == "json_line"
    assert regions[cut - 2] != "json_line"
    assert proxy.faults_by_region == {"json_line": 1}


@pytest.mark.parametrize(
    "fields",
    [
        {"side": "sideways"},
        {"side": "request", "inside": "headers"},
        {"side": "request", "after_rows": 1},
        {"after_rows": -1},
    ],
    ids=str,
)
def test_fault_refuses_what_it_cannot_do(fields: Dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Fault("stall", **fields)


@pytest.mark.parametrize("region", ["headers", "chunk_size", "json_line"])
def test_aimed_cut_lands_inside_the_region(region: str) -> None:
    data, regions = classify(feed_parts())
    after = 20 if region == "headers" else len(response_head(chunked=True)) + 2
    with ScriptedServer([[Read(), Send(data), Stall()]]) as server:
        plan = Fault("cut", after, inside=region)
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan) as proxy:
            received, _ = fetch(proxy.port)
            cut = len(received)
            assert cut >= after and regions[cut - 1] == regions[cut] == region
            assert proxy.faults_by_region == {region: 1}


def test_heals_after_max_faults_and_inject_now() -> None:
    scripts = [[Read(), Send(FEED), Stall()]]
    with ScriptedServer(scripts) as server:
        plan = Fault("cut", 10, delay=0.001)
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan, max_faults=2) as proxy:
            assert fetch(proxy.port)[0] == FEED[:10]
            assert fetch(proxy.port)[0] == FEED[:10]
            assert proxy.healed
            # Healed: the third connection passes through (the server then stalls).
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(REQUEST)
                received = b""
                while len(received) < len(FEED):
                    received += sock.recv(65536)
                assert received == FEED
                # The two cut connections wind down in their own threads: wait (bounded) until
                # only this one is open, so the count below is exact.
                deadline = time.monotonic() + 5
                while sum(not link.done for link in proxy._links) > 1:
                    assert time.monotonic() < deadline, "earlier connections never finished"
                    time.sleep(0.01)
                assert proxy.inject_now("cut") == 1  # an explicit fault fires even when healed
                assert sock.recv(65536) == b""
            assert proxy.faults_by_kind == {"cut": 3, "delay": 2}
            assert proxy.connection_faults == 3


def test_random_plan_is_reproducible() -> None:
    def faults(seed: int) -> List[Tuple[str, int, str]]:
        with ScriptedServer([[Read(), Send(FEED), Close()]]) as server:
            with FaultProxy("127.0.0.1", server.port, seed=seed, offsets=(0, 200)) as proxy:
                for _ in range(12):
                    fetch(proxy.port, timeout=0.1)  # a stalled one times out
                return [(record.kind, record.offset, record.region) for record in proxy.records]

    first = faults(3)
    assert first == faults(3)
    assert {kind for kind, _, _ in first} == {"cut", "reset", "stall"}
