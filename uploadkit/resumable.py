"""Where a resumable upload lives between its requests: its state, its bytes,
its lock, and the sink that appends to it.

Every worker (and every host sharing the storage) must see the same upload, so
nothing an upload needs after its first request is kept in one process's
memory. Each upload is three objects side by side in an *upload area*:

``<id>.info``
    JSON: length (or deferred), metadata, expiry, progress id, status, and the
    file's first bytes while fewer than the sniffing head have arrived
    (those are held here, not in the data, until the head is complete, so the
    handlers' ``file_start`` sees a real head even after 1-byte PATCHes).
``<id>.bin``
    the bytes received, appended as they arrive. Its size *is* the offset a
    HEAD reports: it counts exactly what was stored, so a PATCH cut mid-body
    or a worker killed mid-write resumes from what is really there.
``<id>.lock``
    the lease of the request writing to it (see :class:`FileLease`).

The area is ``<root>/<temp_dir>/tus/`` of the configured
:class:`~uploadkit.storage.Storage` (so completion is a move on the same
filesystem), or ``<tempdir>/uploadkit-tus/`` without one.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import math
import os
import secrets
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, ContextManager, Dict, Iterator, List, Optional, Tuple

from .cleanup import _is_s3
from .errors import StorageUnavailable, UploadError
from .files import FileInfo, UploadedFile, path_opener
from .handlers import UploadHandler, write_all
from .tus import UploadLocked, valid_upload_id

if TYPE_CHECKING:
    from .pipeline import RequestContext
    from .storage import PendingWrite, Storage

#: Name of the upload area inside a tempdir (no Storage) or a storage's temp area.
AREA_NAME = "uploadkit-tus"
STORAGE_AREA = "tus"
READ_BLOCK = 1 << 20


# -- state ---------------------------------------------------------------------


@dataclass
class UploadState:
    """What every worker needs to know of one upload (the ``.info`` object)."""

    id: str
    #: Upload-Length; None while deferred (creation-defer-length).
    length: Optional[int]
    #: Upload-Metadata as the client sent it, re-encoded canonically.
    metadata: str
    created: float
    expires: float
    progress_id: str
    #: ``uploading``, ``done`` (handed over; bytes moved or removed) or
    #: ``terminated`` (DELETE or a refusal: a tombstone so it answers 410).
    status: str = "uploading"
    #: The file's first bytes, base64 (see the module docstring).
    head: str = ""
    final_key: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    #: The read size the last PATCH's reads reached (0: none yet), where the
    #: next PATCH's reads start (see ``uploadkit.reader._chunks``).
    read_size: int = 0
    #: The JSON this object was read from or last saved as (not stored): a
    #: request that changed nothing need not write the state again.
    stored_as: bytes = field(default=b"", init=False, repr=False, compare=False)
    _decoded: Tuple[str, bytes] = field(default=("", b""), init=False, repr=False, compare=False)

    @property
    def head_bytes(self) -> bytes:
        text, data = self._decoded
        if text is not self.head:
            data = base64.b64decode(self.head) if self.head else b""
            self._decoded = (self.head, data)
        return data

    def set_head(self, data: bytes) -> None:
        if data != self.head_bytes:
            self.head = base64.b64encode(data).decode("ascii")
            self._decoded = (self.head, data)

    def to_json(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in _STATE_FIELDS}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "UploadState":
        data = json.loads(raw)
        state = cls(**{k: data[k] for k in _STATE_FIELDS if k in data})
        state.stored_as = raw
        return state


#: What the ``.info`` JSON holds: the fields a state is made from.
_STATE_FIELDS = tuple(f.name for f in fields(UploadState) if f.init)


# -- lock --------------------------------------------------------------------------


class _Fenced:
    """What both leases share: a write is checked against the lease only every
    ``recheck`` seconds, not before each chunk.

    Why that is safe: a check is followed by a heartbeat whenever the last
    one is ``beat`` old, so for ``recheck`` seconds after it the heartbeat is
    younger than ``beat + recheck``, and nobody can take a lease over before
    its heartbeat is ``timeout`` old (at least four ``beat`` and eight
    ``recheck``). Checking each 1 MiB chunk (two ``flock`` and a read, or a
    memcached round trip) cost a tus PATCH a seventh of its time behind
    gunicorn, most of it waiting for the GIL the hash thread held.
    """

    timeout: float
    _checked = -math.inf

    @property
    def recheck(self) -> float:
        return min(0.5, self.timeout / 8)

    def fenced(self) -> ContextManager[None]:
        """Run a write only while this lease is still ours.

        :raises UploadLocked: the lease was broken (this request was silent
            for longer than ``timeout``).
        """
        if time.monotonic() - self._checked < self.recheck:
            return _CHECKED
        return self._fence()

    def _fence(self) -> ContextManager[None]:
        raise NotImplementedError


_CHECKED: ContextManager[None] = nullcontext()
#: Bytes of a lease file: a token, a space and a heartbeat, padded.
_LEASE_WIDTH = 48


class FileLease(_Fenced):
    """One writer per upload, across the processes of a host.

    A lease, not a plain lock: the lease file holds the owner's random token
    and a heartbeat the owner refreshes while bytes keep arriving. ``flock``
    guards only the short moments when the lease is read or changed *and each
    write to the data*, so:

    * a worker that dies holds nothing: its flock goes with it, and its lease
      is taken over once its heartbeat is ``timeout`` seconds old;
    * a PATCH whose client went half-open is blocked in a read the app cannot
      interrupt; the next HEAD, PATCH or DELETE for the upload finds its
      heartbeat stale and breaks the lease. If that read ever returns, the
      stale PATCH finds another token in the lease before its next write
      (checked under the same flock as the write, as it has been silent for
      far more than ``recheck``) and stops without writing: two writers
      never interleave.
    """

    #: Heartbeats are written at most this often (seconds), and at least four
    #: times per ``timeout``, so a holder that keeps receiving is never stale.
    BEAT = 1.0

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.beat = min(self.BEAT, timeout / 4)
        self.token = secrets.token_hex(8)
        self._fd = -1
        self._beat = 0.0
        self.held = False

    def _open(self) -> int:
        if self._fd < 0:
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            try:
                try:
                    self._fd = os.open(self.path, flags, 0o600)
                except FileNotFoundError:  # the first lease of this area
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                    self._fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise StorageUnavailable(f"cannot open an upload's lock: {exc.strerror or exc}") from None
        return self._fd

    @contextmanager
    def _locked(self) -> Iterator[int]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _read(fd: int) -> Tuple[str, float]:
        raw = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        if len(raw) != 2:
            return "", 0.0
        try:
            return raw[0], float(raw[1])
        except ValueError:
            return "", 0.0

    @staticmethod
    def _write(fd: int, token: str, beat: float) -> None:
        # One fixed-width write (padded with spaces, which _read ignores)
        # rather than a truncate and a write: two syscalls per lease change.
        data = f"{token} {beat:.3f}" if token else ""
        os.pwrite(fd, data.ljust(_LEASE_WIDTH).encode("ascii"), 0)

    def try_acquire(self) -> bool:
        with self._locked() as fd:
            token, beat = self._read(fd)
            now = time.time()
            if token and token != self.token and now - beat < self.timeout:
                return False
            self._write(fd, self.token, now)
            self._beat = now
            self.held = True
            return True

    def acquire(self, wait: float) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a live holder.

        :raises UploadLocked: another request still writes to the upload.
        """
        deadline = time.monotonic() + wait
        delay = 0.02
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                self.close()
                raise UploadLocked("another request is writing to this upload; retry shortly")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def break_stale(self) -> bool:
        """Free the lease of a holder silent for ``timeout`` seconds (a HEAD does this)."""
        with self._locked() as fd:
            token, beat = self._read(fd)
            if token and time.time() - beat >= self.timeout:
                self._write(fd, "", 0.0)
                return True
            return False

    @contextmanager
    def _fence(self) -> Iterator[None]:
        with self._locked() as fd:
            token, _ = self._read(fd)
            if token != self.token:
                self.held = False
                raise UploadLocked("this request lost the upload's lock after going silent")
            yield
            now = time.time()
            if now - self._beat >= self.beat:
                self._write(fd, self.token, now)
                self._beat = now
            self._checked = time.monotonic()

    def release(self) -> None:
        """Give the lease back if still ours. Never raises."""
        try:
            if self.held:
                with self._locked() as fd:
                    token, _ = self._read(fd)
                    if token == self.token:
                        self._write(fd, "", 0.0)
        except OSError:
            pass
        self.held = False
        self._checked = -math.inf
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class MemcachedLease(_Fenced):
    """The same lease in memcached, for hosts that share a storage: ``add``
    with a TTL takes it (atomic on the server), the holder's heartbeat
    (a ``set`` at most every second while bytes arrive) renews the TTL, and
    a holder that died or went silent simply lets it expire: the next
    request's ``add`` then succeeds. Before a write the holder checks the
    lease is still its own (unless it checked less than ``recheck`` seconds
    ago). That check and the write are two steps, so a
    holder silent for the whole TTL that wakes in between could still append
    one chunk after a newcomer took over; lease files (one host) have no
    such window.
    """

    BEAT = 1.0

    def __init__(self, store: Any, upload_id: str, timeout: float) -> None:
        assert valid_upload_id(upload_id)
        self.store = store
        self.key = f"tus-lock-{upload_id}"
        self.timeout = timeout
        # memcached counts expiry in whole seconds of its own clock: a TTL of
        # n expires within (n - 1, n] seconds, so one more keeps the lease at
        # least ``timeout`` after the last heartbeat.
        self.ttl = int(timeout + 0.999) + 1
        self.beat = min(self.BEAT, timeout / 4)
        self.token = secrets.token_hex(8).encode("ascii")
        self._beat = 0.0
        self.held = False

    def _call(self, what: str, fn: Any) -> Any:
        from .errors import ProgressUnavailable

        try:
            return self.store._node(self.key).call(what, fn)
        except ProgressUnavailable:
            raise StorageUnavailable("the lock store (memcached) is unavailable; retry shortly") from None

    def try_acquire(self) -> bool:
        key, token, ttl = self.key, self.token, self.ttl
        if self._call("add", lambda c: c.add(key, token, expire=ttl, noreply=False)) \
                or self._call("get", lambda c: c.get(key)) == token:
            self.held = True
            self._beat = time.time()
            return True
        return False

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        delay = 0.02
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise UploadLocked("another request is writing to this upload; retry shortly")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def break_stale(self) -> bool:
        return False  # a silent holder's lease expires by itself

    @contextmanager
    def _fence(self) -> Iterator[None]:
        key, token, ttl = self.key, self.token, self.ttl
        if self._call("get", lambda c: c.get(key)) != token:
            self.held = False
            raise UploadLocked("this request lost the upload's lock after going silent")
        yield
        now = time.time()
        if now - self._beat >= self.beat:
            self._call("set", lambda c: c.set(key, token, expire=ttl, noreply=False))
            self._beat = now
        self._checked = time.monotonic()

    def release(self) -> None:
        key, token = self.key, self.token
        try:
            if self.held and self._call("get", lambda c: c.get(key)) == token:
                self._call("delete", lambda c: c.delete(key, noreply=False))
        except UploadError:
            pass
        self.held = False
        self._checked = -math.inf

    def close(self) -> None:
        pass


# -- the upload area ---------------------------------------------------------------


class Appender:
    """Appends one request's bytes to an upload's data, each write fenced by the lease."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _LocalAppender(Appender):
    def __init__(self, path: str, lease: Any) -> None:
        self.lease = lease
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise StorageUnavailable(f"cannot open an upload's data: {exc.strerror or exc}") from None
        try:
            # Where the appends land: write_all cuts its pieces on the file's blocks.
            self._end = os.fstat(self.fd).st_size
        except OSError as exc:
            os.close(self.fd)
            raise StorageUnavailable(f"cannot open an upload's data: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> None:
        with self.lease.fenced():
            try:
                write_all(self.fd, data, self._end)
                self._end += len(data)
            except OSError as exc:
                raise StorageUnavailable(f"writing an upload's data failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _FsspecAppender(Appender):
    """For fsspec filesystems that can append (``memory://``, SFTP...): each
    chunk is written and flushed under the lease, so what is stored is what
    was fenced."""

    def __init__(self, fs: Any, path: str, lease: Any) -> None:
        self.lease = lease
        self.f: Any = fs.open(path, "ab")

    def write(self, data: bytes) -> None:
        with self.lease.fenced():
            self.f.write(data)
            self.f.flush()

    def close(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            with self.lease.fenced():
                f.close()


def _blocks(f: IO[bytes], size: int = -1) -> Iterator[bytes]:
    """``f``'s bytes in blocks of READ_BLOCK (the first ``size`` only, when given)."""
    left = size
    while left:
        block = f.read(READ_BLOCK if left < 0 else min(READ_BLOCK, left))
        if not block:
            return
        left -= len(block) if left > 0 else 0
        yield block


class UploadArea:
    """The upload area on a local directory (the default, and local Storage)."""

    #: Whether the stored bytes can be read back before the upload is complete
    #: (S3's parts cannot: its uploads are completed first, see finalize).
    replayable = True

    def __init__(self, directory: str, lock_dir: Optional[str] = None, storage: Optional["Storage"] = None) -> None:
        self.directory = directory
        self.lock_dir = lock_dir or directory
        self.storage = storage

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"

    def _p(self, upload_id: str, suffix: str) -> str:
        assert valid_upload_id(upload_id), "upload ids are validated before they reach the area"
        return os.path.join(self.directory, upload_id + suffix)

    def data_path(self, upload_id: str) -> str:
        return self._p(upload_id, ".bin")

    # state
    def create(self, state: UploadState) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self._p(state.id, ".info"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, state.to_json())
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create an upload: {exc.strerror or exc}") from None

    def load(self, upload_id: str) -> Optional[UploadState]:
        try:
            with open(self._p(upload_id, ".info"), "rb") as f:
                return UploadState.from_json(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise StorageUnavailable(f"cannot read an upload's state: {exc}") from None

    def save(self, state: UploadState) -> None:
        """Write the state, unless it is what was read or last written.

        Most PATCHes change nothing in it (the offset is the data's own size):
        writing and renaming it cost an 8 MiB PATCH about 0.3 ms on ext4, a
        small one a third of its time.
        """
        data = state.to_json()
        if data == state.stored_as:
            return
        self._write_state(state.id, data)
        state.stored_as = data

    def _write_state(self, upload_id: str, data: bytes) -> None:
        path = self._p(upload_id, ".info")
        tmp = f"{path}.{secrets.token_hex(4)}.new"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the old state or the new, never half of one
        except OSError as exc:
            _unlink(tmp)
            raise StorageUnavailable(f"cannot save an upload's state: {exc.strerror or exc}") from None

    # bytes
    def stored(self, upload_id: str) -> int:
        try:
            return os.stat(self.data_path(upload_id)).st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageUnavailable(f"cannot look up an upload's data: {exc.strerror or exc}") from None

    def appender(self, upload_id: str, lease: Any) -> Appender:
        return _LocalAppender(self.data_path(upload_id), lease)

    def read(self, upload_id: str, size: int = -1) -> Iterator[bytes]:
        """The stored bytes in blocks (the first ``size`` only, when given)."""
        with self.open_data(upload_id) as f:
            yield from _blocks(f, size)

    def open_data(self, upload_id: str) -> IO[bytes]:
        return open(self.data_path(upload_id), "rb")

    def finalize(self, state: UploadState, lease: Any) -> None:
        """Make the complete upload's bytes one readable object (nothing to do here)."""

    def touch(self, upload_id: str) -> None:
        os.close(os.open(self.data_path(upload_id), os.O_WRONLY | os.O_CREAT, 0o600))

    def remove_data(self, upload_id: str) -> None:
        _unlink(self.data_path(upload_id))

    def remove(self, upload_id: str) -> None:
        for suffix in (".bin", ".info"):
            _unlink(self._p(upload_id, suffix))
        _unlink(os.path.join(self.lock_dir, upload_id + ".lock"))

    def lease(self, upload_id: str, timeout: float) -> FileLease:
        assert valid_upload_id(upload_id)
        return FileLease(os.path.join(self.lock_dir, upload_id + ".lock"), timeout)

    def ids(self) -> List[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".info") and valid_upload_id(n[:-5]))

    def adopt(self, upload_id: str) -> "PendingWrite":
        """A pending write of the storage over this upload's data: its commit
        gives the data its final key with the storage's collision policy, as
        a multipart file's temp data gets it."""
        from .storage import PendingWrite, _LocalPendingWrite

        assert self.storage is not None
        pending = _LocalPendingWrite.__new__(_LocalPendingWrite)
        PendingWrite.__init__(pending, self.storage, None, self.storage.collision)
        pending._fd = -1
        pending._tmp = self.data_path(upload_id)
        pending.size = self.stored(upload_id)
        return pending


class FsspecUploadArea(UploadArea):
    """The upload area in a non-local fsspec storage that can append.

    Leases are files in a local directory: they serialize the workers of one
    host.
    """

    def __init__(self, storage: "Storage", lock_dir: str) -> None:
        super().__init__(storage._path(f"{storage.temp_dir}/{STORAGE_AREA}"), lock_dir, storage)
        self.fs = storage.fs

    def _p(self, upload_id: str, suffix: str) -> str:
        assert valid_upload_id(upload_id)
        return f"{self.directory}/{upload_id}{suffix}"

    def create(self, state: UploadState) -> None:
        path = self._p(state.id, ".info")
        try:
            if self.storage is not None and self.storage._needs_dirs:
                self.fs.makedirs(self.directory, exist_ok=True)
            self.fs.pipe_file(path, state.to_json())
        except Exception as exc:
            raise StorageUnavailable(f"cannot create an upload: {type(exc).__name__}") from None

    def load(self, upload_id: str) -> Optional[UploadState]:
        path = self._p(upload_id, ".info")
        try:
            self.fs.invalidate_cache(path)
            return UploadState.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StorageUnavailable(f"cannot read an upload's state: {type(exc).__name__}") from None

    def _write_state(self, upload_id: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(upload_id, ".info"), data)
        except Exception as exc:
            raise StorageUnavailable(f"cannot save an upload's state: {type(exc).__name__}") from None

    def stored(self, upload_id: str) -> int:
        path = self.data_path(upload_id)
        try:
            self.fs.invalidate_cache(path)
            return int(self.fs.info(path).get("size") or 0)
        except FileNotFoundError:
            return 0
        except Exception as exc:
            raise StorageUnavailable(f"cannot look up an upload's data: {type(exc).__name__}") from None

    def appender(self, upload_id: str, lease: Any) -> Appender:
        return _FsspecAppender(self.fs, self.data_path(upload_id), lease)

    def open_data(self, upload_id: str) -> IO[bytes]:
        return self.fs.open(self.data_path(upload_id), "rb")  # type: ignore[no-any-return]

    def touch(self, upload_id: str) -> None:
        if self.stored(upload_id) == 0 and not self.fs.exists(self.data_path(upload_id)):
            self.fs.pipe_file(self.data_path(upload_id), b"")

    def remove_data(self, upload_id: str) -> None:
        try:
            self.fs.rm_file(self.data_path(upload_id))
        except FileNotFoundError:
            pass

    def remove(self, upload_id: str) -> None:
        for suffix in (".bin", ".info"):
            try:
                self.fs.rm_file(self._p(upload_id, suffix))
            except FileNotFoundError:
                pass
        _unlink(os.path.join(self.lock_dir, upload_id + ".lock"))

    def ids(self) -> List[str]:
        try:
            self.fs.invalidate_cache(self.directory)
            names = [p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(self.directory, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".info") and valid_upload_id(n[:-5]))

    def adopt(self, upload_id: str) -> "PendingWrite":
        from .storage import PendingWrite, _FsspecPendingWrite

        assert self.storage is not None
        pending = _FsspecPendingWrite.__new__(_FsspecPendingWrite)
        PendingWrite.__init__(pending, self.storage, None, self.storage.collision)
        pending._tmp = self.data_path(upload_id)
        pending._file = None
        pending.size = self.stored(upload_id)
        return pending


#: S3's smallest part but the last.
S3_MIN_PART = 5 * 1024 * 1024


class _S3Appender(Appender):
    """Cuts one request's bytes into the upload's S3 parts as they arrive.

    S3 needs parts of at least 5 MiB (but the last), so bytes are gathered
    up to ``part_size`` (memory: one part) and each full part is uploaded
    as soon as it is complete. What is left when the request ends, cut or
    not, is written as the *tail*, its own small object ``<id>.tail.<n>``,
    where ``n`` is the part it will begin; the next request starts its first
    part with it. A tail is valid only while part ``n`` does not exist, so a
    worker killed after uploading the part that absorbed a tail, but before
    removing that tail, counts those bytes once.
    """

    def __init__(self, area: "S3UploadArea", upload_id: str, lease: Any) -> None:
        self.area = area
        self.upload_id = upload_id
        self.lease = lease
        self.mpu, parts, self.tail_key = area._layout(upload_id)
        self.part = len(parts)
        self.buffer = bytearray(area.fs.cat_file(self.tail_key) if self.tail_key else b"")

    def write(self, data: bytes) -> None:
        self.buffer += data
        size = self.area.part_size
        while len(self.buffer) >= size:
            self._upload(bytes(self.buffer[:size]))
            del self.buffer[:size]

    def _upload(self, data: bytes) -> None:
        area = self.area
        with self.lease.fenced():
            area._s3("upload_part", Body=data, PartNumber=self.part + 1, UploadId=self.mpu,
                     **area._where(self.upload_id, ".bin"))
        self.part += 1
        old, self.tail_key = self.tail_key, None
        if old:
            area._rm(old)  # absorbed by the part just uploaded

    def close(self) -> None:
        if self.buffer:
            key = self.area._tail_key(self.upload_id, self.part + 1)
            with self.lease.fenced():
                self.area.fs.pipe_file(key, bytes(self.buffer))
            old, self.tail_key = self.tail_key, key
            if old and old != key:
                self.area._rm(old)
            self.buffer = bytearray()


class S3UploadArea(FsspecUploadArea):
    """The upload area on S3: each upload's bytes go into one multipart upload
    on ``<id>.bin`` in the storage's temp area (parts as they fill, the rest
    as a tail object), so nothing is appended in place and a worker killed
    mid-PATCH leaves what its last part or tail stored. On completion the
    multipart upload is completed (the tail becomes the last part); then the
    storage's commit copies the object to its final key.
    """

    replayable = False

    def __init__(self, storage: "Storage", lock_dir: str) -> None:
        super().__init__(storage, lock_dir)
        self.part_size: int = max(S3_MIN_PART, storage.block_size or 0)
        self._mpus: Dict[str, str] = {}

    def _where(self, upload_id: str, suffix: str) -> Dict[str, str]:
        bucket, key, _ = self.fs.split_path(self._p(upload_id, suffix))
        return {"Bucket": bucket, "Key": key}

    def _s3(self, op: str, **kw: Any) -> Any:
        try:
            return self.fs.call_s3(op, **kw)
        except UploadError:
            raise
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"storage failed to {op}: {type(exc).__name__}") from None

    def _rm(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _tail_key(self, upload_id: str, part: int) -> str:
        return self._p(upload_id, f".tail.{part}")

    def create(self, state: UploadState) -> None:
        out = self._s3("create_multipart_upload", **self._where(state.id, ".bin"))
        state.extra["mpu"] = out["UploadId"]
        super().create(state)

    def _mpu(self, upload_id: str) -> Optional[str]:
        # An upload's multipart upload id never changes: kept once read. If
        # another worker completed it meanwhile, S3 says so (NoSuchUpload).
        mpu = self._mpus.get(upload_id)
        if mpu is not None:
            return mpu
        state = self.load(upload_id)
        if state is None or state.extra.get("assembled"):
            return None
        mpu = state.extra.get("mpu")
        if mpu is not None:
            if len(self._mpus) > 1000:
                self._mpus.clear()
            self._mpus[upload_id] = mpu
        return mpu

    def _parts(self, upload_id: str, mpu: str) -> List[Dict[str, Any]]:
        parts: List[Dict[str, Any]] = []
        kw: Dict[str, Any] = {"UploadId": mpu, **self._where(upload_id, ".bin")}
        while True:
            page = self._s3("list_parts", **kw)
            parts += page.get("Parts", [])
            if not page.get("IsTruncated"):
                return sorted(parts, key=lambda p: int(p["PartNumber"]))
            kw["PartNumberMarker"] = page["NextPartNumberMarker"]

    def _layout(self, upload_id: str) -> Tuple[str, List[Dict[str, Any]], Optional[str]]:
        """The multipart upload, its parts, and the valid tail's key (if any)."""
        mpu = self._mpu(upload_id)
        if mpu is None:
            raise StorageUnavailable("the upload's multipart upload is gone")
        parts = self._parts(upload_id, mpu)
        tail = self._tail_key(upload_id, len(parts) + 1)
        return mpu, parts, tail if self._size(tail) is not None else None

    def _size(self, path: str) -> Optional[int]:
        self.fs.invalidate_cache(path)
        try:
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None

    def stored(self, upload_id: str) -> int:
        mpu = self._mpu(upload_id)
        if mpu is None:
            return super().stored(upload_id)  # assembled: one object
        try:
            _, parts, tail = self._layout(upload_id)
        except FileNotFoundError:  # completed by a request that died before saying so
            return super().stored(upload_id)
        size = sum(int(p["Size"]) for p in parts)
        return size + ((self._size(tail) or 0) if tail else 0)

    def appender(self, upload_id: str, lease: Any) -> Appender:
        return _S3Appender(self, upload_id, lease)

    def finalize(self, state: UploadState, lease: Any) -> None:
        """Complete the multipart upload: the tail becomes the last part, and
        the bytes become one readable object (replayed, then committed)."""
        if state.extra.get("assembled"):
            return
        mpu = state.extra["mpu"]
        where = self._where(state.id, ".bin")
        try:
            _, parts, tail = self._layout(state.id)
        except FileNotFoundError:
            parts, tail = [], None
            mpu = None  # completed before: only the flag was lost
        if mpu is not None:
            with lease.fenced():
                if tail:
                    out = self._s3("upload_part", Body=self.fs.cat_file(tail), PartNumber=len(parts) + 1,
                                   UploadId=mpu, **where)
                    parts.append({"PartNumber": len(parts) + 1, "ETag": out["ETag"]})
                if parts:
                    self._s3("complete_multipart_upload", UploadId=mpu, MultipartUpload={
                        "Parts": [{"PartNumber": int(p["PartNumber"]), "ETag": p["ETag"]} for p in parts]},
                        **where)
                else:  # an empty file: S3 wants at least one part
                    self._s3("abort_multipart_upload", UploadId=mpu, **where)
                    self.fs.pipe_file(self.data_path(state.id), b"")
            if tail:
                self._rm(tail)
        state.extra["assembled"] = True
        self._mpus.pop(state.id, None)
        self.save(state)

    def touch(self, upload_id: str) -> None:
        pass  # finalize made the object

    def remove_data(self, upload_id: str) -> None:
        self._mpus.pop(upload_id, None)
        state = self.load(upload_id)
        mpu = None if state is None or state.extra.get("assembled") else state.extra.get("mpu")
        if mpu:
            try:
                self._s3("abort_multipart_upload", UploadId=mpu, **self._where(upload_id, ".bin"))
            except FileNotFoundError:
                pass
        prefix = self._p(upload_id, ".tail.")
        self.fs.invalidate_cache(self.directory)
        try:
            names = self.fs.ls(self.directory, detail=False)
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(prefix):
                self._rm(name)
        super().remove_data(upload_id)

    def remove(self, upload_id: str) -> None:
        self.remove_data(upload_id)
        super().remove(upload_id)


def area_for(storage: Optional["Storage"], directory: Optional[str], tempdir: Optional[str]) -> UploadArea:
    """The upload area the middleware's configuration implies.

    :raises ValueError: a storage that cannot append (S3 and other object
        stores need parts, which this area does not write).
    """
    lock_dir = os.path.join(tempdir or tempfile.gettempdir(), AREA_NAME + "-locks")
    if directory is not None:
        return UploadArea(directory)
    if storage is None:
        return UploadArea(os.path.join(tempdir or tempfile.gettempdir(), AREA_NAME))
    if storage.local:
        return UploadArea(storage._local_path(f"{storage.temp_dir}/{STORAGE_AREA}"), storage=storage)
    if storage.object_store:
        if _is_s3(storage.fs):
            return S3UploadArea(storage, lock_dir)
        raise ValueError(f"resumable uploads to {storage!r} are not supported yet: its backend cannot append")
    return FsspecUploadArea(storage, lock_dir)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            pass


# -- the sink ------------------------------------------------------------------------


class ResumableSink(UploadHandler):
    """The last handler of a resumable request: appends what reaches it to the
    upload's data and, on the request that completes the upload, hands the
    data to the storage's commit (or, without storage, to the app as a file).

    ``skip``: bytes at the start of this request's stream that the data
    already holds (the completing request replays them through the chain so
    hashes and thumbnails see the whole file); they are not written again.
    """

    def __init__(self, area: UploadArea, upload_id: str, lease: Any, *, skip: int = 0) -> None:
        self.area = area
        self.upload_id = upload_id
        self.lease = lease
        self.skip = skip
        self.appended = 0
        self.environ: Optional[Dict[str, Any]] = None
        self._appender: Optional[Appender] = None
        self._pending: Optional["PendingWrite"] = None
        self._key: Optional[str] = None
        self._file: Optional[UploadedFile] = None
        self._committed_key: Optional[str] = None
        self._started = datetime.now(timezone.utc)

    def request_start(self, ctx: "RequestContext") -> None:
        self.environ = ctx.environ
        storage = self.area.storage
        if storage is not None and storage.required_hashes:
            ctx.digests_at_file_end = True

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        if self.skip:
            n = min(self.skip, len(chunk))
            self.skip -= n
            chunk = chunk[n:]
            if not chunk:
                return None
        if self._appender is None:
            self._appender = self.area.appender(self.upload_id, self.lease)
        self._appender.write(chunk)
        self.appended += len(chunk)
        return None

    def end_writes(self) -> None:
        appender, self._appender = self._appender, None
        if appender is not None:
            appender.close()

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        self.end_writes()
        self.area.touch(self.upload_id)  # an empty file has no data yet
        storage = self.area.storage
        size = self.area.stored(self.upload_id)
        if storage is None:
            path = self.area.data_path(self.upload_id)
            self._file = UploadedFile.from_info(info, path_opener(path), size=size, path=path)
            return self._file
        self._pending = self.area.adopt(self.upload_id)
        self._key = storage.make_key(info, self.environ, self._started)
        uploaded = UploadedFile.from_info(info, self._open, size=size, key=self._key,
                                          url=storage.url(self._key), path=storage.path(self._key))
        self._file = uploaded
        return uploaded

    def _open(self) -> IO[bytes]:
        """The file's bytes: from the upload's data until the commit (a
        ``before_finish`` hook reads them there), then from the final key."""
        storage, uploaded = self.area.storage, self._file
        if self._committed_key is not None and storage is not None and uploaded is not None and uploaded.key:
            return storage.open(uploaded.key)
        return self.area.open_data(self.upload_id)

    def request_end(self, ctx: "RequestContext") -> None:
        storage, pending, uploaded = self.area.storage, self._pending, self._file
        if storage is None or pending is None or uploaded is None:
            return
        final = pending.commit(self._key)
        self._committed_key = final
        uploaded.key = final
        uploaded.url = storage.url(final)
        uploaded.path = storage.path(final)
        uploaded.deduplicated = pending.deduplicated

    def close(self, ctx: "RequestContext") -> None:
        self.end_writes()
        if self.area.storage is None and self._file is not None:
            self.area.remove_data(self.upload_id)  # handed to the app; the response is over

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        try:
            self.end_writes()
        except Exception:
            pass
        pending = self._pending
        storage = self.area.storage
        if pending is not None and storage is not None and pending.committed and self._committed_key \
                and not pending.deduplicated and pending.collision not in ("overwrite", "dedup"):
            try:
                storage._remove(self._committed_key)
            except Exception:
                pass


class BeforeFinish(UploadHandler):
    """Runs the blocking ``before_finish(environ, file)`` hook (a virus scan)
    once the file is whole and before the sink gives it its final key; an
    :class:`~uploadkit.errors.UploadError` it raises refuses the file."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def request_end(self, ctx: "RequestContext") -> None:
        for f in ctx.files:
            self.hook(ctx.environ, f)


__all__ = ["UploadState", "FileLease", "MemcachedLease", "UploadArea", "FsspecUploadArea", "S3UploadArea", "area_for", "ResumableSink",
           "BeforeFinish", "UploadError"]
