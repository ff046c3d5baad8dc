"""The changeloop demo: follow a real database's changes while documents are written to it.

Starts a CouchDB-compatible server on loopback (pouchdb-server, installed on first use by
tests/testserver.py; or the server at COUCHDB_URL), creates a database, follows its continuous
feed on a changeloop Loop in this thread, and writes documents from another thread: each change
is printed as it arrives, with two times: ``elapsed``, seconds since the demo began following the
feed (before it connected), and ``latency``, milliseconds from the start of the ``save_doc``
request that wrote the document to its change reaching the callback (the server's write, its
feed, and changeloop's delivery, all on loopback). Exits 0 when every document written was seen.

    python examples/demo.py [--docs N]
"""

import argparse
import os
import sys
import threading
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # testserver.py: installs and starts it
sys.path.insert(0, os.path.join(HERE, ".."))  # changeloop itself, when run from a clone

import testserver  # noqa: E402

from changeloop import Consumer, FeedEvent, Server  # noqa: E402


def follow(url: str, docs: int) -> int:
    with Server(url) as server:
        db = server.create_db("changeloop-demo-%d" % os.getpid())
        print("following %s/%s" % (server.url, db.name), flush=True)
        seen: List[str] = []
        written: Dict[str, float] = {}  # id -> when its save_doc began (the writer thread's)
        started = time.monotonic()

        def on_change(change: Dict[str, Any]) -> None:
            now = time.monotonic()
            seen.append(change["id"])
            sent = written.get(change["id"])
            print(
                "%7.3f  %7s  %-6s  %-8s  %s"
                % (
                    now - started,
                    "-" if sent is None else "%.1f" % ((now - sent) * 1000.0),
                    change["seq"],
                    change["id"],
                    change["changes"][0]["rev"],
                ),
                flush=True,
            )
            if len(seen) == docs:
                consumer.stop()

        def on_connect(event: FeedEvent) -> None:
            if writer.ident is None:  # the first connection only, not a reconnection
                print("connected; writing %d documents from another thread" % docs, flush=True)
                print("elapsed: s since following began; latency: ms from save_doc to callback")
                print("%7s  %7s  %-6s  %-8s  %s" % ("elapsed", "latency", "seq", "id", "rev"))
                writer.start()

        def write() -> None:
            with Server(url) as other:
                target = other.get_db(db.name)
                for index in range(docs):
                    docid = "demo-%03d" % index
                    written[docid] = time.monotonic()  # before the change can possibly arrive
                    target.save_doc({"_id": docid, "n": index})
                    time.sleep(0.05)

        writer = threading.Thread(target=write, name="writer")
        consumer = Consumer(db, on_connect=on_connect)
        try:
            consumer.wait(on_change, since="now", heartbeat=1000)
        finally:
            consumer.close()
            if writer.ident is not None:
                writer.join()
            server.delete_db(db.name)
        missing = sorted({"demo-%03d" % i for i in range(docs)} - set(seen))
        print(
            "saw %d of %d changes in %.2f s%s"
            % (
                len(seen),
                docs,
                time.monotonic() - started,
                "; missing %s" % missing if missing else "",
            )
        )
        return 1 if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20, help="documents to write (default 20)")
    args = parser.parse_args()
    url = testserver.server_url_from_env()
    if url is not None:
        return follow(url, args.docs)
    print("starting pouchdb-server (installed on first use)...", flush=True)
    with testserver.start_server() as running:
        return follow(running.url, args.docs)


if __name__ == "__main__":
    sys.exit(main())
