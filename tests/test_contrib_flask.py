"""The Flask adapter through ``app.test_client()`` and through a real threaded
WSGI server on 127.0.0.1 with requests and httpx."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any, Dict, Iterator

import pytest

with warnings.catch_warnings():
    # WebOb (under the middleware) imports the stdlib cgi module, deprecated in 3.11.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

import httpx  # noqa: E402
import requests  # noqa: E402
from flask import Flask, request  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402
from werkzeug.datastructures import FileStorage  # noqa: E402
from werkzeug.utils import secure_filename  # noqa: E402

from tests.support.checks import sha, wait_empty  # noqa: E402
from tests.support.memcached import memcached_server  # noqa: E402,F401
from tests.support.wsgi import gunicorn, serve  # noqa: E402
from uploadkit.contrib.flask import UploadKit, UploadKitFileStorage, upload_limits  # noqa: E402
from uploadkit.errors import FileTooLarge, UploadError  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 20  # sniffs as image/png


class BufferedClient(FlaskClient):
    """Werkzeug's test client leaves the response open (temp files with it)
    until ``response.close()``; buffered responses are closed once read, as a
    server does."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def new_app() -> Flask:
    app = Flask(__name__)
    app.test_client_class = BufferedClient
    return app




def describe(f: Any) -> Dict[str, Any]:
    return {"class": type(f).__name__, "filename": f.filename, "name": f.name, "mimetype": f.mimetype,
            "content_length": f.content_length, "sha256": f.uploadkit.sha256,
            "is_filestorage": isinstance(f, FileStorage)}


def make_app(tmp: str, out: str, *, init_later: bool = False, **options: Any) -> Flask:
    app = new_app()
    app.config.update(UPLOADKIT_TEMPDIR=tmp, UPLOADKIT_PROGRESS=False,
                      UPLOADKIT_MAX_FILE_SIZE="64 KiB", UPLOADKIT_MEMORY_THRESHOLD=1024)

    @app.post("/save")
    def save() -> Any:
        f = request.files["f"]
        dest = os.path.join(out, secure_filename(f.filename or "x"))
        f.save(dest)
        return {**describe(f), "saved": dest, "form": request.form.to_dict(flat=False)}

    @app.post("/read")
    def read() -> Any:
        return {name: [{**describe(f), "data": f.stream.read().decode("latin-1")}
                       for f in request.files.getlist(name)] for name in request.files}

    @app.post("/small")
    @upload_limits(max_file_size=100)
    def small() -> Any:
        return {"ok": True}

    if init_later:
        kit = UploadKit(**options)
        kit.init_app(app)
    else:
        UploadKit(app, **options)
    return app


@pytest.fixture
def dirs(tmp_path: Any) -> Iterator[Dict[str, str]]:
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    yield {"tmp": str(tmp), "out": str(out)}
    wait_empty(str(tmp))


def test_request_files_save_copies_the_streamed_temp_file(dirs: Dict[str, str]) -> None:
    app = make_app(dirs["tmp"], dirs["out"])
    with app.test_client() as client:
        r = client.post("/save", data={"title": "x", "tags": ["a", "b"],
                                       "f": (__import__("io").BytesIO(PNG), "my pic.png", "application/x-foo")})
    assert r.status_code == 200, r.data
    data = r.get_json()
    assert data["form"] == {"title": ["x"], "tags": ["a", "b"]}  # text fields only, no "f.sha256"
    assert data["class"] == UploadKitFileStorage.__name__ and data["is_filestorage"]
    assert data["filename"] == "my pic.png" and data["name"] == "f"
    assert data["mimetype"] == "image/png"  # sniffed, not the declared type
    assert data["content_length"] == len(PNG) and data["sha256"] == sha(PNG)
    with open(data["saved"], "rb") as f:
        assert f.read() == PNG


def test_stream_read_of_memory_and_temp_files(dirs: Dict[str, str]) -> None:
    app = make_app(dirs["tmp"], dirs["out"], init_later=True)
    import io
    with app.test_client() as client:
        r = client.post("/read", data={"f": [(io.BytesIO(b"small"), "a.txt"), (io.BytesIO(PNG), "b.png")]})
    small, big = r.get_json()["f"]
    assert small["data"] == "small" and small["content_length"] == 5
    assert big["data"].encode("latin-1") == PNG and big["mimetype"] == "image/png"


def test_limits_from_config_and_per_view(dirs: Dict[str, str]) -> None:
    import io
    app = make_app(dirs["tmp"], dirs["out"])
    client = app.test_client()
    r = client.post("/small", data={"f": (io.BytesIO(b"x" * 200), "a.bin")})
    assert r.status_code == 413 and r.get_json()["error"]["limit"] == 100
    assert client.post("/save", data={"f": (io.BytesIO(b"x" * 200), "a.bin")}).status_code == 200
    r = client.post("/save", data={"f": (io.BytesIO(b"x" * (65 << 10)), "a.bin")})
    assert r.status_code == 413
    assert r.get_json()["error"] == {"code": "file_too_large", "field": "f", "limit": 65536,
                                     "message": "file 'a.bin' is larger than the limit of 64.0 KiB"}


def test_keyword_options_win_and_max_content_length_is_kept(dirs: Dict[str, str]) -> None:
    import io
    app = new_app()
    app.config.update(MAX_CONTENT_LENGTH=5000, UPLOADKIT_TEMPDIR="/nonexistent", UPLOADKIT_PROGRESS=False)

    @app.post("/u")
    def u() -> Any:
        return {"n": len(request.files)}
    UploadKit(app, tempdir=dirs["tmp"], memory_threshold=0)
    client = app.test_client()
    assert client.post("/u", data={"f": (io.BytesIO(b"y" * 3000), "a")}).get_json() == {"n": 1}
    r = client.post("/u", data={"f": (io.BytesIO(b"y" * 6000), "a")})
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "request_too_large"


def test_errors_app_lets_flask_error_handlers_render(dirs: Dict[str, str]) -> None:
    import io
    app = make_app(dirs["tmp"], dirs["out"], errors="app")

    @app.errorhandler(FileTooLarge)
    def too_large(exc: FileTooLarge) -> Any:
        return f"<p>too large: {exc.limit}</p>", 413

    client = app.test_client()
    r = client.post("/small", data={"f": (io.BytesIO(b"x" * 200), "a.bin")})
    assert r.status_code == 413 and r.data == b"<p>too large: 100</p>"
    # other refusals fall back to the JSON handler uploadkit registered
    r = client.post("/small", data=b"--x\r\nbroken", content_type="multipart/form-data; boundary=x")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "malformed_multipart"


def test_errors_app_keeps_the_apps_own_handler(dirs: Dict[str, str]) -> None:
    import io
    app = new_app()
    app.config.update(UPLOADKIT_TEMPDIR=dirs["tmp"], UPLOADKIT_PROGRESS=False, UPLOADKIT_ERRORS="app",
                      UPLOADKIT_LIMITS={"max_file_size": 10})

    @app.errorhandler(UploadError)
    def refused(exc: UploadError) -> Any:
        return {"mine": exc.code}, exc.status

    @app.post("/u")
    def u() -> Any:
        raise AssertionError("the view must not run for a refused upload")
    UploadKit(app)
    r = app.test_client().post("/u", data={"f": (io.BytesIO(b"z" * 20), "a")})
    assert r.status_code == 413 and r.get_json() == {"mine": "file_too_large"}


def test_bad_config_is_refused(dirs: Dict[str, str]) -> None:
    app = new_app()
    app.config["UPLOADKIT_MAX_FILES_SIZE"] = 3
    with pytest.raises(ValueError, match="max_files_size"):
        UploadKit(app)
    with pytest.raises(ValueError, match="UPLOADKIT_ERRORS"):
        UploadKit(new_app(), errors="html")


def test_progress_route_is_served(dirs: Dict[str, str]) -> None:
    import io
    app = make_app(dirs["tmp"], dirs["out"], progress=None)  # the default memory store
    client = app.test_client()
    r = client.post("/save?X-Progress-ID=abc123", data={"f": (io.BytesIO(PNG), "p.png")})
    assert r.status_code == 200
    status = client.get("/upload/progress?X-Progress-ID=abc123").get_json()
    assert status["state"] == "done"


def test_storage_and_thumbnails_reach_request_files(dirs: Dict[str, str], tmp_path: Any) -> None:
    import io

    from PIL import Image

    from uploadkit.imaging import Thumbnailer
    from uploadkit.storage import Storage

    media = tmp_path / "media"
    app = make_app(dirs["tmp"], dirs["out"], storage=Storage(str(media), base_url="/m/"),
                   thumbnails=Thumbnailer([(20, 20)]))

    @app.post("/meta")
    def meta() -> Any:
        f = request.files["f"]
        return {"key": f.uploadkit.key, "url": f.uploadkit.url, "thumbnails": f.uploadkit.thumbnails,
                "data": f.read().decode("latin-1")}
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 90, 200)).save(buf, "PNG")
    image = buf.getvalue()
    client = app.test_client()
    data = client.post("/meta", data={"f": (io.BytesIO(image), "blue.png")}).get_json()
    assert data["data"].encode("latin-1") == image and data["url"] == f"/m/{data['key']}"
    assert (media / data["key"]).read_bytes() == image
    assert (media / data["thumbnails"]["20x20"]).is_file()
    saved = client.post("/save", data={"f": (io.BytesIO(image), "b.png")}).get_json()
    with open(saved["saved"], "rb") as f:  # save() of a stored file streams from the storage
        assert f.read() == image


def test_real_server_with_requests_and_httpx(dirs: Dict[str, str]) -> None:
    app = make_app(dirs["tmp"], dirs["out"])
    big = PNG * 3
    with serve(app) as server:
        r = requests.post(f"{server.url}/save", data={"title": "t"},
                          files={"f": ("pic.png", big, "image/png")}, timeout=10)
        assert r.status_code == 200, r.text
        with open(r.json()["saved"], "rb") as f:
            assert f.read() == big
        assert r.json()["sha256"] == sha(big)
        with httpx.Client(timeout=10) as client:
            r2 = client.post(f"{server.url}/read", files={"f": ("a.bin", big)})
            assert r2.json()["f"][0]["data"].encode("latin-1") == big
            refused = client.post(f"{server.url}/small", files={"f": ("a.bin", b"q" * 500)})
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "file_too_large"
        wait_empty(dirs["tmp"])


def test_progress_crosses_workers_under_gunicorn(tmp_path: Any, memcached_server: Any) -> None:
    """Two sync workers: while one is busy receiving a slow upload, every poll is
    answered by the other, so the progress it reports came through memcached."""
    import threading

    size, piece = 8 * 2**20, 256 * 1024
    data = bytes(range(256)) * (size // 256)
    boundary = "cross-workers-1"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    class SlowBody:
        """A sized body that trickles out (about 2 s): many polls fit in."""

        def __init__(self) -> None:
            self.parts = [head] + [data[i:i + piece] for i in range(0, size, piece)] + [tail]
            self.length = sum(map(len, self.parts))

        def __len__(self) -> int:
            return self.length

        def read(self, n: int = -1) -> bytes:
            if not self.parts:
                return b""
            time.sleep(0.06)
            return self.parts.pop(0)

    env = {"UPLOADKIT_TEST_MEMCACHED": memcached_server.address, "UPLOADKIT_TEST_TMP": str(tmp_path)}
    with gunicorn("tests.support.flask_progress_app:app", env=env, workers=2) as url:
        result: dict = {}

        def upload() -> None:
            r = requests.post(f"{url}/upload?X-Progress-ID=cross1", data=SlowBody(), timeout=60,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            result["status"], result["text"] = r.status_code, r.text

        sender = threading.Thread(target=upload)
        sender.start()
        seen = []
        deadline = time.monotonic() + 30
        while sender.is_alive() and time.monotonic() < deadline:
            poll = requests.get(f"{url}/upload/progress", params={"X-Progress-ID": "cross1"}, timeout=5)
            assert poll.status_code == 200 and poll.headers["Cache-Control"] == "no-store", poll.text[:500]
            seen.append(poll.json())
            time.sleep(0.1)
        sender.join(timeout=30)
        final = requests.get(f"{url}/upload/progress", params={"X-Progress-ID": "cross1"}, timeout=5).json()

    assert result["status"] == 200, result
    answer = json.loads(result["text"])
    assert answer["sha256"] == hashlib.sha256(data).hexdigest() and answer["size"] == size
    middle = [s for s in seen if s["state"] == "uploading" and 0 < s["received"] < s["size"]]
    assert len(middle) >= 3, seen
    counts = [s["received"] for s in middle]
    assert counts == sorted(counts)
    assert final["state"] == "done" and final["received"] == final["size"]
    assert os.listdir(tmp_path) == []


def test_a_tus_upload_reaches_a_flask_view_as_request_files(tmp_path: Any) -> None:
    import io

    from tusclient import client as tus_client

    from uploadkit.tusapp import TusSettings

    app = Flask(__name__)
    app.config["UPLOADKIT_TUS"] = TusSettings(directory=str(tmp_path / "tus"))
    UploadKit(app)
    seen = []

    @app.route("/upload/tus/<upload_id>", methods=["PATCH", "POST"])
    def finished(upload_id: str) -> Any:
        f = request.files["file"]
        seen.append((f.filename, hashlib.sha256(f.read()).hexdigest(), f.uploadkit.sha256))
        return {"ok": True}

    data = os.urandom(50_000)
    with serve(app) as srv:
        up = tus_client.TusClient(srv.url + "/upload/tus/").uploader(
            file_stream=io.BytesIO(data), chunk_size=20_000, metadata={"filename": "a b.bin"}, retries=0)
        up.upload()
    digest = hashlib.sha256(data).hexdigest()
    assert seen == [("a b.bin", digest, digest)]  # the file of the request that completed the upload
