"""Every storage call has a deadline: an S3 that stops answering without a
reset (a network blackhole) refuses the upload with a 503 within the deadline,
frees the request thread, and what the cut upload left is reclaimed.

The S3 here is moto's server behind :class:`~tests.support.cluster.TcpProxy`,
whose blackhole keeps every socket open and stops reading and writing; the
server is gunicorn with a single worker thread, so a request thread held by
storage is one the next client would wait for.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Dict, Iterator, List, Set, Tuple

import fsspec
import pytest
from fsspec.asyn import AsyncFileSystem

from tests.support.cluster import (MiB, Cluster, MotoProcess, TcpProxy, build_body,  # noqa: F401
                                   http_post, module_memcached, moto_process, payload, wait_final)
from tests.support.memcached import MemcachedServer
from uploadkit import cli
from uploadkit._deadline import BoundedFileSystem, DeadlineExceeded, unbounded, unreachable
from uploadkit.errors import StorageUnavailable
from uploadkit.storage import Storage

#: Short deadlines, so that a test waits seconds; the default is 30 s.
DEADLINE = 2.0
#: What answering a refusal may add to the deadline: the abort is not waited
#: for (storage is unreachable), so this is the server's own work.
MARGIN = 2.0
#: How long a test's client waits for any answer: past it, the request is stuck.
CLIENT_BOUND = DEADLINE + 10.0
TEMP = "uploads/.uploadkit-tmp/"


def cleanup_options(moto: MotoProcess) -> List[str]:
    return ["--storage-option", f"endpoint_url={moto.endpoint_url}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing",
            "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',
            "--storage-option", "skip_instance_cache=true"]


@pytest.fixture
def proxy(moto_process: MotoProcess) -> Iterator[TcpProxy]:  # noqa: F811
    p = TcpProxy(moto_process.port)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def post(port: int, progress_id: str, size: int, seed: int) -> Tuple[int, Dict[str, str], Any, str, float]:
    """POST a one-file upload; (status, headers, JSON answer, the file's sha256,
    ``time.monotonic()`` at the answer). No answer within ``CLIENT_BOUND``
    seconds of the server going silent fails the test."""
    body, ctype, digest = build_body(size, seed)
    try:
        status, headers, raw = http_post(port, f"/upload?X-Progress-ID={progress_id}", body, ctype,
                                         timeout=CLIENT_BOUND)
    except TimeoutError:
        pytest.fail(f"upload {progress_id!r}: no answer within {CLIENT_BOUND} s of the server going silent:"
                    " its request thread is stuck on storage")
    return status, headers, json.loads(raw), digest, time.monotonic()


def final_keys(moto: MotoProcess, bucket: str) -> Dict[str, int]:
    return {k: v for k, v in moto.keys(bucket, "uploads/").items() if not k.startswith(TEMP)}


# -- through gunicorn ------------------------------------------------------------------------


def test_blackholed_s3_write_is_refused_within_the_deadline_and_the_worker_goes_on(
        moto_process: MotoProcess, module_memcached: MemcachedServer, proxy: TcpProxy,  # noqa: F811
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = moto_process.create_bucket()
    # botocore's own timeouts as shipped (60 s connect and read, retried):
    # they do not cover a write that stops draining, nor the wait for a pooled connection.
    options = moto_process.options(endpoint_url=proxy.url)
    with Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads", storage_options=options,
                 memcached=module_memcached.address, workers=1, threads=1,
                 extra_env={"UPLOADKIT_CLUSTER_STORAGE_TIMEOUT": str(DEADLINE)}) as cluster:
        # The first 5 MiB part goes through; the second is cut 2 MiB in.
        proxy.blackhole(after=7 * MiB)
        status, headers, answer, _, answered_at = post(cluster.port, "cut", 24 * MiB, 1)
        assert proxy.blackholed_at is not None, "the upload never reached the blackhole"
        waited = answered_at - proxy.blackholed_at
        assert status == 503, (status, answer)
        assert answer["error"]["code"] == "storage_unavailable", answer
        assert f"no answer within {DEADLINE:g} s" in answer["error"]["message"], answer
        assert waited <= DEADLINE + MARGIN, f"refused {waited:.1f} s after the blackhole began"
        with capsys.disabled():
            print(f"\nblackholed S3: refused with 503 {waited:.2f} s after the blackhole began"
                  f" (deadline {DEADLINE:g} s)")
        final = wait_final(cluster.port, "cut")  # the worker's one thread answers: it is free
        assert final["state"] == "error" and final["status"] == 503, final
        refused_by = int(headers["x-worker-pid"])
        # Left for now (aborting needs S3 too): the multipart upload of the cut file.
        assert [u["Key"].startswith(TEMP) for u in moto_process.pending_uploads(bucket)] == [True]

        proxy.heal()
        status, headers, answer, digest, _ = post(cluster.port, "after", 12 * MiB, 2)
        assert status == 200, answer
        assert int(headers["x-worker-pid"]) == refused_by == cluster.worker_pids()[0]
        (stored,) = answer["files"]
        assert stored["sha256"] == digest

        # The background retry aborts it once S3 answers again.
        deadline = time.monotonic() + 30
        while (moto_process.pending_uploads(bucket) or moto_process.keys(bucket, TEMP)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        log_tail = cluster.log_tail()
    assert moto_process.pending_uploads(bucket) == [], log_tail
    assert moto_process.keys(bucket, TEMP) == {}, log_tail
    assert "storage is unreachable; removing it in the background" in log_tail
    # Nothing under a final key but the upload that was accepted.
    assert final_keys(moto_process, bucket) == {"uploads/" + stored["key"]: 12 * MiB}
    assert moto_process.sha256(bucket, "uploads/" + stored["key"]) == digest
    # Nothing left for the cleanup command either.
    capsys.readouterr()
    assert cli.main(["cleanup", "--storage", f"s3://{bucket}/uploads", "--older-than", "0s",
                     *cleanup_options(moto_process)]) == 0
    assert "cleanup: 0 removed, 0 failed" in capsys.readouterr().out


# -- in process, against the same servers ------------------------------------------------------


def _established_to(port: int) -> Set[int]:
    """The local ports of this host's TCP connections established *to*
    127.0.0.1:``port`` and still held by a process (a socket its owner closed
    is not one, even while its unsent bytes wait in the kernel)."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if remote_port == port and fields[3] == "01" and fields[9] != "0":
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _running(fs: Any, call: str) -> int:
    """How many bounded calls ``call`` are still running on the filesystem's loop.
    (The background retry's calls, ``rm_file`` and ``abort_mpu``, are others.)"""
    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == f"uploadkit: S3FileSystem.{call}")
    return int(fsspec.asyn.sync(fs.loop, count))


def test_a_timed_out_write_is_cancelled_and_its_connection_closed(
        moto_process: MotoProcess, proxy: TcpProxy, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    bucket = moto_process.create_bucket()
    storage = Storage(f"s3://{bucket}/uploads", timeout=DEADLINE, block_size=5 * MiB,
                      storage_options=moto_process.options(endpoint_url=proxy.url,
                                                           config_kwargs={"max_pool_connections": 1}))
    pending = storage.begin_write("cut.bin")
    proxy.blackhole(after=6 * MiB)
    with caplog.at_level(logging.WARNING, logger="uploadkit"), ThreadPoolExecutor(1) as pool:

        def write_all() -> None:
            for _ in range(16):
                pending.write(b"x" * MiB)

        job = pool.submit(write_all)
        assert proxy.wait_blackholed(30), "the write never reached the blackhole"
        (cut,) = _established_to(proxy.port)  # the pool's only connection, blackholed
        try:
            job.result(timeout=DEADLINE + MARGIN)
        except StorageUnavailable as exc:
            error = exc
        except FutureTimeout:
            proxy.heal()  # let the stuck write go, so that the pool can be shut down
            job.exception(timeout=60)
            pending.discard()
            pytest.fail(f"the write was still waiting {DEADLINE + MARGIN} s after the blackhole began")
        else:
            pytest.fail("the write went through a blackhole")
    assert isinstance(error.__cause__, DeadlineExceeded), repr(error.__cause__)
    assert time.monotonic() - proxy.blackholed_at <= DEADLINE + MARGIN
    # Cancelled, not left running on the loop thread: no call of ours is pending there.
    assert _running(storage.fs, "call_s3") == 0
    assert pending.done and not pending.committed
    assert unreachable(storage.fs)
    assert "storage is unreachable; removing it in the background" in caplog.text
    # Nor is its connection held, or back in the pool for reuse: the pool has
    # room for one, and the next call opens a new one (which the blackhole holds).
    with pytest.raises(StorageUnavailable, match="no answer within"):
        storage.exists("other.bin")
    assert _established_to(proxy.port) - {cut}, "no new connection: the cut one is still the pool's"

    proxy.heal()
    # The next call answers (storage reachable again), through the one-connection pool.
    assert storage.save(io.BytesIO(b"after"), "after.txt") == "after.txt"
    assert not unreachable(storage.fs)
    deadline = time.monotonic() + 30
    while moto_process.pending_uploads(bucket) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert moto_process.pending_uploads(bucket) == []  # aborted in the background
    assert final_keys(moto_process, bucket) == {"uploads/after.txt": 5}


@pytest.mark.parametrize("marker, drop", [(b"<CompleteMultipartUpload", True), (b"x-amz-copy-source", False)],
                         ids=["the completion, never delivered", "the copy to the final key, delivered late"])
def test_a_commit_cut_by_a_blackhole_is_refused_and_undone(
        moto_process: MotoProcess, proxy: TcpProxy, marker: bytes, drop: bool) -> None:  # noqa: F811
    bucket = moto_process.create_bucket()
    storage = Storage(f"s3://{bucket}/uploads", timeout=DEADLINE, block_size=5 * MiB,
                      storage_options=moto_process.options(endpoint_url=proxy.url))
    proxy.blackhole(on=marker)  # that request, and everything after it, is held
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(storage.save, io.BytesIO(payload(6 * MiB, 3)), "final.bin")
        try:
            job.result(timeout=30)
        except StorageUnavailable as exc:
            error = exc
        except FutureTimeout:
            proxy.heal()
            pytest.fail("the commit was still waiting 30 s after it began")
        else:
            pytest.fail("stored through a blackhole")
    assert proxy.blackholed_at is not None, "the commit never reached the blackhole"
    assert time.monotonic() - proxy.blackholed_at <= DEADLINE + MARGIN
    assert isinstance(error.__cause__, DeadlineExceeded), repr(error.__cause__)
    if drop:  # the completion never came: its multipart upload is pending
        assert len(moto_process.pending_uploads(bucket)) == 1
    # Once the network heals, the held request is lost (the multipart upload
    # must be aborted) or reaches S3 late (the copy lands under the final
    # key). Either way the background retry leaves nothing: no multipart
    # upload, no temp key, nothing under the final key.
    proxy.heal(drop=drop)
    deadline = time.monotonic() + 30
    while (moto_process.pending_uploads(bucket) or moto_process.keys(bucket, "uploads/")) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert moto_process.pending_uploads(bucket) == []
    assert moto_process.keys(bucket, "uploads/") == {}


def test_waiting_for_a_pooled_connection_has_the_deadline(moto_process: MotoProcess) -> None:  # noqa: F811
    bucket = moto_process.create_bucket()
    moto_process.client().put_object(Bucket=bucket, Key="held.bin", Body=b"h" * MiB)
    storage = Storage(f"s3://{bucket}/uploads", timeout=DEADLINE,
                      storage_options=moto_process.options(config_kwargs={"max_pool_connections": 1}))
    fs = storage.fs
    # The pool's only connection, checked out: an object body not read yet holds it.
    held = fs.call_s3("get_object", Bucket=bucket, Key="held.bin")["Body"]

    async def release() -> None:
        held.close()

    pool = ThreadPoolExecutor(1)
    released = False
    try:
        started = time.monotonic()
        job = pool.submit(storage.save, io.BytesIO(b"waits for a connection"), "wanted.txt")
        try:
            job.result(timeout=DEADLINE + MARGIN)
        except StorageUnavailable as exc:
            error = exc
        except FutureTimeout:
            pytest.fail(f"save() still waiting for a pooled connection after {DEADLINE + MARGIN} s")
        else:
            pytest.fail("save() went through while the only connection was held")
        waited = time.monotonic() - started
        assert isinstance(error.__cause__, DeadlineExceeded), repr(error.__cause__)
        assert DEADLINE <= waited <= DEADLINE + MARGIN, waited
        assert _running(fs, "call_s3") == 0  # the waiting call was cancelled
        fsspec.asyn.sync(fs.loop, release)
        released = True
    finally:
        if not released:
            fsspec.asyn.sync(fs.loop, release)
        pool.shutdown(wait=True)
    assert storage.save(io.BytesIO(b"now"), "now.txt") == "now.txt"
    deadline = time.monotonic() + 30
    while storage.temp_keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert storage.temp_keys() == []
    assert final_keys(moto_process, bucket) == {"uploads/now.txt": 3}


# -- the view itself -------------------------------------------------------------------------


class StuckFileSystem(AsyncFileSystem):
    """An asynchronous filesystem whose ``info`` does not answer until cancelled
    or ``released`` (set by the test, so that a failing test ends)."""

    protocol = "stuck"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cancelled = threading.Event()
        self.released = threading.Event()

    async def _info(self, path: str, **kwargs: Any) -> Dict[str, Any]:
        try:
            for _ in range(600):  # 30 s at most
                if self.released.is_set():
                    break
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise FileNotFoundError(path)


def test_a_call_past_its_deadline_is_cancelled_before_the_caller_is_let_go() -> None:
    fs = StuckFileSystem(skip_instance_cache=True)
    storage = Storage("stuck-root", fs=fs, timeout=0.3)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(storage.exists, "a.txt")
        try:
            with pytest.raises(StorageUnavailable,
                               match=r"storage failed to look up 'a\.txt': no answer within 0\.3 s"):
                job.result(timeout=0.3 + MARGIN)
        finally:
            fs.released.set()
    assert fs.cancelled.is_set()  # already: the refusal waited for the cancellation


def test_which_backends_get_a_deadline(tmp_path: Any, moto_process: MotoProcess) -> None:  # noqa: F811
    import s3fs

    # Synchronous backends: no view (local disk needs no deadline).
    assert type(Storage(str(tmp_path)).fs) is fsspec.implementations.local.LocalFileSystem
    memory = Storage("memory://deadline-test")
    assert type(memory.fs) is not BoundedFileSystem
    # Asynchronous ones: a view, 30 s by default, that still is what it wraps.
    s3 = Storage("s3://bucket/root", storage_options=moto_process.options())
    assert s3.timeout == 30.0 and type(s3.fs) is BoundedFileSystem and isinstance(s3.fs, s3fs.S3FileSystem)
    again = Storage(s3.root, fs=s3.fs, timeout=5)  # wraps what the first one wraps, once
    assert unbounded(again.fs) is unbounded(s3.fs) and again.fs._uk_timeout == 5.0  # type: ignore[attr-defined]
    assert type(Storage(s3.root, fs=s3.fs, timeout=None).fs) is s3fs.S3FileSystem
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            Storage(str(tmp_path), timeout=bad)
