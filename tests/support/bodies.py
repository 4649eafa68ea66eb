"""Building multipart bodies by hand and feeding them to the decoder in pieces.

The helpers here are deliberately dumb: a body is bytes, a chunking is a list
of sizes, and events are compared after adjacent ``FileData`` are merged, so a
test states *what* was decoded, independent of how the bytes were cut.
"""

from __future__ import annotations

import io
import random
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from uploadkit.limits import Limits
from uploadkit.multipart import Event, FileData, MultipartDecoder

BOUNDARY = "b0undary-T3st"
CRLF = b"\r\n"


def part(headers: Sequence[str] | bytes, data: bytes = b"", boundary: str = BOUNDARY) -> bytes:
    """One part: delimiter line, header lines, blank line, data, CRLF."""
    if isinstance(headers, bytes):
        head = headers
    else:
        head = CRLF.join(h.encode("utf-8") for h in headers)
    return b"--" + boundary.encode() + CRLF + head + CRLF + CRLF + data + CRLF


def field_part(name: str, value: bytes | str, boundary: str = BOUNDARY) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return part([f'Content-Disposition: form-data; name="{name}"'], data, boundary)


def file_part(name: str, filename: str, data: bytes, content_type: str = "application/octet-stream",
              boundary: str = BOUNDARY) -> bytes:
    return part([f'Content-Disposition: form-data; name="{name}"; filename="{filename}"',
                 f"Content-Type: {content_type}"], data, boundary)


def end(boundary: str = BOUNDARY) -> bytes:
    return b"--" + boundary.encode() + b"--" + CRLF


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


# -- chunkings ---------------------------------------------------------------

def fixed_chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def split_at(data: bytes, cuts: Iterable[int]) -> List[bytes]:
    """``data`` cut at the given offsets (sorted, duplicates and ends ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def random_chunks(data: bytes, rng: random.Random, max_size: int = 97) -> List[bytes]:
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_size)
        pieces.append(data[i:i + n])
        i += n
    return pieces


def merge_data(events: Iterable[Event]) -> List[Event]:
    """Adjacent FileData joined into one, so chunking does not show."""
    out: List[Event] = []
    for ev in events:
        if isinstance(ev, FileData) and out and isinstance(out[-1], FileData):
            out[-1] = FileData(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def decode(chunks: Iterable[bytes], boundary: str | bytes = BOUNDARY, limits: Limits = Limits()) -> List[Event]:
    """Feed every chunk, close, return the merged events. Errors propagate."""
    dec = MultipartDecoder(boundary, limits)
    events: List[Event] = []
    for c in chunks:
        events += dec.feed(c)
    events += dec.close()
    return merge_data(events)


def strip_headers(events: Iterable[Event]) -> List[Event]:
    """Events with their ``headers`` emptied, for comparisons that ignore them."""
    from dataclasses import replace
    return [replace(e, headers=()) if hasattr(e, "headers") else e for e in events]


# -- streams ------------------------------------------------------------------

class TrickleStream(io.RawIOBase):
    """A readable stream that returns at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        self.reads += 1
        if size is None or size < 0:
            size = len(self._data)
        n = min(size, self._step, len(self._data) - self._pos)
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return out


class GeneratedStream(io.RawIOBase):
    """A stream over a generator of byte chunks, never holding more than one."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        if size is None or size < 0:
            return self._buf + b"".join(self._it)
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return b""
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


def sized_file_body(field: str, filename: str, size: int, boundary: str = BOUNDARY,
                    block: int = 1 << 20, seed: int = 7) -> Tuple[Iterator[bytes], int, str]:
    """A generator of one file part of ``size`` pseudo-random bytes, its length
    and the file's sha256, without ever holding the file in memory."""
    import hashlib

    rnd = random.Random(seed)
    pattern = bytes(rnd.getrandbits(8) for _ in range(block))
    head = (b"--" + boundary.encode() + CRLF
            + f'Content-Disposition: form-data; name="{field}"; filename="{filename}"'.encode() + CRLF
            + b"Content-Type: application/octet-stream" + CRLF + CRLF)
    tail = CRLF + end(boundary)
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, block)
        h.update(pattern[:n])
        left -= n

    def gen() -> Iterator[bytes]:
        yield head
        left = size
        while left:
            n = min(left, block)
            yield pattern[:n]
            left -= n
        yield tail

    return gen(), len(head) + size + len(tail), h.hexdigest()
