"""Storage benchmark: streaming straight into storage vs spooling to a temp file first.

Part 1, local disk, in-process (``--size`` MiB, default 256), the same 1 MiB
chunks fed to each variant:

* ``baseline``: a plain loop, sha256 + write to a file (the floor any upload path pays);
* ``direct``: Pipeline(Sniffing, Hashing, Storage.handler()) - bytes go straight
  to their final directory, committed with a link;
* ``tempfile+save``: Pipeline(Sniffing, Hashing, TempFileHandler) then
  ``Storage.save()`` of the temp file (what a framework's upload handling does).

Part 2: peak RSS of this process while streaming ``--s3-size`` MiB (default 512)
to S3 (a moto server in a separate process on 127.0.0.1), showing memory is
bounded by the s3fs block size, not the file size.

    python -m benchmarks.bench_storage --size 32 --s3-size 64
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uploadkit.handlers import HashingHandler, SniffingHandler, TempFileHandler  # noqa: E402
from uploadkit.limits import Limits  # noqa: E402
from uploadkit.pipeline import Pipeline, RequestContext  # noqa: E402
from uploadkit.storage import Storage  # noqa: E402

from benchmarks import environment_line, fmt_rate, log, md_table, sigterm_as_exit, versions  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000


def chunks(size: int, chunk: int) -> Iterator[bytes]:
    """``size`` bytes in ``chunk``-sized pieces, without holding them all."""
    block = os.urandom(chunk)
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        # a fresh bytes object per chunk, as a socket read would give
        yield block[:n] if n < chunk else bytes(block)
        sent += n


def baseline(size: int, chunk: int, workdir: str) -> None:
    h = hashlib.sha256()
    with open(os.path.join(workdir, "baseline.bin"), "wb") as f:
        for c in chunks(size, chunk):
            h.update(c)
            f.write(c)
    h.hexdigest()


def run_pipeline(handlers: list, size: int, chunk: int) -> Pipeline:
    p = Pipeline(handlers, RequestContext(limits=Limits()))
    p.start()
    p.start_file("file", "big.bin", "application/octet-stream")
    for c in chunks(size, chunk):
        p.feed(c)
    p.end_file()
    p.finish()
    return p


def direct(size: int, chunk: int, workdir: str) -> None:
    storage = Storage(os.path.join(workdir, "direct"))
    p = run_pipeline([SniffingHandler(), HashingHandler(), storage.handler()], size, chunk)
    p.close()


def tempfile_then_save(size: int, chunk: int, workdir: str) -> None:
    storage = Storage(os.path.join(workdir, "saved"))
    tmp = os.path.join(workdir, "spool")
    os.makedirs(tmp, exist_ok=True)
    p = run_pipeline([SniffingHandler(), HashingHandler(), TempFileHandler(tempdir=tmp)], size, chunk)
    (f,) = p.ctx.files
    with f.open() as src:
        storage.save(src, filename=f.filename)
    p.close()


def timed(fn: Callable[[int, int, str], None], size: int, chunk: int, workdir: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        run_dir = tempfile.mkdtemp(dir=workdir)
        try:
            t = time.perf_counter()
            fn(size, chunk, run_dir)
            best = min(best, time.perf_counter() - t)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return best


def bench_local(size: int, chunk: int, workdir: str, repeat: int) -> str:
    log(f"[storage] local disk, {size // MiB} MiB in {chunk // 1024} KiB chunks, best of {repeat}")
    results: List[Tuple[str, float]] = []
    for name, fn in [("baseline: read + sha256 + write", baseline), ("direct to storage", direct),
                     ("temp file, then save", tempfile_then_save)]:
        results.append((name, timed(fn, size, chunk, workdir, repeat)))
        log(f"[storage] {name}: {results[-1][1]:.3f} s")
    base = results[0][1]
    rows = [[name, fmt_rate(size / MB / secs), f"{secs:.3f}", f"{base / secs:.2f}"] for name, secs in results]
    d, t = results[1][1], results[2][1]
    return "\n".join([
        f"### Local disk: {size // MiB} MiB in {chunk // 1024} KiB chunks, best of {repeat}", "",
        md_table(["variant", "MB/s", "seconds", "vs baseline"], rows, "lrrr"), "",
        f"Direct to storage is {t / d:.2f} times as fast as temp file, then save.", ""])


# -- S3 memory ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples this process's resident memory every few milliseconds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())


def bench_s3(size: int, chunk: int, block_size: int) -> str:
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="bench")
        storage = Storage("s3://bench/media", block_size=block_size, storage_options={
            "key": "testing", "secret": "testing", "endpoint_url": endpoint, "skip_instance_cache": True})
        storage.save(__import__("io").BytesIO(b"warm-up"), "warm.txt")  # imports and connections
        sampler = PeakRSS()
        start_rss = sampler.peak
        sampler.start()
        t = time.perf_counter()
        p = run_pipeline([SniffingHandler(), HashingHandler(), storage.handler()], size, chunk)
        secs = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        (f,) = p.ctx.files
        assert storage.size(f.key or "") == size
        log(f"[storage] S3: {secs:.3f} s")
        row = [f"{size // MiB} MiB", f"{block_size // MiB} MiB", fmt_rate(size / MB / secs), f"{secs:.3f}",
               f"{start_rss / MiB:.0f} MiB", f"{sampler.peak / MiB:.0f} MiB",
               f"+{(sampler.peak - start_rss) / MiB:.0f} MiB",
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"]
        return "\n".join([
            "### Streaming to S3 (moto in a separate process on 127.0.0.1)", "",
            md_table(["file", "s3fs block", "MB/s", "seconds", "RSS before", "peak RSS while streaming",
                      "growth", "ru_maxrss"], [row], "lrrrrrrr"), ""])
    finally:
        server.terminate()
        server.wait(10)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="MiB for the local comparison (default 256)")
    ap.add_argument("--s3-size", type=int, default=512, help="MiB streamed to S3 (default 512; 0 skips)")
    ap.add_argument("--chunk", type=int, default=1024, help="KiB per chunk fed (default 1024)")
    ap.add_argument("--block-size", type=int, default=5, help="s3fs block size in MiB (default 5, the minimum)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per local variant; the best counts")
    ap.add_argument("--dir", default=None, help="working directory on the disk to measure (default: temp)")
    ap.add_argument("--quick", action="store_true", help="small sizes (32 MiB local, 64 MiB to S3), one run")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.s3_size, args.repeat = min(args.size, 32), min(args.s3_size, 64), 1
    chunk = args.chunk * 1024
    out = [f"## Storage: straight into storage vs temp file first{' (quick run)' if args.quick else ''}", "",
           environment_line() + ".  ", versions() + ".", ""]
    with sigterm_as_exit():
        workdir = tempfile.mkdtemp(prefix="uploadkit-bench-", dir=args.dir)
        try:
            if args.size:
                out.append(bench_local(args.size * MiB, chunk, workdir, args.repeat))
            if args.s3_size:
                out.append(bench_s3(args.s3_size * MiB, chunk, args.block_size * MiB))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
