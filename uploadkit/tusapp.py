"""The tus station: resumable uploads served by :class:`~uploadkit.middleware.UploadMiddleware`
through the same handler chain, storage commit, progress and hand-off as a
multipart upload.

Each PATCH is a stream pushed through the middleware's chain (its sinks
replaced by :class:`~uploadkit.resumable.ResumableSink`, which appends to the
upload's data):

* a PATCH that leaves the upload incomplete runs the chain's checks on its
  bytes (``file_start`` sees the file's true head, kept in the upload's state;
  the size limit counts every byte so far), appends them, and answers 204;
  hashing and thumbnails, which need the whole file, are left out of it;
* the PATCH that completes it runs the whole chain over the whole file: the
  stored bytes are read back and replayed first (the sink skips them), then
  the body. Hashes, sniffing, quota and thumbnails are thus exact whichever
  workers received which PATCH, at the price of reading the stored prefix
  once more on completion (benchmarks/README.md measures it). The sink then
  commits the data to its final key exactly as a multipart file's temp data,
  the app gets the file in ``environ["uploadkit.files"]``, and an error
  answer from the app discards it.

The replay is skipped in the common case: with the default chain (sniffing
and hashing), each worker keeps the hash objects of the uploads it serves in
memory, and PATCHes hash their bytes as they go by; the completing PATCH
finishes the digests when its worker holds them for exactly the stored
prefix (:mod:`uploadkit.resumecache`), and replays otherwise.

Nothing a request needs is kept only in a worker's memory (see
:mod:`uploadkit.resumable`), so any worker can serve any request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import ClientDisconnected, ClientTimeout, RequestTooLarge, StorageUnavailable, UploadError, format_size
from .files import UploadedFile
from .handlers import HashingHandler, MemoryHandler, TempFileHandler, UploadHandler
from .limits import Limits
from .middleware import _content_length
from .pipeline import Pipeline, RequestContext
from .progress import NULL_PROGRESS, ProgressListener
from .reader import _chunks, check_length, read_clock
from .resumable import BeforeFinish, ResumableSink, UploadArea, UploadState, area_for
from .resumecache import Resume, StateCache, plan
from .sniffing import HEAD_SIZE
from . import tus

if TYPE_CHECKING:
    from .middleware import UploadMiddleware

log = logging.getLogger("uploadkit")

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
Authorize = Callable[[Environ, str, Optional[str]], bool]
BeforeFinishHook = Callable[[Environ, UploadedFile], None]

#: The environ key naming the tus upload a request is about.
UPLOAD_ID_KEY = "uploadkit.tus.upload_id"
_READ = 1 << 20  # side-file reads


@dataclass(frozen=True)
class TusSettings:
    """How the middleware serves tus.

    :param path: the creation URL; uploads are ``<path><id>``.
    :param max_size: the largest Upload-Length accepted (``Tus-Max-Size``);
        ``Limits.max_file_size`` caps it too.
    :param expire_after: an upload untouched this long expires (410), and
        ``uploadkit cleanup`` reclaims it. PATCHes extend it, a minute at a
        time (a tenth of it when that is shorter).
    :param lock_timeout: a PATCH that received nothing for this long loses
        its upload's lock to the next HEAD, PATCH or DELETE (a client whose
        connection went half-open must not lock its own upload out).
    :param lock_wait: how long a PATCH or DELETE waits for a live lock
        before answering 423 (clients retry on it).
    :param directory: where uploads live without a Storage (default
        ``<tempdir>/uploadkit-tus``).
    :param cors_origins: origins allowed to upload from a browser (``"*"``: any).
    :param authorize: ``authorize(environ, action, upload_id) -> bool`` with
        action ``create`` (id None), ``head``, ``patch`` or ``delete``.
    :param before_finish: ``hook(environ, file)`` run when the file is whole,
        before it gets its final key; an UploadError it raises refuses it.
    :param handoff: call the wrapped app on the request that completes an
        upload, with the file in ``environ["uploadkit.files"]``; its error
        answer (status >= 400) discards the file. False: files are committed
        without asking the app.
    :param field_name: the field name the app sees the file under.
    :param lock_store: a :class:`~uploadkit.progress.MemcachedStore` to keep
        the uploads' leases in, for several hosts sharing one storage
        (default: lease files, which serialize the workers of one host).
    :param state_cache: how many uploads' hash state each worker keeps in
        memory, so the PATCH that completes an upload whose earlier PATCHes
        this worker served skips the replay (see :mod:`uploadkit.resumecache`);
        0: every completion replays.
    """

    path: str = "/upload/tus/"
    max_size: Optional[int] = None
    expire_after: float = 24 * 3600.0
    # Below the ~9 s tus-js-client and Uppy retry for by default (delays 0, 1,
    # 3, 5 s, each try waiting lock_wait): a half-open PATCH must free the
    # upload before its own client gives up. A live PATCH beats 4 times as often.
    lock_timeout: float = 10.0
    lock_wait: float = 3.0
    directory: Optional[str] = None
    cors_origins: Sequence[str] = ()
    authorize: Optional[Authorize] = None
    before_finish: Optional[BeforeFinishHook] = None
    handoff: bool = True
    field_name: str = "file"
    lock_store: Any = None
    state_cache: int = 64  # a few hundred bytes each; a worker rarely serves more at once

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"TusSettings.path must start with '/', not {self.path!r}")
        if not self.path.endswith("/"):
            object.__setattr__(self, "path", self.path + "/")
        if self.max_size is not None and self.max_size < 0:
            raise ValueError("TusSettings.max_size must be >= 0 or None")
        for name in ("expire_after", "lock_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TusSettings.{name} must be positive")
        if self.state_cache < 0:
            raise ValueError("TusSettings.state_cache must be >= 0")
        if isinstance(self.cors_origins, str):
            raise ValueError("TusSettings.cors_origins must be a list of origins, not one string")


class _Answer(Exception):
    """A finished answer carried out of a deep call (the app's own refusal)."""

    def __init__(self, status: str, headers: List[Tuple[str, str]], body: List[bytes]) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.body = body


class AppRefused(UploadError):
    """The app answered the completing request with an error: the file is discarded."""

    status = 400
    code = "refused_by_app"


class _ResumedProgress(ProgressListener):
    """Reports a PATCH's bytes as the whole upload's: ``received`` counts from
    the offset, ``size`` is Upload-Length."""

    def __init__(self, inner: ProgressListener, offset: int, length: Optional[int]) -> None:
        self.inner = inner
        self.offset = offset
        self.length = length
        # ``done`` waits for the app: on the completing request its error
        # answer discards the file, and the bar must then read ``error``.
        self._done: Optional[RequestContext] = None

    def start(self, ctx: RequestContext) -> None:
        self.inner.start(replace(ctx, content_length=self.length))
        self.inner.advance(self.offset, self.length)

    def advance(self, received: int, total: Optional[int]) -> None:
        self.inner.advance(self.offset + received, self.length)

    def file_start(self, info: Any) -> None:
        self.inner.file_start(info)

    def file_end(self, info: Any) -> None:
        self.inner.file_end(info)

    def processing(self) -> None:
        self.inner.processing()

    def done(self, ctx: RequestContext) -> None:
        self._done = ctx

    def accepted(self) -> None:
        """The app took the file: report the ``done`` held since the commit."""
        ctx, self._done = self._done, None
        if ctx is not None:
            self.inner.done(ctx)

    def error(self, exc: UploadError) -> None:
        self._done = None
        self.inner.error(exc)


#: Refusals after which the upload is terminated: the file itself is refused.
#: Others (a client gone or too slow, storage down, a lost lock) keep what was stored.
_KEEPING = (ClientDisconnected, ClientTimeout, StorageUnavailable, tus.UploadLocked, tus.UploadTooLarge,
            RequestTooLarge)


class TusApp:
    """The tus endpoint of one :class:`~uploadkit.middleware.UploadMiddleware`."""

    def __init__(self, middleware: "UploadMiddleware", settings: TusSettings) -> None:
        self.mw = middleware
        self.settings = settings
        if getattr(middleware.thumbnails, "rewrites_originals", False):
            # The bytes of a resumable upload are stored as they arrive: an
            # original cannot be rewritten after the fact.
            raise ValueError("tus uploads store originals as sent: a Thumbnailer with strip_gps or"
                             " max_original cannot serve them")
        self.area: UploadArea = area_for(middleware.storage, settings.directory, middleware.tempdir)
        self.states = StateCache(settings.state_cache)

    def handles(self, environ: Environ) -> bool:
        path = str(environ.get("PATH_INFO", ""))
        prefix = self.settings.path
        return path == prefix[:-1] or path.startswith(prefix)

    # -- WSGI ------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        override = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE")
        if override and method == "POST":  # proxies that pass only GET and POST
            method = override.strip().upper()
        cors = tus.cors_headers(environ.get("HTTP_ORIGIN"), self.settings.cors_origins,
                                preflight=method == "OPTIONS")
        base = tus.common_headers() + cors
        try:
            if method == "OPTIONS":
                limits = self.mw.limits_for(environ)
                start_response("204 No Content", base + tus.options_headers(self._max_size(limits)))
                return []
            tus.check_version(environ.get("HTTP_TUS_RESUMABLE"))
            rest = environ.get("PATH_INFO", "")[len(self.settings.path):]
            if environ.get("PATH_INFO", "") == self.settings.path[:-1]:
                rest = ""
            if not rest:
                if method != "POST":
                    raise tus.TusMethodNotAllowed(f"{method} is not supported on the creation URL")
                return self._create(environ, start_response, base)
            if not tus.valid_upload_id(rest):
                raise tus.UploadNotFound("no such upload")
            environ[UPLOAD_ID_KEY] = rest
            if method in ("HEAD", "GET"):  # mod_wsgi may turn a HEAD into a GET
                return self._head(environ, start_response, base, rest, method == "HEAD")
            if method == "PATCH":
                return self._patch(environ, start_response, base, rest)
            if method == "DELETE":
                return self._delete(environ, start_response, base, rest)
            raise tus.TusMethodNotAllowed(f"{method} is not supported on an upload")
        except _Answer as answer:
            start_response(answer.status, answer.headers + base)
            return answer.body
        except UploadError as exc:
            return self._error(start_response, base, exc, head=method == "HEAD")

    def _error(self, start_response: StartResponse, base: List[Tuple[str, str]], exc: UploadError,
               head: bool = False) -> List[bytes]:
        from .middleware import _REASONS

        body = exc.to_json()
        headers = base + [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                          ("Cache-Control", "no-store")]
        if isinstance(exc, tus.UnsupportedVersion):
            headers.append(("Tus-Version", tus.TUS_VERSION))
        reason = _REASONS.get(exc.status) or {412: "Precondition Failed", 423: "Locked", 410: "Gone",
                                              460: "Checksum Mismatch", 403: "Forbidden"}.get(exc.status, "Error")
        start_response(f"{exc.status} {reason}", headers)
        return [] if head else [body]

    # -- helpers ---------------------------------------------------------

    def _lease(self, upload_id: str) -> Any:
        if self.settings.lock_store is not None:
            from .resumable import MemcachedLease

            return MemcachedLease(self.settings.lock_store, upload_id, self.settings.lock_timeout)
        return self.area.lease(upload_id, self.settings.lock_timeout)

    def _max_size(self, limits: Limits) -> Optional[int]:
        sizes = [s for s in (self.settings.max_size, limits.max_file_size) if s is not None]
        return min(sizes) if sizes else None

    def _authorize(self, environ: Environ, action: str, upload_id: Optional[str]) -> None:
        hook = self.settings.authorize
        if hook is not None and not bool(hook(environ, action, upload_id)):
            if upload_id is not None:
                raise tus.UploadNotFound("no such upload")  # as the storage app: not yours looks unknown
            raise tus.TusForbidden("creating uploads is not allowed")

    def _load(self, upload_id: str) -> UploadState:
        state = self.area.load(upload_id)
        if state is None:
            raise tus.UploadNotFound("no such upload")
        if state.status == "terminated":
            raise tus.UploadGone("this upload was terminated")
        if state.expires <= time.time():
            raise tus.UploadGone("this upload expired")
        return state

    def _offset(self, state: UploadState) -> int:
        """What was durably stored: the data's size, or the held head's."""
        if state.status == "done":
            return state.length or 0
        stored = self.area.stored(state.id)
        return stored if stored else len(state.head_bytes)

    def _upload_headers(self, state: UploadState, offset: int) -> List[Tuple[str, str]]:
        headers = [("Upload-Offset", str(offset)), ("Upload-Expires", tus.http_date(state.expires))]
        return headers

    def _location(self, environ: Environ, upload_id: str) -> str:
        scheme = environ.get("wsgi.url_scheme", "http")
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
        return f"{scheme}://{host}{environ.get('SCRIPT_NAME', '')}{self.settings.path}{upload_id}"

    # -- creation --------------------------------------------------------

    def _create(self, environ: Environ, start_response: StartResponse,
                base: List[Tuple[str, str]]) -> Iterable[bytes]:
        limits = self.mw.limits_for(environ)
        concat = tus.parse_concat(environ.get("HTTP_UPLOAD_CONCAT"), self.settings.path)
        if concat is not None and concat[0] == "final":
            return self._concatenate(environ, start_response, base, concat[1], limits)
        length = tus.parse_size("Upload-Length", environ.get("HTTP_UPLOAD_LENGTH"))
        defer = environ.get("HTTP_UPLOAD_DEFER_LENGTH")
        if defer is not None and defer.strip() != "1":
            raise tus.TusError("Upload-Defer-Length must be 1")
        if (length is None) == (defer is None):
            raise tus.TusError("send exactly one of Upload-Length and Upload-Defer-Length")
        max_size = self._max_size(limits)
        if length is not None and max_size is not None and length > max_size:
            raise tus.UploadTooLarge(f"the upload is {format_size(length)}; the limit is {format_size(max_size)}",
                                     limit=max_size)
        metadata = tus.parse_metadata(environ.get("HTTP_UPLOAD_METADATA"))
        self._authorize(environ, "create", None)
        upload_id = tus.new_upload_id()
        progress_id = upload_id
        if self.mw.progress_store is not None:
            from .progress import progress_id_from_environ

            progress_id = progress_id_from_environ(environ) or upload_id
        now = time.time()
        state = UploadState(id=upload_id, length=length, metadata=tus.encode_metadata(metadata),
                            created=now, expires=now + self.settings.expire_after, progress_id=progress_id)
        if concat is not None:
            state.extra["concat"] = "partial"
        self.area.create(state)
        environ[UPLOAD_ID_KEY] = upload_id
        headers = base + [("Location", self._location(environ, upload_id)),
                          ("Upload-Expires", tus.http_date(state.expires))]
        has_body = _content_length(environ) not in (None, 0) or bool(environ.get("wsgi.input_terminated")) \
            and environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        ctype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if (has_body and ctype == tus.PATCH_CONTENT_TYPE) or length == 0:
            # creation-with-upload (or an empty file, complete at once)
            lease = self._lease(upload_id)
            lease.acquire(self.settings.lock_wait)
            try:
                answer = self._append(environ, state, lease, 0, creating=True)
            finally:
                lease.release()
            headers.append(("Upload-Offset", str(answer[0])))
            if answer[1] is not None:
                status, extra, body = answer[1]
                if not status.startswith("2"):
                    start_response(status, extra + headers)
                    return body
        start_response("201 Created", headers + [("Content-Length", "0")])
        return []

    def _concatenate(self, environ: Environ, start_response: StartResponse, base: List[Tuple[str, str]],
                     parts: List[str], limits: Limits) -> Iterable[bytes]:
        """A final upload: the partial uploads' bytes, in order, streamed
        through the whole chain as one file (sniffing, hashes, thumbnails,
        commit, hand-off), as if a single PATCH had sent them."""
        if environ.get("HTTP_UPLOAD_LENGTH") is not None:
            raise tus.TusError("a final upload must not send Upload-Length: its length is its parts'")
        metadata = tus.parse_metadata(environ.get("HTTP_UPLOAD_METADATA"))
        self._authorize(environ, "create", None)
        states = []
        for part in parts:
            try:
                st = self._load(part)
            except (tus.UploadNotFound, tus.UploadGone):
                raise tus.TusError(f"partial upload {part} does not exist or is gone") from None
            if st.extra.get("concat") != "partial":
                raise tus.TusError(f"upload {part} is not a partial upload")
            if st.length is None or self._offset(st) != st.length:
                raise tus.TusError(f"partial upload {part} is not complete")
            states.append(st)
        length = sum(st.length or 0 for st in states)
        max_size = self._max_size(limits)
        if max_size is not None and length > max_size:
            raise tus.UploadTooLarge(f"the parts add up to {format_size(length)}; the limit is"
                                     f" {format_size(max_size)}", limit=max_size)
        upload_id = tus.new_upload_id()
        now = time.time()
        state = UploadState(id=upload_id, length=length, metadata=tus.encode_metadata(metadata), created=now,
                            expires=now + self.settings.expire_after, progress_id=upload_id)
        header = "final;" + " ".join(self.settings.path + p for p in parts)
        state.extra["concat"] = header
        self.area.create(state)
        environ[UPLOAD_ID_KEY] = upload_id
        leases = [self._lease(upload_id)] + [self._lease(p) for p in parts]
        held: List[Any] = []
        try:
            for lease in leases:
                lease.acquire(self.settings.lock_wait)
                held.append(lease)
            for st, lease in zip(states, leases[1:]):
                self.area.finalize(st, lease)  # S3: the parts become readable

            def body() -> Iterator[bytes]:
                for st in states:
                    if st.length:
                        yield from self.area.read(st.id)

            _, answer = self._drive(environ, state, leases[0], body(), length, limits)
            for st in states:  # joined: the partial uploads are spent
                self._terminate(st)
        finally:
            for lease in held:
                lease.release()
        headers = base + [("Location", self._location(environ, upload_id)),
                          ("Upload-Expires", tus.http_date(state.expires))]
        if answer is not None and not answer[0].startswith("2"):
            start_response(answer[0], answer[1] + headers)
            return answer[2]
        start_response("201 Created", headers + [("Content-Length", "0")])
        return []

    # -- HEAD --------------------------------------------------------------

    def _head(self, environ: Environ, start_response: StartResponse, base: List[Tuple[str, str]],
              upload_id: str, head: bool) -> Iterable[bytes]:
        self._authorize(environ, "head", upload_id)
        state = self._load(upload_id)
        if state.status != "done":
            lease = self._lease(upload_id)
            try:
                lease.break_stale()
            finally:
                lease.close()
        headers = base + [("Cache-Control", "no-store"), ("Upload-Offset", str(self._offset(state))),
                          ("Upload-Expires", tus.http_date(state.expires))]
        if state.length is None:
            headers.append(("Upload-Defer-Length", "1"))
        else:
            headers.append(("Upload-Length", str(state.length)))
        if state.metadata:
            headers.append(("Upload-Metadata", state.metadata))
        if state.extra.get("concat"):
            headers.append(("Upload-Concat", state.extra["concat"]))
        if not head:
            headers.append(("Content-Length", "0"))
        start_response("200 OK", headers)
        return []

    # -- DELETE ------------------------------------------------------------

    def _delete(self, environ: Environ, start_response: StartResponse, base: List[Tuple[str, str]],
                upload_id: str) -> Iterable[bytes]:
        self._authorize(environ, "delete", upload_id)
        self._load(upload_id)
        lease = self._lease(upload_id)
        lease.acquire(self.settings.lock_wait)
        try:
            state = self._load(upload_id)
            self._terminate(state)
        finally:
            lease.release()
        start_response("204 No Content", base)
        return []

    def _terminate(self, state: UploadState) -> None:
        """Remove the bytes; keep a tombstone (answers 410) until the upload
        would have expired, when ``uploadkit cleanup`` removes it."""
        if state.status != "done":
            self.area.remove_data(state.id)
        state.status = "terminated"
        state.head = ""
        self.area.save(state)

    # -- PATCH -------------------------------------------------------------

    def _patch(self, environ: Environ, start_response: StartResponse, base: List[Tuple[str, str]],
               upload_id: str) -> Iterable[bytes]:
        self._authorize(environ, "patch", upload_id)
        ctype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if ctype != tus.PATCH_CONTENT_TYPE:
            raise tus.WrongContentType(f"a PATCH body must be {tus.PATCH_CONTENT_TYPE}, not {ctype[:60]!r}")
        offset = tus.parse_size("Upload-Offset", environ.get("HTTP_UPLOAD_OFFSET"))
        if offset is None:
            raise tus.TusError("a PATCH needs an Upload-Offset header")
        tus.parse_checksum(environ.get("HTTP_UPLOAD_CHECKSUM"))  # refuse a bad one before the lock
        self._load(upload_id)
        lease = self._lease(upload_id)
        lease.acquire(self.settings.lock_wait)
        try:
            state = self._load(upload_id)  # fresh, now that the upload is ours
            if str(state.extra.get("concat", "")).startswith("final"):
                raise tus.TusForbidden("a final upload is made of its parts: it takes no PATCH")
            new_offset, handed = self._append(environ, state, lease, offset)
        finally:
            lease.release()
        headers = base + [("Upload-Offset", str(new_offset)), ("Upload-Expires", tus.http_date(state.expires))]
        if handed is not None:
            status, extra, body = handed
            if not status.startswith("2"):
                start_response(status, extra + headers)
                return body
        start_response("204 No Content", headers)
        return []

    def _append(self, environ: Environ, state: UploadState, lease: Any, offset: int,
                creating: bool = False) -> Tuple[int, Optional[Tuple[str, List[Tuple[str, str]], List[bytes]]]]:
        """Append this request's body at ``offset``; complete the upload when it is whole.

        :returns: the new offset, and the app's answer when the upload was completed and handed over.
        """
        limits = self.mw.limits_for(environ)
        current = self._offset(state)
        if state.status == "done" or offset != current:
            raise tus.OffsetMismatch(f"Upload-Offset is {offset}, but the upload holds {current} bytes",
                                     limit=current)
        declared = tus.parse_size("Upload-Length", environ.get("HTTP_UPLOAD_LENGTH"))
        if declared is not None and not creating:
            max_size = self._max_size(limits)
            if state.length is not None and declared != state.length:
                raise tus.TusError(f"Upload-Length is already {state.length}")
            if declared < current:
                raise tus.TusError(f"Upload-Length {declared} is below the {current} bytes already stored")
            if max_size is not None and declared > max_size:
                raise tus.UploadTooLarge(f"the upload is {format_size(declared)}; the limit is"
                                         f" {format_size(max_size)}", limit=max_size)
            if state.length is None:
                state.length = declared
                self.area.save(state)
        content_length = _content_length(environ)
        if content_length == -1:
            raise tus.TusError("the Content-Length header is not a number")
        if creating and content_length is None and not environ.get("wsgi.input_terminated"):
            content_length = 0  # an empty upload, created complete
        if content_length is None and not environ.get("wsgi.input_terminated"):
            from .errors import LengthRequired

            raise LengthRequired("the PATCH has no Content-Length; send one or use chunked encoding")
        # Limits.max_request_size bounds one request: a larger PATCH is refused
        # before its body is read, and the upload stays as it was.
        check_length(content_length, bool(environ.get("wsgi.input_terminated")), limits)
        room = None if state.length is None else state.length - current
        if room is not None and content_length is not None and content_length > room:
            raise tus.UploadTooLarge(f"the body of {content_length} bytes runs past Upload-Length"
                                     f" ({room} bytes left)", limit=room)
        max_size = self._max_size(limits)
        if room is None and max_size is not None and content_length is not None \
                and current + content_length > max_size:
            raise tus.UploadTooLarge(f"the upload would pass the limit of {format_size(max_size)}", limit=max_size)
        self._extend(state)
        # The multipart path's reader: reads that adapt to the client (so a
        # slow client's bytes are stored as they come), from the size its last
        # PATCH reached, under the client's deadlines, never past CONTENT_LENGTH.
        body: Iterator[bytes] = _within(_chunks(environ["wsgi.input"], content_length, limits,
                                                self.mw.read_size, NULL_PROGRESS, read_clock(environ, limits),
                                                pace=state), room)
        checksum = tus.parse_checksum(environ.get("HTTP_UPLOAD_CHECKSUM"))
        side: Optional[IO[bytes]] = None
        try:
            if checksum is not None:
                # The bytes are held back until their digest is known: a
                # mismatch must leave nothing appended. They wait on disk.
                side, body_len = _spool_checked(body, checksum, self.mw.tempdir)
                content_length = body_len
                body = _read_file(side)
            return self._drive(environ, state, lease, body, content_length, limits)
        finally:
            if side is not None:
                side.close()

    def _chain(self, environ: Environ, whole: bool, sink: ResumableSink, stored: int
               ) -> Tuple[List[UploadHandler], Optional[Resume]]:
        """The middleware's chain for this request, its sinks replaced by
        ``sink``, and the :class:`~uploadkit.resumecache.Resume` when this
        worker carries the chain's state for the first ``stored`` bytes.

        Else an incomplete PATCH leaves out the handlers that need the whole
        file (hashing; thumbnails, which also spool it): they run on completion.
        """
        from .storage import StorageHandler

        skipped: Tuple[type, ...] = (MemoryHandler, TempFileHandler, StorageHandler)
        resume = plan([h for h in self.mw.handlers_for(environ) if not isinstance(h, skipped)], self.states,
                      sink.upload_id, stored)
        if resume is not None:
            chain = resume.chain
            if whole and self.settings.before_finish is not None:
                chain.append(BeforeFinish(self.settings.before_finish))
            return chain + [sink], resume
        if not whole:
            skipped += (HashingHandler,)
            try:
                from .imaging import ThumbnailHandler
                skipped += (ThumbnailHandler,)
            except ImportError:  # pragma: no cover - Pillow missing
                pass
        chain = [h for h in self.mw.handlers_for(environ) if not isinstance(h, skipped)]
        if whole and self.settings.before_finish is not None:
            chain.append(BeforeFinish(self.settings.before_finish))
        chain.append(sink)
        return chain, None

    def _listener(self, environ: Environ, state: UploadState, offset: int) -> ProgressListener:
        store = self.mw.progress_store
        if store is None:
            return NULL_PROGRESS
        from .progress import StoreProgress

        return _ResumedProgress(StoreProgress(store, state.progress_id, self.mw.progress_settings),
                                offset, state.length)

    def _drive(self, environ: Environ, state: UploadState, lease: Any, body: Iterator[bytes],
               content_length: Optional[int], limits: Limits, replay: bool = False
               ) -> Tuple[int, Optional[Tuple[str, List[Tuple[str, str]], List[bytes]]]]:
        """One request's run through the chain: ``whole`` (the whole file:
        stored bytes replayed, then the body) when this request completes
        the upload and the area can be read back, else a segment."""
        area, upload_id = self.area, state.id
        stored = area.stored(upload_id)
        held = state.head_bytes if not stored else b""
        offset = stored or len(held)
        partial = state.extra.get("concat") == "partial"
        whole = not partial and (replay or (area.replayable and state.length is not None
                                            and content_length is not None and offset + content_length == state.length))
        sink = ResumableSink(area, upload_id, lease)
        # A partial upload is a piece of a file: judged (sniffed, hashed...)
        # only as part of its final upload; here its bytes are only kept.
        chain, resume = ([sink], None) if partial else self._chain(environ, whole, sink, stored)
        replaying = whole and resume is None  # the stored bytes go through the chain again
        sink.skip = stored if replaying else 0
        progress = self._listener(environ, state, offset)
        ctx = RequestContext(limits=limits, environ=environ, content_length=content_length)
        # A partial upload's bytes need no head: each goes straight to the sink.
        pipeline = Pipeline(chain, ctx, progress, head_size=1) if partial else Pipeline(chain, ctx, progress)
        meta = tus.parse_metadata(state.metadata)
        filename = tus.metadata_text(meta, "filename") or tus.metadata_text(meta, "name")
        filetype = tus.metadata_text(meta, "filetype") or tus.metadata_text(meta, "type")
        # The file's first bytes, kept in the state until the head is complete.
        head = bytearray(held)
        if stored and len(state.head_bytes) < min(HEAD_SIZE, stored):
            head = bytearray(b"".join(area.read(upload_id, HEAD_SIZE)))  # a worker died before saving it
        elif stored:
            head = bytearray(state.head_bytes)
        received = 0
        try:
            pipeline.start()
            if replaying or not stored:
                pipeline.start_file(self.settings.field_name, filename, filetype)
                if stored:
                    for block in area.read(upload_id, stored):  # replayed; the sink skips them
                        pipeline.feed(block)
                elif held:
                    pipeline.feed(held)
            else:
                pipeline.start_file(self.settings.field_name, filename, filetype, resume_at=stored,
                                    head=bytes(head))
            for chunk in body:
                if len(head) < HEAD_SIZE:
                    head += chunk[:HEAD_SIZE - len(head)]
                received += len(chunk)
                progress.advance(received, None)
                pipeline.feed(chunk)
        except _KEEPING as exc:
            try:
                sink.end_writes()
                if resume is not None and isinstance(exc, (ClientDisconnected, ClientTimeout)):
                    resume.keep(self.states, upload_id, sink.appended, area.stored(upload_id))
            except UploadError:
                pass
            pipeline.close()
            if not isinstance(exc, tus.UploadLocked):  # a lost lease: the state is someone else's now
                self._keep(state, head)
            raise
        except UploadError as exc:
            pipeline.abort(exc)
            self._terminate(state)
            raise
        except BaseException as exc:
            pipeline.abort(exc)
            self._keep(state, head)
            raise
        try:
            sink.end_writes()
        except BaseException:
            pipeline.close()
            self._keep(state, head)
            raise
        new_offset = area.stored(upload_id) or len(head)
        if resume is not None and not whole:
            resume.keep(self.states, upload_id, sink.appended, new_offset)
        if state.length is None or new_offset < state.length or partial:
            pipeline.close()
            self._keep(state, head)
            return new_offset, None
        if not whole:
            # Complete without knowing it in advance (a chunked body, the
            # length declared late), or on a store whose parts cannot be read
            # before they are assembled: run the whole chain over the stored file.
            pipeline.close()
            self._keep(state, head)
            area.finalize(state, lease)
            empty: Iterator[bytes] = iter(())
            return self._drive(environ, state, lease, empty, 0, limits, replay=True)
        return self._complete(environ, state, pipeline, new_offset)

    def _extend(self, state: UploadState) -> None:
        """Push the expiry back, in steps of a minute (a tenth of
        ``expire_after`` when that is shorter): a PATCH inside the step leaves
        the state as it was, and need not save it."""
        expires = time.time() + self.settings.expire_after
        if expires - state.expires >= min(60.0, self.settings.expire_after / 10):
            state.expires = expires

    def _keep(self, state: UploadState, head: bytearray) -> None:
        """Save what the next request needs: the head (held or for sniffing) and the expiry."""
        state.set_head(bytes(head[:HEAD_SIZE]))
        try:
            self.area.save(state)  # a no-op when nothing changed
        except UploadError:
            log.warning("uploadkit: could not save the state of upload %s", state.id)

    def _complete(self, environ: Environ, state: UploadState, pipeline: Pipeline, size: int
                  ) -> Tuple[int, Optional[Tuple[str, List[Tuple[str, str]], List[bytes]]]]:
        try:
            pipeline.end_file()
            pipeline.finish()
        except BaseException as exc:
            pipeline.abort(exc)
            self._terminate(state)
            raise
        files = pipeline.ctx.files
        state.status = "done"
        state.head = ""
        state.final_key = files[0].key if files else None
        answer: Optional[Tuple[str, List[Tuple[str, str]], List[bytes]]] = None
        try:
            if self.settings.handoff:
                answer = self._hand_over(environ, pipeline)
                if not answer[0].startswith("2"):
                    pipeline.abort(AppRefused(f"the app answered {answer[0]}"))
                    self._terminate(state)
                    return size, answer
        except BaseException as exc:
            pipeline.abort(exc)
            self._terminate(state)
            raise
        finally:
            pipeline.close()
        self.area.save(state)
        if isinstance(pipeline.progress, _ResumedProgress):
            pipeline.progress.accepted()
        return size, answer

    def _hand_over(self, environ: Environ, pipeline: Pipeline) -> Tuple[str, List[Tuple[str, str]], List[bytes]]:
        """Call the app with the finished file, as a multipart upload would; collect its answer."""
        self.mw.hand_over(environ, pipeline)
        got: List[Any] = []

        def start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            got[:] = [status, list(headers)]
            return lambda data: None

        result = self.mw.app(environ, start)
        body: List[bytes] = []
        try:
            for chunk in result:
                body.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not got:
            raise RuntimeError("the app did not call start_response")
        status, headers = got
        keep = [(k, v) for k, v in headers if k.lower() not in ("content-length", "tus-resumable")]
        body_bytes = b"".join(body)
        keep.append(("Content-Length", str(len(body_bytes))))
        return status, keep, [body_bytes]


# -- bodies ------------------------------------------------------------------------


def _within(chunks: Iterator[bytes], room: Optional[int]) -> Iterator[bytes]:
    """A body without length may not run past ``room`` (what Upload-Length leaves).

    :raises UploadTooLarge: it did; the bytes before the chunk that crossed were kept.
    """
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if room is not None and received > room:
            raise tus.UploadTooLarge(f"the body runs past Upload-Length ({room} bytes were left)", limit=room)
        yield chunk


def _spool_checked(body: Iterator[bytes], checksum: tus.Checksum, tempdir: Optional[str]) -> Tuple[IO[bytes], int]:
    """Write the body to an anonymous temp file while hashing it.

    :raises ChecksumMismatch: the digest differs (the temp file is gone).
    """
    side = tempfile.TemporaryFile(dir=tempdir or None)
    hasher = hashlib.new(checksum.algorithm)
    size = 0
    try:
        for chunk in body:
            hasher.update(chunk)
            side.write(chunk)
            size += len(chunk)
        if hasher.digest() != checksum.digest:
            raise tus.ChecksumMismatch(f"the body's {checksum.algorithm} is not the one in Upload-Checksum;"
                                       " nothing of it was kept")
        side.seek(0)
    except BaseException:
        side.close()
        raise
    return side, size


def _read_file(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        block = f.read(_READ)
        if not block:
            return
        yield block


__all__ = ["TusSettings", "TusApp", "AppRefused", "UPLOAD_ID_KEY"]
