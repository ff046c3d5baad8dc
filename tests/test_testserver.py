"""The test infrastructure itself: the real server fixture, the admin helper, the scripted server.

The scripted-server tests use plain sockets on purpose: they must not depend on the code under
test.
"""

import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any, List

import pytest
import testserver
from conftest import CouchAdmin
from scripted import (
    LAST_CHUNK,
    Close,
    Drip,
    Pause,
    Read,
    Request,
    Reset,
    ScriptedServer,
    Send,
    Stall,
    chunk,
    response_head,
)

CLIENT_TIMEOUT_S = 2.0

# -- the real server -----------------------------------------------------------------------------


def test_root_answers_json_with_version(couchdb_admin: CouchAdmin) -> None:
    welcome = couchdb_admin.get("/")
    assert isinstance(welcome["version"], str)
    assert welcome["version"]


def test_tests_using_the_server_are_marked(
    couchdb_url: str, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("server") is not None
    assert couchdb_url.startswith(("http://", "https://"))


def test_posted_doc_shows_up_in_normal_changes(couchdb_admin: CouchAdmin, db_name: str) -> None:
    couchdb_admin.put_db(db_name)
    created = couchdb_admin.post_doc(db_name, {"_id": "alpha", "n": 1})
    assert created["ok"] is True

    feed = couchdb_admin.get(f"/{db_name}/_changes?feed=normal&since=0")

    assert [row["id"] for row in feed["results"]] == ["alpha"]
    assert feed["results"][0]["changes"] == [{"rev": created["rev"]}]
    assert "last_seq" in feed


def test_db_name_is_unique_and_valid(db_name: str) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9_$()+/-]*", db_name)
    assert db_name != f"test-{'0' * 32}"


def test_cache_dir_follows_env_and_lock_hash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHANGELOOP_CACHE_DIR", str(tmp_path))
    path = testserver.cache_dir()
    assert path.parent == tmp_path
    assert re.fullmatch(r"pouchdb-server-[0-9a-f]{12}", path.name)


def test_server_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COUCHDB_URL", raising=False)
    assert testserver.server_url_from_env() is None
    monkeypatch.setenv("COUCHDB_URL", "http://admin:secret@couch.example:5984")
    assert testserver.server_url_from_env() == "http://admin:secret@couch.example:5984"


def test_admin_sends_basic_auth_from_url() -> None:
    response = response_head(chunked=False, headers={"Content-Length": "2"}) + b"{}"
    with ScriptedServer([[Read(), Send(response), Close()]]) as server:
        admin = CouchAdmin(f"http://us%3Aer:p%40ss@127.0.0.1:{server.port}/")
        assert admin.get("/") == {}
    (request,) = server.requests
    assert request.header("Authorization") == "Basic dXM6ZXI6cEBzcw=="  # "us:er:p@ss"
    assert request.header("Accept") == "application/json"
    assert "gzip" not in (request.header("Accept-Encoding") or "")


# -- the scripted server -------------------------------------------------------------------------


def _connect(server: ScriptedServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S)


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def test_helpers_frame_chunks_and_heads() -> None:
    assert chunk(b"abc") == b"3\r\nabc\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert response_head() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert (
        response_head(404, [("X-A", "1")], chunked=False)
        == b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\n\r\n"
    )


def test_records_request_then_sends_and_closes() -> None:
    body = chunk(b'{"results":[],"last_seq":"0"}\n') + LAST_CHUNK
    with ScriptedServer([[Read(), Send(response_head() + body), Close()]]) as server:
        with _connect(server) as client:
            client.sendall(
                b"POST /db/_changes?feed=longpoll HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
                b'{"doc_ids":[]'
            )
            received = _read_to_eof(client)
    assert received == response_head() + body
    assert server.requests == [
        Request(
            connection=0,
            method="POST",
            target="/db/_changes?feed=longpoll",
            headers=(
                ("Host", "x"),
                ("Content-Type", "application/json"),
                ("Content-Length", "13"),
            ),
            body=b'{"doc_ids":[]',
        )
    ]
    assert server.connections == 1
    assert server.errors == []


def test_reads_pipelined_requests_in_order() -> None:
    script = [Read(), Read(), Send(b"done"), Close()]
    with ScriptedServer([script]) as server:
        with _connect(server) as client:
            client.sendall(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            assert _read_to_eof(client) == b"done"
    assert [request.target for request in server.requests] == ["/a", "/b"]


def test_reset_aborts_the_connection() -> None:
    with ScriptedServer([[Read(), Reset()]]) as server:
        with _connect(server) as client:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                _read_to_eof(client)
    assert len(server.requests) == 1


def test_stall_keeps_the_connection_open_until_close() -> None:
    server = ScriptedServer([[Send(b"HTTP/1.1 200 OK\r\n"), Stall()]])
    try:
        with _connect(server) as client:
            assert client.recv(100) == b"HTTP/1.1 200 OK\r\n"
            client.settimeout(0.1)
            with pytest.raises(socket.timeout):
                client.recv(100)
            started = time.monotonic()
            server.close()
            assert time.monotonic() - started < 1.0
            client.settimeout(CLIENT_TIMEOUT_S)
            assert _read_to_eof(client) == b""
    finally:
        server.close()
    assert repr(server).endswith("closed>")


def test_stall_ends_when_the_client_leaves() -> None:
    with ScriptedServer([[Stall()]]) as server:
        with _connect(server) as client:
            client.sendall(b"ignored while stalled")
        _wait_until(lambda: server.open_connections == 0)
    assert server.errors == []


def test_drip_sends_one_byte_per_segment() -> None:
    payload = b"abcdef"
    with ScriptedServer([[Drip(payload, delay=0.02), Close()]]) as server:
        with _connect(server) as client:
            pieces: List[bytes] = []
            while True:
                piece = client.recv(100)
                if not piece:
                    break
                pieces.append(piece)
    assert b"".join(pieces) == payload
    assert len(pieces) > 1


def test_pause_delays_the_next_step() -> None:
    with ScriptedServer([[Send(b"a"), Pause(0.2), Send(b"b"), Close()]]) as server:
        with _connect(server) as client:
            assert client.recv(1) == b"a"
            started = time.monotonic()
            assert client.recv(1) == b"b"
            assert time.monotonic() - started >= 0.15


def test_last_script_repeats_for_later_connections() -> None:
    good = [Read(), Send(b"ok"), Close()]
    with ScriptedServer([[Reset()], good]) as server:
        # The RST may come back from connect() itself or from the first read: both are resets.
        with pytest.raises(ConnectionResetError), _connect(server) as first:
            _read_to_eof(first)
        for _ in range(2):
            with _connect(server) as client:
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
                assert _read_to_eof(client) == b"ok"
        assert server.connections == 3
    assert [request.connection for request in server.requests] == [1, 2]


def test_tls_wraps_accepted_connections() -> None:
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    with ScriptedServer([[Read(), Send(b"secret"), Close()]], ssl_context=server_context) as server:
        assert server.url.startswith("https://")
        with _connect(server) as raw:
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as client:
                client.sendall(b"GET /tls HTTP/1.1\r\n\r\n")
                assert _read_to_eof(client) == b"secret"
    assert server.requests[0].target == "/tls"


def test_failed_tls_handshake_is_recorded_not_raised() -> None:
    trustme = pytest.importorskip("trustme")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)
    with ScriptedServer([[Read(), Close()]], ssl_context=server_context) as server:
        with _connect(server) as client:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plaintext into a TLS server
            _read_to_eof(client)
        _wait_until(lambda: bool(server.errors))
    assert isinstance(server.errors[0], ssl.SSLError)


def test_scripts_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="last step"):
        ScriptedServer([[Close(), Send(b"late")]])
    with pytest.raises(TypeError, match="Step"):
        ScriptedServer([[b"raw bytes"]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        ScriptedServer([])


def _wait_until(condition: Any, timeout: float = CLIENT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
