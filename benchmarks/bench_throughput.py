"""Throughput benchmark: catching up on a long continuous feed, end to end over loopback.

A server subprocess (``_feedserver.py``) streams one pregenerated CouchDB 3 continuous feed: N
rows of 184 bytes (about 1 KB with ``--include-docs``), one row per chunk as CouchDB sends them,
then the ``last_seq`` line. Each pipeline below reads the whole feed over a fresh connection and
decodes every row to a dict; the rounds go round-robin over the pipelines, and the table shows
the median of each. The baseline, (b), is the obvious correct pure-Python pipeline: a raw socket,
the chunk framing removed with ``bytes.find`` and offsets, lines split on ``b"\\n"`` and
``json.loads`` per non-empty line. The changeloop rows are its continuous ``Consumer`` end to end
(socket, HTTP parser, feed decoder, loop, and a callback per change that does nothing), also in
batch mode (``batch_size=1000``, a callback per list that counts it), with the feed decoder's
plain fallback forced, over TLS, and through a real HTTP proxy (tinyproxy, if installed:
``tests/proxyserver.py``), plain and through its CONNECT with TLS. Other clients are measured
when importable, and a tuned pure-stdlib pipeline gives a reference ceiling.
``benchmarks/bench_fetch.py`` measures the one-shot ``fetch()``/``wait_once()`` on large bodies.

    python benchmarks/bench_throughput.py [--quick | --rows N] [--rounds R] [--include-docs]
        [--only NAME,...] [--compare DIR] [--profile] [--no-c-json]

``--no-c-json`` blocks the json module's C accelerator for the whole run, as on an interpreter
without one: every pipeline then decodes with the pure-Python json code. ``--compare DIR`` also
measures the changeloop package found in DIR (say a patched copy in /tmp/exp/changeloop),
loaded under another name, side by side with this tree's.
"""

import sys

if "--no-c-json" in sys.argv:
    # Before anything imports json: the json module then runs without its C accelerator, as on
    # an interpreter that has none, and changeloop's feed decoder takes its plain path.
    sys.modules["_json"] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import http.client  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import json.scanner  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from itertools import repeat  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import changeloop  # noqa: E402

#: Bytes asked of each ``recv`` by the hand-written pipelines: the blocking client's RECV_BYTES
#: (the loop's feeds ask for less on CPython; see changeloop/_stream.py).
RECV_BYTES = 256 * 1024
#: How long the server may take to pregenerate its stream and start listening.
SERVER_START_TIMEOUT_S = 120.0

DB = "db"


class Target(NamedTuple):
    host: str
    port: int
    tls_port: Optional[int]
    cafile: Optional[str]
    rows: int
    include_docs: bool
    proxy: Optional[str] = None  # a tinyproxy's URL, for the proxied rows

    def path(self) -> str:
        docs = "&include_docs=true" if self.include_docs else ""
        return "/%s/_changes?feed=continuous&since=0&limit=%d%s" % (DB, self.rows, docs)

    def base_url(self, tls: bool = False) -> str:
        if tls:
            assert self.tls_port is not None
            return "https://%s:%d" % (self.host, self.tls_port)
        return "http://%s:%d" % (self.host, self.port)


# -- the server ---------------------------------------------------------------------------------


class FeedServer:
    """The ``_feedserver.py`` subprocess: started with the stream size, stopped on exit."""

    def __init__(
        self, rows: int, include_docs: bool, tls_pem: Optional[str], feed: str = "continuous"
    ) -> None:
        command = [sys.executable, os.path.join(HERE, "_feedserver.py"), "--rows", str(rows)]
        command += ["--feed", feed]
        if include_docs:
            command.append("--include-docs")
        if tls_pem:
            command += ["--tls", tls_pem]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = 0
        self.tls_port: Optional[int] = None
        self.stream_bytes = 0
        self.row_bytes = 0
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        assert self.process.stdout is not None
        for line in self.process.stdout:
            words = line.split()
            if words[0] == "plain":
                self.port = int(words[1])
            elif words[0] == "tls":
                self.tls_port = int(words[1])
            elif words[0] == "stream":
                self.stream_bytes, self.row_bytes = int(words[1]), int(words[2])
            elif words[0] == "ready":
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.close()
            raise RuntimeError("the feed server did not start")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the server serves until its stdin closes
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def make_certificates(directory: str) -> Optional[Tuple[str, str]]:
    """Write a trustme CA and a 127.0.0.1 server certificate; return (server pem, ca pem)."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    server_pem = os.path.join(directory, "server.pem")
    ca_pem = os.path.join(directory, "ca.pem")
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(server_pem)
    ca.cert_pem.write_to_path(ca_pem)
    return server_pem, ca_pem


# -- hand-written pipelines: (b), the tuned ceiling, and a raw read ------------------------------


def _connect(target: Target, tls: bool = False) -> socket.socket:
    port = target.tls_port if tls else target.port
    assert port is not None
    sock = socket.create_connection((target.host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        context = ssl.create_default_context(cafile=target.cafile)
        sock = context.wrap_socket(sock, server_hostname=target.host)
    return sock


def _request(target: Target) -> bytes:
    return (
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: application/json\r\n\r\n"
        % (target.path(), target.host, target.port)
    ).encode("ascii")


def _read_head(sock: socket.socket) -> bytes:
    """Read the response head of a chunked 200 and return the body bytes received after it."""
    buf = b""
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            raise RuntimeError("the server closed the connection in the response head")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
    head = buf[:end].lower()
    if not head.startswith(b"http/1.1 200 ") or b"transfer-encoding: chunked" not in head:
        raise RuntimeError("expected a chunked 200 response: %r" % buf[:end])
    return buf[end + 4 :]


def _dechunk(buf: bytes) -> Tuple[List[bytes], int, bool]:
    """Remove the framing of the complete chunks at the start of ``buf``, chunk by chunk.

    Returns the chunks' data, the bytes consumed, and whether the last (zero-size) chunk came.
    """
    parts: List[bytes] = []
    pos = 0
    find = buf.find
    while True:
        eol = find(b"\r\n", pos)
        if eol < 0:
            return parts, pos, False
        size = int(buf[pos:eol], 16)
        if size == 0:
            return parts, eol + 2, True
        start = eol + 2
        stop = start + size
        if stop + 2 > len(buf):
            return parts, pos, False
        if buf[stop : stop + 2] != b"\r\n":
            raise RuntimeError("chunk data not followed by CRLF at byte %d" % stop)
        parts.append(buf[start:stop])
        pos = stop + 2


def pipeline_obvious(target: Target, tls: bool = False) -> int:
    """(b): raw socket, chunks removed with find/offsets, split(b"\\n"), json.loads per line."""
    sock = _connect(target, tls)
    try:
        sock.sendall(_request(target))
        buf = _read_head(sock)
        tail = b""
        rows = 0
        while True:
            parts, used, ended = _dechunk(buf)
            buf = buf[used:]
            if parts:
                lines = (tail + b"".join(parts)).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    if line.strip():  # an empty line is a heartbeat
                        row = json.loads(line)
                        if "last_seq" in row:
                            ended = True
                        else:
                            rows += 1
            if ended:
                return rows
            data = sock.recv(RECV_BYTES)
            if not data:
                raise RuntimeError("the feed was cut")
            buf += data
    finally:
        sock.close()


def _dechunk_bulk(buf: bytes) -> Tuple[List[bytes], int, bool]:
    """:func:`_dechunk` in bulk: one ``split(b"\\r\\n")``, sizes checked against the lengths.

    Falls back to the chunk-by-chunk loop when a chunk's data holds a CRLF (JSON whitespace, or a
    proxy that re-chunked) or a size line is not plain hex.
    """
    parts = buf.split(b"\r\n")
    pairs = (len(parts) - 1) // 2  # (size, data) pairs followed by a CRLF: complete chunks
    sizes = parts[0 : 2 * pairs : 2]
    datas = parts[1 : 2 * pairs : 2]
    try:
        lengths = list(map(int, sizes, repeat(16)))
    except ValueError:
        return _dechunk(buf)
    if lengths != list(map(len, datas)):
        return _dechunk(buf)
    if 0 in lengths:
        last = lengths.index(0)
        return datas[:last], 0, True
    return datas, sum(map(len, sizes)) + sum(lengths) + 4 * pairs, False


def pipeline_tuned(target: Target) -> int:
    """The reference ceiling: framing removed in bulk, one str per buffer, rows scanned in place."""
    scan = json.scanner.c_make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]
    sock = _connect(target)
    try:
        sock.sendall(_request(target))
        buf = _read_head(sock)
        tail = b""
        rows = 0
        while True:
            parts, used, ended = _dechunk_bulk(buf)
            buf = buf[used:]
            block = tail + b"".join(parts) if tail else b"".join(parts)
            last = block.rfind(b"\n")
            tail = block[last + 1 :]
            text = block[: last + 1].decode("utf-8")
            pos = 0
            end = len(text)
            while pos < end:
                if text[pos] == "\n":
                    pos += 1  # a heartbeat
                    continue
                try:
                    row, stop = scan(text, pos)
                except StopIteration:
                    stop = -1
                if stop < 0 or text[stop] != "\n":  # leading or trailing blanks, or an error
                    stop = text.index("\n", pos)
                    line = text[pos:stop].strip()
                    row = json.loads(line) if line else {}
                pos = stop + 1
                if "last_seq" in row:
                    ended = True
                elif row:
                    rows += 1
            if ended:
                return rows
            data = sock.recv(RECV_BYTES)
            if not data:
                raise RuntimeError("the feed was cut")
            buf += data
    finally:
        sock.close()


def pipeline_raw(target: Target, stream_bytes: int) -> int:
    """Server check: receive the whole response with recv_into, parse nothing."""
    sock = _connect(target)
    try:
        sock.sendall(_request(target))
        buf = bytearray(1024 * 1024)
        total = 0
        while total < stream_bytes:
            got = sock.recv_into(buf)
            if not got:
                raise RuntimeError("the server closed after %d bytes" % total)
            total += got
        return target.rows
    finally:
        sock.close()


# -- changeloop -----------------------------------------------------------------------------------


def load_package_copy(directory: str) -> types.ModuleType:
    """Import the changeloop package in ``directory`` as ``changeloop_compare``.

    Every import inside changeloop is relative, so a copy loads under another name beside the
    one under test.
    """
    init = os.path.join(directory, "changeloop", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "changeloop_compare", init, submodule_search_locations=[os.path.dirname(init)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def plain_decoder(package: types.ModuleType) -> Iterator[None]:
    """Force the feed decoder's plain ``json.loads`` path, as where ``_json`` has no C scanner.

    ``FeedStream`` offers no switch (it builds ``LineDecoder(max_line_bytes)``), so what the
    decoder takes its scanner from is made to find none: the ``_feed._c_scanner`` probe, and the
    module-wide ``_feed._SHARED_SCANNER`` where there is one.
    """
    feed = package._feed
    saved = {name: getattr(feed, name) for name in ("_c_scanner", "_SHARED_SCANNER")
             if hasattr(feed, name)}  # fmt: skip
    feed._c_scanner = lambda: None
    if "_SHARED_SCANNER" in saved:
        feed._SHARED_SCANNER = None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(feed, name, value)


#: The batch size of the batch-mode pipeline: a typical bulk write (``_bulk_docs``) size.
BATCH_SIZE = 1000


def pipeline_changeloop(
    target: Target,
    package: types.ModuleType = changeloop,
    tls: bool = False,
    fast: bool = True,
    batch_size: Optional[int] = None,
    proxy: Optional[str] = None,
) -> int:
    """changeloop's continuous Consumer, stopping at ``limit`` rows; a do-nothing callback.

    With ``batch_size``, the consumer delivers lists and the callback counts their lengths; the
    count must agree with the consumer's own.
    """
    batched = [0]

    def callback(change: Dict[str, Any]) -> None:
        pass

    def batch_callback(changes: List[Dict[str, Any]]) -> None:
        batched[0] += len(changes)

    params: Dict[str, Any] = {"limit": target.rows}
    if target.include_docs:
        params["include_docs"] = True
    with contextlib.ExitStack() as stack:
        if not fast:
            stack.enter_context(plain_decoder(package))
        cafile = target.cafile if tls else None
        if proxy is None:
            server = package.Server(target.base_url(tls), cafile=cafile)
        else:
            server = package.Server(target.base_url(tls), cafile=cafile, proxy=proxy)
        stack.callback(server.close)
        loop = stack.enter_context(package.Loop())
        if batch_size is None:
            consumer = package.Consumer(server.get_db(DB), loop)
            consumer.start(callback, since=0, **params)
        else:
            consumer = package.Consumer(server.get_db(DB), loop, batch_size=batch_size)
            consumer.start(batch_callback, since=0, **params)
        loop.run()
    if consumer.error is not None:
        raise consumer.error
    delivered: int = consumer.delivered
    if batch_size is not None and batched[0] != delivered:
        raise RuntimeError("the batches held %d changes, not %d" % (batched[0], delivered))
    return delivered


# -- other clients ----------------------------------------------------------------------------


def _lines_to_rows(tail: bytes, parts: List[Any]) -> Tuple[bytes, int, bool]:
    """Split de-chunked body parts into lines and json.loads each, as (b) does."""
    lines = (tail + b"".join(parts)).split(b"\n")
    tail = lines.pop()
    rows = 0
    ended = False
    for line in lines:
        if line.strip():
            row = json.loads(line)
            if "last_seq" in row:
                ended = True
            else:
                rows += 1
    return tail, rows, ended


def pipeline_h11(target: Target) -> int:
    import h11

    conn = h11.Connection(our_role=h11.CLIENT)
    host = "%s:%d" % (target.host, target.port)
    request = h11.Request(method="GET", target=target.path(), headers=[("Host", host)])
    sock = _connect(target)
    try:
        sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
        parts: List[bytes] = []
        tail = b""
        rows = 0
        while True:
            event = conn.next_event()
            kind = type(event)
            if kind is h11.Data:
                parts.append(event.data)
            elif event is h11.NEED_DATA:
                if parts:
                    tail, got, _ = _lines_to_rows(tail, parts)
                    rows += got
                    parts = []
                conn.receive_data(sock.recv(RECV_BYTES))
            elif kind is h11.Response:
                if event.status_code != 200:
                    raise RuntimeError("status %d" % event.status_code)
            elif kind is h11.EndOfMessage:
                return rows + _lines_to_rows(tail, parts)[1]
            else:
                raise RuntimeError("unexpected %r" % (event,))
    finally:
        sock.close()


def pipeline_httptools(target: Target) -> int:
    import httptools

    class Protocol:
        def __init__(self) -> None:
            self.parts: List[bytes] = []
            self.done = False

        def on_body(self, body: bytes) -> None:
            self.parts.append(body)

        def on_message_complete(self) -> None:
            self.done = True

    protocol = Protocol()
    parser = httptools.HttpResponseParser(protocol)
    sock = _connect(target)
    try:
        sock.sendall(_request(target))
        tail = b""
        rows = 0
        while not protocol.done:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise RuntimeError("the feed was cut")
            parser.feed_data(data)
            if protocol.parts:
                tail, got, _ = _lines_to_rows(tail, protocol.parts)
                rows += got
                protocol.parts = []
        if parser.get_status_code() != 200:
            raise RuntimeError("status %d" % parser.get_status_code())
        return rows
    finally:
        sock.close()


def pipeline_http_client(target: Target) -> int:
    conn = http.client.HTTPConnection(target.host, target.port)
    try:
        conn.request("GET", target.path(), headers={"Accept": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError("status %d" % response.status)
        rows = 0
        for line in iter(response.readline, b""):  # http.client removes the chunk framing
            if line.strip():
                row = json.loads(line)
                if "last_seq" not in row:
                    rows += 1
        return rows
    finally:
        conn.close()


def pipeline_requests(target: Target) -> int:
    import requests

    with requests.Session() as session:
        response = session.get(target.base_url() + target.path(), stream=True)
        response.raise_for_status()
        rows = 0
        for line in response.iter_lines():  # the default chunk_size (512), as usually written
            if line:
                row = json.loads(line)
                if "last_seq" not in row:
                    rows += 1
        response.close()
        return rows


def pipeline_couchdb(target: Target) -> int:
    import couchdb

    db = couchdb.Database(target.base_url() + "/" + DB)
    params: Dict[str, Any] = {"feed": "continuous", "since": 0, "limit": target.rows}
    if target.include_docs:
        params["include_docs"] = True
    rows = 0
    for row in db.changes(**params):
        if "last_seq" not in row:
            rows += 1
    return rows


def pipeline_cloudant(target: Target) -> int:
    from cloudant.client import CouchDB
    from cloudant.database import CouchDatabase

    client = CouchDB(None, None, url=target.base_url(), admin_party=True, connect=True)
    try:
        db = CouchDatabase(client, DB)
        params: Dict[str, Any] = {"feed": "continuous", "since": 0, "limit": target.rows}
        if target.include_docs:
            params["include_docs"] = True
        rows = 0
        for _ in db.changes(**params):  # the Feed skips the last_seq line itself
            rows += 1
        return rows
    finally:
        client.disconnect()


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# -- measuring ------------------------------------------------------------------------------------


class Pipeline(NamedTuple):
    key: str
    name: str
    run: Optional[Callable[[], int]]  # None: skipped, for the reason in `note`
    note: str = ""


def source_revision(package: types.ModuleType) -> str:
    """The git commit of the tree ``package`` was imported from, and whether it is modified."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package.__file__ or "")))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "changeloop"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "%s (not a git checkout)" % os.path.dirname(package.__file__ or "")
    return "%s at %s%s" % (
        os.path.dirname(package.__file__ or ""),
        commit,
        " (modified)" if changed else "",
    )


def machine() -> str:
    return "%d cores, %s %s, %s" % (
        os.cpu_count() or 0,
        platform.python_implementation(),
        platform.python_version(),
        platform.platform(),
    )


def print_profile(run: Callable[[], int]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    rows = run()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    print("\nprofile of the changeloop consumer (%d rows), top 25 by tottime:" % rows)
    print(out.getvalue().rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="rows in the feed (1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--include-docs", action="store_true", help="rows carry ~1 KB documents")
    parser.add_argument("--only", default="", help="comma-separated pipeline keys to run")
    parser.add_argument("--compare", metavar="DIR", help="also measure DIR/changeloop")
    parser.add_argument("--profile", action="store_true", help="cProfile the consumer once")
    parser.add_argument("--no-c-json", action="store_true", help="json without its C code")
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)

    print("command: %s" % " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print("machine: %s" % machine())
    print("changeloop: %s" % source_revision(changeloop))
    compare = load_package_copy(args.compare) if args.compare else None
    if compare is not None:
        print("compared with: %s" % source_revision(compare))

    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        pems = make_certificates(directory)
        server = FeedServer(rows, args.include_docs, pems[0] if pems else None)
        proxy = start_proxy(server, stack)
        try:
            target = Target(
                "127.0.0.1", server.port, server.tls_port, pems[1] if pems else None,
                rows, args.include_docs, proxy,
            )  # fmt: skip
            print(
                "feed: %d rows of %d bytes%s, one row per chunk; %.1f MB on the wire; %d rounds"
                % (
                    rows,
                    server.row_bytes,
                    " (include_docs)" if args.include_docs else "",
                    server.stream_bytes / 1e6,
                    args.rounds,
                )
            )
            pipelines = build_pipelines(target, server.stream_bytes, compare)
            if args.only:
                keys = set(args.only.split(",")) | {"b"}
                pipelines = [p for p in pipelines if p.key in keys]
            measure(pipelines, rows, server.stream_bytes, args.rounds)
            if args.profile:
                print_profile(lambda: pipeline_changeloop(target))
        finally:
            server.close()
    return 0


def start_proxy(server: FeedServer, stack: contextlib.ExitStack) -> Optional[str]:
    """A tinyproxy for the proxied rows, if one is installed (never installed from here)."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    try:
        import proxyserver
    except ImportError:
        return None
    if proxyserver.find_tinyproxy() is None:
        return None
    ports = [server.tls_port] if server.tls_port is not None else []
    proxy = stack.enter_context(proxyserver.start_tinyproxy(connect_ports=ports))
    print("proxy: %s" % proxy.url)
    return str(proxy.url)


def build_pipelines(
    target: Target, stream_bytes: int, compare: Optional[types.ModuleType]
) -> List[Pipeline]:
    def peer(key: str, name: str, module: str, fn: Callable[[Target], int]) -> Pipeline:
        if not importable(module):
            return Pipeline(key, name, None, "skipped (not installed)")
        return Pipeline(key, name, lambda: fn(target))

    no_tls = "skipped (trustme not installed)"
    no_proxy = "skipped (tinyproxy not installed: apt-get install tinyproxy)"
    tls = target.tls_port is not None
    pipelines = [
        Pipeline("raw", "server check: recv_into, no parsing", lambda: pipeline_raw(
            target, stream_bytes)),
        Pipeline("b", "(b) find/offsets + split + json.loads", lambda: pipeline_obvious(target)),
        Pipeline("changeloop", "changeloop Consumer", lambda: pipeline_changeloop(target)),
        Pipeline(
            "changeloop-batch",
            "changeloop Consumer, batch_size=%d" % BATCH_SIZE,
            lambda: pipeline_changeloop(target, batch_size=BATCH_SIZE),
        ),
        Pipeline(
            "changeloop-plain",
            "changeloop Consumer, plain decoder",
            lambda: pipeline_changeloop(target, fast=False),
        ),
        Pipeline(
            "changeloop-tls",
            "changeloop Consumer over TLS",
            (lambda: pipeline_changeloop(target, tls=True)) if tls else None,
            "" if tls else no_tls,
        ),
        Pipeline(
            "changeloop-proxy",
            "changeloop Consumer via tinyproxy",
            (lambda: pipeline_changeloop(target, proxy=target.proxy)) if target.proxy else None,
            "" if target.proxy else no_proxy,
        ),
        Pipeline(
            "changeloop-proxy-tls",
            "changeloop Consumer, TLS via CONNECT",
            (lambda: pipeline_changeloop(target, tls=True, proxy=target.proxy))
            if target.proxy and tls else None,
            "" if target.proxy and tls else no_proxy if tls else no_tls,
        ),
        Pipeline(
            "b-tls",
            "(b) over TLS",
            (lambda: pipeline_obvious(target, tls=True)) if tls else None,
            "" if tls else no_tls,
        ),
    ]  # fmt: skip
    if compare is not None:
        pipelines += [
            Pipeline(
                "compare",
                "compared copy: Consumer",
                lambda: pipeline_changeloop(target, compare),
            ),
            Pipeline(
                "compare-plain",
                "compared copy: Consumer, plain decoder",
                lambda: pipeline_changeloop(target, compare, fast=False),
            ),
            Pipeline(
                "compare-tls",
                "compared copy: Consumer over TLS",
                (lambda: pipeline_changeloop(target, compare, tls=True)) if tls else None,
                "" if tls else no_tls,
            ),
        ]
    c_scanner = getattr(json.scanner, "c_make_scanner", None) is not None
    pipelines += [
        Pipeline(
            "tuned",
            "tuned stdlib (reference ceiling)",
            (lambda: pipeline_tuned(target)) if c_scanner else None,
            "" if c_scanner else "skipped (needs the json C scanner)",
        ),
        peer("httptools", "httptools + json.loads", "httptools", pipeline_httptools),
        peer("h11", "h11 + json.loads", "h11", pipeline_h11),
        Pipeline("http.client", "http.client readline + json.loads", lambda: pipeline_http_client(
            target)),
        peer("requests", "requests iter_lines + json.loads", "requests", pipeline_requests),
        peer("couchdb", "couchdb-python 1.2 changes(continuous)", "couchdb", pipeline_couchdb),
        peer("cloudant", "python-cloudant 2.15 Feed", "cloudant", pipeline_cloudant),
    ]  # fmt: skip
    return pipelines


def measure(pipelines: List[Pipeline], rows: int, stream_bytes: int, rounds: int) -> None:
    times: Dict[str, List[float]] = {p.key: [] for p in pipelines}
    cpu: Dict[str, List[float]] = {p.key: [] for p in pipelines}
    problems: Dict[str, str] = {}
    for _ in range(rounds):
        for pipeline in pipelines:  # round-robin, so drift affects every pipeline alike
            if pipeline.run is None or pipeline.key in problems:
                continue
            start = time.perf_counter()
            start_cpu = time.process_time()
            try:
                got = pipeline.run()
            except Exception as exc:  # report it in the table, measure the others
                problems[pipeline.key] = "failed: %r" % (exc,)
                continue
            elapsed = time.perf_counter() - start
            cpu[pipeline.key].append(time.process_time() - start_cpu)
            if got != rows:
                problems[pipeline.key] = "wrong count: %d rows, not %d" % (got, rows)
                continue
            times[pipeline.key].append(elapsed)
    base = statistics.median(times["b"]) if times.get("b") else float("nan")
    base_cpu = statistics.median(cpu["b"]) if cpu.get("b") else float("nan")
    print()
    print(
        "%-40s %10s %8s %8s %8s %7s"
        % ("pipeline (medians)", "rows/s", "MB/s", "vs (b)", "cpu (b)", "spread")
    )
    for pipeline in pipelines:
        if pipeline.run is None or pipeline.key in problems:
            print("%-40s %s" % (pipeline.name, problems.get(pipeline.key, pipeline.note)))
            continue
        median = statistics.median(times[pipeline.key])
        spread = (max(times[pipeline.key]) - min(times[pipeline.key])) / median
        print(
            "%-40s %10.0f %8.1f %7.2fx %7.2fx %6.0f%%"
            % (
                pipeline.name,
                rows / median,
                stream_bytes / median / 1e6,
                base / median,
                base_cpu / statistics.median(cpu[pipeline.key]),
                100 * spread,
            )
        )
    print(
        "vs (b): ratio of wall-clock medians; cpu (b): the same with this process's CPU time,"
        " steadier on a shared machine; spread: (slowest - fastest) / median"
    )
    keyed = {key: statistics.median(ts) for key, ts in times.items() if ts}
    for tls_key, plain_key in (("changeloop-tls", "changeloop"), ("b-tls", "b")):
        if tls_key in keyed and plain_key in keyed:
            print(
                "%s: %.2f of the same pipeline in plaintext"
                % (tls_key, keyed[plain_key] / keyed[tls_key])
            )


if __name__ == "__main__":
    sys.exit(main())
