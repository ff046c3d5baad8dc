"""HTTP proxies without a socket: which proxy a URL gets, the requests it is sent, CONNECT's answer.

Where the proxy comes from (``proxy=``, ``http_proxy``/``https_proxy``/``all_proxy`` in either
case, ``no_proxy`` with each of its conventions), what goes on the wire (absolute-form targets and
``Proxy-Authorization`` for plain HTTP, origin-form inside a tunnel, the CONNECT request), how the
proxy's answer to CONNECT is read (every byte split, each refusal mapped to an error the feed
stops or retries on), and that no password shows. tests/test_proxy.py runs the same through a
real tinyproxy.
"""

import base64
import os
from typing import Iterator, List, Optional, Tuple

import pytest

from changeloop import ConnectError, HTTPError, ProtocolError, Server, Unauthorized, _proxy
from changeloop._events import NEED_DATA, EndOfMessage, Response
from changeloop._http import ResponseParser
from changeloop._policy import is_fatal
from changeloop._proxy import Proxy, Tunnel, bypasses, choose_proxy, refused_by_proxy
from changeloop._request import PreparedRequest

PASSWORD = "pr0xy-s3cret"
PROXY = "http://carol:%s@proxy.corp:3128" % PASSWORD
VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """An environment without proxy settings (conftest takes them out already; be sure)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    yield monkeypatch


def via(setting: Optional[str], scheme: str, host: str, port: int) -> Optional[str]:
    """The host of the proxy chosen, or ``None``."""
    proxy = choose_proxy(setting, scheme, host, port)
    return None if proxy is None else proxy.host


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


# -- the proxy URL ------------------------------------------------------------------------------


def test_a_proxy_url_gives_host_port_and_a_hidden_login() -> None:
    proxy = Proxy("http://carol:p%40ss%3Aw%2Frd@proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.url) == ("proxy.corp", 3128, "http://proxy.corp:3128")
    assert proxy.credentials is not None
    assert proxy.credentials.as_tuple() == ("carol", "p@ss:w/rd")  # percent-decoded
    ((name, value),) = proxy.headers()
    assert name == "Proxy-Authorization" and "p@ss" not in repr(value)
    assert value.reveal() == basic("carol", "p@ss:w/rd")
    assert "p@ss" not in repr(proxy) and "carol" in repr(proxy)


@pytest.mark.parametrize(
    "url, where",
    [
        ("proxy.corp:3128", ("proxy.corp", 3128)),  # no scheme: http, as curl and urllib read it
        ("http://proxy.corp", ("proxy.corp", 80)),
        ("http://[fd00::1]:8080/", ("fd00::1", 8080)),
    ],
)
def test_proxy_url_forms(url: str, where: Tuple[str, int]) -> None:
    proxy = Proxy(url)
    assert (proxy.host, proxy.port) == where
    assert proxy.credentials is None and proxy.headers() == []


def test_an_https_proxy_url_is_refused_clearly_without_its_password() -> None:
    with pytest.raises(ValueError, match="TLS to the proxy itself .* is not supported") as info:
        Proxy("https://carol:%s@proxy.corp:3129" % PASSWORD)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("url", ["socks5://carol:%s@proxy.corp:1080" % PASSWORD, "http://:3128"])
def test_other_proxy_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="expected a proxy URL") as info:
        Proxy(url)
    assert PASSWORD not in str(info.value)


# -- where the proxy comes from -----------------------------------------------------------------


def test_the_environment_gives_each_scheme_its_proxy(env: pytest.MonkeyPatch) -> None:
    env.setenv("HTTP_PROXY", "http://plain.corp:3128")
    env.setenv("HTTPS_PROXY", "http://tls.corp:3128")
    assert via(None, "http", "db.example", 5984) == "plain.corp"
    assert via(None, "https", "db.example", 6984) == "tls.corp"


def test_all_proxy_is_the_fallback_and_lower_case_wins(env: pytest.MonkeyPatch) -> None:
    env.setenv("ALL_PROXY", "http://all.corp:3128")
    assert via(None, "https", "db.example", 6984) == "all.corp"
    env.setenv("HTTPS_PROXY", "http://upper.corp:3128")
    env.setenv("https_proxy", "http://lower.corp:3128")
    assert via(None, "https", "db.example", 6984) == "lower.corp"


def test_no_proxy_in_the_environment_means_none(env: pytest.MonkeyPatch) -> None:
    assert choose_proxy(None, "http", "db.example", 5984) is None
    env.setenv("HTTPS_PROXY", "http://tls.corp:3128")
    assert choose_proxy(None, "http", "db.example", 5984) is None  # https's proxy is not http's


def test_http_proxy_is_ignored_in_a_cgi_request(env: pytest.MonkeyPatch) -> None:
    # httpoxy: a CGI script's HTTP_PROXY may come from the client's "Proxy:" header.
    env.setenv("HTTP_PROXY", "http://attacker.example:3128")
    env.setenv("REQUEST_METHOD", "GET")
    assert choose_proxy(None, "http", "db.example", 5984) is None


def test_an_explicit_proxy_wins_over_the_environment_and_its_no_proxy(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("HTTP_PROXY", "http://env.corp:3128")
    env.setenv("NO_PROXY", "*")
    assert via("http://mine.corp:8080", "http", "db.example", 5984) == "mine.corp"
    assert Server("http://db.example:5984", proxy="http://mine.corp:8080").proxy == (
        "http://mine.corp:8080"
    )


def test_proxy_false_means_none_whatever_the_environment_says(env: pytest.MonkeyPatch) -> None:
    env.setenv("HTTP_PROXY", "http://env.corp:3128")
    env.setenv("ALL_PROXY", "http://all.corp:3128")
    assert Server("http://db.example:5984").proxy == "http://env.corp:3128"
    assert Server("http://db.example:5984", proxy=False).proxy is None


def test_proxy_true_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Server("http://db.example:5984", proxy=True)  # type: ignore[arg-type]


def test_an_https_proxy_in_the_environment_is_refused_clearly(env: pytest.MonkeyPatch) -> None:
    env.setenv("https_proxy", "https://carol:%s@tls.corp:3129" % PASSWORD)
    with pytest.raises(ValueError, match="not supported") as info:
        Server("https://db.example:6984")
    assert PASSWORD not in str(info.value)


# -- no_proxy's conventions ----------------------------------------------------------------------

BYPASS_CASES: List[Tuple[str, str, int, bool]] = [
    # no_proxy, host, port, bypassed
    ("*", "db.example", 5984, True),
    ("", "db.example", 5984, False),
    # host names: the name itself and its subdomains, never a mere suffix of a label
    ("example.com", "example.com", 80, True),
    ("example.com", "db.example.com", 80, True),
    ("example.com", "badexample.com", 80, False),
    ("EXAMPLE.com", "Db.Example.COM.", 80, True),  # case and a trailing dot do not matter
    # domain suffixes: a leading "." or "*." is the same entry
    (".example.com", "db.example.com", 80, True),
    (".example.com", "example.com", 80, True),
    ("*.example.com", "a.b.example.com", 80, True),
    # several entries, with spaces and commas
    ("other.org, example.com ,10.0.0.1", "db.example.com", 80, True),
    ("other.org example.com", "db.example.com", 80, True),
    # IP literals, compared as addresses
    ("10.1.2.3", "10.1.2.3", 5984, True),
    ("10.1.2.3", "10.1.2.4", 5984, False),
    ("::1", "::1", 5984, True),
    ("[::1]", "0:0::1", 5984, True),
    ("10.1.2.3", "db.example", 5984, False),
    # CIDR ranges match IP literals of their family only
    ("10.0.0.0/8", "10.200.3.4", 5984, True),
    ("10.0.0.0/8", "11.0.0.1", 5984, False),
    ("192.168.1.0/24", "192.168.1.77", 5984, True),
    ("fd00::/8", "fd12::5", 5984, True),
    ("fd00::/8", "10.0.0.1", 5984, False),
    ("10.0.0.0/8", "db.example", 5984, False),
    ("10.0.0.0/abc", "10.0.0.1", 5984, False),  # not a range: ignored
    # ports: an entry with one matches that port only
    ("example.com:5984", "db.example.com", 5984, True),
    ("example.com:5984", "db.example.com", 6984, False),
    ("10.1.2.3:5984", "10.1.2.3", 5984, True),
    ("10.1.2.3:5984", "10.1.2.3", 80, False),
    ("[::1]:5984", "::1", 5984, True),
    ("[::1]:5984", "::1", 6984, False),
    # names are not resolved
    ("localhost", "127.0.0.1", 5984, False),
    ("localhost", "localhost", 5984, True),
]


@pytest.mark.parametrize("no_proxy, host, port, bypassed", BYPASS_CASES)
def test_no_proxy_conventions(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert bypasses(no_proxy, host, port) is bypassed


@pytest.mark.parametrize("name", ["NO_PROXY", "no_proxy"])
def test_no_proxy_from_the_environment_bypasses_the_proxy(
    env: pytest.MonkeyPatch, name: str
) -> None:
    env.setenv("HTTP_PROXY", "http://env.corp:3128")
    env.setenv(name, "localhost,10.0.0.0/8,.internal:5984")
    assert choose_proxy(None, "http", "10.3.3.3", 5984) is None
    assert choose_proxy(None, "http", "couch.internal", 5984) is None
    assert choose_proxy(None, "http", "couch.internal", 80) is not None
    assert choose_proxy(None, "http", "db.example", 5984) is not None


# -- what goes on the wire ----------------------------------------------------------------------


def test_plain_http_through_a_proxy_sends_absolute_form_and_both_logins_apart() -> None:
    server = Server("http://admin:couch-pw@db.example:5984/couch", proxy=PROXY)
    wire = server.prepare_request("GET", "/orders/_changes", params={"since": 0}).wire()
    head = wire.decode("latin-1").split("\r\n")
    # RFC 9112 §3.2.2: the absolute form, with the prefix; Host stays the origin's.
    assert head[0] == "GET http://db.example:5984/couch/orders/_changes?since=0 HTTP/1.1"
    assert "Host: db.example:5984" in head
    assert "Authorization: %s" % basic("admin", "couch-pw") in head
    assert "Proxy-Authorization: %s" % basic("carol", PASSWORD) in head
    assert PASSWORD not in repr(server) and "proxy=http://proxy.corp:3128" in repr(server)


def test_https_through_a_proxy_keeps_origin_form_and_the_proxy_login_off_the_requests() -> None:
    server = Server("https://admin:couch-pw@db.example:6984", proxy=PROXY)
    head = server.prepare_request("GET", "/orders").wire().decode("latin-1").split("\r\n")
    assert head[0] == "GET /orders HTTP/1.1"
    assert not any(line.startswith("Proxy-Authorization") for line in head)  # CONNECT's only
    host, port, options = server._endpoint.route()
    assert (host, port) == ("proxy.corp", 3128)
    tunnel = options["tunnel"]
    assert (tunnel.host, tunnel.port) == ("db.example", 6984)


def test_without_a_proxy_the_route_is_the_server_itself() -> None:
    server = Server("http://db.example:5984", proxy=False)
    assert server._endpoint.route() == ("db.example", 5984, {})
    head = server.prepare_request("GET", "/orders").wire().decode("latin-1")
    assert head.startswith("GET /orders HTTP/1.1\r\n")


def test_the_connect_request_is_authority_form_with_the_proxy_login() -> None:
    tunnel = Tunnel(Proxy(PROXY), "db.example", 6984)
    assert tunnel.wire() == (
        b"CONNECT db.example:6984 HTTP/1.1\r\nHost: db.example:6984\r\n"
        b"Proxy-Authorization: " + basic("carol", PASSWORD).encode() + b"\r\n\r\n"
    )
    assert tunnel.wire(8) == tunnel.wire()[8:]
    assert tunnel.request_bytes == len(tunnel.wire())
    assert PASSWORD not in repr(tunnel)
    v6 = Tunnel(Proxy("http://proxy.corp:3128"), "fd00::7", 443)
    assert v6.wire().startswith(b"CONNECT [fd00::7]:443 HTTP/1.1\r\nHost: [fd00::7]:443\r\n")


@pytest.mark.parametrize("target", ["db.example:443", "[::1]:443"])
def test_prepared_requests_take_authority_form_only_for_connect(target: str) -> None:
    wire = PreparedRequest("CONNECT", target, target).wire()
    assert wire.startswith(b"CONNECT " + target.encode())
    with pytest.raises(ValueError):
        PreparedRequest("GET", target, target)
    with pytest.raises(ValueError):
        PreparedRequest("CONNECT", "/path", target)


# -- the proxy's answer to CONNECT ----------------------------------------------------------------


def answer_bytewise(tunnel: Tunnel, answer: bytes) -> List[bool]:
    return [tunnel.receive(answer[i : i + 1]) for i in range(len(answer))]


def test_a_2xx_answer_opens_the_tunnel_only_once_its_head_is_complete() -> None:
    answer = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n"
    whole = Tunnel(Proxy(PROXY), "db.example", 6984)
    assert whole.receive(answer) is True
    split = Tunnel(Proxy(PROXY), "db.example", 6984)
    assert answer_bytewise(split, answer) == [False] * (len(answer) - 1) + [True]


def test_a_2xx_answer_to_connect_has_no_body_whatever_its_headers_say() -> None:
    # RFC 9112 §6.3 rule 2: what follows the head is the tunnel's, never a body.
    parser = ResponseParser("CONNECT")
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n\x16\x03\x01")
    head = parser.next_event()
    assert isinstance(head, Response) and head.status_code == 200 and not head.keep_alive
    assert isinstance(parser.next_event(), EndOfMessage)
    assert parser.trailing_data == (b"\x16\x03\x01", False)
    # A refusal has its body as any answer does.
    parser = ResponseParser("CONNECT")
    parser.receive_data(b"HTTP/1.1 407 Auth\r\nContent-Length: 5\r\n\r\nno!")
    assert isinstance(parser.next_event(), Response)
    assert parser.next_event().data == b"no!"  # type: ignore[union-attr]
    assert parser.next_event() is NEED_DATA


def test_bytes_after_the_2xx_head_are_a_protocol_error() -> None:
    # The origin cannot speak first in TLS: such bytes would be taken for its handshake.
    with pytest.raises(ProtocolError, match="before TLS began"):
        Tunnel(Proxy(PROXY), "db.example", 6984).receive(b"HTTP/1.1 200 OK\r\n\r\nhello")


@pytest.mark.parametrize("status", [407, 401])
def test_a_refused_login_is_fatal_and_names_the_proxy_not_the_password(status: int) -> None:
    tunnel = Tunnel(Proxy(PROXY), "db.example", 6984)
    with pytest.raises(HTTPError) as info:
        tunnel.receive(b"HTTP/1.1 %d No\r\nContent-Length: 0\r\n\r\n" % status)
    error = info.value
    assert error.status == status and is_fatal(error)
    assert isinstance(error, Unauthorized) is (status == 401)
    assert "http://proxy.corp:3128" in str(error) and "'carol'" in str(error)
    assert PASSWORD not in str(error) + repr(error)


def test_a_proxy_that_wants_a_login_none_was_given_says_so() -> None:
    tunnel = Tunnel(Proxy("http://proxy.corp:3128"), "db.example", 6984)
    with pytest.raises(HTTPError, match="asks for a login"):
        tunnel.receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_proxy_that_cannot_reach_the_origin_is_a_retried_connect_error(status: int) -> None:
    tunnel = Tunnel(Proxy(PROXY), "db.example", 6984)
    with pytest.raises(ConnectError, match="could not reach db.example:6984") as info:
        tunnel.receive(b"HTTP/1.1 %d Bad Gateway\r\n\r\n" % status)
    assert not is_fatal(info.value)
    assert "http://proxy.corp:3128" in str(info.value)


def test_a_forbidden_tunnel_is_fatal() -> None:
    tunnel = Tunnel(Proxy(PROXY), "db.example", 25)
    with pytest.raises(HTTPError, match="refused CONNECT db.example:25") as info:
        tunnel.receive(b"HTTP/1.1 403 Access violation\r\n\r\n")
    assert info.value.status == 403 and is_fatal(info.value)


def test_a_proxy_that_closes_before_answering_is_a_retried_connect_error() -> None:
    tunnel = Tunnel(Proxy(PROXY), "db.example", 6984)
    with pytest.raises(ConnectError, match="closed the connection") as info:
        tunnel.receive(b"")
    assert not is_fatal(info.value)
    garbled = Tunnel(Proxy(PROXY), "db.example", 6984)
    with pytest.raises(ProtocolError):
        garbled.receive(b"SSH-2.0-OpenSSH\r\n\r\n")


@pytest.mark.parametrize(
    "status, body, refused",
    [
        (407, b"", True),
        (401, b"<html>401 Unauthorized</html>", True),  # tinyproxy's answer to a wrong login
        (401, b'{"error":"unauthorized","reason":"Name or password is incorrect."}', False),
        (403, b"<html></html>", False),
        (200, b"", False),
    ],
)
def test_which_forwarded_answers_are_the_proxy_refusing_its_login(
    status: int, body: bytes, refused: bool
) -> None:
    assert refused_by_proxy(status, body) is refused


def test_the_environment_is_read_as_urllib_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our own reading (urllib.request costs 3.4 MiB to import) must agree with urllib's.
    import urllib.request

    cases = [
        {"HTTP_PROXY": "http://up:1", "https_proxy": "http://low:2", "NO_PROXY": "a,b"},
        {"HTTP_PROXY": "http://up:1", "http_proxy": "http://low:2"},
        {"HTTP_PROXY": "http://up:1", "http_proxy": ""},
        {"HTTP_PROXY": "http://up:1", "REQUEST_METHOD": "GET", "ALL_PROXY": "http://all:3"},
        {"http_proxy": "http://low:2", "REQUEST_METHOD": "GET"},
        {"Http_Proxy": "http://mixed:4"},
    ]
    for case in cases:
        for name in list(os.environ):
            if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
                monkeypatch.delenv(name)
        for name, value in case.items():
            monkeypatch.setenv(name, value)
        assert _proxy.proxies_from_environment() == urllib.request.getproxies_environment()
