"""A 300 MiB upload through a real server in constant memory.

``UPLOADKIT_LARGE_MIB=1024 pytest tests/test_large.py`` runs the same check at
1 GiB (about a minute).

Each run happens in a fresh subprocess so its peak RSS (VmHWM) belongs to this
upload alone: the subprocess starts a threaded wsgiref server with the
middleware, streams the body to it with requests from a generator-backed
file object (never holding the file), and reports its peak memory before and
after, and the stored file's sha256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
SIZE = int(os.environ.get("UPLOADKIT_LARGE_MIB", "300")) * MiB
PEAK_BUDGET = 32 * MiB

SCRIPT = r"""
import hashlib, json, os, sys, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import webob
import requests
from uploadkit.middleware import UploadMiddleware
from tests.support.bodies import sized_file_body
from tests.support.wsgi import serve

size, read_size, tempdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def vm_hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

def app(environ, start_response):
    f = environ["uploadkit.files"]["file"]
    h = hashlib.sha256()
    with f.open() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    out = json.dumps({"stored_sha256": h.hexdigest(), "sha256": f.sha256, "size": f.size,
                      "in_tempdir": os.path.dirname(f.path or "") == tempdir}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]

class Body:
    # A file-like body with a length: requests sends Content-Length and streams read() blocks.
    def __init__(self, gen, length):
        self.gen, self.length, self.block, self.pos = gen, length, b"", 0
    def __len__(self):
        return self.length
    def read(self, n=-1):
        if self.pos >= len(self.block):
            self.block, self.pos = next(self.gen, b""), 0
        if n < 0:
            n = len(self.block)
        out = self.block[self.pos:self.pos + n]
        self.pos += len(out)
        return out

mw = UploadMiddleware(app, progress=False, tempdir=tempdir, read_size=read_size)
gen, length, sha = sized_file_body("file", "big.bin", size, block=256 * 1024)
with serve(mw) as server:
    # Warm up once with a small upload, so imports and first-use allocations are in the baseline.
    g2, l2, _ = sized_file_body("file", "small.bin", 3 << 20, block=256 * 1024)
    requests.post(server.url + "/", data=Body(g2, l2), headers={"Content-Type": "multipart/form-data; boundary=b0undary-T3st"}, timeout=60)
    before = vm_hwm()
    r = requests.post(server.url + "/", data=Body(gen, length),
                      headers={"Content-Type": "multipart/form-data; boundary=b0undary-T3st"}, timeout=3600)
    after = vm_hwm()
print(json.dumps({"status": r.status_code, "response": r.json(), "source_sha256": sha,
                  "hwm_before": before, "hwm_after": after, "left": os.listdir(tempdir)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("read_size", [1 << 20, 4096], ids=["1MiB-reads", "4KiB-reads"])
def test_300_mib_upload_in_constant_memory(tmp_path: Any, read_size: int) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(SIZE), str(read_size), str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, timeout=60 + SIZE // (5 * MiB))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["status"] == 200, out
    resp = out["response"]
    assert resp["size"] == SIZE and resp["in_tempdir"] is True
    assert resp["stored_sha256"] == resp["sha256"] == out["source_sha256"]
    growth = out["hwm_after"] - out["hwm_before"]
    print(f"\n{SIZE // MiB} MiB with {read_size}-byte reads: peak RSS grew by {growth / MiB:.1f} MiB")
    assert growth < PEAK_BUDGET, f"peak RSS grew by {growth / MiB:.1f} MiB"
    assert out["left"] == []
