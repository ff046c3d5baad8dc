"""Tier 3: the loop runs in a background thread; changes are handed to the main thread.

Callbacks run on the loop's thread, so they only put changes on a queue; the main thread takes
them from there. Work for the loop (start, stop) goes through ``call_soon_threadsafe`` or the
thread-safe ``Consumer.start``/``stop``.

    python examples/embed_thread.py http://127.0.0.1:5984/mydb [COUNT]
"""

import queue
import sys

from _example import database_from_argv

from changeloop import Consumer, Loop

server, db, count = database_from_argv()
changes: "queue.Queue[dict]" = queue.Queue()

loop = Loop()
thread = loop.run_in_thread()
consumer = Consumer(db, loop)
consumer.start(changes.put, since=0)  # thread-safe
try:
    for _ in range(count):
        change = changes.get(timeout=30)  # the main thread's own pace
        print("change", change["seq"], change["id"], flush=True)
finally:
    consumer.stop()  # thread-safe: takes effect on the loop's thread
    loop.stop()
    thread.join(10)
    loop.close()
    server.close()
sys.exit(0)
