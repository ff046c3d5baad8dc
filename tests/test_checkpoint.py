"""Checkpoint stores: atomic files, _local documents, and a consumer resuming from them."""

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from changeloop import CheckpointError, Consumer, Database
from changeloop.checkpoint import FileCheckpoint, LocalDocCheckpoint, MemoryCheckpoint


def test_file_checkpoint_round_trip(tmp_path: Path) -> None:
    store = FileCheckpoint(tmp_path / "cp.json")
    assert store.load() is None
    store.save("12-g1AAAA")
    assert FileCheckpoint(tmp_path / "cp.json").load() == "12-g1AAAA"
    store.save(13)
    assert store.load() == 13
    assert json.loads((tmp_path / "cp.json").read_text()) == {"seq": 13}
    assert os.listdir(tmp_path) == ["cp.json"]  # no temporary files left behind


def test_file_checkpoint_keys_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    a, b = FileCheckpoint(path, key="db-a"), FileCheckpoint(path, key="db-b")
    a.save(1)
    b.save([2, "x"])
    a.save(3)
    assert (a.load(), b.load()) == (3, [2, "x"])
    assert FileCheckpoint(path, key="db-c").load() is None


def test_file_checkpoint_failed_write_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileCheckpoint(tmp_path / "cp.json")
    store.save("old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="No space left"):
        store.save("new")
    monkeypatch.undo()
    assert store.load() == "old"
    assert os.listdir(tmp_path) == ["cp.json"]


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"other": 1}'])
def test_corrupt_checkpoint_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cp.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cp.json"):
        FileCheckpoint(path).load()


def test_memory_checkpoint() -> None:
    store = MemoryCheckpoint()
    store.save(5)
    assert store.load() == 5 and store.saves == 1 and "seq=5" in repr(store)


def test_local_doc_checkpoint(db: Database) -> None:
    store = LocalDocCheckpoint(db, "worker")
    assert store.load() is None
    store.save("5-abc")
    store.save("6-abc")  # the second save must carry the revision of the first
    taker = LocalDocCheckpoint(db, "worker")
    assert taker.load() == "6-abc"
    taker.save("7-abc")
    store.save("8-abc")  # store's revision is stale: a conflict, re-read, saved
    assert LocalDocCheckpoint(db, "worker").load() == "8-abc"
    assert db.get("_local/changeloop-worker")["seq"] == "8-abc"
    assert all(not r["id"].startswith("_local") for r in Consumer(db).fetch()["results"])


def write(db: Database, count: int, start: int) -> None:
    db.bulk_save([{"_id": "doc-%03d" % i} for i in range(start, start + count)])


def test_consumer_resumes_from_its_checkpoint(db: Database, tmp_path: Path) -> None:
    store = FileCheckpoint(tmp_path / "cp.json")
    write(db, 5, 0)
    seen: List[str] = []

    def until(count: int) -> Any:
        def callback(change: Dict[str, Any]) -> None:
            seen.append(change["id"])
            if len(seen) == count:
                consumer.stop()

        return callback

    consumer = Consumer(db, checkpoint=store)
    consumer.wait(until(5), since=0)
    consumer.close()
    assert store.load() == consumer.last_seq
    write(db, 3, 5)
    consumer = Consumer(db, checkpoint=store)
    consumer.wait(until(8), since=0)  # since=0 is ignored: the store has a seq
    consumer.close()
    assert seen == ["doc-%03d" % i for i in range(8)]  # nothing missed, nothing repeated


def test_since_now_applies_only_when_the_store_is_empty(db: Database) -> None:
    store = LocalDocCheckpoint(db)
    write(db, 2, 0)
    consumer = Consumer(db, checkpoint=store)
    seen: List[str] = []

    def callback(change: Dict[str, Any]) -> None:
        seen.append(change["id"])

    consumer.start(callback, since="now", heartbeat=200)
    deadline = time.monotonic() + 10
    while consumer.state != "streaming" and time.monotonic() < deadline:
        consumer.loop.run_once(0.05)
    consumer.stop()
    saved = store.load()
    assert seen == [] and saved not in (None, "now")  # "now" was resolved to a real seq
    write(db, 1, 2)
    # The store has a seq: "now" does not apply.
    consumer.start(callback, since="now", heartbeat=200)
    while not seen and time.monotonic() < deadline:
        consumer.loop.run_once(0.05)
    consumer.close()
    assert seen == ["doc-002"]
