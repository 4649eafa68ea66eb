"""The plug point: handlers that every file's bytes stream through.

A request's handlers form a chain, built fresh for each request (they hold
per-request state). The pipeline (:mod:`uploadkit.pipeline`) drives them:

``request_start(ctx)``
    once, before the first part.
``file_start(info)``
    once a file's first bytes are in ``info.head``; return :data:`SKIP` to drop
    the file (handlers that already started it get ``file_skipped``), raise an
    :class:`~uploadkit.errors.UploadError` to refuse the request.
``receive(info, chunk)``
    each chunk, in chain order; return the chunk (or a transformed one) to pass
    it on, or ``None`` to stop it here (a sink keeps it).
``flush(info)``
    at the file's end: bytes a transforming handler held back, passed on to the
    handlers after it.
``file_end(info)``
    on every handler; the first :class:`~uploadkit.files.UploadedFile` returned
    is the file.
``request_end(ctx)``
    after the last part; may still refuse. Sinks commit here, so they go last.
``request_committed(ctx)``
    once every ``request_end`` succeeded: files have their final keys, so
    derived files (thumbnails) are stored here. A failure still aborts all.
``close(ctx)``
    when the response is closed (or the app raised): release temp files.
``abort(ctx, exc)``
    on **every** handler for any refusal, error or disconnect: release exactly
    what this handler opened. It must not raise.

Handlers return values instead of raising to steer each other; only refusals
raise.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from .errors import QuotaExceeded, StorageUnavailable, UnsupportedType, format_size
from .files import FileInfo, UploadedFile, bytes_opener, path_opener
from .sniffing import check_type, sniff

if TYPE_CHECKING:
    from .pipeline import RequestContext


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


#: Returned from ``file_start`` to drop a file: its bytes are read and discarded.
SKIP: Any = _Skip()


class UploadHandler:
    """Base class with do-nothing hooks: override what you need."""

    def request_start(self, ctx: "RequestContext") -> None:
        pass

    def file_start(self, info: FileInfo) -> Any:
        return None

    def file_skipped(self, info: FileInfo) -> None:
        pass

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        return chunk

    def flush(self, info: FileInfo) -> Optional[bytes]:
        return None

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        return None

    def request_end(self, ctx: "RequestContext") -> None:
        pass

    def request_committed(self, ctx: "RequestContext") -> None:
        pass

    def close(self, ctx: "RequestContext") -> None:
        pass

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        pass


class SniffingHandler(UploadHandler):
    """Sets ``info.content_type`` from the file's first bytes and enforces
    ``Limits.allowed_types`` before a single byte is stored."""

    def request_start(self, ctx: "RequestContext") -> None:
        self.limits = ctx.limits

    def file_start(self, info: FileInfo) -> Any:
        sniffed = sniff(info.head)
        if sniffed:
            info.content_type = sniffed
        problem = check_type(info, sniffed, self.limits)
        if problem:
            raise UnsupportedType(problem, field=info.field_name,
                                  limit=sorted(self.limits.allowed_types or ()))
        return None


_Batch = List[Tuple[List[Any], bytes]]

#: hashlib's named constructors: ``hashlib.new(name)`` looks the digest up by
#: name on every call, about 2 µs a file more in a request of many small files.
_CONSTRUCTORS: Dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "md5": hashlib.md5}


class _HashWorker(threading.Thread):
    """Feeds chunks to hash objects on a second core.

    hashlib releases the GIL for buffers over 2 KiB, so hashing here runs beside
    the parse and the write. Chunks travel in batches of about a megabyte (one
    queue hand-off costs a lock round trip), and the queue is bounded so a slow
    hash cannot let chunks pile up in memory.
    """

    def __init__(self, depth: int) -> None:
        super().__init__(name="uploadkit-hash", daemon=True)
        self.queue: "queue.Queue[Union[_Batch, threading.Event, None]]" = queue.Queue(maxsize=depth)
        self.start()

    def run(self) -> None:
        get = self.queue.get
        while self._handle(get()):
            pass

    @staticmethod
    def _handle(item: "Union[_Batch, threading.Event, None]") -> bool:
        """Hash one batch (or set a barrier); False on the stop sentinel."""
        if item is None:
            return False
        if isinstance(item, threading.Event):
            item.set()
            return True
        for hashers, chunk in item:
            for h in hashers:
                h.update(chunk)
        return True

    def barrier(self) -> None:
        """Wait until everything queued so far is hashed."""
        done = threading.Event()
        self.queue.put(done)
        done.wait()

    def stop(self) -> None:
        self.queue.put(None)
        self.join()

    def stop_later(self) -> None:
        """Let the thread end once what is queued is hashed, without waiting
        for it: whoever uses the hash objects next calls ``join`` first."""
        self.queue.put(None)


class HashingHandler(UploadHandler):
    """Computes sha256 (and md5 on request) while the files stream.

    A file is hashed inline until it passes ``offload_after`` bytes: handing
    small chunks to a thread costs more in GIL hand-offs than hashing them.
    The rest of a larger file goes to one worker thread per request, which
    hashes while this thread parses and writes; those digests are collected at
    the end of the request, before any sink commits. With ``sync=True``, or
    when a handler set ``ctx.digests_at_file_end`` (content-named storage
    does), each file's digest is ready at its ``file_end``, at the price of
    waiting for the hash there.
    """

    def __init__(self, sha256: bool = True, md5: bool = False, *, sync: bool = False,
                 offload_after: int = 256 * 1024, batch_size: int = 1024 * 1024,
                 queue_depth: int = 8) -> None:
        self.algorithms = [a for a, on in (("sha256", sha256), ("md5", md5)) if on]
        self.sync = sync
        self.offload_after = offload_after
        self.batch_size = batch_size
        self.queue_depth = queue_depth
        self._hashers: List[Any] = []
        self._worker: Optional[_HashWorker] = None
        self._seen = 0
        self._batch: _Batch = []
        self._batch_bytes = 0
        self._unfinished: List[Tuple[FileInfo, List[Any]]] = []
        self._ctx: Optional["RequestContext"] = None
        self._offloading = False  # this file's chunks go to the worker

    def request_start(self, ctx: "RequestContext") -> None:
        self._ctx = ctx

    def file_start(self, info: FileInfo) -> Any:
        self._hashers = [_CONSTRUCTORS[a]() for a in self.algorithms]
        self._seen = 0
        self._offloading = False
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        if self._offloading:
            self._batch.append((self._hashers, chunk))
            self._batch_bytes += len(chunk)
            if self._batch_bytes >= self.batch_size:
                self._send()
            return chunk
        for h in self._hashers:
            h.update(chunk)
        self._seen += len(chunk)
        if self._seen >= self.offload_after and self._hashers:
            self._offloading = True
            if self._worker is None:
                self._worker = self._new_worker()
        return chunk

    def _new_worker(self) -> _HashWorker:
        return _HashWorker(self.queue_depth)

    def _send(self) -> None:
        if self._batch and self._worker is not None:
            self._worker.queue.put(self._batch)
            self._batch = []
            self._batch_bytes = 0

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        if not self._offloading:
            self._set_digests(info, self._hashers)  # hashed inline: ready now
        elif self.sync or (self._ctx is not None and self._ctx.digests_at_file_end):
            assert self._worker is not None
            self._send()
            self._worker.barrier()
            self._set_digests(info, self._hashers)
        else:
            self._unfinished.append((info, self._hashers))
        self._offloading = False
        return None

    def request_end(self, ctx: "RequestContext") -> None:
        if self._worker is not None:
            self._send()
            self._worker.stop()
            self._worker = None
        self._finish()

    def _finish(self) -> None:
        for info, hashers in self._unfinished:
            self._set_digests(info, hashers)
        self._unfinished.clear()

    def _set_digests(self, info: FileInfo, hashers: List[Any]) -> None:
        for name, h in zip(self.algorithms, hashers):
            digest = h.hexdigest()
            setattr(info, name, digest)
            if info.file is not None:
                setattr(info.file, name, digest)

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        self._batch = []
        self._unfinished.clear()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


class QuotaHandler(UploadHandler):
    """Refuses the request once its files pass what the caller may still store.

    ``quota(environ)`` returns the bytes left for this caller, or None for no quota.
    """

    def __init__(self, quota: Callable[[Any], Optional[int]]) -> None:
        self.quota = quota
        self.left: Optional[int] = None
        self.used = 0

    def request_start(self, ctx: "RequestContext") -> None:
        # CONTENT_LENGTH bounds the files' bytes from above, not below, so the
        # quota can only be judged as the bytes arrive.
        self.left = self.quota(ctx.environ)

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        if self.left is not None:
            self.used += len(chunk)
            if self.used > self.left:
                raise QuotaExceeded(
                    f"the upload needs more than the {format_size(self.left)} left in your quota",
                    field=info.field_name, limit=self.left)
        return chunk


class MemoryHandler(UploadHandler):
    """Keeps small files in memory, up to ``threshold`` bytes for the whole request.

    A file that would pass the budget is handed on (what was held and the new
    chunk) to the next handler, usually :class:`TempFileHandler`.
    """

    def __init__(self, threshold: int = 2_621_440) -> None:  # 2.5 MiB, Django's default
        self.threshold = threshold
        self.held = 0
        self._chunks: Optional[List[bytes]] = None

    def file_start(self, info: FileInfo) -> Any:
        self._chunks = []
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        chunks = self._chunks
        if chunks is None:
            return chunk
        if self.held + len(chunk) <= self.threshold:
            chunks.append(chunk)
            self.held += len(chunk)
            return None
        self._chunks = None
        self.held -= sum(map(len, chunks))
        if chunks:
            chunks.append(chunk)
            return b"".join(chunks)
        return chunk

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        chunks, self._chunks = self._chunks, None
        if chunks is None:
            return None
        data = b"".join(chunks)
        return UploadedFile.from_info(info, bytes_opener(data), size=len(data))

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        self._chunks = None


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


#: The most bytes one ``write()`` hands the kernel. Measured on a VM that
#: gives free memory back to its host (free page reporting): a 256 MiB upload
#: written to ext4 in 1 MiB writes took from 0.12 to 0.64 s of system time, the
#: extra all in copying into fresh page-cache pages, while 64 KiB writes stayed
#: at 0.10 to 0.18 s over 25 uploads. Our reading: the kernel backs a larger
#: write with larger page-cache folios, taken from free memory the host must
#: fault in again. Where that never happens, smaller writes cost about 10 ms
#: more per 256 MiB on ext4 (a parse took 125 ms instead of 114) and nothing
#: measurable on tmpfs (benchmarks/README.md).
WRITE_SIZE = 64 * 1024


def write_all(fd: int, data: bytes, offset: int = 0) -> None:
    """Write all of ``data`` to ``fd``, :data:`WRITE_SIZE` bytes at most at a
    time, resuming after short writes (a signal, a filling disk).

    ``offset`` is where ``data`` lands in the file (the bytes written before
    it). The pieces are cut at multiples of ``WRITE_SIZE`` in the file, not in
    ``data``: a file part starts after its headers, at an odd place in the
    body, and pieces cut from there would each straddle the page cache's
    blocks. On ext4, 256 MiB written in 64 KiB pieces 200 bytes off the blocks
    took 0.13 to 0.18 s and 0.035 to 0.045 s to unlink, against 0.09 to 0.11 s
    and 0.02 to 0.03 s in aligned pieces (on tmpfs it made no difference).
    Behind gunicorn a 256 MiB upload took 0.05 s less CPU and ran 1.06 times
    as fast. A chunk that does not start on a block costs one short piece more.

    :raises OSError: from ``os.write``.
    """
    size = len(data)
    if size <= WRITE_SIZE - offset % WRITE_SIZE:
        written = os.write(fd, data)
        if written == size:
            return
    else:
        written = 0
    view = memoryview(data)
    while written < size:
        end = written + WRITE_SIZE - (offset + written) % WRITE_SIZE
        written += os.write(fd, view[written:end])


class TempFileHandler(UploadHandler):
    """Writes files to temp files in ``tempdir``, removed when the response closes.

    The temp file is created on the first byte that reaches this handler, so a
    file an earlier handler kept (in memory, say) leaves no empty file behind.
    Chunks go to the file descriptor with :func:`write_all`: they arrive in
    blocks far larger than any buffer would gather, and a buffered file object
    costs more to make and close than the write of a small file itself.
    """

    def __init__(self, tempdir: Optional[str] = None, prefix: str = "uploadkit-") -> None:
        self.tempdir = tempdir
        self.prefix = prefix
        self.paths: List[str] = []
        self._fd = -1
        self._size = 0
        # One random token a request and a counter: as unguessable as mkstemp's
        # names, without drawing six random letters for every file.
        self._base = ""

    def _new_base(self) -> str:
        directory = self.tempdir or tempfile.gettempdir()
        self._base = os.path.join(directory, f"{self.prefix}{secrets.token_hex(8)}-")
        return self._base

    def _open(self) -> int:
        base = self._base or self._new_base()
        for _ in range(100):
            path = f"{base}{len(self.paths)}.part"
            try:
                fd = os.open(path, _CREATE_FLAGS, 0o600)
            except FileExistsError:
                base = self._new_base()
                continue
            except OSError as exc:
                raise StorageUnavailable(f"cannot create a temp file: {exc.strerror or exc}") from None
            self.paths.append(path)
            return fd
        raise StorageUnavailable("cannot create a temp file: every name tried was taken")

    def file_start(self, info: FileInfo) -> Any:
        self._size = 0
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        fd = self._fd
        if fd < 0:
            fd = self._fd = self._open()
        try:
            write_all(fd, chunk, self._size)
        except OSError as exc:  # disk full, quota, I/O error
            raise StorageUnavailable(f"writing a temp file failed: {exc.strerror or exc}") from None
        self._size += len(chunk)
        return None

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        fd, self._fd = self._fd, -1
        if fd < 0:
            if info.file is not None:
                return None
            fd = self._open()  # an empty file nobody kept
        try:
            os.close(fd)
        except OSError as exc:
            raise StorageUnavailable(f"writing a temp file failed: {exc.strerror or exc}") from None
        path = self.paths[-1]
        return UploadedFile.from_info(info, path_opener(path), size=self._size, path=path)

    def _remove_all(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()

    def close(self, ctx: "RequestContext") -> None:
        self._remove_all()

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        self._remove_all()


def default_handlers(*, tempdir: Optional[str] = None, memory_threshold: int = 2_621_440,
                     sha256: bool = True, md5: bool = False,
                     quota: Optional[Callable[[Any], Optional[int]]] = None,
                     storage: Any = None, thumbnails: Any = None) -> List[UploadHandler]:
    """A fresh chain in the order that makes every guarantee hold: sniff and
    refuse before storing, hash before the sink reads ``info.sha256``, thumbnails
    before the sink commits, the sink last."""
    chain: List[UploadHandler] = [SniffingHandler()]
    if sha256 or md5:
        chain.append(HashingHandler(sha256=sha256, md5=md5))
    if quota is not None:
        chain.append(QuotaHandler(quota))
    if thumbnails is not None:
        chain.append(thumbnails.handler(storage))
    if storage is not None:
        chain.append(storage.handler())
    else:
        if memory_threshold > 0:
            chain.append(MemoryHandler(memory_threshold))
        chain.append(TempFileHandler(tempdir))
    return chain
