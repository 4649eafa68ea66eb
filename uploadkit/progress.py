"""Upload progress: the listener the pipeline calls, the stores it writes to,
and the status route that progress bars poll.

The path of one progress update::

    reader/pipeline -> StoreProgress (throttled) -> ProgressStore (memory | memcached)
                                                          ^
    browser  --GET <progress_path>?X-Progress-ID=id-->  ProgressApp  (JSON | JSONP | SSE)

The status answers follow the convention of the nginx, Apache and lighttpd
upload-progress modules (``starting``/``uploading``/``done``/``error`` with
``received`` and ``size``), so their existing clients work unchanged; the
extra keys (``rate``, ``eta``, ``started_at``, ``updated_at``, ``files``, the
``processing`` state) are ignored by those clients.

Nothing one request sends can make a status large (names are cut, the JSON
is bounded), a worker that dies mid-upload shows as ``error`` once its
status stops being refreshed, and the status route holds only a few event
streams at once, so no client can take a worker's threads.

Progress is a convenience, never a reason to fail an upload: a listener
swallows every store failure, and :class:`MemcachedStore` stops trying for a
while (a circuit breaker) when memcached is down or slow, so an outage costs an
upload at most one short timeout per retry period.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from importlib import resources
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List,
                    Optional, Protocol, Sequence, Set, Tuple, Union)
from urllib.parse import parse_qsl

from .errors import BadProgressId, ProgressUnavailable, UploadError

if TYPE_CHECKING:
    from .files import FileInfo
    from .pipeline import RequestContext

log = logging.getLogger("uploadkit.progress")

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
ProgressValue = Dict[str, Any]


class ProgressListener:
    """Told what happens to one request, in order; the default does nothing.

    ``start`` -> ``advance``/``file_start``/``file_end`` while bytes arrive ->
    ``processing`` after the last byte -> ``done``; or ``error`` at any point.
    Implementations must never raise into the upload and must be cheap: they
    are called once per read from the client.
    """

    def start(self, ctx: "RequestContext") -> None:
        pass

    def advance(self, received: int, total: Optional[int]) -> None:
        """``received`` body bytes so far; ``total`` is CONTENT_LENGTH or None (chunked)."""

    def file_start(self, info: "FileInfo") -> None:
        pass

    def file_end(self, info: "FileInfo") -> None:
        pass

    def processing(self) -> None:
        pass

    def done(self, ctx: "RequestContext") -> None:
        pass

    def error(self, exc: "UploadError") -> None:
        pass


NULL_PROGRESS = ProgressListener()


class ProgressRefused(ProgressUnavailable):
    """The store answered but refused this one value (memcached: too large, or
    a value its client will not send). The store itself is up: no breaker
    opens, and other uploads' progress goes on."""

    code = "progress_refused"


class UploadStopped(UploadError):
    """What a status poll reports for an upload whose status stopped being
    written while not final: the process receiving it died or hangs.

    502, as nginx answers (and its upload-progress module reports) an upload
    whose upstream went away before answering."""

    status = 502
    code = "upload_stopped"


# -- progress ids ------------------------------------------------------------

#: What an upload id may look like. Anything else is refused before it can reach
#: a store: memcached keys must not hold spaces or control characters, and a
#: short alphabet keeps ids safe to echo in URLs, logs and HTML.
PROGRESS_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: The query parameter and the header (as a WSGI environ key) carrying the id.
PROGRESS_ID_PARAM = "X-Progress-ID"
PROGRESS_ID_HEADER = "HTTP_X_PROGRESS_ID"


def validate_progress_id(value: Any) -> str:
    """Return ``value`` if it is a well-formed progress id.

    :raises BadProgressId: ``value`` is not a string of 1 to 64 characters
        among ``A-Z a-z 0-9 _ -``.
    """
    # fullmatch, not match + "$": "$" would let a trailing newline through.
    if isinstance(value, str) and PROGRESS_ID_RE.fullmatch(value):
        return value
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    raise BadProgressId(
        f"progress id {shown} must be 1 to 64 characters among A-Z, a-z, 0-9, '_' and '-'",
        limit=64)


def progress_id_from_environ(environ: Environ) -> Optional[str]:
    """The request's progress id: the ``X-Progress-ID`` query parameter first,
    else the ``X-Progress-ID`` header; None when the request carries neither.

    A present but empty or malformed id is an error, not an absent one, so a
    client bug shows up as a 400 instead of a progress bar that never moves.

    :raises BadProgressId: the id is present but malformed.
    """
    query = environ.get("QUERY_STRING") or ""
    # Most requests carry no id: skip the parse unless the name can be there.
    if query and "progress" in query.lower():
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name.lower() == "x-progress-id":
                return validate_progress_id(value)
    header = environ.get(PROGRESS_ID_HEADER)
    if header is not None:
        return validate_progress_id(header)
    return None


# -- settings -------------------------------------------------------------------

#: The largest value worth sending to memcached: its default item size (1 MiB,
#: ``-I``) less room for the key and the item header.
_MEMCACHED_ITEM = 1_000_000


@dataclass(frozen=True)
class ProgressSettings:
    """How often progress is written and how the status route streams it.

    Between the first and the final state a write happens at most every
    ``interval`` seconds, and only once the upload moved by ``min_percent`` of
    its size or ``refresh`` seconds passed since the last write. The first
    state, ``done`` and ``error`` are always written; file boundaries and
    ``processing`` as soon as ``interval`` allows (``processing`` not at all
    when the upload ends first).
    """

    #: Shortest time between two intermediate writes: 4 a second is smoother
    #: than any bar needs and costs a store nothing.
    interval: float = 0.25
    #: Smallest move (percent of the declared size) worth a write.
    min_percent: float = 1.0
    #: Write a smaller move after this long anyway, so a slow upload's bar,
    #: rate and eta stay fresh and its entry does not expire.
    refresh: float = 2.0
    #: Entry lifetime while uploading, in seconds; every write renews it, so
    #: only an upload stalled this long loses its entry.
    ttl: int = 300
    #: How long a final state (done, error) stays readable: long enough for
    #: the last polls of a page, short enough not to pile up.
    final_ttl: int = 60
    #: Time constant of the smoothed transfer rate, in seconds.
    rate_window: float = 5.0
    #: Per-file entries kept in a status (the most recent ones), bounding its size.
    max_files: int = 100
    #: After a store failure a listener skips intermediate writes this long.
    store_retry: float = 5.0
    #: How often an event stream looks at the store, in seconds.
    sse_poll: float = 0.25
    #: A comment line is sent after this long without a change, so proxies
    #: keep the stream open and a vanished client is noticed.
    sse_heartbeat: float = 15.0
    #: An event stream ends after this long; EventSource reconnects by itself.
    #: Bounded so a forgotten page cannot hold a server thread for ever.
    sse_lifetime: float = 120.0
    #: Reconnection delay suggested to EventSource, in milliseconds.
    sse_retry_ms: int = 1000
    #: Event streams open at once on one status route of one process. Each
    #: holds a server thread for as long as it lasts, so this stays well below
    #: the threads a worker has (gunicorn gthread: ``--threads``), or a dozen
    #: idle pages take the worker. A stream asked for beyond it gets the plain
    #: JSON poll answer, and clients poll instead. 0: every client polls.
    sse_max_streams: int = 2
    #: An event stream whose id has no upload (yet, or any more) ends after this
    #: long: enough for a bar opened just before its upload to see it start,
    #: short enough that an id that never starts cannot hold a thread for
    #: ``sse_lifetime``. EventSource reconnects by itself.
    sse_start_wait: float = 5.0
    #: Longest field name or filename kept in a status, in characters: a bar
    #: shows names, and JSON spends up to six bytes on each control character,
    #: so a hostile 8,000-character name must not reach the store.
    max_name_length: int = 200
    #: Largest status written, in bytes of JSON. memcached refuses items over
    #: its item size (``-I``, 1 MiB by default), and each bar reads its status
    #: several times a second; 100 files with ordinary 200-character names
    #: take about 45 KB. Above it the oldest files' detail is dropped
    #: (``file_count`` keeps the total).
    max_status_bytes: int = 64 * 1024
    #: While its request is open a listener writes at least this often, even
    #: when no byte arrives (a stalled client): the write time it records
    #: (``updated_at``, wall clock) is the upload's proof of life.
    heartbeat: float = 5.0
    #: A status that is not final and was not written for this long is
    #: answered as ``error`` 502 ``upload_stopped``: the process receiving the
    #: upload died (SIGKILL, out of memory) or hangs. Compared across hosts on
    #: the wall clock: keep it well above ``heartbeat`` plus the clock skew.
    stale_after: float = 30.0

    def __post_init__(self) -> None:
        for name in ("interval", "refresh", "rate_window", "store_retry", "sse_poll",
                     "sse_heartbeat", "sse_lifetime", "sse_start_wait", "heartbeat", "stale_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"ProgressSettings.{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(self.min_percent, (int, float)) or not 0 <= self.min_percent <= 100:
            raise ValueError(f"ProgressSettings.min_percent must be between 0 and 100, not {self.min_percent!r}")
        # memcached reads an expiry over 30 days as a Unix timestamp.
        for name in ("ttl", "final_ttl"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 30 * 86400:
                raise ValueError(f"ProgressSettings.{name} must be an int from 1 to 2592000 seconds, not {value!r}")
        for name in ("max_files", "sse_retry_ms", "sse_max_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ProgressSettings.{name} must be a non-negative int, not {value!r}")
        if not isinstance(self.max_name_length, int) or not 8 <= self.max_name_length <= 4096:
            raise ValueError("ProgressSettings.max_name_length must be an int from 8 to 4096 characters, "
                             f"not {self.max_name_length!r}")
        if not isinstance(self.max_status_bytes, int) or not 1024 <= self.max_status_bytes <= _MEMCACHED_ITEM:
            raise ValueError(f"ProgressSettings.max_status_bytes must be an int from 1024 to {_MEMCACHED_ITEM} "
                             f"(memcached's default item size, less room for its key), "
                             f"not {self.max_status_bytes!r}")
        if self.stale_after < 2 * self.heartbeat:
            raise ValueError(f"ProgressSettings.stale_after ({self.stale_after!r} s) must be at least twice "
                             f"the heartbeat ({self.heartbeat!r} s), or a live upload could read as stopped")


DEFAULT_SETTINGS = ProgressSettings()

FINAL_STATES = frozenset({"done", "error"})


# -- stores -----------------------------------------------------------------------

class ProgressStore(Protocol):
    """Where progress lives between the upload and the status route.

    Values are JSON-compatible dicts. Any method may raise on failure (the
    listener swallows it; the status route answers 503); raising
    :class:`~uploadkit.errors.ProgressUnavailable` says the store already
    logged the outage.
    """

    def get(self, progress_id: str) -> Optional[ProgressValue]:
        """The value last set, or None when unknown or expired."""

    def set(self, progress_id: str, value: ProgressValue, ttl: int) -> None:
        """Store ``value`` for ``ttl`` seconds (replacing any previous one)."""

    def delete(self, progress_id: str) -> None:
        """Forget ``progress_id``; no error when it is unknown."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _cut(text: Optional[str], limit: int) -> Optional[str]:
    """``text`` shortened to ``limit`` characters, an ellipsis saying so."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 1] + "\u2026"


def _minimal(value: ProgressValue) -> ProgressValue:
    """The counts of a status, without names or messages: what always fits."""
    keep = ("state", "received", "size", "status", "rate", "eta", "started_at", "elapsed",
            "updated_at", "file_count")
    out: ProgressValue = {k: value[k] for k in keep if k in value}
    error = value.get("error")
    if isinstance(error, dict):
        out["error"] = {"code": error.get("code"), "field": None, "limit": None,
                        "message": "the upload failed (its message was too long to keep)"}
    return out


class MemoryStore:
    """Progress in this process: the default for a single-process server.

    Thread-safe. Entries expire after their TTL and the store holds at most
    ``max_entries`` of them, dropping the least recently written first, so ids
    of abandoned uploads cannot grow memory without end. Values are kept as
    JSON text, so a reader gets its own copy and sees exactly what a
    memcached reader would.

    Use :class:`MemcachedStore` when uploads and status requests may be
    served by different processes.
    """

    def __init__(self, max_entries: int = 10000, clock: Callable[[], float] = time.monotonic, *,
                 max_bytes: int = 64 << 20, max_value_bytes: int = _MEMCACHED_ITEM) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"MemoryStore.max_entries must be a positive int, not {max_entries!r}")
        if not isinstance(max_value_bytes, int) or max_value_bytes < 1:
            raise ValueError(f"MemoryStore.max_value_bytes must be a positive int, not {max_value_bytes!r}")
        if not isinstance(max_bytes, int) or max_bytes < max_value_bytes:
            raise ValueError(f"MemoryStore.max_bytes must be an int of at least max_value_bytes "
                             f"({max_value_bytes}), not {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # id -> (expiry on self._clock, JSON text); ordered oldest write first.
        self._entries: "OrderedDict[str, Tuple[float, str]]" = OrderedDict()
        self._bytes = 0  # JSON text held, all entries (ASCII: characters are bytes)

    def get(self, progress_id: str) -> Optional[ProgressValue]:
        with self._lock:
            entry = self._entries.get(progress_id)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[progress_id]
                self._bytes -= len(entry[1])
                return None
            text = entry[1]
        value = json.loads(text)
        return value if isinstance(value, dict) else None

    def set(self, progress_id: str, value: ProgressValue, ttl: int) -> None:
        """:raises ProgressRefused: the value's JSON is over ``max_value_bytes``
            (memcached would refuse it too); the entry is left as it was."""
        text = _dumps(value)
        if len(text) > self.max_value_bytes:
            raise ProgressRefused(f"progress value for {progress_id} is {len(text)} bytes of JSON; "
                                  f"the limit is {self.max_value_bytes}", limit=self.max_value_bytes)
        now = self._clock()
        entries = self._entries
        with self._lock:
            old = entries.pop(progress_id, None)
            if old is not None:
                self._bytes -= len(old[1])
            entries[progress_id] = (now + ttl, text)
            self._bytes += len(text)
            # The oldest write is at the front: drop it while it has expired or
            # the store is over a bound. Amortized O(1) per set.
            while entries:
                oldest = next(iter(entries.values()))
                if len(entries) > self.max_entries or self._bytes > self.max_bytes or oldest[0] <= now:
                    self._bytes -= len(entries.popitem(last=False)[1][1])
                else:
                    break

    def delete(self, progress_id: str) -> None:
        with self._lock:
            old = self._entries.pop(progress_id, None)
            if old is not None:
                self._bytes -= len(old[1])

    def __len__(self) -> int:
        """Entries held, including expired ones not swept yet."""
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of JSON held, including expired entries not swept yet."""
        with self._lock:
            return self._bytes

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries})"


ServerSpec = Union[str, Tuple[str, int]]


def _parse_server(spec: ServerSpec) -> Tuple[str, int]:
    """``"host:port"``, ``"[::1]:11211"``, a bare host or IPv6 address (port 11211), or a tuple."""
    if isinstance(spec, tuple):
        return str(spec[0]), int(spec[1])
    spec = spec.strip()
    if spec.startswith("["):  # [v6]:port or [v6]
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 11211
    if spec.count(":") > 1:  # a bare IPv6 address: its colons are not a port
        return spec, 11211
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, 11211
    return host, int(port)


class _Node:
    """One memcached server: its connection pool and its circuit breaker."""

    def __init__(self, name: str, client: Any, retry_after: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.client = client
        self.retry_after = retry_after
        self.clock = clock
        self.lock = threading.Lock()
        self.down = False
        self.retry_at = 0.0

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        probing = False
        if self.down:  # unlocked read: the healthy case takes no lock
            with self.lock:
                now = self.clock()
                if self.down and now < self.retry_at:
                    raise ProgressUnavailable(f"progress store memcached {self.name} is unavailable; "
                                              f"retrying in {self.retry_at - now:.1f} s")
                if self.down:
                    # Half open: this call probes, the others keep skipping.
                    self.retry_at = now + self.retry_after
                    probing = True
        from pymemcache.exceptions import (MemcacheClientError, MemcacheError, MemcacheServerError,
                                           MemcacheUnexpectedCloseError)
        try:
            result = self._run(fn)
        except MemcacheUnexpectedCloseError as exc:  # a server error by class, an outage in fact
            raise self._failed(what, exc) from exc
        except (MemcacheServerError, MemcacheClientError) as exc:
            # The server answered (SERVER_ERROR object too large for cache, out
            # of memory storing object), or the client would not send this
            # value: one value's problem. Counted as an outage, one hostile
            # upload would switch progress off for every upload of the worker.
            if probing:
                self._recovered()
            log.warning("uploadkit: progress store memcached %s refused a %s: %s: %s",
                        self.name, what, type(exc).__name__, exc)
            raise ProgressRefused(f"progress store memcached {self.name} refused a {what}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        except (MemcacheError, OSError) as exc:
            raise self._failed(what, exc) from exc
        if probing:
            self._recovered()
        return result

    def _failed(self, what: str, exc: BaseException) -> ProgressUnavailable:
        """Open the breaker (logged once per outage); the error to raise."""
        with self.lock:
            was_down = self.down
            self.down = True
            self.retry_at = self.clock() + self.retry_after
        if not was_down:
            log.warning("uploadkit: progress store memcached %s failed on %s (%s: %s); "
                        "progress is skipped, retrying every %.1f s",
                        self.name, what, type(exc).__name__, exc, self.retry_after)
        return ProgressUnavailable(
            f"progress store memcached {self.name} is unavailable: {type(exc).__name__}: {exc}")

    def _recovered(self) -> None:
        with self.lock:
            self.down = False
        log.warning("uploadkit: progress store memcached %s is reachable again", self.name)

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn`` on a pooled connection, passing over the ones the server
        closed. After memcached restarts, every idle connection in the pool
        fails once (pymemcache then drops it); counted as an outage, each
        would show a poll a 503 while the server is up."""
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        for _ in range(_STALE_TRIES):
            try:
                return fn(self.client)
            except (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                continue
        return fn(self.client)


#: Connections the server closed that one call passes over before it counts
#: the server as down: more than a worker's pool holds in practice.
_STALE_TRIES = 8


class MemcachedStore:
    """Progress in memcached, shared by every process and host of a site.

    Each server gets a :class:`~pymemcache.client.base.PooledClient` (the
    plain client is not thread-safe). With several servers a key lives on the
    one chosen by rendezvous hashing, and stays there when a server is down
    (its uploads show no progress meanwhile): moving keys would let a writer
    and a reader that disagree about who is down look in different places.
    Timeouts are short because progress is never worth waiting for.

    A circuit breaker guards each server: the first failure is logged once and
    opens it, then calls raise :class:`ProgressUnavailable` at once, without
    touching the network, until ``retry_after`` seconds passed; then one call
    probes the server and closes the breaker if it answers.

    :param servers: ``"host:port"``, ``(host, port)``, or a list of them.
    :param prefix: prepended to every key, so several sites can share a server.
    :param max_pool_size: connections per server; None grows with the number
        of concurrent requests (pymemcache raises beyond a fixed bound).
    :param pool_idle_timeout: idle connections are closed after this many seconds.
    :param max_value_bytes: larger values are refused here, without a call
        (memcached's default item size is 1 MiB).

    A value the server refuses (``SERVER_ERROR object too large for cache``)
    raises :class:`ProgressRefused` and leaves the breaker closed: it says
    nothing about the server, which answered.
    """

    def __init__(self, servers: Union[ServerSpec, Sequence[ServerSpec]] = "127.0.0.1:11211", *,
                 prefix: str = "uploadkit:", connect_timeout: float = 0.2, timeout: float = 0.2,
                 retry_after: float = 5.0, max_pool_size: Optional[int] = None,
                 pool_idle_timeout: float = 60.0, max_value_bytes: int = _MEMCACHED_ITEM,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from pymemcache.client.base import PooledClient
        from pymemcache.client.rendezvous import RendezvousHash

        specs = [servers] if isinstance(servers, (str, tuple)) else list(servers)
        if not specs:
            raise ValueError("MemcachedStore needs at least one server")
        self.servers = [_parse_server(s) for s in specs]
        if not re.fullmatch(r"[!-~]{0,150}", prefix):
            raise ValueError(f"MemcachedStore prefix {prefix!r} must be at most 150 printable ASCII "
                             "characters without spaces")
        if not retry_after > 0:
            raise ValueError(f"MemcachedStore.retry_after must be positive, not {retry_after!r}")
        if not isinstance(max_value_bytes, int) or max_value_bytes < 1:
            raise ValueError(f"MemcachedStore.max_value_bytes must be a positive int, not {max_value_bytes!r}")
        self.prefix = prefix
        self.retry_after = retry_after
        self.max_value_bytes = max_value_bytes
        self._nodes: Dict[str, _Node] = {}
        for host, port in self.servers:
            name = f"{host}:{port}"
            client = PooledClient(
                (host, port), connect_timeout=connect_timeout, timeout=timeout, no_delay=True,
                key_prefix=prefix.encode("ascii"), max_pool_size=max_pool_size,
                pool_idle_timeout=pool_idle_timeout, default_noreply=False)
            self._nodes[name] = _Node(name, client, retry_after, clock)
        self._only = next(iter(self._nodes.values())) if len(self._nodes) == 1 else None
        self._hash = RendezvousHash(list(self._nodes))

    def _node(self, key: str) -> _Node:
        return self._only or self._nodes[self._hash.get_node(key)]

    def get(self, progress_id: str) -> Optional[ProgressValue]:
        key = validate_progress_id(progress_id)
        raw = self._node(key).call("get", lambda c: c.get(key))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            log.warning("uploadkit: progress entry %r in memcached is not JSON; ignored", progress_id)
            return None
        return value if isinstance(value, dict) else None

    def set(self, progress_id: str, value: ProgressValue, ttl: int) -> None:
        """:raises ProgressRefused: the value is over ``max_value_bytes``, or the
            server refused it; the server's breaker stays closed.
        :raises ProgressUnavailable: the server is down or slow."""
        key = validate_progress_id(progress_id)
        data = _dumps(value).encode("utf-8")
        if len(data) > self.max_value_bytes:
            raise ProgressRefused(f"progress value for {progress_id} is {len(data)} bytes of JSON; "
                                  f"the limit is {self.max_value_bytes}", limit=self.max_value_bytes)
        self._node(key).call("set", lambda c: c.set(key, data, expire=int(ttl), noreply=False))

    def delete(self, progress_id: str) -> None:
        key = validate_progress_id(progress_id)
        self._node(key).call("delete", lambda c: c.delete(key, noreply=False))

    @property
    def available(self) -> bool:
        """False while any server's breaker is open (its last call failed)."""
        return not any(node.down for node in self._nodes.values())

    def close(self) -> None:
        """Close the pooled connections (later calls reconnect)."""
        for node in self._nodes.values():
            node.client.close()

    def __repr__(self) -> str:
        return f"MemcachedStore({','.join(self._nodes)!r}, prefix={self.prefix!r})"


# -- the listener --------------------------------------------------------------------

class _FileState:
    __slots__ = ("info", "done")

    def __init__(self, info: "FileInfo") -> None:
        self.info = info
        self.done = False


# Stores currently failing, by id(): one warning per outage however many
# uploads hit it. Only for stores that do not log themselves (those raise
# ProgressUnavailable).
_failing_stores: Dict[int, bool] = {}
_failing_lock = threading.Lock()


class _Flusher:
    """One daemon thread that writes progress a throttle held back.

    ``advance`` skips writes that come too soon after the last one; if the
    client then stalls, no later read would write those bytes, and a poller
    would see an old count for as long as the stall lasts. Listeners that
    skipped a write schedule a flush here for when their throttle allows it.
    It is a scheduler shared by every listener in the process, not
    configuration: nothing about an upload stays here once it is flushed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, "_Flushable"]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def schedule(self, when: float, listener: "_Flushable") -> None:
        with self._cond:
            # Wake the thread only for a new first entry: it already waits for
            # the first, and every write schedules a heartbeat seconds away.
            first = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._seq), listener))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="uploadkit-progress-flush",
                                                daemon=True)
                self._thread.start()
            if first:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, listener = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            try:
                listener._flush()
            except Exception:  # the thread serves every upload: it must not die
                log.exception("uploadkit: a delayed progress write failed")


_FLUSHER = _Flusher()


class _Flushable(Protocol):
    def _flush(self) -> None: ...


class _Held:
    __slots__ = ("store", "progress_id", "value", "ttl", "retry", "drop_at")

    def __init__(self, store: ProgressStore, progress_id: str, value: ProgressValue, ttl: int,
                 retry: float, drop_at: float) -> None:
        self.store = store
        self.progress_id = progress_id
        self.value = value
        self.ttl = ttl
        self.retry = retry
        self.drop_at = drop_at


class _PendingFinals:
    """Final states (done, error) a store failed to take, written once it
    answers again.

    Without them an upload that ended during an outage reads ``starting`` (or
    its last ``uploading``) for as long as its page polls: nothing else will
    ever write its end. Bounded (the oldest is dropped first) and each entry is
    kept only for the upload's ``ttl``; the flusher thread retries every
    ``store_retry`` seconds, and a store whose breaker is open refuses without
    a call, so the retries cost nothing while it is down.
    """

    def __init__(self, max_entries: int = 500) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._held: "OrderedDict[Tuple[int, str], _Held]" = OrderedDict()
        self._due: Optional[float] = None  # when the flusher next looks
        self.written = 0  # for tests and curiosity

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, store: ProgressStore, progress_id: str, value: ProgressValue, ttl: int,
             settings: ProgressSettings) -> None:
        now = time.monotonic()
        entry = _Held(store, progress_id, value, ttl, settings.store_retry, now + settings.ttl)
        with self._lock:
            key = (id(store), progress_id)
            self._held.pop(key, None)
            self._held[key] = entry
            while len(self._held) > self.max_entries:
                self._held.popitem(last=False)
            self._arm(now + entry.retry)

    def written_to(self, store: ProgressStore, progress_id: str) -> None:
        """A write of ``progress_id`` reached ``store``: a held state of that
        id is outdated, and the others for that store can go now."""
        key = id(store)
        with self._lock:
            self._held.pop((key, progress_id), None)
            if any(k[0] == key for k in self._held):
                self._arm(time.monotonic())

    def _arm(self, when: float) -> None:  # under self._lock
        if self._due is None or when < self._due:
            self._due = when
            _FLUSHER.schedule(when, self)

    def _flush(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._due is not None and now < self._due:
                return  # an earlier schedule superseded this one
            self._due = None
            entries = list(self._held.items())
        down: Set[int] = set()
        written = 0
        for key, entry in entries:
            if entry.drop_at <= now or key[0] in down:
                if entry.drop_at <= now:
                    with self._lock:
                        if self._held.get(key) is entry:
                            del self._held[key]
                continue
            try:
                entry.store.set(entry.progress_id, entry.value, entry.ttl)
            except ProgressRefused:
                pass  # that value will never fit: let it go
            except Exception as exc:
                # One failure per store and round: a store that is still down
                # is not asked again for each upload it holds.
                down.add(key[0])
                log.debug("uploadkit: final progress for %s still not written: %s", entry.progress_id, exc)
                continue
            else:
                written += 1
            with self._lock:
                if self._held.get(key) is entry:
                    del self._held[key]
        with self._lock:
            self.written += written
            if self._held:
                self._arm(now + min(e.retry for e in self._held.values()))
        if written:
            log.warning("uploadkit: progress store answers again; wrote the final state of %d "
                        "upload(s) that ended while it was failing", written)


_PENDING = _PendingFinals()


class StoreProgress(ProgressListener):
    """Writes one upload's progress to a :class:`ProgressStore`, throttled.

    ``advance`` runs once per read from the client, so between writes it costs
    a clock read and two comparisons. A write builds the whole status (state,
    received, size, smoothed rate, eta, start time, per-file detail) and
    replaces the entry. Store failures are swallowed (and logged once per
    outage): the upload goes on without progress, and after a failure
    intermediate writes pause for ``settings.store_retry`` seconds.
    """

    def __init__(self, store: ProgressStore, progress_id: str,
                 settings: ProgressSettings = DEFAULT_SETTINGS, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.progress_id = validate_progress_id(progress_id)
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self.state = "starting"
        self.received = 0
        self.total: Optional[int] = None
        self.started_at: Optional[float] = None
        self.writes = 0  # successful writes, for tests and curiosity
        self._t0 = clock()  # reset by start(); set here for a refusal before start
        self._files: Deque[_FileState] = deque(maxlen=settings.max_files)
        self._file_count = 0
        self._dirty = False
        self._final = False
        # Throttle: the next intermediate write needs now >= _next_time and
        # (received >= _next_bytes or now >= _refresh_at or _dirty).
        self._next_time = 0.0
        self._next_bytes = 0
        self._refresh_at = 0.0
        self._step = 1
        # Rate smoothing.
        self._rate: Optional[float] = None
        self._last_t = 0.0
        self._last_received = 0
        self._t_end: Optional[float] = None  # when the last byte arrived
        self._error: Optional[UploadError] = None
        # The upload thread and the flusher both write: one at a time.
        self._lock = threading.Lock()
        self._written = -1  # bytes received at the last write
        self._written_state = ""  # the state at the last write
        self._armed_at: Optional[float] = None  # the flusher's next look at this listener
        self._beat_at = math.inf  # the next heartbeat write, once started
        self._moved_at = self._t0  # the last write that carried news
        # The flusher keeps real time; a listener given its own clock (tests)
        # is never flushed behind its back.
        self._flushable = clock is time.monotonic

    # -- pipeline hooks -------------------------------------------------------

    def _start(self, ctx: "RequestContext") -> None:
        try:
            self._t0 = self._last_t = self._clock()
            self.started_at = self._wall_clock()
            self.total = ctx.content_length
            if self.total:
                self._step = max(1, int(self.total * self.settings.min_percent / 100))
            self.state = "uploading"
            self._write(self._t0)
        except Exception:
            log.exception("uploadkit: progress listener failed in start")

    # The pipeline's hooks take the lock; ``advance`` never waits for it.

    def start(self, ctx: "RequestContext") -> None:
        with self._lock:
            self._start(ctx)

    def file_start(self, info: "FileInfo") -> None:
        with self._lock:
            self._file_start(info)

    def file_end(self, info: "FileInfo") -> None:
        with self._lock:
            self._file_end(info)

    def processing(self) -> None:
        with self._lock:
            self._processing()

    def done(self, ctx: "RequestContext") -> None:
        with self._lock:
            self._done(ctx)

    def error(self, exc: "UploadError") -> None:
        with self._lock:
            self._error_state(exc)

    def advance(self, received: int, total: Optional[int]) -> None:
        self.received = received
        # Between two writes (the common case: 250 ms of reads) there is
        # nothing to do while the flusher already looks at the throttle's next
        # chance: answer that without the lock. Called once a read, this was
        # a third of what progress costs an upload.
        armed = self._armed_at
        if armed is not None and armed <= self._next_time and self._clock() < self._next_time:
            return
        # Never wait here: if the flusher is writing, this read's count rides
        # on the next write.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._final:
                return
            now = self._clock()
            if not self._may_write(now):
                # Cheap when the flusher already looks no later than the
                # throttle's next chance (the common case between writes).
                when = self._next_time if now < self._next_time else self._refresh_at
                armed = self._armed_at
                if armed is None or when < armed:
                    self._arm(when)
                return
            if total != self.total:
                self.total = total
                self._step = max(1, int(total * self.settings.min_percent / 100)) if total else 1
            self._write(now)
        except Exception:
            log.exception("uploadkit: progress listener failed in advance")
        finally:
            self._lock.release()

    def _may_write(self, now: float) -> bool:
        """The throttle: not within ``interval`` of the last write, and only once
        the upload moved ``min_percent``, or ``refresh`` passed, or files changed."""
        return now >= self._next_time and (
            self.received >= self._next_bytes or now >= self._refresh_at or self._dirty)

    def _next_chance(self, now: float) -> float:
        return self._next_time if now < self._next_time else self._refresh_at

    def _arm(self, when: float) -> None:
        """Have the flusher look at this listener at ``when`` (unless it will sooner)."""
        armed = self._armed_at
        if self._flushable and (armed is None or when < armed):
            self._armed_at = when
            _FLUSHER.schedule(when, self)

    def _flush(self) -> None:
        """Called by the flusher: write what ``advance`` held back, if still
        unwritten and the throttle allows it now, or a heartbeat when the
        upload has been quiet for ``settings.heartbeat``; else look again
        when one of them will be due."""
        with self._lock:
            try:
                now = self._clock()
                if self._armed_at is not None and now >= self._armed_at:
                    self._armed_at = None  # this is the look that was asked for
                if self._final:
                    return
                held = self.received != self._written or self._dirty
                if held and self._may_write(now):
                    self._write(now)
                    return
                # A heartbeat waits out a store failure like any write, and
                # stops once nothing moved for a whole ttl: a listener that
                # was never ended (a bug elsewhere) then lets its entry expire.
                beating = now - self._moved_at < self.settings.ttl
                if beating and now >= self._beat_at and now >= self._next_time:
                    self._write(now)
                    return
                if held:
                    self._arm(min(self._next_chance(now), max(self._beat_at, self._next_time)))
                elif beating:
                    self._arm(max(self._beat_at, self._next_time))
            except Exception:
                log.exception("uploadkit: progress listener failed in a delayed write")

    def _file_start(self, info: "FileInfo") -> None:
        try:
            state = _FileState(info)
            self._files.append(state)
            self._file_count += 1
            self._dirty = True
        except Exception:
            log.exception("uploadkit: progress listener failed in file_start")

    def _file_end(self, info: "FileInfo") -> None:
        try:
            for state in reversed(self._files):
                if state.info is info:
                    state.done = True
                    break
            self._dirty = True
            if self._final:
                return
            now = self._clock()
            if now >= self._next_time:
                self._write(now)
        except Exception:
            log.exception("uploadkit: progress listener failed in file_end")

    def _processing(self) -> None:
        """The last byte is in; commits and thumbnails run. An intermediate
        state like any other: written now when the throttle allows, else at
        its next chance by the flusher, and not at all when ``done`` (or an
        error) comes first, as it does for most uploads within the interval.
        That is one store round trip fewer for them; a poller sees the state
        at most ``interval`` late when the work takes longer."""
        try:
            if self._final:
                return
            self.state = "processing"
            self._t_end = now = self._clock()
            for state in self._files:  # skipped files get no file_end
                state.done = True
            self._dirty = True
            if now >= self._next_time:
                self._write(now)
            else:
                self._arm(self._next_time)
        except Exception:
            log.exception("uploadkit: progress listener failed in processing")

    def _done(self, ctx: "RequestContext") -> None:
        try:
            if self._final:
                return
            self.state = "done"
            self._final = True
            if self._t_end is None:
                self._t_end = self._clock()
            for state in self._files:
                state.done = True
            self._write(self._clock())
        except Exception:
            log.exception("uploadkit: progress listener failed in done")

    def _error_state(self, exc: "UploadError") -> None:
        try:
            if self._final:
                return
            self.state = "error"
            self._final = True
            self._error = exc
            self._write(self._clock())
        except Exception:
            log.exception("uploadkit: progress listener failed in error")

    # -- writing ----------------------------------------------------------------

    def status(self, now: Optional[float] = None) -> ProgressValue:
        """The status as it would be written now."""
        if now is None:
            now = self._clock()
        state = self.state
        received = self.received
        size = received if state == "done" or self.total is None else self.total
        rate = self._rate
        eta: Optional[float] = None
        if state in ("processing", "done"):
            # The average over the transfer: processing time is not transfer time.
            end = self._t_end if self._t_end is not None else now
            rate = received / (end - self._t0) if end > self._t0 else rate
            eta = 0.0
        elif state == "uploading" and rate is not None and rate > 0 and self.total is not None:
            eta = round(max(0, self.total - received) / rate, 1)
        cut = self.settings.max_name_length
        value: ProgressValue = {"state": state, "received": received, "size": size}
        if state == "error" and self._error is not None:
            value["status"] = self._error.status
            error = self._error.to_dict()["error"]
            # A refusal's message may quote a hostile name: bounded like names.
            for key, limit in (("message", 4 * cut), ("field", cut), ("limit", cut)):
                if isinstance(error.get(key), str):
                    error[key] = _cut(error[key], limit)
            value["error"] = error
        value["rate"] = None if rate is None else int(rate)
        value["eta"] = eta
        value["started_at"] = None if self.started_at is None else round(self.started_at, 3)
        value["elapsed"] = round(now - self._t0, 3)
        # The liveness mark: a poll that finds it too old reads "stopped".
        value["updated_at"] = round(self._wall_clock(), 3)
        value["files"] = [
            {"field": _cut(s.info.field_name, cut), "filename": _cut(s.info.filename, cut),
             "received": s.info.size, "done": s.done}
            for s in self._files
        ]
        if self._file_count > len(self._files):
            value["file_count"] = self._file_count
        return value

    def _bounded(self, value: ProgressValue) -> ProgressValue:
        """``value``, cut until its JSON fits ``settings.max_status_bytes``:
        first the per-file detail (the oldest files go first; ``file_count``
        keeps the total), then everything but the counts."""
        limit = self.settings.max_status_bytes
        # JSON spends at most 12 bytes on a character (a surrogate pair): a
        # status with few files fits without being serialized to find out.
        cut = self.settings.max_name_length
        if len(value["files"]) * (24 * cut + 128) + 72 * cut + 1024 <= limit:
            return value
        if len(_dumps(value)) <= limit:  # ASCII JSON: characters are bytes
            return value
        files: List[Any] = value["files"]
        value["file_count"] = value.get("file_count", self._file_count)
        while files:
            files = files[(len(files) + 1) // 2:]  # keep the newer half
            value["files"] = files
            if len(_dumps(value)) <= limit:
                return value
        return _minimal(value)

    def _update_rate(self, now: float) -> None:
        dt = now - self._last_t
        if dt <= 0:
            return
        moved = self.received - self._last_received
        if self._rate is None:
            self._rate = self.received / (now - self._t0) if now > self._t0 else moved / dt
        else:
            # Exponential smoothing with a time constant, so irregular write
            # intervals weigh the way they should.
            weight = 1.0 - math.exp(-dt / self.settings.rate_window)
            self._rate += weight * (moved / dt - self._rate)
        self._last_t = now
        self._last_received = self.received

    def _write(self, now: float) -> None:
        settings = self.settings
        self._update_rate(now)
        if self.received != self._written or self._dirty or self.state != self._written_state:
            self._moved_at = now
        self._written_state = self.state
        self._dirty = False
        self._next_time = now + settings.interval
        self._next_bytes = self.received + self._step
        self._refresh_at = now + settings.refresh
        final = self.state in FINAL_STATES
        ttl = settings.final_ttl if final else settings.ttl
        value = self._bounded(self.status(now))
        try:
            try:
                self.store.set(self.progress_id, value, ttl)
            except ProgressRefused:
                # This value, not the store: the counts alone still fit.
                value = _minimal(value)
                self.store.set(self.progress_id, value, ttl)
        except ProgressUnavailable as exc:  # the store logged the outage itself
            log.debug("uploadkit: progress for %s not written: %s", self.progress_id, exc)
            self._write_failed(now, final, value, ttl)
            return
        except Exception as exc:
            self._store_failed(exc)
            self._write_failed(now, final, value, ttl)
            return
        self.writes += 1
        self._written = self.received
        if not final:
            self._beat_at = now + settings.heartbeat
            self._arm(self._beat_at)
        if len(_PENDING):
            _PENDING.written_to(self.store, self.progress_id)
        if _failing_stores:
            self._store_recovered()

    def _write_failed(self, now: float, final: bool, value: ProgressValue, ttl: int) -> None:
        settings = self.settings
        self._next_time = now + settings.store_retry
        if final and self._flushable:
            # Nothing else would ever write this upload's end.
            _PENDING.hold(self.store, self.progress_id, value, ttl, settings)
        else:
            self._beat_at = now + settings.heartbeat
            self._arm(max(self._beat_at, self._next_time))

    def _store_failed(self, exc: Exception) -> None:
        key = id(self.store)
        with _failing_lock:
            first = key not in _failing_stores
            _failing_stores[key] = True
        if first:
            log.warning("uploadkit: progress store %r failed (%s: %s); uploads continue without "
                        "progress until it recovers", self.store, type(exc).__name__, exc)
        else:
            log.debug("uploadkit: progress store %r still failing: %s", self.store, exc)

    def _store_recovered(self) -> None:
        with _failing_lock:
            was = _failing_stores.pop(id(self.store), None)
        if was:
            log.warning("uploadkit: progress store %r works again", self.store)

    def __repr__(self) -> str:
        return f"StoreProgress({self.store!r}, {self.progress_id!r}, state={self.state!r})"


# -- the status route -----------------------------------------------------------------

class BadCallback(UploadError):
    """A JSONP ``callback`` that is not a plain (dotted) JavaScript identifier."""

    status = 400
    code = "bad_callback"


class MethodNotAllowed(UploadError):
    status = 405
    code = "method_not_allowed"


#: JSONP callbacks: identifiers, optionally dotted (``jQuery36_1.cb``). Nothing
#: else, so a callback cannot inject script (or a Flash "Rosetta" payload).
CALLBACK_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]{0,63}(?:\.[A-Za-z_$][A-Za-z0-9_$]{0,63}){0,3}")

SCRIPT_NAME = "uploadkit.js"

_NO_STORE = [("Cache-Control", "no-store"), ("Pragma", "no-cache"),
             ("X-Content-Type-Options", "nosniff")]
_REASONS = {200: "OK", 304: "Not Modified", 400: "Bad Request", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _status_line(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Error')}"


class ProgressApp:
    """The status route: a WSGI app answering ``GET <path>?X-Progress-ID=<id>``.

    * JSON by default: ``{"state": "starting"}`` for an unknown id (clients
      poll before their upload arrives), else the stored status.
    * JSONP with ``?callback=name``.
    * Server-Sent Events with ``Accept: text/event-stream``: one ``data:`` event
      per change until a final state, comment heartbeats, a bounded lifetime.
    * The browser script at any path ending in ``/uploadkit.js``.

    Errors are JSON ``{"error": {...}}``: 400 ``bad_progress_id`` /
    ``bad_callback``, 405 ``method_not_allowed``, 503 ``progress_unavailable``
    when the store cannot be read.

    An event stream holds a server thread for up to ``settings.sse_lifetime``
    seconds: serve the route from a threaded or async-capable server (gunicorn
    ``gthread``, waitress...); on a server with a few synchronous workers,
    clients should poll instead. At most ``settings.sse_max_streams`` streams
    are open at once on this route (in this process); a stream asked for
    beyond that gets the JSON poll answer (EventSource then reports an error,
    and ``uploadkit.js`` polls). A stream ends with its upload, and after
    ``settings.sse_start_wait`` seconds for an id with no upload.

    A status that is not final and was not written for ``settings.stale_after``
    seconds (its ``updated_at``) is answered as ``error`` with status 502 and
    code ``upload_stopped``: the process receiving that upload died.

    :param progress_key: ``environ -> id or None`` replacing the default lookup
        (:func:`progress_id_from_environ`); its result is validated the same way.
    """

    def __init__(self, store: ProgressStore, settings: ProgressSettings = DEFAULT_SETTINGS,
                 progress_key: Optional[Callable[[Environ], Optional[str]]] = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.progress_key = progress_key
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._script: Optional[Tuple[bytes, str]] = None
        self._streams_lock = threading.Lock()
        self._streams = 0

    @property
    def open_streams(self) -> int:
        """Event streams this route holds open now."""
        return self._streams

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = (environ.get("REQUEST_METHOD") or "GET").upper()
        path = environ.get("PATH_INFO") or ""
        head = method == "HEAD"
        try:
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"method {method!r} is not allowed here; use GET",
                                       limit="GET, HEAD")
            if path.endswith("/" + SCRIPT_NAME) or path == SCRIPT_NAME:
                return self._serve_script(environ, start_response, head)
            progress_id = self.request_id(environ)
            callback = self._callback(environ)
            value = self._read(progress_id)
            if ("text/event-stream" in (environ.get("HTTP_ACCEPT") or "") and callback is None
                    and (head or self._take_stream())):
                # Over the cap, the stream request falls through to the poll answer.
                try:
                    start_response("200 OK", [("Content-Type", "text/event-stream; charset=utf-8"),
                                              ("X-Accel-Buffering", "no"), *_NO_STORE])
                except BaseException:
                    if not head:
                        self._release_stream()
                    raise
                if head:
                    return []
                return _Stream(self._events(progress_id, value), self._release_stream)
        except UploadError as exc:
            extra = [("Allow", "GET, HEAD")] if isinstance(exc, MethodNotAllowed) else []
            return self._respond(start_response, exc.status, exc.to_json(), "application/json",
                                 head, extra)
        body = _dumps(value).encode("utf-8")
        if callback is not None:
            return self._respond(start_response, 200, b"/**/" + callback.encode("ascii") + b"(" + body + b");",
                                 "application/javascript; charset=utf-8", head)
        return self._respond(start_response, 200, body, "application/json", head)

    def request_id(self, environ: Environ) -> str:
        """The id a status request asks about.

        :raises BadProgressId: absent or malformed.
        """
        if self.progress_key is not None:
            progress_id = self.progress_key(environ)
        else:
            progress_id = progress_id_from_environ(environ)
        if progress_id is None:
            raise BadProgressId("the request names no upload: send ?X-Progress-ID=<id> or an "
                                "X-Progress-ID header", limit=64)
        return validate_progress_id(progress_id)

    def _callback(self, environ: Environ) -> Optional[str]:
        query: str = environ.get("QUERY_STRING") or ""
        if "callback" not in query:
            return None
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "callback":
                if CALLBACK_RE.fullmatch(value):
                    return value
                shown = repr(value) if len(value) <= 40 else repr(value[:37] + "...")
                raise BadCallback(f"JSONP callback {shown} is not a JavaScript identifier "
                                  "(letters, digits, '_', '$', dotted)")
        return None

    def _take_stream(self) -> bool:
        with self._streams_lock:
            if self._streams >= self.settings.sse_max_streams:
                return False
            self._streams += 1
            return True

    def _release_stream(self) -> None:
        with self._streams_lock:
            self._streams -= 1

    def _read(self, progress_id: str) -> ProgressValue:
        try:
            value = self.store.get(progress_id)
        except ProgressUnavailable:
            raise
        except Exception as exc:
            log.warning("uploadkit: reading progress %s failed: %s: %s",
                        progress_id, type(exc).__name__, exc)
            raise ProgressUnavailable(f"the progress store could not be read: {type(exc).__name__}") from exc
        if value is None:
            return {"state": "starting"}
        return self._alive(value)

    def _alive(self, value: ProgressValue) -> ProgressValue:
        """``value``, or ``error`` if it is an upload whose writer went silent."""
        if value.get("state") not in _LIVE_STATES:
            return value
        written = value.get("updated_at")
        if not isinstance(written, (int, float)) or isinstance(written, bool):
            return value  # written by an older version: no liveness mark
        silent = self._wall_clock() - written
        limit = self.settings.stale_after
        if silent <= limit:
            return value
        exc = UploadStopped(f"the upload stopped: the server receiving it has not reported for "
                            f"{silent:.0f} s (the limit is {limit:g} s)", limit=limit)
        stopped = dict(value, state="error", status=exc.status, error=exc.to_dict()["error"],
                       rate=None, eta=None)
        return stopped

    def _events(self, progress_id: str, first: ProgressValue) -> Iterator[bytes]:
        """The event stream: a generator, so the server's ``close()`` on a
        vanished client ends it."""
        settings = self.settings
        clock = self._clock
        start = clock()
        deadline = start + settings.sse_lifetime
        beat_at = start + settings.sse_heartbeat
        # No upload under this id yet (or any more): wait a little, not a lifetime.
        unknown_since: Optional[float] = start if first == _STARTING else None
        last = first
        yield f"retry: {settings.sse_retry_ms}\n".encode() + _event(first)
        if first.get("state") in FINAL_STATES:
            return
        while True:
            self._sleep(min(settings.sse_poll, max(0.0, deadline - clock())))
            now = clock()
            if now >= deadline:
                yield b": lifetime over, reconnect\n\n"
                return
            try:
                value = self._read(progress_id)
            except ProgressUnavailable as exc:
                yield b"event: unavailable\ndata: " + exc.to_json() + b"\n\n"
                return
            if value != _STARTING:
                unknown_since = None
            elif unknown_since is None:
                unknown_since = now
            elif now - unknown_since >= settings.sse_start_wait:
                yield b": no upload with this id, reconnect\n\n"
                return
            if value != last:
                last = value
                beat_at = now + settings.sse_heartbeat
                yield _event(value)
                if value.get("state") in FINAL_STATES:
                    return
            elif now >= beat_at:
                beat_at = now + settings.sse_heartbeat
                yield b": keepalive\n\n"

    def _serve_script(self, environ: Environ, start_response: StartResponse,
                      head: bool) -> Iterable[bytes]:
        if self._script is None:
            data = resources.files("uploadkit").joinpath("static", SCRIPT_NAME).read_bytes()
            self._script = (data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
        data, etag = self._script
        headers = [("Content-Type", "application/javascript; charset=utf-8"),
                   ("Cache-Control", "public, max-age=3600"), ("ETag", etag),
                   ("X-Content-Type-Options", "nosniff")]
        match = environ.get("HTTP_IF_NONE_MATCH") or ""
        if etag in match or match.strip() == "*":
            start_response("304 Not Modified", headers)
            return []
        headers.append(("Content-Length", str(len(data))))
        start_response("200 OK", headers)
        return [] if head else [data]

    @staticmethod
    def _respond(start_response: StartResponse, status: int, body: bytes, content_type: str,
                 head: bool, extra: Sequence[Tuple[str, str]] = ()) -> List[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   *_NO_STORE, *extra]
        start_response(_status_line(status), headers)
        return [] if head else [body]


_STARTING: ProgressValue = {"state": "starting"}
_LIVE_STATES = frozenset({"starting", "uploading", "processing"})


class _Stream:
    """An event stream that gives its slot back exactly once: when it ends, or
    when the server closes it, even before the first iteration (a generator's
    ``finally`` does not run then)."""

    def __init__(self, events: Iterator[bytes], release: Callable[[], None]) -> None:
        self._events = events
        self._release: Optional[Callable[[], None]] = release

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._events)
        except BaseException:  # StopIteration included: the stream is over
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
        finally:
            if release is not None:
                release()


def _event(value: ProgressValue) -> bytes:
    # json.dumps never emits a raw newline, so one data: line holds the event.
    return b"data: " + _dumps(value).encode("utf-8") + b"\n\n"


__all__ = [
    "ProgressListener", "NULL_PROGRESS", "PROGRESS_ID_RE", "PROGRESS_ID_PARAM", "PROGRESS_ID_HEADER",
    "validate_progress_id", "progress_id_from_environ", "ProgressSettings", "DEFAULT_SETTINGS",
    "ProgressStore", "MemoryStore", "MemcachedStore", "StoreProgress", "ProgressApp",
    "BadCallback", "MethodNotAllowed", "CALLBACK_RE", "ProgressRefused", "UploadStopped",
]
