"""Fuzzing the decoder and the whole middleware with hypothesis.

Inputs: random bytes, real bodies (built with ``encode_multipart`` and the
captures under tests/data) with bytes flipped, inserted and deleted, random
chunkings of the input stream, and CONTENT_LENGTH values that lie. The only
outcomes allowed are acceptance with the exact data (when the body is valid)
or a 4xx JSON refusal with the four keys: never another exception, never a
hang (each example runs under a time bound), never memory growth
(tracemalloc over the run), never a temp file left behind.

CI runs a bounded number of examples; a long campaign is::

    UPLOADKIT_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -s
    python -m pytest tests/test_fuzz.py -m campaign -s   # 100x the examples, middleware only

Each test prints how many inputs it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.bodies import merge_data
from tests.support.reference_decoder import ReferenceDecoder
from tests.support.wsgi import raw_request, serve  # noqa: F401  (serve: imports webob under the cgi warning filter)
from uploadkit.errors import UploadError
from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.multipart import (Field, FileData, FileEnd, FileStart, MultipartDecoder, encode_multipart,
                                 parse_boundary)
from uploadkit.progress import MemoryStore

EXAMPLES = int(os.environ.get("UPLOADKIT_FUZZ_EXAMPLES", "200"))
#: Wall-clock bound of one example (a hang fails the test instead of blocking it).
EXAMPLE_SECONDS = 10.0
#: Peak of traced allocations over a whole test: bodies are at most a few hundred KiB.
PEAK_LIMIT = 48 * 1024 * 1024
#: Allowed growth of live allocations between the first examples and the last.
GROWTH_LIMIT = 4 * 1024 * 1024
ERROR_KEYS = {"code", "message", "field", "limit"}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

RAN: Counter = Counter()

FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# -- seeds --------------------------------------------------------------------------------


def _built_seeds() -> List[Tuple[bytes, str, Dict[str, Any]]]:
    blob = hashlib.sha256(b"seed").digest() * 512  # 16 KiB of high-entropy bytes
    cases = [
        ([("title", "hello")], []),
        ([], [("file", "a.txt", "text/plain", b"hello world\n")]),
        ([("a", "1"), ("b", "\u00e9t\u00e9")], [("f", "x.bin", "application/octet-stream", blob),
                                            ("f", "empty.bin", "", b"")]),
        ([], [("doc", "r\u00e9sum\u00e9 \"final\".pdf", "application/pdf", b"%PDF-1.4\n" + blob[:3000])]),
        # File bytes that look like a boundary and CRLFs.
        ([], [("f", "tricky.bin", "application/octet-stream",
               b"\r\n--uploadkit-\r\n--\r\n\r\n" + blob[:100] + b"\r\n--")]),
    ]
    out = []
    for fields, files in cases:
        body, ctype = encode_multipart(fields, files)
        expected = {"fields": [[k, v] for k, v in fields],
                    "files": [{"field": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                              for n, _, _, d in files]}
        out.append((body, ctype, expected))
    return out


def _captured_seeds() -> List[Tuple[bytes, str, Dict[str, Any]]]:
    out = []
    if not os.path.isdir(DATA):
        return out
    for client in sorted(os.listdir(DATA)):
        folder = os.path.join(DATA, client)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                meta = json.load(f)
            with open(os.path.join(folder, name[:-5] + ".body"), "rb") as f:
                body = f.read()
            exp = meta["expected"]
            expected = {"fields": [list(x) for x in exp.get("fields", [])],
                        "files": [{"field": x["field"], "size": x["size"], "sha256": x["sha256"]}
                                  for x in exp.get("files", [])]}
            out.append((body, meta["content_type"], expected))
    return out


SEEDS = _built_seeds() + _captured_seeds()


# -- strategies ------------------------------------------------------------------------------

Mutation = Tuple[str, int, int]
mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "cut", "dup"]),
                               st.integers(0, 1 << 30), st.integers(0, 255)), max_size=4)


def mutate(body: bytes, ops: List[Mutation]) -> bytes:
    b = bytearray(body)
    for op, where, value in ops:
        if not b:
            b.append(value)
            continue
        i = where % len(b)
        if op == "flip":
            b[i] ^= (value or 1)
        elif op == "insert":
            b[i:i] = bytes([value])
        elif op == "delete":
            del b[i]
        elif op == "cut":
            del b[i:]
        else:  # duplicate a stretch: repeated headers, boundaries, CRLFs
            b[i:i] = b[i:i + value % 64 + 1]
    return bytes(b)


def chunked(data: bytes, sizes: List[int]) -> Iterator[bytes]:
    pos, k = 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        yield data[pos:pos + n]
        pos += n
        k += 1


class ChunkedInput:
    """``wsgi.input`` that returns at most the next chunk size per read."""

    def __init__(self, data: bytes, sizes: List[int]) -> None:
        self.data = data
        self.pos = 0
        self.sizes = sizes or [1 << 30]
        self.k = 0

    def read(self, n: int = -1) -> bytes:
        size = self.sizes[self.k % len(self.sizes)]
        self.k += 1
        if n is not None and n >= 0:
            size = min(size, n)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


def bounded(fn: Callable[[], Any], seconds: float = EXAMPLE_SECONDS) -> Any:
    """``fn()`` in a thread, failing the example if it runs longer than ``seconds``."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise AssertionError(f"an example ran longer than {seconds} s: a hang")
    if "error" in box:
        raise box["error"]
    return box.get("result")


class MemoryWatch:
    """tracemalloc over a test: peak, and live memory after warm-up vs at the end."""

    def __init__(self, warmup: int = 20) -> None:
        self.warmup = warmup
        self.count = 0
        self.baseline: Optional[int] = None
        self.current = 0

    def __enter__(self) -> "MemoryWatch":
        tracemalloc.start()
        return self

    def tick(self) -> None:
        self.count += 1
        if self.count == self.warmup:
            self.baseline = tracemalloc.get_traced_memory()[0]
        self.current = tracemalloc.get_traced_memory()[0]

    def __exit__(self, *exc: Any) -> None:
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    def check(self) -> None:
        assert self.peak < PEAK_LIMIT, f"traced peak {self.peak / 2**20:.1f} MiB"
        if self.baseline is not None:
            growth = self.current - self.baseline
            assert growth < GROWTH_LIMIT, f"live memory grew {growth / 2**20:.1f} MiB over the run"


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print("\nfuzz inputs run: " + ", ".join(f"{k}={v}" for k, v in sorted(RAN.items())))


# -- the decoder ---------------------------------------------------------------------------------


def decode_all(boundary: bytes, body: bytes, sizes: List[int], limits: Limits = Limits()) -> List[Any]:
    decoder = MultipartDecoder(boundary, limits)
    events: List[Any] = []
    for chunk in chunked(body, sizes):
        events += decoder.feed(chunk)
    events += decoder.close()
    return events


def check_refusal(exc: UploadError) -> None:
    assert 400 <= exc.status < 500, exc
    assert set(exc.to_dict()["error"]) == ERROR_KEYS


boundary_chars = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"


@FUZZ
@given(boundary=st.text(boundary_chars, min_size=1, max_size=70).map(str.encode),
       prefix=st.booleans(), data=st.binary(max_size=2048),
       sizes=st.lists(st.integers(1, 512), min_size=1, max_size=8))
def test_decoder_random_bytes(boundary: bytes, prefix: bool, data: bytes, sizes: List[int]) -> None:
    RAN["decoder_random"] += 1
    body = (b"--" + boundary + b"\r\n" + data) if prefix else data
    try:
        events = bounded(lambda: decode_all(boundary, body, sizes))
    except UploadError as exc:
        check_refusal(exc)
        return
    for ev in events:
        assert isinstance(ev, (Field, FileStart, FileData, FileEnd))


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), ops=mutations,
       sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=8))
def test_decoder_mutated_bodies(seed: int, ops: List[Mutation], sizes: List[int]) -> None:
    RAN["decoder_mutated"] += 1
    body, ctype, _ = SEEDS[seed]
    boundary = parse_boundary(ctype)
    reference = merge_data(decode_all(boundary, body, [len(body) + 1]))
    mutated = mutate(body, ops)
    try:
        events = merge_data(bounded(lambda: decode_all(boundary, mutated, sizes)))
    except UploadError as exc:
        assert mutated != body, f"a valid body was refused: {exc!r}"
        check_refusal(exc)
        return
    if mutated == body:
        assert events == reference  # any chunking: the same events


def _outcome(decode: Callable[[], List[Any]]) -> Tuple[str, Any]:
    try:
        return "accepted", merge_data(decode())
    except UploadError as exc:
        return "refused", exc


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), ops=mutations,
       sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=8))
def test_decoder_agrees_with_the_engine_it_replaced(seed: int, ops: List[Mutation], sizes: List[int]) -> None:
    """Differential: our parser against the layer over multipart's
    PushMultipartParser that it replaced, on mutated real bodies. Whatever one
    accepts, the other accepts with the same events (headers included); the
    only verdicts allowed to differ are our stricter ones, named here."""
    RAN["decoder_differential"] += 1
    body, ctype, _ = SEEDS[seed]
    boundary = parse_boundary(ctype)
    mutated = mutate(body, ops)

    def reference() -> List[Any]:
        decoder = ReferenceDecoder(boundary, Limits())
        return decoder.feed(mutated) + decoder.close()

    ours, theirs = _outcome(lambda: bounded(lambda: decode_all(boundary, mutated, sizes))), _outcome(reference)
    if ours[0] == theirs[0] == "accepted":
        assert ours[1] == theirs[1]
    elif ours[0] == "refused" and theirs[0] == "accepted":
        # The engine lets a bare CR or LF through inside a header line (and,
        # depending on where the body is cut, refuses it): we always refuse.
        assert "bare CR or LF" in ours[1].message, (ours[1], theirs[1])
    elif ours[0] == "accepted":
        raise AssertionError(f"we accepted what the engine refused ({theirs[1]!r}): {ours[1]}")


# -- the middleware -------------------------------------------------------------------------------


def _describe(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    files = environ["uploadkit.files"]
    out = {"fields": [list(x) for x in environ["uploadkit.form"].items()],
           "files": [{"field": k, "size": f.size, "sha256": f.sha256,
                      "content_sha256": hashlib.sha256(f.read()).hexdigest()} for k, f in files.items()]}
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(scope="module")
def fuzz_tempdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="uk-fuzz-")
    try:
        yield d
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


TIGHT = Limits(max_request_size=64 * 1024, max_file_size=4096, max_files=2, max_parts=4,
               max_field_size=64, max_form_memory=256, max_header_size=256, max_header_count=3)

length_lies = st.one_of(
    st.just(("exact", None)), st.just(("absent", None)), st.just(("terminated", None)),
    st.tuples(st.just("delta"), st.integers(-300, 300)),
    st.tuples(st.just("text"), st.sampled_from(["abc", "-1", " 12", "1e3", "", "99999999999999999999"])))


def make_environ(body: bytes, ctype: str, length: Tuple[str, Any], sizes: List[int]) -> Dict[str, Any]:
    environ: Dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/upload", "QUERY_STRING": "",
                               "CONTENT_TYPE": ctype, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
                               "wsgi.url_scheme": "http", "HTTP_X_PROGRESS_ID": "fuzz"}
    kind, value = length
    if kind == "exact":
        environ["CONTENT_LENGTH"] = str(len(body))
    elif kind == "terminated":
        environ["wsgi.input_terminated"] = True
    elif kind == "delta":
        environ["CONTENT_LENGTH"] = str(max(0, len(body) + value))
    elif kind == "text":
        environ["CONTENT_LENGTH"] = value
    environ["wsgi.input"] = ChunkedInput(body, sizes)
    return environ


def call_app(app: Any, environ: Dict[str, Any]) -> Tuple[int, bytes]:
    seen: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen["status"], body


def check_answer(status: int, body: bytes, valid: bool, expected: Dict[str, Any]) -> str:
    payload = json.loads(body)
    if status == 200:
        for f in payload["files"]:
            assert f["sha256"] == f["content_sha256"]
        if valid:
            assert payload["fields"] == expected["fields"]
            assert [{k: f[k] for k in ("field", "size", "sha256")} for f in payload["files"]] == expected["files"]
        return "accepted"
    assert 400 <= status < 500, (status, body[:300])
    assert set(payload) == {"error"} and set(payload["error"]) == ERROR_KEYS, payload
    assert not valid, f"a valid body was refused: {payload}"
    return payload["error"]["code"]


def _middleware_example(fuzz_tempdir: str, store: MemoryStore, seed: int, ops: List[Mutation],
                        length: Tuple[str, Any], sizes: List[int], tight: bool, watch: MemoryWatch,
                        outcomes: Counter) -> None:
    body, ctype, expected = SEEDS[seed]
    mutated = mutate(body, ops)
    app = UploadMiddleware(_describe, tempdir=fuzz_tempdir, memory_threshold=512, progress=store,
                           limits=TIGHT if tight else Limits(max_request_size=1 << 20))
    environ = make_environ(mutated, ctype, length, sizes)
    status, answer = bounded(lambda: call_app(app, environ))
    valid = mutated == body and length[0] in ("exact", "terminated") and not tight
    outcomes[check_answer(status, answer, valid, expected)] += 1
    assert os.listdir(fuzz_tempdir) == [], "a temp file was left"
    final = store.get("fuzz")
    assert final is not None and final["state"] in ("done", "error"), final
    store.delete("fuzz")
    watch.tick()


def _run_middleware_fuzz(fuzz_tempdir: str, examples: int, name: str) -> None:
    store = MemoryStore()
    outcomes: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(seed=st.sampled_from(range(len(SEEDS))), ops=mutations, length=length_lies,
           sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6), tight=st.booleans())
    def run(seed: int, ops: List[Mutation], length: Tuple[str, Any], sizes: List[int], tight: bool) -> None:
        RAN[name] += 1
        _middleware_example(fuzz_tempdir, store, seed, ops, length, sizes, tight, watch, outcomes)

    with MemoryWatch() as watch:
        run()
    watch.check()
    print(f"\n{name}: {sum(outcomes.values())} answers: {dict(outcomes.most_common())}; "
          f"traced peak {watch.peak / 2**20:.1f} MiB")
    assert outcomes["accepted"] > 0 and sum(outcomes.values()) > outcomes["accepted"]


def test_middleware_mutated_bodies_and_lying_lengths(fuzz_tempdir: str) -> None:
    _run_middleware_fuzz(fuzz_tempdir, EXAMPLES, "middleware")


@pytest.mark.campaign
def test_middleware_campaign(fuzz_tempdir: str) -> None:
    _run_middleware_fuzz(fuzz_tempdir, EXAMPLES * 100, "middleware_campaign")


@FUZZ
@given(data=st.binary(max_size=4096), ctype=st.sampled_from([
    "multipart/form-data; boundary=x", "multipart/form-data", "multipart/form-data; boundary=",
    "multipart/form-data; boundary=\"a b\"", "multipart/form-data; boundary=" + "b" * 80,
    "multipart/form-data; charset=utf-8; boundary=--x--"]),
    sizes=st.lists(st.integers(1, 1024), min_size=1, max_size=4))
def test_middleware_random_bytes(fuzz_tempdir: str, data: bytes, ctype: str, sizes: List[int]) -> None:
    RAN["middleware_random"] += 1
    app = UploadMiddleware(_describe, tempdir=fuzz_tempdir, memory_threshold=0, progress=False)
    status, answer = bounded(lambda: call_app(app, make_environ(data, ctype, ("exact", None), sizes)))
    check_answer(status, answer, False, {})
    assert os.listdir(fuzz_tempdir) == []


# -- through a real server ---------------------------------------------------------------------------


@settings(FUZZ, max_examples=max(10, EXAMPLES // 5))
@given(seed=st.sampled_from(range(len(SEEDS))), ops=mutations, delta=st.sampled_from([0, 0, 0, -7, 13]))
def test_real_server_mutated_bodies(tmp_path_factory: pytest.TempPathFactory, seed: int,
                                    ops: List[Mutation], delta: int) -> None:
    RAN["server"] += 1
    global _SERVER
    if _SERVER is None:
        tempdir = str(tmp_path_factory.mktemp("fuzz-server"))
        app = UploadMiddleware(_describe, tempdir=tempdir, memory_threshold=512, progress=False,
                               limits=Limits(max_request_size=1 << 20))
        from uploadkit.server import BackgroundServer

        server = BackgroundServer(app, inactivity_timeout=5)
        url = server.__enter__()
        _SERVER = (server, int(url.rsplit(":", 1)[1]), tempdir)
    _, port, tempdir = _SERVER
    body, ctype, expected = SEEDS[seed]
    mutated = mutate(body, ops)
    declared = max(0, len(mutated) + delta)
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {declared}\r\n"
            f"Connection: close\r\n\r\n").encode()
    t0 = time.monotonic()
    raw = raw_request(port, head, mutated, timeout=EXAMPLE_SECONDS)
    assert time.monotonic() - t0 < EXAMPLE_SECONDS
    status = int(raw.split(b" ", 2)[1])
    check_answer(status, raw.partition(b"\r\n\r\n")[2], mutated == body and delta == 0, expected)
    assert os.listdir(tempdir) == [], "a temp file was left"


_SERVER: Optional[Tuple[Any, int, str]] = None


@pytest.fixture(scope="module", autouse=True)
def _stop_server() -> Iterator[None]:
    yield
    global _SERVER
    if _SERVER is not None:
        _SERVER[0].__exit__(None, None, None)
        _SERVER = None
