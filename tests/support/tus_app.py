"""The app gunicorn serves in the tus tests: several tus endpoints, one per
configuration, all under ``$UPLOADKIT_TUS_ROOT`` so two gunicorn servers
started with the same root share every upload (a client can resume on the
other "host").

``/plain/tus/``   uploads kept in ``<root>/plain`` (no Storage), max 8 MiB,
                  progress in memcached when ``$UPLOADKIT_TUS_MEMCACHED`` is set.
``/png/tus/``     ``allowed_types={"image/png"}``.
``/short/tus/``   uploads expire after 1 s.
``/stale/tus/``   a silent PATCH loses its lock after 3 s; a PATCH waits 0.2 s for a lock.
``/slow/tus/``    ``Limits.idle_timeout=1``, ``Limits.min_rate=128 KiB/s``: a PATCH that stalls
                  or trickles is cut short.
``/mcstale/tus/`` the same with the leases in memcached.
``/store/tus/``   into ``Storage(<root>/media)``, collision ``rename``; an
                  ``authorize`` hook denies the action named in ``X-Deny``; a
                  ``before_finish`` hook refuses files named ``virus*``; the
                  app refuses files named ``refuse*`` with 403.
``/s3/tus/``      into ``Storage($UPLOADKIT_TUS_S3_URL)`` (options in
                  ``$UPLOADKIT_TUS_S3_OPTIONS``, JSON) when set; a silent PATCH loses
                  its lock after 1 s. A PATCH writes its worker's PID to
                  ``<root>/serving-<upload id>`` before its body is read (also on ``/stale/``).
``/s3short/tus/`` the same storage; uploads expire after 3 s.
``/pid``          the worker's PID.

Every completed file is described by the app in ``<root>/handed/<upload id>.json``
(filename, size, sha256 as streamed, sha256 of its bytes, type, key, PID).
Every answer carries ``X-Worker-PID``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Dict, Iterable, List

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

from uploadkit.errors import UploadError
from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.progress import MemcachedStore, ProgressSettings
from uploadkit.storage import Storage
from uploadkit.tusapp import UPLOAD_ID_KEY, TusSettings
from tests.support.served import json_answer as _json

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = os.environ["UPLOADKIT_TUS_ROOT"]
HANDED = os.path.join(ROOT, "handed")
os.makedirs(HANDED, exist_ok=True)


def describe(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    files = environ.get("uploadkit.files")
    if files is None:
        return _json(start_response, {"error": {"code": "not_found", "message": "no such page",
                                                "field": None, "limit": None}}, "404 Not Found")
    out = []
    for name, f in files.items():
        out.append({"field": name, "filename": f.filename, "raw_filename": f.raw_filename, "size": f.size,
                    "sha256": f.sha256, "content_sha256": hashlib.sha256(f.read()).hexdigest(),
                    "content_type": f.content_type, "declared_type": f.declared_type, "key": f.key,
                    "path": f.path, "pid": os.getpid()})
    upload_id = environ[UPLOAD_ID_KEY]
    tmp = os.path.join(HANDED, upload_id + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(out, fh)
    os.replace(tmp, os.path.join(HANDED, upload_id + ".json"))
    if any(f["filename"].startswith("refuse") for f in out):
        return _json(start_response, {"error": {"code": "refused", "message": "not this one",
                                                "field": None, "limit": None}}, "403 Forbidden")
    return _json(start_response, {"files": out})


class Infected(UploadError):
    status = 422
    code = "infected"


def scan(environ: Environ, file: Any) -> None:
    with file.open() as f:
        f.read(1)  # the hook can read the bytes before they are committed
    if file.filename.startswith("virus"):
        raise Infected(f"{file.filename!r} is infected")


def authorize(environ: Environ, action: str, upload_id: Any) -> bool:
    return environ.get("HTTP_X_DENY") != action


_memcached = os.environ.get("UPLOADKIT_TUS_MEMCACHED")
STORE: Any = MemcachedStore(_memcached, retry_after=1.0) if _memcached else None
SETTINGS = ProgressSettings(interval=0.05)
LIMITS = Limits(max_file_size=8 << 20)


def _mw(name: str, **tus: Any) -> UploadMiddleware:
    storage = tus.pop("storage", None)
    limits = tus.pop("limits", LIMITS)
    directory = None if storage is not None else os.path.join(ROOT, name)
    return UploadMiddleware(describe, limits=limits, storage=storage, progress=STORE or None,
                            progress_settings=SETTINGS, progress_path=f"/{name}/progress",
                            tempdir=os.path.join(ROOT, "tmp"),
                            tus=TusSettings(path=f"/{name}/tus/", directory=directory, **tus))


os.makedirs(os.path.join(ROOT, "tmp"), exist_ok=True)
APPS = {
    "plain": _mw("plain", cors_origins=["http://allowed.example"]),
    "png": _mw("png", limits=Limits(max_file_size=8 << 20, allowed_types=frozenset({"image/png"}))),
    "short": _mw("short", expire_after=1.0),
    "stale": _mw("stale", lock_timeout=3.0, lock_wait=0.2),
    "slow": _mw("slow", limits=Limits(max_file_size=8 << 20, idle_timeout=1.0, min_rate=131072)),
    "mcstale": _mw("mcstale", lock_timeout=3.0, lock_wait=0.2, lock_store=STORE),
    "store": _mw("store", storage=Storage(os.path.join(ROOT, "media")), authorize=authorize,
                 before_finish=scan),
}


if os.environ.get("UPLOADKIT_TUS_S3_URL"):
    APPS["s3"] = _mw("s3", storage=Storage(os.environ["UPLOADKIT_TUS_S3_URL"],
                                           storage_options=json.loads(os.environ["UPLOADKIT_TUS_S3_OPTIONS"])),
                     limits=Limits(max_file_size=64 << 20), lock_timeout=1.0, lock_wait=0.2)
    APPS["s3short"] = _mw("s3short", storage=APPS["s3"].storage, limits=Limits(max_file_size=64 << 20),
                          expire_after=3.0)


def _mark_serving(path: str) -> None:
    upload = path.rstrip("/").rpartition("/")[2]
    if len(upload) == 32 and upload.isalnum():
        marker = os.path.join(ROOT, f"serving-{upload}")
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    worker = str(os.getpid())
    if environ.get("REQUEST_METHOD") == "PATCH" and environ.get("PATH_INFO", "").startswith(("/s3/", "/stale/")):
        _mark_serving(environ.get("PATH_INFO", ""))

    def start(status: str, headers: List[Any], exc_info: Any = None) -> Any:
        return start_response(status, list(headers) + [("X-Worker-PID", worker)], exc_info)

    path = environ.get("PATH_INFO", "")
    if path == "/pid":
        return _json(start, {"pid": os.getpid()})
    name = path.split("/")[1] if path.count("/") >= 2 else ""
    target = APPS.get(name)
    if target is None:
        return _json(start, {"error": {"code": "not_found", "message": "no such page"}}, "404 Not Found")
    return target(environ, start)
