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
  on a second core, as a multipart file's are, by a hash thread that stays
  with the cache entry: the PATCH answers without waiting for it, and the
  next PATCH on this worker goes on feeding the same thread, which may still
  be finishing the last one's bytes. Hashing inline put all of each PATCH's
  hash, and a thread joined at each PATCH's end its last megabytes, between
  one PATCH's answer and the client's next PATCH (benchmarks/bench_tus.py).
  A parked thread that gets nothing for ``PARKED_IDLE`` seconds ends; the
  entry's hash objects stay good;
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

import queue
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional, Sequence, Tuple

from .files import FileInfo
from .handlers import HashingHandler, SniffingHandler, UploadHandler, _HashWorker

if TYPE_CHECKING:
    from .pipeline import RequestContext

_Key = Tuple[str, ...]


#: Seconds a parked hash thread waits for its upload's next PATCH before it ends.
PARKED_IDLE = 30.0


class ParkedWorker(_HashWorker):
    """A hash thread that can wait in the cache between an upload's PATCHes.

    Claimed while a request feeds it; parked (unclaimed) in the cache. A
    parked thread whose queue stays empty for ``idle`` seconds retires
    (ends), and then cannot be claimed: the request that takes its entry
    starts a new thread for the same hash objects, after joining this one.
    """

    def __init__(self, depth: int, idle: float = PARKED_IDLE) -> None:
        self.idle = idle
        self.claimed = True
        self.retired = False
        self.lock = threading.Lock()
        super().__init__(depth)

    def run(self) -> None:
        get, handle = self.queue.get, self._handle
        while True:
            try:
                item = get(timeout=self.idle)
            except queue.Empty:
                with self.lock:
                    if not self.claimed and self.queue.empty():
                        self.retired = True
                        return
                continue
            if not handle(item):
                return

    def claim(self) -> bool:
        with self.lock:
            if self.retired:
                return False
            self.claimed = True
            return True

    def park(self) -> None:
        with self.lock:
            self.claimed = False


class Carried(NamedTuple):
    """A cache entry handed to the request that continues the upload."""

    hashers: List[Any]
    #: The thread that hashes into ``hashers`` (maybe still busy with the
    #: last PATCH's bytes), now the request's; None: start one when needed.
    worker: Optional[ParkedWorker]


class StateCache:
    """Per-process, bounded: ``upload id -> (offset, algorithms, hash objects, hash thread)``.

    An entry is taken out (not copied) by the request that continues it, so
    two requests never share hash objects or a thread, and put back by that
    request only when what it hashed is what it stored. The oldest entries go
    first when more than ``size`` uploads are cached (their threads are told
    to end); ``size=0`` keeps nothing. ``join_timeout``: how long a request
    waits for a retiring thread of an entry it takes before it misses.
    """

    def __init__(self, size: int, join_timeout: float = 30.0) -> None:
        if size < 0:
            raise ValueError("the state cache size must be >= 0")
        self.size = size
        self.join_timeout = join_timeout
        self._entries: "OrderedDict[str, Tuple[int, _Key, List[Any], Optional[ParkedWorker]]]" = OrderedDict()
        self._lock = threading.Lock()

    def take(self, upload_id: str, offset: int, algorithms: Sequence[str]) -> Optional[Carried]:
        """The hash objects of ``upload_id``'s first ``offset`` bytes and their thread, or None."""
        with self._lock:
            entry = self._entries.pop(upload_id, None)
        if entry is None:
            return None
        at, key, hashers, worker = entry
        if at != offset or key != tuple(algorithms):
            _stop(worker)
            return None
        if worker is not None and not worker.claim():
            # It retired (or is ending): once it is done, the objects are whole.
            worker.join(self.join_timeout)
            if worker.is_alive():
                return None
            worker = None
        return Carried(hashers, worker)

    def put(self, upload_id: str, offset: int, algorithms: Sequence[str], hashers: List[Any],
            worker: Optional[ParkedWorker] = None) -> None:
        """Cache ``hashers`` for the first ``offset`` bytes, with ``worker``,
        the thread still hashing queued bytes into them, parked."""
        if not self.size:
            _stop(worker)
            return
        if worker is not None:
            worker.park()
        with self._lock:
            old = self._entries.pop(upload_id, None)
            self._entries[upload_id] = (offset, tuple(algorithms), hashers, worker)
            evicted = [self._entries.popitem(last=False)[1] for _ in range(len(self._entries) - self.size)]
        for entry in evicted + ([old] if old is not None else []):
            _stop(entry[3])

    def __len__(self) -> int:
        return len(self._entries)


def _stop(worker: Optional[ParkedWorker]) -> None:
    if worker is not None:
        worker.stop_later()  # it ends once its queue is hashed; nobody waits


class CarriedHashing(HashingHandler):
    """A :class:`~uploadkit.handlers.HashingHandler` that continues hash
    objects of the upload's earlier bytes (or starts fresh ones) on their
    thread, counts what it hashed, and hands both back at the end of a PATCH
    that leaves the file unfinished."""

    def __init__(self, like: HashingHandler, carried: Optional[Carried]) -> None:
        super().__init__(sync=like.sync, offload_after=like.offload_after,
                         batch_size=like.batch_size, queue_depth=like.queue_depth)
        self.algorithms = list(like.algorithms)
        self.carried = carried
        self.started = False
        self.hashed = 0

    def _new_worker(self) -> ParkedWorker:
        return ParkedWorker(self.queue_depth)

    def file_start(self, info: FileInfo) -> Any:
        super().file_start(info)
        carried, self.carried = self.carried, None
        if carried is not None:
            self._hashers = carried.hashers
            if carried.worker is not None:
                # Bytes of the last PATCH may still wait in its queue: every
                # byte goes after them, none is hashed on this thread.
                self._worker = carried.worker
                self._offloading = True
        self.started = True
        return None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        self.hashed += len(chunk)
        return super().receive(info, chunk)

    def settle(self) -> Tuple[Optional[List[Any]], Optional[ParkedWorker]]:
        """Every byte received so far queued for hashing: the hash objects
        (None if the file never started in this request) and their thread,
        still running. The handler is spent after it."""
        worker = self._worker
        if worker is not None:
            self._send()
            self._worker = None
        assert worker is None or isinstance(worker, ParkedWorker)
        return (self._hashers if self.started else None), worker

    def close(self, ctx: "RequestContext") -> None:
        # A PATCH that leaves the file unfinished ends without file_end or
        # request_end: the hash thread is stopped here unless kept.
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self.carried is not None and self.carried.worker is not None:
            self.carried.worker.stop()
            self.carried = None


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
        hashers, worker = hashing.settle()
        if hashers is not None and hashing.hashed == appended and stored == self.start + appended:
            cache.put(upload_id, stored, hashing.algorithms, hashers, worker)
        else:
            _stop(worker)


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
    entry = cache.take(upload_id, stored, base.algorithms) if stored else None
    if stored and entry is None:
        return None
    carried = CarriedHashing(base, entry)
    return Resume([carried if h is base else h for h in chain], carried, stored)


__all__ = ["StateCache", "Carried", "ParkedWorker", "CarriedHashing", "Resume", "plan", "PARKED_IDLE"]
