"""The pipeline driven directly, without multipart: heads, limits, ordering, progress, cleanup."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest

from uploadkit.errors import FileTooLarge, QuotaExceeded
from uploadkit.files import FileInfo, UploadedFile, bytes_opener
from uploadkit.handlers import SKIP, MemoryHandler, UploadHandler
from uploadkit.limits import Limits
from uploadkit.pipeline import Pipeline, RequestContext
from uploadkit.progress import ProgressListener


class Spy(UploadHandler):
    def __init__(self, log: List[Tuple[str, Any]], result: Optional[bytes] = None) -> None:
        self.log = log
        self.result = result
        self.chunks: List[bytes] = []

    def file_start(self, info: FileInfo) -> Any:
        self.log.append(("file_start", (info.head, info.size)))
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.chunks.append(chunk)
        return chunk

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        self.log.append(("file_end", id(self)))
        if self.result is not None:
            return UploadedFile.from_info(info, bytes_opener(self.result))
        return None


def _pipeline(handlers: List[UploadHandler], limits: Limits = Limits(), head_size: int = 16,
              progress: Optional[ProgressListener] = None) -> Pipeline:
    p = Pipeline(handlers, RequestContext(limits=limits), progress=progress or ProgressListener(),
                 head_size=head_size)
    p.start()
    return p


def test_file_start_sees_the_head_before_any_receive() -> None:
    log: List[Tuple[str, Any]] = []
    spy = Spy(log)
    p = _pipeline([spy, MemoryHandler()], head_size=16)
    p.start_file("f", "a.bin")
    for piece in (b"0123", b"4567", b"89ab", b"cdefGHIJ", b"KL"):
        p.feed(piece)
    p.end_file()
    assert log[0] == ("file_start", (b"0123456789abcdef", 20))
    assert b"".join(spy.chunks) == b"0123456789abcdefGHIJKL"
    assert p.ctx.files[0].read() == b"0123456789abcdefGHIJKL"


def test_small_file_head_is_the_whole_file_and_empty_file_gets_file_start() -> None:
    log: List[Tuple[str, Any]] = []
    p = _pipeline([Spy(log), MemoryHandler()], head_size=16)
    p.start_file("f", "small.bin")
    p.feed(b"abc")
    p.end_file()
    p.start_file("g", "empty.bin")
    p.end_file()
    assert [e for e in log if e[0] == "file_start"] == [("file_start", (b"abc", 3)), ("file_start", (b"", 0))]
    assert [f.read() for f in p.ctx.files] == [b"abc", b""]
    assert all(f.size == len(f.read()) for f in p.ctx.files)


def test_info_fields_filename_sanitized_type_normalized() -> None:
    p = _pipeline([MemoryHandler()], limits=Limits(max_filename_length=12))
    info = p.start_file("up", "../../etc/a-very-long-name.JPG", "Image/JPG; q=1")
    assert info.raw_filename == "../../etc/a-very-long-name.JPG"
    assert info.filename == "a-very-l.JPG"
    assert info.declared_type == "image/jpeg" and info.content_type == "image/jpeg"
    assert info.index == 0 and info.extension == ".jpg"
    p.end_file()
    second = p.start_file("up", "x", "")
    assert second.index == 1 and second.declared_type == "" and second.content_type == "application/octet-stream"


def test_max_file_size_is_enforced_by_the_pipeline() -> None:
    p = _pipeline([MemoryHandler()], limits=Limits(max_file_size=10))
    p.start_file("f", "big.bin")
    p.feed(b"x" * 10)
    with pytest.raises(FileTooLarge) as err:
        p.feed(b"y")
    e = err.value
    assert (e.status, e.code, e.field, e.limit) == (413, "file_too_large", "f", 10)
    assert "'big.bin'" in e.message and "10 bytes" in e.message


def test_first_uploaded_file_wins_and_every_handler_gets_file_end() -> None:
    log: List[Tuple[str, Any]] = []
    a, b, c = Spy(log), Spy(log, result=b"from b"), Spy(log, result=b"from c")
    p = _pipeline([a, b, c])
    p.start_file("f", "x")
    p.feed(b"data")
    got = p.end_file()
    assert got is not None and got.read() == b"from b"
    assert [e for e in log if e[0] == "file_end"] == [("file_end", id(a)), ("file_end", id(b)), ("file_end", id(c))]
    assert p.ctx.files == [got]


def test_file_nobody_kept_is_not_listed() -> None:
    p = _pipeline([UploadHandler()])
    p.start_file("f", "x")
    p.feed(b"data")
    assert p.end_file() is None
    assert p.ctx.files == []


def test_skip_in_file_start_stops_bytes() -> None:
    class Skipper(UploadHandler):
        def file_start(self, info: FileInfo) -> Any:
            return SKIP

    log: List[Tuple[str, Any]] = []
    after = Spy(log)
    p = _pipeline([Skipper(), after], head_size=4)
    p.start_file("f", "x")
    for _ in range(10):
        p.feed(b"12345")
    assert p.end_file() is None
    assert after.chunks == [] and log == []
    assert p.ctx.files == []


def test_fields_in_order_and_finish_inside_a_file_is_a_bug() -> None:
    p = _pipeline([MemoryHandler()])
    p.add_field("a", "1")
    p.start_file("f", "x")
    with pytest.raises(RuntimeError):
        p.finish()
    p.end_file()
    p.add_field("a", "2")
    p.finish()
    assert p.ctx.fields == [("a", "1"), ("a", "2")]


class ProgressSpy(ProgressListener):
    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any]] = []

    def start(self, ctx: RequestContext) -> None:
        self.calls.append(("start", None))

    def file_start(self, info: FileInfo) -> None:
        self.calls.append(("file_start", info.filename))

    def file_end(self, info: FileInfo) -> None:
        self.calls.append(("file_end", (info.filename, info.size)))

    def processing(self) -> None:
        self.calls.append(("processing", None))

    def done(self, ctx: RequestContext) -> None:
        self.calls.append(("done", len(ctx.files)))

    def error(self, exc: Any) -> None:
        self.calls.append(("error", exc.code))


def test_progress_listener_is_told_in_order() -> None:
    spy = ProgressSpy()
    p = _pipeline([MemoryHandler()], progress=spy)
    p.start_file("f", "a.txt")
    p.feed(b"abc")
    p.end_file()
    p.finish()
    assert spy.calls == [("start", None), ("file_start", "a.txt"), ("file_end", ("a.txt", 3)),
                         ("processing", None), ("done", 1)]


def test_progress_error_on_refusal_and_abort_is_idempotent() -> None:
    spy = ProgressSpy()
    aborts: List[str] = []

    class Counting(UploadHandler):
        def abort(self, ctx: RequestContext, exc: Optional[BaseException]) -> None:
            aborts.append(type(exc).__name__)

    p = _pipeline([Counting()], progress=spy)
    exc = QuotaExceeded("x", limit=1)
    p.abort(exc)
    p.abort(exc)
    p.close()
    assert aborts == ["QuotaExceeded"]
    assert spy.calls[-1] == ("error", "quota_exceeded")


def test_close_is_idempotent_and_excludes_abort() -> None:
    calls: List[str] = []

    class H(UploadHandler):
        def close(self, ctx: RequestContext) -> None:
            calls.append("close")

        def abort(self, ctx: RequestContext, exc: Optional[BaseException]) -> None:
            calls.append("abort")

    p = _pipeline([H(), H()])
    p.finish()
    p.close()
    p.close()
    p.abort(None)
    assert calls == ["close", "close"]


def test_flush_tail_goes_only_to_later_handlers() -> None:
    class Holder(UploadHandler):
        def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
            self.held = getattr(self, "held", b"") + chunk
            return None if len(self.held) < 100 else chunk

        def flush(self, info: FileInfo) -> Optional[bytes]:
            return getattr(self, "held", b"")

    log: List[Tuple[str, Any]] = []
    before, after = Spy(log), Spy(log)
    p = _pipeline([before, Holder(), after, MemoryHandler()], head_size=1)
    p.start_file("f", "x")
    p.feed(b"abc")
    p.feed(b"def")
    p.end_file()
    assert b"".join(before.chunks) == b"abcdef"
    assert after.chunks == [b"abcdef"]
    assert p.ctx.files[0].read() == b"abcdef"


def test_a_resumed_file_starts_with_its_stored_head_and_counts_its_earlier_bytes() -> None:
    # A resumable upload's later request: 40 bytes went through a chain before.
    log: List[Tuple[str, Any]] = []
    spy = Spy(log)
    p = _pipeline([spy], limits=Limits(max_file_size=50), head_size=16)
    info = p.start_file("f", "a.bin", resume_at=40, head=b"0123456789abcdefXYZ")
    assert log == [("file_start", (b"0123456789abcdef", 40))]  # before any new byte arrived
    p.feed(b"new")
    assert spy.chunks == [b"new"]  # only the new bytes are pushed
    assert info.size == 43
    with pytest.raises(FileTooLarge):
        p.feed(b"x" * 8)  # 51 bytes in all
