"""HTTP proxies: which one a URL goes through, and the CONNECT exchange that opens a tunnel.

Strategy. :func:`choose_proxy` decides once, when a ``Server`` is made: an explicit proxy URL
wins, ``False`` means none, and otherwise the environment decides with the conventions of
``urllib.request.getproxies()`` (``http_proxy``/``https_proxy``/``all_proxy`` in either case,
the lower-case name winning) and of ``no_proxy`` as curl and requests read it (``*``, host names,
domain suffixes, IP literals, CIDR ranges, an optional ``:port``), which urllib only partly
knows. Plain ``http`` origins are reached through the proxy with absolute-form request targets
(RFC 9112 §3.2.2) and a ``Proxy-Authorization`` header on every request; ``https`` origins
through a ``CONNECT`` tunnel (RFC 9110 §9.3.6), inside which TLS runs to the origin and verifies
the origin's certificate and host name exactly as without a proxy.

:class:`Tunnel` is the CONNECT exchange without IO: its request's bytes, and the proxy's answer
parsed by our own :class:`~changeloop._http.ResponseParser`. The transport drives it, blocking for
the client and non-blocking for a feed (one more phase of connecting, under the same deadline).

A proxy that refuses the login (407, or 401 from some proxies) is an :class:`HTTPError` that
stops a feed; one that cannot reach the origin (500, 502, 503, 504 to CONNECT) a
:class:`ConnectError`, which a feed retries, as it retries a 5xx to a forwarded request. Proxy
credentials live in a :class:`Credentials`; no message shows the password. A proxy reached over
TLS (an ``https://`` proxy URL) is not supported: it is refused at once.
"""

import ipaddress
import json
import os
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

from ._events import NEED_DATA, ConnectionClosed, Response
from ._http import ResponseParser
from ._request import Credentials, PreparedRequest, Secret
from .errors import ConnectError, HTTPError, ProtocolError, http_error_for

__all__ = [
    "Proxy",
    "Tunnel",
    "choose_proxy",
    "bypasses",
    "proxy_login_error",
    "refused_by_proxy",
]

#: A proxy's answers to CONNECT that say it could not reach the origin (RFC 9110 §15.6.3-5;
#: tinyproxy says 500 "Unable to connect"), or is overloaded: a failed connection, retried.
UNREACHABLE_STATUSES = frozenset([500, 502, 503, 504])

ProxySetting = Union[str, bool, None]


def _bracketed(host: str) -> str:
    return "[%s]" % host if ":" in host else host


def _redact(url: str) -> str:
    at = url.rfind("@")
    if at < 0:
        return url
    scheme_end = url.find("://")
    return (url[: scheme_end + 3] if 0 <= scheme_end < at else "") + "***@" + url[at + 1 :]


class Proxy:
    """An HTTP proxy: where it is, and its credentials, held out of every ``repr``.

    Args:
        url: ``http://[user:password@]host[:port]``; a bare ``host:port`` means ``http://``, and
            the port defaults to 80 as for any ``http`` URL.

    Raises:
        ValueError: not an ``http`` proxy URL (``https://`` proxies are not supported); the
            message never shows the password.
    """

    __slots__ = ("host", "port", "url", "credentials")

    def __init__(self, url: str) -> None:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is not None and parts.scheme == "https":
            raise ValueError(
                "proxy %s: TLS to the proxy itself (an https:// proxy URL) is not supported; "
                "use its http:// address (https origins still get TLS end to end, through "
                "CONNECT)" % _redact(url)
            )
        if parts is None or parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                "expected a proxy URL http://[user:password@]host[:port], not %s" % _redact(url)
            )
        self.host: str = parts.hostname
        self.port: int = port or 80
        #: The proxy's URL without credentials: safe for messages and logs.
        self.url = "http://%s:%d" % (_bracketed(self.host), self.port)
        self.credentials: Optional[Credentials] = None
        if parts.username is not None:
            self.credentials = Credentials(unquote(parts.username), unquote(parts.password or ""))

    def __repr__(self) -> str:
        user = "" if self.credentials is None else " user=%r" % self.credentials.username
        return "<Proxy %s%s>" % (self.url, user)

    def headers(self) -> List[Tuple[str, Union[str, Secret]]]:
        """``Proxy-Authorization`` (Basic, RFC 9110 §11.7.2), still hidden, if there is a login."""
        if self.credentials is None:
            return []
        return [("Proxy-Authorization", self.credentials.authorization())]


def proxy_login_error(
    status: int, proxy: str, *, user: Optional[str], method: str, url: str
) -> HTTPError:
    """The fatal error for a proxy that refused the login (407, or 401 on a CONNECT).

    Args:
        proxy: the proxy, as a URL or ``host:port`` without credentials.
        user: the user name that was sent, or ``None`` if no login was sent.
    """
    if user is None:
        reason = (
            "the proxy %s asks for a login: give one in the proxy URL "
            "(http://user:password@host:port)" % proxy
        )
    else:
        reason = (
            "the proxy %s refused the login of user %r: check the user and password of the "
            "proxy URL" % (proxy, user)
        )
    return http_error_for(status, "proxy_auth_required", reason, method=method, url=url)


def refused_by_proxy(status: int, body: bytes) -> bool:
    """Whether an answer to a request a proxy forwarded is the proxy refusing its login.

    A 407 always is (RFC 9110 §15.5.8). Some proxies (tinyproxy) answer a wrong login with 401,
    which CouchDB uses too; but CouchDB's 401 is a JSON object with an ``error``, and a proxy's
    is an HTML page.
    """
    if status == 407:
        return True
    if status != 401:
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return True
    return not (isinstance(document, dict) and "error" in document)


def choose_proxy(setting: ProxySetting, scheme: str, host: str, port: int) -> Optional[Proxy]:
    """The proxy a request to ``scheme://host:port`` goes through, or ``None``.

    Args:
        setting: a proxy URL (wins over the environment, ``no_proxy`` included), ``False``
            (never a proxy), or ``None`` (the environment decides).

    Raises:
        ValueError: the proxy URL (given or from the environment) is not an ``http`` one.
        TypeError: ``setting`` is ``True`` or not a string.
    """
    if setting is False:
        return None
    if setting is not None:
        if not isinstance(setting, str):
            raise TypeError("proxy= takes a URL, False or None, not %r" % (setting,))
        return Proxy(setting)
    found = proxies_from_environment()
    url = found.get(scheme) or found.get("all")
    if not url or bypasses(found.get("no", ""), host, port):
        return None
    return Proxy(url)


def proxies_from_environment() -> Dict[str, str]:
    """``{scheme: url}`` from the ``*_proxy`` variables, as ``urllib.request`` reads them.

    Environment only (no macOS or Windows system settings): either case, the lower-case one
    winning where both are set (an empty lower-case one removes the upper-case one), and
    ``HTTP_PROXY`` ignored in a CGI request, where a client can set it (httpoxy). Read here
    rather than through ``urllib.request``, whose import costs a process 3.4 MiB of memory
    (benchmarks/RESULTS.md, session 5).
    """
    environ = os.environ
    found: Dict[str, str] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            found[name[:-6].lower()] = value
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):  # spelled in lower case: it wins, even empty
            if value:
                found[name[:-6].lower()] = value
            else:
                found.pop(name[:-6].lower(), None)
    return found


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``no_proxy`` (comma-separated) exempts ``host:port`` from the proxy.

    Entries: ``*`` (everything); a host name, matching itself and its subdomains (a leading
    ``.`` or ``*.`` is ignored: ``.example.com`` matches ``example.com`` too); an IP literal
    (IPv6 with or without brackets); a CIDR range (``10.0.0.0/8``, ``fd00::/8``) matching IP
    literal hosts; any of these but ``*`` and ranges with ``:port``, matching that port only.
    Names are never resolved: ``localhost`` does not match ``127.0.0.1``.
    """
    host = host.lower().rstrip(".")
    address = _ip(host)
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue  # not a range: ignored, as curl does
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        entry_address = _ip(name)
        if entry_address is not None:
            if address is not None and address == entry_address:
                return True
            continue
        if name.startswith("*."):
            name = name[2:]
        name = name.lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _ip(text: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address, None]:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _split_port(entry: str) -> Tuple[str, Optional[int]]:
    """``name:port`` / ``[v6]:port`` -> (name, port); a bare IPv6 literal has no port."""
    if entry.startswith("["):
        close = entry.find("]")
        rest = entry[close + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
        return entry[1:close], int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, int(port) if port.isdigit() else None
    return entry, None


class Tunnel:
    """One ``CONNECT host:port`` exchange with a proxy, without IO (RFC 9110 §9.3.6).

    The transport sends :meth:`wire` (from an offset, for partial writes), feeds what it reads to
    :meth:`receive` until that returns ``True``, and then starts TLS to the origin on the same
    socket. Once sent, the transport drops the tunnel.

    Args:
        proxy: the proxy to ask.
        host, port: the origin; its name goes to the proxy, which resolves it.
    """

    __slots__ = ("proxy", "host", "port", "authority", "request_bytes", "sent", "_parser")

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        #: The authority-form target (RFC 9112 §3.2.3), also the ``Host`` header.
        self.authority = "%s:%d" % (_bracketed(host), port)
        #: The length of the request: the transport's count of what is left to send.
        self.request_bytes = len(self.wire())
        #: Bytes of the request written so far, kept by the transport.
        self.sent = 0
        self._parser: Optional[ResponseParser] = ResponseParser("CONNECT")

    def __repr__(self) -> str:
        return "<Tunnel %s via %s>" % (self.authority, self.proxy.url)

    def wire(self, offset: int = 0) -> bytes:
        """The CONNECT request's bytes from ``offset``, credentials included: send, don't keep."""
        request = PreparedRequest("CONNECT", self.authority, self.authority, self.proxy.headers())
        return request.wire()[offset:]

    def receive(self, data: bytes) -> bool:
        """Take bytes of the proxy's answer; ``b""`` is EOF. ``True`` once the tunnel is open.

        Raises:
            HTTPError: the proxy refused: 407 or 401 (the login), or another status (a 5xx but
                those below is a ``ServerError``, retried by a feed; a 4xx is fatal).
            ConnectError: the proxy could not reach the origin (500, 502, 503, 504) or closed
                the connection before answering.
            ProtocolError: the answer is not HTTP/1.1, or bytes follow a 2xx answer before TLS
                began (the origin cannot speak first in TLS).
        """
        parser = self._parser
        if parser is None:
            raise RuntimeError("%r is open already" % (self,))
        parser.receive_data(data)
        event = parser.next_event()
        if event is NEED_DATA:
            return False
        if isinstance(event, ConnectionClosed):
            raise ConnectError(
                "the proxy %s closed the connection before answering CONNECT %s"
                % (self.proxy.url, self.authority)
            )
        assert isinstance(event, Response)
        status = event.status_code
        if 200 <= status < 300:
            if parser.trailing_data[0]:
                raise ProtocolError(
                    "the proxy %s sent bytes after its %d answer to CONNECT %s, before TLS began"
                    % (self.proxy.url, status, self.authority)
                )
            self._parser = None  # the connection outlives the exchange: let its buffer go
            return True
        raise self._refusal(status, event.reason.decode("latin-1", "replace"))

    def _refusal(self, status: int, reason: str) -> Exception:
        proxy = self.proxy
        if status in (401, 407):
            user = None if proxy.credentials is None else proxy.credentials.username
            return proxy_login_error(
                status, proxy.url, user=user, method="CONNECT", url=self.authority
            )
        words = "%d %s" % (status, reason[:100])
        if status in UNREACHABLE_STATUSES:
            return ConnectError(
                "the proxy %s could not reach %s: %s" % (proxy.url, self.authority, words)
            )
        return http_error_for(
            status,
            "proxy_refused",
            "the proxy %s refused CONNECT %s: %s" % (proxy.url, self.authority, words),
            method="CONNECT",
            url=self.authority,
        )
