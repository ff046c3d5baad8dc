"""Checkpoint stores: where a consumer keeps the seq of the last change it delivered.

A store has two methods, ``load() -> seq or None`` and ``save(seq)``; any object with them works.
The consumer saves only after the callbacks for a change returned, throttled, and on stop, so
after a crash it resumes at the last saved seq and delivers again what came after it: delivery
is **at-least-once**, and callbacks should be idempotent (keyed on ``id`` and ``rev``).

- :class:`FileCheckpoint` writes a small JSON file atomically (temp file, fsync, rename), so a
  crash leaves the old checkpoint or the new one, never a torn file. Saves hold an OS lock on a
  ``<file>.lock`` beside it, so processes sharing one file (one key each) lose no update.
- :class:`LocalDocCheckpoint` keeps the seq in a ``_local/`` document of the watched database:
  ``_local`` documents are not replicated and not in ``_changes``, and any worker that can reach
  the database can take the feed over from where another one stopped.
"""

import binascii
import errno
import json
import os
import re
import threading
import time
from types import ModuleType
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from .client import Database, quote_doc_id
from .errors import CheckpointError, HTTPError

fcntl: Optional[ModuleType]
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["CheckpointStore", "FileCheckpoint", "LocalDocCheckpoint", "MemoryCheckpoint"]

#: Where no OS lock tells a dead writer's temporary file from a live one's (no ``fcntl``; the
#: older, tag-less names), a temporary file is removed only once this old: a save takes
#: milliseconds, an fsync on a very slow disk seconds, so an hour old is surely abandoned.
STALE_TEMP_S = 3600.0
_TEMP_PREFIX = ".checkpoint-"
#: What ``tempfile.mkstemp`` named the temporary files before they carried their file's tag.
_LEGACY_TEMP = re.compile(r"\.checkpoint-[a-z0-9_]{8}\Z")


class CheckpointStore:
    """The interface (subclassing is optional): ``load`` and ``save`` a seq."""

    def load(self) -> Any:
        """Return the saved seq, or ``None`` if nothing was saved yet."""
        raise NotImplementedError

    def save(self, seq: Any) -> None:
        """Remember ``seq`` durably."""
        raise NotImplementedError


class MemoryCheckpoint(CheckpointStore):
    """Keeps the seq in memory: for tests, and for several runs within one process."""

    def __init__(self, seq: Any = None) -> None:
        self.seq = seq  #: The seq held.
        self.saves = 0  #: How many saves were made.

    def __repr__(self) -> str:
        return "<MemoryCheckpoint seq=%r saves=%d>" % (self.seq, self.saves)

    def load(self) -> Any:
        return self.seq

    def save(self, seq: Any) -> None:
        self.seq = seq
        self.saves += 1


class FileCheckpoint(CheckpointStore):
    """A JSON file, written atomically.

    Args:
        path: the file; its directory must exist.
        key: share one file between several consumers (one per database, say): the file then
            holds ``{key: seq, ...}`` and each store reads and writes its own key.

    Each save is a read-modify-write under a lock: a thread lock within the process and, where
    ``fcntl`` exists (Linux, macOS, the BSDs), an ``flock`` on ``<path>.lock`` (created beside
    the file, and left there), so several processes may share one file, each with its own
    keys. Without ``fcntl`` (Windows) only the threads of one process are serialized: give each
    process its own file there.

    A save that is killed leaves its temporary file (``.checkpoint-*``) behind; the first save
    of each store removes those of its file (under the lock, so never one a live writer is
    still filling). The file gets the mode the process's umask gives a new file.
    """

    _locks: Dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, path: Union[str, "os.PathLike[str]"], key: Optional[str] = None) -> None:
        self.path = os.fspath(path)  #: The checkpoint file's path.
        self.key = key  #: The key within the file, or ``None``.
        self._swept = False  # whether the leftovers of killed saves were removed yet
        with FileCheckpoint._locks_guard:
            self._lock = FileCheckpoint._locks.setdefault(
                os.path.abspath(self.path), threading.Lock()
            )

    def __repr__(self) -> str:
        return "<FileCheckpoint %s%s>" % (self.path, " key=%r" % self.key if self.key else "")

    def load(self) -> Any:
        """Return the saved seq, or ``None`` if the file (or its key) does not exist.

        Raises:
            CheckpointError: the file exists but is not a checkpoint written by this class.
        """
        document = self._read()
        if document is None:
            return None
        if self.key is not None:
            entry = document.get("seqs", {}).get(self.key)
            return None if entry is None else entry
        return document.get("seq")

    def save(self, seq: Any) -> None:
        """Write ``seq``: to a temporary file in the same directory, fsync, rename over the file.

        Raises:
            CheckpointError: the file could not be written.
        """
        with self._lock, self._file_lock():
            if not self._swept:
                self._remove_stale_temporaries()
                self._swept = True
            if self.key is not None:
                document = self._read() or {}
                seqs = dict(document.get("seqs", {}))
                seqs[self.key] = seq
                document = {"seqs": seqs}
            else:
                document = {"seq": seq}
            self._write(document)

    def _file_lock(self) -> "_FileLock":
        return _FileLock(self.path + ".lock")

    def _temp_tag(self) -> str:
        """A tag for this file's temporary files: those of other files are not ours to remove."""
        return "%08x" % (binascii.crc32(os.path.basename(self.path).encode("utf-8", "replace")))

    def _remove_stale_temporaries(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        ours = _TEMP_PREFIX + self._temp_tag() + "-"
        # Under the flock no live writer of this file has a temporary file; without one, only
        # an old one is surely abandoned. Tag-less names may belong to any file: age decides.
        locked = fcntl is not None
        now = time.time()
        for entry in _scan(directory):
            name = entry.name
            if name.startswith(ours):
                stale = locked or _age(entry, now) > STALE_TEMP_S
            elif _LEGACY_TEMP.match(name):
                stale = _age(entry, now) > STALE_TEMP_S
            else:
                continue
            if stale:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass  # removed by another store meanwhile, or not ours to remove

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError("cannot read checkpoint %s: %s" % (self.path, exc)) from exc
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise CheckpointError("checkpoint %s is not JSON: %s" % (self.path, exc)) from exc
        if not isinstance(document, dict) or not ("seq" in document or "seqs" in document):
            raise CheckpointError("%s is not a changeloop checkpoint file" % self.path)
        return document

    def _write(self, document: Dict[str, Any]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        data = json.dumps(document, sort_keys=True).encode("utf-8") + b"\n"
        try:
            fd, temporary = _create_temporary(directory, _TEMP_PREFIX + self._temp_tag() + "-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
                raise
            _fsync_directory(directory)
        except OSError as exc:
            raise CheckpointError("cannot write checkpoint %s: %s" % (self.path, exc)) from exc


def _create_temporary(directory: str, prefix: str) -> Tuple[int, str]:
    """Create a new temporary file; mode 0o666 as the umask reduces it, like any new file.

    (``tempfile.mkstemp`` makes it 0o600 whatever the umask says, and the rename would give
    the checkpoint that mode.)
    """
    # vermin reads "os.O_X | os.O_Y" as a 3.10 union type: novermin marks the false positive.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # novermin
    for _ in range(100):
        path = os.path.join(directory, prefix + binascii.hexlify(os.urandom(4)).decode())
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", directory)


class _FileLock:
    """An exclusive ``flock`` on ``path`` (created if need be), or nothing without ``fcntl``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "_FileLock":
        if fcntl is None:
            return self
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # novermin (as above)
        except OSError as exc:
            raise CheckpointError(
                "cannot write checkpoint: cannot open its lock file %s: %s" % (self.path, exc)
            ) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(self.fd)
            raise CheckpointError(
                "cannot write checkpoint: cannot lock %s: %s" % (self.path, exc)
            ) from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = -1


def _scan(directory: str) -> Iterator["os.DirEntry[str]"]:
    try:
        with os.scandir(directory) as entries:
            yield from list(entries)
    except OSError:
        return


def _age(entry: "os.DirEntry[str]", now: float) -> float:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk. Some platforms (Windows)
    # cannot open a directory; the rename is still atomic there, just not yet durable.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalDocCheckpoint(CheckpointStore):
    """A ``_local/`` document in a database (by default, the one being watched).

    Args:
        db: the database that holds the document.
        name: the checkpoint's name; the document is ``_local/changeloop-<name>``. Workers that
            take over each other's feeds must use the same name.
    """

    def __init__(self, db: Database, name: str = "default") -> None:
        if not name:
            raise ValueError("a checkpoint name cannot be empty")
        self.db = db  #: The database that holds the document.
        self.docid = "_local/changeloop-%s" % name  #: The ``_local`` document's id.
        self._rev: Optional[str] = None

    def __repr__(self) -> str:
        return "<LocalDocCheckpoint %s/%s>" % (self.db.name, self.docid)

    def load(self) -> Any:
        """Return the saved seq, or ``None`` if the document does not exist."""
        try:
            document = self.db.get(self.docid)
        except HTTPError as exc:
            if exc.status == 404:
                self._rev = None
                return None
            raise CheckpointError("cannot read %r: %s" % (self, exc)) from exc
        self._rev = document.get("_rev")
        return document.get("seq")

    def save(self, seq: Any) -> None:
        """Write ``seq``; after a conflict (another worker wrote), re-read the revision once.

        Raises:
            CheckpointError: the document could not be written.
        """
        for attempt in (1, 2):
            document: Dict[str, Any] = {"seq": seq}
            if self._rev is not None:
                document["_rev"] = self._rev
            try:
                result = self.db.server.request(
                    "PUT", self.db.path + "/" + quote_doc_id(self.docid), body=document
                )
            except HTTPError as exc:
                if exc.status == 409 and attempt == 1:
                    self.load()
                    continue
                raise CheckpointError("cannot save %r: %s" % (self, exc)) from exc
            self._rev = result.get("rev")
            return
