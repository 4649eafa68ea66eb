"""The ``uploadkit demo`` console command, as a user runs it: a subprocess that
prints its URL, serves the page and the script, takes a curl upload into the
storage directory it was given, and stops cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import List

import pytest
import requests
from PIL import Image

from tests.support.browser import Command

TIMEOUT = 10


def _console_script() -> str:
    """The installed ``uploadkit`` script (``pip install -e .`` puts it beside python)."""
    beside = os.path.join(os.path.dirname(sys.executable), "uploadkit")
    found = beside if os.path.exists(beside) else shutil.which("uploadkit")
    if not found:
        raise RuntimeError("the 'uploadkit' console script is not installed: pip install -e .")
    return found


def _jpeg(width: int = 640, height: int = 480) -> bytes:
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture
def storage_dir(tmp_path: "os.PathLike[str]") -> str:
    path = os.path.join(str(tmp_path), "media")
    os.makedirs(path)
    return path


def _demo(storage_dir: str, *extra: str) -> Command:
    return Command([_console_script(), "demo", "--port", "0", "--storage", "file://" + storage_dir,
                    *extra])


def _stored_files(root: str) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    return sorted(out)


def test_demo_command_serves_page_takes_a_curl_upload_and_stops_on_sigint(
        storage_dir: str, tmp_path: "os.PathLike[str]") -> None:
    image = _jpeg()
    path = os.path.join(str(tmp_path), "sunset.jpg")
    with open(path, "wb") as f:
        f.write(image)
    with _demo(storage_dir) as demo:
        assert demo.lines[0] == f"uploadkit demo: {demo.url}/"
        demo.expect(f"file://{storage_dir}")

        page = requests.get(demo.url + "/", timeout=TIMEOUT)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert '<script src="/upload/progress/uploadkit.js"></script>' in page.text
        assert 'type="file"' in page.text
        script = requests.get(demo.url + "/upload/progress/uploadkit.js", timeout=TIMEOUT)
        assert script.status_code == 200
        assert "window" in script.text and "upload" in script.text

        out = subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT), "-F", f"file=@{path}",
                              demo.url + "/upload"], capture_output=True, timeout=TIMEOUT + 5, check=True)
        answer = json.loads(out.stdout)
        [info] = answer["files"]
        assert info["filename"] == "sunset.jpg"
        assert info["content_type"] == "image/jpeg"
        assert info["size"] == len(image)
        assert info["sha256"] == hashlib.sha256(image).hexdigest()
        assert sorted(info["thumbnails"]) == ["200x200", "400x400"]

        # The bytes are in the directory given on the command line, with thumbnails beside them.
        stored = _stored_files(storage_dir)
        assert info["key"] in stored
        assert len(stored) == 3
        with open(os.path.join(storage_dir, info["key"]), "rb") as f:
            assert f.read() == image
        original = requests.get(demo.url + info["url"], timeout=TIMEOUT)
        assert original.status_code == 200 and original.content == image
        listing = requests.get(demo.url + "/api/files", timeout=TIMEOUT).json()
        assert [f["key"] for f in listing["files"]] == [info["key"]]

        demo.signal(signal.SIGINT)
        assert demo.wait(timeout=TIMEOUT) == 0
        demo.expect("stopped")
    with pytest.raises(requests.ConnectionError):
        requests.get(demo.url + "/", timeout=2)


def test_demo_command_refuses_with_json_and_stops_on_terminate(storage_dir: str) -> None:
    with _demo(storage_dir, "--max-file-size", "100000") as demo:
        big = _jpeg() + b"\0" * 200_000
        out = subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT), "-F", "file=@-;filename=big.jpg",
                              "-w", "\n%{http_code}", demo.url + "/upload"], input=big,
                             capture_output=True, timeout=TIMEOUT + 5, check=True)
        body, _, status = out.stdout.rpartition(b"\n")
        assert status == b"413"
        error = json.loads(body)["error"]
        assert error["code"] == "file_too_large"
        assert "big.jpg" in error["message"]
        assert _stored_files(storage_dir) == []

        demo.proc.terminate()  # type: ignore[union-attr]
        assert demo.wait(timeout=TIMEOUT) == 0  # SIGTERM stops it as cleanly as Ctrl+C
        demo.expect("stopped")


def test_demo_command_stops_on_sigint_when_started_with_it_ignored(storage_dir: str) -> None:
    # A script's background job (`uploadkit demo &`) starts with SIGINT
    # ignored, and Python then raises no KeyboardInterrupt on its own.
    ignoring = [sys.executable, "-c",
                "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])",
                _console_script(), "demo", "--port", "0", "--storage", "file://" + storage_dir]
    with Command(ignoring) as demo:
        with open(f"/proc/{demo.proc.pid}/status") as status:  # type: ignore[union-attr]
            ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1)) == 0  # the server took SIGINT back
        assert requests.get(demo.url + "/", timeout=TIMEOUT).status_code == 200
        demo.signal(signal.SIGINT)
        assert demo.wait(timeout=TIMEOUT) == 0
        demo.expect("stopped")


def test_demo_command_serves_tus_at_upload_tus(storage_dir: str) -> None:
    from tusclient import client as tus_client

    from tests.support.images import encode, photo

    image = encode(photo(800, 600), "JPEG")
    assert len(image) > 64 * 1024
    with _demo(storage_dir) as demo:
        up = tus_client.TusClient(demo.url + "/upload/tus/").uploader(
            file_stream=io.BytesIO(image), chunk_size=16 * 1024, metadata={"filename": "resumed.jpg"},
            retries=0)
        up.upload(stop_at=32 * 1024)
        progress = requests.get(demo.url + "/upload/progress", timeout=TIMEOUT,
                                params={"X-Progress-ID": up.url.rpartition("/")[2]}).json()
        assert progress["state"] == "uploading" and progress["size"] == len(image)
        up.upload()
        [info] = requests.get(demo.url + "/api/files", timeout=TIMEOUT).json()["files"]
        assert info["filename"] == "resumed.jpg" and info["size"] == len(image)
        assert info["sha256"] == hashlib.sha256(image).hexdigest()
        assert sorted(info["thumbnails"]) == ["200x200", "400x400"]
        assert requests.get(demo.url + info["url"], timeout=TIMEOUT).content == image
        demo.signal(signal.SIGINT)
        assert demo.wait(timeout=TIMEOUT) == 0
    assert not [k for k in os.listdir(os.path.join(storage_dir, ".uploadkit-tmp", "tus")) if k.endswith(".bin")]
