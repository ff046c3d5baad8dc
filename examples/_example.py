"""Shared by the examples: the database URL and change count from the command line."""

import os
import sys
from typing import Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from changeloop import Database, Server  # noqa: E402


def database_from_argv() -> Tuple[Server, Database, int]:
    """``URL [COUNT]``: the server and database of ``http://host:port/[prefix/]db``."""
    if len(sys.argv) < 2:
        sys.exit("usage: %s http://127.0.0.1:5984/mydb [COUNT]" % sys.argv[0])
    parts = urlsplit(sys.argv[1])
    prefix, _, name = parts.path.rstrip("/").rpartition("/")
    server = Server(urlunsplit((parts.scheme, parts.netloc, prefix, "", "")))
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    return server, server.get_db(unquote(name)), count
