"""The cost of one idle feed's heartbeat at scale, counted by cachegrind: deterministic.

    python benchmarks/bench_idle_path.py                  # needs valgrind; ~4 min at 3,000 feeds
    python benchmarks/bench_idle_path.py --feeds 1000 --compare DIR
    python benchmarks/bench_idle_path.py --cpu            # process CPU instead (noisy, no valgrind)

bench_scale.py measures idle CPU over 15 s of wall-clock time, which moves by a point from run to
run on a shared machine. This one runs N consumers on one loop in one process, with a simulated
clock: a server side in the same process sends one heartbeat chunk at a time to a random feed,
advances the clock by 5 s / N, and runs one loop pass (the pattern of 5 s heartbeats, one event
per wake-up, watchdogs firing as they would). Under cachegrind (``valgrind --tool=cachegrind``,
an L2 of 512 KiB simulated) it counts, per heartbeat, the instructions, the L1 data misses and the
L2 misses, as the difference between a run of 1 and a run of 3 measured rounds (so start-up and
exit cancel out). The floor is the same pattern with a bare ``selectors`` loop that only
``recv``s and splits, as in bench_scale.py. Counts are the same whatever else the machine does.
"""

import argparse
import os
import random
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, List, Optional, Tuple

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
HEARTBEAT = b"1\r\n\n\r\n"
HERE = os.path.dirname(os.path.abspath(__file__))


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def changeloop_feeds(package_dir: str, feeds: int) -> Tuple[List[socket.socket], Any]:
    """N streaming consumers on a Loop with a fake clock; returns (server sockets, step)."""
    sys.path.insert(0, package_dir)
    from changeloop import Consumer, Loop, Server

    now = [1000.0]
    loop = Loop(clock=lambda: now[0])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    server = Server("http://127.0.0.1:%d" % listener.getsockname()[1])
    consumers = []
    for i in range(feeds):
        consumer = Consumer(server.get_db("db%d" % i), loop)
        consumer.start(lambda change: None, since=0, heartbeat=5000)
        consumers.append(consumer)
    conns: List[socket.socket] = []
    requests = {}
    waiting = selectors.DefaultSelector()
    waiting.register(listener, selectors.EVENT_READ)
    while len(conns) < feeds or not all(c._caught_up for c in consumers):
        loop.run_once(0)
        for key, _ in waiting.select(0):
            if key.fileobj is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    requests[conn] = b""
                    waiting.register(conn, selectors.EVENT_READ)
            else:
                conn = key.fileobj  # type: ignore[assignment]
                requests[conn] += conn.recv(65536)
                if b"\r\n\r\n" in requests[conn]:
                    del requests[conn]
                    waiting.unregister(conn)
                    conn.send(HEAD + HEARTBEAT)
                    conns.append(conn)
    waiting.close()
    step = 5.0 / feeds

    def after_send() -> None:
        now[0] += step
        loop.run_once(0)

    def check() -> None:
        assert all(c.state == "streaming" for c in consumers)

    return conns, (after_send, check)


def floor_feeds(feeds: int) -> Tuple[List[socket.socket], Any]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(feeds):
        client = socket.create_connection(listener.getsockname())
        client.setblocking(False)
        conns.append(listener.accept()[0])
        selector.register(client, selectors.EVENT_READ, [client, b""])

    def on_event(state: List[Any]) -> None:
        data = state[0].recv(65536)
        if not data:
            raise RuntimeError("closed")
        parts = (state[1] + data).split(b"\r\n")
        state[1] = parts.pop()

    def after_send() -> None:
        for key, _ in selector.select(0):
            on_event(key.data)

    return conns, (after_send, lambda: None)


def worker(args: argparse.Namespace) -> None:
    """One measured process: set up, warm up one round, run ``--rounds`` rounds, print."""
    import gc

    raise_fd_limit()
    if args.package == "floor":
        conns, (after_send, check) = floor_feeds(args.feeds)
    else:
        conns, (after_send, check) = changeloop_feeds(args.package, args.feeds)
    gc.collect()
    gc.freeze()  # what set-up made is no business of the collector's during the rounds
    rng = random.Random(1)
    cpu: List[float] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = list(range(args.feeds))
        rng.shuffle(order)
        start = time.process_time()
        for i in order:
            conns[i].send(HEARTBEAT)
            after_send()
        if round_:
            cpu.append((time.process_time() - start) / args.feeds)
    check()
    print("cpu-us-per-heartbeat %s" % " ".join("%.2f" % (c * 1e6) for c in cpu), flush=True)
    os._exit(0)  # no interpreter shutdown: its collection would blur the difference of runs


def cachegrind(package: str, feeds: int, rounds: int) -> Tuple[int, int, int]:
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        "--LL=524288,8,64",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--worker",
        package,
        "--feeds",
        str(feeds),
        "--rounds",
        str(rounds),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stderr
    counts = {}
    for line in out.splitlines():
        for name in ("I   refs:", "D1  misses:", "LLd misses:"):
            if name in line:
                counts[name] = int(line.split(name)[1].split()[0].replace(",", ""))
    return counts["I   refs:"], counts["D1  misses:"], counts["LLd misses:"]


def per_heartbeat(package: str, feeds: int) -> Tuple[float, float, float]:
    one = cachegrind(package, feeds, 1)
    three = cachegrind(package, feeds, 3)
    return tuple((b - a) / (2.0 * feeds) for a, b in zip(one, three))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feeds", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5, help="with --cpu or --worker")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR")
    parser.add_argument("--cpu", action="store_true", help="process CPU time, not cachegrind")
    parser.add_argument("--worker", metavar="PACKAGE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.package = args.worker
        worker(args)
        return
    if not args.cpu and shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind); or use --cpu")
    targets = [os.path.dirname(HERE)] + args.compare + ["floor"]
    print("command: python benchmarks/bench_idle_path.py %s" % " ".join(sys.argv[1:]))
    print("machine: %d cores, CPython %s" % (os.cpu_count() or 0, sys.version.split()[0]))
    print("feeds %d, one heartbeat per feed per simulated 5 s, one loop pass each" % args.feeds)
    floor: Optional[float] = None
    rows = []
    for target in reversed(targets):  # the floor first: the ratios need it
        label = "floor: bare selectors" if target == "floor" else "changeloop (%s)" % target
        if args.cpu:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    target,
                    "--feeds",
                    str(args.feeds),
                    "--rounds",
                    str(args.rounds),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            values = sorted(float(v) for v in out.split()[1:])
            median = values[len(values) // 2]
            floor = median if target == "floor" else floor
            rows.append("%-45s %8.2f us CPU  %5.2fx floor" % (label, median, median / floor))
        else:
            ir, d1, ll = per_heartbeat(target, args.feeds)
            floor = ir if target == "floor" else floor
            rows.append(
                "%-45s %8.0f instructions (%5.2fx floor) %7.1f L1d misses %6.1f L2 misses"
                % (label, ir, ir / floor, d1, ll)
            )
    print("per heartbeat:")
    for row in reversed(rows):
        print("  " + row)


if __name__ == "__main__":
    main()
