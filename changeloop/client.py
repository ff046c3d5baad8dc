"""The blocking client: ``Server`` and ``Database`` for one-shot CouchDB requests.

Each request borrows a kept-alive connection from a small per-server pool (or opens one), writes
the request serialized by ``_request``, and reads the answer with the sans-IO parser in a plain
``recv`` loop. A pooled connection the server has closed in the meantime (CouchDB and Node close
idle keep-alive connections after a few seconds) shows up as a close before any response byte;
the request is then retried once on a fresh connection. Error statuses become typed
:class:`~changeloop.errors.HTTPError` subclasses carrying CouchDB's ``error`` and ``reason``.

Credentials come from the URL (percent-decoded) or ``auth=``; they are sent as Basic auth or, with
``session=True``, exchanged for a cookie at ``/_session`` that is renewed once on a 401. They never
appear in a ``repr``, a log line or an error message.
"""

import json
import logging
import ssl
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from . import _transport
from ._events import NEED_DATA, ConnectionClosed, Data, EndOfMessage, Response
from ._http import ResponseParser
from ._request import basic_auth_value, serialize_request
from ._version import __version__
from .errors import (
    HTTPError,
    ProtocolError,
    ReadError,
    http_error_from_body,
)

__all__ = ["Server", "Database", "encode_query", "DEFAULT_URL", "DEFAULT_TIMEOUT_S"]

logger = logging.getLogger(__name__)

#: Where CouchDB listens by default.
DEFAULT_URL = "http://127.0.0.1:5984"
#: Seconds to connect, and then to wait for each read, on one-shot requests.
DEFAULT_TIMEOUT_S = 30.0
#: Bytes asked of ``recv`` at a time: large enough that a big response takes few system calls.
RECV_BYTES = 256 * 1024
#: Idle connections kept per server; one-shot use rarely needs more than one at a time.
MAX_IDLE_CONNECTIONS = 4
#: Query parameters CouchDB reads as JSON, so strings among them are JSON-quoted.
JSON_PARAMS = frozenset(["key", "keys", "startkey", "endkey", "start_key", "end_key", "doc_ids"])

USER_AGENT = "changeloop/%s" % __version__
Json = Any


def encode_query(params: Mapping[str, Any]) -> str:
    """Encode CouchDB query parameters: booleans as ``true``/``false``, lists and dicts as JSON.

    ``None`` values are left out; strings pass as they are (``since="now"``, a string seq), except
    for the parameters CouchDB parses as JSON (``key``, ``startkey``...), which are JSON-encoded.
    """
    pairs = []
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple, dict)) or name in JSON_PARAMS:
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = str(value)
        pairs.append("%s=%s" % (quote(name, safe=""), quote(text, safe="")))
    return "&".join(pairs)


def quote_db_name(name: str) -> str:
    """Quote a database name for a URL path: ``a/b`` becomes ``a%2Fb`` as CouchDB requires."""
    return quote(name, safe="")


def quote_doc_id(docid: str) -> str:
    """Quote a document id, keeping the slash of ``_design/`` and ``_local/`` ids."""
    for prefix in ("_design/", "_local/"):
        if docid.startswith(prefix):
            return prefix + quote(docid[len(prefix) :], safe="")
    return quote(docid, safe="")


class _Endpoint:
    """Where a server is and how to reach it; shared with the consumers of its databases."""

    def __init__(self, url: str, ssl_context: Optional[ssl.SSLContext]) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host, not %r" % url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None
        bracketed = "[%s]" % self.host if ":" in self.host else self.host
        default_port = 443 if self.tls else 80
        self.host_header = (
            bracketed if self.port == default_port else "%s:%d" % (bracketed, self.port)
        )
        #: The URL with any credentials removed: safe for messages and logs.
        self.url = "%s://%s%s" % (parts.scheme, self.host_header, self.prefix)
        self.ssl_context = (ssl_context or _transport.make_ssl_context()) if self.tls else None


class _Connection:
    """One blocking keep-alive connection and the parser reading it."""

    def __init__(self, endpoint: _Endpoint, timeout: Optional[float]) -> None:
        self.endpoint = endpoint
        self.sock = _transport.connect_blocking(
            endpoint.host, endpoint.port, ssl_context=endpoint.ssl_context, timeout=timeout
        )
        self.parser = ResponseParser()
        self.used = False

    def exchange(
        self, method: str, request: bytes, timeout: Optional[float]
    ) -> Tuple[Optional[Response], bytes]:
        """Send a request and read the whole response; ``None`` if closed before it started."""
        endpoint = self.endpoint
        if self.used:
            self.parser.start_next_response(method)
        else:
            self.parser = ResponseParser(method)
        self.used = True
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(request)
        except OSError as exc:
            if _is_reset(exc):
                return None, b""  # a stale keep-alive connection: the caller retries
            raise _transport.map_socket_error(
                exc, host=endpoint.host, port=endpoint.port, phase="write"
            ) from exc
        parser = self.parser
        head: Optional[Response] = None
        body: List[bytes] = []
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except OSError as exc:
                    if head is None and not parser.trailing_data[0] and _is_reset(exc):
                        return None, b""  # a stale keep-alive connection: the caller retries
                    raise _transport.map_socket_error(
                        exc, host=endpoint.host, port=endpoint.port, phase="read"
                    ) from exc
                parser.receive_data(data)
            elif isinstance(event, Response):
                head = event
            elif isinstance(event, Data):
                body.append(event.data)
            elif isinstance(event, EndOfMessage):
                assert head is not None
                return head, b"".join(body)
            elif isinstance(event, ConnectionClosed):
                return None, b""

    def close(self) -> None:
        self.sock.close()


def _is_reset(exc: OSError) -> bool:
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


class Server:
    """A CouchDB server, for one-shot requests; the entry point to its databases.

    Args:
        url: the server's URL, optionally with credentials (``http://user:pass@host:5984``) and a
            path prefix for a server behind a reverse proxy.
        auth: ``(user, password)``; takes precedence over credentials in the URL.
        session: exchange the credentials for a ``/_session`` cookie (renewed on a 401) instead of
            sending them with every request.
        timeout: seconds to connect and then to wait for each read; ``None`` waits forever.
        ssl_context: the TLS context for ``https`` URLs; defaults to a verifying one (TLS 1.2+).
        cafile, certfile, keyfile: shortcuts that build ``ssl_context``: a CA bundle to trust,
            and a client certificate and key.

    A ``Server`` may be shared between threads: each request borrows its own connection.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        auth: Optional[Tuple[str, str]] = None,
        session: bool = False,
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
        ssl_context: Optional[ssl.SSLContext] = None,
        cafile: Optional[str] = None,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
    ) -> None:
        if ssl_context is None and (cafile or certfile):
            ssl_context = _transport.make_ssl_context(
                cafile=cafile, certfile=certfile, keyfile=keyfile
            )
        self._endpoint = _Endpoint(url, ssl_context)
        if auth is not None:
            self._credentials: Optional[Tuple[str, str]] = (auth[0], auth[1])
        elif self._endpoint.username is not None:
            self._credentials = (self._endpoint.username, self._endpoint.password or "")
        else:
            self._credentials = None
        if session and self._credentials is None:
            raise ValueError("session=True needs credentials (auth= or user:password@ in the URL)")
        self._session = session
        self._cookie: Optional[str] = None
        self.timeout = timeout
        self._idle: List[_Connection] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The server's URL, without credentials."""
        return self._endpoint.url

    def __repr__(self) -> str:
        user = " user=%s" % self._credentials[0] if self._credentials else ""
        return "<Server %s%s idle=%d>" % (self.url, user, len(self._idle))

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # couchdbkit-style code never closes a Server: release its idle sockets quietly rather
        # than leaving them to the ResourceWarning of a garbage-collected socket.
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def close(self) -> None:
        """Close the idle pooled connections. The server stays usable; new ones open on demand."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- the CouchDB API ---------------------------------------------------------------------

    def info(self) -> Dict[str, Json]:
        """``GET /``: the welcome document with the server's version."""
        return self.request("GET", "/")  # type: ignore[no-any-return]

    def all_dbs(self) -> List[str]:
        """``GET /_all_dbs``: the names of every database."""
        return self.request("GET", "/_all_dbs")  # type: ignore[no-any-return]

    def create_db(self, name: str) -> "Database":
        """Create database ``name`` and return it.

        Raises:
            PreconditionFailed: the database exists already (CouchDB's ``file_exists``).
        """
        self.request("PUT", "/" + quote_db_name(name))
        return Database(self, name)

    def get_db(self, name: str) -> "Database":
        """Return database ``name`` without checking that it exists."""
        return Database(self, name)

    def get_or_create_db(self, name: str) -> "Database":
        """Return database ``name``, creating it if it does not exist yet."""
        try:
            return self.create_db(name)
        except HTTPError as exc:
            if exc.status != 412:
                raise
            return Database(self, name)

    def delete_db(self, name: str) -> None:
        """Delete database ``name``.

        Raises:
            NotFound: there is no such database.
        """
        self.request("DELETE", "/" + quote_db_name(name))

    def __getitem__(self, name: str) -> "Database":
        return self.get_db(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        status, _, _ = self.raw_request("HEAD", "/" + quote_db_name(name))
        return status == 200

    # -- requests -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[Json] = None,
        timeout: Union[float, None, str] = "default",
    ) -> Json:
        """Send one request and return the decoded JSON answer.

        Args:
            method: ``GET``, ``PUT``, ``POST``, ``DELETE``, ``HEAD``...
            path: the path below the server's URL, already quoted, e.g. ``/db/_all_docs``.
            params: query parameters, encoded by :func:`encode_query`.
            body: a JSON-serializable request body.
            timeout: seconds for this request, overriding the server's.

        Raises:
            HTTPError: (a subclass by status) the server answered 4xx or 5xx.
            NetworkError: connecting or reading failed (``ConnectError``, ``ReadTimeout``...).
            ProtocolError: the answer was not valid HTTP/1.1.
        """
        payload = None if body is None else json.dumps(body).encode("utf-8")
        _, _, data = self.raw_request(method, path, params=params, body=payload, timeout=timeout)
        if method == "HEAD" or not data:
            return None
        return _decode_json(data, method, self.url + path)

    def raw_request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[bytes] = None,
        headers: Iterable[Tuple[str, str]] = (),
        timeout: Union[float, None, str] = "default",
        raise_for_status: bool = True,
    ) -> Tuple[int, Response, bytes]:
        """Send one request and return ``(status, response head, body bytes)``.

        Like :meth:`request`, but the body is not decoded; a 4xx/5xx raises only when
        ``raise_for_status`` is true (``HEAD`` requests never raise for 404).
        """
        target = self._endpoint.prefix + path
        if params:
            target += "?" + encode_query(params)
        seconds = self.timeout if timeout == "default" else timeout
        assert seconds is None or isinstance(seconds, (int, float))
        extra = list(headers)
        if body is not None and not any(n.lower() == "content-type" for n, _ in extra):
            extra.append(("Content-Type", "application/json"))
        head, data = self._send(method, target, extra, body, seconds, retry_auth=self._session)
        if head.status_code >= 400 and raise_for_status and method != "HEAD":
            raise http_error_from_body(head.status_code, data, method=method, url=self.url + path)
        return head.status_code, head, data

    def _send(
        self,
        method: str,
        target: str,
        headers: List[Tuple[str, str]],
        body: Optional[bytes],
        timeout: Optional[float],
        *,
        retry_auth: bool,
    ) -> Tuple[Response, bytes]:
        request = serialize_request(
            method,
            target,
            self._endpoint.host_header,
            self.request_headers() + headers,
            body,
        )
        head, data = self._exchange(method, request, timeout)
        if head.status_code == 401 and retry_auth and target != self._endpoint.prefix + "/_session":
            logger.debug("%s: 401, renewing the session cookie", self.url)
            self.expire_session()
            self._login()
            return self._send(method, target, headers, body, timeout, retry_auth=False)
        return head, data

    def _exchange(
        self, method: str, request: bytes, timeout: Optional[float]
    ) -> Tuple[Response, bytes]:
        for attempt in (1, 2):
            connection = self._borrow(timeout)
            reused = connection.used
            try:
                head, data = connection.exchange(method, request, timeout)
            except BaseException:  # a failure, or Ctrl-C mid-request: the connection is spent
                connection.close()
                raise
            if head is None:
                connection.close()
                if reused and attempt == 1:
                    logger.debug("%s: pooled connection closed by the server; retrying", self.url)
                    continue
                raise ReadError("%s closed the connection before answering" % self.url)
            if head.keep_alive:
                self._give_back(connection)
            else:
                connection.close()
            return head, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _borrow(self, timeout: Optional[float]) -> _Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Connection(self._endpoint, timeout)

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def expire_session(self, cookie: Optional[str] = None) -> bool:
        """Forget the ``/_session`` cookie, so that the next request logs in again.

        For a 401 met outside :meth:`request` (a continuous feed's): CouchDB's cookies expire
        (after 10 minutes by default) and are refreshed only by requests made in time.

        Args:
            cookie: forget it only if it is still this one (the ``Cookie`` header the refused
                request carried): another request may have logged in again meanwhile.

        Returns:
            whether a cookie was forgotten (never without ``session=True``).
        """
        if self._cookie is None or (cookie is not None and cookie != self._cookie):
            return False
        self._cookie = None
        return True

    def request_headers(self) -> List[Tuple[str, str]]:
        """The headers every request carries: content negotiation, identity, credentials.

        ``Accept: application/json`` because pouchdb-server answers ``text/plain`` without it;
        ``Accept-Encoding: identity`` because a gzipping server (pouchdb-server does) holds
        back feed data in its compressor for seconds.
        """
        headers = [
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),
            ("User-Agent", USER_AGENT),
        ]
        if self._credentials is not None:
            if self._session:
                if self._cookie is None:
                    self._login()
                headers.append(("Cookie", self._cookie or ""))
            else:
                headers.append(("Authorization", basic_auth_value(*self._credentials)))
        return headers

    def _login(self) -> None:
        assert self._credentials is not None
        name, password = self._credentials
        body = json.dumps({"name": name, "password": password}).encode("utf-8")
        request = serialize_request(
            "POST",
            self._endpoint.prefix + "/_session",
            self._endpoint.host_header,
            [("Accept", "application/json"), ("Content-Type", "application/json")],
            body,
        )
        head, data = self._exchange("POST", request, self.timeout)
        if head.status_code >= 400:
            raise http_error_from_body(
                head.status_code, data, method="POST", url=self.url + "/_session"
            )
        for key, value in head.headers:
            if key == b"set-cookie" and value.startswith(b"AuthSession="):
                self._cookie = value.split(b";", 1)[0].decode("latin-1")
                return
        raise ProtocolError("%s/_session answered without an AuthSession cookie" % self.url)


class Database:
    """A CouchDB database, reached through its :class:`Server`."""

    def __init__(self, server: Server, name: str) -> None:
        if not name:
            raise ValueError("a database name cannot be empty")
        self.server = server
        self.name = name
        self.path = "/" + quote_db_name(name)

    def __repr__(self) -> str:
        return "<Database %r at %s>" % (self.name, self.server.url)

    def info(self) -> Dict[str, Json]:
        """``GET /db``: document count, update_seq and sizes."""
        return self.server.request("GET", self.path)  # type: ignore[no-any-return]

    def save_doc(self, doc: Dict[str, Json]) -> Dict[str, Json]:
        """Create or update ``doc``, setting its ``_id`` and ``_rev`` as couchdbkit did.

        Raises:
            Conflict: ``doc["_rev"]`` is not the current revision.
        """
        if "_id" in doc:
            path = self.path + "/" + quote_doc_id(doc["_id"])
            result = self.server.request("PUT", path, body=doc)
        else:
            result = self.server.request("POST", self.path, body=doc)
        doc["_id"] = result["id"]
        doc["_rev"] = result["rev"]
        return result  # type: ignore[no-any-return]

    def get(self, docid: str, **params: Any) -> Dict[str, Json]:
        """Fetch document ``docid``; ``params`` such as ``rev=`` or ``conflicts=True`` pass on.

        Raises:
            NotFound: there is no such document (or it was deleted).
        """
        path = self.path + "/" + quote_doc_id(docid)
        return self.server.request("GET", path, params=params)  # type: ignore[no-any-return]

    def doc_exist(self, docid: str) -> bool:
        """Whether document ``docid`` exists (a ``HEAD`` request)."""
        status, _, _ = self.server.raw_request("HEAD", self.path + "/" + quote_doc_id(docid))
        return status == 200

    def delete_doc(self, doc: Union[str, Dict[str, Json]]) -> Dict[str, Json]:
        """Delete a document, given as a dict with ``_id`` and ``_rev``, or as an id.

        An id alone is looked up first for its current revision.
        """
        if isinstance(doc, str):
            doc = self.get(doc)
        path = self.path + "/" + quote_doc_id(doc["_id"])
        result = self.server.request("DELETE", path, params={"rev": doc["_rev"]})
        if isinstance(doc, dict):
            doc["_rev"] = result["rev"]
        return result  # type: ignore[no-any-return]

    def bulk_save(self, docs: List[Dict[str, Json]]) -> List[Dict[str, Json]]:
        """Save many documents in one ``_bulk_docs`` request; set ``_id``/``_rev`` on each saved.

        Returns CouchDB's per-document results: failures (conflicts) are reported there, not
        raised, as CouchDB does.
        """
        results = self.server.request("POST", self.path + "/_bulk_docs", body={"docs": docs})
        for doc, result in zip(docs, results):
            if "rev" in result and "error" not in result:
                doc["_id"] = result["id"]
                doc["_rev"] = result["rev"]
        return results  # type: ignore[no-any-return]


def _decode_json(data: bytes, method: str, url: str) -> Json:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProtocolError("%s %s: the answer is not JSON: %r" % (method, url, data[:80])) from exc
