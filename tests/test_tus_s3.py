"""tus uploads into S3 (moto's server, through s3fs), served by two gunicorn
servers of two workers each: PATCH bytes become multipart-upload parts as
they arrive, the object appears under its final key only on completion, and
a worker SIGKILLed mid-PATCH leaves an upload that resumes from what was
stored."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from typing import Any, Dict, Iterator, Tuple

import pytest
import requests
from tusclient import client as tus_client

from tests.support.cluster import MotoProcess
from tests.support.wsgi import REPO_ROOT, gunicorn
from tests.test_tus import T, _cut_patch, create, handed, head, meta, moved, patch, payload, upload_id, wait_for

MiB = 1 << 20
TEMP = ".uploadkit-tmp/tus/"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[MotoProcess, str]]:
    moto = MotoProcess(str(tmp_path_factory.mktemp("moto")))
    moto.start()
    try:
        yield moto, moto.create_bucket()
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tus-s3"))


@pytest.fixture(scope="module")
def servers(root: str, s3: Tuple[MotoProcess, str]) -> Iterator[Tuple[str, str]]:
    moto, bucket = s3
    env = {"UPLOADKIT_TUS_ROOT": root, "PYTHONPATH": REPO_ROOT,
           "UPLOADKIT_TUS_S3_URL": f"s3://{bucket}/media",
           "UPLOADKIT_TUS_S3_OPTIONS": json.dumps(moto.options())}
    with gunicorn("tests.support.tus_app:app", env=env, workers=2) as a, \
            gunicorn("tests.support.tus_app:app", env=env, workers=2) as b:
        yield a, b


def _objects(s3: Tuple[MotoProcess, str]) -> Dict[str, int]:
    moto, bucket = s3
    return moto.keys(bucket, "media/")


def _finals(s3: Tuple[MotoProcess, str]) -> Dict[str, int]:
    return {k: v for k, v in _objects(s3).items() if not k.startswith("media/.uploadkit-tmp/")}


def _left(s3: Tuple[MotoProcess, str], uid: str) -> Tuple[Dict[str, int], list]:
    """The upload's temp objects other than its state, and its pending multipart uploads."""
    moto, bucket = s3
    objects = {k: v for k, v in _objects(s3).items() if uid in k and not k.endswith(".info")}
    pending = [u for u in moto.pending_uploads(bucket) if uid in u["Key"]]
    return objects, pending


def test_parts_as_they_arrive_and_the_object_only_on_completion(servers: Tuple[str, str], root: str,
                                                               s3: Tuple[MotoProcess, str]) -> None:
    a, b = servers
    data = payload(10 * MiB + 3, seed=11)
    url = create(a, len(data), "s3", **{"Upload-Metadata": meta(filename="video.mp4")})
    uid = upload_id(url)
    finals = _finals(s3)
    offset = 0
    # 1 byte (held with the state), a tail under 5 MiB, a PATCH that fills a
    # part and leaves a tail, and the rest, whose tail becomes the last part
    for i, step in enumerate([1, 3 * MiB, 4 * MiB, len(data) - 7 * MiB - 1]):
        r = patch(url if i % 2 else moved(url, b), offset, data[offset:offset + step])
        assert r.status_code == 204, r.text
        offset += step
        assert r.headers["Upload-Offset"] == str(offset)
        if offset < len(data):
            assert int(head(moved(url, a if i % 2 else b)).headers["Upload-Offset"]) == offset
            assert _finals(s3) == finals  # nothing under a final key yet
            objects, pending = _left(s3, uid)
            if offset >= 8192:
                assert len(pending) == 1
                assert all(size < 5 * MiB for size in objects.values())  # tails only: the rest is in parts
    [f] = handed(root, url)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()
    moto, bucket = s3
    assert moto.sha256(bucket, "media/" + f["key"]) == hashlib.sha256(data).hexdigest()
    assert _left(s3, uid) == ({}, [])


def test_a_worker_killed_mid_patch_leaves_an_upload_that_resumes(servers: Tuple[str, str], root: str,
                                                                 s3: Tuple[MotoProcess, str]) -> None:
    a, b = servers
    data = payload(12 * MiB, seed=13)
    url = create(a, len(data), "s3", **{"Upload-Metadata": meta(filename="killed.bin")})
    uid = upload_id(url)
    assert patch(url, 0, data[:MiB]).status_code == 204  # a tail of 1 MiB
    stale = _cut_patch(url, MiB, 10 * MiB, data[MiB:8 * MiB], keep_open=True)
    try:
        marker = os.path.join(root, f"serving-{uid}")
        wait_for(lambda: os.path.exists(marker) and int(head(moved(url, b)).headers["Upload-Offset"]) >= 5 * MiB,
                 what="a part uploaded by the PATCH", timeout=30)
        with open(marker) as fh:
            pid = int(fh.read())
        os.kill(pid, signal.SIGKILL)
    finally:
        stale.close()
    # what its last part stored, nothing of what it held in memory
    assert head(moved(url, b)).headers["Upload-Offset"] == str(5 * MiB)
    resumed = tus_client.TusClient(f"{b}/s3/tus/").uploader(
        file_stream=io.BytesIO(data), url=moved(url, b), chunk_size=3 * MiB, retries=5, retry_delay=1)
    assert resumed.offset == 5 * MiB
    resumed.upload()
    [f] = handed(root, url)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert _left(s3, uid) == ({}, [])


def test_terminated_uploads_leave_no_object_part_or_pending_upload(servers: Tuple[str, str],
                                                                   s3: Tuple[MotoProcess, str]) -> None:
    a, b = servers
    url = create(a, 20 * MiB, "s3")
    assert patch(url, 0, payload(6 * MiB)).status_code == 204
    objects, pending = _left(s3, upload_id(url))
    assert objects and pending
    assert requests.delete(moved(url, b), headers=T, timeout=10).status_code == 204
    assert _left(s3, upload_id(url)) == ({}, [])
    assert head(url).status_code == 410


def test_concatenation_of_partial_uploads_in_s3(servers: Tuple[str, str], root: str,
                                                s3: Tuple[MotoProcess, str]) -> None:
    a, b = servers
    data = payload(7 * MiB + 11, seed=14)
    cut = 6 * MiB
    urls = []
    for base, piece in ((a, data[:cut]), (b, data[cut:])):
        url = create(base, len(piece), "s3", **{"Upload-Concat": "partial"})
        assert patch(url, 0, piece).status_code == 204
        urls.append(url)
    r = requests.post(f"{b}/s3/tus/", headers={**T, "Upload-Concat": "final;" + " ".join(urls),
                                                "Upload-Metadata": meta(filename="joined.bin")}, timeout=60)
    assert r.status_code == 201, r.text
    [f] = handed(root, r.headers["Location"])
    moto, bucket = s3
    assert moto.sha256(bucket, "media/" + f["key"]) == hashlib.sha256(data).hexdigest() == f["sha256"]
    for url in urls + [r.headers["Location"]]:
        assert _left(s3, upload_id(url)) == ({}, [])


def test_expired_uploads_leave_nothing_once_cleanup_ran(servers: Tuple[str, str], s3: Tuple[MotoProcess, str]) -> None:
    import subprocess
    import sys

    a, _ = servers
    moto, bucket = s3
    url = create(a, 20 * MiB, "s3short")
    assert patch(url, 0, payload(6 * MiB)).status_code == 204  # one part and a tail
    objects, pending = _left(s3, upload_id(url))
    assert objects and pending
    wait_for(lambda: head(url).status_code == 410, what="expiry")
    options = moto.options()
    out = subprocess.run(
        [sys.executable, "-m", "uploadkit.cli", "cleanup", "--storage", f"s3://{bucket}/media",
         "--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "key=testing",
         "--storage-option", "secret=testing"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tus-upload" in out.stdout
    assert _left(s3, upload_id(url)) == ({}, [])
    assert not [k for k in _objects(s3) if upload_id(url) in k]
