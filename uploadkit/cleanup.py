"""Reclaims what interrupted uploads leave behind.

A request that ends in any normal way (success, refusal, disconnect, storage
failure) releases everything it opened: its handlers' ``abort`` hooks run.
A worker that is *killed* (SIGKILL, the OOM killer, a gunicorn ``--timeout``,
a crashed host) runs no hook, and leaves:

* temp files ``uploadkit-*.part`` in the tempdir (:class:`~uploadkit.handlers.TempFileHandler`);
* pending writes in the storage's temp area ``<root>/.uploadkit-tmp/``
  (a temp key that was complete but never moved to its final name);
* on S3, multipart uploads that were started and neither completed nor
  aborted: invisible in listings, but stored (and billed) until aborted;
* resumable (tus) uploads that were never finished: their state and bytes
  stay in the upload area so a client can resume, until they expire
  (``Upload-Expires``). Expired ones are reclaimed whatever their age, since
  the server already answers 410 for them.

:func:`cleanup` finds those older than a given age and removes them (or only
lists them, ``dry_run``). It touches nothing else: in a tempdir only files named
the way uploadkit names them, in storage only the temp area and multipart
uploads in the storage's temp area. Run it from cron or a timer with an age well
above your longest upload (``uploadkit cleanup --older-than 6h ...``), since a
younger leftover may be an upload still in flight.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import format_size
from .storage import _as_datetime

__all__ = ["Leftover", "CleanupReport", "parse_duration", "format_duration", "find_temp_files",
           "find_storage_leftovers", "find_expired_uploads", "cleanup"]

#: What :class:`~uploadkit.handlers.TempFileHandler` names its files:
#: ``uploadkit-<random token>-<n>.part`` (and ``mkstemp``'s
#: ``uploadkit-<random>.part`` from earlier versions).
TEMP_FILE_RE = re.compile(r"uploadkit-[A-Za-z0-9_-]+\.part")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"15m"``, ``"1h"``, ``"1h30m"``, ``"2d"``, ``"1w"`` or a plain number.

    :raises ValueError: naming the text when it is not such a duration.
    """
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration: use e.g. 30m, 1h, 2d")
    try:
        value = float(raw)
    except ValueError:
        value, pos = 0.0, 0
        bad = ValueError(f"duration {text!r} is not like 90s, 15m, 1h, 1h30m, 2d or 1w")
        for match in _DURATION_RE.finditer(raw):
            if raw[pos:match.start()].strip():
                raise bad from None
            value += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos == 0 or raw[pos:].strip():
            raise bad from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"duration {text!r} must be a finite number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1.5 h"``: ages in the command's output."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@dataclass(frozen=True)
class Leftover:
    """One thing an interrupted upload left."""

    #: ``"temp-file"`` (tempdir), ``"temp-key"`` (storage temp area) or
    #: ``"multipart-upload"`` (an S3 upload never completed).
    kind: str
    #: A path, a storage path, or ``bucket/key`` of a multipart upload.
    location: str
    #: Seconds since it was last written (started, for a multipart upload).
    age: float
    size: Optional[int] = None
    #: The S3 UploadId, for multipart uploads; the tus upload id for ``"tus-upload"``.
    upload_id: Optional[str] = None
    #: The upload area holding a ``"tus-upload"``.
    area: Any = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        extra = [format_duration(self.age) + " old"]
        if self.size is not None:
            extra.insert(0, format_size(self.size))
        if self.upload_id:
            extra.append(f"upload id {self.upload_id[:16]}")
        return f"{self.kind} {self.location} ({', '.join(extra)})"


@dataclass
class CleanupReport:
    """What :func:`cleanup` found and did."""

    older_than: float
    dry_run: bool
    found: List[Leftover] = field(default_factory=list)
    removed: List[Leftover] = field(default_factory=list)
    failed: List[Tuple[Leftover, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> List[str]:
        out = []
        verb = "would remove" if self.dry_run else "removed"
        for item in self.removed if not self.dry_run else self.found:
            out.append(f"{verb} {item.describe()}")
        for item, reason in self.failed:
            out.append(f"failed to remove {item.describe()}: {reason}")
        count = len(self.found) if self.dry_run else len(self.removed)
        summary = (f"cleanup: {count} {'to remove' if self.dry_run else 'removed'}"
                   f", {len(self.failed)} failed (older than {format_duration(self.older_than)})")
        return out + [summary]


# -- finding -----------------------------------------------------------------------


def find_temp_files(tempdir: str, older_than: float, now: Optional[float] = None) -> List[Leftover]:
    """uploadkit's own temp files in ``tempdir`` (not its subdirectories) older than ``older_than`` s.

    Only regular files named ``uploadkit-*.part``; symlinks and anything else are left alone.
    """
    now = time.time() if now is None else now
    found = []
    try:
        entries = list(os.scandir(tempdir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not TEMP_FILE_RE.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # its upload finished meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        age = now - st.st_mtime
        if age >= older_than:
            found.append(Leftover("temp-file", entry.path, age, st.st_size))
    return sorted(found, key=lambda item: item.location)


def _timestamp(value: Any) -> Optional[float]:
    when = _as_datetime(value)
    return when.timestamp() if when is not None else None


def _mtime_of(details: Dict[str, Any]) -> Optional[float]:
    for name in ("LastModified", "mtime", "last_modified", "modified", "updated", "created"):
        stamp = _timestamp(details.get(name))
        if stamp is not None:
            return stamp
    return None


def find_storage_leftovers(storage: Any, older_than: float,
                           now: Optional[float] = None) -> List[Leftover]:
    """Pending writes in ``storage``'s temp area and, on S3, stale multipart
    uploads under its root, older than ``older_than`` seconds.

    :param storage: a :class:`uploadkit.storage.Storage`.
    """
    now = time.time() if now is None else now
    found: List[Leftover] = []
    fs = storage.fs
    if storage.local:
        area = os.path.join(storage.root, storage.temp_dir)
        try:
            entries = list(os.scandir(area))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                found.append(Leftover("temp-key", entry.path, now - st.st_mtime, st.st_size))
    else:
        area = f"{storage.root}/{storage.temp_dir}" if storage.root not in ("", "/") else storage.temp_dir
        fs.invalidate_cache(area)
        try:
            listing = fs.find(area, detail=True)
        except FileNotFoundError:
            listing = {}
        for path, details in sorted(listing.items()):
            if details.get("type", "file") != "file":
                continue
            if path.startswith(f"{area}/tus/"):
                continue  # resumable uploads: reclaimed when they expire (find_expired_uploads)
            mtime = _mtime_of(details)
            # No time known: old enough only when any age is accepted.
            age = now - mtime if mtime is not None else 0.0
            if age >= older_than:
                found.append(Leftover("temp-key", path, age, details.get("size")))
    found.sort(key=lambda item: item.location)
    found.extend(_find_multipart_uploads(storage, older_than, now))
    return found


def find_expired_uploads(area: Any, now: Optional[float] = None) -> List[Leftover]:
    """Resumable uploads in ``area`` (an :class:`uploadkit.resumable.UploadArea`)
    whose ``Upload-Expires`` has passed: unfinished ones, tombstones of
    terminated ones, and the state kept for finished ones."""
    now = time.time() if now is None else now
    found = []
    for upload_id in area.ids():
        try:
            state = area.load(upload_id)
        except Exception:
            continue
        if state is None or state.expires > now:
            continue
        found.append(Leftover("tus-upload", f"{area.directory}/{upload_id}", now - state.expires,
                              area.stored(upload_id), upload_id=upload_id, area=area))
    return found


def _tus_areas(tempdirs: Sequence[str], tus_dirs: Sequence[str], storage: Any) -> List[Any]:
    from .resumable import AREA_NAME, UploadArea, area_for

    areas: List[Any] = [UploadArea(d) for d in tus_dirs]
    areas += [UploadArea(os.path.join(d, AREA_NAME)) for d in tempdirs if os.path.isdir(os.path.join(d, AREA_NAME))]
    if storage is not None:
        try:
            areas.append(area_for(storage, None, None))
        except ValueError:  # a store tus cannot write to holds no uploads
            pass
    return areas


def _is_s3(fs: Any) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"}) and hasattr(fs, "call_s3")


def _find_multipart_uploads(storage: Any, older_than: float, now: float) -> List[Leftover]:
    """S3 multipart uploads in the storage's temp area whose last activity is
    older than ``older_than``: uploadkit writes only there, and other tools'
    uploads elsewhere in the bucket (resumable ones) are not ours to abort.

    Activity is the newest of the upload's start and its parts' times: an
    upload started long ago that still receives parts is in flight, not stale.
    """
    fs = storage.fs
    if not _is_s3(fs):
        return []
    bucket, _, prefix = storage.root.strip("/").partition("/")
    prefix = (prefix + "/" if prefix else "") + storage.temp_dir + "/"
    found = []
    kwargs: Dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        for upload in page.get("Uploads", []):
            if upload["Key"].startswith(prefix + "tus/"):
                continue  # a resumable upload's parts: reclaimed when it expires
            started = _timestamp(upload.get("Initiated"))
            if started is not None and now - started < older_than:
                continue
            last = _last_activity(fs, bucket, upload["Key"], upload["UploadId"], started)
            age = now - last if last is not None else float("inf")
            if age >= older_than:
                found.append(Leftover("multipart-upload", f"{bucket}/{upload['Key']}", age,
                                      upload_id=upload["UploadId"]))
        if not page.get("IsTruncated"):
            break
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
    return sorted(found, key=lambda item: (item.location, item.upload_id or ""))


def _last_activity(fs: Any, bucket: str, key: str, upload_id: str, started: Optional[float]) -> Optional[float]:
    last = started
    kwargs: Dict[str, Any] = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
    while True:
        try:
            page = fs.call_s3("list_parts", **kwargs)
        except FileNotFoundError:  # completed or aborted meanwhile
            return last
        for part in page.get("Parts", []):
            stamp = _timestamp(part.get("LastModified"))
            if stamp is not None and (last is None or stamp > last):
                last = stamp
        if not page.get("IsTruncated"):
            return last
        kwargs["PartNumberMarker"] = page.get("NextPartNumberMarker", 0)


# -- removing ------------------------------------------------------------------------


def _remover(storage: Any) -> Callable[[Leftover], None]:
    def remove(item: Leftover) -> None:
        if item.kind == "tus-upload":
            item.area.remove(item.upload_id)
            return
        if item.kind == "temp-file" or (item.kind == "temp-key" and storage is not None and storage.local):
            try:
                os.unlink(item.location)
            except FileNotFoundError:
                pass
            return
        fs = storage.fs
        if item.kind == "temp-key":
            try:
                fs.rm_file(item.location)
            except FileNotFoundError:
                pass
            fs.invalidate_cache(item.location)
            return
        if item.kind == "multipart-upload":
            bucket, _, key = item.location.partition("/")
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=item.upload_id)
            return
        raise ValueError(f"unknown leftover kind {item.kind!r}")
    return remove


def cleanup(*, tempdirs: Sequence[str] = (), storage: Any = None, older_than: float = 3600.0,
            dry_run: bool = False, now: Optional[float] = None,
            tus_dirs: Sequence[str] = ()) -> CleanupReport:
    """Find (and unless ``dry_run``, remove) leftovers older than ``older_than`` seconds.

    :param tempdirs: directories where :class:`~uploadkit.handlers.TempFileHandler` writes.
    :param storage: a :class:`uploadkit.storage.Storage` whose temp area (and,
        on S3, multipart uploads under its root) to clean, with its
        resumable uploads' area.
    :param tus_dirs: upload areas configured with ``TusSettings(directory=...)``;
        ``<tempdir>/uploadkit-tus`` of each tempdir is searched anyway.
    :returns: a :class:`CleanupReport`; a failure to remove one item is
        recorded there and does not stop the others. Listing failures raise.
    """
    if older_than < 0:
        raise ValueError(f"older_than must be >= 0 seconds, not {older_than!r}")
    now = time.time() if now is None else now
    report = CleanupReport(older_than=older_than, dry_run=dry_run)
    for tempdir in tempdirs:
        report.found += find_temp_files(tempdir, older_than, now)
    if storage is not None:
        report.found += find_storage_leftovers(storage, older_than, now)
    for area in _tus_areas(tempdirs, tus_dirs, storage):
        report.found += find_expired_uploads(area, now)
    if dry_run:
        return report
    remove = _remover(storage)
    for item in report.found:
        try:
            remove(item)
        except Exception as exc:  # one stuck item must not stop the sweep
            report.failed.append((item, f"{type(exc).__name__}: {exc}"))
            continue
        report.removed.append(item)
    return report


def parse_option(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is JSON when it parses as JSON
    (``client_kwargs={"region_name": "eu-west-1"}``, ``anon=true``), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"storage option {text!r} is not KEY=VALUE")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def options_from(pairs: Iterable[str]) -> Dict[str, Any]:
    return dict(parse_option(p) for p in pairs)
