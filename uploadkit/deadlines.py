"""Deadlines on the client's body: a client that stalls or trickles cannot hold
a worker (``Limits.idle_timeout``, ``Limits.min_rate``).

A blocking ``wsgi.input.read(n)`` returns once ``n`` bytes arrived, however
long that takes: only the connection's socket can bound it. Some servers hand
the app that socket (gunicorn's ``gunicorn.socket``, Werkzeug's
``werkzeug.socket``); :func:`client_socket` finds it, and the reader then wraps
each read in a :class:`ReadClock`, which

* sets the socket's timeout to ``idle_timeout`` for the read (and puts the
  server's own back afterwards, before anything is written to the client):
  a client silent that long makes ``recv`` time out;
* gives the read a deadline of ``idle_timeout`` plus its size at ``min_rate``
  and has a watchdog thread cut the socket's timeout to nothing when it passes:
  the server's reader may loop over many ``recv`` calls inside one read, each
  of which a byte every few seconds would keep alive, so the silence bound
  alone does not stop a trickle.

Either way the read raises and the reader refuses the upload as
:class:`~uploadkit.errors.ClientTimeout` (408). Servers that give no socket
(wsgiref, waitress, uWSGI, mod_wsgi) are bounded by their own settings; see the
README's Deployment section.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol

from .errors import ClientTimeout, format_size

#: Environ keys under which servers hand over the client's socket.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
#: The timeout a read's socket gets once its deadline has passed: the next
#: ``recv`` that has to wait at all fails (0 would make it non-blocking instead).
_EXPIRED_TIMEOUT = 1e-6


class TimeoutSocket(Protocol):
    def gettimeout(self) -> Optional[float]: ...
    def settimeout(self, value: Optional[float], /) -> None: ...


def client_socket(environ: Optional[Dict[str, Any]]) -> Optional[TimeoutSocket]:
    """The client's socket, when the server put it in the environ; else None.

    Only for HTTP/1: an HTTP/2 connection's socket carries other requests'
    streams too, and a timeout on it would cut them all.
    """
    if not environ or not str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")).startswith("HTTP/1"):
        return None
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None and callable(getattr(sock, "settimeout", None)) \
                and callable(getattr(sock, "gettimeout", None)):
            return sock  # type: ignore[no-any-return]
    return None


class ReadClock:
    """Times the reads of one body on the client's socket.

    :param idle_timeout: seconds one read may wait for the next bytes (None: no bound).
    :param min_rate: bytes a second: a read of ``n`` bytes must be done within
        ``idle_timeout + n / min_rate`` seconds (None: no bound).
    """

    def __init__(self, sock: TimeoutSocket, idle_timeout: Optional[float],
                 min_rate: Optional[float]) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self._lock = threading.Lock()
        self._read = 0  # which read is under way: a late watchdog call for an earlier one is void
        self._armed = False
        self._expired = False

    def read(self, read: Callable[[int], bytes], want: int, received: int) -> bytes:
        """``read(want)`` under the clock.

        :raises ClientTimeout: the client was silent for ``idle_timeout``, or
            the read outlived its deadline.
        :raises OSError: any other failure of the read, unchanged.
        """
        idle = self.idle_timeout
        budget = None if self.min_rate is None else (idle or 0.0) + want / self.min_rate
        started = time.monotonic()
        with self._lock:
            self._read += 1
            current = self._read
            saved = self.sock.gettimeout()
            if idle is not None:
                self.sock.settimeout(idle if budget is None else min(idle, budget))
            self._armed = True
            self._expired = False
        timer = (WATCHDOG.schedule(started + budget, lambda: self._expire(current))
                 if budget is not None else None)
        try:
            chunk = read(want)
        except TimeoutError:
            if idle is None and not self._expired:
                raise  # the server's own timeout, not ours
            raise self._refusal(received, time.monotonic() - started) from None
        finally:
            if timer is not None:
                WATCHDOG.cancel(timer)
            with self._lock:
                self._armed = False
                self.sock.settimeout(saved)  # the server writes its answer with its own timeout
        if self._expired:  # the deadline passed, then the rest of the read came quickly
            raise self._refusal(received, time.monotonic() - started)
        return chunk

    def _expire(self, which: int) -> None:
        """Watchdog thread: the read ``which`` is past its deadline."""
        with self._lock:
            if self._armed and self._read == which:
                self._expired = True
                self.sock.settimeout(_EXPIRED_TIMEOUT)

    def _refusal(self, received: int, took: float) -> ClientTimeout:
        if self._expired and self.min_rate is not None:
            return ClientTimeout(
                f"the body arrived slower than {format_size(self.min_rate)}/s after {received} bytes "
                f"(one read waited {took:.1f} s)", limit=self.min_rate)
        return ClientTimeout(
            f"the client sent nothing for {self.idle_timeout} s after {received} bytes of the body",
            limit=self.idle_timeout)


class _Watchdog:
    """One thread per process running callbacks at their deadline.

    Started on first use and again in a forked child (threads do not survive
    ``fork``: gunicorn forks its workers after importing the app with
    ``--preload``).
    """

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._reset()

    def _reset(self) -> None:
        # Also run in a forked child: the parent's lock may have been held by
        # its watchdog thread at the fork, and that thread is not in the child.
        self._cond = threading.Condition()
        self._heap: List[List[Any]] = []  # [when, seq, callback or None once cancelled]
        self._cancelled = 0  # entries in the heap that were cancelled
        self._pid: Optional[int] = None

    def schedule(self, when: float, callback: Callable[[], None]) -> List[Any]:
        entry: List[Any] = [when, next(self._seq), callback]
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._heap = []
                self._cancelled = 0
                threading.Thread(target=self._run, name="uploadkit-read-deadlines", daemon=True).start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: List[Any]) -> None:
        # Marked, and skipped when it comes up; once most of the heap is
        # cancelled entries it is rebuilt, so a fast upload's many short reads
        # (each with a deadline minutes away) do not pile up in memory.
        with self._cond:
            if entry[2] is None:
                return
            entry[2] = None
            self._cancelled += 1
            if self._cancelled > 64 and 2 * self._cancelled > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            with self._cond:
                if self._pid != pid:  # a forked child started its own
                    return
                heap = self._heap
                while heap and heap[0][2] is None:
                    heapq.heappop(heap)
                    self._cancelled -= 1
                if not heap:
                    self._cond.wait()
                    continue
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                entry = heapq.heappop(heap)
                callback, entry[2] = entry[2], None  # run once; a later cancel() is a no-op
            try:
                callback()
            except Exception:  # pragma: no cover - a socket closed under us: nothing to cut
                pass


WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCHDOG._reset)
