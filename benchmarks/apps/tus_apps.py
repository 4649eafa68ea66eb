"""uploadkit's tus server and its multipart path in one gunicorn app, for
``benchmarks/bench_tus.py``.

Served as ``benchmarks.apps.tus_apps:app``. Every endpoint stores into a
local-disk :class:`~uploadkit.storage.Storage` under
``$UPLOADKIT_BENCH_TMPDIR``, one per configuration:

``/sha/``     the default chain (sniffing + sha256): tus at ``/sha/tus/``,
              multipart ``POST`` at ``/sha/upload``;
``/bare/``    the same with sha256 off (sniffing only);
``/replay/``  tus with sha256, the worker's handler-state cache off, so the
              completing PATCH always replays the stored bytes.

A ``GET`` answers ``{"ready": true}``. Each finished file (tus or
multipart) appends ``<endpoint> <size> <sha256 or ->`` to
``$UPLOADKIT_BENCH_TMPDIR/handed.log``, which the benchmark checks.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Dict, Iterable

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

from uploadkit.middleware import UploadMiddleware
from uploadkit.storage import Storage
from uploadkit.tusapp import TusSettings

from . import bench_tmpdir

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = bench_tmpdir()
HANDED = os.path.join(ROOT, "handed.log")


def _json(start_response: StartResponse, payload: Dict[str, Any]) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _inner(name: str) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        files = environ.get("uploadkit.files")
        if not files:
            return _json(start_response, {"ready": True})
        f = files["file"]
        with open(HANDED, "a") as log:
            log.write(f"{name} {f.size} {f.sha256 or '-'}\n")
        return _json(start_response, {"size": f.size, "sha256": f.sha256})
    return app


def _mw(name: str, sha256: bool = True, **tus: Any) -> UploadMiddleware:
    os.makedirs(os.path.join(ROOT, "tmp"), exist_ok=True)
    return UploadMiddleware(_inner(name), storage=Storage(os.path.join(ROOT, "store", name)), progress=False,
                            tempdir=os.path.join(ROOT, "tmp"), hash_sha256=sha256, paths=[f"/{name}/upload"],
                            tus=TusSettings(path=f"/{name}/tus/", **tus))


APPS = {"sha": _mw("sha"), "bare": _mw("bare", sha256=False), "replay": _mw("replay", state_cache=0)}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    name = environ.get("PATH_INFO", "").split("/")[1:2]
    target = APPS.get(name[0] if name else "")
    if target is None:
        return _json(start_response, {"ready": True})
    return target(environ, start_response)
