"""What a handler sees while a file streams (:class:`FileInfo`) and what the
application gets once it is finished (:class:`UploadedFile`)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Tuple
from wsgiref.headers import Headers

Opener = Callable[[], IO[bytes]]


@dataclass(eq=False)
class FileInfo:
    """A file part while it streams through the handler pipeline.

    Handlers read it and may annotate it: the sniffing handler sets
    ``content_type``, the hashing handler ``sha256``/``md5``; anything else goes
    in ``extra``. ``size`` counts the bytes received from the client so far.
    """

    field_name: str
    #: Safe to use as a file name: see :func:`uploadkit.filenames.sanitize_filename`.
    filename: str
    #: As the client sent it. Untrusted: never use it in a path or in HTML unescaped.
    raw_filename: str
    #: The part's Content-Type as declared by the client ("" when absent).
    declared_type: str
    #: The best type known: sniffed when the bytes tell, else the declared one.
    content_type: str
    headers: Headers
    #: Position among the request's files, from 0.
    index: int
    size: int = 0
    #: The file's first bytes (up to the pipeline's ``head_size``), available in
    #: ``file_start`` so a decision can be made before any byte is stored.
    head: bytes = b""
    sha256: Optional[str] = None
    md5: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    #: Set by the pipeline once a handler's ``file_end`` returned the file.
    file: Optional["UploadedFile"] = None

    @property
    def extension(self) -> str:
        """The sanitized filename's extension, lower-cased, with its dot ("" if none)."""
        stem, dot, ext = self.filename.rpartition(".")
        return f".{ext.lower()}" if dot and stem else ""


@dataclass(eq=False)
class UploadedFile:
    """A finished upload, as handed to the application.

    ``open()`` returns a fresh binary file object on every call; close it when
    done. A file kept in a temp file lives until the response is closed.
    """

    field_name: str
    filename: str
    #: As the client sent it. Untrusted: never use it in a path or in HTML unescaped.
    raw_filename: str
    content_type: str
    declared_type: str
    size: int
    headers: Headers
    opener: Opener = field(repr=False)
    sha256: Optional[str] = None
    md5: Optional[str] = None
    #: Storage key and public URL, when a storage handler kept the file.
    key: Optional[str] = None
    url: Optional[str] = None
    #: ``"WxH"`` -> storage key of each thumbnail made for this file.
    thumbnails: Dict[str, str] = field(default_factory=dict)
    #: A local filesystem path holding the bytes, when there is one (temp file or
    #: local storage); frameworks use it to move instead of copy.
    path: Optional[str] = None
    #: True when content-addressed storage found the bytes already stored.
    deduplicated: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: FileInfo, opener: Opener, *, size: Optional[int] = None, **kw: Any) -> "UploadedFile":
        """Build the finished file from the streaming record; ``size`` defaults to bytes received."""
        return cls(
            field_name=info.field_name,
            filename=info.filename,
            raw_filename=info.raw_filename,
            content_type=info.content_type,
            declared_type=info.declared_type,
            size=info.size if size is None else size,
            headers=info.headers,
            opener=opener,
            sha256=info.sha256,
            md5=info.md5,
            extra=dict(info.extra),
            **kw,
        )

    def open(self) -> IO[bytes]:
        return self.opener()

    def read(self) -> bytes:
        """All the bytes at once: convenient for small files, avoid it for large ones."""
        with self.open() as f:
            return f.read()

    def metadata(self) -> List[Tuple[str, str]]:
        """The ``(suffix, value)`` pairs re-encoded for apps without an adapter:
        the nginx upload module's ``<field>.name``, ``<field>.size``... convention."""
        pairs = [
            ("name", self.filename),
            ("content_type", self.content_type),
            ("size", str(self.size)),
            ("sha256", self.sha256 or ""),
            ("key", self.key or ""),
            ("url", self.url or ""),
        ]
        if self.md5:
            pairs.append(("md5", self.md5))
        if self.thumbnails:
            pairs.append(("thumbnails", ",".join(f"{k}={v}" for k, v in sorted(self.thumbnails.items()))))
        return pairs


def bytes_opener(data: bytes) -> Opener:
    return lambda: io.BytesIO(data)


def path_opener(path: str) -> Opener:
    return lambda: open(path, "rb")
