"""Name collisions settled by the store, across processes and hosts.

Two gunicorn masters (two "hosts", 4 gthread workers each) store into one
bucket of a real S3-compatible server (moto, in its own process). Fifty clients
upload a file of the same name at once, each holding back the end of its
body until all have sent the rest (one barrier), so the commits of different
workers and masters race for one key. moto answers each request 100 ms late,
as a real store answers in tens of milliseconds where moto on loopback takes
a fraction of one: the race is the one production meets.
Nothing in a process can settle that race; only the store can (S3's
``If-None-Match: *``). Every byte is then checked against what its client sent
and against the key its client was answered with.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.support.cluster import (KiB, Cluster, MotoProcess, module_memcached,  # noqa: F401
                                   parse_response, payload)
from tests.support.memcached import MemcachedServer
from uploadkit.multipart import encode_multipart

CLIENTS = 50
HOSTS = 2
WORKERS = 4
#: Enough threads that all 50 uploads are served at once (2 x 4 x 7 = 56).
THREADS = 7
FILENAME = "photo.jpg"
#: What each S3 request waits in moto: real S3 answers in tens of milliseconds.
LATENCY = 0.1
SIZE = 64 * KiB


@pytest.fixture(scope="module")
def moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoProcess]:
    """moto answering in about the time a real S3 takes (LATENCY per request)."""
    server = MotoProcess(str(tmp_path_factory.mktemp("moto")), latency=LATENCY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hosts(moto_process: MotoProcess, module_memcached: MemcachedServer,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, List[Cluster]]]:
    """Two independent gunicorn masters sharing one bucket (and one memcached)."""
    bucket = moto_process.create_bucket()
    clusters = [Cluster(str(tmp_path_factory.mktemp(f"host{n}")), storage_url=f"s3://{bucket}/uploads",
                        storage_options=moto_process.options(), memcached=module_memcached.address,
                        workers=WORKERS, threads=THREADS)
                for n in range(HOSTS)]
    try:
        with ThreadPoolExecutor(HOSTS) as pool:
            list(pool.map(Cluster.start, clusters))
        yield bucket, clusters
    finally:
        for cluster in clusters:
            cluster.stop()


def _post_held(port: int, target: str, body: bytes, ctype: str, barrier: threading.Barrier) -> bytes:
    """POST ``body`` but hold back its end (the last KiB of the file and the
    closing delimiter) until every client of ``barrier`` has sent the rest:
    the files then end, and their commits race, at the same instant."""
    tail = len(body) - body.rindex(b"\r\n--") + KiB
    head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body[:-tail])
        barrier.wait()
        s.sendall(body[-tail:])
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _stampede(clusters: List[Cluster], policy: str, contents: List[bytes]) -> List[Tuple[int, Dict[str, Any]]]:
    """Upload ``contents[i]`` as ``photo.jpg`` from client ``i``, spread over
    the hosts, all ended at once; each client's (status, JSON answer)."""
    bodies = [encode_multipart([], [("file", FILENAME, "image/jpeg", data)]) for data in contents]
    barrier = threading.Barrier(len(bodies), timeout=30)

    def send(i: int) -> Tuple[int, Dict[str, Any]]:
        body, ctype = bodies[i]
        status, _, raw = parse_response(_post_held(clusters[i % len(clusters)].port, f"/collide/{policy}",
                                                   body, ctype, barrier))
        return status, json.loads(raw)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, range(len(bodies))))


def _stored(moto: MotoProcess, bucket: str, prefix: str) -> Dict[str, bytes]:
    """Every object under ``uploads/<prefix>``, by its storage key."""
    client = moto.client()
    return {key[len("uploads/"):]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in moto.keys(bucket, f"uploads/{prefix}")}


def _nothing_left(moto: MotoProcess, bucket: str, clusters: List[Cluster]) -> None:
    assert moto.temp_area_emptied(bucket) == {}
    assert moto.pending_uploads(bucket) == []
    for cluster in clusters:
        assert cluster.temp_files() == []


def _contents(count: int, seed: int) -> List[bytes]:
    # One size: the uploads end, and their commits race, at the same time.
    return [payload(SIZE, seed + i) for i in range(count)]


def test_rename_gives_every_client_its_own_object(moto_process: MotoProcess,  # noqa: F811
                                                  hosts: Tuple[str, List[Cluster]]) -> None:
    bucket, clusters = hosts
    contents = _contents(CLIENTS, 1000)
    answers = _stampede(clusters, "rename", contents)

    assert [status for status, _ in answers] == [200] * CLIENTS, answers
    keys = [answer["files"][0]["key"] for _, answer in answers]
    assert len(set(keys)) == CLIENTS, f"{CLIENTS - len(set(keys))} clients were given a key already given"
    stored = _stored(moto_process, bucket, "rename/")
    assert sorted(stored) == sorted(keys), "objects lost or left over"
    for i, (key, data) in enumerate(zip(keys, contents)):
        assert key == "rename/photo.jpg" or key.startswith("rename/photo_") and key.endswith(".jpg"), key
        assert hashlib.sha256(stored[key]).hexdigest() == hashlib.sha256(data).hexdigest(), \
            f"client {i} was answered {key!r}, which holds another client's bytes"
    _nothing_left(moto_process, bucket, clusters)


def test_error_lets_exactly_one_client_take_the_key(moto_process: MotoProcess,  # noqa: F811
                                                    hosts: Tuple[str, List[Cluster]]) -> None:
    bucket, clusters = hosts
    contents = _contents(CLIENTS, 2000)
    answers = _stampede(clusters, "error", contents)

    won = [i for i, (status, _) in enumerate(answers) if status == 200]
    refused = [answer for status, answer in answers if status == 409]
    assert len(won) == 1, f"{len(won)} clients were told they stored error/{FILENAME}"
    assert len(refused) == CLIENTS - 1, [status for status, _ in answers]
    assert {answer["error"]["code"] for answer in refused} == {"file_exists"}
    (winner,) = won
    assert answers[winner][1]["files"][0]["key"] == f"error/{FILENAME}"
    stored = _stored(moto_process, bucket, "error/")
    assert list(stored) == [f"error/{FILENAME}"]
    assert stored[f"error/{FILENAME}"] == contents[winner], "the stored bytes are not the winner's"
    _nothing_left(moto_process, bucket, clusters)


def test_dedup_gives_identical_bytes_one_object_and_one_key(moto_process: MotoProcess,  # noqa: F811
                                                            hosts: Tuple[str, List[Cluster]]) -> None:
    bucket, clusters = hosts
    distinct = _contents(5, 3000)
    contents = [distinct[i % len(distinct)] for i in range(CLIENTS)]
    answers = _stampede(clusters, "dedup", contents)

    assert [status for status, _ in answers] == [200] * CLIENTS, answers
    keys = [answer["files"][0]["key"] for _, answer in answers]
    expected = [f"dedup/{hashlib.sha256(data).hexdigest()}.jpg" for data in contents]
    assert keys == expected
    stored = _stored(moto_process, bucket, "dedup/")
    assert sorted(stored) == sorted(set(expected)), "one object per distinct content"
    for key, data in zip(keys, contents):
        assert stored[key] == data
    _nothing_left(moto_process, bucket, clusters)
