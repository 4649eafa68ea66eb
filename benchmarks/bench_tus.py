"""What a tus upload costs the server, and what completing one costs.

A file is sent in PATCHes of 8 MiB straight to the middleware (WSGI calls in
this process, no sockets: this is the server's own work) into local storage,
and compared with the same bytes sent as one bare PUT through the same chain
and storage. The PATCH that completes the upload replays the stored bytes
through the whole chain (hashing; thumbnails), so its time is reported apart:
that replay is the price of exact whole-file hashes across workers.

    python -m benchmarks.bench_tus [--quick] [--size-mib N]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webob  # noqa: F401

from uploadkit.middleware import UploadMiddleware
from uploadkit.storage import Storage
from uploadkit.tusapp import TusSettings

MiB = 1 << 20
CHUNK = 8 * MiB


def _app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _call(mw: Any, method: str, path: str, body: bytes = b"", **headers: str) -> Tuple[str, Dict[str, str]]:
    environ: Dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "127.0.0.1",
                               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                               "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1"}
    for k, v in headers.items():
        key = k.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE",) else "HTTP_" + key] = v
    got: List[Any] = []
    result = mw(environ, lambda status, hdrs, exc_info=None: got.extend([status, dict(hdrs)]))
    for _ in result:
        pass
    if hasattr(result, "close"):
        result.close()
    return got[0], got[1]


def run(size: int, root: str) -> Dict[str, float]:
    data = os.urandom(MiB) * (size // MiB)
    storage = Storage(os.path.join(root, "media"))
    mw = UploadMiddleware(_app, storage=storage, progress=False, raw_paths=["/put/"], tus=TusSettings())
    t0 = time.perf_counter()
    status, headers = _call(mw, "PUT", "/put/a.bin", data, Content_Type="application/octet-stream")
    put = time.perf_counter() - t0
    assert status.startswith("200"), status
    t0 = time.perf_counter()
    status, headers = _call(mw, "POST", "/upload/tus/", **{"Tus-Resumable": "1.0.0", "Upload-Length": str(size)})
    uid = headers["Location"].rpartition("/")[2]
    patches: List[float] = []
    for offset in range(0, size, CHUNK):
        t1 = time.perf_counter()
        status, _ = _call(mw, "PATCH", f"/upload/tus/{uid}", data[offset:offset + CHUNK],
                          **{"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                             "CONTENT_TYPE": "application/offset+octet-stream"})
        patches.append(time.perf_counter() - t1)
        assert status.startswith("204"), status
    total = time.perf_counter() - t0
    middle = sorted(patches[:-1])[len(patches[:-1]) // 2] if len(patches) > 1 else 0.0
    return {"put": put, "tus": total, "middle_patch": middle, "last_patch": patches[-1]}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tus")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size-mib", type=int, default=None)
    args = parser.parse_args(argv)
    size = (args.size_mib or (64 if args.quick else 256)) * MiB
    root = tempfile.mkdtemp(prefix="bench-tus-")
    try:
        r = run(size, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = size / MiB
    print(f"## tus, {mib:.0f} MiB in {CHUNK // MiB} MiB PATCHes, local storage, in process\n")
    print("| path | seconds | MiB/s |")
    print("|---|---:|---:|")
    print(f"| bare PUT through the same chain | {r['put']:.3f} | {mib / r['put']:.0f} |")
    print(f"| tus: creation + every PATCH | {r['tus']:.3f} | {mib / r['tus']:.0f} |")
    print(f"| tus: a middle PATCH ({CHUNK // MiB} MiB) | {r['middle_patch']:.3f} | |")
    print(f"| tus: the completing PATCH (replays {mib - CHUNK / MiB:.0f} MiB) | {r['last_patch']:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
