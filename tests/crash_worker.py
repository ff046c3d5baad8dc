"""Follow a database's continuous feed with a FileCheckpoint, recording every delivered change.

Usage::

    python tests/crash_worker.py URL DB CHECKPOINT OUTFILE

The crash-restart test in ``test_chaos.py`` runs this in a real subprocess, kills it with SIGKILL
mid-stream and starts it again. Each change is appended to OUTFILE as ``id<TAB>seq-as-JSON``
with one ``os.write`` and an ``fsync`` before the callback returns, so OUTFILE holds exactly what
was delivered, and a kill cannot tear a line. The feed starts at ``since=0``, or at the seq the
checkpoint file holds. SIGTERM stops the worker the way Ctrl-C does (the checkpoint is saved,
exit status 0); SIGKILL is the crash under test.
"""

import json
import os
import signal
import sys
from types import FrameType
from typing import Any, Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: the changeloop the test itself imported (passed on in PYTHONPATH) or
# an installed one wins; the source tree is the fallback when changeloop is not installed.
sys.path.append(REPO_ROOT)

from changeloop import Consumer, FileCheckpoint, Server  # noqa: E402

# Small, so a kill lands well after a checkpoint and leaves some changes to deliver again.
CHECKPOINT_EVERY_CHANGES = 40
CHECKPOINT_EVERY_S = 0.5
HEARTBEAT_MS = 500
RECONNECT_BASE_S = 0.05
RECONNECT_CAP_S = 0.5


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt  # Consumer.wait() saves the checkpoint and re-raises it


def main(argv: List[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, db_name, checkpoint_path, out_path = argv
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(change: Dict[str, Any]) -> None:
        line = "%s\t%s\n" % (change["id"], json.dumps(change.get("seq")))
        os.write(fd, line.encode("utf-8"))  # O_APPEND, one small write: never torn
        os.fsync(fd)  # on disk before the consumer counts the change as delivered

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with Server(url) as server:
            consumer = Consumer(
                server.get_db(db_name),
                checkpoint=FileCheckpoint(checkpoint_path),
                checkpoint_every=CHECKPOINT_EVERY_CHANGES,
                checkpoint_interval=CHECKPOINT_EVERY_S,
                reconnect_base=RECONNECT_BASE_S,
                reconnect_cap=RECONNECT_CAP_S,
            )
            with consumer:
                try:
                    consumer.wait(record, since=0, heartbeat=HEARTBEAT_MS)
                except KeyboardInterrupt:
                    pass  # SIGTERM: a clean stop, the checkpoint saved
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
