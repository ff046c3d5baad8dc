"""A loopback server that serves one pregenerated CouchDB 3 ``_changes`` response.

Used by ``bench_throughput.py`` and ``bench_fetch.py``, which run it in a subprocess so that the
server does not share the client's GIL. The whole response (head and chunked body) is built once
at start-up; every ``GET /db/_changes...`` is answered with those bytes, sent with ``sendall`` in
1 MiB slices, so the server costs next to nothing per row and is never the bottleneck.

By default (``--feed continuous``) the body is framed as CouchDB 3 frames a continuous feed: one
row per chunk (``b8\\r\\n{...}\\n\\r\\n``), then the ``{"last_seq": .., "pending": 0}`` line and
the last chunk; the server closes the connection after it.

With ``--feed normal`` the body is one JSON document, as CouchDB 3 sends a normal feed (and a
longpoll feed that has changes pending): ``{"results":[\\n``, the rows separated by ``,\\r\\n``,
then ``\\n],\\n"last_seq":..,"pending":0}\\n``, a ``\\n`` chunk and the last chunk.
``/db/_changes`` is chunked as CouchDB buffers it (``chunked_response_buffer_size``, 1490 bytes:
the first chunk holds ``{"results":[\\n`` alone, then as many rows as fit, the end of the
document in the last of them), and ``/db-rowchunks/_changes`` sends the same document one row
per chunk. The ``feed`` parameter is not looked at, and the connection is kept alive.

Rows look like CouchDB's: an opaque string seq, a 32-hex-digit id, one revision; 184 bytes each
with the newline (about 1 KB with ``--include-docs``, whose rows carry a document).

    python benchmarks/_feedserver.py --rows N [--include-docs] [--feed continuous|normal]
        [--tls CERT_AND_KEY_PEM]

It prints ``plain PORT`` (and ``tls PORT``), then ``stream BYTES ROW_BYTES`` (the size of the
``/db`` response, framing included, and the average row), then ``ready``, and serves until its
standard input closes. ``GET``/``HEAD /db`` get a small database info object (for clients that
check the database first); any other request gets a 404.
"""

import argparse
import base64
import json
import random
import socket
import ssl
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

#: Bytes per ``sendall``: large slices, so the server spends its time in the kernel.
SEND_BYTES = 1024 * 1024
#: Every row is padded to this size (newline included), as in the issue's measurements.
ROW_BYTES = 184
#: The longest request head read (the benchmark's clients send a few hundred bytes).
MAX_REQUEST_HEAD_BYTES = 64 * 1024

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Cache-Control: must-revalidate\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: CouchDB/3.3.3 (Erlang OTP/24)\r\n"
    b"X-Couch-Request-ID: 5b4ac2f1e4\r\n"
    b"X-CouchDB-Body-Time: 0\r\n"
    b"\r\n"
)
DB_INFO = json.dumps({"db_name": "db", "doc_count": 0, "update_seq": "0"}).encode()


def _random_bytes(rng: random.Random, count: int) -> bytes:
    return rng.getrandbits(count * 8).to_bytes(count, "little")  # seeded, and fast in bulk


def _doc(rng: random.Random, docid: str, rev: str, n: int) -> Dict[str, Any]:
    # About 1 KB of a typical application document: strings, numbers, a nested object, a list.
    return {
        "_id": docid,
        "_rev": rev,
        "type": "order",
        "status": rng.choice(["new", "paid", "shipped", "delivered", "cancelled"]),
        "created_at": "2024-01-%02dT%02d:%02d:%02d.%03dZ"
        % (1 + n % 28, n % 24, n % 60, (n * 7) % 60, n % 1000),
        "customer": {
            "id": "cust-%06d" % rng.randrange(10**6),
            "name": rng.choice(
                ["Zoë Müller", "Ana García", "Li Wei", "John Smith", "Ola Nordmann"]
            ),
            "email": "customer%d@example.com" % rng.randrange(10**6),
            "address": {
                "street": "%d Rue de la République" % rng.randrange(1, 300),
                "city": rng.choice(["Paris", "Zürich", "Lisboa", "Berlin", "Oslo"]),
                "postcode": "%05d" % rng.randrange(10**5),
                "country": rng.choice(["FR", "CH", "PT", "DE", "NO"]),
            },
        },
        "items": [
            {
                "sku": "SKU-%08x" % rng.getrandbits(32),
                "qty": rng.randrange(1, 5),
                "price": round(rng.uniform(1, 500), 2),
                "tags": ["gift", "fragile"][: rng.randrange(3)],
            }
            for _ in range(3)
        ],
        "total": round(rng.uniform(10, 2000), 2),
        "paid": rng.random() < 0.5,
        "coupon": None,
        "note": "Leave at the door; ring twice. " * 7,
    }


# CouchDB 2+ seqs are "<number>-<base64url of an Erlang term>", the term starting "g1AAAA".
_ROW = '{"seq":"%d-g1AAAA%s","id":"%s","changes":[{"rev":"1-%s"}]}'
_ROW_FIXED = len(_ROW % (0, "", "", ""))  # with the newline, without the seq's digits
#: CouchDB's ``chttpd/chunked_response_buffer_size``: a normal feed's rows are buffered into
#: chunks of at most this many bytes (a row longer than that goes alone in its chunk).
COUCHDB_CHUNK_BUFFER_BYTES = 1490


def make_rows(rows: int, include_docs: bool) -> Tuple[List[bytes], bytes]:
    """Return the rows' JSON (without a line end) and the ``last_seq`` value's JSON."""
    rng = random.Random(7)
    hexes = _random_bytes(rng, 32 * (rows + 1)).hex()
    opaque = base64.urlsafe_b64encode(_random_bytes(rng, 48 * (rows + 1))).decode("ascii")
    out: List[bytes] = []
    append = out.append
    for n in range(1, rows + 1):
        docid = hexes[64 * n : 64 * n + 32]
        rev = hexes[64 * n + 32 : 64 * n + 64]
        if include_docs:
            row = {
                "seq": "%d-g1AAAA%s" % (n, opaque[64 * n : 64 * n + 60]),
                "id": docid,
                "changes": [{"rev": "1-" + rev}],
                "doc": _doc(rng, docid, "1-" + rev, n),
            }
            append(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode())
        else:
            # The seq's opaque part is sized so that every row is exactly ROW_BYTES long.
            pad = ROW_BYTES - _ROW_FIXED - len(str(n)) - 64
            append((_ROW % (n, opaque[64 * n : 64 * n + pad], docid, rev)).encode("ascii"))
    return out, b'"%d-g1AAAA%s"' % (rows, opaque[:60].encode("ascii"))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def make_stream(rows: int, include_docs: bool) -> Tuple[bytes, int]:
    """Return the whole continuous response (head and chunked body) and the average row size."""
    lines, last_seq = make_rows(rows, include_docs)
    parts = [HEAD]
    parts += [b"%x\r\n%s\n\r\n" % (len(line) + 1, line) for line in lines]
    parts.append(_chunk(b'{"last_seq":%s,"pending":0}\n' % last_seq) + b"0\r\n\r\n")
    return b"".join(parts), sum(map(len, lines)) // max(rows, 1) + 1


def make_documents(rows: int, include_docs: bool) -> Tuple[bytes, bytes, int]:
    """Return the normal-feed response chunked as CouchDB does, the same one row per chunk, and
    the average row size (with its ``,\\r\\n`` separator), as ``chttpd_db:changes_callback``
    writes them: a first chunk ``{"results":[\\n``, each row after the first prefixed with
    ``,\\r\\n``, the terminator in the last chunk of rows when it fits, then a ``\\n`` chunk."""
    lines, last_seq = make_rows(rows, include_docs)
    terminator = b'\n],\n"last_seq":%s,"pending":0}\n' % last_seq
    pieces = [b",\r\n" + line for line in lines]
    if pieces:
        pieces[0] = lines[0]
    first = _chunk(b'{"results":[\n')
    end = _chunk(b"\n") + b"0\r\n\r\n"

    buffered: List[bytes] = []
    size = 0
    couchdb = [HEAD, first]
    for piece in pieces:  # maybe_flush_changes_feed: flush when this row would overflow
        if size and size + len(piece) > COUCHDB_CHUNK_BUFFER_BYTES:
            couchdb.append(_chunk(b"".join(buffered)))
            buffered, size = [], 0
        buffered.append(piece)
        size += len(piece)
    if size + len(terminator) > COUCHDB_CHUNK_BUFFER_BYTES:  # close_delayed_json_object
        couchdb += [_chunk(b"".join(buffered)), _chunk(terminator)]
    else:
        couchdb.append(_chunk(b"".join(buffered) + terminator))
    couchdb.append(end)

    per_row = [HEAD, first] + [_chunk(piece) for piece in pieces] + [_chunk(terminator), end]
    row_bytes = sum(map(len, pieces)) // max(rows, 1)
    return b"".join(couchdb), b"".join(per_row), row_bytes


def _read_head(sock: socket.socket, buf: bytearray) -> Optional[bytes]:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            return head
        if len(buf) > MAX_REQUEST_HEAD_BYTES:
            return None
        data = sock.recv(65536)
        if not data:
            return None
        buf += data


def _respond(sock: socket.socket, status: bytes, body: bytes, head_only: bool) -> None:
    sock.sendall(
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (status, len(body), b"" if head_only else body)
    )


def serve_connection(
    sock: socket.socket, routes: Dict[bytes, memoryview], keep_alive: bool
) -> None:
    buf = bytearray()
    try:
        while True:
            head = _read_head(sock, buf)
            if head is None:
                return
            method, target = head.split(b" ", 2)[:2]
            path = target.split(b"?", 1)[0]
            stream = routes.get(path) if method == b"GET" else None
            if stream is not None:
                for start in range(0, len(stream), SEND_BYTES):
                    sock.sendall(stream[start : start + SEND_BYTES])
                if keep_alive:
                    continue
                # A continuous feed ends with the response: let the client read to the end and
                # close first, so that nothing it has not read is lost to a reset.
                try:
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass
                return
            if path.rstrip(b"/") + b"/_changes" in routes and method in (b"GET", b"HEAD"):
                _respond(sock, b"200 OK", DB_INFO, method == b"HEAD")
            else:
                body = b'{"error":"not_found","reason":"missing"}'
                _respond(sock, b"404 Object Not Found", body, method == b"HEAD")
    except OSError:
        pass  # the client went away (for example, a consumer that stopped at its limit)
    finally:
        sock.close()


def accept_forever(
    listener: socket.socket,
    routes: Dict[bytes, memoryview],
    keep_alive: bool,
    context: Optional[ssl.SSLContext],
) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError):
                sock.close()
                continue
        threading.Thread(
            target=serve_connection, args=(sock, routes, keep_alive), daemon=True
        ).start()


def listen() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--include-docs", action="store_true")
    parser.add_argument("--feed", choices=["continuous", "normal"], default="continuous")
    parser.add_argument("--tls", metavar="PEM", help="certificate chain and key, for a TLS port")
    args = parser.parse_args()

    if args.feed == "normal":
        stream, per_row, row_bytes = make_documents(args.rows, args.include_docs)
        routes = {
            b"/db/_changes": memoryview(stream),
            b"/db-rowchunks/_changes": memoryview(per_row),
        }
    else:
        stream, row_bytes = make_stream(args.rows, args.include_docs)
        routes = {b"/db/_changes": memoryview(stream)}
    keep_alive = args.feed == "normal"
    plain = listen()
    threading.Thread(
        target=accept_forever, args=(plain, routes, keep_alive, None), daemon=True
    ).start()
    print("plain %d" % plain.getsockname()[1])
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls)
        secure = listen()
        threading.Thread(
            target=accept_forever, args=(secure, routes, keep_alive, context), daemon=True
        ).start()
        print("tls %d" % secure.getsockname()[1])
    print("stream %d %d" % (len(stream), row_bytes))
    print("ready", flush=True)
    sys.stdin.read()  # serve until the benchmark closes our standard input (or exits)


if __name__ == "__main__":
    main()
