"""One-shot feeds on large responses: ``Consumer.fetch()`` and ``wait_once()`` against json.loads.

Issue 7 asks that ``fetch()`` (feed=normal) and ``wait_once()`` (feed=longpoll) on a response of
100,000 rows hold no more than about two copies of the body in memory, and parse at least as fast
as ``json.loads`` of the whole body. A server process (``_feedserver.py --feed normal``) answers
with one pregenerated CouchDB 3 normal-feed document (``{"results":[\\n``, rows separated by
``,\\r\\n``, then ``last_seq`` and ``pending``), chunked as CouchDB buffers it (1490-byte chunks)
or one row per chunk; a longpoll that has changes pending gets the same answer at once.

Speed: the rounds go round-robin over the pipelines; the table shows medians. ``vs json.loads``
is the wall-clock median of ``json.loads(body)``, the body already in memory, divided by the
pipeline's (>= 1.00 meets the issue's goal); ``cpu`` is the same ratio in process CPU time. Rows
marked ``[gc paused]`` run with the cyclic garbage collector disabled: not the goal's terms, they
show how much of the time the collector takes.

Memory: each pipeline runs once more under ``tracemalloc``. ``peak`` is the most memory traced
during the call, ``kept`` what is still traced after it (the decoded document), and
``peak - kept`` the transient memory: the copies of the body. All three are in multiples of the
body's size. ``json.loads`` gets its body before tracing starts, so its transient is the one
``str`` copy it decodes the bytes to. ``--breakdown`` shows which lines allocated what was alive
when the decoding of the whole body started; ``--profile`` a cProfile of one ``fetch()``.

    python benchmarks/bench_fetch.py [--rows N] [--rounds R] [--include-docs] [--compare DIR]
        [--breakdown] [--profile]
"""

import argparse
import cProfile
import gc
import http.client
import io
import json
import json.decoder
import os
import pstats
import shlex
import socket
import statistics
import sys
import time
import tracemalloc
import types
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_throughput import FeedServer, load_package_copy, machine, source_revision  # noqa: E402

import changeloop  # noqa: E402  (bench_throughput put the source tree first on sys.path)
from changeloop._events import Data, EndOfMessage, Response  # noqa: E402
from changeloop._http import ResponseParser  # noqa: E402

#: The database whose normal feed is chunked as CouchDB chunks it, and the one row per chunk.
DB = "db"
DB_ROW_CHUNKS = "db-rowchunks"
#: Bytes per ``recv`` of the hand-written pipelines: the blocking client's own.
RECV_BYTES = 256 * 1024
#: Allocations smaller than this are left out of the breakdown.
BREAKDOWN_MIN_BYTES = 256 * 1024

Document = Dict[str, Any]


class Target(NamedTuple):
    host: str
    port: int
    rows: int
    include_docs: bool

    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def path(self, db: str) -> str:
        docs = "&include_docs=true" if self.include_docs else ""
        return "/%s/_changes?feed=normal&since=0%s" % (db, docs)


# -- pipelines ------------------------------------------------------------------------------------


#: The ``Server`` objects the pipelines made, closed at the end.
SERVERS: List[Any] = []


def changeloop_one_shot(
    target: Target, package: types.ModuleType, db: str, feed: str
) -> Callable[[], Document]:
    """``fetch()`` or ``wait_once()`` on a kept-alive connection of one ``Server``."""
    server = package.Server(target.url())
    SERVERS.append(server)
    consumer = package.Consumer(server.get_db(db))
    params: Dict[str, Any] = {"include_docs": True} if target.include_docs else {}
    if feed == "normal":
        return lambda: consumer.fetch(since=0, **params)
    return lambda: consumer.wait_once(since=0, **params)


def changeloop_raw(target: Target, package: types.ModuleType) -> Callable[[], Document]:
    """The HTTP part of ``fetch()`` alone: ``raw_request`` returns the body bytes, undecoded."""
    server = package.Server(target.url())
    SERVERS.append(server)
    path = target.path(DB)

    def run() -> Document:
        _, _, body = server.raw_request("GET", path)
        return {"body": body}

    return run


def http_client_read(target: Target) -> Document:
    """The stdlib's obvious way: http.client (which removes the chunking), read(), json.loads."""
    document: Document = json.loads(fetch_body(target))
    return document


class BlockDecoder:
    """A prototype: decode a CouchDB normal-feed body block by block, as it arrives.

    Relies on what CouchDB writes: ``{"results":[``, then rows that hold no raw newline (JSON
    escapes control characters and CouchDB writes no whitespace inside a row) separated by
    ``,\\r\\n``, then ``\\n],`` and the rest of the object. Each received run of complete rows is
    decoded by one ``json.loads`` of ``[`` + rows + ``]``, so the body is never held whole, and
    keys are shared within a block (``json.loads`` shares them across a whole document). A body
    that does not start that way is kept and decoded whole at the end.
    """

    def __init__(self) -> None:
        self.rows: List[Any] = []
        self._tail = b""  # from the last newline on: an incomplete row, or the "\n]" to come
        self._state = "head"  # then "rows", "end", or "whole" (the fallback)
        self._end: List[str] = []  # the document from the "]" closing results on
        self._whole: List[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._state == "whole":
            self._whole.append(data)
            return
        block = self._tail + data if self._tail else data
        last = block.rfind(b"\n")
        if last < 0:
            self._tail = block
            return
        self._tail = block[last:]  # the newline stays with what follows: "\n]" is never split
        text = block[:last].decode("utf-8")
        pos = 0
        if self._state == "head":
            start = text.lstrip()
            if not start.startswith('{"results":['):
                self._state = "whole"
                self._whole.append(block)
                self._tail = b""
                return
            pos = len(text) - len(start) + len('{"results":[')
            self._state = "rows"
        if self._state == "rows":
            end = text.find("\n]", pos)
            part = text[pos:] if end < 0 else text[pos:end]
            part = part.strip()
            if part.startswith(","):
                part = part[1:]
            if part.endswith(","):
                part = part[:-1]
            if part.strip():
                self.rows.extend(json.loads("[" + part + "]"))
            if end < 0:
                return
            self._state = "end"
            pos = end + 1
        self._end.append(text[pos:])

    def close(self) -> Document:
        if self._state == "whole":
            document: Document = json.loads(b"".join(self._whole) + self._tail)
            return document
        if self._state != "end":
            raise ValueError("the body ended inside the results")
        document = json.loads('{"results":[' + "".join(self._end) + self._tail.decode("utf-8"))
        document["results"] = self.rows
        return document


def block_decoded(target: Target) -> Document:
    """The prototype: changeloop's ResponseParser over a socket, rows decoded per receive."""
    sock = socket.create_connection((target.host, target.port))
    try:
        sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: application/json\r\n\r\n"
            % (target.path(DB).encode("ascii"), target.host.encode("ascii"), target.port)
        )
        parser = ResponseParser()
        decoder = BlockDecoder()
        while True:
            event = parser.next_event()
            kind = type(event)
            if kind is Data:
                decoder.feed(event.data)  # type: ignore[union-attr]
            elif kind is EndOfMessage:
                return decoder.close()
            elif kind is Response:
                if event.status_code != 200:  # type: ignore[union-attr]
                    raise RuntimeError("status %d" % event.status_code)  # type: ignore
            else:  # NEED_DATA
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise RuntimeError("the server closed the connection mid-response")
                parser.receive_data(data)
    finally:
        sock.close()


def gc_paused(run: Callable[[], Document]) -> Callable[[], Document]:
    """``run`` with the cyclic garbage collector paused, as a decoder could pause it.

    Decoding JSON makes a tree, never a cycle, so pausing the collector while it runs leaves no
    garbage behind; yet with the collector on, every collection of the older generations walks
    all the rows decoded so far, and on a large document that is most of ``json.loads``'s time.
    """

    def paused() -> Document:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return run()
        finally:
            if enabled:
                gc.enable()

    return paused


# -- measuring ------------------------------------------------------------------------------------


class Pipeline(NamedTuple):
    key: str
    name: str
    run: Callable[[], Document]


def check(document: Document, expected: Document, rows: int) -> Optional[str]:
    """Say what is wrong with a pipeline's answer, if anything."""
    if "body" in document:  # raw_request: the undecoded body
        return None if len(document["body"]) == expected["body_bytes"] else "wrong body size"
    results = document.get("results")
    if not isinstance(results, list) or len(results) != rows:
        return "wrong count: %r rows, not %d" % (len(results or ()), rows)
    if document.get("last_seq") != expected["last_seq"] or results[-1] != expected["last_row"]:
        return "a different document"
    return None


def time_rounds(
    pipelines: List[Pipeline], rounds: int, expected: Document, rows: int
) -> Tuple[Dict[str, List[float]], Dict[str, List[float]], Dict[str, str]]:
    times: Dict[str, List[float]] = {p.key: [] for p in pipelines}
    cpu: Dict[str, List[float]] = {p.key: [] for p in pipelines}
    problems: Dict[str, str] = {}
    for _ in range(rounds):
        for pipeline in pipelines:  # round-robin, so drift affects every pipeline alike
            if pipeline.key in problems:
                continue
            gc.collect()  # start each with the garbage of the one before collected
            start = time.perf_counter()
            start_cpu = time.process_time()
            try:
                document = pipeline.run()
            except Exception as exc:  # report it in the table, measure the others
                problems[pipeline.key] = "failed: %r" % (exc,)
                continue
            elapsed = time.perf_counter() - start
            used = time.process_time() - start_cpu
            problem = check(document, expected, rows)
            del document
            if problem:
                problems[pipeline.key] = problem
                continue
            times[pipeline.key].append(elapsed)
            cpu[pipeline.key].append(used)
    return times, cpu, problems


def trace_memory(run: Callable[[], Document]) -> Tuple[int, int]:
    """Run once under tracemalloc; return (peak, kept) bytes above what was traced before."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        document = run()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del document
    return peak - before, current - before


def print_tables(
    pipelines: List[Pipeline],
    times: Dict[str, List[float]],
    cpu: Dict[str, List[float]],
    problems: Dict[str, str],
    memory: Dict[str, Tuple[int, int]],
    body_bytes: int,
) -> None:
    base = statistics.median(times["json.loads"])
    base_cpu = statistics.median(cpu["json.loads"])
    print()
    print(
        "%-44s %8s %8s %9s %6s %6s %7s %7s %7s"
        % ("pipeline (medians)", "ms", "MB/s", "vs loads", "cpu", "spread",
           "peak", "kept", "p-kept")
    )  # fmt: skip
    for pipeline in pipelines:
        key = pipeline.key
        if key in problems:
            print("%-44s %s" % (pipeline.name, problems[key]))
            continue
        median = statistics.median(times[key])
        spread = (max(times[key]) - min(times[key])) / median
        peak, kept = memory.get(key, (0, 0))
        print(
            "%-44s %8.1f %8.1f %8.2fx %5.2fx %5.0f%% %6.2fx %6.2fx %6.2fx"
            % (
                pipeline.name,
                1000 * median,
                body_bytes / median / 1e6,
                base / median,
                base_cpu / statistics.median(cpu[key]),
                100 * spread,
                peak / body_bytes,
                kept / body_bytes,
                (peak - kept) / body_bytes,
            )
        )
    print(
        "vs loads: json.loads(body)'s wall-clock median / the pipeline's (>= 1.00: as fast);"
        " cpu: the same in process CPU time; spread: (slowest - fastest) / median;"
        " peak, kept, p-kept (peak - kept): traced memory in bodies (%d bytes)" % body_bytes
    )


# -- where the copies come from -----------------------------------------------------------------


class _SnapshotDecoder(json.JSONDecoder):
    """json's default decoder, taking a tracemalloc snapshot as the decoding of a body starts."""

    snapshots: List[tracemalloc.Snapshot] = []

    def decode(self, s: str, *args: Any, **kwargs: Any) -> Any:
        if len(s) > BREAKDOWN_MIN_BYTES:
            self.snapshots.append(tracemalloc.take_snapshot())
        return super().decode(s, *args, **kwargs)


def print_breakdown(name: str, run: Callable[[], Document], body_bytes: int) -> None:
    """Show the allocations alive when ``json.loads`` starts on the whole body, by line.

    ``json.loads`` uses ``json._default_decoder`` when called without options (as
    ``changeloop._feed.decode_document`` calls it); a subclass put in its place snapshots the
    traced memory on entry. Its traceback of each large allocation names the changeloop line
    that made it.
    """
    saved = json._default_decoder  # type: ignore[attr-defined]
    _SnapshotDecoder.snapshots = []
    json._default_decoder = _SnapshotDecoder()  # type: ignore[attr-defined]
    gc.collect()
    tracemalloc.start(30)
    try:
        document = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        json._default_decoder = saved  # type: ignore[attr-defined]
    del document
    print("\n%s: memory alive as json.loads starts on the whole body (peak %.2f bodies)"
          % (name, peak / body_bytes))  # fmt: skip
    if not _SnapshotDecoder.snapshots:
        print("  (json.loads was never called on a whole body)")
        return
    snapshot = _SnapshotDecoder.snapshots[0]
    total = 0
    for stat in snapshot.statistics("traceback"):
        if stat.size < BREAKDOWN_MIN_BYTES:
            continue
        total += stat.size
        frames = [f for f in stat.traceback if "bench_fetch" not in f.filename]
        where = " <- ".join("%s:%d" % (_short(f.filename), f.lineno) for f in reversed(frames[-4:]))
        print("  %6.2f bodies  %s" % (stat.size / body_bytes, where))
    print("  %6.2f bodies in all (allocations of %d KiB or more)"
          % (total / body_bytes, BREAKDOWN_MIN_BYTES // 1024))  # fmt: skip


def _short(filename: str) -> str:
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("changeloop", "changeloop_compare", "json"):
        if anchor in parts[:-1]:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return parts[-1]


def print_profile(run: Callable[[], Document]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print("\nprofile of one fetch() (CouchDB chunking), top 15 by tottime:")
    print(out.getvalue().rstrip())


# -- main -----------------------------------------------------------------------------------------


def build_pipelines(
    target: Target, body: bytes, compare: Optional[types.ModuleType]
) -> List[Pipeline]:
    pipelines = [
        Pipeline("json.loads", "json.loads(body), body in memory", lambda: json.loads(body)),
        Pipeline("fetch", "changeloop fetch(), CouchDB chunks",
                 changeloop_one_shot(target, changeloop, DB, "normal")),
        Pipeline("fetch-rowchunks", "changeloop fetch(), one row per chunk",
                 changeloop_one_shot(target, changeloop, DB_ROW_CHUNKS, "normal")),
        Pipeline("wait_once", "changeloop wait_once(), CouchDB chunks",
                 changeloop_one_shot(target, changeloop, DB, "longpoll")),
        Pipeline("raw", "changeloop raw_request only (no JSON)", changeloop_raw(
            target, changeloop)),
    ]  # fmt: skip
    if compare is not None:
        pipelines += [
            Pipeline("compare-fetch", "compared copy: fetch(), CouchDB chunks",
                     changeloop_one_shot(target, compare, DB, "normal")),
            Pipeline("compare-wait_once", "compared copy: wait_once()",
                     changeloop_one_shot(target, compare, DB, "longpoll")),
        ]  # fmt: skip
    pipelines += [
        Pipeline("http.client", "http.client read() + json.loads", lambda: http_client_read(
            target)),
        Pipeline("blocks", "prototype: rows decoded per receive", lambda: block_decoded(target)),
        # Not the goal's terms: what pausing the collector during decoding would give.
        Pipeline("loads-nogc", "[gc paused] json.loads(body)", gc_paused(lambda: json.loads(
            body))),
        Pipeline("fetch-nogc", "[gc paused] changeloop fetch()", gc_paused(
            changeloop_one_shot(target, changeloop, DB, "normal"))),
        Pipeline("blocks-nogc", "[gc paused] prototype", gc_paused(lambda: block_decoded(
            target))),
    ]  # fmt: skip
    return pipelines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the body (100,000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--include-docs", action="store_true", help="rows carry ~1 KB documents")
    parser.add_argument("--only", default="", help="comma-separated pipeline keys to run")
    parser.add_argument("--compare", metavar="DIR", help="also measure DIR/changeloop")
    parser.add_argument("--breakdown", action="store_true", help="who allocated the copies")
    parser.add_argument("--profile", action="store_true", help="cProfile one fetch()")
    args = parser.parse_args()

    print("command: %s" % " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print("machine: %s" % machine())
    print("changeloop: %s" % source_revision(changeloop))
    compare = load_package_copy(args.compare) if args.compare else None
    if compare is not None:
        print("compared with: %s" % source_revision(compare))

    server = FeedServer(args.rows, args.include_docs, None, feed="normal")
    try:
        target = Target("127.0.0.1", server.port, args.rows, args.include_docs)
        body = fetch_body(target)
        reference = json.loads(body)
        expected = {
            "last_seq": reference["last_seq"],
            "last_row": reference["results"][-1],
            "body_bytes": len(body),
        }
        del reference
        print(
            "body: %d rows of %d bytes%s, %.1f MB (%.1f MB on the wire with CouchDB's chunks);"
            " %d rounds"
            % (
                args.rows,
                server.row_bytes,
                " (include_docs)" if args.include_docs else "",
                len(body) / 1e6,
                server.stream_bytes / 1e6,
                args.rounds,
            )
        )
        pipelines = build_pipelines(target, body, compare)
        if args.only:
            keys = set(args.only.split(",")) | {"json.loads"}
            pipelines = [p for p in pipelines if p.key in keys]
        times, cpu, problems = time_rounds(pipelines, args.rounds, expected, args.rows)
        memory = {p.key: trace_memory(p.run) for p in pipelines if p.key not in problems}
        print_tables(pipelines, times, cpu, problems, memory, len(body))
        if args.breakdown:
            by_key = {p.key: p for p in pipelines}
            for key in ("json.loads", "fetch", "wait_once", "compare-fetch"):
                if key in by_key and key not in problems:
                    print_breakdown(by_key[key].name, by_key[key].run, len(body))
        if args.profile:
            print_profile(changeloop_one_shot(target, changeloop, DB, "normal"))
    finally:
        for client in SERVERS:
            client.close()
        server.close()
    return 0


def fetch_body(target: Target) -> bytes:
    """The de-chunked body, read with http.client: the bytes json.loads is measured on."""
    conn = http.client.HTTPConnection(target.host, target.port)
    try:
        conn.request("GET", target.path(DB), headers={"Accept": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError("status %d" % response.status)
        return response.read()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
