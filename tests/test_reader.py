"""read_multipart over blocking streams: lengths, short bodies, limits, odd streams."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
import os
from typing import Any, List, Optional, Tuple

import pytest

from uploadkit.errors import (
    ClientDisconnected,
    ClientTimeout,
    FileTooLarge,
    LengthRequired,
    MalformedMultipart,
    RequestTooLarge,
    UnsupportedType,
    UploadError,
    format_size,
)
from uploadkit.handlers import HashingHandler, MemoryHandler, TempFileHandler, UploadHandler
from uploadkit.limits import Limits
from uploadkit.progress import ProgressListener
from uploadkit.reader import read_multipart
from tests.support.bodies import (
    BOUNDARY,
    GeneratedStream,
    TrickleStream,
    content_type,
    end,
    field_part,
    file_part,
    fixed_chunks,
)

DATA = os.urandom(50_000) + b"\r\n--" + BOUNDARY.encode()[:-2] + b"\r\n"
BODY = field_part("title", "hello") + file_part("f", "f.bin", DATA) + field_part("after", "x") + end()


def _read(stream: Any, length: Optional[int] = len(BODY), **kw: Any) -> Any:
    kw.setdefault("handlers", [HashingHandler(), MemoryHandler()])
    return read_multipart(stream, content_type=content_type(), content_length=length, **kw)


def _check(p: Any) -> None:
    assert p.ctx.fields == [("title", "hello"), ("after", "x")]
    (f,) = p.ctx.files
    assert f.read() == DATA and f.sha256 == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("step", [1, 3, 1000, 1 << 20])
def test_trickling_stream(step: int) -> None:
    stream = TrickleStream(BODY, step if step > 1 else 997)
    _check(_read(stream, read_size=4096))


@pytest.mark.parametrize("read_size", [1, 7, 4096, 1 << 20])
def test_read_sizes(read_size: int) -> None:
    body = BODY if read_size > 1 else field_part("a", "1") + file_part("f", "f", b"x\r\ny") + end()
    p = _read(io.BytesIO(body), len(body), read_size=read_size)
    assert p.ctx.files[0].read() == (DATA if read_size > 1 else b"x\r\ny")


def test_never_reads_past_content_length() -> None:
    stream = io.BytesIO(BODY + b"NEXT REQUEST ON THE CONNECTION")
    _check(_read(stream, read_size=999))
    assert stream.read() == b"NEXT REQUEST ON THE CONNECTION"


def test_stream_handing_out_more_than_asked_is_cut() -> None:
    class Greedy(io.RawIOBase):
        def __init__(self) -> None:
            self.data = BODY + b"garbage after the body"

        def read(self, size: int = -1) -> bytes:
            out, self.data = self.data, b""
            return out

    _check(_read(Greedy()))


@pytest.mark.parametrize("cut", [0, 10, len(BODY) // 2, len(BODY) - 1])
def test_short_body_is_client_disconnected(cut: int) -> None:
    with pytest.raises(ClientDisconnected) as err:
        _read(io.BytesIO(BODY[:cut]), read_size=4096)
    e = err.value
    assert (e.status, e.code) == (400, "client_disconnected")
    assert f"after {cut} of {len(BODY)} bytes" in e.message


@pytest.mark.parametrize("exc", [OSError("connection reset"), ValueError("I/O operation on closed file"),
                                 TimeoutError("timed out")])
def test_read_errors_are_client_disconnected(exc: Exception) -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def read(self, size: int = -1) -> bytes:
            if self.pos > 20_000:
                raise exc
            out = BODY[self.pos:self.pos + size]
            self.pos += len(out)
            return out

    with pytest.raises(ClientDisconnected) as err:
        _read(Failing(), read_size=8192)
    assert "after 24576 bytes" in err.value.message


def test_no_length_and_not_terminated_is_411() -> None:
    stream = io.BytesIO(BODY)
    with pytest.raises(LengthRequired) as err:
        _read(stream, None)
    assert err.value.status == 411 and err.value.code == "length_required"
    assert stream.tell() == 0


def test_terminated_stream_without_length() -> None:
    _check(_read(GeneratedStream(fixed_chunks(BODY, 3000)), None, terminated=True))


def test_declared_length_over_the_limit_refused_before_reading() -> None:
    stream = io.BytesIO(BODY)
    with pytest.raises(RequestTooLarge) as err:
        _read(stream, limits=Limits(max_request_size=1000))
    e = err.value
    assert (e.status, e.code, e.limit) == (413, "request_too_large", 1000)
    assert "1000 bytes" in e.message and format_size(len(BODY)) in e.message
    assert stream.tell() == 0


def test_undeclared_length_counted_while_reading() -> None:
    with pytest.raises(RequestTooLarge) as err:
        _read(GeneratedStream(fixed_chunks(BODY, 3000)), None, terminated=True,
              limits=Limits(max_request_size=10_000), read_size=2048)
    assert err.value.limit == 10_000


def test_declared_length_larger_than_the_limit_only_by_body_bytes() -> None:
    # A correct CONTENT_LENGTH under the limit: accepted exactly at the limit.
    _check(_read(io.BytesIO(BODY), limits=Limits(max_request_size=len(BODY))))


def test_bad_content_type_is_malformed() -> None:
    with pytest.raises(MalformedMultipart):
        read_multipart(io.BytesIO(BODY), content_type="multipart/form-data", content_length=len(BODY))


def test_bytearray_and_memoryview_chunks() -> None:
    class ByteArrays(io.RawIOBase):
        def __init__(self) -> None:
            self.stream = io.BytesIO(BODY)

        def read(self, size: int = -1) -> Any:
            return bytearray(self.stream.read(size))

    _check(_read(ByteArrays(), read_size=5000))


def test_progress_advance_counts_every_byte() -> None:
    class Recorder(ProgressListener):
        def __init__(self) -> None:
            self.advances: List[Tuple[int, Optional[int]]] = []

        def advance(self, received: int, total: Optional[int]) -> None:
            self.advances.append((received, total))

    rec = Recorder()
    _read(io.BytesIO(BODY), progress=rec, read_size=10_000)
    assert rec.advances[-1] == (len(BODY), len(BODY))
    assert [r for r, _ in rec.advances] == sorted(r for r, _ in rec.advances)
    assert len(rec.advances) == -(-len(BODY) // 10_000)


def test_refusal_aborts_every_handler(tmp_path: Any) -> None:
    aborted: List[str] = []

    class Watch(UploadHandler):
        def abort(self, ctx: Any, exc: Optional[BaseException]) -> None:
            aborted.append(type(exc).__name__)

    with pytest.raises(UploadError):
        _read(io.BytesIO(BODY[:-100]), handlers=[Watch(), TempFileHandler(str(tmp_path)), Watch()], read_size=4096)
    assert aborted == ["ClientDisconnected", "ClientDisconnected"]
    assert os.listdir(tmp_path) == []


def test_default_handlers_hash_and_keep_files(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    big = os.urandom(3 * 1024 * 1024)
    body = file_part("small", "s.txt", b"small") + file_part("big", "b.bin", big) + end()
    p = read_multipart(io.BytesIO(body), content_type=content_type(), content_length=len(body))
    small, large = p.ctx.files
    assert small.path is None and small.read() == b"small"
    assert large.path is not None and os.path.dirname(large.path) == str(tmp_path)
    assert large.sha256 == hashlib.sha256(big).hexdigest()
    p.close()
    assert os.listdir(tmp_path) == []


class _PacedStream:
    """A blocking stream like a socket's: read(n) returns once n bytes have
    'arrived' at ``rate`` bytes a second (or the body ends). Records each size asked."""

    def __init__(self, data: bytes, rate: Optional[float]) -> None:
        self.data = io.BytesIO(data)
        self.rate = rate
        self.asked: List[int] = []

    def read(self, size: int = -1) -> bytes:
        self.asked.append(size)
        chunk = self.data.read(size)
        if self.rate:
            time.sleep(len(chunk) / self.rate)
        return chunk


def _paced_upload(total: int, rate: Optional[float]) -> _PacedStream:
    from uploadkit.multipart import encode_multipart
    from uploadkit.handlers import MemoryHandler

    body, ctype = encode_multipart([], [("f", "a.bin", "application/octet-stream", b"x" * total)])
    stream = _PacedStream(body, rate)
    p = read_multipart(stream, content_type=ctype, content_length=len(body),
                       handlers=[MemoryHandler(64 << 20)], read_size=1 << 20)
    assert p.ctx.files[0].size == total
    p.close()
    return stream


def test_reads_grow_to_read_size_while_the_client_keeps_up() -> None:
    stream = _paced_upload(8 << 20, rate=None)
    assert stream.asked[0] == 64 * 1024
    assert max(stream.asked) == 1 << 20
    assert stream.asked[:5] == [64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 1 << 20]


def test_reads_shrink_for_a_slow_client_so_progress_moves() -> None:
    # 1 MiB/s: a 1 MiB read would block a whole second; reads settle where one
    # takes about a tenth of a second or less.
    stream = _paced_upload(1 << 20, rate=1 << 20)
    steady = stream.asked[3:-1]
    assert steady and max(steady) <= 128 * 1024, stream.asked
    assert min(stream.asked[:-1]) >= 16 * 1024  # the last read asks only for what is left


class _Pace:
    read_size = 0


def test_a_pace_carries_the_read_size_from_one_body_to_the_next() -> None:
    """A resumable upload's next PATCH starts reading where its client's last
    one left off, fast or slow, instead of at 64 KiB again."""
    from uploadkit.progress import NULL_PROGRESS
    from uploadkit.reader import _chunks

    pace = _Pace()
    fast = _PacedStream(b"f" * (4 << 20), rate=None)
    assert b"".join(_chunks(fast, 4 << 20, Limits(), 1 << 20, NULL_PROGRESS, pace=pace)) == b"f" * (4 << 20)
    assert fast.asked[0] == 64 * 1024 and pace.read_size == 1 << 20
    again = _PacedStream(b"g" * (3 << 20), rate=None)
    assert len(b"".join(_chunks(again, 3 << 20, Limits(), 1 << 20, NULL_PROGRESS, pace=pace))) == 3 << 20
    assert again.asked == [1 << 20] * 3
    # the client slowed down: its reads shrink, and the next body starts small
    slow = _PacedStream(b"s" * (2 << 20), rate=2 << 20)
    list(_chunks(slow, 2 << 20, Limits(), 1 << 20, NULL_PROGRESS, pace=pace))
    assert pace.read_size <= 128 * 1024, slow.asked
    after = _PacedStream(b"a" * 100_000, rate=None)
    list(_chunks(after, 100_000, Limits(), 1 << 20, NULL_PROGRESS, pace=pace))
    assert after.asked[0] <= 128 * 1024
    # never above the reader's own read size
    pace.read_size = 8 << 20
    capped = _PacedStream(b"c" * (2 << 20), rate=None)
    list(_chunks(capped, 2 << 20, Limits(), 1 << 20, NULL_PROGRESS, pace=pace))
    assert capped.asked == [1 << 20] * 2 and pace.read_size == 1 << 20


# -- a bare body (PUT /files/photo.png) through the same chain ----------------------------------


def test_read_raw_drives_the_same_handlers(tmp_path: Any) -> None:
    from uploadkit.reader import read_raw

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    p = read_raw(io.BytesIO(png), filename="../../etc/photo.png", content_type="application/octet-stream",
                 content_length=len(png), handlers=[HashingHandler(), TempFileHandler(str(tmp_path))])
    (f,) = p.ctx.files
    assert f.filename == "photo.png" and f.raw_filename == "../../etc/photo.png"
    assert f.size == len(png) and f.sha256 == hashlib.sha256(png).hexdigest()
    assert f.read() == png and os.path.dirname(f.path or "") == str(tmp_path)
    p.close()
    assert os.listdir(tmp_path) == []


def test_read_raw_refusals_leave_nothing(tmp_path: Any) -> None:
    from uploadkit.handlers import SniffingHandler
    from uploadkit.reader import read_raw

    data = os.urandom(300_000)
    cases = [
        (dict(content_length=len(data), limits=Limits(max_file_size=100_000)), FileTooLarge),
        (dict(content_length=len(data) + 10), ClientDisconnected),
        (dict(content_length=None), LengthRequired),
        (dict(content_length=len(data), limits=Limits(allowed_types=frozenset({"image/*"}))), UnsupportedType),
    ]
    for kwargs, error in cases:
        with pytest.raises(error):
            read_raw(io.BytesIO(data), filename="blob.bin", handlers=[SniffingHandler(), HashingHandler(),
                                                                      TempFileHandler(str(tmp_path))],
                     **kwargs)
        assert os.listdir(tmp_path) == [], error


# -- a request that declares no length (gunicorn hands it over as terminated) -------------

def test_unframed_terminated_empty_body_is_411() -> None:
    with pytest.raises(LengthRequired) as err:
        _read(io.BytesIO(b""), None, terminated=True, framed=False)
    assert err.value.status == 411
    # Declared chunked and empty: a body, just not a multipart one.
    with pytest.raises(MalformedMultipart):
        _read(io.BytesIO(b""), None, terminated=True, framed=True)
    # A server (or wrapper) that decoded the chunks and dropped the header: streamed.
    _check(_read(GeneratedStream(fixed_chunks(BODY, 3000)), None, terminated=True, framed=False))


# -- deadlines on the client's socket (Limits.idle_timeout, Limits.min_rate) ---------------

def _sock_read(tmp_path: Any, limits: Limits, feed: Any, server_timeout: Optional[float] = None,
               length: int = len(BODY)) -> Tuple[Any, float, socket.socket]:
    """Read BODY from a socketpair the way gunicorn does (read(n) waits for n
    bytes), with the server end as ``gunicorn.socket``; ``feed(client)`` sends."""
    server, client = socket.socketpair()
    server.settimeout(server_timeout)
    def send() -> None:
        try:
            feed(client)
        finally:  # the end of the stream: a reader without deadlines is not left waiting
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        with server.makefile("rb") as stream:
            result: Any = _read(stream, length, limits=limits, environ={"gunicorn.socket": server},
                                handlers=[HashingHandler(), TempFileHandler(str(tmp_path))])
    except UploadError as exc:
        result = exc
    took = time.monotonic() - started
    client.close()
    sender.join(10)
    server.close()
    return result, took, server


def test_silent_client_times_out_and_the_socket_is_given_back(tmp_path: Any) -> None:
    seen: List[Optional[float]] = []

    def stall(client: socket.socket) -> None:
        client.sendall(BODY[:20_000])
        time.sleep(1.5)  # the silence under test (the reader gives up at 0.3 s)

    result, took, server = _sock_read(tmp_path, Limits(idle_timeout=0.3, min_rate=None), stall,
                                      server_timeout=None)
    assert isinstance(result, ClientTimeout), result
    assert (result.status, result.code, result.limit) == (408, "client_timeout", 0.3)
    assert "sent nothing for 0.3 s" in result.message
    assert 0.25 < took < 1.2, took
    assert os.listdir(tmp_path) == []


def test_socket_timeout_is_restored_after_each_read(tmp_path: Any) -> None:
    server, client = socket.socketpair()
    server.settimeout(7.0)
    client.sendall(BODY)
    with server.makefile("rb") as stream:
        p = _read(stream, limits=Limits(idle_timeout=0.5, min_rate=1000),
                  environ={"gunicorn.socket": server}, read_size=4096)
    _check(p)
    assert server.gettimeout() == 7.0
    client.close()
    server.close()


def test_trickling_client_is_refused_by_min_rate(tmp_path: Any) -> None:
    stop = threading.Event()

    def trickle(client: socket.socket) -> None:
        client.sendall(BODY[:1000])
        give_up = time.monotonic() + 5  # bounds the test where nothing refuses the trickle
        for i in range(1000, len(BODY)):  # never silent for idle_timeout
            if stop.wait(0.05) or time.monotonic() > give_up:
                return
            try:
                client.send(BODY[i:i + 1])
            except OSError:
                return

    # The first read (the whole body, under 64 KiB) may take 0.5 s + its size at 64 KiB/s.
    result, took, _ = _sock_read(tmp_path, Limits(idle_timeout=0.5, min_rate=65536), trickle)
    stop.set()
    assert isinstance(result, ClientTimeout), result
    assert result.limit == 65536 and "slower than 64.0 KiB/s" in result.message
    allowed = 0.5 + len(BODY) / 65536
    assert allowed - 0.05 < took < allowed + 1.0, (took, allowed)
    assert os.listdir(tmp_path) == []


def test_servers_own_timeout_stays_client_disconnected(tmp_path: Any) -> None:
    def stall(client: socket.socket) -> None:
        client.sendall(BODY[:20_000])
        time.sleep(1.0)

    # No idle_timeout of ours: the server's 0.2 s socket timeout fires first.
    result, took, _ = _sock_read(tmp_path, Limits(idle_timeout=None, min_rate=1000), stall,
                                 server_timeout=0.2)
    assert isinstance(result, ClientDisconnected) and "timed out" in result.message, result
    assert took < 0.9


def test_no_socket_no_clock() -> None:
    _check(_read(TrickleStream(BODY, 997), limits=Limits(idle_timeout=0.001, min_rate=1),
                 environ={"SERVER_PROTOCOL": "HTTP/1.1"}))
    # HTTP/2: the socket carries other streams; it is left alone.
    server, client = socket.socketpair()
    client.sendall(BODY)
    with server.makefile("rb") as stream:
        _check(_read(stream, limits=Limits(idle_timeout=0.001, min_rate=1),
                     environ={"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/2.0"}))
    assert server.gettimeout() is None
    client.close()
    server.close()


@pytest.mark.parametrize("value", [0, -1, True, "60", float("inf"), float("nan")])
def test_deadline_limits_are_validated(value: Any) -> None:
    for name in ("idle_timeout", "min_rate"):
        with pytest.raises(ValueError, match=name):
            Limits(**{name: value})
    assert Limits(idle_timeout=None, min_rate=None).idle_timeout is None
    assert (Limits().idle_timeout, Limits().min_rate) == (60.0, 500)


def test_deadline_watchdog_fires_and_forgets_cancelled_reads() -> None:
    from uploadkit.deadlines import WATCHDOG

    # A fast upload: many reads, each with a deadline minutes away, each cancelled.
    for _ in range(10_000):
        WATCHDOG.cancel(WATCHDOG.schedule(time.monotonic() + 600, lambda: None))
    assert len(WATCHDOG._heap) < 200
    fired = threading.Event()
    WATCHDOG.schedule(time.monotonic() + 0.05, fired.set)
    assert fired.wait(5)


def test_time_the_server_spends_on_the_bytes_is_not_the_clients(tmp_path: Any) -> None:
    """Slow storage (here a handler that takes 0.4 s a chunk) does not count
    against a client that sent everything at once."""
    class SlowSink(UploadHandler):
        def receive(self, info: Any, chunk: bytes) -> Optional[bytes]:
            time.sleep(0.4)
            return chunk

    server, client = socket.socketpair()
    sender = threading.Thread(target=client.sendall, args=(BODY,), daemon=True)
    sender.start()
    with server.makefile("rb") as stream:
        p = _read(stream, limits=Limits(idle_timeout=0.3, min_rate=10_000_000),
                  environ={"gunicorn.socket": server}, read_size=16384,
                  handlers=[SlowSink(), HashingHandler(), MemoryHandler()])
    _check(p)
    sender.join(10)
    client.close()
    server.close()
