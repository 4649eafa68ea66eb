"""What a real server's clients cannot do to it: gunicorn (sync and gthread
workers) and Werkzeug's server, driven over raw sockets.

* A request with neither Content-Length nor chunked encoding is 411
  ``length_required`` (gunicorn hands every body over as terminated, so the
  missing length shows only as an empty body).
* Slowloris clients (headers and a little body, then silence; or a byte every
  few tenths of a second) are refused with 408 ``client_timeout`` within
  ``Limits.idle_timeout`` / ``Limits.min_rate``, and the workers they held
  serve a normal upload right after, with nothing left in the temp dir.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest

from tests.support.wsgi import gunicorn, parse_response, raw_request  # noqa: F401  (first: imports webob quietly)
from tests.support.bodies import content_type, end, field_part, file_part
from tests.support.checks import sha, wait_empty

from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.multipart import encode_multipart
from uploadkit.progress import MemoryStore

WORKER_CLASSES = [("sync", 1), ("gthread", 2)]


def _first_response(raw: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """The first response on the connection (a keep-alive server may answer
    leftover bytes as a second request after it)."""
    status, headers, rest = parse_response(raw)
    return status, headers, rest[:int(headers.get("content-length", len(rest)))]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- 411 without a length ----------------------------------------------------------------


@pytest.mark.parametrize("worker_class,threads", WORKER_CLASSES)
def test_no_length_and_no_chunked_is_411_under_gunicorn(tmp_path: Any, worker_class: str,
                                                        threads: int) -> None:
    body = field_part("a", "1") + end()
    env = {"UPLOADKIT_TEST_TEMPDIR": str(tmp_path)}
    with gunicorn(env=env, worker_class=worker_class, threads=threads) as url:
        port = _port(url)
        for version, extra in (("1.1", "Connection: close\r\n"), ("1.1", ""), ("1.0", "")):
            head = (f"POST /up HTTP/{version}\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
                    f"{extra}\r\n").encode()
            status, headers, resp = _first_response(raw_request(port, head, body, timeout=10))
            assert status == 411, (version, extra, status, resp)
            err = json.loads(resp)["error"]
            assert err["code"] == "length_required" and "Content-Length" in err["message"]
            assert headers["content-type"] == "application/json"

        # chunked still streams through, and a declared length still works
        data = os.urandom(300_000)
        multipart, ctype = encode_multipart([("t", "x")], [("f", "c.bin", "application/octet-stream", data)])

        def gen() -> Iterator[bytes]:
            for i in range(0, len(multipart), 50_000):
                yield multipart[i:i + 50_000]

        with httpx.Client(timeout=20) as client:
            r = client.post(url + "/up", content=gen(), headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
            assert r.json()["files"][0]["sha256"] == sha(data)
            r = client.post(url + "/up", content=multipart, headers={"Content-Type": ctype})
            assert r.status_code == 200 and r.json()["files"][0]["content_sha256"] == sha(data)
    wait_empty(str(tmp_path))


# -- slowloris ---------------------------------------------------------------------------

IDLE = 1.0         # Limits.idle_timeout of the served app
MIN_RATE = 131072  # Limits.min_rate: a first read of 64 KiB gets IDLE + 0.5 s
DECLARED = 200_000
TRICKLE_EVERY = 0.4  # never silent for IDLE: only min_rate catches these


class Slowloris(threading.Thread):
    """One client: headers and the start of a body, then silence (or a byte
    every ``TRICKLE_EVERY`` seconds), reading the answer all along."""

    def __init__(self, port: int, trickle: bool, give_up: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.trickle = trickle
        self.give_up = give_up
        self.connected = threading.Event()
        self.answer = b""
        self.elapsed: Optional[float] = None
        self.error: Optional[str] = None

    def run(self) -> None:
        start = file_part("f", "slow.bin", b"s" * DECLARED)[:1000]
        head = (f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
                f"Content-Length: {DECLARED}\r\n\r\n").encode()
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(head + start)
                self.connected.set()
                chunks: List[bytes] = []
                deadline = began + self.give_up
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([s], [], [], TRICKLE_EVERY)
                    if ready:
                        data = s.recv(65536)
                        if not data:
                            break
                        chunks.append(data)
                        continue
                    if self.trickle and not chunks:
                        try:
                            s.send(b"s")
                        except OSError:  # the server closed its side: read what it said
                            pass
                self.answer = b"".join(chunks)
        except OSError as exc:
            self.error = repr(exc)
        finally:
            self.connected.set()
            self.elapsed = time.monotonic() - began


@pytest.mark.parametrize("worker_class,threads", WORKER_CLASSES)
def test_slowloris_clients_are_refused_and_workers_freed(tmp_path: Any, worker_class: str,
                                                         threads: int) -> None:
    workers = 2
    slots = workers * threads
    clients, tricklers = 20, 6
    # The longest a client holds a slot: silence ends at IDLE, a trickle at
    # IDLE + 64 KiB / MIN_RATE plus one more gap between its bytes.
    hold = IDLE + 65536 / MIN_RATE + TRICKLE_EVERY
    # Sync workers take turns accepting; a gthread worker accepts every
    # connection it can, so one worker's threads may get all of them.
    per_round = workers if worker_class == "sync" else threads
    rounds = -(-clients // per_round)
    bound = rounds * hold + 4.0  # + start-up and the answer's way back; far below
    # the 30 s after which gunicorn kills a silent sync worker (old code's only way out)
    env = {"UPLOADKIT_TEST_TEMPDIR": str(tmp_path), "UPLOADKIT_TEST_IDLE_TIMEOUT": str(IDLE),
           "UPLOADKIT_TEST_MIN_RATE": str(MIN_RATE)}
    with gunicorn(env=env, workers=workers, worker_class=worker_class, threads=threads) as url:
        port = _port(url)
        started = time.monotonic()
        crowd = [Slowloris(port, trickle=i < tricklers, give_up=bound + 2) for i in range(clients)]
        for c in crowd:
            c.start()
        for c in crowd:
            assert c.connected.wait(10)

        # A normal upload behind all of them: answered once a worker is free.
        data = os.urandom(500_000)
        multipart, ctype = encode_multipart([], [("f", "ok.bin", "application/octet-stream", data)])
        with httpx.Client(timeout=bound + 2) as client:
            try:
                r = client.post(url + "/up", content=multipart, headers={"Content-Type": ctype})
            except httpx.TimeoutException:
                pytest.fail(f"a normal upload behind {clients} stalled clients was not answered "
                            f"within {bound:.0f} s")
        waited = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["files"][0]["content_sha256"] == sha(data)
        assert waited < bound, f"the normal upload waited {waited:.1f} s (bound {bound:.1f} s)"

        for c in crowd:
            c.join(bound + 5)
        answered: List[Tuple[bool, int, str, float]] = []
        for c in crowd:
            assert c.error is None, c.error
            assert c.answer, (f"{'trickling' if c.trickle else 'stalled'} client got no answer "
                              f"within {c.give_up:.0f} s")
            status, headers, resp = _first_response(c.answer)
            err = json.loads(resp)["error"]
            assert c.elapsed is not None
            answered.append((c.trickle, status, err["code"], c.elapsed))
        assert {(t, s, code) for t, s, code, _ in answered} == {(True, 408, "client_timeout"),
                                                                (False, 408, "client_timeout")}
        # Each client is answered in its turn: the k-th answer within (k // per_round + 1)
        # holds of the start, plus the margin.
        for k, took in enumerate(sorted(e for *_, e in answered)):
            assert took < (k // per_round + 1) * hold + 4.0, (k, sorted(e for *_, e in answered))
        wait_empty(str(tmp_path))

        # The workers are all free again: a few uploads at once go straight through.
        with httpx.Client(timeout=10) as client:
            for _ in range(slots):
                r = client.post(url + "/up", content=multipart, headers={"Content-Type": ctype})
                assert r.status_code == 200
    wait_empty(str(tmp_path))


# -- Werkzeug's server hands over its socket too ------------------------------------------


def test_stalled_client_under_werkzeug_is_408_with_progress_error(tmp_path: Any) -> None:
    from werkzeug.serving import make_server

    store = MemoryStore()

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:  # pragma: no cover - never reached
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"reached the app"]

    mw = UploadMiddleware(app, tempdir=str(tmp_path), progress=store, memory_threshold=0,
                          limits=Limits(idle_timeout=0.5, min_rate=None))
    server = make_server("127.0.0.1", 0, mw, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        head = (f"POST /up?X-Progress-ID=stall1 HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
                f"Content-Length: 100000\r\n\r\n").encode()
        start = file_part("f", "slow.bin", b"z" * 100_000)[:20_000]
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(head + start)
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        took = time.monotonic() - began
        status, _, resp = _first_response(b"".join(chunks))
        assert status == 408 and json.loads(resp)["error"]["code"] == "client_timeout"
        assert 0.4 < took < 5, took
        r = httpx.get(f"http://127.0.0.1:{server.server_port}/upload/progress?X-Progress-ID=stall1", timeout=5)
        assert r.json()["state"] == "error", r.text
        wait_empty(str(tmp_path))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
