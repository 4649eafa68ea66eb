"""The Pyramid adapter through webtest's TestApp and through a real threaded
WSGI server on 127.0.0.1 with requests and curl."""

from __future__ import annotations

import io
import json
import os
import subprocess
import warnings
from typing import Any, Dict, Iterator, List, Tuple

import pytest

with warnings.catch_warnings():
    # WebOb imports the stdlib cgi module, deprecated in 3.11.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

import requests  # noqa: E402
import webtest  # noqa: E402
from PIL import Image  # noqa: E402
from pyramid.config import Configurator  # noqa: E402
from pyramid.csrf import CookieCSRFStoragePolicy, get_csrf_token  # noqa: E402
from pyramid.request import Request  # noqa: E402
from pyramid.response import Response  # noqa: E402

from tests.support.checks import sha, wait_empty  # noqa: E402
from tests.support.wsgi import serve  # noqa: E402
from uploadkit.contrib.pyramid import UploadKitFieldStorage, engine_of, upload_limits  # noqa: E402
from uploadkit.errors import UploadError  # noqa: E402
from uploadkit.multipart import encode_multipart  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 20




def read_view(request: Request) -> Dict[str, Any]:
    files = []
    for f in request.POST.getall("f"):
        assert isinstance(f, UploadKitFieldStorage)
        files.append({"data": f.file.read().decode("latin-1"), "filename": f.filename, "type": f.type,
                      "length": f.length, "sha256": f.uploadkit.sha256, "options": f.type_options,
                      "key": f.uploadkit.key, "url": f.uploadkit.url, "thumbnails": f.uploadkit.thumbnails})
    texts = {k: v for k, v in request.POST.items() if isinstance(v, str)}
    return {"files": files, "texts": texts, "param": request.params.get("title")}


@upload_limits(max_file_size=50)
def decorated_view(request: Request) -> Dict[str, Any]:
    return read_view(request)


def token_view(request: Request) -> Dict[str, Any]:
    return {"token": get_csrf_token(request)}


def make_app(tmp: str, **settings: Any) -> Any:
    base = {"uploadkit.tempdir": tmp, "uploadkit.progress": "false",
            "uploadkit.max_file_size": "64 KiB", "uploadkit.memory_threshold": "1024"}
    base.update(settings)
    with Configurator(settings=base) as config:
        config.include("uploadkit.contrib.pyramid")
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        for name, view, extra in [
            ("read", read_view, {}),
            ("small", read_view, {"upload_limits": {"max_file_size": 100}}),
            ("deco", decorated_view, {}),
            ("csrf", read_view, {"require_csrf": True, "request_method": "POST"}),
        ]:
            config.add_route(name, f"/{name}")
            config.add_view(view, route_name=name, renderer="json", **extra)
        config.add_view(token_view, route_name="csrf", renderer="json", request_method="GET")
        return config.make_wsgi_app()


def post(app: webtest.TestApp, url: str, fields: List[Tuple[str, str]],
         files: List[Tuple[str, str, str, bytes]], status: Any = None, **headers: str) -> Any:
    """Bodies from uploadkit's encoder: webtest's boundary has a ``$`` RFC 2046 does not allow."""
    body, ctype = encode_multipart(fields, files)
    request = webtest.TestRequest.blank(url, method="POST", body=body, content_type=ctype, headers=headers)
    return app.do_request(request, status=status)


@pytest.fixture
def tmp(tmp_path: Any) -> Iterator[str]:
    path = tmp_path / "tmp"
    path.mkdir()
    yield str(path)
    wait_empty(str(path))


def test_post_holds_field_storages_and_text_fields(tmp: str) -> None:
    app = webtest.TestApp(make_app(tmp))
    r = post(app, "/read", [("title", "Hello"), ("n", "1")],
             [("f", "a.txt", "text/plain; charset=utf-8", b"tiny"), ("f", "b.png", "image/x-foo", PNG)])
    small, big = r.json["files"]
    assert small == {"data": "tiny", "filename": "a.txt", "type": "text/plain", "length": 4,
                     "sha256": sha(b"tiny"), "options": {"charset": "utf-8"},
                     "key": None, "url": None, "thumbnails": {}}
    assert big["data"].encode("latin-1") == PNG and big["type"] == "image/png" and big["length"] == len(PNG)
    assert r.json["texts"] == {"title": "Hello", "n": "1"}  # no "f.sha256"... metadata
    assert r.json["param"] == "Hello"


def test_view_option_and_decorator_limits(tmp: str) -> None:
    app = webtest.TestApp(make_app(tmp))
    r = post(app, "/small", [], [("f", "a.bin", "", b"x" * 200)], status=413)
    assert r.json["error"]["code"] == "file_too_large" and r.json["error"]["limit"] == 100
    r = post(app, "/deco", [], [("f", "a.bin", "", b"x" * 60)], status=413)
    assert r.json["error"]["limit"] == 50
    assert post(app, "/read", [], [("f", "a.bin", "", b"x" * 200)]).json["files"][0]["length"] == 200
    r = post(app, "/read", [], [("f", "a.bin", "", b"x" * (65 << 10))], status=413)
    assert r.json["error"]["limit"] == 64 << 10


def test_ini_strings_are_parsed(tmp: str) -> None:
    router = make_app(tmp, **{"uploadkit.allowed_types": "image/png, image/jpeg",
                              "uploadkit.max_files": "none", "uploadkit.hash_md5": "true",
                              "uploadkit.read_size": "64k"})
    probe = Request.blank("/")
    probe.registry = router.registry
    engine = engine_of(probe)
    limits = engine.limits_for({})
    assert limits.allowed_types == frozenset({"image/png", "image/jpeg"})
    assert limits.max_files is None and limits.max_file_size == 64 << 10
    assert engine.hash_md5 is True and engine.read_size == 65536 and engine.memory_threshold == 1024
    app = webtest.TestApp(router)
    r = post(app, "/read", [], [("f", "a.txt", "text/plain", b"plain text")], status=415)
    assert r.json["error"]["code"] == "unsupported_type"
    assert post(app, "/read", [], [("f", "a.png", "image/png", PNG)]).json["files"][0]["type"] == "image/png"


def real_png(size: Tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def test_storage_and_thumbnails_from_ini(tmp: str, tmp_path: Any) -> None:
    media = tmp_path / "media"
    app = webtest.TestApp(make_app(tmp, **{
        "uploadkit.storage": f"file://{media}", "uploadkit.storage.base_url": "/media/",
        "uploadkit.storage.upload_to": "{field}/{uuid}{ext}", "uploadkit.thumbnails.sizes": "32x32, 16x16"}))
    image = real_png()
    f = post(app, "/read", [], [("f", "pic.png", "image/png", image)]).json["files"][0]
    assert f["data"].encode("latin-1") == image  # read back from the storage
    assert f["key"].startswith("f/") and f["url"] == f"/media/{f['key']}"
    assert (media / f["key"]).read_bytes() == image
    assert sorted(f["thumbnails"]) == ["16x16", "32x32"]
    with Image.open(media / f["thumbnails"]["32x32"]) as thumb:
        assert thumb.size == (32, 24)


def test_unknown_setting_fails_at_include(tmp: str) -> None:
    with pytest.raises(ValueError, match="max_file_sise"):
        make_app(tmp, **{"uploadkit.max_file_sise": "1"})


def test_csrf_check_runs_after_the_upload_was_streamed(tmp: str) -> None:
    app = webtest.TestApp(make_app(tmp))
    token = app.get("/csrf").json["token"]
    ok = post(app, "/csrf", [("csrf_token", token)], [("f", "a.txt", "", b"abc")])
    assert ok.json["files"][0]["data"] == "abc"
    post(app, "/csrf", [("csrf_token", "wrong")], [("f", "a.txt", "", b"abc")], status=400)


def test_an_apps_exception_view_renders_refusals(tmp: str) -> None:
    with Configurator(settings={"uploadkit.tempdir": tmp, "uploadkit.progress": "false"}) as config:
        config.include("uploadkit.contrib.pyramid")
        config.add_route("small", "/small")
        config.add_view(read_view, route_name="small", renderer="json", upload_limits={"max_files": 1})

        def page(exc: UploadError, request: Request) -> Response:
            return Response(f"<p>{exc.code}</p>", status=exc.status)
        config.add_exception_view(page, context=UploadError)
        app = webtest.TestApp(config.make_wsgi_app())
    r = post(app, "/small", [], [("f", "a", "", b"1"), ("f", "b", "", b"2")], status=413)
    assert r.text == "<p>too_many_files</p>"


def test_progress_route_is_served_by_the_tween(tmp: str) -> None:
    app = webtest.TestApp(make_app(tmp, **{"uploadkit.progress": "memory"}))
    post(app, "/read?X-Progress-ID=p-1", [], [("f", "a.png", "", PNG)])
    assert app.get("/upload/progress", {"X-Progress-ID": "p-1"}).json["state"] == "done"


def test_real_server_with_requests_and_curl(tmp: str, tmp_path: Any) -> None:
    big = PNG * 4
    src = tmp_path / "src.png"
    src.write_bytes(big)
    with serve(make_app(tmp)) as server:
        r = requests.post(f"{server.url}/read", data={"title": "T"},
                          files={"f": ("p.png", big, "image/png")}, timeout=10)
        assert r.status_code == 200, r.text
        f = r.json()["files"][0]
        assert f["data"].encode("latin-1") == big and f["sha256"] == sha(big)
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "-F", f"f=@{src}", "-F", "title=c",
                              f"{server.url}/small", "-w", "\n%{http_code}"],
                             capture_output=True, check=True, timeout=30)
        body, _, code = out.stdout.decode().rpartition("\n")
        assert code == "413" and '"file_too_large"' in body
        wait_empty(tmp)


# -- tus ---------------------------------------------------------------------------------

def tus_app(tmp: str, tmp_path: Any, view_options: Any = None, **settings: Any) -> Any:
    """tus at /upload/tus/ from ini-style settings; the view routed at the upload
    URL (with ``view_options``) gets the finished file and refuses files named
    ``refuse*`` with 403."""
    seen: List[Dict[str, Any]] = []
    base = {"uploadkit.tempdir": tmp, "uploadkit.progress": "memory", "uploadkit.max_file_size": "1 MiB",
            "uploadkit.storage": f"file://{tmp_path / 'media'}",
            "uploadkit.tus_path": "/upload/tus/", "uploadkit.tus.expire_after": "600",
            "uploadkit.tus.cors_origins": "http://allowed.example http://other.example"}
    base.update(settings)

    def finished(request: Request) -> Any:
        f = request.POST["file"]
        assert isinstance(f, UploadKitFieldStorage)
        seen.append({"upload_id": request.matchdict["upload_id"], "method": request.method,
                     "filename": f.filename, "length": f.length, "type": f.type,
                     "sha256": f.uploadkit.sha256, "content_sha256": sha(f.file.read()), "key": f.uploadkit.key})
        if f.filename.startswith("refuse"):
            return Response(json_body={"error": {"code": "refused", "message": "not this one"}}, status=403)
        return {"ok": True}

    with Configurator(settings=base) as config:
        config.include("uploadkit.contrib.pyramid")
        config.add_route("tus_done", "/upload/tus/{upload_id}")
        config.add_view(finished, route_name="tus_done", renderer="json", request_method=("PATCH", "POST"),
                        **(view_options or {}))
        return config.make_wsgi_app(), seen


def tus_upload(url: str, data: bytes, filename: str, chunk_size: int = 20_000) -> Any:
    from tusclient import client as tus_client

    up = tus_client.TusClient(url).uploader(file_stream=io.BytesIO(data), chunk_size=chunk_size,
                                            metadata={"filename": filename}, retries=0)
    up.upload()
    return up


def area_files(tmp_path: Any) -> List[str]:
    """Every file under the storage (final keys and the tus area's data); the
    area's state and lease files, which ``uploadkit cleanup`` reclaims, aside."""
    root = tmp_path / "media"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.suffix not in (".info", ".lock"))


def test_a_tus_upload_reaches_the_view_as_a_field_storage(tmp: str, tmp_path: Any) -> None:
    app, seen = tus_app(tmp, tmp_path)
    data = b"%PDF-1.4\n" + bytes(range(256)) * 300
    with serve(app) as server:
        up = tus_upload(f"{server.url}/upload/tus/", data, "my report.pdf")
        upload_id = up.url.rpartition("/")[2]
        progress = requests.get(f"{server.url}/upload/progress", params={"X-Progress-ID": upload_id}, timeout=10)
        head = requests.head(up.url, headers={"Tus-Resumable": "1.0.0"}, timeout=10)
        options = requests.options(f"{server.url}/upload/tus/", timeout=10,
                                   headers={"Origin": "http://other.example",
                                            "Access-Control-Request-Method": "PATCH"})
    [f] = seen  # once, on the PATCH that completed the upload
    assert f["upload_id"] == upload_id and f["method"] == "PATCH"
    assert f["filename"] == "my report.pdf" and f["type"] == "application/pdf" and f["length"] == len(data)
    assert f["sha256"] == f["content_sha256"] == sha(data)
    assert (tmp_path / "media" / f["key"]).read_bytes() == data
    assert area_files(tmp_path) == [f["key"]]  # the tus area's data became the final key
    assert progress.json()["state"] == "done" and progress.json()["received"] == len(data)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(len(data))
    assert options.status_code == 204 and options.headers["Tus-Version"] == "1.0.0"
    assert options.headers["Access-Control-Allow-Origin"] == "http://other.example"


def test_a_view_that_refuses_the_finished_tus_upload_discards_it(tmp: str, tmp_path: Any) -> None:
    from tusclient.exceptions import TusCommunicationError

    app, seen = tus_app(tmp, tmp_path)
    data = os.urandom(50_000)
    with serve(app) as server:
        with pytest.raises(TusCommunicationError) as refused:
            tus_upload(f"{server.url}/upload/tus/", data, "refuse-me.bin")
        [f] = seen
        url = f"{server.url}/upload/tus/{f['upload_id']}"
        gone = requests.head(url, headers={"Tus-Resumable": "1.0.0"}, timeout=10)
    assert refused.value.status_code == 403 and b'"refused"' in refused.value.response_content
    assert f["sha256"] == sha(data)  # the view saw the whole file before refusing it
    assert area_files(tmp_path) == []  # no final key, no data left in the tus area
    assert gone.status_code == 410
    wait_empty(tmp)


def test_a_views_upload_limits_refuse_a_finished_tus_upload(tmp: str, tmp_path: Any) -> None:
    from tusclient.exceptions import TusCommunicationError

    app, seen = tus_app(tmp, tmp_path, {"upload_limits": {"max_file_size": 100}})
    with serve(app) as server:
        with pytest.raises(TusCommunicationError) as refused:
            tus_upload(f"{server.url}/upload/tus/", b"x" * 150, "big.bin", chunk_size=100)
        tus_upload(f"{server.url}/upload/tus/", b"y" * 80, "fits.bin", chunk_size=50)
    assert refused.value.status_code == 413
    assert json.loads(refused.value.response_content)["error"]["limit"] == 100
    [ok] = seen  # the refused file never reached the view
    assert ok["filename"] == "fits.bin" and ok["length"] == 80
    assert area_files(tmp_path) == [ok["key"]]


def test_a_tus_upload_through_the_method_override_and_ini_strings(tmp: str, tmp_path: Any) -> None:
    app, seen = tus_app(tmp, tmp_path, **{"uploadkit.tus.max_size": "1000"})
    engine = app.registry["uploadkit"]
    assert engine.tus_app.settings.expire_after == 600.0
    assert engine.tus_app.settings.cors_origins == ("http://allowed.example", "http://other.example")
    t = {"Tus-Resumable": "1.0.0"}
    data = b"hello, resumable pyramid"
    with serve(app) as server:
        too_big = requests.post(f"{server.url}/upload/tus/", headers={**t, "Upload-Length": "1001"}, timeout=10)
        created = requests.post(f"{server.url}/upload/tus/", timeout=10,
                                headers={**t, "Upload-Length": str(len(data)), "Upload-Metadata": "filename aGkudHh0"})
        url = created.headers["Location"]
        octets = {**t, "Content-Type": "application/offset+octet-stream", "X-HTTP-Method-Override": "PATCH"}
        first = requests.post(url, data=data[:10], headers={**octets, "Upload-Offset": "0"}, timeout=10)
        last = requests.post(url, data=data[10:], headers={**octets, "Upload-Offset": "10"}, timeout=10)
        deleted = requests.delete(url, headers=t, timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"]["limit"] == 1000
    assert created.status_code == 201 and first.status_code == 204
    assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
    [f] = seen
    assert f["method"] == "POST" and f["filename"] == "hi.txt" and f["sha256"] == sha(data)
    assert deleted.status_code == 204


def deny_all(environ: Dict[str, Any], action: str, upload_id: Any) -> bool:
    return False


def test_tus_settings_from_ini_strings(tmp: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="max_sise"):
        tus_app(tmp, tmp_path, **{"uploadkit.tus.max_sise": "1"})
    app, _ = tus_app(tmp, tmp_path, **{"uploadkit.tus.handoff": "false", "uploadkit.tus.lock_wait": "0.5",
                                       "uploadkit.tus.authorize": "tests.test_contrib_pyramid:deny_all"})
    settings = app.registry["uploadkit"].tus_app.settings
    assert settings.path == "/upload/tus/" and settings.handoff is False and settings.lock_wait == 0.5
    assert settings.authorize is deny_all
    r = webtest.TestApp(app).post("/upload/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "5"},
                                  status=403)
    assert r.json["error"]["code"] == "forbidden" and r.headers["Tus-Resumable"] == "1.0.0"
    off, _ = tus_app(tmp, tmp_path, **{"uploadkit.tus": "false"})
    assert off.registry["uploadkit"].tus_app is None
    webtest.TestApp(off).options("/upload/tus/", status=404)  # Pyramid's own answer: no tus here
