"""tus through gunicorn: uploadkit's tus server beside the tus project's own
Node server (``@tus/server`` with ``@tus/file-store``), and uploadkit's
multipart path as the ceiling, on the same machine in one run.

Two bodies: one 256 MiB file sent in PATCHes of 8 MiB, and 200 files of
1 MiB (a POST and one PATCH each). The same client (``http.client`` on one
keep-alive connection per upload run, the file read from disk 8 MiB at a time)
drives both tus servers; the multipart ceiling is the same client posting
``multipart/form-data`` to the same gunicorn. Targets run side by side and
the measurements go round-robin over them, the order rotating each round.

uploadkit runs in gunicorn with one gthread worker (4 threads), like for like
with Node's single process; everything stores to local disk in the
benchmark's temp dir. A table apart times the big file through the
middleware in this process (WSGI calls, no sockets) as one bare PUT and as
tus PATCHes, with the worker's state cache on and off, the completing PATCH
apart: what the replay of the stored bytes costs the server. The Node server's packages are pinned in
``benchmarks/tus_node/package-lock.json`` and installed into
``benchmarks/tus_node/node_modules`` (``npm ci``) when missing.

Usage::

    python -m benchmarks.bench_tus [--quick] [--runs N] [--big-mib N] [--files N] [--targets ...]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

from . import (
    MB, environment_line, fmt_rate, fmt_ratio, log, md_table, median, paired_median, sigterm_as_exit, verdict,
    versions,
)
from .bench_e2e import App, Server, cpu_seconds, log_tail, stop_group

MiB = 1 << 20
CHUNK = 8 * MiB
SMALL = 1 * MiB
HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "tus_node")
T = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    kind: str  # "tus" or "multipart"
    server: str  # "gunicorn" or "node"
    path: str  # the creation URL (tus) or the form's URL (multipart)
    endpoint: str = ""  # the app's name in handed.log (uploadkit only)
    sha256: bool = False
    short: str = ""  # the name in the targets table


TARGETS: Dict[str, Target] = {t.key: t for t in [
    Target("uk-tus", "uploadkit tus (sniffing + sha256)", "tus", "gunicorn", "/sha/tus/", "sha", True,
           "uploadkit tus"),
    Target("uk-tus-bare", "uploadkit tus (sniffing, sha256 off)", "tus", "gunicorn", "/bare/tus/", "bare",
           short="uploadkit tus, sha256 off"),
    Target("uk-tus-replay", "uploadkit tus (sniffing + sha256, `state_cache=0`: replays on completion)",
           "tus", "gunicorn", "/replay/tus/", "replay", True, "uploadkit tus, replaying"),
    Target("node", "@tus/server + @tus/file-store (neither sniffs nor hashes)", "tus", "node", "/files/",
           short="Node tus"),
    Target("uk-multipart", "uploadkit multipart (sniffing + sha256): the ceiling", "multipart", "gunicorn",
           "/sha/upload", "sha", True, "uploadkit multipart"),
    Target("uk-multipart-bare", "uploadkit multipart (sniffing, sha256 off)", "multipart", "gunicorn",
           "/bare/upload", "bare", short="uploadkit multipart, sha256 off"),
]}


# -- servers ---------------------------------------------------------------------


class Gunicorn(Server):
    """The uploadkit app behind one gthread worker (see the module docstring)."""

    def __init__(self, workdir: str) -> None:
        super().__init__(App("uploadkit", "uploadkit", "benchmarks.apps.tus_apps:app", "uploadkit"), workdir)
        self.worker_args = ["--workers", "1", "--worker-class", "gthread", "--threads", "4"]

    @property
    def store(self) -> str:
        return os.path.join(self.tmpdir, "store")

    @property
    def handed(self) -> str:
        return os.path.join(self.tmpdir, "handed.log")


class NodeServer:
    """``node benchmarks/tus_node/server.mjs`` in its own session, stopped by its PID's group."""

    def __init__(self, workdir: str) -> None:
        self.store = os.path.join(workdir, "node-store")
        self.log_path = os.path.join(workdir, "node.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(self.store, exist_ok=True)
        logf = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(["node", os.path.join(NODE_DIR, "server.mjs"), self.store, "/files"],
                                         cwd=NODE_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=logf, start_new_session=True)
        finally:
            logf.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"the Node tus server did not start: {self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                byte = os.read(self.proc.stdout.fileno(), 1)
                if not byte:
                    raise RuntimeError(f"the Node tus server exited: {self.log_tail()}")
                line += byte
        self.port = int(line.split()[1])

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def workers(self) -> List[int]:
        return [self.proc.pid] if self.proc is not None else []

    def worker_cpu_seconds(self) -> Optional[Tuple[float, float]]:
        return cpu_seconds(self.workers())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def ensure_node_packages() -> Optional[str]:
    """Install the pinned Node packages when missing; None when ready, else why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are required for the Node tus server"
    if os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@tus", "server")) and \
            os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@tus", "file-store")):
        return None
    log("[tus] installing the Node tus server's pinned packages (npm ci in benchmarks/tus_node)")
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel", "error"], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"npm ci failed: {proc.stderr.strip()[-300:]}"
    return None


# -- the client (the same code for every tus server) -----------------------------------


def _check(resp: http.client.HTTPResponse, status: int, what: str) -> bytes:
    body = resp.read()
    if resp.status != status:
        raise RuntimeError(f"{what}: HTTP {resp.status} {body[:200]!r}")
    return body


def tus_upload(conn: http.client.HTTPConnection, path: str, source: str, start: int, size: int,
               name: str) -> None:
    """POST then PATCHes of :data:`CHUNK` bytes, read from ``source`` at ``start``."""
    conn.request("POST", path, headers={**T, "Upload-Length": str(size), "Content-Length": "0",
                                        "Upload-Metadata": "filename " + _b64(name)})
    resp = conn.getresponse()
    _check(resp, 201, "POST")
    location = urlparse(resp.headers["Location"]).path
    offset = 0
    with open(source, "rb") as f:
        f.seek(start)
        while offset < size:
            chunk = f.read(min(CHUNK, size - offset))
            conn.request("PATCH", location, body=chunk,
                         headers={**T, "Content-Type": OCTETS, "Upload-Offset": str(offset)})
            resp = conn.getresponse()
            _check(resp, 204, "PATCH")
            offset += len(chunk)
            if int(resp.headers["Upload-Offset"]) != offset:
                raise RuntimeError(f"PATCH: Upload-Offset {resp.headers['Upload-Offset']}, expected {offset}")


def multipart_upload(conn: http.client.HTTPConnection, path: str, source: str, start: int, size: int,
                     name: str) -> None:
    """One ``multipart/form-data`` POST, the file sent :data:`CHUNK` bytes at a time."""
    boundary = "----uploadkitbench" + os.urandom(8).hex()
    pre = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    post = f"\r\n--{boundary}--\r\n".encode()
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(pre) + size + len(post)))
    conn.endheaders()
    conn.send(pre)
    with open(source, "rb") as f:
        f.seek(start)
        left = size
        while left:
            chunk = f.read(min(CHUNK, left))
            conn.send(chunk)
            left -= len(chunk)
    conn.send(post)
    _check(conn.getresponse(), 200, "multipart POST")


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


# -- measurements -----------------------------------------------------------------------


@dataclass
class Body:
    key: str
    label: str
    source: str
    files: int
    size: int  # per file
    sha256: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.files * self.size


@dataclass
class Result:
    target: Target
    body: Body
    mbps: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def rate(self) -> Optional[float]:
        return None if self.error or not self.mbps else median(self.mbps)


def make_bodies(workdir: str, big: int, files: int) -> List[Body]:
    """Deterministic pseudo-random bytes (nothing all zeros), on disk."""
    out = []
    for key, label, n, size in (("big", f"1 file of {big // MiB} MiB ({CHUNK // MiB} MiB PATCHes)", 1, big),
                                ("small", f"{files} files of {SMALL // MiB} MiB", files, SMALL)):
        body = Body(key, label, os.path.join(workdir, f"{key}.bin"), n, size)
        rng = random.Random(key)
        with open(body.source, "wb") as f:
            for _ in range(n):
                h = hashlib.sha256()
                left = size
                while left:
                    block = rng.randbytes(min(MiB, left))
                    h.update(block)
                    f.write(block)
                    left -= len(block)
                body.sha256.append(h.hexdigest())
        out.append(body)
    return out


def _empty(directory: str) -> List[Tuple[str, int]]:
    """Remove every file under ``directory`` (directories stay); return (name, size) of each."""
    found = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            found.append((name, os.path.getsize(path)))
            os.unlink(path)
    return found


def _verify(target: Target, body: Body, gunicorn: Gunicorn, node: Optional[NodeServer]) -> None:
    """After the clock: every file arrived whole, and uploadkit hashed it right."""
    store = node.store if target.server == "node" and node is not None else gunicorn.store
    stored = [size for name, size in _empty(store)
              if size == body.size and not name.endswith((".info", ".json", ".lock"))]
    if len(stored) != body.files:
        raise RuntimeError(f"{len(stored)} of {body.files} files of {body.size} bytes were stored")
    if target.server != "gunicorn":
        return
    with open(gunicorn.handed) as f:
        lines = [line.split() for line in f]
    os.unlink(gunicorn.handed)
    mine = [line for line in lines if line[0] == target.endpoint]
    if len(mine) != body.files or any(int(size) != body.size for _, size, _ in mine):
        raise RuntimeError(f"the app was handed {len(mine)} files, expected {body.files}")
    if target.sha256 and sorted(s for _, _, s in mine) != sorted(body.sha256):
        raise RuntimeError("uploadkit's sha256 differs from the file's")


def measure(target: Target, body: Body, port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    send = tus_upload if target.kind == "tus" else multipart_upload
    try:
        t0 = time.perf_counter()
        for i in range(body.files):
            send(conn, target.path, body.source, i * body.size, body.size, f"{body.key}-{i}.bin")
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    return body.total / MB / seconds


# -- in process: what the server itself spends, and the completing PATCH apart ----------------


def _wsgi(mw: Any, method: str, path: str, body: IO[bytes], length: int, **headers: str) -> Tuple[str, Dict[str, str]]:
    environ: Dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "127.0.0.1",
                               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": body,
                               "CONTENT_LENGTH": str(length), "HTTP_HOST": "127.0.0.1"}
    for k, v in headers.items():
        key = k.upper().replace("-", "_")
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = v
    got: List[Any] = []
    result = mw(environ, lambda status, hdrs, exc_info=None: got.extend([status, dict(hdrs)]))
    for _ in result:
        pass
    if hasattr(result, "close"):
        result.close()
    return got[0], got[1]


def in_process(source: str, size: int, runs: int, root: str) -> Dict[str, List[float]]:
    """WSGI calls in this process, no sockets: a bare PUT of the file through
    the default chain into local storage, and the same bytes as tus PATCHes of
    :data:`CHUNK` with the state cache on and off (``state_cache=0``: the
    completing PATCH replays the stored bytes). Seconds per upload, and the
    completing PATCH's share."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
        import webob  # noqa: F401
    from uploadkit.middleware import UploadMiddleware
    from uploadkit.storage import Storage
    from uploadkit.tusapp import TusSettings

    def ok(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    storage = Storage(os.path.join(root, "in-process"))
    mws = {"cache": UploadMiddleware(ok, storage=storage, progress=False, raw_paths=["/put/"], tus=TusSettings()),
           "replay": UploadMiddleware(ok, storage=storage, progress=False, tus=TusSettings(state_cache=0))}
    out: Dict[str, List[float]] = {k: [] for k in ("put", "cache", "cache_last", "replay", "replay_last")}
    for i in range(runs):
        for kind in ("put", "cache", "replay") if i % 2 == 0 else ("replay", "cache", "put"):
            os.sync()
            with open(source, "rb") as f:
                t0 = time.perf_counter()
                if kind == "put":
                    status, _ = _wsgi(mws["cache"], "PUT", "/put/a.bin", f, size,
                                      CONTENT_TYPE="application/octet-stream")
                    out["put"].append(time.perf_counter() - t0)
                    if not status.startswith("200"):
                        raise RuntimeError(f"PUT: {status}")
                else:
                    mw = mws[kind]
                    status, headers = _wsgi(mw, "POST", "/upload/tus/", io.BytesIO(), 0,
                                            **{"Tus-Resumable": "1.0.0", "Upload-Length": str(size)})
                    location = headers["Location"].rpartition("/")[2]
                    last = 0.0
                    for offset in range(0, size, CHUNK):
                        t1 = time.perf_counter()
                        n = min(CHUNK, size - offset)
                        status, _ = _wsgi(mw, "PATCH", f"/upload/tus/{location}", f, n,
                                          **{"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                                             "CONTENT_TYPE": OCTETS})
                        last = time.perf_counter() - t1
                        if not status.startswith("204"):
                            raise RuntimeError(f"PATCH: {status}")
                    out[kind].append(time.perf_counter() - t0)
                    out[kind + "_last"].append(last)
            _empty(os.path.join(root, "in-process"))
        log(f"[tus] in process, round {i + 1}/{runs}: PUT {out['put'][-1]:.3f} s, tus {out['cache'][-1]:.3f} s"
            f" (last PATCH {out['cache_last'][-1]:.3f} s), replaying {out['replay'][-1]:.3f} s"
            f" (last PATCH {out['replay_last'][-1]:.3f} s)")
    return out


def run(targets: Sequence[Target], big: int, files: int, runs: int, workdir: str
        ) -> Tuple[List[Result], Dict[str, List[float]]]:
    bodies = make_bodies(workdir, big, files)
    timings = in_process(bodies[0].source, bodies[0].size, runs, workdir)
    results = [Result(t, b) for b in bodies for t in targets]
    gunicorn = Gunicorn(workdir)
    node: Optional[NodeServer] = None
    try:
        gunicorn.start()
        if any(t.server == "node" for t in targets):
            problem = ensure_node_packages()
            if problem is None:
                node = NodeServer(workdir)
                try:
                    node.start()
                except Exception as exc:
                    problem = str(exc)[:300]
            if problem is not None:
                log(f"[tus] node: {problem}")
                for r in results:
                    if r.target.server == "node":
                        r.error = problem
        servers = {"gunicorn": gunicorn, "node": node}
        # Untimed: one upload of the big file to each target first, so the
        # first round does not also pay for the servers' and the files' warm-up.
        for r in results:
            server = servers[r.target.server]
            if r.body is bodies[0] and not r.error and server is not None:
                try:
                    measure(r.target, r.body, server.port)
                    _verify(r.target, r.body, gunicorn, node)
                except Exception as exc:
                    r.error = str(exc)[:300]
                    log(f"[tus] warm-up {r.target.key}: {r.error} {server.log_tail()}")
        for i in range(runs):
            for body in bodies:
                row = [r for r in results if r.body is body]
                shift = i % len(row)
                for r in row[shift:] + row[:shift]:
                    server = servers[r.target.server]
                    if r.error or server is None:
                        continue
                    try:
                        os.sync()  # untimed: the previous upload's dirty pages are not this one's cost
                        before = server.worker_cpu_seconds()
                        r.mbps.append(measure(r.target, body, server.port))
                        after = server.worker_cpu_seconds()
                        used = ""
                        if before is not None and after is not None:
                            r.cpu.append(sum(after) - sum(before))
                            used = f", server CPU {r.cpu[-1]:.2f} s"
                        _verify(r.target, body, gunicorn, node)
                        log(f"[tus] run {i + 1}/{runs} {body.key} {r.target.key}: {r.mbps[-1]:.0f} MB/s{used}")
                    except Exception as exc:
                        r.error = str(exc)[:300]
                        log(f"[tus] {body.key} {r.target.key}: {r.error} {server.log_tail()}")
    finally:
        if node is not None:
            node.stop()
        gunicorn.stop()
    return results, timings


def report(results: Sequence[Result], timings: Dict[str, List[float]], runs: int, quick: bool,
           load_before: str) -> str:
    def find(key: str, body: str) -> Optional[Result]:
        return next((r for r in results if r.target.key == key and r.body.key == body), None)

    def ratio(a: str, b: str, body: str) -> Optional[float]:
        ra, rb = find(a, body), find(b, body)
        if ra is None or rb is None or not ra.rate or not rb.rate:
            return None
        return ra.rate / rb.rate

    def paired(a: str, b: str, body: str) -> Optional[float]:
        ra, rb = find(a, body), find(b, body)
        if ra is None or rb is None or ra.error or rb.error:
            return None
        return paired_median(ra.mbps, rb.mbps)

    out = [f"## tus behind gunicorn, beside the Node tus server ({'quick' if quick else 'full'} run: "
           f"median of {runs})", "",
           environment_line() + f" (at the start: {load_before}).  ", versions() + ".", "",
           "The same Python client (`http.client`, one keep-alive connection) sends each file as a tus "
           f"POST and PATCHes of {CHUNK // MiB} MiB, or as one multipart POST; uploadkit runs in gunicorn "
           "(1 gthread worker, 4 threads), the Node server (`@tus/server` + `@tus/file-store`) in its one "
           "process; everything stores to local disk. MB/s = file bytes (10^6) per second, creation "
           "to last answer; server CPU s = the server process's user + system time per run (less "
           "sensitive to other load than MB/s). uploadkit sniffs every file and, where it says so, "
           "computes its sha256 (checked against the file's); the Node server does neither.", ""]
    for body in dict.fromkeys(r.body.key for r in results):
        rows = []
        label = next(r.body.label for r in results if r.body.key == body)
        for r in (r for r in results if r.body.key == body):
            if r.error:
                rows.append([r.target.label, "error", "", "", "", r.error[:120]])
                continue
            rows.append([r.target.label, fmt_rate(r.rate), f"{median(r.cpu):.2f}" if r.cpu else "n/a",
                         fmt_ratio(ratio(r.target.key, "node", body)),
                         fmt_ratio(ratio(r.target.key, "uk-multipart", body)), ""])
        out += [f"### {label}", "", md_table(["server", "MB/s", "server CPU s", "vs Node", "vs multipart", "note"],
                                             rows, "lrrrrl"), ""]
    size = next((r.body.size for r in results if r.body.key == "big"), 0)
    if timings["put"]:
        def row(label: str, key: str) -> List[str]:
            total = median(timings[key])
            last = f"{median(timings[key + '_last']):.3f}" if key + "_last" in timings else ""
            return [label, f"{total:.3f}", fmt_rate(size / MB / total), last]

        out += [f"### In process: {size // MiB} MiB through the middleware, no sockets", "",
                "WSGI calls in the benchmark's process into local storage, the default chain (sniffing + "
                "sha256): the server's own work, without the client and the network.", "",
                md_table(["path", "seconds", "MB/s", "completing PATCH s"],
                         [row("one bare PUT", "put"), row(f"tus, {CHUNK // MiB} MiB PATCHes", "cache"),
                          row("tus, `state_cache=0` (the completing PATCH replays)", "replay")], "lrrr"), ""]
    checks = []
    names = {"big": "big file", "small": "1 MiB files"}
    for a, b, body, target in (("uk-tus", "node", "big", 1.0), ("uk-tus", "node", "small", 1.0),
                               ("uk-tus", "uk-multipart", "big", 0.8)):
        value, pair = ratio(a, b, body), paired(a, b, body)
        if value is not None:
            checks.append([f"{TARGETS[a].short} / {TARGETS[b].short}, {names[body]}", fmt_ratio(value),
                           fmt_ratio(pair), f">= {target:.2f}", verdict(pair if pair is not None else value, target)])
    for a, b, body in (("uk-tus-bare", "node", "big"), ("uk-tus-bare", "node", "small"),
                       ("uk-tus-bare", "uk-multipart-bare", "big"), ("uk-tus-replay", "uk-multipart", "big")):
        value = ratio(a, b, body)
        if value is not None:
            checks.append([f"{TARGETS[a].short} / {TARGETS[b].short}, {names[body]}", fmt_ratio(value),
                           fmt_ratio(paired(a, b, body)), "", ""])
    if checks:
        out += ["### Targets", "",
                "value = the ratio of the two medians above; paired = the median of each round's ratio (the "
                "two measured seconds apart, so the machine's drift between rounds cancels), which the "
                "result is judged on.", "",
                md_table(["ratio", "value", "paired", "target", "result"], checks, "lrrll"), ""]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tus", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run, a 64 MiB big file and 50 small files")
    p.add_argument("--runs", type=int, help="rounds (default 5, 1 with --quick)")
    p.add_argument("--big-mib", type=int, help="the big file in MiB (default 256, 64 with --quick)")
    p.add_argument("--files", type=int, help="how many 1 MiB files (default 200, 50 with --quick)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ",".join(TARGETS))
    p.add_argument("--tmpdir", help="where bodies and stored files go (default: the system temp dir)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    runs = args.runs or (1 if args.quick else 5)
    big = (args.big_mib or (64 if args.quick else 256)) * MiB
    files = args.files or (50 if args.quick else 200)
    targets = [TARGETS[k.strip()] for k in args.targets.split(",") if k.strip()]
    load_before = "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    with sigterm_as_exit():
        workdir = tempfile.mkdtemp(prefix="uploadkit-bench-tus-", dir=args.tmpdir)
        try:
            results, timings = run(targets, big, files, runs, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, timings, runs, args.quick, load_before), flush=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
