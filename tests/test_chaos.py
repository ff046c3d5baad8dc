"""Proof that no change is lost and no feed stalls, with the library's defaults.

Consumers with the defaults (only CouchDB's ``heartbeat`` is asked for) follow a feed that a
writer keeps growing, each through a fault proxy of its own (``faultproxy.py``, tested in
test_faultproxy.py) that breaks connection after connection in every phase: in the request,
before the head, inside the status line and the headers, between head and body, in the body;
by cuts, resets and stalls. ``chaosrun.py`` holds the harness and the contract: every change
arrives, in order, duplicated only by a resume; no stall goes unnoticed longer than three
heartbeats; the worst time from a fault to the next delivered change stays within a bound
derived from the defaults, and is printed. Against pouchdb-server (the real server) and against
a scripted CouchDB 3 (``livecouch3.py``) whose resumes replay a few rows, as CouchDB 2+ may.
Last, a consumer with a ``FileCheckpoint`` runs in a subprocess (``crash_worker.py``) that is
SIGKILLed mid-stream and restarted: nothing is missed, and only what came after the last
checkpoint is delivered twice. Run with ``-s`` (or see the assertion messages) for the figures.
"""

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from chaosrun import (
    GAP_BOUND_S,
    LATENCY_S,
    RECONNECT_BASE_S,
    SILENCE_NOTICED_S,
    Delivery,
    Follower,
    Key,
    alternating_plan,
    change_key,
    delivery_problems,
    fault_mix,
    run_until,
    worst_gap,
)
from faultproxy import Fault, FaultProxy
from livecouch3 import FollowHistory, History
from scripted import Read, ScriptedServer

import changeloop
from changeloop import Consumer, FileCheckpoint, Loop, Server

HERE = Path(__file__).resolve().parent

# -- the chaos runs: sizes and bounds -------------------------------------------------------------
CHAOS_SEED = 20240605
#: Consumers on the loop, each with its own proxy, and the faults each proxy injects before it
#: heals: 8 x 7 = 56 against pouchdb-server (the contract asks for at least 50).
FEEDS = 8
FAULTS_PER_FEED = 7
MIN_FAULTS = 50
#: A scripted CouchDB 3's run: 6 x 5 = 30 more, with replaying resumes.
COUCH3_FEEDS = 6
COUCH3_FAULTS_PER_FEED = 5
COUCH3_REPLAY = 2
#: The writers: a few changes every WRITE_EVERY_S, so each reconnection has something to deliver.
WRITE_EVERY_S = 0.05
DOCS_PER_WRITE = 4
DELETE_EVERY_WRITES = 5
MAX_WRITES = 1000  # a bound on the writer's loop: 50 s of writes, more than any run takes
#: A run that keeps its contract takes about 10 s; this is a backstop well under pytest's 60 s.
CHAOS_DEADLINE_S = 40.0
#: One stall in one phase: noticed late, the first backoff, a connection that delivers.
ONE_STALL_BOUND_S = SILENCE_NOTICED_S + RECONNECT_BASE_S + LATENCY_S
#: The phases a stall is tried in, one consumer each: every one before the body is a phase where
#: a heartbeat was asked for and so can be held to the heartbeat allowance.
STALLS = {
    "request": Fault("stall", after=20, side="request"),
    "before the head": Fault("stall"),
    "status line": Fault("stall", after=9),
    "headers": Fault("stall", after=40, inside="headers"),
    "between head and body": Fault("stall", inside="chunk_size"),
    "body": Fault("stall", after_rows=2),
}

# -- the crash run ----------------------------------------------------------------------------
CRASH_BATCHES_BEFORE_KILL = 16
CRASH_BATCHES_AFTER_KILL = 14
CRASH_BATCH_DOCS = 50
KILL_AFTER_LINES = 300
WORKER_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 5.0


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port`` (credentials kept)."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def target_of(url: str) -> Tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


class Writer(threading.Thread):
    """Write to one database of the real server until stopped, with its own ``Server``.

    Every ``WRITE_EVERY_S``: ``DOCS_PER_WRITE`` new documents and an update of an earlier one;
    every few writes a deletion. ``latest`` maps each id to its latest revision.
    """

    def __init__(self, url: str, db_name: str) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.url = url
        self.db_name = db_name
        self.rng = random.Random(CHAOS_SEED)
        self.latest: Dict[str, str] = {}
        self.created = 0
        self.error: Optional[BaseException] = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            with Server(self.url) as server:
                db = server.get_db(self.db_name)
                for write in range(MAX_WRITES):
                    if self._stop_event.wait(WRITE_EVERY_S):
                        return
                    docs = self._next_write(write)
                    for doc, result in zip(docs, db.bulk_save(docs)):
                        if "error" in result:
                            raise AssertionError(f"_bulk_docs refused {doc}: {result}")
                        self.latest[doc["_id"]] = result["rev"]
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def _next_write(self, write: int) -> List[Dict[str, Any]]:
        earlier = sorted(self.latest)
        docs: List[Dict[str, Any]] = [
            {"_id": "doc-%05d" % n} for n in range(self.created, self.created + DOCS_PER_WRITE)
        ]
        self.created += DOCS_PER_WRITE
        if earlier:
            updated, deleted = self.rng.sample(earlier, 2) if len(earlier) > 1 else (earlier[0], "")
            docs.append({"_id": updated, "_rev": self.latest[updated], "write": write})
            if deleted and write % DELETE_EVERY_WRITES == 0:
                docs.append({"_id": deleted, "_rev": self.latest[deleted], "_deleted": True})
        return docs


class HistoryWriter(threading.Thread):
    """Grow a scripted CouchDB 3's history until stopped."""

    def __init__(self, history: History) -> None:
        super().__init__(name="chaos-history-writer", daemon=True)
        self.history = history
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        for _ in range(MAX_WRITES):
            if self._stop_event.wait(WRITE_EVERY_S):
                return
            self.history.append(DOCS_PER_WRITE)


def real_feed(couchdb_url: str, db_name: str) -> Set[Key]:
    """The database's changes as the server lists them now, asked directly (no proxy)."""
    with Server(couchdb_url) as server:
        answer = Consumer(server.get_db(db_name)).fetch(since=0)
    return {change_key(change) for change in answer["results"]}


def chaos(
    loop: Loop,
    followers: List[Follower],
    writer: Any,
    expected: Callable[[], Set[Key]],
    started: float,
) -> Tuple[Optional[str], Set[Key]]:
    """Run until every proxy healed and every fault was followed by a change; then stop writing
    and run until every follower has every change. Returns what went wrong, and the changes."""
    for follower in followers:
        follower.start()
    deadline = started + CHAOS_DEADLINE_S
    try:
        problem = run_until(
            loop, followers, lambda: all(f.answered() for f in followers), deadline, GAP_BOUND_S
        )
    finally:
        writer.stop()
        writer.join(10)
    if problem is not None or getattr(writer, "error", None) is not None:
        return problem, set()
    changes = expected()
    problem = run_until(
        loop, followers, lambda: all(changes <= f.keys for f in followers), deadline, GAP_BOUND_S
    )
    return problem, changes


def report_of(name: str, followers: List[Follower], started: float, problem: Optional[str]) -> str:
    kinds, phases = fault_mix(followers)
    worst, where = worst_gap(followers)
    lines = [
        f"{name}: {sum(kinds.values())} faults by kind {kinds}, by phase {phases}; worst time "
        f"from a fault to the next delivered change {worst:.2f} s ({where}; bound "
        f"{GAP_BOUND_S:.2f} s); {time.monotonic() - started:.1f} s"
        + ("" if problem is None else f"; STOPPED: {problem}"),
        *(follower.summary() for follower in followers),
    ]
    return "\n".join(lines)


def assert_chaos_held(
    followers: List[Follower], expected: Set[Key], replays: bool, min_faults: int, report: str
) -> None:
    for follower in followers:
        problems = follower.check(expected, replays)
        assert not problems, f"consumer #{follower.index}: {problems}\n{report}"
    kinds, phases = fault_mix(followers)
    assert sum(kinds.values()) >= min_faults, report
    assert set(kinds) == {"cut", "reset", "stall"}, report
    head_stalls = sum(
        1
        for follower in followers
        for record in follower.proxy.records
        if record.kind == "stall" and record.rows == 0 and record.region != "request"
    )
    assert head_stalls >= 5, f"only {head_stalls} stalls in or right after the head\n{report}"
    assert set(phases) == {"request", "before head", "head", "before the first row", "body"}, report
    worst, _ = worst_gap(followers)
    assert worst <= GAP_BOUND_S, report


# -- the checks themselves ----------------------------------------------------------------------


def test_the_checks_catch_loss_disorder_and_duplicates() -> None:
    def delivered(*entries: Tuple[int, int]) -> List[Delivery]:
        """(connection, seq) pairs; each seq is the change of doc-<seq>."""
        return [Delivery(0.0, c, (n, "doc-%d" % n, "1-x")) for c, n in entries]

    expected: Set[Key] = {(n, "doc-%d" % n, "1-x") for n in (1, 2, 3)}
    assert delivery_problems(delivered((1, 1), (1, 2), (2, 3)), expected, False) == []
    assert delivery_problems(delivered((1, 1), (1, 2), (2, 2), (2, 3)), expected, True) == []
    lost = delivery_problems(delivered((1, 1), (2, 3)), expected, True)
    assert lost == ["1 changes never delivered, e.g. [(2, 'doc-2', '1-x')]"]
    disorder = delivery_problems(delivered((1, 2), (1, 1), (1, 3)), expected, True)
    assert [p.split(":")[0] for p in disorder] == ["out of order"]
    in_one_connection = delivered((1, 1), (1, 2), (1, 2), (1, 3))
    assert [p.split(":")[0] for p in delivery_problems(in_one_connection, expected, True)] == [
        "delivered again"
    ]
    # With integer seqs nothing comes twice, not even after a reconnection.
    replayed = delivered((1, 1), (1, 2), (2, 2), (2, 3))
    assert [p.split(":")[0] for p in delivery_problems(replayed, expected, False)] == [
        "delivered again"
    ]


# -- one stall in each phase ---------------------------------------------------------------------


def test_a_stall_in_any_phase_is_replaced_within_the_heartbeat_allowance(
    couchdb_url: str, couchdb_admin: Any, db_name: str
) -> None:
    couchdb_admin.put_db(db_name)
    for n in range(5):  # rows for the body's stall, which waits for two
        couchdb_admin.post_doc(db_name, {"_id": "before-%d" % n})
    host, port = target_of(couchdb_url)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(Loop())
        followers = []
        for index, fault in enumerate(STALLS.values()):
            proxy = stack.enter_context(
                FaultProxy(host, port, seed=CHAOS_SEED, plan=fault, max_faults=1)
            )
            server = stack.enter_context(Server(through(couchdb_url, proxy.port)))
            follower = Follower(index, proxy, server.get_db(db_name), loop)
            stack.callback(follower.consumer.close)
            followers.append(follower)
        writer = Writer(couchdb_url, db_name)
        writer.start()
        stack.callback(writer.join, 10)
        stack.callback(writer.stop)
        for follower in followers:
            follower.start()
        problem = run_until(
            loop,
            followers,
            lambda: all(f.answered() for f in followers),
            started + CHAOS_DEADLINE_S,
            ONE_STALL_BOUND_S + 0.5,  # all stalls begin together: see them all go over
        )
        now = time.monotonic()
        # Per phase: (seconds from the stall to the next change or so far, whether one came).
        gaps: Dict[str, Tuple[float, bool]] = {}
        for phase, follower in zip(STALLS, followers):
            for gap, record, came in follower.gaps(now):
                assert record.kind == "stall", (phase, record)  # the plan holds nothing else
                gaps[phase] = (round(gap, 2), came)
    report = (
        f"seconds from a stall to the next delivered change, by phase (bound "
        f"{ONE_STALL_BOUND_S:.2f} s): {gaps}" + ("" if problem is None else f"; STOPPED: {problem}")
    )
    print("\n" + report)
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    never = [phase for phase in STALLS if phase not in gaps]
    assert not never, f"no stall in {never}: {report}"
    slow = [phase for phase, (gap, came) in gaps.items() if not came or gap > ONE_STALL_BOUND_S]
    assert not slow, f"stalls not replaced in time in {slow}: {report}"


# -- the chaos runs -------------------------------------------------------------------------------


def test_chaos_against_pouchdb_server(
    couchdb_url: str, couchdb_admin: Any, db_name: str, record_property: Any
) -> None:
    couchdb_admin.put_db(db_name)
    host, port = target_of(couchdb_url)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(Loop())
        followers = []
        for index in range(FEEDS):
            proxy = stack.enter_context(
                FaultProxy(
                    host,
                    port,
                    seed=CHAOS_SEED + index,
                    plan=alternating_plan,
                    max_faults=FAULTS_PER_FEED,
                )
            )
            server = stack.enter_context(Server(through(couchdb_url, proxy.port)))
            follower = Follower(index, proxy, server.get_db(db_name), loop)
            stack.callback(follower.consumer.close)
            followers.append(follower)
        writer = Writer(couchdb_url, db_name)
        writer.start()
        stack.callback(writer.join, 10)
        stack.callback(writer.stop)
        problem, expected = chaos(
            loop, followers, writer, lambda: real_feed(couchdb_url, db_name), started
        )
    report = report_of("pouchdb-server", followers, started, problem)
    print("\n" + report)
    record_property("worst_fault_to_change_s", round(worst_gap(followers)[0], 3))
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    assert problem is None, report
    # The server's own list is what the writer wrote: the oracle is sound.
    assert {docid: rev for _, docid, rev in expected} == writer.latest, report
    # Integer seqs: a resume after the last delivered change repeats nothing.
    assert_chaos_held(followers, expected, False, MIN_FAULTS, report)


def test_chaos_against_a_scripted_couchdb3(record_property: Any) -> None:
    history = History()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        couch = stack.enter_context(
            ScriptedServer([[Read(), FollowHistory(history, replay=COUCH3_REPLAY)]])
        )
        loop = stack.enter_context(Loop())
        followers = []
        for index in range(COUCH3_FEEDS):
            proxy = stack.enter_context(
                FaultProxy(
                    "127.0.0.1",
                    couch.port,
                    seed=CHAOS_SEED - index,
                    plan=alternating_plan,
                    max_faults=COUCH3_FAULTS_PER_FEED,
                )
            )
            server = stack.enter_context(Server(proxy.url))
            follower = Follower(index, proxy, server.get_db("db%d" % index), loop)
            stack.callback(follower.consumer.close)
            followers.append(follower)
        writer = HistoryWriter(history)
        writer.start()
        stack.callback(writer.join, 10)
        stack.callback(writer.stop)
        problem, expected = chaos(loop, followers, writer, history.keys, started)
    report = report_of("scripted CouchDB 3", followers, started, problem)
    print("\n" + report)
    record_property("worst_fault_to_change_s", round(worst_gap(followers)[0], 3))
    assert problem is None, report
    assert len(expected) == history.count > 0
    minimum = COUCH3_FEEDS * COUCH3_FAULTS_PER_FEED
    assert_chaos_held(followers, expected, True, minimum, report)


# -- the crash and the restart ------------------------------------------------------------------


def read_outfile(path: Path) -> List[Tuple[str, Any]]:
    """The worker's (id, seq) lines; a torn last line would be a bug in the worker."""
    if not path.exists():
        return []
    text = path.read_text("utf-8")
    assert text == "" or text.endswith("\n"), f"torn line at the end of {path}"
    entries = []
    for line in text.splitlines():
        docid, seq = line.split("\t")
        entries.append((docid, json.loads(seq)))
    return entries


def start_worker(
    url: str, db_name: str, checkpoint: Path, outfile: Path, log: Any
) -> "subprocess.Popen[bytes]":
    env = dict(os.environ)
    # The worker imports the same changeloop this test imported (the source tree or the wheel).
    package_parent = str(Path(changeloop.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "crash_worker.py"),
            url,
            db_name,
            str(checkpoint),
            str(outfile),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_until(predicate: Any, timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            tail = log_path.read_text("utf-8", "replace")[-2000:] if log_path.exists() else ""
            raise AssertionError(f"timed out waiting for {what}; worker log:\n{tail}")
        time.sleep(0.02)


def test_crash_restart_is_at_least_once(
    couchdb_url: str, couchdb_admin: Any, db_name: str, tmp_path: Path
) -> None:
    couchdb_admin.put_db(db_name)
    checkpoint = tmp_path / "feed.checkpoint"
    outfile = tmp_path / "delivered.tsv"
    log_path = tmp_path / "worker.log"
    written: List[str] = []
    killed = threading.Event()
    writer_errors: List[BaseException] = []

    def write() -> None:
        try:
            with Server(couchdb_url) as server:
                db = server.get_db(db_name)
                for batch in range(CRASH_BATCHES_BEFORE_KILL + CRASH_BATCHES_AFTER_KILL):
                    if batch == CRASH_BATCHES_BEFORE_KILL:
                        killed.wait(WORKER_DEADLINE_S)  # the rest is written after the crash
                    ids = [
                        "doc-%05d" % (batch * CRASH_BATCH_DOCS + n) for n in range(CRASH_BATCH_DOCS)
                    ]
                    db.bulk_save([{"_id": docid} for docid in ids])
                    written.extend(ids)
                    time.sleep(0.02)
        except BaseException as exc:
            writer_errors.append(exc)

    writer = threading.Thread(target=write, name="crash-writer", daemon=True)
    workers: List[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            workers.append(start_worker(couchdb_url, db_name, checkpoint, outfile, log))
            writer.start()
            wait_until(
                lambda: len(read_outfile(outfile)) >= KILL_AFTER_LINES and checkpoint.exists(),
                WORKER_DEADLINE_S,
                f"{KILL_AFTER_LINES} delivered changes and a checkpoint",
                log_path,
            )
            workers[0].send_signal(signal.SIGKILL)
            assert workers[0].wait(STOP_TIMEOUT_S) == -signal.SIGKILL
            writing_at_kill = writer.is_alive()
            saved = FileCheckpoint(checkpoint).load()
            first_run = read_outfile(outfile)
            killed.set()

            workers.append(start_worker(couchdb_url, db_name, checkpoint, outfile, log))
            writer.join(WORKER_DEADLINE_S)
            assert not writer.is_alive() and not writer_errors, writer_errors
            wait_until(
                lambda: set(written) <= {docid for docid, _ in read_outfile(outfile)},
                WORKER_DEADLINE_S,
                "the restarted worker to deliver every document",
                log_path,
            )
            workers[1].send_signal(signal.SIGTERM)  # a clean stop saves the checkpoint
            assert workers[1].wait(STOP_TIMEOUT_S) == 0, log_path.read_text("utf-8", "replace")
        finally:
            killed.set()
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                worker.wait(STOP_TIMEOUT_S)
            writer.join(STOP_TIMEOUT_S)
    elapsed = time.monotonic() - started

    entries = read_outfile(outfile)
    second_run = entries[len(first_run) :]
    # Where the checkpoint was when the worker died: everything after it is delivered again.
    saved_at = [position for position, (_, seq) in enumerate(first_run) if seq == saved]
    assert saved_at, f"the checkpoint {saved!r} is not a seq the first worker delivered"
    after_checkpoint = first_run[saved_at[-1] + 1 :]
    counts = collections.Counter(docid for docid, _ in entries)
    duplicates = sorted(docid for docid, count in counts.items() if count > 1)
    report = (
        f"crash: {len(written)} docs written; first worker delivered {len(first_run)} before "
        f"SIGKILL (checkpoint at seq {saved!r}, {len(after_checkpoint)} changes after it; writer "
        f"still writing: {writing_at_kill}); restarted worker delivered {len(second_run)}; "
        f"{len(duplicates)} duplicates; {elapsed:.1f} s"
    )
    print("\n" + report)
    missed = sorted(set(written) - set(counts))
    assert not missed, f"{len(missed)} documents never delivered, e.g. {missed[:5]}; {report}"
    assert max(counts.values()) <= 2, report
    # At-least-once, and no more than that: exactly what followed the checkpoint came twice.
    assert duplicates == sorted(docid for docid, _ in after_checkpoint), report
    assert sorted(second_run[: len(after_checkpoint)]) == sorted(after_checkpoint), report
    assert FileCheckpoint(checkpoint).load() == entries[-1][1], "the stop did not save the seq"
