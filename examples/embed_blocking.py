"""Tier 4: block on changeloop: ``Consumer.wait()`` runs the loop until the consumer stops.

python examples/embed_blocking.py http://127.0.0.1:5984/mydb [COUNT]
"""

import sys

from _example import database_from_argv

from changeloop import Consumer
from changeloop.consumer import Change

server, db, count = database_from_argv()
consumer = Consumer(db)


def on_change(change: Change) -> None:
    print("change", change["seq"], change["id"], flush=True)


consumer.wait(on_change, since=0, limit=count)  # also ends on stop() or Ctrl-C
consumer.close()
server.close()
sys.exit(0)
