"""A real database followed through a real HTTP proxy: tinyproxy, started for the session.

Plain HTTP goes through it as absolute-form requests; ``https://`` through its CONNECT to a
trustme-certified TLS front of the test server (``proxyserver.TLSFront``), with the origin's
certificate verified inside the tunnel. Each path is shown with a one-shot ``fetch()`` and a
continuous feed that receives live changes, with and without the proxy's login; then the
environment choosing the proxy and ``NO_PROXY`` bypassing it, refused logins (fatal, naming the
proxy, never the password), refusals and failures of the tunnel, the CONNECT phase bounded by
the connecting deadline, and the chaos test's fault proxy between a consumer and the proxy.

tinyproxy is installed by the suite when missing (``proxyserver.ensure_installed``); where it
cannot be, these tests skip with the reason, except under ``CI=true``, where they fail.
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from chaosrun import GAP_BOUND_S, Follower, alternating_plan, run_until
from couch3 import FakeClock
from faultproxy import FaultProxy
from proxyserver import ProxyUnavailable, RunningProxy, TLSFront, start_tinyproxy

import changeloop
from changeloop import (
    ConnectError,
    ConnectTimeout,
    Consumer,
    FeedEvent,
    HTTPError,
    Loop,
    Server,
    TLSError,
)
from changeloop.consumer import WATCHDOG_RESOLUTION

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "carol", "pr0xy.s3cret"  # tinyproxy's BasicAuth takes [-a-z0-9._] only
HEARTBEAT_MS = 500
FEED_DEADLINE_S = 15.0


# -- the proxies and the TLS front, once per session ---------------------------------------------


def _origin(couchdb_url: str) -> Tuple[str, int]:
    parts = urllib.parse.urlsplit(couchdb_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@pytest.fixture(scope="session")
def tls_front(couchdb_url: str) -> Iterator[TLSFront]:
    """``https://127.0.0.1:port`` in front of the test server; trust ``cafile``."""
    with TLSFront(*_origin(couchdb_url), names=["127.0.0.1", "localhost"]) as front:
        yield front


@pytest.fixture(scope="session")
def wrong_name_front(couchdb_url: str) -> Iterator[TLSFront]:
    """A TLS front whose certificate is for another name."""
    with TLSFront(*_origin(couchdb_url), names=["db.elsewhere.example"]) as front:
        yield front


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A loopback port nothing listens on (tinyproxy may CONNECT to it, and fail)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tinyproxy(**options: Any) -> RunningProxy:
    try:
        return start_tinyproxy(**options)
    except ProxyUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true, and the real proxy is missing: %s" % exc)
        pytest.skip("no real proxy to test against: %s" % exc)


@pytest.fixture(scope="session")
def connect_ports(tls_front: TLSFront, wrong_name_front: TLSFront, closed_port: int) -> List[int]:
    return [tls_front.port, wrong_name_front.port, closed_port]


@pytest.fixture(scope="session")
def open_proxy(connect_ports: List[int]) -> Iterator[RunningProxy]:
    with _tinyproxy(connect_ports=connect_ports) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def auth_proxy(connect_ports: List[int]) -> Iterator[RunningProxy]:
    with _tinyproxy(connect_ports=connect_ports, login=(USER, PASSWORD)) as proxy:
        yield proxy


def with_login(proxy: RunningProxy, user: str = USER, password: str = PASSWORD) -> str:
    return "http://%s:%s@127.0.0.1:%d" % (user, password, proxy.port)


class Route:
    """One way to the test server through a proxy: its URL, its proxy URL, and proof of use."""

    def __init__(self, mode: str, couchdb_url: str, front: TLSFront, proxy: RunningProxy) -> None:
        self.mode = mode
        self.proxy = proxy
        if mode == "tls":
            self.url, self.cafile = front.url, front.cafile
            self.mark = "CONNECT 127.0.0.1:%d" % front.port
        else:
            self.url, self.cafile = couchdb_url, None
            self.mark = "GET %s/" % couchdb_url  # absolute-form, as the proxy logs it
        self._log_from = len(proxy.log())

    def server(self, proxy_url: str, **options: Any) -> Server:
        return Server(self.url, proxy=proxy_url, cafile=self.cafile, **options)

    def used(self) -> int:
        """Requests of this route the proxy logged since this route was made."""
        return self.proxy.log()[self._log_from :].count(self.mark)


@pytest.fixture(params=["plain", "tls"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["open", "login"])
def routed(
    request: pytest.FixtureRequest,
    mode: str,
    couchdb_url: str,
    tls_front: TLSFront,
    open_proxy: RunningProxy,
    auth_proxy: RunningProxy,
) -> Tuple[Route, str]:
    """A route through the proxy without a login, or through the one that asks for it."""
    proxy = open_proxy if request.param == "open" else auth_proxy
    url = proxy.url if request.param == "open" else with_login(proxy)
    return Route(mode, couchdb_url, tls_front, proxy), url


# -- the two ways of reading a feed, through the proxy ---------------------------------------------


def test_fetch_through_the_proxy(
    routed: Tuple[Route, str], couchdb_admin: Any, db_name: str
) -> None:
    route, proxy_url = routed
    couchdb_admin.put_db(db_name)
    for n in range(3):
        couchdb_admin.post_doc(db_name, {"_id": "doc-%d" % n})
    with route.server(proxy_url) as server:
        answer = Consumer(server.get_db(db_name)).fetch(since=0)
        assert sorted(r["id"] for r in answer["results"]) == ["doc-0", "doc-1", "doc-2"]
        assert server.get_db(db_name).get("doc-1")["_id"] == "doc-1"  # the blocking client too
    assert route.used() >= 1, route.proxy.log()[-2000:]


def test_a_continuous_feed_through_the_proxy_gets_live_changes(
    routed: Tuple[Route, str], couchdb_admin: Any, db_name: str
) -> None:
    route, proxy_url = routed
    couchdb_admin.put_db(db_name)
    couchdb_admin.post_doc(db_name, {"_id": "before"})
    seen: List[str] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(route.server(proxy_url))
        loop = stack.enter_context(Loop())
        consumer = Consumer(server.get_db(db_name), loop, on_connect=lambda e: None)
        stack.callback(consumer.close)

        def on_change(change: Dict[str, Any]) -> None:
            seen.append(change["id"])
            if change["id"] == "before":  # following: now write while it listens
                threading.Thread(target=write_later, daemon=True).start()
            if len(seen) == 4:
                consumer.stop()

        def write_later() -> None:
            for n in range(3):
                couchdb_admin.post_doc(db_name, {"_id": "live-%d" % n})

        consumer.start(on_change, since=0, heartbeat=HEARTBEAT_MS)
        deadline = time.monotonic() + FEED_DEADLINE_S
        while consumer.running and time.monotonic() < deadline:
            loop.run_once(0.05)
        assert consumer.error is None
    assert seen == ["before", "live-0", "live-1", "live-2"]
    assert consumer.connections == 1
    assert route.used() >= 1, route.proxy.log()[-2000:]


# -- where the proxy comes from -------------------------------------------------------------------


def test_the_environment_chooses_the_proxy(
    mode: str,
    couchdb_url: str,
    tls_front: TLSFront,
    open_proxy: RunningProxy,
    couchdb_admin: Any,
    db_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    couchdb_admin.put_db(db_name)
    route = Route(mode, couchdb_url, tls_front, open_proxy)
    monkeypatch.setenv("HTTPS_PROXY" if mode == "tls" else "http_proxy", open_proxy.url)
    with Server(route.url, cafile=route.cafile) as server:
        assert server.proxy == open_proxy.url
        Consumer(server.get_db(db_name)).fetch(since=0)
    assert route.used() >= 1


BYPASSING = ["127.0.0.1", "127.0.0.0/8", "*", "localhost,127.0.0.1:{port}"]


@pytest.mark.parametrize("no_proxy", BYPASSING)
def test_no_proxy_bypasses_the_proxy(
    no_proxy: str,
    mode: str,
    couchdb_url: str,
    tls_front: TLSFront,
    open_proxy: RunningProxy,
    couchdb_admin: Any,
    db_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    couchdb_admin.put_db(db_name)
    couchdb_admin.post_doc(db_name, {"_id": "one"})
    route = Route(mode, couchdb_url, tls_front, open_proxy)
    port = urllib.parse.urlsplit(route.url).port
    monkeypatch.setenv("ALL_PROXY", open_proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port))
    with Server(route.url, cafile=route.cafile) as server:
        assert server.proxy is None
        answer = Consumer(server.get_db(db_name)).fetch(since=0)
    assert [r["id"] for r in answer["results"]] == ["one"]
    assert route.used() == 0
    # The same environment without the exemption does go through the proxy.
    monkeypatch.setenv("NO_PROXY", "db.elsewhere.example")
    with Server(route.url, cafile=route.cafile) as server:
        Consumer(server.get_db(db_name)).fetch(since=0)
    assert route.used() >= 1


def test_proxy_false_ignores_the_environment(
    couchdb_url: str, couchdb_admin: Any, db_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    couchdb_admin.put_db(db_name)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing there: would fail
    with Server(couchdb_url) as server, pytest.raises(ConnectError):
        server.info()
    with Server(couchdb_url, proxy=False) as server:
        assert Consumer(server.get_db(db_name)).fetch(since=0)["results"] == []


# -- refusals --------------------------------------------------------------------------------------


def assert_no_password(error: BaseException, records: List[logging.LogRecord]) -> None:
    """The password is in no message, no ``repr``, no log line, and no locals of the library's
    frames (an error tracker records them by ``repr``; the test's own frames hold the URL)."""
    texts = [str(error), repr(error)] + [r.getMessage() for r in records]
    library = os.path.dirname(changeloop.__file__)
    tb = error.__traceback__
    frames = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(library):
            frames += 1
            texts += [repr(value) for value in tb.tb_frame.f_locals.values()]
        tb = tb.tb_next
    assert frames >= 2  # the checks saw the library's frames
    leaks = [text[:200] for text in texts if PASSWORD in text or "wrong-pw" in text]
    assert not leaks, leaks


@pytest.mark.parametrize("login", ["wrong", "missing"])
def test_a_refused_proxy_login_is_fatal_and_names_the_proxy(
    login: str,
    mode: str,
    couchdb_url: str,
    tls_front: TLSFront,
    auth_proxy: RunningProxy,
    couchdb_admin: Any,
    db_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    couchdb_admin.put_db(db_name)
    route = Route(mode, couchdb_url, tls_front, auth_proxy)
    proxy_url = with_login(auth_proxy, password="wrong-pw") if login == "wrong" else auth_proxy.url
    with route.server(proxy_url) as server:
        with pytest.raises(HTTPError) as info:  # the blocking client
            server.info()
        client_error = info.value
        with Loop() as loop:
            errors: List[FeedEvent] = []
            consumer = Consumer(server.get_db(db_name), loop, on_error=errors.append)
            consumer.start(lambda change: None, since=0, heartbeat=HEARTBEAT_MS)
            deadline = time.monotonic() + FEED_DEADLINE_S
            while consumer.running and time.monotonic() < deadline:
                loop.run_once(0.05)
            consumer.close()
    # tinyproxy answers a missing login with 407 and a wrong one with 401.
    status = 401 if login == "wrong" else 407
    for error in (client_error, consumer.error):
        assert isinstance(error, HTTPError) and error.status == status, repr(error)
        assert auth_proxy.url in str(error) or "127.0.0.1:%d" % auth_proxy.port in str(error)
        assert_no_password(error, caplog.records)
    assert not consumer.running and consumer.connections == 1  # fatal: no second attempt
    assert [e.will_retry for e in errors] == [False]


def test_the_origin_certificate_is_verified_inside_the_tunnel(
    wrong_name_front: TLSFront, tls_front: TLSFront, open_proxy: RunningProxy, db_name: str
) -> None:
    # The right CA, the wrong name: the host name checked is the origin's, not the proxy's.
    with Server(wrong_name_front.url, proxy=open_proxy.url, cafile=wrong_name_front.cafile) as s:
        with pytest.raises(TLSError, match="certificate verify failed") as info:
            s.info()
        assert "127.0.0.1:%d" % wrong_name_front.port in str(info.value)
        loop = Loop()
        consumer = Consumer(s.get_db(db_name), loop)
        consumer.start(lambda change: None, since=0, heartbeat=HEARTBEAT_MS)
        deadline = time.monotonic() + FEED_DEADLINE_S
        while consumer.running and time.monotonic() < deadline:
            loop.run_once(0.05)
        consumer.close()
        loop.close()
        assert isinstance(consumer.error, TLSError) and consumer.connections == 1
    # A certificate from a CA not trusted: refused too.
    with Server(tls_front.url, proxy=open_proxy.url, cafile=wrong_name_front.cafile) as s:
        with pytest.raises(TLSError, match="certificate verify failed"):
            s.info()


def test_a_tunnel_the_proxy_forbids_is_fatal(
    couchdb_url: str, open_proxy: RunningProxy, db_name: str
) -> None:
    # tinyproxy refuses CONNECT to a port not in its ConnectPort list with a 403.
    host, port = _origin(couchdb_url)
    with Server("https://%s:%d" % (host, port), proxy=open_proxy.url) as server:
        with pytest.raises(HTTPError, match="refused CONNECT") as info:
            server.info()
    assert info.value.status == 403 and open_proxy.url in str(info.value)


def test_an_origin_the_proxy_cannot_reach_is_retried(
    closed_port: int, open_proxy: RunningProxy, db_name: str
) -> None:
    with Server("https://127.0.0.1:%d" % closed_port, proxy=open_proxy.url) as server:
        with pytest.raises(ConnectError, match="could not reach 127.0.0.1:%d" % closed_port):
            server.info()
        errors: List[FeedEvent] = []
        with Loop() as loop:
            consumer = Consumer(server.get_db(db_name), loop, on_error=errors.append)
            consumer.start(lambda change: None, since=0, heartbeat=HEARTBEAT_MS)
            deadline = time.monotonic() + FEED_DEADLINE_S
            while len(errors) < 2 and time.monotonic() < deadline:
                loop.run_once(0.05)
            consumer.close()
    assert len(errors) >= 2 and all(e.will_retry for e in errors), errors
    assert all(isinstance(e.error, ConnectError) for e in errors)


def test_the_connect_phase_is_bounded_by_the_connecting_deadline(db_name: str) -> None:
    # A proxy that takes the connection and never answers CONNECT: the consumer's connecting
    # allowance covers the exchange (no sleeping: the loop's clock is moved by hand).
    clock = FakeClock()
    with contextlib.ExitStack() as stack:
        silent = stack.enter_context(socket.socket())
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads
        proxy_url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        server = stack.enter_context(Server("https://db.example:6984", proxy=proxy_url))
        loop = stack.enter_context(Loop(clock=clock))
        errors: List[FeedEvent] = []
        consumer = Consumer(server.get_db(db_name), loop, on_error=errors.append)
        stack.callback(consumer.close)
        consumer.start(lambda change: None, since=0, heartbeat=HEARTBEAT_MS)
        for _ in range(10):
            loop.run_once(0.01)
        assert consumer.phase == "connecting"
        assert "tunnelling" in repr(consumer._stream.connection)  # type: ignore[union-attr]
        clock.advance(3 * HEARTBEAT_MS / 1000 - 0.05)
        for _ in range(5):
            loop.run_once(0.01)
        assert errors == []
        clock.advance(0.05 + WATCHDOG_RESOLUTION + 0.01)
        for _ in range(20):
            if errors:
                break
            loop.run_once(0.01)
    (event,) = errors
    assert isinstance(event.error, ConnectTimeout) and event.will_retry
    assert "proxy CONNECT" in str(event.error)


# -- reconnecting through the proxy -------------------------------------------------------------


def test_reconnection_through_the_proxy_resumes_without_loss(
    couchdb_url: str, open_proxy: RunningProxy, couchdb_admin: Any, db_name: str
) -> None:
    # consumer -> fault proxy (cuts, resets, stalls in every phase) -> tinyproxy -> server
    couchdb_admin.put_db(db_name)
    written: List[str] = []
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.wait(0.05):
            couchdb_admin.post_doc(db_name, {"_id": "doc-%04d" % n})
            written.append("doc-%04d" % n)
            n += 1

    writer = threading.Thread(target=write, daemon=True)
    with contextlib.ExitStack() as stack:
        faults = stack.enter_context(
            FaultProxy("127.0.0.1", open_proxy.port, seed=18, plan=alternating_plan, max_faults=6)
        )
        server = stack.enter_context(Server(couchdb_url, proxy=faults.url))
        loop = stack.enter_context(Loop())
        follower = Follower(0, faults, server.get_db(db_name), loop)
        stack.callback(follower.consumer.close)
        writer.start()
        stack.callback(writer.join, 10)
        stack.callback(stop.set)
        follower.start()
        deadline = time.monotonic() + 40
        problem = run_until(loop, [follower], follower.answered, deadline, GAP_BOUND_S)
        stop.set()
        writer.join(10)
        expected = set(written)
        if problem is None:
            problem = run_until(
                loop, [follower], lambda: expected <= {k[1] for k in follower.keys}, deadline,
                GAP_BOUND_S,
            )  # fmt: skip
    report = "%s; %s" % (follower.summary(), problem)
    assert problem is None, report
    assert faults.connection_faults == 6, report
    ids = [delivery.key[1] for delivery in follower.deliveries]
    assert ids == sorted(expected), report  # every change, once, in order
    assert follower.consumer.connections == faults.connections >= 7, report


# -- the command line ---------------------------------------------------------------------------


def cli(tmp_path: Any, *args: str, **env: str) -> "subprocess.CompletedProcess[str]":
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(changeloop.__file__)))
    variables = {k: v for k, v in os.environ.items() if not k.startswith("COUCHDB_")}
    variables.update(HOME=str(home), PYTHONPATH=package_parent, PYTHONIOENCODING="utf-8", **env)
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "changeloop", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=variables,
        cwd=str(tmp_path),
        text=True,
        timeout=FEED_DEADLINE_S,
    )


def test_the_command_line_takes_a_proxy_or_none(
    tmp_path: Any,
    couchdb_url: str,
    open_proxy: RunningProxy,
    auth_proxy: RunningProxy,
    couchdb_admin: Any,
    db_name: str,
) -> None:
    couchdb_admin.put_db(db_name)
    couchdb_admin.post_doc(db_name, {"_id": "one"})
    url = "%s/%s" % (couchdb_url, db_name)
    mark = "GET %s/%s/_changes" % (couchdb_url, db_name)
    before = open_proxy.log().count(mark)
    done = cli(tmp_path, "--feed", "normal", "--proxy", open_proxy.url, url)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == ["one"]
    assert open_proxy.log().count(mark) == before + 1
    # The environment's proxy, refusing a login none was given: fatal (3), naming the proxy.
    refused = cli(tmp_path, "--feed", "normal", url, HTTP_PROXY=auth_proxy.url)
    assert refused.returncode == 3, refused.stderr
    assert auth_proxy.url in refused.stderr and "proxy's login" in refused.stderr
    # --no-proxy: the same environment, ignored.
    bypassed = cli(tmp_path, "--feed", "normal", "--no-proxy", url, HTTP_PROXY=auth_proxy.url)
    assert bypassed.returncode == 0, bypassed.stderr
    # --proxy wins over the environment, its login used and never shown.
    logged_in = cli(
        tmp_path, "--feed", "normal", "--proxy", with_login(auth_proxy), url,
        HTTP_PROXY="http://127.0.0.1:9",
    )  # fmt: skip
    assert logged_in.returncode == 0, logged_in.stderr
    assert PASSWORD not in logged_in.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--proxy", "https://carol:%s@127.0.0.1:3129" % PASSWORD], "is not supported"),
        (["--proxy", "http://127.0.0.1:3128", "--no-proxy"], "not both"),
    ],
)
def test_the_command_line_refuses_bad_proxy_options(
    tmp_path: Any, args: List[str], message: str
) -> None:
    done = cli(tmp_path, *args, "http://127.0.0.1:5984/db")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert PASSWORD not in done.stderr
