"""The limits of one upload, in one explicit object.

A :class:`Limits` is passed in (per middleware, or per request through a
callable), never read from globals in the middle of a parse, so two routes can
have different limits and tests can pin them down. ``None`` means unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    #: Whole body, in bytes. Checked against CONTENT_LENGTH before reading and
    #: counted while reading (chunked bodies have no CONTENT_LENGTH).
    max_request_size: Optional[int] = None
    #: One file's size, in bytes.
    max_file_size: Optional[int] = None
    #: Files per request: 100 is more than any form field picker sends.
    max_files: Optional[int] = 100
    #: Parts of any kind (fields + files): caps per-part overhead (CVE-2023-24580).
    max_parts: Optional[int] = 1000
    #: One text field's value: text fields are held in memory, files are not.
    max_field_size: Optional[int] = 1 * MiB
    #: All text fields together: they are held in memory, so 1000 parts of
    #: 1 MiB must not add up to a gigabyte.
    max_form_memory: Optional[int] = 8 * MiB
    #: One part's header block: RFC 7578 needs about three short lines.
    max_header_size: int = 8 * 1024
    #: Header lines per part: RFC 7578 allows just three.
    max_header_count: int = 8
    #: Allowed sniffed types, e.g. ``{"image/png", "image/*"}``; None allows any.
    allowed_types: Optional[FrozenSet[str]] = None
    #: Sanitized filenames are cut to this many characters, keeping the extension.
    max_filename_length: int = 255
    #: Seconds a read of the body may wait for the client's next bytes: a
    #: client that sends its headers and stops must not hold a worker thread
    #: for ever. 60 s is nginx's ``client_body_timeout``; a live client on a
    #: bad link is never that silent. Enforced where the server hands over its
    #: socket (gunicorn, Werkzeug); refused as 408 ``client_timeout``.
    idle_timeout: Optional[float] = 60.0
    #: Bytes a second the body must keep up: each read of ``n`` bytes must be
    #: done within ``idle_timeout + n / min_rate`` seconds, so a byte every few
    #: seconds (never silent for ``idle_timeout``) is refused too. 500 is
    #: Apache's ``RequestReadTimeout body=20,MinRate=500``, far below any
    #: working mobile link.
    min_rate: Optional[float] = 500

    def __post_init__(self) -> None:
        for name in ("max_request_size", "max_file_size", "max_files", "max_parts", "max_field_size",
                     "max_form_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"Limits.{name} must be a non-negative int or None, not {value!r}")
        for name in ("max_header_size", "max_header_count", "max_filename_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, not {value!r}")
        for name in ("idle_timeout", "min_rate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"Limits.{name} must be a positive number or None, not {value!r}")
        if self.allowed_types is not None:
            if isinstance(self.allowed_types, str):
                raise ValueError("Limits.allowed_types must be a set of types, not one string")
            types = frozenset(t.strip().lower() for t in self.allowed_types)
            for t in types:
                if t.count("/") != 1:
                    raise ValueError(f"Limits.allowed_types: {t!r} is not a MIME type like 'image/png'")
            object.__setattr__(self, "allowed_types", types)

    def allows_type(self, content_type: str) -> bool:
        """True when ``content_type`` matches an allowed type (``image/*`` wildcards too)."""
        if self.allowed_types is None:
            return True
        content_type = content_type.lower()
        if content_type in self.allowed_types:
            return True
        major = content_type.split("/", 1)[0]
        return f"{major}/*" in self.allowed_types
