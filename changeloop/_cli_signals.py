"""The command's signals: SIGINT and SIGTERM ask for a clean stop, and never cut a save short.

:class:`SignalHandling` is the signal half of ``__main__``'s ``Command`` (which builds the state
declared here). The rule: the first SIGINT or SIGTERM while following asks the loop to stop (the
stop saves every checkpoint); before following, a signal interrupts (``KeyboardInterrupt``),
except inside a :meth:`~SignalHandling.signals_deferred` block (a checkpoint's save, a stop),
where it is noted and raised when the block ends; once a stop is asked for or done, a signal only
makes the exit code 130. SIGUSR1 asks for the statistics line. :func:`signals_to` installs the
handlers for a run and puts the old ones back.
"""

import contextlib
import signal
import threading
from typing import Any, Callable, Dict, Iterator

from .loop import Loop

__all__ = ["SignalHandling", "signals_to"]


class SignalHandling:
    """What a signal does, and the blocks it must not interrupt: the part of ``Command`` that
    handles SIGINT, SIGTERM and SIGUSR1."""

    loop: Loop
    following: bool  # the loop runs the feeds
    stop_asked: bool  # a signal asked the loop to stop
    stopped: bool  # stop() ran
    deferring: int  # depth of signals_deferred() blocks being run
    interrupted: bool  # a signal was held back (see on_signal): exit 130
    stop: Callable[[], None]
    print_stats: Callable[[], None]

    @contextlib.contextmanager
    def signals_deferred(self) -> Iterator[None]:
        """Hold back the ``KeyboardInterrupt`` of a signal until the block is done.

        Checkpoints are saved inside such blocks (each save, and every stop as a whole): a
        second signal (a double Ctrl-C, ``timeout -s TERM`` signalling the process group) used
        to interrupt the stop's write and leave no checkpoint. The signal is noted, and raised
        as soon as the outermost block ends normally, unless a stop is asked for or done: the
        stop then runs to its end and the exit code says 130 (see :meth:`on_signal`).

        Why a flag and not ``signal.pthread_sigmask``: a mask holds the signal back only in the
        thread that sets it, and a signal the kernel gives to another thread (a resolver's)
        still runs the Python handler in the main thread. The flag works on any platform, and
        the interrupted system calls (write, fsync, flock) are retried by Python (PEP 475) when
        the handler returns.
        """
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.interrupted and not (self.stop_asked or self.stopped):
            self.interrupted = False
            raise KeyboardInterrupt  # a one-shot run: its save is done, the rest is not

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT, SIGTERM: the first one while following asks for a clean stop (in the loop's
        next pass); one that comes once a stop is asked for or done never interrupts anything:
        it makes the exit code 130, and the stop goes on until every checkpoint is saved.
        Before following (set-up, a one-shot request) a signal interrupts at once, but never a
        checkpoint's save (see :meth:`signals_deferred`)."""
        if self.following and not self.stop_asked:
            self.stop_asked = True  # and no logging: the signal may have come inside a log call
            self.loop.call_soon_threadsafe(self.stop)
            return
        if self.deferring or self.stop_asked or self.stopped:
            # Raising now could cut a change short between its line and its count (so the
            # checkpoint would lag behind stdout), a save, or a __del__ (which would print
            # "Exception ignored"): noted, and raised only where a deferred block ends.
            self.interrupted = True
            return
        raise KeyboardInterrupt  # set-up, a one-shot request

    def on_stats_signal(self, signum: int, frame: Any) -> None:
        """SIGUSR1: print the statistics in the loop's next pass (never inside the handler,
        which may have interrupted a write to stderr); ignored when not following."""
        if self.following and not self.stopped:
            self.loop.call_soon_threadsafe(self.print_stats)


@contextlib.contextmanager
def signals_to(command: SignalHandling) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``command.on_signal``, SIGUSR1 (where there is one) to
    ``command.on_stats_signal`` (from the main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers: Dict[int, Callable[[int, Any], None]] = {
        signal.SIGINT: command.on_signal,
        signal.SIGTERM: command.on_signal,
    }
    usr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
    if usr1 is not None:
        handlers[usr1] = command.on_stats_signal
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, ours in handlers.items():
        signal.signal(sig, ours)
    try:
        yield
    finally:
        for sig, theirs in previous.items():
            signal.signal(sig, theirs)
