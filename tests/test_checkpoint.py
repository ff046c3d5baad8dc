"""Checkpoint stores: atomic files, _local documents, and a consumer resuming from them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from changeloop import CheckpointError, Consumer, Database, checkpoint
from changeloop.checkpoint import FileCheckpoint, LocalDocCheckpoint, MemoryCheckpoint


def test_file_checkpoint_round_trip(tmp_path: Path) -> None:
    store = FileCheckpoint(tmp_path / "cp.json")
    assert store.load() is None
    store.save("12-g1AAAA")
    assert FileCheckpoint(tmp_path / "cp.json").load() == "12-g1AAAA"
    store.save(13)
    assert store.load() == 13
    assert json.loads((tmp_path / "cp.json").read_text()) == {"seq": 13}
    # No temporary file left behind; the lock file stays (removing it would race with a waiter).
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "cp.json.lock"]


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
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "cp.json.lock"]


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


# -- several processes, kills, modes (issue 16) -------------------------------------------------

ROOT = str(Path(__file__).resolve().parent.parent)
SAVES_PER_PROCESS = 300

# Each worker saves 0..N-1 under its own key, each time with a new store (as a process started
# per run would, so each save also sweeps the directory while the other process writes), and
# reads its key back after every save: another process's read-modify-write made from a stale
# read would bring it back to an older seq.
SHARING_WORKER = """
import os, sys, time
from changeloop.checkpoint import FileCheckpoint
path, key, go, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
while not os.path.exists(go):
    time.sleep(0.001)
regressions = 0
for seq in range(count):
    FileCheckpoint(path, key=key).save(seq)
    if FileCheckpoint(path, key=key).load() != seq:
        regressions += 1
print(regressions)
"""


def run_python(code: str, *args: str) -> "subprocess.Popen[str]":
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: one file per process there")
def test_processes_sharing_a_file_lose_no_update(tmp_path: Path) -> None:
    path, go = str(tmp_path / "cp.json"), str(tmp_path / "go")
    workers = [
        run_python(SHARING_WORKER, path, key, go, str(SAVES_PER_PROCESS)) for key in ("a", "b")
    ]
    Path(go).touch()
    outputs = [worker.communicate(timeout=50)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert [int(output) for output in outputs] == [0, 0]  # no seq ever went backwards
    last = SAVES_PER_PROCESS - 1
    assert json.loads(Path(path).read_text()) == {"seqs": {"a": last, "b": last}}
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "cp.json.lock", "go"]


# A save killed (SIGKILL) between writing its temporary file and renaming it.
KILLED_WORKER = """
import os, signal, sys
from changeloop.checkpoint import FileCheckpoint
store = FileCheckpoint(sys.argv[1], key="k")
store.save(1)
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
store.save(2)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_the_next_save_removes_what_killed_saves_left(tmp_path: Path) -> None:
    path = str(tmp_path / "cp.json")
    for _ in range(3):
        worker = run_python(KILLED_WORKER, path)
        worker.communicate(timeout=50)
        assert worker.returncode == -signal.SIGKILL
    left = [name for name in os.listdir(tmp_path) if name.startswith(".checkpoint-")]
    # Each run's first save removed what the kill before it left (they piled up: one per kill).
    assert len(left) == 1
    store = FileCheckpoint(path, key="k")
    assert store.load() == 1
    store.save(3)
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "cp.json.lock"]
    assert FileCheckpoint(path, key="k").load() == 3


def test_temporary_files_that_may_be_live_are_kept(tmp_path: Path) -> None:
    other = FileCheckpoint(tmp_path / "other.json")
    other_temp = tmp_path / (".checkpoint-%s-0badf00d" % other._temp_tag())  # another file's
    fresh_legacy = tmp_path / ".checkpoint-abcd1234"  # tempfile's old names: any file's
    old_legacy = tmp_path / ".checkpoint-wxyz5678"
    for temp in (other_temp, fresh_legacy, old_legacy):
        temp.write_bytes(b"{}")
    an_hour_ago = time.time() - checkpoint.STALE_TEMP_S - 60
    os.utime(old_legacy, (an_hour_ago, an_hour_ago))
    FileCheckpoint(tmp_path / "cp.json").save(1)
    assert sorted(os.listdir(tmp_path)) == [
        ".checkpoint-abcd1234",
        other_temp.name,
        "cp.json",
        "cp.json.lock",
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("key", [None, "k"])
def test_the_file_gets_the_mode_the_umask_gives(
    tmp_path: Path, umask: int, mode: int, key: Any
) -> None:
    previous = os.umask(umask)
    try:
        FileCheckpoint(tmp_path / "cp.json", key=key).save(1)
        FileCheckpoint(tmp_path / "cp.json", key=key).save(2)  # the replaced file too
    finally:
        os.umask(previous)
    assert (tmp_path / "cp.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "cp.json.lock").stat().st_mode & 0o777 == mode


def test_a_lock_that_cannot_be_taken_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "cp.json.lock").mkdir()  # cannot be opened as a file
    with pytest.raises(CheckpointError, match="lock"):
        FileCheckpoint(tmp_path / "cp.json").save(1)


def test_without_fcntl_saves_work_and_only_old_temporaries_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented fallback (Windows): a thread lock only, so a temporary file of this very
    # checkpoint may be another process's live one: it is removed only once old.
    monkeypatch.setattr(checkpoint, "fcntl", None)
    store = FileCheckpoint(tmp_path / "cp.json", key="k")
    fresh = tmp_path / (".checkpoint-%s-0000fresh" % store._temp_tag())
    old = tmp_path / (".checkpoint-%s-00000old" % store._temp_tag())
    for temp in (fresh, old):
        temp.write_bytes(b"{}")
    an_hour_ago = time.time() - checkpoint.STALE_TEMP_S - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    store.save(5)
    assert store.load() == 5
    assert sorted(os.listdir(tmp_path)) == [fresh.name, "cp.json"]  # no lock file either
