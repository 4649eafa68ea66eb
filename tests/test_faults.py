"""Faults under load, each bounded in time: clients vanishing at random byte
offsets, memcached killed and restarted, the storage failing in the middle of
writes (a disk filling up, an S3 outage), a worker killed in the middle of an
upload (then ``uploadkit cleanup``), and stalled clients cut off by the
threaded server's inactivity timeout.

The invariant throughout: an upload is either stored whole, exactly once, or
refused with a JSON error and nothing of it left behind (what a killed worker
cannot clean up, ``uploadkit cleanup`` does).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Tuple

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.support.cluster import (KiB, MiB, REPO_ROOT, Cluster, ConnectionDropped, MotoProcess,  # noqa: F401
                                   TcpProxy, Upload, build_body, http_post, module_memcached, moto_process,
                                   payload, plan_sizes, progress_of, run_upload, send_partial, settle)
from tests.support.memcached import MemcachedServer, memcached_server  # noqa: F401
from uploadkit import cli
from uploadkit.middleware import UploadMiddleware
from uploadkit.multipart import encode_multipart
from uploadkit.progress import MemoryStore, ProgressSettings
from uploadkit.server import BackgroundServer
from uploadkit.storage import Storage

ERROR_KEYS = {"code", "message", "field", "limit"}


def error_of(up: Upload) -> Dict[str, Any]:
    assert up.answer is not None and set(up.answer) == {"error"}, up.answer
    err: Dict[str, Any] = up.answer["error"]
    assert set(err) == ERROR_KEYS, err
    return err


def check_stored(moto: MotoProcess, bucket: str, ok: List[Upload]) -> None:
    """The bucket holds exactly the accepted uploads, byte for byte."""
    keys = moto.keys(bucket, "uploads/")
    final = {k: v for k, v in keys.items() if not k.startswith("uploads/.uploadkit-tmp/")}
    answered = {"uploads/" + u.answer["files"][0]["key"]: u for u in ok}
    assert set(final) == set(answered), sorted(set(final) ^ set(answered))[:5]
    for key, u in answered.items():
        if u.index == -1:  # an orphan stand-in
            continue
        assert final[key] == u.size
        assert moto.sha256(bucket, key) == u.sha256, key


# -- clients vanishing ----------------------------------------------------------------


def test_clients_disconnecting_at_random_offsets_leave_nothing(
        moto_process: MotoProcess, module_memcached: MemcachedServer, tmp_path: Any) -> None:  # noqa: F811
    bucket = moto_process.create_bucket()
    rng = random.Random(4242)
    good = [Upload(i, s, f"ok-{i}") for i, s in enumerate(plan_sizes(60, KiB, 12 * MiB, 80 * MiB, 2, 1))]
    gone = [Upload(1000 + i, s, f"gone-{i}") for i, s in enumerate(plan_sizes(100, KiB, 12 * MiB, 150 * MiB, 3, 2))]
    paths = {u.progress_id: rng.choice(["/upload", "/upload-local"]) for u in good + gone}
    # Where each client stops, as a fraction of its body: anywhere, from the
    # first byte to the last but one (the boundary, part headers, file bytes).
    cut_at = {u.progress_id: rng.random() for u in gone}

    def vanish(port: int, up: Upload) -> Upload:
        body, ctype, up.sha256 = build_body(up.size, up.index)
        up.answer = offset = min(len(body) - 1, int(cut_at[up.progress_id] * len(body)))
        send_partial(port, f"{paths[up.progress_id]}?X-Progress-ID={up.progress_id}", body, ctype, offset)
        return up

    with Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads", storage_options=moto_process.options(),
                 memcached=module_memcached.address, workers=4, threads=4) as cluster:
        work = [(run_upload, u) for u in good] + [(vanish, u) for u in gone]
        rng.shuffle(work)
        with ThreadPoolExecutor(24) as pool:
            list(pool.map(lambda job: settle(cluster.port, job[0](cluster.port, job[1], **(
                {"path": paths[job[1].progress_id]} if job[0] is run_upload else {}))), work))
        finals = {u.progress_id: u.final for u in good + gone}
        temp_files = cluster.temp_files()
        log_tail = cluster.log_tail()

    assert [u.index for u in good if u.status != 200] == [], log_tail
    for u in good:
        assert u.answer["files"][0]["sha256"] == u.sha256
        assert finals[u.progress_id]["state"] == "done"
    for u in gone:
        final = finals[u.progress_id]
        assert final["state"] == "error", (u.index, u.answer, final)
        assert final["error"]["code"] == "client_disconnected", (u.index, u.answer, final)
    check_stored(moto_process, bucket, [u for u in good if paths[u.progress_id] == "/upload"])
    assert moto_process.temp_area_emptied(bucket) == {}
    assert moto_process.pending_uploads(bucket) == []
    assert temp_files == []


# -- memcached killed and restarted ------------------------------------------------------


def test_memcached_killed_mid_load_then_restarted(
        moto_process: MotoProcess, memcached_server: MemcachedServer, tmp_path: Any) -> None:  # noqa: F811
    bucket = moto_process.create_bucket()
    sizes = plan_sizes(120, KiB, 8 * MiB, 100 * MiB, 2, 3)
    uploads = [Upload(i, s, f"mc-{i}") for i, s in enumerate(sizes)]
    started: Dict[str, float] = {}
    answered: List[str] = []
    events: Dict[str, float] = {}
    outage_polls: List[Tuple[int, Any]] = []
    retry_after = 0.5

    with Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads", storage_options=moto_process.options(),
                 memcached=memcached_server.address, workers=4, threads=4, retry_after=retry_after) as cluster:

        def one(up: Upload) -> Upload:
            started[up.progress_id] = time.monotonic()
            run_upload(cluster.port, up)
            answered.append(up.progress_id)
            return up

        def saboteur() -> None:
            while len(answered) < 30:
                time.sleep(0.01)
            memcached_server.stop()
            events["killed"] = time.monotonic()
            for _ in range(3):
                status, _, body = http_get_status(cluster.port, "mc-0")
                outage_polls.append((status, json.loads(body)))
            while len(answered) < 60:
                time.sleep(0.01)
            memcached_server.start()
            events["restarted"] = time.monotonic()

        sab = threading.Thread(target=saboteur, daemon=True)
        sab.start()
        with ThreadPoolExecutor(12) as pool:
            done = list(pool.map(one, uploads))
        sab.join(timeout=60)
        # Later uploads: started once every worker's breaker had time to probe again.
        recovered_at = events["restarted"] + 4 * retry_after + 1.0
        later = [u for u in done if started[u.progress_id] > recovered_at]
        if len(later) < 10:  # the load ended early: send some more
            time.sleep(max(0.0, recovered_at - time.monotonic()))
            extra = [Upload(500 + i, 64 * KiB * (i + 1), f"mc-late-{i}") for i in range(12)]
            with ThreadPoolExecutor(6) as pool:
                later += list(pool.map(lambda u: run_upload(cluster.port, u), extra))
            done += later[-len(extra):]
        finals = {u.progress_id: progress_of(cluster.port, u.progress_id)["state"] for u in later}
        log_tail = cluster.log_tail()

    assert "killed" in events and "restarted" in events
    # Every upload succeeded, whatever happened to progress.
    assert [(u.index, u.status, u.error) for u in done if u.status != 200] == [], log_tail
    assert all(u.answer["files"][0]["sha256"] == u.sha256 for u in done)
    check_stored(moto_process, bucket, done)
    assert moto_process.pending_uploads(bucket) == []
    # During the outage the status route says so, as JSON.
    assert outage_polls and all(s == 503 and body["error"]["code"] == "progress_unavailable"
                                for s, body in outage_polls), outage_polls
    # After the restart progress works again: later uploads reached done in the store.
    assert len(later) >= 10
    assert set(finals.values()) == {"done"}, finals


def http_get_status(port: int, progress_id: str) -> Tuple[int, Dict[str, str], bytes]:
    from tests.support.cluster import http_get

    return http_get(port, f"/upload/progress?X-Progress-ID={progress_id}")


# -- the storage failing mid-write ----------------------------------------------------------


class FullDiskFileSystem(LocalFileSystem):
    """A local filesystem with a disk of ``capacity`` bytes: a write that would
    pass it fails with ENOSPC; removing a file frees its bytes. Reached through
    the URL protocol ``fulldisk://``."""

    protocol = "fulldisk"

    def __init__(self, capacity: int = 16 * MiB, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()
        self.refused = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        if path.startswith("fulldisk://"):
            path = path[len("fulldisk://"):]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        f = super()._open(path, mode, block_size=block_size, **kwargs)
        if "w" not in mode:
            return f
        real_write = f.write

        def write(data: bytes) -> int:
            with self.lock:
                if self.used + len(data) > self.capacity:
                    self.refused += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.used += len(data)
            return int(real_write(data))

        f.write = write
        return f

    def rm_file(self, path: str) -> None:
        size = os.path.getsize(self._strip_protocol(path))
        super().rm_file(path)
        with self.lock:
            self.used -= size


fsspec.register_implementation("fulldisk", FullDiskFileSystem, clobber=True)


def _files_app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    files = environ["uploadkit.files"]
    body = json.dumps({"files": [{"key": f.key, "size": f.size, "sha256": f.sha256}
                                 for f in files.values()]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def test_disk_filling_up_mid_write_is_503_and_leaves_nothing(tmp_path: Any) -> None:
    root = tmp_path / "disk"
    storage = Storage(f"fulldisk://{root}", storage_options={"capacity": 24 * MiB, "skip_instance_cache": True})
    fs = storage.fs
    assert isinstance(fs, FullDiskFileSystem) and not storage.local
    store = MemoryStore()
    app = UploadMiddleware(_files_app, storage=storage, progress=store,
                           progress_settings=ProgressSettings(interval=0.05))

    with BackgroundServer(app, inactivity_timeout=30) as url:
        port = int(url.rsplit(":", 1)[1])
        first = [Upload(i, MiB, f"disk-{i}") for i in range(10)]
        second = [Upload(100 + i, 256 * KiB, f"disk-s{i}") for i in range(10)]
        big = [Upload(200 + i, 30 * MiB, f"disk-big-{i}") for i in range(2)]
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda u: run_upload(port, u), first))
            mixed = second + big
            random.Random(5).shuffle(mixed)
            list(pool.map(lambda u: run_upload(port, u), mixed))
        after = run_upload(port, Upload(300, 2 * MiB, "disk-after"))

    everyone = first + second + big + [after]
    assert [u.index for u in everyone if u.status not in (200, 503)] == []
    assert all(u.status == 200 for u in first + [after])
    assert all(u.status == 503 for u in big)
    refused = [u for u in everyone if u.status == 503]
    for u in refused:
        err = error_of(u)
        assert err["code"] == "storage_unavailable" and "No space left" in err["message"], err
        final = store.get(u.progress_id)
        assert final is not None and final["state"] == "error" and final["status"] == 503
    accepted = [u for u in everyone if u.status == 200]
    assert len(accepted) >= 11
    stored = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            stored[os.path.relpath(os.path.join(dirpath, name), root)] = os.path.join(dirpath, name)
    assert set(stored) == {u.answer["files"][0]["key"] for u in accepted}, "a refused upload left a file"
    for u in accepted:
        with open(stored[u.answer["files"][0]["key"]], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == u.sha256
    assert fs.used == sum(u.size for u in accepted)  # the refused bytes were given back
    assert fs.refused >= 2


def test_s3_outage_mid_load_is_503_and_cleanup_reclaims_what_it_left(
        moto_process: MotoProcess, module_memcached: MemcachedServer, tmp_path: Any,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    bucket = moto_process.create_bucket()
    proxy = TcpProxy(moto_process.port)
    proxy.start()
    # s3fs retries a failed call for about 2 s (its own backoff, on top of
    # botocore's attempts, here 2): the outage is longer than that.
    options = moto_process.options(endpoint_url=proxy.url, config_kwargs={
        "connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2}})
    sizes = plan_sizes(100, 64 * KiB, 16 * MiB, 150 * MiB, 4, 9)
    uploads = [Upload(i, s, f"s3down-{i}") for i, s in enumerate(sizes)]
    after = [Upload(200 + i, 256 * KiB * (i + 1), f"s3after-{i}") for i in range(8)]
    answered: List[str] = []
    refused: List[str] = []
    window: List[float] = []  # when S3 went down, when it came back
    started = time.monotonic()
    try:
        with Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads", storage_options=options,
                     memcached=module_memcached.address, workers=4, threads=3) as cluster:

            def one(up: Upload) -> Upload:
                run_upload(cluster.port, up)
                answered.append(up.progress_id)
                if up.status == 503:
                    refused.append(up.progress_id)
                return settle(cluster.port, up)

            def outage() -> None:
                while len(answered) < 10:
                    time.sleep(0.01)
                proxy.cut()
                window.append(time.monotonic())
                # At least 8 s, and on a slow machine until the outage has
                # refused something (each in-flight upload touches S3 only
                # when a 5 MiB part fills or the file commits).
                cut_at = time.monotonic()
                while time.monotonic() - cut_at < 60 and len(answered) < len(uploads):
                    if time.monotonic() - cut_at >= 8 and refused:
                        break
                    time.sleep(0.05)
                proxy.restore()
                window.append(time.monotonic())

            cutter = threading.Thread(target=outage, daemon=True)
            cutter.start()
            with ThreadPoolExecutor(12) as pool:
                done = list(pool.map(one, uploads))
            cutter.join(timeout=70)
            # S3 is back: uploads go through again.
            with ThreadPoolExecutor(4) as pool:
                done += list(pool.map(lambda u: settle(cluster.port, run_upload(cluster.port, u)), after))
            finals = {u.progress_id: u.final for u in done}
            # A refused upload whose copy landed unanswered in the outage, or
            # whose commit left a multipart upload at its final key, is
            # removed by its worker once S3 answers again, in the background.
            stored = {"uploads/" + u.answer["files"][0]["key"] for u in done if u.status == 200}

            def at_final_keys() -> List[str]:
                return [u["Key"] for u in moto_process.pending_uploads(bucket)
                        if not u["Key"].startswith("uploads/.uploadkit-tmp/")]

            deadline = time.monotonic() + 30
            while (_orphans(moto_process, bucket, stored) or at_final_keys()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert at_final_keys() == [], "a commit's multipart upload outlived the background retry"
            log_tail = cluster.log_tail()
            elapsed = time.monotonic() - started
    finally:
        proxy.stop()

    assert [(u.index, u.status, u.error) for u in done if u.status not in (200, 503)] == [], log_tail
    failed = [u for u in done if u.status == 503]
    ok = [u for u in done if u.status == 200]
    assert len(window) == 2, "the outage never began or never ended"
    assert failed, "the outage refused nothing: it came too late or too short"
    assert len(ok) >= 10 and all(u.status == 200 for u in after)
    for u in failed:
        assert error_of(u)["code"] == "storage_unavailable"
        assert finals[u.progress_id]["state"] == "error"
    assert all(finals[u.progress_id]["state"] == "done" for u in ok)
    # Nothing under a final key but the accepted uploads: a refused upload
    # never leaves its file stored (see
    # test_commit_cut_between_copy_and_delete_leaves_no_orphan).
    assert _orphans(moto_process, bucket, {"uploads/" + u.answer["files"][0]["key"] for u in ok}) == [], log_tail
    check_stored(moto_process, bucket, ok)
    # What the failed uploads could not remove while S3 was down (aborting a
    # multipart upload needs S3 too) is reclaimed by the cleanup command.
    left = (len(moto_process.keys(bucket, "uploads/.uploadkit-tmp/")), len(moto_process.pending_uploads(bucket)))
    with capsys.disabled():
        print(f"\nS3 outage: {len(ok)} stored, {len(failed)} refused with 503; left behind: {left[0]} temp keys, "
              f"{left[1]} multipart uploads; S3 down for {window[1] - window[0]:.1f} s of {elapsed:.1f} s")
    capsys.readouterr()
    assert cli.main(["cleanup", "--storage", f"s3://{bucket}/uploads", "--older-than", "0s",
                     *cleanup_options(moto_process)]) == 0
    out = capsys.readouterr().out
    # The workers' background retry may still remove some of what was counted
    # (a multipart upload aborted once S3 answers again) before the command
    # gets to it: cleanup removes the rest, fails on none, and nothing is left.
    summary = re.search(r"cleanup: (\d+) removed, (\d+) failed", out)
    assert summary is not None, out
    assert int(summary.group(1)) <= sum(left) and summary.group(2) == "0", out
    assert moto_process.temp_area_emptied(bucket) == {}
    assert moto_process.pending_uploads(bucket) == []
    check_stored(moto_process, bucket, ok)


def _orphans(moto: MotoProcess, bucket: str, stored: set) -> List[str]:
    """Keys under the final prefix that no accepted upload answered with."""
    return sorted(set(k for k in moto.keys(bucket, "uploads/") if "/.uploadkit-tmp/" not in k) - stored)


class ObjectStoreLikeFileSystem(LocalFileSystem):
    """A local filesystem that moves the way object stores do (copy, then
    delete) and whose deletes in the temp area fail while ``down`` is set: the
    instant an S3 outage begins between the two halves of a move."""

    protocol = "copydel"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.down = False

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path, prefix = str(path), f"{cls.protocol}://"
        return LocalFileSystem._strip_protocol(path[len(prefix):] if path.startswith(prefix) else path)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: Any = None, **kwargs: Any) -> None:
        self.cp_file(path1, path2)
        self.rm_file(path1)

    def rm_file(self, path: Any) -> None:
        if self.down and "/.uploadkit-tmp/" in str(path):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        super().rm_file(path)


fsspec.register_implementation("copydel", ObjectStoreLikeFileSystem, clobber=True)


def _final_keys(root: Any) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                  if ".uploadkit-tmp" not in d)


def test_commit_cut_between_copy_and_delete_leaves_no_orphan(tmp_path: Any) -> None:
    """Either the upload is stored (200, once, the leftover temp key left to
    ``uploadkit cleanup``) or refused (503) with no final key: never a refused
    upload whose file is stored anyway."""
    root = tmp_path / "store"
    storage = Storage(f"copydel://{root}", storage_options={"skip_instance_cache": True}, object_store=True)
    assert isinstance(storage.fs, ObjectStoreLikeFileSystem) and not storage.local
    storage.fs.down = True
    app = UploadMiddleware(_files_app, storage=storage, progress=False)
    body, ctype, digest = build_body(100 * KiB, 11)
    status, raw = wsgi_call(app, {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_TYPE": ctype,
                                  "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)})
    finals = _final_keys(root)
    if status == 200:
        (key,) = [f["key"] for f in json.loads(raw)["files"]]
        assert finals == [key]
        with open(root / key, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    else:
        assert status == 503 and json.loads(raw)["error"]["code"] == "storage_unavailable"
        assert finals == [], f"a refused upload is stored anyway: {finals}"


class UnansweredCopyFileSystem(ObjectStoreLikeFileSystem):
    """An object store going down mid-commit: each copy follows ``plan`` (``ok``;
    ``lost``: it lands but its answer never comes; ``refused``: it does not
    land), and while ``down`` is set every delete fails."""

    protocol = "unanswered"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan: List[str] = []

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "refused":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        super().cp_file(path1, path2, **kwargs)
        if step == "lost":
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    def rm_file(self, path: Any) -> None:
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        LocalFileSystem.rm_file(self, path)


fsspec.register_implementation("unanswered", UnansweredCopyFileSystem, clobber=True)


@pytest.mark.parametrize("plan, files", [(["lost"], 1), (["ok", "refused"], 2)],
                         ids=["a copy that landed unanswered", "a file committed before the refusal"])
def test_what_a_refused_upload_left_in_an_outage_goes_once_storage_is_back(
        tmp_path: Any, caplog: pytest.LogCaptureFixture, plan: List[str], files: int) -> None:
    """The refusal cannot undo its commit while the store is down; the delete is
    retried in the background and lands once the store answers again."""
    root = tmp_path / "store"
    storage = Storage(f"unanswered://{root}", storage_options={"skip_instance_cache": True}, object_store=True)
    fs = storage.fs
    assert isinstance(fs, UnansweredCopyFileSystem)
    fs.plan, fs.down = list(plan), True
    app = UploadMiddleware(_files_app, storage=storage, progress=False)
    body, ctype = encode_multipart([], [(f"f{i}", f"f{i}.bin", "application/octet-stream", payload(50 * KiB, i))
                                        for i in range(files)])
    with caplog.at_level(logging.INFO, logger="uploadkit"):
        status, raw = wsgi_call(app, {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_TYPE": ctype,
                                      "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)})
        assert status == 503 and json.loads(raw)["error"]["code"] == "storage_unavailable"
        assert len(_final_keys(root)) == 1, "the outage should have left one file under a final key"
        assert "retrying in the background" in caplog.text
        fs.down = False
        deadline = time.monotonic() + 10
        while _final_keys(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _final_keys(root) == []
        while "which a refused upload left" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "which a refused upload left while storage was down" in caplog.text


def wsgi_call(app: Any, environ: Dict[str, Any]) -> Tuple[int, bytes]:
    """Call a WSGI app in-process: (status, body); the response is closed."""
    seen: List[str] = []
    result = app(environ, lambda status, headers, exc_info=None: seen.append(status))
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return int(seen[0].split()[0]), body


def cleanup_options(moto: MotoProcess) -> List[str]:
    return ["--storage-option", f"endpoint_url={moto.endpoint_url}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing",
            "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',
            "--storage-option", "skip_instance_cache=true"]


# -- a worker killed mid-upload -----------------------------------------------------------------


def _start_and_stall(cluster: Cluster, moto: MotoProcess, bucket: str, path: str, progress_id: str,
                     size: int, sent: int) -> Tuple[socket.socket, int]:
    """Send the headers and ``sent`` bytes of a ``size`` upload; return the socket
    once the serving worker has written them (temp file, or S3 parts), and that
    worker's PID.

    Progress cannot tell: its writes are throttled, and the last one before a
    stall may be skipped, so the test looks at what the worker wrote instead.
    """
    body, ctype, _ = build_body(size, len(progress_id))
    head = (f"POST {path}?X-Progress-ID={progress_id} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", cluster.port), timeout=30)
    try:
        s.sendall(head + body[:sent])
        pid = cluster.serving_pid(progress_id)
        deadline = time.monotonic() + 30

        def written() -> bool:
            if path == "/upload-local":
                return sum(os.path.getsize(os.path.join(cluster.tempdir, n))
                           for n in cluster.temp_files()) >= sent - 2 * MiB
            client = moto.client()
            for up in moto.pending_uploads(bucket):
                parts = client.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                if len(parts.get("Parts", [])) >= 2:
                    return True
            return False

        while not written():
            assert time.monotonic() < deadline, "the worker did not write the body"
            time.sleep(0.05)
    except BaseException:
        s.close()
        raise
    return s, pid


def test_worker_killed_mid_upload_leftovers_reclaimed_by_cleanup(
        moto_process: MotoProcess, module_memcached: MemcachedServer, tmp_path: Any,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    bucket = moto_process.create_bucket()
    storage_args = ["--storage", f"s3://{bucket}/uploads", *cleanup_options(moto_process)]
    with Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads", storage_options=moto_process.options(),
                 memcached=module_memcached.address, workers=2, threads=4) as cluster:
        killed = []
        for path, pid_name in (("/upload-local", "kill-local"), ("/upload", "kill-s3")):
            s, pid = _start_and_stall(cluster, moto_process, bucket, path, pid_name, 40 * MiB, 16 * MiB)
            with s:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                s.settimeout(10)
                try:
                    answer = s.recv(1024)
                except ConnectionResetError:
                    answer = b""
                assert answer == b"", answer  # the connection dropped, no answer
        # Nobody is left to end their progress: it reads "uploading" until its
        # last write is ProgressSettings.stale_after old (30 s), then "error".
        assert progress_of(cluster.port, "kill-local")["state"] == "uploading"
        assert progress_of(cluster.port, "kill-s3")["state"] == "uploading"
        # The cluster goes on: gunicorn replaced the workers.
        up = run_upload(cluster.port, Upload(1, 3 * MiB, "after-kill"))
        assert up.status == 200 and up.worker not in killed
        tempdir = cluster.tempdir
        leftovers = [n for n in cluster.temp_files() if n.startswith("uploadkit-")]
        # A killed worker runs no cleanup: its temp file and its multipart upload remain.
        assert len(leftovers) == 1 and leftovers[0].endswith(".part"), cluster.temp_files()
        assert len(moto_process.pending_uploads(bucket)) == 1

        capsys.readouterr()
        # Younger than the age given: kept.
        assert cli.main(["cleanup", "--tempdir", tempdir, *storage_args, "--older-than", "1h"]) == 0
        assert "cleanup: 0 removed, 0 failed (older than 1.0 h)" in capsys.readouterr().out
        # A dry run lists them and removes nothing.
        assert cli.main(["cleanup", "--tempdir", tempdir, *storage_args, "--older-than", "0s", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"would remove temp-file {os.path.join(tempdir, leftovers[0])}" in out
        assert f"would remove multipart-upload {bucket}/uploads/.uploadkit-tmp/" in out
        assert "cleanup: 2 to remove" in out
        assert cluster.temp_files() == leftovers and len(moto_process.pending_uploads(bucket)) == 1
        # The real thing, through the console entry point.
        run = subprocess.run([sys.executable, "-m", "uploadkit.cli", "cleanup", "--tempdir", tempdir,
                              *storage_args, "--older-than", "0s"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "removed temp-file" in run.stdout and "removed multipart-upload" in run.stdout
        assert "cleanup: 2 removed, 0 failed" in run.stdout, run.stdout
        assert cluster.temp_files() == []
        assert moto_process.pending_uploads(bucket) == []
        # Never a finished file: what cleanup touches is only what was left.
        assert set(moto_process.keys(bucket, "uploads/")) == {"uploads/" + up.answer["files"][0]["key"]}


# -- stalled clients on uploadkit's own server ------------------------------------------------------


@pytest.fixture
def timeout_server(tmp_path: Any) -> Iterator[Tuple[int, str, MemoryStore]]:
    tempdir = str(tmp_path / "tmp")
    os.makedirs(tempdir)
    store = MemoryStore()
    app = UploadMiddleware(_files_app, tempdir=tempdir, memory_threshold=0, progress=store)
    with BackgroundServer(app, inactivity_timeout=0.5) as url:
        yield int(url.rsplit(":", 1)[1]), tempdir, store


def test_stalled_client_is_cut_off_after_the_inactivity_timeout(
        timeout_server: Tuple[int, str, MemoryStore]) -> None:
    port, tempdir, store = timeout_server
    body, ctype, _ = build_body(3 * MiB, 77)
    head = (f"POST /upload?X-Progress-ID=stall HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body[:int(1.5 * MiB)])  # more than one read: the first is processed
        deadline = time.monotonic() + 5
        while not os.listdir(tempdir):  # the temp file exists: the upload is under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        s.settimeout(0.05)
        answer = b""
        # A byte a second: far slower than the timeout allows.
        while time.monotonic() - t0 < 8:
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                if int((time.monotonic() - t0) * 20) % 20 == 0:
                    try:
                        s.send(b"x")
                    except OSError:
                        break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        cut_after = time.monotonic() - t0
    assert cut_after < 3.0, cut_after
    status = int(answer.split(b" ", 2)[1])
    payload = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert status == 400 and payload["error"]["code"] == "client_disconnected", payload
    assert set(payload["error"]) == ERROR_KEYS
    assert os.listdir(tempdir) == []
    final = store.get("stall")
    assert final is not None and final["state"] == "error"


def test_slow_but_steady_client_is_not_cut_off(timeout_server: Tuple[int, str, MemoryStore]) -> None:
    port, tempdir, _ = timeout_server
    body, ctype, digest = build_body(200 * KiB, 78)
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        step = len(body) // 10 + 1
        for i in range(0, len(body), step):  # 10 pieces, 0.2 s apart: slow, never silent 0.5 s
            s.sendall(body[i:i + step])
            time.sleep(0.2)
        raw = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            raw += data
    payload = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert raw.startswith(b"HTTP/1.0 200") or raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert payload["files"][0]["sha256"] == digest
    assert os.listdir(tempdir) == []


def test_silent_connection_is_closed_before_its_headers(timeout_server: Tuple[int, str, MemoryStore]) -> None:
    port, _, _ = timeout_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        t0 = time.monotonic()
        try:
            data = s.recv(1024)
        except ConnectionResetError:
            data = b""
        assert data == b"" and time.monotonic() - t0 < 3.0
