"""Real WSGI servers on 127.0.0.1 for tests, and a raw-socket client.

``serve(app)`` runs the standard library's wsgiref server with one thread per
request on a free port and stops it when the block ends. wsgiref does not
decode chunked request bodies, so ``gunicorn_server`` runs gunicorn in a
subprocess (with :mod:`tests.support.gunicorn_app`) for those tests; it is
stopped through its own process handle.

    from tests.support.wsgi import wsgi_server  # noqa: F401  (fixture)
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

# WebOb 1.8 (under the middleware) imports the stdlib cgi module, deprecated in
# Python 3.11; with warnings as errors that import would fail. Test modules that
# use the middleware import this module first.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Joined at shutdown so no request thread outlives the test.
    block_on_close = True


class RunningServer:
    def __init__(self, server: ThreadingWSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.host, self.port = server.server_address[:2]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serve(app: Callable[..., Any]) -> Iterator[RunningServer]:
    """Serve ``app`` on 127.0.0.1 (free port) in a thread; stop it on exit."""
    server = make_server("127.0.0.1", 0, app, server_class=ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-wsgi-server", daemon=True)
    thread.start()
    running = RunningServer(server, thread)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def wsgi_server() -> Iterator[Callable[[Callable[..., Any]], RunningServer]]:
    """A factory: ``wsgi_server(app) -> RunningServer``; every server is stopped at teardown."""
    stack = contextlib.ExitStack()
    with stack:
        yield lambda app: stack.enter_context(serve(app))


# -- gunicorn in a subprocess ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gunicorn did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def gunicorn(app: str = "tests.support.gunicorn_app:app", env: Optional[Dict[str, str]] = None,
             timeout: float = 15.0, workers: int = 1, worker_class: str = "sync",
             threads: int = 1) -> Iterator[str]:
    """Run gunicorn (sync workers, or ``worker_class="gthread"`` with
    ``threads``) serving ``app``; yield its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
           "--worker-class", worker_class, "--threads", str(threads), "--timeout", "30",
           "--graceful-timeout", "2", "--log-level", "warning", app]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


# -- raw socket client ----------------------------------------------------------

def raw_request(port: int, head: bytes, body: bytes = b"", *, close_after_send: bool = False,
                timeout: float = 10.0) -> bytes:
    """Send ``head`` (request line and headers, ending in a blank line) and
    ``body``; return everything the server answered (b"" if it closed first).

    With ``close_after_send`` the socket is closed as soon as the bytes are out:
    a client that goes away in the middle of its body.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head + body)
        except OSError:  # the server refused and closed before taking it all: read its answer
            pass
        if close_after_send:
            s.shutdown(socket.SHUT_RDWR)
            return b""
        try:
            s.shutdown(socket.SHUT_WR)  # a body shorter than declared ends here
        except OSError:  # the server already closed its side: read what it said
            pass
        chunks: List[bytes] = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, Dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body
