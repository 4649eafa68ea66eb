"""What a worker keeps of a resumable upload between its requests, so the
request that completes the upload need not replay the stored bytes.

The upload's state that every worker must see lives in the upload area
(:mod:`uploadkit.resumable`). Hash objects cannot go there (hashlib's
objects cannot be serialized), so without more the completing PATCH reads the
whole stored file back through the chain to get exact whole-file digests.
This module lets each worker keep, in its own memory, the hash objects of
the uploads it served, keyed by upload id and by the offset they have
hashed up to, in a small bounded cache:

* a PATCH that starts where its worker's cached hashes end continues them;
  if it starts at 0 it begins them. It hashes its bytes as they go by and,
  if every byte it hashed is exactly what it stored, caches the hashes at
  the new offset. Past the hashing handler's threshold the bytes are hashed
  on a second core, as a multipart file's are, and the PATCH answers without
  waiting for that thread: the cache entry keeps the thread, and the next
  request to take the entry joins it first. Waiting at each PATCH's end
  instead put the hash of the PATCH's last megabytes, and hashing inline
  put all of it, between one PATCH's answer and the client's next PATCH
  (benchmarks/bench_tus.py);
* the completing PATCH, finding hashes for exactly the stored prefix,
  skips the replay: its own bytes finish the digests;
* in every other case (the previous PATCH went to another worker or another
  host, the worker restarted, the cache evicted the entry, a PATCH lost its
  lock or failed mid-write) nothing matches and the completing PATCH replays
  as before. The digests are the same either way.

Why a match is enough: an upload's data is append-only under its lease, so
once a worker has hashed exactly the bytes it (or the requests before it,
whose hashes it continued) stored, the stored prefix of that length never
changes; a later PATCH on another worker only adds bytes after it, which
moves the offset and so misses the entry.

Only chains whose per-file state is known are carried: sniffing (which
needs the head, kept in the upload's state) and hashing. A chain with any
other handler (quota, thumbnails, an app's own) replays, since its state
cannot be known to be complete.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from .files import FileInfo
from .handlers import HashingHandler, SniffingHandler, UploadHandler

if TYPE_CHECKING:
    from .pipeline import RequestContext

_Key = Tuple[str, ...]


class StateCache:
    """Per-process, bounded: ``upload id -> (offset, algorithms, hash objects)``.

    An entry is taken out (not copied) by the request that continues it, so
    two threads never share hash objects, and put back by that request only
    when what it hashed is what it stored. An entry may come with the thread
    still hashing into its objects (``busy``); :meth:`take` waits up to
    ``join_timeout`` for it, and misses if it is not done by then. The oldest
    entries go first when more than ``size`` uploads are cached; ``size=0``
    keeps nothing.
    """

    def __init__(self, size: int, join_timeout: float = 30.0) -> None:
        if size < 0:
            raise ValueError("the state cache size must be >= 0")
        self.size = size
        self.join_timeout = join_timeout
        self._entries: "OrderedDict[str, Tuple[int, _Key, List[Any], Optional[threading.Thread]]]" = OrderedDict()
        self._lock = threading.Lock()

    def take(self, upload_id: str, offset: int, algorithms: Sequence[str]) -> Optional[List[Any]]:
        """The hash objects of ``upload_id``'s first ``offset`` bytes, or None."""
        with self._lock:
            entry = self._entries.pop(upload_id, None)
        if entry is None or entry[0] != offset or entry[1] != tuple(algorithms):
            return None
        busy = entry[3]
        if busy is not None:
            busy.join(self.join_timeout)
            if busy.is_alive():
                return None  # still hashing: the objects are not ours to touch
        return entry[2]

    def put(self, upload_id: str, offset: int, algorithms: Sequence[str], hashers: List[Any],
            busy: Optional[threading.Thread] = None) -> None:
        """Cache ``hashers`` for the first ``offset`` bytes; ``busy``: the
        thread still hashing queued bytes into them, which ends by itself."""
        if not self.size:
            return
        with self._lock:
            self._entries[upload_id] = (offset, tuple(algorithms), hashers, busy)
            self._entries.move_to_end(upload_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class CarriedHashing(HashingHandler):
    """A :class:`~uploadkit.handlers.HashingHandler` that continues hash
    objects of the upload's earlier bytes (or starts fresh ones), counts what
    it hashed, and hands its objects back at the end of a PATCH that leaves
    the file unfinished."""

    def __init__(self, like: HashingHandler, hashers: Optional[List[Any]]) -> None:
        super().__init__(sync=like.sync, offload_after=like.offload_after,
                         batch_size=like.batch_size, queue_depth=like.queue_depth)
        self.algorithms = list(like.algorithms)
        self.carried = hashers
        self.started = False
        self.hashed = 0

    def file_start(self, info: FileInfo) -> Any:
        super().file_start(info)
        if self.carried is not None:
            self._hashers = self.carried
        self.started = True
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.hashed += len(chunk)
        return super().receive(info, chunk)

    def settle(self) -> Tuple[Optional[List[Any]], Optional[threading.Thread]]:
        """Every byte received so far queued for hashing: the hash objects
        (None if the file never started in this request) and the thread still
        hashing into them, if any, which ends by itself once it is done. The
        handler is spent after it."""
        worker = self._worker
        if worker is not None:
            self._send()
            worker.stop_later()
            self._worker = None
        return (self._hashers if self.started else None), worker

    def close(self, ctx: "RequestContext") -> None:
        # A PATCH that leaves the file unfinished ends without file_end or
        # request_end: the hash thread is stopped here.
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


class Resume:
    """One request's chain, when its handlers' state can be carried: the
    chain (hashing replaced by :class:`CarriedHashing`) and where it starts."""

    def __init__(self, chain: List[UploadHandler], hashing: Optional[CarriedHashing], start: int) -> None:
        self.chain = chain
        self.hashing = hashing
        self.start = start

    def keep(self, cache: StateCache, upload_id: str, appended: int, stored: int) -> None:
        """After a PATCH that left the file unfinished: cache the hashes if
        they cover exactly the durable prefix (``appended`` bytes stored by
        this request on top of ``start``, and ``stored`` in all)."""
        hashing = self.hashing
        if hashing is None:
            return
        hashers, busy = hashing.settle()
        if hashers is not None and hashing.hashed == appended and stored == self.start + appended:
            cache.put(upload_id, stored, hashing.algorithms, hashers, busy)


def plan(chain: Sequence[UploadHandler], cache: StateCache, upload_id: str, stored: int) -> Optional[Resume]:
    """The chain that continues ``upload_id`` at ``stored`` without a replay,
    or None: the chain has handlers whose state cannot be carried, or this
    worker does not hold hashes of exactly the first ``stored`` bytes."""
    if not cache.size or any(type(h) not in (SniffingHandler, HashingHandler) for h in chain):
        return None
    hashing = [h for h in chain if type(h) is HashingHandler]
    if not hashing:
        return Resume(list(chain), None, stored)  # sniffing reads only the head, which the state keeps
    if len(hashing) != 1:
        return None
    base = hashing[0]
    hashers = cache.take(upload_id, stored, base.algorithms) if stored else None
    if stored and hashers is None:
        return None
    carried = CarriedHashing(base, hashers)
    return Resume([carried if h is base else h for h in chain], carried, stored)


__all__ = ["StateCache", "CarriedHashing", "Resume", "plan"]
