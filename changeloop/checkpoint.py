"""Checkpoint stores: where a consumer keeps the seq of the last change it delivered.

A store has two methods, ``load() -> seq or None`` and ``save(seq)``; any object with them works.
The consumer saves only after the callbacks for a change returned, throttled, and on stop, so
after a crash it resumes at the last saved seq and delivers again what came after it: delivery
is **at-least-once**, and callbacks should be idempotent (keyed on ``id`` and ``rev``).

- :class:`FileCheckpoint` writes a small JSON file atomically (temp file, fsync, rename), so a
  crash leaves the old checkpoint or the new one, never a torn file.
- :class:`LocalDocCheckpoint` keeps the seq in a ``_local/`` document of the watched database:
  ``_local`` documents are not replicated and not in ``_changes``, and any worker that can reach
  the database can take the feed over from where another one stopped.
"""

import json
import os
import tempfile
import threading
from typing import Any, Dict, Optional, Union

from .client import Database, quote_doc_id
from .errors import CheckpointError, HTTPError

__all__ = ["CheckpointStore", "FileCheckpoint", "LocalDocCheckpoint", "MemoryCheckpoint"]


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
        self.seq = seq
        self.saves = 0

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
    """

    _locks: Dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, path: Union[str, "os.PathLike[str]"], key: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.key = key
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
        with self._lock:
            if self.key is not None:
                document = self._read() or {}
                seqs = dict(document.get("seqs", {}))
                seqs[self.key] = seq
                document = {"seqs": seqs}
            else:
                document = {"seq": seq}
            self._write(document)

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
            fd, temporary = tempfile.mkstemp(prefix=".checkpoint-", dir=directory)
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
        self.db = db
        self.docid = "_local/changeloop-%s" % name
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
