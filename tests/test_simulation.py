"""The deterministic simulation test (issue 14): the consumer, with the library's defaults, on a
fake clock against a simulated CouchDB 3 whose faults all come from one seed.

Each seed draws a scenario (plain or TLS, the heartbeat CouchDB is asked for, since 0/now/a stored
checkpoint, a checkpoint store that fails now and then, ``run_once(0)`` steps or a blocking
``wait()``), writes changes at random times while every new connection may meet a fault (refused,
never connected, a TLS handshake that stalls or fails, a request or response cut, reset or
stalled at any byte offset, an error status, a clean end), and posts ``stop()`` from another
thread at random moments: between passes, inside a pass (from the select, a callback, a
checkpoint save, a read, a lifecycle callback), or paused half-way through ``stop()`` while the
loop runs on (a trace function holds the stopping thread at its k-th line), after which the
consumer is started again. Then the faults heal, and the run ends with a last stop.

Invariants, checked for every seed (``INVARIANTS``); every failure names its seed, and
``CHANGELOOP_SIM_SEED=<n>`` replays it exactly (``CHANGELOOP_SIM_SEEDS=5000`` runs more).
Reading a failure: the report lists the failing seeds by invariant with one example each, then
the first failing seed's scenario and the world's events up to its first violation (``#k`` is
the k-th connection, with its fate; times are simulated seconds from the start). The silence
allowance holds every connection to 3 heartbeats (the one the feed asked for) plus the watchdog's
0.1 s, from its last sign of life, in every phase: TCP connect, TLS handshake, the request (the
server stopped reading), the head and the body, and the ``since=now`` question too.
"""

import logging
import os
import random
import ssl
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import pytest
from simulation import Fate, Peer, SimConnection, SimHang, SimSelector, World, seq_n, sim_seq

import changeloop
from changeloop import Consumer, Loop, Server
from changeloop.errors import CheckpointError, HTTPError

SEEDS = int(os.environ.get("CHANGELOOP_SIM_SEEDS", "300"))
ONE_SEED = os.environ.get("CHANGELOOP_SIM_SEED")

INVARIANTS = {
    "delivered": "every change written is delivered at least once",
    "order": "in order, no gap, duplicates only right after a (re)connection",
    "checkpoint": "a saved or resumed-from seq never passes an undelivered change",
    "stop": "a stop() from any thread takes effect within %d passes (and wait() returns)",
    "silence": "no connection stays open silent longer than 3 heartbeats + 0.1 s, in any phase",
    "fatal": "a fatal status stops the consumer with it; nothing else stops it",
    "logged": "nothing a handler, timer or re-read raises is only logged by the loop",
    "hang": "the simulation never runs out of things to do while the consumer runs",
    "protocol": "the consumer sends only the requests CouchDB expects",
}
STOP_PASSES = 8
INVARIANTS["stop"] %= STOP_PASSES

#: Fatal on purpose (issue 14): the request itself is wrong or not allowed, retrying is pointless.
FATAL_STATUSES = frozenset(
    [301, 302, 307, 308, 400, 401, 403, 404, 405, 406, 407, 409, 410, 412, 413, 414, 415, 431]
)
RETRIED_STATUSES = (500, 500, 502, 503, 503, 504, 429, 408, 0, 999)
#: CouchDB's heartbeat parameter in ms; None leaves the library's default (30 s).
HEARTBEATS = (200, 500, 500, 1000, 2000, None)
DEFAULT_HEARTBEAT_MS = 30_000
WATCHDOG_RESOLUTION_S = 0.1
#: How long after the faults heal every change must be delivered (simulated seconds): the
#: longest backoff (60 s) plus a stalled connection's allowance, with room.
HEAL_S = 150.0
MAX_PASSES = 60_000
#: Real seconds a stopping thread waits paused before going on by itself (only if stop() holds
#: a lock the loop thread then waits for: the run stays correct, but that pause not exact).
PAUSE_TIMEOUT_S = 1.0
_PACKAGE_DIR = os.path.dirname(changeloop.__file__)
_TLS_CONTEXT: Optional[ssl.SSLContext] = None

FAULTS = (
    ("refuse_now", 2, False),
    ("refuse_later", 2, False),
    ("connect_never", 2, False),
    ("hs_never", 2, True),
    ("hs_fail", 2, True),
    ("request_stall", 2, False),
    ("request_cut", 1, False),
    ("request_reset", 1, False),
    ("response_cut", 5, False),
    ("response_reset", 3, False),
    ("response_stall", 6, False),
    ("status", 4, False),
    ("end", 2, False),
)


class Stop(BaseException):
    """Ends a run from inside the loop (a violation that makes going on pointless). Not an
    Exception, so that the consumer's own ``except Exception`` cannot take it for a failure."""


class _LoopLog(logging.Handler):
    def __init__(self, run: "Run") -> None:
        super().__init__(logging.ERROR)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.violation(
            "logged",
            "the loop only logged: %s %s"
            % (record.getMessage(), record.exc_info[1] if record.exc_info else ""),
        )


class FlakyStore:
    """A checkpoint store whose save() fails now and then, as a store on the network does."""

    def __init__(self, run: "Run", fail: float, seq: Any) -> None:
        self.run = run
        self.fail = fail
        self.seq = seq
        self.raised: List[BaseException] = []

    def load(self) -> Any:
        return self.seq

    def save(self, seq: Any) -> None:
        run = self.run
        run.check_seq(seq, "checkpoint save(seq %s)" % seq_n(seq))
        run.world.point("save")
        if run.rng.random() < self.fail:
            exc: BaseException = (
                CheckpointError("simulated: the store is unreachable")
                if run.rng.random() < 0.75
                else OSError(5, "simulated: Input/output error")
            )
            self.raised.append(exc)
            run.world.note("checkpoint save(%s) raises %r" % (seq_n(seq), exc))
            raise exc
        self.seq = seq


class StopAgent:
    """Posts consumer.stop() from another real thread at a chosen point, deterministically."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.armed: Optional[Tuple[str, Optional[int], float]] = None
        self.paused: Optional[Tuple[threading.Thread, threading.Event, int]] = None
        self.requested_pass: Optional[int] = None
        self.final = False
        self.fired = False  # a stop() was posted since the last start
        self.counts: Dict[str, int] = {}

    @property
    def pending(self) -> bool:
        return self.armed is not None or self.paused is not None or self.requested_pass is not None

    def arm(self, where: str, pause_at: Optional[int], final: bool = False) -> None:
        run = self.run
        if self.pending or not run.consumer.running:
            return
        if where == "between" and run.mode != "step":
            where = "select"
        self.final = final
        self.armed = (where, pause_at, run.world.now())
        run.world.note(
            "stop armed at %s%s%s"
            % (
                where,
                "" if pause_at is None else " paused at line %d" % pause_at,
                " (final)" if final else "",
            )
        )

    def at(self, point: str) -> None:
        run = self.run
        if self.paused is not None and point == "select" and run.world.passes >= self.paused[2]:
            self._resume()
        if self.armed is None:
            return
        where, pause_at, since = self.armed
        if where == point or (point == "select" and run.world.now() - since > 2.0):
            self.armed = None
            self._fire(point, pause_at)

    def _fire(self, point: str, pause_at: Optional[int]) -> None:
        run = self.run
        reached = threading.Event()
        resume = threading.Event()
        state = {"lines": 0, "paused": False, "holding": False}

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and not state["paused"] and not state["holding"]:
                state["lines"] += 1
                if state["lines"] == pause_at:
                    state["paused"] = True
                    reached.set()
                    if not resume.wait(PAUSE_TIMEOUT_S):
                        state["timed_out"] = True
            return local

        def holding(frame: Any, event: str, arg: Any) -> Any:
            if event == "return":
                state["holding"] = False
            return holding

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            if event == "call" and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
                if frame.f_code.co_name == "call_threadsafe":
                    # Loop.call_threadsafe holds the loop (no run may start) for as long as the
                    # call takes: a pause there would only make the loop's thread wait for it.
                    state["holding"] = True
                    return holding
                return local
            return None

        def target() -> None:
            if pause_at is not None:
                sys.settrace(tracer)
            try:
                run.consumer.stop()
            except BaseException as exc:  # reported below, in the run's thread
                state["error"] = exc
            finally:
                sys.settrace(None)
                reached.set()

        self.fired = True
        label = point + ("" if pause_at is None else "/paused")
        self.counts[label] = self.counts.get(label, 0) + 1
        thread = threading.Thread(target=target, name="sim-stop")
        thread.start()
        if not reached.wait(10.0):
            run.violation("stop", "stop() in another thread blocked for 10 s")
            raise Stop()
        if state["paused"] and thread.is_alive():
            run.world.note("stop() paused at its line %d (from %s)" % (pause_at or 0, point))
            self.paused = (thread, resume, run.world.passes + run.rng.randint(1, 4))
            self._state = state
            return
        thread.join()
        self._requested(state)

    def _resume(self) -> None:
        assert self.paused is not None
        thread, resume, _ = self.paused
        self.paused = None
        resume.set()
        thread.join()
        self._requested(self._state)

    def _requested(self, state: Dict[str, Any]) -> None:
        run = self.run
        if "error" in state:
            run.violation("stop", "stop() raised in another thread: %r" % (state["error"],))
        if state.get("timed_out"):
            run.world.note("the paused stop() went on after %.1f s (a lock?)" % PAUSE_TIMEOUT_S)
        self.requested_pass = run.world.passes
        run.world.note("stop() returned in its thread (pass %d)" % run.world.passes)

    def check(self) -> bool:
        """After a pass: whether a requested stop took effect (False: not yet)."""
        run = self.run
        if self.requested_pass is None:
            return False
        consumer = run.consumer
        if not consumer.running:
            if consumer.state != "stopped":
                run.violation("stop", "stopped but state is %r" % consumer.state)
            self.requested_pass = None
            return True
        if run.world.passes - self.requested_pass > STOP_PASSES:
            self.requested_pass = None
            run.violation(
                "stop",
                "a stop() from another thread did not take effect within %d "
                "passes: %r" % (STOP_PASSES, consumer),
            )
            raise Stop()
        return False

    def settle(self) -> None:
        """The consumer stopped: a stop() still paused half-way has taken effect already."""
        self.armed = None
        if self.paused is not None:
            self._resume()
        self.requested_pass = None

    def finish(self) -> None:
        if self.paused is not None:
            self._resume()


class Run:
    """One seed: the scenario, the world, the consumer, and the record of what it did."""

    def __init__(self, seed: int, drop: Tuple[int, ...] = ()) -> None:
        self.seed = seed
        #: Changes the callback pretends not to have seen (the harness's own self-test).
        self.drop = set(drop)
        rng = self.rng = random.Random(seed)
        self.mode = "step" if rng.random() < 0.6 else "wait"
        self.tls = rng.random() < 0.3
        self.heartbeat_ms = rng.choice(HEARTBEATS)
        beat = (self.heartbeat_ms or DEFAULT_HEARTBEAT_MS) / 1000.0
        self.allowance = 3 * beat + WATCHDOG_RESOLUTION_S
        self.benign = min(0.25 * self.allowance, 2.0)
        self.p_fault = rng.uniform(0.2, 0.7)
        self.split = rng.choice((0.0, 0.2, 0.5))
        self.tls_pieces = rng.choice((0.3, 0.7, 1.0))
        self.repeat_callback = rng.random() < 0.5
        self.chaos_s = rng.uniform(15, 60) + rng.uniform(1, 3) * self.allowance
        self.write_gap = self.chaos_s / rng.uniform(20, 150)  # mean time between writes
        store_kind = rng.random()
        initial = rng.randint(0, 30)
        self.since: Any = 0
        self.store: Optional[FlakyStore] = None
        if store_kind < 0.6:
            stored = sim_seq(rng.randint(0, initial)) if rng.random() < 0.3 else None
            self.store = FlakyStore(self, rng.choice((0.0, 0.1, 0.3)), stored)
        if rng.random() < 0.3:
            self.since = "now"

        self.world = World(rng, self.fate)
        self.world.observer = self
        self.world.on_point = self.at_point
        self.world.write(initial)
        self.phase = "chaos"
        self.heal_deadline = 0.0
        self.violations: List[Tuple[str, str]] = []
        self.violation_counts: Dict[str, int] = {}
        self.trace: Optional[List[str]] = None
        self.agent = StopAgent(self)
        self.callback = self.on_change  # one object: the same callable on every start
        self.base: Optional[int] = None  # the changes after this one must all be delivered
        if self.since != "now" or (self.store is not None and self.store.seq is not None):
            self.base = seq_n(
                self.store.seq if self.store is not None and self.store.seq else self.since
            )
        self.covered = self.base if self.base is not None else 0
        self.delivered: set = set()
        self.last_on: Dict[int, int] = {}  # peer number -> last change delivered on it
        self.deliveries = 0
        self.fatal_status = 0
        self.fatal_peer: Optional[Peer] = None
        self.stopped_pass: Optional[int] = None
        self.finished = False
        self.restarts = 0

        self.selector = SimSelector(self.world)
        self.selector.max_passes = MAX_PASSES
        self.loop = Loop(clock=self.world.clock, selector=self.selector)
        url = "https://127.0.0.1:6984" if self.tls else "http://127.0.0.1:5984"
        self.server = Server(url, ssl_context=tls_context() if self.tls else None)
        self.consumer = Consumer(
            self.server.get_db("db"),
            self.loop,
            checkpoint=self.store,
            on_error=self.on_event,
            on_connect=self.on_event,
            on_disconnect=self.on_event,
            on_caught_up=self.on_event,
            rng=random.Random(seed * 7919 + 1),  # the backoff's jitter, for replays
        )
        self.consumer._connect_with = self.world.connect  # the seam: the simulated network
        self.params: Dict[str, Any] = {}
        if self.heartbeat_ms is not None:
            self.params["heartbeat"] = self.heartbeat_ms
        self._plan()
        self.description = self._describe()

    def describe(self) -> str:
        return self.description

    def _describe(self) -> str:
        return (
            "seed %d: %s, %s, heartbeat=%s, since=%r, store=%s, repeat_callback=%s, "
            "p_fault=%.2f, chaos %.1f s"
            % (
                self.seed,
                self.mode,
                "tls" if self.tls else "plain",
                self.heartbeat_ms,
                self.since,
                None
                if self.store is None
                else "fail=%.1f seq=%s" % (self.store.fail, seq_n(self.store.seq)),
                self.repeat_callback,
                self.p_fault,
                self.chaos_s,
            )
        )

    # -- the scenario ----------------------------------------------------------------------

    def _plan(self) -> None:
        rng, world = self.rng, self.world
        world.at(rng.expovariate(1 / self.write_gap), self._write)
        world.at(self.chaos_s, self._heal)
        stops = rng.choice((0, 0, 1, 1, 2, 3))
        points = ["between", "select", "callback", "save", "recv", "lifecycle"]
        for _ in range(stops):
            where = rng.choice(points)
            pause_at = rng.randint(1, 6) if rng.random() < 0.5 else None
            world.at(rng.uniform(0, self.chaos_s), self.agent.arm, where, pause_at)

    def _write(self) -> None:
        if self.phase != "chaos":
            return
        rng = self.rng
        self.world.write(1 if rng.random() < 0.8 else rng.randint(2, 20))
        self.world.at(rng.expovariate(1 / self.write_gap), self._write)

    def _heal(self) -> None:
        self.phase = "heal"
        self.heal_deadline = self.world.now() + HEAL_S + self.allowance
        self.world.note("the faults heal; %d changes written" % self.world.n)

    def fate(self, world: World, tls: bool) -> Fate:
        rng = self.rng
        fate = Fate()
        fate.immediate = rng.random() < 0.3
        fate.connect_delay = rng.uniform(0, self.benign)
        fate.hs_delay = rng.uniform(0, self.benign)
        fate.think = 0.0 if rng.random() < 0.5 else rng.uniform(0, self.benign)
        fate.split = self.split
        fate.tls_pieces = self.tls_pieces if tls else 0.0
        fate.reset_discards = rng.random() < 0.5
        if self.phase != "chaos":
            return fate
        if rng.random() >= self.p_fault:
            if rng.random() < 0.3:
                return fate
            # Healthy for a while, then dies as connections do: cut, reset, silent, or ended.
            fate.kind = rng.choice(("response_cut", "response_reset", "response_stall", "end"))
            fate.after = fate.end_after = rng.expovariate(4.0 / self.chaos_s)
            return fate
        kinds = [(k, w) for k, w, tls_only in FAULTS if tls or not tls_only]
        kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        fate.kind = kind
        if kind.startswith("request"):
            fate.request_at = rng.randint(0, 320)
        elif kind.startswith("response"):
            region = rng.random()
            head = 270  # about COUCH_HEAD's length
            if region < 0.35:
                fate.response_at = rng.randint(0, head)
            elif region < 0.7:
                fate.response_at = head + rng.randint(0, 800)
            else:
                fate.response_at = rng.randint(0, head + 8000)
        elif kind == "status":
            fate.status = (
                rng.choice(sorted(FATAL_STATUSES))
                if rng.random() < 0.15
                else rng.choice(RETRIED_STATUSES)
            )
        elif kind == "end":
            fate.end_after = rng.uniform(0, 2 * self.allowance)
        return fate

    # -- what the world reports ------------------------------------------------------------

    def violation(self, kind: str, message: str) -> None:
        """Record a broken invariant (the first few of each kind, and how many)."""
        count = self.violation_counts[kind] = self.violation_counts.get(kind, 0) + 1
        if count > 3:
            return
        text = "t=%.3f pass %d: %s" % (self.world.now() - 1000.0, self.world.passes, message)
        self.world.note("VIOLATION %s: %s" % (kind, message))
        self.violations.append((kind, text))
        if self.trace is None:
            self.trace = list(self.world.log)[-50:]  # what led to the first one

    def fatal_seen(self) -> bool:
        """Whether the consumer read a whole answer with a fatal status."""
        peer = self.fatal_peer
        return peer is not None and peer.read >= peer.sent

    def on_connection(self, peer: Peer) -> None:
        if self.fatal_seen():
            self.violation(
                "fatal",
                "connection #%d opened after the fatal status %d"
                % (peer.number, self.fatal_status),
            )
            raise Stop()

    def on_request(self, peer: Peer) -> None:
        if peer.kind == "feed":
            if peer.since == "now":
                self.violation(
                    "checkpoint",
                    "a continuous feed asked since=now (changes made "
                    "while it reconnects would be skipped)",
                )
            else:
                self.check_seq(
                    peer.since, "connection #%d resumed since=%s" % (peer.number, seq_n(peer.since))
                )

    def on_answered(self, peer: Peer) -> None:
        if peer.status in FATAL_STATUSES:
            self.fatal_status = peer.status
            self.fatal_peer = peer
            self.world.note("#%d answered fatal status %d" % (peer.number, peer.status))

    def check_seq(self, value: Any, what: str) -> None:
        """``value`` (a saved checkpoint, a resumed since) must not pass an undelivered change."""
        n = seq_n(value)
        if n is None:
            self.violation("checkpoint", "%s: not a seq the server gave" % what)
            return
        if self.base is None:  # since=now: the first seq used must be one the server answered
            if n not in self.world.now_answers:
                self.violation(
                    "checkpoint",
                    "%s: since=now resolved to a seq the server never "
                    "answered (%s)" % (what, sorted(self.world.now_answers)),
                )
            self.base = self.covered = n
            return
        if n > self.covered:
            self.violation(
                "checkpoint",
                "%s passes undelivered changes: only up to %d were "
                "all delivered" % (what, self.covered),
            )

    def on_change(self, change: Any) -> None:
        world = self.world
        n = seq_n(change.get("seq")) if isinstance(change, dict) else None
        peer = world.reading
        if n in self.drop:
            self.drop.discard(n)
            return
        self.deliveries += 1
        if n is None or peer is None:
            self.violation("order", "delivered something that is no change: %r" % (change,))
            world.point("callback")
            return
        if self.base is None:
            self.violation("checkpoint", "change %d delivered before since=now was resolved" % n)
            self.base = self.covered = n - 1
        last = self.last_on.get(peer.number)
        if last is None:
            world.note("#%d delivers from change %d" % (peer.number, n))
            if n > self.covered + 1:
                self.violation(
                    "order",
                    "connection #%d began at change %d: %d..%d skipped"
                    % (peer.number, n, self.covered + 1, n - 1),
                )
        elif n != last + 1:
            self.violation(
                "order",
                "connection #%d delivered change %d right after %d%s"
                % (
                    peer.number,
                    n,
                    last,
                    " (a duplicate on the same connection)" if n <= last else "",
                ),
            )
        self.last_on[peer.number] = n
        self.delivered.add(n)
        while self.covered + 1 in self.delivered:
            self.covered += 1
        world.point("callback")

    def on_event(self, event: Any) -> None:
        self.world.note(
            "event %s%s"
            % (
                event.kind,
                ""
                if event.error is None
                else " %r%s"
                % (event.error, " retry in %.2f" % event.retry_in if event.will_retry else ""),
            )
        )
        self.world.point("lifecycle")

    # -- the driver ------------------------------------------------------------------------

    def at_point(self, point: str) -> None:
        self.agent.at(point)
        if point != "select":
            return
        self.tick()
        if self.mode == "wait":
            self.agent.check()
            if not self.consumer.running:
                if self.stopped_pass is None:
                    self.stopped_pass = self.world.passes
                elif self.world.passes - self.stopped_pass > STOP_PASSES:
                    self.violation("stop", "the consumer stopped but wait() did not return")
                    raise Stop()

    def tick(self) -> None:
        if self.phase == "heal" and not self.agent.pending and self.consumer.running:
            done = self.covered >= self.world.n
            if done or self.world.now() > self.heal_deadline:
                self.phase = "end"
                where = self.rng.choice(["between", "select", "callback", "recv", "lifecycle"])
                self.agent.arm(
                    where, self.rng.randint(1, 8) if self.rng.random() < 0.3 else None, final=True
                )

    def start(self) -> None:
        since = self.since
        if self.restarts and self.consumer.last_seq not in (None, "now"):
            since = self.consumer.last_seq  # what a program restarting its consumer knows
        # Either the callback goes with every start (as a program's retry loop around wait()
        # does), or it was registered once before the first.
        callback = self.callback if self.repeat_callback else None
        self.world.note(
            "start(since=%r)%s"
            % (
                seq_n(since) if since != "now" else since,
                " with the callback again" if callback and self.restarts else "",
            )
        )
        if self.mode == "step":
            self.consumer.start(callback, since, **self.params)
        else:
            self.stopped_pass = None
            self.consumer.wait(callback, since, **self.params)

    def stopped(self, error: Optional[BaseException]) -> bool:
        """The consumer stopped: judge why. Returns whether to start it again."""
        error = error if error is not None else self.consumer.error
        self.agent.settle()
        if error is not None:
            self.judge_error(error)
            return False
        if self.fatal_seen():
            if not self.agent.fired:
                self.violation(
                    "fatal",
                    "the consumer read the fatal status %d and stopped "
                    "without an error" % self.fatal_status,
                )
            return False  # nothing after a fatal status is required
        self.fatal_status, self.fatal_peer = 0, None  # answered, but stopped before reading it
        if self.agent.final:
            return False
        if not self.agent.fired:
            self.violation("fatal", "the consumer stopped by itself, without an error")
            return False
        self.agent.fired = False
        self.restarts += 1
        self.skip(self.rng.uniform(0, 2.0))
        return self.phase != "end"

    def judge_error(self, error: BaseException) -> None:
        if isinstance(error, HTTPError) and error.status in FATAL_STATUSES:
            if error.status != self.fatal_status:
                self.violation(
                    "fatal",
                    "stopped with status %d, but the server answered %s"
                    % (error.status, self.fatal_status or "no fatal status"),
                )
            return
        raised = self.store.raised if self.store is not None else []
        chain: Optional[BaseException] = error
        while chain is not None:
            if any(chain is exc for exc in raised):
                return  # the checkpoint store failed: stopping on it is a choice we accept
            chain = chain.__cause__ or chain.__context__
        self.violation("fatal", "stopped on an error that is not fatal: %r" % (error,))

    def skip(self, seconds: float) -> None:
        """Let simulated time pass with the loop not running (between two runs)."""
        world = self.world
        target = world.now() + seconds
        while world.advance(target - world.now()) and world.now() < target:
            world.run_due()
        world.clock.now = max(world.clock.now, target)
        world.run_due()

    def run(self) -> None:
        handler = _LoopLog(self)
        loop_logger = logging.getLogger("changeloop.loop")
        loop_logger.addHandler(handler)
        try:
            if self.mode == "step":
                self.run_steps()
            else:
                self.run_wait()
            self.check_end()
        except Stop:
            pass
        try:
            self.check_silence()
        finally:
            loop_logger.removeHandler(handler)
            self.close()

    def run_steps(self) -> None:
        if not self.repeat_callback:
            self.consumer.register_callback(self.callback)
        self.start()
        loop, world, agent = self.loop, self.world, self.agent
        while True:
            agent.at("between")
            self.tick()
            try:
                loop.run_once(0)
            except SimHang as exc:
                self.violation("hang", str(exc))
                raise Stop() from exc
            if agent.check() or not self.consumer.running:
                if self.consumer.running or not self.stopped(None):
                    return
                self.start()
                continue
            if self.selector.idle and not world.busy():
                timeout = loop.next_timeout()
                if timeout != 0 and not world.advance(timeout):
                    self.violation(
                        "hang", "nothing can happen while the consumer runs: %r" % self.consumer
                    )
                    return

    def run_wait(self) -> None:
        if not self.repeat_callback:
            self.consumer.register_callback(self.callback)
        while True:
            error: Optional[BaseException] = None
            try:
                self.start()
            except SimHang as exc:
                self.violation("hang" if self.consumer.running else "stop", str(exc))
                return
            except (Stop, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                error = exc
            if self.consumer.running:
                self.violation("stop", "wait() returned with the consumer %r" % self.consumer)
                return
            self.agent.check()
            self.agent.requested_pass = None
            if not self.stopped(error):
                return

    def check_end(self) -> None:
        consumer = self.consumer
        if self.fatal_seen():
            if consumer.running or (consumer.error is None and not self.agent.fired):
                self.violation(
                    "fatal",
                    "the fatal status %d did not stop the consumer: %r"
                    % (self.fatal_status, consumer),
                )
        elif self.fatal_status:
            pass  # answered as the run ended, before the consumer read it
        elif consumer.error is None and self.base is None:
            self.violation("delivered", "since=now was never resolved: %r" % consumer)
        elif consumer.error is None and self.covered < self.world.n:
            missing = sorted(set(range(self.covered + 1, self.world.n + 1)) - self.delivered)
            self.violation(
                "delivered",
                "changes %s of %d were never delivered (%.0f s after the "
                "faults healed); the consumer: %r"
                % (
                    _ranges(missing),
                    self.world.n,
                    self.world.now() - (self.heal_deadline - HEAL_S - self.allowance),
                    consumer,
                ),
            )

    def check_silence(self) -> None:
        end = self.world.now()
        for peer in self.world.peers:
            # The heartbeat the feed asked for (the library's default if the seed set none).
            limit = 1e-6 + (
                self.allowance if not peer.heartbeat else 3 * peer.heartbeat + WATCHDOG_RESOLUTION_S
            )
            closed = [t for t in (peer.closed_by_client, peer.closed_by_server) if t is not None]
            until = min(closed) if closed else end
            marks = [(t, phase) for t, phase in peer.activity if t <= until]
            marks.append((until, "closed" if closed else "still open"))
            for (t0, phase), (t1, _) in zip(marks, marks[1:]):
                if t1 - t0 > limit:
                    self.violation(
                        "silence",
                        "connection #%d (%s) stayed open %.2f s silent in "
                        "its %s phase (allowed %.2f s) then %s; %r"
                        % (
                            peer.number,
                            peer.kind or "?",
                            t1 - t0,
                            phase,
                            limit,
                            marks[-1][1],
                            peer,
                        ),
                    )
                    break

    def close(self) -> None:
        self.agent.finish()
        try:
            self.consumer.close()
        finally:
            self.loop.close()
            self.world.close()


def _ranges(numbers: List[int]) -> str:
    out: List[str] = []
    for n in numbers:
        if out and out[-1].endswith("-%d" % (n - 1)) or (out and out[-1] == str(n - 1)):
            out[-1] = "%s-%d" % (out[-1].split("-")[0], n)
        else:
            out.append(str(n))
    return ",".join(out[:20]) + (" ..." if len(out) > 20 else "")


def tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # never used: only "is TLS"
    return _TLS_CONTEXT


def run_seed(seed: int, **options: Any) -> Run:
    run = Run(seed, **options)
    try:
        run.run()
    except Exception:
        run.violations.append(("crash", traceback.format_exc()))
    return run


def run_seeds(seeds: List[int]) -> Tuple[List[Run], Dict[str, int]]:
    """Run ``seeds``; return the runs that broke an invariant, and totals over all of them."""
    failed: List[Run] = []
    totals = {"connections": 0, "faults": 0, "stops": 0, "restarts": 0, "changes": 0}
    totals.update(deliveries=0, passes=0, simulated_s=0)
    package_logger = logging.getLogger("changeloop")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)  # the reconnection warnings would cost time
    try:
        for seed in seeds:
            run = run_seed(seed)
            totals["connections"] += len(run.world.peers)
            totals["faults"] += sum(p.fate.kind != "ok" for p in run.world.peers)
            totals["stops"] += sum(run.agent.counts.values())
            totals["restarts"] += run.restarts
            totals["changes"] += run.world.n
            totals["deliveries"] += run.deliveries
            totals["passes"] += run.world.passes
            totals["simulated_s"] += int(run.world.now() - 1000.0)
            if run.violations:
                failed.append(run)
    finally:
        package_logger.setLevel(level)
    return failed, totals


def report(runs: List[Run], summary: str) -> str:
    """The failing seeds by invariant, an example of each, and the first failure's events."""
    by_kind: Dict[str, List[int]] = {}
    example: Dict[str, str] = {}
    for run in runs:
        for kind, text in run.violations:
            if run.seed not in by_kind.setdefault(kind, []):
                by_kind[kind].append(run.seed)
            example.setdefault(kind, "seed %d: %s" % (run.seed, text))
    lines = [summary, "failing seeds by invariant (replay one with CHANGELOOP_SIM_SEED=<n>):"]
    for kind, seeds in sorted(by_kind.items()):
        more = " ..." if len(seeds) > 30 else ""
        lines.append("  %s: %d seeds: %s%s" % (kind, len(seeds), seeds[:30], more))
        lines.append("      e.g. %s" % example[kind][:400])
    first = runs[0]
    lines.append("first failure, CHANGELOOP_SIM_SEED=%d:" % first.seed)
    lines.append("  " + first.describe())
    lines.extend("  [%s] %s" % v for v in first.violations[:8])
    lines.append("  the world's events up to the first violation:")
    lines.extend("    " + line for line in first.trace or [])
    if first.trace and first.world.log[-1] != first.trace[-1]:
        lines.append("  ... and the last ones:")
        lines.extend("    " + line for line in list(first.world.log)[-12:])
    return "\n".join(lines)


def _seeds() -> List[int]:
    if ONE_SEED is not None:
        return [int(ONE_SEED)]
    return list(range(SEEDS))


@pytest.mark.timeout(max(60, int(len(_seeds()) * 0.2)))
def test_simulation(capsys: pytest.CaptureFixture) -> None:
    seeds = _seeds()
    started = time.perf_counter()
    failed, totals = run_seeds(seeds)
    summary = (
        "simulation: %d seeds in %.1f s, %d failed (%d connections, %d with a fault, %d stops "
        "from other threads, %d restarts, %d changes written, %d deliveries, %d loop passes, "
        "%d simulated s)\ninvariants checked per seed: %s"
        % (
            len(seeds),
            time.perf_counter() - started,
            len(failed),
            totals["connections"],
            totals["faults"],
            totals["stops"],
            totals["restarts"],
            totals["changes"],
            totals["deliveries"],
            totals["passes"],
            totals["simulated_s"],
            "; ".join("%s: %s" % item for item in INVARIANTS.items()),
        )
    )
    with capsys.disabled():  # shown whatever the options: the seed count and what was checked
        print("\n" + summary)
    if failed:
        pytest.fail(report(failed, summary), pytrace=False)


# -- the harness itself: replays are exact, and each check can fail --------------------------


def _kinds(run: Run) -> List[str]:
    return sorted({kind for kind, _ in run.violations})


def _fingerprint(run: Run) -> Tuple[Any, ...]:
    return (list(run.world.log), run.violations, run.world.passes, run.world.now(), run.covered)


def test_a_seed_replays_exactly() -> None:
    seeds = list(range(24))
    first = [run_seed(seed) for seed in seeds]
    # What must replay: plain and TLS, both drivers, stops paused half-way in another thread.
    assert {run.tls for run in first} == {False, True}
    assert {run.mode for run in first} == {"step", "wait"}
    assert any(label.endswith("/paused") for run in first for label in run.agent.counts)
    for seed, run in zip(seeds, first):
        assert _fingerprint(run) == _fingerprint(run_seed(seed)), "seed %d differs" % seed


def test_the_checks_see_a_change_the_callback_never_got() -> None:
    run = run_seed(3, drop=(7,))
    assert run.deliveries > 20
    assert "order" in _kinds(run), run.violations  # change 8 came right after 6


def test_the_checks_see_a_stop_that_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Consumer, "stop", lambda self: None)
    run = run_seed(3)
    assert "stop" in _kinds(run), run.violations


def test_the_checks_see_a_connection_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that forgets its connections: the server sees them open and silent.
    def close_quietly(self: SimConnection) -> None:
        sock, self.sock = self.sock, None
        self.state = "closed"
        if sock is not None:
            self.world.live.pop(sock.fileno(), None)
            sock.close()

    monkeypatch.setattr(SimConnection, "close", close_quietly)
    run = run_seed(3)
    assert "silence" in _kinds(run), run.violations
