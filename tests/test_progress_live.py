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

from tests.support.browser import chromium, page  # noqa: F401
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


# -- one hostile upload, and the uploads after it ---------------------------------------------

def _sizes_app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    files = environ["uploadkit.files"]
    body = json.dumps({"files": len(list(files.items())),
                       "bytes": sum(f.size for _, f in files.items())}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _middleware(app: Any, **kwargs: Any) -> Any:
    import warnings

    with warnings.catch_warnings():
        # webob (under the middleware) imports the stdlib cgi module, deprecated in 3.11.
        warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
        from uploadkit.middleware import UploadMiddleware
    return UploadMiddleware(app, **kwargs)


def test_a_hostile_upload_leaves_progress_working_for_the_next_ones(store: Any) -> None:
    """100 files whose field names are 7,900 control characters (six bytes of
    JSON each): the status must stay small, and memcached refusing it (as it
    would, over 1 MB) must not count as an outage for the uploads after it."""
    settings = ProgressSettings(interval=0.05)
    hostile, hostile_type = encode_multipart([], [("\x01" * 7900, f"h{i}.bin", "application/octet-stream",
                                                   b"h" * 64) for i in range(100)])
    assert 790_000 < len(hostile) < 900_000
    with serve(_middleware(_sizes_app, progress=store, progress_settings=settings)) as server, \
            requests.Session() as http:
        r = http.post(f"{server.url}/upload?X-Progress-ID=hostile", data=hostile,
                      headers={"Content-Type": hostile_type}, timeout=30)
        assert r.status_code == 200 and r.json() == {"files": 100, "bytes": 6400}, r.text[:300]
        poll = http.get(f"{server.url}/upload/progress?X-Progress-ID=hostile", timeout=5)
        assert poll.status_code == 200, poll.text[:300]
        value = poll.json()
        assert value["state"] == "done" and value["received"] == len(hostile)
        # The defaults: 64 KiB a status, 200 characters a name.
        assert len(poll.content) <= 64 * 1024 and value["file_count"] == 100
        assert {len(f["field"]) for f in value["files"]} == {200}
        if isinstance(store, MemoryStore):
            assert store.nbytes <= 64 * 1024
        else:
            assert store.available
        # The same worker's next uploads: their progress reads right at once.
        for n in range(5):
            body, ctype, _ = make_body([20_000 * (n + 1)])
            r = http.post(f"{server.url}/upload?X-Progress-ID=after-{n}", data=body,
                          headers={"Content-Type": ctype}, timeout=30)
            assert r.status_code == 200 and r.json()["bytes"] == 20_000 * (n + 1)
            poll = http.get(f"{server.url}/upload/progress?X-Progress-ID=after-{n}", timeout=5)
            assert poll.status_code == 200, poll.text[:300]
            assert (poll.json()["state"], poll.json()["received"]) == ("done", len(body))


# -- an upload that ended while memcached was down ----------------------------------------------

def test_an_upload_finished_during_an_outage_reads_done_once_memcached_is_back(
        memcached_server: MemcachedServer) -> None:  # noqa: F811
    store = MemcachedStore(memcached_server.address, retry_after=0.2)
    settings = ProgressSettings(interval=0.05, store_retry=0.2)
    body, ctype, _ = make_body([300_000])
    try:
        with serve(_middleware(_sizes_app, progress=store, progress_settings=settings)) as server, \
                requests.Session() as http:
            url = f"{server.url}/upload/progress?X-Progress-ID=offline-1"
            memcached_server.stop()
            r = http.post(f"{server.url}/upload?X-Progress-ID=offline-1", data=body,
                          headers={"Content-Type": ctype}, timeout=30)
            assert r.status_code == 200 and r.json()["bytes"] == 300_000  # progress never fails an upload
            assert http.get(url, timeout=5).status_code == 503
            memcached_server.start()  # the same port, an empty server
            deadline = time.monotonic() + 5
            value: Dict[str, Any] = {}
            while time.monotonic() < deadline:
                poll = http.get(url, timeout=5)
                value = poll.json() if poll.status_code == 200 else {"http": poll.status_code}
                if value.get("state") == "done":
                    break
                time.sleep(0.05)
            assert value.get("state") == "done", value
            assert value["received"] == value["size"] == len(body)
            assert value["files"] == [{"field": "photos", "filename": "p0.bin", "received": 300_000,
                                       "done": True}]
    finally:
        store.close()


# -- under gunicorn: many event streams, a worker killed mid-upload ------------------------------

def _cluster(tmp_path: Any, memcached: MemcachedServer, settings: Dict[str, Any]) -> Any:
    from tests.support.cluster import Cluster

    return Cluster(str(tmp_path), storage_url=str(tmp_path / "stored"), storage_options={},
                   memcached=memcached.address, workers=2, threads=4,
                   extra_env={"UPLOADKIT_CLUSTER_PROGRESS_SETTINGS": json.dumps(settings)})


def _stream(port: int, progress_id: str, timeout: float) -> Dict[str, Any]:
    """Open an event stream and read it to its end; when each thing happened."""
    import socket

    rec: Dict[str, Any] = {"id": progress_id}
    t0 = rec["sent"] = time.monotonic()
    raw = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET /upload/progress?X-Progress-ID={progress_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode())
            while time.monotonic() - t0 < timeout:
                data = s.recv(65536)
                now = time.monotonic()
                if not data:
                    rec["closed"] = now
                    break
                rec.setdefault("answered", now)
                rec["last_data"] = now
                raw += data
    except OSError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    head, _, rec["body"] = raw.partition(b"\r\n\r\n")
    rec["head"] = head.decode("latin-1").lower()
    return rec


def test_fifty_open_event_streams_leave_uploads_and_requests_answered(
        memcached_server: MemcachedServer, tmp_path: Any) -> None:  # noqa: F811
    """gunicorn gthread, 2 workers x 4 threads: 50 event streams for ids that
    never start, opened at once, beside uploads and plain GETs. Each worker
    holds at most ``sse_max_streams`` (2 by default) streams, each ending
    ``sse_start_wait`` after it began; the others get the JSON poll answer."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.cluster import Upload, http_get, run_upload

    start_wait = 2.0
    with _cluster(tmp_path, memcached_server, {"sse_start_wait": start_wait}) as cluster:
        port = cluster.port
        gets: List[Tuple[float, int]] = []

        def get(n: int) -> None:
            time.sleep(0.1 * n)
            t0 = time.monotonic()
            status, _, _ = http_get(port, "/pid", timeout=10)
            gets.append((time.monotonic() - t0, status))

        with ThreadPoolExecutor(80) as pool:
            streams = [pool.submit(_stream, port, f"idle-{i}", 15.0) for i in range(50)]
            time.sleep(0.2)  # the streams are in: now the work that must not wait for them
            uploads = [pool.submit(run_upload, port, Upload(i, 256 * 1024, f"beside-{i}"), "/upload-local")
                       for i in range(6)]
            plain = [pool.submit(get, n) for n in range(20)]
            for f in plain:
                f.result(timeout=30)
            done = [f.result(timeout=60) for f in uploads]
            records = [f.result(timeout=60) for f in streams]
        log_tail = cluster.log_tail()

    assert [s for s, _ in gets] and max(s for s, _ in gets) < 5.0 and {c for _, c in gets} == {200}, gets
    assert [(u.status, u.error) for u in done] == [(200, None)] * 6, log_tail
    assert all(u.seconds < 10.0 for u in done), [u.seconds for u in done]
    assert all("error" not in r and "closed" in r for r in records), [r.get("error") for r in records]
    streamed = [r for r in records if "content-type: text/event-stream" in r["head"]]
    polled = [r for r in records if "content-type: application/json" in r["head"]]
    assert len(streamed) + len(polled) == 50 and 1 <= len(streamed) <= 20, (len(streamed), len(polled))
    for r in polled:  # answered at once, as a poll
        assert r["closed"] - r["sent"] < 5.0 and json.loads(r["body"]) == {"state": "starting"}
    for r in streamed:  # held a thread no longer than the wait for a start
        assert r["closed"] - r["answered"] < start_wait + 1.5, r["closed"] - r["answered"]
        assert b"no upload with this id" in r["body"]
    # Never more open at once than 2 workers x 2 streams (end: the last chunk seen).
    edges = sorted([(r["answered"], 1) for r in streamed] + [(r["last_data"] - 0.1, -1) for r in streamed])
    depth = peak = 0
    for _, step in edges:
        depth += step
        peak = max(peak, depth)
    assert peak <= 4, peak


def test_a_killed_worker_s_upload_reads_error_and_a_slow_live_one_never_does(
        memcached_server: MemcachedServer, tmp_path: Any) -> None:  # noqa: F811
    import socket

    from tests.support.cluster import MiB, build_body, http_get

    grace, heartbeat, poll_every = 2.0, 0.25, 0.2
    with _cluster(tmp_path, memcached_server, {"stale_after": grace, "heartbeat": heartbeat}) as cluster:
        port = cluster.port

        def status_of(progress_id: str) -> Tuple[Dict[str, Any], int]:
            code, headers, body = http_get(port, f"/upload/progress?X-Progress-ID={progress_id}", timeout=10)
            assert code == 200, (code, body[:300])
            return json.loads(body), int(headers.get("x-worker-pid", 0))

        def head_of(progress_id: str, body: bytes, ctype: str) -> bytes:
            return (f"POST /upload-local?X-Progress-ID={progress_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    ).encode()

        # A worker SIGKILLed in the middle of an upload.
        body, ctype, _ = build_body(8 * MiB, 1)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head_of("dead-1", body, ctype) + body[:2 * MiB])
            victim = cluster.serving_pid("dead-1")
            deadline = time.monotonic() + 10
            while status_of("dead-1")[0].get("received", 0) < MiB:  # its bytes are moving
                assert time.monotonic() < deadline, "the upload never read uploading"
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            seen: List[Tuple[float, str, int]] = []
            while time.monotonic() - killed_at < grace + 10:
                value, worker = status_of("dead-1")
                seen.append((round(time.monotonic() - killed_at, 2), value["state"], worker))
                if value["state"] != "uploading":
                    break
                time.sleep(poll_every)
        assert seen[-1][1] == "error", seen
        assert seen[-1][0] <= grace + heartbeat + poll_every + 1.5, seen
        assert seen[-1][2] != victim
        assert value["status"] == 502 and value["error"]["code"] == "upload_stopped", value
        assert 0 < value["received"] < value["size"] == len(body)

        # A slow but live upload: a byte a second, then a stall, each longer than the grace.
        body, ctype, digest = build_body(64 * 1024, 2)
        states: List[str] = []
        stop = threading.Event()

        def poller() -> None:
            while not stop.is_set():
                states.append(status_of("slow-1")[0]["state"])
                stop.wait(poll_every)

        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head_of("slow-1", body, ctype) + body[:32 * 1024])
            watcher = threading.Thread(target=poller)
            watcher.start()
            try:
                for i in range(4):  # 4 s, a byte a second
                    time.sleep(1.0)
                    s.sendall(body[32 * 1024 + i:32 * 1024 + i + 1])
                time.sleep(grace + 1.0)  # then nothing at all
                s.sendall(body[32 * 1024 + 4:])
                answer = b""
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    answer += data
            finally:
                stop.set()
                watcher.join(10)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["files"][0]["sha256"] == digest
        assert "error" not in states and states.count("uploading") >= 25, states
        final, _ = status_of("slow-1")
        assert (final["state"], final["received"]) == ("done", len(body))


# -- the browser script when the server refuses its stream -----------------------------------------

PAGE = b"""<!doctype html><title>watch</title>
<script src="/upload/progress/uploadkit.js"></script>
<script>
  window.seen = [];
  window.follow = function (id, interval) {
    uploadkit.watch("/upload/progress", id, function (p) { window.seen.push([id, p.state]); },
                    {pollInterval: interval});
  };
</script>"""


def test_the_script_polls_at_once_when_its_stream_is_refused(page: Any) -> None:  # noqa: F811
    store = MemoryStore()
    progress = ProgressApp(store, ProgressSettings(sse_max_streams=0))  # every stream answered as a poll
    asked: List[str] = []

    def site(environ: Dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/":
            start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))])
            return [PAGE]
        if environ.get("QUERY_STRING"):
            asked.append(environ.get("HTTP_ACCEPT") or "")
        return progress(environ, start_response)

    store.set("w-done", {"state": "done", "received": 9, "size": 9}, 60)
    store.set("w-live", {"state": "uploading", "received": 3, "size": 9}, 60)
    with serve(site) as server:
        page.goto(server.url + "/")
        # A minute between polls: only a poll made at once can bring "done" now.
        page.evaluate("follow('w-done', 60000)")
        page.wait_for_function("window.seen.length >= 1", timeout=5000)
        assert page.evaluate("window.seen") == [["w-done", "done"]]
        assert asked == ["text/event-stream", "application/json"]
        # Polling goes on until the upload ends, and the stream is not asked for again.
        page.evaluate("follow('w-live', 100)")
        page.wait_for_function("window.seen.length >= 2", timeout=5000)
        store.set("w-live", {"state": "done", "received": 9, "size": 9}, 60)
        page.wait_for_function("window.seen[window.seen.length - 1][1] === 'done' && window.seen.length >= 3",
                               timeout=5000)
    live = page.evaluate("window.seen")[1:]  # one call per poll: "uploading" may come more than once
    assert {i for i, _ in live} == {"w-live"} and live[0][1] == "uploading" and live[-1][1] == "done"
    assert [s for _, s in live].count("done") == 1 and {s for _, s in live} == {"uploading", "done"}
    assert asked.count("text/event-stream") == 2 and not page.js_errors
