"""Turning a client's filename into one that is safe to store and show.

A pure function, tested against a table of hostile names. The result never
contains a directory part, a control character or a reserved device name, so it
can be used as the last component of a path on POSIX and Windows alike.
"""

from __future__ import annotations

import re
import unicodedata

#: Used when nothing safe is left of the name.
FALLBACK = "upload"

_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"]
    + [f"COM{i}" for i in "123456789¹²³"]
    + [f"LPT{i}" for i in "123456789¹²³"]
)
# C0 and C1 controls, DEL, and characters Windows forbids in names.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f<>:"|?*]')
# Bidirectional overrides and zero-width characters disguise extensions
# ("photo\u202egnp.exe" shows as "photoexe.png").
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


# Names every rule below leaves as they are: most names sent, checked in one match.
_PLAIN = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?")


def sanitize_filename(raw: str, max_length: int = 255) -> str:
    """A safe filename derived from ``raw``.

    Keeps the last path component (either slash), NFC-normalizes, drops control,
    invisible and Windows-reserved characters, strips leading dots and trailing
    dots and spaces, renames Windows device names, and cuts to ``max_length``
    UTF-8 bytes keeping the extension. Returns :data:`FALLBACK` when nothing is left.
    """
    if len(raw) <= max_length and _PLAIN.fullmatch(raw) \
            and raw.split(".", 1)[0].upper() not in _WINDOWS_DEVICES:
        return raw
    return _sanitize(raw, max_length)


def _sanitize(raw: str, max_length: int) -> str:
    name = unicodedata.normalize("NFC", raw)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _INVISIBLE.sub("", name)
    name = _UNSAFE.sub("_", name)
    name = " ".join(name.split())  # tabs and runs of spaces become one space
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        return FALLBACK
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if len(ext) > 32:  # an "extension" that long is part of the name
        stem, ext = name, ""
    # Windows ignores trailing spaces and anything after the first dot when it
    # matches device names: "CON .txt" and "nul.tar.gz" both open a device.
    if stem.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        stem = "_" + stem
    return _truncate(stem, f".{ext}" if ext else "", max_length)


def _truncate(stem: str, ext: str, max_length: int) -> str:
    budget = max_length - len(ext.encode("utf-8"))
    if budget < 1:
        cut = (stem + ext).encode("utf-8")[:max_length].decode("utf-8", "ignore")
        return cut or FALLBACK[:max_length]
    encoded = stem.encode("utf-8")
    if len(encoded) > budget:
        stem = encoded[:budget].decode("utf-8", "ignore").rstrip(". ") or FALLBACK[:budget]
    return stem + ext
