"""Tier 1: a legacy program's own ``while`` loop calls ``loop.run_once()`` each turn.

``loop.has_work()`` turns false once every consumer has stopped (a 404, say): the program then
stops turning the loop and looks at the error.

    python examples/embed_while_loop.py http://127.0.0.1:5984/mydb [COUNT]
"""

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
        loop.run_once(0.1)  # at most 0.1 s here, then back to the program's own work
        # ... the legacy program's own work goes here ...
    consumer.stop()
server.close()
if consumer.error is not None:  # stopped for good: a 404, a 401, a callback that raised...
    sys.exit("error: %s" % consumer.error)
sys.exit(0 if len(seen) >= count else 1)
