"""A real HTTP proxy for the tests (tinyproxy, from Debian's packages), and a TLS front.

:func:`start_tinyproxy` runs tinyproxy in the foreground on a free loopback port with a config
written for the session: clients from 127.0.0.1 only, ``BasicAuth`` when a login is asked for,
``ConnectPort`` lines naming the ports CONNECT may reach (tinyproxy then refuses every other
with a 403). :func:`ensure_installed` finds tinyproxy, or installs it with ``apt-get`` (as root,
on a Debian-like system), the way ``testserver.py`` installs pouchdb-server; it raises
:class:`ProxyUnavailable`, with the reason, when it cannot. (On a machine with systemd, Debian's
package also starts a system-wide tinyproxy on port 8888; the tests never use that one.)

:class:`TLSFront` terminates TLS with a trustme certificate and forwards the plaintext to the
test server, so that ``https://`` through a proxy's CONNECT can be followed end to end.

    python tests/proxyserver.py --install-only    # install (or find) tinyproxy, say where
"""

import argparse
import contextlib
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Iterator, List, Optional, Sequence, Tuple, Type

__all__ = ["ProxyUnavailable", "RunningProxy", "TLSFront", "ensure_installed", "start_tinyproxy"]

#: apt-get of one small package; a slow mirror may take a while.
INSTALL_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 3
POLL_S = 0.05
RECV_BYTES = 65536
_SEARCH_PATH = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


class ProxyUnavailable(RuntimeError):
    """tinyproxy is not installed and cannot be installed here; the message says why."""


def find_tinyproxy() -> Optional[str]:
    """The tinyproxy binary on PATH or in the usual places (sbin is often not on PATH)."""
    found = shutil.which("tinyproxy")
    if found:
        return found
    for directory in _SEARCH_PATH:
        candidate = os.path.join(directory, "tinyproxy")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_installed() -> str:
    """Return tinyproxy's path, installing Debian's package first if it is missing.

    Raises:
        ProxyUnavailable: not installed, and no ``apt-get``, not root, or the install failed.
    """
    found = find_tinyproxy()
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise ProxyUnavailable(
            "tinyproxy is not installed and there is no apt-get to install it: install "
            "tinyproxy (any HTTP proxy package of that name) to run the proxy tests"
        )
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise ProxyUnavailable(
            "tinyproxy is not installed, and installing it needs root: "
            "sudo apt-get install -y tinyproxy"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "tinyproxy"]
    with _install_lock():
        if find_tinyproxy() is None and _run(install, env) != 0:
            # A fresh machine may have no package lists yet.
            _run(["apt-get", "update"], env)
            if _run(install, env) != 0:
                raise ProxyUnavailable("apt-get install tinyproxy failed (see its output above)")
    found = find_tinyproxy()
    if not found:
        raise ProxyUnavailable("apt-get installed tinyproxy, but no tinyproxy binary is there")
    return found


def _run(command: List[str], env: dict) -> int:
    try:
        return subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S
        ).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        print("%s: %s" % (" ".join(command), exc), file=sys.stderr)
        return 1


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise installers (parallel tox envs): apt's own lock would fail the second one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Debian
        yield
        return
    path = os.path.join(tempfile.gettempdir(), "changeloop-tinyproxy-install.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunningProxy:
    """A tinyproxy process; ``stop()`` it, or use it as a context manager."""

    def __init__(self, process: "subprocess.Popen[bytes]", port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.url = "http://127.0.0.1:%d" % port  #: Without credentials.
        self.log_path = workdir / "tinyproxy.log"

    def __repr__(self) -> str:
        state = "running" if self.process.poll() is None else "exited"
        return "<RunningProxy %s pid=%d %s>" % (self.url, self.process.pid, state)

    def __enter__(self) -> "RunningProxy":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return "(no log: %s)" % exc

    def stop(self) -> None:
        """SIGTERM to this process only (then SIGKILL), and remove its directory. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(str(self.workdir), ignore_errors=True)


def start_tinyproxy(
    *, login: Optional[Tuple[str, str]] = None, connect_ports: Sequence[int] = ()
) -> RunningProxy:
    """Start tinyproxy on a free 127.0.0.1 port and wait until it accepts connections.

    Args:
        login: ``(user, password)`` for ``BasicAuth`` (tinyproxy takes ``[-a-z0-9._]`` only).
        connect_ports: the only ports CONNECT may reach (none: CONNECT is refused everywhere).

    Raises:
        ProxyUnavailable: tinyproxy is missing and cannot be installed.
        RuntimeError: it did not start (with its log).
    """
    binary = ensure_installed()
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _start_once(binary, _free_port(), login, connect_ports)
        except _PortTaken:
            if attempt + 1 == PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_once(
    binary: str, port: int, login: Optional[Tuple[str, str]], connect_ports: Sequence[int]
) -> RunningProxy:
    workdir = Path(tempfile.mkdtemp(prefix="changeloop-tinyproxy-"))
    workdir.chmod(0o755)  # tinyproxy may drop to another user; it must still write its log
    lines = [
        "Port %d" % port,
        "Listen 127.0.0.1",
        "Timeout 600",
        "MaxClients 200",
        "LogLevel Info",
        'LogFile "%s"' % (workdir / "tinyproxy.log"),
        'PidFile "%s"' % (workdir / "tinyproxy.pid"),
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
    ]
    # No ConnectPort line would allow CONNECT to every port; "ConnectPort 0" to none.
    lines += ["ConnectPort %d" % p for p in connect_ports] or ["ConnectPort 0"]
    if login is not None:
        lines.append("BasicAuth %s %s" % login)
    config = workdir / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    (workdir / "tinyproxy.log").touch(mode=0o666)
    with open(workdir / "stdout.log", "wb") as out:
        process = subprocess.Popen(
            [binary, "-d", "-c", str(config)],
            cwd=str(workdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proxy = RunningProxy(process, port, workdir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                said = (workdir / "stdout.log").read_text(errors="replace") + proxy.log()
                if "Address already in use" in said:
                    raise _PortTaken(said)
                raise RuntimeError("tinyproxy exited with %s:\n%s" % (process.returncode, said))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return proxy
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tinyproxy did not listen within %.0f s" % STARTUP_TIMEOUT_S)
            time.sleep(POLL_S)
    except BaseException:
        proxy.stop()
        raise


class TLSFront:
    """Terminate TLS on a loopback port and forward the plaintext to ``target``, per connection.

    Args:
        target_host, target_port: the plain server behind.
        names: the host names and IP addresses the certificate is issued for.

    Attributes:
        port, url: where it listens (``https://127.0.0.1:port``).
        cafile: the PEM file of the CA that issued the certificate: trust it.
    """

    def __init__(self, target_host: str, target_port: int, names: Sequence[str]) -> None:
        import trustme

        self.target = (target_host, target_port)
        self._dir = tempfile.mkdtemp(prefix="changeloop-tlsfront-")
        ca = trustme.CA()
        self.cafile = os.path.join(self._dir, "ca.pem")
        ca.cert_pem.write_to_path(self.cafile)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self._context)
        self._closing = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self.url = "https://127.0.0.1:%d" % self.port
        self._acceptor = threading.Thread(target=self._accept, name="TLSFront", daemon=True)
        self._acceptor.start()

    def __repr__(self) -> str:
        return "<TLSFront %s -> %s:%d>" % (self.url, *self.target)

    def __enter__(self) -> "TLSFront":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        self._acceptor.join(STOP_TIMEOUT_S)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(STOP_TIMEOUT_S)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self.connections += 1
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.callback(client.close)
            client.settimeout(STOP_TIMEOUT_S)
            try:
                tls = self._context.wrap_socket(client, server_side=True)
            except OSError:
                return  # a client that refused our certificate, or went away
            stack.callback(tls.close)
            try:
                upstream = socket.create_connection(self.target, timeout=STOP_TIMEOUT_S)
            except OSError:
                return
            stack.callback(upstream.close)
            self._pump(tls, upstream)

    def _pump(self, tls: ssl.SSLSocket, upstream: socket.socket) -> None:
        # One thread, both directions: an SSL object must not be used by two threads at once.
        # Blocking sockets; select() says which has bytes, pending() covers decrypted ones.
        with selectors.DefaultSelector() as selector:
            selector.register(tls, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._closing.is_set():
                ready = [tls] if tls.pending() else [k.fileobj for k, _ in selector.select(POLL_S)]
                for sock in ready:
                    try:
                        data = sock.recv(RECV_BYTES)  # type: ignore[union-attr]
                        if not data:
                            return
                        (upstream if sock is tls else tls).sendall(data)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        continue
                    except OSError:
                        return


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Install tinyproxy for changeloop's tests.")
    parser.add_argument("--install-only", action="store_true", help="install, then exit")
    parser.parse_args(argv)
    try:
        print("tinyproxy ready: %s" % ensure_installed())
    except ProxyUnavailable as exc:
        print("tinyproxy unavailable: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
