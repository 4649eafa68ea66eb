"""uploadkit.imaging: thumbnails of images drawn in code, compared by pixels.

Every output is checked by size, by pixels against a reference resize of the
same drawing (mean absolute difference), and by what it must not carry."""

from __future__ import annotations

import dataclasses
import io
import time
import tracemalloc
import warnings
from typing import Any, Tuple

import pytest
from PIL import Image, ImageChops, ImageCms, ImageFile, ImageStat, features

from uploadkit.errors import BadImage
from uploadkit.imaging import (SUPPORTED_TYPES, Thumbnail, Thumbnailer, ThumbnailSpec, _open_image,
                               _read_header, detect_format, probe, thumbnail_geometry)
from tests.support import images as I

LANCZOS = Image.Resampling.LANCZOS


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel, 0-255."""
    assert a.size == b.size, (a.size, b.size)
    if a.mode != b.mode:
        b = b.convert(a.mode)
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / len(a.getbands())


def reference(im: Image.Image, size: Tuple[int, int], box: Any = None) -> Image.Image:
    return im.resize(size, LANCZOS, box=box)


# -- geometry: the rounding rule -------------------------------------------------------


@pytest.mark.parametrize("src, box, expected", [
    ((1000, 667), (150, 150), (150, 100)),   # 667 * 0.15 = 100.05
    ((667, 1000), (150, 150), (100, 150)),
    ((1001, 500), (150, 150), (150, 75)),    # 74.925 rounds up
    ((400, 301), (200, 200), (200, 151)),    # 150.5: half rounds up
    ((400, 299), (200, 200), (200, 150)),    # 149.5: half rounds up
    ((10000, 10), (100, 100), (100, 1)),     # 0.1 px: never below one pixel
    ((300, 200), (300, 300), (300, 200)),    # exact fit on the limiting side
    ((10, 8), (150, 150), (10, 8)),          # never enlarged
])
def test_fit_rounding(src: Tuple[int, int], box: Tuple[int, int], expected: Tuple[int, int]) -> None:
    size, region, canvas = thumbnail_geometry(*src, *box, mode="fit")
    assert size == expected
    assert region == (0.0, 0.0, float(src[0]), float(src[1]))
    assert canvas is None


def test_fit_upscale() -> None:
    assert thumbnail_geometry(10, 8, 150, 150, "fit", upscale=True)[0] == (150, 120)


def test_crop_geometry_is_centred() -> None:
    size, region, _ = thumbnail_geometry(1000, 667, 400, 400, "crop")
    assert size == (400, 400)
    assert region == pytest.approx((166.5, 0.0, 833.5, 667.0))
    # smaller than the box on one side: cropped to the box, never enlarged
    size, region, _ = thumbnail_geometry(1000, 200, 400, 400, "crop")
    assert size == (400, 200)
    assert region == pytest.approx((300.0, 0.0, 700.0, 200.0))
    assert thumbnail_geometry(300, 100, 400, 400, "crop")[0] == (300, 100)


def test_pad_geometry() -> None:
    size, _, canvas = thumbnail_geometry(1000, 667, 150, 150, "pad")
    assert size == (150, 100) and canvas == (150, 150)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        Thumbnailer([(10, 10)], mode="stretch")
    with pytest.raises(ValueError, match="distinct"):
        Thumbnailer([(10, 10), ThumbnailSpec(10, 10, mode="crop")])
    with pytest.raises(ValueError, match="quality"):
        Thumbnailer([(10, 10)], quality=0)
    with pytest.raises(ValueError, match="format"):
        ThumbnailSpec(10, 10, format="BMP")
    with pytest.raises(ValueError, match="width"):
        ThumbnailSpec(0, 10)


# -- thumbnails of ordinary images -----------------------------------------------------


def test_jpeg_fit_and_crop_match_a_reference_resize() -> None:
    src = I.drawing(1200, 800)
    data = I.encode(src, "JPEG", quality=95)
    t = Thumbnailer([(150, 150), (200, 200), ThumbnailSpec(400, 400, mode="crop")])
    out = t.make(io.BytesIO(data))
    assert list(out) == ["150x150", "200x200", "400x400"]
    assert [(th.width, th.height) for th in out.values()] == [(150, 100), (200, 133), (400, 400)]
    for th in out.values():
        assert th.format == "JPEG" and th.content_type == "image/jpeg" and th.extension == "jpg"
        assert decode(th.data).size == (th.width, th.height)
    assert mad(decode(out["150x150"].data), reference(src, (150, 100))) < 4
    assert mad(decode(out["200x200"].data), reference(src, (200, 133))) < 4
    assert mad(decode(out["400x400"].data), reference(src, (400, 400), (200, 0, 1000, 800))) < 4


def test_path_and_unseekable_sources(tmp_path: Any) -> None:
    data = I.encode(I.drawing(640, 480), "JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(data)

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, b: Any) -> int:
            chunk = self.buf.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    t = Thumbnailer([(100, 100)])
    a = t.make(str(path))["100x100"]
    b = t.make(path)["100x100"]
    c = t.make(Pipe())["100x100"]
    assert a == b == c and (a.width, a.height) == (100, 75)


def test_crop_and_pad_modes_give_exact_boxes() -> None:
    src = I.drawing(800, 400, "RGB")
    data = I.encode(src, "PNG")
    t = Thumbnailer([ThumbnailSpec(100, 100, mode="crop"), ThumbnailSpec(120, 120, mode="pad"),
                     ThumbnailSpec(90, 90, mode="pad", pad_color="white")])
    out = t.make(io.BytesIO(data))
    crop, pad, white = (decode(out[k].data) for k in ("100x100", "120x120", "90x90"))
    assert crop.size == (100, 100) and out["100x100"].format == "JPEG"
    assert mad(crop, reference(src, (100, 100), (200, 0, 600, 400))) < 4
    # transparent padding: PNG with alpha, the image centred
    assert pad.size == (120, 120) and out["120x120"].format == "PNG" and pad.mode == "RGBA"
    assert pad.getpixel((60, 5))[3] == 0 and pad.getpixel((60, 114))[3] == 0
    assert pad.getpixel((60, 60))[3] == 255
    assert mad(pad.crop((0, 30, 120, 90)).convert("RGB"), reference(src, (120, 60))) < 4
    # a pad colour keeps an opaque image a JPEG
    assert white.size == (90, 90) and out["90x90"].format == "JPEG"
    assert all(v > 245 for v in white.convert("RGB").getpixel((45, 3)))


def test_upscale_only_when_asked() -> None:
    data = I.encode(I.drawing(60, 40), "PNG")
    assert Thumbnailer([(150, 150)]).make(io.BytesIO(data))["150x150"].width == 60
    big = Thumbnailer([(150, 150)], upscale=True).make(io.BytesIO(data))["150x150"]
    assert (big.width, big.height) == (150, 100)


def test_formats_and_quality() -> None:
    src = I.drawing(600, 400)
    data = I.encode(src, "JPEG", quality=95)
    t = Thumbnailer([ThumbnailSpec(300, 300, quality=30), ThumbnailSpec(200, 200, format="webp"),
                     ThumbnailSpec(250, 250, format="PNG")], quality=95)
    out = t.make(io.BytesIO(data))
    assert out["200x200"].format == "WEBP" and decode(out["200x200"].data).format == "WEBP"
    assert out["250x250"].format == "PNG" and out["250x250"].content_type == "image/png"
    hi = Thumbnailer([(300, 300)], quality=95).make(io.BytesIO(data))["300x300"]
    assert len(out["300x300"].data) < len(hi.data) * 0.7
    alpha = I.encode(I.drawing(600, 400, "RGBA"), "PNG")
    webp = Thumbnailer([(100, 100)], alpha_format="WEBP").make(io.BytesIO(alpha))["100x100"]
    assert webp.format == "WEBP" and decode(webp.data).mode == "RGBA"
    jpeg = Thumbnailer([(100, 100)], format="JPEG").make(io.BytesIO(alpha))["100x100"]
    assert jpeg.format == "JPEG" and decode(jpeg.data).mode == "RGB"


# -- real-photo cases ---------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = I.drawing(300, 400)  # portrait
    data = I.oriented_jpeg(upright, orientation)
    out = Thumbnailer([(150, 150), ThumbnailSpec(80, 80, mode="crop")]).make(io.BytesIO(data))
    thumb = decode(out["150x150"].data)
    assert thumb.size == (113, 150)  # still portrait
    assert mad(thumb, reference(upright, (113, 150))) < 5
    r, g, b = thumb.getpixel((20, 20))  # the red block is top-left again
    assert r > 180 and g < 80 and b < 80
    square = decode(out["80x80"].data)
    assert mad(square, reference(upright, (80, 80), (0, 50, 300, 350))) < 6


def test_cmyk_jpeg_becomes_rgb() -> None:
    src = I.drawing(320, 240)
    out = Thumbnailer([(160, 160)]).make(io.BytesIO(I.cmyk_jpeg()))["160x160"]
    im = decode(out.data)
    assert im.mode == "RGB" and out.format == "JPEG"
    assert mad(im, reference(src, (160, 120))) < 6


def test_palette_with_transparency_keeps_alpha() -> None:
    out = Thumbnailer([(160, 160)]).make(io.BytesIO(I.palette_png_transparent()))["160x160"]
    im = decode(out.data)
    assert out.format == "PNG" and im.mode == "RGBA" and im.size == (160, 120)
    assert im.getpixel((2, 60))[3] == 0  # the transparent frame
    assert im.getpixel((80, 60))[3] == 255
    src = I.drawing(320, 240)
    inner = im.crop((40, 30, 120, 90)).convert("RGB")
    assert mad(inner, reference(src, (160, 120)).crop((40, 30, 120, 90))) < 8


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    out = Thumbnailer([(160, 160)]).make(io.BytesIO(I.i16_png()))["160x160"]
    im = decode(out.data)
    assert im.mode == "L" and out.format == "JPEG"
    assert mad(im, reference(I.drawing(320, 240).convert("L"), (160, 120))) < 4


def test_la_keeps_grey_and_alpha() -> None:
    out = Thumbnailer([(160, 160)]).make(io.BytesIO(I.la_png()))["160x160"]
    im = decode(out.data)
    assert out.format == "PNG" and im.mode == "LA"
    src = I.drawing(320, 240, "RGBA").convert("LA")
    assert abs(im.getchannel("A").getpixel((80, 60)) - 255) < 8
    assert im.getchannel("A").getpixel((0, 0)) < 10
    assert mad(im.getchannel("A"), reference(src, (160, 120)).getchannel("A")) < 3


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_the_first_frame(fmt: str) -> None:
    out = Thumbnailer([(100, 100)]).make(io.BytesIO(I.animated(fmt)))["100x100"]
    im = decode(out.data).convert("RGB")
    assert im.size == (100, 60)
    first = I.frames(200, 120)[0]
    assert mad(im, reference(first, (100, 60))) < 6
    r, g, b = im.getpixel((3, 3))
    assert r > 180 and g < 80


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", "TIFF", "BMP"])
def test_other_input_formats(fmt: str) -> None:
    src = I.drawing(400, 300)
    if fmt == "AVIF" and not features.check("avif"):
        # Without AVIF support the type is not claimed (and uploads pass untouched).
        assert "image/avif" not in SUPPORTED_TYPES
        assert detect_format(I.encode(src, "PNG")) == "PNG"
        return
    data = I.encode(src, fmt, **({"quality": 90} if fmt in ("WEBP", "AVIF") else {}))
    assert detect_format(data) == fmt
    im = decode(Thumbnailer([(200, 200)]).make(io.BytesIO(data))["200x200"].data)
    assert mad(im, reference(src, (200, 150))) < 6


def test_icc_profile_converted_to_srgb_or_kept() -> None:
    icc = I.swapped_rgb_profile()
    data = I.encode(Image.new("RGB", (300, 200), (255, 0, 0)), "PNG", icc_profile=icc)
    converted = Thumbnailer([(100, 100)]).make(io.BytesIO(data))["100x100"]
    im = decode(converted.data)
    r, g, b = im.getpixel((50, 30))
    assert b > 200 and r < 60  # the profile says this "red" is sRGB blue
    assert "icc_profile" not in im.info
    kept = Thumbnailer([(100, 100)], color="keep").make(io.BytesIO(data))["100x100"]
    im = decode(kept.data)
    assert im.getpixel((50, 30))[0] > 240
    assert im.info.get("icc_profile") == icc
    # CMYK with a colour profile is converted too (to RGB)
    srgb = I.encode(Image.new("RGB", (30, 20), (0, 200, 0)), "JPEG",
                    icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    same = decode(Thumbnailer([(10, 10)]).make(io.BytesIO(srgb))["10x10"].data)
    assert "icc_profile" not in same.info and same.getpixel((5, 3))[1] > 180


def test_metadata_is_stripped_from_thumbnails() -> None:
    gps = I.gps_jpeg(comment=b"shot at home")
    assert decode(gps).getexif().get_ifd(0x8825)  # the source does carry GPS
    for source in (gps, I.png_with_metadata()):
        out = Thumbnailer([(100, 100), ThumbnailSpec(90, 90, format="PNG"),
                           ThumbnailSpec(80, 80, format="WEBP")]).make(io.BytesIO(source))
        for th in out.values():
            im = decode(th.data)
            assert len(im.getexif()) == 0, th.size
            assert not ({"exif", "comment", "Comment", "XML:com.adobe.xmp", "xmp"} & set(im.info)), im.info
            assert b"GPS" not in th.data and b"Exif" not in th.data and b"home" not in th.data


def test_script_comment_and_polyglot_tail_are_dropped() -> None:
    data = I.jpeg_with_script()
    assert I.SCRIPT in data and b"PK\x03\x04" in data
    out = Thumbnailer([(120, 120), ThumbnailSpec(100, 100, format="PNG")]).make(io.BytesIO(data))
    for th in out.values():
        assert I.SCRIPT not in th.data and b"<script" not in th.data and b"PK\x03\x04" not in th.data
        assert "comment" not in decode(th.data).info
    assert mad(decode(out["120x120"].data), reference(I.drawing(240, 160), (120, 80))) < 5


def test_crop_box_before_thumbnails() -> None:
    src = I.drawing(800, 600)
    data = I.encode(src, "JPEG", quality=95)
    t = Thumbnailer([(100, 100), ThumbnailSpec(50, 50, mode="crop")])
    out = t.make(io.BytesIO(data), crop=(100, 50, 400, 300))
    assert (out["100x100"].width, out["100x100"].height) == (100, 75)
    assert mad(decode(out["100x100"].data), reference(src, (100, 75), (100, 50, 500, 350))) < 5
    assert mad(decode(out["50x50"].data), reference(src, (50, 50), (150, 50, 450, 350))) < 6
    for bad in [(700, 0, 200, 100), (0, 0, 0, 10), (-1, 0, 10, 10), ("a", 0, 1, 1), (0, 0, float("nan"), 1)]:
        with pytest.raises(BadImage, match="crop"):
            t.make(io.BytesIO(data), crop=bad)  # type: ignore[arg-type]


def test_crop_box_is_in_upright_coordinates() -> None:
    upright = I.drawing(300, 400)
    data = I.oriented_jpeg(upright, 6)
    out = Thumbnailer([(100, 100)]).make(io.BytesIO(data), crop=(0, 0, 150, 200))
    assert mad(decode(out["100x100"].data), reference(upright, (75, 100), (0, 0, 150, 200))) < 6
    with pytest.raises(BadImage):  # inside the stored 400x300, outside the upright 300x400
        Thumbnailer([(100, 100)]).make(io.BytesIO(data), crop=(0, 0, 350, 250))


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bomb", [I.bomb_png, I.bomb_gif, I.bomb_jpeg, I.bomb_webp])
def test_bombs_refused_from_the_header(bomb: Any) -> None:
    data = bomb()
    assert len(data) < 1000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BadImage, match=r"megapixels\); the limit is 50.0 megapixels") as info:
            Thumbnailer([(100, 100)]).make(io.BytesIO(data))
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 2_000_000
    assert info.value.status == 422 and info.value.code == "bad_image"
    assert info.value.limit == 50_000_000
    # the header alone, e.g. a file's first 8 KiB, is enough
    with pytest.raises(BadImage):
        Thumbnailer([(100, 100)]).check(data[:8192])


def test_own_limit_below_pillows() -> None:
    # 60 Mpx is under Pillow's own limit but over ours; a lower limit per Thumbnailer too.
    with pytest.raises(BadImage, match="10000x6000"):
        Thumbnailer([(10, 10)]).make(io.BytesIO(I.bomb_png(10000, 6000)))
    with pytest.raises(BadImage, match="the limit is 0.1 megapixels"):
        Thumbnailer([(10, 10)], max_pixels=100_000).make(io.BytesIO(I.encode(I.drawing(400, 300), "PNG")))


def test_a_higher_limit_opens_without_pillows_warning() -> None:
    data = I.bomb_png(10000, 10000)  # 100 Mpx: Pillow warns between 89 and 179 Mpx
    fp = io.BytesIO(data)
    header = _read_header(fp)
    assert header is not None and header.pixels == 100_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im = _open_image(fp, header, max_pixels=200_000_000)
    assert im.size == (10000, 10000)
    im.close()
    assert Image.MAX_IMAGE_PIXELS == 89478485  # read, never changed


# -- today's phone photos: a budget on what is decoded, not on what is declared --------------

#: A Pixel's 50 MP photo and a Galaxy Ultra's 200 MP one, as the sensor stores them.
PHONE_SIZES = [(8160, 6144), (16320, 12240)]
QUADRANTS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40)]


def _declared_jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    """A small real JPEG whose frame header declares ``width`` x ``height``."""
    data = bytearray(I.encode(I.drawing(64, 64), "JPEG", progressive=progressive))
    i = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _quadrants(im: Image.Image) -> list:
    w, h = im.size
    rgb = im.convert("RGB")
    return [rgb.getpixel((x, y)) for y in (h // 4, h * 3 // 4) for x in (w // 4, w * 3 // 4)]


def _close(got: list, want: list) -> bool:
    return all(max(abs(a - b) for a, b in zip(g, w)) < 40 for g, w in zip(got, want))


@pytest.mark.parametrize("width, height", PHONE_SIZES)
def test_phone_jpegs_pass_the_default_header_check(width: int, height: int) -> None:
    t = Thumbnailer([(150, 150), (600, 600)])
    header = t.check(_declared_jpeg(width, height)[:8192])
    assert header is not None and (header.width, header.height) == (width, height)
    assert header.multi_scan is False
    # the same size in a format decoded whole is refused, from its header
    for bomb in (I.bomb_png(width, height), I.bomb_webp(width, height)):
        with pytest.raises(BadImage, match=r"\)\; the limit is 50.0 megapixels decoded, and a (PNG|WebP) is decoded whole"):
            t.check(bomb)


def test_max_pixels_set_explicitly_still_bounds_the_declared_size() -> None:
    t = Thumbnailer([(150, 150)], max_pixels=50_000_000)
    with pytest.raises(BadImage, match=r"16320x12240 \(199.8 megapixels\); the limit is 50.0 megapixels$") as info:
        t.check(_declared_jpeg(16320, 12240))
    assert info.value.limit == 50_000_000
    with pytest.raises(ValueError, match="max_decode_pixels"):
        Thumbnailer([(10, 10)], max_decode_pixels=0)


def test_a_progressive_jpeg_counts_the_coefficients_it_holds() -> None:
    # libjpeg holds every DCT coefficient of a progressive JPEG while decoding
    # it, whatever the scale: 128 bytes an 8x8 block, 2040x1530 luma blocks and
    # twice 1020x765 chroma ones at 4:2:0 (572 MiB), counted as 4-byte pixels
    # (149.8 M) beside the 2040x1530 decoded at 1/8 (3.1 M).
    t = Thumbnailer([(150, 150)])
    with pytest.raises(BadImage, match=r"16320x12240 JPEG in several scans .*\(572 MiB, as much as 152.9 megapixels\)"):
        t.check(_declared_jpeg(16320, 12240, progressive=True))
    header = t.check(_declared_jpeg(6000, 4000, progressive=True))  # a 24 MP camera JPEG, re-saved progressive
    assert header is not None and header.multi_scan is True


def test_a_200_mp_jpeg_is_decoded_small_and_turned_upright() -> None:
    data = I.quadrant_jpeg(16320, 12240, I.stored_quadrants(QUADRANTS, 6), orientation=6)
    out = Thumbnailer([(150, 150), ThumbnailSpec(600, 600, mode="crop")]).make(io.BytesIO(data))
    assert (out["150x150"].width, out["150x150"].height) == (113, 150)
    assert (out["600x600"].width, out["600x600"].height) == (600, 600)
    assert _close(_quadrants(decode(out["150x150"].data)), QUADRANTS)
    assert _close(_quadrants(decode(out["600x600"].data)), QUADRANTS)


def test_a_crop_box_is_counted_at_the_scale_it_needs() -> None:
    data = I.quadrant_jpeg(16320, 12240, QUADRANTS)
    t = Thumbnailer([(150, 150)])
    # 300 px of a 200 MP photo into 150 px: decoded at 1/2 at best (50 MP)... over the budget
    with pytest.raises(BadImage, match=r"would be decoded at 16320x12240 .* \(the crop box needs it"):
        t.make(io.BytesIO(data), crop=(0, 0, 300, 300))
    out = t.make(io.BytesIO(data), crop=(0, 0, 8000, 6000))  # the top-left quadrant: 1/8 is enough
    assert (out["150x150"].width, out["150x150"].height) == (150, 113)
    assert _close(_quadrants(decode(out["150x150"].data)), [QUADRANTS[0]] * 4)


def test_max_original_on_a_200_mp_original_drafts_or_is_refused_from_the_header() -> None:
    data = I.quadrant_jpeg(16320, 12240, QUADRANTS)
    small = Thumbnailer([(150, 150)], max_original=(2048, 2048))
    assert small.check(data[:8192]) is not None
    out = small.rewrite_original(io.BytesIO(data))
    assert out is not None
    im = decode(out)
    assert im.size == (2048, 1536) and _close(_quadrants(im), QUADRANTS)
    # a box that needs it decoded whole (200 MP) cannot be met in bounded memory: a 422 from the header
    big = Thumbnailer([(150, 150)], max_original=(12000, 12000))
    for call in (lambda: big.check(data[:8192]), lambda: big.rewrite_original(io.BytesIO(data))):
        with pytest.raises(BadImage, match=r"decoded at 16320x12240 .*to fit max_original 12000x12000") as info:
            call()
        assert info.value.status == 422 and info.value.limit == 50_000_000


def test_decoder_messages_lose_object_reprs() -> None:
    from PIL import UnidentifiedImageError

    from uploadkit.imaging import _reason

    said = _reason(OSError("cannot identify image file <_io.BytesIO object at 0x7f3c0c138790>"))
    assert said == "cannot identify image file" and "0x" not in said
    assert "0x" not in _reason(UnidentifiedImageError("cannot identify image file <x.Y object at 0x7f00aa>"))
    assert _reason(KeyError()) == "its structure is broken"
    assert _reason(ValueError("tile cannot extend outside image")) == "tile cannot extend outside image"


def _truncated_gif() -> bytes:
    return I.truncated(I.encode(I.drawing(300, 200).convert("P"), "GIF"), 0.5)


@pytest.mark.parametrize("name, data, message", [
    ("jpeg", I.truncated(I.encode(I.drawing(400, 300), "JPEG")), "no end-of-image marker"),
    ("jpeg-header", I.encode(I.drawing(400, 300), "JPEG")[:300], "truncated"),
    ("png", I.truncated(I.encode(I.drawing(400, 300), "PNG")), "no IEND"),
    ("webp", I.truncated(I.encode(I.drawing(400, 300), "WEBP")), "shorter than its RIFF"),
    ("gif", _truncated_gif(), "truncated"),
])
def test_truncated_images_are_refused(name: str, data: bytes, message: str) -> None:
    with pytest.raises(BadImage, match=message):
        Thumbnailer([(100, 100)]).make(io.BytesIO(data))


def test_truncation_caught_even_if_an_app_loads_truncated_images(monkeypatch: Any) -> None:
    # An application may flip Pillow's process-wide switch; we still refuse.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = I.encode(I.drawing(400, 300), "JPEG")
    with pytest.raises(BadImage, match="end-of-image"):
        Thumbnailer([(100, 100)]).make(io.BytesIO(I.truncated(data)))
    png = I.encode(I.drawing(400, 300), "PNG")
    with pytest.raises(BadImage, match="IEND"):
        Thumbnailer([(100, 100)]).make(io.BytesIO(I.truncated(png)))


def test_corrupt_data_is_refused() -> None:
    png = bytearray(I.encode(I.drawing(400, 300), "PNG"))
    start = png.index(b"IDAT") + 40
    png[start:start + 200] = bytes(range(200))  # garbage inside the compressed data
    with pytest.raises(BadImage, match="corrupt"):
        Thumbnailer([(100, 100)]).make(io.BytesIO(bytes(png)))
    jpeg = bytearray(I.encode(I.drawing(400, 300), "JPEG"))
    jpeg[4:6] = b"\x00\x01"  # an impossible segment length
    with pytest.raises(BadImage):
        Thumbnailer([(100, 100)]).make(io.BytesIO(bytes(jpeg)))


def test_trailing_bytes_after_the_end_are_tolerated() -> None:
    data = I.encode(I.drawing(200, 100), "PNG") + b"\x00" * 100
    assert Thumbnailer([(50, 50)]).make(io.BytesIO(data))["50x50"].width == 50


@pytest.mark.parametrize("data", [b"%PDF-1.7\n...", b"PK\x03\x04zip", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                  b"", b"GIF8"])
def test_non_images_are_not_images(data: bytes) -> None:
    assert probe(data) is None
    with pytest.raises(BadImage, match="not an image"):
        Thumbnailer([(10, 10)]).make(io.BytesIO(data))


# -- originals ----------------------------------------------------------------------------


def test_strip_gps_jpeg_is_lossless() -> None:
    data = I.gps_jpeg(comment=b"keep me")
    out = Thumbnailer([(10, 10)], strip_gps=True).rewrite_original(io.BytesIO(data))
    assert out is not None
    before, after = decode(data), decode(out)
    assert after.tobytes() == before.tobytes()  # pixels untouched
    exif = after.getexif()
    assert 0x8825 not in exif and not exif.get_ifd(0x8825)
    assert exif[0x010F] == "uploadkit camera"  # the rest of EXIF stays
    assert after.info.get("comment") == b"keep me"
    assert out[out.index(b"\xff\xda"):] == data[data.index(b"\xff\xda"):]  # scan data byte for byte
    # nothing to strip: no rewrite
    plain = I.encode(I.drawing(50, 50), "JPEG")
    assert Thumbnailer([(10, 10)], strip_gps=True).rewrite_original(io.BytesIO(plain)) is None


def test_strip_gps_png_and_webp() -> None:
    t = Thumbnailer([(10, 10)], strip_gps=True)
    out = t.rewrite_original(io.BytesIO(I.png_with_metadata()))
    assert out is not None
    im = decode(out)
    assert 0x8825 not in im.getexif() and im.getexif()[0x010F] == "uploadkit camera"
    assert "XML:com.adobe.xmp" not in im.info and b"GPS" not in out
    assert im.info["Comment"] == "<script>alert(1)</script>"  # only location goes
    assert im.tobytes() == decode(I.png_with_metadata()).tobytes()
    webp = I.encode(I.drawing(120, 80), "WEBP", exif=I.exif(gps=True), lossless=True)
    out = t.rewrite_original(io.BytesIO(webp))
    assert out is not None
    im = decode(out)
    assert 0x8825 not in im.getexif() and im.getexif()[0x0110] == "model 1"
    assert im.tobytes() == decode(webp).tobytes()


def test_max_original_downscales_upright_and_keeps_metadata() -> None:
    upright = I.drawing(1200, 1600)
    data = I.oriented_jpeg(upright, 6)
    t = Thumbnailer([(10, 10)], max_original=(600, 600))
    out = t.rewrite_original(io.BytesIO(data))
    assert out is not None
    im = decode(out)
    assert im.format == "JPEG" and im.size == (450, 600)
    assert im.getexif().get(0x0112) == 1 and im.getexif()[0x010F] == "uploadkit camera"
    assert mad(im, reference(upright, (450, 600))) < 4
    small = I.encode(I.drawing(300, 200), "PNG")
    assert t.rewrite_original(io.BytesIO(small)) is None
    anim = I.animated("GIF", 800, 700)
    assert Thumbnailer([(10, 10)], max_original=(100, 100)).rewrite_original(io.BytesIO(anim)) is None


def test_thumbnail_result_is_frozen() -> None:
    th = Thumbnailer([(10, 10)]).make(io.BytesIO(I.encode(I.drawing(20, 20), "PNG")))["10x10"]
    assert isinstance(th, Thumbnail)
    with pytest.raises(dataclasses.FrozenInstanceError):
        th.width = 5  # type: ignore[misc]


def test_large_jpegs_decoded_small_still_match() -> None:
    # DCT scaling is active here (4000 px into 150-600 px boxes): the result must
    # still match a full decode resized with Lanczos.
    src = I.photo(2400, 1800)
    t = Thumbnailer([(150, 150), ThumbnailSpec(600, 600), ThumbnailSpec(300, 300, mode="crop")])
    for data in (I.encode(src, "JPEG", quality=95), I.encode(src, "JPEG", quality=95, progressive=True),
                 I.encode(src.convert("CMYK"), "JPEG", quality=95)):
        full = decode(data).convert("RGB")
        out = t.make(io.BytesIO(data))
        assert mad(decode(out["150x150"].data), reference(full, (150, 113))) < 4
        assert mad(decode(out["600x600"].data), reference(full, (600, 450))) < 3
        assert mad(decode(out["300x300"].data), reference(full, (300, 300), (300, 0, 2100, 1800))) < 3


def test_make_leaves_the_callers_file_open() -> None:
    f = io.BytesIO(I.encode(I.drawing(300, 200), "GIF"))
    Thumbnailer([(50, 50)]).make(f)
    assert not f.closed
    f.seek(0)
    assert f.read(3) == b"GIF"


def test_tiff_bomb_refused_before_decoding() -> None:
    # TIFF sizes come from Pillow's header parse: a 20000x20000 TIFF of a few
    # hundred bytes (declared, not stored) is refused without decoding.
    im = Image.new("L", (20000, 20000 // 100))
    data = bytearray(I.encode(im, "TIFF", compression="tiff_deflate"))
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match="20000x200 .*the limit is 1.0 megapixels"):
            Thumbnailer([(10, 10)], max_pixels=1_000_000).make(io.BytesIO(bytes(data)))
        assert tracemalloc.get_traced_memory()[1] < 5_000_000
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_pad_any_mode(mode: str) -> None:
    src = I.drawing(300, 100, "RGBA" if mode in ("LA", "RGBA") else "RGB").convert(mode)
    data = I.encode(src, "PNG")
    out = Thumbnailer([ThumbnailSpec(60, 60, mode="pad"), ThumbnailSpec(50, 50, mode="pad", pad_color="black")]
                      ).make(io.BytesIO(data))
    clear, black = decode(out["60x60"].data), decode(out["50x50"].data)
    assert clear.size == (60, 60) and clear.getchannel("A").getpixel((30, 2)) == 0
    assert clear.getchannel("A").getpixel((30, 30)) > 0
    assert black.size == (50, 50) and black.convert("RGB").getpixel((25, 2)) == (0, 0, 0)


def test_damaged_images_give_thumbnails_or_bad_image_never_another_error() -> None:
    import random

    rng = random.Random(5)
    t = Thumbnailer([(40, 40), ThumbnailSpec(30, 30, mode="crop")])
    sources = [I.encode(I.drawing(120, 90), "JPEG"), I.encode(I.drawing(120, 90, "RGBA"), "PNG"),
               I.animated("GIF", 60, 40), I.encode(I.drawing(120, 90), "WEBP"),
               I.encode(I.drawing(60, 40), "BMP"), I.encode(I.drawing(60, 40), "TIFF"),
               I.gps_jpeg(80, 60)]
    rewriters = [Thumbnailer([(10, 10)], strip_gps=True), Thumbnailer([(10, 10)], max_original=(50, 50))]
    sources.append(I.encode(I.drawing(120, 80), "WEBP", exif=I.exif(gps=True)))
    sources.append(I.png_with_metadata(90, 60))
    outcomes = {"ok": 0, "refused": 0}
    for data in sources:
        for _ in range(25):
            damaged = bytearray(data)
            if rng.random() < 0.5:
                damaged = damaged[: rng.randrange(8, len(damaged))]
            for _ in range(rng.randrange(1, 6)):
                i = rng.randrange(len(damaged))
                damaged[i] = rng.randrange(256)
            try:
                t.make(io.BytesIO(bytes(damaged)))
                outcomes["ok"] += 1
            except BadImage:
                outcomes["refused"] += 1
            for rewriter in rewriters:
                try:
                    rewriter.rewrite_original(io.BytesIO(bytes(damaged)))
                except BadImage:
                    pass
    assert outcomes["refused"] > 20 and outcomes["ok"] > 5


def test_strip_gps_tiff_is_lossless_reencode() -> None:
    src = I.drawing(120, 80)
    data = I.encode(src, "TIFF", exif=I.exif(gps=True).tobytes())
    assert 0x8825 in decode(data).getexif()
    out = Thumbnailer([(10, 10)], strip_gps=True).rewrite_original(io.BytesIO(data))
    assert out is not None
    im = decode(out)
    assert 0x8825 not in im.getexif() and im.tobytes() == src.tobytes()
