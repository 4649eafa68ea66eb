"""Thumbnails through the whole stack: a real WSGI server on 127.0.0.1, the
middleware with storage and a Thumbnailer, and a real HTTP client."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, List, Tuple

import pytest
import requests
from PIL import Image

from tests.support.wsgi import RunningServer, gunicorn, wsgi_server  # noqa: F401  (imports webob quietly first)
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


# -- today's phone photos, through gunicorn, memory measured from outside ------------------

# What the viewer must see (top-left, top-right, bottom-left, bottom-right).
UPRIGHT = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40)]


@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory: Any) -> Dict[str, bytes]:
    """A Pixel's 50 MP and a Galaxy Ultra's 200 MP photo, as the sensor stores
    them (landscape) with EXIF orientation 6 (shown as portrait). Built row by
    row: a few MB and a fraction of a second each, never 200 MP in memory."""
    colours = I.stored_quadrants(UPRIGHT, 6)
    return {"50mp.jpg": I.quadrant_jpeg(8160, 6144, colours, orientation=6),
            "200mp.jpg": I.quadrant_jpeg(16320, 12240, colours, orientation=6)}


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def _quadrant_colours(im: Image.Image) -> List[Tuple[int, ...]]:
    w, h = im.size
    rgb = im.convert("RGB")
    return [rgb.getpixel((x, y)) for y in (h // 4, h * 3 // 4) for x in (w // 4, w * 3 // 4)]  # type: ignore[misc]


@pytest.mark.slow
def test_phone_photos_get_upright_thumbnails_in_bounded_memory(phone_photos: Dict[str, bytes],
                                                               tmp_path: Any) -> None:
    media = tmp_path / "media"
    media.mkdir()
    with gunicorn("tests.support.thumbnail_app:app", env={"UPLOADKIT_TEST_MEDIA": str(media)}) as url:
        # A small photo first: the worker has imported and set up everything.
        r = requests.post(url + "/upload", timeout=30,
                          files={"pic": ("small.jpg", I.oriented_jpeg(I.drawing(400, 300), 6), "image/jpeg")})
        assert r.status_code == 200, r.text
        pid = r.json()["pid"]
        baseline = _vm_hwm_kib(pid)
        for name, (width, height) in [("50mp.jpg", (8160, 6144)), ("200mp.jpg", (16320, 12240))]:
            r = requests.post(url + "/upload", timeout=60,
                              files={"pic": (name, phone_photos[name], "image/jpeg")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["pid"] == pid
            thumbs = body["files"]["pic"]["thumbnails"]
            assert sorted(thumbs) == ["150x150", "600x600"]
            for size, key in thumbs.items():
                box = int(size.split("x")[0])
                with Image.open(media / key) as im:
                    # Upright: portrait, the long side the box's, the short one in
                    # proportion (rounded half up: 150 * 12240 / 16320 = 112.5 -> 113).
                    assert im.size == (int(box * height / width + 0.5), box), (name, size, im.size)
                    for got, want in zip(_quadrant_colours(im), UPRIGHT):
                        assert max(abs(a - b) for a, b in zip(got, want)) < 40, (name, size, got, want)
            grown_mib = (_vm_hwm_kib(pid) - baseline) / 1024
            assert grown_mib < 200, f"{name}: the worker's peak memory grew by {grown_mib:.0f} MiB"


def test_a_gif_html_polyglot_is_refused_in_words(wsgi_server: Callable[..., RunningServer], tmp_path: Any) -> None:
    root = str(tmp_path / "media")
    server = wsgi_server(UploadMiddleware(app, storage=Storage(root), thumbnails=Thumbnailer([(100, 100)])))
    # A GIF's signature and screen descriptor, then a web page instead of image blocks.
    polyglot = (b"GIF89a\x10\x00\x10\x00\x00\x00\x00"
                b"<html><body><script>alert(document.domain)</script></body></html>;")
    r = requests.post(server.url + "/upload", timeout=30,
                      files={"pic": ("cat.gif", polyglot, "image/gif")})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_image" and error["field"] == "pic"
    message = error["message"]
    assert "0x" not in message and "object at" not in message and "<" not in message, message
    assert "'cat.gif'" in message and "GIF image cannot be read" in message, message
    assert everything(root) == []
