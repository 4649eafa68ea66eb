"""What a file really is, from its first bytes, and whether its name agrees.

Pure functions: :func:`sniff` asks ``filetype`` (magic numbers in the first
8 KiB); :func:`check_type` applies ``Limits.allowed_types``.
"""

from __future__ import annotations

import mimetypes
from typing import Optional, Protocol

import filetype

from .limits import Limits

class FileInfoLike(Protocol):
    @property
    def filename(self) -> str: ...
    @property
    def extension(self) -> str: ...
    @property
    def declared_type(self) -> str: ...


#: Bytes the sniffer looks at: filetype reads at most 8 KiB.
HEAD_SIZE = 8192

# Built-in tables only: the system's /etc/mime.types differs between machines.
_mimes = mimetypes.MimeTypes()

#: Types the sniffer can recognise: a file declared as one of these whose bytes
#: match none is lying about its type.
SNIFFABLE = frozenset(k.mime for k in filetype.TYPES) - {"application/octet-stream"}  # EOT fonts claim it

_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-icon": "image/vnd.microsoft.icon",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "video/x-m4v": "video/mp4",
    "application/x-zip-compressed": "application/zip",
    "image/x-ms-bmp": "image/bmp",
    "application/x-pdf": "application/pdf",
}

#: Extensions a web server or browser may execute or render as active content:
#: refused whatever the bytes say when types are restricted.
ACTIVE_EXTENSIONS = frozenset(
    ".php .php3 .php4 .php5 .php7 .phtml .phar .pht .html .htm .xhtml .shtml .xht "
    ".svg .svgz .xml .xsl .js .mjs .cjs .jsp .jspx .asp .aspx .cer .asa .cgi .pl .py "
    ".rb .sh .bash .exe .dll .bat .cmd .com .scr .msi .hta .vbs .vbe .wsf .ps1 .jar "
    ".htaccess .swf".split()
)

# filetype names one extension per type; these are the other spellings people use.
_EXTRA_EXTENSIONS = {
    "image/jpeg": {".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp"},
    "image/tiff": {".tif", ".tiff"},
    "image/heic": {".heic", ".heif"},
    "image/heif": {".heif", ".heic"},
    "video/mp4": {".mp4", ".m4v"},
    "audio/mpeg": {".mp3", ".mpga"},
    "video/quicktime": {".mov", ".qt"},
    "application/gzip": {".gz", ".tgz"},
    "application/x-tar": {".tar"},
    "audio/mp4": {".m4a", ".mp4"},
    "image/vnd.microsoft.icon": {".ico"},
    "audio/ogg": {".ogg", ".oga", ".opus"},
    "video/ogg": {".ogv", ".ogg"},
}


def normalize_type(content_type: str) -> str:
    """``'Image/JPG; q=1'`` -> ``'image/jpeg'``."""
    t = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(t, t)


# Matchers that can only match bytes starting with a given magic, but look
# through kilobytes first: the office/OpenDocument ones search 6 KB for a ZIP
# header they then require at offset 0, the EBML ones search the whole head.
# Skipping them when the magic is absent keeps filetype's answer (and its
# order) and saves about 25 us a file whose bytes match nothing.
_ZIP_MAGIC = b"PK\x03\x04"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_ZIP_DOCUMENTS = frozenset([
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.oasis.opendocument.text",
    "application/vnd.oasis.opendocument.spreadsheet",
    "application/vnd.oasis.opendocument.presentation",
])
_EBML_TYPES = frozenset(["video/webm", "video/x-matroska"])
_MATCHERS = {
    (zipped, ebml): tuple(k for k in filetype.TYPES
                          if (zipped or k.mime not in _ZIP_DOCUMENTS) and (ebml or k.mime not in _EBML_TYPES))
    for zipped in (False, True) for ebml in (False, True)
}


def sniff(head: bytes) -> Optional[str]:
    """The MIME type the bytes declare by their magic number, or None.

    The same answer as ``filetype.guess(head)``, faster on bytes that match nothing.
    """
    if not head:
        return None
    head = head[:HEAD_SIZE]
    for kind in _MATCHERS[head.startswith(_ZIP_MAGIC), head.startswith(_EBML_MAGIC)]:
        if kind.match(head):
            mime: str = kind.mime
            return _ALIASES.get(mime, mime)
    return None


def extensions_for(mime: str) -> set[str]:
    exts = set(_mimes.guess_all_extensions(mime, strict=False))
    kind = filetype.get_type(mime=mime)
    if kind is not None:
        exts.add("." + kind.extension)
    return exts | _EXTRA_EXTENSIONS.get(mime, set())


def extension_type(ext: str) -> Optional[str]:
    """The type an extension claims, from the built-in tables, or None if unknown."""
    if not ext:
        return None
    t, _ = _mimes.guess_type("x" + ext, strict=False)
    if t:
        return normalize_type(t)
    kind = next((k for k in filetype.TYPES if "." + k.extension == ext), None)
    return kind.mime if kind else None


def check_type(info: FileInfoLike, sniffed: Optional[str], limits: Limits) -> Optional[str]:
    """Why the file's type is refused, or None when it is acceptable.

    Only applies when ``limits.allowed_types`` is set: then the sniffed type must
    be allowed; a file declared as a type the sniffer knows must match it; and
    the extension must neither name active content nor contradict the bytes.
    """
    if limits.allowed_types is None:
        return None
    name = info.filename
    ext = info.extension
    declared = normalize_type(info.declared_type)
    if ext in ACTIVE_EXTENSIONS:
        return f"file {name!r}: the extension {ext!r} is never accepted here"
    if sniffed is None:
        if declared in SNIFFABLE:
            return (f"file {name!r} is declared as {declared} but its bytes are not;"
                    " it may be corrupt or mislabelled")
        claimed = extension_type(ext)
        if claimed in SNIFFABLE:
            return f"file {name!r} is named {ext} but its bytes are not {claimed}"
        effective = declared or claimed or "application/octet-stream"
        if not limits.allows_type(effective):
            return f"file {name!r} is {effective}, which is not an allowed type"
        return None
    if not limits.allows_type(sniffed):
        return f"file {name!r} is {sniffed}, which is not an allowed type"
    if ext and ext not in extensions_for(sniffed):
        claimed = extension_type(ext)
        if claimed is not None and claimed != sniffed:
            return f"file {name!r} is {sniffed} but its name says {claimed}"
    return None
