"""``uploadkit cleanup``: what it finds, what it leaves alone, ages, dry runs,
and the command line; on a real directory, a local storage and S3 (moto).

The end-to-end case (a gunicorn worker SIGKILLed mid-upload, then the command
run through its console entry) is in tests/test_faults.py."""

from __future__ import annotations

import io
import os
import time
import uuid
from typing import Any, List

import pytest

from tests.support.s3 import S3Server, s3_bucket, s3_server  # noqa: F401
from uploadkit import cli
from uploadkit.cleanup import (CleanupReport, cleanup, find_storage_leftovers, find_temp_files,
                               format_duration, options_from, parse_duration)
from uploadkit.handlers import TempFileHandler
from uploadkit.storage import Storage

HOUR = 3600.0
MiB = 1024 * 1024


def age(path: Any, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800),
    ("0", 0), ("0s", 0), ("3600", 3600), ("1.5h", 5400), (" 2H ", 7200),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "1h x", "h", "-1", "1y", "nan", "inf", "1h-5m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 90, 5400, 200000)] == ["5 s", "1.5 min", "1.5 h", "2.3 d"]


def test_options_from_reads_json_values() -> None:
    assert options_from(["endpoint_url=http://127.0.0.1:9", "anon=true", 'client_kwargs={"a": 1}',
                         "key=abc=def"]) == {
        "endpoint_url": "http://127.0.0.1:9", "anon": True, "client_kwargs": {"a": 1}, "key": "abc=def"}
    with pytest.raises(ValueError):
        options_from(["novalue"])


def test_only_uploadkit_temp_files_older_than_the_age(tmp_path: Any) -> None:
    # A real temp file, as the handler names it, left behind.
    handler = TempFileHandler(str(tmp_path))
    fd = handler._open()
    os.write(fd, b"x" * 1000)
    os.close(fd)
    (left,) = handler.paths
    young = tmp_path / "uploadkit-0123456789abcdef-1.part"
    young.write_bytes(b"y")
    others = [tmp_path / n for n in ("uploadkit-a.txt", "notes.part", "uploadkit-.part.bak", "xuploadkit-a.part")]
    for p in others:
        p.write_bytes(b"z")
        age(p, 10 * HOUR)
    sub = tmp_path / "uploadkit-dir.part"
    sub.mkdir()
    link = tmp_path / "uploadkit-link.part"
    link.symlink_to(others[0])
    os.utime(link, (time.time() - 10 * HOUR,) * 2, follow_symlinks=False)
    age(left, 2 * HOUR)

    found = find_temp_files(str(tmp_path), HOUR)
    assert [f.location for f in found] == [left]
    assert found[0].kind == "temp-file" and found[0].size == 1000 and 2 * HOUR <= found[0].age < 3 * HOUR

    report = cleanup(tempdirs=[str(tmp_path)], older_than=HOUR)
    assert [f.location for f in report.removed] == [left] and report.ok
    assert not os.path.exists(left)
    assert young.exists() and sub.is_dir() and link.is_symlink() and all(p.exists() for p in others)
    # With no age limit the young one goes too, and nothing else.
    assert [f.location for f in cleanup(tempdirs=[str(tmp_path)], older_than=0).removed] == [str(young)]
    assert find_temp_files(str(tmp_path / "missing"), 0) == []


def test_dry_run_lists_and_keeps(tmp_path: Any) -> None:
    p = tmp_path / "uploadkit-feedc0de-0.part"
    p.write_bytes(b"abc")
    report = cleanup(tempdirs=[str(tmp_path)], older_than=0, dry_run=True)
    assert [f.location for f in report.found] == [str(p)] and report.removed == []
    assert p.exists()
    assert report.lines()[0].startswith(f"would remove temp-file {p} (3 bytes, ")
    assert report.lines()[-1] == "cleanup: 1 to remove, 0 failed (older than 0 s)"


def test_local_storage_temp_area(tmp_path: Any) -> None:
    storage = Storage(str(tmp_path / "media"))
    kept = storage.save(io.BytesIO(b"final"), "a/kept.bin")
    area = tmp_path / "media" / ".uploadkit-tmp"
    area.mkdir(exist_ok=True)
    old = area / f"{uuid.uuid4().hex}.part"
    old.write_bytes(b"partial")
    age(old, 2 * HOUR)
    fresh = area / f"{uuid.uuid4().hex}.part"
    fresh.write_bytes(b"in flight")

    found = find_storage_leftovers(storage, HOUR)
    assert [(f.kind, f.location, f.size) for f in found] == [("temp-key", str(old), 7)]
    report = cleanup(storage=storage, older_than=HOUR)
    assert len(report.removed) == 1 and not old.exists() and fresh.exists()
    with storage.open(kept) as f:
        assert f.read() == b"final"


def test_s3_temp_keys_and_stale_multipart_uploads(s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    client = s3_server.client()
    storage = Storage(f"s3://{s3_bucket}/media", storage_options=s3_server.options())
    kept = storage.save(io.BytesIO(b"final bytes"), "kept.bin")
    # What a killed worker leaves: a complete temp object never moved, and a
    # multipart upload of a temp key never completed; plus one outside the root.
    temp_key = f"media/.uploadkit-tmp/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3_bucket, Key=temp_key, Body=b"complete but never committed")
    mpu_key = f"media/.uploadkit-tmp/{uuid.uuid4().hex}"
    mpu = client.create_multipart_upload(Bucket=s3_bucket, Key=mpu_key)["UploadId"]
    client.upload_part(Bucket=s3_bucket, Key=mpu_key, UploadId=mpu, PartNumber=1, Body=b"p" * (5 * MiB))
    outside = client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/big.bin")["UploadId"]
    # Inside the root but not in the temp area: another tool's resumable upload.
    theirs = client.create_multipart_upload(Bucket=s3_bucket, Key="media/theirs.bin")["UploadId"]

    # Just written: younger than an hour, so kept (moto dates every upload's
    # start in 2010; the age comes from its newest part).
    assert find_storage_leftovers(storage, HOUR) == []
    later = time.time() + 2 * HOUR
    found = find_storage_leftovers(storage, HOUR, now=later)
    assert [(f.kind, f.location) for f in found] == [
        ("temp-key", f"{s3_bucket}/{temp_key}"), ("multipart-upload", f"{s3_bucket}/{mpu_key}")]
    assert found[1].upload_id == mpu and found[0].size == len(b"complete but never committed")

    report = cleanup(storage=storage, older_than=HOUR, now=later)
    assert report.ok and len(report.removed) == 2
    assert s3_server.keys(s3_bucket) == ["media/" + kept]
    assert sorted((u["Key"], u["UploadId"]) for u in s3_server.pending_uploads(s3_bucket)) == [
        ("elsewhere/big.bin", outside), ("media/theirs.bin", theirs)]
    assert cleanup(storage=storage, older_than=0).found == []


def run_cli(args: List[str], capsys: pytest.CaptureFixture[str]) -> tuple:
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "uploadkit-0011223344556677-0.part"
    p.write_bytes(b"x" * 2048)
    age(p, 3 * HOUR)
    code, out, _ = run_cli(["cleanup", "--tempdir", str(tmp_path), "--older-than", "4h"], capsys)
    assert (code, out) == (0, "cleanup: 0 removed, 0 failed (older than 4.0 h)\n")
    code, out, _ = run_cli(["cleanup", "--tempdir", str(tmp_path), "--older-than", "2h", "--dry-run"], capsys)
    assert code == 0 and out.startswith(f"would remove temp-file {p} (2.0 KiB, 3.0 h old)") and p.exists()
    code, out, _ = run_cli(["cleanup", "--tempdir", str(tmp_path), "--older-than", "2h"], capsys)
    assert code == 0 and out.splitlines() == [f"removed temp-file {p} (2.0 KiB, 3.0 h old)",
                                              "cleanup: 1 removed, 0 failed (older than 2.0 h)"]
    assert not p.exists()


@pytest.mark.parametrize("args, message", [
    (["cleanup"], "needs --tempdir DIR and/or --storage URL"),
    (["cleanup", "--tempdir", ".", "--older-than", "soon"], "duration 'soon' is not like"),
    (["cleanup", "--tempdir", ".", "--storage-option", "a=b"], "--storage-option needs --storage"),
    (["cleanup", "--storage", "/x", "--storage-option", "nokey"], "is not KEY=VALUE"),
])
def test_cli_refuses(args: List[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err, err


def test_report_lines_name_failures() -> None:
    from uploadkit.cleanup import Leftover

    item = Leftover("temp-key", "b/k", 7200.0, 10)
    report = CleanupReport(older_than=60, dry_run=False, found=[item], failed=[(item, "OSError: boom")])
    assert not report.ok
    assert report.lines() == ["failed to remove temp-key b/k (10 bytes, 2.0 h old): OSError: boom",
                              "cleanup: 0 removed, 1 failed (older than 1.0 min)"]
