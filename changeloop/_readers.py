"""Body framing readers and field parsing for the HTTP/1.1 response parser (RFC 9112 §5-7).

Each reader consumes what it can from the front of the parser's ``bytearray`` and returns a
``Data`` or ``EndOfMessage`` event, or ``None`` when it needs more bytes; ``read_eof`` says what EOF
means for that framing. The chunked reader strips the framing of every complete chunk in the
buffer in one call (see ``_http`` for why).
"""

import re
import sys
from itertools import repeat
from typing import List, Optional, Tuple, Union

from ._events import Data, EndOfMessage, Headers
from .errors import ProtocolError

__all__ = [
    "pick_reader",
    "BodyReader",
    "find_blank_line",
    "split_lines",
    "parse_fields",
    "tokens",
    "has_control_char",
]

# Limits. Each is far above what CouchDB or any sane proxy sends, and low enough that a hostile
# peer cannot make us buffer without bound.
#: A whole response head (status line + headers), and separately a trailer section. CouchDB's
#: heads are about 300 bytes; Node.js (pouchdb-server) refuses heads over 16 KiB; 64 KiB leaves
#: room for proxies that add headers.
MAX_HEAD_BYTES = 64 * 1024
#: Header fields in one head; http.client uses the same number (``_MAXHEADERS``).
MAX_HEADER_COUNT = 100
#: A chunk-size line including extensions. Sizes need at most 16 hex digits; extensions are
#: never sent by CouchDB, so 4 KiB is generous and keeps a rescan of a partial line cheap.
MAX_CHUNK_LINE_BYTES = 4096
#: Hex digits in a chunk size: 16 digits already describe 2**64 - 1 bytes.
MAX_CHUNK_SIZE_DIGITS = 16
#: Decimal digits in Content-Length: 19 digits stay below 2**63, the largest size any peer uses.
MAX_CONTENT_LENGTH_DIGITS = 19

_CPYTHON = sys.implementation.name == "cpython"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: ``_HEX_SIZES[n]`` is chunk size ``n`` as CouchDB writes it, for the sizes of rows and of
#: heartbeats: 4 KiB covers rows without documents, and the table costs 4,096 small objects.
_HEX_SIZES = [b"%x" % n for n in range(4096)]
_DECIMAL_DIGITS = b"0123456789"
# RFC 9110 §5.6.2 token characters, for validating field names.
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
#: What may not appear in a field value or a reason phrase: RFC 9110 §5.5 allows only VCHAR,
#: obs-text, SP and HTAB there, so every other control character (NUL, CR, a bare LF inside a
#: line, DEL...) is refused rather than passed on to code that may treat it as a separator.
_CONTROL_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def has_control_char(value: bytes) -> bool:
    """Whether ``value`` holds a byte that RFC 9110 §5.5 keeps out of field values."""
    return _CONTROL_CHAR.search(value) is not None


# -- field sections (heads and trailers) ------------------------------------------------------


def find_blank_line(buf: bytearray, start: int) -> int:
    """Return the offset just past the blank line ending a head or trailer section, or -1.

    Lines end in CRLF; a bare LF is also accepted as RFC 9112 §2.2 allows. ``start`` must be the
    start of a line (or the buffer's last byte, to catch a CRLF split across two receives).
    """
    find = buf.find
    pos = start
    while True:
        i = find(b"\n", pos)
        if i < 0:
            return -1
        if i == 0 or buf[i - 1] == 0x0A or (buf[i - 1] == 0x0D and (i == 1 or buf[i - 2] == 0x0A)):
            return i + 1
        pos = i + 1


def split_lines(block: bytes) -> List[bytes]:
    lines = block.split(b"\n")
    lines.pop()  # after the final LF
    lines.pop()  # the blank line
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_fields(lines: List[bytes], what: str) -> Headers:
    """Parse field lines (RFC 9112 §5) into ``(lower-cased name, value)`` pairs."""
    fields: List[Tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            # obs-fold: RFC 9112 §5.2 lets a user agent replace it with SP.
            if not fields:
                raise ProtocolError("%s section starts with a continuation line" % what)
            name, value = fields[-1]
            more = line.strip(b" \t")
            if has_control_char(more):
                raise ProtocolError("control character in %s %r" % (what, excerpt(name)))
            fields[-1] = (name, (value + b" " + more).strip(b" \t"))
            continue
        colon = line.find(b":")
        if colon <= 0:
            raise ProtocolError("malformed %s line %r" % (what, excerpt(line)))
        name = line[:colon]
        if not _TOKEN_CHARS.issuperset(name):
            # Includes whitespace before the colon, which RFC 9112 §5.1 says to reject.
            raise ProtocolError("invalid %s name %r" % (what, excerpt(name)))
        value = line[colon + 1 :].strip(b" \t")
        if has_control_char(value):
            raise ProtocolError("control character in %s %r" % (what, excerpt(name)))
        fields.append((name.lower(), value))
        if len(fields) > MAX_HEADER_COUNT:
            raise ProtocolError(
                "more than %d %s fields (MAX_HEADER_COUNT)" % (MAX_HEADER_COUNT, what)
            )
    return fields


def _values(headers: Headers, name: bytes) -> List[bytes]:
    return [value for key, value in headers if key == name]


def tokens(headers: Headers, name: bytes) -> List[bytes]:
    """Return the comma-separated, lower-cased tokens of every ``name`` field, in order."""
    return [t.strip(b" \t").lower() for v in _values(headers, name) for t in v.split(b",")]


# -- body framing (RFC 9112 §6.3) ----------------------------------------------------------------


class BodyReader:
    """Reads one framing of body; ``read`` consumes what it can from the front of ``buf``."""

    __slots__ = ()

    def read(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        raise NotImplementedError

    def read_eof(self, offset: int) -> Union[Data, EndOfMessage]:
        raise NotImplementedError

    def at_chunk_boundary(self) -> bool:
        """Whether the next bytes would start a chunk (only the chunked reader says yes)."""
        return False


class _NoBody(BodyReader):
    __slots__ = ()

    def read(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        return EndOfMessage()

    def read_eof(self, offset: int) -> Union[Data, EndOfMessage]:
        return EndOfMessage()


class _ContentLengthReader(BodyReader):
    __slots__ = ("_length", "_remaining")

    def __init__(self, length: int) -> None:
        self._length = length
        self._remaining = length

    def read(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        if not self._remaining:
            return EndOfMessage()
        if not buf:
            return None
        take = min(self._remaining, len(buf))
        data = bytes(buf[:take])
        del buf[:take]
        self._remaining -= take
        return Data(data)

    def read_eof(self, offset: int) -> Union[Data, EndOfMessage]:
        raise ProtocolError(
            "connection closed after %d of %d body bytes (Content-Length)"
            % (self._length - self._remaining, self._length)
        )


class _UntilCloseReader(BodyReader):
    __slots__ = ()

    def read(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        if not buf:
            return None
        data = bytes(buf)
        del buf[:]
        return Data(data)

    def read_eof(self, offset: int) -> Union[Data, EndOfMessage]:
        return EndOfMessage()


#: CouchDB's heartbeat, a chunk holding one newline: what an idle continuous feed receives.
HEARTBEAT_CHUNK = b"1\r\n\n\r\n"


class _ChunkedReader(BodyReader):
    """RFC 9112 §7.1: ``size[;ext] CRLF data CRLF ... 0 CRLF [trailers] CRLF``."""

    __slots__ = ("_bulk", "_failed", "_in_trailers", "_need_crlf", "_remaining", "_trailer_scan")

    def __init__(self) -> None:
        self._remaining = 0  # data bytes left in the current chunk
        self._need_crlf = False  # the CRLF that must follow chunk data
        self._in_trailers = False
        self._trailer_scan = 0
        self._failed: Optional[ProtocolError] = None  # raised after the data before it
        # Try _split_chunks first (off once a chunk's data held a CRLF). Only on CPython: PyPy's
        # JIT runs the exact loop below faster than the split and its lists (measured 2.5x).
        self._bulk = _CPYTHON

    def at_chunk_boundary(self) -> bool:
        return not (self._remaining or self._need_crlf or self._in_trailers or self._failed)

    def read(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        if self._failed is not None:
            raise self._failed
        if self._in_trailers:
            return self._read_trailers(buf, offset)
        if not buf:
            return None  # the parser asks again once a receive is used up: answer at once
        # One snapshot of the buffer as bytes: slicing bytes and joining the slices measured
        # faster than slicing a memoryview or the bytearray itself (benchmarks/bench_parser.py).
        data = bytes(buf)
        end = len(data)
        parts: List[bytes] = []
        append = parts.append
        find = data.find
        pos = 0
        remaining = self._remaining
        bulk = self._bulk
        try:
            while True:
                if remaining:  # the rest of a chunk that started in an earlier receive
                    if pos == end:
                        break
                    take = min(remaining, end - pos)
                    append(data[pos : pos + take])
                    pos += take
                    remaining -= take
                    if remaining:
                        break
                    self._need_crlf = True
                if self._need_crlf:
                    if end - pos < 2:
                        if end > pos and data[pos] != 0x0D:
                            raise self._error("chunk data not followed by CRLF", offset + pos)
                        break
                    if data[pos] != 0x0D or data[pos + 1] != 0x0A:
                        raise self._error("chunk data not followed by CRLF", offset + pos)
                    pos += 2
                    self._need_crlf = False
                if bulk:  # at a chunk-size line: take every complete chunk at once, then go on
                    bulk = False
                    taken = _split_chunks(data, pos, parts)
                    if taken < 0:
                        self._bulk = False
                    else:
                        pos = taken
                        continue
                lf = find(b"\n", pos, pos + MAX_CHUNK_LINE_BYTES + 1)
                if lf < 0:
                    if end - pos > MAX_CHUNK_LINE_BYTES:
                        raise self._error(
                            "chunk-size line longer than %d bytes" % MAX_CHUNK_LINE_BYTES,
                            offset + pos,
                        )
                    break
                digits = data[pos : lf - 1]
                # Fast check for the usual "hex CRLF": isalnum() plus int(_, 16) rejects all but a
                # "0x" prefix and leading zeros, which the exact check below handles with the rest
                # (extensions, bare LF, signs, blanks).
                if (
                    data[lf - 1] != 0x0D
                    or not digits.isalnum()
                    or lf - 1 - pos > MAX_CHUNK_SIZE_DIGITS
                    or (digits[0] == 0x30 and lf - 1 - pos > 1)
                ):
                    size = _parse_chunk_size(data[pos:lf], offset + pos)
                else:
                    try:
                        size = int(digits, 16)
                    except ValueError:
                        message = "invalid chunk size %r" % excerpt(digits)
                        raise self._error(message, offset + pos) from None
                pos = lf + 1
                if size == 0:
                    self._in_trailers = True
                    break
                stop = pos + size
                if stop + 2 <= end:  # the whole chunk is here: the common case
                    if data[stop] != 0x0D or data[stop + 1] != 0x0A:
                        raise self._error("chunk data not followed by CRLF", offset + stop)
                    append(data[pos:stop])
                    pos = stop + 2
                else:
                    remaining = size
        except ProtocolError as exc:
            if not parts:
                raise
            # Hand out the good chunks before the bad framing (rows a consumer must deliver
            # before it resumes); the error comes with the next call.
            self._failed = exc
            del buf[:pos]
            return Data(b"".join(parts))
        self._remaining = remaining
        del buf[:pos]
        if parts:
            return Data(b"".join(parts))  # a single part is returned as is, without a copy
        if self._in_trailers:
            return self._read_trailers(buf, offset + pos)
        return None

    def _read_trailers(self, buf: bytearray, offset: int) -> Optional[Union[Data, EndOfMessage]]:
        if buf[:2] == b"\r\n":  # the common case: no trailers at all
            del buf[:2]
            return EndOfMessage()
        end = find_blank_line(buf, self._trailer_scan)
        if end < 0:
            self._trailer_scan = max(0, len(buf) - 1)
            if len(buf) > MAX_HEAD_BYTES:
                raise self._error("trailer section longer than %d bytes" % MAX_HEAD_BYTES, offset)
            return None
        block = bytes(buf[:end])
        del buf[:end]
        return EndOfMessage(parse_fields(split_lines(block), "trailer"))

    def read_eof(self, offset: int) -> Union[Data, EndOfMessage]:
        if self._in_trailers:
            where = "before the end of the chunked body (missing final CRLF)"
        elif self._remaining:
            where = "inside a chunk, %d bytes short" % self._remaining
        else:
            where = "before the last chunk"
        raise self._error("connection closed " + where, offset)

    @staticmethod
    def _error(message: str, offset: int) -> ProtocolError:
        return ProtocolError("%s (at byte %d of the response)" % (message, offset))


def _split_chunks(data: bytes, pos: int, parts: List[bytes]) -> int:
    """Strip the framing of all the complete chunks from ``data[pos:]`` at C speed.

    ``pos`` is the start of a chunk-size line. Splitting on CRLF gives ``size, data, size, data,
    ...``; the framing is exactly that when every size is plain hex (at most
    ``MAX_CHUNK_SIZE_DIGITS`` digits, no extension) and every data piece is as long as its size
    says: each match proves that piece is the whole chunk and that a CRLF follows it, so the next
    piece is the next size line. The trailing incomplete chunk, the last (zero) chunk and
    everything after it are left to the exact loop in ``read``, which also judges any stream
    that does not pass, so the errors and limits stay those of the exact loop.

    Returns:
        The offset after the chunks taken (``pos`` when there were too few to bother), or -1
        when the framing is not plain: a chunk's data held a CRLF (a normal feed's ``,\r\n``
        between rows, a re-chunked feed with CRLF line ends), which also puts the pieces out of
        step so that a "size" is not hex, or there are extensions or malformed size lines. The
        caller then stops trying for the rest of the message: each try would cost a split of
        the whole receive for nothing (measured: 48 of 112 ms of a 100,000-row normal feed).
    """
    pieces = (data[pos:] if pos else data).split(b"\r\n")
    pairs = (len(pieces) - 1) // 2  # (size, data) pairs followed by a CRLF
    if pairs < 2:
        return pos  # not worth it: the exact loop is as fast for one chunk
    sizes = pieces[0 : 2 * pairs : 2]
    datas = pieces[1 : 2 * pairs : 2]
    lengths = list(map(len, datas))
    try:
        # Sizes as CouchDB writes them (lower-case hex, no leading zero) are compared with a
        # table, which is faster than parsing each one; anything else is parsed below.
        canonical = sizes == list(map(_HEX_SIZES.__getitem__, lengths))
    except IndexError:  # a chunk longer than the table
        canonical = False
    if not canonical:
        digits = b"".join(sizes)
        if digits.translate(None, _HEX_DIGITS) or max(map(len, sizes)) > MAX_CHUNK_SIZE_DIGITS:
            return -1  # pieces out of step, an extension, a bare LF, a sign or too many digits
        try:
            if list(map(int, sizes, repeat(16))) != lengths:
                return -1
        except ValueError:  # an empty size line
            return -1
    if 0 in lengths:  # the last chunk: it and its trailers go through the exact loop
        pairs = lengths.index(0)
        del datas[pairs:], lengths[pairs:], sizes[pairs:]
    parts.extend(datas)
    return pos + sum(map(len, sizes)) + sum(lengths) + 4 * pairs


def _parse_chunk_size(line: bytes, offset: int) -> int:
    if not line.endswith(b"\r"):
        raise _ChunkedReader._error("chunk-size line ends in a bare LF", offset)
    size = line[:-1]
    semi = size.find(b";")
    if semi >= 0:
        size = size[:semi].rstrip(b" \t")  # chunk extensions are ignored (RFC 9112 §7.1.1)
    if not size or size.strip(_HEX_DIGITS) or len(size) > MAX_CHUNK_SIZE_DIGITS:
        raise _ChunkedReader._error("invalid chunk size %r" % excerpt(line[:-1]), offset)
    return int(size, 16)


def pick_reader(
    version: bytes, status: int, headers: Headers, method: bytes
) -> Tuple[BodyReader, bool]:
    """Pick the body reader by RFC 9112 §6.3; also say whether the framing allows reuse."""
    if method == b"HEAD" or status in (204, 304):
        return _NoBody(), True
    if method == b"CONNECT" and 200 <= status < 300:
        # RFC 9112 §6.3 rule 2: the connection is a tunnel after the head; whatever follows is
        # not a body (and must not be read as one), whatever the headers say.
        return _NoBody(), False
    transfer_codings = tokens(headers, b"transfer-encoding")
    if transfer_codings:
        # We never send TE, so chunked is the only coding a server may apply (RFC 9112 §6.1).
        if version == b"1.0":
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 response")
        if transfer_codings != [b"chunked"]:
            raise ProtocolError(
                "unsupported Transfer-Encoding %r" % b", ".join(transfer_codings).decode("latin-1")
            )
        # RFC 9112 §6.3: with Content-Length too, Transfer-Encoding wins but the connection
        # must not be reused.
        return _ChunkedReader(), not any(name == b"content-length" for name, _ in headers)
    declared = _values(headers, b"content-length")
    if declared:
        # RFC 9110 §8.6: a list of identical values ("42, 42") is the same length, repeated.
        lengths = {v.strip(b" \t") for v in b",".join(declared).split(b",")}
        if len(lengths) > 1:
            raise ProtocolError("conflicting Content-Length values")
        (length,) = lengths
        if not length or length.strip(_DECIMAL_DIGITS) or len(length) > MAX_CONTENT_LENGTH_DIGITS:
            raise ProtocolError("invalid Content-Length %r" % excerpt(length))
        return _ContentLengthReader(int(length)), True
    return _UntilCloseReader(), False  # the body ends when the connection does


def excerpt(data: bytes, limit: int = 60) -> str:
    text = data[:limit].decode("latin-1")
    return text + ("..." if len(data) > limit else "")
