"""Small WSGI apps served by gunicorn in the end-to-end benchmark.

Each answers ``GET`` with ``{"ready": true}`` (the benchmark waits for it) and
``POST`` with ``{"size": N}``: the uploaded file's size, or for the read-only
apps the bytes read, so the benchmark can check the whole body arrived.
Temp files go to ``$UPLOADKIT_BENCH_TMPDIR`` (the benchmark's own temp dir).
"""

from __future__ import annotations

import os
import tempfile

TMPDIR_ENV = "UPLOADKIT_BENCH_TMPDIR"


def bench_tmpdir() -> str:
    return os.environ.get(TMPDIR_ENV) or tempfile.gettempdir()
