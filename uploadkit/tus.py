"""The tus 1.0 resumable-upload protocol, without I/O: what a request asks
and what the answer's headers say.

tus (https://tus.io/protocols/resumable-upload) splits one file over several
requests: ``POST`` creates an upload and answers its URL, ``HEAD`` tells how
many bytes the server holds, each ``PATCH`` appends bytes at that offset, and
``DELETE`` terminates it. This module parses and checks the headers of those
requests and builds the headers of the answers; :mod:`uploadkit.resumable`
keeps the uploads' state and bytes, and :mod:`uploadkit.tusapp` drives the
handler pipeline with them.

Every refusal is an :class:`~uploadkit.errors.UploadError` subclass carrying the
status the protocol asks for (412, 409, 415, 404, 410, 423, 460...).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate
from typing import Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .errors import UploadError

TUS_VERSION = "1.0.0"
#: The extensions this server speaks, in the order ``Tus-Extension`` lists them.
EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "expiration",
              "checksum", "termination", "concatenation")
#: ``Upload-Checksum`` algorithms, as the tus checksum extension names them.
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")
PATCH_CONTENT_TYPE = "application/offset+octet-stream"
#: Every tus header a browser client reads: a cross-origin answer must expose
#: them or tus-js-client cannot see the offset it resumes from.
EXPOSED_HEADERS = ("Upload-Offset", "Upload-Length", "Upload-Defer-Length", "Upload-Metadata",
                   "Upload-Expires", "Upload-Concat", "Location", "Tus-Version", "Tus-Resumable",
                   "Tus-Max-Size", "Tus-Extension", "Tus-Checksum-Algorithm")
#: Request headers a browser client sends, allowed in a CORS preflight.
ALLOWED_HEADERS = ("Authorization", "Origin", "X-Requested-With", "X-Request-ID", "X-HTTP-Method-Override",
                   "Content-Type", "Upload-Length", "Upload-Offset", "Tus-Resumable", "Upload-Metadata",
                   "Upload-Defer-Length", "Upload-Concat", "Upload-Checksum", "X-Progress-ID")
METHODS = ("POST", "HEAD", "PATCH", "DELETE", "OPTIONS", "GET")

#: Upload ids are ours alone: 32 lower-case hex digits (128 random bits). Any
#: other id is unknown before it can reach a file system, a bucket or memcached.
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
_DIGITS = re.compile(r"[0-9]{1,19}")
# RFC 9110 token characters: what a metadata key may hold (no space, no comma).
_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
#: Metadata pairs and bytes: Upload-Metadata is kept with the upload's state.
MAX_METADATA_PAIRS = 64
MAX_METADATA_BYTES = 16 * 1024


# -- refusals ----------------------------------------------------------------


class TusError(UploadError):
    """A request the tus protocol refuses."""

    status = 400
    code = "tus_bad_request"


class UnsupportedVersion(TusError):
    """``Tus-Resumable`` is missing or not ``1.0.0``: the answer names ours in ``Tus-Version``."""

    status = 412
    code = "tus_version_unsupported"


class UploadNotFound(TusError):
    status = 404
    code = "upload_not_found"


class UploadGone(TusError):
    """The upload expired or was terminated."""

    status = 410
    code = "upload_gone"


class OffsetMismatch(TusError):
    """``Upload-Offset`` is not the offset the server holds: the client must HEAD first."""

    status = 409
    code = "upload_offset_mismatch"


class WrongContentType(TusError):
    status = 415
    code = "tus_content_type"


class UploadTooLarge(TusError):
    """``Upload-Length``, or a body, beyond what the upload may hold."""

    status = 413
    code = "upload_too_large"


class UploadLocked(TusError):
    """Another request is writing to this upload; tus clients retry on 423."""

    status = 423
    code = "upload_locked"


class ChecksumMismatch(TusError):
    """The PATCH body's digest is not ``Upload-Checksum``'s: nothing of it was kept."""

    status = 460
    code = "checksum_mismatch"


class UnsupportedChecksum(TusError):
    status = 400
    code = "checksum_algorithm_unsupported"


class TusForbidden(TusError):
    status = 403
    code = "forbidden"


class TusMethodNotAllowed(TusError):
    status = 405
    code = "method_not_allowed"


# -- ids -----------------------------------------------------------------------


def new_upload_id() -> str:
    return secrets.token_hex(16)


def valid_upload_id(value: str) -> bool:
    return bool(UPLOAD_ID_RE.fullmatch(value))


# -- headers -------------------------------------------------------------------


def check_version(value: Optional[str]) -> None:
    """:raises UnsupportedVersion: unless ``value`` is ``1.0.0``."""
    if value is None:
        raise UnsupportedVersion("the request has no Tus-Resumable header; this server speaks tus 1.0.0")
    if value.strip() != TUS_VERSION:
        raise UnsupportedVersion(f"Tus-Resumable {value.strip()[:20]!r} is not supported;"
                                 f" this server speaks {TUS_VERSION}")


def parse_size(name: str, value: Optional[str]) -> Optional[int]:
    """A non-negative integer header (``Upload-Length``, ``Upload-Offset``); None when absent.

    :raises TusError: the value is not plain ASCII digits.
    """
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS.fullmatch(value):
        raise TusError(f"{name} {value[:30]!r} is not a non-negative integer")
    return int(value)


def parse_metadata(value: Optional[str]) -> Dict[str, Optional[bytes]]:
    """``Upload-Metadata``: comma-separated ``key base64value`` (or a bare
    ``key``) pairs, parsed strictly.

    :raises TusError: a key that is empty, repeated or not a token, a value
        that is not canonical base64, or more pairs or bytes than we keep.
    """
    if value is None or not value.strip():
        return {}
    if len(value) > MAX_METADATA_BYTES:
        raise TusError(f"Upload-Metadata is longer than {MAX_METADATA_BYTES} bytes", limit=MAX_METADATA_BYTES)
    pairs: Dict[str, Optional[bytes]] = {}
    items = value.split(",")
    if len(items) > MAX_METADATA_PAIRS:
        raise TusError(f"Upload-Metadata has more than {MAX_METADATA_PAIRS} pairs", limit=MAX_METADATA_PAIRS)
    for item in items:
        parts = item.strip().split(" ")
        if len(parts) > 2 or not _KEY.fullmatch(parts[0]):
            raise TusError(f"Upload-Metadata pair {item.strip()[:40]!r} is not 'key base64value'")
        key = parts[0]
        if key in pairs:
            raise TusError(f"Upload-Metadata has the key {key!r} twice")
        if len(parts) == 1:
            pairs[key] = None
            continue
        encoded = parts[1]
        if len(encoded) % 4 or not _B64.fullmatch(encoded):
            raise TusError(f"Upload-Metadata value of {key!r} is not base64")
        try:
            pairs[key] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise TusError(f"Upload-Metadata value of {key!r} is not base64") from None
    return pairs


def encode_metadata(pairs: Mapping[str, Optional[bytes]]) -> str:
    """The inverse of :func:`parse_metadata` (HEAD answers it; tests build headers with it)."""
    out = []
    for key, value in pairs.items():
        out.append(key if value is None else f"{key} {base64.b64encode(value).decode('ascii')}")
    return ",".join(out)


def metadata_text(pairs: Mapping[str, Optional[bytes]], key: str) -> str:
    """A metadata value as text (``filename``, ``filetype``); "" when absent or not UTF-8."""
    raw = pairs.get(key)
    if not raw:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""


#: Partial uploads one final upload may join: tus-js-client's parallelUploads
#: sends a handful; thousands would be a way to make one request read forever.
MAX_CONCAT_PARTS = 1000


def parse_concat(value: Optional[str], path: str) -> Optional[Tuple[str, List[str]]]:
    """``Upload-Concat``: ``partial``, or ``final;<url> <url>...`` naming
    partial uploads of this server (absolute URLs or paths under ``path``).

    :returns: ``("partial", [])``, ``("final", [upload ids])``, or None when absent.
    :raises TusError: anything else, or a URL that is not one of our uploads.
    """
    if value is None:
        return None
    value = value.strip()
    if value == "partial":
        return "partial", []
    kind, sep, rest = value.partition(";")
    if kind.strip() != "final" or not sep:
        raise TusError("Upload-Concat must be 'partial' or 'final;<url> <url>...'")
    ids = []
    urls = rest.split()
    if not urls or len(urls) > MAX_CONCAT_PARTS:
        raise TusError(f"Upload-Concat: final names 1 to {MAX_CONCAT_PARTS} partial uploads",
                       limit=MAX_CONCAT_PARTS)
    for url in urls:
        target = urlsplit(url).path
        if not target.startswith(path) or not valid_upload_id(target[len(path):]):
            raise TusError(f"Upload-Concat names {url[:80]!r}, which is not an upload of this server")
        ids.append(target[len(path):])
    if len(set(ids)) != len(ids):
        raise TusError("Upload-Concat names one partial upload twice")
    return "final", ids


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes


def parse_checksum(value: Optional[str]) -> Optional[Checksum]:
    """``Upload-Checksum: <algorithm> <base64 digest>``; None when absent.

    :raises UnsupportedChecksum: an algorithm we do not compute.
    :raises TusError: a malformed header.
    """
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2:
        raise TusError("Upload-Checksum is not '<algorithm> <base64 digest>'")
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise UnsupportedChecksum(f"checksum algorithm {parts[0][:20]!r} is not supported;"
                                  f" use one of {', '.join(CHECKSUM_ALGORITHMS)}",
                                  limit=list(CHECKSUM_ALGORITHMS))
    if len(parts[1]) % 4 or not _B64.fullmatch(parts[1]):
        raise TusError("Upload-Checksum's digest is not base64")
    return Checksum(algorithm, base64.b64decode(parts[1]))


def http_date(epoch: float) -> str:
    """``Upload-Expires`` is an RFC 9110 date: ``Wed, 25 Jun 2025 16:00:00 GMT``."""
    return formatdate(epoch, usegmt=True)


def common_headers() -> List[Tuple[str, str]]:
    return [("Tus-Resumable", TUS_VERSION)]


def options_headers(max_size: Optional[int]) -> List[Tuple[str, str]]:
    """What ``OPTIONS`` tells a client about this server."""
    headers = [("Tus-Version", TUS_VERSION), ("Tus-Extension", ",".join(EXTENSIONS)),
               ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS))]
    if max_size is not None:
        headers.append(("Tus-Max-Size", str(max_size)))
    return headers


def cors_headers(origin: Optional[str], allowed: Sequence[str], preflight: bool) -> List[Tuple[str, str]]:
    """CORS answers for ``origin`` when it is allowed (``"*"`` allows any)."""
    if not origin or not allowed or ("*" not in allowed and origin not in allowed):
        return []
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
               ("Access-Control-Expose-Headers", ", ".join(EXPOSED_HEADERS))]
    if preflight:
        headers += [("Access-Control-Allow-Methods", ", ".join(METHODS)),
                    ("Access-Control-Allow-Headers", ", ".join(ALLOWED_HEADERS)),
                    ("Access-Control-Max-Age", "86400")]
    return headers


__all__ = [
    "TUS_VERSION", "EXTENSIONS", "CHECKSUM_ALGORITHMS", "PATCH_CONTENT_TYPE", "EXPOSED_HEADERS",
    "TusError", "UnsupportedVersion", "UploadNotFound", "UploadGone", "OffsetMismatch",
    "WrongContentType", "UploadTooLarge", "UploadLocked", "ChecksumMismatch", "UnsupportedChecksum",
    "TusForbidden", "TusMethodNotAllowed", "Checksum",
    "new_upload_id", "valid_upload_id", "check_version", "parse_size", "parse_metadata",
    "encode_metadata", "metadata_text", "parse_checksum", "parse_concat", "http_date", "common_headers",
    "options_headers", "cors_headers",
]
