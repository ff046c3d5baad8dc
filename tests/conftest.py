"""Shared fixtures: the real server (started lazily, once), unique database names, a setup helper.

Tests that use ``couchdb_url`` (directly or through ``couchdb_admin``) are marked ``server``
automatically, so ``pytest -m "not server"`` runs everything that needs no Node.js or CouchDB.
"""

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
from testserver import server_url_from_env, start_server

from changeloop import Database, Server

# `npm install` run by hand in tests/testserver/ would put thousands of JS test files here.
collect_ignore = ["testserver"]

# Generous for a loopback server, short enough that a hung setup fails well before pytest-timeout.
ADMIN_TIMEOUT_S = 10.0


@pytest.fixture(scope="session", autouse=True)
def no_proxy_from_the_environment() -> Iterator[None]:
    """Take ``*_proxy`` variables out of the environment for the whole session.

    changeloop honours ``http_proxy`` and friends (issue 18), and every server of the suite is on
    loopback: a developer's proxy must not carry the tests' requests, nor those of the command
    line's subprocesses. test_proxy.py sets its own, per test. (.ci/run installs tinyproxy
    before, with the environment as it is.)
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.lower().endswith("_proxy"):
                patch.delenv(name)
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Mark every test that needs the real server, whichever fixture pulled it in."""
    for item in items:
        if "couchdb_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def couchdb_url() -> Iterator[str]:
    """The server's base URL: ``COUCHDB_URL`` if set, else a pouchdb-server for this session."""
    url = server_url_from_env()
    if url is not None:
        yield url.rstrip("/")
        return
    with start_server() as server:
        yield server.url


@pytest.fixture
def db_name() -> str:
    """A database name no other test uses (CouchDB: lowercase, starting with a letter)."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def server(couchdb_url: str) -> Iterator[Server]:
    """changeloop's own client for the real server, closed after the test."""
    with Server(couchdb_url) as server:
        yield server


@pytest.fixture
def db(server: Server, db_name: str) -> Iterator[Database]:
    """A fresh database on the real server, deleted after the test."""
    database = server.create_db(db_name)
    yield database
    server.delete_db(db_name)


class AdminError(Exception):
    """The server answered a setup request with an error status."""

    def __init__(self, method: str, url: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {url} -> {status}: {body!r}")
        self.status = status
        self.body = body


class CouchAdmin:
    """Plain-urllib helper for test setup and teardown, where changeloop is not the subject.

    Always asks for JSON (pouchdb-server answers text/plain otherwise) and never for gzip.
    Credentials in the base URL (``http://user:pass@host``) are sent as Basic auth.
    """

    def __init__(self, base_url: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        self.base_url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        self.base_url = self.base_url.rstrip("/")
        self._authorization: Optional[str] = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._authorization = f"Basic {token}"
        # No ProxyHandler settings: an http_proxy in the environment must not see loopback tests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.created: List[str] = []

    def __repr__(self) -> str:
        return f"<CouchAdmin {self.base_url} created={len(self.created)}>"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON answer.

        Raises:
            AdminError: the status was 400 or above.
        """
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=ADMIN_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:  # it holds the response's socket; close it or it leaks a ResourceWarning
                raw = exc.read()
            try:
                detail: Any = json.loads(raw)
            except ValueError:
                detail = raw
            raise AdminError(method, url, exc.code, detail) from None

    def get(self, path: str) -> Dict[str, Any]:
        """GET ``path`` (already quoted, starting with ``/``)."""
        result: Dict[str, Any] = self.request("GET", path)
        return result

    def put_db(self, name: str) -> Dict[str, Any]:
        """Create database ``name``; it is deleted again when the test ends."""
        result: Dict[str, Any] = self.request("PUT", "/" + _quote(name))
        self.created.append(name)
        return result

    def delete_db(self, name: str) -> Dict[str, Any]:
        """Delete database ``name``."""
        result: Dict[str, Any] = self.request("DELETE", "/" + _quote(name))
        if name in self.created:
            self.created.remove(name)
        return result

    def post_doc(self, db: str, doc: Dict[str, Any]) -> Dict[str, Any]:
        """Create a document; returns CouchDB's answer (``ok``, ``id``, ``rev``)."""
        result: Dict[str, Any] = self.request("POST", "/" + _quote(db), doc)
        return result

    def cleanup(self) -> None:
        """Delete the databases this helper created, so a real CouchDB does not fill up."""
        for name in list(self.created):
            try:
                self.delete_db(name)
            except AdminError as exc:
                if exc.status != 404:  # the test may have deleted it itself
                    raise


def _quote(name: str) -> str:
    # Database names may contain "/", which must travel as %2F inside one path segment.
    return urllib.parse.quote(name, safe="")


@pytest.fixture
def couchdb_admin(couchdb_url: str) -> Iterator[CouchAdmin]:
    """A setup/teardown helper bound to the test server; deletes its databases afterwards."""
    admin = CouchAdmin(couchdb_url)
    yield admin
    admin.cleanup()
