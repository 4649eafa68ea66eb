"""The completing PATCH skips the replay when its worker holds the upload's
hash state for exactly the stored prefix, and replays otherwise: the sha256
is the file's either way.

Two gunicorn servers with one sync worker each share one storage, so "the
same worker" and "another worker" are known; each worker says how many bytes
of an upload it read back (``/replayed/<id>``).
"""

from __future__ import annotations

import hashlib
import threading
import json
import os
import socket
from typing import Any, Iterator, List, Tuple
from urllib.parse import urlparse

import pytest
import requests

from tests.support.wsgi import REPO_ROOT, gunicorn
from uploadkit.resumecache import StateCache

T = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
#: A 1-byte PATCH and one still under the sniffing head (the head is held in
#: the upload's state), then PATCHes past the hash thread's threshold.
STEPS = [1, 5000, 700_000, 1_200_000]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("resumecache"))


@pytest.fixture(scope="module")
def servers(root: str) -> Iterator[Tuple[str, str]]:
    env = {"UPLOADKIT_RC_ROOT": root, "PYTHONPATH": REPO_ROOT}
    with gunicorn("tests.support.resumecache_app:app", env=env) as a, \
            gunicorn("tests.support.resumecache_app:app", env=env) as b:
        yield a, b


def payload(size: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def create(base: str, endpoint: str, length: int) -> str:
    r = requests.post(f"{base}/{endpoint}/tus/", headers={**T, "Upload-Length": str(length)}, timeout=10)
    assert r.status_code == 201, r.text
    return urlparse(r.headers["Location"]).path


def patch(base: str, path: str, offset: int, data: bytes) -> None:
    r = requests.patch(base + path, data=data, timeout=30,
                       headers={**T, "Content-Type": OCTETS, "Upload-Offset": str(offset)})
    assert r.status_code == 204, r.text
    assert r.headers["Upload-Offset"] == str(offset + len(data))


def replayed(base: str, path: str) -> int:
    r = requests.get(f"{base}/replayed/{path.rpartition('/')[2]}", timeout=10)
    return int(r.json()["bytes"])


def handed(root: str, path: str) -> Any:
    with open(os.path.join(root, "handed", path.rpartition("/")[2] + ".json")) as f:
        return json.load(f)


def upload(bases: List[str], endpoint: str, data: bytes) -> Tuple[str, List[int]]:
    """Create on the first base, then PATCH the steps and the rest, the
    i-th PATCH on ``bases[i % len(bases)]``; return the path and each PATCH's offset."""
    path = create(bases[0], endpoint, len(data))
    offsets, offset = [], 0
    for i, step in enumerate(STEPS + [len(data) - sum(STEPS)]):
        offsets.append(offset)
        patch(bases[i % len(bases)], path, offset, data[offset:offset + step])
        offset += step
    return path, offsets


def test_patches_on_one_worker_complete_without_a_replay(servers: Tuple[str, str], root: str) -> None:
    a, _ = servers
    data = payload(3_000_000, 1)
    path, _ = upload([a], "sha", data)
    got = handed(root, path)
    assert got["size"] == len(data)
    assert got["sha256"] == got["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert replayed(a, path) == 0


def test_completion_on_another_worker_replays_and_gets_the_same_sha256(servers: Tuple[str, str],
                                                                          root: str) -> None:
    a, b = servers
    data = payload(3_000_000, 2)
    path = create(a, "sha", len(data))
    offset = 0
    for step in STEPS:
        patch(a, path, offset, data[offset:offset + step])
        offset += step
    patch(b, path, offset, data[offset:])
    got = handed(root, path)
    assert got["sha256"] == got["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert replayed(b, path) == offset  # b never saw the upload: it read the stored prefix back
    assert replayed(a, path) == 0


def test_patches_alternating_between_servers_replay_where_the_state_is_stale(servers: Tuple[str, str],
                                                                              root: str) -> None:
    # a serves PATCHes 0, 2 and 4, b serves 1 and 3: a's hashes stop at
    # PATCH 2's end, b appended after them, so a's completion must not use them.
    a, b = servers
    data = payload(3_000_000, 3)
    path, offsets = upload([a, b], "sha", data)
    got = handed(root, path)
    assert got["sha256"] == got["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert replayed(a, path) == offsets[-1]
    assert replayed(b, path) == 0


@pytest.mark.parametrize("endpoint", ["nocache", "quota"])
def test_without_a_carried_state_the_completion_replays(servers: Tuple[str, str], root: str, endpoint: str) -> None:
    a, _ = servers
    data = payload(2_500_000, 4)
    path, offsets = upload([a], endpoint, data)
    got = handed(root, path)
    assert got["sha256"] == got["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert replayed(a, path) == offsets[-1]


def test_a_cut_patch_keeps_the_hashes_of_what_it_stored(servers: Tuple[str, str], root: str) -> None:
    a, _ = servers
    data = payload(3_000_000, 5)
    path = create(a, "sha", len(data))
    patch(a, path, 0, data[:1_000_000])
    # Announce the rest, send 900 kB of it, and go away.
    port = urlparse(a).port
    assert port is not None
    head = (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: {OCTETS}\r\nUpload-Offset: 1000000\r\nContent-Length: {len(data) - 1_000_000}\r\n"
            "\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + data[1_000_000:1_900_000])
        s.shutdown(socket.SHUT_RDWR)
    # One sync worker: this HEAD is served once the cut PATCH is over.
    r = requests.head(a + path, headers=T, timeout=10)
    offset = int(r.headers["Upload-Offset"])
    assert 1_000_000 < offset <= 1_900_000
    patch(a, path, offset, data[offset:])
    got = handed(root, path)
    assert got["sha256"] == got["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert replayed(a, path) == 0


def test_the_cache_is_bounded_and_an_entry_serves_one_offset_once() -> None:
    cache = StateCache(2)
    for name in ("a", "b", "c"):
        cache.put(name, 10, ["sha256"], [hashlib.sha256(name.encode())])
    assert len(cache) == 2
    assert cache.take("a", 10, ["sha256"]) is None  # the oldest went first
    assert cache.take("b", 11, ["sha256"]) is None  # another offset: not these bytes
    assert cache.take("b", 10, ["sha256"]) is None  # and the entry is gone
    assert cache.take("c", 10, ["sha256", "md5"]) is None  # other digests
    cache.put("c", 10, ["sha256"], [hashlib.sha256(b"c")])
    [h] = cache.take("c", 10, ["sha256"]) or []
    assert h.hexdigest() == hashlib.sha256(b"c").hexdigest()
    off = StateCache(0)
    off.put("a", 1, ["sha256"], [hashlib.sha256()])
    assert len(off) == 0


def test_an_entry_still_being_hashed_is_waited_for_or_missed() -> None:
    """A PATCH answers before its hash thread is done; the next request to
    take the entry joins that thread, and misses (replays) rather than touch
    hash objects a thread still writes into."""
    release = threading.Event()
    h = hashlib.sha256(b"first")

    def finish() -> None:
        release.wait(5)
        h.update(b" second")

    busy = threading.Thread(target=finish)
    busy.start()
    cache = StateCache(4, join_timeout=0.2)
    cache.put("a", 12, ["sha256"], [h], busy)
    assert cache.take("a", 12, ["sha256"]) is None  # still hashing after 0.2 s
    release.set()
    busy.join()
    done = threading.Thread(target=lambda: h.update(b"!"))
    cache.put("b", 13, ["sha256"], [h], done)
    done.start()
    [got] = cache.take("b", 13, ["sha256"]) or []
    assert not done.is_alive()
    assert got.hexdigest() == hashlib.sha256(b"first second!").hexdigest()
