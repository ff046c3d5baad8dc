"""The blocking client's exchanges: a base class of ``Server`` holding its private parts.

One request on a connection borrowed from the server's small pool of kept-alive ones (retried
once on a fresh connection when a pooled one turns out closed and the request is safe to repeat),
the ``/_session`` login, and the check that a plain-HTTP proxy did not refuse its own login.
"""

import logging
import threading
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from ._connection import Connection, Endpoint
from ._events import Response
from ._proxy import proxy_login_error, refused_by_proxy
from ._request import Credentials, PreparedRequest, Secret
from ._stream import MAX_ERROR_BODY_BYTES
from .errors import ProtocolError, ReadError, http_error_from_body

__all__ = ["MAX_IDLE_CONNECTIONS"]

logger = logging.getLogger("changeloop.client")

#: Idle connections kept per server; one-shot use rarely needs more than one at a time.
MAX_IDLE_CONNECTIONS = 4


class _Pool:
    """The private parts of :class:`~changeloop.client.Server` (see the module's docstring)."""

    # Set by the server's constructor.
    max_body_bytes: Optional[int]
    timeout: Optional[float]
    _cookie: Optional[str]
    _credentials: Optional[Credentials]
    _endpoint: Endpoint
    _idle: List[Connection]
    _lock: threading.Lock

    if TYPE_CHECKING:  # the server's property (declared here for the type checker only)

        @property
        def url(self) -> str: ...

    def _check_proxy_login(self, head: Response, body: bytes, method: str, path: str) -> None:
        """Raise if a proxy forwarding plain HTTP refused its login: the request never reached
        the server, whatever ``raise_for_status`` says, and the message must name the proxy.
        (Through a tunnel, CONNECT met the refusal already.)"""
        proxy = self._endpoint.proxy
        if proxy is None or self._endpoint.tls or not refused_by_proxy(head.status_code, body):
            return
        user = None if proxy.credentials is None else proxy.credentials.username
        raise proxy_login_error(
            head.status_code, proxy.url, user=user, method=method, url=self.url + path
        )

    def _exchange(
        self, request: PreparedRequest, timeout: Optional[float], idempotent: bool
    ) -> Tuple[Response, bytes]:
        for attempt in (1, 2):
            connection = self._borrow(timeout)
            reused = connection.used
            try:
                head, data, reusable = connection.exchange(
                    request, timeout, self.max_body_bytes, MAX_ERROR_BODY_BYTES
                )
            except BaseException:  # a failure, or Ctrl-C mid-request: the connection is spent
                connection.close()
                raise
            if head is None:
                connection.close()
                if reused and attempt == 1 and idempotent:
                    logger.debug("%s: pooled connection closed by the server; retrying", self.url)
                    continue
                if reused:
                    raise ReadError(
                        "%s closed a kept-alive connection without answering %s %s; not sent "
                        "again, as the server may have processed it"
                        % (self.url, request.method, request.target)
                    )
                raise ReadError("%s closed the connection before answering" % self.url)
            if reusable:
                self._give_back(connection)
            else:
                connection.close()
            return head, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _borrow(self, timeout: Optional[float]) -> Connection:
        while True:
            with self._lock:
                if not self._idle:
                    break
                connection = self._idle.pop()
            if not connection.has_unread():
                return connection
            # Closed by the server meanwhile, or sent bytes nobody asked for: not reusable.
            logger.debug("%s: dropping a pooled connection with unread data or EOF", self.url)
            connection.close()
        return Connection(self._endpoint, timeout)

    def _give_back(self, connection: Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def _login(self) -> None:
        assert self._credentials is not None
        endpoint = self._endpoint
        headers: List[Tuple[str, Union[str, Secret]]] = [
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
        ]
        request = PreparedRequest(
            "POST",
            endpoint.target_base + endpoint.prefix + "/_session",
            endpoint.host_header,
            headers + endpoint.proxy_headers(),
            self._credentials.session_body(),
        )
        # Logging in twice creates nothing: safe to send again on a stale connection.
        head, data = self._exchange(request, self.timeout, idempotent=True)
        self._check_proxy_login(head, data, "POST", "/_session")
        if head.status_code >= 400:
            raise http_error_from_body(
                head.status_code, data, method="POST", url=self.url + "/_session"
            )
        for key, value in head.headers:
            if key == b"set-cookie" and value.startswith(b"AuthSession="):
                self._cookie = value.split(b";", 1)[0].decode("latin-1")
                return
        raise ProtocolError("%s/_session answered without an AuthSession cookie" % self.url)
