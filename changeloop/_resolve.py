"""Name resolution off the loop: a few worker threads, one lookup per name at a time, a short cache.

``getaddrinfo`` blocks, and the stdlib has no non-blocking resolver. On the loop's thread one slow
or dead DNS server would stall every feed of the loop, and 10,000 feeds reconnecting after a
server restart would resolve the same name 10,000 times. So, as asyncio does, names are resolved
by worker threads, whose answers come back through the loop's one thread-safe door
(:meth:`~changeloop.loop.Loop.call_soon_threadsafe`). Address literals need no lookup; answers
are cached for :data:`RESOLVE_CACHE_S` per (host, port), and lookups of a name already under way
wait for that one instead of starting another.
"""

import ipaddress
import logging
import queue
import socket
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ._sockets import resolve
from .errors import ConnectError
from .loop import Loop

__all__ = ["Resolver", "resolver_of", "is_literal", "RESOLVER_THREADS", "RESOLVE_CACHE_S"]

logger = logging.getLogger(__name__)

#: Worker threads per loop. Lookups of distinct names are rare (one per server a loop follows),
#: so a few threads keep one dead name from delaying the others without a thread per feed.
RESOLVER_THREADS = 4
#: How long an answer is reused, in seconds: long enough that a mass reconnection resolves once,
#: short enough that a moved server (DNS failover) is found within half a minute.
RESOLVE_CACHE_S = 30.0

AddrInfo = Tuple[Any, ...]
Result = Union[List[AddrInfo], BaseException]
Callback = Callable[[Result], None]
Key = Tuple[str, int]


def is_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address literal (no lookup needed)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") aside
    except ValueError:
        return False
    return True


class Resolver:
    """Resolve names for the consumers of one loop, off its thread.

    Args:
        loop: the loop whose thread receives the answers, and whose clock ages the cache.
        getaddrinfo: the lookup (``socket.getaddrinfo``; tests put a slow one here).
        threads: the most worker threads.
        cache_s: how long an answer is reused.
    """

    def __init__(
        self,
        loop: Loop,
        getaddrinfo: Callable[..., Any] = socket.getaddrinfo,
        *,
        threads: int = RESOLVER_THREADS,
        cache_s: float = RESOLVE_CACHE_S,
    ) -> None:
        self._loop = weakref.ref(loop)  # the loop keeps its resolver, not the other way round
        self._time = loop.time
        self._getaddrinfo = getaddrinfo
        self._max_threads = threads
        self._cache_s = cache_s
        self._cache: Dict[Key, Tuple[float, List[AddrInfo]]] = {}
        self._waiting: Dict[Key, List[Callback]] = {}  # lookups under way, and who waits
        # Names to look up, None to end a worker: typed by the comment, since the subscript
        # SimpleQueue[...] is Python 3.9+ and this package runs on 3.8.
        self._queue = queue.SimpleQueue()  # type: queue.SimpleQueue[Optional[Key]]
        self._threads: List[threading.Thread] = []
        self._idle = 0  # workers waiting for a name (only changed under _lock)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "<Resolver cached=%d under_way=%d threads=%d>" % (
            len(self._cache),
            len(self._waiting),
            len(self._threads),
        )

    def lookup(self, host: str, port: int, callback: Callback) -> Optional[List[AddrInfo]]:
        """Return ``host``'s addresses now if they are cached; otherwise return ``None`` and
        call ``callback(addresses or error)`` on the loop's thread once they are known.
        Loop thread only.

        The error is a :class:`~changeloop.errors.ConnectError` (with ``socket.gaierror``
        chained) or :class:`~changeloop.errors.NameResolutionError` for a name that does not
        exist.
        """
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None:
            if self._time() - cached[0] < self._cache_s:
                return cached[1]
            del self._cache[key]
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(callback)  # a lookup of this name is under way: wait for it
            return None
        self._waiting[key] = [callback]
        with self._lock:
            if not self._idle and len(self._threads) < self._max_threads:
                thread = threading.Thread(
                    target=self._work, name="changeloop-resolver", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put(key)
        return None

    def close(self) -> None:
        """Let the workers end once their lookup (if any) returns; forget the cache."""
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []
        self._cache.clear()

    # -- the workers' side -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            key = self._queue.get()
            with self._lock:
                self._idle -= 1
            if key is None:
                return
            result = self._resolve(*key)
            loop = self._loop()
            if loop is None:
                return
            try:
                loop.call_soon_threadsafe(self._answer, key, result)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                return

    def _resolve(self, host: str, port: int) -> Result:
        try:
            return resolve(host, port, self._getaddrinfo)
        except ConnectError as exc:  # handed to the loop's thread, which raises it there
            return exc

    def _answer(self, key: Key, result: Result) -> None:
        """On the loop's thread: cache the addresses, and hand the result to everyone waiting."""
        if not isinstance(result, BaseException):
            self._cache[key] = (self._time(), result)
        for callback in self._waiting.pop(key, ()):
            callback(result)


#: One resolver per loop, kept as long as the loop lives.
_RESOLVERS: "weakref.WeakKeyDictionary[Loop, Resolver]" = weakref.WeakKeyDictionary()


def resolver_of(loop: Loop) -> Resolver:
    """The resolver of ``loop``'s consumers (made on first use)."""
    resolver = _RESOLVERS.get(loop)
    if resolver is None:
        resolver = _RESOLVERS[loop] = Resolver(loop)
    return resolver
