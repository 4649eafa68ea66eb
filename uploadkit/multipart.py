"""The sans-io multipart/form-data decoder: bytes in, parts out.

Our own parser, written for what a form upload needs: the file/field split
(RFC 7578 ``filename``, then RFC 5987 ``filename*``), buffering of text fields
under limits, refusal of duplicate ``Content-Disposition`` headers and of parts
without a name, typed errors, and speed on forms of many small parts (it beats
``multipart``'s PushMultipartParser, whose header helpers it reuses, in
``benchmarks/``). It imports nothing of WSGI, files or sockets, so it can be
tested one byte at a time.

Beside the decoder, :func:`encode_multipart` builds bodies: the middleware uses
it to re-encode the form for the app, tests use it for round trips.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Protocol, Sequence, Tuple, Union
from urllib.parse import unquote_to_bytes

from multipart import parse_content_disposition, parse_options_header

from .errors import (
    FieldTooLarge,
    HeaderTooLarge,
    MalformedMultipart,
    TooManyFiles,
    TooManyParts,
    UploadError,
    format_size,
)
from .limits import Limits

HeaderList = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class Field:
    """A complete text field."""

    name: str
    value: str
    headers: HeaderList = ()


@dataclass(frozen=True)
class FileStart:
    """A file part begins. ``filename`` is raw, as sent (``filename*`` decoded)."""

    name: str
    filename: str
    content_type: str
    headers: HeaderList = ()


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    pass


Event = Union[Field, FileStart, FileData, FileEnd]
_FILE_END = FileEnd()


class State(enum.Enum):
    PREAMBLE = "preamble"  # before the first boundary
    HEADERS = "headers"  # after a boundary, before the part's header block ends
    FIELD = "field"  # inside a text field's body
    FILE = "file"  # inside a file's body
    SKIP = "skip"  # inside a part we drop (empty "no file selected" part)
    COMPLETE = "complete"
    FAILED = "failed"


# RFC 2046 allows 70 characters from a small set; real clients (WebTest's "$",
# long generated ones) stray outside it. Any visible ASCII is safe to search for.
_BOUNDARY_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,198}(?<! )$")
_FILENAME_STAR_RE = re.compile(r"""(?:^|;)\s*filename\*\s*=\s*([^;]*)""", re.IGNORECASE)
_QUOTED_RE = re.compile(r'"(?:\\.|[^"\\])*"')
_ALLOWED_ENCODINGS = frozenset(["", "7bit", "8bit", "binary"])
#: Bytes of preamble tolerated before the first boundary (RFC 2046 allows one;
#: nobody sends a large one, and scanning it costs the reader's time).
PREAMBLE_LIMIT = 64 * 1024


def parse_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type header.

    :raises MalformedMultipart: not multipart/form-data, or a missing or invalid
        boundary (RFC 2046: 1-70 characters from a small set).
    """
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != "multipart/form-data":
        raise MalformedMultipart(f"expected multipart/form-data, got {mime.strip()!r}")
    boundary = None
    for param in params.split(";"):
        key, eq, value = param.strip().partition("=")
        if eq and key.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            boundary = value
    if not boundary:
        raise MalformedMultipart("the Content-Type header has no boundary")
    if not _BOUNDARY_RE.match(boundary):
        raise MalformedMultipart(f"invalid multipart boundary {boundary[:80]!r}")
    return boundary.encode("latin-1")


def filename_from_disposition(value: str) -> Optional[str]:
    """The filename of a Content-Disposition header value (``attachment;
    filename="a.txt"`` or RFC 5987 ``filename*=UTF-8''...``; a plain
    ``filename`` wins, as in form parts), or None. Raw and untrusted."""
    _, _, filename = parse_content_disposition(value)
    if filename:
        return str(filename)
    masked = _QUOTED_RE.sub(lambda m: '"' + "_" * (len(m[0]) - 2) + '"', value)
    match = _FILENAME_STAR_RE.search(masked)
    if match:
        return _decode_filename_star(value[match.start(1):match.end(1)])
    return None


def _decode_filename_star(value: str) -> Optional[str]:
    """RFC 5987 ``charset'lang'percent-encoded`` -> str, or None if unreadable."""
    value = value.strip().strip('"')
    charset, q1, rest = value.partition("'")
    _lang, q2, encoded = rest.partition("'")
    if not (q1 and q2):
        return None
    charset = charset.strip().lower() or "utf-8"
    if charset not in ("utf-8", "iso-8859-1", "latin-1", "us-ascii"):
        return None
    try:
        return unquote_to_bytes(encoded).decode(charset)
    except (UnicodeDecodeError, LookupError):
        return None


class DecoderTarget(Protocol):
    """Where :meth:`MultipartDecoder.push` delivers a body's parts.

    :class:`~uploadkit.pipeline.Pipeline` is one: the reader hands it straight
    to the decoder, so no event object is made for each chunk or field.
    """

    def add_field(self, name: str, value: str, headers: HeaderList = ...) -> None: ...
    def start_file(self, name: str, filename: str, content_type: str, headers: Any = ...) -> Any: ...
    def feed(self, data: bytes) -> None: ...
    def end_file(self) -> Any: ...


class _Collector:
    """The target behind :meth:`MultipartDecoder.feed`: events in a list."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: List[Event] = []

    def add_field(self, name: str, value: str, headers: HeaderList = ()) -> None:
        self.events.append(Field(name, value, headers))

    def start_file(self, name: str, filename: str, content_type: str, headers: Any = ()) -> None:
        self.events.append(FileStart(name, filename, content_type, headers))

    def feed(self, data: bytes) -> None:
        self.events.append(FileData(data))

    def end_file(self) -> None:
        self.events.append(_FILE_END)


_KNOWN_HEADERS = frozenset(["Content-Disposition", "Content-Type", "Content-Length", "Content-Transfer-Encoding"])
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_DISPOSITION_PREFIX = b"Content-Disposition:"
_DISPOSITION_LEN = len(_DISPOSITION_PREFIX)
_FIELD_PREFIX = b'Content-Disposition: form-data; name="'
_FIELD_PREFIX_LEN = len(_FIELD_PREFIX)
_TYPE_LINE = b"\r\nContent-Type:"
_TYPE_LINE_LEN = len(_TYPE_LINE)


class MultipartDecoder:
    """Incremental decoder for one ``multipart/form-data`` body.

    Call :meth:`push` (parts go to a :class:`DecoderTarget`) or :meth:`feed`
    (parts come back as events) with each chunk as it arrives, then
    :meth:`close`. The first error is kept: later calls raise it again, so a
    caller that ignores one cannot read on past it.

    Why our own parser rather than an engine's events: a form of many small
    parts spends its time on per-part overhead, and a part is found, its
    headers read and its value handed over here in one pass over the buffer,
    with nothing allocated that the target does not keep. The verdicts follow
    RFC 7578 and RFC 2046 strictly: lines end with CRLF (a bare CR or LF in a
    header block is refused), the delimiter is followed by CRLF or ``--``, and a
    chunking of the body never changes the outcome.

    :raises MalformedMultipart: the body is not valid multipart/form-data.
    :raises TooManyParts, TooManyFiles, FieldTooLarge, HeaderTooLarge: a limit.
    """

    def __init__(self, boundary: Union[bytes, str], limits: Limits = Limits(),
                 charset: str = "utf-8") -> None:
        if isinstance(boundary, str):
            boundary = boundary.encode("latin-1")
        if not boundary or b"\r" in boundary or b"\n" in boundary:
            raise ValueError(f"invalid multipart boundary {boundary!r}")
        self.limits = limits
        self.charset = charset
        self.state = State.PREAMBLE
        self.error: Optional[UploadError] = None
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buf = b""
        self._skipped = 0  # preamble bytes dropped while looking for the first boundary
        self._parts = 0
        self._files = 0
        self._form_bytes = 0
        # The current part.
        self._name = ""
        self._headers: HeaderList = ()
        self._field: List[bytes] = []
        self._field_size = 0
        self._field_charset = charset
        self._length: Optional[int] = None  # the part's own Content-Length, rarely sent
        self._received = 0

    # -- public ------------------------------------------------------------

    def feed(self, chunk: bytes) -> List[Event]:
        """Decode one chunk (``bytes`` or ``bytearray``) and return the events it completes."""
        collector = _Collector()
        self.push(chunk, collector)
        return collector.events

    def push(self, chunk: bytes, target: DecoderTarget) -> None:
        """Decode one chunk, delivering what it completes to ``target``.

        An error raised by the target (a handler's refusal) fails the decoder too.
        """
        if self.error is not None:
            raise self.error
        if self.state is State.FAILED:
            raise RuntimeError("the decoder failed earlier; it cannot go on")
        if not chunk:
            return
        try:
            self._parse(chunk if type(chunk) is bytes else bytes(chunk), target)
        except UploadError as exc:
            raise self._fail(exc) from None
        except BaseException:
            self.state = State.FAILED
            raise

    def close(self) -> List[Event]:
        """Signal the end of the body.

        :raises MalformedMultipart: the final boundary was never seen.
        """
        if self.error is not None:
            raise self.error
        if self.state is State.COMPLETE:
            return []
        where = "before the first part" if self._parts == 0 else f"inside part {self._parts}"
        raise self._fail(MalformedMultipart(f"the body ended {where}, before the final boundary"))

    # -- the parse ---------------------------------------------------------

    def _parse(self, chunk: bytes, target: DecoderTarget) -> None:
        state = self.state
        if state is State.COMPLETE:
            return  # the epilogue, which RFC 2046 says to ignore
        buf = self._buf + chunk if self._buf else chunk
        self._buf = b""
        if state is State.PREAMBLE:
            pos = self._preamble(buf)
            if pos < 0:
                return
            state = self.state
        else:
            pos = 0
        n = len(buf)
        delim = self._delimiter
        dlen = len(delim)
        find = buf.find
        max_field = self.limits.max_field_size
        max_form = self.limits.max_form_memory
        while pos < n:
            if state is State.HEADERS:
                line_end = buf.find(b"\r\n", pos, pos + self.limits.max_header_size)
                if line_end > 0 and buf.startswith(_FIELD_PREFIX, pos) \
                        and buf.find(b'"', pos + _FIELD_PREFIX_LEN, line_end) == line_end - 1:
                    # A lone name="...", no filename: browsers' text fields.
                    pos = self._simple_fields(buf, pos, target)
                    state = self.state
                    if state is State.COMPLETE:
                        return
                    if pos >= n:
                        break
                if n - pos < 2:
                    break
                if buf[pos] == 13 and buf[pos + 1] == 10:  # an empty header block
                    state = self._start_part(b"", target)
                    pos += 2
                    continue
                end = find(b"\r\n\r\n", pos)
                if end == -1:
                    if n - pos - 3 > self.limits.max_header_size:
                        raise self._header_too_large(n - pos - 3)
                    break
                if end - pos > self.limits.max_header_size:
                    raise self._header_too_large(end - pos)
                state = self._start_part(buf[pos:end], target)
                pos = end + 4
            else:  # a part's body: FILE, or FIELD/SKIP (a text field's value)
                index = find(delim, pos)
                if index != -1 and state is State.FIELD and not self._field and self._length is None \
                        and index + dlen + 2 <= n:
                    # The common case: the whole value is in this buffer.
                    after = index + dlen
                    tail = buf[after:after + 2]
                    if tail != b"\r\n" and tail != b"--":
                        raise self._bad_delimiter()
                    size = index - pos
                    self._form_bytes += size
                    if (max_field is not None and size > max_field) or (
                            max_form is not None and self._form_bytes > max_form):
                        self._field_size = size
                        self._check_field()
                    try:
                        value = buf[pos:index].decode(self._field_charset, "replace")
                    except LookupError:  # an unknown charset named by the client
                        value = buf[pos:index].decode(self.charset, "replace")
                    target.add_field(self._name, value, self._headers)
                    pos = after + 2
                    if tail == b"--":
                        state = self.state = State.COMPLETE
                        return
                    state = State.HEADERS
                    continue
                if index == -1:
                    # Keep back a possible start of the delimiter; the boundary
                    # has no CR, so only the last CR can begin one.
                    cut = buf.rfind(b"\r", max(pos, n - dlen + 1))
                    if cut == -1 or not delim.startswith(buf[cut:]):
                        cut = n
                    if cut > pos:
                        state = self._body(buf[pos:cut] if pos or cut != n else buf, state, target)
                    pos = cut
                    break
                after = index + dlen
                if index > pos:
                    state = self._body(buf[pos:index], state, target)
                    pos = index
                if after + 2 > n:
                    break
                tail = buf[after:after + 2]
                if tail == b"\r\n":
                    self._end_part(target)
                    state = self.state = State.HEADERS
                    pos = after + 2
                elif tail == b"--":
                    self._end_part(target)
                    state = self.state = State.COMPLETE
                    return
                else:
                    raise self._bad_delimiter()
        self.state = state
        if pos < n:
            self._buf = buf[pos:]

    def _simple_fields(self, buf: bytes, pos: int, target: DecoderTarget) -> int:
        """Text fields as browsers send them (a lone ``Content-Disposition:
        form-data; name="..."``), each wholly in ``buf``, in one tight loop.

        Stops, returning where, at the first part that is anything else, is cut
        by the buffer's end, or breaks a rule or limit: the general path then
        takes that part from its start, and gives the verdict.
        """
        n = len(buf)
        find = buf.find
        delim = self._delimiter
        dlen = len(delim)
        limits = self.limits
        max_parts = limits.max_parts
        max_field = limits.max_field_size
        max_form = limits.max_form_memory
        head_limit = limits.max_header_size + 4
        charset = self.charset
        add = target.add_field
        plen = len(_FIELD_PREFIX)
        parts = self._parts
        form_bytes = self._form_bytes
        state = State.HEADERS
        while buf.startswith(_FIELD_PREFIX, pos):
            end = find(b"\r\n\r\n", pos, pos + head_limit)
            if end == -1:
                break
            quoted = buf[pos + plen:end]  # the name, then its closing quote
            if quoted[-1:] != b'"' or len(quoted) < 2 or quoted.count(b'"') != 1 \
                    or b"%" in quoted or b"\r" in quoted or b"\n" in quoted:
                break  # a file, or a field named unusually
            index = find(delim, end + 4)
            if index == -1 or index + dlen + 2 > n:
                break
            after = index + dlen
            tail = buf[after:after + 2]
            if tail != b"\r\n" and tail != b"--":
                break
            size = index - end - 4
            if (max_parts is not None and parts >= max_parts) or (max_field is not None and size > max_field) \
                    or (max_form is not None and form_bytes + size > max_form):
                break
            try:
                name = quoted[:-1].decode("utf-8")
            except UnicodeDecodeError:
                break
            try:
                value = buf[end + 4:index].decode(charset, "replace")
            except LookupError:
                break
            parts += 1
            form_bytes += size
            add(name, value, (("Content-Disposition", f'form-data; name="{name}"'),))
            pos = after + 2
            if tail == b"--":
                state = State.COMPLETE
                break
        self._parts = parts
        self._form_bytes = form_bytes
        self.state = state
        return pos

    def _preamble(self, buf: bytes) -> int:
        """Find the first boundary ourselves (it needs no CRLF before it, unlike
        the others, and may follow a preamble), so that where the body is cut
        cannot change the verdict.

        Returns where the first part's headers begin, or -1 to wait for more.
        :raises MalformedMultipart: no boundary within the limit, or bytes glued to it.
        """
        dash = self._dash_boundary
        index = buf.find(dash)
        if index == -1:
            if self._skipped + len(buf) > PREAMBLE_LIMIT + len(dash):
                raise MalformedMultipart(
                    f"no multipart boundary in the first {PREAMBLE_LIMIT // 1024} KiB of the body")
            keep = len(dash) + 1  # a boundary cut short, and the CRLF before it
            if len(buf) > keep:
                self._skipped += len(buf) - keep
                buf = buf[-keep:]
            self._buf = buf
            return -1
        if self._skipped + index > PREAMBLE_LIMIT:
            raise MalformedMultipart(
                f"no multipart boundary in the first {PREAMBLE_LIMIT // 1024} KiB of the body")
        if (index > 0 or self._skipped) and buf[index - 2:index] != b"\r\n":
            raise MalformedMultipart("unexpected bytes right before the first boundary")
        after = index + len(dash)
        tail = buf[after:after + 2]
        if len(tail) < 2 and tail in (b"", b"\r", b"-"):
            start = index - 2 if index >= 2 else index  # wait for the line's end
            self._skipped += start
            self._buf = buf[start:]
            return -1
        if tail == b"\r\n":
            self.state = State.HEADERS
            return after + 2
        if tail == b"--":
            self.state = State.COMPLETE  # an empty form
            return -1
        if tail.startswith(b"\n"):
            raise MalformedMultipart("the first boundary ends with a bare LF line break; lines end with CRLF")
        raise MalformedMultipart("unexpected bytes after the first boundary")

    def _bad_delimiter(self) -> MalformedMultipart:
        return MalformedMultipart(
            f"part {self._parts}: a boundary is followed by bytes other than CRLF or '--'", field=self._name)

    def _header_too_large(self, size: int) -> HeaderTooLarge:
        limit = self.limits.max_header_size
        return HeaderTooLarge(f"part {self._parts + 1}: a header block of more than {limit} bytes",
                              limit=limit)

    def _count(self, size: int) -> None:
        self._received += size
        if self._length is not None and self._received > self._length:
            raise MalformedMultipart(
                f"part {self._parts} ({self._name!r}) is longer than its Content-Length of {self._length}",
                field=self._name)

    def _fail(self, exc: UploadError) -> UploadError:
        self.error = exc
        self.state = State.FAILED
        return exc

    # -- parts ---------------------------------------------------------------

    def _parse_headers(self, block: bytes) -> List[Tuple[str, str]]:
        """A header block -> (Title-Case name, value) pairs, folded lines joined.

        :raises MalformedMultipart: a line that is not a header.
        :raises HeaderTooLarge: more than ``max_header_count`` headers.
        """
        part = self._parts
        headers: List[Tuple[str, str]] = []
        lines = block.split(b"\r\n") if block else []
        if block.count(b"\r") >= len(lines) or block.count(b"\n") >= len(lines):
            raise MalformedMultipart(f"part {part}: a bare CR or LF line break in its headers; lines end with CRLF")
        for line in lines:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedMultipart(f"part {part}: its headers are not UTF-8") from None
            if text[0] in " \t":  # an obsolete folded continuation line
                if not headers or text.isspace():
                    raise MalformedMultipart(f"part {part}: a header continuation line with nothing to continue")
                name, value = headers.pop()
                headers.append((name, f"{value} {text[1:]}"))
                continue
            name, colon, value = text.partition(":")
            if not colon:
                raise MalformedMultipart(f"part {part}: the header line {text[:80]!r} has no colon")
            if name not in _KNOWN_HEADERS:
                name = name.strip().title()
                if name not in _KNOWN_HEADERS and not _HEADER_NAME_RE.fullmatch(name):
                    raise MalformedMultipart(f"part {part}: invalid header name {name[:80]!r}")
            if len(headers) >= self.limits.max_header_count:
                raise HeaderTooLarge(
                    f"part {part}: more than {self.limits.max_header_count} headers",
                    limit=self.limits.max_header_count)
            headers.append((name, value.lstrip(" \t")))
        return headers

    def _start_part(self, block: bytes, target: DecoderTarget) -> State:
        """A part's header block is complete: check it, then begin the part.
        Returns the new state."""
        limits = self.limits
        self._parts += 1
        if limits.max_parts is not None and self._parts > limits.max_parts:
            raise TooManyParts(f"the body has more than {limits.max_parts} parts", limit=limits.max_parts)
        quick = self._browser_headers(block)
        if quick is not None:
            headers, disposition, content_type, charset = quick
            length = None
        else:
            headers = tuple(self._parse_headers(block))
            disposition, content_type, charset, length = self._check_headers(headers)
        split = disposition.split('"', 4)
        if len(split) == 3 and split[0] == "form-data; name=" and not split[2] and "%" not in split[1]:
            kind, name, filename = "form-data", split[1], None  # what the helper would say, sooner
        else:
            kind, name, filename = parse_content_disposition(disposition)
        if kind != "form-data":
            raise MalformedMultipart(
                f"part {self._parts}: Content-Disposition is {kind!r}, not 'form-data'")
        if not name:
            raise MalformedMultipart(f"part {self._parts} has no field name")
        if not filename and "filename*" in disposition:
            # Search outside quoted strings only: a field *named*
            # 'x; filename*=...' must not turn into a file.
            masked = _QUOTED_RE.sub(lambda m: '"' + "_" * (len(m[0]) - 2) + '"', disposition)
            match = _FILENAME_STAR_RE.search(masked)
            if match:
                value = disposition[match.start(1):match.end(1)]
                filename = _decode_filename_star(value) or filename
        self._name = name
        self._headers = headers
        self._length = length
        if length is not None:
            self._received = 0
        if filename:
            self._files += 1
            if limits.max_files is not None and self._files > limits.max_files:
                raise TooManyFiles(f"the body has more than {limits.max_files} files",
                                   field=name, limit=limits.max_files)
            target.start_file(name, filename, content_type, headers)
            self.state = State.FILE
            return State.FILE
        self._field = []
        self._field_size = 0
        self._field_charset = charset or self.charset
        # filename="" is a browser's "no file selected": skipped if its body is empty.
        self.state = State.SKIP if filename == "" else State.FIELD
        return self.state

    def _browser_headers(self, block: bytes) -> Optional[Tuple[HeaderList, str, str, Optional[str]]]:
        """The two header blocks browsers send, read without the general loop:
        a lone Content-Disposition (a text field), or one followed by a
        Content-Type (a file). Returns ``(headers, disposition, content type,
        charset)`` exactly as :meth:`_parse_headers` and :meth:`_check_headers`
        would, or None for any other block, which they then judge (and refuse,
        with their message, when it breaks a rule)."""
        if not block.startswith(_DISPOSITION_PREFIX):
            return None
        cr = block.find(b"\r")
        if cr == -1:
            if b"\n" in block:
                return None
            try:
                disposition = block[_DISPOSITION_LEN:].decode("utf-8").lstrip(" \t")
            except UnicodeDecodeError:
                return None
            return (("Content-Disposition", disposition),), disposition, "", None
        if not block.startswith(_TYPE_LINE, cr) or block.find(b"\r", cr + 1) != -1 \
                or block.count(b"\n") != 1 or self.limits.max_header_count < 2:
            return None
        try:
            disposition = block[_DISPOSITION_LEN:cr].decode("utf-8").lstrip(" \t")
            declared = block[cr + _TYPE_LINE_LEN:].decode("utf-8").lstrip(" \t")
        except UnicodeDecodeError:
            return None
        content_type, options = parse_options_header(declared)
        headers = (("Content-Disposition", disposition), ("Content-Type", declared))
        return headers, disposition, content_type, options.get("charset")

    def _check_headers(self, headers: HeaderList) -> Tuple[str, str, Optional[str], Optional[int]]:
        """Checks for parts with several headers; returns the Content-Disposition,
        the content type and its charset, and the part's Content-Length if sent."""
        part = self._parts
        dispositions = [v for k, v in headers if k == "Content-Disposition"]
        if len(dispositions) != 1:
            raise MalformedMultipart(f"part {part} has {len(dispositions)} Content-Disposition headers")
        content_type, charset, length = "", None, None
        for key, value in headers:
            if key == "Content-Type":
                content_type, options = parse_options_header(value)
                charset = options.get("charset")
            elif key == "Content-Transfer-Encoding":
                encoding = value.strip().lower()
                if encoding not in _ALLOWED_ENCODINGS:
                    raise MalformedMultipart(
                        f"part {part} uses Content-Transfer-Encoding {encoding!r},"
                        " which RFC 7578 deprecates; send the bytes as they are")
            elif key == "Content-Length":
                text = value.strip()
                if not (text.isascii() and text.isdigit()):
                    raise MalformedMultipart(f"part {part}: invalid Content-Length {text[:40]!r}")
                length = int(text)
        return dispositions[0], content_type, charset, length

    def _body(self, data: bytes, state: State, target: DecoderTarget) -> State:
        """Bytes of the current part's body; returns the state after them."""
        if state is State.FILE:
            if self._length is not None:
                self._count(len(data))
            target.feed(data)
            return state
        return self._field_data(data)

    def _field_data(self, data: bytes) -> State:
        """Bytes of a text field (or of a skipped part, which they make a field)."""
        self.state = State.FIELD
        if self._length is not None:
            self._count(len(data))
        self._field_size += len(data)
        self._form_bytes += len(data)
        limits = self.limits
        if (limits.max_field_size is not None and self._field_size > limits.max_field_size) or (
                limits.max_form_memory is not None and self._form_bytes > limits.max_form_memory):
            self._check_field()
        self._field.append(data)
        return State.FIELD

    def _check_field(self) -> None:
        limits = self.limits
        name = self._name
        if limits.max_field_size is not None and self._field_size > limits.max_field_size:
            raise FieldTooLarge(
                f"field {name!r} is larger than the limit of {format_size(limits.max_field_size)}",
                field=name, limit=limits.max_field_size)
        if limits.max_form_memory is not None and self._form_bytes > limits.max_form_memory:
            raise FieldTooLarge(
                f"the text fields add up to more than {format_size(limits.max_form_memory)}",
                field=name, limit=limits.max_form_memory)

    def _end_part(self, target: DecoderTarget) -> None:
        state = self.state
        if self._length is not None and self._received != self._length:
            raise MalformedMultipart(
                f"part {self._parts} ({self._name!r}) is shorter than its Content-Length of {self._length}",
                field=self._name)
        if state is State.FILE:
            target.end_file()
        elif state is State.FIELD:
            chunks = self._field
            raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                value = raw.decode(self._field_charset, "replace")
            except LookupError:  # an unknown charset named by the client
                value = raw.decode(self.charset, "replace")
            target.add_field(self._name, value, self._headers)
            self._field = []


# -- encoding --------------------------------------------------------------

FileTuple = Tuple[str, str, str, bytes]


def new_boundary() -> str:
    return "uploadkit-" + os.urandom(16).hex()


def _quote(value: str) -> str:
    # WHATWG's form encoding: escape CR, LF and the double quote by percent-encoding.
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def encode_multipart(fields: Iterable[Tuple[str, str]] = (), files: Sequence[FileTuple] = (),
                     boundary: Optional[str] = None) -> Tuple[bytes, str]:
    """Build a multipart/form-data body: ``(body, content_type)``.

    Fields come first, then files, each in the given order.
    """
    boundary = boundary or new_boundary()
    sep = b"--" + boundary.encode("latin-1")
    out: List[bytes] = []
    for name, value in fields:
        out += [sep, b"\r\n", f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode(),
                value.encode("utf-8"), b"\r\n"]
    for name, filename, ctype, data in files:
        head = (f'Content-Disposition: form-data; name="{_quote(name)}"; filename="{_quote(filename)}"\r\n'
                f"Content-Type: {ctype or 'application/octet-stream'}\r\n\r\n")
        out += [sep, b"\r\n", head.encode("utf-8"), data, b"\r\n"]
    out += [sep, b"--\r\n"]
    return b"".join(out), f"multipart/form-data; boundary={boundary}"
