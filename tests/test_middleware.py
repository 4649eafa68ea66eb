"""The middleware through real servers (wsgiref threads, gunicorn) and real clients
(requests, httpx, curl, raw sockets)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import httpx
import pytest
import requests

from tests.support.wsgi import (  # noqa: F401  (first: imports webob quietly)
    gunicorn,
    parse_response,
    raw_request,
    wsgi_server,
)
import webob
import webob.multidict

from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.multipart import encode_multipart
from tests.support.bodies import BOUNDARY, content_type, end, field_part, file_part

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def assert_empty_eventually(path: Any) -> None:
    """The response may reach the client a moment before the server calls close()."""
    assert wait_until(lambda: os.listdir(path) == []), os.listdir(path)


class Recorder:
    """A WSGI app that records what it was handed, then answers with JSON."""

    def __init__(self, tempdir: Optional[str] = None, raise_exc: Optional[BaseException] = None) -> None:
        self.tempdir = tempdir
        self.raise_exc = raise_exc
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        rec: Dict[str, Any] = {
            "path": environ.get("PATH_INFO"),
            "intercepted": "uploadkit.files" in environ,
            "content_type": environ.get("CONTENT_TYPE"),
            "content_length": environ.get("CONTENT_LENGTH"),
            "stale_cache": "webob._parsed_post_vars" in environ,
            "temp_files": sorted(os.listdir(self.tempdir)) if self.tempdir else None,
        }
        self.calls.append(rec)
        if rec["intercepted"]:
            files = environ["uploadkit.files"]
            rec["multidicts"] = (isinstance(files, webob.multidict.MultiDict)
                                 and isinstance(environ["uploadkit.form"], webob.multidict.MultiDict))
            rec["form"] = list(environ["uploadkit.form"].items())
            rec["files"] = []
            for name, f in files.items():
                a, b = f.open(), f.open()
                try:
                    rec["fresh_opens"] = a is not b
                    a.read(3)
                    full = b.read()
                finally:
                    a.close()
                    b.close()
                rec["files"].append({"field": name, "filename": f.filename, "raw_filename": f.raw_filename,
                                     "size": f.size, "sha256": f.sha256, "content": full, "path": f.path,
                                     "content_type": f.content_type})
            body = environ["wsgi.input"].read()
            rec["body_len"] = len(body)
            environ["wsgi.input"] = __import__("io").BytesIO(body)
            rec["post"] = list(webob.Request(environ).POST.items())
        else:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            rec["body"] = environ["wsgi.input"].read(length) if length else b""
        if self.raise_exc is not None:
            raise self.raise_exc
        tempdir = self.tempdir

        def body_iter() -> Iterator[bytes]:
            rec["temp_files_while_sending"] = sorted(os.listdir(tempdir)) if tempdir else None
            yield json.dumps({"ok": True, "intercepted": rec["intercepted"]}).encode()

        start_response("200 OK", [("Content-Type", "application/json")])
        return body_iter()


class CallWatcher:
    """Outermost wrapper: tells when the middleware has answered, and with what status."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.statuses: List[str] = []
        self.bodies: List[bytes] = []
        self.done = threading.Event()

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def sr(status: str, headers: Any, exc_info: Any = None) -> Any:
            self.statuses.append(status)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            result = self.app(environ, sr)
            body = b"".join(result)
            if hasattr(result, "close"):
                result.close()
            self.bodies.append(body)
            return [body]
        finally:
            self.done.set()


def _mw(app: Any, tmp_path: Any, **kw: Any) -> UploadMiddleware:
    kw.setdefault("memory_threshold", 0)  # every file in a temp file, so cleanup shows
    return UploadMiddleware(app, progress=False, tempdir=str(tmp_path), **kw)


FIELDS = [("title", "Grüße, 世界 \"q\""), ("empty", ""), ("title", "second")]
DOC = os.urandom(200_000) + b"\r\n--" + b"x" * 10
FILES = [("doc", "rapport été.bin", "application/octet-stream", DOC), ("pic", "p.png", "image/png", PNG),
         ("pic", "q.png", "image/png", PNG[::-1])]


def _check_recorded(rec: Dict[str, Any], files: List[Any] = FILES, fields: List[Any] = FIELDS) -> None:
    assert rec["intercepted"] and rec["multidicts"]
    assert rec["form"] == fields
    got = [(f["field"], f["filename"], f["content"]) for f in rec["files"]]
    assert got == [(n, fn, d) for n, fn, _, d in files]
    for f, (_, _, _, d) in zip(rec["files"], files):
        assert f["size"] == len(d) and f["sha256"] == hashlib.sha256(d).hexdigest()
    assert rec["fresh_opens"] is True
    # The re-encoded body: text fields plus <field>.<suffix> metadata, lengths true.
    assert rec["content_type"].startswith("multipart/form-data; boundary=")
    assert int(rec["content_length"]) == rec["body_len"]
    post = rec["post"]
    assert [kv for kv in post if "." not in kv[0]] == fields
    meta = [(k, v) for k, v in post if "." in k]
    for f in rec["files"]:
        n = f["field"]
        assert (f"{n}.name", f["filename"]) in meta
        assert (f"{n}.size", str(f["size"])) in meta
        assert (f"{n}.sha256", f["sha256"]) in meta
        assert (f"{n}.content_type", f["content_type"]) in meta
    assert {k.split(".", 1)[1] for k, _ in meta} == {"name", "content_type", "size", "sha256", "key", "url"}
    assert all(v == "" for k, v in meta if k.endswith((".key", ".url")))
    # During the call, every file was in the tempdir.
    assert len(rec["temp_files"]) == len(files)
    assert rec["temp_files_while_sending"] == rec["temp_files"]


# -- real clients ---------------------------------------------------------------------

def test_requests_client(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    r = requests.post(server.url + "/upload", data=FIELDS,
                      files=[(n, (fn, d, ct)) for n, fn, ct, d in FILES], timeout=10)
    assert r.status_code == 200 and r.json() == {"ok": True, "intercepted": True}
    _check_recorded(app.calls[0])
    assert_empty_eventually(tmp_path)


def test_httpx_client(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    with httpx.Client(timeout=10) as client:
        r = client.post(server.url + "/upload", data={"title": ["Grüße, 世界 \"q\"", "second"], "empty": ""},
                        files=[(n, (fn, d, ct)) for n, fn, ct, d in FILES])
    assert r.status_code == 200
    rec = app.calls[0]
    # httpx sends a dict's fields grouped by name.
    _check_recorded(rec, fields=[("title", "Grüße, 世界 \"q\""), ("title", "second"), ("empty", "")])
    assert_empty_eventually(tmp_path)


def test_curl_client(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    src = tmp_path.parent / f"{tmp_path.name}-src"
    src.mkdir()
    (src / "rapport été.bin").write_bytes(DOC)
    (src / "p.png").write_bytes(PNG)
    (src / "q.png").write_bytes(PNG[::-1])
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-F", "title=Grüße, 世界 \"q\"", "-F", "empty=", "-F", "title=second",
         "-F", f"doc=@{src / 'rapport été.bin'};type=application/octet-stream",
         "-F", f"pic=@{src / 'p.png'};type=image/png", "-F", f"pic=@{src / 'q.png'};type=image/png",
         server.url + "/upload"], capture_output=True, timeout=20, check=True)
    assert json.loads(out.stdout) == {"ok": True, "intercepted": True}
    rec = app.calls[0]
    _check_recorded(rec)
    assert_empty_eventually(tmp_path)


def test_stale_webob_cache_is_dropped(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    inner = _mw(app, tmp_path)

    def prepopulate(environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["webob._parsed_post_vars"] = ({"stale": "yes"}, environ["wsgi.input"])
        environ["webob.is_body_seekable"] = True
        return inner(environ, start_response)

    server = wsgi_server(prepopulate)
    r = requests.post(server.url + "/", data={"a": "1"}, files={"f": ("f.txt", b"content")}, timeout=10)
    assert r.status_code == 200
    rec = app.calls[0]
    assert rec["stale_cache"] is False
    assert ("a", "1") in rec["post"] and ("stale", "yes") not in rec["post"]
    assert ("f.size", "7") in rec["post"]


def test_temp_files_live_until_response_close_and_open_is_fresh(tmp_path: Any) -> None:
    """In process: the response iterable holds the files until close()."""
    app = Recorder(str(tmp_path))
    mw = _mw(app, tmp_path)
    body, ctype = encode_multipart([("a", "1")], [("f", "x.bin", "", b"abc" * 1000)])
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_TYPE": ctype,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": __import__("io").BytesIO(body)}
    statuses: List[str] = []
    result = mw(environ, lambda s, h, e=None: statuses.append(s))
    f = environ["uploadkit.files"]["f"]
    assert os.path.exists(f.path) and len(os.listdir(tmp_path)) == 1
    assert b"".join(result) and statuses == ["200 OK"]
    assert os.path.exists(f.path)
    with f.open() as a, f.open() as b:
        assert a is not b and a.read() == b.read() == b"abc" * 1000
    result.close()  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == []


def test_app_raising_still_removes_temp_files(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path), raise_exc=RuntimeError("app bug"))
    server = wsgi_server(_mw(app, tmp_path))
    r = requests.post(server.url + "/", files={"f": ("f.bin", b"x" * 10000)}, timeout=10)
    assert r.status_code == 500
    assert app.calls[0]["temp_files"] and len(app.calls[0]["temp_files"]) == 1
    assert_empty_eventually(tmp_path)


# -- pass-through ----------------------------------------------------------------------

MIXED = (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--" + BOUNDARY.encode()
         + b"--\r\n")


@pytest.mark.parametrize("method, ctype, body", [
    ("GET", None, b""),
    ("POST", "application/json", json.dumps({"k": "v" * 1000}).encode()),
    ("POST", "application/x-www-form-urlencoded", b"a=1&b=%C3%A9"),
    ("POST", f"multipart/mixed; boundary={BOUNDARY}", MIXED),
    ("PUT", "application/octet-stream", os.urandom(10_000)),
    ("DELETE", content_type(), field_part("a", "1") + end()),
    ("POST", "text/plain", b"multipart/form-data lookalike"),
])
def test_other_requests_pass_through_unread(wsgi_server: Any, tmp_path: Any, method: str, ctype: Optional[str],
                                            body: bytes) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    headers = {"Content-Type": ctype} if ctype else {}
    r = requests.request(method, server.url + "/any", data=body or None, headers=headers, timeout=10)
    assert r.status_code == 200 and r.json()["intercepted"] is False
    rec = app.calls[0]
    assert rec["body"] == body
    assert rec["content_type"] in (ctype, None, "text/plain")


def test_paths_prefixes(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path, paths=["/upload", "/api/files"]))
    body = field_part("a", "1") + file_part("f", "f.txt", b"data") + end()
    for path, intercepted in [("/upload", True), ("/upload/x", True), ("/api/files/1", True),
                              ("/other", False), ("/api", False), ("/", False)]:
        r = requests.post(server.url + path, data=body, headers={"Content-Type": content_type()}, timeout=10)
        assert r.json()["intercepted"] is intercepted, path
        rec = app.calls[-1]
        if not intercepted:
            assert rec["body"] == body  # the original bytes, unread by the middleware
    assert_empty_eventually(tmp_path)


def test_paths_callable(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    seen: List[str] = []

    def only_with_header(environ: Dict[str, Any]) -> bool:
        seen.append(environ["PATH_INFO"])
        return environ.get("HTTP_X_UPLOAD") == "yes"

    server = wsgi_server(_mw(app, tmp_path, paths=only_with_header))
    body = file_part("f", "f.txt", b"data") + end()
    h = {"Content-Type": content_type()}
    assert requests.post(server.url + "/a", data=body, headers={**h, "X-Upload": "yes"}, timeout=10).json()["intercepted"]
    assert not requests.post(server.url + "/b", data=body, headers=h, timeout=10).json()["intercepted"]
    assert app.calls[-1]["body"] == body
    assert seen == ["/a", "/b"]


# -- refusals ------------------------------------------------------------------------------

def _assert_refusal(r: Any, status: int, code: str) -> Dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"code", "message", "field", "limit"}
    assert err["code"] == code and err["message"]
    return err  # type: ignore[no-any-return]


BIG = os.urandom(300_000)
REFUSALS = [
    # id, limits / middleware options, request builder (fields, files), status, code, limit, field
    ("malformed", {}, "malformed", 400, "malformed_multipart", None, None),
    ("request_too_large", {"limits": Limits(max_request_size=100_000)}, [("f", "a.bin", BIG)], 413,
     "request_too_large", 100_000, None),
    ("file_too_large", {"limits": Limits(max_file_size=100_000)}, [("f", "a.bin", BIG)], 413,
     "file_too_large", 100_000, "f"),
    ("too_many_files", {"limits": Limits(max_files=2)}, [("f", f"{i}.bin", BIG[:1000]) for i in range(3)], 413,
     "too_many_files", 2, "f"),
    ("too_many_parts", {"limits": Limits(max_parts=2)}, [("f", f"{i}.bin", BIG[:1000]) for i in range(3)], 413,
     "too_many_parts", 2, None),
    ("field_too_large", {"limits": Limits(max_field_size=100)}, [("t", None, b"x" * 101)], 413,
     "field_too_large", 100, "t"),
    ("form_memory", {"limits": Limits(max_form_memory=1000)}, [("t", None, b"x" * 600)] * 2, 413,
     "field_too_large", 1000, "t"),
    ("header_too_large", {"limits": Limits(max_header_size=200)}, [("f", "n" * 300 + ".bin", b"x")], 413,
     "header_too_large", 200, None),
    ("quota", {"quota": lambda environ: 1000}, [("f", "a.bin", BIG[:600]), ("g", "b.bin", BIG[:600])], 413,
     "quota_exceeded", 1000, "g"),
    ("unsupported_type", {"limits": Limits(allowed_types=frozenset({"image/png"}))},
     [("ok", "p.png", PNG), ("f", "evil.php", PNG)], 415, "unsupported_type", ["image/png"], "f"),
    ("unsupported_sniffed", {"limits": Limits(allowed_types=frozenset({"image/*"}))},
     [("f", "doc.pdf", b"%PDF-1.4\n" + BIG[:5000])], 415, "unsupported_type", ["image/*"], "f"),
]


def _build(parts: Any) -> bytes:
    if parts == "malformed":
        return field_part("a", "1")  # no final boundary
    out = b""
    for name, filename, data in parts:
        out += field_part(name, data) if filename is None else file_part(name, filename, data)
    return out + end()


@pytest.mark.parametrize("name, options, parts, status, code, limit, field", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refusals_are_json_and_leave_nothing(wsgi_server: Any, tmp_path: Any, name: str, options: Dict[str, Any],
                                             parts: Any, status: int, code: str, limit: Any,
                                             field: Optional[str]) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path, **options))
    body = _build(parts)
    r = requests.post(server.url + "/up", data=body, headers={"Content-Type": content_type()}, timeout=10)
    err = _assert_refusal(r, status, code)
    assert err["limit"] == limit and err["field"] == field
    assert app.calls == []
    assert_empty_eventually(tmp_path)


def test_refusal_bad_content_length(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    body = field_part("a", "1") + end()
    head = (f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
            f"Content-Length: 12abc\r\nConnection: close\r\n\r\n").encode()
    status, headers, resp = parse_response(raw_request(server.port, head, body))
    assert status == 400 and json.loads(resp)["error"]["code"] == "malformed_multipart"
    assert app.calls == []


def test_length_required_raw_socket(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path))
    body = field_part("a", "1") + end()
    head = f"POST /up HTTP/1.0\r\nHost: x\r\nContent-Type: {content_type()}\r\n\r\n".encode()
    status, headers, resp = parse_response(raw_request(server.port, head, body))
    assert status == 411
    err = json.loads(resp)["error"]
    assert set(err) == {"code", "message", "field", "limit"} and err["code"] == "length_required"
    assert app.calls == []


def test_client_disconnect_mid_body(wsgi_server: Any, tmp_path: Any) -> None:
    app = Recorder(str(tmp_path))
    watcher = CallWatcher(_mw(app, tmp_path))
    server = wsgi_server(watcher)
    start = file_part("f", "big.bin", b"z" * 100_000)[:1000]
    head = (f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    raw_request(server.port, head, start, close_after_send=True)
    assert watcher.done.wait(10)
    assert watcher.statuses and watcher.statuses[0].startswith("400")
    assert json.loads(watcher.bodies[0])["error"]["code"] == "client_disconnected"
    assert app.calls == []
    assert os.listdir(tmp_path) == []


def test_large_refused_body_is_answered_not_reset(wsgi_server: Any, tmp_path: Any) -> None:
    """A refusal on a large body (over the drain limit) still reaches a client
    that reads the answer after sending (curl)."""
    app = Recorder(str(tmp_path))
    server = wsgi_server(_mw(app, tmp_path, limits=Limits(max_request_size=1000)))
    src = tmp_path.parent / f"{tmp_path.name}-big"
    src.write_bytes(os.urandom(6 * 1024 * 1024))
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Expect:", "-F", f"f=@{src}",
                          "-w", "\n%{http_code}", server.url + "/up"], capture_output=True, timeout=20)
    text = out.stdout.decode()
    assert text.rstrip().endswith("413"), (out.returncode, text, out.stderr)
    assert json.loads(text.rsplit("\n", 1)[0])["error"]["code"] == "request_too_large"
    assert app.calls == []


# -- chunked bodies through gunicorn --------------------------------------------------------

@pytest.fixture
def gunicorn_url(tmp_path: Any) -> Iterator[str]:
    with gunicorn(env={"UPLOADKIT_TEST_TEMPDIR": str(tmp_path), "UPLOADKIT_TEST_MAX_REQUEST": "2000000"}) as url:
        yield url


def test_chunked_bodies_through_gunicorn(gunicorn_url: str, tmp_path: Any) -> None:
    data = os.urandom(700_000)
    body, ctype = encode_multipart([("title", "chunked é")], [("f", "c.bin", "application/octet-stream", data)])

    def gen() -> Iterator[bytes]:
        for i in range(0, len(body), 65_000):
            yield body[i:i + 65_000]

    with httpx.Client(timeout=20) as client:
        r = client.post(gunicorn_url + "/up", content=gen(), headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["intercepted"] and out["input_terminated"]
    assert out["form"] == [["title", "chunked é"]]
    (f,) = out["files"]
    assert f["size"] == len(data) and f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert len(out["temp_files_during_call"]) == 1
    assert ["f.sha256", f["sha256"]] in out["post"]

    # curl with Transfer-Encoding: chunked
    src = tmp_path.parent / f"{tmp_path.name}-curl.bin"
    src.write_bytes(data)
    res = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Transfer-Encoding: chunked",
                          "-F", "title=curl", "-F", f"f=@{src}", gunicorn_url + "/up"],
                         capture_output=True, timeout=20, check=True)
    out = json.loads(res.stdout)
    assert out["files"][0]["sha256"] == hashlib.sha256(data).hexdigest() and out["form"] == [["title", "curl"]]
    assert_empty_eventually(tmp_path)


def test_chunked_body_over_the_limit_is_413(gunicorn_url: str, tmp_path: Any) -> None:
    body, ctype = encode_multipart([], [("f", "c.bin", "", os.urandom(2_500_000))])

    def gen() -> Iterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i:i + 100_000]

    with httpx.Client(timeout=20) as client:
        try:
            r = client.post(gunicorn_url + "/up", content=gen(), headers={"Content-Type": ctype})
        except httpx.TransportError:  # pragma: no cover - server may close before the client is done
            pytest.fail("the server reset the connection instead of answering 413")
    err = _assert_refusal(r, 413, "request_too_large")
    assert err["limit"] == 2_000_000
    assert_empty_eventually(tmp_path)


def test_chunked_pass_through_unread(gunicorn_url: str) -> None:
    payload = os.urandom(300_000)

    def gen() -> Iterator[bytes]:
        yield payload[:100_000]
        yield payload[100_000:]

    with httpx.Client(timeout=20) as client:
        r = client.post(gunicorn_url + "/raw", content=gen(), headers={"Content-Type": "application/octet-stream"})
    out = r.json()
    assert out["intercepted"] is False and out["body_sha256"] == hashlib.sha256(payload).hexdigest()


# -- a bare PUT of one file (raw_paths) ---------------------------------------------------------


def _describe_files(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    files = environ.get("uploadkit.files")
    form = webob.Request(environ).POST if files is not None else {}
    out = {"files": [[k, f.filename, f.size, f.sha256, f.content_type, hashlib.sha256(f.read()).hexdigest()]
                     for k, f in files.items()] if files is not None else None,
           "post": {k: v for k, v in form.items()},
           "body": None if files is not None else
           environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode("latin-1")}
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def test_bare_put_with_curl_streams_through_the_same_chain(wsgi_server: Any, tmp_path: Any) -> None:
    src = tmp_path / "src"
    src.mkdir()
    photo = src / "holiday photo.png"
    photo.write_bytes(PNG)
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    server = wsgi_server(_mw(_describe_files, tempdir, raw_paths=["/files/"]))
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-T", str(photo), f"{server.url}/files/"],
                         capture_output=True, check=True, timeout=30)
    answer = json.loads(out.stdout)
    # curl -T to a URL ending in "/" appends the file's name to the path.
    digest = hashlib.sha256(PNG).hexdigest()
    assert answer["files"] == [["file", "holiday photo.png", len(PNG), digest, "image/png", digest]]
    assert answer["post"]["file.name"] == "holiday photo.png"
    assert answer["post"]["file.sha256"] == hashlib.sha256(PNG).hexdigest()
    assert_empty_eventually(tempdir)


def test_bare_put_names_refusals_and_pass_through(wsgi_server: Any, tmp_path: Any) -> None:
    server = wsgi_server(_mw(_describe_files, tmp_path, raw_paths=["/files/"],
                             limits=Limits(max_file_size=1000)))
    r = requests.put(f"{server.url}/files/ignored.bin", data=b"x" * 10, timeout=10,
                     headers={"Content-Disposition": "attachment; filename*=UTF-8''caf%C3%A9.txt"})
    assert r.status_code == 200 and r.json()["files"][0][:3] == ["file", "café.txt", 10]
    r = requests.put(f"{server.url}/files/big.bin", data=b"x" * 5000, timeout=10)
    _assert_refusal(r, 413, "file_too_large")
    # Not under raw_paths, or not a PUT: the app reads the body itself.
    r = requests.put(f"{server.url}/elsewhere/a.bin", data=b"plain", timeout=10)
    assert r.json() == {"files": None, "post": {}, "body": "plain"}
    r = requests.post(f"{server.url}/files/a.bin", data=b"plain", timeout=10)
    assert r.json()["body"] == "plain"
    assert_empty_eventually(tmp_path)
