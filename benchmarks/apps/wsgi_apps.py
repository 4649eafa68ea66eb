"""Plain WSGI apps: the read-only baselines, uploadkit's middleware and multipart.

Served as ``benchmarks.apps.wsgi_apps:<name>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List

from . import bench_tmpdir

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]


def _json(start_response: StartResponse, payload: Dict[str, Any], status: str = "200 OK") -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _reader(size: int) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """An app that reads the body in ``size`` reads and drops it: the server's own ceiling."""
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "POST":
            return _json(start_response, {"ready": True})
        left = int(environ.get("CONTENT_LENGTH") or 0)
        read = environ["wsgi.input"].read
        total = 0
        while left > 0:
            chunk = read(min(size, left))
            if not chunk:
                break
            total += len(chunk)
            left -= len(chunk)
        return _json(start_response, {"size": total})
    return app


read_1m = _reader(1 << 20)
read_64k = _reader(64 << 10)


class _RemovedOnClose(List[bytes]):
    """A response body whose ``close()`` removes a file: the server calls it
    once the response is sent, which is when uploadkit removes its temp files."""

    def __init__(self, body: Iterable[bytes], path: str) -> None:
        super().__init__(body)
        self.path = path

    def close(self) -> None:
        os.unlink(self.path)


def read_sha256_write(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """uploadkit's work on a one-file body, done by hand in one thread: the
    body read in 1 MiB reads, hashed, written to a temp file in 64 KiB writes
    (uploadkit's write size), the file removed once the response is sent (as
    uploadkit's are). No parse and no sniffing: a ceiling for an app that
    keeps and hashes what it receives."""
    if environ["REQUEST_METHOD"] != "POST":
        return _json(start_response, {"ready": True})
    left = int(environ.get("CONTENT_LENGTH") or 0)
    read = environ["wsgi.input"].read
    digest = hashlib.sha256()
    total = 0
    fd, path = tempfile.mkstemp(dir=bench_tmpdir(), prefix="bench-by-hand-")
    try:
        while left > 0:
            chunk = read(min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            view = memoryview(chunk)
            for start in range(0, len(chunk), 64 << 10):
                os.write(fd, view[start:start + (64 << 10)])
            total += len(chunk)
            left -= len(chunk)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return _RemovedOnClose(_json(start_response, {"size": total, "sha256": digest.hexdigest()}), path)


def _uploadkit_inner(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        return _json(start_response, {"ready": True})
    files = environ["uploadkit.files"]
    return _json(start_response, {"size": files["file"].size, "sha256": files["file"].sha256})


def _make_uploadkit() -> Any:
    from uploadkit.middleware import UploadMiddleware

    # The default chain (sniffing, sha256, memory + temp file), no progress store.
    return UploadMiddleware(_uploadkit_inner, progress=False, tempdir=bench_tmpdir())


uploadkit_app = _make_uploadkit()


def multipart_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """``multipart.parse_form_data`` with its defaults (big files spool to temp files)."""
    import multipart

    if environ["REQUEST_METHOD"] != "POST":
        return _json(start_response, {"ready": True})
    _forms, files = multipart.parse_form_data(environ)
    part = files["file"]
    try:
        return _json(start_response, {"size": part.size})
    finally:
        for p in files.values():
            p.close()
