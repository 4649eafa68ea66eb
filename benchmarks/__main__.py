"""``python -m benchmarks [--quick] [--only NAME,...] [--output FILE]``

Runs every benchmark module of :data:`benchmarks.MODULES` that exists and
exposes ``main(argv: list[str]) -> int``, passing ``--quick`` on when given.
Each prints a Markdown section on stdout (progress goes to stderr); with
``--output`` the report is also written to a file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
from typing import Any, List, Optional, TextIO

from . import MODULES, log, sigterm_as_exit


class _Tee:
    """Writes to the terminal and to the report file at once."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _load(name: str) -> Any:
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        return None
    module = importlib.import_module(f"benchmarks.{name}")
    main = getattr(module, "main", None)
    return main if callable(main) else None


def _call(name: str, run: Any, argv: List[str]) -> int:
    """``run(argv)``; a ``main()`` without parameters gets its options through sys.argv."""
    try:
        takes_argv = bool(inspect.signature(run).parameters)
    except (TypeError, ValueError):
        takes_argv = True
    if takes_argv:
        return int(run(list(argv)) or 0)
    log(f"[benchmarks] {name}.main() takes no argv (the contract is main(argv)); passing sys.argv")
    saved = sys.argv
    sys.argv = [f"benchmarks.{name}"] + list(argv)
    try:
        return int(run() or 0)
    except SystemExit as exc:  # argparse or sys.exit inside the module
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run uploadkit's benchmarks.")
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer runs (a smoke check)")
    parser.add_argument("--only", help="comma-separated module names, e.g. bench_parsers,bench_e2e")
    parser.add_argument("--output", help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    names = list(MODULES)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in MODULES]
        if unknown:
            parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
        names = wanted
    sub_argv = ["--quick"] if args.quick else []
    report = open(args.output, "w", encoding="utf-8") if args.output else None
    stdout = sys.stdout
    if report is not None:
        sys.stdout = _Tee(stdout, report)
    status = 0
    try:
        with sigterm_as_exit():
            print(f"# uploadkit benchmarks ({'quick' if args.quick else 'full'} run)\n", flush=True)
            for name in names:
                run = _load(name)
                if run is None:
                    log(f"[benchmarks] {name}: not present or has no main(argv), skipped")
                    continue
                log(f"[benchmarks] {name} {' '.join(sub_argv)}")
                # The gigabytes one module wrote must not be written back
                # during the next module's timed runs.
                os.sync()
                start = time.monotonic()
                try:
                    rc = _call(name, run, sub_argv)
                except Exception as exc:  # one broken module must not hide the others' figures
                    log(f"[benchmarks] {name} failed: {type(exc).__name__}: {exc}")
                    rc = 1
                sys.stdout.flush()
                log(f"[benchmarks] {name} finished in {time.monotonic() - start:.0f} s (exit {rc})")
                status = status or rc
    finally:
        sys.stdout = stdout
        if report is not None:
            report.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
