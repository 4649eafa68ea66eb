"""The app gunicorn serves in tests/test_resumecache.py: tus endpoints into
``Storage($UPLOADKIT_RC_ROOT/media)``, shared by every server started with the
same root, whose workers count the bytes they read back from an upload's data
(a replay), per upload.

``/sha/tus/``      the default chain (sniffing + sha256);
``/nocache/tus/``  the same with ``state_cache=0``;
``/quota/tus/``    the default chain with a quota (a handler whose state is not carried);
``/replayed/<id>`` ``{"bytes": N, "pid": P}``: what this worker read back of upload ``id``.

Every completed file is described in ``<root>/handed/<upload id>.json``
(size, sha256 as the chain computed it, sha256 of the stored bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

from uploadkit.middleware import UploadMiddleware
from uploadkit.storage import Storage
from uploadkit.tusapp import UPLOAD_ID_KEY, TusSettings
from tests.support.served import json_answer as _json

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = os.environ["UPLOADKIT_RC_ROOT"]
HANDED = os.path.join(ROOT, "handed")
os.makedirs(HANDED, exist_ok=True)
REPLAYED: "Counter[str]" = Counter()


def describe(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    f = environ["uploadkit.files"]["file"]
    out = {"size": f.size, "sha256": f.sha256, "content_sha256": hashlib.sha256(f.read()).hexdigest()}
    with open(os.path.join(HANDED, environ[UPLOAD_ID_KEY] + ".json"), "w") as fh:
        json.dump(out, fh)
    return _json(start_response, out)


def _mw(name: str, **kw: Any) -> UploadMiddleware:
    state_cache = kw.pop("state_cache", 64)
    mw = UploadMiddleware(describe, storage=Storage(os.path.join(ROOT, "media", name)), progress=False,
                          tempdir=ROOT, tus=TusSettings(path=f"/{name}/tus/", state_cache=state_cache), **kw)
    area = mw.tus_app.area
    read = area.read

    def counted(upload_id: str, size: int = -1) -> Iterator[bytes]:
        for block in read(upload_id, size):
            REPLAYED[upload_id] += len(block)
            yield block

    area.read = counted
    return mw


APPS = {"sha": _mw("sha"), "nocache": _mw("nocache", state_cache=0), "quota": _mw("quota", quota=lambda e: 1 << 30)}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    parts = environ.get("PATH_INFO", "").split("/")
    if len(parts) == 3 and parts[1] == "replayed":
        return _json(start_response, {"bytes": REPLAYED[parts[2]], "pid": os.getpid()})
    target = APPS.get(parts[1] if len(parts) > 1 else "")
    if target is None:
        return _json(start_response, {"error": {"code": "not_found", "message": "no such page"}}, "404 Not Found")
    return target(environ, start_response)
