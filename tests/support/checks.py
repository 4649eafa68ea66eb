"""Small checks the test modules share."""

from __future__ import annotations

import hashlib
import os
import time


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_empty(path: str, timeout: float = 5.0) -> None:
    """Temp files go when the server closes the response, which can be just
    after the client has read it: wait a moment before calling a file left over."""
    deadline = time.monotonic() + timeout
    while os.listdir(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(path) == [], f"temp files left behind: {os.listdir(path)}"
