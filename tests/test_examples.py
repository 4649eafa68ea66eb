"""The runnable examples, run the way their docstrings say: each example's one
command in a subprocess on 127.0.0.1 (``--port 0``; it prints its URL first),
driven by real HTTP clients (curl, requests, httpx), checking what a user
would see: files on disk or in S3 (moto in server mode), thumbnail sizes,
dedup, authorization, refusals as JSON.

``examples/wsgi_minimal.py`` binds a fixed port when run, so its app is served
in-process instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import httpx
import pytest
import requests
from PIL import Image

from tests.support.browser import REPO_ROOT, Command, python_command
from tests.support.images import drawing
from tests.support.s3 import S3Server, s3_bucket, s3_server  # noqa: F401
from tests.support.wsgi import serve

TIMEOUT = 15
MiB = 1 << 20
EXAMPLES = os.path.join(REPO_ROOT, "examples")


def _image(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    drawing(width, height, mode=mode, seed=seed).save(buf, fmt)
    return buf.getvalue()


def _size(data: bytes) -> Tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _files_under(root: str) -> List[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    return sorted(out)


def _curl(*args: str) -> Tuple[int, bytes]:
    """Run curl; (HTTP status, body)."""
    out = subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT), "-w", "\n%{http_code}", *args],
                         capture_output=True, timeout=TIMEOUT + 5, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body


# -- wsgi_minimal.py ----------------------------------------------------------------

def test_wsgi_minimal_answers_a_curl_upload(tmp_path: Any) -> None:
    from examples import wsgi_minimal
    from uploadkit import Limits, UploadMiddleware

    data = os.urandom(300_000)
    path = tmp_path / "notes.bin"
    path.write_bytes(data)
    app = UploadMiddleware(wsgi_minimal.app, limits=Limits(max_file_size=10 * MiB), progress=False)
    with serve(app) as server:
        status, body = _curl("-F", f"file=@{path}", server.url + "/")
        assert status == 200
        assert json.loads(body) == {"file": ["notes.bin", len(data), hashlib.sha256(data).hexdigest()]}
        r = requests.post(server.url + "/", files={"a": ("a.txt", b"alpha"), "b": ("b.txt", b"beta")},
                          timeout=TIMEOUT)
        assert r.json() == {"a": ["a.txt", 5, hashlib.sha256(b"alpha").hexdigest()],
                            "b": ["b.txt", 4, hashlib.sha256(b"beta").hexdigest()]}


# -- django_avatar ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def avatar_site(tmp_path_factory: Any) -> Iterator[Any]:
    data = str(tmp_path_factory.mktemp("django-avatar"))
    with Command(python_command(os.path.join(EXAMPLES, "django_avatar", "run.py"), "--port", "0",
                                "--data", data)) as cmd:
        cmd.data = data  # type: ignore[attr-defined]
        cmd.media = os.path.join(data, "media")  # type: ignore[attr-defined]
        yield cmd


def _avatar_upload(site: Any, user: str, filename: str, data: bytes,
                   progress_id: str = "") -> requests.Response:
    """What the browser does: get the page (CSRF cookie and token), post the form."""
    with requests.Session() as s:
        page = s.get(f"{site.url}/profile/{user}/", timeout=TIMEOUT)
        assert page.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        query = f"?X-Progress-ID={progress_id}" if progress_id else ""
        return s.post(f"{site.url}/profile/{user}/{query}", data={"csrfmiddlewaretoken": token},
                      files={"avatar": (filename, data, "application/octet-stream")}, timeout=TIMEOUT)


def test_avatar_page_has_the_progress_form_and_script(avatar_site: Any) -> None:
    r = requests.get(avatar_site.url + "/", timeout=TIMEOUT)
    assert r.url == avatar_site.url + "/profile/alice/"
    assert "data-uploadkit" in r.text and 'enctype="multipart/form-data"' in r.text
    assert '<script src="/upload/progress/uploadkit.js"></script>' in r.text
    script = requests.get(avatar_site.url + "/upload/progress/uploadkit.js", timeout=TIMEOUT)
    assert script.status_code == 200
    assert script.headers["Content-Type"].startswith("application/javascript")


def test_avatar_is_downscaled_thumbnailed_and_renamed(avatar_site: Any) -> None:
    media = avatar_site.media
    big = _image(2000, 1500)
    pid = uuid.uuid4().hex
    r = _avatar_upload(avatar_site, "carol", "me.jpg", big, progress_id=pid)
    assert r.status_code == 200
    assert [h.status_code for h in r.history] == [302]  # post/redirect/get
    assert r.url == avatar_site.url + "/profile/carol/"
    assert _files_under(os.path.join(media, "profile", "carol")) == ["me.150x150.jpg", "me.200x200.jpg", "me.jpg"]
    with open(os.path.join(media, "profile", "carol", "me.jpg"), "rb") as f:
        original = f.read()
    assert _size(original) == (1024, 768)  # wider than 1024: scaled down, aspect kept
    for box in (150, 200):
        with open(os.path.join(media, "profile", "carol", f"me.{box}x{box}.jpg"), "rb") as f:
            assert _size(f.read()) == (box, box)  # square avatars: cropped to the box
    # The page shows them; the media route serves the stored bytes.
    assert "1024 &times; 768" in r.text
    for name in ("me.jpg", "me.150x150.jpg", "me.200x200.jpg"):
        assert f'"/media/profile/carol/{name}"' in r.text
    served = requests.get(avatar_site.url + "/media/profile/carol/me.jpg", timeout=TIMEOUT)
    assert served.status_code == 200 and served.content == original
    # The AJAX bar's status route saw the upload end.
    status = requests.get(f"{avatar_site.url}/upload/progress?X-Progress-ID={pid}", timeout=TIMEOUT).json()
    assert status["state"] == "done" and status["received"] == status["size"] > len(big)

    # Same name again: Django's storage renames it (the old one still exists
    # while the new one is saved), and the old files are removed after.
    r = _avatar_upload(avatar_site, "carol", "me.jpg", _image(800, 600, seed=2))
    assert r.status_code == 200
    names = _files_under(os.path.join(media, "profile", "carol"))
    assert len(names) == 3, names
    original_name = next(n for n in names if not re.search(r"\.\d+x\d+\.", n))
    assert re.fullmatch(r"me_[A-Za-z0-9]{7}\.jpg", original_name), names
    stem = original_name[:-4]
    assert sorted(names) == sorted([original_name, f"{stem}.150x150.jpg", f"{stem}.200x200.jpg"])
    with open(os.path.join(media, "profile", "carol", original_name), "rb") as f:
        assert _size(f.read()) == (800, 600)  # not wider than 1024: kept as sent


def test_avatar_users_have_their_own_directories_and_png_stays_png(avatar_site: Any) -> None:
    r = _avatar_upload(avatar_site, "dave", "logo.png", _image(300, 200, "PNG", mode="RGBA"))
    assert r.status_code == 200
    names = _files_under(os.path.join(avatar_site.media, "profile", "dave"))
    assert names == ["logo.150x150.png", "logo.200x200.png", "logo.png"]  # alpha: PNG thumbnails
    with open(os.path.join(avatar_site.media, "profile", "dave", "logo.200x200.png"), "rb") as f:
        assert _size(f.read()) == (200, 200)


def test_avatar_refuses_what_is_not_an_image(avatar_site: Any) -> None:
    before = _files_under(avatar_site.media)
    # Refused by the WSGI layer while streaming, before Django (or its CSRF check) runs.
    r = httpx.post(avatar_site.url + "/profile/erin/", files={"avatar": ("me.jpg", b"%PDF-1.4\n" + b"x" * 5000)},
                   timeout=TIMEOUT)
    assert r.status_code == 415
    error = r.json()["error"]
    assert error["code"] == "unsupported_type" and error["field"] == "avatar"
    assert "application/pdf" in error["message"]
    assert _files_under(avatar_site.media) == before
    assert os.listdir(os.path.join(avatar_site.data, "tmp")) == []


# -- flask_image_backup ---------------------------------------------------------------------

TOKEN = "example-token-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def backup(tmp_path_factory: Any) -> Iterator[Any]:
    data = str(tmp_path_factory.mktemp("image-backup"))
    with Command(python_command(os.path.join(EXAMPLES, "flask_image_backup", "app.py"), "--port", "0",
                                "--data", data), env={"BACKUP_TOKEN": TOKEN}) as cmd:
        cmd.photos = os.path.join(data, "photos")  # type: ignore[attr-defined]
        cmd.data = data  # type: ignore[attr-defined]
        yield cmd


def _stored_photos(backup: Any) -> List[str]:
    return sorted(n for n in os.listdir(backup.photos) if not n.startswith("."))


def test_backup_many_photos_listed_and_fetched_by_hash(backup: Any, tmp_path: Any) -> None:
    photos = {"a.jpg": _image(640, 480, seed=3), "b.png": _image(200, 100, "PNG", seed=4),
              "c.webp": _image(300, 300, "WEBP", seed=5)}
    args = []
    for name, data in photos.items():
        (tmp_path / name).write_bytes(data)
        args += ["-F", f"photo=@{tmp_path / name}"]
    status, body = _curl(*args, backup.url + "/photos")
    assert status == 201
    answer = json.loads(body)["photos"]
    assert [p["filename"] for p in answer] == list(photos)
    assert [p["content_type"] for p in answer] == ["image/jpeg", "image/png", "image/webp"]
    for p, data in zip(answer, photos.values()):
        assert p["sha256"] == hashlib.sha256(data).hexdigest()
        assert p["url"] == f"{backup.url}/photos/{p['sha256']}"
        assert p["deduplicated"] is False
        status, fetched = _curl(p["url"])
        assert status == 200 and fetched == data
    listed = requests.get(backup.url + "/photos", timeout=TIMEOUT).json()["photos"]
    assert {p["sha256"] for p in answer} <= {p["sha256"] for p in listed}
    for p in listed:
        assert p["url"] == f"{backup.url}/photos/{p['sha256']}"
    exts = {p["sha256"]: n.rsplit(".", 1)[1] for n in _stored_photos(backup) for p in answer if n.startswith(p["sha256"])}
    assert sorted(exts.values()) == ["jpg", "png", "webp"]


def test_backup_dedups_by_content(backup: Any, tmp_path: Any) -> None:
    data = _image(500, 400, seed=6)
    (tmp_path / "one.jpg").write_bytes(data)
    (tmp_path / "same-photo-other-name.jpg").write_bytes(data)
    before = _stored_photos(backup)
    status, first = _curl("-F", f"photo=@{tmp_path / 'one.jpg'}", backup.url + "/photos")
    assert status == 201
    status, second = _curl("-F", f"photo=@{tmp_path / 'same-photo-other-name.jpg'}", backup.url + "/photos")
    assert status == 201
    [a], [b] = json.loads(first)["photos"], json.loads(second)["photos"]
    assert a["sha256"] == b["sha256"] == hashlib.sha256(data).hexdigest()
    assert a["url"] == b["url"]
    assert (a["deduplicated"], b["deduplicated"]) == (False, True)
    after = _stored_photos(backup)
    assert len(after) == len(before) + 1  # one stored object for the two uploads
    assert [n for n in after if n.startswith(a["sha256"])] == [a["sha256"] + ".jpg"]
    # And within one request too.
    r = requests.post(backup.url + "/photos", files=[("photo", ("x.jpg", data)), ("photo", ("y.jpg", data))],
                      timeout=TIMEOUT)
    assert r.status_code == 201
    assert {p["sha256"] for p in r.json()["photos"]} == {a["sha256"]}
    assert _stored_photos(backup) == after


def test_backup_delete_needs_the_token(backup: Any) -> None:
    data = _image(320, 240, seed=7)
    r = httpx.post(backup.url + "/photos", files={"photo": ("gone.jpg", data)}, timeout=TIMEOUT)
    assert r.status_code == 201
    sha, url = r.json()["photos"][0]["sha256"], r.json()["photos"][0]["url"]

    status, body = _curl("-X", "DELETE", url)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "unauthorized"
    r = httpx.delete(url, headers={"Authorization": "Bearer wrong-" + TOKEN}, timeout=TIMEOUT)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert httpx.get(url, timeout=TIMEOUT).content == data  # still there

    status, _ = _curl("-X", "DELETE", "-H", f"Authorization: Bearer {TOKEN}", url)
    assert status == 204
    assert httpx.get(url, timeout=TIMEOUT).status_code == 404
    assert not [n for n in _stored_photos(backup) if n.startswith(sha)]
    status, body = _curl("-X", "DELETE", "-H", f"Authorization: Bearer {TOKEN}", url)
    assert status == 404


def test_backup_refuses_other_types_and_big_files(backup: Any, tmp_path: Any) -> None:
    before = _stored_photos(backup)
    (tmp_path / "notes.jpg").write_bytes(b"just text pretending to be a photo\n" * 100)
    status, body = _curl("-F", f"photo=@{tmp_path / 'notes.jpg'}", backup.url + "/photos")
    assert status == 415
    error = json.loads(body)["error"]
    assert error["code"] == "unsupported_type" and error["field"] == "photo"
    assert "notes.jpg" in error["message"]
    assert sorted(error["limit"]) == ["image/jpeg", "image/png", "image/webp"]

    # A real image of a type this service does not keep.
    r = requests.post(backup.url + "/photos", files={"photo": ("anim.gif", _image(64, 64, "GIF"))}, timeout=TIMEOUT)
    assert r.status_code == 415 and "image/gif" in r.json()["error"]["message"]

    # A JPEG over 10 MiB: refused while it streams.
    big = _image(320, 240) + b"\0" * (10 * MiB)
    r = httpx.post(backup.url + "/photos", files={"photo": ("huge.jpg", big)}, timeout=TIMEOUT)
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "file_too_large" and error["limit"] == 10 * MiB and "10.0 MiB" in error["message"]

    assert _stored_photos(backup) == before
    assert os.listdir(os.path.join(backup.photos, ".uploadkit-tmp")) == []  # nothing half-written left
    assert os.listdir(os.path.join(backup.data, "tmp")) == []


# -- pyramid_gallery -------------------------------------------------------------------

def _gallery(*sets: str, env: Dict[str, str] | None = None) -> Command:
    args = [os.path.join(EXAMPLES, "pyramid_gallery", "app.py"), "--port", "0"]
    for s in sets:
        args += ["--set", s]
    return Command(python_command(*args), env=env)


def test_gallery_on_s3(s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    photos = [("harbour.jpg", _image(1600, 1000, seed=8)), ("sign.png", _image(500, 700, "PNG", seed=9))]
    with _gallery(f"uploadkit.storage=s3://{s3_bucket}/gallery",
                  f"uploadkit.storage.storage_options.endpoint_url={s3_server.endpoint_url}") as site:
        site.expect(f"s3://{s3_bucket}/gallery")
        with httpx.Client(base_url=site.url, timeout=TIMEOUT) as client:
            r = client.post("/upload", files=[("photo", p) for p in photos],
                            headers={"Accept": "application/json"})
            assert r.status_code == 201, r.text
            answer = r.json()["photos"]
            assert [p["filename"] for p in answer] == ["harbour.jpg", "sign.png"]

            keys = s3_server.keys(s3_bucket)
            expected = []
            for p in answer:
                stem = p["key"].rsplit(".", 1)[0]
                assert sorted(p["thumbnails"]) == ["240x240", "800x800"]
                expected += [f"gallery/{p['key']}", f"gallery/{stem}.240x240.jpg", f"gallery/{stem}.800x800.jpg"]
            assert keys == sorted(expected)  # nothing else: no temp objects left
            assert s3_server.pending_uploads(s3_bucket) == []

            for p, (_, data) in zip(answer, photos):
                obj = s3_server.client().get_object(Bucket=s3_bucket, Key=f"gallery/{p['key']}")["Body"].read()
                assert obj == data
                assert client.get(p["url"]).content == data
                w, h = _size(data)
                for box in (240, 800):
                    thumb = client.get(p["thumbnails"][f"{box}x{box}"])
                    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
                    tw, th = _size(thumb.content)
                    # fit inside the box, aspect kept, never enlarged
                    assert max(tw, th) == min(box, max(w, h)) and abs(tw / th - w / h) < 0.02

            listed = client.get("/api/photos").json()["photos"]
            assert sorted(p["key"] for p in listed) == sorted(p["key"] for p in answer)
            page = client.get("/")
            for p in answer:
                assert p["thumbnails"]["240x240"] in page.text

            # A browser form post (no JSON asked): back to the gallery.
            r = client.post("/upload", files={"photo": ("more.jpg", _image(300, 200, seed=10))})
            assert r.status_code == 303 and r.headers["location"] == site.url + "/"
            assert len(s3_server.keys(s3_bucket)) == len(keys) + 3

            before = s3_server.keys(s3_bucket)
            r = client.post("/upload", files={"photo": ("doc.jpg", b"%PDF-1.4\n" + b"x" * 5000)},
                            headers={"Accept": "application/json"})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_type"
            assert s3_server.keys(s3_bucket) == before
            assert s3_server.pending_uploads(s3_bucket) == []


def test_gallery_falls_back_to_a_local_directory(tmp_path: Any) -> None:
    local = str(tmp_path / "photos")
    with _gallery(f"gallery.local_dir={local}") as site:
        site.expect(f"file://{local}")
        r = httpx.post(site.url + "/upload", files={"photo": ("a.jpg", _image(900, 600, seed=11))},
                       headers={"Accept": "application/json"}, timeout=TIMEOUT)
        assert r.status_code == 201
        [p] = r.json()["photos"]
        stem = p["key"].rsplit(".", 1)[0]
        assert _files_under(local) == sorted([p["key"], f"{stem}.240x240.jpg", f"{stem}.800x800.jpg"])
        with open(os.path.join(local, f"{stem}.240x240.jpg"), "rb") as f:
            assert _size(f.read()) == (240, 160)
