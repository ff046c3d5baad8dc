"""Feed decoding: de-chunked ``_changes`` body bytes in, rows, heartbeats and the end out.

Sans-IO like the HTTP parser below it: no sockets, clocks or callbacks; it raises only
:class:`~changeloop.errors.FeedError`.

Continuous feeds (and ``_db_updates``) are one JSON object per line. Lines end in ``\\n`` or
``\\r\\n``; an empty line is a heartbeat; a ``{"last_seq": ..}`` line ends the feed (CouchDB 2+ on
its ``timeout`` or ``limit``). Line boundaries have nothing to do with chunk boundaries: CouchDB
packs many rows in one chunk and proxies re-chunk, so lines are split only here, after de-chunking.

Speed: JSON decoding, not the network, bounds a catching-up consumer. So each received run of
complete lines is decoded to ``str`` once, and each row is parsed in place by the stdlib decoder's
scanner (``JSONDecoder.scan_once``, the C scanner on CPython) instead of slicing a substring and
calling ``json.loads`` per line. That scanner is an implementation detail of the ``json`` module,
so it is used only when it is the C one; otherwise (and for any line the fast path does not
recognise, such as one with leading blanks) the plain ``json.loads`` path decodes the line.

Normal and longpoll bodies are one JSON document, decoded whole by :func:`decode_document`.
"""

import gc
import json
import json.scanner
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from .errors import FeedError, LineTooLongError

__all__ = ["LineDecoder", "LastSeq", "decode_document", "MAX_LINE_BYTES", "FAST_SCANNER"]

#: The longest feed line accepted. CouchDB 3 caps a document at 8,000,000 bytes
#: (``max_document_size``), and a row with ``include_docs`` carries one whole document plus a
#: little framing; 16 MiB covers that with room for JSON escaping, while keeping a hostile or
#: broken server that never sends a newline from growing our memory without bound.
MAX_LINE_BYTES = 16 * 1024 * 1024

Row = Dict[str, Any]
_ScanOnce = Callable[[str, int], Tuple[Any, int]]


def _c_scanner() -> Optional[_ScanOnce]:
    """Return the C ``scan_once`` of a default decoder, or ``None`` where there is none."""
    c_make_scanner = getattr(json.scanner, "c_make_scanner", None)
    if c_make_scanner is None:
        return None
    scan: _ScanOnce = c_make_scanner(json.JSONDecoder())
    return scan


_CPYTHON = sys.implementation.name == "cpython"

#: Whether the fast path is available on this interpreter (CPython's ``_json`` C scanner).
FAST_SCANNER = _c_scanner() is not None
#: The C scanner, shared by every decoder: it keeps no state between calls (its memo is cleared
#: after each), and one per feed would cost a decoder and a scanner object per feed.
_SHARED_SCANNER = _c_scanner()


class LastSeq(NamedTuple):
    """The ``{"last_seq": .., "pending": ..}`` line that ends a continuous feed."""

    seq: Any
    pending: Optional[int]


class LineDecoder:
    """Split a continuous feed's body into rows, counting heartbeats and noting the end.

    Args:
        max_line_bytes: the longest line accepted; see :data:`MAX_LINE_BYTES`.
        fast: use the C scanner when available (``False`` forces the plain path, for tests).
    """

    __slots__ = (
        "_scan",
        "_tail",
        "heartbeats",
        "last_seq",
        "max_line_bytes",
        "rows",
    )

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, fast: bool = True) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._scan: Optional[_ScanOnce] = _SHARED_SCANNER if fast else None
        # An incomplete last line, waiting for its newline, in a bytearray that grows in place
        # (amortised O(1) a piece): re-joining it on every receive copied the partial line
        # again each time, quadratic in its length (an 8 MiB row dripped in 1 KiB receives cost
        # 1.26 s where 48 KiB receives cost 0.05 s). None while no line is partial: an idle
        # feed's decoder holds no buffer (benchmarks/bench_scale.py counts bytes a feed).
        self._tail: Optional[bytearray] = None
        #: Heartbeat (empty) lines seen so far.
        self.heartbeats = 0
        #: Rows decoded so far (not counting heartbeats and the last_seq line).
        self.rows = 0
        #: Set once the ``last_seq`` line arrived: the server ended the feed.
        self.last_seq: Optional[LastSeq] = None

    def __repr__(self) -> str:
        return "<LineDecoder rows=%d heartbeats=%d buffered=%d ended=%s>" % (
            self.rows,
            self.heartbeats,
            self.buffered,
            self.last_seq is not None,
        )

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held until its newline arrives."""
        return 0 if self._tail is None else len(self._tail)

    def feed(self, data: bytes) -> List[Row]:
        """Decode the complete lines in ``data`` (plus what was held back) and return the rows.

        Raises:
            FeedError: a line is not a JSON object, the server reported an error row, rows
                follow the ``last_seq`` line, or the bytes are not UTF-8.
            LineTooLongError: a line is longer than ``max_line_bytes``.
        """
        rows: List[Row] = []
        self.feed_into(data, rows)
        return rows

    def take_heartbeat(self) -> bool:
        """Count a heartbeat line (a lone ``\\n``) unless a partial line is held, which that
        newline would end: then return False, and feed ``b"\\n"`` instead."""
        if self._tail:
            return False
        self.heartbeats += 1
        return True

    def feed_into(self, data: bytes, rows: List[Row]) -> None:
        """Like :meth:`feed`, appending to ``rows``: when a line fails, the rows of the lines
        before it are in ``rows`` already, for the caller to deliver before the error.
        """
        if data == b"\n" and self.take_heartbeat():  # a heartbeat alone
            return
        last = data.rfind(b"\n")
        if last < 0:
            if data:
                self._hold(data)
            return
        start = 0
        if self._tail:
            first = data.find(b"\n")
            self._tail += data[: first + 1]
            line = bytes(self._tail)
            self._tail = None
            self._decode(line, rows)
            start = first + 1
        if start <= last:
            self._decode(data[start : last + 1] if start else data[: last + 1], rows)
        if last + 1 < len(data):
            self._hold(data[last + 1 :])

    def close(self) -> None:
        """Say the body ended; a partial last line is an error (the feed was cut).

        Raises:
            FeedError: the body ended in the middle of a line.
        """
        if self._tail and self._tail.strip():
            raise FeedError("the feed ended in the middle of a line (%d bytes)" % len(self._tail))
        self._tail = None

    def _hold(self, piece: bytes) -> None:
        """Add ``piece`` (not empty, no newline) to the partial line, within the limit."""
        held = len(piece) if self._tail is None else len(self._tail) + len(piece)
        if held > self.max_line_bytes:
            raise LineTooLongError(
                "a feed line exceeded %d bytes without a newline (max_line_bytes)"
                % self.max_line_bytes
            )
        if self._tail is None:
            self._tail = bytearray(piece)
        else:
            self._tail += piece  # amortised O(1): a long line in small receives stays linear

    def _decode(self, chunk: bytes, rows: List[Row]) -> None:
        """Decode complete lines (``chunk`` ends with a newline) and append their rows."""
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FeedError("feed bytes are not UTF-8: %s" % exc) from exc
        scan = self._scan
        if len(text) > self.max_line_bytes:
            self._decode_lines(text, 0, rows)
            return
        if scan is None:
            if _CPYTHON:  # CPython built without _json; PyPy runs _decode_lines faster
                self._decode_split(text, rows)
            else:
                self._decode_lines(text, 0, rows)
            return
        # The fast path: no line of ``text`` can exceed the limit, so rows are scanned in place
        # with no per-row search for the newline; anything unusual (blanks around a row, CRLF
        # line ends, a heartbeat, a bad row) goes through _decode_lines from that line on.
        append = rows.append
        pos = 0
        end_of_text = len(text)
        before = len(rows)
        ended = self.last_seq is not None
        try:
            while pos < end_of_text:
                if text[pos] != "{":
                    break
                try:
                    row, end = scan(text, pos)
                except (StopIteration, ValueError):
                    break  # let the plain path produce the error message
                if text[end] != "\n":
                    break
                pos = end + 1
                if "last_seq" in row or "error" in row:
                    self._end_or_error(row)
                    ended = True
                    continue
                if ended:
                    raise FeedError("a row arrived after the last_seq line: %s" % _excerpt(row))
                append(row)
        finally:
            self.rows += len(rows) - before
        if pos < end_of_text:
            self._decode_lines(text, pos, rows)

    def _decode_split(self, text: str, rows: List[Row]) -> None:
        """The plain path: split ``text`` (no line of it too long) and decode each line."""
        lines = text.split("\n")
        lines.pop()  # the empty string after the last newline
        # json.loads itself, not a JSONDecoder's decode: on PyPy (no C scanner, so this path)
        # only json.loads reaches the fast native decoder (_pypyjson).
        loads = json.loads
        append = rows.append
        before = len(rows)
        ended = self.last_seq is not None
        try:
            for line in lines:
                if not line:
                    self.heartbeats += 1
                    continue
                try:
                    row = loads(line)  # blanks around the row are allowed
                except ValueError as exc:
                    if line.isspace():  # a heartbeat with a CRLF line end
                        self.heartbeats += 1
                        continue
                    raise FeedError(
                        "a feed line is not JSON (%s): %s" % (exc, _excerpt(line))
                    ) from exc
                if type(row) is not dict:
                    raise FeedError("a feed line is not a JSON object: %s" % _excerpt(line))
                if "last_seq" in row or "error" in row:
                    self._end_or_error(row)
                    ended = True
                    continue
                if ended:
                    raise FeedError("a row arrived after the last_seq line: %s" % _excerpt(row))
                append(row)
        finally:
            self.rows += len(rows) - before

    def _decode_lines(self, text: str, pos: int, rows: List[Row]) -> None:
        """Decode the lines of ``text`` from ``pos`` one at a time, each checked in full."""
        scan = self._scan
        limit = self.max_line_bytes
        append = rows.append
        find = text.find
        end_of_text = len(text)
        while pos < end_of_text:
            newline = find("\n", pos)  # always found: text ends with a newline
            if newline - pos > limit:
                raise LineTooLongError(
                    "a feed line of %d characters exceeds max_line_bytes (%d)"
                    % (newline - pos, limit)
                )
            row: Any = None
            if scan is not None and text[pos] == "{":
                try:
                    row, end = scan(text, pos)
                except (StopIteration, ValueError):
                    row = None  # let the plain path produce the error message
                else:
                    if end != newline and text[end:newline].strip():
                        row = None
            if row is None:
                line = text[pos:newline].strip()
                if not line:
                    self.heartbeats += 1
                    pos = newline + 1
                    continue
                row = _loads_line(line)
            pos = newline + 1
            if "last_seq" in row or "error" in row:
                self._end_or_error(row)
                continue
            if self.last_seq is not None:
                raise FeedError("a row arrived after the last_seq line: %s" % _excerpt(row))
            self.rows += 1
            append(row)

    def _end_or_error(self, row: Row) -> None:
        if "error" in row:
            raise FeedError(
                "the server reported an error in the feed: %s: %s"
                % (row.get("error"), row.get("reason"))
            )
        if self.last_seq is not None:
            raise FeedError("a second last_seq line arrived: %s" % _excerpt(row))
        if "results" in row:
            # A whole normal or longpoll answer on one line (a proxy's or a server's doing) is
            # not "the feed ended at last_seq": taken so, it would skip every change it holds.
            raise FeedError(
                "the server answered a continuous feed with a normal one: %s" % _excerpt(row)
            )
        pending = row.get("pending")
        self.last_seq = LastSeq(row["last_seq"], pending if isinstance(pending, int) else None)


def _loads_line(line: str) -> Row:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise FeedError("a feed line is not JSON (%s): %s" % (exc, _excerpt(line))) from exc
    if not isinstance(row, dict):
        raise FeedError("a feed line is not a JSON object: %s" % _excerpt(line))
    return row


#: Bodies from this size on are decoded with the cyclic garbage collector paused (see
#: :func:`decode_document`).
PAUSE_GC_BYTES = 1024 * 1024


def decode_document(body: bytes) -> Row:
    """Decode a normal or longpoll ``_changes`` body (one JSON object, heartbeats included).

    Pass the only reference to ``body`` (``decode_document(b"".join(parts))``): it is dropped
    once decoded to ``str``, so on CPython 3.11+ (where a call's arguments are not also kept by
    the caller) a large body is held once, not twice, while its objects are built.

    Those objects are built with the cyclic garbage collector paused, for bodies of
    :data:`PAUSE_GC_BYTES` or more when it was enabled: a JSON decode makes no reference cycles,
    yet the collections that its allocations trigger each walk every object decoded so far,
    which made ``json.loads`` of 100,000 rows half as fast (benchmarks/bench_fetch.py). The
    switch is process-wide: a thread that calls ``gc.disable()`` during such a decode sees the
    collector enabled again when it ends.

    Raises:
        FeedError: the body is not a JSON object with a ``results`` list.
    """
    excerpt = _excerpt(body[:100])
    large = len(body) >= PAUSE_GC_BYTES
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads does
        del body
        if not large or not gc.isenabled():
            document = json.loads(text)
        else:
            gc.disable()
            try:
                document = json.loads(text)
            finally:
                gc.enable()
    except ValueError as exc:  # includes UnicodeDecodeError
        raise FeedError("the _changes body is not JSON (%s): %s" % (exc, excerpt)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise FeedError("the _changes body has no results list: %s" % excerpt)
    return document


def _excerpt(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
