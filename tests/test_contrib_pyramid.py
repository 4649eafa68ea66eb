"""The Pyramid adapter through webtest's TestApp and through a real threaded
WSGI server on 127.0.0.1 with requests and curl."""

from __future__ import annotations

import io
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
