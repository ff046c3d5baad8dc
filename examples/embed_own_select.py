"""Tier 2: a program with its own ``select()`` waits on the loop's one file descriptor.

``loop.fileno()`` becomes readable whenever any feed has data (or another thread wakes the loop);
``loop.next_timeout()`` says how long the program may sleep before the loop's next timer, and
``loop.has_work()`` whether anything is left: once every consumer has stopped (a 404, say),
nothing would ever wake the ``select()``, so the program stops waiting and looks at the error.

    python examples/embed_own_select.py http://127.0.0.1:5984/mydb [COUNT]
"""

import select
import sys
import time

from _example import database_from_argv

from changeloop import Consumer, Loop
from changeloop.consumer import Change

server, db, count = database_from_argv()
seen = []


def on_change(change: Change) -> None:
    seen.append(change["id"])
    print("change", change["seq"], change["id"], flush=True)


with Loop() as loop:
    consumer = Consumer(db, loop)
    consumer.start(on_change, since=0)
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline and loop.has_work():
        timeout = loop.next_timeout()
        own_sockets: list = []  # the program's own file descriptors would go here
        readable, _, _ = select.select([loop.fileno()] + own_sockets, [], [], timeout)
        loop.run_once(0)  # never blocks: select() already waited
    consumer.stop()
server.close()
if consumer.error is not None:  # stopped for good: a 404, a 401, a callback that raised...
    sys.exit("error: %s" % consumer.error)
sys.exit(0 if len(seen) >= count else 1)
