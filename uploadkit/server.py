"""A small threaded WSGI server on the standard library, for the demo and tests.

wsgiref hands the app the socket's file as ``wsgi.input``, so bodies stream
instead of being buffered, and one thread per connection lets a progress poll
be answered while an upload is still arriving.

``inactivity_timeout`` bounds how long a connection may stay silent: it is the
socket timeout of every accepted connection, so a client that stops sending in
the middle of its body makes the read fail, and the reader refuses the upload
as ``client_disconnected`` (its handlers release what they opened). It bounds
stalls, not slowness: a client sending a byte a little more often than the
timeout keeps its connection.
"""

from __future__ import annotations

import signal
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Optional, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class QuietHandler(WSGIRequestHandler):
    """Logs one line a request, without the reverse-DNS lookup of the default,
    and applies the server's ``inactivity_timeout`` to its connection."""

    def setup(self) -> None:
        # StreamRequestHandler.setup() applies self.timeout to the socket.
        self.timeout = getattr(self.server, "inactivity_timeout", None)  # type: ignore[misc]
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:
            # Silent while sending its request line or headers: drop it. (A
            # stall inside the body reaches the app as a failed read instead.)
            self.close_connection = True

    def address_string(self) -> str:
        return str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        if getattr(self.server, "verbose", True):
            super().log_message(format, *args)


def make_threaded_server(app: Callable[..., Any], host: str = "127.0.0.1", port: int = 0,
                         verbose: bool = False,
                         inactivity_timeout: Optional[float] = None) -> ThreadingWSGIServer:
    """A thread-per-connection WSGI server bound to ``host:port``.

    :param inactivity_timeout: seconds a connection may stay silent (while
        sending its request or body, or not reading the answer) before it is
        cut; None waits for ever.
    """
    if inactivity_timeout is not None and not inactivity_timeout > 0:
        raise ValueError(f"inactivity_timeout must be a positive number of seconds, not {inactivity_timeout!r}")
    server = make_server(host, port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
    server.verbose = verbose  # type: ignore[attr-defined]
    server.inactivity_timeout = inactivity_timeout  # type: ignore[attr-defined]
    return server


class BackgroundServer:
    """A threaded server running in a thread: ``with BackgroundServer(app) as url:``."""

    def __init__(self, app: Callable[..., Any], host: str = "127.0.0.1", port: int = 0,
                 inactivity_timeout: Optional[float] = None) -> None:
        self.server = make_threaded_server(app, host, port, inactivity_timeout=inactivity_timeout)
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


def serve_until_stopped(server: ThreadingWSGIServer, banner: Sequence[str] = ()) -> int:
    """Print ``banner`` (its first line should carry the URL), then serve until
    Ctrl+C or SIGTERM (a service manager, ``kill``), and close. Returns 0."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGINT too: a process started in the background by a script
        # inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt, so the server would ignore Ctrl+C and kill -INT.
        # Before the banner: once the URL is out, the signals work.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _interrupt)
    try:
        for line in banner:
            print(line, flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
