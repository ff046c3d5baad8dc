"""The command's words: its options, the rules argparse cannot express, and what they mean.

One table of options (:data:`OPTIONS`, in ``--help`` order) builds the parser; :func:`check_args`
and :func:`feed_params` refuse what argparse cannot (a ``--param`` that has its own option, a
``--param`` of the wrong type, two filters at once), each as a :class:`UsageError` (exit 2, before
anything connects); :func:`split_url` and :func:`find_credentials` turn a URL into a server, a
database name and a login without ever printing a password.
"""

import argparse
import json
import logging
import netrc
import os
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from ._params import changes_request
from ._version import __version__
from .watcher import POLL_INTERVAL_S

__all__ = [
    "OPTIONS",
    "UsageError",
    "build_parser",
    "check_args",
    "feed_params",
    "find_credentials",
    "param_value",
    "parse_since",
    "redact",
    "split_url",
]

LOG = logging.getLogger("changeloop.cli")  # the command's logger, as in __main__

#: ``_changes`` parameters that have their own option: ``--param`` refuses them.
OWN_OPTIONS = {
    "since": "--since",
    "feed": "--feed",
    "filter": "--filter",
    "filter_name": "--filter",
    "doc_ids": "--doc-id",
    "selector": "--selector",
    "include_docs": "--include-docs",
    "style": "--style",
    "heartbeat": "--heartbeat",
}
#: The type CouchDB expects for the ``_changes`` parameters a ``--param`` may set.
PARAM_TYPES: Dict[str, type] = {
    "limit": int,
    "timeout": int,
    "seq_interval": int,
    "descending": bool,
    "conflicts": bool,
    "attachments": bool,
    "att_encoding_info": bool,
}

EPILOG = """\
examples:
  changeloop http://127.0.0.1:5984/orders                  follow a database from its start
  changeloop --since now URL1 URL2 | jq -c '[.db, .id]'    two databases: lines carry "db"
  changeloop --feed normal --include-docs URL > dump.ndjson
  changeloop --checkpoint orders.seq --max-retries 10 URL  resume where the last run stopped
  changeloop --all-dbs 'userdb-*' --shard 0/4 http://127.0.0.1:5984
  changeloop --filter app/important --param level=high URL
  changeloop --selector '{"type": "order"}' URL

output: one JSON object per change, one per line, flushed per line. With several databases or
--all-dbs each object starts with the database's name: {"db": "orders", "seq": ..., "id": ...}.
With --batch N, each line is instead a JSON array of up to N such objects from one database:
the changes that arrived together, never held back to fill the array. A --checkpoint then
only ever falls between lines.

credentials: user:password@ in the URL (with a warning: command lines are visible to other
users), else COUCHDB_USER and COUCHDB_PASSWORD, else ~/.netrc (by host). Never printed.

proxies: http_proxy / https_proxy / all_proxy and no_proxy (either case) are honoured, as curl
and Python's urllib do; --proxy http://[user:password@]host:port wins over them, --no-proxy
ignores them. https:// servers are reached through the proxy's CONNECT, with their certificate
verified as without a proxy. An https:// proxy URL (TLS to the proxy) is not supported.

exit codes:
  0    stopped cleanly: --limit reached, a normal/longpoll feed printed, or Ctrl-C/SIGTERM while
       following (every feed stopped, the last seq checkpointed)
  2    bad command line or URL
  3    the server refused (400, 401, 403, 404...), TLS or certificate failure, or the
       --checkpoint file cannot be read or written (checked before the first change is printed)
  4    gave up: a feed still failed after --max-retries retries (unreachable server, 5xx), or a
       normal/longpoll request (or --all-dbs' database list) failed on the network
  130  interrupted before following began, during a one-shot request, or by a second signal

piped output: a closed stdout (`| head -1`) stops the command cleanly (0) within a second,
even on a quiet feed. The checkpoint records the changes written to stdout, not those the reader
consumed: lines left unread in the pipe count as delivered.

with --all-dbs, a database deleted while followed is dropped with a warning, and followed again
from its beginning if it is re-created; any other failure of one database (refused, a line over
the limit) is fatal (exit 3), as for a URL given. --since now means from the command's start:
a database created afterwards is followed from its first change."""

# One row per option, in --help order: (flags, argparse keyword arguments). A table reads best
# aligned, so the formatter leaves it alone.
OPTIONS: List[Tuple[Tuple[str, ...], Dict[str, Any]]] = [
    (("url",), {"nargs": "*", "metavar": "URL", "help": "a database, http(s)://host:port/[prefix/]db"
        " (the last path segment is its name, percent-decoded); with --all-dbs, a server"}),
    (("--since",), {"default": "0", "metavar": "SEQ", "help": "start after SEQ: 0 (the default: "
        "every change), now, or a seq printed before; a --checkpoint's seq wins"}),
    (("--feed",), {"default": "continuous", "choices": ["continuous", "normal", "longpoll"],
        "help": "continuous (the default) follows until stopped; normal prints the changes so far "
        "and exits; longpoll waits for the next ones (one database), prints them and exits"}),
    (("--filter",), {"metavar": "DDOC/NAME", "help": "only what this filter function lets pass"}),
    (("--param",), {"action": "append", "default": [], "metavar": "K=V",
        "help": "a parameter for --filter, in its req.query (repeatable); V is JSON when it "
        "parses (2, true, [1,2]), else text; one with its own option (--since...) is refused"}),
    (("--doc-id",), {"action": "append", "dest": "doc_ids", "metavar": "ID",
        "help": "only this document (repeatable)"}),
    (("--selector",), {"metavar": "JSON", "help": "only documents matching this Mango selector"}),
    (("--include-docs",), {"action": "store_true", "help": "include each document"}),
    (("--style",), {"choices": ["main_only", "all_docs"], "help": "all_docs: conflicts too"}),
    (("--limit",), {"type": int, "metavar": "N", "help": "stop after N changes in all"}),
    (("--batch",), {"type": int, "metavar": "N", "help": "print changes in JSON arrays of up "
        "to N, one array per line: the changes that arrived together (see output below)"}),
    (("--heartbeat",), {"type": int, "metavar": "MS", "help": "the heartbeat to ask for, in "
        "milliseconds (default 30000)"}),
    (("--checkpoint",), {"metavar": "FILE", "help": "resume after the seq saved in FILE, and "
        "save the last one printed there (one entry per database URL)"}),
    (("--all-dbs",), {"nargs": "?", "const": "", "metavar": "PATTERN", "help": "follow the "
        "server's databases matching the glob PATTERN (default: all but _system ones) and "
        "new ones"}),
    (("--shard",), {"metavar": "I/N", "help": "with --all-dbs: only shard I of N (0 <= I < N)"}),
    (("--poll-interval",), {"type": float, "default": POLL_INTERVAL_S, "metavar": "S",
        "help": "with --all-dbs on a server without _db_updates: seconds between _all_dbs "
        "polls (default %.0f)" % POLL_INTERVAL_S}),
    (("--max-retries",), {"type": int, "default": 0, "metavar": "N", "help": "retry a failing "
        "feed N times in a row, then give up (exit 4); 0 (the default) retries forever. A "
        "connection that ends at once without a change counts as failing"}),
    (("--stats-every",), {"type": float, "metavar": "S", "help": "every S seconds, print the "
        "feeds' statistics to stderr as one JSON line (as SIGUSR1 does at any time)"}),
    (("--cacert",), {"metavar": "FILE", "help": "trust the CA certificates in FILE (PEM)"}),
    (("--insecure",), {"action": "store_true", "help": "do not verify TLS certificates: anyone "
        "on the way can read and change the traffic (for tests)"}),
    (("--proxy",), {"metavar": "URL", "help": "go through this HTTP proxy, "
        "http://[user:password@]host:port, whatever the environment says (see proxies below)"}),
    (("--no-proxy",), {"action": "store_true", "help": "use no proxy, whatever http_proxy, "
        "https_proxy or all_proxy say"}),
    (("-v", "--verbose"), {"action": "count", "default": 0, "help": "say more (-vv: debug)"}),
    (("-q", "--quiet"), {"action": "count", "default": 0, "help": "errors only"}),
    (("--version",), {"action": "version", "version": "changeloop " + __version__}),
]  # fmt: skip


class UsageError(Exception):
    """A bad command line found after parsing; argparse reports it (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, from :data:`OPTIONS`."""
    parser = argparse.ArgumentParser(
        prog="changeloop",
        description="Follow CouchDB _changes feeds; print one JSON line per change.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flags, options in OPTIONS:
        parser.add_argument(*flags, **options)
    return parser


def redact(url: str) -> str:
    """``url`` without its ``user:password@``, for messages."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path if sep else url


def split_url(text: str, with_db: bool) -> Tuple[str, Optional[str], SplitResult]:
    """Return the server's URL without credentials, the database's name, and the parts."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise UsageError("bad URL %s: %s" % (redact(text), exc)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("not an http:// or https:// URL with a host: %s" % redact(text))
    if parts.query or parts.fragment:
        raise UsageError("a URL cannot have a query or a fragment: %s" % redact(text))
    path, name = parts.path.rstrip("/"), None
    if with_db:
        path, _, segment = path.rpartition("/")
        if not segment:
            raise UsageError("no database in %s (--all-dbs follows a server)" % redact(text))
        name = unquote(segment)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, path, "", "")), name, parts


def find_credentials(parts: SplitResult) -> Optional[Tuple[str, str]]:
    """The URL's credentials (with a warning), else the environment's, else ``~/.netrc``'s."""
    if parts.username is not None:
        LOG.warning(
            "credentials in a URL are visible to other users of this machine; "
            "prefer COUCHDB_USER/COUCHDB_PASSWORD or ~/.netrc"
        )
        return unquote(parts.username), unquote(parts.password or "")
    user = os.environ.get("COUCHDB_USER")
    if user:
        return user, os.environ.get("COUCHDB_PASSWORD", "")
    try:
        entry = netrc.netrc().authenticators(parts.hostname or "")
    except FileNotFoundError:
        return None
    except (OSError, netrc.NetrcParseError) as exc:
        LOG.warning("ignoring ~/.netrc: %s", exc)
        return None
    return None if entry is None else (entry[0], entry[2] or "")


def parse_since(text: str) -> Any:
    """``now``, a number, a JSON array, or an opaque (CouchDB 2+) string seq, as given."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, list)) and not isinstance(value, bool) else text


def feed_params(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``_changes`` parameters, filters included, that the options ask for."""
    if sum(x is not None for x in (args.filter, args.doc_ids, args.selector)) > 1:
        raise UsageError("choose one of --filter, --doc-id and --selector")
    if args.param and args.filter is None:
        raise UsageError("--param is for --filter")
    params: Dict[str, Any] = {}
    for pair in args.param:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("--param takes K=V, not %r" % pair)
        if key in OWN_OPTIONS:
            raise UsageError("--param %s: use %s instead" % (key, OWN_OPTIONS[key]))
        params[key] = param_value(key, value)
    if args.selector is not None:
        try:
            params["selector"] = json.loads(args.selector)
        except ValueError as exc:
            raise UsageError("--selector is not JSON: %s" % exc) from None
        if not isinstance(params["selector"], dict):
            raise UsageError("--selector must be a JSON object")
    named = {"filter_name": args.filter, "doc_ids": args.doc_ids, "style": args.style}
    params.update((k, v) for k, v in named.items() if v is not None)
    if args.heartbeat is not None:
        params["heartbeat"] = args.heartbeat
    if args.include_docs:
        params["include_docs"] = True
    try:  # what the library would refuse later, refused now as a usage error
        changes_request("/db", "continuous", 0, params)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return params


def param_value(key: str, text: str) -> Any:
    """A ``--param`` value: JSON when it parses (``2``, ``true``, ``[1,2]``, ``"text"``), else the
    text; checked against the type CouchDB expects for the parameters it knows."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if value is None:
        raise UsageError("--param %s: null is not a value (leave the parameter out)" % key)
    expected = PARAM_TYPES.get(key)
    if expected is int and (type(value) is not int or value < 0):
        raise UsageError("--param %s takes a whole number, not %r" % (key, text))
    if expected is bool and type(value) is not bool:
        raise UsageError("--param %s takes true or false, not %r" % (key, text))
    return value


def check_args(args: argparse.Namespace) -> None:
    """The rules argparse cannot express. ``--all-dbs URL`` takes the URL for the optional
    pattern: it is moved back."""
    if args.all_dbs is not None and "://" in args.all_dbs:
        args.url.insert(0, args.all_dbs)
        args.all_dbs = ""
    if not args.url:
        raise UsageError("give at least one URL")
    if args.all_dbs is not None and len(args.url) != 1:
        raise UsageError("--all-dbs takes exactly one server URL")
    if args.feed == "longpoll" and (args.all_dbs is not None or len(args.url) > 1):
        raise UsageError("--feed longpoll waits on one database; follow several continuously")
    for name in ("limit", "heartbeat", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError("--%s must be at least 1" % name)
    if args.max_retries < 0:
        raise UsageError("--max-retries must be 0 (forever) or more")
    if args.stats_every is not None and not args.stats_every > 0:
        raise UsageError("--stats-every must be more than 0")
    if not args.poll_interval > 0:
        raise UsageError("--poll-interval must be more than 0")
    if args.shard is not None:
        if args.all_dbs is None:
            raise UsageError("--shard is for --all-dbs")
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise UsageError("--shard takes I/N with 0 <= I < N, not %r" % args.shard)
        args.shard = (int(i), int(n))
    if args.insecure and args.cacert:
        raise UsageError("choose --cacert or --insecure, not both")
    if args.proxy is not None and args.no_proxy:
        raise UsageError("choose --proxy or --no-proxy, not both")
