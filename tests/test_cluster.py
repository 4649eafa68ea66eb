"""The setup operators run, under load: gunicorn with several gthread workers,
progress shared through a real memcached, files stored into a real
S3-compatible server (moto), everything on 127.0.0.1.

Hundreds of uploads (1 KiB to 50 MiB, log-uniform, a few large ones) go in
with a few dozen in flight, each with its own progress id, while pollers read
every upload's progress through the status route (so mostly from a worker
other than the one receiving it). Afterwards every byte is accounted for.

Sizes scale with environment variables for longer runs:
``UPLOADKIT_CLUSTER_UPLOADS`` (default 200), ``UPLOADKIT_CLUSTER_BUDGET_MIB``
(total bytes, default 400) and ``UPLOADKIT_CLUSTER_IN_FLIGHT`` (default 24).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


from tests.support.cluster import (KiB, MiB, Cluster, MotoProcess, Poller, Upload,  # noqa: F401
                                   module_memcached, moto_process, plan_sizes, run_upload, settle)
from tests.support.memcached import MemcachedServer

UPLOADS = int(os.environ.get("UPLOADKIT_CLUSTER_UPLOADS", "200"))
BUDGET = int(os.environ.get("UPLOADKIT_CLUSTER_BUDGET_MIB", "400")) * MiB
IN_FLIGHT = int(os.environ.get("UPLOADKIT_CLUSTER_IN_FLIGHT", "24"))
WORKERS = 4
THREADS = 6
PEAK_RSS_LIMIT_MIB = 200


def test_many_workers_memcached_progress_s3_storage_nothing_lost(
        moto_process: MotoProcess, module_memcached: MemcachedServer,  # noqa: F811
        tmp_path: Any) -> None:
    bucket = moto_process.create_bucket()
    sizes = plan_sizes(UPLOADS, 1 * KiB, 50 * MiB, BUDGET, large=5, seed=20240601)
    uploads = [Upload(i, size, f"load-{i}") for i, size in enumerate(sizes)]
    cluster = Cluster(str(tmp_path), storage_url=f"s3://{bucket}/uploads",
                      storage_options=moto_process.options(), memcached=module_memcached.address,
                      workers=WORKERS, threads=THREADS)
    with cluster:
        active: set = set()
        poller = Poller(cluster.port, active, threads=4).start()
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(IN_FLIGHT) as pool:
                done = list(pool.map(lambda u: settle(cluster.port, run_upload(cluster.port, u, active=active)),
                                     uploads))
        finally:
            poller.stop()
        elapsed = time.perf_counter() - t0
        finals = {u.progress_id: u.final["state"] if u.final else None for u in done}
        rss = cluster.peak_rss_mib()
        temp_files = cluster.temp_files()
        log_tail = cluster.log_tail()

    total = sum(sizes)
    print(f"\ncluster: {len(done)} uploads, {total / MiB:.0f} MiB in {elapsed:.1f} s "
          f"({total / MiB / elapsed:.1f} MiB/s, {len(done) / elapsed:.1f} uploads/s), "
          f"{WORKERS} workers x {THREADS} threads, {IN_FLIGHT} in flight")
    print("peak RSS per worker (MiB): " + ", ".join(f"{pid}: {mib:.0f}" for pid, mib in sorted(rss.items())))
    polls = sum(len(v) for v in poller.answered_by.values())
    elsewhere = sum(1 for u in done for w in poller.answered_by.get(u.progress_id, []) if w != u.worker)
    lat = sorted(poller.latencies)
    print(f"polls: {polls}, answered by another worker than the receiving one: {elsewhere}; "
          f"poll latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")

    failed = [(u.index, u.size, u.status, u.error, u.answer) for u in done if u.status != 200]
    assert not failed, f"{len(failed)} uploads failed, e.g. {failed[:3]}\n{log_tail}"
    # The app saw the bytes the client sent.
    for u in done:
        (f,) = u.answer["files"]
        assert (f["size"], f["sha256"]) == (u.size, u.sha256), u.index
    # Stored exactly once each, nothing else under the root, right bytes.
    assert moto_process.temp_area_emptied(bucket) == {}
    keys = moto_process.keys(bucket, "uploads/")
    answered = {"uploads/" + u.answer["files"][0]["key"]: u for u in done}
    assert len(answered) == len(done)
    assert set(keys) == set(answered), (sorted(set(keys) ^ set(answered))[:5])
    assert all(keys[k] == u.size for k, u in answered.items())
    with ThreadPoolExecutor(4) as pool:
        digests = dict(zip(answered, pool.map(lambda k: moto_process.sha256(bucket, k), answered)))
    assert all(digests[k] == u.sha256 for k, u in answered.items())
    assert moto_process.pending_uploads(bucket) == []
    assert temp_files == []
    # Progress: every upload ended done, and pollers on other workers saw it move.
    assert set(finals.values()) == {"done"}
    assert not poller.errors, poller.errors[:3]
    assert set(poller.statuses) == {200}
    assert elsewhere > 0
    seen_uploading = sum(1 for states in poller.states.values() if "uploading" in states)
    assert seen_uploading > 0
    assert len(rss) == WORKERS
    assert max(rss.values()) < PEAK_RSS_LIMIT_MIB, rss
