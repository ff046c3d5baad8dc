"""changeloop: follow CouchDB ``_changes`` feeds from plain synchronous Python.

One thread, many databases, no dependencies. See the README for the tour.
"""

from ._version import __version__
from .checkpoint import FileCheckpoint, LocalDocCheckpoint, MemoryCheckpoint
from .client import Database, Server
from .consumer import Consumer, FeedEvent
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
    HTTPError,
    LineTooLongError,
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
from .watcher import DatabaseWatcher, shard_of

__all__ = [
    "__version__",
    # the client and the feeds
    "Server",
    "Database",
    "Consumer",
    "FeedEvent",
    "DatabaseWatcher",
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
]
