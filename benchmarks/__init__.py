"""Benchmarks of uploadkit against other multipart parsers and WSGI stacks.

Run them all with ``python -m benchmarks`` (``--quick`` for a smoke run); see
``benchmarks/README.md`` for what each one measures and how to read the tables.

This module holds the little the benchmark modules share: Markdown tables,
the environment line printed above them, and number formatting.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import statistics
import sys
import threading
from importlib import metadata
from typing import Any, Iterable, Iterator, List, Optional, Sequence

#: Benchmark modules run by ``python -m benchmarks``, in order. Each exposes
#: ``main(argv: list[str]) -> int`` and accepts ``--quick``; missing ones are skipped.
MODULES = ("bench_parsers", "bench_e2e", "bench_progress", "bench_storage", "bench_imaging", "bench_load",
           "bench_faults", "bench_tus")

#: Distributions whose versions head the tables (absent ones are left out).
DISTRIBUTIONS = ("uploadkit", "multipart", "python-multipart", "Django", "streaming-form-data",
                 "Werkzeug", "WebOb", "Flask", "gunicorn")

MB = 1_000_000  # throughput is in decimal MB/s, like most tools print it

#: A RAM disk (Linux's tmpfs), where the runs that must not measure a disk put their files.
RAM_DISK = "/dev/shm"


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays a clean Markdown report."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the block runs, so ``finally`` clauses
    stop servers and remove temp dirs when the run is cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
             align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column ("l" or "r")."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, v in enumerate(values):
            out.append(v.rjust(widths[i]) if align[i] == "r" else v.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if align[i] == "r" else (":" + "-" * (w + 1))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(list(headers)), rule] + [line(r) for r in cells])


def versions() -> str:
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def environment_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {load}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_median(ours: Sequence[float], theirs: Sequence[float]) -> Optional[float]:
    """The median of each round's ratio ``ours[i] / theirs[i]``: the two were
    measured in the same round, seconds apart, so a drift in the machine's
    speed between rounds (a shared VM's) cancels out of it. None unless both
    have a figure for every round."""
    if not ours or len(ours) != len(theirs):
        return None
    return statistics.median([a / b for a, b in zip(ours, theirs)])


def fmt_rate(value: Optional[float]) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"


def fmt_mib(kib: Optional[float]) -> str:
    return "n/a" if not kib else f"{kib / 1024:,.0f} MiB"


def verdict(value: Optional[float], target: float) -> str:
    if value is None or value != value:
        return "n/a"
    return "PASS" if value >= target else "MISS"
