"""The ``changeloop`` command: follow databases' ``_changes`` feeds, one JSON line per change.

Strategy: one :class:`~changeloop.loop.Loop` on the main thread and one
:class:`~changeloop.consumer.Consumer` per database (a
:class:`~changeloop.watcher.DatabaseWatcher` for ``--all-dbs``). The change callback writes and
flushes a line before it returns, so a change is out before its seq can be checkpointed. The
lifecycle callbacks turn reconnections and errors into one stderr line each and decide the exit
code; the library's own log, which would say the same things, is muted unless ``-v`` asks for it.
SIGINT and SIGTERM only ask the loop to stop (stopping saves the checkpoints); outside the loop
they interrupt, but never a checkpoint's save, and a second one waits for the stop the first one
asked for (see ``SignalHandling.signals_deferred``). SIGUSR1 (and ``--stats-every``) prints the
library's statistics to stderr as one JSON line.

A closed stdout (``| head -1``) is noticed by the next write (``BrokenPipeError``), or on a quiet
feed by a check of the descriptor every :data:`STDOUT_CHECK_EVERY_S` (a ``poll()`` for an error
on a pipe): either way the command stops cleanly. The checkpoint records what was *written* to
stdout, not what the reader consumed: lines left unread in a pipe count as delivered.

Where the parts live: this module is the command's flow (:func:`main`, and ``Command``: the
databases, their consumers, the lifecycle callbacks, the exit code); :mod:`changeloop._cli_args`
holds the options and their checks, :mod:`changeloop._cli_output` what the command writes (the
``Output`` half of ``Command``), :mod:`changeloop._cli_signals` what a signal does (its
``SignalHandling`` half).
"""

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import quote

from . import _transport
from ._cli_args import (
    UsageError,
    build_parser,
    check_args,
    feed_params,
    find_credentials,
    parse_since,
    split_url,
)
from ._cli_output import (
    STDOUT_CHECK_EVERY_S,
    Output,
    Progress,
    StderrHandler,
    logging_to_stderr,
    quiet_stdout,
)
from ._cli_signals import SignalHandling, signals_to
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
from .watcher import DatabaseWatcher, DropEvent

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


class Command(Output, SignalHandling):
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

    def store(self, db: Database) -> Optional[FileCheckpoint]:
        if self.args.checkpoint is None:
            return None
        key = db.server.url + "/" + quote(db.name, "")
        return RecordingCheckpoint(self.args.checkpoint, key, self.signals_deferred)

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


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command with ``argv`` (``sys.argv[1:]`` by default); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    except KeyboardInterrupt:  # before following, or so late that even the logging was undone
        return EXIT_INTERRUPTED


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
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
