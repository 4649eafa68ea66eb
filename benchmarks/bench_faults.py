"""Faults under load: the cluster setup (gunicorn gthread, progress in
memcached, files into S3 on a moto server behind a loopback proxy) at 4 and 8
workers, with every fault the code guards against injected once, at
spread-out moments of one load run per worker count:

1. a worker serving an upload in flight SIGKILLed (by its PID);
2. memcached SIGKILLed (by its PID) and started again on the same port a few
   seconds later;
3. an S3 outage: the proxy in front of moto cut (every connection reset, new
   ones refused) for a few seconds, then restored;
4. slowloris clients: headers and part of a body, then silence, which
   ``Limits.idle_timeout`` (here 2 s) refuses with 408;
5. an S3 blackhole (the proxy stops forwarding, closing nothing), which the
   storage deadline refuses with 503. Injected only where the proxy can do it
   (``TcpProxy.blackhole``, from the storage-deadline change); elsewhere the
   report says it was not injected.

The load clients send uploads back to back while the faults come and go, and
retry once an upload that was refused with 503 or 408 or whose connection
dropped; a poller reads the progress of the uploads in flight meanwhile.
Reported per worker count: uploads/s, MB/s, p50/p99 upload latency (answered
uploads), p50/p99 progress-poll latency, how every request ended (first
attempts and retries apart), and what S3 holds afterwards, read from moto
directly, not through the proxy:

* **lost**: an upload answered 2xx with a key whose object is missing;
* **corrupted**: an answered upload whose object (or the sha256 in its
  answer) differs from the bytes its client sent, by sha256;
* **orphans**: objects under final keys that no client was told about, once
  the background reaper had up to 30 s to remove what refused uploads left.

Targets: lost, corrupted and orphans all 0. What a killed worker or an outage
leaves in the temp area (temp keys, a pending multipart upload, a temp file)
is counted as information, then reclaimed by ``uploadkit cleanup``, run once
the load is over.

Usage::

    python -m benchmarks.bench_faults [--quick] [--workers 4,8] [--threads 4] [--in-flight 12]
        [--duration 30] [--idle-timeout 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import MB, environment_line, log, md_table, sigterm_as_exit, versions
from .bench_load import ms, pct

KiB = 1024
MiB = 1024 * 1024


@dataclass
class Attempt:
    """One request of the run and how it ended."""

    index: int
    progress_id: str
    size: int
    sha256: str
    retry: bool = False
    outcome: str = ""
    status: Optional[int] = None
    key: Optional[str] = None
    answered_sha256: Optional[str] = None
    seconds: float = 0.0
    #: When it ended, in seconds since the run began.
    ended_at: float = 0.0


@dataclass
class Fault:
    name: str
    short: str
    start: float = 0.0
    end: float = 0.0
    detail: str = ""
    injected: bool = True


@dataclass
class Plan:
    """The timing of one run: seconds before the first fault and between
    faults, how long memcached and S3 stay down, and the load after the last."""

    lead: float
    gap: float
    memcached_down: float
    s3_down: float
    slowloris: int
    victim_size: int
    tail: float
    duration: float


@dataclass
class FaultRun:
    workers: int
    seconds: float
    attempts: List[Attempt]
    faults: List[Fault]
    poll_latencies: List[float]
    poll_ends: Dict[str, int]
    lost: List[str]
    corrupted: List[str]
    orphans: List[str]
    #: Orphans holding the bytes of an upload the killed worker was serving.
    unanswered: int
    orphan_wait: float
    leftovers: Dict[str, int]
    cleanup: str
    after_cleanup: Dict[str, int]
    #: What cleanup left, named.
    left_keys: List[str]
    slowloris: List[Tuple[str, float]] = field(default_factory=list)


def _post(port: int, target: str, body: bytes, ctype: str, timeout: float) -> Tuple[int, Dict[str, str], bytes]:
    from tests.support.cluster import http_post

    return http_post(port, target, body, ctype, timeout=timeout)


def _ended(exc: BaseException) -> str:
    from tests.support.cluster import ConnectionDropped

    if isinstance(exc, (ConnectionDropped, ConnectionResetError, BrokenPipeError)):
        return "dropped"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "client timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"error {type(exc).__name__}"


def _served_by(statedir: str, progress_id: str) -> Optional[int]:
    try:
        with open(os.path.join(statedir, f"serving-{progress_id}")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _record_answer(a: Attempt, status: int, raw: bytes) -> None:
    a.status = status
    if 200 <= status < 300:
        a.outcome = "2xx"
        try:
            info = json.loads(raw)["files"][0]
            a.key, a.answered_sha256 = str(info["key"]), str(info["sha256"])
        except (ValueError, KeyError, IndexError, TypeError):
            a.outcome = "2xx without a key"
    else:
        try:
            code = str(json.loads(raw)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            code = "no JSON error"
        a.outcome = f"{status} {code}"


def _retryable(a: Attempt) -> bool:
    """Refused by a fault that is over by then, or soon: a 503, a 408, a dropped connection."""
    return a.status in (503, 408) or a.outcome.startswith("dropped")


def run_faults(workers: int, threads: int, in_flight: int, plan: Plan, idle_timeout: float,
               storage_timeout: float, sizes: List[int], moto: Any, memcached: Any, workdir: str) -> FaultRun:
    from tests.support.cluster import Cluster, Poller, TcpProxy, _read_all, build_body

    bucket = moto.create_bucket()
    rundir = tempfile.mkdtemp(prefix=f"faults-{workers}-", dir=workdir)
    proxy = TcpProxy(moto.port)
    proxy.start()
    # s3fs retries a failed call for about 2 s on top of botocore's attempts:
    # connect and read bounds keep an outage's refusals within seconds.
    options = moto.options(endpoint_url=proxy.url, config_kwargs={
        "connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2}})
    cluster = Cluster(rundir, storage_url=f"s3://{bucket}/uploads", storage_options=options,
                      memcached=memcached.address, workers=workers, threads=threads, retry_after=0.5,
                      extra_env={"UPLOADKIT_CLUSTER_IDLE_TIMEOUT": str(idle_timeout),
                                 # read by the app where storage has a deadline (Storage(timeout=...))
                                 "UPLOADKIT_CLUSTER_STORAGE_TIMEOUT": str(storage_timeout)})
    attempts: List[Attempt] = []
    faults: List[Fault] = []
    slow: List[Tuple[str, float]] = []
    lock = threading.Lock()
    active: Set[str] = set()
    counter = itertools.count()
    stop_sending = threading.Event()
    killed: List[int] = []
    seed0 = workers * 1_000_000

    def attempt(index: int, retry: bool) -> Attempt:
        size = sizes[index % len(sizes)]
        body, ctype, digest = build_body(size, seed0 + index)
        a = Attempt(index, f"w{workers}-{index}{'-r' if retry else ''}", size, digest, retry)
        active.add(a.progress_id)
        t0 = time.perf_counter()
        try:
            status, _, raw = _post(cluster.port, f"/upload?X-Progress-ID={a.progress_id}", body, ctype, 120)
            _record_answer(a, status, raw)
        except OSError as exc:
            a.outcome = _ended(exc)
        finally:
            active.discard(a.progress_id)
            a.seconds = time.perf_counter() - t0
            a.ended_at = now()
        if a.outcome == "dropped":
            served = _served_by(cluster.statedir, a.progress_id)
            if served is None:  # accepted by a worker that never began it: the killed one's queue
                a.outcome = "dropped (not yet served)"
            elif served in killed:
                a.outcome = "dropped (killed worker)"
        with lock:
            attempts.append(a)
        return a

    def client() -> None:
        while not stop_sending.is_set():
            index = next(counter)
            if _retryable(attempt(index, False)):
                time.sleep(0.2)
                attempt(index, True)

    t_start = 0.0

    def now() -> float:
        return time.monotonic() - t_start

    def kill_worker() -> Fault:
        """An upload of our own, sent in part, whose worker is killed while it reads."""
        f = Fault("worker SIGKILLed mid-upload", "worker kill", now())
        index = 10_000_000 + next(counter)
        body, ctype, digest = build_body(plan.victim_size, seed0 + index)
        a = Attempt(index, f"w{workers}-victim", plan.victim_size, digest)
        head = (f"POST /upload?X-Progress-ID={a.progress_id} HTTP/1.1\r\nHost: 127.0.0.1:{cluster.port}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=30) as s:
            s.sendall(head + body[:len(body) // 3])
            pid = cluster.serving_pid(a.progress_id)
            time.sleep(0.2)  # let it read and store some of what was sent
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
            try:
                s.sendall(body[len(body) // 3:])
            except OSError:
                pass
            raw = _read_all(s)
        a.seconds = time.perf_counter() - t0
        a.ended_at = now()
        if raw:
            from tests.support.cluster import parse_response

            status, _, rest = parse_response(raw)
            _record_answer(a, status, rest)
        else:
            a.outcome = "dropped (killed worker)"
        with lock:
            attempts.append(a)
        if _retryable(a):
            attempt(index, True)
        f.end = now()
        f.detail = f"worker {pid} killed while reading a {plan.victim_size // MiB} MiB upload"
        return f

    def memcached_outage() -> Fault:
        f = Fault("memcached SIGKILLed, restarted on its port", "memcached", now())
        pid = memcached.proc.pid
        memcached.stop()  # SIGKILL to its PID
        time.sleep(plan.memcached_down)
        memcached.start()
        f.end = now()
        f.detail = f"memcached {pid} killed; down {f.end - f.start:.1f} s"
        return f

    def s3_outage() -> Fault:
        f = Fault("S3 outage (connections reset)", "S3 cut", now())
        proxy.cut()
        time.sleep(plan.s3_down)
        proxy.restore()
        f.end = now()
        f.detail = f"proxy cut for {f.end - f.start:.1f} s"
        return f

    def slowloris() -> Fault:
        f = Fault(f"{plan.slowloris} slowloris clients", "slowloris", now())

        def one(n: int) -> None:
            body, ctype, _ = build_body(256 * KiB, seed0 + 20_000_000 + n)
            pid = f"w{workers}-slow-{n}"
            head = (f"POST /upload?X-Progress-ID={pid} HTTP/1.1\r\nHost: 127.0.0.1:{cluster.port}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", cluster.port), timeout=idle_timeout + 30) as s:
                    s.sendall(head + body[:16 * KiB])  # then nothing
                    raw = _read_all(s)
                from tests.support.cluster import parse_response

                if raw:
                    seen = Attempt(n, pid, 0, "")
                    status, _, rest = parse_response(raw)
                    _record_answer(seen, status, rest)
                    ended = seen.outcome
                else:
                    ended = "dropped"
            except OSError as exc:
                ended = _ended(exc)
            with lock:
                slow.append((ended, time.monotonic() - t0))

        clients = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(plan.slowloris)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=idle_timeout + 60)
        f.end = now()
        ends: Dict[str, int] = {}
        for ended, _ in slow:
            ends[ended] = ends.get(ended, 0) + 1
        took = [t for _, t in slow]
        f.detail = (", ".join(f"{n} x {e}" for e, n in sorted(ends.items()))
                    + (f", answered in {min(took):.1f} to {max(took):.1f} s" if took else ""))
        return f

    def blackhole() -> Fault:
        """The S3 blackhole: where the proxy can drop packets without closing."""
        f = Fault("S3 blackhole (nothing forwarded, nothing closed)", "S3 blackhole", now())
        hole: Optional[Callable[[], None]] = getattr(proxy, "blackhole", None)
        heal: Optional[Callable[[], None]] = getattr(proxy, "heal", None)
        if hole is None or heal is None:
            f.injected = False
            f.end = f.start
            f.detail = "not injected: this tree's proxy cannot blackhole (TcpProxy.blackhole)"
            return f
        hole()
        time.sleep(storage_timeout + 1.0)
        heal()
        f.end = now()
        f.detail = f"blackholed for {f.end - f.start:.1f} s (storage deadline {storage_timeout:g} s)"
        return f

    def injector() -> None:
        time.sleep(plan.lead)
        for inject in (kill_worker, memcached_outage, s3_outage, slowloris, blackhole):
            fault = inject()
            log(f"[bench_faults]   {fault.start:5.1f} s {fault.name}: {fault.detail}")
            faults.append(fault)
            if fault.injected:
                time.sleep(plan.gap)
        time.sleep(max(plan.tail, plan.duration - now()))
        stop_sending.set()

    with cluster:
        poller = Poller(cluster.port, active, threads=2)
        poller.start()
        t_start = time.monotonic()
        sab = threading.Thread(target=injector, daemon=True)
        sab.start()
        pool = [threading.Thread(target=client, daemon=True) for _ in range(in_flight)]
        try:
            for t in pool:
                t.start()
            sab.join(timeout=600)
            stop_sending.set()
            for t in pool:
                t.join(timeout=180)
        finally:
            stop_sending.set()
            poller.stop()
        seconds = time.monotonic() - t_start
        if len(faults) < 5:
            raise RuntimeError(f"only {len(faults)} of 5 faults ran: {cluster.log_tail()}")

        # What S3 holds, from moto directly. The reaper removes in the
        # background what refused uploads left under final keys.
        acked = {f"uploads/{a.key}": a for a in attempts if a.outcome == "2xx"}
        by_digest: Dict[str, List[Attempt]] = {}
        for a in attempts:
            by_digest.setdefault(a.sha256, []).append(a)
        whose: Dict[str, List[Attempt]] = {}
        t0 = time.monotonic()
        while True:
            keys = moto.keys(bucket, "uploads/")
            final = {k: v for k, v in keys.items() if "/.uploadkit-tmp/" not in k}
            orphans = sorted(set(final) - set(acked))
            for key in orphans:
                if key not in whose:
                    whose[key] = by_digest.get(moto.sha256(bucket, key), [])
            # Committed by the killed worker, which died before it answered: no reaper knows of it.
            unreaped = [k for k in orphans if any(a.outcome == "dropped (killed worker)" for a in whose[k])]
            # Multipart uploads aimed at final keys: the reaper aborts those of refused
            # uploads once S3 answers; those of the killed worker's uploads stay.
            aimed = [u for u in moto.pending_uploads(bucket) if "/.uploadkit-tmp/" not in u["Key"]]
            killed_uploads = sum(1 for a in attempts if a.outcome == "dropped (killed worker)")
            settled = len(orphans) == len(unreaped) and len(aimed) <= killed_uploads
            if settled or time.monotonic() - t0 > 30:
                break
            time.sleep(0.5)
        orphan_wait = time.monotonic() - t0
        lost, corrupted = [], []
        for key, a in sorted(acked.items()):
            if key not in final:
                lost.append(key)
            elif final[key] != a.size or a.answered_sha256 != a.sha256 or moto.sha256(bucket, key) != a.sha256:
                corrupted.append(key)
        # Whose bytes each orphan holds, and how that request ended.
        unanswered = len(unreaped)
        for n, key in enumerate(orphans):
            orphans[n] = key + (" (" + "; ".join(f"{a.progress_id}: {a.outcome} at {a.ended_at:.1f} s, "
                                                 f"during {_during(a, faults)}" for a in whose[key]) + ")"
                                if whose[key] else " (bytes of no request of the run)")
        duplicates = len([a for a in attempts if a.outcome == "2xx"]) - len(acked)
        lost += [f"(a key answered twice) x {duplicates}"] if duplicates else []
        leftovers = {"temp keys": len(keys) - len(final), "multipart uploads": len(moto.pending_uploads(bucket)),
                     "temp files": len(cluster.temp_files())}
        cleanup = _cleanup(moto, bucket, cluster.tempdir)
        keys = moto.keys(bucket, "uploads/")
        still = {"temp keys": sum(1 for k in keys if "/.uploadkit-tmp/" in k),
                 "multipart uploads": len(moto.pending_uploads(bucket)), "temp files": len(cluster.temp_files())}
        left_keys = sorted(f"multipart upload {up['Key']}" for up in moto.pending_uploads(bucket))
        left_keys += sorted(f"temp key {k}" for k in keys if "/.uploadkit-tmp/" in k)
        if sorted(k for k in keys if "/.uploadkit-tmp/" not in k) != sorted(final):
            raise RuntimeError("uploadkit cleanup touched a final key")
    proxy.stop()
    shutil.rmtree(rundir, ignore_errors=True)
    ends: Dict[str, int] = {}
    for s in poller.statuses:
        ends[str(s)] = ends.get(str(s), 0) + 1
    if poller.errors:
        ends["dropped"] = len(poller.errors)
    return FaultRun(workers, seconds, attempts, faults, list(poller.latencies), ends, lost, corrupted,
                    orphans, unanswered, orphan_wait, leftovers, cleanup, still, left_keys, slow)


def _cleanup(moto: Any, bucket: str, tempdir: str) -> str:
    """``uploadkit cleanup`` over the bucket and the app's temp dir, everything
    older than 0 s (the load is over): its summary line."""
    import contextlib
    import io

    from uploadkit import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["cleanup", "--tempdir", tempdir, "--storage", f"s3://{bucket}/uploads",
                       "--older-than", "0s", "--storage-option", f"endpoint_url={moto.endpoint_url}",
                       "--storage-option", "key=testing", "--storage-option", "secret=testing",
                       "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',
                       "--storage-option", "skip_instance_cache=true"])
    summary = [line for line in out.getvalue().splitlines() if line.startswith("cleanup:")]
    if rc != 0 or not summary:
        raise RuntimeError(f"uploadkit cleanup failed ({rc}): {out.getvalue()[-500:]}")
    return summary[-1].split("(")[0].strip().removeprefix("cleanup: ").rstrip(",")


#: Seconds after a fault ends within which a refusal is still put down to it:
#: s3fs retries a failed call for about 2 s, and a read deadline runs out late.
AFTERMATH = 4.0


#: The faults that can end a request this way (any fault for other ends).
CAUSES = {"503 storage_unavailable": ("S3 cut", "S3 blackhole"), "dropped (killed worker)": ("worker kill",),
          "dropped (not yet served)": ("worker kill",), "dropped": ("worker kill",)}


def _during(a: Attempt, faults: List[Fault]) -> str:
    """The latest fault able to end ``a`` as it ended that ``a`` ended in, or just after."""
    causes = CAUSES.get(a.outcome)
    for f in reversed(faults):
        if (f.injected and f.start <= a.ended_at <= f.end + AFTERMATH
                and (causes is None or f.short in causes)):
            return f.short
    return "none"


def _plan(quick: bool, duration: Optional[float]) -> Plan:
    if quick:
        return Plan(lead=1.0, gap=0.8, memcached_down=1.5, s3_down=2.5, slowloris=4, victim_size=12 * MiB,
                    tail=1.0, duration=duration or 0.0)
    return Plan(lead=3.0, gap=3.0, memcached_down=3.0, s3_down=4.0, slowloris=8, victim_size=32 * MiB,
                tail=4.0, duration=duration or 30.0)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run, well under a minute")
    parser.add_argument("--workers", default="4,8", help="worker counts, comma-separated (default 4,8)")
    parser.add_argument("--threads", type=int, default=4, help="gthread threads per worker (default 4)")
    parser.add_argument("--in-flight", type=int, help="load clients, each one upload at a time (default 16; quick 8)")
    parser.add_argument("--duration", type=float,
                        help="seconds of load at least, faults included (default 30; quick: the faults' own time)")
    parser.add_argument("--idle-timeout", type=float, default=2.0, help="Limits.idle_timeout of the app (default 2)")
    parser.add_argument("--storage-timeout", type=float, default=3.0,
                        help="the app's storage deadline, where storage has one (default 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    in_flight = args.in_flight or (8 if quick else 16)
    plan = _plan(quick, args.duration)

    from tests.support.cluster import MotoProcess, plan_sizes
    from tests.support.memcached import MemcachedServer, find_memcached

    largest = 4 * MiB if quick else 8 * MiB
    sizes = plan_sizes(400, KiB, largest, 200 * MiB if quick else 400 * MiB, large=4, seed=1313)
    workdir = tempfile.mkdtemp(prefix="uk-bench-faults-")
    moto = MotoProcess(workdir)
    memcached = MemcachedServer(find_memcached())
    runs: List[FaultRun] = []
    try:
        with sigterm_as_exit():
            moto.start()
            memcached.start()
            for w in workers:
                log(f"[bench_faults] {w} worker(s) x {args.threads} threads, {in_flight} clients, "
                    f"five faults, idle timeout {args.idle_timeout:g} s")
                run = run_faults(w, args.threads, in_flight, plan, args.idle_timeout, args.storage_timeout,
                                 sizes, moto, memcached, workdir)
                acked = sum(1 for a in run.attempts if a.outcome == "2xx")
                log(f"[bench_faults]   {acked} stored in {run.seconds:.1f} s; lost {len(run.lost)}, "
                    f"corrupted {len(run.corrupted)}, orphans {len(run.orphans)}")
                runs.append(run)
    finally:
        memcached.stop()
        moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"## Faults under load ({'quick' if quick else 'full'} run)\n")
    print(f"{environment_line()}; {versions()}.\n")
    print(f"{in_flight} clients sending uploads of 1 KiB to {largest // MiB} MiB (log-uniform) back to back to "
          f"gunicorn gthread ({args.threads} threads a worker) -> S3 (moto behind a loopback proxy), progress in "
          f"memcached, polled meanwhile; `Limits.idle_timeout` {args.idle_timeout:g} s. Each fault once per run, "
          "one after the other; a client retries once after a 503, a 408 or a dropped connection. Latencies "
          "of the uploads answered 2xx, retries included; the run's time includes the faults.\n")
    rows = []
    for r in runs:
        ok = [a for a in r.attempts if a.outcome == "2xx"]
        polls = r.poll_ends
        rows.append([r.workers, f"{r.seconds:.1f}", len(ok), f"{len(ok) / r.seconds:,.1f}",
                     f"{sum(a.size for a in ok) / MB / r.seconds:,.1f}",
                     ms(pct([a.seconds for a in ok], 0.5)), ms(pct([a.seconds for a in ok], 0.99)),
                     ms(pct(r.poll_latencies, 0.5)), ms(pct(r.poll_latencies, 0.99)),
                     ", ".join(f"{k}: {v}" for k, v in sorted(polls.items()))])
    print(md_table(["workers", "run s", "stored", "uploads/s", "MB/s", "p50 ms", "p99 ms", "poll p50 ms",
                    "poll p99 ms", "polls by status"], rows, align="rrrrrrrrrl"))
    print()
    print("### Faults\n")
    print(md_table(["workers", "fault", "at s", "for s", "what happened"],
                   [[r.workers, f.name, f"{f.start:.1f}" if f.injected else "-",
                     f"{f.end - f.start:.1f}" if f.injected else "-", f.detail]
                    for r in runs for f in r.faults], align="rlrrl"))
    print()
    print("### How each request ended\n")
    outcomes = sorted({a.outcome for r in runs for a in r.attempts},
                      key=lambda o: (o != "2xx", o))
    end_rows = []
    for r in runs:
        for o in outcomes:
            first = sum(1 for a in r.attempts if a.outcome == o and not a.retry)
            again = sum(1 for a in r.attempts if a.outcome == o and a.retry)
            faults: Dict[str, int] = {}
            for a in r.attempts:
                if a.outcome == o and o != "2xx":
                    faults[_during(a, r.faults)] = faults.get(_during(a, r.faults), 0) + 1
            if first or again:
                end_rows.append([r.workers, o, first, again,
                                 ", ".join(f"{k} {v}" for k, v in faults.items()) or "-"])
        for ended in sorted({e for e, _ in r.slowloris}):
            end_rows.append([r.workers, f"slowloris: {ended}", sum(1 for e, _ in r.slowloris if e == ended), "-",
                             "slowloris"])
    print(md_table(["workers", "ended", "first attempts", "retries", "fault (ended in it or up to 4 s after)"], end_rows,
                   align="rlrrl"))
    print()
    print("### What S3 holds\n")
    print("Read from moto directly: every upload answered 2xx, its object's sha256 against the bytes its "
          "client sent. Orphans counted after waiting for the background reaper (up to 30 s, or until only "
          "orphans no reaper knows of are left, and no more multipart uploads at final keys than the killed "
          "worker was serving uploads). What the "
          "killed worker and the outages left unfinished (temp keys; multipart uploads, which are not objects) "
          "is for "
          "`uploadkit cleanup`, run once the load is over with `--older-than 0s` (it aborts multipart uploads "
          "in the temp area only). An orphan \"killed "
          "unanswered\" holds the bytes of an upload the SIGKILLed worker was serving: it committed the file "
          "and died before it answered, so its client saw a dropped connection (and may have sent the file "
          "again). No process is left that knows of it.\n")
    print(md_table(["workers", "answered 2xx", "lost", "corrupted", "orphans", "of them, killed unanswered",
                    "reaper wait s", "left for cleanup", "`uploadkit cleanup`", "left after it"],
                   [[r.workers, sum(1 for a in r.attempts if a.outcome == "2xx"), len(r.lost), len(r.corrupted),
                     len(r.orphans), r.unanswered, f"{r.orphan_wait:.1f}",
                     ", ".join(f"{v} {k}" for k, v in r.leftovers.items()), r.cleanup,
                     sum(r.after_cleanup.values())] for r in runs], align="rrrrrrrllr"))
    print()
    for r in runs:
        for what, keys in (("lost", r.lost), ("corrupted", r.corrupted), ("orphans", r.orphans)):
            if keys:
                print(f"{r.workers} workers, {what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}\n")
        if r.left_keys:
            print(f"{r.workers} workers, left after `uploadkit cleanup`: {', '.join(r.left_keys[:5])}"
                  f"{' ...' if len(r.left_keys) > 5 else ''}\n")
    print("### Targets\n")
    checks = []
    for r in runs:
        for what, keys in (("lost files", r.lost), ("corrupted files", r.corrupted), ("orphans", r.orphans)):
            checks.append([what, r.workers, len(keys), "== 0", "PASS" if not keys else "MISS"])
    print(md_table(["measure", "workers", "value", "target", "result"], checks, align="lrrll"))
    print()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
