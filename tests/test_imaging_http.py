"""Thumbnails through the whole stack: a real WSGI server on 127.0.0.1, the
middleware with storage and a Thumbnailer, and a real HTTP client."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, List

import requests
from PIL import Image

from tests.support.wsgi import RunningServer, wsgi_server  # noqa: F401  (imports webob quietly first)
from tests.support import images as I
from uploadkit.imaging import Thumbnailer, ThumbnailSpec
from uploadkit.middleware import FILES_KEY, FORM_KEY, UploadMiddleware
from uploadkit.storage import Storage


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    files = environ[FILES_KEY]
    body = {name: {"key": f.key, "thumbnails": f.thumbnails} for name, f in files.items()}
    body["form"] = dict(environ[FORM_KEY].items())
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def everything(root: str) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_upload_with_thumbnails_over_http(wsgi_server: Callable[..., RunningServer], tmp_path: Any) -> None:
    root = str(tmp_path / "media")
    storage = Storage(root)
    thumbs = Thumbnailer(sizes=[(150, 150), ThumbnailSpec(48, 48, mode="crop")], mode="fit",
                         crop_fields=("x", "y", "w", "h"))
    server = wsgi_server(UploadMiddleware(app, storage=storage, thumbnails=thumbs))
    photo = I.oriented_jpeg(I.drawing(300, 400), 6)
    r = requests.post(server.url + "/upload", timeout=30,
                      files={"avatar": ("me.jpg", photo, "image/jpeg"),
                             "doc": ("cv.pdf", b"%PDF-1.4\n" + b"z" * 3000, "application/pdf")},
                      data={"x": "0", "y": "100", "w": "300", "h": "300"})
    assert r.status_code == 200, r.text
    body = r.json()
    key = body["avatar"]["key"]
    stem = key.rsplit(".", 1)[0]
    assert body["avatar"]["thumbnails"] == {"150x150": f"{stem}.150x150.jpg", "48x48": f"{stem}.48x48.jpg"}
    assert body["doc"]["thumbnails"] == {}
    assert everything(root) == sorted([key, body["doc"]["key"], f"{stem}.150x150.jpg", f"{stem}.48x48.jpg"])
    with storage.open(f"{stem}.150x150.jpg") as f:
        im = Image.open(io.BytesIO(f.read()))
        assert im.size == (150, 150)  # the 300x300 crop of the upright portrait


def test_refused_image_over_http_stores_nothing(wsgi_server: Callable[..., RunningServer], tmp_path: Any) -> None:
    root = str(tmp_path / "media")
    server = wsgi_server(UploadMiddleware(app, storage=Storage(root), thumbnails=Thumbnailer([(100, 100)])))
    for name, data in [("bomb.png", I.bomb_png()), ("cut.jpg", I.truncated(I.encode(I.drawing(400, 300), "JPEG")))]:
        r = requests.post(server.url + "/upload", timeout=30,
                          files={"ok": ("ok.jpg", I.encode(I.drawing(200, 100), "JPEG"), "image/jpeg"),
                                 "pic": (name, data, "image/png")})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_image" and error["field"] == "pic" and name in error["message"]
        assert everything(root) == []
