"""What the loop holds and calls: the handler protocol, callback and timer handles, the waker.

The loop (:mod:`changeloop.loop`) keeps these in its selector, its ready queue and its timer heap;
they are here so that loop.py is the loop itself. They log under the loop's logger: a callback
that raised is reported as the loop's, wherever this code lives.
"""

import logging
import socket
from typing import Any, Callable, Protocol, Tuple, Union

__all__ = ["Handler", "Handle", "TimerHandle", "FileLike"]

# The loop's logger (changeloop.loop, or the vendored package's own), not this module's.
logger = logging.getLogger(__name__.rpartition(".")[0] + ".loop")

# Bytes per recv() when draining the wake-up socket; any size works, the drain loops until empty.
WAKEUP_READ_BYTES = 4096


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileLike = Union[int, _HasFileno]


class Handler(Protocol):
    """What the loop calls when a registered file object is ready. Subclassing is optional."""

    def handle_read(self) -> None:
        """The file object is readable (or at EOF, or has an error pending)."""

    def handle_write(self) -> None:
        """The file object is writable."""

    def handle_error(self, exc: BaseException) -> None:
        """``handle_read`` or ``handle_write`` raised ``exc``: close or remove yourself here.

        If this returns, the handler stays registered; if it raises, the loop logs that and
        removes the handler.
        """


def _dropped_by_close(*args: object) -> None:
    """What a handle of a closed loop calls instead of its callback: nothing."""


class _TimerOwner(Protocol):
    """The loop, as a timer sees it: told when a timer still in its heap is cancelled."""

    def _timer_cancelled(self) -> None: ...


class Handle:
    """A callback queued by :meth:`Loop.call_soon` or :meth:`Loop.call_soon_threadsafe`."""

    __slots__ = ("_fn", "_args", "_cancelled")

    def __init__(self, fn: Callable[..., object], args: Tuple[Any, ...]) -> None:
        self._fn = fn
        self._args = args
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Keep the callback from running if it has not run yet. Idempotent; not thread-safe."""
        self._cancelled = True
        self._args = ()  # see TimerHandle.cancel

    def _drop(self) -> None:
        # Its loop closed: cancelled, and holding neither the callback nor its arguments.
        self._cancelled = True
        self._fn = _dropped_by_close
        self._args = ()

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except Exception:
            logger.exception("callback %r raised", self)

    def __repr__(self) -> str:
        name = getattr(self._fn, "__qualname__", None) or repr(self._fn)
        return "<%s %s%s>" % (type(self).__name__, name, self._state())

    def _state(self) -> str:
        return " cancelled" if self._cancelled else ""


class TimerHandle(Handle):
    """A callback scheduled by :meth:`Loop.call_later` or :meth:`Loop.call_at`."""

    __slots__ = ("_when", "_loop", "_in_heap")

    def __init__(
        self, when: float, fn: Callable[..., object], args: Tuple[Any, ...], loop: _TimerOwner
    ) -> None:
        super().__init__(fn, args)
        self._when = when
        self._loop = loop
        self._in_heap = True

    @property
    def when(self) -> float:
        """The deadline, on the loop's clock (see :meth:`Loop.time`)."""
        return self._when

    def cancel(self) -> None:
        """Keep the timer from firing if it has not fired yet. Idempotent; not thread-safe."""
        if not self._cancelled:
            self._cancelled = True
            # A cancelled timer stays in the heap until it comes due or the heap is rebuilt
            # (lazy cancellation), up to connect_timeout later: let go of its arguments now,
            # or a consumer's cancelled connect timer keeps a whole closed FeedStream alive.
            self._args = ()
            if self._in_heap:
                self._loop._timer_cancelled()

    def _drop(self) -> None:
        super()._drop()
        self._in_heap = False  # the closed loop's heap is gone: a cancel() has nothing to tell

    def _state(self) -> str:
        return " when=%.3f%s" % (self._when, super()._state())


class _Waker:
    """The read end of the wake-up socketpair, served like any other handler."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def handle_read(self) -> None:
        try:  # drain it all: many wake-ups may have been written since the last pass
            while self._sock.recv(WAKEUP_READ_BYTES):
                pass
        except BlockingIOError:
            pass

    def handle_write(self) -> None:
        pass

    def handle_error(self, exc: BaseException) -> None:
        logger.error("wake-up socket failed: %r", exc)
