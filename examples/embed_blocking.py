"""Tier 4: block on changeloop: ``Consumer.wait()`` runs the loop until the consumer stops.

``wait()`` raises the error that stopped the consumer for good (a 404, a 401...), and
``KeyboardInterrupt`` after Ctrl-C once the checkpoint is saved.

python examples/embed_blocking.py http://127.0.0.1:5984/mydb [COUNT]
"""

import sys

from _example import database_from_argv

from changeloop import ChangeloopError, Consumer
from changeloop.consumer import Change

server, db, count = database_from_argv()
consumer = Consumer(db)


def on_change(change: Change) -> None:
    print("change", change["seq"], change["id"], flush=True)


try:
    consumer.wait(on_change, since=0, limit=count)  # also ends on stop() or Ctrl-C
except ChangeloopError as exc:
    sys.exit("error: %s" % exc)
finally:
    consumer.close()
    server.close()
sys.exit(0)
