"""What the command writes: the changes on stdout, and its progress, log and statistics on stderr.

:class:`Output` is the writing half of ``__main__``'s ``Command`` (which builds the state declared
here): each change, or with ``--batch`` each array, is one JSON line, flushed before the
consumer's callback returns, as only then may its seq be checkpointed; and the timers that watch
the output: the progress line's redraw, the closed-stdout check (a quiet feed writes nothing that
could fail on a closed pipe), the ``--stats-every`` line. Beside it: the terminal's progress line
(:class:`Progress`), the command's one-line-per-record log (:class:`StderrHandler`), and the test
for a pipe whose reader went away (:func:`stdout_closed`).
"""

import argparse
import contextlib
import json
import logging
import os
import select
import stat
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .consumer import Consumer
from .loop import Loop
from .watcher import DatabaseWatcher

__all__ = [
    "PROGRESS_EVERY_S",
    "STDOUT_CHECK_EVERY_S",
    "Output",
    "Progress",
    "StderrHandler",
    "logging_to_stderr",
    "quiet_stdout",
    "stdout_closed",
]

LOG = logging.getLogger("changeloop.cli")  # the command's logger, as in __main__

#: Seconds between redraws of the terminal's progress line: often enough to look alive.
PROGRESS_EVERY_S = 0.25
#: Seconds between checks that stdout (a pipe) still has a reader, when nothing is written: a
#: `| head -1` on a quiet feed ends within this, at the cost of one poll() call.
STDOUT_CHECK_EVERY_S = 0.5


class Progress:
    """The catching-up line on a terminal's stderr: changes so far, those still pending (when
    the servers report ``pending``) and the rate, redrawn every :data:`PROGRESS_EVERY_S` (by
    :meth:`tick`, on a timer) until every feed has caught up; then one "caught up" line.

    A feed has caught up when it says so (``on_caught_up``: its first heartbeat), or at once
    when it has delivered the ``pending`` changes its server counted at the start (CouchDB 2+).

    Args:
        consumers: the feeds to wait for.
        pending: how many changes each consumer's server said were pending when the feeds
            started (by ``id`` of the consumer), or ``None`` when one of them does not say
            (pouchdb-server, CouchDB 1.x).
    """

    def __init__(self, consumers: List[Consumer], pending: Optional[Dict[int, int]] = None) -> None:
        self.consumers = {id(consumer): consumer for consumer in consumers}
        self.waiting = set(self.consumers)
        self.pending = pending
        self.rows = 0
        self.started = time.monotonic()
        self.shown = False
        self.done = False

    def count(self, rows: int = 1) -> None:
        self.rows += rows

    def tick(self) -> bool:
        """Redraw, or say caught up; return whether to go on ticking."""
        if self.pending is not None:
            for key in list(self.waiting):
                if self.consumers[key].delivered >= self.pending.get(key, 0):
                    self.waiting.discard(key)
        if not self.waiting:
            self.finish()
            return False
        self.draw(time.monotonic())
        return True

    def line(self, now: float) -> str:
        """The progress line's text."""
        text = "catching up: %d changes" % self.rows
        if self.pending is not None:  # changes made meanwhile come on top: never below 0
            text += ", %d pending" % max(0, sum(self.pending.values()) - self.rows)
        return text + ", %.0f/s" % (self.rows / max(now - self.started, 1e-9))

    def draw(self, now: float) -> None:
        # \r: back to the line's start; ESC [K: erase what a longer line left there
        sys.stderr.write("\r%s\x1b[K" % self.line(now))
        sys.stderr.flush()
        self.shown = True

    def caught_up(self, consumer: Consumer) -> None:
        self.waiting.discard(id(consumer))
        if not self.waiting:
            self.finish()

    def finish(self) -> None:
        """Every feed has caught up: say so, once."""
        if self.done:
            return
        self.done = True
        self.waiting.clear()
        elapsed = time.monotonic() - self.started
        sys.stderr.write("\rcaught up: %d changes in %.1f s\x1b[K\n" % (self.rows, elapsed))
        sys.stderr.flush()
        self.shown = False

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (``| head -1`` is done)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not hasattr(select, "poll"):
            return False  # a file or a terminal has no reader to lose; Windows has no poll()
        poller = select.poll()
        poller.register(fd, 0)  # no events asked for: errors and hang-ups are always reported
        # Two tests, not one mask: vermin reads `a | b` of two attributes as a 3.10 union type.
        return any(event & select.POLLERR or event & select.POLLHUP for _, event in poller.poll(0))
    except (OSError, ValueError):  # no descriptor (a test's capture): nothing to watch
        return False


class StderrHandler(logging.Handler):
    """One line per record, ``changeloop: [warning: |error: ]message``; erases the progress."""

    PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

    def __init__(self) -> None:
        super().__init__()
        self.progress: Optional[Progress] = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.progress is not None:
                self.progress.clear()
            prefix = self.PREFIXES.get(record.levelno, "")
            sys.stderr.write("changeloop: %s%s\n" % (prefix, record.getMessage()))
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def quiet_stdout() -> None:
    """Point stdout at the null device, so the exit's last flush cannot fail on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def logging_to_stderr(verbosity: int) -> Iterator[StderrHandler]:
    """The CLI's log to stderr (and the library's, with ``-v``), for the ``with`` block."""
    handler = StderrHandler()
    package = logging.getLogger("changeloop")  # the library's loggers are its children
    saved = (package.level, package.propagate, LOG.level)
    package.addHandler(handler)
    package.propagate = False
    LOG.setLevel(logging.WARNING - 10 * max(-1, min(verbosity, 2)))  # -q: ERROR ... -vv: DEBUG
    # The library's log says what the callbacks say, less readably: only with -v (-vv: all).
    muted = logging.CRITICAL + 1
    package.setLevel({1: logging.WARNING, 2: logging.DEBUG}.get(min(verbosity, 2), muted))
    try:
        yield handler
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]
        LOG.setLevel(saved[2])


class Output:
    """Printing the changes, and the output's timers: the part of ``Command`` that writes."""

    args: argparse.Namespace
    loop: Loop
    consumers: List[Consumer]
    watcher: Optional[DatabaseWatcher]
    progress: Optional[Progress]
    tagged: bool  # several databases: each line names its database
    printed: int
    cut: Optional[Tuple[Consumer, Any]]
    stopped: bool
    stop: Callable[[], None]

    def emit(self, name: str, change: Dict[str, Any]) -> None:
        """Print a change: the consumers' callback."""
        if self.tagged:
            change = {"db": name, **change}
        self.write(json.dumps(change), 1)

    def emit_batch(
        self, name: str, batch: List[Dict[str, Any]], consumer: Optional[Consumer] = None
    ) -> None:
        """Print a batch as one JSON array: the consumers' callback with ``--batch``.

        ``consumer`` is the batch's own (the watcher's consumers are found by name).
        """
        cut = None
        if self.args.limit is not None and self.printed + len(batch) > self.args.limit:
            # The consumer counts the whole batch as delivered: remember where the printed part
            # ends, so the checkpoint says that (see run) and the rest comes next time.
            batch = batch[: self.args.limit - self.printed]
            if consumer is None:
                assert self.watcher is not None
                consumer = self.watcher.consumers[name]
            seqs = [change["seq"] for change in batch if change.get("seq") is not None]
            cut = (consumer, seqs[-1] if seqs else consumer.last_seq)
        if self.tagged:
            batch = [{"db": name, **change} for change in batch]
        self.write(json.dumps(batch), len(batch))
        if cut is not None:  # only once printed: a failed write must not move the checkpoint
            self.cut = cut

    def write(self, line: str, changes: int) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()  # before the callback returns, as only then may its seq be saved
        self.printed += changes
        if self.progress is not None:
            self.progress.count(changes)
        if self.args.limit is not None and self.printed >= self.args.limit:
            self.stop()

    def feeding(self) -> bool:
        """Whether a feed still runs (the watcher runs until stopped)."""
        if self.watcher is not None:
            return not self.stopped
        return any(consumer.running for consumer in self.consumers)

    def redraw(self) -> None:
        """The progress line's timer: redraw until every feed has caught up."""
        if self.progress is not None and self.feeding() and self.progress.tick():
            self.loop.call_later(PROGRESS_EVERY_S, self.redraw)

    def check_stdout(self) -> None:
        """The closed-pipe timer: a quiet feed writes nothing that could fail, so look."""
        if not self.feeding():
            return  # a timer of its own must not keep the loop running when the feeds are done
        if stdout_closed():
            quiet_stdout()  # the reader went away (`| head`): a clean stop
            self.stop()
            return
        self.loop.call_later(STDOUT_CHECK_EVERY_S, self.check_stdout)

    def stats_tick(self) -> None:
        """The ``--stats-every`` timer: print the statistics while a feed runs."""
        if self.feeding():  # like check_stdout: it must not keep the loop running on its own
            self.print_stats()
            self.loop.call_later(self.args.stats_every, self.stats_tick)

    def stats(self) -> Dict[str, Any]:
        """The loop's and every feed's statistics (the library's plain dicts), by database."""
        if self.watcher is not None:
            consumers = list(self.watcher.consumers.values())
        else:
            consumers = self.consumers
        feeds = {consumer.db.name: consumer.stats() for consumer in consumers}
        return {"loop": self.loop.stats(), "feeds": feeds}

    def print_stats(self) -> None:
        """One JSON line on stderr (the loop's thread: SIGUSR1 only asks for it)."""
        if self.progress is not None:
            self.progress.clear()
        sys.stderr.write(json.dumps(self.stats(), sort_keys=True, default=str) + "\n")
        sys.stderr.flush()
