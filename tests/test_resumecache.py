"""The completing PATCH skips the replay when its worker holds the upload's
hash state for exactly the stored prefix, and replays otherwise: the sha256
is the file's either way.

Two gunicorn servers with one sync worker each share one storage, so "the
same worker" and "another worker" are known; each worker says how many bytes
of an upload it read back (``/replayed/<id>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Iterator, List, Tuple
from urllib.parse import urlparse

import pytest
import requests

from tests.support.wsgi import REPO_ROOT, gunicorn
from uploadkit.resumecache import ParkedWorker, StateCache

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
    got = cache.take("c", 10, ["sha256"])
    assert got is not None and got.worker is None
    [h] = got.hashers
    assert h.hexdigest() == hashlib.sha256(b"c").hexdigest()
    off = StateCache(0)
    off.put("a", 1, ["sha256"], [hashlib.sha256()])
    assert len(off) == 0


def _batch(hashers: List[Any], data: bytes) -> List[Tuple[List[Any], bytes]]:
    return [(hashers, data[i:i + 65536]) for i in range(0, len(data), 65536)]


def test_a_parked_hash_thread_goes_on_with_the_next_patch() -> None:
    """A PATCH answers with its bytes still queued on the hash thread; the
    next PATCH on the worker takes the same thread and queues after them,
    so the digest is the whole file's in order, and no thread is joined."""
    data = os.urandom(3 << 20)
    h = hashlib.sha256()
    worker = ParkedWorker(depth=8)
    worker.queue.put(_batch([h], data[:1 << 20]))
    cache = StateCache(4)
    cache.put("a", 1 << 20, ["sha256"], [h], worker)
    got = cache.take("a", 1 << 20, ["sha256"])
    assert got is not None and got.worker is worker and worker.is_alive()
    worker.queue.put(_batch(got.hashers, data[1 << 20:]))
    worker.stop()
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_parked_thread_left_idle_ends_and_its_hashes_stay_good() -> None:
    data = os.urandom(1 << 20)
    h = hashlib.sha256()
    worker = ParkedWorker(depth=8, idle=0.2)
    worker.queue.put(_batch([h], data))
    cache = StateCache(4)
    cache.put("a", len(data), ["sha256"], [h], worker)
    worker.join(5)
    assert not worker.is_alive() and worker.retired  # nobody fed it for 0.2 s
    got = cache.take("a", len(data), ["sha256"])
    assert got is not None and got.worker is None  # a new thread starts when needed
    assert got.hashers[0].hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_claimed_thread_never_retires_and_dropped_entries_stop_theirs() -> None:
    busy = ParkedWorker(depth=8, idle=0.1)
    time.sleep(0.4)
    assert busy.is_alive()  # claimed by the request that made it
    busy.stop()
    cache = StateCache(1)
    first, second, other = ParkedWorker(depth=8), ParkedWorker(depth=8), ParkedWorker(depth=8)
    cache.put("a", 10, ["sha256"], [hashlib.sha256()], first)
    cache.put("b", 10, ["sha256"], [hashlib.sha256()], second)  # evicts "a"
    first.join(5)
    assert not first.is_alive()
    assert cache.take("b", 11, ["sha256"]) is None  # another offset: a miss, and its thread ends
    second.join(5)
    assert not second.is_alive()
    StateCache(0).put("c", 10, ["sha256"], [hashlib.sha256()], other)  # keeps nothing
    other.join(5)
    assert not other.is_alive()
