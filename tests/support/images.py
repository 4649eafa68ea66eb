"""Images drawn in code for the imaging tests and benchmark: no binary fixtures.

Each helper returns encoded bytes (or a PIL image) whose content is known, so a
test can compare a thumbnail with a reference resize of the same drawing.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

from PIL import Image, ImageChops, ImageDraw

#: Transpositions that *store* an upright image so that EXIF orientation ``n``
#: brings it back: the inverse of what the orientation tag asks a viewer to do.
STORE_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def drawing(width: int, height: int, mode: str = "RGB", seed: int = 1) -> Image.Image:
    """A picture with gradients, blocks and text: distinct corners, smooth areas, edges.

    The top-left quarter holds a red block and the bottom-right a blue one, so
    orientation mistakes show in the pixels.
    """
    x = Image.linear_gradient("L").resize((width, height))
    y = x.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    im = Image.merge("RGB", (x, y, Image.new("L", (width, height), 96)))
    d = ImageDraw.Draw(im)
    d.rectangle((width // 16, height // 16, width * 5 // 16, height * 5 // 16), fill=(230, 20, 20))
    d.rectangle((width * 11 // 16, height * 11 // 16, width * 15 // 16, height * 15 // 16), fill=(20, 20, 230))
    d.ellipse((width * 3 // 8, height * 3 // 8, width * 5 // 8, height * 5 // 8), fill=(240, 240, 60))
    d.text((width // 10, height // 2), "uploadkit", fill=(0, 0, 0))
    if mode == "RGBA":
        alpha = Image.radial_gradient("L").resize((width, height)).point(lambda v: 255 - v)
        im.putalpha(alpha)
    elif mode != "RGB":
        im = im.convert(mode)
    return im


def photo(width: int, height: int, noise: float = 10.0) -> Image.Image:
    """Smooth shapes plus grain: compresses like a photograph (about 2.4 bits
    per pixel as a quality-90 JPEG), for the benchmark.

    The shapes are drawn small and enlarged, so drawing 100 MP takes seconds.
    """
    base = drawing(max(64, width // 8), max(64, height // 8))
    im = base.resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.effect_noise((width, height), noise)
    grain = Image.merge("RGB", (grain, grain.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                                grain.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
    return ImageChops.add(im, grain, 1.0, -128)


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def exif(orientation: Optional[int] = None, gps: bool = False, **tags: Any) -> Image.Exif:
    e = Image.Exif()
    e[0x010F] = "uploadkit camera"  # Make
    e[0x0110] = "model 1"  # Model
    if orientation is not None:
        e[0x0112] = orientation
    if gps:
        e[0x8825] = {
            1: "N", 2: (48.0, 51.0, 29.0),  # Paris
            3: "E", 4: (2.0, 17.0, 40.0),
        }
    for k, v in tags.items():
        e[int(k)] = v
    return e


def oriented_jpeg(reference: Image.Image, orientation: int, **params: Any) -> bytes:
    """A JPEG storing ``reference`` so that applying ``orientation`` shows it upright."""
    method = STORE_AS[orientation]
    stored = reference.transpose(method) if method is not None else reference
    return encode(stored, "JPEG", quality=95, exif=exif(orientation), **params)


def gps_jpeg(width: int = 320, height: int = 240, comment: Optional[bytes] = None) -> bytes:
    params: Dict[str, Any] = {"quality": 92, "exif": exif(gps=True)}
    if comment is not None:
        params["comment"] = comment
    return encode(drawing(width, height), "JPEG", **params)


def cmyk_jpeg(width: int = 320, height: int = 240) -> bytes:
    return encode(drawing(width, height).convert("CMYK"), "JPEG", quality=95)


def palette_png_transparent(width: int = 320, height: int = 240) -> bytes:
    im = drawing(width, height).quantize(64)
    # Make palette index 0 transparent and paint a frame with it.
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, width - 1, height - 1), outline=0, width=max(2, width // 10))
    return encode(im, "PNG", transparency=0)


def i16_png(width: int = 320, height: int = 240) -> bytes:
    """A 16-bit greyscale PNG spanning 0..65535 (Pillow mode I;16)."""
    grey = drawing(width, height).convert("L")
    im = grey.convert("I").point(lambda v: v * 257)
    return encode(im.convert("I;16"), "PNG")


def la_png(width: int = 320, height: int = 240) -> bytes:
    return encode(drawing(width, height, "RGBA").convert("LA"), "PNG")


def frames(width: int, height: int, count: int = 3) -> Sequence[Image.Image]:
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30)]
    out = []
    for i in range(count):
        im = Image.new("RGB", (width, height), colours[i % len(colours)])
        ImageDraw.Draw(im).rectangle((width // 4, height // 4, width * 3 // 4, height * 3 // 4),
                                     fill=(255, 255, 255))
        out.append(im)
    return out


def animated(fmt: str, width: int = 200, height: int = 120, count: int = 3) -> bytes:
    """An animated GIF or WebP whose first frame is red around a white block."""
    fs = list(frames(width, height, count))
    params: Dict[str, Any] = {"save_all": True, "append_images": fs[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(fs[0], fmt, **params)


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny, valid-looking PNG declaring a huge size (its IDAT inflates a little)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bomb_gif(width: int = 30000, height: int = 30000) -> bytes:
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    data = b"\x02\x02\x4c\x01\x00"  # minimal LZW stream
    return header + descriptor + data + b"\x3b"


def bomb_jpeg(width: int = 30000, height: int = 30000) -> bytes:
    """A real small JPEG whose frame header is rewritten to declare a huge size."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (100, 150, 200)), "JPEG"))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def bomb_webp(width: int = 16000, height: int = 16000) -> bytes:
    """A VP8X WebP header declaring a huge canvas (16383 is WebP's maximum side)."""
    vp8x = bytes([0x10, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


SCRIPT = b"<script>alert(document.cookie)</script>"


def jpeg_with_script(width: int = 240, height: int = 160) -> bytes:
    """A JPEG with a script in its COM comment and a ZIP appended after EOI (a polyglot)."""
    body = encode(drawing(width, height), "JPEG", quality=90, comment=SCRIPT)
    zipped = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("payload.html", SCRIPT)
    return body + zipped.getvalue()


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def swapped_rgb_profile() -> bytes:
    """A valid ICC v2 RGB profile whose red and blue primaries are sRGB's blue and red.

    An image tagged with it and painted (255, 0, 0) *means* blue: converting it
    to sRGB must give blue pixels, which makes colour management visible in a test.
    """
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)

    text = b"uploadkit swapped RGB\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text
            + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", 0x0233) + b"\0\0"
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(*blue)), (b"gXYZ", xyz(*green)), (b"bXYZ", xyz(*red)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    table = struct.pack(">I", len(tags))
    body = b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        while len(data) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = 128 + len(table) + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
              + b"\0" * 48)
    assert len(header) == 128
    return header + table + body


def png_with_metadata(width: int = 200, height: int = 150) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "<script>alert(1)</script>")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta><exif:GPSLatitude>48,51N</exif:GPSLatitude></x:xmpmeta>")
    return encode(drawing(width, height), "PNG", pnginfo=info, exif=exif(gps=True))


def size_of(data: bytes) -> Tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def with_big_app_segment(jpeg: bytes, size: int = 20000) -> bytes:
    """The JPEG with an APP2 segment of ``size`` bytes right after SOI, pushing
    its frame header beyond the first 8 KiB (as a large EXIF block does)."""
    payload = b"uploadkit-pad\x00" + b"\x00" * (size - 14)
    segment = b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def _entropy_intervals(jpeg: bytes) -> Tuple[bytes, list]:
    """A JPEG's segments up to its scan data, and the scan data cut at its restart markers."""
    pos = 2
    while True:
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if jpeg[pos + 1] == 0xDA:
            break
        pos += 2 + length
    head_end = pos + 2 + length
    data = jpeg[head_end:jpeg.rindex(b"\xff\xd9")]
    intervals, start, i = [], 0, 0
    while True:
        i = data.find(b"\xff", i)
        while i >= 0 and not 0xD0 <= data[i + 1] <= 0xD7:  # FF00 stuffing, not a marker
            i = data.find(b"\xff", i + 2)
        if i < 0:
            intervals.append(data[start:])
            return jpeg[:head_end], intervals
        intervals.append(data[start:i])
        start = i = i + 2


def banded_jpeg(bands: Sequence[Tuple[Image.Image, int]], orientation: Optional[int] = None,
                quality: int = 75) -> bytes:
    """A baseline JPEG of any size, made without holding its pixels: for 200 MP photos.

    ``bands`` are ``(strip, rows)`` from top to bottom: each strip (all of one
    width, a multiple of 16 pixels high) is repeated down ``rows`` rows. Every
    strip is encoded with a restart marker each 16-pixel row of blocks and the
    same tables, so its rows of entropy-coded data are independent and byte
    aligned; the file is those rows, restart markers renumbered, under one
    header whose frame height is the total. Memory: one strip.
    """
    head: Optional[bytes] = None
    parts = []
    row = 0
    for strip, rows in bands:
        assert strip.height % 16 == 0 and rows % 16 == 0
        encoded = encode(strip.convert("RGB"), "JPEG", quality=quality, subsampling=2, restart_marker_rows=1)
        strip_head, intervals = _entropy_intervals(encoded)
        assert len(intervals) == strip.height // 16
        if head is None:
            head = strip_head
        for k in range(rows // 16):
            if row:
                parts.append(bytes([0xFF, 0xD0 + (row - 1) % 8]))
            parts.append(intervals[k % len(intervals)])
            row += 1
    assert head is not None
    frame = bytearray(head)
    sof = frame.index(b"\xff\xc0")
    struct.pack_into(">H", frame, sof + 5, row * 16)
    app1 = b""
    if orientation is not None:
        payload = exif(orientation).tobytes()
        app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return bytes(frame[:2]) + app1 + bytes(frame[2:]) + b"".join(parts) + b"\xff\xd9"


def quadrant_jpeg(width: int, height: int, colours: Sequence[Tuple[int, int, int]],
                  orientation: Optional[int] = None) -> bytes:
    """A ``width`` x ``height`` JPEG (as stored) whose quadrants are
    ``colours`` (top-left, top-right, bottom-left, bottom-right), cheaply at
    any size (:func:`banded_jpeg`); the halves meet on a 16-pixel boundary.
    Height a multiple of 16."""
    half = width // 2 // 16 * 16
    top = height // 2 // 16 * 16
    bands = []
    for (left, right), rows in ((colours[:2], top), (colours[2:], height - top)):
        strip = Image.new("RGB", (width, 16), left)
        strip.paste(right, (half, 0, width, 16))
        bands.append((strip, rows))
    return banded_jpeg(bands, orientation)


def photo_jpeg(width: int, height: int, orientation: Optional[int] = None, quality: int = 90) -> bytes:
    """A photo-like JPEG of any size: a 256-row strip of :func:`photo` repeated
    down (it compresses and decodes like a photograph, row for row)."""
    strip = photo(width, 256)
    return banded_jpeg([(strip, height // 16 * 16)], orientation, quality)


def stored_quadrants(upright: Sequence[Tuple[int, int, int]], orientation: int) -> list:
    """Quadrant colours to store so that EXIF ``orientation`` shows ``upright``
    (top-left, top-right, bottom-left, bottom-right)."""
    im = Image.new("RGB", (2, 2))
    for i, colour in enumerate(upright):
        im.putpixel((i % 2, i // 2), colour)
    method = STORE_AS[orientation]
    stored = im.transpose(method) if method is not None else im
    return [stored.getpixel((x, y)) for y in (0, 1) for x in (0, 1)]
