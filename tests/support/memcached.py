"""A real memcached server for tests, on a free 127.0.0.1 port.

The fixture fails (never skips) when the binary is missing: CI installs it.
Every server is stopped through its own Popen handle.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Iterator, List, Optional

import pytest

MEMCACHED_CANDIDATES = [os.environ.get("MEMCACHED_BIN", ""), "/usr/bin/memcached",
                        shutil.which("memcached") or ""]


def find_memcached() -> str:
    for path in MEMCACHED_CANDIDATES:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.fail("memcached is required for the progress tests and was not found "
                "(looked at $MEMCACHED_BIN, /usr/bin/memcached and PATH); "
                "install it, e.g. `apt-get install memcached`", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"version\r\n")
            return s.recv(64).startswith(b"VERSION")
    except OSError:
        return False


class MemcachedServer:
    """One memcached process; ``stop()`` and ``start()`` again keep the port."""

    def __init__(self, binary: str, port: Optional[int] = None) -> None:
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> List[str]:
        cmd = [self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0",
               "-m", "16", "-t", "2", "-c", "256"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["-u", "root"]  # memcached refuses to run as root without it
        return cmd

    def start(self, timeout: float = 5.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"memcached exited at start on port {self.port}: {err.strip()}")
            if _answers(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"memcached did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        """Kill the server (SIGKILL: it keeps nothing on disk, and SIGTERM makes
        it linger about a second)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_memcached() -> MemcachedServer:
    """Start a server on a free port, retrying if another process took the port first."""
    binary = find_memcached()
    last: Optional[Exception] = None
    for _ in range(3):
        server = MemcachedServer(binary)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    pytest.fail(f"could not start memcached: {last}", pytrace=False)


@pytest.fixture
def memcached_server() -> Iterator[MemcachedServer]:
    """A fresh, empty memcached for one test; stopped afterwards."""
    server = start_memcached()
    try:
        yield server
    finally:
        server.stop()
