"""Proof that no change is lost: a fault-injecting proxy, a chaos run, a crash and a restart.

The proxy (``faultproxy.py``) is tested first, against scripted servers, so the chaos test can
trust it: pass-through, a cut after exactly N bytes, a reset, a stall, aimed faults, healing.
Then a consumer follows the real server through the proxy while another thread writes a few
thousand documents and the proxy breaks connection after connection; every document's latest
revision must arrive, in seq order per connection, duplicated only by a resume. Last, a consumer
with a ``FileCheckpoint`` runs in a subprocess (``crash_worker.py``) that is SIGKILLed mid-stream
and restarted: nothing is missed, and only what came after the last checkpoint is delivered twice.
Run with ``-s`` to see the fault and duplicate counts.
"""

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Counter, Dict, List, Optional, Set, Tuple

import pytest
from faultproxy import (
    Fault,
    FaultProxy,
    ResponseTracker,
    find_fault_offset,
)
from scripted import (
    LAST_CHUNK,
    Close,
    Pause,
    Read,
    ScriptedServer,
    Send,
    Stall,
    chunk,
    response_head,
)

import changeloop
from changeloop import Consumer, FileCheckpoint, Server

HERE = Path(__file__).resolve().parent
REQUEST = b"GET /db/_changes?feed=continuous HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
ROWS = [
    b'{"seq":1,"id":"a","changes":[{"rev":"1-a"}]}\n',
    b"\n",
    b'{"seq":2,"id":"b","changes":[{"rev":"1-b"}]}\n{"seq":3,"id":"c","changes":[]}\n',
    b"\n",
]
# A feed response: the head, then one chunk per entry of ROWS (two rows share the third chunk).
FEED = response_head(chunked=True) + b"".join(chunk(row) for row in ROWS)
READ_TIMEOUT_S = 5.0

# -- the chaos run: sizes and bounds ------------------------------------------------------------
CHAOS_SEED = 20240605
FAULT_TARGET = 55  # breaking faults before the proxy heals; the test demands at least 50
MIN_FAULTS = 50
MIN_DOCS = 2000
MAX_DOCS = 3000
BATCH_DOCS = 100
UPDATES_PER_BATCH = 10  # second revisions of earlier documents, in the same _bulk_docs
DELETES_EVERY_BATCHES = 4
WRITER_PAUSE_S = 0.15  # spread the writes over the faults rather than front-loading them
HEARTBEAT_MS = 200  # the watchdog gives up on a stalled connection after 3 of these
CHAOS_DEADLINE_S = 45.0  # well under the suite's 60 s timeout; a healthy run takes ~10 s

# -- the crash run ----------------------------------------------------------------------------
CRASH_BATCHES_BEFORE_KILL = 16
CRASH_BATCHES_AFTER_KILL = 14
CRASH_BATCH_DOCS = 50
KILL_AFTER_LINES = 300
WORKER_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 5.0


def classify(parts: List[Tuple[bytes, str]]) -> Tuple[bytes, List[str]]:
    """Join labelled parts; return the bytes and each byte's region, independently of the proxy."""
    data = b"".join(part for part, _ in parts)
    regions = [region for part, region in parts for _ in part]
    return data, regions


def feed_parts() -> List[Tuple[bytes, str]]:
    """FEED, labelled by hand: what ResponseTracker must find."""
    parts = [(response_head(chunked=True), "headers")]
    for row in ROWS:
        parts.append((b"%x\r\n" % len(row), "chunk_size"))
        for line in row.splitlines(keepends=True):
            parts.append((line, "heartbeat" if line == b"\n" else "json_line"))
        parts.append((b"\r\n", "chunk_crlf"))
    return parts


def fetch(url_port: int, timeout: float = READ_TIMEOUT_S) -> Tuple[bytes, Optional[BaseException]]:
    """Send REQUEST through the proxy; read until EOF or an error; return bytes and error."""
    received = b""
    with socket.create_connection(("127.0.0.1", url_port), timeout=timeout) as sock:
        sock.sendall(REQUEST)
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:  # socket.timeout and ConnectionResetError included
                return received, exc
            if not data:
                return received, None
            received += data


# -- the tracker --------------------------------------------------------------------------------


def spans_to_regions(spans: List[Tuple[int, int, str]]) -> List[str]:
    regions: List[str] = []
    for start, stop, region in spans:
        assert start == len(regions), spans
        regions.extend([region] * (stop - start))
    return regions


@pytest.mark.parametrize("split", ["whole", "bytewise", "random"])
def test_tracker_classifies_every_byte(split: str) -> None:
    data, expected = classify(feed_parts())
    tracker = ResponseTracker()
    if split == "whole":
        pieces = [data]
    elif split == "bytewise":
        pieces = [data[i : i + 1] for i in range(len(data))]
    else:
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(data)), 25))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    spans: List[Tuple[int, int, str]] = []
    for piece in pieces:
        spans.extend(tracker.feed(piece))
    assert spans_to_regions(spans) == expected
    assert tracker.offset == len(data)


def test_tracker_unframed_body_and_last_chunk() -> None:
    head = response_head(chunked=False)
    tracker = ResponseTracker()
    regions = spans_to_regions(tracker.feed(head + b'{"a":1}\n\n'))
    assert regions == ["headers"] * len(head) + ["json_line"] * 8 + ["heartbeat"]
    tracker = ResponseTracker()
    head = response_head(chunked=True)
    regions = spans_to_regions(tracker.feed(head + LAST_CHUNK))
    assert regions[len(head) :] == ["chunk_size"] * 3 + ["trailer"] * 2


def test_aimed_offsets_land_strictly_inside() -> None:
    data, regions = classify(feed_parts())
    spans = ResponseTracker().feed(data)
    for region in ("headers", "chunk_size", "json_line"):
        for after in range(0, len(data), 7):
            found = find_fault_offset(Fault("cut", after, region), spans, 0, len(data), None)
            if found is None:
                continue
            offset, where = found
            assert where == region and offset >= max(after, 1)
            assert regions[offset - 1] == regions[offset] == region, (region, after, offset)


# -- the proxy, against scripted servers ----------------------------------------------------------


@pytest.mark.parametrize("plan", [Fault(), Fault("delay", delay=0.01)], ids=["none", "delay"])
def test_pass_through(plan: Fault) -> None:
    pieces = [Send(FEED[:100]), Pause(0.02), Send(FEED[100:])]
    with ScriptedServer([[Read(), *pieces, Close()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan) as proxy:
            received, error = fetch(proxy.port)
            assert (received, error) == (FEED, None)
            assert proxy.connections == 1 and proxy.connection_faults == 0
            assert proxy.faults_by_kind == ({"delay": 1} if plan.delay else {})
        assert server.requests[0].target == "/db/_changes?feed=continuous"
    assert "connections=1" in repr(proxy) and "closed" in repr(proxy)


@pytest.mark.parametrize("after", [0, 1, 60, len(FEED) - 1])
def test_cut_delivers_exactly_n_bytes_then_eof(after: int) -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("cut", after)) as proxy:
            received, error = fetch(proxy.port)
            assert error is None  # a clean FIN, not a reset
            assert received == FEED[:after]
            [record] = proxy.records
            assert (record.kind, record.offset) == ("cut", after)
            assert proxy.faults_by_kind == {"cut": 1}


def test_reset_gives_connection_reset_error() -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("reset", 40)) as proxy:
            received, error = fetch(proxy.port)
            assert isinstance(error, ConnectionResetError), error
            assert len(received) <= 40 and FEED.startswith(received)
            assert proxy.faults_by_kind == {"reset": 1}


def test_stall_delivers_n_bytes_then_nothing() -> None:
    with ScriptedServer([[Read(), Send(FEED), Stall()]]) as server:
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=Fault("stall", 100)) as proxy:
            received, error = fetch(proxy.port, timeout=0.3)
            assert isinstance(error, socket.timeout), error
            assert received == FEED[:100]
            assert proxy.faults_by_kind == {"stall": 1}


@pytest.mark.parametrize("region", ["headers", "chunk_size", "json_line"])
def test_aimed_cut_lands_inside_the_region(region: str) -> None:
    data, regions = classify(feed_parts())
    after = 20 if region == "headers" else len(response_head(chunked=True)) + 2
    with ScriptedServer([[Read(), Send(data), Stall()]]) as server:
        plan = Fault("cut", after, inside=region)
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan) as proxy:
            received, _ = fetch(proxy.port)
            cut = len(received)
            assert cut >= after and regions[cut - 1] == regions[cut] == region
            assert proxy.faults_by_region == {region: 1}


def test_heals_after_max_faults_and_inject_now() -> None:
    scripts = [[Read(), Send(FEED), Stall()]]
    with ScriptedServer(scripts) as server:
        plan = Fault("cut", 10, delay=0.001)
        with FaultProxy("127.0.0.1", server.port, seed=1, plan=plan, max_faults=2) as proxy:
            assert fetch(proxy.port)[0] == FEED[:10]
            assert fetch(proxy.port)[0] == FEED[:10]
            assert proxy.healed
            # Healed: the third connection passes through (the server then stalls).
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(REQUEST)
                received = b""
                while len(received) < len(FEED):
                    received += sock.recv(65536)
                assert received == FEED
                # The two cut connections wind down in their own threads: wait (bounded) until
                # only this one is open, so the count below is exact.
                deadline = time.monotonic() + 5
                while sum(not link.done for link in proxy._links) > 1:
                    assert time.monotonic() < deadline, "earlier connections never finished"
                    time.sleep(0.01)
                assert proxy.inject_now("cut") == 1  # an explicit fault fires even when healed
                assert sock.recv(65536) == b""
            assert proxy.faults_by_kind == {"cut": 3, "delay": 2}
            assert proxy.connection_faults == 3


def test_random_plan_is_reproducible() -> None:
    def faults(seed: int) -> List[Tuple[str, int, str]]:
        with ScriptedServer([[Read(), Send(FEED), Close()]]) as server:
            with FaultProxy("127.0.0.1", server.port, seed=seed, offsets=(0, 200)) as proxy:
                for _ in range(12):
                    fetch(proxy.port, timeout=0.1)  # a stalled one times out
                return [(record.kind, record.offset, record.region) for record in proxy.records]

    first = faults(3)
    assert first == faults(3)
    assert {kind for kind, _, _ in first} == {"cut", "reset", "stall"}


# -- the chaos run --------------------------------------------------------------------------------


def chaos_plan(rng: random.Random, index: int) -> Fault:
    """Every connection breaks: in the head, a chunk-size line, a feed line, or anywhere."""
    kind = rng.choices(("cut", "reset", "stall"), weights=(6, 3, 1))[0]
    inside = rng.choice(("headers", "chunk_size", "json_line", None))
    if inside == "headers":
        after = rng.randint(0, 120)  # every response head here is longer than that
    elif inside is None:
        after = rng.randint(200, 8000)
    else:
        after = rng.randint(0, 4000)
    delay = rng.choice((0.0, 0.0, 0.0, 0.002))
    return Fault(kind, after=after, inside=inside, delay=delay)


def seq_number(seq: Any) -> int:
    """pouchdb-server's seqs are integers; CouchDB 2+'s start with an increasing number."""
    if isinstance(seq, int):
        return seq
    return int(str(seq).split("-", 1)[0])


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port`` (credentials kept)."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Writer(threading.Thread):
    """Write documents in _bulk_docs batches, with its own Server, until told it is enough.

    Creates ``doc-NNNNN``; each batch also updates some earlier documents, and every few batches
    deletes some. ``final`` maps each id to its latest revision.
    """

    def __init__(self, url: str, db_name: str, proxy: FaultProxy) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.url = url
        self.db_name = db_name
        self.proxy = proxy
        self.rng = random.Random(CHAOS_SEED)
        self.final: Dict[str, str] = {}
        self.deleted: Set[str] = set()
        self.created = 0
        self.updates = 0
        self.deletes = 0
        self.error: Optional[BaseException] = None
        self.finished_at = 0.0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def more(self) -> bool:
        if self._stop_event.is_set() or self.created >= MAX_DOCS:
            return False
        return self.created < MIN_DOCS or self.proxy.connection_faults < FAULT_TARGET

    def run(self) -> None:
        try:
            with Server(self.url) as server:
                db = server.get_db(self.db_name)
                batch = 0
                while self.more():
                    docs = self._next_batch(batch)
                    for doc, result in zip(docs, db.bulk_save(docs)):
                        if "error" in result:
                            raise AssertionError(f"_bulk_docs refused {doc}: {result}")
                        self.final[doc["_id"]] = result["rev"]
                    batch += 1
                    self._stop_event.wait(WRITER_PAUSE_S)
        except BaseException as exc:  # reported by the test's thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def _next_batch(self, batch: int) -> List[Dict[str, Any]]:
        live = sorted(set(self.final) - self.deleted)
        docs: List[Dict[str, Any]] = [
            {"_id": "doc-%05d" % n, "n": n} for n in range(self.created, self.created + BATCH_DOCS)
        ]
        self.created += BATCH_DOCS
        if live:
            for docid in self.rng.sample(live, min(UPDATES_PER_BATCH, len(live))):
                docs.append({"_id": docid, "_rev": self.final[docid], "updated": batch})
                self.updates += 1
            if batch % DELETES_EVERY_BATCHES == 0:
                touched = {doc["_id"] for doc in docs}
                for docid in [d for d in live if d not in touched][:5]:
                    docs.append({"_id": docid, "_rev": self.final[docid], "_deleted": True})
                    self.deleted.add(docid)
                    self.deletes += 1
        return docs


def test_chaos_every_latest_revision_arrives(
    couchdb_url: str, couchdb_admin: Any, db_name: str
) -> None:
    couchdb_admin.put_db(db_name)
    target = urllib.parse.urlsplit(couchdb_url)
    host = target.hostname or "127.0.0.1"
    port = target.port or (443 if target.scheme == "https" else 80)
    started = time.monotonic()
    # (connection, seq, id, rev) per delivered change, in delivery order.
    delivered: List[Tuple[int, Any, str, str]] = []
    latest: Dict[str, str] = {}
    errors: Counter[str] = collections.Counter()

    with FaultProxy(host, port, seed=CHAOS_SEED, plan=chaos_plan, max_faults=FAULT_TARGET) as proxy:
        writer = Writer(couchdb_url, db_name, proxy)
        server = Server(through(couchdb_url, proxy.port))
        consumer = Consumer(
            server.get_db(db_name),
            on_error=lambda event: errors.update([type(event.error).__name__]),
            reconnect_base=0.01,
            reconnect_cap=0.1,
            healthy_after=1.0,
            # A stall inside the head is noticed after max(connect_timeout, first_byte_timeout),
            # one before the first feed line after first_byte_timeout, not 3 heartbeats.
            first_byte_timeout=0.8,
            connect_timeout=0.8,
        )

        def on_change(change: Dict[str, Any]) -> None:
            rev = change["changes"][0]["rev"]
            delivered.append((consumer.connections, change["seq"], change["id"], rev))
            latest[change["id"]] = rev

        try:
            consumer.start(on_change, since=0, heartbeat=HEARTBEAT_MS)
            writer.start()
            deadline = started + CHAOS_DEADLINE_S
            checked = -1
            while time.monotonic() < deadline and consumer.running:
                consumer.loop.run_once(0.05)
                if writer.is_alive() or checked == len(delivered):
                    continue
                checked = len(delivered)
                if all(latest.get(docid) == rev for docid, rev in writer.final.items()):
                    break
            caught_up_at = time.monotonic()
            stopped_with = consumer.error
            still_running = consumer.running
        finally:
            writer.stop()
            consumer.close()
            server.close()
            writer.join(10)
        connections = consumer.connections
        summary = proxy.summary()

    assert writer.error is None, f"the writer failed: {writer.error!r}"
    assert still_running and stopped_with is None, f"the consumer stopped: {stopped_with!r}"

    # Every document's latest revision was delivered.
    missing = sorted(d for d, rev in writer.final.items() if latest.get(d) != rev)
    delivered_pairs = {(docid, rev) for _, _, docid, rev in delivered}
    never = [(d, rev) for d, rev in writer.final.items() if (d, rev) not in delivered_pairs]

    # Within one connection seqs strictly increase. A resume may replay (CouchDB 2+ can), but
    # with integer seqs (pouchdb-server) since=N returns only what came after N: no replay.
    out_of_order = []
    previous: Dict[int, int] = {}
    replayed = 0
    highest_before = -1  # the highest seq delivered on earlier connections
    for connection, seq, docid, _ in delivered:
        number = seq_number(seq)
        if connection in previous and number <= previous[connection]:
            out_of_order.append((connection, seq, docid))
        if connection not in previous:
            highest_before = max([highest_before, *previous.values()])
        if number <= highest_before:
            replayed += 1
        previous[connection] = number
    integer_seqs = all(isinstance(seq, int) for _, seq, _, _ in delivered)

    # A duplicate (id, rev) is only legitimate on a later connection (a resume replayed it).
    first_seen: Dict[Tuple[str, str], int] = {}
    duplicates = 0
    bad_duplicates = []
    for connection, seq, docid, rev in delivered:
        key = (docid, rev)
        if key in first_seen:
            duplicates += 1
            if connection <= first_seen[key]:
                bad_duplicates.append((connection, seq, docid, rev))
        else:
            first_seen[key] = connection

    report = (
        f"chaos: {writer.created} docs created, {writer.updates} updated, {writer.deletes} "
        f"deleted ({len(writer.final)} ids); {len(delivered)} changes delivered over "
        f"{connections} connections, {duplicates} duplicates, {replayed} replayed; proxy: "
        f"{summary}; consumer errors: {dict(errors)}; writes took "
        f"{writer.finished_at - started:.1f} s, caught up after {caught_up_at - started:.1f} s"
    )
    print("\n" + report)
    assert not missing, f"{len(missing)} docs lack their latest revision ({missing[:5]}); {report}"
    assert not never, f"latest revisions never delivered: {never[:5]}; {report}"
    assert not out_of_order, f"seqs went backwards in a connection: {out_of_order[:5]}; {report}"
    assert not bad_duplicates, f"duplicates in one connection: {bad_duplicates[:5]}; {report}"
    assert replayed == 0 or not integer_seqs, f"a resume went back; {report}"
    assert proxy.connection_faults >= MIN_FAULTS, f"too few faults; {report}"
    assert caught_up_at - started < CHAOS_DEADLINE_S, report


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
