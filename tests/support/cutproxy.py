"""A loopback TCP proxy in front of an HTTP/1.1 server that can cut a request mid-body.

Browsers cannot be told to lose a connection halfway through a request body;
this proxy does it for them. It reads each request the browser sends (request
line, headers, a ``Content-Length`` body), logs it, and forwards it; for the
request :attr:`CutProxy.cut` picks, it forwards only the first ``n`` bytes of
the body, then resets the browser's connection and closes the server's (the
server sees a body shorter than its Content-Length, as from a dropped network).
Answers flow back untouched. One request is cut at most. With ``stall=True``
the server's side is left open and silent instead, as when a client's network
goes away without a word (the server's read waits for bytes that never come).

    cut_second_patch = lambda req: 700_000 if (req.method, req.number) == ("PATCH", 2) else None
    with CutProxy(port, cut=cut_second_patch) as proxy:
        page.goto(proxy.url + "/")
        proxy.requests  # [Request(method, path, headers, number, cut), ...]
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]
    #: how many requests with this method came before it, plus one
    number: int = 0
    #: body bytes forwarded when this request was cut, else None
    cut: Optional[int] = None

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())


@dataclass
class CutProxy:
    target_port: int
    cut: Callable[[Request], Optional[int]] = lambda req: None
    requests: List[Request] = field(default_factory=list)
    stall: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {}
        self._done_cut = False
        self._sockets: List[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cut-proxy", daemon=True)

    def __enter__(self) -> "CutProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    def _answers(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(client)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        raise EOFError
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                assert "chunked" not in headers.get("transfer-encoding", ""), "chunked bodies are not proxied"
                with self._lock:
                    self._counts[method] = self._counts.get(method, 0) + 1
                    req = Request(method, path, headers, self._counts[method])
                    self.requests.append(req)
                    limit = None if self._done_cut else self.cut(req)
                    if limit is not None:
                        self._done_cut = True
                upstream.sendall(head + b"\r\n\r\n")
                left = int(headers.get("content-length", "0") or 0)
                sent = 0
                while left:
                    if not buf:
                        buf = client.recv(65536)
                        if not buf:
                            raise EOFError
                    piece, buf = buf[:left], buf[left:]
                    if limit is not None and sent + len(piece) >= limit:
                        upstream.sendall(piece[:limit - sent])
                        req.cut = limit
                        # The browser's side: a reset, as a network that drops does.
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        client.close()
                        if not self.stall:
                            _close(upstream)
                        return
                    upstream.sendall(piece)
                    sent += len(piece)
                    left -= len(piece)
        except (EOFError, OSError):
            pass
        _close(upstream)

    def of(self, method: str) -> List[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method]


def _close(s: socket.socket) -> None:
    """Shut down, then close: a bare close() while another thread is blocked in
    recv() on the socket sends no FIN until that recv returns (Linux)."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
