"""moto's S3 server, with conditional writes as atomic as S3 makes them.

moto (5.2) answers ``If-None-Match: *`` on PutObject and CompleteMultipartUpload
with 412 PreconditionFailed when the key exists, as S3 does. But it checks,
then writes, on whatever threads its server runs: two conditional writes to
one key handled at the same instant can both pass the check (seen: 2 of 50
concurrent conditional completes of one key succeeded). S3 settles them
atomically: one succeeds, the others get 412. :func:`make_conditional_writes_atomic`
gives moto that behaviour by running the conditional writes to one key one
at a time; everything else is served as moto serves it.

Run as a script, it is ``python -m moto.server`` with that change:
``python tests/support/moto_server.py -H 127.0.0.1 -p 5000``. With
``UPLOADKIT_TEST_S3_LATENCY`` (seconds) set, every request to a key is
answered that much later, as a real store answers in tens of milliseconds
where moto on loopback answers in a fraction of one.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Any, Callable, List
from urllib.parse import urlparse

_LOCKS: List[threading.Lock] = [threading.Lock() for _ in range(64)]
_patched = False


def make_conditional_writes_atomic(latency: float = 0.0) -> None:
    """Serialize, per key, the requests of this process's moto S3 server that
    carry ``If-None-Match``; with ``latency``, delay every request to a key
    by that many seconds (outside the serialization). Idempotent."""
    global _patched
    if _patched:
        return
    from moto.s3.responses import S3Response

    original: Callable[..., Any] = S3Response.key_response

    @functools.wraps(original)
    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        if latency:
            time.sleep(latency)
        if request.method not in ("PUT", "POST") or not request.headers.get("If-None-Match"):
            return original(self, request, full_url, headers)
        url = urlparse(full_url)
        with _LOCKS[hash((url.netloc, url.path)) % len(_LOCKS)]:
            return original(self, request, full_url, headers)

    S3Response.key_response = key_response  # type: ignore[method-assign]
    _patched = True


if __name__ == "__main__":
    from moto.server import main

    make_conditional_writes_atomic(float(os.environ.get("UPLOADKIT_TEST_S3_LATENCY") or 0))
    main(sys.argv[1:])
