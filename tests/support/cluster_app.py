"""The app gunicorn serves in the cluster and fault tests: the setup operators
run, several workers sharing progress through memcached and storing into S3.

``POST /upload`` streams files into ``Storage($UPLOADKIT_CLUSTER_STORAGE)``;
``POST /upload-local`` streams them into temp files in
``$UPLOADKIT_CLUSTER_TEMPDIR`` (the sink used without storage); both publish
progress to ``MemcachedStore($UPLOADKIT_CLUSTER_MEMCACHED)``, read back at
``GET /upload/progress?X-Progress-ID=<id>``. ``GET /pid`` names the worker.

Every answer carries ``X-Worker-PID``. A POST with an ``X-Progress-ID`` writes
``$UPLOADKIT_CLUSTER_STATEDIR/serving-<id>`` (the worker's PID) before its body
is read, so a test can find, and kill, the worker serving a given upload.

Other settings: ``UPLOADKIT_CLUSTER_STORAGE_OPTIONS`` (JSON fsspec options),
``UPLOADKIT_CLUSTER_RETRY_AFTER`` (memcached circuit breaker, seconds),
``UPLOADKIT_CLUSTER_BLOCK_SIZE`` (S3 part size, bytes),
``UPLOADKIT_CLUSTER_PROGRESS_SETTINGS`` (JSON keyword arguments of
``ProgressSettings``, over the cluster's ``interval=0.1``),
``UPLOADKIT_CLUSTER_STORAGE_TIMEOUT`` (``Storage(timeout=...)``, seconds),
``UPLOADKIT_CLUSTER_IDLE_TIMEOUT`` (``Limits.idle_timeout``, seconds; the
default ``Limits()`` otherwise).

``POST /collide/<policy>`` (``rename``, ``error``, ``dedup``) stores into the
same storage with that collision policy, under ``<policy>/{filename}``
(``dedup/{sha256}{ext}`` for ``dedup``): every upload of one filename aims
at one key.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Dict, Iterable, List

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.progress import MemcachedStore, ProgressSettings
from uploadkit.progress import validate_progress_id
from uploadkit.storage import Storage
from tests.support.served import json_answer as _json

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]

TEMPDIR = os.environ.get("UPLOADKIT_CLUSTER_TEMPDIR") or None
STATEDIR = os.environ.get("UPLOADKIT_CLUSTER_STATEDIR") or None
PROGRESS_PATH = "/upload/progress"


def describe(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """What the app was handed: each file's key, size and sha256 (as computed while streaming)."""
    files = environ.get("uploadkit.files")
    if files is None:
        return _json(start_response, {"error": {"code": "not_intercepted", "message": "no upload",
                                                "field": None, "limit": None}}, "400 Bad Request")
    return _json(start_response, {
        "pid": os.getpid(),
        "form": list(environ["uploadkit.form"].items()),
        "files": [{"field": name, "filename": f.filename, "key": f.key, "size": f.size,
                   "sha256": f.sha256, "path": f.path} for name, f in files.items()],
    })


def _store() -> MemcachedStore:
    return MemcachedStore(os.environ.get("UPLOADKIT_CLUSTER_MEMCACHED", "127.0.0.1:11211"),
                          retry_after=float(os.environ.get("UPLOADKIT_CLUSTER_RETRY_AFTER", "1.0")))


def _storage(**kw: Any) -> Storage:
    options = json.loads(os.environ.get("UPLOADKIT_CLUSTER_STORAGE_OPTIONS") or "{}")
    return Storage(os.environ["UPLOADKIT_CLUSTER_STORAGE"], storage_options=options,
                   block_size=int(os.environ.get("UPLOADKIT_CLUSTER_BLOCK_SIZE", str(5 << 20))),
                   timeout=float(os.environ.get("UPLOADKIT_CLUSTER_STORAGE_TIMEOUT", "30")), **kw)


STORE = _store()
# Intermediate writes at most 10 a second: pollers see movement, memcached
# sees a few hundred writes a second across the cluster.
SETTINGS = ProgressSettings(**{"interval": 0.1,
                                **json.loads(os.environ.get("UPLOADKIT_CLUSTER_PROGRESS_SETTINGS") or "{}")})
_IDLE = os.environ.get("UPLOADKIT_CLUSTER_IDLE_TIMEOUT")
LIMITS = Limits(idle_timeout=float(_IDLE)) if _IDLE else Limits()
stored = UploadMiddleware(describe, storage=_storage(), progress=STORE, progress_settings=SETTINGS,
                          progress_path=PROGRESS_PATH, tempdir=TEMPDIR, limits=LIMITS)
colliding = {
    policy: UploadMiddleware(describe, storage=_storage(collision=policy, upload_to=template), progress=STORE,
                             progress_settings=SETTINGS, progress_path=None, tempdir=TEMPDIR, limits=LIMITS)
    for policy, template in [("rename", "rename/{filename}"), ("error", "error/{filename}"),
                             ("dedup", "dedup/{sha256}{ext}")]
}
local = UploadMiddleware(describe, progress=STORE, progress_settings=SETTINGS, progress_path=None,
                         tempdir=TEMPDIR, memory_threshold=0, limits=LIMITS)


def _mark_serving(environ: Environ) -> None:
    """Record which worker serves the upload with this progress id."""
    query = environ.get("QUERY_STRING", "")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower() == "x-progress-id":
            try:
                pid = validate_progress_id(value)
            except Exception:
                return
            path = os.path.join(STATEDIR, f"serving-{pid}")  # type: ignore[arg-type]
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            return


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    worker = str(os.getpid())

    def start(status: str, headers: List[Any], exc_info: Any = None) -> Any:
        return start_response(status, list(headers) + [("X-Worker-PID", worker)], exc_info)

    path = environ.get("PATH_INFO", "")
    if path == "/pid":
        return _json(start, {"pid": os.getpid()})
    if STATEDIR and environ.get("REQUEST_METHOD") == "POST":
        _mark_serving(environ)
    if path == "/upload-local":
        return local(environ, start)
    if path.startswith("/collide/") and path[9:] in colliding:
        return colliding[path[9:]](environ, start)
    return stored(environ, start)
