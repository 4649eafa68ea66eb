"""StorageApp served by a real WSGI server on 127.0.0.1, checked with real HTTP
clients; and uploads end to end through UploadMiddleware(storage=...)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socketserver
import threading
import uuid
from contextlib import contextmanager
from email.utils import format_datetime
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests

from uploadkit.storage import Storage, StorageApp, parse_range, _Unsatisfiable
from tests.support.s3 import S3Server, s3_bucket, s3_server  # noqa: F401

MiB = 1024 * 1024


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


@contextmanager
def serve(app: Callable[..., Any]) -> Iterator[str]:
    """``app`` on a free 127.0.0.1 port for the block; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def raw_request(base: str, method: str, path: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    """An HTTP request with the path sent exactly as given (no dot-segment cleanup)."""
    host, port = base.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "media"))
    if request.param == "memory":
        return Storage(f"memory://uk-{uuid.uuid4().hex}/media")
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/media", storage_options=server.options(), block_size=5 * MiB)


DATA = bytes(range(256)) * 4096  # 1 MiB


def test_get_head_range_and_conditional(storage: Storage) -> None:
    key = storage.save(io.BytesIO(DATA), "pics/a b.png")
    with serve(storage.app()) as base:
        url = f"{base}/pics/a%20b.png"
        r = requests.get(url, timeout=10)
        assert r.status_code == 200 and r.content == DATA
        assert r.headers["Content-Type"] == "image/png"
        assert r.headers["Content-Length"] == str(len(DATA))
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Accept-Ranges"] == "bytes"
        assert "Content-Disposition" not in r.headers
        etag, last_modified = r.headers["ETag"], r.headers["Last-Modified"]
        assert etag == storage.info(key).etag

        h = requests.head(url, timeout=10)
        assert h.status_code == 200 and h.content == b""
        assert h.headers["Content-Length"] == str(len(DATA)) and h.headers["ETag"] == etag

        r = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=10)
        assert r.status_code == 206 and r.content == DATA[1000:2000]
        assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(DATA)}"
        assert r.headers["Content-Length"] == "1000"
        r = requests.get(url, headers={"Range": "bytes=-10"}, timeout=10)
        assert r.status_code == 206 and r.content == DATA[-10:]
        r = requests.get(url, headers={"Range": f"bytes={len(DATA) - 5}-"}, timeout=10)
        assert r.status_code == 206 and r.content == DATA[-5:]
        r = requests.get(url, headers={"Range": "bytes=0-5, 10-20"}, timeout=10)  # several: whole file
        assert r.status_code == 200 and r.content == DATA
        r = requests.get(url, headers={"Range": f"bytes={len(DATA)}-"}, timeout=10)
        assert r.status_code == 416
        assert r.headers["Content-Range"] == f"bytes */{len(DATA)}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"
        r = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}, timeout=10)
        assert r.status_code == 200 and len(r.content) == len(DATA)
        r = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=10)
        assert r.status_code == 206 and r.content == DATA[:10]

        r = requests.get(url, headers={"If-None-Match": etag}, timeout=10)
        assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == etag
        r = requests.get(url, headers={"If-None-Match": '"other", W/' + etag}, timeout=10)
        assert r.status_code == 304
        r = requests.get(url, headers={"If-None-Match": '"other"'}, timeout=10)
        assert r.status_code == 200
        r = requests.get(url, headers={"If-Modified-Since": last_modified}, timeout=10)
        assert r.status_code == 304
        mtime = storage.info(key).mtime
        assert mtime is not None
        earlier = format_datetime(mtime - timedelta(hours=1), usegmt=True)
        r = requests.get(url, headers={"If-Modified-Since": earlier}, timeout=10)
        assert r.status_code == 200 and r.content == DATA


def test_active_content_is_an_attachment(storage: Storage) -> None:
    for key, body in [("x/page.html", b"<script>alert(1)</script>"), ("x/img.svg", b"<svg onload=alert(1)/>"),
                      ("x/data.xml", b"<a/>"), ("x/code.js", b"alert(1)")]:
        storage.save(io.BytesIO(body), key)
    storage.save(io.BytesIO(b"plain"), "x/notes.txt")
    with serve(storage.app()) as base:
        for name in ["page.html", "img.svg", "data.xml", "code.js"]:
            r = requests.get(f"{base}/x/{name}", timeout=10)
            assert r.status_code == 200
            assert r.headers["Content-Disposition"] == f"attachment; filename*=UTF-8''{name}"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        r = requests.get(f"{base}/x/notes.txt", timeout=10)
        assert r.headers["Content-Type"] == "text/plain" and "Content-Disposition" not in r.headers


def test_traversal_and_unknown_keys_are_404_json(tmp_path: Any) -> None:
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    storage = Storage(str(tmp_path / "media"))
    storage.save(io.BytesIO(b"in"), "ok.txt")
    pending = storage.begin_write("pending.txt")
    pending.write(b"not committed")
    with serve(storage.app()) as base:
        assert raw_request(base, "GET", "/ok.txt")[0] == 200
        for path in ["/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/%2E%2E%2Fsecret.txt",
                     "/../etc/passwd", "/a/../../secret.txt", "//etc/passwd", "/.uploadkit-tmp",
                     "/.uploadkit-tmp/" + (storage.temp_keys() or ["x"])[0], "/nope.txt", "/",
                     "/ok.txt/", "/%00", "/..\\secret.txt", "/%ff%fe"]:
            status, headers, body = raw_request(base, "GET", path)
            assert status == 404, path
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["code"] == "not_found"
            assert b"outside" not in body
    pending.discard()


def test_delete_is_authorized(storage: Storage) -> None:
    storage.save(io.BytesIO(b"original"), "d/a.jpg")
    storage.save(io.BytesIO(b"thumb"), storage.thumbnail_key("d/a.jpg", 150, 150))
    storage.save(io.BytesIO(b"keep"), "d/keep.jpg")
    calls: List[Tuple[str, str]] = []

    def authorize(environ: Dict[str, Any], action: str, key: str) -> bool:
        calls.append((action, key))
        return action == "read" or environ.get("HTTP_X_ADMIN") == "yes"

    with serve(storage.app()) as base:  # default: deletes refused
        r = requests.delete(f"{base}/d/a.jpg", timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert storage.exists("d/a.jpg")
    with serve(StorageApp(storage, authorize=authorize)) as base:
        r = requests.delete(f"{base}/d/a.jpg", timeout=10)
        assert r.status_code == 403
        assert storage.exists("d/a.jpg")
        r = requests.delete(f"{base}/d/a.jpg", headers={"X-Admin": "yes"}, timeout=10)
        assert r.status_code == 204 and r.content == b""
        assert not storage.exists("d/a.jpg") and not storage.exists("d/a.150x150.jpg")
        assert storage.exists("d/keep.jpg")
        r = requests.delete(f"{base}/d/a.jpg", headers={"X-Admin": "yes"}, timeout=10)
        assert r.status_code == 404
        r = requests.get(f"{base}/d/a.jpg", timeout=10)
        assert r.status_code == 404
        r = requests.put(f"{base}/d/a.jpg", data=b"x", timeout=10)
        assert r.status_code == 405 and "DELETE" in r.headers["Allow"]
    assert ("delete", "d/a.jpg") in calls and ("read", "d/a.jpg") in calls


def test_read_refused_by_authorize_looks_missing(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    storage.save(io.BytesIO(b"private"), "private/x.txt")
    app = StorageApp(storage, authorize=lambda env, action, key: not key.startswith("private/"))
    with serve(app) as base:
        r = requests.get(f"{base}/private/x.txt", timeout=10)
        assert r.status_code == 404 and b"private" not in r.content


def test_storage_failure_while_serving_is_503(tmp_path: Any) -> None:
    from uploadkit.storage import StoredInfo

    from uploadkit.errors import StorageUnavailable

    class Broken(Storage):
        """A backend that fails whichever way it is asked (GET opens, HEAD looks up)."""

        def info(self, key: str) -> StoredInfo:
            raise StorageUnavailable("storage failed to look up 'x'")

        def open(self, key: str, mode: str = "rb") -> Any:
            raise StorageUnavailable("storage failed to open 'x'")

    with serve(Broken(str(tmp_path)).app()) as base:
        r = requests.get(f"{base}/x", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        h = requests.head(f"{base}/x", timeout=10)
        assert h.status_code == 503 and h.content == b"" 


def test_parse_range_table() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    for ignored in ["bytes=5-2", "items=0-1", "bytes=a-b", "bytes=1-2,4-5", "bytes=", "bytes=-"]:
        assert parse_range(ignored, 10) is None, ignored
    for bad in ["bytes=10-", "bytes=-0", "bytes=12-20"]:
        with pytest.raises(_Unsatisfiable):
            parse_range(bad, 10)


def test_large_file_is_streamed_in_blocks(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    data = os.urandom(3 * MiB)
    storage.save(io.BytesIO(data), "big.bin")
    app = StorageApp(storage, block_size=64 * 1024)
    seen: List[int] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/big.bin"}
    body = app(environ, lambda status, headers: None)
    try:
        for block in body:
            seen.append(len(block))
    finally:
        body.close()  # type: ignore[attr-defined]
    assert max(seen) == 64 * 1024 and sum(seen) == len(data)


# -- end to end through the middleware ---------------------------------------------------------------


def _middleware() -> Any:
    import warnings

    with warnings.catch_warnings():
        # WebOb (imported by the middleware) imports the deprecated cgi module on 3.11/3.12.
        warnings.filterwarnings("ignore", message="'cgi' is deprecated", category=DeprecationWarning)
        from uploadkit.middleware import UploadMiddleware
    return UploadMiddleware


def _echo_files(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    files = environ["uploadkit.files"]
    out = {name: {"key": f.key, "url": f.url, "size": f.size, "sha256": f.sha256,
                  "deduplicated": f.deduplicated, "read_ok": hashlib.sha256(f.read()).hexdigest() == f.sha256}
           for name, f in files.items()}
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def test_upload_through_middleware_then_serve(storage: Storage) -> None:
    UploadMiddleware = _middleware()
    storage = Storage(storage.root, fs=storage.fs, base_url="/media/", upload_to="u/{filename}",
                      block_size=storage.block_size)
    data = os.urandom(6 * MiB)
    app = UploadMiddleware(_echo_files, storage=storage, progress=False)
    with serve(app) as base, serve(storage.app()) as media:
        r = requests.post(base + "/upload", files={"doc": ("report.pdf", data, "application/pdf"),
                                                   "note": ("n.txt", b"hello", "text/plain")}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["doc"]["key"] == "u/report.pdf" and got["doc"]["size"] == len(data)
        assert got["doc"]["url"] == "/media/u/report.pdf" and got["doc"]["read_ok"]
        assert got["note"]["key"] == "u/n.txt"
        r2 = requests.post(base + "/upload", files={"doc": ("report.pdf", b"second", "application/pdf")},
                           timeout=30)
        assert r2.json()["doc"]["key"].startswith("u/report_")
        served = requests.get(media + "/u/report.pdf", timeout=30)
        assert served.status_code == 200 and served.content == data
    assert storage.temp_keys() == []


def test_middleware_refusal_leaves_nothing(storage: Storage) -> None:
    from uploadkit.limits import Limits
    UploadMiddleware = _middleware()

    app = UploadMiddleware(_echo_files, storage=storage, progress=False,
                           limits=Limits(max_file_size=2 * MiB))
    with serve(app) as base:
        r = requests.post(base + "/upload", files={"ok": ("a.txt", b"fine", "text/plain"),
                                                   "big": ("b.bin", os.urandom(3 * MiB), "application/octet-stream")},
                          timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert storage.temp_keys() == []
    assert not storage.fs.exists(storage.root) or storage.fs.find(storage.root) == []


def test_middleware_error_collision_is_409(tmp_path: Any) -> None:
    UploadMiddleware = _middleware()
    storage = Storage(str(tmp_path), upload_to="{filename}", collision="error")
    storage.save(io.BytesIO(b"first"), "taken.txt")
    app = UploadMiddleware(_echo_files, storage=storage, progress=False)
    with serve(app) as base:
        r = requests.post(base + "/", files={"f": ("taken.txt", b"second", "text/plain")}, timeout=30)
        assert r.status_code == 409 and r.json()["error"]["code"] == "file_exists"
    with storage.open("taken.txt") as f:
        assert f.read() == b"first"


# -- hostile headers and edge cases, straight through the WSGI app --------------------------


def _call(app: StorageApp, method: str, path: str, **headers: str) -> Tuple[str, Dict[str, str], bytes]:
    seen: Dict[str, Any] = {}

    def start_response(status: str, hdrs: List[Tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, dict(hdrs)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(b""),
               **{"HTTP_" + k.upper(): v for k, v in headers.items()}}
    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen["status"], seen["headers"], body


@pytest.mark.parametrize("header", ["bytes=\xb2-", "bytes=0-\xb9", "bytes=" + "1" * 5000 + "-", "bytes=-\xb3"])
def test_odd_range_digits_are_ignored_not_a_500(tmp_path: Any, header: str) -> None:
    storage = Storage(str(tmp_path))
    key = storage.save(io.BytesIO(b"0123456789"), "a.txt")
    status, headers, body = _call(storage.app(), "GET", "/" + key, range=header)
    assert status.startswith("200") and body == b"0123456789"


def test_if_range_with_a_zoneless_or_later_date_sends_the_whole_file(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    key = storage.save(io.BytesIO(b"0123456789"), "a.txt")
    app = storage.app()
    _, headers, _ = _call(app, "HEAD", "/" + key)
    for when in ("Mon, 01 Jan 2024 00:00:00 -0000", "Fri, 01 Jan 2099 00:00:00 GMT"):
        status, _, body = _call(app, "GET", "/" + key, range="bytes=0-1", if_range=when)
        assert status.startswith("200") and body == b"0123456789", when
    status, _, body = _call(app, "GET", "/" + key, range="bytes=0-1", if_range=headers["Last-Modified"])
    assert status.startswith("206") and body == b"01"


def test_head_answers_never_carry_a_body(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    key = storage.save(io.BytesIO(b"0123456789"), "a.txt")
    app = storage.app()
    for path, headers, code in (("/nope.txt", {}, "404"), ("/" + key, {"range": "bytes=50-"}, "416"),
                                ("/" + key, {}, "200")):
        status, hdrs, body = _call(app, "HEAD", path, **headers)
        assert status.startswith(code) and body == b"" and int(hdrs["Content-Length"]) > 0


@pytest.mark.parametrize("path", ["/C:../secret.txt", "/C:/Windows/win.ini", "/a/b:stream"])
def test_keys_with_a_colon_are_not_found(tmp_path: Any, path: str) -> None:
    status, _, body = _call(Storage(str(tmp_path)).app(), "GET", path)
    assert status.startswith("404") and json.loads(body)["error"]["code"] == "not_found"


def test_delete_under_a_file_name_is_404_not_503(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    key = storage.save(io.BytesIO(b"x"), "a.txt")
    app = storage.app(authorize=lambda environ, action, key: True)
    status, _, body = _call(app, "DELETE", f"/{key}/x")
    assert status.startswith("404"), body
    assert storage.exists(key)


@pytest.mark.parametrize("name", ["page.mht", "mail.eml"])
def test_mhtml_is_served_as_an_attachment(tmp_path: Any, name: str) -> None:
    storage = Storage(str(tmp_path))
    key = storage.save(io.BytesIO(b"MIME-Version: 1.0\r\n\r\n<script>alert(1)</script>"), name)
    status, headers, _ = _call(storage.app(), "GET", "/" + key)
    assert status.startswith("200")
    assert headers["Content-Disposition"].startswith("attachment")
    assert headers["Content-Security-Policy"] == "sandbox"


def test_a_directory_key_is_404_json_not_a_crash(storage: Storage) -> None:
    """``upload_to`` with folders makes directories on local disk (prefixes
    elsewhere): naming one, or something under a file, is an unknown key."""
    dated = Storage(storage.root, fs=storage.fs, upload_to="photos/{date:%Y/%m/%d}/{uuid}{ext}")
    key = dated.save(io.BytesIO(b"jpeg bytes"), filename="cat.jpg")
    folders = key.split("/")[:-1]
    with serve(storage.app()) as base:
        assert requests.get(f"{base}/{key}", timeout=10).content == b"jpeg bytes"
        for n in range(1, len(folders) + 1):
            for path in ["/" + "/".join(folders[:n]), f"/{key}/x"]:
                for method in ("GET", "HEAD"):
                    status, headers, body = raw_request(base, method, path)
                    assert status == 404, (method, path, status, body[:200])
                    assert headers["content-type"] == "application/json"
                    if method == "GET":
                        assert json.loads(body)["error"]["code"] == "not_found"
        # The server is still serving.
        assert requests.get(f"{base}/{key}", timeout=10).status_code == 200


#: name, bytes, expected Content-Type, sent as an attachment
SERVED_TYPES = [
    ("doc.pdf", b"%PDF-1.7\n1 0 obj<</OpenAction<</S/JavaScript/JS(app.alert(1))>>>>endobj", "application/pdf", False),
    ("ui.xul", b'<window xmlns="http://www.mozilla.org/keymaster/gatekeeper/there.is.only.xul"/>',
     "text/xul", True),
    ("site.css", b"body { color: red }", "text/css", False),
    ("subs.vtt", b"WEBVTT\n\n00:00.000 --> 00:01.000\n<b>hello</b>\n", "text/vtt", False),
    ("page.html", b"<script>alert(1)</script>", "text/html", True),
    ("img.svg", b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>", "image/svg+xml", True),
    ("pic.png", b"\x89PNG\r\n\x1a\n", "image/png", False),
]


def test_every_type_is_served_sandboxed_and_active_ones_as_attachments(storage: Storage) -> None:
    """PDFs stay inline but sandboxed (their scripts get no origin); XUL is an
    attachment like HTML and SVG; CSS and WebVTT stay inline, with nosniff."""
    for name, body, _, _ in SERVED_TYPES:
        storage.save(io.BytesIO(body), f"t/{name}")
    with serve(storage.app()) as base:
        for name, body, ctype, attachment in SERVED_TYPES:
            for method in ("GET", "HEAD"):
                status, headers, content = raw_request(base, method, f"/t/{name}")
                assert status == 200 and content == (body if method == "GET" else b""), (method, name)
                assert headers["content-type"] == ctype, name
                assert headers["x-content-type-options"] == "nosniff", name
                assert headers["content-security-policy"] == "sandbox", name
                if attachment:
                    assert headers["content-disposition"] == f"attachment; filename*=UTF-8''{name}", name
                else:
                    assert "content-disposition" not in headers, name
