"""ThumbnailHandler in a real handler chain, against real storage backends
(a local directory and fsspec's memory filesystem): what is stored on success,
and that every refusal leaves storage empty."""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import fsspec
import pytest
from PIL import Image

from uploadkit.errors import BadImage, UploadError
from uploadkit.handlers import (HashingHandler, MemoryHandler, SniffingHandler, TempFileHandler,
                                UploadHandler)
from uploadkit.imaging import Thumbnail, Thumbnailer, ThumbnailSpec
from uploadkit.limits import Limits
from uploadkit.multipart import encode_multipart
from uploadkit.pipeline import Pipeline, RequestContext
from uploadkit.reader import read_multipart
from uploadkit.storage import Storage
from tests.support import images as I


@dataclass
class Backend:
    storage: Storage
    everything: Callable[[], List[str]]


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    if request.param == "local":
        root = tmp_path / "media"

        def everything() -> List[str]:
            return sorted(os.path.relpath(os.path.join(d, f), root)
                          for d, _, files in os.walk(root) for f in files)

        return Backend(Storage(str(root)), everything)
    url = f"memory://uk-img-{uuid.uuid4().hex}/media"
    fs = fsspec.filesystem("memory")
    prefix = url[len("memory:/"):]

    def everything_mem() -> List[str]:
        try:
            return sorted(p[len(prefix) + 1:] for p in fs.find(prefix))
        except FileNotFoundError:
            return []

    return Backend(Storage(url), everything_mem)


FileSpec = Tuple[str, str, str, bytes]  # field, filename, declared type, bytes


def run(handlers: Sequence[UploadHandler], files: Sequence[FileSpec],
        fields: Sequence[Tuple[str, str]] = (), chunk: int = 4096) -> Pipeline:
    """Drive a pipeline the way the reader does; on a refusal abort it and re-raise."""
    p = Pipeline(handlers, RequestContext(limits=Limits()))
    try:
        p.start()
        for name, value in fields:
            p.add_field(name, value)
        for field, filename, ctype, data in files:
            p.start_file(field, filename, ctype)
            for i in range(0, len(data), chunk):
                p.feed(data[i:i + chunk])
            p.end_file()
        p.finish()
    except BaseException as exc:
        p.abort(exc)
        raise
    return p


def chain(t: Thumbnailer, storage: Optional[Storage]) -> List[UploadHandler]:
    sink: List[UploadHandler] = [storage.handler()] if storage is not None else [MemoryHandler(), TempFileHandler()]
    return [SniffingHandler(), HashingHandler(), t.handler(storage), *sink]


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_thumbnails_stored_beside_the_original(backend: Backend) -> None:
    storage = backend.storage
    t = Thumbnailer([(150, 150), ThumbnailSpec(64, 64, mode="crop")])
    photo = I.encode(I.drawing(600, 400), "JPEG", quality=90)
    alpha = I.encode(I.drawing(300, 300, "RGBA"), "PNG")
    pdf = b"%PDF-1.4\n" + b"x" * 10000
    p = run(chain(t, storage), [("a", "photo.jpg", "image/jpeg", photo),
                                ("b", "doc.pdf", "application/pdf", pdf),
                                ("c", "logo.png", "image/png", alpha)])
    a, b, c = p.ctx.files
    stem = a.key.rsplit(".", 1)[0]
    assert a.thumbnails == {"150x150": f"{stem}.150x150.jpg", "64x64": f"{stem}.64x64.jpg"}
    assert b.thumbnails == {} and "thumbnails" not in b.extra  # a PDF is left alone
    cstem = c.key.rsplit(".", 1)[0]
    assert c.thumbnails == {"150x150": f"{cstem}.150x150.png", "64x64": f"{cstem}.64x64.png"}
    assert backend.everything() == sorted([a.key, b.key, c.key, *a.thumbnails.values(), *c.thumbnails.values()])
    with storage.open(a.key) as f:
        assert f.read() == photo  # the original as sent
    with storage.open(a.thumbnails["150x150"]) as f:
        assert decode(f.read()).size == (150, 100)
    with storage.open(c.thumbnails["64x64"]) as f:
        im = decode(f.read())
        assert im.size == (64, 64) and im.mode == "RGBA"
    assert storage.thumbnails_of(a.key) == sorted(a.thumbnails.values())
    p.close()
    assert sorted(backend.everything()) == sorted([a.key, b.key, c.key, *a.thumbnails.values(),
                                                   *c.thumbnails.values()])


def test_through_the_multipart_reader(backend: Backend) -> None:
    t = Thumbnailer([(100, 100)])
    photo = I.encode(I.drawing(640, 480), "JPEG")
    body, ctype = encode_multipart([("title", "hello")], [("pic", "p.jpg", "image/jpeg", photo)])
    p = read_multipart(io.BytesIO(body), content_type=ctype, content_length=len(body),
                       handlers=chain(t, backend.storage), read_size=1000)
    (f,) = p.ctx.files
    assert f.thumbnails == {"100x100": f.key.rsplit(".", 1)[0] + ".100x100.jpg"}
    assert len(backend.everything()) == 2
    p.close()


@pytest.mark.parametrize("name, data, where", [
    ("bomb", I.bomb_png(), "file_start"),
    ("truncated", I.truncated(I.encode(I.drawing(400, 300), "JPEG")), "request_end"),
    ("corrupt", I.encode(I.drawing(400, 300), "PNG")[:60] + b"\x00" * 3000 + b"\x00\x00\x00\x00IEND\xaeB`\x82",
     "request_end"),
])
def test_refusals_leave_storage_empty(backend: Backend, name: str, data: bytes, where: str) -> None:
    t = Thumbnailer([(100, 100)])
    good = I.encode(I.drawing(300, 200), "JPEG")
    with pytest.raises(BadImage) as info:
        run(chain(t, backend.storage), [("ok", "ok.jpg", "image/jpeg", good),
                                        ("bad", f"{name}.img", "", data)])
    assert info.value.status == 422 and info.value.field == "bad"
    assert f"{name}.img" in info.value.message
    assert backend.everything() == []


def test_a_later_refusal_removes_committed_thumbnails(backend: Backend) -> None:
    class RefuseAtEnd(UploadHandler):
        def request_end(self, ctx: RequestContext) -> None:
            raise UploadError("changed my mind")

    t = Thumbnailer([(100, 100), (50, 50)])
    handlers = [*chain(t, backend.storage), RefuseAtEnd()]
    with pytest.raises(UploadError, match="changed my mind"):
        run(handlers, [("a", "a.jpg", "image/jpeg", I.encode(I.drawing(300, 200), "JPEG"))])
    assert backend.everything() == []


def test_crop_fields(backend: Backend) -> None:
    t = Thumbnailer([ThumbnailSpec(64, 64, mode="crop")], crop_fields=("x", "y", "w", "h"))
    src = I.drawing(400, 300)
    photo = I.encode(src, "PNG")
    fields = [("x", "100"), ("y", "50.5"), ("w", "200"), ("h", "200")]
    p = run(chain(t, backend.storage), [("avatar", "me.png", "image/png", photo)], fields)
    (f,) = p.ctx.files
    with backend.storage.open(f.thumbnails["64x64"]) as fh:
        got = decode(fh.read())
    want = src.resize((64, 64), Image.Resampling.LANCZOS, box=(100, 50.5, 300, 250.5))
    from tests.test_imaging import mad
    assert mad(got, want) < 4
    p.close()


@pytest.mark.parametrize("fields, field, message", [
    ([("x", "10"), ("y", "abc"), ("w", "5"), ("h", "5")], "y", "not a number"),
    ([("x", "10"), ("y", "0"), ("w", "500"), ("h", "5")], None, "outside the 400x300 image"),
    ([("x", "10"), ("y", "0")], "w", "missing w, h"),
    ([("x", "inf"), ("y", "0"), ("w", "5"), ("h", "5")], "x", "finite"),
])
def test_bad_crop_fields_are_422(backend: Backend, fields: Any, field: Optional[str], message: str) -> None:
    t = Thumbnailer([(64, 64)], crop_fields=("x", "y", "w", "h"))
    with pytest.raises(BadImage, match=message) as info:
        run(chain(t, backend.storage), [("avatar", "me.png", "image/png", I.encode(I.drawing(400, 300), "PNG"))],
            fields)
    assert info.value.status == 422
    assert info.value.field == (field or "avatar")
    assert backend.everything() == []


def test_originals_rewritten_before_storage(backend: Backend) -> None:
    t = Thumbnailer([(100, 100)], strip_gps=True, max_original=(300, 300))
    gps_small = I.gps_jpeg(200, 150)
    big = I.oriented_jpeg(I.drawing(600, 800), 6)
    pdf = b"%PDF-1.4\n" + b"y" * 5000
    p = run(chain(t, backend.storage), [("a", "small.jpg", "image/jpeg", gps_small),
                                        ("b", "big.jpg", "image/jpeg", big),
                                        ("c", "doc.pdf", "application/pdf", pdf)])
    a, b, c = p.ctx.files
    with backend.storage.open(a.key) as f:
        stored = f.read()
    im = decode(stored)
    assert im.size == (200, 150) and 0x8825 not in im.getexif() and b"GPS" not in stored
    assert im.tobytes() == decode(gps_small).tobytes()
    with backend.storage.open(b.key) as f:
        im = decode(f.read())
    assert im.size == (225, 300) and im.getexif().get(0x0112) == 1
    with backend.storage.open(c.key) as f:
        assert f.read() == pdf
    with backend.storage.open(b.thumbnails["100x100"]) as f:
        assert decode(f.read()).size == (75, 100)
    p.close()


def test_without_storage_thumbnails_ride_on_the_file() -> None:
    t = Thumbnailer([(100, 100), (40, 40)])
    photo = I.encode(I.drawing(500, 250), "JPEG")
    p = run(chain(t, None), [("a", "a.jpg", "image/jpeg", photo), ("b", "b.txt", "text/plain", b"hi")])
    a, b = p.ctx.files
    thumbs = a.extra["thumbnails"]
    assert set(thumbs) == {"100x100", "40x40"} and all(isinstance(v, Thumbnail) for v in thumbs.values())
    assert decode(thumbs["100x100"].data).size == (100, 50)
    assert a.thumbnails == {} and "thumbnails" not in b.extra
    assert a.read() == photo
    p.close()


def test_big_images_spool_to_disk_and_are_closed(tmp_path: Any) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    t = Thumbnailer([(100, 100)], spool_memory=10_000, tempdir=str(spool_dir))
    photo = I.encode(I.photo(800, 600), "JPEG", quality=95)
    assert len(photo) > 10_000
    handler = t.handler(None)
    p = run([SniffingHandler(), handler, MemoryHandler(threshold=10 ** 8)], [("a", "a.jpg", "image/jpeg", photo)])
    assert p.ctx.files[0].extra["thumbnails"]["100x100"].width == 100
    p.close()
    assert os.listdir(spool_dir) == []  # anonymous temp files: nothing named, and closed


def test_background_thumbnails(backend: Backend) -> None:
    t = Thumbnailer([(100, 100), (30, 30)], background=True, workers=1)
    try:
        photo = I.encode(I.drawing(400, 300), "JPEG")
        p = run(chain(t, backend.storage), [("a", "a.jpg", "image/jpeg", photo)])
        (f,) = p.ctx.files
        stem = f.key.rsplit(".", 1)[0]
        assert f.thumbnails == {"100x100": f"{stem}.100x100.jpg", "30x30": f"{stem}.30x30.jpg"}
        assert f.extra["thumbnails_pending"] is True
        assert backend.everything() == [f.key]  # nothing made while the request waits
        p.close()  # the response is over: the work starts
        assert t.wait(timeout=20)
        assert f.extra["thumbnails_pending"] is False
        assert backend.everything() == sorted([f.key, *f.thumbnails.values()])
        # checks that must answer the request still do
        with pytest.raises(BadImage):
            run(chain(t, backend.storage), [("b", "b.png", "image/png", I.bomb_png())])
        with pytest.raises(BadImage, match="truncated"):
            run(chain(t, backend.storage), [("b", "b.jpg", "image/jpeg", I.truncated(photo))])
        assert backend.everything() == sorted([f.key, *f.thumbnails.values()])
    finally:
        t.shutdown()


def test_background_work_is_dropped_when_the_request_aborts(backend: Backend) -> None:
    class RefuseAtEnd(UploadHandler):
        def request_end(self, ctx: RequestContext) -> None:
            raise UploadError("no")

    t = Thumbnailer([(100, 100)], background=True, workers=1)
    try:
        with pytest.raises(UploadError):
            run([*chain(t, backend.storage), RefuseAtEnd()],
                [("a", "a.jpg", "image/jpeg", I.encode(I.drawing(400, 300), "JPEG"))])
        assert t.wait(timeout=20)
        assert backend.everything() == []
    finally:
        t.shutdown()


class Recorder(UploadHandler):
    """Counts the chunks that reach it (placed between the thumbnails and the sink)."""

    def __init__(self) -> None:
        self.chunks: List[int] = []

    def file_start(self, info: Any) -> Any:
        self.chunks = []
        return None

    def receive(self, info: Any, chunk: bytes) -> Optional[bytes]:
        self.chunks.append(len(chunk))
        return chunk


def test_strip_gps_streams_a_jpeg_after_its_header(backend: Backend) -> None:
    from uploadkit.imaging import strip_location

    photo = I.gps_jpeg(1200, 900)
    assert len(photo) > 40_000
    t = Thumbnailer([(100, 100)], strip_gps=True)
    rec = Recorder()
    handlers = [SniffingHandler(), HashingHandler(), t.handler(backend.storage), rec, backend.storage.handler()]
    p = run(handlers, [("a", "a.jpg", "image/jpeg", photo)], chunk=4096)
    (f,) = p.ctx.files
    with backend.storage.open(f.key) as fh:
        stored = fh.read()
    assert stored == strip_location(io.BytesIO(photo), "JPEG")
    assert 0x8825 not in decode(stored).getexif()
    # held only until the image data started: then chunk by chunk, not one piece at the end
    assert len(rec.chunks) > len(photo) // 4096 - 3 and max(rec.chunks) < 8 * 4096
    assert f.sha256 is not None and sum(rec.chunks) == len(stored)
    p.close()


def test_jpeg_bomb_with_a_late_frame_header_refused_mid_upload(backend: Backend) -> None:
    bomb = I.with_big_app_segment(I.bomb_jpeg(), 20000) + b"\x00" * 200_000
    p = Pipeline(chain(Thumbnailer([(100, 100)]), backend.storage), RequestContext(limits=Limits()))
    p.start()
    p.start_file("pic", "big.jpg", "image/jpeg")
    fed = 0
    with pytest.raises(BadImage, match="30000x30000") as info:
        for i in range(0, len(bomb), 4096):
            p.feed(bomb[i:i + 4096])
            fed = i + 4096
    p.abort(info.value)
    assert fed < 30_000  # refused as soon as the frame header arrived
    assert info.value.field == "pic"
    assert backend.everything() == []


def test_a_200_mp_phone_photo_with_a_big_exif_block_gets_its_thumbnails(backend: Backend) -> None:
    # Phones write EXIF blocks of tens of KiB (with an embedded preview) before
    # the frame header: the budget is counted when that header arrives.
    photo = I.with_big_app_segment(I.quadrant_jpeg(16320, 12240, [(200, 40, 40)] * 4), 60000)
    p = run(chain(Thumbnailer([(150, 150), (600, 600)]), backend.storage),
            [("pic", "phone.jpg", "image/jpeg", photo)], chunk=65536)
    (f,) = p.ctx.files
    with backend.storage.open(f.thumbnails["600x600"]) as fh:
        im = decode(fh.read())
    assert im.size == (600, 450) and max(abs(a - b) for a, b in zip(im.getpixel((300, 225)), (200, 40, 40))) < 30
    p.close()


@pytest.mark.parametrize("kind", ["progressive", "one component a scan"])
def test_multi_scan_jpeg_too_large_to_hold_refused_mid_upload(backend: Backend, kind: str) -> None:
    # Both hold every DCT coefficient of the full-size image while decoding.
    # A progressive frame says so itself; a baseline one whose first scan
    # carries fewer components than the frame says so at that scan header.
    data = bytearray(I.encode(I.drawing(64, 64), "JPEG", progressive=kind == "progressive"))
    i = data.index(b"\xff\xc2" if kind == "progressive" else b"\xff\xc0")
    data[i + 5:i + 9] = (12240).to_bytes(2, "big") + (16320).to_bytes(2, "big")
    if kind != "progressive":
        data[data.index(b"\xff\xda") + 4] = 1  # the first scan's component count
    late = I.with_big_app_segment(bytes(data), 20000) + b"\x00" * 200_000
    p = Pipeline(chain(Thumbnailer([(100, 100)]), backend.storage), RequestContext(limits=Limits()))
    p.start()
    p.start_file("pic", "big.jpg", "image/jpeg")
    fed = 0
    with pytest.raises(BadImage, match="16320x12240 JPEG in several scans") as info:
        for k in range(0, len(late), 4096):
            p.feed(late[k:k + 4096])
            fed = k + 4096
    p.abort(info.value)
    assert fed < 30_000 and info.value.field == "pic" and info.value.status == 422
    assert backend.everything() == []


def test_max_original_waits_for_a_late_frame_header_then_passes(backend: Backend) -> None:
    small = I.with_big_app_segment(I.encode(I.drawing(300, 200), "JPEG"), 20000)
    t = Thumbnailer([(100, 100)], max_original=(1000, 1000))
    rec = Recorder()
    p = run([SniffingHandler(), t.handler(backend.storage), rec, backend.storage.handler()],
            [("a", "a.jpg", "image/jpeg", small)], chunk=4096)
    (f,) = p.ctx.files
    with backend.storage.open(f.key) as fh:
        assert fh.read() == small  # fits: stored byte for byte
    assert len(rec.chunks) > 2
    p.close()


def test_dedup_keeps_the_thumbnails_already_stored(tmp_path: Any) -> None:
    root = str(tmp_path / "media")
    storage = Storage(root, collision="dedup")
    t = Thumbnailer([(100, 100)])
    photo = I.encode(I.drawing(400, 300), "JPEG")
    first = run(chain(t, storage), [("a", "a.jpg", "image/jpeg", photo)])
    (f,) = first.ctx.files
    first.close()
    stored = sorted(os.listdir(root))

    class RefuseAtEnd(UploadHandler):
        def request_end(self, ctx: RequestContext) -> None:
            raise UploadError("no")

    # The same bytes again, in a request that is then refused: what the first
    # request stored (original and thumbnails) must survive the abort.
    with pytest.raises(UploadError):
        run([*chain(t, storage), RefuseAtEnd()], [("a", "again.jpg", "image/jpeg", photo)])
    assert sorted(os.listdir(root)) == stored
    second = run(chain(t, storage), [("a", "again.jpg", "image/jpeg", photo)])
    (g,) = second.ctx.files
    assert g.key == f.key and g.deduplicated and g.thumbnails == f.thumbnails
    assert sorted(os.listdir(root)) == stored


def test_overwrite_replaces_stale_thumbnails(tmp_path: Any) -> None:
    root = str(tmp_path / "media")
    storage = Storage(root, upload_to="{filename}", collision="overwrite")
    t = Thumbnailer([(100, 100)])
    red = I.encode(Image.new("RGB", (300, 200), (250, 0, 0)), "JPEG")
    blue = I.encode(Image.new("RGB", (300, 200), (0, 0, 250)), "JPEG")
    run(chain(t, storage), [("a", "pic.jpg", "image/jpeg", red)]).close()
    p = run(chain(t, storage), [("a", "pic.jpg", "image/jpeg", blue)])
    (f,) = p.ctx.files
    with storage.open(f.thumbnails["100x100"]) as fh:
        assert decode(fh.read()).getpixel((50, 30))[2] > 200
    p.close()


def test_background_formats_and_failures(backend: Backend) -> None:
    t = Thumbnailer([(64, 64)], background=True, workers=1)
    try:
        alpha = I.encode(I.drawing(300, 200, "RGBA"), "PNG")
        broken = bytearray(I.encode(I.drawing(300, 200), "PNG"))
        start = broken.index(b"IDAT") + 40
        broken[start:start + 200] = bytes(range(200))  # decodes badly, though complete
        p = run(chain(t, backend.storage), [("a", "a.png", "image/png", alpha),
                                            ("b", "b.png", "image/png", bytes(broken))])
        a, b = p.ctx.files
        assert a.thumbnails["64x64"].endswith(".64x64.png")
        p.close()
        assert t.wait(timeout=20)
        with backend.storage.open(a.thumbnails["64x64"]) as f:
            assert decode(f.read()).mode == "RGBA"
        assert a.extra["thumbnails_pending"] is False and "thumbnails_error" not in a.extra
        assert b.extra["thumbnails_pending"] is False and "corrupt" in b.extra["thumbnails_error"]
        assert backend.everything() == sorted([a.key, b.key, a.thumbnails["64x64"]])
    finally:
        t.shutdown()


def test_corrupt_jpeg_header_refused_at_file_start(backend: Backend) -> None:
    bad = bytearray(I.encode(I.drawing(200, 100), "JPEG"))
    bad[4:6] = b"\x00\x01"  # a segment length below its own size
    p = Pipeline(chain(Thumbnailer([(50, 50)]), backend.storage), RequestContext(limits=Limits()))
    p.start()
    p.start_file("pic", "x.jpg", "image/jpeg")
    p.feed(bytes(bad))  # less than the head: file_start runs at the file's end
    with pytest.raises(BadImage, match="x.jpg.*corrupt") as info:
        p.end_file()
    p.abort(info.value)
    assert info.value.field == "pic" and backend.everything() == []


def test_thumbnails_follow_a_renamed_original(backend: Backend) -> None:
    # Same filename twice under collision="rename": the second original gets a
    # new key at commit time, and its thumbnails must be named after that key
    # and show its own picture, not the first upload's.
    base = backend.storage
    storage = Storage(base.root, fs=base.fs, upload_to="{filename}", collision="rename")
    t = Thumbnailer([(50, 50)])
    red = I.encode(Image.new("RGB", (200, 100), (255, 0, 0)), "PNG")
    blue = I.encode(Image.new("RGB", (100, 200), (0, 0, 255)), "PNG")
    (first,) = run(chain(t, storage), [("a", "same.png", "image/png", red)]).ctx.files
    (second,) = run(chain(t, storage), [("a", "same.png", "image/png", blue)]).ctx.files
    assert first.key == "same.png" and second.key != first.key and second.key.endswith(".png")
    for f, colour, size in ((first, (255, 0, 0), (50, 25)), (second, (0, 0, 255), (25, 50))):
        stem = f.key.rsplit(".", 1)[0]
        assert f.thumbnails == {"50x50": f"{stem}.50x50.jpg"}  # opaque: JPEG
        with storage.open(f.thumbnails["50x50"]) as fh:
            im = decode(fh.read()).convert("RGB")
        assert im.size == size
        assert all(abs(a - b) < 12 for a, b in zip(im.getpixel((10, 10)), colour))
