"""Where a file's bytes are kept: any fsspec filesystem, written while they stream.

The station after the handlers. :class:`Storage` names files (``upload_to``),
settles name collisions, and writes with a **deferred commit**: bytes go to a
temporary key under ``<root>/.uploadkit-tmp/`` as they arrive, and only move to
their final key once the file *and the whole request* were accepted. A refused
or broken request leaves nothing behind.

How the commit is done depends on the backend:

* **Local disk** (``file://`` or a plain path) uses :mod:`os` directly: the temp
  file is created with ``O_EXCL``, and the final name is taken with ``os.link``,
  an atomic exclusive create that also fills the name, so two requests can never
  get the same key and a reader never sees a half-written file. Where hard links
  are not supported, an ``O_EXCL`` reservation of the final name followed by
  ``os.replace`` is used instead. ``overwrite`` is a plain ``os.replace``.
* **S3** (s3fs) writes the temp key through fsspec (a multipart upload once
  the data passes the block size; memory use is bounded by that block size).
  Under ``rename``, ``error`` and ``dedup`` the final key is then created by a
  *conditional* write (``If-None-Match: *``): a multipart upload whose parts
  are server-side copies of the temp key, completed only if no object has the
  key (a PutObject for an empty file). S3 answers 412 to all but one of the
  writers racing for a key, in any process on any host: the store decides.
  ``overwrite`` is a plain server-side copy.
* **Other fsspec backends** (GCS, Azure, memory, ...) write the temp key the
  same way, then move it with ``fs.mv``. uploadkit knows no exclusive create
  for them, so ``rename``, ``error`` and ``dedup`` check for the final key just
  before the move, under a lock: exact within one process (all that a memory
  filesystem has), but two *processes* racing for one final name within that
  instant can both take it. :attr:`Storage.atomic_collisions` says which case
  applies, and a ``Storage`` that can meet the race logs a warning when built.
  Use ``{uuid}`` in ``upload_to`` there.

Two fsspec traps are avoided on purpose: a file object closed by ``with`` (or
by garbage collection) after an error commits its partial data, so a pending
write is discarded explicitly and marked closed; and files opened with
``autocommit=False`` pile up in ``fs.transaction.files``, so writes use
``autocommit=True`` on a temp key instead.

Keys are ``/``-separated relative paths and are checked by :func:`check_key`:
a key can never leave the storage root. A bad key is a refusal
(:class:`~uploadkit.errors.BadKey`), never a write.

Backend failures (disk full, permission denied, S3 unreachable) are raised as
:class:`~uploadkit.errors.StorageUnavailable` (503) naming the operation, after
whatever was started has been removed.

Every call to an asynchronous backend (S3 through s3fs, GCS, ...) has a
deadline, ``Storage(timeout=30.0)`` by default: a network that drops packets
without a reset would otherwise hold the request for as long as TCP takes to
give up (see :mod:`uploadkit._deadline`). A missed deadline refuses the upload
like any backend failure; as the backend is unreachable right then, what the
upload started (an S3 multipart upload, a temp key) is removed by the
background retry rather than by waiting on it once more.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import string
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from typing import (IO, TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Literal,
                    Optional, Sequence, Tuple, Type, Union)
from urllib.parse import quote
from wsgiref.headers import Headers

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from ._deadline import bounded, unbounded, unreachable
from .errors import BadKey, FileExists, StorageUnavailable, UploadError
from .files import FileInfo, UploadedFile
from .filenames import sanitize_filename
from .handlers import UploadHandler, write_all
from .sniffing import extension_type

log = logging.getLogger("uploadkit")

if TYPE_CHECKING:
    from .pipeline import RequestContext

__all__ = [
    "Storage", "StorageHandler", "PendingWrite", "StoredInfo", "StorageApp",
    "check_key", "thumbnail_key", "Collision",
]

Collision = Literal["rename", "overwrite", "error", "dedup"]
KeyFunc = Callable[[FileInfo, Optional[Dict[str, Any]]], str]

_COLLISIONS = ("rename", "overwrite", "error", "dedup")
_TEMPLATE_FIELDS = frozenset(["uuid", "date", "filename", "stem", "ext", "field", "sha256", "md5"])
_HASH_FIELDS = frozenset(["sha256", "md5"])
#: Attempts at a free ``name_<random>.ext`` before giving up: 62**7 names make
#: even one retry rare.
_RENAME_ATTEMPTS = 100
_RANDOM_ALPHABET = string.ascii_letters + string.digits
#: S3's limit on key length, in UTF-8 bytes; also far beyond any sane path.
MAX_KEY_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Protocols whose "directories" are only key prefixes: no makedirs needed.
_OBJECT_STORES = frozenset(["s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"])
# Where a move is a server-side copy then a delete, not a rename.
_COPYING_STORES = _OBJECT_STORES - {"memory"}
# Striped locks serializing check-then-move commits on object stores, shared
# by every Storage of the process (several may point at one bucket).
_COMMIT_LOCKS = [threading.Lock() for _ in range(64)]
# Errors a hard link raises where links are not supported by the filesystem.
_NO_LINK = frozenset(filter(None, [errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                                   getattr(errno, "EOPNOTSUPP", None), getattr(errno, "ENOTSUP", None)]))


def _backend_errors() -> Tuple[Type[BaseException], ...]:
    """OSError plus the client-library errors fsspec backends let through."""
    errors: List[Type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        errors += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - s3fs not installed
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError
        errors.append(AiohttpClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


BACKEND_ERRORS = _backend_errors()


def _reason(exc: BaseException) -> str:
    # strerror, not str(exc): the latter carries server paths and endpoint URLs
    # that a client has no business seeing in a JSON error.
    reason = getattr(exc, "strerror", None)
    return str(reason) if reason else type(exc).__name__


@contextmanager
def _guard(op: str, key: str, passthrough: Tuple[Type[BaseException], ...] = ()) -> Iterator[None]:
    """Re-raise backend failures as StorageUnavailable naming ``op`` and ``key``."""
    try:
        yield
    except UploadError:
        raise
    except passthrough:
        raise
    except BACKEND_ERRORS as exc:
        raise StorageUnavailable(f"storage failed to {op} {key!r}: {_reason(exc)}") from exc


# -- keys ---------------------------------------------------------------------


_DIGITS = re.compile(r"[0-9]{1,19}")


def check_key(key: str) -> str:
    """The key, NFC-normalized, if it is a safe relative path inside the root.

    Refused: empty keys, absolute keys, backslashes, colons, control characters, empty
    segments (``a//b``, trailing ``/``), ``.`` and ``..``, and segments starting
    with a dot (hidden files, and the ``.uploadkit-tmp`` area).

    :raises BadKey: naming the key and what is wrong with it.
    """
    if not isinstance(key, str):
        raise BadKey(f"a storage key must be a string, not {type(key).__name__}")
    key = unicodedata.normalize("NFC", key)
    problem = None
    if not key:
        problem = "it is empty"
    elif key.startswith("/"):
        problem = "it is absolute"
    elif "\\" in key:
        problem = "it contains a backslash"
    elif ":" in key:
        problem = "it contains a colon (a drive or stream name on Windows)"
    elif _CONTROL.search(key):
        problem = "it contains a control character"
    elif len(key.encode("utf-8")) > MAX_KEY_BYTES:
        problem = f"it is longer than {MAX_KEY_BYTES} bytes"
    else:
        for segment in key.split("/"):
            if not segment:
                problem = "it has an empty segment"
            elif segment in (".", ".."):
                problem = f"it has a {segment!r} segment"
            elif segment.startswith("."):
                problem = "it has a segment starting with a dot"
            elif len(segment.encode("utf-8")) > 255:
                problem = "it has a segment longer than 255 bytes"
            if problem:
                break
    if problem:
        raise BadKey(f"storage key {key!r} is refused: {problem}", limit=MAX_KEY_BYTES)
    return key


def _split_ext(name: str) -> Tuple[str, str]:
    """``'a.b.JPG'`` -> ``('a.b', '.JPG')``; a leading dot is not an extension."""
    stem, dot, ext = name.rpartition(".")
    if dot and stem and "/" not in ext:
        return stem, "." + ext
    return name, ""


def thumbnail_key(key: str, width: int, height: int, ext: Optional[str] = None) -> str:
    """The key of a ``width`` x ``height`` thumbnail of ``key``, stored beside it.

    ``a1b2.jpg`` -> ``a1b2.150x150.jpg``; ``ext`` (``".webp"`` or ``"webp"``)
    replaces the original's extension. :meth:`Storage.delete` removes these.
    """
    key = check_key(key)
    if width < 1 or height < 1:
        raise ValueError(f"thumbnail size must be positive, not {width}x{height}")
    head, _, name = key.rpartition("/")
    stem, original_ext = _split_ext(name)
    if ext is None:
        ext = original_ext
    elif ext and not ext.startswith("."):
        ext = "." + ext
    return check_key(f"{head + '/' if head else ''}{stem}.{width}x{height}{ext.lower()}")


def _thumbnail_pattern(name: str) -> "re.Pattern[str]":
    stem, _ = _split_ext(name)
    return re.compile(re.escape(stem) + r"\.[1-9][0-9]*x[1-9][0-9]*(\.[A-Za-z0-9]+)?")


def _renamed(key: str) -> str:
    """Django's answer to a taken name: ``dir/name_<7 random chars>.ext``."""
    head, _, name = key.rpartition("/")
    stem, ext = _split_ext(name)
    suffix = "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(7))
    return f"{head + '/' if head else ''}{stem}_{suffix}{ext}"


class _Template:
    """A parsed ``upload_to`` template; unknown fields fail at configuration time."""

    def __init__(self, template: str) -> None:
        fields = set()
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in _TEMPLATE_FIELDS:
                raise ValueError(f"upload_to {template!r}: unknown field {{{name}}};"
                                 f" use one of {sorted(_TEMPLATE_FIELDS)}")
            fields.add(name)
        self.template = template
        self.fields = frozenset(fields)

    def render(self, info: FileInfo, now: datetime) -> str:
        stem, ext = _split_ext(info.filename)
        values = {
            "uuid": uuid.uuid4().hex,
            "date": now,
            "filename": info.filename,
            "stem": stem,
            "ext": ext.lower(),
            "field": info.field_name,
            "sha256": info.sha256 or "",
            "md5": info.md5 or "",
        }
        return self.template.format(**values)


# -- what is stored -------------------------------------------------------------


@dataclass(frozen=True)
class StoredInfo:
    """What the backend knows of a stored key."""

    key: str
    size: int
    #: Last modification, UTC; None when the backend does not say.
    mtime: Optional[datetime]
    #: A quoted entity tag: the backend's (S3's ETag) or one made from size and mtime.
    etag: str
    #: From the key's extension (built-in tables), ``application/octet-stream`` if unknown.
    content_type: str


def _local_info(key: str, st: os.stat_result) -> "StoredInfo":
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(errno.ENOENT, "not a file", key)
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    return StoredInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc),
                      etag, _content_type(key))


def _content_type(key: str) -> str:
    _, ext = _split_ext(key.rpartition("/")[2])
    return extension_type(ext.lower()) or "application/octet-stream"


def _as_datetime(value: Any) -> Optional[datetime]:
    """A backend's timestamp (datetime, epoch seconds, HTTP or ISO date) as an
    aware UTC datetime; a zone-less one is taken as UTC, as object stores mean it."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str):
        try:
            return _as_datetime(parsedate_to_datetime(value))
        except (TypeError, ValueError):
            try:
                return _as_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                return None
    return None


# -- pending writes ----------------------------------------------------------------


#: A delete the reaper retries: (when next, delay, give up at, key, the delete).
_ReapJob = Tuple[float, float, float, str, Callable[[], None]]


class _Reaper:
    """Retries, on a daemon thread, the deletes that undo a refused upload
    while its store is down.

    A copy whose answer was lost in an outage may still have landed, and a
    file committed before a later refusal must go too; the delete that undoes
    either fails for as long as the outage lasts. Each is retried with a
    growing delay for ``patience`` seconds. A process that exits first leaves
    the key behind; the warning logged when it was queued names it.
    """

    def __init__(self, patience: float = 900.0, first_delay: float = 0.5, max_delay: float = 15.0) -> None:
        self.patience = patience
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._cond = threading.Condition()
        self._jobs: List[_ReapJob] = []
        self._thread: Optional[threading.Thread] = None

    def remove(self, key: str, remove: Callable[[], None], holds: str = "holds", now: bool = True) -> None:
        """Undo a refused upload's file now or, while storage is down, later.
        Never raises: abort paths call it.

        ``now=False``: storage just missed a deadline, so trying now would hold
        the caller for another one; the removal goes straight to the background.
        """
        if not now:
            log.warning("uploadkit: %r %s a refused upload and storage is unreachable;"
                        " removing it in the background", key, holds)
            self.add(key, remove)
            return
        try:
            remove()
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("uploadkit: %r %s a refused upload and cannot be removed now (%s);"
                        " retrying in the background", key, holds, _reason(exc))
            self.add(key, remove)

    def add(self, key: str, remove: Callable[[], None]) -> None:
        """Call ``remove`` until it succeeds (or finds nothing to remove)."""
        now = time.monotonic()
        with self._cond:
            self._jobs.append((now + self.first_delay, self.first_delay, now + self.patience, key, remove))
            if self._thread is None or not self._thread.is_alive():  # none yet, or we were forked
                self._thread = threading.Thread(target=self._run, name="uploadkit-reaper", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._jobs:
                        self._thread = None
                        return
                    now = time.monotonic()
                    due = [job for job in self._jobs if job[0] <= now]
                    if due:
                        break
                    self._cond.wait(min(job[0] for job in self._jobs) - now)
                self._jobs = [job for job in self._jobs if job[0] > now]
            for job in due:
                self._try(job)

    def _try(self, job: _ReapJob) -> None:
        _, delay, deadline, key, remove = job
        try:
            remove()
        except FileNotFoundError:  # the copy never landed, or someone removed it
            return
        except Exception as exc:
            now = time.monotonic()
            if now + delay > deadline:
                log.warning("uploadkit: %r may hold a refused upload and could not be removed (%s);"
                            " remove it by hand", key, _reason(exc))
                return
            delay = min(delay * 2, self.max_delay)
            with self._cond:
                self._jobs.append((now + delay, delay, deadline, key, remove))
            return
        log.info("uploadkit: removed %r, which a refused upload left while storage was down", key)


_REAPER = _Reaper()


class PendingWrite:
    """Bytes on their way into storage, not yet visible under their key.

    Get one from :meth:`Storage.begin_write`; call :meth:`write` with each chunk,
    then exactly one of :meth:`commit` (the bytes appear under the final key,
    which the collision policy may change) or :meth:`discard` (nothing remains).
    Used as a context manager it commits on success and discards on an exception.

    Handlers that write derived files (thumbnails) use it with the same
    deferred commit as uploads: write in ``file_end``, commit in ``request_end``,
    discard in ``abort``.

    :raises StorageUnavailable: from any method, when the backend fails; the
        temporary data is removed first.
    """

    #: The key asked for (None until given to :meth:`commit`).
    key: Optional[str]
    #: The key the bytes ended up under, once committed.
    final_key: Optional[str] = None
    #: True when ``dedup`` found the bytes already stored (nothing new was written).
    deduplicated: bool = False
    #: Bytes written so far.
    size: int = 0
    #: Leave what a commit no longer needs (an object store's temp key, once
    #: copied) for :meth:`tidy`, instead of removing it inside :meth:`commit`.
    #: The upload sink sets it and tidies once the response is sent: the file
    #: is then under its key for one S3 round trip less before the client is
    #: told, so a worker killed in between leaves a temp key for
    #: ``uploadkit cleanup`` instead of a file nobody was told of.
    tidy_later: bool = False

    def __init__(self, storage: "Storage", key: Optional[str], collision: Collision) -> None:
        self.storage = storage
        self.key = check_key(key) if key is not None else None
        self.collision = collision
        self.size = 0
        self._state = "open"
        self._attempts = 0
        self._wanted: Optional[str] = None

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    @property
    def done(self) -> bool:
        """Committed or discarded: nothing more can happen to it."""
        return self._state in ("committed", "discarded")

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise ValueError(f"write() on a pending write that is {self._state}")
        try:
            self._write(data)
        except BaseException:
            self.discard()
            raise
        self.size += len(data)

    def finish(self) -> None:
        """No more bytes: flush and close the temporary data (commit does it too).

        Call it at a file's end so a backend's buffers are released before the
        next file starts.
        """
        if self._state != "open":
            return
        try:
            self._finish()
        except BaseException:
            self.discard()
            raise
        self._state = "finished"

    def commit(self, key: Optional[str] = None) -> str:
        """Make the bytes visible under ``key`` (or the key given earlier).

        :returns: the final key, which differs from ``key`` under ``rename``.
        :raises FileExists: under ``collision="error"`` when the key is taken.
        :raises BadKey: when the key is refused.
        :raises StorageUnavailable: on a backend failure.
        """
        if self._state in ("committed", "discarded"):
            raise ValueError(f"commit() on a pending write that is {self._state}")
        try:
            if key is not None:
                self.key = check_key(key)
            if self.key is None:
                raise ValueError("commit() needs a key: none was given to begin_write()")
            self.finish()
            final = self._place(self.key)
        except BaseException:
            self.discard()
            raise
        self.final_key = final
        self._state = "committed"
        return final

    def discard(self) -> None:
        """Remove the temporary data. Idempotent; never raises."""
        if self._state in ("committed", "discarded"):
            return
        self._state = "discarded"
        self._discard()

    def tidy(self) -> None:
        """Remove what :meth:`commit` left under ``tidy_later``. Idempotent; never raises."""

    def __enter__(self) -> "PendingWrite":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self.done:
                self.commit()
        else:
            self.discard()

    def _next_name(self, key: str) -> str:
        """The next candidate under ``rename``: always derived from the key first asked for."""
        self._attempts += 1
        if self._attempts > _RENAME_ATTEMPTS:
            raise FileExists(f"no free name found for {key!r} after {_RENAME_ATTEMPTS} attempts")
        if self._wanted is None:
            self._wanted = key
        return _renamed(self._wanted)

    # backend parts
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _place(self, key: str) -> str:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class _LocalPendingWrite(PendingWrite):
    """Temp file beside the root, then a link (or rename) to the final name."""

    def __init__(self, storage: "Storage", key: Optional[str], collision: Collision) -> None:
        super().__init__(storage, key, collision)
        self._fd = -1
        tmp_dir = storage._local_path(storage.temp_dir)
        self._tmp = os.path.join(tmp_dir, uuid.uuid4().hex + ".part")
        with _guard("start writing", key or "(upload)"):
            os.makedirs(tmp_dir, exist_ok=True)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)

    def _write(self, data: bytes) -> None:
        assert self._fd >= 0
        with _guard("write", self.key or "(upload)"):
            write_all(self._fd, data, self.size)  # size: the bytes written before these

    def _finish(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with _guard("write", self.key or "(upload)"):
                os.close(fd)

    def _place(self, key: str) -> str:
        storage = self.storage
        with _guard("store", key):
            while True:
                path = storage._local_path(key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if self.collision == "overwrite":
                    os.replace(self._tmp, path)
                    return key
                if _exclusive_place(self._tmp, path):
                    return key
                if self.collision == "dedup":
                    self.deduplicated = True
                    _unlink(self._tmp)
                    return key
                if self.collision == "error":
                    raise FileExists(f"storage key {key!r} is already taken")
                key = self._next_name(key)

    def _discard(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        _unlink(self._tmp)


def _exclusive_place(tmp: str, path: str) -> bool:
    """Give ``tmp`` the name ``path`` only if nobody has it; False when taken.

    ``os.link`` creates the name exclusively *with* its content, so no reader
    can see an empty or partial file. Without hard links, the name is reserved
    by an ``O_EXCL`` create and then replaced by the temp file.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            return False
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink(path)  # the empty reservation must not stay as a stored file
            raise
        return True
    _unlink(tmp)
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


class _FsspecPendingWrite(PendingWrite):
    """A temp key written through fsspec, copied to its key on commit."""

    #: The final path while a copy to it is under way (see ``_move``).
    _placing: Optional[str] = None
    #: The final path of a commit whose temp key waits for :meth:`tidy`.
    _stored_at: Optional[str] = None

    def __init__(self, storage: "Storage", key: Optional[str], collision: Collision) -> None:
        super().__init__(storage, key, collision)
        self._tmp = storage._path(f"{storage.temp_dir}/{uuid.uuid4().hex}")
        self._file: Any = None
        fs = storage.fs
        with _guard("start writing", key or "(upload)"):
            if storage._needs_dirs:
                fs.makedirs(self._tmp.rpartition("/")[0], exist_ok=True)
            # autocommit=True: autocommit=False files are queued on
            # fs.transaction forever; the temp key gives the deferral instead.
            self._file = fs.open(self._tmp, "wb", block_size=storage.block_size, autocommit=True)

    def _write(self, data: bytes) -> None:
        with _guard("write", self.key or "(upload)"):
            self._file.write(data)

    def _finish(self) -> None:
        f = self._file
        if f is not None:
            with _guard("write", self.key or "(upload)"):
                f.close()  # completes the temp object (S3: the multipart upload)
            self._file = None  # kept until then: a failed completion is aborted by discard

    def _place(self, key: str) -> str:
        storage = self.storage
        fs = storage.fs
        with _guard("store", key):
            while True:
                path = storage._path(key)
                if self.collision == "overwrite":
                    self._move(path)
                    return key
                if storage._conditional_s3:
                    if self._create_s3(path):
                        return key
                else:
                    # Check-then-move is not atomic here: the lock makes it so
                    # between threads of this process; across processes two
                    # writers can still meet within the instant between the two.
                    with _COMMIT_LOCKS[hash((storage._token, path)) % len(_COMMIT_LOCKS)]:
                        if not storage._fs_exists(path):
                            self._move(path)
                            return key
                if self.collision == "dedup":
                    self.deduplicated = True
                    fs.rm_file(self._tmp)
                    return key
                if self.collision == "error":
                    raise FileExists(f"storage key {key!r} is already taken")
                key = self._next_name(key)

    def _move(self, path: str) -> None:
        fs = self.storage.fs
        if self.storage._needs_dirs:
            fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        if not self.storage.object_store:
            fs.mv(self._tmp, path)  # a rename
            fs.invalidate_cache(path)
            return
        # On an object store a move is a copy then a delete. If the copy lands
        # and the delete fails, the upload is stored all the same: the failed
        # delete only leaves a temp key behind, which `uploadkit cleanup`
        # removes. If the copy itself fails it may still have landed, and the
        # key was checked free (unless overwriting), so discard removes it.
        if self.collision != "overwrite":
            self._placing = path
        fs.copy(self._tmp, path)
        self._placing = None
        fs.invalidate_cache(path)
        self._placed(path)

    def _placed(self, path: str) -> None:
        """The bytes are under ``path``: the temp key goes now, or at :meth:`tidy`."""
        self._stored_at = path
        if not self.tidy_later:
            self.tidy()

    def tidy(self) -> None:
        path, self._stored_at = self._stored_at, None
        if path is None:
            return
        fs, tmp = self.storage.fs, self._tmp
        if unreachable(fs):  # just missed a deadline: not again on this thread
            _REAPER.add(tmp, functools.partial(fs.rm_file, tmp))
            return
        try:
            fs.rm_file(tmp)
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("uploadkit: stored %r but could not remove its temp key %r (%s);"
                        " `uploadkit cleanup` removes it", path, tmp, _reason(exc))

    def _create_s3(self, path: str) -> bool:
        """Create ``path`` from the temp key only if no object has that key:
        True when created, False when the key is taken.

        The store decides, so two processes or hosts committing to one key at
        the same instant cannot both win. Until the answer is in, ``path`` is
        ``_placing``: a commit cut by an outage may have created it, and
        discard then removes it, but only if it is this write's object.
        """
        fs = self.storage.fs
        self._placing = path
        created = _s3_create(fs, self._tmp, path, self.size, self._write_id)
        self._placing = None
        fs.invalidate_cache(path)
        if created:
            self._placed(path)
        return created

    @property
    def _write_id(self) -> str:
        """Marks the final object as this write's (S3 metadata): the temp key's unique name."""
        return self._tmp.rpartition("/")[2]

    def _discard(self) -> None:
        f, self._file = self._file, None
        if unreachable(self.storage.fs):
            self._discard_later(f)
            return
        if f is not None:
            try:
                if isinstance(f, AbstractBufferedFile):
                    # Not close(): that would complete the upload with partial
                    # data. discard() aborts it (S3: AbortMultipartUpload); then
                    # mark it closed so __del__ does not flush it either.
                    f.discard()
                    f.closed = True
                else:
                    f.close()
            except Exception:  # abort paths must not raise
                pass
        try:
            self.storage.fs.rm_file(self._tmp)
        except Exception:
            pass
        placing, self._placing = self._placing, None
        if placing is not None:
            fs = self.storage.fs
            if self.storage._conditional_s3:
                # Under a conditional create the key may be another writer's:
                # only this write's own object is removed.
                remove = functools.partial(_s3_remove_own, fs, placing, self._write_id)
            else:
                remove = functools.partial(fs.rm_file, placing)
            _REAPER.remove(placing, remove, holds="may hold")

    def _discard_later(self, f: Any) -> None:
        """Discard while storage is unreachable: it just missed a deadline, and
        waiting on it here would hold the request for another one. The abort
        (S3: AbortMultipartUpload) and the deletes go to the background retry;
        ``uploadkit cleanup`` finds whatever this process cannot remove."""
        fs, tmp = self.storage.fs, self._tmp
        placing, self._placing = self._placing, None
        steps: List[Callable[[], Any]] = []
        if isinstance(f, AbstractBufferedFile):
            # Never used again: closed, so that __del__ does not complete it
            # with partial data, and its buffer released now, not at the abort.
            f.closed = True
            f.buffer = None
            steps.append(f.discard)
        elif f is not None:
            steps.append(f.close)
        # The temp key (a completion that landed unanswered) goes before the
        # final key: a copy the network still holds may land late, and fails
        # once its source is gone; one that landed earlier is removed next.
        steps.append(functools.partial(fs.rm_file, tmp))
        if placing is not None:
            steps.append(functools.partial(_s3_remove_own, fs, placing, self._write_id)
                         if self.storage._conditional_s3 else functools.partial(fs.rm_file, placing))

        def undo() -> None:  # retried until every step is done; done ones are not redone
            while steps:
                try:
                    steps[0]()
                except FileNotFoundError:  # aborted, completed or removed already
                    pass
                steps.pop(0)

        _REAPER.remove(placing or tmp, undo, holds="may hold", now=False)


#: Metadata naming the pending write that created an S3 object (see ``_s3_create``).
_WRITE_ID_META = "uploadkit-write"
#: Bytes per UploadPartCopy: parts may be 5 MiB to 5 GiB and number at most
#: 10,000, so 512 MiB parts reach 5 TiB, S3's largest object.
_COPY_PART = 512 * 1024 * 1024


def _conditional_s3(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is s3fs, whose client can send S3's conditional writes."""
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover - s3fs not installed
        return False
    return isinstance(fs, S3FileSystem)


def _s3_create(fs: Any, src: str, dst: str, size: int, write_id: str) -> bool:
    """Copy ``src`` to ``dst`` on S3 only if ``dst`` does not exist: True when
    created, False when taken.

    The final key is created by an operation S3 runs conditionally with
    ``If-None-Match: *``, so the store, not the process, decides who gets a
    key: a PutObject for an empty file, otherwise a multipart upload whose
    parts are server-side copies of ``src`` (UploadPartCopy, no bytes through
    this process) and whose CompleteMultipartUpload carries the condition.
    Not a CopyObject: botocore lets it carry If-None-Match, but moto ignores
    it there and overwrites, and S3-compatible stores vary; the conditional
    complete is what AWS documents and moto enforces (412 PreconditionFailed,
    which s3fs raises as FileExistsError).

    The object carries ``write_id`` in its metadata: a 412 on a complete that
    was retried after a lost answer means the key is ours, not taken. A 409
    ConditionalRequestConflict (another write to the key was under way) is
    retried from a new multipart upload, as S3's documentation asks.

    :raises: the backend's errors, after aborting the multipart upload (or
        queuing its abort while the store is down).
    """
    for attempt in range(_CONFLICT_ATTEMPTS):
        try:
            return _s3_create_once(fs, src, dst, size, write_id)
        except OSError as exc:
            cause = exc.__cause__
            code = getattr(cause, "response", {}).get("Error", {}).get("Code")
            if code != "ConditionalRequestConflict" or attempt + 1 == _CONFLICT_ATTEMPTS:
                raise
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("unreachable")  # pragma: no cover


#: Tries of a conditional create that S3 answers 409 ConditionalRequestConflict.
_CONFLICT_ATTEMPTS = 4


def _s3_create_once(fs: Any, src: str, dst: str, size: int, write_id: str) -> bool:
    bucket, key, _ = fs.split_path(dst)
    src_bucket, src_key, _ = fs.split_path(src)
    metadata = {_WRITE_ID_META: write_id}
    if size == 0:
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"", Metadata=metadata, IfNoneMatch="*")
        except FileExistsError:
            return _s3_written_by(fs, bucket, key, write_id)
        return True
    try:
        upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, Metadata=metadata)["UploadId"]
    except BaseException as exc:
        if not _answered(exc):  # it may have been created all the same, with an id we never learnt
            _s3_abort_unanswered(fs, bucket, key)
        raise
    try:
        parts = []
        for number, first in enumerate(range(0, size, _COPY_PART), 1):
            last = min(first + _COPY_PART, size) - 1
            out = fs.call_s3("upload_part_copy", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                             CopySource={"Bucket": src_bucket, "Key": src_key},
                             CopySourceRange=f"bytes={first}-{last}")
            parts.append({"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]})
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": parts}, IfNoneMatch="*")
    except FileExistsError:
        _s3_abort(fs, bucket, key, upload_id)
        return _s3_written_by(fs, bucket, key, write_id)
    except BaseException:
        _s3_abort(fs, bucket, key, upload_id)
        raise
    return True


def _answered(exc: BaseException) -> bool:
    """Whether S3 answered the call that raised ``exc`` (so it did nothing),
    rather than the call being cut or timed out (so it may have been done)."""
    return getattr(exc.__cause__, "response", None) is not None or isinstance(exc, FileNotFoundError)


def _s3_abort_unanswered(fs: Any, bucket: str, key: str) -> None:
    """Abort the multipart uploads at ``key`` after a CreateMultipartUpload
    whose answer was lost: S3 may hold one that no process knows the id of,
    at a final key, where ``uploadkit cleanup`` does not look. Any upload at
    that key is a commit under way (final keys get no other multipart
    uploads from uploadkit); a concurrent writer's commit to the same key
    would fail and be refused as storage_unavailable, never stored wrong."""
    def abort_all() -> None:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload in page.get("Uploads", []):
            if upload["Key"] == key:
                try:
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                except FileNotFoundError:  # completed or aborted meanwhile
                    pass

    _REAPER.remove(f"{bucket}/{key}", abort_all, holds="may have an unfinished multipart upload for",
                   now=not unreachable(fs))


def _s3_written_by(fs: Any, bucket: str, key: str, write_id: str) -> bool:
    """Whether the object at ``key`` was created by the write ``write_id``."""
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:  # taken, then deleted already: still not ours
        return False
    return bool(head.get("Metadata", {}).get(_WRITE_ID_META) == write_id)


def _s3_remove_own(fs: Any, path: str, write_id: str) -> None:
    """Delete ``path`` if the write ``write_id`` created it; leave anyone else's.

    :raises FileNotFoundError: when nothing is there.
    """
    bucket, key, _ = fs.split_path(path)
    if _s3_written_by(fs, bucket, key, write_id):
        fs.rm_file(path)
    fs.invalidate_cache(path)


def _s3_abort(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort a multipart upload, now or, while S3 is down, in the background:
    its parts are billed until then, and ``uploadkit cleanup`` only looks in
    the temp area. Never raises."""
    _REAPER.remove(f"{bucket}/{key}", functools.partial(
        fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
        holds="has an unfinished multipart upload for", now=not unreachable(fs))

# -- the storage -------------------------------------------------------------------


class Storage:
    """Files kept under a root of any fsspec filesystem.

    :param url: the root: ``"file:///srv/media"`` or a plain path, ``"s3://bucket/prefix"``,
        ``"memory://name"``, any fsspec URL. With ``fs``, a path in that filesystem.
    :param base_url: prefix of public URLs (``url(key)``), e.g. ``"/media/"``; None: no URLs.
    :param upload_to: key template with ``{uuid}``, ``{date:%Y/%m/%d}`` (UTC),
        ``{filename}``, ``{stem}``, ``{ext}`` (lower-case, with its dot),
        ``{field}``, ``{sha256}``, ``{md5}``; or a callable ``(info, environ) -> key``.
        Defaults to ``"{uuid}{ext}"``, or ``"{sha256}{ext}"`` with ``dedup``.
    :param collision: when the key is taken: ``"rename"`` (``name_<7 chars>.ext``),
        ``"overwrite"``, ``"error"`` (:class:`~uploadkit.errors.FileExists`, 409),
        or ``"dedup"`` (content-addressed: equal bytes are stored once).
    :param dedup_hash: ``"sha256"`` (default) or ``"md5"`` for ``dedup``. md5 is
        fast but collisions can be crafted: an attacker could pre-store bytes
        that later uploads are deduplicated onto. Prefer sha256.
    :param storage_options: passed to fsspec (``endpoint_url``, credentials, ...).
    :param fs: an fsspec filesystem instance to use instead of building one from ``url``.
    :param block_size: write (and read) block size passed to fsspec: bounds the
        memory of one upload on buffered backends (S3 needs at least 5 MiB).
    :param temp_dir: where pending writes live, relative to the root (hidden from keys).
    :param object_store: whether a move on this backend is a server-side copy
        then a delete (S3, GCS, Azure...) rather than a rename; guessed from the
        protocol. On such stores a commit whose delete of the temp key fails
        still counts as stored, and the temp key is left to ``uploadkit cleanup``.
    :param timeout: seconds each call to an asynchronous backend (s3fs, gcsfs,
        ...) may take, connecting, waiting for a pooled connection, sending (one
        part, one put), committing (complete, copy, delete) and the backend's own
        retries included; a call past it is cancelled and the upload refused with
        :class:`~uploadkit.errors.StorageUnavailable`. None: no deadline.
        Synchronous backends are not affected: local disk needs none, and a
        synchronous network backend is bounded by its own timeout options.
    """

    def __init__(self, url: str, *, base_url: Optional[str] = None,
                 upload_to: Union[str, KeyFunc, None] = None, collision: Collision = "rename",
                 dedup_hash: Literal["sha256", "md5"] = "sha256",
                 storage_options: Optional[Dict[str, Any]] = None,
                 fs: Optional[AbstractFileSystem] = None, block_size: Optional[int] = None,
                 temp_dir: str = ".uploadkit-tmp", object_store: Optional[bool] = None,
                 timeout: Optional[float] = 30.0) -> None:
        if collision not in _COLLISIONS:
            raise ValueError(f"collision must be one of {_COLLISIONS}, not {collision!r}")
        if dedup_hash not in ("sha256", "md5"):
            raise ValueError(f"dedup_hash must be 'sha256' or 'md5', not {dedup_hash!r}")
        if not temp_dir.startswith(".") or "/" in temp_dir:
            raise ValueError(f"temp_dir must be one hidden directory name like '.uploadkit-tmp', not {temp_dir!r}")
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if fs is None:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        else:
            root = url
            fs = unbounded(fs)  # another Storage's fs: bound what it bounds, once
        #: Deadline of each call to an asynchronous backend, in seconds (None: none).
        self.timeout = timeout
        #: The filesystem; an asynchronous one is seen through a view whose
        #: calls have the deadline (``isinstance`` still sees its class).
        self.fs: AbstractFileSystem = bounded(fs, timeout)
        self.local = type(fs) is LocalFileSystem
        if self.local:
            root = os.path.abspath(root)
        elif root not in ("", "/"):
            root = root.rstrip("/")
        self.root: str = root
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._token = (type(fs).__name__, tuple(sorted(protocols)), root)
        self._needs_dirs = not (protocols & _OBJECT_STORES)
        #: Moves are copy-then-delete (S3 and its kin), not renames: guessed
        #: from the protocol; pass ``object_store=True`` for one we do not know.
        self.object_store = bool(protocols & _COPYING_STORES) if object_store is None else object_store
        # S3 through s3fs: a taken key is decided by the store (If-None-Match).
        self._conditional_s3 = _conditional_s3(fs)
        #: Whether ``rename``, ``error`` and ``dedup`` are settled atomically by
        #: the backend itself, for every process and host that shares it: local
        #: disk (O_EXCL, link), S3 (conditional writes) and memory (one process
        #: is all it has). Elsewhere they are settled within one process only.
        self.atomic_collisions = self.local or self._conditional_s3 or protocols <= {"memory"}
        self.base_url = base_url
        self.collision: Collision = collision
        self.dedup_hash = dedup_hash
        self.block_size = block_size
        self.temp_dir = temp_dir
        if upload_to is None:
            upload_to = "{%s}{ext}" % dedup_hash if collision == "dedup" else "{uuid}{ext}"
        self.upload_to = upload_to
        self._template: Optional[_Template] = None
        if isinstance(upload_to, str):
            self._template = _Template(upload_to)
            if collision == "dedup" and dedup_hash not in self._template.fields:
                raise ValueError(f"collision='dedup' needs {{{dedup_hash}}} in upload_to, got {upload_to!r}")
        elif not callable(upload_to):
            raise TypeError(f"upload_to must be a template string or a callable, not {upload_to!r}")
        if (collision in ("rename", "error") and not self.atomic_collisions
                and not (self._template is not None and self._template.fields & {"uuid", "sha256", "md5"})):
            log.warning("uploadkit: %s cannot create a key only if it is free, so collision=%r is settled"
                        " within each process: two processes storing one key at the same instant can both"
                        " take it, and one file replaces the other; put {uuid} in upload_to",
                        type(fs).__name__, collision)

    def __repr__(self) -> str:
        return f"Storage({self.root!r}, fs={type(self.fs).__name__}, collision={self.collision!r})"

    # -- naming ---------------------------------------------------------------

    @property
    def required_hashes(self) -> frozenset[str]:
        """Hashes the naming needs from a HashingHandler placed before the sink."""
        needed = set(self._template.fields & _HASH_FIELDS) if self._template else set()
        if self.collision == "dedup":
            needed.add(self.dedup_hash)
        return frozenset(needed)

    @property
    def key_needs_content(self) -> bool:
        """True when the key can only be made once the file's hash is known."""
        return bool(self.required_hashes) or self._template is None

    def make_key(self, info: FileInfo, environ: Optional[Dict[str, Any]] = None,
                 now: Optional[datetime] = None) -> str:
        """The key ``upload_to`` gives ``info``, checked.

        :raises BadKey: when the result could leave the root.
        :raises RuntimeError: when a hash the template needs was not computed.
        """
        for name in sorted(self.required_hashes):
            if getattr(info, name) is None:
                raise RuntimeError(
                    f"storage naming needs the file's {name}, but none was computed: "
                    f"put HashingHandler({name}=True) before the storage handler")
        if self._template is not None:
            key = self._template.render(info, now or datetime.now(timezone.utc))
        else:
            key = self.upload_to(info, environ)  # type: ignore[operator]
        return check_key(key)

    def url(self, key: str) -> Optional[str]:
        """``base_url`` + the URL-quoted key; None without a ``base_url``."""
        key = check_key(key)
        if self.base_url is None:
            return None
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        return base + quote(key, safe="/")

    def path(self, key: str) -> Optional[str]:
        """The local filesystem path of ``key``, or None when the backend is not local."""
        return self._local_path(check_key(key)) if self.local else None

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root not in ("", "/") else f"{self.root}{key}"

    def _fs_exists(self, path: str, files_only: bool = False) -> bool:
        """Whether ``path`` exists, fresh from the backend.

        Not ``fs.exists``/``fs.isfile``: some backends answer False for *any*
        error, and a collision check that mistakes an outage for a free name
        would overwrite. Only FileNotFoundError means absent here.
        """
        self.fs.invalidate_cache(path)  # a cached listing may predate another writer
        try:
            details = self.fs.info(path)
        except FileNotFoundError:
            return False
        return details.get("type") == "file" if files_only else True

    def _local_path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    # -- writing ---------------------------------------------------------------

    def begin_write(self, key: Optional[str] = None, *, collision: Optional[Collision] = None) -> PendingWrite:
        """Start a deferred write: nothing is visible until :meth:`PendingWrite.commit`.

        ``key`` may be left out and given to ``commit`` (when it depends on the
        content). ``collision`` overrides the storage's policy for this write.

        :raises BadKey: when ``key`` is refused.
        :raises StorageUnavailable: when the backend cannot start the write.
        """
        policy = collision or self.collision
        if policy not in _COLLISIONS:
            raise ValueError(f"collision must be one of {_COLLISIONS}, not {policy!r}")
        cls = _LocalPendingWrite if self.local else _FsspecPendingWrite
        return cls(self, key, policy)

    def handler(self) -> "StorageHandler":
        """A fresh sink for one request's handler chain (put it last)."""
        return StorageHandler(self)

    def save(self, fileobj: IO[bytes], key: Optional[str] = None, *, filename: str = "",
             content_type: str = "application/octet-stream", field_name: str = "",
             collision: Optional[Collision] = None, chunk_size: int = 1 << 20) -> str:
        """Store what ``fileobj`` reads, streaming, under ``key`` or a name from ``upload_to``.

        :returns: the final key (the collision policy may change it).
        :raises FileExists: under ``collision="error"``.
        :raises StorageUnavailable: on a backend failure (nothing is left behind).
        """
        info = FileInfo(field_name=field_name, filename=sanitize_filename(filename) if filename else "",
                        raw_filename=filename, declared_type=content_type, content_type=content_type,
                        headers=Headers([]), index=0)
        hashers = {name: hashlib.new(name) for name in self.required_hashes} if key is None else {}
        now = datetime.now(timezone.utc)
        pending = self.begin_write(key, collision=collision)
        try:
            while True:
                chunk = fileobj.read(chunk_size)
                if not chunk:
                    break
                for h in hashers.values():
                    h.update(chunk)
                pending.write(chunk)
                info.size += len(chunk)
            for name, h in hashers.items():
                setattr(info, name, h.hexdigest())
            return pending.commit(key if key is not None else self.make_key(info, None, now))
        except BaseException:
            pending.discard()
            raise

    # -- reading and managing ------------------------------------------------------

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        """A binary file object reading ``key``.

        :raises FileNotFoundError: when nothing is stored under ``key``.
        :raises StorageUnavailable: on a backend failure.
        """
        if mode != "rb":
            raise ValueError(f"Storage.open only reads (mode 'rb'), not {mode!r}: use begin_write() or save()")
        key = check_key(key)
        with _guard("read", key, passthrough=(FileNotFoundError, IsADirectoryError)):
            if self.local:
                try:
                    return open(self._local_path(key), "rb")
                except (IsADirectoryError, NotADirectoryError):
                    # A folder upload_to made ("photos/2024"), or a path under a
                    # file ("a.txt/x"): no file is stored under that key.
                    raise FileNotFoundError(errno.ENOENT, "not a file", key) from None
            self.fs.invalidate_cache(self._path(key))
            return self.fs.open(self._path(key), "rb", block_size=self.block_size)  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        """True when a file is stored under ``key``."""
        key = check_key(key)
        with _guard("look up", key):
            if self.local:
                try:
                    return stat.S_ISREG(os.stat(self._local_path(key)).st_mode)
                except (FileNotFoundError, NotADirectoryError):
                    return False
            return self._fs_exists(self._path(key), files_only=True)

    def size(self, key: str) -> int:
        return self.info(key).size

    def info(self, key: str) -> StoredInfo:
        """Size, mtime, ETag and type of ``key``.

        :raises FileNotFoundError: when no file is stored under ``key``.
        """
        key = check_key(key)
        with _guard("look up", key, passthrough=(FileNotFoundError,)):
            if self.local:
                try:
                    st = os.stat(self._local_path(key))
                except NotADirectoryError:
                    raise FileNotFoundError(errno.ENOENT, "no such key", key) from None
                return _local_info(key, st)
            path = self._path(key)
            self.fs.invalidate_cache(path)
            details = self.fs.info(path)
            if details.get("type") != "file":
                raise FileNotFoundError(errno.ENOENT, "not a file", key)
            size = int(details.get("size") or 0)
            mtime: Optional[datetime] = None
            for name in ("LastModified", "mtime", "last_modified", "modified", "updated", "created"):
                if details.get(name) is not None:
                    mtime = _as_datetime(details[name])
                    if mtime is not None:
                        break
            etag = details.get("ETag") or details.get("etag")
            if etag:
                etag = etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'
            else:
                stamp = int(mtime.timestamp() * 1e6) if mtime else 0
                etag = f'"{stamp:x}-{size:x}"'
            return StoredInfo(key, size, mtime, etag, _content_type(key))

    def delete(self, key: str) -> None:
        """Remove ``key`` and its thumbnails (``<stem>.<W>x<H>.<ext>`` beside it).

        Thumbnails of any extension with the same stem are removed, so originals
        ``a.jpg`` and ``a.png`` in one directory share them.

        :raises FileNotFoundError: when ``key`` was not stored (thumbnails found are still removed).
        """
        key = check_key(key)
        with _guard("delete", key, passthrough=(FileNotFoundError,)):
            for thumb in self.thumbnails_of(key):
                self._remove(thumb)
            self._remove(key)

    def thumbnail_key(self, key: str, width: int, height: int, ext: Optional[str] = None) -> str:
        """See :func:`thumbnail_key`."""
        return thumbnail_key(key, width, height, ext)

    def thumbnails_of(self, key: str) -> List[str]:
        """Keys of the stored thumbnails of ``key``."""
        key = check_key(key)
        head, _, name = key.rpartition("/")
        pattern = _thumbnail_pattern(name)
        prefix = head + "/" if head else ""
        with _guard("list", key):
            if self.local:
                try:
                    names = [e.name for e in os.scandir(self._local_path(head) if head else self.root)
                             if e.is_file()]
                except (FileNotFoundError, NotADirectoryError):  # "a.txt/x": under a file
                    return []
            else:
                parent = self._path(head) if head else self.root
                self.fs.invalidate_cache(parent)
                try:
                    entries = self.fs.ls(parent, detail=True)
                except FileNotFoundError:
                    return []
                names = [e["name"].rstrip("/").rpartition("/")[2] for e in entries if e.get("type") == "file"]
        return sorted(prefix + n for n in names if n != name and pattern.fullmatch(n))

    def _remove(self, key: str) -> None:
        if self.local:
            path = self._local_path(key)
            if os.path.isdir(path):
                raise FileNotFoundError(errno.ENOENT, "not a file", key)
            try:
                os.unlink(path)
            except NotADirectoryError:  # "a.txt/x": nothing can be under a file
                raise FileNotFoundError(errno.ENOENT, "no such file", key) from None
            return
        path = self._path(key)
        if not self._fs_exists(path, files_only=True):
            raise FileNotFoundError(errno.ENOENT, "no such key", key)
        self.fs.rm_file(path)
        self.fs.invalidate_cache(path)

    def temp_keys(self) -> List[str]:
        """Names of the pending writes in the temp area: uploads in flight, or left by a crash."""
        with _guard("list", self.temp_dir):
            if self.local:
                try:
                    return sorted(os.listdir(self._local_path(self.temp_dir)))
                except FileNotFoundError:
                    return []
            base = self._path(self.temp_dir)
            self.fs.invalidate_cache(base)
            try:
                return sorted(p.rpartition("/")[2] for p in self.fs.find(base))
            except FileNotFoundError:
                return []

    def app(self, authorize: Optional[Authorize] = None, **kw: Any) -> "StorageApp":
        """A WSGI app serving this storage: see :class:`StorageApp`."""
        return StorageApp(self, authorize=authorize, **kw)


# -- the sink ------------------------------------------------------------------------


class StorageHandler(UploadHandler):
    """The sink that streams each file straight into storage.

    Each chunk is written to a pending write as it arrives (no local temp
    file first). ``file_end`` returns the :class:`~uploadkit.files.UploadedFile`
    (its ``key``/``url``/``path`` are final once the request is committed);
    ``request_end`` commits every file; ``close`` (the response is sent)
    removes the temp keys an object store's commits copied from; ``abort``
    discards pending writes and removes files this request had already
    committed (except overwritten ones, whose old content is gone anyway).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.environ: Optional[Dict[str, Any]] = None
        self._current: Optional[PendingWrite] = None
        self._key: Optional[str] = None
        self._started: Optional[datetime] = None
        self._files: List[Tuple[PendingWrite, str, UploadedFile]] = []

    def request_start(self, ctx: "RequestContext") -> None:
        self.environ = ctx.environ
        if self.storage.required_hashes:
            ctx.digests_at_file_end = True  # keys are made from the digest at file_end

    def file_start(self, info: FileInfo) -> Any:
        storage = self.storage
        self._started = datetime.now(timezone.utc)
        self._key = None
        if not storage.key_needs_content:
            # Known now: refuse a taken key before the bytes are uploaded.
            self._key = storage.make_key(info, self.environ, self._started)
            if storage.collision == "error" and storage.exists(self._key):
                raise FileExists(f"storage key {self._key!r} is already taken", field=info.field_name)
        self._current = storage.begin_write(self._key)
        self._current.tidy_later = True  # see close()
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        pending = self._current
        assert pending is not None, "receive() before file_start()"
        pending.write(chunk)
        return None

    def file_skipped(self, info: FileInfo) -> None:
        pending, self._current = self._current, None
        if pending is not None:
            pending.discard()

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        pending, self._current = self._current, None
        if pending is None:
            return None
        try:
            pending.finish()
            key = self._key or self.storage.make_key(info, self.environ, self._started)
        except BaseException:
            pending.discard()
            raise
        storage = self.storage
        uploaded = UploadedFile.from_info(info, _key_opener(storage, None), size=pending.size,
                                          key=key, url=storage.url(key), path=storage.path(key))
        uploaded.opener = _key_opener(storage, uploaded)
        self._files.append((pending, key, uploaded))
        return uploaded

    def request_end(self, ctx: "RequestContext") -> None:
        storage = self.storage
        for pending, key, uploaded in self._files:
            if pending.done:
                continue
            final = pending.commit(key)
            uploaded.key = final
            uploaded.url = storage.url(final)
            uploaded.path = storage.path(final)
            uploaded.deduplicated = pending.deduplicated

    def close(self, ctx: "RequestContext") -> None:
        # The response is sent: what the commits left behind goes now, after
        # the client was told where its files are.
        for pending, _, _ in self._files:
            pending.tidy()
        self._files.clear()

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        pending, self._current = self._current, None
        if pending is not None:
            pending.discard()
        for pending, _, _ in self._files:
            pending.tidy()
            if not pending.done:
                pending.discard()
            # A committed content-addressed file may already be shared: another
            # request with the same bytes can have been deduplicated onto it
            # since. It is left in place (it is a correct copy of its bytes).
            elif (pending.committed and not pending.deduplicated
                  and pending.collision not in ("overwrite", "dedup") and pending.final_key):
                _REAPER.remove(pending.final_key, functools.partial(self.storage._remove, pending.final_key),
                               now=not unreachable(self.storage.fs))
        self._files.clear()


def _key_opener(storage: Storage, uploaded: Optional[UploadedFile]) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        if uploaded is None or uploaded.key is None:
            raise ValueError("the file is not stored yet")
        return storage.open(uploaded.key)
    return opener


# -- serving -----------------------------------------------------------------------------

Authorize = Callable[[Dict[str, Any], str, str], bool]

#: Subtypes a browser would run or render as a page: served as attachments.
# Types a browser renders as a page with scripts (MHTML: message/rfc822, multipart/related;
# XUL: text/xul from the type tables, application/vnd.mozilla.xul+xml, an XML UI language
# with scripts of its own).
_ACTIVE_MARKERS = ("html", "xml", "javascript", "ecmascript", "x-shockwave-flash", "rfc822", "related", "xul")


def _is_active(content_type: str) -> bool:
    subtype = content_type.partition("/")[2]
    return any(m in subtype for m in _ACTIVE_MARKERS)


def _etag_matches(header: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) against a list like ``W/"a", "b"`` or ``*``."""
    if header.strip() == "*":
        return True
    bare = etag[2:] if etag.startswith("W/") else etag
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == bare:
            return True
    return False


class _Unsatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """One byte range ``(first, last)`` from a Range header, or None to send it all.

    Several ranges and malformed headers are ignored (RFC 9110 allows it).

    :raises _Unsatisfiable: when the single range starts past the end.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    first_s, last_s = first_s.strip(), last_s.strip()
    # ASCII digits, a sane count of them: str.isdigit() also takes "²", and
    # int() refuses those and numbers of over 4300 digits.
    if first_s and not _DIGITS.fullmatch(first_s) or last_s and not _DIGITS.fullmatch(last_s):
        return None
    if not first_s:
        if not last_s:
            return None
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable()
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise _Unsatisfiable()
    return first, size - 1 if last is None else min(last, size - 1)


class _FileBody:
    """Streams ``length`` bytes of an open file in blocks; closes it with the response."""

    def __init__(self, f: IO[bytes], length: int, block: int) -> None:
        self.f = f
        self.left = length
        self.block = block

    def __iter__(self) -> Iterator[bytes]:
        while self.left > 0:
            data = self.f.read(min(self.block, self.left))
            if not data:
                break
            self.left -= len(data)
            yield data

    def close(self) -> None:
        self.f.close()


class StorageApp:
    """A WSGI app serving a :class:`Storage`: ``PATH_INFO`` is the key.

    GET and HEAD send Content-Type (from the extension), Content-Length, ETag,
    Last-Modified, ``X-Content-Type-Options: nosniff`` and
    ``Content-Security-Policy: sandbox``; answer conditional requests with 304
    and single byte ranges with 206 (416 when unsatisfiable); and send types a
    browser would run (HTML, SVG, XML, XUL, JavaScript) as attachments. DELETE removes the key and its thumbnails when allowed.

    :param authorize: ``authorize(environ, action, key) -> bool`` with action
        ``"read"`` or ``"delete"``. Without it reads are allowed and deletes refused.
    :param block_size: bytes per block streamed to the client.

    Errors are JSON ``{"error": {...}}``: 404 for unknown or refused keys (a
    traversal attempt looks like an unknown key), 403, 405, 416, 503.
    """

    def __init__(self, storage: Storage, authorize: Optional[Authorize] = None,
                 block_size: int = 64 * 1024, cache_control: Optional[str] = None) -> None:
        self.storage = storage
        self.authorize = authorize
        self.block_size = block_size
        self.cache_control = cache_control

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        body = self._answer(environ, start_response, method)
        if method == "HEAD" and isinstance(body, list):
            return []  # a HEAD answer has headers only, error answers included
        return body

    def _answer(self, environ: Dict[str, Any], start_response: Callable[..., Any],
                method: str) -> Iterable[bytes]:
        try:
            raw = environ.get("PATH_INFO", "")
            key = check_key(raw.encode("latin-1").decode("utf-8").lstrip("/"))
        except (UnicodeError, BadKey):
            return _error(start_response, 404, "not_found", "no such file")
        try:
            if method in ("GET", "HEAD"):
                if not self._allowed(environ, "read", key):
                    return _error(start_response, 404, "not_found", "no such file")
                return self._get(environ, start_response, key, method == "HEAD")
            if method == "DELETE":
                if not self._allowed(environ, "delete", key):
                    return _error(start_response, 403, "forbidden", f"deleting {key!r} is not allowed")
                try:
                    self.storage.delete(key)
                except FileNotFoundError:
                    return _error(start_response, 404, "not_found", "no such file")
                start_response("204 No Content", [])
                return []
            return _error(start_response, 405, "method_not_allowed", f"{method} is not supported here",
                          [("Allow", "GET, HEAD, DELETE")])
        except UploadError as exc:
            body = exc.to_json()
            start_response(f"{exc.status} {HTTPStatus(exc.status).phrase}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

    def _allowed(self, environ: Dict[str, Any], action: str, key: str) -> bool:
        if self.authorize is None:
            return action == "read"
        return bool(self.authorize(environ, action, key))

    def _get(self, environ: Dict[str, Any], start_response: Callable[..., Any], key: str,
             head: bool) -> Iterable[bytes]:
        f: Optional[IO[bytes]] = None
        try:
            if self.storage.local and not head:
                # Open first and describe what was opened: a commit replacing the
                # file in between cannot pair old headers with new bytes.
                f = self.storage.open(key)
                meta = _local_info(key, os.fstat(f.fileno()))
            else:
                meta = self.storage.info(key)
        except FileNotFoundError:
            if f is not None:
                f.close()
            return _error(start_response, 404, "not_found", "no such file")
        return self._send(environ, start_response, key, head, meta, f)

    def _send(self, environ: Dict[str, Any], start_response: Callable[..., Any], key: str, head: bool,
              meta: StoredInfo, f: Optional[IO[bytes]]) -> Iterable[bytes]:
        """Answer from ``meta``; ``f`` (already open, or None) is closed unless handed to the body."""
        try:
            body = self._respond(environ, start_response, key, head, meta, f)
        except BaseException:
            if f is not None:
                f.close()
            raise
        if f is not None and not isinstance(body, _FileBody):
            f.close()
        return body

    def _respond(self, environ: Dict[str, Any], start_response: Callable[..., Any], key: str, head: bool,
                 meta: StoredInfo, f: Optional[IO[bytes]]) -> Iterable[bytes]:
        headers = [("ETag", meta.etag), ("Accept-Ranges", "bytes"), ("X-Content-Type-Options", "nosniff")]
        if meta.mtime is not None:
            headers.append(("Last-Modified", format_datetime(meta.mtime.astimezone(timezone.utc), usegmt=True)))
        if self.cache_control:
            headers.append(("Cache-Control", self.cache_control))
        if self._not_modified(environ, meta):
            start_response("304 Not Modified", headers)
            return []
        ctype = meta.content_type
        headers.append(("Content-Type", ctype))
        # Every file is sandboxed, not only the types listed as active: a
        # document shown inline (a PDF with its scripts, forms and links, or a
        # type a browser learns to run later) gets a unique origin and no
        # scripts. It only applies where the file is opened as a page: an
        # <img>, a stylesheet or a <track> ignores its own CSP, so images,
        # media, text/css and text/vtt are served inline and work as before;
        # with nosniff a browser uses a stylesheet only as text/css, which
        # runs nothing, and WebVTT cues are text.
        headers.append(("Content-Security-Policy", "sandbox"))
        if _is_active(ctype):
            name = key.rpartition("/")[2]
            headers.append(("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name, safe='')}"))
        first, last, status = 0, meta.size - 1, "200 OK"
        range_header = environ.get("HTTP_RANGE")
        if range_header and self._if_range_ok(environ, meta):
            try:
                wanted = parse_range(range_header, meta.size)
            except _Unsatisfiable:
                return _error(start_response, 416, "range_not_satisfiable",
                              f"the range {range_header!r} is outside the file's {meta.size} bytes",
                              headers + [("Content-Range", f"bytes */{meta.size}")])
            if wanted is not None:
                first, last = wanted
                status = "206 Partial Content"
                headers.append(("Content-Range", f"bytes {first}-{last}/{meta.size}"))
        length = max(0, last - first + 1)
        headers.append(("Content-Length", str(length)))
        if head or length == 0:
            start_response(status, headers)
            return []
        if f is None:
            try:
                f = self.storage.open(key)
            except FileNotFoundError:
                return _error(start_response, 404, "not_found", "no such file")
            try:
                return self._stream(start_response, key, status, headers, f, first, length)
            except BaseException:
                f.close()
                raise
        return self._stream(start_response, key, status, headers, f, first, length)

    def _stream(self, start_response: Callable[..., Any], key: str, status: str,
                headers: List[Tuple[str, str]], f: IO[bytes], first: int, length: int) -> "_FileBody":
        with _guard("read", key):
            if first:
                f.seek(first)
        start_response(status, headers)
        return _FileBody(f, length, self.block_size)

    @staticmethod
    def _not_modified(environ: Dict[str, Any], meta: StoredInfo) -> bool:
        inm = environ.get("HTTP_IF_NONE_MATCH")
        if inm is not None:
            return _etag_matches(inm, meta.etag)
        ims = environ.get("HTTP_IF_MODIFIED_SINCE")
        if ims and meta.mtime is not None:
            try:
                since = parsedate_to_datetime(ims)
            except (TypeError, ValueError):
                return False
            if since.tzinfo is None:
                since = since.replace(tzinfo=timezone.utc)
            return meta.mtime.replace(microsecond=0) <= since
        return False

    @staticmethod
    def _if_range_ok(environ: Dict[str, Any], meta: StoredInfo) -> bool:
        """If-Range: serve the range only if the file is the one the client has."""
        value = environ.get("HTTP_IF_RANGE")
        if not value:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return not value.startswith("W/") and value == meta.etag  # strong comparison
        try:
            since = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:  # "-0000": UTC, said without committing to it
            since = since.replace(tzinfo=timezone.utc)
        # RFC 9110 13.1.5: the date must match Last-Modified exactly.
        return meta.mtime is not None and meta.mtime.replace(microsecond=0) == since


def _error(start_response: Callable[..., Any], status: int, code: str, message: str,
           extra: Sequence[Tuple[str, str]] = ()) -> List[bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "field": None, "limit": None}}).encode()
    headers = [h for h in extra if h[0] not in ("Content-Type", "Content-Length", "Content-Disposition")]
    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]
