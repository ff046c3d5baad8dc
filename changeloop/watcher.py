"""``DatabaseWatcher``: one consumer per matching database, kept in step with the server.

The watcher follows the server's ``_db_updates`` feed (admin only; CouchDB 2+ with the
``_global_changes`` database): a ``created`` or ``updated`` event for a matching database that has
no consumer yet starts one, a ``deleted`` event stops it. At start it attaches to every matching
database that already exists (``_all_dbs``). Where there is no ``_db_updates`` (pouchdb-server,
CouchDB 1.x without it, a non-admin user), it polls ``_all_dbs`` every ``poll_interval`` seconds
instead and says so in the log. Each database's consumer has the reconnect, resume and checkpoint
guarantees of a single :class:`~changeloop.consumer.Consumer`.

Sharing the work: ``shard=(i, n)`` keeps only the databases whose stable hash (CRC-32 of the
name) modulo ``n`` is ``i``, so ``n`` workers (threads, processes, machines) split any set of
databases without talking to each other; with checkpoints in ``_local/`` documents
(``checkpoint=lambda db: LocalDocCheckpoint(db, "worker")``) any worker can take a shard over.
"""

import fnmatch
import logging
import re
import zlib
from typing import Any, Callable, Dict, List, Optional, Pattern, Tuple, Union

from ._transport import ensure_fd_capacity
from .client import Database, Server
from .consumer import Change, Consumer, FeedEvent
from .errors import ChangeloopError, HTTPError
from .loop import Loop, TimerHandle

__all__ = ["DatabaseWatcher", "shard_of", "POLL_INTERVAL_S"]

logger = logging.getLogger(__name__)

#: How often ``_all_dbs`` is polled where the server has no ``_db_updates``.
POLL_INTERVAL_S = 10.0
#: Statuses of ``_db_updates`` that mean "not available here": fall back to polling.
NO_DB_UPDATES_STATUSES = frozenset([400, 401, 403, 404, 405, 501])

Matcher = Union[None, str, Pattern[str], Callable[[str], bool]]
ChangeCallback = Callable[[str, Change], Any]


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
        since: where each new consumer starts when its store has nothing (``0`` or ``"now"``).
        poll_interval: seconds between ``_all_dbs`` polls when there is no ``_db_updates``.
        params: ``_changes`` parameters for every consumer (``include_docs=True``...).
        consumer_options: keyword arguments for every :class:`Consumer` (``on_error``...).
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
    ) -> None:
        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise ValueError("shard must be (i, n) with 0 <= i < n, not %r" % (shard,))
        self.server = server
        self.callback = callback
        self.loop = loop if loop is not None else Loop()
        self._matches = _matcher(match)
        self.shard = shard
        self.checkpoint = checkpoint
        self.since = since
        self.poll_interval = poll_interval
        self.params = dict(params or {})
        self.consumer_options = dict(consumer_options or {})
        #: The consumers, by database name.
        self.consumers: Dict[str, Consumer] = {}
        self._updates: Optional[_DbUpdatesFeed] = None
        self._poll_timer: Optional[TimerHandle] = None
        self._running = False
        #: ``"db_updates"`` or ``"polling"`` once started.
        self.mode: Optional[str] = None

    def __repr__(self) -> str:
        return "<DatabaseWatcher %s %s databases=%d shard=%s>" % (
            self.server.url,
            self.mode or "idle",
            len(self.consumers),
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
            HTTPError, NetworkError: ``_all_dbs`` could not be read.
        """
        if self._running:
            raise RuntimeError("the watcher is already running")
        self._running = True
        names = [name for name in self.server.all_dbs() if self.wants(name)]
        ensure_fd_capacity(len(names))
        for name in names:
            self._add(name)
        self._updates = _DbUpdatesFeed(
            self.server.get_db("_db_updates"),
            self.loop,
            on_error=self._on_updates_error,
            reconnect_cap=self.consumer_options.get("reconnect_cap", 60.0),
        )
        self._updates.start(self._on_db_update, since="now")
        self.mode = "db_updates"
        logger.info("watching %d databases of %s", len(self.consumers), self.server.url)
        return self

    def stop(self) -> None:
        """Stop every consumer and the watch; checkpoints are saved. Thread-safe."""
        if self.loop.in_loop_thread() or not self.loop.is_running():
            self._stop()
        else:
            self.loop.call_soon_threadsafe(self._stop)

    def run(self) -> None:
        """Start, and run the loop in this thread until :meth:`stop`."""
        self.start()
        self.loop.run(forever=True)

    def _stop(self) -> None:
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
        if self.loop.is_running() and self.loop.in_loop_thread():
            self.loop.stop()

    # -- consumers -----------------------------------------------------------------------------

    def _add(self, name: str) -> None:
        if name in self.consumers or not self._running:
            return
        db = self.server.get_db(name)
        store = self.checkpoint(db) if self.checkpoint is not None else None
        consumer = Consumer(db, self.loop, checkpoint=store, **self.consumer_options)
        callback = self.callback
        consumer.start(lambda change: callback(name, change), since=self.since, **self.params)
        self.consumers[name] = consumer
        logger.debug("following %s", name)

    def _remove(self, name: str) -> None:
        consumer = self.consumers.pop(name, None)
        if consumer is not None:
            consumer.stop()
            logger.info("%s was deleted; stopped following it", name)

    # -- _db_updates, or polling ---------------------------------------------------------------

    def _on_db_update(self, event: Change) -> None:
        name = event.get("db_name")
        kind = event.get("type")
        if not isinstance(name, str) or not self.wants(name):
            return
        if kind == "deleted":
            self._remove(name)
        elif kind in ("created", "updated"):
            if name not in self.consumers:
                ensure_fd_capacity(1)
                self._add(name)

    def _on_updates_error(self, event: FeedEvent) -> None:
        error = event.error
        if isinstance(error, HTTPError) and error.status in NO_DB_UPDATES_STATUSES:
            logger.warning(
                "%s has no usable _db_updates (HTTP %d); polling _all_dbs every %.0f s instead",
                self.server.url,
                error.status,
                self.poll_interval,
            )
            self.mode = "polling"
            self._updates = None  # it stops itself: the status is fatal for a consumer
            self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def _poll(self) -> None:
        self._poll_timer = None
        if not self._running:
            return
        try:
            names = {name for name in self.server.all_dbs() if self.wants(name)}
        except ChangeloopError as exc:
            logger.warning("polling %s/_all_dbs failed: %s", self.server.url, exc)
        else:
            for name in sorted(set(self.consumers) - names):
                self._remove(name)
            new = sorted(names - set(self.consumers))
            if new:
                ensure_fd_capacity(len(new))
            for name in new:
                self._add(name)
        self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def active(self) -> List[str]:
        """The names of the databases followed now."""
        return sorted(self.consumers)
