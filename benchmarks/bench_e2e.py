"""End to end: curl uploads one big file to gunicorn serving, in turn, an app
that only reads the body, uploadkit's middleware, Django, multipart and Flask.

Every server is a gunicorn master with one sync worker, started as a
subprocess in its own session on a socket this process bound to 127.0.0.1
(handed over as ``fd://N``, so there is no window in which another process
could take the port). All servers run side by side and the uploads go
round-robin over them, so background load hits every stack alike. Servers
are stopped by their process group id (the master's PID), on errors too.

Usage::

    python -m benchmarks.bench_e2e [--quick] [--runs N] [--size-mib N] [--apps read-1m,uploadkit,...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import (
    MB,
    RAM_DISK,
    environment_line,
    fmt_mib,
    fmt_rate,
    fmt_ratio,
    log,
    md_table,
    median,
    paired_median,
    sigterm_as_exit,
    verdict,
    versions,
)
from .apps import TMPDIR_ENV
from .bodies import KiB, MiB, write_payload

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/upload"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: The cores the worker and curl share.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class App:
    key: str
    label: str
    target: str  # gunicorn's module:callable
    kind: str  # "baseline", "uploadkit" or "peer"
    #: Temp files on a RAM disk (RAM_DISK) instead of the benchmark's temp dir.
    ram_disk: bool = False
    #: Extra environment for gunicorn and its worker.
    env: Tuple[Tuple[str, str], ...] = ()


#: glibc told to keep freed memory: no trimming of the heap's top, no mmap for
#: blocks under 16 MiB. By default glibc gives the top of the heap back to the
#: kernel once more than twice its mmap threshold (about 2 MiB after the first
#: 1 MiB block) is free there; a worker whose buffers all die between two reads
#: then faults every page of the next read's buffers in again. Whether that
#: happens depends on what else lives on the heap, so a read-only app runs at
#: one speed or another from one process to the next (see benchmarks/README.md).
KEEP_FREED_MEMORY = (("MALLOC_TRIM_THRESHOLD_", str(128 * 1024 * 1024)),
                     ("MALLOC_MMAP_THRESHOLD_", str(16 * 1024 * 1024)))
_KEPT = "glibc keeping freed memory"


APPS: Dict[str, App] = {a.key: a for a in [
    App("read-1m", "read-only app, 1 MiB reads", "benchmarks.apps.wsgi_apps:read_1m", "baseline"),
    App("read-1m-kept", f"read-only app, 1 MiB reads, {_KEPT}", "benchmarks.apps.wsgi_apps:read_1m", "baseline",
        env=KEEP_FREED_MEMORY),
    App("read-64k", "read-only app, 64 KiB reads", "benchmarks.apps.wsgi_apps:read_64k", "baseline"),
    App("by-hand", "read + sha256 + temp file, by hand (1 MiB reads, one thread, no parse)",
        "benchmarks.apps.wsgi_apps:read_sha256_write", "baseline"),
    App("by-hand-kept", f"the same by hand, {_KEPT}", "benchmarks.apps.wsgi_apps:read_sha256_write", "baseline",
        env=KEEP_FREED_MEMORY),
    App("uploadkit", "uploadkit UploadMiddleware (sha256 + sniffing, temp file)",
        "benchmarks.apps.wsgi_apps:uploadkit_app", "uploadkit"),
    App("uploadkit-ram", f"uploadkit, the same, temp file on a RAM disk ({RAM_DISK})",
        "benchmarks.apps.wsgi_apps:uploadkit_app", "uploadkit", ram_disk=True),
    App("uploadkit-kept", f"uploadkit, the same, {_KEPT}", "benchmarks.apps.wsgi_apps:uploadkit_app", "uploadkit",
        env=KEEP_FREED_MEMORY),
    App("django", "Django request.FILES", "benchmarks.apps.django_project.wsgi:application", "peer"),
    App("django-kept", f"Django request.FILES, {_KEPT}", "benchmarks.apps.django_project.wsgi:application", "peer",
        env=KEEP_FREED_MEMORY),
    App("multipart", "multipart.parse_form_data", "benchmarks.apps.wsgi_apps:multipart_app", "peer"),
    App("flask", "Flask request.files", "benchmarks.apps.flask_app:app", "peer"),
]}


class Server:
    """One gunicorn master + one sync worker serving ``app`` on 127.0.0.1."""

    def __init__(self, app: App, workdir: str) -> None:
        self.app = app
        self.tmpdir = os.path.join(workdir, f"tmp-{app.key}")
        #: The RAM-disk temp dir, removed in stop().
        self.ram_tmpdir: Optional[str] = None
        self.log_path = os.path.join(workdir, f"gunicorn-{app.key}.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        #: gunicorn's worker options (the tus benchmark runs gthread).
        self.worker_args = ["--workers", "1", "--worker-class", "sync"]

    def start(self, timeout: float = 60.0) -> None:
        os.makedirs(self.tmpdir, exist_ok=True)
        app_tmpdir = self.tmpdir
        if self.app.ram_disk:
            self.ram_tmpdir = app_tmpdir = tempfile.mkdtemp(prefix="uploadkit-bench-e2e-", dir=RAM_DISK)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            self.port = sock.getsockname()[1]
            fd = sock.fileno()
            env = dict(os.environ, TMPDIR=app_tmpdir, PYTHONWARNINGS="ignore",
                       DJANGO_SETTINGS_MODULE="benchmarks.apps.django_project.settings",
                       PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
            env[TMPDIR_ENV] = app_tmpdir
            env.update(self.app.env)
            cmd = [sys.executable, "-m", "gunicorn", *self.worker_args,
                   "--bind", f"fd://{fd}", "--timeout", "300", "--graceful-timeout", "5",
                   "--log-level", "warning", "--chdir", REPO_ROOT, self.app.target]
            with open(self.log_path, "wb") as logf:
                self.proc = subprocess.Popen(cmd, pass_fds=(fd,), cwd=REPO_ROOT, env=env,
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        finally:
            sock.close()  # gunicorn holds its own copy
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn for {self.app.key} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.request("GET", PATH)
                    resp = conn.getresponse()
                    payload = resp.read()
                finally:
                    conn.close()
                if resp.status == 200 and json.loads(payload).get("ready"):
                    return
                last = f"HTTP {resp.status}: {payload[:200]!r}"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn for {self.app.key} not ready after {timeout:.0f} s ({last}): "
                           f"{self.log_tail()}")

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def workers(self) -> List[int]:
        """The worker PIDs: the master forks them, so they are its children."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def worker_cpu_seconds(self) -> Optional[Tuple[float, float]]:
        """User and system time the workers used so far, all threads."""
        return cpu_seconds(self.workers())

    def worker_usage(self) -> Optional[Tuple[float, float, int]]:
        """User and system time and minor page faults of the workers so far, all threads."""
        return usage(self.workers())

    def worker_peak_rss_kib(self) -> Optional[int]:
        """VmHWM of the worker(s)."""
        peak = None
        for child in self.workers():
            try:
                with open(f"/proc/{child}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            peak = kib if peak is None else max(peak, kib)
            except (OSError, ValueError):
                continue
        return peak

    def stop(self) -> None:
        """SIGTERM to the server's process group (its session), SIGKILL if it
        lingers; then the RAM-disk temp dir goes."""
        try:
            self._stop()
        finally:
            if self.ram_tmpdir is not None:
                shutil.rmtree(self.ram_tmpdir, ignore_errors=True)
                self.ram_tmpdir = None

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc)


def log_tail(path: str) -> str:
    """The last 500 bytes of a server's log, for error messages."""
    try:
        with open(path, "rb") as f:
            return f.read()[-500:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def usage(pids: List[int]) -> Optional[Tuple[float, float, int]]:
    """User and system time and minor page faults these processes used so far,
    from ``/proc/<pid>/stat`` (process-wide: threads that ended are counted in),
    or None when none of them is there."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                found.append(f.read().rsplit(")", 1)[1].split())
        except OSError:
            continue
    if not found:
        return None
    return (sum(int(f[11]) for f in found) / _CLOCK_TICKS,  # utime
            sum(int(f[12]) for f in found) / _CLOCK_TICKS,  # stime
            sum(int(f[7]) for f in found))  # minflt


def cpu_seconds(pids: List[int]) -> Optional[Tuple[float, float]]:
    """User and system time these processes used so far (all their threads), or None."""
    used = usage(pids)
    return None if used is None else used[:2]


def stop_group(proc: "subprocess.Popen[bytes]") -> None:
    """SIGTERM to the process group ``proc`` leads (its session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)
    # Children outlive a dead leader for a moment (gunicorn's workers): make sure the group is gone.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Result:
    app: App
    mbps: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)
    #: The system part of each ``cpu``.
    system: List[float] = field(default_factory=list)
    #: The worker's minor page faults per upload.
    faults: List[int] = field(default_factory=list)
    #: curl's CPU seconds per upload (it runs on the same cores).
    client_cpu: List[float] = field(default_factory=list)
    #: Per upload, the fastest the worker's and curl's CPU time allow on this
    #: machine's cores, were it spread perfectly over them (MB/s).
    bound: List[float] = field(default_factory=list)
    rss_kib: Optional[int] = None
    error: Optional[str] = None

    @property
    def rate(self) -> Optional[float]:
        return None if self.error or not self.mbps else median(self.mbps)


def upload(server: Server, payload: str, expect_size: int, timeout: float) -> Tuple[float, float]:
    """One curl upload; returns MB/s of the request body and its size in MB.
    Raises on any mismatch."""
    out = os.path.join(os.path.dirname(server.tmpdir), f"response-{server.app.key}.json")
    cmd = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(timeout)),
           "-o", out, "-w", "%{http_code} %{time_total} %{size_upload}", "-H", "Expect:",
           "-F", f"file=@{payload};type=application/octet-stream",
           f"http://127.0.0.1:{server.port}{PATH}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"curl exit {proc.returncode}: {proc.stderr.strip()[:200]}")
    status, seconds, sent = proc.stdout.split()
    with open(out, "rb") as f:
        answer = f.read()
    if status != "200":
        raise RuntimeError(f"HTTP {status}: {answer[:200]!r}")
    size = json.loads(answer).get("size")
    body_size = int(float(sent))
    want = body_size if server.app.kind == "baseline" else expect_size
    if size != want:
        raise RuntimeError(f"the app saw {size} bytes, expected {want}")
    return body_size / MB / float(seconds), body_size / MB


def _children_cpu_seconds() -> float:
    """User + system time of this process's waited-for children (the curls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(apps: Sequence[App], size: int, runs: int, workdir: str) -> List[Result]:
    payload = write_payload(workdir, size)
    warmup = write_payload(workdir, 64 * KiB)
    results = [Result(a) for a in apps]
    servers: List[Server] = []
    timeout = 60 + size / (1 * MiB)  # 1 MB/s would be far slower than any stack here
    try:
        for r in results:
            server = Server(r.app, workdir)
            servers.append(server)
            try:
                server.start()
                upload(server, warmup, 64 * KiB, 60)
            except Exception as exc:
                r.error = str(exc)[:300]
                log(f"[e2e] {r.app.key}: {r.error}")
        for i in range(runs):
            shift = i % len(results)
            order = list(zip(results, servers))
            for r, server in order[shift:] + order[:shift]:
                if r.error:
                    continue
                try:
                    # Untimed: write back what the previous upload (or an
                    # earlier benchmark) left dirty, so each upload starts on
                    # an idle disk instead of paying for the one before.
                    os.sync()
                    before = server.worker_usage()
                    client_before = _children_cpu_seconds()
                    rate, body_mb = upload(server, payload, size, timeout)
                    r.mbps.append(rate)
                    r.client_cpu.append(_children_cpu_seconds() - client_before)
                    after = server.worker_usage()
                    used = ""
                    if before is not None and after is not None:
                        user, system = after[0] - before[0], after[1] - before[1]
                        r.cpu.append(user + system)
                        r.system.append(system)
                        r.faults.append(after[2] - before[2])
                        r.bound.append(body_mb / ((user + system + r.client_cpu[-1]) / CORES))
                        used = (f", worker CPU {user + system:.2f} s ({system:.2f} s system), "
                                f"{r.faults[-1]:,} minor faults")
                    used += f", curl CPU {r.client_cpu[-1]:.2f} s"
                    log(f"[e2e] run {i + 1}/{runs} {r.app.key}: {r.mbps[-1]:.0f} MB/s{used}")
                except Exception as exc:
                    r.error = str(exc)[:300]
                    log(f"[e2e] {r.app.key}: {r.error} {server.log_tail()}")
        for r, server in zip(results, servers):
            r.rss_kib = server.worker_peak_rss_kib()
    finally:
        for server in servers:
            server.stop()
    return results


def report(results: Sequence[Result], size: int, runs: int, quick: bool) -> str:
    by_key = {r.app.key: r for r in results}

    def series(key: str, what: str) -> List[float]:
        """An app's per-upload figures: ``mbps`` or ``bound``; empty when it failed."""
        r = by_key.get(key)
        return [] if r is None or r.error else list(getattr(r, what))

    def ratio(a: str, b: str, what: str = "mbps") -> Optional[float]:
        ours, theirs = series(a, what), series(b, "mbps")
        return median(ours) / median(theirs) if ours and theirs else None

    rows = []
    for r in results:
        if r.error:
            rows.append([r.app.label, "error", "", "", "", "", "", "", "", r.error[:120]])
            continue
        cpu = f"{median(r.cpu):.2f} ({median(r.system):.2f})" if r.cpu else "n/a"
        faults = f"{median(r.faults):,.0f}" if r.faults else "n/a"
        client = f"{median(r.client_cpu):.2f}" if r.client_cpu else "n/a"
        bound = fmt_rate(median(r.bound)) if r.bound else "n/a"
        rows.append([r.app.label, fmt_rate(r.rate), cpu, faults, client, bound, fmt_mib(r.rss_kib),
                     fmt_ratio(ratio(r.app.key, "read-1m")), fmt_ratio(ratio(r.app.key, "django")), ""])
    out = [f"## End to end behind gunicorn ({'quick' if quick else 'full'} run: median of {runs})", "",
           environment_line() + ".  ", versions() + ".", "",
           f"curl uploads one {size // MiB} MiB file (`-F file=@...`, no `Expect: 100-continue`) to "
           "gunicorn (1 sync worker) on 127.0.0.1; MB/s = request body bytes (10^6) per second as timed "
           "by curl; worker CPU s = the worker's user + system time per upload, its system part in "
           "brackets (less sensitive to other load than MB/s); minor faults = the worker's page faults "
           "per upload (pages it had to be given afresh); curl CPU s = the client's time on the same "
           f"cores; CPU bound = the body's MB over (worker CPU + curl CPU) / {CORES} cores: the fastest "
           "that work could go were it spread perfectly over the cores; peak RSS = the worker's VmHWM. "
           f"Rows \"{_KEPT}\": the same app with `" + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY)
           + "` in gunicorn's environment.", "",
           md_table(["app", "MB/s", "worker CPU s (system)", "minor faults", "curl CPU s", "CPU bound MB/s",
                     "worker peak RSS", "vs read-only (1 MiB)", "vs Django", "note"], rows, "lrrrrrrrrl"), ""]
    checks = []

    def check(name: str, a: str, b: str, target: Optional[float], what: str = "mbps") -> None:
        value = ratio(a, b, what)
        if value is None:
            return
        judged = paired_median(series(a, what), series(b, "mbps"))
        judged = value if judged is None else judged
        checks.append([name, fmt_ratio(value), fmt_ratio(judged),
                       f">= {target:.2f}" if target is not None else "",
                       verdict(judged, target) if target is not None else "info"])

    # The middleware reads 1 MiB at a time (after a short ramp from 64 KiB),
    # so its ceiling is the read-only app at 1 MiB reads.
    check("uploadkit / read-only app, same read size (1 MiB): the server's ceiling", "uploadkit", "read-1m", 0.90)
    # The ceiling's own speed depends on whether glibc trims the worker's heap
    # between reads (its minor faults show which); kept, it is the server's.
    check(f"uploadkit / read-only app (1 MiB), both {_KEPT}", "uploadkit-kept", "read-1m-kept", None)
    # What the CPU time allows: uploadkit's worker hashes on a second thread
    # and curl needs a core too, so two cores bound the upload, not one thread.
    check("uploadkit's CPU bound / read-only app (1 MiB): the most its CPU time allows", "uploadkit", "read-1m",
          None, "bound")
    check(f"the same, both {_KEPT}", "uploadkit-kept", "read-1m-kept", None, "bound")
    check("uploadkit / read + sha256 + temp file by hand", "uploadkit", "by-hand", None)
    check(f"the same, both {_KEPT}", "uploadkit-kept", "by-hand-kept", None)
    check("read + sha256 + temp file by hand / read-only app (1 MiB)", "by-hand", "read-1m", None)
    check("uploadkit, temp file on a RAM disk / read-only app (1 MiB)", "uploadkit-ram", "read-1m", None)
    check("uploadkit / Django", "uploadkit", "django", 2.0)
    check(f"the same, both {_KEPT}", "uploadkit-kept", "django-kept", None)
    for key in ("multipart", "flask"):
        check(f"uploadkit / {APPS[key].label}", "uploadkit", key, None)
    if checks:
        out += ["### Targets", "", "`info`: shown, no target. value = the ratio of the medians above; paired = "
                "the median of each round's ratio (the apps' uploads of a round run one after the other, the "
                "order rotating), which a target is judged on.", "",
                md_table(["ratio", "value", "paired", "target", "result"], checks, "lrrll"), ""]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run of a 64 MiB file")
    p.add_argument("--runs", type=int, help="uploads per app (default 5, 1 with --quick)")
    p.add_argument("--size-mib", type=int, help="uploaded file size in MiB (default 256, 64 with --quick)")
    p.add_argument("--apps", default=",".join(APPS), help="comma-separated: " + ",".join(APPS)
                   + f" (uploadkit-ram: temp files in {RAM_DISK}, left out where there is none)")
    p.add_argument("--tmpdir", help="where the payload and temp files go (default: the system temp dir)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if shutil.which("curl") is None:
        log("[e2e] curl is required (apt-get install curl)")
        return 2
    runs = args.runs or (1 if args.quick else 5)
    size = (args.size_mib or (64 if args.quick else 256)) * MiB
    apps = [APPS[k.strip()] for k in args.apps.split(",") if k.strip()]
    if not os.path.isdir(RAM_DISK):
        dropped = [a.key for a in apps if a.ram_disk]
        apps = [a for a in apps if not a.ram_disk]
        if dropped:
            log(f"[e2e] no RAM disk at {RAM_DISK}: {', '.join(dropped)} left out")
    with sigterm_as_exit():
        workdir = tempfile.mkdtemp(prefix="uploadkit-bench-e2e-", dir=args.tmpdir)
        try:
            results = run(apps, size, runs, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, size, runs, args.quick), flush=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
