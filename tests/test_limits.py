"""Open-file limits: raised when many feeds are asked for, and a clear error when they cannot be."""

import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource")

from changeloop import ResourceLimitError  # noqa: E402
from changeloop._transport import ensure_fd_capacity  # noqa: E402


def run_isolated(code: str) -> str:
    """Limits are per process: change them in a child, never in the test run itself."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def test_soft_limit_is_raised_toward_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the hard limit (%d) leaves no room to show the raise" % hard)
    output = run_isolated(
        """
        import resource
        from changeloop._transport import ensure_fd_capacity
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        ensure_fd_capacity(1000)
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    assert int(output) >= 1000 + 64


def test_impossible_capacity_says_what_was_needed_and_the_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on this machine")
    with pytest.raises(ResourceLimitError) as info:
        ensure_fd_capacity(hard + 1)
    message = str(info.value)
    assert "file descriptors are needed" in message
    assert "hard %d" % hard in message


def test_running_out_of_descriptors_is_a_clear_error() -> None:
    output = run_isolated(
        """
        import resource, socket
        from changeloop._transport import NonBlockingConnection
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        try:
            NonBlockingConnection("127.0.0.1", listener.getsockname()[1]).start()
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert output.startswith("ResourceLimitError out of file descriptors")
    assert "soft 32" in output
