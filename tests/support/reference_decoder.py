"""The decoder uploadkit used before it had its own parser: a thin layer over
``multipart``'s PushMultipartParser. Kept as an oracle for differential tests:
on any body both accept, the two must produce the same events.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

from multipart import (MultipartError, MultipartSegment, ParserLimitReached, PushMultipartParser,
                       parse_content_disposition)

from uploadkit.errors import (FieldTooLarge, HeaderTooLarge, MalformedMultipart, TooManyFiles, TooManyParts,
                              UploadError, format_size)
from uploadkit.limits import Limits
from uploadkit.multipart import (PREAMBLE_LIMIT, _ALLOWED_ENCODINGS, _FILE_END, _FILENAME_STAR_RE, _QUOTED_RE,
                                 Event, Field, FileData, FileStart, HeaderList, _decode_filename_star)


class State:
    PREAMBLE = "preamble"
    FIELD = "field"
    FILE = "file"
    SKIP = "skip"
    BETWEEN = "between"
    COMPLETE = "complete"
    FAILED = "failed"


class ReferenceDecoder:
    """Incremental decoder for one ``multipart/form-data`` body.

    Call :meth:`feed` with each chunk as it arrives, then :meth:`close`. The
    first error is kept: later calls raise it again, so a caller that ignores
    one cannot read on past it.

    :raises MalformedMultipart: the body is not valid multipart/form-data.
    :raises TooManyParts, TooManyFiles, FieldTooLarge, HeaderTooLarge: a limit.
    """

    def __init__(self, boundary: Union[bytes, str], limits: Limits = Limits(),
                 charset: str = "utf-8") -> None:
        if isinstance(boundary, str):
            boundary = boundary.encode("latin-1")
        self.limits = limits
        self.charset = charset
        self.state = State.PREAMBLE
        self.error: Optional[UploadError] = None
        self._parser = PushMultipartParser(
            boundary,
            max_header_size=limits.max_header_size,
            max_header_count=limits.max_header_count,
        )
        self._parts = 0
        self._files = 0
        self._form_bytes = 0
        # Bytes before the first boundary, held until it is found (see _skip_preamble).
        self._preamble: Optional[bytes] = b""
        self._dash_boundary = b"--" + boundary
        self._segment: Optional[MultipartSegment] = None
        self._field: List[bytes] = []
        self._field_size = 0
        self._field_charset = charset

    def feed(self, chunk: bytes) -> List[Event]:
        """Decode one chunk (``bytes`` or ``bytearray``) and return the events it completes."""
        if self.error is not None:
            raise self.error
        if not chunk:
            return []
        events: List[Event] = []
        append = events.append
        try:
            if self._preamble is not None:
                chunk = self._skip_preamble(chunk)
                if not chunk:
                    return events
            for item in self._parser.parse(chunk):
                # Hot path first: body bytes, almost always of a file.
                if type(item) is bytes:
                    if self.state is State.FILE:
                        append(FileData(item))
                    else:
                        self._on_data(item)
                elif item is None:
                    self._end_part(append)
                else:
                    self._start_part(item, append)
        except MultipartError as exc:
            raise self._fail(self._translate(exc)) from None
        except UploadError as exc:
            raise self._fail(exc) from None
        return events

    def close(self) -> List[Event]:
        """Signal the end of the body.

        :raises MalformedMultipart: the final boundary was never seen.
        """
        if self.error is not None:
            raise self.error
        if self.state is State.COMPLETE:
            return []
        try:
            if self._preamble is not None:
                raise MultipartError("no boundary")
            self._parser.close(check_complete=True)
        except MultipartError:
            where = "before the first part" if self._parts == 0 else f"inside part {self._parts}"
            raise self._fail(MalformedMultipart(f"the body ended {where}, before the final boundary")) from None
        self.state = State.COMPLETE
        return []

    # -- internals ---------------------------------------------------------

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """Find the first boundary ourselves, so that where the body is cut
        cannot change the verdict: the engine, fed small pieces, would drop a
        boundary glued to garbage along with the preamble and see an empty form.

        Returns the bytes from the first boundary on (b"" while still looking).
        :raises MalformedMultipart: no boundary within the limit, or bytes glued to it.
        """
        assert self._preamble is not None
        buf = self._preamble + chunk if self._preamble else bytes(chunk)
        index = buf.find(self._dash_boundary)
        if index == -1 or index > PREAMBLE_LIMIT:
            if index > PREAMBLE_LIMIT or len(buf) > PREAMBLE_LIMIT + len(self._dash_boundary):
                raise MalformedMultipart(
                    f"no multipart boundary in the first {PREAMBLE_LIMIT // 1024} KiB of the body")
            self._preamble = buf
            return b""
        if index > 0 and buf[index - 2:index] != b"\r\n":
            raise MalformedMultipart("unexpected bytes right before the first boundary")
        self._preamble = None
        return buf[index:] if index else buf

    def _fail(self, exc: UploadError) -> UploadError:
        self.error = exc
        self.state = State.FAILED
        return exc

    def _translate(self, exc: MultipartError) -> UploadError:
        text = str(exc.args[0]) if exc.args else str(exc)
        if isinstance(exc, ParserLimitReached) and "header" in text.lower():
            counted = "count" in text.lower()
            return HeaderTooLarge(
                f"part {self._parts + 1}: {text.lower()} (limits: {self.limits.max_header_size} bytes a line,"
                f" {self.limits.max_header_count} lines)",
                limit=self.limits.max_header_count if counted else self.limits.max_header_size)
        return MalformedMultipart(f"part {max(self._parts, 1)}: {text}")

    def _on_data(self, item: bytes) -> None:
        if self.state is State.SKIP:
            # An empty-filename part turned out to have a body: it is a text
            # field after all (RFC 7578 makes a part a file by its name).
            self.state = State.FIELD
        if self.state is State.FIELD:
            self._field_size += len(item)
            self._form_bytes += len(item)
            self._check_field()
            self._field.append(item)

    def _start_part(self, segment: MultipartSegment, append: Callable[[Event], None]) -> None:
        limits = self.limits
        self._parts += 1
        if limits.max_parts is not None and self._parts > limits.max_parts:
            raise TooManyParts(f"the body has more than {limits.max_parts} parts", limit=limits.max_parts)
        headers = tuple(segment.headerlist)
        if not segment.name:
            raise MalformedMultipart(f"part {self._parts} has no field name")
        if len(headers) == 1:
            # The common case: a lone Content-Disposition, already bounded by the
            # engine's per-line limit.
            disposition = headers[0][1]
        else:
            disposition = self._check_headers(segment, headers)
        filename = segment.filename
        if not filename and "filename*" in disposition:
            # Search outside quoted strings only: a field *named*
            # 'x; filename*=...' must not turn into a file.
            masked = _QUOTED_RE.sub(lambda m: '"' + "_" * (len(m[0]) - 2) + '"', disposition)
            match = _FILENAME_STAR_RE.search(masked)
            if match:
                value = disposition[match.start(1):match.end(1)]
                filename = _decode_filename_star(value) or filename
        self._segment = segment
        if filename:
            self._files += 1
            if limits.max_files is not None and self._files > limits.max_files:
                raise TooManyFiles(f"the body has more than {limits.max_files} files",
                                   field=segment.name, limit=limits.max_files)
            self.state = State.FILE
            append(FileStart(segment.name, filename, segment.content_type or "", headers))
            return
        self._field = []
        self._field_size = 0
        self._field_charset = segment.charset or self.charset
        # filename="" is a browser's "no file selected": skipped if its body is empty.
        self.state = State.SKIP if filename == "" else State.FIELD

    def _check_headers(self, segment: MultipartSegment, headers: HeaderList) -> str:
        """Checks for parts with several headers; returns the Content-Disposition."""
        limits = self.limits
        dispositions = [v for k, v in headers if k == "Content-Disposition"]
        if len(dispositions) != 1:
            raise MalformedMultipart(f"part {self._parts} has {len(dispositions)} Content-Disposition headers")
        block = sum(len(k) + len(v) + 4 for k, v in headers)
        if block > limits.max_header_size:
            raise HeaderTooLarge(
                f"part {self._parts}: headers of {block} bytes; the limit is {limits.max_header_size}",
                field=segment.name, limit=limits.max_header_size)
        encoding = (segment.header("Content-Transfer-Encoding") or "").strip().lower()
        if encoding not in _ALLOWED_ENCODINGS:
            raise MalformedMultipart(
                f"part {self._parts} ({segment.name!r}) uses Content-Transfer-Encoding {encoding!r},"
                " which RFC 7578 deprecates; send the bytes as they are", field=segment.name)
        return dispositions[0]

    def _check_field(self) -> None:
        limits = self.limits
        name = self._segment.name if self._segment else None
        if limits.max_field_size is not None and self._field_size > limits.max_field_size:
            raise FieldTooLarge(
                f"field {name!r} is larger than the limit of {format_size(limits.max_field_size)}",
                field=name, limit=limits.max_field_size)
        if limits.max_form_memory is not None and self._form_bytes > limits.max_form_memory:
            raise FieldTooLarge(
                f"the text fields add up to more than {format_size(limits.max_form_memory)}",
                field=name, limit=limits.max_form_memory)

    def _end_part(self, append: Callable[[Event], None]) -> None:
        state = self.state
        segment = self._segment
        assert segment is not None
        if state is State.FILE:
            append(_FILE_END)
        elif state is State.FIELD:
            chunks = self._field
            raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            charset = self._field_charset
            try:
                value = raw.decode(charset, "replace")
            except LookupError:  # an unknown charset named by the client
                value = raw.decode(self.charset, "replace")
            append(Field(segment.name or "", value, tuple(segment.headerlist)))
            self._field = []
        self._segment = None
        self.state = State.BETWEEN
