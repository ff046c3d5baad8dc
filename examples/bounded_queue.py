"""Backpressure: changes go to a bounded queue that a slower worker thread drains.

The loop's thread must never block, so its callback does not wait for room in the queue: it
pauses the feed once the queue is full, and the worker resumes it once the queue has room again.
While paused, the consumer reads nothing and TCP's flow control holds the server back, so memory
stays flat however far behind the worker is; nothing is lost, as resume() goes on where it
stopped. A feed that stops for good (a 404, say) puts ``None`` on the queue, so the worker does
not wait for changes that will never come.

    python examples/bounded_queue.py http://127.0.0.1:5984/mydb [COUNT]
"""

import queue
import sys
import threading
import time
from typing import Optional

from _example import database_from_argv

from changeloop import Consumer, FeedEvent, Loop

QUEUE_SIZE = 2  # small, so that even a short feed is paused and resumed

server, db, count = database_from_argv()
changes: "queue.Queue[Optional[dict]]" = queue.Queue()  # bounded by the pausing


def on_error(event: FeedEvent) -> None:
    if not event.will_retry:  # stopped for good
        changes.put(None)


loop = Loop()
consumer = Consumer(db, loop, on_error=on_error)


def hand_over(change: dict) -> None:
    """On the loop's thread: never blocks; pauses the feed when the queue is full."""
    changes.put(change)
    if changes.qsize() >= QUEUE_SIZE:
        consumer.pause()


def work() -> None:
    """The worker: slower than the feed; resumes it whenever there is room again."""
    for _ in range(count):
        change = changes.get(timeout=30)
        if change is None:
            return
        time.sleep(0.05)  # the slow part: a write elsewhere, say
        print("change", change["seq"], change["id"], flush=True)
        if changes.qsize() < QUEUE_SIZE and consumer.paused:
            consumer.resume()  # thread-safe


thread = loop.run_in_thread()
consumer.start(hand_over, since=0, limit=count)  # thread-safe
worker = threading.Thread(target=work)
worker.start()
worker.join(60)
consumer.stop()  # thread-safe
loop.stop()
thread.join(10)
loop.close()
server.close()
if consumer.error is not None:
    sys.exit("error: %s" % consumer.error)
sys.exit(1 if worker.is_alive() else 0)
