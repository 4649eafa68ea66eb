"""Bodies captured byte-exact from real clients (see tools/capture.py), parsed
under every chunking and checked against what the form held."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List

import pytest

from uploadkit.handlers import HashingHandler, MemoryHandler
from uploadkit.multipart import Field, FileData, FileEnd, FileStart, parse_boundary
from uploadkit.reader import read_multipart
from tests.support.bodies import decode, fixed_chunks

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CLIENTS = ("curl", "requests", "httpx")


def _captures() -> List[str]:
    found = []
    for client in CLIENTS:
        folder = os.path.join(DATA, client)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                found.append(f"{client}/{name[:-5]}")
    return found


CAPTURES = _captures()


def _load(case: str) -> tuple[Dict[str, Any], bytes]:
    with open(os.path.join(DATA, case + ".json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(DATA, case + ".body"), "rb") as f:
        body = f.read()
    return meta, body


def test_every_client_has_every_case() -> None:
    cases = {c.split("/")[1] for c in CAPTURES}
    assert cases == {"text_unicode", "small_png", "two_files_one_field", "empty_file", "unicode_filename"}
    assert len(CAPTURES) == len(CLIENTS) * len(cases)


@pytest.mark.parametrize("case", CAPTURES)
def test_capture_is_intact(case: str) -> None:
    meta, body = _load(case)
    assert hashlib.sha256(body).hexdigest() == meta["body_sha256"]
    assert len(body) == meta["content_length"]
    assert meta["client"] == case.split("/")[0] and meta["client_version"] and meta["command"]


@pytest.mark.parametrize("size", [1, 7, 64 * 1024])
@pytest.mark.parametrize("case", CAPTURES)
def test_capture_decodes_to_the_form(case: str, size: int) -> None:
    meta, body = _load(case)
    events = decode(fixed_chunks(body, size), parse_boundary(meta["content_type"]))
    fields = [[e.name, e.value] for e in events if isinstance(e, Field)]
    assert fields == meta["expected"]["fields"]
    files: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    data = b""
    for e in events:
        if isinstance(e, FileStart):
            current, data = {"field": e.name, "filename": e.filename, "content_type": e.content_type}, b""
        elif isinstance(e, FileData):
            data += e.data
        elif isinstance(e, FileEnd):
            files.append({**current, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert files == meta["expected"]["files"]


@pytest.mark.parametrize("case", CAPTURES)
def test_capture_through_the_reader(case: str) -> None:
    meta, body = _load(case)
    p = read_multipart(io.BytesIO(body), content_type=meta["content_type"], content_length=len(body),
                       handlers=[HashingHandler(), MemoryHandler()], read_size=64)
    assert [list(kv) for kv in p.ctx.fields] == meta["expected"]["fields"]
    assert [(f.field_name, f.raw_filename, f.size, f.sha256, f.read()[:0]) for f in p.ctx.files] == [
        (x["field"], x["filename"], x["size"], x["sha256"], b"") for x in meta["expected"]["files"]]
    p.close()
