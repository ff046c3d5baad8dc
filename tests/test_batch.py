"""Batch delivery (``Consumer(batch_size=N)``): lists of changes, with the per-change guarantees.

Scripted CouchDB 3 feeds pin down how batches are cut, counted and checkpointed; the last test
follows the real server.
"""

from typing import Any, List

import pytest
from couch3 import (
    doc_id,
    feed,
    read_everything_at_once,
    rig,
    row,
    rows,
    seq,
)
from scripted import Close, chunk

from changeloop import CallbackError, Consumer, Database
from changeloop._stream import RECV_BYTES
from changeloop.checkpoint import MemoryCheckpoint
from changeloop.consumer import Change


class RecordingCheckpoint(MemoryCheckpoint):
    """A memory store that remembers every seq saved, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.history: List[Any] = []

    def save(self, seq: Any) -> None:
        super().save(seq)
        self.history.append(seq)


def ids(batches: List[List[Change]]) -> List[str]:
    return [change["id"] for batch in batches for change in batch]


def test_rows_read_together_are_cut_into_batches_of_at_most_batch_size() -> None:
    with rig([feed(chunk(rows(*range(1, 16))))], batch_size=4) as r:
        batches: List[List[Change]] = []
        r.consumer.start(batches.append, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: sum(map(len, batches)) == 15)
    assert [len(batch) for batch in batches] == [4, 4, 4, 3]
    assert ids(batches) == [doc_id(n) for n in range(1, 16)]
    assert r.consumer.delivered == 15 and r.consumer.last_seq == seq(15)


def test_a_batch_gathers_rows_from_several_receives_while_catching_up() -> None:
    # More rows than one receive holds, and few enough that the whole response fits in the
    # first TCP window of a loopback connection (64 KiB), so that it is all there at once.
    count = RECV_BYTES // len(row(1)) + 20
    with rig([feed(chunk(rows(*range(1, count + 1))))], batch_size=count) as r:
        batches: List[List[Change]] = []
        r.consumer.start(batches.append, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: batches)
    assert [len(batch) for batch in batches] == [count]  # one batch, not one per receive


def test_a_trickle_is_delivered_at_once_not_held_back_for_a_full_batch() -> None:
    with rig([feed(chunk(row(1)))], batch_size=100) as r:
        batches: List[List[Change]] = []
        r.consumer.start(batches.append, since=0)
        r.run_until(lambda: batches)
        assert [ids([batch]) for batch in batches] == [[doc_id(1)]]


def test_checkpoints_fall_between_batches() -> None:
    store = RecordingCheckpoint()
    with rig([feed(chunk(rows(*range(1, 16))))], batch_size=4, checkpoint=store,
             checkpoint_every=5) as r:  # fmt: skip
        batches: List[List[Change]] = []
        r.consumer.start(batches.append, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: sum(map(len, batches)) == 15)
        # Saved once 5 changes were unsaved, at the end of the batch that got there: after
        # changes 8 and 15 (the last batch brings the count from 3 to 6).
        assert store.history == [seq(8), seq(15)]
        r.consumer.stop()
    assert store.history[2:] == [seq(15)]  # stopping saves where it stands


def test_the_last_real_seq_of_a_batch_is_kept_when_rows_have_none() -> None:
    body = row(1) + row(2, None) + row(3) + row(4, None) + row(5, None)
    with rig([feed(chunk(body), then=Close()), feed()], batch_size=10) as r:
        batches: List[List[Change]] = []
        r.consumer.start(batches.append, since=0, seq_interval=2)
        read_everything_at_once(r)
        r.run_until(lambda: len(r.srv.requests) == 2)
        assert r.consumer.last_seq == seq(3)
        assert "since=" + seq(3) in r.srv.requests[1].target  # 4 and 5 come again, not lost


def test_a_failing_batch_callback_stops_and_the_batch_comes_again() -> None:
    store = RecordingCheckpoint()
    scripts = [feed(chunk(rows(*range(1, 7)))), feed(chunk(rows(4, 5, 6)))]
    with rig(scripts, batch_size=3, checkpoint=store, checkpoint_every=1) as r:
        seen: List[List[Change]] = []

        def broken(batch: List[Change]) -> None:
            if batch[0]["id"] == doc_id(4):
                raise ValueError("the bulk write failed")
            seen.append(batch)

        r.consumer.start(broken, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: not r.consumer.running)
        error = r.consumer.error
        assert isinstance(error, CallbackError)
        assert "a batch of 3 changes (the first 'doc-004')" in str(error)
        assert isinstance(error.__cause__, ValueError)
        assert ids(seen) == [doc_id(n) for n in (1, 2, 3)]
        assert store.seq == seq(3) and r.consumer.last_seq == seq(3)

        # The write works again: restart from the checkpoint (broken was for its run only).
        r.consumer.start(seen.append, since=0)
        r.run_until(lambda: sum(map(len, seen)) == 6)
        assert "since=" + seq(3) in r.srv.requests[1].target
    assert ids(seen) == [doc_id(n) for n in range(1, 7)]


def test_skip_reports_a_failing_batch_and_goes_on() -> None:
    with rig([feed(chunk(rows(*range(1, 7))))], batch_size=2, callback_errors="skip") as r:
        seen: List[List[Change]] = []

        def flaky(batch: List[Change]) -> None:
            if batch[0]["id"] == doc_id(3):
                raise ValueError("no")
            seen.append(batch)

        r.consumer.start(flaky, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: r.consumer.last_seq == seq(6))
        assert ids(seen) == [doc_id(n) for n in (1, 2, 5, 6)]
        (event,) = r.errors()
        assert isinstance(event.error, CallbackError) and not event.will_retry
        assert r.consumer.running


def test_stop_from_a_batch_callback_counts_that_batch_and_no_more() -> None:
    with rig([feed(chunk(rows(*range(1, 10))))], batch_size=3) as r:
        seen: List[List[Change]] = []

        def callback(batch: List[Change]) -> None:
            seen.append(batch)
            if len(seen) == 2:
                r.consumer.stop()

        r.consumer.start(callback, since=0)
        read_everything_at_once(r)
        r.run_until(lambda: not r.consumer.running)
    assert ids(seen) == [doc_id(n) for n in range(1, 7)]
    assert r.consumer.delivered == 6 and r.consumer.last_seq == seq(6)


def test_limit_cuts_the_last_batch_short() -> None:
    with rig([feed(chunk(rows(*range(1, 10))))], batch_size=4) as r:
        seen: List[List[Change]] = []
        r.consumer.start(seen.append, since=0, limit=6)
        read_everything_at_once(r)
        r.run_until(lambda: not r.consumer.running)
    assert [len(batch) for batch in seen] == [4, 2]
    assert r.consumer.delivered == 6 and r.consumer.error is None


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "10"])
def test_batch_size_must_be_a_positive_integer(size: Any, db: Database) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Consumer(db, batch_size=size)


def test_batches_from_the_real_server(db: Database) -> None:
    db.bulk_save([{"_id": "doc-%03d" % n, "n": n} for n in range(250)])
    store = RecordingCheckpoint()
    batches: List[List[Change]] = []
    with Consumer(db, batch_size=100, checkpoint=store) as consumer:
        consumer.wait(batches.append, since=0, limit=250)
    assert all(1 <= len(batch) <= 100 for batch in batches)
    assert sorted(ids(batches)) == ["doc-%03d" % n for n in range(250)]
    assert store.seq == batches[-1][-1]["seq"] == consumer.last_seq
