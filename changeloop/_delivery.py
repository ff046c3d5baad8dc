"""Rows to callbacks: the one place where user code runs.

A feed's rows arrive a read at a time. :meth:`_Delivery._deliver` hands them to the callbacks,
one change per call (or, with ``batch_size``, one list per call), then counts them as delivered
and moves the resume point (``last_seq``) to the last real seq among them. The checkpoint store
saves that resume point every ``checkpoint_every`` changes or ``checkpoint_interval`` seconds, so
it never passes a change whose callbacks have not returned: delivery is at-least-once.

What delivery cannot decide, it hands back to the state machine above it (``_follow``): a
return value that says "stop now" (the ``limit`` was reached, or :meth:`stop` was called from a
callback), or an exception: a :class:`~changeloop.errors.CallbackError` when a callback raised
and ``callback_errors="stop"``, a :class:`~changeloop.errors.CheckpointError` when the store
failed. Lifecycle callbacks (``on_connect``...) also run here, in :meth:`_Delivery._report`;
their exceptions are logged, as they cannot be delivered again.
"""

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .errors import CallbackError, CheckpointError
from .loop import Loop

if TYPE_CHECKING:  # pragma: no cover
    from .client import Database

__all__ = ["Change", "Callback", "BatchCallback", "CHECKPOINT_EVERY_CHANGES", "CHECKPOINT_EVERY_S"]

logger = logging.getLogger("changeloop.consumer")

#: A change as CouchDB sends it: ``{"seq": ..., "id": ..., "changes": [{"rev": ...}]}``, with
#: ``doc`` under ``include_docs=True`` and ``deleted`` for a deletion.
Change = Dict[str, Any]
#: A callback of a consumer: it receives one change (a dict).
Callback = Callable[[Change], Any]
#: A callback of a consumer with a ``batch_size``: it receives a list of changes.
BatchCallback = Callable[[List[Change]], Any]

#: Checkpoint after this many changes or this many seconds, whichever comes first.
CHECKPOINT_EVERY_CHANGES = 100
CHECKPOINT_EVERY_S = 5.0


class _Delivery:
    """The delivery half of a consumer: its callbacks, counters, resume point and checkpoint.

    A base class of :class:`~changeloop.consumer.Consumer` rather than an object of its own, so
    that an idle feed costs one object, not three (see benchmarks/bench_scale.py).
    """

    __slots__ = (
        "_active",
        "_callbacks",
        "_delivering",
        "_limit",
        "_saved_at",
        "_since",
        "_stop_requested",
        "_unsaved",
        "batch_size",
        "callback_errors",
        "checkpoint",
        "checkpoint_every",
        "checkpoint_interval",
        "delivered",
        "on_caught_up",
        "on_connect",
        "on_disconnect",
        "on_error",
    )

    # Set by the consumer's constructor (its arguments of the same names).
    batch_size: Optional[int]
    callback_errors: str
    checkpoint: Any
    checkpoint_every: int
    checkpoint_interval: float
    on_caught_up: Optional[Callable[[Any], Any]]
    on_connect: Optional[Callable[[Any], Any]]
    on_disconnect: Optional[Callable[[Any], Any]]
    on_error: Optional[Callable[[Any], Any]]
    # Provided by the consumer (declared here for the type checker only).
    _loop: Optional[Loop]
    db: "Database"

    def _init_delivery(self) -> None:
        # Tuples, not lists: an empty one is shared, and a feed's callbacks rarely change
        # (two lists cost 112 bytes a feed, measured by benchmarks/bench_scale.py).
        #: Callbacks registered with register_callback(), for every run.
        self._callbacks: Tuple[Callable[[Any], Any], ...] = ()
        #: The callbacks of the current run: the registered ones plus start()'s own.
        self._active: Tuple[Callable[[Any], Any], ...] = ()
        self._limit: Optional[int] = None
        self._since: Any = None
        self._unsaved = 0
        self._saved_at = 0.0  # on the loop's clock, like every other time here
        # A delivery is in progress, and stop() was asked from inside it: the stop waits until
        # the callbacks of the change being delivered have returned. Both only ever change on
        # the loop's thread (stop() from elsewhere goes through Loop.call_threadsafe).
        self._delivering = False
        self._stop_requested = False
        #: Changes delivered to the callbacks since ``start``. Counted once the callbacks have
        #: returned for all the changes of one read (of one batch in batch mode), and before a
        #: checkpoint: inside a callback it does not count the changes of the current read yet.
        self.delivered = 0

    def _deliver(self, rows: List[Change]) -> bool:
        """Hand ``rows`` to the callbacks; return whether the consumer must stop now.

        Per row, only the callbacks run: the counters and the seq are brought up to date by
        :meth:`_account` once per read, and before anything that reads them (a failing
        callback, a checkpoint, a stop, an exception escaping a callback).

        Raises:
            CallbackError: a callback raised and ``callback_errors`` is ``"stop"``.
            CheckpointError: the checkpoint store failed.
        """
        if self._limit is not None:
            rows = rows[: max(0, self._limit - self.delivered)]
        if self.batch_size is not None:
            self._deliver_batches(rows, self.batch_size)
            return self._after_delivery()
        callbacks = self._active
        single = callbacks[0] if len(callbacks) == 1 else None
        accounted = 0  # rows[:accounted] are counted already
        done = 0  # rows[:done] went through every callback (or were skipped)
        # Per change, not per read: a read can bring hundreds of rows, and a crash must not
        # replay more than checkpoint_every of them.
        save_at = (
            max(1, self.checkpoint_every - self._unsaved)
            if self.checkpoint is not None
            else len(rows) + 1
        )
        self._delivering = True
        try:
            for row in rows:
                try:
                    if single is not None:
                        single(row)
                    else:
                        for callback in callbacks:
                            callback(row)
                except Exception as exc:
                    self._account(rows, accounted, done)
                    accounted = done
                    self._callback_failed("change %r" % (row.get("id"),), exc)
                done += 1
                if done == save_at:
                    self._account(rows, accounted, done)
                    accounted = done
                    self._save_checkpoint()
                    save_at = done + self.checkpoint_every
                if self._stop_requested:
                    break
        finally:
            self._account(rows, accounted, done)
            self._delivering = False
        return self._after_delivery()

    def _deliver_batches(self, rows: List[Change], size: int) -> None:
        """Hand rows to the callbacks in lists of at most ``size``: batch mode's ``_deliver``."""
        callbacks = self._active
        self._delivering = True
        try:
            for start in range(0, len(rows), size):
                batch = rows[start : start + size]
                try:
                    for callback in callbacks:
                        callback(batch)
                except Exception as exc:
                    what = "a batch of %d changes (the first %r)" % (len(batch), batch[0].get("id"))
                    self._callback_failed(what, exc)
                self._account(batch, 0, len(batch))
                if self.checkpoint is not None and self._unsaved >= self.checkpoint_every:
                    self._save_checkpoint()
                if self._stop_requested:
                    break
        finally:
            self._delivering = False

    def _after_delivery(self) -> bool:
        """Whether to stop (asked, or the limit reached); save the checkpoint when it is time."""
        if self._stop_requested or (self._limit is not None and self.delivered >= self._limit):
            return True  # the caller stops, which saves the checkpoint after the bookkeeping
        if (
            self.checkpoint is not None
            and self._unsaved
            and self._now() - self._saved_at >= self.checkpoint_interval
        ):
            self._save_checkpoint()
        return False

    def _account(self, rows: List[Change], start: int, stop: int) -> None:
        """Count ``rows[start:stop]`` as delivered and move ``last_seq`` to the last real seq."""
        if stop <= start:
            return
        self.delivered += stop - start
        self._unsaved += stop - start
        for index in range(stop - 1, start - 1, -1):
            seq = rows[index].get("seq")
            if seq is not None:  # with seq_interval most rows have none: keep the last real one
                self._since = seq
                return

    def _callback_failed(self, what: str, exc: Exception) -> None:
        """A callback raised on ``what``: report and go on (``"skip"``), or raise to stop."""
        error = CallbackError("a callback raised on %s: %r" % (what, exc))
        error.__cause__ = exc
        if self.callback_errors != "skip":
            raise error
        logger.warning("%s: %s; skipping it", self.db.name, error)
        self._report(self.on_error, self._event("error", error=error))

    def _save_checkpoint(self) -> None:
        """Save the resume point now.

        Raises:
            CheckpointError: the store failed (whatever it raised is chained).
        """
        if self._since not in (None, "now") and self.checkpoint is not None:
            try:
                self.checkpoint.save(self._since)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    "saving the checkpoint at %r failed: %r" % (self._since, exc)
                ) from exc
        self._unsaved = 0
        self._saved_at = self._now()

    def _now(self) -> float:
        loop = self._loop
        assert loop is not None  # delivery runs on the loop
        return loop.time()

    def _event(self, kind: str, **fields: Any) -> Any:
        """The consumer's :class:`~changeloop.consumer.FeedEvent` of ``kind``."""
        raise NotImplementedError

    def _report(self, callback: Optional[Callable[[Any], Any]], event: Any) -> None:
        """Call a lifecycle callback; what it raises is logged, as nothing can be retried."""
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            logger.exception("%s: the %s callback raised", self.db.name, event.kind)
