"""Built-in handlers, custom ones, and the cleanup guarantees of the chain."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import threading
import zlib
from typing import Any, List, Optional, Tuple

import pytest
import requests

from tests.support.wsgi import wsgi_server  # noqa: F401  (first: imports webob quietly)
from uploadkit.errors import QuotaExceeded, UploadError
from uploadkit.files import FileInfo, UploadedFile, bytes_opener
from uploadkit.handlers import (
    SKIP,
    HashingHandler,
    MemoryHandler,
    QuotaHandler,
    SniffingHandler,
    WRITE_SIZE,
    TempFileHandler,
    UploadHandler,
    write_all,
)
from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.pipeline import Pipeline, RequestContext
from uploadkit.reader import read_multipart
from tests.support.bodies import content_type, end, field_part, file_part

MiB = 1024 * 1024


def run(body: bytes, handlers: List[UploadHandler], limits: Limits = Limits(), environ: Any = None,
        read_size: int = 1 << 16) -> Pipeline:
    return read_multipart(io.BytesIO(body), content_type=content_type(), content_length=len(body),
                          limits=limits, handlers=handlers, environ=environ, read_size=read_size)


# -- MemoryHandler + TempFileHandler ---------------------------------------------

def test_memory_budget_is_for_the_whole_request(tmp_path: Any) -> None:
    body = (file_part("a", "a.bin", b"x" * 60) + file_part("b", "b.bin", b"y" * 60)
            + file_part("c", "c.bin", b"z" * 40) + file_part("d", "d.bin", b"w" * 1) + end())
    p = run(body, [MemoryHandler(100), TempFileHandler(str(tmp_path))], read_size=7)
    files = {f.field_name: f for f in p.ctx.files}
    assert [f.field_name for f in p.ctx.files] == ["a", "b", "c", "d"]
    # a: 60 held; b: 60 more would pass 100 -> temp file; c: 60 + 40 = 100 fits; d: 101 -> temp file.
    assert files["a"].path is None and files["c"].path is None
    assert files["b"].path is not None and files["d"].path is not None
    assert os.path.dirname(files["b"].path) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(files[k].path or "") for k in "bd")
    for name, data in (("a", b"x" * 60), ("b", b"y" * 60), ("c", b"z" * 40), ("d", b"w")):
        assert files[name].read() == data
        assert files[name].size == len(data)
    p.close()
    assert os.listdir(tmp_path) == []


def test_file_spilling_midway_keeps_every_byte(tmp_path: Any) -> None:
    data = bytes(range(256)) * 64  # 16 KiB, over an 10 KiB threshold after a few chunks
    body = file_part("f", "f.bin", data) + end()
    p = run(body, [MemoryHandler(10_000), TempFileHandler(str(tmp_path))], read_size=1000)
    (f,) = p.ctx.files
    assert f.path is not None and f.read() == data and f.size == len(data)
    p.close()
    assert os.listdir(tmp_path) == []


def test_no_temp_file_for_files_kept_in_memory(tmp_path: Any) -> None:
    seen: List[List[str]] = []

    class Peek(UploadHandler):
        def request_end(self, ctx: RequestContext) -> None:
            seen.append(os.listdir(tmp_path))

    body = file_part("a", "a.txt", b"small") + file_part("e", "empty.txt", b"") + end()
    p = run(body, [MemoryHandler(1000), TempFileHandler(str(tmp_path)), Peek()])
    assert seen == [[]]
    assert [f.read() for f in p.ctx.files] == [b"small", b""]
    p.close()


def test_temp_file_handler_alone_keeps_empty_files_too(tmp_path: Any) -> None:
    body = file_part("e", "empty.txt", b"") + file_part("f", "f.txt", b"abc") + end()
    p = run(body, [TempFileHandler(str(tmp_path))])
    assert [f.read() for f in p.ctx.files] == [b"", b"abc"]
    assert len(os.listdir(tmp_path)) == 2
    p.close()
    assert os.listdir(tmp_path) == []


def test_temp_file_names_taken_by_someone_else_are_left_alone(tmp_path: Any) -> None:
    """A request's temp files share one random prefix; a name already taken
    (another process, a stale file) draws a new prefix, and the file that was
    there is neither overwritten nor removed."""
    handler = TempFileHandler(str(tmp_path))
    base = handler._new_base()
    squatter = tmp_path / os.path.basename(f"{base}0.part")
    squatter.write_bytes(b"not ours")
    p = run(file_part("a", "a.bin", b"first") + file_part("b", "b.bin", b"second") + end(), [handler])
    paths = [f.path or "" for f in p.ctx.files]
    assert [f.read() for f in p.ctx.files] == [b"first", b"second"]
    assert str(squatter) not in paths and all(not path.startswith(base) for path in paths)
    assert os.path.dirname(paths[0]) == str(tmp_path) and paths[0].rsplit("-", 1)[0] == paths[1].rsplit("-", 1)[0]
    p.close()
    assert os.listdir(tmp_path) == [squatter.name] and squatter.read_bytes() == b"not ours"


class Boom(UploadHandler):
    """Raises from the hook named ``where`` on the file named ``on`` (or at request_end)."""

    def __init__(self, where: str, on: str = "b.bin", exc: Optional[BaseException] = None,
                 peek: Optional[str] = None) -> None:
        self.where = where
        self.on = on
        self.exc = exc or QuotaExceeded("boom", limit=1)
        self.peek = peek
        self.seen: Optional[List[str]] = None

    def _maybe(self, hook: str, info: Optional[FileInfo] = None) -> None:
        if hook == self.where and (info is None or info.filename == self.on):
            if self.peek:
                self.seen = os.listdir(self.peek)
            raise self.exc

    def file_start(self, info: FileInfo) -> Any:
        self._maybe("file_start", info)

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self._maybe("receive", info)
        return chunk

    def flush(self, info: FileInfo) -> Optional[bytes]:
        self._maybe("flush", info)
        return None

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        self._maybe("file_end", info)
        return None

    def request_end(self, ctx: RequestContext) -> None:
        self._maybe("request_end")


@pytest.mark.parametrize("where", ["file_start", "receive", "flush", "file_end", "request_end"])
def test_temp_files_removed_on_abort(tmp_path: Any, where: str) -> None:
    body = file_part("a", "a.bin", b"a" * 5000) + file_part("b", "b.bin", b"b" * 5000) + end()
    boom = Boom(where, peek=str(tmp_path))
    with pytest.raises(QuotaExceeded):
        run(body, [boom, TempFileHandler(str(tmp_path))], read_size=1000)
    assert boom.seen and len(boom.seen) in (1, 2)  # temp files existed when the refusal came
    assert os.listdir(tmp_path) == []


def test_temp_files_removed_when_the_body_is_malformed(tmp_path: Any) -> None:
    body = file_part("a", "a.bin", b"a" * 5000) + file_part("b", "b.bin", b"b" * 50)  # no final boundary
    with pytest.raises(UploadError) as err:
        run(body, [TempFileHandler(str(tmp_path))], read_size=100)
    assert err.value.code == "malformed_multipart"
    assert os.listdir(tmp_path) == []


def test_temp_file_handler_reports_storage_unavailable(tmp_path: Any) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(UploadError) as err:
        run(file_part("a", "a.bin", b"data") + end(), [TempFileHandler(str(missing))])
    assert err.value.code == "storage_unavailable" and err.value.status == 503


_FULL_DISK_CHILD = r"""
import io, json, os, resource, signal, sys
from uploadkit.errors import UploadError
from uploadkit.handlers import TempFileHandler
from tests.support.bodies import content_type, end, file_part
from uploadkit.reader import read_multipart

tempdir, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
first = os.urandom(1000)
body = (file_part("a", "a.bin", first) + file_part("b", "b.bin", os.urandom(3 * limit)) + end())
try:
    read_multipart(io.BytesIO(body), content_type=content_type(), content_length=len(body),
                   handlers=[TempFileHandler(tempdir)], read_size=int(sys.argv[3]))
    print(json.dumps({"accepted": True}))
except UploadError as exc:
    print(json.dumps({"code": exc.code, "status": exc.status, "message": str(exc)}))
"""


@pytest.mark.parametrize("read_size", [1000, 1 << 20])
def test_a_temp_file_write_that_fails_is_503_and_leaves_nothing(tmp_path: Any, read_size: int) -> None:
    # A real failing write: the child's file size limit (RLIMIT_FSIZE) makes
    # the kernel cut a write short and refuse the next, as a full disk does.
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tempdir), str(64 * 1024), str(read_size)],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["code"] == "storage_unavailable" and outcome["status"] == 503, outcome
    assert "writing a temp file failed" in outcome["message"]
    assert os.listdir(tempdir) == []


@pytest.mark.parametrize("short", [False, True], ids=["whole writes", "short writes"])
@pytest.mark.parametrize("sink", ["temp file", "local storage"])
def test_megabyte_chunks_reach_the_disk_in_small_writes(tmp_path: Any, monkeypatch: Any, sink: str,
                                                        short: bool) -> None:
    """Chunks of a megabyte go to the kernel WRITE_SIZE bytes at a time, and a
    write the kernel cuts short (a signal, a filling disk) resumes where it
    stopped: the file holds every byte, once."""
    from uploadkit.storage import Storage

    asked: List[int] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        asked.append(len(data))
        return real_write(fd, data[:1000] if short else data)

    data = _pattern(3 * MiB + 5)
    handler = TempFileHandler(str(tmp_path)) if sink == "temp file" else Storage(str(tmp_path / "media")).handler()
    monkeypatch.setattr(os, "write", write)
    p = run(file_part("f", "f.bin", data) + end(), [handler], read_size=1 << 20)
    monkeypatch.undo()
    (f,) = p.ctx.files
    assert f.size == len(data) and f.read() == data
    assert max(asked) == WRITE_SIZE
    if short:
        assert len(asked) >= len(data) // 1000
    else:
        # Pieces cut on the file's WRITE_SIZE blocks (the file starts after
        # the part's headers, mid-read): short ones only where a chunk the
        # parser passed on begins or ends, two for each of its reads at most.
        ends = itertools.accumulate(asked)
        assert sum(asked) == len(data) and sum(e % WRITE_SIZE != 0 for e in ends) <= 8
        assert sum(n < WRITE_SIZE for n in asked) <= 16
    p.close()


@pytest.mark.parametrize("offset", [0, 1, 200, WRITE_SIZE - 1, WRITE_SIZE, 5 * WRITE_SIZE + 77])
@pytest.mark.parametrize("size", [1, 300, WRITE_SIZE, 3 * WRITE_SIZE + 11])
@pytest.mark.parametrize("short", [False, True], ids=["whole writes", "short writes"])
def test_write_all_cuts_its_pieces_on_the_files_blocks(tmp_path: Any, monkeypatch: Any, offset: int, size: int,
                                                       short: bool) -> None:
    """Each piece lies within one WRITE_SIZE block of the file, counted from
    where the data lands, and every piece but the last ends on a block: no
    write straddles a boundary, even after the kernel cut one short."""
    pieces: List[Tuple[int, int]] = []  # (start, end) in the file, as written
    real_write = os.write
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x" * offset)
    data = _pattern(size)

    def write(fd: int, piece: Any) -> int:
        done = real_write(fd, piece[:100] if short and len(piece) > 100 else piece)
        start = pieces[-1][1] if pieces else offset
        pieces.append((start, start + done))
        return done

    monkeypatch.setattr(os, "write", write)
    try:
        write_all(fd, data, offset)
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert path.read_bytes() == b"x" * offset + data
    assert pieces[0][0] == offset and pieces[-1][1] == offset + size
    for start, stop in pieces:
        assert 0 < stop - start <= WRITE_SIZE
        assert start // WRITE_SIZE == (stop - 1) // WRITE_SIZE, (start, stop)
    if not short:
        assert all(stop % WRITE_SIZE == 0 for _, stop in pieces[:-1])
        assert len(pieces) == -(-(offset % WRITE_SIZE + size) // WRITE_SIZE)


# -- HashingHandler -----------------------------------------------------------------

def _pattern(n: int) -> bytes:
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, 5 * MiB])
@pytest.mark.parametrize("read_size", [64 * 1024, 1 << 20])
def test_hashes_equal_hashlib_around_the_offload_threshold(size: int, read_size: int) -> None:
    data = _pattern(size)
    body = file_part("f", "f.bin", data) + end()
    hasher = HashingHandler(sha256=True, md5=True)
    p = run(body, [hasher, MemoryHandler(8 * MiB)], read_size=read_size)
    (f,) = p.ctx.files
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert f.md5 == hashlib.md5(data).hexdigest()
    assert f.size == size
    p.close()


def test_hash_worker_thread_is_used_and_finished_for_big_files() -> None:
    before = {t.ident for t in threading.enumerate()}
    data = _pattern(3 * MiB)
    hasher = HashingHandler(offload_after=MiB)
    threads_during: List[str] = []

    class Watch(UploadHandler):
        def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
            threads_during.extend(t.name for t in threading.enumerate() if t.ident not in before)
            return chunk

    p = run(file_part("f", "f.bin", data) + end(), [hasher, Watch(), MemoryHandler(8 * MiB)], read_size=256 * 1024)
    assert "uploadkit-hash" in threads_during
    assert not [t for t in threading.enumerate() if t.name == "uploadkit-hash"]
    assert p.ctx.files[0].sha256 == hashlib.sha256(data).hexdigest()


def test_several_files_hash_independently() -> None:
    a, b = _pattern(2 * MiB), b"second file"
    p = run(file_part("a", "a", a) + file_part("b", "b", b) + end(), [HashingHandler(), MemoryHandler(8 * MiB)])
    assert [f.sha256 for f in p.ctx.files] == [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()]


def test_sha256_off() -> None:
    p = run(file_part("f", "f.bin", b"data") + end(), [HashingHandler(sha256=False, md5=True), MemoryHandler()])
    (f,) = p.ctx.files
    assert f.sha256 is None
    assert f.md5 == hashlib.md5(b"data").hexdigest()
    p = run(file_part("f", "f.bin", b"data") + end(), [HashingHandler(sha256=False), MemoryHandler()])
    assert p.ctx.files[0].sha256 is None and p.ctx.files[0].md5 is None


def test_hash_worker_stopped_on_abort() -> None:
    data = _pattern(3 * MiB)
    body = file_part("f", "f.bin", data) + file_part("b", "b.bin", b"x") + end()
    with pytest.raises(QuotaExceeded):
        run(body, [HashingHandler(offload_after=MiB), Boom("file_start"), MemoryHandler(8 * MiB)],
            read_size=256 * 1024)
    assert not [t for t in threading.enumerate() if t.name == "uploadkit-hash"]


def test_hash_worker_stopped_when_aborted_mid_file() -> None:
    data = _pattern(3 * MiB)
    with pytest.raises(QuotaExceeded):
        run(file_part("f", "b.bin", data) + end(),
            [HashingHandler(offload_after=MiB), QuotaHandler(lambda env: 2 * MiB), MemoryHandler(8 * MiB)],
            read_size=256 * 1024)
    assert not [t for t in threading.enumerate() if t.name == "uploadkit-hash"]


# -- QuotaHandler ---------------------------------------------------------------------

def test_quota_counts_all_files_of_the_request(tmp_path: Any) -> None:
    environ = {"REMOTE_USER": "ann"}
    asked: List[Any] = []

    def quota(env: Any) -> Optional[int]:
        asked.append(env)
        return 100

    body = file_part("a", "a", b"x" * 60) + file_part("b", "b", b"y" * 60) + end()
    with pytest.raises(QuotaExceeded) as err:
        run(body, [QuotaHandler(quota), TempFileHandler(str(tmp_path))], environ=environ)
    e = err.value
    assert asked == [environ]
    assert (e.status, e.code, e.limit, e.field) == (413, "quota_exceeded", 100, "b")
    assert "100 bytes" in e.message
    assert os.listdir(tmp_path) == []


def test_quota_exactly_reached_passes_and_none_means_unlimited() -> None:
    body = file_part("a", "a", b"x" * 60) + file_part("b", "b", b"y" * 40) + end()
    assert len(run(body, [QuotaHandler(lambda env: 100), MemoryHandler()]).ctx.files) == 2
    assert len(run(body, [QuotaHandler(lambda env: None), MemoryHandler()]).ctx.files) == 2


def test_quota_ignores_text_fields() -> None:
    body = field_part("t", "x" * 500) + file_part("a", "a", b"x" * 10) + end()
    p = run(body, [QuotaHandler(lambda env: 10), MemoryHandler()])
    assert p.ctx.fields == [("t", "x" * 500)]


# -- SKIP ----------------------------------------------------------------------------

class Recorder(UploadHandler):
    """Records every hook call as (name, hook, detail)."""

    def __init__(self, name: str, log: List[Tuple[str, str, Any]], skip: Optional[str] = None,
                 keep: bool = False) -> None:
        self.name = name
        self.log = log
        self.skip = skip
        self.keep = keep
        self._data: List[bytes] = []

    def request_start(self, ctx: RequestContext) -> None:
        self.log.append((self.name, "request_start", None))

    def file_start(self, info: FileInfo) -> Any:
        self.log.append((self.name, "file_start", info.filename))
        self._data = []
        return SKIP if info.filename == self.skip else None

    def file_skipped(self, info: FileInfo) -> None:
        self.log.append((self.name, "file_skipped", info.filename))

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.log.append((self.name, "receive", info.filename))
        if self.keep:
            self._data.append(chunk)
            return None
        return chunk

    def flush(self, info: FileInfo) -> Optional[bytes]:
        self.log.append((self.name, "flush", info.filename))
        return None

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        self.log.append((self.name, "file_end", info.filename))
        if self.keep:
            return UploadedFile.from_info(info, bytes_opener(b"".join(self._data)))
        return None

    def request_end(self, ctx: RequestContext) -> None:
        self.log.append((self.name, "request_end", None))

    def close(self, ctx: RequestContext) -> None:
        self.log.append((self.name, "close", None))

    def abort(self, ctx: RequestContext, exc: Optional[BaseException]) -> None:
        self.log.append((self.name, "abort", type(exc).__name__))


def test_skip_drops_the_file_and_tells_earlier_handlers() -> None:
    log: List[Tuple[str, str, Any]] = []
    chain = [Recorder("first", log), Recorder("skipper", log, skip="drop.bin"), Recorder("sink", log, keep=True)]
    body = file_part("a", "drop.bin", b"dropped bytes") + file_part("b", "keep.bin", b"kept") + end()
    p = run(body, chain)
    assert [(f.field_name, f.read()) for f in p.ctx.files] == [("b", b"kept")]
    drop = [(n, h) for n, h, d in log if d == "drop.bin"]
    assert drop == [("first", "file_start"), ("skipper", "file_start"), ("first", "file_skipped")]
    keep = [(n, h) for n, h, d in log if d == "keep.bin"]
    assert keep == [("first", "file_start"), ("skipper", "file_start"), ("sink", "file_start"),
                    ("first", "receive"), ("skipper", "receive"), ("sink", "receive"),
                    ("first", "flush"), ("skipper", "flush"), ("sink", "flush"),
                    ("first", "file_end"), ("skipper", "file_end"), ("sink", "file_end")]
    p.close()
    assert [(n, h) for n, h, d in log if h == "close"] == [("first", "close"), ("skipper", "close"), ("sink", "close")]


def test_skipped_file_leaves_no_temp_file(tmp_path: Any) -> None:
    class SkipExe(UploadHandler):
        def file_start(self, info: FileInfo) -> Any:
            return SKIP if info.extension == ".exe" else None

    body = file_part("a", "x.exe", b"MZ" * 10000) + file_part("b", "y.txt", b"text") + end()
    p = run(body, [SkipExe(), TempFileHandler(str(tmp_path))], read_size=1000)
    assert [f.filename for f in p.ctx.files] == ["y.txt"]
    assert len(os.listdir(tmp_path)) == 1
    p.close()


# -- a transforming handler with flush ---------------------------------------------------

class GzipHandler(UploadHandler):
    """Compresses each file on the fly; what the compressor holds back is flushed at the end."""

    def file_start(self, info: FileInfo) -> Any:
        self.z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
        self.raw = 0
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.raw += len(chunk)
        return self.z.compress(chunk) or None

    def flush(self, info: FileInfo) -> Optional[bytes]:
        info.extra["gzip_raw_size"] = self.raw
        return self.z.flush()


@pytest.mark.parametrize("sink", ["memory", "tempfile"])
def test_gzip_transformer_flush_reaches_the_sink(tmp_path: Any, sink: str) -> None:
    data = (b"compressible line of text\r\n" * 20000) + os.urandom(3000)
    store: UploadHandler = MemoryHandler(8 * MiB) if sink == "memory" else TempFileHandler(str(tmp_path))
    p = run(file_part("f", "log.txt", data) + file_part("g", "small.txt", b"tiny") + end(),
            [HashingHandler(), GzipHandler(), store], read_size=4096)
    big, small = p.ctx.files
    stored = big.read()
    assert stored[:2] == b"\x1f\x8b" and len(stored) < len(data) // 10
    assert gzip.decompress(stored) == data
    assert gzip.decompress(small.read()) == b"tiny"
    assert big.size == len(stored)
    assert big.sha256 == hashlib.sha256(data).hexdigest()  # hashed before compression
    assert big.extra["gzip_raw_size"] == len(data)
    p.close()


# -- abort on every handler ----------------------------------------------------------

@pytest.mark.parametrize("where", ["file_start", "receive", "flush", "file_end", "request_end"])
def test_abort_called_on_every_handler_once(where: str) -> None:
    log: List[Tuple[str, str, Any]] = []
    chain = [Recorder("r1", log), Recorder("r2", log), Boom(where), Recorder("r3", log), Recorder("sink", log, keep=True)]
    body = file_part("a", "a.bin", b"a" * 100) + file_part("b", "b.bin", b"b" * 100) + end()
    with pytest.raises(QuotaExceeded):
        run(body, chain)
    aborts = [(n, d) for n, h, d in log if h == "abort"]
    assert aborts == [("r1", "QuotaExceeded"), ("r2", "QuotaExceeded"), ("r3", "QuotaExceeded"),
                      ("sink", "QuotaExceeded")]
    assert not [h for n, h, d in log if h == "close"]


def test_abort_reaches_every_handler_even_when_one_abort_raises(caplog: Any) -> None:
    log: List[Tuple[str, str, Any]] = []

    class BadAbort(UploadHandler):
        def abort(self, ctx: RequestContext, exc: Optional[BaseException]) -> None:
            raise RuntimeError("cleanup failed")

    chain = [Recorder("r1", log), BadAbort(), Boom("receive", on="a.bin"), Recorder("r2", log)]
    with pytest.raises(QuotaExceeded):
        run(file_part("a", "a.bin", b"a") + end(), chain)
    assert [n for n, h, d in log if h == "abort"] == ["r1", "r2"]
    assert "BadAbort.abort failed" in caplog.text


def test_non_upload_errors_abort_too_and_propagate() -> None:
    log: List[Tuple[str, str, Any]] = []
    chain = [Recorder("r1", log), Boom("receive", on="a.bin", exc=KeyError("bug")), Recorder("r2", log)]
    with pytest.raises(KeyError):
        run(file_part("a", "a.bin", b"a") + end(), chain)
    assert [(n, d) for n, h, d in log if h == "abort"] == [("r1", "KeyError"), ("r2", "KeyError")]


def test_abort_after_a_limit_in_the_parser() -> None:
    log: List[Tuple[str, str, Any]] = []
    body = file_part("a", "a.bin", b"a") + file_part("b", "b.bin", b"b") + end()
    with pytest.raises(UploadError) as err:
        run(body, [Recorder("r1", log), Recorder("sink", log, keep=True)], limits=Limits(max_files=1))
    assert err.value.code == "too_many_files"
    assert [(n, d) for n, h, d in log if h == "abort"] == [("r1", "TooManyFiles"), ("sink", "TooManyFiles")]


# -- handlers chosen per request through the middleware -------------------------------------

def test_handlers_chosen_per_request(wsgi_server: Any, tmp_path: Any) -> None:
    def choose(environ: Any) -> List[UploadHandler]:
        if environ["PATH_INFO"].startswith("/gz"):
            return [HashingHandler(), GzipHandler(), MemoryHandler()]
        return [SniffingHandler(), HashingHandler(md5=True), TempFileHandler(str(tmp_path))]

    def app(environ: Any, start_response: Any) -> List[bytes]:
        f = environ["uploadkit.files"]["f"]
        out = json.dumps({"stored_sha256": hashlib.sha256(f.read()).hexdigest(), "sha256": f.sha256,
                          "md5": f.md5, "path": f.path is not None, "ctype": f.content_type}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]

    server = wsgi_server(UploadMiddleware(app, progress=False, handlers=choose))
    data = b"hello handlers " * 1000
    gz = requests.post(server.url + "/gz", files={"f": ("a.txt", data)}, timeout=10).json()
    plain = requests.post(server.url + "/plain", files={"f": ("a.txt", data, "text/plain")}, timeout=10).json()
    assert gz["sha256"] == plain["sha256"] == hashlib.sha256(data).hexdigest()
    assert gz["stored_sha256"] != gz["sha256"] and gz["md5"] is None and gz["path"] is False
    assert plain["stored_sha256"] == plain["sha256"] and plain["md5"] == hashlib.md5(data).hexdigest()
    assert plain["path"] is True and plain["ctype"] == "text/plain"
    assert os.listdir(tmp_path) == []
