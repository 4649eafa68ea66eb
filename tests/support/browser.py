"""Headless Chromium for tests, and servers started as console commands.

``chromium`` (module scope) launches the Debian Chromium through Playwright with
a fresh profile directory and closes it at teardown; ``page`` gives each test a
new page with a bounded default timeout. Playwright never downloads a browser
here: the executable is ``/usr/bin/chromium`` (``UPLOADKIT_CHROMIUM`` overrides
it). Failing to find or start it fails the test: CI installs it.

:class:`Command` runs a server command (``uploadkit demo``, an example's
``run.py``) as a subprocess, waits for the URL it prints on start-up, keeps
reading its output so a chatty server never blocks on a full pipe, and stops
it by its own process handle.

    from tests.support.browser import chromium, page  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO_ROOT, "artifacts")

CHROMIUM = os.environ.get("UPLOADKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: Milliseconds any single Playwright action or wait may take.
ACTION_TIMEOUT_MS = 20_000

_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/?")


# -- the browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A Playwright browser context on a fresh profile; closed at module teardown."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="uploadkit-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1200, "height": 900}, accept_downloads=False)
            try:
                context.set_default_timeout(ACTION_TIMEOUT_MS)
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A new page in the shared browser, closed after the test."""
    p = chromium.new_page()
    errors: List[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.js_errors = errors  # the page's uncaught exceptions, for tests to assert on
    try:
        yield p
    finally:
        p.close()


def artifact_path(name: str) -> str:
    """A path under ``artifacts/`` (git-ignored) for screenshots a test keeps."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    return os.path.join(ARTIFACTS, name)


# -- servers started as commands ------------------------------------------------------------

class Command:
    """A server command in a subprocess: ``with Command([...]) as cmd: cmd.url``.

    The command must print ``http://127.0.0.1:<port>/`` within ``start_timeout``
    seconds (its first such line gives :attr:`url`). Its output (stdout and
    stderr together) is collected in :attr:`lines`. Leaving the block stops it:
    SIGTERM, then SIGKILL after ``stop_timeout``.
    """

    def __init__(self, args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
                 cwd: str = REPO_ROOT, start_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.lines: List[str] = []
        self.proc: Optional[subprocess.Popen[str]] = None
        self.url = ""
        self.port = 0
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None

    def start(self) -> "Command":
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                     bufsize=1)
        self._reader = threading.Thread(target=self._read, name="command-output", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise RuntimeError(f"{self.args} printed no URL within {self.start_timeout} s:\n{self.output}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.stop()
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode} before serving:\n"
                                   f"{self.output}")
            m = _URL.search(line)
            if m:
                self.port = int(m.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
                return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self.proc.wait()
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def expect(self, text: str, timeout: float = 5.0) -> None:
        """Wait until ``text`` appears in the output (it is read by another thread)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the output of {self.args}:\n{self.output}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its return code."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self) -> Optional[int]:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> "Command":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def python_command(*args: str) -> List[str]:
    """``[sys.executable, *args]``: the interpreter running the tests."""
    return [sys.executable, *args]
