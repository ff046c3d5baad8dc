"""The sans-IO response parser: every framing fed whole, byte by byte, and at random splits."""

import random
import re
from typing import Iterable, List, Tuple, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from changeloop import _readers
from changeloop._events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Response,
    Sentinel,
)
from changeloop._http import ResponseParser
from changeloop._readers import MAX_CHUNK_LINE_BYTES, MAX_HEAD_BYTES, MAX_HEADER_COUNT
from changeloop.errors import ChangeloopError, ProtocolError


def feed(
    pieces: Iterable[bytes], method: str = "GET", eof: bool = False
) -> Tuple[List[Event], ResponseParser]:
    """Feed ``pieces`` one receive at a time; collect events until NEED_DATA or PAUSED."""
    parser = ResponseParser(method)
    events: List[Event] = []
    for piece in list(pieces) + ([b""] if eof else []):
        parser.receive_data(piece)
        while True:
            event = parser.next_event()
            if isinstance(event, Sentinel):
                break
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return events, parser


def merged(events: List[Event]) -> List[Union[Event, bytes]]:
    """Join adjacent Data events, since how bytes group into Data depends on the splits."""
    out: List[Union[Event, bytes]] = []
    for event in events:
        if isinstance(event, Data):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        else:
            out.append(event)
    return out


def splits(raw: bytes, seed: int) -> List[bytes]:
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(raw):
        step = rng.randint(1, 7)
        pieces.append(raw[pos : pos + step])
        pos += step
    return pieces


def three_ways(raw: bytes, **kwargs: object) -> List[Union[Event, bytes]]:
    """Parse whole, byte by byte and at random splits; assert all agree; return the result."""
    whole = merged(feed([raw], **kwargs)[0])  # type: ignore[arg-type]
    bytewise = merged(feed([raw[i : i + 1] for i in range(len(raw))], **kwargs)[0])  # type: ignore[arg-type]
    assert bytewise == whole
    for seed in range(5):
        assert merged(feed(splits(raw, seed), **kwargs)[0]) == whole  # type: ignore[arg-type]
    return whole


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- heads ----------------------------------------------------------------------------------------


def test_content_length_response_three_ways() -> None:
    raw = b'HTTP/1.1 201 Created\r\nContent-Length: 11\r\nX-Couch-Request-ID: a\r\n\r\n{"ok":true}'
    result = three_ways(raw)
    head = result[0]
    assert isinstance(head, Response)
    assert head.status_code == 201
    assert head.reason == b"Created"
    assert head.http_version == b"1.1"
    assert head.get_header(b"x-couch-request-id") == b"a"
    assert head.keep_alive is True
    assert result[1:] == [b'{"ok":true}', EndOfMessage()]


def test_header_names_lowercased_and_values_stripped() -> None:
    raw = b"HTTP/1.1 200 OK\r\nCONTENT-length:   2 \r\nX-A:\t b \t\r\n\r\nhi"
    head = three_ways(raw)[0]
    assert isinstance(head, Response)
    assert head.headers == [(b"content-length", b"2"), (b"x-a", b"b")]


def test_bare_lf_head_is_accepted() -> None:
    # RFC 9112 §2.2: a recipient MAY recognise a single LF as a line terminator.
    assert three_ways(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi")[1:] == [b"hi", EndOfMessage()]


def test_obs_fold_is_unfolded() -> None:
    head = three_ways(b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nContent-Length: 0\r\n\r\n")[0]
    assert isinstance(head, Response)
    assert head.get_header(b"x-a") == b"one two"


def test_reason_phrase_may_be_missing() -> None:
    head = three_ways(b"HTTP/1.1 204\r\n\r\n")[0]
    assert isinstance(head, Response)
    assert (head.status_code, head.reason) == (204, b"")


def test_interim_1xx_responses_are_skipped() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    )
    result = three_ways(raw)
    assert isinstance(result[0], Response) and result[0].status_code == 200
    assert result[1:] == [b"x", EndOfMessage()]


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/11 200 OK",
        b"HTTPS/1.1 200 OK",
        b"ICY 200 OK",
        b"HTTP/2.0 200 OK",
        b"garbage",
    ],
)
def test_malformed_status_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="status line|HTTP version"):
        feed([line + b"\r\nContent-Length: 0\r\n\r\n"])


@pytest.mark.parametrize("code", [b"000", b"099", b"600", b"999"])
def test_status_codes_outside_100_to_599_are_protocol_errors(code: bytes) -> None:
    # A "000" from a broken proxy once read as "no error" and its body was delivered as changes.
    with pytest.raises(ProtocolError, match="outside 100-599"):
        three_ways(b"HTTP/1.1 " + code + b" Odd\r\nContent-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize(
    "header, message",
    [
        (b"Content-Length : 3", "invalid header name"),  # RFC 9112 §5.1: no space before colon
        (b"no colon here", "malformed header line"),
        (b": empty name", "malformed header line"),
        (b"X-A: a\rb", "control character"),
        (b"X-A: a\x00b", "control character"),
        (b"Bad Name: x", "invalid header name"),
    ],
)
def test_malformed_header_lines(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        feed([b"HTTP/1.1 200 OK\r\n" + header + b"\r\n\r\n"])


def test_head_continuation_without_field_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="continuation"):
        feed([b"HTTP/1.1 200 OK\r\n folded\r\n\r\n"])


def test_101_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="101"):
        feed([b"HTTP/1.1 101 Switching Protocols\r\n\r\n"])


def test_head_size_limit() -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES
    with pytest.raises(ProtocolError, match="MAX_HEAD_BYTES"):
        feed([big])  # no blank line yet: the limit applies before the head is complete


def test_header_count_limit() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (MAX_HEADER_COUNT + 1) + b"\r\n"
    with pytest.raises(ProtocolError, match="MAX_HEADER_COUNT"):
        feed([head])


def test_headers_that_never_end_are_bounded() -> None:
    parser = ResponseParser()
    parser.receive_data(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="MAX_HEAD_BYTES"):
        for _ in range(MAX_HEAD_BYTES // 10 + 10):
            parser.receive_data(b"X-A: 1234\r\n"[:10])  # lines, but never a blank one
            assert parser.next_event() is NEED_DATA


# -- keep-alive -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, keep_alive",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\n\r\n", False),  # read until close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", False),
    ],
)
def test_keep_alive_is_reported(head: bytes, keep_alive: bool) -> None:
    events, _ = feed([head])
    assert isinstance(events[0], Response)
    assert events[0].keep_alive is keep_alive


# -- Content-Length and until-close ---------------------------------------------------------------


def test_content_length_eof_early_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="after 3 of 10 body bytes"):
        feed([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], eof=True)


@pytest.mark.parametrize("value", [b"-1", b"1x", b"0x10", b"+5", b"1 2", b"9" * 20, b""])
def test_invalid_content_length(value: bytes) -> None:
    with pytest.raises(ProtocolError, match="Content-Length"):
        feed([b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n"])


def test_repeated_identical_content_length_is_accepted() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nhi"
    assert three_ways(raw)[1:] == [b"hi", EndOfMessage()]


def test_conflicting_content_length_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="conflicting"):
        feed([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"])


def test_read_until_close() -> None:
    raw = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":1}\n{"b":2}\n'
    result = three_ways(raw, eof=True)
    assert result[1:] == [b'{"a":1}\n{"b":2}\n', EndOfMessage()]


@pytest.mark.parametrize(
    "method, status", [("HEAD", 200), ("GET", 204), ("GET", 304), ("head", 200)]
)
def test_no_body_responses(method: str, status: int) -> None:
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 50\r\n\r\n" % status
    events, parser = feed([raw + b"HTTP/1.1"], method=method)
    assert events[1:] == [EndOfMessage()]
    assert parser.trailing_data == (b"HTTP/1.1", False)


# -- chunked --------------------------------------------------------------------------------------


def test_chunked_three_ways() -> None:
    raw = CHUNKED_HEAD + chunk(b"hello") + chunk(b" ") + chunk(b"world") + b"0\r\n\r\n"
    assert three_ways(raw)[1:] == [b"hello world", EndOfMessage()]


def test_chunked_many_chunks_come_out_as_one_data_event() -> None:
    body = b"".join(chunk(b'{"seq":%d}\n' % i) for i in range(100))
    events, _ = feed([CHUNKED_HEAD + body])
    assert [type(e) for e in events] == [Response, Data]
    assert events[1] == Data(b"".join(b'{"seq":%d}\n' % i for i in range(100)))


def test_chunk_extensions_are_ignored_and_uppercase_hex_accepted() -> None:
    raw = CHUNKED_HEAD + b"A;name=value;x\r\n0123456789\r\n1 ; ext\r\n!\r\n0;last\r\n\r\n"
    assert three_ways(raw)[1:] == [b"0123456789!", EndOfMessage()]


def test_trailers_are_parsed() -> None:
    raw = CHUNKED_HEAD + chunk(b"x") + b"0\r\nX-Trailer: 1\r\nX-Other:  two \r\n\r\n"
    assert three_ways(raw)[1:] == [b"x", EndOfMessage([(b"x-trailer", b"1"), (b"x-other", b"two")])]


def test_empty_chunked_body() -> None:
    assert three_ways(CHUNKED_HEAD + b"0\r\n\r\n")[1:] == [EndOfMessage()]


def test_couchdb_heartbeat_chunks() -> None:
    raw = CHUNKED_HEAD + b"1\r\n\n\r\n" * 3 + chunk(b'{"seq":"1-g1"}\n') + b"0\r\n\r\n"
    assert three_ways(raw)[1:] == [b'\n\n\n{"seq":"1-g1"}\n', EndOfMessage()]


def test_pipelined_bytes_after_the_message_are_kept() -> None:
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events, parser = feed([CHUNKED_HEAD + chunk(b"a") + b"0\r\n\r\n" + second])
    assert events[-1] == EndOfMessage()
    assert parser.next_event() is PAUSED
    assert parser.trailing_data == (second, False)
    parser.start_next_response("GET")
    assert isinstance(parser.next_event(), Response)
    assert parser.next_event() == Data(b"ok")
    assert parser.next_event() == EndOfMessage()


@pytest.mark.parametrize(
    "size_line",
    [b"-5", b"+5", b"0x5", b"5 5", b"g", b"", b" 5", b"1" * 17, b"ffffffffffffffffff", b"5\x00"],
)
def test_invalid_chunk_sizes(size_line: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid chunk size") as info:
        feed([CHUNKED_HEAD + size_line + b"\r\nhello\r\n0\r\n\r\n"])
    assert "at byte %d of the response" % len(CHUNKED_HEAD) in str(info.value)


def test_bare_lf_after_chunk_size_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="bare LF"):
        feed([CHUNKED_HEAD + b"5\nhello\r\n"])


@pytest.mark.parametrize("after", [b"XX", b"\n0\r\n\r\n", b"\r0\r\n", b"hello"])
def test_missing_crlf_after_chunk_data_is_rejected(after: bytes) -> None:
    with pytest.raises(ProtocolError, match="not followed by CRLF"):
        feed([CHUNKED_HEAD + b"5\r\nhello" + after])


def test_missing_crlf_after_chunk_data_is_rejected_byte_by_byte() -> None:
    raw = CHUNKED_HEAD + b"5\r\nhelloX\r\n"
    with pytest.raises(ProtocolError, match="not followed by CRLF"):
        feed([raw[i : i + 1] for i in range(len(raw))])


def test_chunk_size_line_length_is_capped() -> None:
    with pytest.raises(ProtocolError, match="chunk-size line longer"):
        feed([CHUNKED_HEAD + b"5;" + b"x" * MAX_CHUNK_LINE_BYTES])


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "before the last chunk"),
        (b"5\r\nhel", "inside a chunk, 2 bytes short"),
        (b"5\r\nhello", "connection closed"),
        (b"5\r\nhello\r\n0\r\n", "missing final CRLF"),
        (b"5\r\nhello\r\n0\r\nX-T: 1\r\n", "missing final CRLF"),
        (b"5\r", "before the last chunk"),
    ],
)
def test_eof_inside_chunked_body_is_an_error(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        feed([CHUNKED_HEAD + body], eof=True)


def test_unsupported_transfer_coding() -> None:
    with pytest.raises(ProtocolError, match="unsupported Transfer-Encoding"):
        feed([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"])


def test_transfer_encoding_in_http_1_0_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="HTTP/1.0"):
        feed([b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"])


# -- EOF and state --------------------------------------------------------------------------------


def test_eof_before_any_byte_is_connection_closed() -> None:
    events, parser = feed([], eof=True)
    assert events == [ConnectionClosed()]
    assert parser.state == "closed"


def test_eof_inside_head_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="in the response head"):
        feed([b"HTTP/1.1 200 OK\r\nContent-"], eof=True)


def test_parser_stays_failed_after_an_error() -> None:
    parser = ResponseParser()
    parser.receive_data(b"nonsense\r\n\r\n")
    with pytest.raises(ProtocolError):
        parser.next_event()
    with pytest.raises(ProtocolError, match="already failed"):
        parser.next_event()
    assert parser.state == "error"


def test_misuse_raises_runtime_error() -> None:
    parser = ResponseParser()
    with pytest.raises(RuntimeError):
        parser.start_next_response()
    parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"x")


def test_repr_says_where_it_is() -> None:
    _, parser = feed([CHUNKED_HEAD + b"5\r\nhel"])
    assert repr(parser) == "<ResponseParser state=body status=200 buffered=0 eof=False>"


# -- bulk de-chunking -----------------------------------------------------------------------


def test_bulk_dechunking_stays_on_for_plain_chunks_and_goes_off_for_crlf_in_data() -> None:
    # Chunks of plain rows are stripped in bulk; data holding CRLF (a normal feed's ",\r\n"
    # between rows) puts the split out of step: the exact loop then takes over for good,
    # rather than every receive paying for a split that cannot work.
    plain = [b'{"seq":%d}\n' % n for n in range(20)]
    crlf = [b'{"results":[\n'] + [b'{"seq":%d},\r\n' % n for n in range(20)]
    for pieces, bulk in ((plain, True), (crlf, False)):
        parser = ResponseParser()
        parser.receive_data(CHUNKED_HEAD + b"".join(chunk(piece) for piece in pieces))
        assert isinstance(parser.next_event(), Response)
        assert parser.next_event() == Data(b"".join(pieces))
        assert parser._reader._bulk is (bulk and _readers._CPYTHON)


# -- the heartbeat shortcut ------------------------------------------------------------------

HEARTBEAT = b"1\r\n\n\r\n"


def feed_offering_heartbeats(pieces: Iterable[bytes]) -> Tuple[List[Event], int]:
    """Like ``feed``, but each piece goes to ``receive_heartbeat`` first; count those taken."""
    parser = ResponseParser()
    events: List[Event] = []
    taken = 0
    for piece in pieces:
        if parser.receive_heartbeat(piece):
            taken += 1
            events.append(Data(b"\n"))  # what the caller does with a heartbeat taken
            assert parser.next_event() is NEED_DATA
            continue
        parser.receive_data(piece)
        while not isinstance(event := parser.next_event(), Sentinel):
            events.append(event)
    return events, taken


def test_a_lone_heartbeat_at_a_chunk_boundary_is_taken_in_one_call() -> None:
    parser = ResponseParser()
    assert not parser.receive_heartbeat(HEARTBEAT)  # no head yet
    parser.receive_data(CHUNKED_HEAD)
    assert isinstance(parser.next_event(), Response)
    assert parser.receive_heartbeat(HEARTBEAT)
    assert parser.next_event() is NEED_DATA
    assert not parser.receive_heartbeat(HEARTBEAT + HEARTBEAT)  # only a lone one
    assert not parser.receive_heartbeat(b"1\r\nx\r\n")
    parser.receive_data(b"3\r\nab")  # in the middle of a chunk: a "heartbeat" here is data
    assert parser.next_event() == Data(b"ab")
    assert not parser.receive_heartbeat(HEARTBEAT)
    parser.receive_data(b"c")
    assert parser.next_event() == Data(b"c")
    assert not parser.receive_heartbeat(HEARTBEAT)  # the chunk's CRLF is still due
    parser.receive_data(b"\r\n")
    assert parser.next_event() is NEED_DATA
    assert parser.receive_heartbeat(HEARTBEAT)
    parser.receive_data(b"0\r\n")  # the last chunk: trailers may follow
    assert parser.next_event() is NEED_DATA
    assert not parser.receive_heartbeat(HEARTBEAT)


def test_a_heartbeat_is_not_taken_where_bytes_wait_or_after_eof_or_without_chunks() -> None:
    parser = ResponseParser()
    parser.receive_data(CHUNKED_HEAD + b"1")  # the start of a size line waits in the buffer
    assert isinstance(parser.next_event(), Response) and parser.next_event() is NEED_DATA
    assert not parser.receive_heartbeat(HEARTBEAT)
    parser = ResponseParser()
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
    assert isinstance(parser.next_event(), Response)
    assert not parser.receive_heartbeat(HEARTBEAT)  # Content-Length bodies have no chunks
    parser = ResponseParser()
    parser.receive_data(CHUNKED_HEAD)
    assert isinstance(parser.next_event(), Response)
    parser.receive_data(b"")
    assert not parser.receive_heartbeat(HEARTBEAT)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.one_of(st.just(b"\n"), st.binary(min_size=1, max_size=30)), min_size=0, max_size=12
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20),
)
def test_offering_heartbeats_first_changes_nothing(rows: List[bytes], cuts: List[int]) -> None:
    raw = CHUNKED_HEAD + b"".join(chunk(r) for r in rows) + b"0\r\n\r\n"
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)])]
    pieces = [p for p in pieces if p]
    # Heartbeats arriving alone, as on an idle feed: cut around every heartbeat chunk too.
    lone = [q for p in pieces for q in re.split(b"(" + re.escape(HEARTBEAT) + b")", p) if q]
    for variant in (pieces, lone):
        events, _ = feed_offering_heartbeats(variant)
        assert merged(events) == merged(feed(variant)[0])
    taken = feed_offering_heartbeats([CHUNKED_HEAD, HEARTBEAT, HEARTBEAT, b"0\r\n\r\n"])[1]
    assert taken == 2


# -- properties -----------------------------------------------------------------------------------

ROWS = st.lists(st.binary(min_size=0, max_size=40), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_chunked_any_split_gives_the_same_body(rows: List[bytes], cuts: List[int]) -> None:
    raw = CHUNKED_HEAD + b"".join(chunk(r) for r in rows if r) + b"0\r\n\r\n"
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)])]
    events, _ = feed([p for p in pieces if p])
    assert merged(events)[1:] == ([b"".join(rows)] if b"".join(rows) else []) + [EndOfMessage()]


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_content_length_any_split(body: bytes, cuts: List[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)])]
    events, _ = feed([p for p in pieces if p])
    assert merged(events)[1:] == ([body] if body else []) + [EndOfMessage()]


PREFIXES = [
    b"",
    CHUNKED_HEAD,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n",
]


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.sampled_from(PREFIXES),
    garbage=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 700), max_size=8),
    eof=st.booleans(),
)
def test_random_bytes_only_give_events_need_data_or_protocol_error(
    prefix: bytes, garbage: bytes, cuts: List[int], eof: bool
) -> None:
    raw = prefix + garbage
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)]) if raw[a:b]]
    parser = ResponseParser()
    try:
        for piece in pieces + ([b""] if eof else []):
            parser.receive_data(piece)
            for _ in range(len(raw) + 10):  # bounded: a hang would show as running out of here
                event = parser.next_event()
                if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
                    break
                assert isinstance(event, (Response, Data, EndOfMessage))
            else:
                pytest.fail("next_event() kept returning events without consuming input")
    except ProtocolError:
        pass
    # Bounded memory: the parser never holds more than what it was given.
    buffered, _ = parser.trailing_data
    assert len(buffered) <= len(raw)


def test_protocol_error_is_a_changeloop_error() -> None:
    assert issubclass(ProtocolError, ChangeloopError)


def test_byte_by_byte_feeding_resumes_the_head_search() -> None:
    """Feeding a head one byte at a time must not rescan it (O(n), not O(n^2)): after every
    byte the blank-line search resumes at the end of the buffer, not at its start."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(90))
    parser = ResponseParser()
    for i in range(len(head)):
        parser.receive_data(head[i : i + 1])
        assert parser.next_event() is NEED_DATA
        assert parser._head_scan == i  # the last byte: where a split CRLF may continue
    parser.receive_data(b"Content-Length: 0\r\n\r\n")
    assert isinstance(parser.next_event(), Response)


def test_chunk_size_line_arriving_before_its_data() -> None:
    # Regression: a size line with none of its data yet must give NEED_DATA, not an empty Data.
    parser = ResponseParser()
    parser.receive_data(CHUNKED_HEAD + b"5\r\n")
    assert isinstance(parser.next_event(), Response)
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"hel")
    assert parser.next_event() == Data(b"hel")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"lo\r\n0\r\n\r\n")
    assert parser.next_event() == Data(b"lo")
    assert parser.next_event() == EndOfMessage()


# -- control characters in field values (RFC 9110 §5.5; issue 16) ---------------------------------


def assert_rejected_whole_and_bytewise(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        feed([raw])
    with pytest.raises(ProtocolError, match=message):
        feed([raw[i : i + 1] for i in range(len(raw))])


# Every byte RFC 9110 §5.5 keeps out of a field value (VCHAR, obs-text, SP and HTAB are allowed).
CONTROL_BYTES = [bytes([c]) for c in list(range(0x00, 0x09)) + list(range(0x0B, 0x20)) + [0x7F]]


@pytest.mark.parametrize("control", CONTROL_BYTES, ids=lambda b: "0x%02x" % b[0])
def test_control_characters_in_header_values_are_rejected(control: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: a" + control + b"b\r\nContent-Length: 0\r\n\r\n"
    assert_rejected_whole_and_bytewise(raw, "(?i)control character in header 'x-a'")


@pytest.mark.parametrize("control", CONTROL_BYTES, ids=lambda b: "0x%02x" % b[0])
def test_control_characters_in_obs_fold_continuations_are_rejected(control: bytes) -> None:
    # The continuation line was appended unchecked: a NUL or CR smuggled in after a fold passed.
    raw = b"HTTP/1.1 200 OK\r\nX-A: one\r\n  t" + control + b"wo\r\nContent-Length: 0\r\n\r\n"
    assert_rejected_whole_and_bytewise(raw, "(?i)control character in header 'x-a'")


@pytest.mark.parametrize("control", [b"\x00", b"\x1b", b"\x7f", b"\r"], ids=repr)
def test_control_characters_in_trailers_and_reason_phrases_are_rejected(control: bytes) -> None:
    trailer = CHUNKED_HEAD + chunk(b"x") + b"0\r\nX-T: a" + control + b"\r\n\r\n"
    assert_rejected_whole_and_bytewise(trailer, "control character in trailer")
    folded = CHUNKED_HEAD + chunk(b"x") + b"0\r\nX-T: a\r\n\tb" + control + b"\r\n\r\n"
    assert_rejected_whole_and_bytewise(folded, "control character in trailer")
    reason = b"HTTP/1.1 200 O" + control + b"K\r\nContent-Length: 0\r\n\r\n"
    assert_rejected_whole_and_bytewise(reason, "control character in status line")


def test_tabs_spaces_and_obs_text_in_values_are_accepted() -> None:
    raw = (
        b"HTTP/1.1 200 D\xe9j\xe0 vu\r\nX-A: a\tb c\r\nX-B: caf\xe9 \xff\r\n"
        b"X-C: one\r\n\ttwo\xe9\r\nContent-Length: 0\r\n\r\n"
    )
    head = three_ways(raw)[0]
    assert isinstance(head, Response)
    assert head.reason == b"D\xe9j\xe0 vu"
    assert head.headers[:3] == [
        (b"x-a", b"a\tb c"),
        (b"x-b", b"caf\xe9 \xff"),
        (b"x-c", b"one two\xe9"),
    ]
