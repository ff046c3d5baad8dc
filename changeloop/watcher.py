"""``DatabaseWatcher``: one consumer per matching database, kept in step with the server.

The watcher follows the server's ``_db_updates`` feed (admin only; CouchDB 2+ with the
``_global_changes`` database): a ``created`` or ``updated`` event for a matching database that has
no consumer yet starts one, a ``deleted`` event stops it. At start it attaches to every matching
database that already exists (``_all_dbs``). Where there is no ``_db_updates`` (pouchdb-server,
CouchDB 1.x without it, a non-admin user), it polls ``_all_dbs`` every ``poll_interval`` seconds
instead and says so in the log; it does the same if the ``_db_updates`` feed stops for good later.
Each database's consumer has the reconnect, resume and checkpoint guarantees of a single
:class:`~changeloop.consumer.Consumer`.

Start-up leaves no gap: the first ``_all_dbs`` listing fixes which databases existed "at start",
then the ``_db_updates`` seq of that moment is resolved, then ``_all_dbs`` is listed again: a
database created in between is in the second listing, one created later is in the feed.

A database whose consumer stops for good (deleted: 404; refused: 401/403; its callback raised; a
line over the limit; its checkpoint store cannot load) is dropped, reported to ``on_drop`` with a
:class:`DropEvent`, and tried again by a new consumer after a backoff (``poll_interval``, doubling
while the tries deliver nothing, up to ``RETRY_CAP_S``); a database that is gone (404) is tried
again only once it shows up again (in a listing or a ``_db_updates`` event), a re-created one at
once and from its beginning. One failing database never stops the watch.

Sharing the work: ``shard=(i, n)`` keeps only the databases whose stable hash (CRC-32 of the
name) modulo ``n`` is ``i``, so ``n`` workers (threads, processes, machines) split any set of
databases without talking to each other; with checkpoints in ``_local/`` documents
(``checkpoint=lambda db: LocalDocCheckpoint(db, "worker")``) any worker can take a shard over.
"""

import fnmatch
import logging
import re
import zlib
from typing import Any, Callable, Dict, List, Optional, Pattern, Set, Tuple, Union

from ._transport import ensure_fd_capacity
from .client import Database, Server
from .consumer import Change, Consumer, FeedEvent
from .errors import ChangeloopError, HTTPError, NotFound
from .loop import Loop, TimerHandle

__all__ = ["DatabaseWatcher", "DropEvent", "shard_of", "POLL_INTERVAL_S", "RETRY_CAP_S"]

logger = logging.getLogger(__name__)

#: How often ``_all_dbs`` is polled where the server has no ``_db_updates``.
POLL_INTERVAL_S = 10.0
#: The longest wait, in seconds, before a dropped database is tried again. A database refused
#: for good costs one request per this many seconds; one repaired is followed again within it.
RETRY_CAP_S = 600.0
#: Statuses of ``_db_updates`` that mean "not available here": fall back to polling.
NO_DB_UPDATES_STATUSES = frozenset([400, 401, 403, 404, 405, 501])

Matcher = Union[None, str, Pattern[str], Callable[[str], bool]]
ChangeCallback = Callable[[str, Change], Any]

_DEFAULT = object()  # "start where a new consumer of this database starts"


def shard_of(name: str, shards: int) -> int:
    """The shard (``0 .. shards-1``) a database name belongs to: CRC-32 of its UTF-8 bytes.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return zlib.crc32(name.encode("utf-8")) % shards


def _matcher(match: Matcher) -> Callable[[str], bool]:
    if match is None:
        return lambda name: not name.startswith("_")  # system databases are not user data
    if isinstance(match, str):
        pattern = re.compile(fnmatch.translate(match))
        return lambda name: pattern.match(name) is not None
    if isinstance(match, re.Pattern):
        compiled = match
        return lambda name: compiled.search(name) is not None
    return match


class _DbUpdatesFeed(Consumer):
    """The server's ``_db_updates`` continuous feed: a consumer of a server-wide path."""

    def _feed_path(self) -> str:
        return "/_db_updates"


class DropEvent:
    """What ``on_drop`` receives when the watcher lets go of a database that failed for good.

    Attributes:
        name: the database.
        error: why: the exception that stopped its consumer, or that starting one raised.
        consumer: the consumer that stopped, or ``None`` when none could be started.
        failures: drops in a row in which the database's consumer delivered nothing.
        retry_in: seconds until a new consumer is tried; for a database that is gone (404), the
            earliest time it is tried once it shows up again.
    """

    __slots__ = ("name", "error", "consumer", "failures", "retry_in")

    def __init__(
        self,
        name: str,
        error: BaseException,
        consumer: Optional[Consumer],
        failures: int,
        retry_in: float,
    ) -> None:
        self.name = name
        self.error = error
        self.consumer = consumer
        self.failures = failures
        self.retry_in = retry_in

    def __repr__(self) -> str:
        return "<DropEvent %s %r failures=%d retry_in=%.1f>" % (
            self.name,
            self.error,
            self.failures,
            self.retry_in,
        )


class _Dropped:
    """A dropped database: where its next consumer starts, and when."""

    __slots__ = ("since", "retry_at", "timer")

    def __init__(self, since: Any, retry_at: float, timer: Optional[TimerHandle]) -> None:
        self.since = since
        self.retry_at = retry_at
        self.timer = timer


class DatabaseWatcher:
    """Follow every matching database of a server, on one loop.

    Args:
        server: the server to watch (with admin credentials for ``_db_updates``).
        callback: called as ``callback(db_name, change)`` for each change of each database
            (``callback(db_name, batch)``, a list, with ``batch_size`` in ``consumer_options``).
        loop: the loop every consumer runs on; by default a private one.
        match: which databases: a glob (``"userdb-*"``), a compiled regex, or a predicate;
            by default every database whose name does not start with ``_``.
        shard: ``(i, n)``: keep only the databases with ``shard_of(name, n) == i``.
        checkpoint: a function ``db -> store`` giving each database's checkpoint store.
        since: where each consumer starts when its store has nothing: ``0``, or ``"now"``,
            which means "from the moment the watcher started": the databases that exist at
            start begin at their current seq, and a database created later from its beginning.
        poll_interval: seconds between ``_all_dbs`` polls when there is no ``_db_updates``, and
            the first wait before a dropped database is tried again.
        params: ``_changes`` parameters for every consumer (``include_docs=True``...).
        consumer_options: keyword arguments for every :class:`~changeloop.consumer.Consumer`
            (``on_error``...).
        on_drop: called with a :class:`DropEvent` when a database's consumer stopped for good
            (or could not start) and the watcher let go of it until its retry.
    """

    def __init__(
        self,
        server: Server,
        callback: ChangeCallback,
        loop: Optional[Loop] = None,
        *,
        match: Matcher = None,
        shard: Optional[Tuple[int, int]] = None,
        checkpoint: Optional[Callable[[Database], Any]] = None,
        since: Any = 0,
        poll_interval: float = POLL_INTERVAL_S,
        params: Optional[Dict[str, Any]] = None,
        consumer_options: Optional[Dict[str, Any]] = None,
        on_drop: Optional[Callable[[DropEvent], Any]] = None,
    ) -> None:
        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise ValueError("shard must be (i, n) with 0 <= i < n, not %r" % (shard,))
        self.server = server  #: The server watched.
        self.callback = callback  #: Called as ``callback(db_name, change)``.
        self.loop = loop if loop is not None else Loop()  #: The loop of every consumer.
        self._matches = _matcher(match)
        self.shard = shard  #: ``(i, n)``, or ``None``.
        self.checkpoint = checkpoint  #: ``db -> store``, or ``None``.
        self.since = since  #: Where new consumers start.
        self.poll_interval = poll_interval  #: Seconds between polls.
        self.params = dict(params or {})  #: ``_changes`` parameters of every consumer.
        self.consumer_options = dict(consumer_options or {})  #: Consumer keyword arguments.
        self.on_drop = on_drop  #: Called when a consumer is dropped.
        #: The consumers, by database name.
        self.consumers: Dict[str, Consumer] = {}
        self._updates: Optional[_DbUpdatesFeed] = None
        self._poll_timer: Optional[TimerHandle] = None
        self._running = False
        self._at_start: Set[str] = set()  # not followed yet, and there when the watcher started
        self._dropped: Dict[str, _Dropped] = {}
        self._failures: Dict[str, int] = {}  # drops in a row without a delivered change
        #: ``"db_updates"`` or ``"polling"`` once started.
        self.mode: Optional[str] = None

    def __repr__(self) -> str:
        return "<DatabaseWatcher %s %s databases=%d dropped=%d shard=%s>" % (
            self.server.url,
            self.mode or "idle",
            len(self.consumers),
            len(self._dropped),
            self.shard,
        )

    def wants(self, name: str) -> bool:
        """Whether this watcher follows database ``name`` (match and shard)."""
        if not self._matches(name):
            return False
        return self.shard is None or shard_of(name, self.shard[1]) == self.shard[0]

    def start(self) -> "DatabaseWatcher":
        """Attach to the existing databases and follow new ones. Call on the loop's thread (or
        before it runs); the loop's run tiers then serve every consumer.

        Raises:
            HTTPError, NetworkError: ``_all_dbs`` (or where ``_db_updates`` is now) could not be
                read.
            ResourceLimitError: the open-file limit is too low for that many feeds.
        """
        if self._running:
            raise RuntimeError("the watcher is already running")
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        logger.info("watching %d databases of %s", len(self.consumers), self.server.url)
        return self

    def _start(self) -> None:
        self._running = True
        names = self._listing()
        self._at_start = set(names)
        updates = _DbUpdatesFeed(
            self.server.get_db("_db_updates"),
            self.loop,
            on_error=self._on_updates_error,
            reconnect_cap=self.consumer_options.get("reconnect_cap", 60.0),
        )
        try:  # where "now" is, before the second listing: nothing created meanwhile is missed
            seq = updates.fetch(since="now").get("last_seq")
        except HTTPError as exc:
            if exc.status not in NO_DB_UPDATES_STATUSES:
                raise
            self._fall_back(
                "%s has no usable _db_updates (HTTP %d)" % (self.server.url, exc.status),
                expected=True,
            )
        else:
            names = self._listing()  # those not in the first one appeared after the start
            self._updates = updates
            self.mode = "db_updates"
        ensure_fd_capacity(len(names))
        if self._updates is not None:
            self._updates.start(self._on_db_update, since="now" if seq is None else seq)
        for name in names:
            self._add(name)

    def _listing(self) -> List[str]:
        return [name for name in self.server.all_dbs() if self.wants(name)]

    def stop(self) -> None:
        """Stop every consumer and the watch; checkpoints are saved. Thread-safe."""
        if self.loop.in_loop_thread() or not self.loop.is_running():
            self._stop()
        else:
            self.loop.call_soon_threadsafe(self._stop)

    def run(self) -> None:
        """Start, and run the loop in this thread until :meth:`stop`.

        Ctrl-C (``KeyboardInterrupt``, or ``SystemExit``) stops every consumer, which saves its
        checkpoint, and is then raised again: a caller can tell an interruption from a stop.
        """
        self.start()
        try:
            self.loop.run(forever=True)
        except BaseException:  # only KeyboardInterrupt and SystemExit leave the loop
            logger.info("interrupted; stopping %d consumers", len(self.consumers))
            self.loop.call_threadsafe(self._shutdown)  # run() has returned: at once, here
            raise

    def _stop(self) -> None:
        self._shutdown()
        if self.loop.is_running() and self.loop.in_loop_thread():
            self.loop.stop()

    def _shutdown(self) -> None:
        self._running = False
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if self._updates is not None:
            self._updates.stop()
            self._updates = None
        for consumer in list(self.consumers.values()):
            consumer.stop()
        self.consumers.clear()
        for name in list(self._dropped):
            self._forget(name)

    # -- consumers -----------------------------------------------------------------------------

    def _add(self, name: str, since: Any = _DEFAULT) -> None:
        """Start following ``name``; a failure drops it (and reports it), never raises."""
        if name in self.consumers or not self._running:
            return
        dropped = self._dropped.pop(name, None)
        if dropped is not None:
            if dropped.timer is not None:
                dropped.timer.cancel()
            if since is _DEFAULT:
                since = dropped.since
        if since is _DEFAULT:
            # "now" is the watcher's start: a database that was not there then starts at 0.
            since = self.since if self.since != "now" or name in self._at_start else 0
        self._at_start.discard(name)
        consumer = None
        try:
            db = self.server.get_db(name)
            store = self.checkpoint(db) if self.checkpoint is not None else None
            options = dict(self.consumer_options, on_error=self._on_consumer_error)
            consumer = Consumer(db, self.loop, checkpoint=store, **options)
            callback = self.callback
            consumer.start(lambda change: callback(name, change), since=since, **self.params)
        except Exception as exc:  # a store that cannot load (403), a bad option: this one only
            logger.debug("%s: cannot follow it: %r", name, exc)  # _drop says it, once
            self._drop(name, None, exc, since)
            return
        self.consumers[name] = consumer
        logger.debug("following %s since %r", name, since)

    def _remove(self, name: str) -> None:
        """``name`` was deleted: stop following it, and forget any retry."""
        self._forget(name)
        consumer = self.consumers.pop(name, None)
        if consumer is not None:
            consumer.stop()
            logger.info("%s was deleted; stopped following it", name)

    def _forget(self, name: str) -> None:
        self._failures.pop(name, None)
        dropped = self._dropped.pop(name, None)
        if dropped is not None and dropped.timer is not None:
            dropped.timer.cancel()

    def _on_consumer_error(self, event: FeedEvent) -> None:
        """Every consumer's ``on_error``: note a stop for good, then tell the user's."""
        if not event.will_retry:  # checked once the consumer has finished stopping
            self.loop.call_soon(self._check_stopped, event.consumer, event.error)
        user = self.consumer_options.get("on_error")
        if user is not None:
            user(event)

    def _check_stopped(self, consumer: Consumer, error: Optional[BaseException]) -> None:
        name = consumer.db.name
        if self.consumers.get(name) is not consumer or consumer.running:
            return  # removed meanwhile, or a skipped callback error: it goes on
        del self.consumers[name]
        reason = consumer.error or error or RuntimeError("stopped")
        self._drop(name, consumer, reason, consumer.last_seq)

    def _drop(
        self, name: str, consumer: Optional[Consumer], error: BaseException, since: Any
    ) -> None:
        """Let go of ``name`` until its retry; report it to ``on_drop``."""
        if not self._running:
            return
        progressed = consumer is not None and consumer.delivered > 0
        failures = 1 if progressed else self._failures.get(name, 0) + 1
        self._failures[name] = failures
        retry_in = min(RETRY_CAP_S, self.poll_interval * 2.0 ** min(failures - 1, 32))
        gone = isinstance(error, NotFound)  # deleted: a re-created one starts from its beginning
        timer = None if gone else self.loop.call_later(retry_in, self._retry, name)
        since = _DEFAULT if gone else since
        self._dropped[name] = _Dropped(since, self.loop.time() + retry_in, timer)
        logger.warning(
            "%s: %s; dropped, %s in %.1f s",
            name,
            error,
            "followed again if it shows up" if gone else "retried",
            retry_in,
        )
        if self.on_drop is not None:
            try:
                self.on_drop(DropEvent(name, error, consumer, failures, retry_in))
            except Exception:
                logger.exception("%s: the on_drop callback raised", name)

    def _retry(self, name: str) -> None:
        dropped = self._dropped.get(name)
        if dropped is not None:
            dropped.timer = None
            self._add(name)

    def _seen(self, name: str) -> None:
        """``name`` exists (listed, or an event): follow it if it is not, and not backing off."""
        dropped = self._dropped.get(name)
        if dropped is None:
            self._add(name)
        elif dropped.retry_at <= self.loop.time():
            self._add(name)
        elif dropped.timer is None:  # gone, and back: try when the backoff ends
            dropped.timer = self.loop.call_at(dropped.retry_at, self._retry, name)

    # -- _db_updates, or polling ---------------------------------------------------------------

    def _on_db_update(self, event: Change) -> None:
        name = event.get("db_name")
        kind = event.get("type")
        if not isinstance(name, str) or not self.wants(name):
            return
        if kind == "deleted":
            self._remove(name)
        elif kind in ("created", "updated") and name not in self.consumers:
            if kind == "created":
                self._forget(name)  # a new database: no backoff, from its beginning
            try:
                ensure_fd_capacity(1)
            except ChangeloopError as exc:
                logger.error("%s: cannot follow it: %s", name, exc)
                return  # the next event for it tries again; the feed itself goes on
            self._seen(name)

    def _on_updates_error(self, event: FeedEvent) -> None:
        if not event.will_retry:  # checked once the feed has finished stopping
            self.loop.call_soon(self._updates_stopped, event.consumer, event.error)

    def _updates_stopped(self, feed: Consumer, error: Optional[BaseException]) -> None:
        if feed is not self._updates or feed.running or not self._running:
            return
        self._updates = None
        expected = False
        if isinstance(error, HTTPError) and error.status in NO_DB_UPDATES_STATUSES:
            expected = True
            reason = "%s has no usable _db_updates (HTTP %d)" % (self.server.url, error.status)
        else:
            reason = "the _db_updates feed of %s stopped: %s" % (self.server.url, error)
        self._fall_back(reason, expected)
        self._poll()  # at once: events may have been missed

    def _fall_back(self, reason: str, expected: bool) -> None:
        # No _db_updates (pouchdb-server, a non-admin user) is an expected, documented fallback:
        # INFO. A feed that worked and then stopped for good is worth a WARNING.
        level = logging.INFO if expected else logging.WARNING
        logger.log(level, "%s; polling _all_dbs every %.0f s instead", reason, self.poll_interval)
        self.mode = "polling"
        self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def _poll(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_timer = None
        if not self._running:
            return
        try:
            self._poll_once()
        except Exception as exc:  # never let the watch die: the next poll tries again
            logger.warning("polling %s/_all_dbs failed: %r", self.server.url, exc)
        self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def _poll_once(self) -> None:
        names = set(self._listing())
        for name in sorted((set(self.consumers) | set(self._dropped)) - names):
            self._remove(name)
        for consumer in list(self.consumers.values()):
            if consumer.error is not None and not consumer.running:  # however it happened
                self._check_stopped(consumer, consumer.error)
        new = sorted(names - set(self.consumers))
        if new:
            ensure_fd_capacity(len(new))
        for name in new:
            self._seen(name)

    def active(self) -> List[str]:
        """The names of the databases followed now."""
        return sorted(self.consumers)

    def dropped(self) -> List[str]:
        """The names of the databases let go of until their retry (see ``on_drop``)."""
        return sorted(self._dropped)
