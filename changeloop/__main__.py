"""The ``changeloop`` command: follow databases' ``_changes`` feeds, one JSON line per change.

Strategy: one :class:`~changeloop.loop.Loop` on the main thread and one
:class:`~changeloop.consumer.Consumer` per database (a
:class:`~changeloop.watcher.DatabaseWatcher` for ``--all-dbs``). The change callback writes and
flushes a line before it returns, so a change is out before its seq can be checkpointed. The
lifecycle callbacks turn reconnections and errors into one stderr line each and decide the exit
code; the library's own log, which would say the same things, is muted unless ``-v`` asks for it.
SIGINT and SIGTERM only ask the loop to stop (stopping saves the checkpoints); outside the loop
they interrupt, but never a checkpoint's save, and a second one waits for the stop the first one
asked for (see ``Command.signals_deferred``). SIGUSR1 (and ``--stats-every``) prints the
library's statistics to stderr as one JSON line.

A closed stdout (``| head -1``) is noticed by the next write (``BrokenPipeError``), or on a quiet
feed by a check of the descriptor every :data:`STDOUT_CHECK_EVERY_S` (a ``poll()`` for an error
on a pipe): either way the command stops cleanly. The checkpoint records what was *written* to
stdout, not what the reader consumed: lines left unread in a pipe count as delivered.
"""

import argparse
import contextlib
import functools
import json
import logging
import netrc
import os
import select
import signal
import stat
import sys
import tempfile
import threading
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from . import _transport
from ._params import changes_request
from ._version import __version__
from .checkpoint import FileCheckpoint
from .client import Database, Server
from .consumer import Consumer, FeedEvent
from .errors import (
    CallbackError,
    ChangeloopError,
    CheckpointError,
    GaveUpError,
    HTTPError,
    NetworkError,
    NotFound,
    TLSError,
    Unauthorized,
)
from .loop import Loop
from .watcher import POLL_INTERVAL_S, DatabaseWatcher, DropEvent

__all__ = ["main", "EXIT_OK", "EXIT_USAGE", "EXIT_FATAL", "EXIT_GAVE_UP", "EXIT_INTERRUPTED"]

LOG = logging.getLogger("changeloop.cli")  # named explicitly: under `python -m` it is __main__

# Ctrl-C while following is how a follow-forever command is meant to end: every feed stops and
# checkpoints, so it is a clean stop (0), and `changeloop ... && next` goes on. 130 is kept for
# an interruption that lost work: before following began, a one-shot request, a second signal.
EXIT_OK = 0  # stopped cleanly: --limit, a one-shot feed printed, Ctrl-C/SIGTERM while following
EXIT_USAGE = 2  # argparse's code for a bad command line
EXIT_FATAL = 3  # the server refused (4xx), TLS failed, the checkpoint cannot be read or written
EXIT_GAVE_UP = 4  # the network (or 5xx) kept failing past --max-retries; a one-shot request failed
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT: interrupted before following, or forced

#: Seconds between redraws of the terminal's progress line: often enough to look alive.
PROGRESS_EVERY_S = 0.25
#: Seconds between checks that stdout (a pipe) still has a reader, when nothing is written: a
#: `| head -1` on a quiet feed ends within this, at the cost of one poll() call.
STDOUT_CHECK_EVERY_S = 0.5

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


class Progress:
    """The catching-up line on a terminal's stderr: changes so far, those still pending (when
    the servers report ``pending``) and the rate, redrawn every :data:`PROGRESS_EVERY_S` (by
    :meth:`tick`, on a timer) until every feed has caught up; then one "caught up" line.

    A feed has caught up when it says so (``on_caught_up``: its first heartbeat), or at once
    when it has delivered the ``pending`` changes its server counted at the start (CouchDB 2+).

    Args:
        consumers: the feeds to wait for.
        pending: how many changes each consumer's server said were pending when the feeds
            started (by ``id`` of the consumer), or ``None`` when one of them does not say
            (pouchdb-server, CouchDB 1.x).
    """

    def __init__(self, consumers: List[Consumer], pending: Optional[Dict[int, int]] = None) -> None:
        self.consumers = {id(consumer): consumer for consumer in consumers}
        self.waiting = set(self.consumers)
        self.pending = pending
        self.rows = 0
        self.started = time.monotonic()
        self.shown = False
        self.done = False

    def count(self, rows: int = 1) -> None:
        self.rows += rows

    def tick(self) -> bool:
        """Redraw, or say caught up; return whether to go on ticking."""
        if self.pending is not None:
            for key in list(self.waiting):
                if self.consumers[key].delivered >= self.pending.get(key, 0):
                    self.waiting.discard(key)
        if not self.waiting:
            self.finish()
            return False
        self.draw(time.monotonic())
        return True

    def line(self, now: float) -> str:
        """The progress line's text."""
        text = "catching up: %d changes" % self.rows
        if self.pending is not None:  # changes made meanwhile come on top: never below 0
            text += ", %d pending" % max(0, sum(self.pending.values()) - self.rows)
        return text + ", %.0f/s" % (self.rows / max(now - self.started, 1e-9))

    def draw(self, now: float) -> None:
        # \r: back to the line's start; ESC [K: erase what a longer line left there
        sys.stderr.write("\r%s\x1b[K" % self.line(now))
        sys.stderr.flush()
        self.shown = True

    def caught_up(self, consumer: Consumer) -> None:
        self.waiting.discard(id(consumer))
        if not self.waiting:
            self.finish()

    def finish(self) -> None:
        """Every feed has caught up: say so, once."""
        if self.done:
            return
        self.done = True
        self.waiting.clear()
        elapsed = time.monotonic() - self.started
        sys.stderr.write("\rcaught up: %d changes in %.1f s\x1b[K\n" % (self.rows, elapsed))
        sys.stderr.flush()
        self.shown = False

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


class RecordingCheckpoint(FileCheckpoint):
    """The command's checkpoint file: a save that fails is recorded, so that a failure in the
    library's stop (which only logs it) still makes the command fail (exit 3); and a save runs
    with the command's signals deferred (``deferred``), so that a second Ctrl-C cannot cut it
    short."""

    failures: List[CheckpointError] = []

    def __init__(
        self, path: str, key: Optional[str], deferred: Callable[[], ContextManager[None]]
    ) -> None:
        super().__init__(path, key=key)
        self.deferred = deferred

    def save(self, seq: Any) -> None:
        with self.deferred():
            try:
                super().save(seq)
            except CheckpointError as exc:
                self.failures.append(exc)
                raise


def check_checkpoint(path: str) -> None:
    """Fail before anything is printed if ``path`` cannot be read or written.

    Raises:
        CheckpointError: the file is not a checkpoint, or its directory takes no new file (a
            save writes a temporary file there and renames it over the checkpoint).
    """
    FileCheckpoint(path).load()  # raises for an unreadable or foreign file
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".checkpoint-probe-", dir=directory)
    except OSError as exc:
        raise CheckpointError("cannot write checkpoint %s: %s" % (path, exc.strerror)) from exc
    os.close(fd)
    os.unlink(probe)


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (``| head -1`` is done)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not hasattr(select, "poll"):
            return False  # a file or a terminal has no reader to lose; Windows has no poll()
        poller = select.poll()
        poller.register(fd, 0)  # no events asked for: errors and hang-ups are always reported
        # Two tests, not one mask: vermin reads `a | b` of two attributes as a 3.10 union type.
        return any(event & select.POLLERR or event & select.POLLHUP for _, event in poller.poll(0))
    except (OSError, ValueError):  # no descriptor (a test's capture): nothing to watch
        return False


class StderrHandler(logging.Handler):
    """One line per record, ``changeloop: [warning: |error: ]message``; erases the progress."""

    PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

    def __init__(self) -> None:
        super().__init__()
        self.progress: Optional[Progress] = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.progress is not None:
                self.progress.clear()
            prefix = self.PREFIXES.get(record.levelno, "")
            sys.stderr.write("changeloop: %s%s\n" % (prefix, record.getMessage()))
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def hint(error: BaseException) -> str:
    """What to try next, for the failures a user can fix."""
    if isinstance(error, Unauthorized):
        return "; check the credentials (COUCHDB_USER/COUCHDB_PASSWORD, ~/.netrc, the URL)"
    if isinstance(error, HTTPError) and error.error == "proxy_auth_required":
        return "; check the proxy's login (--proxy, or http_proxy/https_proxy)"
    if isinstance(error, TLSError) and "certificate" in str(error):
        return "; --cacert FILE trusts a private CA"
    return ""


def exit_code(error: BaseException) -> int:
    if isinstance(error, GaveUpError):
        return EXIT_GAVE_UP
    network = isinstance(error, NetworkError) and not isinstance(error, TLSError)
    return EXIT_GAVE_UP if network else EXIT_FATAL


class Command:
    """One run: the databases, their consumers, the output, and what ended it."""

    def __init__(self, args: argparse.Namespace, handler: StderrHandler) -> None:
        self.args = args
        self.handler = handler
        self.params = feed_params(args)
        self.since = parse_since(args.since)
        context = None
        if args.insecure:
            LOG.warning("--insecure: TLS certificates are not verified")
            context = _transport.make_ssl_context(verify=False)
        elif args.cacert:
            try:
                context = _transport.make_ssl_context(cafile=args.cacert)
            except OSError as exc:  # ssl.SSLError is one
                raise UsageError("cannot load --cacert %s: %s" % (args.cacert, exc)) from None
        self.servers: Dict[Tuple[str, Any], Server] = {}
        self.targets: List[Tuple[Server, Optional[str]]] = []  # name None: every database
        proxy = False if args.no_proxy else args.proxy  # None: the environment decides
        for url in args.url:
            base, name, parts = split_url(url, with_db=args.all_dbs is None)
            auth = find_credentials(parts)
            if (base, auth) not in self.servers:
                try:
                    server = Server(base, auth=auth, ssl_context=context, proxy=proxy)
                except ValueError as exc:  # a bad proxy URL; the message shows no password
                    raise UsageError(str(exc)) from None
                self.servers[base, auth] = server
            self.targets.append((self.servers[base, auth], name))
        self.tagged = args.all_dbs is not None or len(self.targets) > 1
        self.loop = Loop()
        self.consumers: List[Consumer] = []
        self.watcher: Optional[DatabaseWatcher] = None
        self.progress: Optional[Progress] = None
        self.printed = 0
        #: With --batch and --limit: the consumer whose batch the limit cut, and the seq of the
        #: last change printed from it.
        self.cut: Optional[Tuple[Consumer, Any]] = None
        self.retrying: Set[str] = set()  # databases that failed since they last connected
        self.exit_code = EXIT_OK
        self.following = False
        self.stop_asked = False
        self.stopped = False
        self.deferring = 0  # depth of signals_deferred() blocks being run
        self.interrupted = False  # a signal was held back (see on_signal): exit 130

    def close(self) -> None:
        with self.signals_deferred():
            self.stop()
            self.loop.close()
            for server in self.servers.values():
                server.close()

    @contextlib.contextmanager
    def signals_deferred(self) -> Iterator[None]:
        """Hold back the ``KeyboardInterrupt`` of a signal until the block is done.

        Checkpoints are saved inside such blocks (each save, and every stop as a whole): a
        second signal (a double Ctrl-C, ``timeout -s TERM`` signalling the process group) used
        to interrupt the stop's write and leave no checkpoint. The signal is noted, and raised
        as soon as the outermost block ends normally, unless a stop is asked for or done: the
        stop then runs to its end and the exit code says 130 (see :meth:`on_signal`).

        Why a flag and not ``signal.pthread_sigmask``: a mask holds the signal back only in the
        thread that sets it, and a signal the kernel gives to another thread (a resolver's)
        still runs the Python handler in the main thread. The flag works on any platform, and
        the interrupted system calls (write, fsync, flock) are retried by Python (PEP 475) when
        the handler returns.
        """
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.interrupted and not (self.stop_asked or self.stopped):
            self.interrupted = False
            raise KeyboardInterrupt  # a one-shot run: its save is done, the rest is not

    def store(self, db: Database) -> Optional[FileCheckpoint]:
        if self.args.checkpoint is None:
            return None
        key = db.server.url + "/" + quote(db.name, "")
        return RecordingCheckpoint(self.args.checkpoint, key, self.signals_deferred)

    def emit(self, name: str, change: Dict[str, Any]) -> None:
        """Print a change: the consumers' callback."""
        if self.tagged:
            change = {"db": name, **change}
        self.write(json.dumps(change), 1)

    def emit_batch(
        self, name: str, batch: List[Dict[str, Any]], consumer: Optional[Consumer] = None
    ) -> None:
        """Print a batch as one JSON array: the consumers' callback with ``--batch``.

        ``consumer`` is the batch's own (the watcher's consumers are found by name).
        """
        cut = None
        if self.args.limit is not None and self.printed + len(batch) > self.args.limit:
            # The consumer counts the whole batch as delivered: remember where the printed part
            # ends, so the checkpoint says that (see run) and the rest comes next time.
            batch = batch[: self.args.limit - self.printed]
            if consumer is None:
                assert self.watcher is not None
                consumer = self.watcher.consumers[name]
            seqs = [change["seq"] for change in batch if change.get("seq") is not None]
            cut = (consumer, seqs[-1] if seqs else consumer.last_seq)
        if self.tagged:
            batch = [{"db": name, **change} for change in batch]
        self.write(json.dumps(batch), len(batch))
        if cut is not None:  # only once printed: a failed write must not move the checkpoint
            self.cut = cut

    def write(self, line: str, changes: int) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()  # before the callback returns, as only then may its seq be saved
        self.printed += changes
        if self.progress is not None:
            self.progress.count(changes)
        if self.args.limit is not None and self.printed >= self.args.limit:
            self.stop()

    def run(self) -> int:
        if self.args.checkpoint is not None:
            check_checkpoint(self.args.checkpoint)
        RecordingCheckpoint.failures = []
        if self.args.feed != "continuous":
            return self.one_shot()
        options: Dict[str, Any] = {
            "on_error": self.on_error,
            "on_connect": self.on_connect,
            "on_disconnect": self.on_disconnect,
            "on_caught_up": self.on_caught_up,
            # The library's give-up policy: it counts attempts until a connection is healthy.
            "max_retries": self.args.max_retries or None,
        }
        emit: Callable[[str, Any], None] = self.emit
        if self.args.batch is not None:
            options["batch_size"] = self.args.batch
            emit = self.emit_batch
        if self.args.all_dbs is not None:
            self.watcher = DatabaseWatcher(
                self.targets[0][0],
                emit,
                self.loop,
                match=self.args.all_dbs or None,
                shard=self.args.shard,
                checkpoint=self.store,
                since=self.since,
                poll_interval=self.args.poll_interval,
                params=self.params,
                consumer_options=options,
                on_drop=self.on_drop,
            )
            self.watcher.start()
        for server, name in self.targets if self.watcher is None else []:
            assert name is not None
            db = server.get_db(name)
            consumer = Consumer(db, self.loop, checkpoint=self.store(db), **options)
            if self.args.batch is None:
                callback: Callable[[Any], None] = functools.partial(self.emit, name)
            else:
                callback = functools.partial(self.emit_batch, name, consumer=consumer)
            consumer.start(callback, self.since, **self.params)
            self.consumers.append(consumer)
        if sys.stderr.isatty():
            watched = list(self.watcher.consumers.values()) if self.watcher is not None else []
            pending = self.pending() if self.watcher is None else None
            self.progress = self.handler.progress = Progress(self.consumers + watched, pending)
            self.loop.call_soon(self.redraw)
        self.loop.call_later(STDOUT_CHECK_EVERY_S, self.check_stdout)
        if self.args.stats_every is not None:
            self.loop.call_later(self.args.stats_every, self.stats_tick)
        self.following = True
        try:
            self.loop.run()
        finally:
            self.following = False
        if self.cut is not None:  # every consumer has stopped and saved: correct the one cut
            consumer, seq = self.cut
            if consumer.checkpoint is not None and seq is not None:
                consumer.checkpoint.save(seq)
        if RecordingCheckpoint.failures and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FATAL  # a save on stop failed: the library only logged it
            LOG.error("%s", RecordingCheckpoint.failures[-1])
        return self.exit_code

    def feeding(self) -> bool:
        """Whether a feed still runs (the watcher runs until stopped)."""
        if self.watcher is not None:
            return not self.stopped
        return any(consumer.running for consumer in self.consumers)

    def redraw(self) -> None:
        """The progress line's timer: redraw until every feed has caught up."""
        if self.progress is not None and self.feeding() and self.progress.tick():
            self.loop.call_later(PROGRESS_EVERY_S, self.redraw)

    def check_stdout(self) -> None:
        """The closed-pipe timer: a quiet feed writes nothing that could fail, so look."""
        if not self.feeding():
            return  # a timer of its own must not keep the loop running when the feeds are done
        if stdout_closed():
            quiet_stdout()  # the reader went away (`| head`): a clean stop
            self.stop()
            return
        self.loop.call_later(STDOUT_CHECK_EVERY_S, self.check_stdout)

    def stats_tick(self) -> None:
        """The ``--stats-every`` timer: print the statistics while a feed runs."""
        if self.feeding():  # like check_stdout: it must not keep the loop running on its own
            self.print_stats()
            self.loop.call_later(self.args.stats_every, self.stats_tick)

    def stats(self) -> Dict[str, Any]:
        """The loop's and every feed's statistics (the library's plain dicts), by database."""
        if self.watcher is not None:
            consumers = list(self.watcher.consumers.values())
        else:
            consumers = self.consumers
        feeds = {consumer.db.name: consumer.stats() for consumer in consumers}
        return {"loop": self.loop.stats(), "feeds": feeds}

    def print_stats(self) -> None:
        """One JSON line on stderr (the loop's thread: SIGUSR1 only asks for it)."""
        if self.progress is not None:
            self.progress.clear()
        sys.stderr.write(json.dumps(self.stats(), sort_keys=True, default=str) + "\n")
        sys.stderr.flush()

    def on_stats_signal(self, signum: int, frame: Any) -> None:
        """SIGUSR1: print the statistics in the loop's next pass (never inside the handler,
        which may have interrupted a write to stderr); ignored when not following."""
        if self.following and not self.stopped:
            self.loop.call_soon_threadsafe(self.print_stats)

    def pending(self) -> Optional[Dict[int, int]]:
        """How many changes wait for each consumer (by ``id``), if the servers say (for the
        progress line).

        One ``limit=0`` request per database: CouchDB 2+ answers with the count in ``pending``
        and no rows. Only asked on a terminal, before following.
        """
        counts: Dict[int, int] = {}
        # limit=0 below; a filter's own --param since/limit would clash with fetch()'s.
        params = {k: v for k, v in self.params.items() if k not in ("heartbeat", "limit", "since")}
        for consumer in self.consumers:
            if consumer.last_seq == "now":
                counts[id(consumer)] = 0  # nothing is pending before now
                continue
            try:
                answer = consumer.fetch(consumer.last_seq, limit=0, **params)
            except ChangeloopError as exc:  # the feed itself will say what is wrong
                LOG.debug("%s: no pending count: %s", consumer.db.name, exc)
                return None
            if not isinstance(answer.get("pending"), int):
                return None
            counts[id(consumer)] = answer["pending"]
        return counts

    def one_shot(self) -> int:
        """``--feed normal`` or ``longpoll``: print one answer per database, save, exit."""
        for db in self.databases():
            params = dict(self.params)
            if self.args.limit is not None:
                params["limit"] = self.args.limit - self.printed
            store = self.store(db)
            saved = store.load() if store is not None else None
            consumer = Consumer(db)
            request = consumer.wait_once if self.args.feed == "longpoll" else consumer.fetch
            result = request(self.since if saved is None else saved, **params)
            rows = result.get("results", [])
            if self.args.limit is not None:  # in case the server ignored the limit
                rows = rows[: self.args.limit - self.printed]
            if self.args.batch is None:
                for row in rows:
                    self.emit(db.name, row)
            else:
                for start in range(0, len(rows), self.args.batch):
                    self.emit_batch(db.name, rows[start : start + self.args.batch])
            if store is not None:  # a limited answer's last_seq may lie beyond its last row
                limited = "limit" in params and len(rows) >= params["limit"]
                store.save(rows[-1]["seq"] if limited else result.get("last_seq"))
            if self.args.limit is not None and self.printed >= self.args.limit:
                break
        return EXIT_OK

    def databases(self) -> Iterator[Database]:
        for server, name in self.targets:
            if name is not None:
                yield server.get_db(name)
                continue
            match, shard = self.args.all_dbs or None, self.args.shard
            watcher = DatabaseWatcher(server, self.emit, self.loop, match=match, shard=shard)
            for found in server.all_dbs():
                if watcher.wants(found):
                    yield server.get_db(found)

    def stop(self) -> None:
        """Stop every feed (each saves its checkpoint) and the loop. The loop's thread only.

        A signal meanwhile is raised once every feed has stopped (see :meth:`signals_deferred`).
        """
        with self.signals_deferred():
            self.stopped = True
            if self.watcher is not None:
                self.watcher.stop()
            for consumer in self.consumers:
                consumer.stop()
            if self.progress is not None:
                self.progress.clear()
                self.progress.waiting.clear()
            if self.loop.is_running():
                self.loop.stop()

    def fail(self, code: int, message: str) -> None:
        if self.exit_code == EXIT_OK:  # the first failure decides
            self.exit_code = code
            LOG.error("%s", message)
        self.stop()

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT, SIGTERM: the first one while following asks for a clean stop (in the loop's
        next pass); one that comes once a stop is asked for or done never interrupts anything:
        it makes the exit code 130, and the stop goes on until every checkpoint is saved.
        Before following (set-up, a one-shot request) a signal interrupts at once, but never a
        checkpoint's save (see :meth:`signals_deferred`)."""
        if self.following and not self.stop_asked:
            self.stop_asked = True  # and no logging: the signal may have come inside a log call
            self.loop.call_soon_threadsafe(self.stop)
            return
        if self.deferring or self.stop_asked or self.stopped:
            # Raising now could cut a change short between its line and its count (so the
            # checkpoint would lag behind stdout), a save, or a __del__ (which would print
            # "Exception ignored"): noted, and raised only where a deferred block ends.
            self.interrupted = True
            return
        raise KeyboardInterrupt  # set-up, a one-shot request

    # -- the consumers' lifecycle callbacks ------------------------------------------------

    def on_error(self, event: FeedEvent) -> None:
        name, error = event.consumer.db.name, event.error
        if isinstance(error, CallbackError) and isinstance(error.__cause__, BrokenPipeError):
            quiet_stdout()  # the reader went away (`| head`): a clean stop
            self.stop()
        elif isinstance(error, CheckpointError):  # retrying would print the same changes again
            self.fail(EXIT_FATAL, "%s: %s" % (name, error))
        elif isinstance(error, GaveUpError):  # --max-retries, counted by the library
            last = error.__cause__ or error
            self.fail(
                EXIT_GAVE_UP,
                "%s: %s; gave up after %d failed attempts in a row (%.1f s)"
                % (name, last, error.attempts, error.outage),
            )
        elif event.will_retry:
            self.retrying.add(name)
            LOG.warning("%s: %s; retrying in %.2f s", name, error, event.retry_in or 0.0)
        elif self.watcher is not None and isinstance(error, NotFound):
            pass  # deleted: on_drop says it
        elif error is not None:
            self.fail(exit_code(error), "%s: %s%s" % (name, error, hint(error)))

    def on_drop(self, event: DropEvent) -> None:
        if isinstance(event.error, NotFound):
            LOG.warning("%s: deleted; followed again if it is re-created", event.name)
        elif not isinstance(event.error, ChangeloopError) or event.consumer is None:
            # a consumer that could not start (its checkpoint) is fatal, as for a URL given
            self.fail(exit_code(event.error), "%s: %s" % (event.name, event.error))

    def on_connect(self, event: FeedEvent) -> None:
        name = event.consumer.db.name
        level = logging.WARNING if name in self.retrying else logging.INFO
        self.retrying.discard(name)
        LOG.log(level, "%s: connected, following changes after %s", name, json.dumps(event.seq))

    def on_disconnect(self, event: FeedEvent) -> None:
        if event.error is None:  # after an error, on_error has said it
            LOG.info("%s: disconnected at %s", event.consumer.db.name, json.dumps(event.seq))

    def on_caught_up(self, event: FeedEvent) -> None:
        LOG.info("%s: caught up at %s", event.consumer.db.name, json.dumps(event.seq))
        if self.progress is not None:
            self.progress.caught_up(event.consumer)


def quiet_stdout() -> None:
    """Point stdout at the null device, so the exit's last flush cannot fail on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def logging_to_stderr(verbosity: int) -> Iterator[StderrHandler]:
    """The CLI's log to stderr (and the library's, with ``-v``), for the ``with`` block."""
    handler = StderrHandler()
    package = logging.getLogger("changeloop")  # the library's loggers are its children
    saved = (package.level, package.propagate, LOG.level)
    package.addHandler(handler)
    package.propagate = False
    LOG.setLevel(logging.WARNING - 10 * max(-1, min(verbosity, 2)))  # -q: ERROR ... -vv: DEBUG
    # The library's log says what the callbacks say, less readably: only with -v (-vv: all).
    muted = logging.CRITICAL + 1
    package.setLevel({1: logging.WARNING, 2: logging.DEBUG}.get(min(verbosity, 2), muted))
    try:
        yield handler
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]
        LOG.setLevel(saved[2])


@contextlib.contextmanager
def signals_to(command: Command) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``command.on_signal``, SIGUSR1 (where there is one) to
    ``command.on_stats_signal`` (from the main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers: Dict[int, Callable[[int, Any], None]] = {
        signal.SIGINT: command.on_signal,
        signal.SIGTERM: command.on_signal,
    }
    usr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
    if usr1 is not None:
        handlers[usr1] = command.on_stats_signal
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, ours in handlers.items():
        signal.signal(sig, ours)
    try:
        yield
    finally:
        for sig, theirs in previous.items():
            signal.signal(sig, theirs)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command with ``argv`` (``sys.argv[1:]`` by default); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with logging_to_stderr(args.verbose - args.quiet) as handler:
        started = time.monotonic()
        try:
            check_args(args)
            command = Command(args, handler)
        except UsageError as exc:
            parser.error(str(exc))  # exits 2
        try:
            # The signals go back to their old handlers last: a late signal finds every
            # checkpoint saved and only sets the exit code (see Command.on_signal).
            with signals_to(command):
                code = execute(command)
                if command.interrupted:  # a signal held back while stopping: all is saved
                    code = EXIT_INTERRUPTED
                LOG.info("%d changes in %.1f s", command.printed, time.monotonic() - started)
        except KeyboardInterrupt:  # delivered as the old handlers came back: all is saved
            code = EXIT_INTERRUPTED
        return code


def execute(command: Command) -> int:
    """Run ``command``, then close it (which stops and saves whatever still runs); the code."""
    try:
        code = command.run()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        quiet_stdout()
        code = EXIT_OK
    except ChangeloopError as exc:
        code = exit_code(exc)
        LOG.error("%s%s", exc, hint(exc))
    finally:
        try:
            command.close()  # stops whatever still runs, so every checkpoint is saved
        except KeyboardInterrupt:  # a signal during close, raised once it was done
            code = EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
