"""A small production-like cluster on 127.0.0.1, and the clients that load it.

* :class:`MotoProcess`: an S3-compatible server (moto) in its own process, so
  its work does not compete for the test process's GIL and it can be killed.
* :class:`TcpProxy`: a TCP forwarder in front of it that a test can cut and
  restore (an S3 outage without losing the server's state), or blackhole and
  heal (packets dropped, nothing closed).
* :class:`Cluster`: gunicorn (gthread) with N workers serving
  :mod:`tests.support.cluster_app`, in its own session, stopped by its own
  process group id.
* :func:`http_post`: a raw-socket HTTP/1.1 client that stops sending and reads
  as soon as the server answers early (a refusal), as browsers do.
* :func:`send_partial`: headers and part of a body, then the connection closes.

Every process here is started with a handle and stopped through it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.support.memcached import MemcachedServer, start_memcached
from uploadkit.multipart import encode_multipart

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KiB = 1024
MiB = 1024 * 1024
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: Optional[subprocess.Popen[bytes]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _stop_group(proc: Optional[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM the process group ``proc`` leads (its own session), SIGKILL if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # workers may outlive their master for a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=timeout)


# -- S3 -------------------------------------------------------------------------------


class MotoProcess:
    """moto's S3 server as a subprocess on 127.0.0.1. Its spooled objects go to
    its own temp dir, never the app's. Its conditional writes are atomic, as
    on S3 (see :mod:`tests.support.moto_server`)."""

    def __init__(self, workdir: str, latency: float = 0.0) -> None:
        self.workdir = workdir
        #: Seconds every request to a key waits before it is served (a real store's latency).
        self.latency = latency
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        tmp = os.path.join(self.workdir, "moto-tmp")
        os.makedirs(tmp, exist_ok=True)
        self.port = free_port()
        env = dict(os.environ, TMPDIR=tmp, UPLOADKIT_TEST_S3_LATENCY=str(self.latency), **DUMMY_CREDENTIALS)
        log = open(os.path.join(self.workdir, "moto.log"), "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(REPO_ROOT, "tests", "support", "moto_server.py"),
                 "-H", "127.0.0.1", "-p", str(self.port)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()
        _wait_port(self.port, self.proc, timeout, "moto server")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop_group(proc)

    def client(self, endpoint_url: Optional[str] = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=endpoint_url or self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self) -> str:
        name = f"uk-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> Dict[str, int]:
        """Every key under ``prefix`` with its size."""
        out: Dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def temp_area_emptied(self, bucket: str, prefix: str = "uploads/.uploadkit-tmp/",
                          timeout: float = 10.0) -> Dict[str, int]:
        """Wait (at most ``timeout``) until no key is left under ``prefix``; what is left then.

        A committed upload's temp key is removed once its response is sent,
        so a client can list the bucket an instant before it goes."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.keys(bucket, prefix)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def pending_uploads(self, bucket: str) -> List[Dict[str, Any]]:
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    def sha256(self, bucket: str, key: str) -> str:
        h = hashlib.sha256()
        body = self.client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in iter(lambda: body.read(1 << 20), b""):
            h.update(chunk)
        return h.hexdigest()

    def options(self, endpoint_url: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        """fsspec storage_options reaching this server (or a proxy in front of it)."""
        opts: Dict[str, Any] = {"key": "testing", "secret": "testing",
                                "endpoint_url": endpoint_url or self.endpoint_url,
                                "client_kwargs": {"region_name": "us-east-1"},
                                "skip_instance_cache": True, "use_listings_cache": False}
        opts.update(extra)
        return opts


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target_port``. ``cut()`` closes the
    listener and every open connection (clients then get refused connections);
    ``restore()`` listens again on the same port.

    ``blackhole(after=n)`` lets ``n`` more bytes through towards the target
    (``blackhole(on=b"...")``: everything before the first read that holds
    those bytes, e.g. one request's header), then stops forwarding in both directions *without closing anything*: the
    proxy stops reading and writing, its sockets stay open, and new
    connections are accepted but carry nothing. To a client that is a network
    dropping every packet: no reset, no answer, writes that stop draining once
    the socket buffers are full. ``heal()`` forwards again, what was held first.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: Optional[socket.socket] = None
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._budget: Optional[int] = None  # bytes towards the target before the blackhole
        self._marker = b""  # or: the bytes towards the target that start it
        self._tail = b""  # the end of the last read, where a marker may begin
        #: ``time.monotonic()`` when the blackhole began (None: not yet, or healed).
        self.blackholed_at: Optional[float] = None
        self._blackholed = threading.Event()
        self._clients: List[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        t = threading.Thread(target=self._accept, args=(s,), name="tcp-proxy", daemon=True)
        t.start()
        self._threads.append(t)

    start = restore

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
                self._clients.append(client)
            pair = [client, upstream]
            ended = [0]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, pair, ended, a is client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pair: List[socket.socket], ended: List[int],
              towards_target: bool = False) -> None:
        try:
            while True:
                self._flowing.wait()  # blackholed: read nothing more
                data = src.recv(256 * 1024)
                if not data:
                    break
                if towards_target:
                    data, held = self._spend(data)
                    if data:
                        dst.sendall(data)
                    if not held:
                        continue
                    data = held
                self._flowing.wait()  # blackholed: what was read is held, as by a dead link
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            ended[0] += 1
            if ended[0] == 2:  # both directions over: release the descriptors
                for s in pair:
                    if s in self._conns:
                        self._conns.remove(s)
                    if s in self._clients:
                        self._clients.remove(s)
                    s.close()

    def _spend(self, data: bytes) -> Tuple[bytes, bytes]:
        """Split ``data`` into what goes through now and what the blackhole holds."""
        with self._lock:
            if self._marker:
                seen, self._tail = self._tail + data, data[-len(self._marker):]
                if self._marker in seen:
                    self._marker = b""
                    self._begin_blackhole()
                    return b"", data
                return data, b""
            if self._budget is not None:
                if len(data) < self._budget:
                    self._budget -= len(data)
                    return data, b""
                now, held = data[:self._budget], data[self._budget:]
                self._budget = None
                self._begin_blackhole()
                return now, held
            if self._flowing.is_set():
                return data, b""
            return b"", data  # read just as the blackhole began

    def _begin_blackhole(self) -> None:  # under the lock
        self._flowing.clear()
        self.blackholed_at = time.monotonic()
        self._blackholed.set()

    def blackhole(self, after: int = 0, on: bytes = b"") -> None:
        """Stop forwarding, without closing anything, once ``after`` more bytes
        went towards the target, or before the first read holding ``on``
        (at once when neither is given)."""
        with self._lock:
            self._blackholed.clear()
            self.blackholed_at = None
            self._budget, self._marker, self._tail = None, on, b""
            if after > 0:
                self._budget = after
            elif not on:
                self._begin_blackhole()

    def wait_blackholed(self, timeout: float) -> bool:
        """Whether the blackhole began within ``timeout`` seconds."""
        return self._blackholed.wait(timeout)

    def heal(self, drop: bool = False) -> None:
        """Forward again: first what the blackhole held, then everything. With
        ``drop``, the connections it held are reset instead and what they held
        is lost (as when TCP gives up on them); new ones are forwarded."""
        with self._lock:
            self._budget, self._marker = None, b""
            held = list(self._conns) if drop else []
        for s in held:
            _reset(s)
        self._flowing.set()

    def clients_gone(self) -> int:
        """How many accepted client connections their client has closed (FIN or
        reset), seen without reading from them: a blackholed connection is not read."""
        with self._lock:
            clients = list(self._clients)
        gone = 0
        for s in clients:
            poller = select.poll()
            try:
                poller.register(s, select.POLLRDHUP)
            except (OSError, ValueError):  # closed by the proxy itself
                continue
            if any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0)):
                gone += 1
        return gone

    def cut(self) -> None:
        self._flowing.set()  # blackholed pipes wake up and meet the closed sockets
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self._clients = []
            self._budget, self._marker = None, b""
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for s in conns:
            _reset(s)

    def stop(self) -> None:
        self.cut()
        for t in self._threads:
            t.join(timeout=5)


def _reset(s: socket.socket) -> None:
    """Close ``s`` with a reset, like a dead server."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        # A pipe thread blocked in send or recv on this socket keeps it
        # alive past close(): both directions could stay blocked for
        # ever (each end writing, neither reading), and the client
        # would wait on a connection nobody ends. shutdown() wakes them.
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()  # linger 0: a reset
    except OSError:
        pass


# -- gunicorn ---------------------------------------------------------------------------


class Cluster:
    """gunicorn, gthread workers, serving :mod:`tests.support.cluster_app`.

    The app's temp files go to ``tempdir`` (TMPDIR too, so anything else a
    worker spools lands there and is seen by the tests).
    """

    def __init__(self, workdir: str, *, storage_url: str, storage_options: Dict[str, Any],
                 memcached: str, workers: int = 4, threads: int = 2, retry_after: float = 1.0,
                 app: str = "tests.support.cluster_app:app", extra_env: Optional[Dict[str, str]] = None,
                 timeout: int = 120) -> None:
        self.workdir = workdir
        self.tempdir = os.path.join(workdir, "app-tmp")
        self.statedir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, f"gunicorn-{uuid.uuid4().hex[:6]}.log")
        self.workers = workers
        self.threads = threads
        self.timeout = timeout
        self.app = app
        self.env = {
            "UPLOADKIT_CLUSTER_STORAGE": storage_url,
            "UPLOADKIT_CLUSTER_STORAGE_OPTIONS": json.dumps(storage_options),
            "UPLOADKIT_CLUSTER_MEMCACHED": memcached,
            "UPLOADKIT_CLUSTER_RETRY_AFTER": str(retry_after),
            "UPLOADKIT_CLUSTER_TEMPDIR": self.tempdir,
            "UPLOADKIT_CLUSTER_STATEDIR": self.statedir,
            **(extra_env or {}),
        }
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Cluster":
        os.makedirs(self.tempdir, exist_ok=True)
        os.makedirs(self.statedir, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(256)
            self.port = sock.getsockname()[1]
            fd = sock.fileno()
            env = dict(os.environ, TMPDIR=self.tempdir, **DUMMY_CREDENTIALS, **self.env)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
            env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
            cmd = [sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}",
                   "--workers", str(self.workers), "--threads", str(self.threads),
                   "--worker-class", "gthread", "--timeout", str(self.timeout),
                   "--graceful-timeout", "3", "--backlog", "256", "--log-level", "warning",
                   "--chdir", REPO_ROOT, self.app]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, pass_fds=(fd,), cwd=REPO_ROOT, env=env,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        finally:
            sock.close()
        self._wait_workers(timeout)
        return self

    def _wait_workers(self, timeout: float) -> None:
        """Until every worker has answered once (each imported the app)."""
        deadline = time.monotonic() + timeout
        seen: set = set()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, headers, _ = http_get(self.port, "/pid", timeout=10)
                seen.add(headers.get("x-worker-pid", status))  # any answer: a worker is up
            except OSError:
                time.sleep(0.05)
                continue
            if len(self.worker_pids()) >= self.workers and len(seen) >= 1:
                return
        raise RuntimeError(f"gunicorn not ready within {timeout} s: {self.log_tail()}")

    def worker_pids(self) -> List[int]:
        """The workers: the master's children."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def peak_rss_mib(self) -> Dict[int, float]:
        """VmHWM (peak resident set) of each live worker, in MiB."""
        out: Dict[int, float] = {}
        for pid in self.worker_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            out[pid] = int(line.split()[1]) / 1024
            except OSError:
                continue
        return out

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def serving_pid(self, progress_id: str, timeout: float = 20.0) -> int:
        """The PID of the worker that started serving the upload ``progress_id``."""
        path = os.path.join(self.statedir, f"serving-{progress_id}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    return int(f.read())
            except (FileNotFoundError, ValueError):
                time.sleep(0.02)
        raise AssertionError(f"no worker reported serving {progress_id} within {timeout} s")

    def temp_files(self) -> List[str]:
        return sorted(os.listdir(self.tempdir))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop_group(proc)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- clients -----------------------------------------------------------------------------


class ConnectionDropped(ConnectionError):
    """The server closed the connection without an answer."""


def _read_all(s: socket.socket) -> bytes:
    chunks: List[bytes] = []
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def parse_response(raw: bytes) -> Tuple[int, Dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def http_get(port: int, target: str, timeout: float = 30.0) -> Tuple[int, Dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        raw = _read_all(s)
    if not raw:
        raise ConnectionDropped(f"GET {target}: no answer")
    return parse_response(raw)


def http_post(port: int, target: str, body: bytes, content_type: str, *, timeout: float = 120.0,
              chunk: int = 256 * KiB) -> Tuple[int, Dict[str, str], bytes]:
    """POST ``body``; stop sending as soon as the server answers (a refusal
    arrives before the body is through) and read the answer.

    :raises ConnectionDropped: the server closed without answering.
    """
    head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        view = memoryview(body)
        poller = select.poll()  # not select(): descriptors may be numbered past 1024
        poller.register(s, select.POLLIN)
        try:
            s.sendall(head)
            pos = 0
            while pos < len(body):
                if poller.poll(0):
                    break  # an early answer (or the server closed)
                pos += s.send(view[pos:pos + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # read what the server said, if anything
        raw = _read_all(s)
    if not raw:
        raise ConnectionDropped(f"POST {target}: connection closed without an answer")
    return parse_response(raw)


def send_partial(port: int, target: str, body: bytes, content_type: str, offset: int,
                 timeout: float = 30.0) -> None:
    """Headers declaring all of ``body``, its first ``offset`` bytes, then close."""
    head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head + body[:offset])
        except OSError:
            pass


# -- workloads ------------------------------------------------------------------------------


def payload(size: int, seed: int) -> bytes:
    """``size`` bytes unique to ``seed`` (fast: random.randbytes)."""
    return random.Random(seed).randbytes(size)


@dataclass
class Upload:
    index: int
    size: int
    progress_id: str
    sha256: str = ""
    status: Optional[int] = None
    answer: Any = None
    worker: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None
    final: Optional[Dict[str, Any]] = None


def run_upload(port: int, up: Upload, path: str = "/upload", active: Optional[set] = None) -> Upload:
    """Send ``up`` (its body built from its index), record the answer in it.
    With ``active``, its progress id is in that set while it is being sent."""
    body, ctype, up.sha256 = build_body(up.size, up.index)
    if active is not None:
        active.add(up.progress_id)
    t0 = time.perf_counter()
    try:
        status, headers, raw = http_post(port, f"{path}?X-Progress-ID={up.progress_id}", body, ctype)
    except Exception as exc:  # recorded and asserted on by the test
        up.error = f"{type(exc).__name__}: {exc}"
        return up
    finally:
        up.seconds = time.perf_counter() - t0
        if active is not None:
            active.discard(up.progress_id)
        del body
    up.status = status
    up.worker = int(headers.get("x-worker-pid", 0))
    try:
        up.answer = json.loads(raw) if raw else None
    except ValueError:
        up.answer = {"not_json": raw[:300].decode("latin-1")}
    return up


def build_body(size: int, seed: int, filename: Optional[str] = None) -> Tuple[bytes, str, str]:
    """(body, content type, the file's sha256) of a one-file upload with a text field."""
    data = payload(size, seed)
    digest = hashlib.sha256(data).hexdigest()
    body, ctype = encode_multipart([("note", f"upload {seed}")],
                                   [("file", filename or f"f{seed}.bin", "application/octet-stream", data)])
    return body, ctype, digest


def plan_sizes(count: int, smallest: int, largest: int, budget: int, large: int, seed: int) -> List[int]:
    """``count`` sizes log-uniform in [smallest, largest] whose total stays under
    ``budget``: ``large`` of them are drawn from the top decade, the others from
    a range narrowed until they fit. Shuffled, deterministic."""
    rng = random.Random(seed)

    def draw(lo: int, hi: int) -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    largest = min(largest, budget // 4)  # a small budget still gets its large ones
    big = [largest] + [draw(max(smallest, largest // 10), largest) for _ in range(large - 1)]
    while len(big) > 1 and sum(big) > budget // 2:
        big.pop()
    left = budget - sum(big)
    top = largest
    while True:
        rest = [draw(smallest, top) for _ in range(count - len(big))]
        if sum(rest) <= left:
            break
        top = max(smallest + 1, int(top * 0.8))
    sizes = big + rest
    rng.shuffle(sizes)
    return sizes


@dataclass
class Poller:
    """Polls the status route for a set of progress ids while a load runs."""

    port: int
    #: Polled while present: the load client adds an id before sending and
    #: discards it once answered, so polls land while bytes are moving.
    active: set
    interval: float = 0.05
    threads: int = 2
    states: Dict[str, List[str]] = field(default_factory=dict)
    answered_by: Dict[str, List[int]] = field(default_factory=dict)
    latencies: List[float] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    statuses: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: List[threading.Thread] = []

    def start(self) -> "Poller":
        for n in range(self.threads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, n: int) -> None:
        while not self._stop.is_set():
            ids = sorted(self.active.copy())[n::self.threads]
            for pid in ids:
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    status, headers, body = http_get(self.port, f"/upload/progress?X-Progress-ID={pid}",
                                                     timeout=30)
                except OSError as exc:
                    with self._lock:
                        self.errors.append(f"{pid}: {exc}")
                    continue
                with self._lock:
                    self.latencies.append(time.perf_counter() - t0)
                    self.statuses.append(status)
                    if status == 200:
                        state = json.loads(body)["state"]
                        self.states.setdefault(pid, []).append(state)
                        self.answered_by.setdefault(pid, []).append(int(headers.get("x-worker-pid", 0)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=60)


def progress_of(port: int, progress_id: str) -> Dict[str, Any]:
    status, _, body = http_get(port, f"/upload/progress?X-Progress-ID={progress_id}")
    assert status == 200, (status, body)
    value: Dict[str, Any] = json.loads(body)
    return value


def wait_final(port: int, progress_id: str, timeout: float = 30.0) -> Dict[str, Any]:
    """The upload's status once it is final (``done`` or ``error``).

    A final status is kept for the store's ``final_ttl`` (60 s) only, so a
    test reads it as soon as the upload is answered (see :func:`settle`), not
    after a whole load run that may outlast it on a slow machine."""
    deadline = time.monotonic() + timeout
    value: Dict[str, Any] = {}
    while time.monotonic() < deadline:
        value = progress_of(port, progress_id)
        if value.get("state") in ("done", "error"):
            return value
        time.sleep(0.05)
    raise AssertionError(f"progress {progress_id} not final after {timeout} s: {value}")


def settle(port: int, up: Upload, timeout: float = 60.0) -> Upload:
    """Record in ``up`` its final progress status, read right after its answer."""
    try:
        up.final = wait_final(port, up.progress_id, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the upload's answer: status {up.status}, error {up.error}, "
                             f"after {up.seconds:.1f} s, from worker {up.worker}") from None
    return up


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoProcess]:
    """One moto S3 server process for a test module."""
    server = MotoProcess(str(tmp_path_factory.mktemp("moto")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_memcached() -> Iterator[MemcachedServer]:
    """One memcached for a test module (tests that kill it use their own)."""
    server = start_memcached()
    try:
        yield server
    finally:
        server.stop()
