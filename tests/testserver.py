"""The real server the integration tests run against: pouchdb-server, installed and started here.

pouchdb-server is an independent implementation of CouchDB's HTTP API, pinned (with every
transitive dependency) by ``tests/testserver/package-lock.json``. It is installed once into a cache
directory named after the lock's hash, so a changed lock gets a fresh install and an unchanged one
is never reinstalled. Each test session starts it in memory mode on a free loopback port, in a
throw-away working directory (it writes ``config.json`` and ``log.txt`` into its cwd).

Set ``COUCHDB_URL`` to run the same suite against a real Apache CouchDB instead.

Only the standard library is used, so this runs before anything else is installed::

    python tests/testserver.py --install-only   # install (or check) the cached copy
    python tests/testserver.py [--port N]       # run it until Ctrl-C / SIGTERM
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import Iterator, List, Optional, Type

__all__ = [
    "PACKAGE_DIR",
    "RunningServer",
    "cache_dir",
    "ensure_installed",
    "server_url_from_env",
    "start_server",
]

PACKAGE_DIR = Path(__file__).resolve().parent / "testserver"
_PACKAGE_FILES = ("package.json", "package-lock.json")
_BIN_RELPATH = Path("node_modules", "pouchdb-server", "bin", "pouchdb-server")
# Written as the last step of an install, inside the temporary directory, before the rename that
# publishes it: a directory without it is an interrupted install, never a complete one.
_MARKER_NAME = ".changeloop-installed"
_HASH_CHARS = 12

# `npm ci` of ~350 packages took 6-20 s here with a cold npm cache; allow for slow mirrors.
NPM_CI_TIMEOUT_S = 600.0
# pouchdb-server is up in about 0.4 s; the bound only matters when something is wrong.
STARTUP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 5.0
# The same free port can be taken by someone else between our probe and node's bind.
PORT_ATTEMPTS = 3
LOG_TAIL_BYTES = 4000


def server_url_from_env() -> Optional[str]:
    """Return ``COUCHDB_URL`` if set, so the suite can run against a real Apache CouchDB."""
    return os.environ.get("COUCHDB_URL") or None


def cache_dir() -> Path:
    """Return the install directory for the current lock file (it may not exist yet).

    The parent is ``$CHANGELOOP_CACHE_DIR`` or ``~/.cache/changeloop``; the name carries the lock's
    hash so editing the lock never reuses a stale install.
    """
    digest = hashlib.sha256((PACKAGE_DIR / "package-lock.json").read_bytes()).hexdigest()
    parent = os.environ.get("CHANGELOOP_CACHE_DIR")
    base = Path(parent) if parent else Path.home() / ".cache" / "changeloop"
    return base / f"pouchdb-server-{digest[:_HASH_CHARS]}"


def ensure_installed() -> Path:
    """Install pouchdb-server into the cache unless it is already there.

    Safe to call from racing processes: an ``fcntl`` lock serialises installers where available,
    and in any case an install is published by renaming a finished temporary directory, which
    only one racer can win.

    Returns:
        The path of pouchdb-server's bin script (run it with ``node``).

    Raises:
        RuntimeError: ``node`` or ``npm`` is missing, or ``npm ci`` failed (with its output).
    """
    target = cache_dir()
    if (target / _MARKER_NAME).is_file():
        return target / _BIN_RELPATH
    _require_tools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(target.parent / (target.name + ".lock")):
        # Another process may have finished the install while we waited for the lock.
        if not (target / _MARKER_NAME).is_file():
            _install(target)
    return target / _BIN_RELPATH


def _require_tools() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"the test server needs Node.js: {' and '.join(missing)} not found on PATH. Install "
            "Node.js (>= 14) and npm, or set COUCHDB_URL to a running CouchDB, or deselect these "
            "tests with -m 'not server'."
        )


@contextlib.contextmanager
def _install_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; without ``fcntl`` (Windows) the rename still decides."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _install(target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix="." + target.name + "-", dir=str(target.parent)))
    staging.chmod(0o755)  # mkdtemp makes it private; the published cache is an ordinary dir
    try:
        for name in _PACKAGE_FILES:
            shutil.copy2(str(PACKAGE_DIR / name), str(staging / name))
        # --ignore-scripts: the native LevelDB/SQLite builds are not needed in memory mode, and
        # skipping them means no compiler is needed either.
        command = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        shown = " ".join(command)
        log_path = staging / "npm-ci.log"
        with open(log_path, "wb") as log:
            try:
                result = subprocess.run(
                    command,
                    cwd=str(staging),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=NPM_CI_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"{shown} timed out after {NPM_CI_TIMEOUT_S:.0f} s:\n{_tail(log_path)}"
                ) from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"{shown} failed with exit code {result.returncode}:\n{_tail(log_path)}"
            )
        if not (staging / _BIN_RELPATH).is_file():
            raise RuntimeError(f"npm ci succeeded but {_BIN_RELPATH} is missing")
        (staging / _MARKER_NAME).write_text("installed by tests/testserver.py\n")
        if target.exists() and not (target / _MARKER_NAME).is_file():
            # Left by a half-deleted cache or a copy made by hand: never trusted.
            shutil.rmtree(str(target))
        try:
            os.rename(str(staging), str(target))
        except OSError:
            # Lost a race with an installer that had no lock to respect; its copy is as good.
            if not (target / _MARKER_NAME).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(str(staging), ignore_errors=True)


class RunningServer:
    """A started pouchdb-server process; ``stop()`` it, or use it as a context manager."""

    def __init__(
        self, process: "subprocess.Popen[bytes]", port: int, workdir: Path, server_uuid: str
    ) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.uuid = server_uuid  # what `GET /` reports; tells this server from any other
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"

    @property
    def pid(self) -> int:
        """The node process's id (signals go to it alone, never to a process group)."""
        return self.process.pid

    def __repr__(self) -> str:
        state = "running" if self.process.poll() is None else "exited"
        return f"<RunningServer {self.url} pid={self.pid} {state}>"

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def log_tail(self) -> str:
        """Return the end of the server's log, for error messages."""
        return _tail(self.log_path)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout`` s) and remove its directory.

        Idempotent. Signals go to this process's own pid only.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(str(self.workdir), ignore_errors=True)


def start_server(
    port: Optional[int] = None,
    bin_path: Optional[Path] = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> RunningServer:
    """Start pouchdb-server in memory mode on 127.0.0.1 and wait until it answers.

    Args:
        port: the port to use; by default a free one is picked (and re-picked if it is taken).
        bin_path: pouchdb-server's bin script; by default ``ensure_installed()`` provides it.
        startup_timeout: how long to wait for ``GET /`` to answer, in seconds.

    Returns:
        The running server; the caller must ``stop()`` it.

    Raises:
        RuntimeError: the server exited during start-up or did not answer in time (with the
            tail of its log).
    """
    if bin_path is None:
        bin_path = ensure_installed()
    attempts = 1 if port is not None else PORT_ATTEMPTS
    for attempt in range(attempts):
        try:
            return _start_once(bin_path, port or _free_port(), startup_timeout)
        except _PortTaken:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    """The port we probed was bound by someone else before node could bind it."""


def _free_port() -> int:
    # Bind port 0 so the kernel picks an unused port; racy by nature, hence PORT_ATTEMPTS.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_once(bin_path: Path, port: int, startup_timeout: float) -> RunningServer:
    workdir = Path(tempfile.mkdtemp(prefix="changeloop-pouchdb-"))
    # pouchdb-server reads its uuid from ./config.json and reports it in `GET /`: giving it one
    # lets the readiness probe tell our process from anything else that holds the port.
    server_uuid = uuid.uuid4().hex
    (workdir / "config.json").write_text(json.dumps({"couchdb": {"uuid": server_uuid}}))
    command = [
        "node",
        # Node >= 15 exits on an unhandled promise rejection, and some malformed requests
        # trigger one inside pouchdb-server; a fault-injection test must not kill the server.
        "--unhandled-rejections=warn",
        str(bin_path),
        "--in-memory",
        "-o",
        "127.0.0.1",
        "-p",
        str(port),
        "-n",
        "--no-color",
    ]
    try:
        with open(workdir / "server.log", "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=str(workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C in a terminal reaches only us, and we stop it in order.
                start_new_session=True,
            )
    except BaseException:
        shutil.rmtree(str(workdir), ignore_errors=True)
        raise
    server = RunningServer(process, port, workdir, server_uuid)
    try:
        _wait_until_ready(server, startup_timeout)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        # pouchdb-server 4.2.0's listen-error handler calls an undefined stopTailingLog() when
        # run with -n, so a taken port shows up as that TypeError rather than as EADDRINUSE.
        if "EADDRINUSE" in tail or "stopTailingLog is not a function" in tail:
            raise _PortTaken(
                f"port {port} is already in use; pouchdb-server said:\n{tail}"
            ) from None
        raise
    return server


def _wait_until_ready(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        # The log goes away with the working directory, so messages carry its tail, not its path.
        if code is not None:
            raise RuntimeError(
                f"pouchdb-server exited with code {code} during start-up:\n{server.log_tail()}"
            )
        if _root_uuid(server.port) == server.uuid:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"pouchdb-server did not answer on {server.url} within {timeout:.0f} s:\n"
                f"{server.log_tail()}"
            )
        time.sleep(POLL_INTERVAL_S)


def _root_uuid(port: int) -> Optional[str]:
    """Return the ``uuid`` that ``GET /`` reports on ``port``, or None if nothing answers (yet)."""
    # http.client, not urllib: no proxy environment variables apply to it.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", "/", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        welcome = json.loads(body)
        return welcome.get("uuid") if isinstance(welcome, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def _tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line: install, or install and serve until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(description="Run pouchdb-server for changeloop's tests.")
    parser.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    parser.add_argument("--install-only", action="store_true", help="install, then exit")
    args = parser.parse_args(argv)

    started = time.monotonic()
    bin_path = ensure_installed()
    if args.install_only:
        print(f"pouchdb-server ready in {bin_path} ({time.monotonic() - started:.1f} s)")
        return 0

    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with start_server(port=args.port, bin_path=bin_path) as server:
        print(server.url, flush=True)
        print(f"pid {server.pid}, log {server.log_path}; Ctrl-C to stop", file=sys.stderr)
        # Wake up now and then to notice the server dying on its own.
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                print("pouchdb-server exited:\n" + server.log_tail(), file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
