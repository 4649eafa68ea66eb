"""Reads a request body from a blocking stream and drives the decoder and the
pipeline: the only station that does I/O on the client's bytes.

It never reads past CONTENT_LENGTH, tells a short body (a client that went
away) from a complete one, counts the bytes of bodies that have no length
(chunked, ``wsgi.input_terminated``), and, where the server hands over the
client's socket, times every read (:mod:`uploadkit.deadlines`).
"""

from __future__ import annotations

import time

from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence

from .deadlines import ReadClock, client_socket
from .errors import ClientDisconnected, LengthRequired, RequestTooLarge, UploadError, format_size
from .handlers import UploadHandler, default_handlers
from .limits import Limits
from .multipart import MultipartDecoder, parse_boundary
from .pipeline import Pipeline, RequestContext
from .progress import NULL_PROGRESS, ProgressListener

DEFAULT_READ_SIZE = 1 << 20  # large reads: fewer syscalls, bigger hash buffers
#: Reads start at this size and grow while the client keeps up (see _chunks).
FIRST_READ_SIZE = 64 * 1024
MIN_READ_SIZE = 16 * 1024
#: A blocking read(n) returns only once n bytes arrived: reads slower than this
#: shrink, so a slow client's progress bar still moves several times a second;
#: reads faster than the other bound grow, up to ``read_size``.
SLOW_READ = 0.1
FAST_READ = 0.02


_NO_LENGTH = "the request has no Content-Length; send one or use chunked encoding"


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def read_clock(environ: Optional[Dict[str, Any]], limits: Limits) -> Optional[ReadClock]:
    """A clock for the reads of this request's body, when ``limits`` bound
    them and the server handed over the client's socket; else None."""
    if limits.idle_timeout is None and limits.min_rate is None:
        return None
    sock = client_socket(environ)
    return None if sock is None else ReadClock(sock, limits.idle_timeout, limits.min_rate)


def check_length(content_length: Optional[int], terminated: bool, limits: Limits) -> None:
    """Refuse before reading a byte: no length at all, or a declared length over the limit.

    :raises LengthRequired: neither CONTENT_LENGTH nor a terminated input stream.
    :raises RequestTooLarge: CONTENT_LENGTH over ``limits.max_request_size``.
    """
    if content_length is None and not terminated:
        raise LengthRequired(_NO_LENGTH)
    limit = limits.max_request_size
    if limit is not None and content_length is not None and content_length > limit:
        raise RequestTooLarge(
            f"the request is {format_size(content_length)}; the limit is {format_size(limit)}",
            limit=limit)


def read_multipart(stream: Readable, *, content_type: str, content_length: Optional[int],
                   limits: Limits = Limits(), handlers: Optional[Sequence[UploadHandler]] = None,
                   environ: Optional[Dict[str, Any]] = None,
                   progress: ProgressListener = NULL_PROGRESS,
                   read_size: int = DEFAULT_READ_SIZE, terminated: bool = False,
                   framed: bool = True) -> Pipeline:
    """Stream one multipart body through a handler chain.

    Returns the finished :class:`Pipeline`: files in ``pipeline.ctx.files``, text
    fields in ``pipeline.ctx.fields``. Call ``pipeline.close()`` once the files
    are no longer needed (it removes temp files).

    :param content_length: the declared length, or None for a body that ends
        when the stream does (then ``terminated`` must be true).
    :param framed: False when the request declared neither a length nor
        chunked encoding: a terminated stream that is empty then means the
        client sent no length (gunicorn marks every body terminated), not an
        empty body, and is refused as 411.
    :raises UploadError: any refusal; every handler has been aborted by then.
        :class:`~uploadkit.errors.ClientTimeout` when the client stalled or
        trickled past ``limits.idle_timeout``/``limits.min_rate``.
    """
    check_length(content_length, terminated, limits)
    boundary = parse_boundary(content_type)
    ctx = RequestContext(limits=limits, environ=environ, content_length=content_length)
    chain = list(handlers) if handlers is not None else default_handlers()
    pipeline = Pipeline(chain, ctx, progress)
    decoder = MultipartDecoder(boundary, limits)
    try:
        pipeline.start()
        _pump(stream, decoder, pipeline, content_length, limits, read_size, progress,
              read_clock(environ, limits), framed)
        pipeline.finish()
    except BaseException as exc:
        pipeline.abort(exc)
        raise
    return pipeline


def _pump(stream: Readable, decoder: MultipartDecoder, pipeline: Pipeline,
          content_length: Optional[int], limits: Limits, read_size: int,
          progress: ProgressListener, clock: Optional[ReadClock], framed: bool) -> None:
    push = decoder.push
    for chunk in _chunks(stream, content_length, limits, read_size, progress, clock, framed):
        push(chunk, pipeline)
    decoder.close()


class Pace(Protocol):
    """Where a body's reads start, kept up to date as they adapt (see ``_chunks``)."""

    read_size: int


def _chunks(stream: Readable, content_length: Optional[int], limits: Limits, read_size: int,
            progress: ProgressListener, clock: Optional[ReadClock] = None,
            framed: bool = True, pace: Optional[Pace] = None) -> Iterator[bytes]:
    """The body's chunks, never past CONTENT_LENGTH, counted against the limit.

    Read sizes adapt to the client: they double while reads return quickly
    (up to ``read_size``: big blocks for fast clients and local proxies) and
    halve when a read waits long for its bytes (down to 16 KiB), because
    progress can only be reported between reads.

    With a ``clock``, each read runs under the client's deadlines.

    With a ``pace``, reads start at ``pace.read_size`` (when set) and leave
    there the size they reached: a resumable upload's next request starts
    where its client's last one ended. Starting each 8 MiB PATCH again at
    64 KiB cost a sixth of the throughput behind gunicorn, whose reader copies
    the rest of a large ``recv`` again for every small read.

    :raises ClientDisconnected: the stream ended early or failed.
    :raises ClientTimeout: the client stalled or trickled (``clock``).
    :raises LengthRequired: an unframed request (see ``framed``) with no body.
    :raises RequestTooLarge: a body without length grew past the limit.
    """
    read = stream.read
    limit = limits.max_request_size
    received = 0
    size = min(pace.read_size if pace is not None and pace.read_size > 0 else FIRST_READ_SIZE, read_size)
    now = time.monotonic
    try:
        while True:
            want = size if content_length is None else min(size, content_length - received)
            if want <= 0:
                return
            started = now()
            try:
                chunk = read(want) if clock is None else clock.read(read, want, received)
            except UploadError:
                raise
            except (OSError, ValueError) as exc:  # socket reset, timeout, closed input
                raise ClientDisconnected(
                    f"reading the body failed after {received} bytes: {exc}") from None
            if not chunk:
                if content_length is not None:
                    raise ClientDisconnected(
                        f"the body ended after {received} of {content_length} bytes")
                if received == 0 and not framed:
                    raise LengthRequired(_NO_LENGTH)
                return
            took = now() - started
            if took > SLOW_READ:
                size = max(min(MIN_READ_SIZE, read_size), size // 2)
            elif took < FAST_READ and size < read_size:
                size = min(read_size, size * 2)
            if content_length is not None and len(chunk) > want:
                chunk = chunk[:want]  # a server that hands out more than asked
            received += len(chunk)
            if limit is not None and received > limit:
                raise RequestTooLarge(
                    f"the request is larger than the limit of {format_size(limit)}", limit=limit)
            progress.advance(received, content_length)
            yield chunk if type(chunk) is bytes else bytes(chunk)
    finally:
        if pace is not None:  # where this body's reads ended, for the next body
            pace.read_size = size


def read_raw(stream: Readable, *, filename: str, content_type: str = "",
             content_length: Optional[int], field_name: str = "file",
             limits: Limits = Limits(), handlers: Optional[Sequence[UploadHandler]] = None,
             environ: Optional[Dict[str, Any]] = None, progress: ProgressListener = NULL_PROGRESS,
             read_size: int = DEFAULT_READ_SIZE, terminated: bool = False,
             framed: bool = True) -> Pipeline:
    """Stream a bare body (``PUT /files/photo.jpg``) as one file through the same chain.

    The pipeline does not care where its bytes come from: this driver and
    :func:`read_multipart` differ only in how they cut the body into files.

    :raises UploadError: any refusal; every handler has been aborted by then.
    """
    check_length(content_length, terminated, limits)
    if limits.max_files is not None and limits.max_files < 1:
        from .errors import TooManyFiles
        raise TooManyFiles("this route accepts no files", limit=limits.max_files)
    ctx = RequestContext(limits=limits, environ=environ, content_length=content_length)
    chain = list(handlers) if handlers is not None else default_handlers()
    pipeline = Pipeline(chain, ctx, progress)
    try:
        pipeline.start()
        pipeline.start_file(field_name, filename, content_type)
        _copy(stream, pipeline, content_length, limits, read_size, progress,
              read_clock(environ, limits), framed)
        pipeline.end_file()
        pipeline.finish()
    except BaseException as exc:
        pipeline.abort(exc)
        raise
    return pipeline


def _copy(stream: Readable, pipeline: Pipeline, content_length: Optional[int], limits: Limits,
          read_size: int, progress: ProgressListener, clock: Optional[ReadClock],
          framed: bool) -> None:
    for chunk in _chunks(stream, content_length, limits, read_size, progress, clock, framed):
        pipeline.feed(chunk)
