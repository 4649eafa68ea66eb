"""Load on the cluster setup: gunicorn (gthread) with 1, 4 and 8 workers,
progress in memcached, files stored into S3 (a moto server), against the same
load on plain Flask (``request.files``) and Django (``request.FILES``) apps on
the same server.

Every run sends the same uploads (log-uniform sizes, a few large ones, a
fixed total) with a fixed number in flight; for uploadkit a poller reads the
progress of the uploads in flight through the status route meanwhile. Reported
per app and worker count: uploads/s, MB/s, p50/p99 upload latency, p50/p99
progress-poll latency, the workers' peak RSS, and failures.

Apps:

* ``uploadkit-s3``: ``UploadMiddleware`` with ``Storage("s3://...")`` and
  ``MemcachedStore`` (the setup operators run; tests/support/cluster_app.py);
* ``uploadkit-tmp``: the same middleware with its temp-file sink (what Flask
  and Django do with a large file), progress in memcached;
* ``uploadkit-plain``: the middleware with its defaults and no progress
  (sniffing, sha256, small files in memory, large ones in temp files): what
  Django's default upload path does, plus the sha256;
* ``flask``, ``django``: benchmarks/apps/flask_app.py and django_project;
* ``django-sha256``: the same Django view given what uploadkit does, the
  file's sha256, read back in the view (like for like).

Targets, at 4 workers: uploadkit-plain against django-sha256 (>= 1.0) and
against plain Django (>= 0.95), in uploads a second. After the pass over every
app and worker count, the three apps of the targets run ``--target-rounds``
more times at 4 workers, interleaved; a target is judged on the median of
each round's ratio (the two apps measured one after the other), as one run
of each moved by 20 % between full runs on a 2-core machine.

Usage::

    python -m benchmarks.bench_load [--quick] [--workers 1,4,8] [--threads 4]
        [--uploads 300] [--in-flight 32] [--total-mib 1024] [--rounds N] [--target-rounds N]
        [--apps uploadkit-s3,flask,...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import (
    MB, environment_line, fmt_ratio, log, md_table, median, paired_median, sigterm_as_exit, verdict, versions,
)
from .apps import TMPDIR_ENV

KiB = 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class LoadApp:
    key: str
    label: str
    target: str
    path: str
    progress: bool
    needs_s3: bool


APPS = {a.key: a for a in [
    LoadApp("uploadkit-s3", "uploadkit -> S3, progress in memcached", "tests.support.cluster_app:app",
            "/upload", True, True),
    LoadApp("uploadkit-tmp", "uploadkit -> temp file, progress in memcached", "tests.support.cluster_app:app",
            "/upload-local", True, True),
    LoadApp("uploadkit-plain", "uploadkit -> temp file, sha256, no progress", "benchmarks.apps.wsgi_apps:uploadkit_app",
            "/upload", False, False),
    LoadApp("flask", "Flask request.files", "benchmarks.apps.flask_app:app", "/upload", False, False),
    LoadApp("django", "Django request.FILES", "benchmarks.apps.django_project.wsgi:application",
            "/upload", False, False),
    LoadApp("django-sha256", "Django request.FILES + sha256 in the view",
            "benchmarks.apps.django_project.wsgi:application", "/upload-sha256", False, False),
]}

#: (app, against, target) in uploads a second, at TARGET_WORKERS workers.
TARGETS = (("uploadkit-plain", "django-sha256", 1.0), ("uploadkit-plain", "django", 0.95))
TARGET_WORKERS = 4


@dataclass
class RunResult:
    app: LoadApp
    workers: int
    uploads: int
    total: int
    seconds: float
    latencies: List[float]
    poll_latencies: List[float]
    peak_rss_mib: float
    failures: int


def pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value * 1000:,.0f}"


def run_one(app: LoadApp, workers: int, threads: int, sizes: List[int], in_flight: int,
            moto: Any, memcached: Any, workdir: str) -> RunResult:
    from tests.support.cluster import Cluster, Poller, build_body, http_post

    bucket = moto.create_bucket() if app.needs_s3 else "none"
    rundir = tempfile.mkdtemp(prefix=f"{app.key}-{workers}-", dir=workdir)
    cluster = Cluster(rundir, storage_url=f"s3://{bucket}/uploads", storage_options=moto.options(),
                      memcached=memcached.address, workers=workers, threads=threads, app=app.target,
                      extra_env={TMPDIR_ENV: os.path.join(rundir, "app-tmp"),
                                 "DJANGO_SETTINGS_MODULE": "benchmarks.apps.django_project.settings"})
    latencies: List[float] = []
    failures = 0
    lock = threading.Lock()
    active: set = set()

    def one(index: int) -> None:
        nonlocal failures
        body, ctype, _ = build_body(sizes[index], index)
        pid = f"bench-{index}"
        active.add(pid)
        t0 = time.perf_counter()
        try:
            status, _, _ = http_post(cluster.port, f"{app.path}?X-Progress-ID={pid}", body, ctype, timeout=300)
        except OSError:
            status = 0
        finally:
            active.discard(pid)
        took = time.perf_counter() - t0
        with lock:
            latencies.append(took)
            if status != 200:
                failures += 1

    with cluster:
        poller = Poller(cluster.port, active, threads=2) if app.progress else None
        if poller is not None:
            poller.start()
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(in_flight) as pool:
                list(pool.map(one, range(len(sizes))))
        finally:
            if poller is not None:
                poller.stop()
        seconds = time.perf_counter() - t0
        rss = cluster.peak_rss_mib()
    shutil.rmtree(rundir, ignore_errors=True)
    return RunResult(app, workers, len(sizes), sum(sizes), seconds, latencies,
                     poller.latencies if poller is not None else [], max(rss.values(), default=0.0), failures)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--workers", help="worker counts, comma-separated (default 1,4,8; quick 1,4)")
    parser.add_argument("--threads", type=int, default=4, help="gthread threads per worker (default 4)")
    parser.add_argument("--uploads", type=int, help="uploads per run (default 300; quick 40)")
    parser.add_argument("--in-flight", type=int, help="uploads in flight (default 32; quick 12)")
    parser.add_argument("--total-mib", type=int, help="total upload size in MiB (default 1024; quick 48)")
    parser.add_argument("--largest-mib", type=int, help="largest upload in MiB (default 50; quick 8)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every app and worker count, interleaved; medians reported (default 1)")
    parser.add_argument("--target-rounds", type=int,
                        help="extra interleaved runs of the targets' apps at 4 workers (default 2; quick 0)")
    parser.add_argument("--apps", default=",".join(APPS), help=f"comma-separated, from {', '.join(APPS)}")
    args = parser.parse_args(argv)
    quick = args.quick
    workers = [int(w) for w in (args.workers or ("1,4" if quick else "1,4,8")).split(",")]
    uploads = args.uploads or (40 if quick else 300)
    in_flight = args.in_flight or (12 if quick else 32)
    total = (args.total_mib or (48 if quick else 1024)) * MiB
    largest = (args.largest_mib or (8 if quick else 50)) * MiB
    apps = [APPS[k.strip()] for k in args.apps.split(",") if k.strip()]
    rounds = max(1, args.rounds)
    target_rounds = max(0, args.target_rounds if args.target_rounds is not None else (0 if quick else 2))

    from tests.support.cluster import MotoProcess, plan_sizes
    from tests.support.memcached import MemcachedServer, find_memcached

    sizes = plan_sizes(uploads, KiB, largest, total, large=3 if not quick else 1, seed=2024)
    workdir = tempfile.mkdtemp(prefix="uk-bench-load-")
    moto = MotoProcess(workdir)
    memcached = MemcachedServer(find_memcached())
    runs: Dict[Tuple[str, int], List[RunResult]] = {}
    try:
        with sigterm_as_exit():
            moto.start()
            memcached.start()
            passes = [(r, w, apps) for r in range(rounds) for w in workers]
            target_apps = [a for a in apps if any(a.key in t[:2] for t in TARGETS)]
            if TARGET_WORKERS in workers:
                passes += [(rounds + r, TARGET_WORKERS, target_apps) for r in range(target_rounds)]
            for r, w, these in passes:
                # Rotate the apps each round: none always runs first, on a cold page cache.
                shift = r % len(these)
                for app in these[shift:] + these[:shift]:
                    log(f"[bench_load] round {r + 1}/{rounds + target_rounds}: {app.key}, {w} worker(s) x "
                        f"{args.threads} threads: {uploads} uploads, {sum(sizes) / MiB:.0f} MiB, {in_flight} in flight")
                    result = run_one(app, w, args.threads, sizes, in_flight, moto, memcached, workdir)
                    log(f"[bench_load]   {result.uploads / result.seconds:,.1f} uploads/s, "
                        f"{result.failures} failed")
                    runs.setdefault((app.key, w), []).append(result)
    finally:
        memcached.stop()
        moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def rate(key: str, w: int) -> Optional[float]:
        got = runs.get((key, w))
        return median([x.uploads / x.seconds for x in got]) if got else None

    print(f"## Load: many workers ({'quick' if quick else 'full'} run"
          f"{f', median of {rounds} rounds' if rounds > 1 else ''})\n")
    print(f"{environment_line()}; {versions()}.\n")
    print(f"{uploads} uploads of 1 KiB to {largest // MiB} MiB (log-uniform, {sum(sizes) / MiB:.0f} MiB in all), "
          f"{in_flight} in flight, gunicorn gthread with {args.threads} threads a worker, all on 127.0.0.1. "
          "Poll latency: the status route read for uploads in flight, meanwhile. The S3 rows are bound by "
          "the S3 stand-in (moto, one process, one connection per request) and by three S3 requests per "
          "file (write, copy, delete): compare them with each other across worker counts, not with the "
          "temp-file rows.\n")
    rows = []
    for w in workers:
        for app in apps:
            got = runs.get((app.key, w))
            if not got:
                continue
            lat = [x for g in got for x in g.latencies]
            polls = [x for g in got for x in g.poll_latencies]
            rows.append([app.label, w, f"{rate(app.key, w) or 0:,.1f}",
                         f"{median([g.total / MB / g.seconds for g in got]):,.1f}",
                         ms(pct(lat, 0.5)), ms(pct(lat, 0.99)),
                         ms(pct(polls, 0.5)) if app.progress else "n/a",
                         ms(pct(polls, 0.99)) if app.progress else "n/a",
                         f"{max(g.peak_rss_mib for g in got):,.0f}", sum(g.failures for g in got)])
    print(md_table(["app", "workers", "uploads/s", "MB/s", "p50 ms", "p99 ms", "poll p50 ms", "poll p99 ms",
                    "peak RSS MiB", "failed"], rows, align="lrrrrrrrrr"))
    print()
    def paired(ours: str, theirs: str) -> Optional[float]:
        a, b = runs.get((ours, TARGET_WORKERS), []), runs.get((theirs, TARGET_WORKERS), [])
        return paired_median([x.uploads / x.seconds for x in a], [y.uploads / y.seconds for y in b])

    checks = []
    for ours, theirs, target in TARGETS:
        a, b, value = rate(ours, TARGET_WORKERS), rate(theirs, TARGET_WORKERS), paired(ours, theirs)
        if a is None or b is None or value is None:
            continue
        checks.append([f"{APPS[ours].label} / {APPS[theirs].label}", TARGET_WORKERS, fmt_ratio(a / b),
                       fmt_ratio(value), f">= {target:.2f}", verdict(value, target)])
    a = rate("uploadkit-tmp", TARGET_WORKERS)
    for theirs in ("django-sha256", "django"):
        b = rate(theirs, TARGET_WORKERS)
        if a is not None and b is not None:
            checks.append([f"{APPS['uploadkit-tmp'].label} / {APPS[theirs].label}", TARGET_WORKERS,
                           fmt_ratio(a / b), "", "", "info"])
    if checks:
        got = runs.get((TARGETS[0][0], TARGET_WORKERS)) or []
        print("### Targets\n")
        print("Uploads a second. uploadkit hashes every file (sha256) and, but in the `info` rows, reports "
              "no progress, like the Django apps; the `info` rows add progress in memcached, polled. "
              f"value = the ratio of the medians in the table above; paired = the median of each of the "
              f"{len(got)} rounds' ratio at {TARGET_WORKERS} workers (the two apps run one after the other "
              "in a round), which a target is judged on.\n")
        print(md_table(["ratio", "workers", "value", "paired", "target", "result"], checks, align="lrrrll"))
        print()
    return 1 if any(g.failures for got in runs.values() for g in got) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
