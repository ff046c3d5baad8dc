"""The Consumer against scripted servers that speak CouchDB 3's exact wire format.

pouchdb-server (the real server of test_consumer.py) has integer seqs, no ``seq_interval``, no
``last_seq`` endings and its own chunking. These scripts reproduce what Apache CouchDB 3.5 sends
byte by byte (observed through a raw socket): its headers, opaque string seqs, rows ending in
``\\n`` packed several to a chunk, ``\\n`` heartbeat chunks, and the ``{"last_seq":..}`` line
that ends a feed on ``timeout`` or ``limit``. Every test also checks what the consumer *sent*.
"""

import gc
import json
import selectors
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

import pytest
from couch3 import (
    COUCH_HEAD,
    HEARTBEAT,
    ROW_BYTES,
    couch_end,
    doc_id,
    end_line,
    feed,
    normal_since_now,
    rig,
    row,
    rows,
    run_until,
    seq,
)
from scripted import (
    LAST_CHUNK,
    Close,
    Pause,
    Read,
    Request,
    ScriptedServer,
    Send,
    Stall,
    chunk,
)

from changeloop import Consumer, FeedEvent, Loop, ProtocolError, Server
from changeloop import _follow as follow_module
from changeloop._stream import FeedStream
from changeloop._transport import NonBlockingConnection, Want
from changeloop.checkpoint import MemoryCheckpoint

pytestmark = pytest.mark.timeout(10)

Change = Dict[str, Any]


def query(request: Request) -> Dict[str, str]:
    """The decoded query of a request (each parameter once)."""
    pairs = parse_qsl(urlsplit(request.target).query, keep_blank_values=True, strict_parsing=True)
    result = dict(pairs)
    assert len(result) == len(pairs), "a parameter was sent twice: %s" % request.target
    return result


def raw_query(request: Request) -> List[str]:
    return urlsplit(request.target).query.split("&")


# -- seqs -----------------------------------------------------------------------------------


def test_the_scripts_are_couchdb_shaped() -> None:
    assert len(row(1)) == len(row(123)) == ROW_BYTES
    assert len(rows(1, 2, 3, 4, 5, 6, 7)) == 1484  # CouchDB's chunk of 7 rows
    assert couch_end(seq(9)).endswith(b'","pending":0}\n\r\n1\r\n\n\r\n0\r\n\r\n')


def test_string_seqs_are_delivered_and_resumed_exactly() -> None:
    # Real CouchDB seqs are base64url and need no escaping, but they are opaque: a seq with
    # '+', '/' and '=' (CouchDB 2.0-era, or a proxy's own) must travel percent-encoded.
    odd = "3-g1AAAAE+eJzL/YWBgYMpgTmHgzcvPy09JdcjLz8gvLsk="
    cut = feed(chunk(row(1) + row(2) + row(3, odd)), then=Close())  # EOF before the last chunk
    with rig([cut, feed(chunk(row(4)))]) as r:
        r.start(since=0)
        r.run_until(lambda: len(r.changes) == 4)
        first, second = r.srv.requests
    assert [c["seq"] for c in r.changes] == [seq(1), seq(2), odd, seq(4)]
    assert query(first)["since"] == "0"
    assert query(second)["since"] == odd  # exactly the last delivered seq string
    assert "since=3-g1AAAAE%2BeJzL%2FYWBgYMpgTmHgzcvPy09JdcjLz8gvLsk%3D" in raw_query(second)
    assert r.consumer.last_seq == seq(4)
    (error,) = [e for e in r.events if e.kind == "error"]
    assert isinstance(error.error, ProtocolError) and error.will_retry
    assert error.seq == odd  # what it resumes from, reported with the error


def test_base64url_seqs_travel_unescaped() -> None:
    with rig([feed(chunk(row(5)), then=Close()), feed()]) as r:
        r.start(since=seq(4))
        r.run_until(lambda: len(r.srv.requests) == 2)
    assert raw_query(r.srv.requests[0])[1] == "since=" + seq(4)
    assert raw_query(r.srv.requests[1])[1] == "since=" + seq(5)


def test_null_seq_rows_are_delivered_and_the_last_real_seq_is_kept() -> None:
    # With seq_interval=N CouchDB sends "seq":null on most rows.
    body = row(1) + row(2, None) + row(3, None) + row(4) + row(5, None)
    with rig([feed(chunk(body), then=Close()), feed()]) as r:
        r.start(since=0, seq_interval=3)
        r.run_until(lambda: len(r.srv.requests) == 2)
        assert r.ids == [doc_id(n) for n in range(1, 6)]
        assert [c["seq"] for c in r.changes] == [seq(1), None, None, seq(4), None]
        assert r.consumer.last_seq == seq(4)
        first, second = r.srv.requests
    assert query(first)["seq_interval"] == "3"
    assert query(second)["since"] == seq(4)  # row 5 comes again: at-least-once, never lost


# -- framing: chunks are not lines ----------------------------------------------------------


def test_one_chunk_holding_many_rows() -> None:
    batch = rows(1, 2, 3, 4, 5, 6, 7)
    assert len(batch) == 1484
    script = feed(chunk(batch), chunk(rows(8, 9, 10, 11, 12, 13, 14)), chunk(row(15)))
    with rig([script]) as r:
        r.start()
        r.run_until(lambda: len(r.changes) == 15)
        stream = r.consumer._stream
        assert stream is not None and stream.decoder.rows == 15
    assert r.ids == [doc_id(n) for n in range(1, 16)]
    assert r.consumer.connections == 1 and r.consumer.last_seq == seq(15)


def test_one_row_split_over_many_chunks_in_separate_segments() -> None:
    line = row(1)
    pieces = [line[i : i + 50] for i in range(0, len(line), 50)]
    assert len(pieces) == 5
    script: List[Any] = [Read(), Send(COUCH_HEAD)]
    for piece in pieces:
        script += [Send(chunk(piece)), Pause(0.005)]  # each in its own read
    script += [Send(chunk(row(2))), Stall()]
    with rig([script]) as r:
        r.start()
        r.run_until(lambda: len(r.changes) == 2)
    assert r.changes[0] == json.loads(line)
    assert r.ids == [doc_id(1), doc_id(2)]


def test_a_newline_chunk_alone_ends_a_row_rather_than_being_a_heartbeat() -> None:
    # The reads of an idle feed take a shortcut past the parser (a lone "\n" chunk); a proxy
    # that re-chunks can send a row's own newline that way, and it must end the row.
    line = row(1)
    script: List[Any] = [Read(), Send(COUCH_HEAD + chunk(line[:-1])), Pause(0.005)]
    script += [Send(HEARTBEAT), Pause(0.005), Send(HEARTBEAT), Stall()]
    assert chunk(line[-1:]) == HEARTBEAT
    with rig([script]) as r:
        r.start()
        r.run_until(lambda: r.changes and r.consumer._caught_up)
        stream = r.stream()
        assert (stream.decoder.rows, stream.decoder.heartbeats) == (1, 1)
    assert r.changes == [json.loads(line)]


def test_rows_split_into_one_byte_chunks() -> None:
    body = rows(1, 2) + b"\n" + row(3)
    byte_chunks = b"".join(chunk(body[i : i + 1]) for i in range(len(body)))
    assert byte_chunks.startswith(b'1\r\n{\r\n1\r\n"\r\n')
    with rig([feed(byte_chunks)]) as r:
        r.start()
        r.run_until(lambda: len(r.changes) == 3)
        stream = r.consumer._stream
        assert stream is not None and stream.decoder.heartbeats == 1
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)]
    assert r.changes[2] == json.loads(row(3))


def test_crlf_line_ends() -> None:
    body = row(1, crlf=True) + b"\r\n" + row(2, crlf=True)
    with rig(
        [feed(chunk(body), chunk(row(3, crlf=True)[:100]), chunk(row(3, crlf=True)[100:]))]
    ) as r:
        r.start()
        r.run_until(lambda: len(r.changes) == 3)
        assert r.kinds() == ["connect", "caught_up"]  # the "\r\n" line is a heartbeat
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)]


# -- heartbeats and the end of a feed -------------------------------------------------------


def test_heartbeats_are_not_changes_and_the_first_one_means_caught_up() -> None:
    log: List[Tuple[str, Any]] = []
    script: List[Any] = [
        Read(),
        Send(COUCH_HEAD + chunk(rows(1, 2))),  # the backlog comes first...
        Pause(0.02),
        Send(HEARTBEAT),  # ...then the server idles
        Pause(0.02),
        Send(HEARTBEAT + HEARTBEAT + chunk(row(3))),  # a "\n" chunk precedes each live batch
        Stall(),
    ]
    with rig([script]) as r:
        r.consumer.on_caught_up = lambda event: log.append(("caught_up", event))
        r.consumer.start(lambda change: log.append(("change", change["id"])), since=0)
        r.run_until(lambda: len(log) == 4)
        stream = r.consumer._stream
        assert stream is not None and stream.decoder.heartbeats == 3
    assert [entry[0] for entry in log] == ["change", "change", "caught_up", "change"]
    event = log[2][1]
    assert isinstance(event, FeedEvent) and event.kind == "caught_up"
    assert event.seq == seq(2) and event.pending is None and event.consumer is r.consumer
    assert r.consumer.delivered == 3


def test_a_feed_that_opens_idle_is_caught_up_at_once() -> None:
    # CouchDB sends the head and a "\n" chunk at once when there is nothing to send.
    with rig([feed(HEARTBEAT)]) as r:
        r.start(since=seq(40))
        r.run_until(lambda: "caught_up" in r.kinds())
        assert r.kinds() == ["connect", "caught_up"] and r.changes == []
        assert r.consumer.last_seq == seq(40)


def test_since_now_is_resolved_once_and_never_sent_again() -> None:
    # A reconnection that said since=now would skip what changed during the outage.
    scripts = [normal_since_now(seq(41)), feed(HEARTBEAT, then=Close()), feed(chunk(row(42)))]
    with rig(scripts) as r:
        r.start(since="now", include_docs=True)
        r.run_until(lambda: r.changes)
        resolve, first, second = r.srv.requests
    assert query(resolve) == {"feed": "normal", "since": "now"}
    assert query(first)["feed"] == "continuous" and query(first)["since"] == seq(41)
    assert query(first)["include_docs"] == "true"
    assert query(second)["since"] == seq(41)  # not "now": nothing of the outage is lost
    assert r.ids == [doc_id(42)]
    assert r.consumer.connections == 2  # feed connections: the question is not one
    assert r.kinds() == ["connect", "caught_up", "disconnect", "error", "connect", "disconnect"]


def test_a_last_seq_end_is_resumed_from_exactly_that_seq() -> None:
    # timeout=1500 and nothing new: "\n", then after 1.5 s the last_seq chunk, "\n", 0-chunk.
    ended = feed(HEARTBEAT, couch_end(seq(7)), then=Close())
    with rig([ended, feed(HEARTBEAT + chunk(row(8)))]) as r:
        r.start(since=seq(7), timeout=1500)
        r.run_until(lambda: len(r.changes) == 1)
        first, second = r.srv.requests
        assert r.kinds() == ["connect", "caught_up", "disconnect", "connect"]  # no error
    assert query(first)["timeout"] == "1500"
    assert query(second)["since"] == seq(7) and query(second)["timeout"] == "1500"
    assert r.events[2].error is None and r.consumer.connections == 2
    assert r.ids == [doc_id(8)] and r.consumer.last_seq == seq(8)


def test_a_last_seq_end_moves_the_resume_point_past_filtered_out_changes() -> None:
    # A filtered feed can end at a seq later than any row it sent.
    ended = feed(chunk(row(3)), couch_end(seq(9), pending=0), then=Close())
    with rig([ended, feed(HEARTBEAT)]) as r:
        r.start(since=0, filter_name="app/important")
        r.run_until(lambda: len(r.srv.requests) == 2)
    assert r.consumer.last_seq == seq(9) and query(r.srv.requests[1])["since"] == seq(9)
    caught_up = [e for e in r.events if e.kind == "caught_up"]
    assert len(caught_up) == 1 and caught_up[0].pending == 0 and caught_up[0].seq == seq(9)


def test_limit_counts_across_a_clean_end_and_resumes_with_what_is_left() -> None:
    # limit=5 but the feed ends cleanly after 2 rows (the server's timeout, not its limit): the
    # client counts the limit itself, resumes after seq 2 asking for the 3 left, and stops at 5.
    ended = feed(chunk(rows(1, 2) + end_line(seq(2), pending=0)) + HEARTBEAT + LAST_CHUNK)
    with rig([ended, feed(chunk(rows(3, 4, 5, 6)) + HEARTBEAT)]) as r:
        r.consumer.wait(r.changes.append, since=0, limit=5)
    assert r.ids == [doc_id(n) for n in (1, 2, 3, 4, 5)] and r.consumer.last_seq == seq(5)
    assert r.consumer.state == "stopped" and r.consumer.error is None
    first, second = r.srv.requests
    assert query(first)["limit"] == "5" and query(second)["limit"] == "3"
    assert query(second)["since"] == seq(2)


def test_limit_stops_at_the_last_row_without_waiting_for_the_end() -> None:
    # CouchDB's limit=3: one chunk of 3 rows plus the last_seq line with pending=60.
    body = chunk(rows(1, 2, 3) + end_line(seq(3), pending=60)) + HEARTBEAT + LAST_CHUNK
    with rig([feed(body)]) as r:
        r.consumer.wait(r.changes.append, since=0, limit=3)
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)] and r.consumer.last_seq == seq(3)
    assert r.srv.connections == 1 and r.consumer.error is None


# -- what the consumer sends ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params, method, expected, body",
    [
        pytest.param(
            {"filter_name": "app/by_type", "type": "a", "n": 3},
            "GET",
            {"filter": "app/by_type", "type": "a", "n": "3"},
            None,
            id="js-filter-with-its-query-params",
        ),
        pytest.param(
            {"doc_ids": ["a", "b/c", "_design/x"]},
            "POST",
            {"filter": "_doc_ids"},
            {"doc_ids": ["a", "b/c", "_design/x"]},
            id="doc_ids",
        ),
        pytest.param(
            {"selector": {"type": "a", "n": {"$gt": 1}}},
            "POST",
            {"filter": "_selector", "selector": '{"type":"a","n":{"$gt":1}}'},
            {"selector": {"type": "a", "n": {"$gt": 1}}},
            id="selector-in-body-and-query",
        ),
        pytest.param(
            {"view": "app/typed"}, "GET", {"filter": "_view", "view": "app/typed"}, None, id="view"
        ),
        pytest.param(
            {"filter_name": "_design"}, "GET", {"filter": "_design"}, None, id="design-filter"
        ),
        pytest.param(
            {"include_docs": True, "conflicts": False, "style": "all_docs"},
            "GET",
            {"include_docs": "true", "conflicts": "false", "style": "all_docs"},
            None,
            id="booleans",
        ),
        pytest.param(
            {"heartbeat": 5000, "timeout": 60000},
            "GET",
            {"heartbeat": "5000", "timeout": "60000"},
            None,
            id="heartbeat-given",
        ),
    ],
)
def test_request_encoding(
    params: Dict[str, Any], method: str, expected: Dict[str, str], body: Optional[Any]
) -> None:
    with rig([feed(HEARTBEAT)]) as r:
        r.start(since=seq(40), **params)
        r.run_until(lambda: r.consumer.state == "streaming")
        (request,) = r.srv.requests
    assert request.method == method
    assert urlsplit(request.target).path == "/db/_changes"
    sent = query(request)
    assert sent.pop("feed") == "continuous" and sent.pop("since") == seq(40)
    sent.setdefault("heartbeat", "<missing>")
    expected = dict(expected)
    expected.setdefault("heartbeat", "30000")  # the default: 30 s, in CouchDB's milliseconds
    assert sent == expected
    assert request.header("Accept") == "application/json"
    if body is None:
        assert request.body == b"" and request.header("Content-Length") is None
    else:
        assert json.loads(request.body) == body
        assert request.header("Content-Type") == "application/json"
        assert request.header("Content-Length") == str(len(request.body))


def test_filter_params_are_percent_encoded() -> None:
    with rig([feed(HEARTBEAT)]) as r:
        r.start(since=0, filter_name="app/by_type", type="a b&c=d", include_docs=True)
        r.run_until(lambda: r.consumer.state == "streaming")
    sent = raw_query(r.srv.requests[0])
    assert sent[:3] == ["feed=continuous", "since=0", "filter=app%2Fby_type"]
    assert "type=a%20b%26c%3Dd" in sent and "include_docs=true" in sent


# -- iterating, stopping --------------------------------------------------------------------


def test_changes_iterator_over_a_continuous_feed() -> None:
    script = feed(chunk(rows(1, 2, 3)), HEARTBEAT, chunk(rows(4, 5)))
    with rig([script]) as r:
        with r.consumer.changes(since=0, heartbeat=1000) as changes:
            taken = [next(changes)["id"] for _ in range(5)]
        assert r.consumer.state == "idle"  # the iterator runs a consumer of its own
        (request,) = r.srv.requests
    assert taken == [doc_id(n) for n in range(1, 6)]
    assert query(request)["heartbeat"] == "1000"
    assert [e.kind for e in r.events][:2] == ["connect", "caught_up"]


def test_changes_iterator_checkpoints_what_it_returned_not_what_it_queued() -> None:
    store = MemoryCheckpoint()
    with rig([feed(chunk(rows(1, 2, 3, 4)))], checkpoint=store) as r:
        changes = r.consumer.changes(since=0)
        assert [next(changes)["id"], next(changes)["id"]] == [doc_id(1), doc_id(2)]
        follower = changes._follower
        assert follower is not None and follower.last_seq == seq(4)  # 4 rows were queued
        changes.close()
    assert store.load() == seq(2)  # rows 3 and 4 were dropped: they must come again


def test_changes_iterator_is_closed_with_its_consumer() -> None:
    with rig([feed(chunk(rows(1, 2)))]) as r:
        changes = r.consumer.changes(since=0)
        assert next(changes)["id"] == doc_id(1)
        follower = changes._follower
        assert follower is not None and follower.running
        r.consumer.close()
        assert not follower.running and follower._stream is None  # its socket is closed
        assert next(changes)["id"] == doc_id(2)  # what was queued is still there...
        with pytest.raises(StopIteration):
            next(changes)  # ...then the iteration ends


def test_stop_from_a_callback_takes_effect_after_that_change() -> None:
    with rig([feed(chunk(rows(1, 2, 3, 4, 5)))]) as r:

        def callback(change: Change) -> None:
            r.changes.append(change)
            if change["id"] == doc_id(3):
                r.consumer.stop()

        r.consumer.wait(callback, since=0)  # returns: stop() ended it
    assert r.ids == [doc_id(1), doc_id(2), doc_id(3)]  # 4 and 5 were not delivered
    assert r.consumer.last_seq == seq(3) and r.consumer.delivered == 3
    assert r.consumer.state == "stopped" and r.consumer.error is None
    assert r.kinds() == ["connect", "disconnect"] and r.srv.connections == 1


def test_stop_from_on_connect_delivers_nothing() -> None:
    with rig([feed(chunk(rows(1, 2)))]) as r:
        r.consumer.on_connect = lambda event: event.consumer.stop()
        r.start(since=0)
        r.run_until(lambda: r.consumer.state == "stopped")
        r.loop.run_once(0.05)
    assert r.changes == [] and r.consumer.last_seq == 0 and r.srv.connections == 1


def test_stop_from_on_caught_up_at_a_last_seq_end_does_not_reconnect() -> None:
    with rig([feed(couch_end(seq(4)), then=Close())]) as r:
        r.consumer.on_caught_up = lambda event: (r.events.append(event), event.consumer.stop())
        r.start(since=0)
        r.run_until(lambda: r.consumer.state == "stopped")
        for _ in range(5):
            r.loop.run_once(0.01)
    assert r.consumer.state == "stopped" and r.srv.connections == 1
    assert r.consumer.last_seq == seq(4)
    assert r.kinds() == ["connect", "caught_up", "disconnect"]  # each once


def test_wait_on_a_running_loop_is_refused_before_starting() -> None:
    with rig([feed(chunk(row(1)))]) as r:
        other = Consumer(r.consumer.db, r.loop)
        refusals: List[BaseException] = []

        def callback(change: Change) -> None:
            r.changes.append(change)
            try:
                other.wait(lambda change: None, since=0)
            except RuntimeError as exc:
                refusals.append(exc)

        r.consumer.start(callback, since=0)
        r.run_until(lambda: r.changes)
        other.close()
    (refusal,) = refusals
    assert str(refusal) == "the loop is already running: use start() on a running loop"
    assert other.state == "idle" and len(r.srv.requests) == 1


# -- an idle feed's reads -------------------------------------------------------------------


def test_an_idle_feeds_heartbeats_take_the_quiet_path() -> None:
    # A read that brings a lone heartbeat is answered None by the stream: no rows, nothing to
    # act on (the consumer only notes the time). A heartbeat that ends a partial line is not.
    line = row(1)
    script: List[Any] = [Read(), Send(COUCH_HEAD + chunk(line) + HEARTBEAT), Pause(0.02)]
    script += [Send(HEARTBEAT), Pause(0.02), Send(chunk(line[:-1])), Pause(0.02)]
    script += [Send(HEARTBEAT), Stall()]
    answers: List[Any] = []
    with ScriptedServer([script]) as srv:
        stream = FeedStream(
            NonBlockingConnection("127.0.0.1", srv.port),
            b"GET /db/_changes?feed=continuous HTTP/1.1\r\nHost: x\r\n\r\n",
            srv.url,
            max_line_bytes=1 << 20,
        )
        with selectors.DefaultSelector() as selector:
            stream.start()
            selector.register(stream.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE)
            deadline = time.monotonic() + 3.0
            while len(answers) < 3 and time.monotonic() < deadline:
                if selector.select(0.5):
                    answer = stream.on_ready()  # None, or a list of rows (often empty)
                    if answer is None or answer:
                        answers.append(answer)
                    if stream.want() is Want.READ:
                        selector.modify(stream.fileno(), selectors.EVENT_READ)
        stream.close()
    # The row (with the heartbeat after it in the same read), a quiet heartbeat, then the
    # heartbeat that ends the held partial line: the row again, not None.
    assert answers[:1] == [[json.loads(line)]] and answers[1] is None
    assert answers[2:] == [[json.loads(line)]]


def test_a_closed_loop_lets_go_of_its_streaming_consumers_at_once() -> None:
    # The watchdog wheel holds the consumers themselves; only the loop's timer holds the wheel.
    # So closing the loop frees a consumer the program dropped, by reference counting alone,
    # even while another consumer of the same loop (which refers to the wheel) is kept.
    script = feed(chunk(row(1)) + HEARTBEAT)
    with ScriptedServer([script]) as srv, Server(srv.url) as server:
        loop = Loop()
        kept = Consumer(server.get_db("kept"), loop)
        dropped = Consumer(server.get_db("dropped"), loop)
        for consumer in (kept, dropped):
            consumer.start(lambda change: None, since=0)
        run_until(loop, lambda both=(kept, dropped): all(c._caught_up for c in both))
        ref = weakref.ref(dropped)
        streams = [c._stream for c in (kept, dropped)]
        gc.disable()  # what frees it must be reference counting, not a collection
        try:
            loop.close()
            del dropped, consumer
            assert ref() is None
        finally:
            gc.enable()
            for stream in streams:
                assert stream is not None
                stream.close()  # what the finalizers would do, without ResourceWarnings


def test_a_consumer_waiting_for_its_turn_connects_once_after_a_stop_and_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loop's connect gate lets MAX_CONNECTING_PER_LOOP consumers connect at a time; the
    # others wait in turn, each once however often it is stopped and started meanwhile.
    monkeypatch.setattr(follow_module, "MAX_CONNECTING_PER_LOOP", 1)
    slow = [Read(), Pause(0.3), Send(COUCH_HEAD + chunk(row(1)) + HEARTBEAT), Stall()]
    with ScriptedServer([slow, feed(chunk(row(2)) + HEARTBEAT)]) as srv, Server(srv.url) as server:
        with Loop() as loop:
            first = Consumer(server.get_db("first"), loop)
            second = Consumer(server.get_db("second"), loop)
            first.start(lambda change: None, since=0)
            second.start(lambda change: None, since=0)
            run_until(loop, lambda: len(srv.requests) == 1)
            assert second.phase == "waiting" and second.state == "connecting"
            second.stop()
            second.start(lambda change: None, since=0)  # still waiting, once
            run_until(loop, lambda: first._caught_up and second._caught_up)
            assert second.phase == "streaming"
            assert len(srv.requests) == 2  # one connection each: none doubled
            assert (first.connections, second.connections) == (1, 1)
            first.stop()
            second.stop()


def test_a_dropped_loop_with_a_streaming_consumer_is_collected() -> None:
    # The watchdog wheels are found per loop through a registry that is weak on both sides: a
    # program that drops its loop and consumers without stopping them leaks nothing.
    with ScriptedServer([feed(chunk(row(1)) + HEARTBEAT)]) as srv, Server(srv.url) as server:
        loop = Loop()
        consumer = Consumer(server.get_db("db"), loop)
        consumer.start(lambda change: None, since=0)
        run_until(loop, lambda c=consumer: c._caught_up)  # type: ignore[misc]
        assert consumer._watchdogs is not None
        watchdogs = consumer._watchdogs()
        assert watchdogs is not None and len(watchdogs) == 1  # armed
        refs = [weakref.ref(loop), weakref.ref(consumer), weakref.ref(watchdogs)]
        stream = consumer._stream
        assert stream is not None
        stream.close()  # what the finalizers would do, without ResourceWarnings
        loop.close()
        del loop, consumer, watchdogs, stream
        gc.collect()
        assert [ref() for ref in refs] == [None, None, None]
