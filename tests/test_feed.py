"""The feed decoder: lines split after de-chunking, on the fast path and the plain fallback."""

import gc
import json
import random
import time
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from changeloop import _feed
from changeloop._feed import FAST_SCANNER, LastSeq, LineDecoder, decode_document
from changeloop.errors import FeedError, LineTooLongError

FAST_AND_PLAIN = pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])


class CollectingDecoder(LineDecoder):
    """A decoder that keeps every row it gave, for the tests to look at."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collected: List[Dict[str, Any]] = []


def decode(pieces: List[bytes], fast: bool, **kwargs: Any) -> LineDecoder:
    decoder = CollectingDecoder(fast=fast, **kwargs)
    for piece in pieces:
        decoder.collected.extend(decoder.feed(piece))
    return decoder


def rows_of(decoder: LineDecoder) -> List[Dict[str, Any]]:
    assert isinstance(decoder, CollectingDecoder)
    return decoder.collected


COUCHDB3_ROWS = [
    {"seq": "1-g1AAAAB", "id": "a", "changes": [{"rev": "1-x"}]},
    {"seq": "2-g1AAAAC", "id": "b", "changes": [{"rev": "1-y"}], "deleted": True},
    {"seq": None, "id": "c", "changes": [{"rev": "2-z"}]},
    {"seq": [3, "opaque"], "id": "d\u00e9j\u00e0 \u2603", "changes": [{"rev": "1-w"}]},
]


def stream(rows: List[Dict[str, Any]], newline: bytes = b"\n") -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + newline for r in rows)


def test_fast_scanner_is_available_on_cpython() -> None:
    assert FAST_SCANNER  # the benchmarks rely on it; the fallback is tested below regardless


@FAST_AND_PLAIN
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_rows_whole_bytewise_and_random_splits(fast: bool, newline: bytes) -> None:
    raw = b"\n" + stream(COUCHDB3_ROWS, newline) + b"\n\r\n"
    whole = decode([raw], fast)
    assert rows_of(whole) == COUCHDB3_ROWS
    assert whole.heartbeats == 3
    assert rows_of(decode([raw[i : i + 1] for i in range(len(raw))], fast)) == COUCHDB3_ROWS
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(raw)), 5))
        pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        assert rows_of(decode(pieces, fast)) == COUCHDB3_ROWS


@FAST_AND_PLAIN
def test_multibyte_utf8_split_between_receives(fast: bool) -> None:
    raw = stream([{"id": "\u2603\u2603", "seq": 1, "changes": []}])
    snowman = raw.index("\u2603".encode())
    decoder = decode([raw[: snowman + 1], raw[snowman + 1 :]], fast)
    assert rows_of(decoder)[0]["id"] == "\u2603\u2603"


@FAST_AND_PLAIN
def test_last_seq_line_ends_the_feed(fast: bool) -> None:
    raw = stream(COUCHDB3_ROWS[:2]) + b'{"last_seq":"2-g1AAAAC","pending":60}\n\n'
    decoder = decode([raw], fast)
    assert rows_of(decoder) == COUCHDB3_ROWS[:2]
    assert decoder.last_seq == LastSeq("2-g1AAAAC", 60)
    decoder.close()


@FAST_AND_PLAIN
def test_last_seq_without_pending(fast: bool) -> None:
    decoder = decode([b'{"last_seq":5}\n'], fast)
    assert decoder.last_seq == LastSeq(5, None)


@FAST_AND_PLAIN
def test_rows_after_last_seq_are_an_error(fast: bool) -> None:
    with pytest.raises(FeedError, match="after the last_seq"):
        decode([b'{"last_seq":5}\n{"seq":6,"id":"x","changes":[]}\n'], fast)


@FAST_AND_PLAIN
def test_error_row_is_reported(fast: bool) -> None:
    with pytest.raises(FeedError, match="error in the feed: unauthorized: go away"):
        decode([b'{"error":"unauthorized","reason":"go away"}\n'], fast)


@FAST_AND_PLAIN
@pytest.mark.parametrize(
    "line, message",
    [
        (b"not json\n", "not JSON"),
        (b'{"seq": 1\n', "not JSON"),
        (b'{"seq":1}{"seq":2}\n', "not JSON"),
        (b"[1,2]\n", "not a JSON object"),
        (b'"text"\n', "not a JSON object"),
        (b"\xff\xfe\n", "not UTF-8"),
    ],
)
def test_malformed_lines(fast: bool, line: bytes, message: str) -> None:
    with pytest.raises(FeedError, match=message):
        decode([line], fast)


@FAST_AND_PLAIN
def test_leading_and_trailing_blanks_are_tolerated(fast: bool) -> None:
    decoder = decode([b'  {"seq":1,"changes":[]}  \r\n'], fast)
    assert rows_of(decoder) == [{"seq": 1, "changes": []}]


@FAST_AND_PLAIN
def test_line_limit_without_newline(fast: bool) -> None:
    decoder = LineDecoder(max_line_bytes=100, fast=fast)
    decoder.feed(b'{"seq":1,"pad":"' + b"x" * 60)
    with pytest.raises(LineTooLongError, match="max_line_bytes"):
        decoder.feed(b"x" * 60)
    assert decoder.buffered <= 100  # memory stayed bounded by the limit


@FAST_AND_PLAIN
def test_line_limit_on_a_complete_line(fast: bool) -> None:
    with pytest.raises(LineTooLongError):
        decode([b'{"pad":"' + b"x" * 200 + b'"}\n'], fast, max_line_bytes=100)


def test_close_with_partial_line_is_an_error() -> None:
    decoder = LineDecoder()
    decoder.feed(b'{"seq":1')
    with pytest.raises(FeedError, match="middle of a line"):
        decoder.close()


def test_repr() -> None:
    decoder = decode([b'\n{"seq":1}\n{"se'], fast=True)
    assert repr(decoder) == "<LineDecoder rows=1 heartbeats=1 buffered=4 ended=False>"


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        LineDecoder(max_line_bytes=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
rows_strategy = st.lists(
    st.dictionaries(st.sampled_from(["seq", "id", "doc", "x\u00e9"]), json_values, max_size=4),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(rows=rows_strategy, cuts=st.lists(st.integers(0, 10_000), max_size=10), fast=st.booleans())
def test_any_split_gives_the_same_rows(
    rows: List[Dict[str, Any]], cuts: List[int], fast: bool
) -> None:
    rows = [r for r in rows if "error" not in r and "last_seq" not in r]
    raw = b"\n".join(json.dumps(r, ensure_ascii=False).encode() for r in rows) + b"\n"
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)])]
    assert rows_of(decode(pieces, fast)) == rows


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=300), fast=st.booleans())
def test_random_bytes_give_rows_or_feed_error(garbage: bytes, fast: bool) -> None:
    decoder = LineDecoder(max_line_bytes=128, fast=fast)
    try:
        for row in decoder.feed(garbage):
            assert isinstance(row, dict)
    except FeedError:
        pass
    assert decoder.buffered <= 128


# -- normal and longpoll documents ----------------------------------------------------------------


def test_decode_couchdb3_longpoll_layout() -> None:
    # What CouchDB 3.5 sends (see COUCHDB-WIRE.md): rows separated by ",\r\n", heartbeats inside.
    body = (
        b'{"results":[\n\n\n{"seq":"1-g1","id":"a","changes":[{"rev":"1-x"}]},\r\n'
        b'{"seq":"2-g1","id":"b","changes":[{"rev":"1-y"}]}\n],\n"last_seq":"2-g1","pending":0}\n\n'
    )
    document = decode_document(body)
    assert [r["id"] for r in document["results"]] == ["a", "b"]
    assert document["last_seq"] == "2-g1"
    assert document["pending"] == 0


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"rows":[]}', b'{"results":{}}', b"\xff"])
def test_decode_document_errors(body: bytes) -> None:
    with pytest.raises(FeedError):
        decode_document(body)


@pytest.mark.parametrize("collector_on", [True, False], ids=["gc-on", "gc-off"])
def test_a_large_document_is_decoded_with_the_collector_paused_then_restored(
    collector_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = b'{"seq":"%d-g1","id":"doc","changes":[{"rev":"1-x"}]}'
    body = b'{"results":[\n' + b",\r\n".join(row % n for n in range(30_000)) + b'\n],"last_seq":1}'
    assert len(body) >= _feed.PAUSE_GC_BYTES
    seen: List[bool] = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text: seen.append(gc.isenabled()) or real_loads(text))
    (gc.enable if collector_on else gc.disable)()
    try:
        document = decode_document(body)
        assert len(document["results"]) == 30_000 and document["results"][-1]["seq"] == "29999-g1"
        assert seen == [False] and gc.isenabled() is collector_on  # paused, then as it was
        with pytest.raises(FeedError, match="not JSON"):
            decode_document(body[:-1])  # cut short: the error restores the collector too
        assert gc.isenabled() is collector_on
        decode_document(row.join([b'{"results":[', b"]}"]) % 1)  # small: never paused
        assert seen[-1] is collector_on
    finally:
        gc.enable()


# -- a long line arriving in small receives (issue 16) --------------------------------------------


@FAST_AND_PLAIN
def test_line_limit_is_exact_across_receives(fast: bool) -> None:
    line = b'{"pad":"' + b"x" * 90 + b'"}'  # 100 bytes
    decoder = LineDecoder(max_line_bytes=100, fast=fast)
    for byte in range(len(line)):
        assert decoder.feed(line[byte : byte + 1]) == []
    assert decoder.buffered == 100  # exactly the limit is still held
    assert decoder.feed(b"\n") == [{"pad": "x" * 90}] and decoder.buffered == 0
    for byte in range(len(line)):
        decoder.feed(line[byte : byte + 1])
    with pytest.raises(LineTooLongError, match="exceeded 100 bytes"):
        decoder.feed(b"x")  # one byte over
    assert decoder.buffered == 100


def _seconds_to_decode(line: bytes, receive: int) -> float:
    best = float("inf")
    for _ in range(3):
        decoder = LineDecoder()
        start = time.perf_counter()
        for offset in range(0, len(line), receive):
            decoder.feed(line[offset : offset + receive])
        assert decoder.rows == 1
        best = min(best, time.perf_counter() - start)
    return best


def test_a_long_line_in_small_receives_costs_linear_time() -> None:
    # An 8 MiB row (CouchDB's largest document) dripped 1 KiB at a time by a slow server: the
    # partial line was re-joined on every receive, 26x slower than in 48 KiB receives. Joined
    # once, the small receives cost little more than the large ones (the JSON decode dominates).
    line = b'{"seq":1,"doc":"' + b"x" * (8 * 1024 * 1024) + b'"}\n'
    small = _seconds_to_decode(line, 1024)
    large = _seconds_to_decode(line, 48 * 1024)
    assert small < 4 * large + 0.05, (small, large)
