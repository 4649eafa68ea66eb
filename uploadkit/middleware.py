"""The WSGI station: intercepts multipart uploads, streams them through the
pipeline before the app runs, and hands the app finished files.

Everything else (GET, JSON, urlencoded, ``multipart/mixed``...) passes through
untouched, body unread. Refusals never reach the app: they are answered here
with a JSON 4xx naming the problem.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

from webob.multidict import MultiDict

from .errors import MalformedMultipart, UploadError
from .handlers import UploadHandler, default_handlers
from .limits import Limits
from .multipart import encode_multipart, filename_from_disposition
from .pipeline import Pipeline
from .progress import NULL_PROGRESS, ProgressListener
from .reader import DEFAULT_READ_SIZE, read_multipart, read_raw

log = logging.getLogger("uploadkit")

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Environ keys the app reads. Namespaced, so they cannot clash with the server's.
FILES_KEY = "uploadkit.files"
FORM_KEY = "uploadkit.form"
CONTEXT_KEY = "uploadkit.context"

# Caches of a parsed body that would describe the old body after the swap.
_STALE_KEYS = ("webob._parsed_post_vars", "webob._body_file", "webob.is_body_seekable",
               "werkzeug.request", "HTTP_TRANSFER_ENCODING")
_METHODS = frozenset(["POST", "PUT", "PATCH"])
# Refusals after which the rest of the body is not waited for: the client went
# away, or is too slow to be waited for again.
_GONE = frozenset(["client_disconnected", "client_timeout"])


def _json_error(start_response: StartResponse, exc: UploadError) -> List[bytes]:
    body = exc.to_json()
    start_response(f"{exc.status} {_REASONS.get(exc.status, 'Error')}", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ])
    return [body]


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Content", 503: "Service Unavailable"}


class _CountingInput:
    """Counts what the reader took, so a refusal knows how much body is left."""

    __slots__ = ("stream", "count")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.count += len(data)
        return data


class ClosingResponse:
    """The app's iterable, with the upload's cleanup run on ``close()``."""

    def __init__(self, iterable: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.iterable = iterable
        self.on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.iterable)

    def close(self) -> None:
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        finally:
            self.on_close()


class UploadMiddleware:
    """Wrap a WSGI app so its multipart uploads stream in constant memory.

    :param limits: a :class:`Limits`, or a callable ``environ -> Limits`` for
        per-route limits.
    :param tempdir: where temp files go (default: the system's).
    :param handlers: a callable ``environ -> list of handlers`` replacing the
        default chain (see :meth:`default_handlers` to extend it).
    :param paths: path prefixes, or a callable ``environ -> bool``, selecting
        which requests are intercepted (default: all).
    :param raw_paths: path prefixes where a ``PUT`` body is the file itself
        (``curl -T photo.jpg https://site/files/photo.jpg``): it streams through
        the same chain and reaches the app as one file in field ``file``, named
        by a ``Content-Disposition: attachment; filename=...`` header if sent,
        else by the last path segment. Default: none.
    :param read_size: bytes per read from ``wsgi.input``.
    :param storage: a :class:`uploadkit.storage.Storage`: files stream straight into it.
    :param thumbnails: a :class:`uploadkit.imaging.Thumbnailer`.
    :param progress: a progress store (default: an in-process memory store);
        ``False`` turns progress off.
    :param progress_path: the status route served by this middleware (None: not served).
    :param progress_key: ``environ -> id or None``: where the progress id comes from.
    :param quota: ``environ -> bytes the caller may still store, or None``.
    :param drain_limit: after a refusal, up to this many unread body bytes are
        read and dropped so the client sees the answer instead of a reset.
    :param tus: a :class:`uploadkit.tusapp.TusSettings` (or True for the
        defaults) to serve tus resumable uploads under its ``path`` through
        this middleware's chain, storage and progress.
    """

    def __init__(self, app: WSGIApp, *, limits: Union[Limits, Callable[[Environ], Limits]] = Limits(),
                 tempdir: Optional[str] = None,
                 handlers: Optional[Callable[[Environ], Sequence[UploadHandler]]] = None,
                 paths: Union[None, Sequence[str], Callable[[Environ], bool]] = None,
                 raw_paths: Sequence[str] = (),
                 read_size: int = DEFAULT_READ_SIZE, storage: Any = None, thumbnails: Any = None,
                 progress: Any = None, progress_path: Optional[str] = "/upload/progress",
                 progress_key: Optional[Callable[[Environ], Optional[str]]] = None,
                 progress_settings: Any = None,
                 quota: Optional[Callable[[Environ], Optional[int]]] = None,
                 hash_sha256: bool = True, hash_md5: bool = False,
                 memory_threshold: int = 2_621_440, drain_limit: int = 4 << 20,
                 tus: Any = None) -> None:
        if thumbnails is not None and storage is None:
            log.info("uploadkit: thumbnails without storage are kept on the files, not stored")
        self.app = app
        self.limits = limits
        self.tempdir = tempdir
        self.handlers = handlers
        self.paths = paths
        self.raw_paths = tuple(raw_paths)
        self.read_size = read_size
        self.storage = storage
        self.thumbnails = thumbnails
        self.quota = quota
        self.hash_sha256 = hash_sha256
        self.hash_md5 = hash_md5
        self.memory_threshold = memory_threshold
        self.drain_limit = drain_limit
        self.progress_path = progress_path.rstrip("/") if progress_path else None
        self.progress_key = progress_key
        self._setup_progress(progress, progress_settings)
        self.tus_app: Any = None
        if tus is not None and tus is not False:
            from .tusapp import TusApp, TusSettings

            self.tus_app = TusApp(self, TusSettings() if tus is True else tus)

    def _setup_progress(self, store: Any, settings: Any) -> None:
        self.progress_store = None
        self.progress_app: Optional[WSGIApp] = None
        if store is False:
            return
        from . import progress as progress_mod

        if store is None:
            store = progress_mod.MemoryStore()
        self.progress_store = store
        self.progress_settings = settings if settings is not None else progress_mod.ProgressSettings()
        self.progress_app = progress_mod.ProgressApp(store, self.progress_settings,
                                                     progress_key=self.progress_key)

    # -- configuration hooks ---------------------------------------------

    def limits_for(self, environ: Environ) -> Limits:
        return self.limits(environ) if callable(self.limits) else self.limits

    def default_handlers(self, environ: Environ) -> List[UploadHandler]:
        """The chain built from this middleware's options, fresh for one request."""
        needed: frozenset[str] = getattr(self.storage, "required_hashes", frozenset())
        return default_handlers(tempdir=self.tempdir, memory_threshold=self.memory_threshold,
                                sha256=self.hash_sha256 or "sha256" in needed,
                                md5=self.hash_md5 or "md5" in needed, quota=self.quota,
                                storage=self.storage, thumbnails=self.thumbnails)

    def handlers_for(self, environ: Environ) -> List[UploadHandler]:
        if self.handlers is not None:
            return list(self.handlers(environ))
        return self.default_handlers(environ)

    def progress_for(self, environ: Environ) -> ProgressListener:
        """A listener for this upload, or the no-op one when it carries no id.

        :raises BadProgressId: the id is not ``[A-Za-z0-9_-]{1,64}``.
        """
        if self.progress_store is None:
            return NULL_PROGRESS
        from . import progress as progress_mod

        if self.progress_key is not None:
            pid = self.progress_key(environ)
            pid = progress_mod.validate_progress_id(pid) if pid else None
        else:
            pid = progress_mod.progress_id_from_environ(environ)
        if pid is None:
            return NULL_PROGRESS
        return progress_mod.StoreProgress(self.progress_store, pid, self.progress_settings)

    def intercepts(self, environ: Environ) -> bool:
        if environ.get("REQUEST_METHOD", "GET").upper() not in _METHODS:
            return False
        ctype = environ.get("CONTENT_TYPE", "")
        if ctype.split(";", 1)[0].strip().lower() != "multipart/form-data":
            return False
        paths = self.paths
        if paths is None:
            return True
        if callable(paths):
            return bool(paths(environ))
        path = environ.get("PATH_INFO", "")
        return any(path.startswith(prefix) for prefix in paths)

    def intercepts_raw(self, environ: Environ) -> bool:
        """A bare ``PUT`` of one file to one of ``raw_paths``."""
        if not self.raw_paths or environ.get("REQUEST_METHOD", "GET").upper() != "PUT":
            return False
        ctype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if ctype.startswith("multipart/"):
            return False
        path = environ.get("PATH_INFO", "")
        return any(path.startswith(prefix) for prefix in self.raw_paths)

    # -- WSGI ------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.progress_app is not None and self.progress_path:
            path = environ.get("PATH_INFO", "")
            if path == self.progress_path or path.startswith(self.progress_path + "/"):
                return self.progress_app(environ, start_response)
        if self.tus_app is not None and self.tus_app.handles(environ):
            return self.tus_app(environ, start_response)  # type: ignore[no-any-return]
        if not (self.intercepts(environ) or self.intercepts_raw(environ)):
            return self.app(environ, start_response)
        return self._upload(environ, start_response)

    def stream(self, environ: Environ, stream: Any = None,
               limits: Optional[Limits] = None) -> Pipeline:
        """Stream the body of ``environ`` (multipart, or a bare ``PUT`` to one
        of ``raw_paths``) through this middleware's chain and hand it over
        (environ keys, re-encoded body).

        The middleware itself calls it; so do framework adapters that meet the
        body inside the framework. The caller closes the returned pipeline once
        the response is over.

        :param stream: where the body is read from (default ``wsgi.input``).
        :param limits: overrides :meth:`limits_for` (per-view limits).
        :raises UploadError: a refusal. Every handler was aborted, the progress
            id (if any) says ``error``, and up to ``drain_limit`` unread body
            bytes were read and dropped so the client sees the answer.
        """
        counted = _CountingInput(environ["wsgi.input"] if stream is None else stream)
        content_length = _content_length(environ)
        progress: ProgressListener = NULL_PROGRESS
        try:
            progress = self.progress_for(environ)
            if content_length == -1:
                raise MalformedMultipart("the Content-Length header is not a number")
            common: Dict[str, Any] = dict(
                content_length=content_length,
                limits=limits if limits is not None else self.limits_for(environ),
                handlers=self.handlers_for(environ), environ=environ, progress=progress,
                read_size=self.read_size, terminated=bool(environ.get("wsgi.input_terminated")),
                framed=content_length is not None or _chunked(environ))
            if self.intercepts_raw(environ):
                pipeline = read_raw(counted, filename=_raw_filename(environ),
                                    content_type=environ.get("CONTENT_TYPE", ""), **common)
            else:
                pipeline = read_multipart(counted, content_type=environ.get("CONTENT_TYPE", ""), **common)
        except UploadError as exc:
            # Refusals raised before the pipeline started (411, a 413 from the
            # declared length) must still end the progress bar; a second call
            # after the pipeline's own is ignored by the listener.
            progress.error(exc)
            self._drain(counted, content_length, exc)
            log.info("uploadkit: refused %s %s: %s", environ.get("REQUEST_METHOD"),
                     environ.get("PATH_INFO"), exc.message)
            raise
        self.hand_over(environ, pipeline)
        return pipeline

    def _upload(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            pipeline = self.stream(environ)
        except UploadError as exc:
            return _json_error(start_response, exc)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            pipeline.close()
            raise
        return ClosingResponse(result, pipeline.close)

    def _drain(self, stream: _CountingInput, content_length: Optional[int], exc: UploadError) -> None:
        """Read what is left of a refused body, if little, so the client gets the answer."""
        if content_length is None or content_length < 0 or exc.code in _GONE:
            return
        left = content_length - stream.count
        if left <= 0 or left > self.drain_limit:
            return
        try:
            while left > 0:
                chunk = stream.read(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
        except (OSError, ValueError, AssertionError):  # Django's test input asserts on over-reads
            return

    def hand_over(self, environ: Environ, pipeline: Pipeline) -> None:
        """Give the app the files and a small body that describes them."""
        ctx = pipeline.ctx
        files: MultiDict = MultiDict()
        for f in ctx.files:
            files.add(f.field_name, f)
        form: MultiDict = MultiDict(ctx.fields)
        fields = list(ctx.fields)
        for f in ctx.files:
            fields.extend((f"{f.field_name}.{suffix}", value) for suffix, value in f.metadata())
        body, content_type = encode_multipart(fields)
        for key in _STALE_KEYS:
            environ.pop(key, None)
        environ["uploadkit.original_content_type"] = environ.get("CONTENT_TYPE", "")
        environ["uploadkit.original_content_length"] = environ.get("CONTENT_LENGTH", "")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_TYPE"] = content_type
        environ["CONTENT_LENGTH"] = str(len(body))
        environ[FILES_KEY] = files
        environ[FORM_KEY] = form
        environ[CONTEXT_KEY] = ctx


def _raw_filename(environ: Environ) -> str:
    """The name of a bare upload: Content-Disposition's filename (RFC 6266, with
    ``filename*``), else the last path segment. Untrusted, like any filename:
    the pipeline sanitizes it."""
    disposition = environ.get("HTTP_CONTENT_DISPOSITION", "")
    if disposition:
        name = filename_from_disposition(disposition)
        if name:
            return name
    path = str(environ.get("PATH_INFO", ""))
    try:
        path = path.encode("latin-1").decode("utf-8")  # PEP 3333 hands paths over as latin-1
    except UnicodeError:
        pass
    return path.rstrip("/").rpartition("/")[2]


def _chunked(environ: Environ) -> bool:
    """The request says its body is chunked. gunicorn and Werkzeug keep the
    header in the environ when they decode the body; waitress drops it but sets
    CONTENT_LENGTH to the decoded size."""
    codings = str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower()
    return "chunked" in (c.strip() for c in codings.split(","))


def _content_length(environ: Environ) -> Optional[int]:
    """CONTENT_LENGTH as an int; None when absent; -1 when not a number."""
    raw = environ.get("CONTENT_LENGTH")
    if raw is None or str(raw).strip() == "":
        return None
    raw = str(raw).strip()
    if not raw.isdigit():
        return -1
    return int(raw)


def json_error_app(exc: UploadError) -> WSGIApp:
    """A WSGI app that answers with ``exc`` as JSON (for adapters and routes)."""
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return _json_error(start_response, exc)
    return app


__all__ = ["UploadMiddleware", "ClosingResponse", "FILES_KEY", "FORM_KEY", "CONTEXT_KEY", "json_error_app"]
