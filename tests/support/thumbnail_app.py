"""The app gunicorn serves in the photo tests: the middleware with local
storage and a default :class:`Thumbnailer` (two sizes), answering with the
stored keys and the worker's pid, so a test can read the worker's peak memory
(``VmHWM`` in ``/proc/<pid>/status``) from outside.

``UPLOADKIT_TEST_MEDIA`` names the storage directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable

from uploadkit.imaging import Thumbnailer
from uploadkit.middleware import FILES_KEY, UploadMiddleware
from uploadkit.storage import Storage


def describe(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    files = environ.get(FILES_KEY) or {}
    out = {"pid": os.getpid(),
           "files": {name: {"key": f.key, "thumbnails": f.thumbnails} for name, f in files.items()}}
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


app = UploadMiddleware(describe, storage=Storage(os.environ["UPLOADKIT_TEST_MEDIA"]),
                       thumbnails=Thumbnailer(sizes=[(150, 150), (600, 600)]), progress=False,
                       memory_threshold=0)
