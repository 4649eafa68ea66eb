"""Every refusal uploadkit makes, as a type that carries its HTTP answer.

The middleware turns any :class:`UploadError` into a JSON response of the form
``{"error": {"code", "message", "field", "limit"}}`` with the class's ``status``,
so a client always learns *what* was wrong, and code can catch one family of
exceptions. Messages name the offending value and the configured limit.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class UploadError(Exception):
    """Root of uploadkit's refusals.

    :param message: human-readable sentence naming the problem.
    :param field: the form field concerned, when there is one.
    :param limit: the configured limit that was crossed, when there is one.
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "upload_error"

    def __init__(
        self, message: str, *, field: str | None = None, limit: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "field": self.field,
                "limit": self.limit,
            }
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r}, limit={self.limit!r})"


class MalformedMultipart(UploadError):
    """The body is not valid multipart/form-data (boundary, headers, truncation)."""

    status = 400
    code = "malformed_multipart"


class ClientDisconnected(UploadError):
    """The body ended before CONTENT_LENGTH bytes arrived, or reading it failed."""

    status = 400
    code = "client_disconnected"


class ClientTimeout(UploadError):
    """The client stalled (nothing for ``Limits.idle_timeout`` seconds) or
    trickled (a read slower than ``Limits.min_rate``) in the middle of its body."""

    status = 408
    code = "client_timeout"


class LengthRequired(UploadError):
    """Neither CONTENT_LENGTH nor a server-terminated input stream (chunked body)."""

    status = 411
    code = "length_required"


class RequestTooLarge(UploadError):
    status = 413
    code = "request_too_large"


class FileTooLarge(UploadError):
    status = 413
    code = "file_too_large"


class TooManyFiles(UploadError):
    status = 413
    code = "too_many_files"


class TooManyParts(UploadError):
    status = 413
    code = "too_many_parts"


class FieldTooLarge(UploadError):
    status = 413
    code = "field_too_large"


class HeaderTooLarge(UploadError):
    """A part's header block is larger than ``Limits.max_header_size``."""

    status = 413
    code = "header_too_large"


class QuotaExceeded(UploadError):
    status = 413
    code = "quota_exceeded"


class UnsupportedType(UploadError):
    """The sniffed type is not allowed, unidentifiable, or contradicts the name."""

    status = 415
    code = "unsupported_type"


class BadProgressId(UploadError):
    """An X-Progress-ID outside ``[A-Za-z0-9_-]{1,64}``: never sent to a store."""

    status = 400
    code = "bad_progress_id"


class FileExists(UploadError):
    """Storage configured with ``collision="error"`` found the key taken."""

    status = 409
    code = "file_exists"


class BadImage(UploadError):
    """An image that is corrupt, truncated, or a decompression bomb."""

    status = 422
    code = "bad_image"


class StorageUnavailable(UploadError):
    """The storage backend failed (disk full, permission denied, unreachable)."""

    status = 503
    code = "storage_unavailable"


class ProgressUnavailable(UploadError):
    """The progress store could not be read (status route only; uploads never fail on it)."""

    status = 503
    code = "progress_unavailable"


class BadKey(UploadError, ValueError):
    """A storage key that is empty, absolute, hidden, or could leave the storage
    root (``..``, backslashes, empty segments, control characters)."""

    status = 400
    code = "bad_key"


class InternalError(UploadError):
    """A failure that is not the client's: reported to progress pollers; the
    server's own 500 answers the request itself."""

    status = 500
    code = "internal_error"


def format_size(n: int | float) -> str:
    """Render a byte count the way error messages quote limits: ``12.0 MiB``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
