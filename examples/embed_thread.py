"""Tier 3: the loop runs in a background thread; changes are handed to the main thread.

Callbacks run on the loop's thread, so they only put changes on a queue; the main thread takes
them from there. Work for the loop (start, stop) goes through ``call_soon_threadsafe`` or the
thread-safe ``Consumer.start``/``stop``. A feed that stops for good (a 404, say) puts ``None``
on the queue from its ``on_error``, so the main thread does not wait for changes that will
never come.

    python examples/embed_thread.py http://127.0.0.1:5984/mydb [COUNT]
"""

import queue
import sys
from typing import Optional

from _example import database_from_argv

from changeloop import Consumer, FeedEvent, Loop

server, db, count = database_from_argv()
changes: "queue.Queue[Optional[dict]]" = queue.Queue()


def on_error(event: FeedEvent) -> None:
    if not event.will_retry:  # stopped for good: a 404, a 401, a callback that raised...
        changes.put(None)


loop = Loop()
thread = loop.run_in_thread()
consumer = Consumer(db, loop, on_error=on_error)
consumer.start(changes.put, since=0)  # thread-safe
try:
    for _ in range(count):
        change = changes.get(timeout=30)  # the main thread's own pace
        if change is None:
            break
        print("change", change["seq"], change["id"], flush=True)
finally:
    consumer.stop()  # thread-safe: takes effect on the loop's thread
    loop.stop()
    thread.join(10)
    loop.close()
    server.close()
if consumer.error is not None:
    sys.exit("error: %s" % consumer.error)
sys.exit(0)
