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
    ServerError,
    Timeout,
    TLSError,
    Unauthorized,
)
from .loop import Loop

__all__ = [
    "__version__",
    "Server",
    "Database",
    "Loop",
    "Consumer",
    "FeedEvent",
    "FileCheckpoint",
    "LocalDocCheckpoint",
    "MemoryCheckpoint",
    "CheckpointError",
    "BadRequest",
    "CallbackError",
    "ChangeloopError",
    "Conflict",
    "ConnectError",
    "ConnectTimeout",
    "FeedError",
    "Forbidden",
    "HTTPError",
    "LineTooLongError",
    "NetworkError",
    "NotFound",
    "PreconditionFailed",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "ServerError",
    "Timeout",
    "TLSError",
    "Unauthorized",
]
