"""Parser benchmark: de-chunking a large CouchDB-style change stream, against the floor.

The stream is framed as CouchDB 3 frames a continuous feed: one row (about 184 bytes) per chunk,
with a heartbeat chunk now and then. It is fed to the parser in 64 KiB pieces, as a socket would
deliver it. The floor, measured in the same run on the same pieces, is the least any parser could
do: ``piece.split(b"\\n")``. The ratio says what the HTTP framing costs on top of that floor.

    python benchmarks/bench_parser.py [--rows N] [--rounds R]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from changeloop._events import Data, EndOfMessage, Sentinel  # noqa: E402
from changeloop._feed import LineDecoder  # noqa: E402
from changeloop._http import ResponseParser  # noqa: E402

RECV_BYTES = 64 * 1024
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def make_stream(rows: int) -> bytes:
    parts = [HEAD]
    for i in range(rows):
        row = (
            json.dumps(
                {
                    "seq": "%d-g1AAAAFReJzLYWBgYMpgTmHgzcvPy09JdcjLz8gvLskBCScyJNX___8_K4M5kS0XK"
                    % i,
                    "id": "doc-%08d" % i,
                    "changes": [{"rev": "1-967a00dff5e02add41819138abb3284d"}],
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        parts.append(b"%x\r\n%s\r\n" % (len(row), row))
        if i % 1000 == 999:
            parts.append(b"1\r\n\n\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def pieces_of(stream: bytes) -> List[bytes]:
    return [stream[i : i + RECV_BYTES] for i in range(0, len(stream), RECV_BYTES)]


def floor_split(pieces: List[bytes]) -> int:
    lines = 0
    for piece in pieces:
        lines += len(piece.split(b"\n"))
    return lines


def parse(pieces: List[bytes]) -> int:
    parser = ResponseParser()
    body = 0
    for piece in pieces:
        parser.receive_data(piece)
        while True:
            event = parser.next_event()
            if type(event) is Data:
                body += len(event.data)
            elif isinstance(event, (Sentinel, EndOfMessage)):
                break
    return body


def parse_and_split_lines(pieces: List[bytes]) -> int:
    parser = ResponseParser()
    decoder = LineDecoder()
    rows = 0
    for piece in pieces:
        parser.receive_data(piece)
        while True:
            event = parser.next_event()
            if type(event) is Data:
                rows += len(decoder.feed(event.data))
            elif isinstance(event, (Sentinel, EndOfMessage)):
                break
    return rows


def timings(fn: Callable[[List[bytes]], int], pieces: List[bytes], rounds: int) -> List[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(pieces)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    stream = make_stream(args.rows)
    pieces = pieces_of(stream)
    megabytes = len(stream) / 1e6
    print(
        "command: python benchmarks/bench_parser.py --rows %d --rounds %d"
        % (args.rows, args.rounds)
    )
    print(
        "machine: %d cores, %s %s, %s"
        % (
            os.cpu_count() or 0,
            platform.python_implementation(),
            platform.python_version(),
            platform.machine(),
        )
    )
    print("stream: %d rows, %.1f MB, %d-byte receives" % (args.rows, megabytes, RECV_BYTES))
    floor = statistics.median(timings(floor_split, pieces, args.rounds))
    print("%-44s %8.1f MB/s  ratio 1.00" % ("floor: piece.split(b'\\n')", megabytes / floor))
    for name, fn in (
        ("ResponseParser (de-chunk only)", parse),
        ("ResponseParser + LineDecoder (rows parsed)", parse_and_split_lines),
    ):
        median = statistics.median(timings(fn, pieces, args.rounds))
        print(
            "%-44s %8.1f MB/s  ratio %.2f of floor  (%.0f rows/s)"
            % (name, megabytes / median, floor / median, args.rows / median)
        )


if __name__ == "__main__":
    main()
