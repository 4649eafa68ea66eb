"""The Django adapter, through Django's test Client (the middleware streaming on
its own), through the WSGI wrapper (webtest), and through real servers on
127.0.0.1 (a threaded wsgiref server, gunicorn with 2 workers) with requests,
httpx and curl. The project under test is tests/support/django_project."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tempfile
import warnings
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Tuple

import pytest

with warnings.catch_warnings():
    # WebOb (under the middleware) imports the stdlib cgi module, deprecated in 3.11.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

BASE_DIR = tempfile.mkdtemp(prefix="uploadkit-django-")
os.environ["UPLOADKIT_DJANGO_DIR"] = BASE_DIR
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.support.django_project.settings"

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
import requests  # noqa: E402
import webtest  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.files.base import ContentFile  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from PIL import Image  # noqa: E402

from tests.support.checks import sha, wait_empty  # noqa: E402
from tests.support.django_project.models import Document, RemoteDocument  # noqa: E402
from tests.support.s3 import s3_bucket, s3_server  # noqa: E402,F401
from tests.support.wsgi import gunicorn, serve  # noqa: E402
from uploadkit.contrib.django import (FsspecStorage, UploadKitMemoryFile,  # noqa: E402
                                      UploadKitTemporaryFile, get_wsgi_application, upload_limits)

MEDIA = os.path.join(BASE_DIR, "media")
TMP = os.path.join(BASE_DIR, "tmp")


@pytest.fixture(scope="module", autouse=True)
def project() -> Iterator[None]:
    with connection.schema_editor() as editor:
        editor.create_model(Document)
        editor.create_model(RemoteDocument)
    yield
    connection.close()
    shutil.rmtree(BASE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_dirs() -> Iterator[None]:
    shutil.rmtree(MEDIA, ignore_errors=True)
    shutil.rmtree(TMP, ignore_errors=True)
    os.makedirs(TMP)
    yield
    wait_empty(TMP)



def png_bytes(size: Tuple[int, int] = (48, 32), seed: int = 1) -> bytes:
    """Noise, so the PNG is well over the 1 KiB memory threshold."""
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                for _ in range(size[0] * size[1])])
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()



def post(app: webtest.TestApp, url: str, fields: List[Tuple[str, str]],
         files: List[Tuple[str, str, bytes]], status: Any = None) -> Any:
    """webtest's own multipart encoder uses a ``$`` in its boundary, which
    RFC 2046 does not allow; bodies are built with uploadkit's encoder."""
    from uploadkit.multipart import encode_multipart

    body, ctype = encode_multipart(fields, [(n, fn, "application/octet-stream", d) for n, fn, d in files])
    request = webtest.TestRequest.blank(url, method="POST", body=body, content_type=ctype)
    return app.do_request(request, status=status)


def check_saved(result: Dict[str, Any], photo: bytes, attachment: bytes) -> None:
    year = datetime.now(timezone.utc).year
    assert result["photo"].startswith(f"photos/{year}/") and result["photo"].endswith(".png")
    assert result["photo_path"] == os.path.join(MEDIA, *result["photo"].split("/"))
    with open(result["photo_path"], "rb") as f:
        assert f.read() == photo
    assert result["photo_size"] == [48, 32]
    assert result["sha256"] == sha(photo)
    assert result["content_type"] == "image/png"
    # moved, not copied: the temp file is gone and its inode is now the saved file
    assert result["temp_path"].startswith(TMP + os.sep)
    assert not os.path.exists(result["temp_path"])
    assert os.stat(result["photo_path"]).st_ino == result["temp_inode"]
    assert result["attachment"].startswith("docs/notes")
    with open(result["attachment_path"], "rb") as f:
        assert f.read() == attachment


# -- Django's test Client: the middleware streams the body itself ---------------------

def test_client_modelform_saves_image_and_file_moving_the_temp_file() -> None:
    photo, notes = png_bytes(), b"some notes\n"
    response = Client().post("/upload/", {
        "title": "Holiday",
        "photo": ContentFile(photo, name="beach.png"),
        "attachment": ContentFile(notes, name="notes.txt"),
    })
    assert response.status_code == 201, response.content
    result = response.json()
    assert result["title"] == "Holiday"
    check_saved(result, photo, notes)
    assert Document.objects.get(pk=result["id"]).photo.name == result["photo"]


def test_client_request_files_are_django_uploaded_files_with_uploadkit_metadata() -> None:
    photo = png_bytes()
    body = {
        "title": ["a", "b"],
        "f": [ContentFile(b"tiny", name="a.txt"), ContentFile(photo, name="b.png")],
    }
    response = Client().post("/echo/", body)
    assert response.status_code == 200
    data = response.json()
    assert data["fields"] == {"title": ["a", "b"]}  # no "f.sha256"... metadata fields
    small, big = data["files"]["f"]
    assert small["class"] == UploadKitMemoryFile.__name__
    assert small["data"] == "tiny" and small["size"] == 4 and small["sha256"] == sha(b"tiny")
    assert big["class"] == UploadKitTemporaryFile.__name__
    assert big["name"] == "b.png" and big["size"] == len(photo) and big["content_type"] == "image/png"
    assert big["temporary_file_path"].startswith(TMP + os.sep)
    assert big["sha256"] == sha(photo)


def test_client_charset_of_a_part_reaches_the_django_file() -> None:
    from uploadkit.multipart import encode_multipart

    body, ctype = encode_multipart([], [("f", "t.txt", "text/plain; charset=iso-8859-1", b"caf\xe9")])
    response = Client().post("/echo/", body, content_type=ctype)
    f = response.json()["files"]["f"][0]
    assert f["charset"] == "iso-8859-1" and f["data"] == "caf\xe9"


def test_client_per_view_limit_refuses_with_json_413() -> None:
    response = Client().post("/small/", {"f": ContentFile(b"x" * 2048, name="big.bin")})
    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and error["limit"] == 1024 and error["field"] == "f"
    # the same file is fine where the site limit applies
    assert Client().post("/echo/", {"f": ContentFile(b"x" * 2048, name="big.bin")}).status_code == 200


def test_client_csrf_check_reads_the_installed_post() -> None:
    client = Client(enforce_csrf_checks=True)
    token = client.get("/protected/").json()["token"]
    ok = client.post("/protected/", {"csrfmiddlewaretoken": token, "f": ContentFile(b"hi", name="h.txt")})
    assert ok.status_code == 200 and ok.json()["files"]["f"][0]["data"] == "hi"
    refused = client.post("/protected/", {"f": ContentFile(b"hi", name="h.txt")})
    assert refused.status_code == 403


def test_storage_and_thumbnails_settings(tmp_path: Any) -> None:
    from uploadkit.contrib.django import UploadKitStoredFile

    kept = tmp_path / "kept"
    settings = dict(django.conf.settings.UPLOADKIT,
                    STORAGE={"url": str(kept), "base_url": "/kept/", "upload_to": "{uuid}{ext}"},
                    THUMBNAILS={"sizes": [(16, 16)]})
    photo = png_bytes(seed=5)
    with override_settings(UPLOADKIT=settings):
        f = Client().post("/echo/", {"f": ContentFile(photo, name="p.png")}).json()["files"]["f"][0]
        assert f["class"] == UploadKitStoredFile.__name__ and f["temporary_file_path"] is None
        assert (kept / f["key"]).read_bytes() == photo
        assert (kept / f["thumbnails"]["16x16"]).is_file()
        # a ModelForm still saves it under MEDIA_ROOT (copied from the storage)
        r = Client().post("/upload/", {"title": "s", "photo": ContentFile(photo, name="p.png")})
        assert r.status_code == 201, r.content
        with open(r.json()["photo_path"], "rb") as saved:
            assert saved.read() == photo


# -- the WSGI wrapper, through webtest --------------------------------------------------

def test_wsgi_wrapper_refuses_before_django_and_honours_view_limits() -> None:
    app = webtest.TestApp(get_wsgi_application())
    refused = post(app, "/small/", [], [("f", "big.bin", b"x" * 2048)], status=413)
    assert refused.json["error"]["code"] == "file_too_large"
    assert refused.json["error"]["limit"] == 1024
    site = post(app, "/echo/", [], [("f", "big.bin", b"x" * (5 << 20))], status=413)
    assert site.json["error"]["limit"] == 4 << 20
    ok = post(app, "/echo/", [("t", "v")], [("f", "a.txt", b"abc")])
    assert ok.json["fields"] == {"t": ["v"]}
    assert ok.json["files"]["f"][0]["sha256"] == sha(b"abc")


def test_error_view_renders_a_django_page() -> None:
    settings = dict(django.conf.settings.UPLOADKIT,
                    ERROR_VIEW="tests.support.django_project.views.refused")
    with override_settings(UPLOADKIT=settings):
        app = webtest.TestApp(get_wsgi_application())
        page = post(app, "/small/", [], [("f", "big.bin", b"x" * 2048)], status=413)
        assert page.content_type == "text/html"
        assert "<h1>Upload refused</h1>" in page.text and "file_too_large" in page.text
        # the middleware alone renders it the same way
        response = Client().post("/small/", {"f": ContentFile(b"x" * 2048, name="big.bin")})
        assert response.status_code == 413 and b"<h1>Upload refused</h1>" in response.content


def test_error_view_without_the_middleware_is_a_configuration_error() -> None:
    settings = dict(django.conf.settings.UPLOADKIT, ERROR_VIEW="tests.support.django_project.views.refused")
    with override_settings(UPLOADKIT=settings, MIDDLEWARE=[]):
        with pytest.raises(ImproperlyConfigured, match="MIDDLEWARE"):
            get_wsgi_application()


def test_unknown_setting_is_refused() -> None:
    with override_settings(UPLOADKIT={"MAX_FILE_SIZ": 1}):
        with pytest.raises(ValueError, match="MAX_FILE_SIZ"):
            get_wsgi_application()


def test_upload_limits_rejects_unknown_names() -> None:
    with pytest.raises(TypeError, match="max_file_siz"):
        upload_limits(max_file_siz=3)


# -- real servers ---------------------------------------------------------------------------

def test_threaded_server_with_requests_modelform() -> None:
    photo, notes = png_bytes(seed=2), b"n" * 10
    with serve(get_wsgi_application()) as server:
        r = requests.post(f"{server.url}/upload/", data={"title": "T"},
                          files={"photo": ("cat.png", photo, "image/png"),
                                 "attachment": ("notes.txt", notes, "text/plain")}, timeout=10)
        assert r.status_code == 201, r.text
        check_saved(r.json(), photo, notes)
        wait_empty(TMP)
        refused = requests.post(f"{server.url}/small/", files={"f": ("x.bin", b"x" * 4096)}, timeout=10)
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "file_too_large"


def test_gunicorn_two_workers_with_curl_and_httpx() -> None:
    photo, notes = png_bytes(seed=3), b"notes"
    photo_path = os.path.join(BASE_DIR, "upload-me.png")
    with open(photo_path, "wb") as f:
        f.write(photo)
    try:
        with gunicorn("tests.support.django_project.wsgi:application", workers=2,
                      env={"UPLOADKIT_DJANGO_DIR": BASE_DIR,
                           "DJANGO_SETTINGS_MODULE": "tests.support.django_project.settings"}) as url:
            out = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "-F", "title=from curl",
                 "-F", f"photo=@{photo_path};type=image/png", "-F", "attachment=@-;filename=notes.txt",
                 f"{url}/upload/", "-w", "\n%{http_code}"],
                input=notes, capture_output=True, check=True, timeout=30)
            body, _, code = out.stdout.decode().rpartition("\n")
            assert code == "201", body
            result = __import__("json").loads(body)
            check_saved(result, photo, notes)
            with httpx.Client(timeout=10) as client:
                for _ in range(4):  # several requests, so both workers answer
                    refused = client.post(f"{url}/small/", files={"f": ("x.bin", b"x" * 4096)})
                    assert refused.status_code == 413
                    assert refused.json()["error"] == {
                        "code": "file_too_large", "field": "f", "limit": 1024,
                        "message": "file 'x.bin' is larger than the limit of 1.0 KiB"}
                ok = client.post(f"{url}/echo/", data={"a": "1"}, files={"f": ("p.png", photo, "image/png")})
                assert ok.status_code == 200
                assert ok.json()["files"]["f"][0]["sha256"] == sha(photo)
            wait_empty(TMP)
    finally:
        os.unlink(photo_path)


# -- FsspecStorage ------------------------------------------------------------------------------

def test_fsspec_storage_local_behaviour(tmp_path: Any) -> None:
    storage = FsspecStorage(f"file://{tmp_path}/media", base_url="/media/")
    name = storage.save("docs/a.txt", ContentFile(b"one"))
    assert name == "docs/a.txt" and storage.exists(name) and storage.size(name) == 3
    again = storage.save("docs/a.txt", ContentFile(b"two"))  # never overwrites
    assert again != name and again.startswith("docs/a_") and again.endswith(".txt")
    with storage.open(again) as f:
        assert f.read() == b"two"
    with storage.open(name) as f:
        assert f.read() == b"one"
    assert storage.url(again) == f"/media/{again}"
    assert storage.path(name) == os.path.join(str(tmp_path), "media", "docs", "a.txt")
    assert storage.listdir("docs") == ([], sorted([name.split("/")[1], again.split("/")[1]]))
    assert storage.listdir("")[0] == ["docs"]
    assert storage.get_modified_time(name).tzinfo is not None
    storage.delete(name)
    assert not storage.exists(name)
    storage.delete(name)  # deleting what is gone is not an error (Django's contract)
    with pytest.raises(ValueError, match="reading only"):
        storage.open(again, "wb")
    assert FsspecStorage(f"file://{tmp_path}").deconstruct()[0] == "uploadkit.contrib.django.FsspecStorage"
    with pytest.raises(ValueError, match="URL"):
        FsspecStorage(f"file://{tmp_path}").url(again)


def test_fsspec_storage_on_s3_behind_an_image_field(s3_server: Any, s3_bucket: str) -> None:  # noqa: F811
    field = RemoteDocument._meta.get_field("photo")
    default = field.storage
    field.storage = storage = FsspecStorage(f"s3://{s3_bucket}/media", base_url="https://cdn.example/media/",
                                            storage_options=s3_server.options())
    photo = png_bytes(seed=4)
    try:
        response = Client().post("/remote/", {"photo": ContentFile(photo, name="pic.png")})
        assert response.status_code == 201, response.content
        result = response.json()
        assert result["photo"].startswith("remote/pic") and result["size"] == len(photo)
        assert result["url"] == f"https://cdn.example/media/{result['photo']}"
        with pytest.raises(NotImplementedError):
            storage.path(result["photo"])
        obj = s3_server.client().get_object(Bucket=s3_bucket, Key=f"media/{result['photo']}")
        assert obj["Body"].read() == photo
    finally:
        field.storage = default


def test_a_tus_upload_reaches_a_django_view_as_request_files(tmp_path: Any) -> None:
    from tests.support.django_project import views
    from uploadkit.tusapp import TusSettings

    views.TUS_SEEN.clear()
    app = webtest.TestApp(get_wsgi_application(tus=TusSettings(directory=str(tmp_path / "tus"))))
    data = b"%PDF-1.4\n" + b"x" * 20_000
    t = {"Tus-Resumable": "1.0.0"}
    created = app.post("/upload/tus/", headers={**t, "Upload-Length": str(len(data)),
                                                "Upload-Metadata": "filename cmVwb3J0LnBkZg=="}, status=201)
    url = created.headers["Location"]
    octets = {**t, "Content-Type": "application/offset+octet-stream"}
    app.patch(url, data[:10_000], headers={**octets, "Upload-Offset": "0"}, status=204)
    done = app.patch(url, data[10_000:], headers={**octets, "Upload-Offset": "10000"}, status=204)
    assert done.headers["Upload-Offset"] == str(len(data))
    [seen] = views.TUS_SEEN
    assert seen["method"] == "PATCH" and seen["upload_id"] == url.rpartition("/")[2]
    [f] = seen["files"]["file"]
    assert f["name"] == "report.pdf" and f["sha256"] == sha(data) and f["size"] == len(data)
    assert f["content_type"] == "application/pdf"
