"""The blocking client at its edges (issue 16): pooled connections, body limits, retries, empty
ids, and credentials kept out of messages and out of the locals of a failed request's frames.

Scripted servers only: each fault here is one a real server does not make.
"""

import base64
import json
import socket
import tracemalloc
from types import TracebackType
from typing import Iterator, List, Optional

import pytest
from scripted import Close, Read, ScriptedServer, Send, Stall, chunk, response_head

from changeloop import (
    ChangeloopError,
    Consumer,
    ProtocolError,
    ReadError,
    ResponseTooLargeError,
    ServerError,
    Timeout,
    Unauthorized,
    _transport,
)
from changeloop.client import MAX_BODY_BYTES, MAX_ERROR_BODY_BYTES, Database, Server


def json_response(status: int, body: object, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
    return (head % (status, len(data), extra)).encode() + data


REAL = json_response(200, {"real": True})
SMUGGLED = json_response(200, {"smuggled": True})


# -- a pooled connection is reused only when nothing is left on it -------------------------------


def test_a_second_response_sent_with_the_first_is_not_read_as_the_next_answer() -> None:
    with ScriptedServer(
        [[Read(), Send(json_response(200, {}) + SMUGGLED), Stall()], [Read(), Send(REAL), Stall()]]
    ) as s:
        with Server(s.url) as server:
            assert server.info() == {}
            assert server.info() == {"real": True}
        assert s.connections == 2


def test_bytes_sent_after_a_response_are_not_read_as_the_next_answer() -> None:
    script = [Read(), Send(json_response(200, {})), Send(SMUGGLED), Stall()]
    with ScriptedServer([script, [Read(), Send(REAL), Stall()]]) as s:
        with Server(s.url) as server:
            assert server.info() == {}
            s.wait_until_sent(0)  # the smuggled answer waits in our receive buffer
            assert server.info() == {"real": True}
        assert s.connections == 2


@pytest.mark.parametrize(
    "method, status", [("HEAD", 200), ("GET", 204), ("GET", 304)], ids=["HEAD", "204", "304"]
)
def test_a_body_on_an_answer_that_has_none_closes_the_connection(method: str, status: int) -> None:
    # RFC 9112 §6.3: these answers end with their head, whatever Content-Length says; the body a
    # broken server sends anyway would be read as the head of the next answer.
    bodied = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\nhello" % status
    with ScriptedServer([[Read(), Send(bodied), Stall()], [Read(), Send(REAL), Stall()]]) as s:
        with Server(s.url) as server:
            status_seen, _, data = server.raw_request(method, "/db/doc")
            assert (status_seen, data) == (status, b"")
            assert server.info() == {"real": True}
        assert s.connections == 2


def test_a_clean_response_keeps_its_connection() -> None:
    answer = json_response(200, {"ok": True})
    with ScriptedServer([[Read(), Send(answer), Read(), Send(answer), Stall()]]) as s:
        with Server(s.url) as server:
            server.info()
            server.info()
        assert s.connections == 1


# -- bodies are bounded ----------------------------------------------------------------------------

HUGE_HEAD = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
FLOOD = b"x" * (16 * 1024 * 1024)  # what a hostile server sends of the 10**15 bytes it announces
# What the client may allocate while refusing: a few 256 KiB receive buffers and their copies.
BOUNDED_BYTES = 4 * 1024 * 1024


def peak_allocated(call: "object") -> int:
    tracemalloc.start()
    try:
        call()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("what", ["info", "fetch"])
def test_a_hostile_content_length_is_refused_before_the_body_is_read(what: str) -> None:
    script = [Read(), Send(HUGE_HEAD % (200, 10**15)), Send(FLOOD), Close()]
    with ScriptedServer([script]) as s, Server(s.url) as server:
        errors: List[BaseException] = []

        def call() -> None:
            try:
                if what == "info":
                    server.info()
                else:
                    Consumer(Database(server, "db")).fetch()
            except ChangeloopError as exc:
                errors.append(exc)

        peak = peak_allocated(call)
    assert len(errors) == 1 and isinstance(errors[0], ResponseTooLargeError), errors
    assert errors[0].limit == MAX_BODY_BYTES
    assert "announces %d body bytes" % 10**15 in str(errors[0])
    assert peak < BOUNDED_BYTES, peak


def test_a_hostile_error_body_is_cut_at_max_error_body_bytes() -> None:
    script = [Read(), Send(HUGE_HEAD % (500, 10**15)), Send(FLOOD), Close()]
    with ScriptedServer([script]) as s, Server(s.url) as server:
        errors: List[BaseException] = []

        def call() -> None:
            try:
                server.info()
            except ChangeloopError as exc:
                errors.append(exc)

        peak = peak_allocated(call)
        assert "idle=0" in repr(server)  # the rest was not read: the connection is not reused
    assert len(errors) == 1 and isinstance(errors[0], ServerError), errors
    assert errors[0].reason == "x" * 200  # the start of the body, as for any non-JSON body
    assert peak < BOUNDED_BYTES, peak


def test_an_error_body_under_the_cut_is_read_whole_and_keeps_the_connection() -> None:
    error = json_response(404, {"error": "not_found", "reason": "x" * (MAX_ERROR_BODY_BYTES // 2)})
    with ScriptedServer([[Read(), Send(error), Read(), Send(REAL), Stall()]]) as s:
        with Server(s.url) as server:
            status, _, data = server.raw_request("GET", "/db/x", raise_for_status=False)
            assert status == 404 and json.loads(data)["error"] == "not_found"
            assert server.info() == {"real": True}
        assert s.connections == 1


@pytest.mark.parametrize("framing", ["chunked", "until-close", "content-length"])
def test_max_body_bytes_is_configurable(framing: str) -> None:
    body = json.dumps({"pad": "x" * 3000}).encode()
    if framing == "chunked":
        answer = response_head(200) + chunk(body[:1000]) + chunk(body[1000:]) + b"0\r\n\r\n"
    elif framing == "until-close":
        answer = response_head(200, chunked=False) + body
    else:
        answer = HUGE_HEAD % (200, len(body)) + body
    with ScriptedServer([[Read(), Send(answer), Close()]]) as s:
        with Server(s.url + "/couch", max_body_bytes=1000) as server:
            with pytest.raises(ResponseTooLargeError, match="over the limit of 1000") as info:
                server.info()
            assert info.value.limit == 1000
            assert str(info.value).startswith("GET %s/couch/: the answer " % s.url)
        with Server(s.url, max_body_bytes=len(body)) as server:
            assert server.info() == {"pad": "x" * 3000}  # exactly the limit is accepted
        with Server(s.url, max_body_bytes=None) as server:
            assert server.info() == {"pad": "x" * 3000}


@pytest.mark.parametrize("limit", [-1, 1.5, "1000"])
def test_max_body_bytes_must_be_a_count(limit: object) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        Server("http://127.0.0.1:5984", max_body_bytes=limit)  # type: ignore[arg-type]


def test_response_too_large_is_a_changeloop_error_that_pickles() -> None:
    import pickle

    error = ResponseTooLargeError("too large", limit=5)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ChangeloopError) and copy.limit == 5 and str(copy) == "too large"


# -- only what is safe to repeat is retried on a stale connection ---------------------------------

CREATED = json_response(201, {"ok": True, "id": "new", "rev": "1-a"})


def test_a_post_on_a_connection_closed_without_answer_is_not_sent_twice() -> None:
    # The server reads the POST and closes without answering: it may have created the document.
    first = [Read(), Send(json_response(200, {})), Read(), Close()]
    with ScriptedServer([first, [Read(), Send(CREATED), Stall()]]) as s:
        with Server(s.url) as server:
            server.info()
            with pytest.raises(ReadError, match="not sent again"):
                Database(server, "db").save_doc({"n": 1})
        assert [r.method for r in s.requests] == ["GET", "POST"]
        assert s.connections == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_an_idempotent_request_on_a_connection_closed_without_answer_is_sent_again(
    method: str,
) -> None:
    first = [Read(), Send(json_response(200, {})), Read(), Close()]
    with ScriptedServer([first, [Read(), Send(CREATED), Stall()]]) as s:
        with Server(s.url) as server:
            server.info()
            status, _, _ = server.raw_request(method, "/db/doc-id", body=b"{}")
            assert status == 201
        assert [r.method for r in s.requests] == ["GET", method, method]
        assert s.connections == 2


def test_a_post_marked_idempotent_is_sent_again() -> None:
    first = [Read(), Send(json_response(200, {})), Read(), Close()]
    with ScriptedServer([first, [Read(), Send(CREATED), Stall()]]) as s:
        with Server(s.url) as server:
            server.info()
            status, _, _ = server.raw_request("POST", "/db/_all_docs", body=b"{}", idempotent=True)
            assert status == 201
        assert s.connections == 2


def test_a_post_after_the_server_closed_the_idle_connection_goes_on_a_new_one() -> None:
    # A close that arrived before the request is seen before sending: nothing is lost then.
    with ScriptedServer(
        [[Read(), Send(json_response(200, {})), Close()], [Read(), Send(CREATED), Stall()]]
    ) as s:
        with Server(s.url) as server:
            server.info()
            s.wait_until_sent(0)  # the FIN is in our receive buffer
            assert Database(server, "db").save_doc({"n": 1})["id"] == "new"
        assert [r.method for r in s.requests] == ["GET", "POST"]
        assert s.connections == 2


# -- empty document ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("docid", ["", "_design/", "_local/"])
def test_an_empty_document_id_is_refused_before_any_request(docid: str) -> None:
    with ScriptedServer([[Read(), Send(REAL), Stall()]]) as s:
        with Server(s.url) as server:
            db = Database(server, "db")
            for call in (
                lambda: db.get(docid),
                lambda: db.doc_exist(docid),
                lambda: db.delete_doc(docid),
                lambda: db.delete_doc({"_id": docid, "_rev": "1-a"}),
                lambda: db.save_doc({"_id": docid}),
            ):
                with pytest.raises(ValueError, match="document id cannot be empty"):
                    call()
        assert s.connections == 0


def test_a_document_id_must_be_a_string() -> None:
    db = Database(Server("http://127.0.0.1:1"), "db")
    with pytest.raises(TypeError, match="str"):
        db.get(None)  # type: ignore[arg-type]


# -- credentials stay out of messages ------------------------------------------------------------

PASSWORD = "s3cretPW"


@pytest.mark.parametrize(
    "url",
    [
        "htp://admin:%s@127.0.0.1:5984" % PASSWORD,
        "ftp://admin:%s@127.0.0.1/x" % PASSWORD,
        "http://admin:%s@/db" % PASSWORD,
        "http://admin:%s@:5984" % PASSWORD,
        "http://admin:12/%s@127.0.0.1:5984" % PASSWORD,  # a raw "/": a valid-looking port
        "http://admin:ab/%s@127.0.0.1:5984" % PASSWORD,  # a raw "/": urllib's port error
        "http://admin:%s?x@127.0.0.1:5984" % PASSWORD,
        "http://admin:%s#x@127.0.0.1:5984" % PASSWORD,
        "http://admin:%s@127.0.0.1:99999" % PASSWORD,
        "http://admin:%s@[::1" % PASSWORD,
        "admin:%s@127.0.0.1:5984" % PASSWORD,
    ],
)
def test_a_bad_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        Server(url)
    error: Optional[BaseException] = info.value
    while error is not None:  # the message, and anything chained to it
        for text in (str(error), repr(error)):
            assert PASSWORD not in text and "s3cret" not in text, text
        error = error.__cause__ or error.__context__
    assert "expected http[s]://" in str(info.value)


def test_a_good_url_keeps_working() -> None:
    server = Server("https://admin:p%2Fw@db.example:6984/couch/")
    assert server.url == "https://db.example:6984/couch"
    assert server.credentials == ("admin", "p/w")
    assert "p/w" not in repr(server) and "p/w" not in repr(vars(server))


# -- credentials stay out of the locals of a failed request's frames ------------------------------

BASIC = base64.b64encode(("admin:" + PASSWORD).encode()).decode()


def frames_of(error: BaseException) -> Iterator[TracebackType]:
    """Every traceback entry of ``error`` and of the exceptions chained to it."""
    seen = set()
    pending: List[Optional[BaseException]] = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            yield tb
            tb = tb.tb_next
        pending += [exc.__cause__, exc.__context__]


def assert_no_secret_in_frames(error: BaseException) -> None:
    leaks = []
    files = set()
    for tb in frames_of(error):
        files.add(tb.tb_frame.f_code.co_filename)
        for name, value in tb.tb_frame.f_locals.items():
            text = repr(value)
            if PASSWORD in text or BASIC in text:
                leaks.append("%s: %s = %s" % (tb.tb_frame.f_code.co_name, name, text[:200]))
    assert any("changeloop" in name for name in files)  # the walk reached the library's frames
    assert not leaks, leaks
    assert PASSWORD not in str(error) and BASIC not in str(error)


UNAUTHORIZED = json_response(401, {"error": "unauthorized", "reason": "no"})


@pytest.mark.parametrize(
    "script, error",
    [
        ([Read(), Send(UNAUTHORIZED), Stall()], Unauthorized),
        ([Read(), Send(b"SSH-2.0-OpenSSH\r\n\r\n"), Stall()], ProtocolError),
        ([Read(), Close()], ReadError),
    ],
    ids=["401", "garbage", "closed"],
)
def test_a_request_error_leaves_no_basic_credentials_in_frame_locals(
    script: list, error: type
) -> None:
    with ScriptedServer([script]) as s:
        with Server(s.url, auth=("admin", PASSWORD)) as server:
            with pytest.raises(error) as info:
                server.request("PUT", "/db", body={"x": 1})
        assert s.requests[0].header("authorization") == "Basic " + BASIC  # it was sent
    assert_no_secret_in_frames(info.value)


def test_a_write_error_leaves_no_credentials_in_the_socket_layer_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class TLSLikeSocket:
        """Like ssl.SSLSocket, whose sendall is Python code holding the bytes as a local."""

        def settimeout(self, timeout: Optional[float]) -> None:
            pass

        def sendall(self, data: bytes) -> None:
            view = bytes(data)  # noqa: F841 - the local under test
            raise socket.timeout("timed out")

        def close(self) -> None:
            pass

    monkeypatch.setattr(_transport, "connect_blocking", lambda *args, **kwargs: TLSLikeSocket())
    server = Server("http://admin:%s@127.0.0.1:5984" % PASSWORD, timeout=1)
    with pytest.raises(Timeout) as info:
        server.info()
    assert_no_secret_in_frames(info.value)


def test_a_refused_session_login_leaves_no_password_in_frame_locals() -> None:
    with ScriptedServer([[Read(), Send(UNAUTHORIZED), Stall()]]) as s:
        with Server(s.url, auth=("admin", PASSWORD), session=True) as server:
            with pytest.raises(Unauthorized) as info:
                server.all_dbs()
        assert json.loads(s.requests[0].body)["password"] == PASSWORD  # it was sent
    assert_no_secret_in_frames(info.value)


def test_a_session_request_error_leaves_no_password_in_frame_locals() -> None:
    login = json_response(200, {"ok": True}, "Set-Cookie: AuthSession=abc; Path=/\r\n")
    with ScriptedServer([[Read(), Send(login), Read(), Close()]]) as s:
        with Server(s.url, auth=("admin", PASSWORD), session=True) as server:
            with pytest.raises(ReadError) as info:
                server.request("POST", "/db", body={"x": 1})
        assert s.requests[1].header("cookie") == "AuthSession=abc"
    assert_no_secret_in_frames(info.value)


def test_prepare_request_hides_the_credentials_until_wire() -> None:
    server = Server("http://admin:%s@127.0.0.1:5984/prefix" % PASSWORD)
    request = server.prepare_request("GET", "/db/_changes", params={"feed": "continuous"})
    assert PASSWORD not in repr(request) and BASIC not in repr(request)
    assert request.target == "/prefix/db/_changes?feed=continuous" and request.cookie is None
    wire = request.wire()
    assert wire.startswith(b"GET /prefix/db/_changes?feed=continuous HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Basic " + BASIC.encode() + b"\r\n" in wire
    assert wire.endswith(b"\r\n\r\n")
    # The headers the consumer sends today are unchanged.
    assert ("Authorization", "Basic " + BASIC) in server.request_headers()
