"""One behaviour suite for uploadkit.storage, run against three backends:
a local directory, fsspec's memory filesystem (a unique root per test), and S3
through s3fs against a real moto server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import resource
import signal
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from uploadkit.errors import (BadKey, ClientDisconnected, FileExists, FileTooLarge, QuotaExceeded,
                              StorageUnavailable)
from uploadkit.files import FileInfo, UploadedFile
from uploadkit.handlers import HashingHandler, SniffingHandler, UploadHandler
from uploadkit.limits import Limits
from uploadkit.pipeline import Pipeline, RequestContext
from uploadkit.storage import PendingWrite, Storage, check_key, thumbnail_key
from tests.support.s3 import S3Server, free_port, s3_bucket, s3_server  # noqa: F401

MiB = 1024 * 1024
S3_BLOCK = 5 * MiB  # s3fs's minimum: a 12 MiB file is a three-part multipart upload
BIG = 12 * MiB


# -- backends -------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    make: Callable[..., Storage]
    #: every object under the storage root, temp area included
    everything: Callable[[], List[str]]
    #: multipart uploads started and never completed or aborted (S3 only)
    pending_uploads: Callable[[], List[Any]]


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    if request.param == "local":
        root = tmp_path / "media"

        def everything() -> List[str]:
            return sorted(os.path.relpath(os.path.join(d, f), root)
                          for d, _, files in os.walk(root) for f in files)

        return Backend("local", lambda **kw: Storage(str(root), **kw), everything, lambda: [])
    if request.param == "memory":
        url = f"memory://uk-{uuid.uuid4().hex}/media"
        fs = fsspec.filesystem("memory")
        prefix = url[len("memory:/"):]

        def everything_mem() -> List[str]:
            try:
                return sorted(p[len(prefix) + 1:] for p in fs.find(prefix))
            except FileNotFoundError:
                return []

        return Backend("memory", lambda **kw: Storage(url, **kw), everything_mem, lambda: [])
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")

    def make_s3(**kw: Any) -> Storage:
        kw.setdefault("block_size", S3_BLOCK)
        return Storage(f"s3://{bucket}/media", storage_options=server.options(), **kw)

    def everything_s3() -> List[str]:
        return [k[len("media/"):] for k in server.keys(bucket)]

    return Backend("s3", make_s3, everything_s3, lambda: server.pending_uploads(bucket))


def chain(storage: Storage, *before: UploadHandler, md5: bool = False) -> List[UploadHandler]:
    return [SniffingHandler(), HashingHandler(md5=md5), *before, storage.handler()]


def upload(storage: Storage, files: List[tuple], *, limits: Limits = Limits(),
           before: tuple = (), md5: bool = False, finish: bool = True,
           chunk: int = 256 * 1024) -> Pipeline:
    """Drive a pipeline with (field, filename, data) files; abort it on refusal.

    With ``finish`` the pipeline is also closed, as the middleware closes it
    once the response is sent: only then do commits leave no temp key behind."""
    p = Pipeline(chain(storage, *before, md5=md5), RequestContext(limits=limits, environ={}))
    try:
        p.start()
        for field, filename, data in files:
            p.start_file(field, filename, "")
            for i in range(0, len(data), chunk):
                p.feed(data[i:i + chunk])
            p.end_file()
        if finish:
            p.finish()
    except BaseException as exc:
        p.abort(exc)
        raise
    if finish:
        p.close()
    return p


def read_key(storage: Storage, key: Optional[str]) -> bytes:
    assert key is not None
    with storage.open(key) as f:
        return f.read()


def data_of(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


# -- streaming and the deferred commit ------------------------------------------------------


def test_file_is_written_while_streaming_and_visible_only_after_request_end(backend: Backend) -> None:
    storage = backend.make(base_url="/media/")
    data = data_of(BIG)
    p = upload(storage, [("photo", "Holiday.JPG", data)], finish=False)
    (f,) = p.ctx.files
    assert f.key is not None and f.key.endswith(".jpg")
    assert f.size == len(data)
    # Written, but only under the temp area until the whole request is accepted.
    assert not storage.exists(f.key)
    assert len(storage.temp_keys()) == 1
    assert all(k.startswith(".uploadkit-tmp/") for k in backend.everything())
    p.finish()
    # Large files are hashed on a worker thread; the digest is final by the
    # end of the request, before the app sees the file.
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.exists(f.key)
    if storage.object_store:
        # A copy, then the temp key's delete once the response is sent (close):
        # the client hears of its file one S3 round trip sooner.
        assert len(storage.temp_keys()) == 1
        p.close()
    assert storage.temp_keys() == []
    assert backend.everything() == [f.key]
    assert f.read() == data
    assert storage.size(f.key) == len(data)
    assert f.url == "/media/" + f.key
    if backend.name == "local":
        assert f.path == os.path.join(storage.root, f.key)
        with open(f.path, "rb") as fh:
            assert fh.read(100) == data[:100]
    else:
        assert f.path is None
    assert backend.pending_uploads() == []


def test_several_files_and_empty_file(backend: Backend) -> None:
    storage = backend.make(upload_to="{field}/{filename}")
    files = [("a", "one.txt", b"first"), ("b", "empty.bin", b""), ("c", "three.dat", data_of(300_000, 3))]
    p = upload(storage, files)
    assert [f.key for f in p.ctx.files] == ["a/one.txt", "b/empty.bin", "c/three.dat"]
    for f, (_, _, data) in zip(p.ctx.files, files):
        assert f.read() == data
        assert storage.size(f.key) == len(data)
    assert sorted(backend.everything()) == ["a/one.txt", "b/empty.bin", "c/three.dat"]


def test_template_fields(backend: Backend) -> None:
    storage = backend.make(upload_to="{field}/{date:%Y}/{stem}-{sha256:.12}-{md5:.6}{ext}")
    data = b"\x89PNG\r\n\x1a\n" + b"x" * 100
    p = upload(storage, [("pics", "Ma Photo.PNG", data)], md5=True)
    (f,) = p.ctx.files
    year = __import__("datetime").datetime.now(__import__("datetime").timezone.utc).strftime("%Y")
    assert f.key == (f"pics/{year}/Ma Photo-{hashlib.sha256(data).hexdigest()[:12]}"
                     f"-{hashlib.md5(data).hexdigest()[:6]}.png")
    assert storage.exists(f.key)


def test_callable_upload_to_and_its_bad_keys_are_refused(backend: Backend) -> None:
    seen: List[Any] = []

    def name(info: FileInfo, environ: Optional[Dict[str, Any]]) -> str:
        seen.append(environ)
        return f"by-field/{info.field_name}/{info.sha256[:8]}.bin"

    storage = backend.make(upload_to=name)
    p = upload(storage, [("doc", "x", b"hello")])
    assert p.ctx.files[0].key == f"by-field/doc/{hashlib.sha256(b'hello').hexdigest()[:8]}.bin"
    assert seen == [{}]

    for bad in ["../escape.bin", "/etc/passwd", "a//b", "a\\b", "ok/../../x", ".uploadkit-tmp/x", "a\x00b", ""]:
        evil = backend.make(upload_to=lambda info, env, bad=bad: bad)
        before = backend.everything()
        with pytest.raises(BadKey):
            upload(evil, [("doc", "x", data_of(100_000))])
        assert backend.everything() == before, bad
    assert backend.pending_uploads() == []


def test_check_key_table() -> None:
    assert check_key("a/b/c.jpg") == "a/b/c.jpg"
    assert check_key("e\u0301t\u00e9.txt") == "\u00e9t\u00e9.txt"  # NFC
    for bad in ["", "/abs", "a/", "a//b", "..", "a/../b", "./a", "a\\b", "a\nb", "a\x7fb",
                ".hidden", "d/.git/config", "x" * 256, "a/" * 600 + "b"]:
        with pytest.raises(BadKey):
            check_key(bad)
    with pytest.raises(ValueError):  # BadKey is a ValueError too
        check_key("../x")


def test_bad_configuration_is_refused_early(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="unknown field"):
        Storage(str(tmp_path), upload_to="{name}{ext}")
    with pytest.raises(ValueError, match="collision"):
        Storage(str(tmp_path), collision="replace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sha256"):
        Storage(str(tmp_path), collision="dedup", upload_to="{uuid}")
    assert Storage(str(tmp_path), collision="dedup", dedup_hash="md5").required_hashes == {"md5"}
    assert Storage(str(tmp_path)).required_hashes == frozenset()


def test_missing_hash_is_a_clear_configuration_error(backend: Backend) -> None:
    storage = backend.make(upload_to="{md5}{ext}")
    with pytest.raises(RuntimeError, match=r"HashingHandler\(md5=True\)"):
        upload(storage, [("f", "a.txt", b"abc")])  # md5 not enabled
    assert backend.everything() == []


# -- collisions -------------------------------------------------------------------------------


def test_rename_keeps_both_files(backend: Backend) -> None:
    storage = backend.make(upload_to="docs/{filename}")
    first = upload(storage, [("f", "report.pdf", b"one")]).ctx.files[0]
    second = upload(storage, [("f", "report.pdf", b"two")]).ctx.files[0]
    assert first.key == "docs/report.pdf"
    assert re.fullmatch(r"docs/report_[A-Za-z0-9]{7}\.pdf", second.key or "")
    assert read_key(storage, first.key) == b"one"
    assert second.read() == b"two"
    if backend.name == "local":
        assert second.path == os.path.join(storage.root, "docs", os.path.basename(second.key))


def test_error_collision_refuses_before_and_at_commit(backend: Backend) -> None:
    storage = backend.make(upload_to="{filename}", collision="error")
    upload(storage, [("f", "taken.txt", b"original")])
    # Known key: refused at the file's start, before its bytes are stored.
    with pytest.raises(FileExists) as info:
        upload(storage, [("f", "free.txt", b"fine"), ("f", "taken.txt", data_of(BIG))])
    assert info.value.status == 409 and info.value.field == "f"
    assert backend.everything() == ["taken.txt"]
    assert read_key(storage, "taken.txt") == b"original"
    # Key known only at commit (content-addressed template): refused there.
    late = backend.make(upload_to="{sha256}.txt", collision="error")
    upload(late, [("f", "x", b"same")])
    with pytest.raises(FileExists):
        upload(late, [("f", "x", b"same")])
    assert late.temp_keys() == []
    assert backend.pending_uploads() == []


def test_overwrite_replaces(backend: Backend) -> None:
    storage = backend.make(upload_to="{filename}", collision="overwrite")
    upload(storage, [("f", "a.txt", b"old")])
    f = upload(storage, [("f", "a.txt", b"new content")]).ctx.files[0]
    assert f.key == "a.txt" and f.read() == b"new content"
    assert backend.everything() == ["a.txt"]


def test_dedup_stores_equal_bytes_once(backend: Backend) -> None:
    storage = backend.make(collision="dedup")
    data = data_of(BIG, 7)
    a = upload(storage, [("f", "a.bin", data)]).ctx.files[0]
    b = upload(storage, [("f", "a.bin", data)]).ctx.files[0]
    c = upload(storage, [("f", "c.bin", b"other bytes")]).ctx.files[0]
    assert a.key == b.key == hashlib.sha256(data).hexdigest() + ".bin"
    assert (a.deduplicated, b.deduplicated, c.deduplicated) == (False, True, False)
    assert b.read() == data
    assert sorted(backend.everything()) == sorted([a.key, c.key])
    assert backend.pending_uploads() == []


def test_dedup_with_md5(backend: Backend) -> None:
    storage = backend.make(collision="dedup", dedup_hash="md5", upload_to="cas/{md5:.2}/{md5}")
    a = upload(storage, [("f", "a", b"payload")], md5=True).ctx.files[0]
    b = upload(storage, [("f", "b", b"payload")], md5=True).ctx.files[0]
    digest = hashlib.md5(b"payload").hexdigest()
    assert a.key == b.key == f"cas/{digest[:2]}/{digest}"
    assert b.deduplicated and not a.deduplicated
    assert backend.everything() == [a.key]


def test_concurrent_same_name_rename_loses_nothing(backend: Backend) -> None:
    storage = backend.make(upload_to="same/{filename}")
    n = 6
    results: Dict[int, UploadedFile] = {}
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = upload(storage, [("f", "same.txt", f"content {i}".encode() * 1000)]).ctx.files[0]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    keys = {f.key for f in results.values()}
    assert len(keys) == n and "same/same.txt" in keys
    for i, f in results.items():
        assert read_key(storage, f.key) == f"content {i}".encode() * 1000
    assert sorted(backend.everything()) == sorted(keys)


def test_concurrent_same_bytes_dedup_stores_once(backend: Backend) -> None:
    storage = backend.make(collision="dedup")
    data = data_of(400_000, 9)
    results: List[UploadedFile] = []
    errors: List[BaseException] = []

    def worker() -> None:
        try:
            results.append(upload(storage, [("f", "x.bin", data)]).ctx.files[0])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    key = hashlib.sha256(data).hexdigest() + ".bin"
    assert {f.key for f in results} == {key}
    assert sum(not f.deduplicated for f in results) == 1
    assert backend.everything() == [key]
    assert read_key(storage, key) == data


# -- abort paths: nothing remains ---------------------------------------------------------------


class FailOnChunk(UploadHandler):
    """A handler before the sink that breaks on its ``n``-th chunk."""

    def __init__(self, n: int, exc: BaseException) -> None:
        self.n = n
        self.exc = exc
        self.seen = 0

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.seen += 1
        if self.seen == self.n:
            raise self.exc
        return chunk


class RefuseAtEnd(UploadHandler):
    def request_end(self, ctx: RequestContext) -> None:
        raise QuotaExceeded("refused after the last byte")


def assert_nothing_left(backend: Backend, storage: Storage, before: List[str]) -> None:
    assert backend.everything() == before
    assert storage.temp_keys() == []
    assert backend.pending_uploads() == []


def test_abort_on_file_too_large_mid_file(backend: Backend) -> None:
    storage = backend.make()
    upload(storage, [("f", "kept.txt", b"kept")])
    before = backend.everything()
    with pytest.raises(FileTooLarge):
        upload(storage, [("f", "ok.txt", b"small"), ("f", "big.bin", data_of(BIG))],
               limits=Limits(max_file_size=11 * MiB), chunk=1 * MiB)
    assert_nothing_left(backend, storage, before)


def test_abort_on_client_disconnect_mid_file(backend: Backend) -> None:
    storage = backend.make()
    p = Pipeline(chain(storage), RequestContext(limits=Limits()))
    p.start()
    p.start_file("f", "a.bin")
    data = data_of(BIG)
    for i in range(0, 11 * MiB, MiB):
        p.feed(data[i:i + MiB])
    if backend.name == "s3":  # the multipart upload really started
        assert len(backend.pending_uploads()) == 1
    p.abort(ClientDisconnected("the client went away after 11 MiB"))
    assert_nothing_left(backend, storage, [])


def test_abort_on_handler_error_mid_file(backend: Backend) -> None:
    storage = backend.make()
    with pytest.raises(RuntimeError, match="boom"):
        upload(storage, [("f", "a.bin", data_of(BIG))], before=(FailOnChunk(11, RuntimeError("boom")),),
               chunk=MiB)
    assert_nothing_left(backend, storage, [])


def test_refusal_after_last_byte_discards_every_file(backend: Backend) -> None:
    storage = backend.make()
    with pytest.raises(QuotaExceeded):
        upload(storage, [("f", "a.bin", data_of(BIG)), ("g", "b.txt", b"b")], before=(RefuseAtEnd(),))
    assert_nothing_left(backend, storage, [])


def test_failed_commit_rolls_back_files_already_committed(backend: Backend) -> None:
    storage = backend.make(upload_to="{sha256:.16}{ext}", collision="error")
    upload(storage, [("f", "x.txt", b"taken")])
    before = backend.everything()
    with pytest.raises(FileExists):
        upload(storage, [("f", "new.txt", b"fresh"), ("f", "x.txt", b"taken")])
    assert_nothing_left(backend, storage, before)


def test_skipped_file_leaves_nothing(backend: Backend) -> None:
    from uploadkit.handlers import SKIP

    class SkipText(UploadHandler):
        def file_start(self, info: FileInfo) -> Any:
            return SKIP if info.filename.endswith(".txt") else None

    storage = backend.make(upload_to="{filename}")
    p = upload(storage, [("f", "skip.txt", b"x" * 20000), ("f", "keep.bin", b"y" * 20000)],
               before=(SkipText(),))
    assert [f.key for f in p.ctx.files] == ["keep.bin"]
    assert backend.everything() == ["keep.bin"]


# -- the Storage API --------------------------------------------------------------------------------


def test_save_streams_with_naming_and_collisions(backend: Backend) -> None:
    storage = backend.make(upload_to="saved/{stem}{ext}")
    key = storage.save(io.BytesIO(b"abc" * 1000), filename="../../Evil Name.TXT")
    assert key == "saved/Evil Name.txt"
    again = storage.save(io.BytesIO(b"second"), filename="Evil Name.TXT")
    assert again != key and again.startswith("saved/Evil Name_")
    assert read_key(storage, again) == b"second"
    explicit = storage.save(io.BytesIO(b"z"), "chosen/key.bin")
    assert explicit == "chosen/key.bin"
    with pytest.raises(FileExists):
        storage.save(io.BytesIO(b"z2"), "chosen/key.bin", collision="error")
    dedup = backend.make(collision="dedup")
    k1 = dedup.save(io.BytesIO(b"same"), filename="a.bin")
    k2 = dedup.save(io.BytesIO(b"same"), filename="b.bin")
    assert k1 == k2 == hashlib.sha256(b"same").hexdigest() + ".bin"
    assert storage.temp_keys() == []


def test_begin_write_deferred_commit(backend: Backend) -> None:
    storage = backend.make()
    w = storage.begin_write("thumbs/a.150x150.jpg")
    assert isinstance(w, PendingWrite)
    w.write(b"part one,")
    w.write(b" part two")
    assert not storage.exists("thumbs/a.150x150.jpg")
    assert w.commit() == "thumbs/a.150x150.jpg"
    assert read_key(storage, "thumbs/a.150x150.jpg") == b"part one, part two"
    # Same key again: the storage's rename policy applies, or the one given.
    w2 = storage.begin_write("thumbs/a.150x150.jpg")
    w2.write(b"2")
    assert w2.commit() != "thumbs/a.150x150.jpg"
    w3 = storage.begin_write("thumbs/a.150x150.jpg", collision="overwrite")
    w3.write(b"3")
    assert w3.commit() == "thumbs/a.150x150.jpg"
    assert read_key(storage, "thumbs/a.150x150.jpg") == b"3"
    # Discarded, and context-managed with an exception: nothing remains.
    w4 = storage.begin_write("gone.bin")
    w4.write(data_of(BIG))
    w4.discard()
    w4.discard()  # idempotent
    with pytest.raises(ValueError):
        w4.write(b"late")
    with pytest.raises(KeyError):
        with storage.begin_write("gone2.bin") as w5:
            w5.write(data_of(BIG))
            raise KeyError("caller failed")
    with storage.begin_write() as w6:  # key given late
        w6.write(b"late key")
        w6.commit("late/key.txt")
    assert not storage.exists("gone.bin") and not storage.exists("gone2.bin")
    assert read_key(storage, "late/key.txt") == b"late key"
    assert storage.temp_keys() == []
    assert backend.pending_uploads() == []
    with pytest.raises(BadKey):
        storage.begin_write("../x")


def test_open_exists_size_info_url(backend: Backend) -> None:
    storage = backend.make(base_url="https://cdn.example.com/u")
    key = storage.save(io.BytesIO(b"<svg/>"), "dir/a b#?.svg")
    assert storage.exists(key) and not storage.exists("dir/nope.svg")
    assert not storage.exists("dir")  # a directory is not a stored file
    meta = storage.info(key)
    assert (meta.key, meta.size, meta.content_type) == (key, 6, "image/svg+xml")
    assert meta.etag.startswith('"') and meta.mtime is not None
    assert storage.url(key) == "https://cdn.example.com/u/dir/a%20b%23%3F.svg"
    with storage.open(key) as f:
        assert f.read() == b"<svg/>"
    with pytest.raises(FileNotFoundError):
        storage.open("dir/nope.svg")
    with pytest.raises(FileNotFoundError):
        storage.info("dir/nope.svg")
    with pytest.raises(ValueError):
        storage.open(key, "wb")
    for bad in ["../x", "/etc/passwd", ".uploadkit-tmp"]:
        with pytest.raises(BadKey):
            storage.open(bad)
        with pytest.raises(BadKey):
            storage.exists(bad)
        with pytest.raises(BadKey):
            storage.delete(bad)
    assert backend.make().url(key) is None


def test_thumbnail_keys_and_delete_removes_them(backend: Backend) -> None:
    assert thumbnail_key("a1b2.jpg", 150, 150) == "a1b2.150x150.jpg"
    assert thumbnail_key("p/a1b2.jpg", 64, 32, ext="webp") == "p/a1b2.64x32.webp"
    assert thumbnail_key("noext", 10, 10) == "noext.10x10"
    storage = backend.make()
    for key in ["p/a1b2.jpg", "p/a1b2.150x150.jpg", "p/a1b2.64x32.webp", "p/a1b2x.150x150.jpg",
                "p/other.jpg", "p/other.150x150.jpg"]:
        storage.save(io.BytesIO(key.encode()), key)
    assert storage.thumbnail_key("p/a1b2.jpg", 150, 150) == "p/a1b2.150x150.jpg"
    assert storage.thumbnails_of("p/a1b2.jpg") == ["p/a1b2.150x150.jpg", "p/a1b2.64x32.webp"]
    storage.delete("p/a1b2.jpg")
    assert sorted(backend.everything()) == ["p/a1b2x.150x150.jpg", "p/other.150x150.jpg", "p/other.jpg"]
    with pytest.raises(FileNotFoundError):
        storage.delete("p/a1b2.jpg")


# -- storage failures: 503, nothing left ------------------------------------------------------------


class FullFileSystem(LocalFileSystem):
    """A local filesystem whose files fail with ENOSPC past ``capacity`` bytes."""

    capacity = 3 * MiB

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        f = super()._open(path, mode, block_size=block_size, **kwargs)
        if "w" not in mode:
            return f
        capacity = self.capacity
        written = [0]
        real_write = f.write

        def write(data: bytes) -> int:
            written[0] += len(data)
            if written[0] > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return int(real_write(data))

        f.write = write
        return f


def test_disk_full_through_an_fsspec_filesystem(tmp_path: Any) -> None:
    fs = FullFileSystem(skip_instance_cache=True)
    storage = Storage(str(tmp_path / "full"), fs=fs)
    with pytest.raises(StorageUnavailable) as info:
        upload(storage, [("f", "a.bin", data_of(BIG))])
    assert info.value.status == 503
    assert "failed to write" in info.value.message and "No space left" in info.value.message
    assert str(tmp_path) not in info.value.message  # no server paths in client errors
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []


def test_local_write_failure_from_the_os(tmp_path: Any) -> None:
    """The local fast path under a real OS limit: writes past 2 MiB fail with EFBIG."""
    storage = Storage(str(tmp_path / "media"))
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, old_limit[1]))
    try:
        with pytest.raises(StorageUnavailable) as info:
            upload(storage, [("f", "a.bin", data_of(4 * MiB))])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "failed to write" in info.value.message
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []


def test_s3_unreachable_is_503() -> None:
    port = free_port()  # nothing listens there
    storage = Storage("s3://nowhere/media", block_size=S3_BLOCK, storage_options={
        "key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}",
        "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageUnavailable, match="failed to write"):
        upload(storage, [("f", "a.bin", b"small file")])
    with pytest.raises(StorageUnavailable, match="failed to look up"):
        storage.exists("a.bin")


def test_failed_commit_without_hard_links_leaves_no_empty_file(tmp_path: Any, monkeypatch: Any) -> None:
    import errno as _errno

    storage = Storage(str(tmp_path / "root"))

    def no_link(src: str, dst: str) -> None:
        raise OSError(_errno.EPERM, "hard links not supported here")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(_errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageUnavailable):
        storage.save(io.BytesIO(b"data"), "x.bin")
    monkeypatch.undo()
    assert not storage.exists("x.bin")
    assert storage.temp_keys() == []


def test_an_aborted_request_keeps_a_dedup_file_others_may_share(tmp_path: Any) -> None:
    # Request A commits new content-addressed bytes; before A finishes, request
    # B with the same bytes is deduplicated onto A's file; then A fails and
    # aborts. B's file must still be there.
    storage = Storage(str(tmp_path / "root"), collision="dedup")
    data = data_of(100_000, seed=7)
    seen: Dict[str, Any] = {}

    class OtherRequestThenFail(UploadHandler):
        def request_committed(self, ctx: Any) -> None:
            (seen["b"],) = upload(storage, [("b", "two.bin", data)]).ctx.files
            raise StorageUnavailable("a later step of request A failed")

    p = Pipeline([*chain(storage), OtherRequestThenFail()], RequestContext(limits=Limits(), environ={}))
    with pytest.raises(StorageUnavailable):
        try:
            p.start()
            p.start_file("a", "one.bin", "")
            p.feed(data)
            p.end_file()
            p.finish()
        except BaseException as exc:
            p.abort(exc)
            raise
    b = seen["b"]
    assert b.deduplicated and b.key == p.ctx.files[0].key
    assert storage.exists(b.key) and read_key(storage, b.key) == data


# -- who decides a taken key -----------------------------------------------------------------


def test_collisions_are_settled_by_the_store_where_it_can(backend: Backend) -> None:
    storage = backend.make(upload_to="{filename}")
    assert storage.atomic_collisions  # O_EXCL/link, If-None-Match, or a store only this process sees


class NoExclusiveCreateFileSystem(LocalFileSystem):
    """A backend uploadkit knows no exclusive create for (reached as ``noexcl://``)."""

    protocol = "noexcl"

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path, prefix = str(path), f"{cls.protocol}://"
        return LocalFileSystem._strip_protocol(path[len(prefix):] if path.startswith(prefix) else path)


fsspec.register_implementation("noexcl", NoExclusiveCreateFileSystem, clobber=True)


def test_a_backend_without_exclusive_create_says_so(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = f"noexcl://{tmp_path / 'root'}"
    with caplog.at_level("WARNING", logger="uploadkit"):
        storage = Storage(url, upload_to="{filename}", collision="rename",
                          storage_options={"skip_instance_cache": True})
    assert not storage.atomic_collisions and not storage.local
    assert "collision='rename' is settled within each process" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="uploadkit"):
        Storage(url, collision="rename")  # {uuid} keys: nothing to settle
        Storage(url, upload_to="{filename}", collision="overwrite")
    assert caplog.text == ""


def test_empty_files_collide_too(backend: Backend) -> None:
    # On S3 an empty file's key is created by a conditional PutObject, not a multipart upload.
    storage = backend.make(upload_to="{filename}")
    first = storage.save(io.BytesIO(b""), filename="empty.txt")
    second = storage.save(io.BytesIO(b""), filename="empty.txt")
    assert first == "empty.txt" and re.fullmatch(r"empty_[A-Za-z0-9]{7}\.txt", second)
    with pytest.raises(FileExists):
        storage.save(io.BytesIO(b""), "empty.txt", collision="error")
    assert sorted(backend.everything()) == sorted([first, second])


def test_s3_a_retried_conditional_create_of_its_own_object_is_stored(
        s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    """A complete whose answer was lost, retried, is refused with 412 by the
    object it created: that is this write's key, not a taken one. And the
    cleanup of an unanswered create removes only the write's own object."""
    from uploadkit.storage import _s3_create, _s3_remove_own

    storage = Storage(f"s3://{s3_bucket}/media", storage_options=s3_server.options(), block_size=S3_BLOCK)
    fs = storage.fs
    src = f"{s3_bucket}/media/src.bin"
    data = data_of(300_000, 3)
    fs.pipe_file(src, data)
    dst = f"{s3_bucket}/media/final.bin"
    assert _s3_create(fs, src, dst, len(data), "write-a") is True
    assert _s3_create(fs, src, dst, len(data), "write-a") is True  # the retry: its own object
    assert _s3_create(fs, src, dst, len(data), "write-b") is False  # another write: taken
    _s3_remove_own(fs, dst, "write-b")
    assert read_key(storage, "final.bin") == data, "another write's object was removed"
    _s3_remove_own(fs, dst, "write-a")
    assert not storage.exists("final.bin")
    assert s3_server.pending_uploads(s3_bucket) == []


class ConflictingS3:
    """s3fs, except that S3 answers the first ``conflicts`` conditional
    completes with 409 ConditionalRequestConflict (another conditional write
    to the key in progress), as s3fs raises it."""

    def __init__(self, fs: Any, conflicts: int) -> None:
        self.fs = fs
        self.conflicts = conflicts
        self.calls: List[str] = []

    def split_path(self, path: str) -> Any:
        return self.fs.split_path(path)

    def call_s3(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        self.calls.append(method)
        if method == "complete_multipart_upload" and self.conflicts:
            self.conflicts -= 1
            raise translate_boto_error(ClientError(
                {"Error": {"Code": "ConditionalRequestConflict", "Message": "A conflicting operation is in progress"},
                 "ResponseMetadata": {"HTTPStatusCode": 409}}, "CompleteMultipartUpload"))
        return self.fs.call_s3(method, **kwargs)


def test_s3_a_conflicting_conditional_write_is_retried_from_a_new_upload(
        s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    from uploadkit.storage import _CONFLICT_ATTEMPTS, _s3_create

    storage = Storage(f"s3://{s3_bucket}/media", storage_options=s3_server.options(), block_size=S3_BLOCK)
    data = data_of(200_000, 4)
    src, dst = f"{s3_bucket}/media/src.bin", f"{s3_bucket}/media/final.bin"
    storage.fs.pipe_file(src, data)
    fs = ConflictingS3(storage.fs, conflicts=2)
    assert _s3_create(fs, src, dst, len(data), "write-a") is True
    assert fs.calls.count("create_multipart_upload") == 3 and fs.calls.count("abort_multipart_upload") == 2
    assert read_key(storage, "final.bin") == data
    # A conflict that does not end is a failure, not a taken key.
    fs = ConflictingS3(storage.fs, conflicts=_CONFLICT_ATTEMPTS)
    with pytest.raises(OSError):
        _s3_create(fs, src, f"{s3_bucket}/media/other.bin", len(data), "write-b")
    assert not storage.exists("other.bin")
    assert s3_server.pending_uploads(s3_bucket) == []


class LostCreateAnswerS3(ConflictingS3):
    """s3fs, except that the answer to CreateMultipartUpload is lost on the
    way back (the connection is reset after S3 created the upload)."""

    def call_s3(self, method: str, **kwargs: Any) -> Any:
        out = super().call_s3(method, **kwargs)
        if method == "create_multipart_upload" and self.conflicts:
            self.conflicts -= 1
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        return out


def test_s3_a_create_whose_answer_was_lost_leaves_no_multipart_upload(
        s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    """S3 made the multipart upload of a final key but no process learnt its
    id: it is found by its key and aborted, since cleanup never looks there."""
    from uploadkit.storage import _s3_create

    storage = Storage(f"s3://{s3_bucket}/media", storage_options=s3_server.options(), block_size=S3_BLOCK)
    data = data_of(100_000, 5)
    src, dst = f"{s3_bucket}/media/src.bin", f"{s3_bucket}/media/final.bin"
    storage.fs.pipe_file(src, data)
    theirs = s3_server.client().create_multipart_upload(Bucket=s3_bucket, Key="media/final.bin.other")["UploadId"]
    fs = LostCreateAnswerS3(storage.fs, conflicts=1)
    with pytest.raises(OSError):
        _s3_create(fs, src, dst, len(data), "write-a")
    assert [(u["Key"], u["UploadId"]) for u in s3_server.pending_uploads(s3_bucket)] == [
        ("media/final.bin.other", theirs)], "only the lost upload, at exactly its key, is aborted"
    assert not storage.exists("final.bin")
