"""The exception tree: one root, a few flat groups, raised where the failure is understood.

Low-level failures (``OSError``, ``ssl.SSLError``, ``json`` errors) are translated at the boundary
that understands them and always chained (``raise ... from exc``), so the original stays visible.
Misuse of the API raises ``ValueError``, ``TypeError`` or ``RuntimeError``, never these.
"""

import json
from typing import Any, Dict, Optional

__all__ = [
    "ChangeloopError",
    "ProtocolError",
    "FeedError",
    "LineTooLongError",
    "NetworkError",
    "ConnectError",
    "NameResolutionError",
    "ReadError",
    "TLSError",
    "Timeout",
    "ConnectTimeout",
    "ReadTimeout",
    "HTTPError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
    "ServerError",
    "CallbackError",
    "CheckpointError",
    "ResourceLimitError",
    "ResponseTooLargeError",
    "GaveUpError",
]


class ChangeloopError(Exception):
    """The root of every error changeloop raises on purpose."""


# -- the bytes were wrong --------------------------------------------------------------------


class ProtocolError(ChangeloopError):
    """The peer sent bytes that are not valid HTTP/1.1 (RFC 9112), or ended a message early."""


class ResponseTooLargeError(ChangeloopError):
    """A one-shot answer's body is larger than the client accepts (``Server(max_body_bytes=)``).

    Raised as soon as a ``Content-Length`` announces more, before any of the body is read, or
    once more was received; the connection is closed. Not a :class:`ResourceLimitError` (about
    file descriptors, and retried): asking again would get the same answer. Page the request
    (``limit=``) or raise the limit.

    Attributes:
        limit: the limit that was exceeded, in bytes.
    """

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> Any:
        return (_rebuild_too_large, (str(self), self.limit))


def _rebuild_too_large(message: str, limit: int) -> "ResponseTooLargeError":
    return ResponseTooLargeError(message, limit=limit)


class FeedError(ChangeloopError):
    """The HTTP was fine but the ``_changes`` body was not a feed we understand."""


class LineTooLongError(FeedError):
    """A feed line grew past the configured limit before its newline arrived."""


# -- the network failed ----------------------------------------------------------------------


class NetworkError(ChangeloopError):
    """The connection could not be made, or broke while in use."""


class ConnectError(NetworkError):
    """The connection could not be made: refused, unreachable, or the name did not resolve."""


class NameResolutionError(ConnectError):
    """The host name does not exist (DNS says so: ``EAI_NONAME``), as opposed to a resolver
    that could not answer right now (a plain :class:`ConnectError`). Still retried by a
    consumer, as a name can appear (a container starting); see ``max_retries``."""


class ReadError(NetworkError):
    """An established connection broke: reset, aborted, or closed by the peer mid-message."""


class TLSError(NetworkError):
    """The TLS handshake or session failed: untrusted certificate, wrong host name, bad record.

    Retrying does not help with a certificate problem, so consumers treat this as fatal.
    """


class Timeout(NetworkError, TimeoutError):
    """Nothing happened for too long; also a builtin ``TimeoutError`` for generic handlers."""


class ConnectTimeout(Timeout, ConnectError):
    """The connection (TCP and TLS handshake) was not established in time."""


class ReadTimeout(Timeout, ReadError):
    """The peer sent nothing for too long on an established connection."""


# -- the server said no ----------------------------------------------------------------------


class HTTPError(ChangeloopError):
    """The server answered with an error status; carries CouchDB's ``error`` and ``reason``.

    Attributes:
        status: the HTTP status code, e.g. 404.
        error: CouchDB's short error name (``"not_found"``), or ``None`` if the body had none.
        reason: CouchDB's explanation (``"missing"``), or ``None``.
        method: the request method.
        url: the request URL, never with credentials in it.
    """

    def __init__(
        self,
        status: int,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        *,
        method: str = "",
        url: str = "",
    ) -> None:
        self.status = status
        self.error = error
        self.reason = reason
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        text = "HTTP %d" % self.status
        if self.error:
            text += " %s" % self.error
        if self.reason:
            text += ": %s" % self.reason
        if self.method or self.url:
            text += " (%s %s)" % (self.method, self.url)
        return text

    def __reduce__(self) -> Any:
        kwargs: Dict[str, Any] = {"method": self.method, "url": self.url}
        return (_rebuild_http_error, (type(self), self.status, self.error, self.reason, kwargs))


def _rebuild_http_error(cls: Any, status: int, error: Any, reason: Any, kwargs: Any) -> Any:
    return cls(status, error, reason, **kwargs)


class BadRequest(HTTPError):
    """400: the request was malformed (a bad ``since``, a selector CouchDB cannot read)."""


class Unauthorized(HTTPError):
    """401: no credentials, or wrong ones."""


class Forbidden(HTTPError):
    """403: the credentials are valid but not allowed to do this."""


class NotFound(HTTPError):
    """404: no such database, document, design document or filter."""


class Conflict(HTTPError):
    """409: the document was changed since the revision given."""


class PreconditionFailed(HTTPError):
    """412: a precondition failed, e.g. creating a database that already exists."""


class ServerError(HTTPError):
    """5xx: the server failed; usually worth retrying later."""


_STATUS_ERRORS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
}


def http_error_for(
    status: int,
    error: Optional[str] = None,
    reason: Optional[str] = None,
    *,
    method: str = "",
    url: str = "",
) -> HTTPError:
    """Return the most specific :class:`HTTPError` subclass for ``status``."""
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else HTTPError
    return cls(status, error, reason, method=method, url=url)


def http_error_from_body(status: int, body: bytes, *, method: str = "", url: str = "") -> HTTPError:
    """Build the :class:`HTTPError` for an error response, reading CouchDB's JSON error body.

    A body that is not CouchDB's ``{"error": .., "reason": ..}`` (a proxy's HTML page, say)
    becomes the ``reason``, shortened.
    """
    error = reason = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = None if document.get("error") is None else str(document["error"])
        reason = None if document.get("reason") is None else str(document["reason"])
    elif body:
        reason = body[:200].decode("utf-8", "replace").strip()
    return http_error_for(status, error, reason, method=method, url=url)


# -- your code failed ------------------------------------------------------------------------


class CallbackError(ChangeloopError):
    """A user callback raised; the original exception is chained as ``__cause__``."""


class CheckpointError(ChangeloopError):
    """A checkpoint store could not be read or written (a corrupt file, a failed save)."""


class ResourceLimitError(ConnectError):
    """No connection could be made for want of file descriptors (the open-file limit).

    The message says how many were needed and what the limit is. A consumer retries after a
    backoff, as descriptors may be freed in the meantime.
    """


class GaveUpError(ChangeloopError):
    """A consumer stopped retrying: its ``max_retries`` attempts in a row failed, or it had no
    healthy connection for ``max_outage`` seconds. The last failure is chained as
    ``__cause__``.

    Attributes:
        attempts: the failed attempts in a row.
        outage: seconds since the consumer last had a healthy connection (or started).
    """

    def __init__(self, message: str, *, attempts: int = 0, outage: float = 0.0) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.outage = outage

    def __reduce__(self) -> Any:
        return (_rebuild_gave_up, (str(self), self.attempts, self.outage))


def _rebuild_gave_up(message: str, attempts: int, outage: float) -> "GaveUpError":
    return GaveUpError(message, attempts=attempts, outage=outage)
