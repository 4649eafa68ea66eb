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
``python tests/support/moto_server.py -H 127.0.0.1 -p 5000``.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable, List
from urllib.parse import urlparse

_LOCKS: List[threading.Lock] = [threading.Lock() for _ in range(64)]
_patched = False


def make_conditional_writes_atomic() -> None:
    """Serialize, per key, the requests of this process's moto S3 server that
    carry ``If-None-Match`` (idempotent)."""
    global _patched
    if _patched:
        return
    from moto.s3.responses import S3Response

    original: Callable[..., Any] = S3Response.key_response

    @functools.wraps(original)
    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        if request.method not in ("PUT", "POST") or not request.headers.get("If-None-Match"):
            return original(self, request, full_url, headers)
        url = urlparse(full_url)
        with _LOCKS[hash((url.netloc, url.path)) % len(_LOCKS)]:
            return original(self, request, full_url, headers)

    S3Response.key_response = key_response  # type: ignore[method-assign]
    _patched = True


if __name__ == "__main__":
    from moto.server import main

    make_conditional_writes_atomic()
    main(sys.argv[1:])
