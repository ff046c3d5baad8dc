"""A scripted CouchDB 3 whose continuous feed follows a history that grows while it is followed.

couch3.py's scripts replay fixed bytes; a chaos run needs a server that answers every
reconnection from its ``since``, as CouchDB does. :class:`History` is a database's history:
changes numbered 1, 2, ... as couch3.py writes them (opaque ``"N-g1AAAA..."`` seqs), appended by
a writer thread. :class:`FollowHistory` is a :class:`~scripted.ScriptedServer` step that plays
CouchDB 3.5's continuous feed from it, byte for byte as ``COUCHDB-WIRE.md`` describes: the head
and a newline chunk at once, then on each wake-up a newline chunk and the new rows, up to seven
a chunk, and a newline chunk after every ``heartbeat`` of silence. Like CouchDB 2+, a resume
may replay rows from before ``since`` (``replay`` of them): at-least-once begins at the server::

    history = History()
    with ScriptedServer([[Read(), FollowHistory(history, replay=2)]]) as srv:
        history.append(3)  # every connection, to any database path, follows the same history
"""

import json
import threading
import urllib.parse
from typing import List, Set

from chaosrun import Key, change_key
from couch3 import COUCH_HEAD, HEARTBEAT, row
from scripted import Step, chunk
from scripted import _Connection as Connection

__all__ = ["FollowHistory", "History"]

#: CouchDB 3.5 packs up to about 1490 bytes of rows in a chunk: seven of couch3.py's rows.
ROWS_PER_CHUNK = 7
#: CouchDB's own default when a request asks for no heartbeat (its ``timeout``, 60 s, ms).
NO_HEARTBEAT_MS = 60000


class History:
    """Changes 1..count of a database; thread-safe."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def append(self, changes: int = 1) -> None:
        with self._changed:
            self._count += changes
            self._changed.notify_all()

    def wait_beyond(self, known: int, timeout: float) -> int:
        """The count, once it is beyond ``known`` or ``timeout`` seconds passed."""
        with self._changed:
            self._changed.wait_for(lambda: self._count > known, timeout)
            return self._count

    def keys(self) -> Set[Key]:
        """Every change as a consumer would deliver it: (seq, id, rev)."""
        return {change_key(json.loads(row(n))) for n in range(1, self.count + 1)}


class FollowHistory(Step):
    """Play the continuous feed the last ``Read()`` asked for, until the client goes away."""

    ends_script = True

    def __init__(self, history: History, replay: int = 0) -> None:
        self.history = history
        self.replay = replay

    def __repr__(self) -> str:
        return f"FollowHistory(replay={self.replay})"

    def play(self, conn: Connection) -> None:
        [request] = [r for r in conn.server.requests if r.connection == conn.index]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)
        heartbeat = int(query.get("heartbeat", [str(NO_HEARTBEAT_MS)])[0]) / 1000.0
        since = query.get("since", ["0"])[0]
        sent = max(0, int(since.split("-", 1)[0]) - self.replay)
        try:
            conn.send(COUCH_HEAD + HEARTBEAT)
            while not conn.stopping():
                count = self.history.wait_beyond(sent, heartbeat)
                if count == sent:
                    conn.send(HEARTBEAT)
                    continue
                pieces: List[bytes] = [HEARTBEAT]  # CouchDB's newline before each batch
                for first in range(sent + 1, count + 1, ROWS_PER_CHUNK):
                    last = min(first + ROWS_PER_CHUNK, count + 1)
                    pieces.append(chunk(b"".join(row(n) for n in range(first, last))))
                conn.send(b"".join(pieces))
                sent = count
        except OSError:
            return  # the client (or the proxy in between) went away: this feed is over
