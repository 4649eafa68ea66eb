"""Drives a chain of handlers through one request: the station between the
parser's events and the sinks that keep the bytes.

The pipeline knows nothing of multipart or WSGI: a multipart body, a bare PUT
or a resumable upload all drive it with the same calls (``start``,
``add_field``, ``start_file``/``feed``/``end_file``, ``finish``, then ``close``
or ``abort``). It enforces the per-file limits itself, so a custom chain of
handlers cannot forget them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from wsgiref.headers import Headers

from .errors import FileTooLarge, InternalError, UploadError, format_size
from .files import FileInfo, UploadedFile
from .filenames import sanitize_filename
from .handlers import SKIP, UploadHandler
from .limits import Limits
from .progress import NULL_PROGRESS, ProgressListener
from .sniffing import HEAD_SIZE, normalize_type

log = logging.getLogger("uploadkit")


@dataclass(eq=False)
class RequestContext:
    """What one request's handlers share."""

    limits: Limits
    #: The WSGI environ, or None when driven outside WSGI.
    environ: Optional[Dict[str, Any]] = None
    #: Declared body size; None for a chunked body.
    content_length: Optional[int] = None
    #: Finished files, in body order.
    files: List[UploadedFile] = field(default_factory=list)
    #: Text fields, in body order.
    fields: List[Tuple[str, str]] = field(default_factory=list)
    #: Set in ``request_start`` by a handler that reads ``info.sha256``/``md5``
    #: in its ``file_end`` (content-named storage): the hashing handler then
    #: finishes each digest at the file's end instead of at the request's.
    digests_at_file_end: bool = False
    #: Free space for handlers that need to talk to each other.
    state: Dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One request's run through ``handlers``.

    :raises UploadError: from any call, when a limit or a handler refuses; the
        caller then calls :meth:`abort`.
    """

    def __init__(self, handlers: Sequence[UploadHandler], ctx: RequestContext,
                 progress: ProgressListener = NULL_PROGRESS, head_size: int = HEAD_SIZE) -> None:
        self.handlers = list(handlers)
        # The hooks each file goes through, without the handlers that keep the
        # base class's do-nothing version: a chain of several handlers then
        # costs a file only the calls that do something.
        self._starters = [(i, h) for i, h in enumerate(self.handlers) if _acts(h, "file_start")]
        self._receivers = _overriding(self.handlers, "receive")
        # A flushing handler's tail goes only to the receivers after it.
        self._flushers = [(h, _overriding(self.handlers[i + 1:], "receive"))
                          for i, h in enumerate(self.handlers) if _acts(h, "flush")]
        self._enders = _overriding(self.handlers, "file_end")
        self.ctx = ctx
        self.progress = progress
        self.head_size = head_size
        self._info: Optional[FileInfo] = None
        self._pending: Optional[List[bytes]] = None  # bytes before file_start
        self._pending_len = 0
        self._skipped = False
        self._file_count = 0
        self._ended = False

    # -- request ---------------------------------------------------------

    def start(self) -> None:
        self.progress.start(self.ctx)
        for h in self.handlers:
            h.request_start(self.ctx)

    def add_field(self, name: str, value: str, headers: Any = None) -> None:
        self.ctx.fields.append((name, value))

    def finish(self) -> None:
        """After the last part: handlers may still refuse, then sinks commit."""
        if self._info is not None:
            raise RuntimeError("finish() called inside a file")
        self.progress.processing()
        for h in self.handlers:
            h.request_end(self.ctx)
        for h in self.handlers:
            h.request_committed(self.ctx)
        self.progress.done(self.ctx)

    def close(self) -> None:
        """The response is over: handlers release temp files. Idempotent."""
        if self._ended:
            return
        self._ended = True
        for h in self.handlers:
            try:
                h.close(self.ctx)
            except Exception:
                log.exception("uploadkit: %s.close failed", type(h).__name__)

    def abort(self, exc: Optional[BaseException]) -> None:
        """Every handler releases what it opened. Idempotent; never raises."""
        if self._ended:
            return
        self._ended = True
        self._info = None
        self._pending = None
        for h in self.handlers:
            try:
                h.abort(self.ctx, exc)
            except Exception:
                log.exception("uploadkit: %s.abort failed", type(h).__name__)
        reported = exc if isinstance(exc, UploadError) else InternalError(
            "the upload failed on the server" if exc is not None else "the upload was abandoned")
        try:
            self.progress.error(reported)
        except Exception:
            log.exception("uploadkit: progress listener failed")

    # -- files -----------------------------------------------------------

    def start_file(self, field_name: str, raw_filename: str, declared_type: str = "",
                   headers: Union[Headers, Sequence[Tuple[str, str]], None] = None, *,
                   resume_at: int = 0, head: bytes = b"") -> FileInfo:
        """Begin a file; its bytes follow through :meth:`feed`.

        ``resume_at`` continues a file whose first ``resume_at`` bytes went
        through a chain in earlier requests (a resumable upload): the size
        limit counts them, ``head`` (the file's first bytes, kept by the
        caller) is what ``file_start`` sees, and only the new bytes are pushed.
        """
        declared = normalize_type(declared_type) if declared_type else ""
        info = FileInfo(
            field_name=field_name,
            filename=sanitize_filename(raw_filename, self.ctx.limits.max_filename_length),
            raw_filename=raw_filename,
            declared_type=declared,
            content_type=declared or "application/octet-stream",
            headers=headers if isinstance(headers, Headers) else Headers(list(headers or ())),
            index=self._file_count,
        )
        self._file_count += 1
        self._info = info
        self._pending = []
        self._pending_len = 0
        self._skipped = False
        self.progress.file_start(info)
        if resume_at:
            info.size = resume_at
            info.head = head[: self.head_size]
            self._pending = None
            self._call_starters(info)
        return info

    def feed(self, data: bytes) -> None:
        info = self._info
        assert info is not None, "feed() outside a file"
        info.size += len(data)
        limit = self.ctx.limits.max_file_size
        if limit is not None and info.size > limit:
            raise FileTooLarge(
                f"file {info.filename!r} is larger than the limit of {format_size(limit)}",
                field=info.field_name, limit=limit)
        pending = self._pending
        if pending is not None:
            pending.append(data)
            self._pending_len += len(data)
            if self._pending_len < self.head_size:
                return
            data = self._begin()
        if not self._skipped:
            self._push(info, data, self._receivers)

    def end_file(self) -> Optional[UploadedFile]:
        info = self._info
        assert info is not None, "end_file() outside a file"
        if self._pending is not None:
            data = self._begin()
            if data and not self._skipped:
                self._push(info, data, self._receivers)
        self._info = None
        if self._skipped:
            return None
        for h, after in self._flushers:
            tail = h.flush(info)
            if tail:
                self._push(info, tail, after)
        for h in self._enders:
            result = h.file_end(info)
            if result is not None and info.file is None:
                info.file = result
        info.head = b""
        self.progress.file_end(info)
        if info.file is not None:
            self.ctx.files.append(info.file)
        return info.file

    def _begin(self) -> bytes:
        """Call every file_start once the head is known; return the held bytes."""
        info = self._info
        assert info is not None and self._pending is not None
        data = b"".join(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending = None
        info.head = data[: self.head_size]
        self._call_starters(info)
        return data

    def _call_starters(self, info: FileInfo) -> None:
        for i, h in self._starters:
            if h.file_start(info) is SKIP:
                for started in self.handlers[:i]:
                    started.file_skipped(info)
                self._skipped = True
                break

    def _push(self, info: FileInfo, chunk: Optional[bytes], receivers: List[UploadHandler]) -> None:
        for h in receivers:
            chunk = h.receive(info, chunk)  # type: ignore[arg-type]
            if chunk is None:
                return


def _acts(handler: UploadHandler, hook: str) -> bool:
    """Whether ``handler`` has a ``hook`` other than the base class's no-op
    (a handler written to the protocol need not define every hook)."""
    method = getattr(handler, hook, None)
    return method is not None and getattr(method, "__func__", method) is not getattr(UploadHandler, hook)


def _overriding(handlers: Sequence[UploadHandler], hook: str) -> List[UploadHandler]:
    return [h for h in handlers if _acts(h, hook)]
