"""Deadlines for the calls storage makes to an asynchronous fsspec filesystem.

Why: on S3 a network blackhole (packets dropped, no reset) holds a request
thread until TCP gives up, about 15 minutes. aiohttp, under s3fs, has no
write timeout; waiting for a free pooled connection is unbounded too; and
botocore's ``connect_timeout``/``read_timeout`` cover neither. fsspec's
``sync(loop, coro, timeout=...)`` takes a timeout, but the filesystem's own
blocking methods, and the file objects it opens, never pass one.

Every blocking call of an asynchronous fsspec filesystem (s3fs, gcsfs, ...)
is a coroutine run on fsspec's IO loop by a thin wrapper: ``fs.info`` runs
``fs._info``, ``fs.call_s3`` runs ``fs._call_s3``. :class:`BoundedFileSystem`
is a view of such a filesystem whose wrappers run that coroutine with a
deadline instead, and whose other methods run with the view as ``self``, so
the calls they make (``open`` building an ``S3File`` whose parts, completion
and abort go through ``file.fs``; ``mv`` calling ``copy``) go through the
view as well. The deadline covers everything the coroutine does: connecting,
waiting for a pooled connection, sending the body, reading the answer, and
the backend's own retries.

On a deadline the coroutine is *cancelled* on the loop, and the caller waits
(briefly) for the cancellation to land: aiohttp then closes the connection
instead of leaving it in the pool half-used, and nothing keeps running on the
loop thread for a caller who has gone. Then :class:`DeadlineExceeded`, a
:class:`TimeoutError` and so an :class:`OSError` like any backend failure, is
raised.

Synchronous filesystems are left as they are: a blocking call cannot be
interrupted without leaving a thread behind. Local disk needs no deadline; a
synchronous network backend (SFTP, FTP, SMB, ...) is bounded by its own
timeout options.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Coroutine, Optional, Tuple

from fsspec.spec import AbstractFileSystem

log = logging.getLogger("uploadkit")

__all__ = ["DeadlineExceeded", "BoundedFileSystem", "bounded", "unbounded", "run_within", "unreachable"]

#: How long a cancelled call may take to unwind (aiohttp closing its
#: connection) before the caller is let go anyway.
CANCEL_GRACE = 1.0
_MISSING = object()


class DeadlineExceeded(TimeoutError):
    """A storage call got no answer within its deadline.

    An :class:`OSError` (``ETIMEDOUT``), so every place that treats backend
    failures as such (storage refuses the upload with a 503) treats this one too.
    """

    def __init__(self, call: str, seconds: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"no answer within {seconds:g} s", call)
        self.call = call
        self.seconds = seconds


class _Expired(Exception):
    """The coroutine's own deadline passed (as opposed to a TimeoutError it raised)."""


async def _within(make: Callable[[], Coroutine[Any, Any, Any]], seconds: float, call: str) -> Any:
    # The coroutine is made here, on the loop: made in the caller's thread, it
    # would be left un-awaited (a RuntimeWarning) if the loop refused it.
    task: "asyncio.Task[Any]" = asyncio.get_running_loop().create_task(make(), name=f"uploadkit: {call}")
    try:
        await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:  # the caller gave up on the loop itself
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    # Wait for the cancellation to land: aiohttp closes the cancelled
    # request's connection while it unwinds, so it never goes back to the pool.
    await asyncio.wait({task}, timeout=CANCEL_GRACE)
    if not task.done():
        log.warning("uploadkit: %s did not stop within %g s of being cancelled", call, CANCEL_GRACE)
    elif not task.cancelled():
        task.exception()  # it ended otherwise while unwinding: retrieved, so asyncio does not log it
    raise _Expired()


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def run_within(loop: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, Any]], seconds: float,
               call: str = "storage call") -> Any:
    """Run the coroutine ``make()`` on ``loop`` (another thread's) and return its
    result, or cancel it after ``seconds``.

    :raises DeadlineExceeded: when it did not finish in time; it was cancelled.
    """
    if loop is None or loop.is_closed():
        raise RuntimeError("the filesystem's event loop is not running")
    if _on_loop_thread(loop):
        raise NotImplementedError("a blocking storage call from within its own event loop")
    future = asyncio.run_coroutine_threadsafe(_within(make, seconds, call), loop)
    try:
        # The loop enforces the deadline; this wait only lets the caller go
        # when the loop thread itself is stuck and cannot even cancel.
        return future.result(seconds + CANCEL_GRACE + 1.0)
    except _Expired:
        raise DeadlineExceeded(call, seconds) from None
    except FutureTimeout:
        if future.done():  # a TimeoutError of the call's own
            raise
        future.cancel()
        log.warning("uploadkit: the event loop running %s did not answer within %g s", call, seconds)
        raise DeadlineExceeded(call, seconds) from None


def _sync_wrapper_of(value: Any) -> Optional[Callable[..., Any]]:
    """The coroutine function behind one of fsspec's blocking wrappers, or None."""
    wrapped = getattr(value, "__wrapped__", None)
    return wrapped if wrapped is not None and inspect.iscoroutinefunction(wrapped) else None


def _class_attribute(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return _MISSING


class BoundedFileSystem:
    """An asynchronous fsspec filesystem whose every blocking call has a deadline.

    Attribute reads and writes reach the filesystem itself (its caches, its
    session, its settings are shared); ``isinstance`` sees its class. Blocking
    wrappers of coroutines run through :func:`run_within`; the other methods run
    with this view as ``self``, so whatever they call on ``self`` is bounded too.

    Whether storage is reachable is remembered: :func:`unreachable` is true from
    a missed deadline until the next call that answers. Abort paths use it to
    leave their deletes to a background retry instead of waiting once more.
    """

    __slots__ = ("_uk_fs", "_uk_timeout", "_uk_missed")

    def __init__(self, fs: AbstractFileSystem, timeout: float) -> None:
        object.__setattr__(self, "_uk_fs", fs)
        object.__setattr__(self, "_uk_timeout", float(timeout))
        object.__setattr__(self, "_uk_missed", None)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # isinstance(view, S3FileSystem) holds, for fsspec's checks and callers'.
        return type(self._uk_fs)

    def __getattr__(self, name: str) -> Any:
        fs = self._uk_fs
        cls = type(fs)
        raw = _class_attribute(cls, name)
        if isinstance(raw, property):  # evaluated with the view as self
            return raw.__get__(self, cls)
        own = vars(fs)
        if name in own:  # instance attributes, and the wrappers fsspec makes per instance
            value = own[name]
            coroutine = _sync_wrapper_of(value)
            return self._bounded(name, coroutine) if coroutine is not None else value
        if raw is _MISSING:
            return getattr(fs, name)
        coroutine = _sync_wrapper_of(raw)
        if coroutine is not None:  # a wrapper made in the class body (s3fs's call_s3)
            return self._bounded(name, coroutine.__get__(fs, cls))
        if inspect.isfunction(raw):  # a method: bound to the view
            return raw.__get__(self, cls)
        return getattr(fs, name)  # class attributes, classmethods, other descriptors

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._uk_fs, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._uk_fs, name)

    def __repr__(self) -> str:
        return f"<{self._uk_fs!r} with a {self._uk_timeout:g} s deadline per call>"

    def __reduce__(self) -> Tuple[Any, ...]:
        return (BoundedFileSystem, (self._uk_fs, self._uk_timeout))

    def _bounded(self, name: str, coroutine: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        fs, seconds = self._uk_fs, self._uk_timeout
        call = f"{type(fs).__name__}.{name}"

        @functools.wraps(coroutine)
        def bounded_call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = run_within(fs.loop, lambda: coroutine(*args, **kwargs), seconds, call)
            except DeadlineExceeded:
                object.__setattr__(self, "_uk_missed", time.monotonic())
                raise
            except BaseException:
                # Answered, with an error: storage is reachable.
                object.__setattr__(self, "_uk_missed", None)
                raise
            object.__setattr__(self, "_uk_missed", None)
            return result
        return bounded_call


def bounded(fs: AbstractFileSystem, timeout: Optional[float]) -> AbstractFileSystem:
    """``fs`` with a deadline of ``timeout`` seconds on every blocking call, when
    it is asynchronous (and ``timeout`` is not None); otherwise ``fs`` itself."""
    fs = unbounded(fs)
    if timeout is None or not getattr(fs, "async_impl", False) or getattr(fs, "asynchronous", False):
        return fs
    view: Any = BoundedFileSystem(fs, timeout)  # stands in for the filesystem: see the class
    return view


def unbounded(fs: AbstractFileSystem) -> AbstractFileSystem:
    """The filesystem behind a :class:`BoundedFileSystem` view (or ``fs`` itself)."""
    if type(fs) is BoundedFileSystem:
        inner: AbstractFileSystem = object.__getattribute__(fs, "_uk_fs")
        return inner
    return fs


def unreachable(fs: Any) -> bool:
    """True when ``fs`` is a view whose last call missed its deadline (and none
    answered since): storage is unreachable at the moment."""
    return type(fs) is BoundedFileSystem and object.__getattribute__(fs, "_uk_missed") is not None

