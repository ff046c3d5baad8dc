"""Turn consumer arguments into one ``_changes`` request: method, path, query and body.

This is where CouchDB's filter conventions live: ``filter_name="ddoc/name"`` becomes
``filter=ddoc/name`` (extra parameters reach the filter as ``req.query``), ``doc_ids=[..]`` a POST
with ``filter=_doc_ids``, ``selector={..}`` a POST with ``filter=_selector``, ``view="ddoc/view"``
``filter=_view``. CouchDB 2+ reads a selector only from the POST body while pouchdb-server reads it
only from the query string, so a selector is sent in both: each server ignores the other copy.
Sequences are opaque and passed back exactly as the server gave them.
"""

import json
from typing import Any, Dict, Mapping, NamedTuple, Optional

__all__ = ["ChangesRequest", "changes_request", "DEFAULT_HEARTBEAT_MS"]

#: The heartbeat asked for by default, in CouchDB's unit (milliseconds): 30 s stays below the
#: 60 s idle timeout common in proxies and load balancers, so they keep an idle feed open.
DEFAULT_HEARTBEAT_MS = 30_000
#: The interval CouchDB uses for ``heartbeat=true``.
COUCHDB_TRUE_HEARTBEAT_MS = 60_000
#: How long CouchDB keeps a continuous feed without heartbeats open when nothing changes, by
#: default (``chttpd/changes_timeout``); it then ends the feed with a ``last_seq`` line.
COUCHDB_CHANGES_TIMEOUT_MS = 60_000

_FEEDS = ("normal", "longpoll", "continuous")


class ChangesRequest(NamedTuple):
    """What to send: the query is encoded later by the client's ``encode_query``."""

    method: str
    path: str
    query: Dict[str, Any]
    body: Optional[bytes]


def changes_request(
    db_path: str,
    feed: str,
    since: Any,
    params: Mapping[str, Any],
) -> ChangesRequest:
    """Build the ``_changes`` request for ``feed`` starting after ``since``.

    Args:
        db_path: the quoted database path, e.g. ``/mydb``.
        feed: ``normal``, ``longpoll`` or ``continuous``.
        since: the sequence to start after (``0``, ``"now"``, or a seq as the server gave it);
            ``None`` leaves it out.
        params: ``filter_name``, ``doc_ids``, ``selector``, ``view`` and any other ``_changes``
            parameter (``include_docs``, ``limit``, ``heartbeat`` in ms, ``timeout`` in ms...),
            plus the filter function's own query parameters.

    ``filter`` is a synonym of ``filter_name``; ``filter="_doc_ids"`` (``_selector``, ``_view``)
    may go with the ``doc_ids`` (``selector``, ``view``) it names. ``heartbeat=True`` asks for
    CouchDB's default interval, ``heartbeat=False`` for none.

    Raises:
        ValueError: an unknown feed, or two filters at once.
        TypeError: ``doc_ids`` is not a list of strings, ``selector`` not a dict, or a
            parameter's value is callable (a callback passed where a parameter goes).
    """
    if feed not in _FEEDS:
        raise ValueError("feed must be one of %s, not %r" % (", ".join(_FEEDS), feed))
    if "feed" in params:
        # The call says which feed (fetch: normal, wait_once: longpoll, start and wait:
        # continuous): a feed parameter as well would make a continuous consumer read a normal
        # answer, whose one line holds a last_seq, as "the feed ended there".
        raise ValueError("feed is set by the call (fetch, wait_once, start), not as a parameter")
    query: Dict[str, Any] = {"feed": feed}
    if since is not None:
        query["since"] = since
    rest = dict(params)
    for name, value in rest.items():
        if callable(value):
            # couchdbkit 0.5's cb=, a callback passed by the wrong name: a query string would
            # carry its repr to the server, and the callback would never be called.
            raise TypeError(
                "%s=%r is not a _changes parameter: a callable is never sent to the server "
                "(a callback goes first, or as cb=)" % (name, value)
            )
    filter_name = rest.pop("filter_name", None)
    filter_param = rest.pop("filter", None)  # CouchDB's (and couchdbkit's) own name for it
    if filter_name is not None and filter_param is not None and filter_name != filter_param:
        raise ValueError(
            "filter_name and filter name two filters: %r and %r" % (filter_name, filter_param)
        )
    if filter_name is None:
        filter_name = filter_param
    doc_ids = rest.pop("doc_ids", None)
    selector = rest.pop("selector", None)
    view = rest.pop("view", None)
    chosen = [
        name
        for name, value in (
            ("filter_name", filter_name),
            ("doc_ids", doc_ids),
            ("selector", selector),
            ("view", view),
        )
        if value is not None
    ]
    # filter=_doc_ids with doc_ids (and _selector, _view) is how CouchDB itself spells them.
    if len(chosen) > 1 and not (len(chosen) == 2 and filter_name == "_" + chosen[1]):
        raise ValueError("choose one filter, not %s" % " and ".join(chosen))
    body: Optional[Dict[str, Any]] = None
    if doc_ids is not None:
        if isinstance(doc_ids, (str, bytes)) or not all(isinstance(d, str) for d in doc_ids):
            raise TypeError("doc_ids must be a list of document ids")
        query["filter"] = "_doc_ids"
        body = {"doc_ids": list(doc_ids)}
    elif selector is not None:
        if not isinstance(selector, dict):
            raise TypeError("selector must be a dict (a Mango selector)")
        query["filter"] = "_selector"
        query["selector"] = json.dumps(selector, separators=(",", ":"))
        body = {"selector": selector}
    elif view is not None:
        query["filter"] = "_view"
        query["view"] = view
    elif filter_name is not None:
        query["filter"] = filter_name
    query.update(rest)
    heartbeat = query.get("heartbeat")
    if heartbeat is True:  # couchdbkit's heartbeat=True: CouchDB's own interval, sent as the
        query["heartbeat"] = COUCHDB_TRUE_HEARTBEAT_MS  # number every server and the watchdog read
    elif heartbeat is False:  # none: CouchDB answers 400 to heartbeat=false
        del query["heartbeat"]
    payload = None if body is None else json.dumps(body).encode("utf-8")
    method = "GET" if body is None else "POST"
    return ChangesRequest(method, db_path + "/_changes", query, payload)


def heartbeat_seconds(query: Mapping[str, Any]) -> Optional[float]:
    """The heartbeat interval a query asks for, in seconds; ``None`` if it asks for none."""
    heartbeat = query.get("heartbeat")
    if heartbeat is None or heartbeat is False:
        return None
    if heartbeat is True or heartbeat == "true":
        return COUCHDB_TRUE_HEARTBEAT_MS / 1000.0
    return float(heartbeat) / 1000.0


def silence_allowance(query: Mapping[str, Any], heartbeats: float) -> float:
    """How many seconds a healthy continuous feed asked with ``query`` may stay silent.

    With heartbeats, ``heartbeats`` of them. Without, the server ends a silent feed itself after
    its ``timeout`` (CouchDB's 60 s by default), so that long plus the same margin as for the
    default heartbeat.
    """
    heartbeat = heartbeat_seconds(query)
    if heartbeat:  # not None, and not 0 (which asks for none either)
        return heartbeat * heartbeats
    timeout = query.get("timeout")
    ends_after = COUCHDB_CHANGES_TIMEOUT_MS if timeout is None else float(timeout)
    return (ends_after + DEFAULT_HEARTBEAT_MS * heartbeats) / 1000.0
