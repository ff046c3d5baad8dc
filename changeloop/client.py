"""The blocking client: ``Server`` and ``Database`` for one-shot CouchDB requests.

Each request borrows a kept-alive connection from a small per-server pool (or opens one), writes
the request serialized by ``_request``, and reads the answer with the sans-IO parser in a plain
``recv`` loop. A pooled connection the server has closed in the meantime (CouchDB and Node close
idle keep-alive connections after a few seconds) shows up as a close before any response byte;
a request safe to repeat (RFC 9110 §9.2.2: not a ``POST``) is then retried once on a fresh
connection. A pooled connection is reused only when nothing is left unread on it: bytes after a
response (a second, smuggled response; a body on a ``HEAD``, 204 or 304 answer) would otherwise
be read as the answer to the next request. Error statuses become typed
:class:`~changeloop.errors.HTTPError` subclasses carrying CouchDB's ``error`` and ``reason``.

Bodies are bounded: a success body by ``max_body_bytes``
(:class:`~changeloop.errors.ResponseTooLargeError`, raised as soon as a ``Content-Length``
announces more), an error body by ``MAX_ERROR_BODY_BYTES`` (the
rest is not read; the connection is closed).

Credentials come from the URL (percent-decoded) or ``auth=``; they are sent as Basic auth or, with
``session=True``, exchanged for a cookie at ``/_session`` that is renewed once on a 401. They never
appear in a ``repr``, a log line or an error message, nor in the locals of the frames a request
error passes through: they are held as :class:`~changeloop._request.Secret` values and written
into the request's bytes only as those go to the socket. The same holds for a proxy's login.

Behind an HTTP proxy (``proxy=``, else ``http_proxy``/``https_proxy``/``all_proxy`` and
``no_proxy`` from the environment: see ``_proxy``), plain ``http`` requests go to the proxy in
absolute form with ``Proxy-Authorization``; ``https`` ones through a ``CONNECT`` tunnel, with
the server's certificate verified as without a proxy.
"""

import json
import logging
import ssl
import threading
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote

from . import _transport
from ._connection import Connection, Endpoint
from ._events import Response
from ._pool import MAX_IDLE_CONNECTIONS as MAX_IDLE_CONNECTIONS  # (the pool is there now)
from ._pool import _Pool
from ._proxy import ProxySetting
from ._request import Credentials, PreparedRequest, Secret
from ._stream import MAX_ERROR_BODY_BYTES
from ._version import __version__
from .errors import (
    HTTPError,
    ProtocolError,
    http_error_from_body,
)

__all__ = [
    "Server",
    "Database",
    "encode_query",
    "DEFAULT_URL",
    "DEFAULT_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "MAX_ERROR_BODY_BYTES",
]

logger = logging.getLogger(__name__)

#: Where CouchDB listens by default.
DEFAULT_URL = "http://127.0.0.1:5984"
#: Seconds to connect, and then to wait for each read, on one-shot requests.
DEFAULT_TIMEOUT_S = 30.0
#: The largest response body a one-shot request accepts by default (``Server(max_body_bytes=)``).
#: It is decoded whole, and the Python objects ``json.loads`` builds take several times the size
#: of their JSON, so 256 MiB of JSON is already gigabytes of memory. CouchDB caps a document at
#: 8 MB (``max_document_size``): this is 32 of the largest documents, or over a million
#: ``_changes`` rows without documents. A larger answer should be paged (``limit=``), or the
#: limit lifted with ``max_body_bytes=None``.
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Methods a request may be repeated with after a stale keep-alive connection (RFC 9110
#: §9.2.2): the server may have processed a request it did not answer, and repeating a ``POST``
#: (``save_doc`` without ``_id``, ``_bulk_docs``) could create its documents twice.
IDEMPOTENT_METHODS = frozenset(["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
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


class Server(_Pool):
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
        max_body_bytes: the largest response body accepted (:data:`MAX_BODY_BYTES`, 256 MiB,
            by default); a larger one raises :class:`~changeloop.errors.ResponseTooLargeError`,
            at once when its ``Content-Length`` says so. ``None`` accepts any size. Error
            bodies are kept only up to ``MAX_ERROR_BODY_BYTES`` in any case.
        proxy: an HTTP proxy's URL, ``http://[user:password@]host[:port]``, which wins over the
            environment; ``False`` for no proxy whatever the environment says; ``None`` (the
            default) for the environment's ``http_proxy``/``https_proxy``/``all_proxy`` (either
            case) unless ``no_proxy`` exempts the server. Read once, here. ``https://`` proxy
            URLs (TLS to the proxy itself) are not supported.

    Raises:
        ValueError: the URL is not ``http[s]://[user:password@]host[:port][/prefix]`` (the
            message never shows the password), ``session=True`` without credentials, or the
            proxy URL (given or from the environment) is not an ``http://`` one.

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
        max_body_bytes: Optional[int] = MAX_BODY_BYTES,
        proxy: ProxySetting = None,
    ) -> None:
        if max_body_bytes is not None and (
            not isinstance(max_body_bytes, int) or max_body_bytes < 0
        ):
            raise ValueError("max_body_bytes must be a byte count or None")
        self.max_body_bytes = max_body_bytes  #: The largest one-shot body read, or ``None``.
        if ssl_context is None and (cafile or certfile):
            ssl_context = _transport.make_ssl_context(
                cafile=cafile, certfile=certfile, keyfile=keyfile
            )
        self._endpoint = Endpoint(url, ssl_context, proxy)
        if auth is not None:
            self._credentials: Optional[Credentials] = Credentials(auth[0], auth[1])
        elif self._endpoint.username is not None:
            self._credentials = Credentials(self._endpoint.username, self._endpoint.password or "")
        else:
            self._credentials = None
        self._endpoint.password = None  # held by the Credentials only, out of every repr
        if session and self._credentials is None:
            raise ValueError("session=True needs credentials (auth= or user:password@ in the URL)")
        self._session = session
        self._cookie: Optional[str] = None
        self.timeout = timeout  #: Seconds a blocking request may wait, or ``None``.
        self._idle: List[Connection] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The server's URL, without credentials."""
        return self._endpoint.url

    def __repr__(self) -> str:
        user = " user=%s" % self._credentials.username if self._credentials else ""
        proxy = self._endpoint.proxy
        via = "" if proxy is None else " proxy=%s" % proxy.url
        return "<Server %s%s%s idle=%d>" % (self.url, user, via, len(self._idle))

    @property
    def proxy(self) -> Optional[str]:
        """The URL of the HTTP proxy requests go through (without credentials), or ``None``."""
        proxy = self._endpoint.proxy
        return None if proxy is None else proxy.url

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

    def __delitem__(self, name: str) -> None:
        """``del server[name]`` deletes database ``name``, as in couchdbkit and couchdb-python.

        Raises:
            NotFound: there is no such database.
        """
        self.delete_db(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        status, _, _ = self.raw_request("HEAD", "/" + quote_db_name(name))
        return status == 200

    @property
    def credentials(self) -> Optional[Tuple[str, str]]:
        """``(user, password)`` in the clear, or ``None``: for code that must hand them on."""
        return None if self._credentials is None else self._credentials.as_tuple()

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
        idempotent: Optional[bool] = None,
    ) -> Tuple[int, Response, bytes]:
        """Send one request and return ``(status, response head, body bytes)``.

        Like :meth:`request`, but the body is not decoded; a 4xx/5xx raises only when
        ``raise_for_status`` is true (``HEAD`` requests never raise for 404). An error body is
        cut at ``MAX_ERROR_BODY_BYTES``.

        Args:
            idempotent: whether the request may be sent again after a kept-alive connection
                closed without answering it; by default, for every method but ``POST``. Pass
                ``True`` for a ``POST`` that only reads (``_all_docs`` with ``keys``).

        Raises:
            ResponseTooLargeError: the body is over ``max_body_bytes``.
        """
        prepared = self.prepare_request(method, path, params=params, body=body, headers=headers)
        seconds = self.timeout if timeout == "default" else timeout
        assert seconds is None or isinstance(seconds, (int, float))
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        head, data = self._exchange(prepared, seconds, idempotent)
        self._check_proxy_login(head, data, method, path)
        if head.status_code == 401 and self._session and path != "/_session":
            # The cookie may have expired: log in again, once.
            logger.debug("%s: 401, renewing the session cookie", self.url)
            self.expire_session()
            self._login()
            prepared = self.prepare_request(method, path, params=params, body=body, headers=headers)
            head, data = self._exchange(prepared, seconds, idempotent)
        if head.status_code >= 400 and raise_for_status and method != "HEAD":
            raise http_error_from_body(head.status_code, data, method=method, url=self.url + path)
        return head.status_code, head, data

    def prepare_request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[bytes] = None,
        headers: Iterable[Tuple[str, str]] = (),
    ) -> PreparedRequest:
        """Build a request to this server, credentials included but hidden until it is sent.

        For code that sends requests itself (a continuous feed): the headers of
        :meth:`request_headers`, plus ``Content-Type: application/json`` with a body, plus
        ``headers``. Send ``request.wire()`` straight to the socket without naming the bytes,
        so that no frame's locals hold the ``Authorization`` header; ``request.cookie`` is the
        session cookie sent, for :meth:`expire_session`. With ``session=True`` and no cookie
        yet, this logs in first.

        Raises:
            ValueError: a name or value would break the message framing.
            HTTPError, NetworkError: the session login failed.
        """
        endpoint = self._endpoint
        target = endpoint.target_base + endpoint.prefix + path
        if params:
            target += "?" + encode_query(params)
        extra: List[Tuple[str, Union[str, Secret]]] = [
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),
            ("User-Agent", USER_AGENT),
        ]
        extra.extend(endpoint.proxy_headers())
        cookie: Optional[str] = None
        if self._credentials is not None:
            if self._session:
                if self._cookie is None:
                    self._login()
                cookie = self._cookie or ""
                extra.append(("Cookie", Secret(cookie)))
            else:
                extra.append(("Authorization", self._credentials.authorization()))
        extra.extend(headers)
        if body is not None and not any(n.lower() == "content-type" for n, _ in extra):
            extra.append(("Content-Type", "application/json"))
        request = PreparedRequest(method, target, endpoint.host_header, extra, body)
        request.cookie = cookie
        return request

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

        The credentials are in the clear here: prefer :meth:`prepare_request`, which keeps
        them hidden until the request's bytes go to the socket.

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
                authorization = self._credentials.authorization().reveal()
                headers.append(("Authorization", str(authorization)))
        return headers


class Database:
    """A CouchDB database, reached through its :class:`Server`."""

    #: What :meth:`changes` follows a continuous feed with:
    #: :class:`~changeloop.consumer.Consumer`, set by that module (which imports this one).
    consumer_class: Any = None

    def __init__(self, server: Server, name: str) -> None:
        if not name:
            raise ValueError("a database name cannot be empty")
        self.server = server  #: The :class:`Server` this database is on.
        self.name = name  #: The database's name, unquoted.
        self.path = "/" + quote_db_name(name)  #: The quoted path.

    def __repr__(self) -> str:
        return "<Database %r at %s>" % (self.name, self.server.url)

    def _doc_path(self, docid: str) -> str:
        """The path of document ``docid``.

        Raises:
            ValueError: the id is empty (or a bare ``_design/`` or ``_local/``): its path would
                be the database's own, so ``get("")`` would return the database's info and
                ``delete_doc({"_id": ""...})`` would aim at the database itself.
        """
        if not isinstance(docid, str):
            raise TypeError("a document id is a str, not %s" % type(docid).__name__)
        if docid in ("", "_design/", "_local/"):
            raise ValueError("a document id cannot be empty (got %r)" % docid)
        return self.path + "/" + quote_doc_id(docid)

    def info(self) -> Dict[str, Json]:
        """``GET /db``: document count, update_seq and sizes."""
        return self.server.request("GET", self.path)  # type: ignore[no-any-return]

    def save_doc(self, doc: Dict[str, Json]) -> Dict[str, Json]:
        """Create or update ``doc``, setting its ``_id`` and ``_rev`` as couchdbkit did.

        Raises:
            Conflict: ``doc["_rev"]`` is not the current revision.
        """
        if "_id" in doc:
            result = self.server.request("PUT", self._doc_path(doc["_id"]), body=doc)
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
        return self.server.request(  # type: ignore[no-any-return]
            "GET", self._doc_path(docid), params=params
        )

    def doc_exist(self, docid: str) -> bool:
        """Whether document ``docid`` exists (a ``HEAD`` request)."""
        status, _, _ = self.server.raw_request("HEAD", self._doc_path(docid))
        return status == 200

    def delete_doc(self, doc: Union[str, Dict[str, Json]]) -> Dict[str, Json]:
        """Delete a document, given as a dict with ``_id`` and ``_rev``, or as an id.

        An id alone is looked up first for its current revision.
        """
        if isinstance(doc, str):
            doc = self.get(doc)
        path = self._doc_path(doc["_id"])
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

    def changes(self, **params: Any) -> Union[Dict[str, Json], Iterator[Dict[str, Json]]]:
        """couchdb-python's ``Database.changes``: the ``_changes`` feed, by ``feed=``.

        ``feed="continuous"`` returns an iterator of the changes (dicts) that follows the feed
        for good, reconnecting as a :class:`~changeloop.consumer.Consumer` does and resuming
        after the last change it returned; heartbeats are never among them, nor is a
        ``last_seq`` line (the feed has no end, but for ``limit=``). Leave the ``for`` loop, or
        ``close()`` the iterator, to stop. ``feed="normal"`` (the default) and ``"longpoll"``
        return CouchDB's answer, ``{"results": [...], "last_seq": ...}``.

        Args:
            params: ``since`` (0 by default), ``feed``, and the parameters of
                :meth:`Consumer.fetch <changeloop.consumer.Consumer.fetch>`, with
                couchdb-python's ``filter="_selector", _selector={...}`` as well.

        Raises:
            ValueError: an unknown ``feed``, or parameters CouchDB would refuse.
            HTTPError, NetworkError...: as for the consumer's calls.
        """
        feed = params.pop("feed", "normal")
        since = params.pop("since", 0)
        if params.get("filter") == "_selector" and "_selector" in params:
            params["selector"] = params.pop("_selector")
        consumer = self.consumer_class(self)
        if feed == "continuous":
            return _closing(consumer, consumer.changes(since, **params))
        try:
            if feed == "longpoll":
                answer: Dict[str, Json] = consumer.wait_once(since, **params)
            elif feed == "normal":
                answer = consumer.fetch(since, **params)
            else:
                raise ValueError("feed must be normal, longpoll or continuous, not %r" % (feed,))
        finally:
            consumer.close()
        return answer


def _closing(consumer: Any, changes: Iterator[Dict[str, Json]]) -> Iterator[Dict[str, Json]]:
    """The changes of ``changes``; the consumer closes when they end, fail or are left."""
    try:
        yield from changes
    finally:
        consumer.close()


def _decode_json(data: bytes, method: str, url: str) -> Json:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProtocolError("%s %s: the answer is not JSON: %r" % (method, url, data[:80])) from exc
