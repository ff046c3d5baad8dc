"""changeloop: follow CouchDB ``_changes`` feeds from plain synchronous Python.

One thread, many databases, no dependencies. Every public name is importable from here; the
submodules they come from are implementation detail as far as imports go (a vendored copy is
imported under another name anyway). See the README for the tour.

Logging: every module logs to a child of the ``changeloop`` logger (``changeloop.consumer``,
``changeloop.watcher``...), which has a :class:`logging.NullHandler` and nothing else, as a
library should: nothing is printed unless the application configures logging (without it,
Python's last-resort handler would print each warning and error to stderr, and an error that is
also raised would show twice).
"""

import logging

from ._version import __version__
from .checkpoint import FileCheckpoint, LocalDocCheckpoint, MemoryCheckpoint
from .client import Database, Server
from .consumer import BatchCallback, Callback, Change, Consumer, FeedEvent
from .errors import (
    BadRequest,
    CallbackError,
    ChangeloopError,
    CheckpointError,
    Conflict,
    ConnectError,
    ConnectTimeout,
    FeedError,
    Forbidden,
    GaveUpError,
    HTTPError,
    LineTooLongError,
    NameResolutionError,
    NetworkError,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    ReadError,
    ReadTimeout,
    ResourceLimitError,
    ResponseTooLargeError,
    ServerError,
    Timeout,
    TLSError,
    Unauthorized,
)
from .loop import Loop
from .watcher import DatabaseWatcher, DropEvent, shard_of

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    # the client and the feeds
    "Server",
    "Database",
    "Consumer",
    "FeedEvent",
    # the types of a change and of the callbacks that take them, for annotating your own code
    "Change",
    "Callback",
    "BatchCallback",
    "DatabaseWatcher",
    "DropEvent",
    "shard_of",
    "Loop",
    # checkpoint stores
    "FileCheckpoint",
    "LocalDocCheckpoint",
    "MemoryCheckpoint",
    # errors
    "ChangeloopError",
    "ProtocolError",
    "ResponseTooLargeError",
    "FeedError",
    "LineTooLongError",
    "NetworkError",
    "ConnectError",
    "NameResolutionError",
    "ResourceLimitError",
    "ReadError",
    "TLSError",
    "Timeout",
    "ConnectTimeout",
    "ReadTimeout",
    "HTTPError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
    "ServerError",
    "CallbackError",
    "CheckpointError",
    "GaveUpError",
]
