"""Progress with real parts moving: a slow client read by the real reader, a
second thread and a second process watching, memcached killed and hung in the
middle of an upload, and the status route on a real HTTP server read by real
HTTP clients (JSON, JSONP, Server-Sent Events)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
import requests

from tests.support.memcached import MemcachedServer, memcached_server  # noqa: F401
from tests.support.wsgi import REPO_ROOT, serve
from uploadkit.handlers import UploadHandler
from uploadkit.multipart import encode_multipart
from uploadkit.progress import MemcachedStore, MemoryStore, ProgressApp, ProgressSettings, StoreProgress
from uploadkit.reader import read_multipart

FAST = ProgressSettings(interval=0.01, sse_poll=0.02)


class SlowStream:
    """A client body that trickles: at most ``chunk`` bytes per read, each
    after ``delay`` seconds; ``hooks[i]`` runs before the i-th read."""

    def __init__(self, body: bytes, chunk: int, delay: float,
                 hooks: Optional[Dict[int, Callable[[], None]]] = None) -> None:
        self.body = body
        self.pos = 0
        self.chunk = chunk
        self.delay = delay
        self.hooks = hooks or {}
        self.reads = 0
        self.waited = 0.0

    def read(self, n: int = -1) -> bytes:
        t0 = time.perf_counter()
        hook = self.hooks.get(self.reads)
        if hook is not None:
            hook()
        self.reads += 1
        time.sleep(self.delay)
        self.waited += time.perf_counter() - t0  # the client's time, not the server's
        n = self.chunk if n < 0 else min(n, self.chunk)
        data = self.body[self.pos:self.pos + n]
        self.pos += len(data)
        return data


class Sha256Sink(UploadHandler):
    """Keeps nothing but a hash per file: the tests check the bytes, not storage."""

    def __init__(self) -> None:
        self.digests: List[str] = []
        self._h: Any = None

    def file_start(self, info: Any) -> Any:
        self._h = hashlib.sha256()
        return None

    def receive(self, info: Any, chunk: bytes) -> Optional[bytes]:
        self._h.update(chunk)
        return None

    def file_end(self, info: Any) -> None:
        self.digests.append(self._h.hexdigest())
        return None


def make_body(sizes: List[int]) -> Tuple[bytes, str, List[bytes]]:
    datas = [bytes([65 + i]) * size for i, size in enumerate(sizes)]
    body, ctype = encode_multipart([("title", "holiday")],
                                   [("photos", f"p{i}.bin", "application/octet-stream", d)
                                    for i, d in enumerate(datas)])
    return body, ctype, datas


def upload(stream: SlowStream, body: bytes, ctype: str, listener: StoreProgress,
           sink: Optional[Sha256Sink] = None) -> Any:
    pipe = read_multipart(stream, content_type=ctype, content_length=len(body),
                          handlers=[sink or Sha256Sink()], progress=listener, read_size=1 << 20)
    pipe.close()
    return pipe


@pytest.fixture(params=["memory", "memcached"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        server: MemcachedServer = request.getfixturevalue("memcached_server")
        s = MemcachedStore(server.address)
        yield s
        s.close()


def test_progress_seen_from_another_thread_while_a_slow_client_streams(store: Any) -> None:
    body, ctype, _ = make_body([150_000, 150_000])
    seen: List[Dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            value = store.get("slow-1")
            if value is not None and (not seen or value != seen[-1]):
                seen.append(value)
            time.sleep(0.003)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        upload(SlowStream(body, 16384, 0.01), body, ctype, StoreProgress(store, "slow-1", FAST))
    finally:
        time.sleep(0.02)
        stop.set()
        watcher.join(5)
    uploading = [v for v in seen if v["state"] == "uploading"]
    middle = [v["received"] for v in uploading if 0 < v["received"] < len(body)]
    assert len(set(middle)) >= 3, [(v["state"], v["received"]) for v in seen]
    assert middle == sorted(middle)
    assert all(v["size"] == len(body) for v in uploading)
    assert any(v["files"] and not v["files"][0]["done"] for v in uploading)  # a file mid-way
    assert any(v["rate"] for v in uploading)
    final = seen[-1]
    assert (final["state"], final["received"], final["size"]) == ("done", len(body), len(body))
    assert [f["received"] for f in final["files"]] == [150_000, 150_000]


CHILD = r"""
import sys, time
from uploadkit.multipart import encode_multipart
from uploadkit.progress import MemcachedStore, ProgressSettings, StoreProgress
from uploadkit.reader import read_multipart
from uploadkit.handlers import UploadHandler

class Stream:
    def __init__(self, body):
        self.body, self.pos = body, 0
    def read(self, n):
        time.sleep(0.015)
        data = self.body[self.pos:self.pos + 32768]
        self.pos += len(data)
        return data

class Discard(UploadHandler):
    def receive(self, info, chunk):
        return None

address, pid = sys.argv[1], sys.argv[2]
body, ctype = encode_multipart([], [("file", "big.bin", "application/octet-stream", b"x" * 1_000_000)])
store = MemcachedStore(address)
listener = StoreProgress(store, pid, ProgressSettings(interval=0.01))
print("ready", flush=True)
sys.stdin.readline()
read_multipart(Stream(body), content_type=ctype, content_length=len(body), handlers=[Discard()],
               progress=listener).close()
print("done", len(body), flush=True)
"""


def test_progress_across_processes(memcached_server: MemcachedServer, tmp_path: Any) -> None:  # noqa: F811
    script = tmp_path / "child_upload.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.Popen([sys.executable, str(script), memcached_server.address, "other-proc"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    reader = MemcachedStore(memcached_server.address)
    app = ProgressApp(reader)
    seen: List[Dict[str, Any]] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == b"ready"
        with serve(app) as server, requests.Session() as http:
            url = f"{server.url}/upload/progress?X-Progress-ID=other-proc"
            assert http.get(url, timeout=5).json() == {"state": "starting"}  # polled before the upload
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = http.get(url, timeout=5)
                assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
                value = r.json()
                if not seen or value != seen[-1]:
                    seen.append(value)
                if value["state"] == "done":
                    break
                time.sleep(0.01)
        out, _ = proc.communicate(timeout=20)
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0 and out.startswith(b"done")
    total = int(out.split()[1])
    middle = [v["received"] for v in seen if v["state"] == "uploading" and 0 < v["received"] < total]
    assert len(set(middle)) >= 3, seen
    assert seen[-1]["state"] == "done" and seen[-1]["received"] == total
    assert seen[-1]["files"] == [{"field": "file", "filename": "big.bin", "received": 1_000_000, "done": True}]


def test_memcached_killed_mid_upload_then_restarted(memcached_server: MemcachedServer,  # noqa: F811
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="uploadkit.progress")
    body, ctype, datas = make_body([2_000_000])
    store = MemcachedStore(memcached_server.address, retry_after=0.15)
    listener = StoreProgress(store, "killed", FAST)
    stream = SlowStream(body, 32768, 0.01, hooks={15: memcached_server.stop, 40: memcached_server.start})
    sink = Sha256Sink()
    t0 = time.perf_counter()
    upload(stream, body, ctype, listener, sink)
    elapsed = time.perf_counter() - t0
    assert sink.digests == [hashlib.sha256(datas[0]).hexdigest()]  # the upload completed intact
    # Beyond the client's own pace (and the restart), the server spent little:
    # a stalled write would add 0.2 s timeouts.
    assert elapsed - stream.waited < 0.3, (elapsed, stream.waited)
    # The restarted server started empty: "done" is there because writes resumed.
    fresh = MemcachedStore(memcached_server.address)
    value = fresh.get("killed")
    assert value is not None and value["state"] == "done" and value["received"] == len(body)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed on" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
    fresh.close()
    store.close()


def test_memcached_hung_mid_upload_costs_one_timeout(memcached_server: MemcachedServer) -> None:  # noqa: F811
    body, ctype, datas = make_body([1_500_000])
    store = MemcachedStore(memcached_server.address, timeout=0.2, retry_after=60)
    listener = StoreProgress(store, "hung", FAST)
    proc = memcached_server.proc
    assert proc is not None
    stream = SlowStream(body, 32768, 0.01, hooks={10: lambda: proc.send_signal(signal.SIGSTOP)})
    sink = Sha256Sink()
    t0 = time.perf_counter()
    try:
        upload(stream, body, ctype, listener, sink)
    finally:
        proc.send_signal(signal.SIGCONT)
    elapsed = time.perf_counter() - t0
    assert sink.digests == [hashlib.sha256(datas[0]).hexdigest()]
    # one 0.2 s timeout opens the breaker; every later write is skipped at once
    assert elapsed - stream.waited < 0.2 + 0.3, (elapsed, stream.waited)
    assert not store.available
    store.close()


# -- the status route over HTTP -----------------------------------------------------------

def read_sse(response: requests.Response) -> Tuple[List[Dict[str, Any]], List[str]]:
    events: List[Dict[str, Any]] = []
    comments: List[str] = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
        elif line.startswith(":"):
            comments.append(line)
    return events, comments


def test_sse_follows_an_upload_over_http(memcached_server: MemcachedServer) -> None:  # noqa: F811
    store = MemcachedStore(memcached_server.address)
    body, ctype, _ = make_body([200_000, 100_000])
    with serve(ProgressApp(store, FAST)) as server:
        url = f"{server.url}/upload/progress?X-Progress-ID=sse-1"
        with requests.get(url, headers={"Accept": "text/event-stream"}, stream=True, timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-store"
            worker = threading.Thread(target=upload, args=(SlowStream(body, 16384, 0.01), body, ctype,
                                                            StoreProgress(store, "sse-1", FAST)))
            worker.start()
            t0 = time.monotonic()
            events, _ = read_sse(r)  # ends by itself on the final state
            assert time.monotonic() - t0 < 5
            worker.join(10)
    assert events[0]["state"] == "starting"
    assert events[-1]["state"] == "done" and events[-1]["received"] == len(body)
    received = [e["received"] for e in events if e["state"] == "uploading"]
    assert received == sorted(received) and len(set(received)) >= 3
    assert all(a != b for a, b in zip(events, events[1:]))  # one event per change
    store.close()


def test_sse_heartbeats_and_lifetime_over_http() -> None:
    settings = ProgressSettings(sse_poll=0.02, sse_heartbeat=0.1, sse_lifetime=0.6)
    with serve(ProgressApp(MemoryStore(), settings)) as server:
        t0 = time.monotonic()
        with httpx.stream("GET", f"{server.url}/upload/progress?X-Progress-ID=idle",
                          headers={"Accept": "text/event-stream"}, timeout=10) as r:
            lines = list(r.iter_lines())
        elapsed = time.monotonic() - t0
    assert 0.5 < elapsed < 2.5
    assert lines[0] == "retry: 1000" and lines[1] == 'data: {"state":"starting"}'
    assert lines.count(": keepalive") >= 3
    assert lines[-2].startswith(": lifetime over") or lines[-1].startswith(": lifetime over")


def test_jsonp_bad_ids_and_script_over_http() -> None:
    store = MemoryStore()
    store.set("j1", {"state": "uploading", "received": 3, "size": 9}, 60)
    with serve(ProgressApp(store)) as server, httpx.Client(base_url=server.url, timeout=5) as http:
        r = http.get("/upload/progress", params={"X-Progress-ID": "j1", "callback": "onProgress"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/javascript")
        assert r.text == '/**/onProgress({"state":"uploading","received":3,"size":9});'
        for callback in ["alert(document.cookie)", "a-b", "1a", ""]:
            r = http.get("/upload/progress", params={"X-Progress-ID": "j1", "callback": callback})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_callback"
        for bad in ["a b", "x" * 65, "../x", "\u00e9"]:
            r = http.get("/upload/progress", params={"X-Progress-ID": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_progress_id"
        r = http.get("/upload/progress", headers={"X-Progress-ID": "has.dot"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_progress_id"
        r = http.get("/upload/progress", headers={"X-Progress-ID": "j1"})
        assert r.json()["received"] == 3
        r = http.post("/upload/progress", params={"X-Progress-ID": "j1"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        r = http.get("/upload/progress/uploadkit.js")
        assert r.status_code == 200 and r.headers["content-type"] == "application/javascript; charset=utf-8"
        assert "uploadkit" in r.text
        assert http.get("/upload/progress/uploadkit.js",
                        headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_status_route_is_503_while_memcached_is_down(memcached_server: MemcachedServer) -> None:  # noqa: F811
    store = MemcachedStore(memcached_server.address, retry_after=0.2)
    store.set("m1", {"state": "uploading", "received": 1, "size": 2}, 60)
    with serve(ProgressApp(store)) as server, requests.Session() as http:
        url = f"{server.url}/upload/progress?X-Progress-ID=m1"
        assert http.get(url, timeout=5).json()["received"] == 1
        memcached_server.stop()
        for headers in ({}, {"Accept": "text/event-stream"}):
            t0 = time.monotonic()
            r = http.get(url, headers=headers, timeout=5)
            assert time.monotonic() - t0 < 1.0
            assert r.status_code == 503 and r.headers["Content-Type"] == "application/json"
            assert r.json()["error"]["code"] == "progress_unavailable"
        assert http.get(f"{server.url}/upload/progress?X-Progress-ID=bad%20id", timeout=5).status_code == 400
        memcached_server.start()
        time.sleep(0.25)
        r = http.get(url, timeout=5)
        assert r.status_code == 200 and r.json() == {"state": "starting"}  # a fresh, empty server
    store.close()


def test_js_helpers_run_in_node() -> None:
    """The script parses and its helpers work (node runs it without a DOM)."""
    node = "/usr/bin/node"
    if not os.path.exists(node):
        pytest.fail("node is required to check uploadkit.js (apt-get install nodejs)")
    path = os.path.join(REPO_ROOT, "uploadkit", "static", "uploadkit.js")
    program = r"""
const vm = require("vm"), fs = require("fs");
const ctx = {crypto: globalThis.crypto, Uint8Array, Math, JSON, Object, String, isNaN};
ctx.window = ctx;
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[1], "utf8"), ctx);
const u = ctx.uploadkit;
console.log(JSON.stringify({
  ids: [u.newId(), u.newId()],
  url: u.withId("/upload?next=%2F#top", "abc"),
  url2: u.withId("/upload", "abc"),
  size: u.formatSize(12 * 1024 * 1024),
  uploading: u.describe({state: "uploading", received: 5 << 20, size: 10 << 20, rate: 1 << 20, eta: 5}),
  processing: u.describe({state: "processing"}),
  error: u.describe({state: "error", status: 413, error: {message: "file 'a.png' is 12.0 MiB; the limit is 10.0 MiB"}}),
  progressUrl: u.progressUrl,
}));
"""
    out = subprocess.run([node, "-e", program, path], capture_output=True, timeout=20, check=True).stdout
    got = json.loads(out)
    from uploadkit.progress import PROGRESS_ID_RE
    assert all(PROGRESS_ID_RE.fullmatch(i) for i in got["ids"]) and got["ids"][0] != got["ids"][1]
    assert got["url"] == "/upload?next=%2F&X-Progress-ID=abc"
    assert got["url2"] == "/upload?X-Progress-ID=abc"
    assert got["size"] == "12.0 MiB"
    assert got["uploading"] == "Uploading 50%: 5.0 MiB of 10.0 MiB, 1.0 MiB/s, 5 s left"
    assert got["processing"] == "Processing\u2026"
    assert got["error"] == "Upload failed: file 'a.png' is 12.0 MiB; the limit is 10.0 MiB (413)"
    assert got["progressUrl"] == "/upload/progress"


# -- end to end through the middleware ------------------------------------------------------

def slow_post(port: int, path: str, body: bytes, ctype: str, piece: int, delay: float) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", ctype)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for i in range(0, len(body), piece):
                conn.send(body[i:i + piece])
                time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-body: the answer may still be readable
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_end_to_end_through_the_middleware(memcached_server: MemcachedServer) -> None:  # noqa: F811
    import warnings

    from uploadkit.limits import Limits
    with warnings.catch_warnings():
        # webob (under the middleware) imports the stdlib cgi module, deprecated in 3.11.
        warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
        from uploadkit.middleware import UploadMiddleware

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        files = environ["uploadkit.files"]
        body = json.dumps({name: f.size for name, f in files.items()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    store = MemcachedStore(memcached_server.address)
    wrapped = UploadMiddleware(app, progress=store, progress_settings=FAST,
                               limits=Limits(max_file_size=1_000_000), read_size=16384)
    body, ctype, _ = make_body([300_000])
    with serve(wrapped) as server, requests.Session() as http:
        status_url = f"{server.url}/upload/progress?X-Progress-ID=e2e-1"
        result: Dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(
            answer=slow_post(server.port, "/upload?X-Progress-ID=e2e-1", body, ctype, 16384, 0.01)))
        worker.start()
        seen: List[Dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            value = http.get(status_url, timeout=5).json()
            if not seen or value != seen[-1]:
                seen.append(value)
            if value["state"] in ("done", "error"):
                break
            time.sleep(0.01)
        worker.join(15)
        assert result["answer"][0] == 200 and json.loads(result["answer"][1]) == {"photos": 300_000}
        middle = [v["received"] for v in seen if v["state"] == "uploading" and 0 < v["received"] < len(body)]
        assert len(set(middle)) >= 3, seen
        assert seen[-1]["state"] == "done"
        assert seen[-1]["files"][0]["filename"] == "p0.bin"

        # A refusal mid-body reaches the status route with the server's message.
        big, big_type, _ = make_body([1_200_000])
        status, answer = slow_post(server.port, "/upload?X-Progress-ID=e2e-2", big, big_type, 65536, 0.002)
        assert status == 413 and json.loads(answer)["error"]["code"] == "file_too_large"
        value = http.get(f"{server.url}/upload/progress?X-Progress-ID=e2e-2", timeout=5).json()
        assert value["state"] == "error" and value["status"] == 413
        assert value["error"]["code"] == "file_too_large"
        assert http.get(f"{server.url}/upload/progress/uploadkit.js", timeout=5).status_code == 200
        r = http.post(f"{server.url}/upload?X-Progress-ID=bad%20id", files={"f": ("a.txt", b"hi")}, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_progress_id"
    store.close()
