"""Hostile bodies modelled on published multipart CVEs of other Python parsers.

One table, one parametrized test: each row names its source, builds its body,
and states the outcome (accepted with exact data, or a status and code) and a
time bound. The same rows (a subset) also go through a real server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import pytest
import requests

from tests.support.wsgi import parse_response, raw_request, wsgi_server  # noqa: F401  (first: webob quietly)
from uploadkit.errors import UploadError
from uploadkit.handlers import HashingHandler, MemoryHandler, TempFileHandler
from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware
from uploadkit.reader import read_multipart
from tests.support.bodies import BOUNDARY, CRLF, content_type, end, field_part, file_part, part

B = BOUNDARY.encode()
MiB = 1024 * 1024
TIME_BOUND = 2.0  # seconds, per row


@dataclass
class Row:
    id: str
    source: str
    body: Callable[[], bytes]
    #: ("ok", fields, files as (field, raw filename, sanitized filename, data)) or (status, code)
    expect: Tuple[Any, ...]
    limits: Limits = field(default_factory=Limits)
    ctype: str = content_type()
    #: CONTENT_LENGTH to declare, as a function of the real length (None: the truth).
    length: Optional[Callable[[int], int]] = None
    server: bool = True
    #: A known bug: the row is expected to fail until it is fixed.
    xfail: Optional[str] = None


def _parts_body(n: int, maker: Callable[[int], bytes]) -> bytes:
    return b"".join(maker(i) for i in range(n)) + end()


def _crlf_file(fill: bytes, size: int) -> bytes:
    return file_part("f", "crlf.bin", (fill * (size // len(fill) + 1))[:size]) + end()


def _data(fill: bytes, size: int) -> bytes:
    return (fill * (size // len(fill) + 1))[:size]


ROWS: List[Row] = [
    Row("CVE-2023-25577-many-parts",
        "Werkzeug: no limit on the number of parts, each costing CPU and memory",
        lambda: _parts_body(5000, lambda i: field_part("a", "")), (413, "too_many_parts")),
    Row("CVE-2023-25577-empty-file-parts",
        "Werkzeug: many empty 'no file selected' parts count as parts too",
        lambda: _parts_body(3000, lambda i: part(['Content-Disposition: form-data; name="f"; filename=""'])),
        (413, "too_many_parts")),
    Row("CVE-2023-24580-many-files",
        "Django: many file parts, each opening a temp file",
        lambda: _parts_body(500, lambda i: file_part("f", f"{i}.txt", b"x")), (413, "too_many_files")),
    Row("CVE-2023-24580-files-under-parts-limit",
        "Django: the file count is limited separately from parts",
        lambda: _parts_body(20, lambda i: file_part("f", f"{i}.txt", b"x")), (413, "too_many_files"),
        limits=Limits(max_files=10, max_parts=1000)),
    Row("CVE-2023-46136-all-CR",
        "Werkzeug: file data made of CR bytes parsed in quadratic time; must be fast and exact",
        lambda: _crlf_file(b"\r", 2 * MiB), ("ok", [], [("f", "crlf.bin", "crlf.bin", _data(b"\r", 2 * MiB))])),
    Row("CVE-2023-46136-all-LF",
        "Werkzeug: the same with LF bytes",
        lambda: _crlf_file(b"\n", 2 * MiB), ("ok", [], [("f", "crlf.bin", "crlf.bin", _data(b"\n", 2 * MiB))])),
    Row("CVE-2023-46136-CRLF-dashes",
        "Werkzeug: CRLF followed by dashes, the start of every delimiter, over and over",
        lambda: _crlf_file(b"\r\n--", 2 * MiB),
        ("ok", [], [("f", "crlf.bin", "crlf.bin", _data(b"\r\n--", 2 * MiB))])),
    Row("CVE-2023-46136-partial-delimiters",
        "Werkzeug: data made of almost-delimiters (CRLF--boundary minus one byte)",
        lambda: _crlf_file(b"\r\n--" + B[:-1], MiB),
        ("ok", [], [("f", "crlf.bin", "crlf.bin", _data(b"\r\n--" + B[:-1], MiB))])),
    Row("CVE-2024-24762-content-type-options",
        "python-multipart: ReDoS in Content-Type option parsing; options with backslashes and quotes",
        lambda: field_part("a", "1") + end(), ("ok", [("a", "1")], []),
        ctype=content_type() + '; x="' + "\\" * 25_000 + "; y=" + "a" * 25_000),
    Row("CVE-2024-24762-many-options",
        "python-multipart: many Content-Type options",
        lambda: field_part("a", "1") + end(), ("ok", [("a", "1")], []),
        ctype="multipart/form-data" + "; a=b" * 10_000 + f"; boundary={BOUNDARY}"),
    Row("CVE-2024-24762-content-disposition-options",
        "python-multipart: the same trick in a part's Content-Disposition",
        lambda: part(['Content-Disposition: form-data; name="a"' + '; x="\\' * 700], b"v") + end(),
        ("ok", [("a", "v")], []), limits=Limits(max_header_size=8192)),
    Row("CVE-2024-53981-CRLF-before-boundary",
        "python-multipart: every CR/LF before the first boundary processed (and logged) one by one",
        lambda: b"\r\n" * (MiB + 1) + field_part("a", "1") + end(), (400, "malformed_multipart")),
    Row("CVE-2024-53981-CRLF-after-end",
        "python-multipart: the same after the closing boundary (epilogue)",
        lambda: field_part("a", "1") + end() + b"\r\n" * MiB, ("ok", [("a", "1")], [])),
    Row("CVE-2024-47874-huge-field",
        "Starlette: parts without filename buffered in memory without a limit",
        lambda: field_part("big", b"x" * (20 * MiB)) + end(), (413, "field_too_large"), server=False),
    Row("CVE-2024-47874-huge-field-streamed",
        "Starlette: the same, refused while streaming (the server test drains at most 4 MiB)",
        lambda: field_part("big", b"x" * (3 * MiB)) + end(), (413, "field_too_large")),
    Row("CVE-2024-47874-many-fields",
        "Starlette: many fields under the per-field limit adding up in memory",
        lambda: _parts_body(12, lambda i: field_part(f"f{i}", b"y" * (900 * 1024))), (413, "field_too_large")),
    Row("defnull-multipart-long-header-line",
        "multipart (defnull): one endless header line",
        lambda: part(['Content-Disposition: form-data; name="a"', "X-Long: " + "a" * 200_000], b"v") + end(),
        (413, "header_too_large")),
    Row("defnull-multipart-unterminated-header-line",
        "multipart (defnull): a header line that never ends (no CRLF at all)",
        lambda: b"--" + B + CRLF + b"Content-Disposition: form-data; name=\"a\"; x=" + b"a" * 300_000,
        (413, "header_too_large")),
    Row("defnull-multipart-many-headers",
        "multipart (defnull) / python-multipart GHSA-pp6c-gr5w-3c5g: many header lines in one part",
        lambda: part(['Content-Disposition: form-data; name="a"'] + [f"X-{i}: v" for i in range(5000)], b"v") + end(),
        (413, "header_too_large")),
    Row("defnull-multipart-header-continuations",
        "multipart (defnull): header continuation lines growing one header",
        lambda: part(['Content-Disposition: form-data; name="a"', "X-A: a"] + [" b" * 40] * 5000, b"v") + end(),
        (413, "header_too_large")),
    Row("defnull-multipart-header-without-colon",
        "multipart (defnull): header lines without a colon",
        lambda: part(['Content-Disposition: form-data; name="a"', "no colon here"], b"v") + end(),
        (400, "malformed_multipart")),
    Row("LF-only-line-endings",
        "lenient parsers accept bare LF, letting a body mean different things to a proxy and the app",
        lambda: field_part("a", "1").replace(CRLF, b"\n") + end().replace(CRLF, b"\n"),
        (400, "malformed_multipart")),
    Row("boundary-without-CRLF-in-data",
        "a boundary not preceded by CRLF is data, not a delimiter",
        lambda: file_part("f", "a.bin", b"--" + B + b"\r\n--" + B[:-1] + b"x--" + B + b"--") + end(),
        ("ok", [], [("f", "a.bin", "a.bin", b"--" + B + b"\r\n--" + B[:-1] + b"x--" + B + b"--")])),
    Row("boundary-prefix-of-longer-token",
        "data holding CRLF--boundary followed by other bytes: refused, not silently split",
        lambda: file_part("f", "a.bin", b"abc\r\n--" + B + b"XYZ") + end(), (400, "malformed_multipart")),
    Row("NUL-in-names",
        "NUL bytes in field name and filename: kept raw, sanitized for use",
        lambda: part(['Content-Disposition: form-data; name="a\x00b"'], b"v")
        + part(['Content-Disposition: form-data; name="f"; filename="evil.php\x00.png"'], b"data") + end(),
        ("ok", [("a\x00b", "v")], [("f", "evil.php\x00.png", "evil.php_.png", b"data")])),
    Row("traversal-filename",
        "directory traversal in the filename",
        lambda: file_part("f", "../../../../etc/cron.d/x", b"data") + end(),
        ("ok", [], [("f", "../../../../etc/cron.d/x", "x", b"data")])),
    Row("huge-preamble",
        "megabytes of preamble before the first boundary",
        lambda: b"p" * (3 * MiB) + CRLF + field_part("a", "1") + end(), (400, "malformed_multipart")),
    Row("huge-epilogue",
        "megabytes after the closing boundary: ignored, quickly",
        lambda: field_part("a", "1") + end() + b"e" * (3 * MiB), ("ok", [("a", "1")], [])),
    Row("content-length-smaller-than-body",
        "a Content-Length that cuts the body: the rest is never read, the body is truncated",
        lambda: field_part("a", "1") + file_part("f", "x", b"z" * 1000) + end(), (400, "malformed_multipart"),
        length=lambda n: n - 100),
    Row("content-length-larger-than-body",
        "a Content-Length promising more than arrives (in process: the stream ends early)",
        lambda: field_part("a", "1") + end(), (400, "client_disconnected"), length=lambda n: n + 100,
        server=False),
    Row("content-length-over-limit",
        "a declared length over max_request_size: refused before reading",
        lambda: field_part("a", "1") + end(), (413, "request_too_large"), limits=Limits(max_request_size=10)),
    Row("many-small-fields-under-limit",
        "a thousand tiny fields, just at max_parts: accepted, quickly",
        lambda: _parts_body(1000, lambda i: field_part(f"k{i}", str(i))),
        ("ok", [(f"k{i}", str(i)) for i in range(1000)], [])),
    Row("empty-form",
        "just the closing delimiter: an empty form",
        lambda: end(), ("ok", [], [])),
    Row("no-body",
        "an empty body declared as multipart",
        lambda: b"", (400, "malformed_multipart")),
    Row("content-transfer-encoding",
        "base64 parts (RFC 7578 deprecates them): a way to smuggle content past filters",
        lambda: part(['Content-Disposition: form-data; name="f"; filename="a.txt"',
                      "Content-Transfer-Encoding: base64"], b"PD9waHAgc3lzdGVtKCk7ID8+") + end(),
        (400, "malformed_multipart")),
    Row("two-content-dispositions",
        "two Content-Disposition headers: parsers disagree on which wins (WAF bypass)",
        lambda: part(['Content-Disposition: form-data; name="safe"',
                      'Content-Disposition: form-data; name="f"; filename="shell.php"'], b"x") + end(),
        (400, "malformed_multipart")),
    Row("filename-star-only",
        "RFC 5987 filename* with traversal: decoded, then sanitized",
        lambda: part(["Content-Disposition: form-data; name=\"f\"; filename*=UTF-8''..%2F..%2Fsecret.txt"], b"d")
        + end(), ("ok", [], [("f", "../../secret.txt", "secret.txt", b"d")])),
    Row("filename-star-inside-quoted-name",
        "parameter confusion (cf. ModSecurity CVE-2022-48279): 'filename*=' inside a quoted name is not a parameter",
        lambda: part(["Content-Disposition: form-data; name=\"x; filename*=UTF-8''evil.php\""], b"<?php ?>")
        + end(), ("ok", [("x; filename*=UTF-8''evil.php", "<?php ?>")], [])),
]


def _run_in_process(row: Row) -> Any:
    body = row.body()
    declared = row.length(len(body)) if row.length else len(body)
    return read_multipart(io.BytesIO(body), content_type=row.ctype, content_length=declared, limits=row.limits,
                          handlers=[HashingHandler(), MemoryHandler(64 * MiB)], read_size=64 * 1024)


def _assert_accepted(row: Row, fields: List[Tuple[str, str]], files: List[Tuple[str, str, str, str, int]]) -> None:
    _, exp_fields, exp_files = row.expect
    assert fields == exp_fields
    assert files == [(n, raw, safe, hashlib.sha256(d).hexdigest(), len(d)) for n, raw, safe, d in exp_files]


def _params(rows: List[Row]) -> List[Any]:
    return [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else [])
            for r in rows]


@pytest.mark.parametrize("row", _params(ROWS))
def test_hostile_in_process(row: Row) -> None:
    start = time.perf_counter()
    try:
        p = _run_in_process(row)
    except UploadError as exc:
        elapsed = time.perf_counter() - start
        assert (exc.status, exc.code) == row.expect, exc
        assert exc.message
    else:
        elapsed = time.perf_counter() - start
        assert row.expect[0] == "ok", f"accepted, expected {row.expect}"
        _assert_accepted(row, p.ctx.fields,
                         [(f.field_name, f.raw_filename, f.filename, f.sha256, f.size) for f in p.ctx.files])
        p.close()
    assert elapsed < TIME_BOUND, f"{row.id} took {elapsed:.2f} s"


SERVER_ROWS = [r for r in ROWS if r.server]


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: Any) -> Any:
    from tests.support.wsgi import serve

    tempdir = tmp_path_factory.mktemp("hostile")
    calls: List[Any] = []

    def app(environ: Any, start_response: Any) -> List[bytes]:
        files = environ["uploadkit.files"]
        out = {"fields": list(environ["uploadkit.form"].items()),
               "files": [[f.field_name, f.raw_filename, f.filename, hashlib.sha256(f.read()).hexdigest(), f.size]
                         for f in files.values()]}
        calls.append(out)
        body = json.dumps(out).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    limits_by_row = {r.id: r.limits for r in ROWS}

    def handlers(environ: Any) -> List[Any]:
        return [HashingHandler(), TempFileHandler(str(tempdir))]

    mw = UploadMiddleware(app, progress=False, handlers=handlers,
                          limits=lambda environ: limits_by_row[environ["PATH_INFO"].strip("/")])
    with serve(mw) as server:
        yield server, tempdir, calls


@pytest.mark.parametrize("row", _params(SERVER_ROWS))
def test_hostile_through_a_real_server(row: Row, hostile_server: Any) -> None:
    server, tempdir, calls = hostile_server
    body = row.body()
    declared = row.length(len(body)) if row.length else len(body)
    head = (f"POST /{row.id} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {row.ctype}\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    start = time.perf_counter()
    status, _, resp = parse_response(raw_request(server.port, head, body, timeout=10))
    elapsed = time.perf_counter() - start
    out = json.loads(resp)
    if row.expect[0] == "ok":
        assert status == 200, out
        _assert_accepted(row, [tuple(f) for f in out["fields"]], [tuple(f) for f in out["files"]])
    else:
        assert status == row.expect[0], out
        err = out["error"]
        assert set(err) == {"code", "message", "field", "limit"} and err["code"] == row.expect[1]
    assert elapsed < TIME_BOUND + 1.0, f"{row.id} took {elapsed:.2f} s"
    deadline = time.monotonic() + 5
    while os.listdir(tempdir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(tempdir) == []
