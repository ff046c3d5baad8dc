"""``Consumer.changes()``: a continuous or one-shot feed as a Python iterator.

A continuous feed runs on a second consumer with the first one's settings; its callback queues the
rows, and :meth:`ChangesIterator.__next__` runs the loop until one is there. What a checkpoint
store saves is the seq of the last change the iteration *returned*, so changes dropped by
:meth:`ChangesIterator.close` are delivered again next time.
"""

import collections
from typing import Any, Deque, Dict, Iterator, Optional

from ._delivery import Change

__all__ = ["ChangesIterator"]


class ChangesIterator:
    """The iterator :meth:`Consumer.changes` returns; see there.

    A continuous feed runs on a second consumer with the first one's settings (its callbacks
    queue the rows here). With a checkpoint store, what is saved is the seq of the last change
    ``__next__`` *returned*, not the last one queued: changes dropped by :meth:`close` are
    delivered again next time.
    """

    def __init__(self, consumer: Any, since: Any, feed: str, params: Dict[str, Any]) -> None:
        # consumer: a Consumer, whose module imports this one (so it is not named here).
        self._queue: Deque[Change] = collections.deque()
        self._one_shot: Optional[Iterator[Change]] = None
        self._follower: Any = None  # the Consumer that follows a continuous feed
        self._returned_seq: Any = None  # the seq of the last change handed out
        if feed == "continuous":
            checkpoint = consumer.checkpoint
            follower = type(consumer)(
                consumer.db,
                consumer.loop,
                checkpoint=None if checkpoint is None else _ReturnedSeq(checkpoint, self),
                on_error=consumer.on_error,
                on_connect=consumer.on_connect,
                on_disconnect=consumer.on_disconnect,
                on_caught_up=consumer.on_caught_up,
                reconnect_base=consumer.reconnect_base,
                reconnect_cap=consumer.reconnect_cap,
                healthy_after=consumer.healthy_after,
                watchdog_heartbeats=consumer.watchdog_heartbeats,
                first_byte_timeout=consumer.first_byte_timeout,
                connect_timeout=consumer.connect_timeout,
                checkpoint_every=consumer.checkpoint_every,
                checkpoint_interval=consumer.checkpoint_interval,
                max_line_bytes=consumer.max_line_bytes,
                rng=consumer._rng,
            )
            follower.start(self._queue.append, since, **params)
            self._follower = follower
        elif feed == "longpoll":
            self._one_shot = iter(consumer.wait_once(since, **params)["results"])
        else:
            self._one_shot = iter(consumer._one_shot(feed, since, params)["results"])

    def __iter__(self) -> "ChangesIterator":
        return self

    def __next__(self) -> Change:
        if self._one_shot is not None:
            return next(self._one_shot)
        follower = self._follower
        assert follower is not None
        while not self._queue:
            if not follower.running:
                if follower.error is not None:
                    raise follower.error
                raise StopIteration
            follower.loop.run_once(None)
        change = self._queue.popleft()
        if change.get("seq") is not None:
            self._returned_seq = change["seq"]
        return change

    def close(self) -> None:
        """Stop following; the changes already received but not returned are dropped."""
        if self._follower is not None:
            self._follower.stop()
        self._queue.clear()

    def __enter__(self) -> "ChangesIterator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ReturnedSeq:
    """A checkpoint store seen through a :class:`ChangesIterator`: it saves the seq of the last
    change the iteration returned, whatever seq the consumer behind it has reached."""

    def __init__(self, store: Any, iterator: ChangesIterator) -> None:
        self._store = store
        self._iterator = iterator

    def load(self) -> Any:
        return self._store.load()

    def save(self, seq: Any) -> None:
        returned = self._iterator._returned_seq
        if returned is not None:
            self._store.save(returned)
