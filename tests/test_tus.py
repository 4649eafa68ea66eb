"""tus 1.0 resumable uploads, through two gunicorn servers (two workers each)
sharing one upload area, as two hosts behind a balancer would.

tuspy drives whole uploads; raw requests check the exact headers and codes
of every answer and refusal, and that a refusal leaves the store unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple
from urllib.parse import urlparse

import pytest
import requests
from tusclient import client as tus_client

from tests.support.cluster import module_memcached  # noqa: F401  (fixture)
from tests.support.images import drawing, encode, photo
from tests.support.wsgi import REPO_ROOT, gunicorn

T = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


def meta(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tus"))


@pytest.fixture(scope="module")
def servers(root: str, module_memcached: Any) -> Iterator[Tuple[str, str]]:  # noqa: F811
    env = {"UPLOADKIT_TUS_ROOT": root, "UPLOADKIT_TUS_MEMCACHED": module_memcached.address,
           "PYTHONPATH": REPO_ROOT}
    with gunicorn("tests.support.tus_app:app", env=env, workers=2) as a, \
            gunicorn("tests.support.tus_app:app", env=env, workers=2) as b:
        yield a, b


@pytest.fixture
def a(servers: Tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture
def b(servers: Tuple[str, str]) -> str:
    return servers[1]


def snapshot(directory: str) -> Dict[str, str]:
    """Every file under ``directory`` (leases aside) and a digest of its bytes."""
    out = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".lock"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def create(base: str, length: Optional[int], endpoint: str = "plain", **headers: str) -> str:
    h = {**T, **headers}
    if length is None:
        h["Upload-Defer-Length"] = "1"
    else:
        h["Upload-Length"] = str(length)
    r = requests.post(f"{base}/{endpoint}/tus/", headers=h, timeout=10)
    assert r.status_code == 201, r.text
    return r.headers["Location"]


def patch(url: str, offset: int, data: bytes, **headers: str) -> requests.Response:
    h = {**T, "Content-Type": OCTETS, "Upload-Offset": str(offset), **headers}
    return requests.patch(url, data=data, headers=h, timeout=20)


def head(url: str) -> requests.Response:
    return requests.head(url, headers=T, timeout=10)


def moved(url: str, base: str) -> str:
    """The same upload through the other server."""
    return base + urlparse(url).path


def handed(root: str, url: str) -> Any:
    path = os.path.join(root, "handed", url.rstrip("/").rpartition("/")[2] + ".json")
    with open(path) as f:
        return json.load(f)


def upload_id(url: str) -> str:
    return url.rstrip("/").rpartition("/")[2]


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def payload(size: int, seed: int = 1) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])


# -- core protocol: exact headers and codes ------------------------------------------


def test_options_describes_the_server(a: str) -> None:
    r = requests.options(f"{a}/plain/tus/", timeout=10)
    assert r.status_code == 204
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert r.headers["Tus-Version"] == "1.0.0"
    assert set(r.headers["Tus-Extension"].split(",")) >= {
        "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum", "termination",
        "concatenation"}
    assert r.headers["Tus-Max-Size"] == str(8 << 20)
    assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "sha256", "md5"}


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0", ""])
def test_a_request_without_our_version_is_412(a: str, root: str, version: Optional[str]) -> None:
    before = snapshot(root)
    headers = {"Upload-Length": "10"}
    if version is not None:
        headers["Tus-Resumable"] = version
    r = requests.post(f"{a}/plain/tus/", headers=headers, timeout=10)
    assert r.status_code == 412
    assert r.headers["Tus-Version"] == "1.0.0"
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert r.json()["error"]["code"] == "tus_version_unsupported"
    assert snapshot(root) == before


def test_creation_head_and_patches(a: str, b: str, root: str) -> None:
    data = payload(50_000)
    url = create(a, len(data), **{"Upload-Metadata": meta(filename="../notes.txt", filetype="text/plain")})
    assert url.startswith(f"{a}/plain/tus/") and len(upload_id(url)) == 32
    r = head(url)
    assert r.status_code == 200
    assert r.headers["Upload-Offset"] == "0"
    assert r.headers["Upload-Length"] == str(len(data))
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert "Upload-Expires" in r.headers
    pairs = dict(p.split(" ") for p in r.headers["Upload-Metadata"].split(","))
    assert base64.b64decode(pairs["filename"]) == b"../notes.txt"
    # alternate servers at every PATCH
    offset = 0
    for i, step in enumerate([1, 10, 9000, 20_000, len(data) - 29_011]):
        target = url if i % 2 == 0 else moved(url, b)
        r = patch(target, offset, data[offset:offset + step])
        assert r.status_code == 204, r.text
        offset += step
        assert r.headers["Upload-Offset"] == str(offset)
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert int(head(moved(url, a if i % 2 else b)).headers["Upload-Offset"]) == offset
    [f] = handed(root, url)
    assert f["size"] == len(data)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert f["filename"] == "notes.txt"  # sanitized as a multipart filename is
    assert f["raw_filename"] == "../notes.txt"
    assert f["declared_type"] == "text/plain"
    # the finished upload still answers HEAD with its full offset
    assert head(url).headers["Upload-Offset"] == str(len(data))


@pytest.mark.parametrize("png", [encode(drawing(64, 48), "PNG"), encode(photo(200, 150), "PNG")],
                         ids=["smaller-than-the-head", "larger-than-the-head"])
def test_one_byte_patches_still_let_sniffing_see_the_head(a: str, b: str, root: str, png: bytes) -> None:
    url = create(a, len(png), "png", **{"Upload-Metadata": meta(filename="pic.png",
                                                                 filetype="application/octet-stream")})
    for offset in range(20):
        r = patch(url if offset % 2 else moved(url, b), offset, png[offset:offset + 1])
        assert r.status_code == 204, r.text
    r = patch(url, 20, png[20:9000])
    assert r.status_code == 204, r.text
    if len(png) > 9000:  # a PATCH in the middle: file_start sees the stored head, not its own bytes
        r = patch(moved(url, b), 9000, png[9000:30_000])
        assert r.status_code == 204, r.text
        r = patch(url, 30_000, png[30_000:])
        assert r.status_code == 204, r.text
    [f] = handed(root, url)
    assert f["content_type"] == "image/png"  # sniffed wins over the declared type
    assert f["declared_type"] == "application/octet-stream"
    assert f["content_sha256"] == hashlib.sha256(png).hexdigest()


def test_a_disallowed_type_is_refused_once_its_head_is_known_and_terminated(a: str, b: str, root: str) -> None:
    data = payload(20_000)
    url = create(a, len(data), "png")
    assert patch(url, 0, data[:1]).status_code == 204  # one byte tells nothing yet
    assert patch(moved(url, b), 1, data[1:100]).status_code == 204
    r = patch(url, 100, data[100:12_000])
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_type"
    assert head(url).status_code == 410
    assert not os.path.exists(os.path.join(root, "png", upload_id(url) + ".bin"))


@pytest.mark.parametrize("header", [
    "filename bm90IGI2NA", "filename !!!!", "a b c", ",", "filename YQ==,filename YQ==",
    "file name YQ==", "filename YQ==x", "filename YQ=", "fi\u00e9 YQ==", "filename  YQ==",
])
def test_malformed_metadata_is_400_and_creates_nothing(a: str, root: str, header: str) -> None:
    before = snapshot(root)
    r = requests.post(f"{a}/plain/tus/", headers={**T, "Upload-Length": "10", "Upload-Metadata": header},
                      timeout=10)
    assert r.status_code == 400, header
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert r.json()["error"]["code"] == "tus_bad_request"
    assert snapshot(root) == before


def test_a_bare_metadata_key_is_valid(a: str) -> None:
    url = create(a, 3, **{"Upload-Metadata": "is_confidential,filename YS50eHQ="})
    assert head(url).headers["Upload-Metadata"] == "is_confidential,filename YS50eHQ="


@pytest.mark.parametrize("headers,status", [
    ({"Upload-Length": str((8 << 20) + 1)}, 413),
    ({"Upload-Length": "-1"}, 400),
    ({"Upload-Length": "12abc"}, 400),
    ({}, 400),
    ({"Upload-Length": "5", "Upload-Defer-Length": "1"}, 400),
    ({"Upload-Defer-Length": "2"}, 400),
])
def test_bad_creations_are_refused_before_anything_is_stored(a: str, root: str, headers: Dict[str, str],
                                                              status: int) -> None:
    before = snapshot(root)
    r = requests.post(f"{a}/plain/tus/", headers={**T, **headers}, timeout=10)
    assert r.status_code == status
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert snapshot(root) == before


def test_patch_refusals_change_nothing(a: str, root: str) -> None:
    url = create(a, 20_000)
    assert patch(url, 0, payload(10_000)).status_code == 204
    before = snapshot(root)
    cases = [
        (dict(offset=5, data=b"x" * 10), {}, 409),
        (dict(offset=10_001, data=b"x"), {}, 409),
        (dict(offset=10_000, data=b"x" * 10_001), {}, 413),
        (dict(offset=10_000, data=b"x"), {"Content-Type": "application/octet-stream"}, 415),
        (dict(offset=10_000, data=b"x"), {"Upload-Offset": "ten"}, 400),
        (dict(offset=10_000, data=b"x"), {"Upload-Checksum": "crc32 AAAA"}, 400),
        (dict(offset=10_000, data=b"x"), {"Tus-Resumable": "0.2.2"}, 412),
    ]
    for args, headers, status in cases:
        r = patch(url, args["offset"], args["data"], **headers)  # type: ignore[arg-type]
        assert r.status_code == status, (headers, r.text)
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert snapshot(root) == before, headers
    assert head(url).headers["Upload-Offset"] == "10000"


@pytest.mark.parametrize("bad", ["0" * 31, "0" * 33, "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "ABCDEF" + "0" * 26, "x", "0" * 32 + "/x"])
def test_ids_that_are_not_ours_are_404(a: str, bad: str) -> None:
    r = requests.head(f"{a}/plain/tus/{bad}", headers=T, timeout=10)
    assert r.status_code == 404
    r = patch(f"{a}/plain/tus/{bad}", 0, b"x")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "upload_not_found"


def test_an_unknown_id_is_404(a: str) -> None:
    assert head(f"{a}/plain/tus/{'0' * 32}").status_code == 404
    assert requests.delete(f"{a}/plain/tus/{'0' * 32}", headers=T, timeout=10).status_code == 404


def test_termination(a: str, b: str, root: str) -> None:
    url = create(a, 30_000)
    assert patch(url, 0, payload(15_000)).status_code == 204
    data_file = os.path.join(root, "plain", upload_id(url) + ".bin")
    assert os.path.getsize(data_file) == 15_000
    r = requests.delete(moved(url, b), headers=T, timeout=10)
    assert r.status_code == 204
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert not os.path.exists(data_file)
    assert head(url).status_code == 410
    assert patch(url, 15_000, b"x").status_code == 410


def test_method_override_for_proxies_that_pass_only_post(a: str) -> None:
    url = create(a, 4)
    r = requests.post(url, data=b"abcd", headers={**T, "X-HTTP-Method-Override": "PATCH",
                                                   "Content-Type": OCTETS, "Upload-Offset": "0"}, timeout=10)
    assert r.status_code == 204
    assert r.headers["Upload-Offset"] == "4"
    r = requests.post(url, headers={**T, "X-HTTP-Method-Override": "HEAD"}, timeout=10)
    assert r.headers["Upload-Offset"] == "4"


def test_get_is_answered_like_head_for_servers_that_turn_head_into_get(a: str) -> None:
    url = create(a, 4)
    r = requests.get(url, headers=T, timeout=10)
    assert r.status_code == 200 and r.headers["Upload-Offset"] == "0" and r.content == b""


def test_cors(a: str) -> None:
    r = requests.options(f"{a}/plain/tus/", headers={"Origin": "http://allowed.example",
                                                      "Access-Control-Request-Method": "PATCH"}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "PATCH" in r.headers["Access-Control-Allow-Methods"]
    assert "Upload-Offset" in r.headers["Access-Control-Allow-Headers"]
    url = create(a, 4, Origin="http://allowed.example")
    r = requests.head(url, headers={**T, "Origin": "http://allowed.example"}, timeout=10)
    exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Upload-Offset", "Upload-Length", "Location", "Upload-Metadata", "Tus-Resumable",
            "Upload-Expires"} <= exposed
    r = requests.head(url, headers={**T, "Origin": "http://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers


def test_creation_with_upload(a: str, root: str) -> None:
    data = payload(9000)
    r = requests.post(f"{a}/plain/tus/", data=data[:5000], headers={
        **T, "Upload-Length": "9000", "Content-Type": OCTETS}, timeout=10)
    assert r.status_code == 201
    assert r.headers["Upload-Offset"] == "5000"
    url = r.headers["Location"]
    assert patch(url, 5000, data[5000:]).status_code == 204
    assert handed(root, url)[0]["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_deferred_length(a: str, b: str, root: str) -> None:
    data = payload(12_345)
    url = create(a, None)
    assert head(url).headers["Upload-Defer-Length"] == "1"
    assert patch(url, 0, data[:10_000]).status_code == 204
    r = patch(moved(url, b), 10_000, data[10_000:], **{"Upload-Length": str(len(data))})
    assert r.status_code == 204, r.text
    assert handed(root, url)[0]["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_deferred_length_past_max_file_size_is_refused_and_terminated(a: str, root: str) -> None:
    url = create(a, None)
    assert patch(url, 0, payload(1 << 20)).status_code == 204
    r = patch(url, 1 << 20, payload(8 << 20))
    assert r.status_code == 413
    assert head(url).status_code in (204, 200, 410)


def test_empty_upload_completes_at_creation(a: str, root: str) -> None:
    url = create(a, 0, **{"Upload-Metadata": meta(filename="empty.txt")})
    [f] = handed(root, url)
    assert f["size"] == 0 and f["content_sha256"] == hashlib.sha256(b"").hexdigest()


# -- checksum ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
def test_checksums(a: str, root: str, algorithm: str) -> None:
    data = payload(20_000)
    url = create(a, len(data))
    good = base64.b64encode(hashlib.new(algorithm, data[:12_000]).digest()).decode()
    bad = base64.b64encode(hashlib.new(algorithm, b"other").digest()).decode()
    before = snapshot(root)
    r = patch(url, 0, data[:12_000], **{"Upload-Checksum": f"{algorithm} {bad}"})
    assert r.status_code == 460
    assert r.json()["error"]["code"] == "checksum_mismatch"
    assert snapshot(root) == before
    assert head(url).headers["Upload-Offset"] == "0"
    r = patch(url, 0, data[:12_000], **{"Upload-Checksum": f"{algorithm} {good}"})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "12000"


# -- hooks, storage, the app's answer ----------------------------------------------------------


def test_storage_commit_authorize_and_hooks(a: str, b: str, root: str) -> None:
    media = os.path.join(root, "media")
    data = payload(30_000, seed=7)
    r = requests.post(f"{a}/store/tus/", headers={**T, "Upload-Length": "10", "X-Deny": "create"}, timeout=10)
    assert r.status_code == 403
    url = create(a, len(data), "store", **{"Upload-Metadata": meta(filename="report.pdf")})
    assert requests.head(url, headers={**T, "X-Deny": "head"}, timeout=10).status_code == 404
    assert patch(url, 0, data[:10], **{"X-Deny": "patch"}).status_code == 404
    assert requests.delete(url, headers={**T, "X-Deny": "delete"}, timeout=10).status_code == 404
    assert patch(url, 0, data[:20_000]).status_code == 204
    assert not [k for k in snapshot(media) if not k.startswith(".uploadkit-tmp")]  # nothing final yet
    assert patch(moved(url, b), 20_000, data[20_000:]).status_code == 204
    [f] = handed(root, url)
    assert f["key"] and f["content_sha256"] == hashlib.sha256(data).hexdigest() == f["sha256"]
    with open(os.path.join(media, f["key"]), "rb") as fh:
        assert fh.read() == data
    assert not os.path.exists(os.path.join(media, ".uploadkit-tmp", "tus", upload_id(url) + ".bin"))

    # before_finish refuses: nothing gets a final key, the upload is terminated
    finals = {k for k in snapshot(media) if not k.startswith(".uploadkit-tmp")}
    url = create(a, 100, "store", **{"Upload-Metadata": meta(filename="virus.exe")})
    r = patch(url, 0, payload(100))
    assert r.status_code == 422 and r.json()["error"]["code"] == "infected"
    assert {k for k in snapshot(media) if not k.startswith(".uploadkit-tmp")} == finals
    assert head(url).status_code == 410

    # the app's error answer discards the committed file
    url = create(a, 100, "store", **{"Upload-Metadata": meta(filename="refuse.txt")})
    r = patch(url, 0, payload(100))
    assert r.status_code == 403 and r.json()["error"]["code"] == "refused"
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert {k for k in snapshot(media) if not k.startswith(".uploadkit-tmp")} == finals
    assert not [k for k in snapshot(media) if k.startswith(".uploadkit-tmp/tus/") and k.endswith(".bin")]


# -- progress --------------------------------------------------------------------------------


def test_progress_route_answers_for_a_tus_upload(a: str, b: str) -> None:
    data = payload(300_000)
    url = create(a, len(data))
    uid = upload_id(url)

    def progress(base: str) -> Dict[str, Any]:
        r = requests.get(f"{base}/plain/progress", params={"X-Progress-ID": uid}, timeout=10)
        return r.json()  # type: ignore[no-any-return]

    assert patch(url, 0, data[:100_000]).status_code == 204
    got = wait_for(lambda: (lambda p: p if p.get("received") == 100_000 else None)(progress(b)),
                   what="progress after the first PATCH")
    assert got["state"] == "uploading" and got["size"] == len(data)
    assert patch(moved(url, b), 100_000, data[100_000:200_000]).status_code == 204
    got = wait_for(lambda: (lambda p: p if p.get("received") == 200_000 else None)(progress(a)),
                   what="progress after the second PATCH")
    assert got["state"] == "uploading"
    assert patch(url, 200_000, data[200_000:]).status_code == 204
    got = wait_for(lambda: (lambda p: p if p.get("state") == "done" else None)(progress(b)), what="done")
    assert got["received"] == len(data)


# -- tuspy ---------------------------------------------------------------------------------


def test_tuspy_small_chunks_byte_exact(a: str, root: str) -> None:
    data = payload(1_000_003, seed=3)
    c = tus_client.TusClient(f"{a}/plain/tus/")
    up = c.uploader(file_stream=io.BytesIO(data), chunk_size=64 * 1024, metadata={"filename": "big.bin"},
                    retries=0)
    up.upload()
    assert up.offset == len(data)
    [f] = handed(root, up.url)
    assert f["size"] == len(data)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_tuspy_with_checksums(a: str, root: str) -> None:
    data = payload(300_001, seed=4)
    c = tus_client.TusClient(f"{a}/plain/tus/")
    up = c.uploader(file_stream=io.BytesIO(data), chunk_size=50_000, upload_checksum=True, retries=0)
    up.upload()
    assert handed(root, up.url)[0]["content_sha256"] == hashlib.sha256(data).hexdigest()


def _cut_patch(url: str, offset: int, declared: int, sent: bytes, keep_open: bool = False) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.sendall((f"PATCH {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nTus-Resumable: 1.0.0\r\n"
               f"Content-Type: {OCTETS}\r\nUpload-Offset: {offset}\r\nContent-Length: {declared}\r\n\r\n"
               ).encode() + sent)
    if not keep_open:
        s.close()
    return s


def test_a_cut_patch_keeps_what_arrived_and_resumes_on_the_other_server(a: str, b: str, root: str) -> None:
    data = payload(2_000_000, seed=5)
    c = tus_client.TusClient(f"{a}/plain/tus/")
    up = c.uploader(file_stream=io.BytesIO(data), chunk_size=500_000, metadata={"filename": "cut.bin"}, retries=0)
    up.upload(stop_at=500_000)
    _cut_patch(up.url, 500_000, 1_000_000, data[500_000:812_345])
    other = moved(up.url, b)
    wait_for(lambda: head(other).headers["Upload-Offset"] == "812345", what="the cut PATCH's bytes")
    resumed = tus_client.TusClient(f"{b}/plain/tus/").uploader(
        file_stream=io.BytesIO(data), url=other, chunk_size=300_000, retries=0)
    assert resumed.offset == 812_345
    resumed.upload()
    [f] = handed(root, up.url)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_cut_first_patch_keeps_even_a_held_head(a: str, b: str) -> None:
    url = create(a, 5000)
    _cut_patch(url, 0, 5000, payload(5000)[:100])
    wait_for(lambda: head(moved(url, b)).headers["Upload-Offset"] == "100", what="the held head")


def _info(root: str, endpoint: str, url: str) -> Tuple[int, Dict[str, Any]]:
    path = os.path.join(root, endpoint, upload_id(url) + ".info")
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_ino, json.loads(f.read())


def test_a_steady_clients_patches_leave_the_state_as_it_is(a: str, b: str, root: str) -> None:
    """Once the head is kept and the reads have found the client's pace, a
    PATCH within the expiry's one-minute step changes nothing in the state,
    and does not write it again; the offset is the data's own size."""
    data = payload(8 * 30_000, seed=12)
    url = create(a, len(data))
    seen = []
    for i in range(8):
        r = patch(moved(url, b) if i % 2 else url, i * 30_000, data[i * 30_000:(i + 1) * 30_000])
        assert r.status_code == 204
        seen.append((_info(root, "plain", url), r.headers["Upload-Expires"]))
    (inode, state), expires = seen[4]
    assert state["read_size"] == 1 << 20  # 64 KiB, doubled by each fast PATCH
    assert len(base64.b64decode(state["head"])) == 8192
    assert all(s == ((inode, state), expires) for s in seen[5:7]), seen[4:7]  # the same file, untouched
    assert handed(root, url)[0]["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_patches_still_push_the_expiry_back(a: str, root: str) -> None:
    url = create(a, 1000, "short")  # expire_after 1 s: a step of 0.1 s
    last = _info(root, "short", url)[1]["expires"]
    for i in range(3):
        time.sleep(0.5)
        assert patch(url, i * 100, payload(100, seed=i)).status_code == 204
        now = _info(root, "short", url)[1]["expires"]
        assert now >= last + 0.4
        last = now


def _answer(s: socket.socket, give_up: float, trickle: bool = False) -> Tuple[bytes, float]:
    """Read the server's answer on ``s`` (sending a byte every 0.4 s while
    none came, with ``trickle``); the bytes and the seconds it took."""
    began = time.monotonic()
    chunks = []
    while time.monotonic() < began + give_up:
        ready, _, _ = select.select([s], [], [], 0.4)
        if ready:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunks[-1]:
                break
        elif trickle and not chunks:
            try:
                s.send(b"t")
            except OSError:
                pass
    return b"".join(chunks), time.monotonic() - began


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_a_stalled_or_trickling_patch_is_408_and_keeps_what_it_stored(a: str, b: str, root: str,
                                                                      trickle: bool) -> None:
    """The client deadlines of a multipart upload hold for a PATCH: a client
    that stops sending (or sends a byte now and then) cannot hold the worker;
    it is told 408 and resumes from what was stored."""
    data = payload(400_000, seed=11)
    url = create(a, len(data), "slow")
    s = _cut_patch(url, 0, 300_000, data[:100_000], keep_open=True)
    try:
        raw, took = _answer(s, give_up=15, trickle=trickle)
    finally:
        s.close()
    assert raw.startswith(b"HTTP/1.1 408"), raw[:300]
    assert took < 8  # idle_timeout 1 s; a 128 KiB read at min_rate gets 1 s more
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "client_timeout"
    other = moved(url, b)
    stored = int(head(other).headers["Upload-Offset"])
    assert 0 < stored <= 100_000  # what the reads returned before the deadline, never a trickled byte
    with open(os.path.join(root, "slow", upload_id(url) + ".bin"), "rb") as f:
        assert f.read() == data[:stored]
    assert patch(other, stored, data[stored:]).status_code == 204
    [f] = handed(root, url)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_lease_is_checked_again_once_its_recheck_window_has_passed(tmp_path: Any) -> None:
    """Writes are fenced by a check at most every ``recheck`` seconds (an
    eighth of the timeout, at most 0.5 s): safe, as a lease can only be taken
    over once its heartbeat is ``timeout`` old. Here another token is forced
    into the lease file, which no real request could do that soon, to show
    where the check happens."""
    from uploadkit.resumable import FileLease
    from uploadkit.tus import UploadLocked

    lease = FileLease(str(tmp_path / "locks" / "x.lock"), timeout=0.8)
    lease.acquire(1.0)
    assert lease.recheck == pytest.approx(0.1)
    with lease.fenced():
        pass  # checked: the token is ours
    with open(tmp_path / "locks" / "x.lock", "r+b") as f:
        f.write(b"someoneelse00000 9999999999.000")
    with lease.fenced():
        pass  # within the window: not checked again
    time.sleep(0.15)
    with pytest.raises(UploadLocked):
        with lease.fenced():
            pass
    assert not lease.held
    lease.release()


@pytest.mark.parametrize("endpoint", ["stale", "mcstale"], ids=["lease-files", "memcached"])
def test_a_silent_patch_loses_its_lock_to_the_next_request(a: str, b: str, root: str, endpoint: str) -> None:
    data = payload(400_000, seed=6)
    url = create(a, len(data), endpoint)
    # A client that sends part of its body, then goes silent with the connection open.
    stale = _cut_patch(url, 0, 200_000, data[:100_000], keep_open=True)
    try:
        other = moved(url, b)
        # what the stale PATCH's reads returned is stored (a blocking read of
        # the rest waits for bytes that never come)
        stored = int(wait_for(lambda: int(head(other).headers["Upload-Offset"]), what="the stale PATCH's bytes"))
        assert 0 < stored <= 100_000
        r = patch(other, stored, data[stored:stored + 10_000])
        assert r.status_code == 423  # its PATCH is still alive: locked
        assert r.json()["error"]["code"] == "upload_locked"
        # once it has been silent past lock_timeout, the next request gets the lock
        wait_for(lambda: patch(other, stored, data[stored:stored + 10_000]).status_code == 204,
                 what="the lock's release", timeout=10)
        stale.sendall(data[100_000:200_000])  # the stale PATCH wakes up: it must not write
        answer = stale.recv(4096)
        assert answer.startswith(b"HTTP/1.1 423")
    finally:
        stale.close()
    assert head(other).headers["Upload-Offset"] == str(stored + 10_000)
    assert patch(other, stored + 10_000, data[stored + 10_000:]).status_code == 204
    assert handed(root, url)[0]["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_expired_uploads_answer_410_and_are_reclaimed_by_cleanup(a: str, root: str) -> None:
    url = create(a, 50_000, "short")
    assert patch(url, 0, payload(10_000)).status_code == 204
    files = [os.path.join(root, "short", upload_id(url) + s) for s in (".info", ".bin")]
    assert all(os.path.exists(p) for p in files)
    wait_for(lambda: head(url).status_code == 410, what="expiry")
    assert patch(url, 10_000, b"x").status_code == 410
    out = subprocess.run([sys.executable, "-m", "uploadkit.cli", "cleanup", "--tus-dir",
                          os.path.join(root, "short")], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(os.path.exists(p) for p in files)


def test_a_terminated_tuspy_upload_leaves_nothing(a: str, root: str) -> None:
    data = payload(200_000)
    c = tus_client.TusClient(f"{a}/plain/tus/")
    up = c.uploader(file_stream=io.BytesIO(data), chunk_size=50_000, retries=0)
    up.upload(stop_at=100_000)
    assert requests.delete(up.url, headers=T, timeout=10).status_code == 204
    assert not os.path.exists(os.path.join(root, "plain", upload_id(up.url) + ".bin"))
    with pytest.raises(Exception):
        up.upload()


# -- in one process: thumbnails, quota, an fsspec storage that appends ------------------------------


def _in_process(**kw: Any) -> Tuple[Any, list]:
    from uploadkit.middleware import UploadMiddleware
    from uploadkit.tusapp import TusSettings

    got: list = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        got.extend(environ["uploadkit.files"].values())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    tus = kw.pop("tus", TusSettings())
    return UploadMiddleware(app, tus=tus, **kw), got


def test_thumbnails_are_made_on_completion_and_stored_beside_the_file(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.imaging import Thumbnailer
    from uploadkit.progress import MemoryStore
    from uploadkit.storage import Storage

    storage = Storage(str(tmp_path / "media"))
    store = MemoryStore()
    mw, got = _in_process(storage=storage, thumbnails=Thumbnailer([(32, 32)]), progress=store)
    jpeg = encode(photo(300, 200), "JPEG")
    with serve(mw) as srv:
        url = create(srv.url, len(jpeg), "upload", **{"Upload-Metadata": meta(filename="p.jpg")})
        assert patch(url, 0, jpeg[:5000]).status_code == 204
        assert got == [] and store.get(upload_id(url))["state"] == "uploading"  # type: ignore[index]
        assert patch(url, 5000, jpeg[5000:]).status_code == 204
    [f] = got
    assert f.content_type == "image/jpeg" and f.sha256 == hashlib.sha256(jpeg).hexdigest()
    with storage.open(f.key) as fh:
        assert fh.read() == jpeg
    assert set(f.thumbnails) == {"32x32"} and storage.exists(f.thumbnails["32x32"])
    wait_for(lambda: (store.get(upload_id(url)) or {}).get("state") == "done", what="progress done")


def test_an_upload_the_app_refuses_reads_error_not_done(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.middleware import UploadMiddleware
    from uploadkit.progress import MemoryStore
    from uploadkit.storage import Storage
    from uploadkit.tusapp import TusSettings

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("403 Forbidden", [("Content-Type", "application/json")])
        return [b'{"error": {"code": "refused", "message": "not this one"}}']

    storage = Storage(str(tmp_path / "media"))
    store = MemoryStore()
    mw = UploadMiddleware(app, storage=storage, progress=store, tus=TusSettings())
    with serve(mw) as srv:
        url = create(srv.url, 3000, "upload", **{"Upload-Metadata": meta(filename="a.txt")})
        data = payload(3000)
        assert patch(url, 0, data[:1000]).status_code == 204
        assert patch(url, 1000, data[1000:]).status_code == 403
    state = wait_for(lambda: (lambda p: p if p.get("state") in ("done", "error") else None)(
        store.get(upload_id(url)) or {}), what="a final progress state")
    assert state["state"] == "error", state
    assert [k for k in storage.fs.find(str(tmp_path / "media")) if "/.uploadkit-tmp/" not in k] == []


def test_quota_counts_the_whole_file_on_completion(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.tusapp import TusSettings

    mw, got = _in_process(quota=lambda environ: 15_000, tus=TusSettings(directory=str(tmp_path / "up")))
    with serve(mw) as srv:
        url = create(srv.url, 20_000, "upload")
        assert patch(url, 0, payload(10_000)).status_code == 204  # within the quota
        r = patch(url, 10_000, payload(10_000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "quota_exceeded"
        assert head(url).status_code == 410
    assert got == [] and not [n for n in os.listdir(tmp_path / "up") if n.endswith(".bin")]


def test_an_fsspec_storage_that_appends(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.storage import Storage

    storage = Storage(f"memory://tus-{os.getpid()}-{time.monotonic_ns()}")
    mw, got = _in_process(storage=storage, tempdir=str(tmp_path))
    data = payload(70_000)
    with serve(mw) as srv:
        url = create(srv.url, len(data), "upload", **{"Upload-Metadata": meta(filename="m.bin")})
        for offset in range(0, len(data), 20_000):
            assert patch(url, offset, data[offset:offset + 20_000]).status_code == 204
    [f] = got
    with storage.open(f.key) as fh:
        assert fh.read() == data and f.sha256 == hashlib.sha256(data).hexdigest()
    assert [k for k in storage.fs.find(storage.root) if "/tus/" in k and k.endswith(".bin")] == []


def test_a_thumbnailer_that_rewrites_originals_is_refused() -> None:
    from uploadkit.imaging import Thumbnailer
    from uploadkit.storage import Storage

    with pytest.raises(ValueError, match="originals as sent"):
        _in_process(storage=Storage("memory://x"), thumbnails=Thumbnailer([(32, 32)], strip_gps=True))


# -- concatenation ------------------------------------------------------------------------------


def test_concatenation_of_partial_uploads_made_on_two_servers(a: str, b: str, root: str) -> None:
    png = encode(photo(200, 150), "PNG")
    pieces = [png[:100], png[100:30_000], png[30_000:]]
    urls = []
    for i, piece in enumerate(pieces):
        base = a if i % 2 else b
        url = create(base, len(piece), "png", **{"Upload-Concat": "partial"})
        assert head(url).headers["Upload-Concat"] == "partial"
        half = len(piece) // 2
        assert patch(url, 0, piece[:half]).status_code == 204  # partials are not sniffed: they are pieces
        assert patch(moved(url, a), half, piece[half:]).status_code == 204
        urls.append(url)
    assert not [u for u in urls if os.path.exists(os.path.join(root, "handed", upload_id(u) + ".json"))]
    # one URL absolute, the others as paths
    final = "final;" + " ".join([urls[0]] + [urlparse(u).path for u in urls[1:]])
    r = requests.post(f"{a}/png/tus/", headers={**T, "Upload-Concat": final,
                                                 "Upload-Metadata": meta(filename="joined.png")}, timeout=20)
    assert r.status_code == 201, r.text
    url = r.headers["Location"]
    [f] = handed(root, url)
    assert f["filename"] == "joined.png" and f["content_type"] == "image/png"
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(png).hexdigest()
    h = head(moved(url, b))
    assert h.headers["Upload-Offset"] == h.headers["Upload-Length"] == str(len(png))
    assert h.headers["Upload-Concat"] == "final;" + " ".join(urlparse(u).path for u in urls)
    assert patch(url, len(png), b"x").status_code == 403  # a final upload takes no PATCH
    for u in urls:  # the pieces are spent
        assert head(u).status_code == 410
        assert not os.path.exists(os.path.join(root, "png", upload_id(u) + ".bin"))


def test_bad_concatenations_are_400_and_change_nothing(a: str, root: str) -> None:
    whole = create(a, 10)
    unfinished = create(a, 10, **{"Upload-Concat": "partial"})
    assert patch(unfinished, 0, b"12345").status_code == 204
    done = create(a, 3, **{"Upload-Concat": "partial"})
    assert patch(done, 0, b"abc").status_code == 204
    before = snapshot(root)
    for value, extra in [
        (f"final;{urlparse(whole).path}", {}),  # not a partial upload
        (f"final;{urlparse(unfinished).path} {urlparse(done).path}", {}),  # not complete
        (f"final;{urlparse(done).path} {urlparse(done).path}", {}),  # twice
        (f"final;/plain/tus/{'0' * 32}", {}),  # unknown
        ("final;/elsewhere/tus/" + upload_id(done), {}),  # not ours
        ("final;", {}), ("partial;x", {}), ("whole", {}),
        (f"final;{urlparse(done).path}", {"Upload-Length": "3"}),
    ]:
        r = requests.post(f"{a}/plain/tus/", headers={**T, "Upload-Concat": value, **extra}, timeout=10)
        assert r.status_code == 400, (value, r.text)
        assert snapshot(root) == before, value


def test_a_worker_killed_mid_patch_on_local_disk_resumes_from_what_it_wrote(a: str, b: str, root: str) -> None:
    import signal

    data = payload(600_000, seed=8)
    url = create(a, len(data), "stale")
    uid = upload_id(url)
    stale = _cut_patch(url, 0, 400_000, data[:300_000], keep_open=True)
    try:
        marker = os.path.join(root, f"serving-{uid}")
        wait_for(lambda: os.path.exists(marker) and int(head(moved(url, b)).headers["Upload-Offset"]) > 0,
                 what="bytes written by the PATCH")
        with open(marker) as fh:
            os.kill(int(fh.read()), signal.SIGKILL)
    finally:
        stale.close()
    stored = os.path.getsize(os.path.join(root, "stale", uid + ".bin"))
    assert 0 < stored <= 300_000
    assert head(moved(url, b)).headers["Upload-Offset"] == str(stored)
    with open(os.path.join(root, "stale", uid + ".bin"), "rb") as fh:
        assert fh.read() == data[:stored]  # every byte it wrote, nothing else
    # the dead worker's lease lapses after lock_timeout; tuspy retries the 423 until then
    resumed = tus_client.TusClient(f"{b}/stale/tus/").uploader(
        file_stream=io.BytesIO(data), url=moved(url, b), chunk_size=200_000, retries=8, retry_delay=1)
    assert resumed.offset == stored
    resumed.upload()
    [f] = handed(root, url)
    assert f["sha256"] == f["content_sha256"] == hashlib.sha256(data).hexdigest()


def test_max_request_size_bounds_one_patch_not_the_upload(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.limits import Limits
    from uploadkit.tusapp import TusSettings

    mw, got = _in_process(limits=Limits(max_request_size=10_000),
                          tus=TusSettings(directory=str(tmp_path / "up")))
    data = payload(25_000)
    with serve(mw) as srv:
        url = create(srv.url, len(data), "upload")
        r = patch(url, 0, data[:20_000])
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert head(url).headers["Upload-Offset"] == "0"  # refused before a byte, the upload intact
        for offset in range(0, len(data), 10_000):
            assert patch(url, offset, data[offset:offset + 10_000]).status_code == 204
    assert [f.sha256 for f in got] == [hashlib.sha256(data).hexdigest()]


def test_the_progress_id_sent_on_creation_names_the_progress(tmp_path: Any) -> None:
    from tests.support.wsgi import serve
    from uploadkit.progress import MemoryStore
    from uploadkit.tusapp import TusSettings

    store = MemoryStore()
    mw, got = _in_process(progress=store, tus=TusSettings(directory=str(tmp_path / "up")))
    with serve(mw) as srv:
        url = create(srv.url, 20_000, "upload", **{"X-Progress-ID": "bar-7"})
        assert patch(url, 0, payload(12_000)).status_code == 204
        wait_for(lambda: (store.get("bar-7") or {}).get("received") == 12_000, what="progress under bar-7")
        assert store.get(upload_id(url)) is None
        assert requests.post(f"{srv.url}/upload/tus/", headers={**T, "Upload-Length": "1",
                                                                "X-Progress-ID": "no spaces"},
                             timeout=10).status_code == 400


def test_a_patch_appends_in_pieces_cut_on_the_files_blocks(tmp_path: Any, monkeypatch: Any) -> None:
    """A PATCH resumes where the last one stopped, anywhere in a block: its
    first piece fills that block, the next ones cover whole blocks, as the
    file's position (not the request's first byte) decides where they are cut."""
    from uploadkit.handlers import WRITE_SIZE
    from uploadkit.resumable import FileLease, UploadArea

    area = UploadArea(str(tmp_path))
    upload_id = "a" * 32
    with open(area.data_path(upload_id), "wb") as f:
        f.write(b"x" * 1000)  # what an earlier PATCH stored
    lease = FileLease(str(tmp_path / "locks" / "x.lock"), timeout=5)
    lease.acquire(1.0)
    sizes = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    appender = area.appender(upload_id, lease)
    monkeypatch.setattr(os, "write", write)
    try:
        appender.write(b"y" * (2 * WRITE_SIZE))
        appender.write(b"z" * (WRITE_SIZE + 5))
    finally:
        monkeypatch.undo()
        appender.close()
        lease.release()
    assert sizes == [WRITE_SIZE - 1000, WRITE_SIZE, 1000, WRITE_SIZE - 1000, 1005]
    with open(area.data_path(upload_id), "rb") as f:
        assert f.read() == b"x" * 1000 + b"y" * (2 * WRITE_SIZE) + b"z" * (WRITE_SIZE + 5)
