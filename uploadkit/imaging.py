"""Thumbnails and image clean-up: the station after storage in the upload's path.

:class:`Thumbnailer` is a configuration object. On its own, ``make(source)``
turns one image (a path or a seekable binary file) into thumbnails, for scripts
and benchmarks. In the middleware, ``handler(storage)`` gives a fresh
:class:`ThumbnailHandler` per request that spools each image as it streams,
refuses bombs from their header, and in ``request_end`` writes the thumbnails
beside the original in storage.

How an image is treated, in order:

1. **Header first.** The format is told by magic bytes (JPEG, PNG, GIF, WebP,
   BMP, TIFF, and AVIF when this Pillow has it); anything else (PDF, ZIP, SVG...)
   is not an image here and is never touched. The dimensions are read from the
   header by this module's own small parsers, and what decoding would hold is
   counted from them and compared with the Thumbnailer's ``max_decode_pixels``
   *before* Pillow is asked for anything: a JPEG at the DCT scale it will be
   decoded at (a 200 MP photo into thumbnails: 1/8, 3 MP), with a progressive
   JPEG's coefficient buffer; every other format whole. So a 30000 x 30000 PNG
   of a few bytes is refused at once, and a 200 MP phone photo is not. The
   count is made again on the real plan just before the pixels are decoded.
   Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` and
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` are not written (nor, for the declared
   size, used: see :func:`_open_image`).
2. **Complete files only.** A JPEG must have an EOI marker (``FF D9``) after its
   first start-of-scan; a PNG must have its ``IEND`` chunk; a WebP must be as
   long as its RIFF header says. Bytes *after* the end marker are tolerated
   (cameras pad files, and polyglot tails are dropped by re-encoding anyway).
   Any error while decoding is a refusal too, so truncation is caught even when
   an application has switched ``LOAD_TRUNCATED_IMAGES`` on.
3. **Decode once, small.** A JPEG is decoded with DCT scaling (``draft``) at the
   smallest scale that still covers the largest thumbnail; other formats are
   decoded whole, then reduced once by an integer factor (box filter) to about
   three times the largest thumbnail. Every thumbnail is resampled (Lanczos)
   from that one image, largest first. Alpha is premultiplied while resampling
   so transparent pixels do not bleed colour into the edges.
4. **Orientation, modes, colour.** EXIF orientation is applied
   (:func:`PIL.ImageOps.exif_transpose`); palette, 16-bit, ``LA``, ``CMYK``...
   become ``L``, ``RGB`` or ``RGBA``; an embedded ICC profile is converted to
   sRGB (``color="srgb"``, the default) or kept as is (``color="keep"``).
5. **Clean output.** Thumbnails are encoded from pixels alone: no EXIF (so no
   GPS), no comments, no XMP, no text chunks, nothing that rode along in the
   upload. Only the ICC profile survives, with ``color="keep"``.

Output dimensions (the rounding rule):

``fit``
    scaled to fit inside the box, aspect kept. The side that limits the scale
    is exactly the box's side; the other is the exact proportional length
    rounded half up (``1000x667`` into ``150x150`` is ``150x100``:
    667 * 0.15 = 100.05), and never less than 1 pixel.
``crop``
    scaled to cover the box (same rounding), then centre-cropped to the box.
``pad``
    as ``fit``, then centred on a canvas of exactly the box's size (the left
    and top margins get the smaller half of an odd leftover), transparent
    unless ``pad_color`` is given.

Images are never enlarged unless ``upscale=True``: a small image is kept at
its size (``fit``), cropped to at most the box (``crop``), or padded (``pad``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import tempfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import (IO, TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional,
                    Sequence, Tuple, Union)

from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError, features

from .errors import BadImage
from .files import FileInfo, UploadedFile
from .handlers import UploadHandler

if TYPE_CHECKING:
    from .pipeline import RequestContext

log = logging.getLogger("uploadkit")

__all__ = [
    "Thumbnailer", "ThumbnailSpec", "Thumbnail", "ThumbnailHandler", "ImageHeader",
    "probe", "detect_format", "thumbnail_geometry", "strip_location", "SUPPORTED_TYPES",
]

Source = Union[str, "os.PathLike[str]", IO[bytes]]
Color = Union[str, Tuple[int, ...], None]
Box = Tuple[float, float, float, float]

MODES = ("fit", "crop", "pad")

# Asked only when this Pillow knows the feature: older ones warn about unknown names.
_AVIF = "avif" in features.modules and bool(features.check_module("avif"))

#: Pillow format name -> MIME type, for the input formats handled here. Only
#: these plugins are ever asked to open an upload (``Image.open(formats=...)``):
#: never EPS (Ghostscript), never anything exotic.
_INPUT_TYPES: Dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    **({"AVIF": "image/avif"} if _AVIF else {}),
}

#: The MIME types this module makes thumbnails of.
SUPPORTED_TYPES = frozenset(_INPUT_TYPES.values())

#: Output formats: Pillow name -> (MIME type, file extension).
_OUTPUT: Dict[str, Tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    **({"AVIF": ("image/avif", "avif")} if _AVIF else {}),
}

_ORIENTATION = 0x0112
_GPS_IFD = 0x8825
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_XMP_MARKERS = (b"http://ns.adobe.com/xap/1.0/\x00", b"http://ns.adobe.com/xmp/extension/\x00")

# Errors Pillow and its C decoders raise on hostile or broken bytes. Anything
# in this list, raised while opening or decoding an upload, is the upload's
# fault: a 422, not a 500. Pillow also *warns* about corrupt metadata (TIFF
# tags, EXIF); where warnings are errors those arrive as exceptions, and are
# the upload's fault too.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  KeyError, TypeError, ZeroDivisionError, zlib.error, Image.DecompressionBombError,
                  Warning)


# ---------------------------------------------------------------------------
# Results and options


@dataclass(frozen=True)
class Thumbnail:
    """One encoded thumbnail."""

    #: The ``"WxH"`` box it was made for (the key in :meth:`Thumbnailer.make`'s dict).
    size: str
    data: bytes = field(repr=False)
    #: The encoded image's real dimensions (smaller than the box in ``fit`` mode).
    width: int
    height: int
    #: Pillow's name: ``"JPEG"``, ``"PNG"``, ``"WEBP"`` or ``"AVIF"``.
    format: str
    content_type: str

    @property
    def extension(self) -> str:
        """Without the dot: ``"jpg"``, ``"png"``, ``"webp"``, ``"avif"``."""
        return _OUTPUT[self.format][1]


@dataclass(frozen=True)
class ThumbnailSpec:
    """One thumbnail size, with options that override the Thumbnailer's.

    ``None`` means "the Thumbnailer's default". ``format=None`` chooses JPEG for
    opaque images and the Thumbnailer's ``alpha_format`` (PNG unless set) for
    images with transparency.
    """

    width: int
    height: int
    mode: Optional[str] = None
    format: Optional[str] = None
    quality: Optional[int] = None
    upscale: Optional[bool] = None
    pad_color: Color = None

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16384:
                raise ValueError(f"ThumbnailSpec.{name} must be an int from 1 to 16384, not {value!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"ThumbnailSpec.mode must be one of {MODES}, not {self.mode!r}")
        if self.format is not None:
            object.__setattr__(self, "format", _output_format(self.format))
        if self.quality is not None:
            _check_quality(self.quality)

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"


def _output_format(fmt: str) -> str:
    name = fmt.upper().lstrip(".")
    name = {"JPG": "JPEG"}.get(name, name)
    if name not in _OUTPUT:
        raise ValueError(f"thumbnail format must be one of {sorted(_OUTPUT)}, not {fmt!r}")
    return name


def _check_quality(q: Any) -> None:
    if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 100:
        raise ValueError(f"quality must be an int from 1 to 100, not {q!r}")


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of an image say, before any pixel is decoded."""

    format: str
    content_type: str
    #: None when the header is longer than the bytes given (a JPEG with a big
    #: EXIF block, read from an 8 KiB head).
    width: Optional[int] = None
    height: Optional[int] = None
    #: Offset of a JPEG's first start-of-scan marker (the image data).
    scan_offset: Optional[int] = None
    #: A JPEG's ``(horizontal, vertical)`` sampling factors, one pair per component.
    sampling: Tuple[Tuple[int, int], ...] = ()
    #: Whether a JPEG is decoded from several scans (progressive, or
    #: components sent one scan each): libjpeg then holds every DCT
    #: coefficient of the full-size image while it decodes, whatever the
    #: scale. None while the first scan header has not been read and the
    #: frame header does not already say so.
    multi_scan: Optional[bool] = None

    @property
    def pixels(self) -> Optional[int]:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


# ---------------------------------------------------------------------------
# Geometry: pure functions, the rounding rule in one place


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def thumbnail_geometry(
    width: float, height: float, box_width: int, box_height: int,
    mode: str = "fit", upscale: bool = False,
) -> Tuple[Tuple[int, int], Box, Optional[Tuple[int, int]]]:
    """Where a thumbnail comes from and how big it is.

    :returns: ``(size, region, canvas)``: the resampled image's size; the
        region of the source (in source pixels, floats) it is resampled from;
        and for ``pad`` the canvas size it is centred on (else None). See the
        module docstring for the rounding rule.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    w, h = Fraction(width), Fraction(height)
    if w <= 0 or h <= 0:
        raise ValueError(f"source size must be positive, not {width}x{height}")
    sx, sy = Fraction(box_width) / w, Fraction(box_height) / h
    scale = max(sx, sy) if mode == "crop" else min(sx, sy)
    if not upscale:
        scale = min(scale, Fraction(1))
    out_w = max(1, _round_half_up(w * scale))
    out_h = max(1, _round_half_up(h * scale))
    if mode == "crop":
        out_w, out_h = min(out_w, box_width), min(out_h, box_height)
        # The region keeps the output's aspect, centred: its size in source
        # pixels is the output's divided by the scale, capped by the source.
        rw, rh = min(w, out_w / scale), min(h, out_h / scale)
        x0, y0 = (w - rw) / 2, (h - rh) / 2
        region: Box = (float(x0), float(y0), float(x0 + rw), float(y0 + rh))
    else:
        region = (0.0, 0.0, float(w), float(h))
    canvas = (box_width, box_height) if mode == "pad" else None
    return (out_w, out_h), region, canvas


# ---------------------------------------------------------------------------
# Headers: format and dimensions from the first bytes, without Pillow


def detect_format(head: bytes) -> Optional[str]:
    """The Pillow format name of a raster image this module handles, or None.

    By magic number only; SVG, PDF, ZIP... are None, so they are never touched.
    """
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == _PNG_SIGNATURE:
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if _AVIF and head[4:8] == b"ftyp" and len(head) >= 16:
        size = int.from_bytes(head[:4], "big")
        brands = head[8:12] + head[16:min(size, len(head), 64)]
        if b"avif" in brands or b"avis" in brands:
            return "AVIF"
    return None


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Progressive frames (Huffman and arithmetic coded): always several scans.
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


class _JpegWalk:
    """Walks a JPEG's marker segments up to its first start-of-scan, as the
    bytes arrive: call :meth:`advance` with what is there so far.

    Learns the frame size (SOF) and where the image data starts (SOS); ``problem``
    says why the structure is broken, when it is.
    """

    def __init__(self) -> None:
        self.pos = 2  # after SOI
        self.width: Optional[int] = None
        self.height: Optional[int] = None
        self.scan: Optional[int] = None
        self.problem: Optional[str] = None
        self.sampling: Tuple[Tuple[int, int], ...] = ()
        self.progressive = False
        #: Components in the first scan (0 until it is read).
        self.scan_components = 0

    @property
    def multi_scan(self) -> Optional[bool]:
        if self.progressive:
            return True
        if self.scan is None or not self.scan_components:
            return None
        return self.scan_components < len(self.sampling)

    @property
    def done(self) -> bool:
        return self.scan is not None or self.problem is not None

    def advance(self, fp: IO[bytes], size: int) -> None:
        while not self.done and self.pos + 4 <= size:
            fp.seek(self.pos)
            head = fp.read(4)
            if head[0] != 0xFF:
                self.problem = "the JPEG's marker segments are corrupt"
                return
            m = head[1]
            if m == 0xFF:  # a fill byte before the marker
                self.pos += 1
                continue
            if m == 0xD8 or 0xD0 <= m <= 0xD7 or m == 0x01:  # no length field
                self.pos += 2
                continue
            if m == 0xD9:
                self.problem = "the JPEG ends before its image data"
                return
            length = int.from_bytes(head[2:4], "big")
            if length < 2:
                self.problem = "the JPEG's marker segments are corrupt"
                return
            if m == 0xDA:
                if self.pos + 5 > size:
                    return  # wait for the scan header's component count
                self.scan_components = fp.read(1)[0]
                self.scan = self.pos
                return
            if m in _SOF_MARKERS:
                if self.pos + 10 > size:
                    return  # wait for the frame header's bytes
                sof = fp.read(6)
                self.height = int.from_bytes(sof[1:3], "big")
                self.width = int.from_bytes(sof[3:5], "big")
                self.progressive = m in _PROGRESSIVE_SOF
                count = sof[5]
                if self.pos + 10 + 3 * count > size:
                    return  # and for its component table
                table = fp.read(3 * count)
                self.sampling = tuple((max(1, table[i + 1] >> 4), max(1, table[i + 1] & 15))
                                      for i in range(0, 3 * count, 3))
            self.pos += 2 + length


def _jpeg_layout(fp: IO[bytes]) -> _JpegWalk:
    """The walk of a whole JPEG's header segments (sizes None where the bytes end first).

    :raises BadImage: when the segment structure is broken.
    """
    walk = _JpegWalk()
    walk.advance(fp, fp.seek(0, io.SEEK_END))
    if walk.problem:
        raise BadImage(walk.problem)
    return walk


def _read_header(fp: IO[bytes]) -> Optional[ImageHeader]:
    """Format and, where this module can read it, dimensions. None: not an image."""
    fp.seek(0)
    head = fp.read(64)
    fmt = detect_format(head)
    if fmt is None:
        return None
    w: Optional[int] = None
    h: Optional[int] = None
    if fmt == "JPEG":
        walk = _jpeg_layout(fp)
        return ImageHeader(fmt, _INPUT_TYPES[fmt], walk.width, walk.height, walk.scan,
                           walk.sampling, walk.multi_scan)
    if fmt == "PNG":
        if len(head) >= 24 and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
    elif fmt == "GIF":
        if len(head) >= 10:
            w, h = struct.unpack("<HH", head[6:10])
    elif fmt == "WEBP":
        chunk = head[12:16]
        if chunk == b"VP8X" and len(head) >= 30:
            w = int.from_bytes(head[24:27], "little") + 1
            h = int.from_bytes(head[27:30], "little") + 1
        elif chunk == b"VP8L" and len(head) >= 25:
            bits = int.from_bytes(head[21:25], "little")
            w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8 " and len(head) >= 30:
            w = int.from_bytes(head[26:28], "little") & 0x3FFF
            h = int.from_bytes(head[28:30], "little") & 0x3FFF
    elif fmt == "BMP":
        dib = int.from_bytes(head[14:18], "little")
        if dib >= 40:
            w, h = struct.unpack("<ii", head[18:26])
            w, h = abs(w), abs(h)
        elif dib == 12:
            w, h = struct.unpack("<HH", head[18:22])
    # TIFF and AVIF: Pillow's own header parse gives the size (still before any pixel).
    return ImageHeader(fmt, _INPUT_TYPES[fmt], w, h)


def probe(source: Union[bytes, Source]) -> Optional[ImageHeader]:
    """Read an image's header only: its format and, when the header tells, its size.

    :returns: None for anything that is not a raster image handled here.
    :raises BadImage: when the header is corrupt.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_header(io.BytesIO(bytes(source)))
    with _opened(source) as fp:
        return _read_header(fp)


# ---------------------------------------------------------------------------
# Sources and spools


class _opened:
    """A seekable binary file for a path or file object, closed only if opened here.

    Paths are opened, never read whole into memory; a non-seekable stream is
    copied to a spool first (Pillow needs to seek).
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self._own: Optional[Any] = None

    def __enter__(self) -> IO[bytes]:
        src = self.source
        if isinstance(src, (str, os.PathLike)):
            f = open(src, "rb")
            self._own = f
            return f
        if not hasattr(src, "read"):
            raise TypeError(f"expected a path or a binary file object, not {type(src).__name__}")
        seekable = getattr(src, "seekable", None)
        if seekable is None or seekable():
            return src
        spool = Spool()
        self._own = spool
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            spool.write(chunk)
        return spool.reader()

    def __exit__(self, *exc: Any) -> None:
        if self._own is not None:
            self._own.close()


class Spool:
    """Bytes in memory up to ``max_memory``, then in an anonymous temp file.

    Our own small class rather than ``SpooledTemporaryFile``, whose rollover
    state is private: ``on_disk`` is part of this one's API.
    """

    def __init__(self, max_memory: int = 4 * 1024 * 1024, tempdir: Optional[str] = None) -> None:
        self.max_memory = max_memory
        self.tempdir = tempdir
        self.size = 0
        self.on_disk = False
        self._file: IO[bytes] = io.BytesIO()

    def write(self, data: bytes) -> None:
        if not self.on_disk and self.size + len(data) > self.max_memory:
            disk = tempfile.TemporaryFile(dir=self.tempdir, prefix="uploadkit-img-")
            assert isinstance(self._file, io.BytesIO)
            disk.write(self._file.getbuffer())
            self._file.close()
            self._file = disk
            self.on_disk = True
        self._file.seek(0, io.SEEK_END)
        self._file.write(data)
        self.size += len(data)

    def reader(self) -> IO[bytes]:
        """The spool's own file, rewound: valid until :meth:`close`."""
        self._file.seek(0)
        return self._file

    def read_all(self) -> bytes:
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        self._file.close()


def _rfind(fp: IO[bytes], needle: bytes, stop: int, block: int = 1 << 20) -> int:
    """Offset of the last ``needle`` at or after ``stop``, or -1; reads backwards."""
    end = fp.seek(0, io.SEEK_END)
    overlap = len(needle) - 1
    pos = end
    while pos > stop:
        start = max(stop, pos - block)
        fp.seek(start)
        data = fp.read(min(pos + overlap, end) - start)
        i = data.rfind(needle)
        if i >= 0:
            return start + i
        pos = start
    return -1


# ---------------------------------------------------------------------------
# Decoding


def _check_complete(fp: IO[bytes], header: ImageHeader) -> None:
    """Refuse a truncated file from its structure, whatever Pillow is set to do.

    :raises BadImage: naming what is missing.
    """
    if header.format == "JPEG":
        if header.scan_offset is None or _rfind(fp, b"\xff\xd9", header.scan_offset + 4) < 0:
            raise BadImage("the JPEG is truncated: no end-of-image marker after its image data")
    elif header.format == "PNG":
        if _rfind(fp, _PNG_IEND, 33) < 0:
            raise BadImage("the PNG is truncated: it has no IEND chunk")
    elif header.format == "WEBP":
        fp.seek(4)
        declared = int.from_bytes(fp.read(4), "little") + 8
        if fp.seek(0, io.SEEK_END) < declared:
            raise BadImage("the WebP is truncated: shorter than its RIFF header says")


def _plugin(fmt: str) -> Callable[[Any], ImageFile.ImageFile]:
    """The Pillow plugin class that reads ``fmt`` (only the formats of ``_INPUT_TYPES``)."""
    from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

    plugins: Dict[str, Callable[[Any], ImageFile.ImageFile]] = {
        "JPEG": JpegImagePlugin.JpegImageFile,
        "PNG": PngImagePlugin.PngImageFile,
        "GIF": GifImagePlugin.GifImageFile,
        "WEBP": WebPImagePlugin.WebPImageFile,
        "BMP": BmpImagePlugin.BmpImageFile,
        "TIFF": TiffImagePlugin.TiffImageFile,
    }
    if fmt == "AVIF":
        from PIL import AvifImagePlugin

        return AvifImagePlugin.AvifImageFile
    return plugins[fmt]


def _open_image(fp: IO[bytes], header: ImageHeader, max_pixels: Optional[int] = None) -> ImageFile.ImageFile:
    """The sniffed format's own Pillow plugin on the file: the header parsed, no pixel decoded.

    Not ``Image.open``: that one compares the *declared* size with Pillow's
    process-wide ``MAX_IMAGE_PIXELS`` and refuses twice it (179 MP), which
    would refuse a 200 MP phone photo that is decoded at 1/8 scale into 3 MP.
    This module bounds what is decoded itself, per Thumbnailer, before every
    ``load()`` (see :meth:`Thumbnailer._check_decoding`). So it does what
    ``Image.open`` does after that check: the one plugin the magic bytes name
    parses the header (never another plugin, never EPS). Pillow's global is
    read by the plugins that check it themselves (WebP and GIF frames, above
    179 MP) and never written. ``max_pixels``, when given, bounds the declared
    size (also once Pillow has read it: TIFF, AVIF).

    :raises BadImage: declared sizes over ``max_pixels`` and unreadable headers.
    """
    _check_pixels(header.width, header.height, max_pixels)
    fp.seek(0)
    try:
        im = _plugin(header.format)(_Borrowed(fp))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit, checked inside a plugin; the warning arrives as
        # an exception when warnings are errors.
        raise BadImage(f"the image is too large to decode: {_reason(exc)}", limit=max_pixels) from exc
    except _DECODE_ERRORS as exc:
        raise BadImage(f"the {header.format} image cannot be read: {_reason(exc)}") from exc
    try:
        _check_pixels(im.size[0], im.size[1], max_pixels)
    except BadImage:
        _release(im)
        raise
    return im


_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def _reason(exc: BaseException) -> str:
    """What a decoder's exception says, in words a client may read.

    Some Pillow messages name the file object they read from by its repr
    (``cannot identify image file <... object at 0x7f...>``): a memory
    address, which says nothing about the upload and tells a client about the
    server. Those parts go; an exception with no words left is named by what
    it means.
    """
    if isinstance(exc, UnidentifiedImageError):
        return "its bytes start like that format but are not an image of it"
    text = _OBJECT_REPR.sub("", str(exc)).strip(" :'\"")
    if not text or text == "None":
        return "its structure is broken"
    return text


def _release(im: Image.Image) -> None:
    """Free the decoded pixels now (the file stays open: see :class:`_Borrowed`)."""
    im.close()


class _Borrowed:
    """A caller's file as Pillow sees it: everything but ``close``.

    Closing an image closes the file it was read from, but these files belong
    to the caller (a spool that is read again, a file object given to
    ``make``). ``fileno`` is left out so no plugin reads the descriptor directly.
    """

    closed = False

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp

    def read(self, size: int = -1) -> bytes:
        return self._fp.read(size)

    def readline(self, size: int = -1) -> bytes:
        return self._fp.readline(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def close(self) -> None:
        pass


def _check_pixels(width: Optional[int], height: Optional[int], max_pixels: Optional[int]) -> None:
    """Refuse an empty declared size, and one over ``max_pixels`` when that is set."""
    if width is None or height is None:
        return
    if width <= 0 or height <= 0:
        raise BadImage(f"the image declares an empty size, {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(
            f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels);"
            f" the limit is {max_pixels / 1e6:.1f} megapixels",
            limit=max_pixels)


# ---------------------------------------------------------------------------
# What a decode costs: counted from the header, before any pixel


#: Pillow keeps a decoded pixel in 4 bytes (RGB is stored as RGBX, CMYK and
#: RGBA use 4, L and P 1 of them): the unit a decode budget is counted in.
_PIXEL_BYTES = 4

#: A JPEG counts for at least this share of its declared pixels, however small
#: it is decoded: 1/8 scale saves memory, not reading, since every block is
#: still entropy-decoded (a 200 MP photo takes 0.5 to 1 s at 1/8 in the
#: benchmark). 16 is a quarter of each side: with the default budget a JPEG may
#: declare up to 800 MP (every phone and camera JPEG, the 200 MP ones
#: included), and a tiny file declaring 900 MP is refused from its header.
_JPEG_READ_SHARE = 16


def _draft_request(width: int, height: int, target: float) -> Optional[Tuple[int, int]]:
    """The size asked of Pillow's JPEG ``draft`` when ``target`` of each side is
    needed; None when no DCT scaling can help (half or more needed)."""
    if target >= 0.5:
        return None
    return (max(1, math.ceil(width * target)), max(1, math.ceil(height * target)))


def _drafted_size(width: int, height: int, target: float) -> Tuple[int, int]:
    """The size a JPEG is decoded at for :func:`_draft_request`: Pillow's draft
    takes the largest of 1/8, 1/4, 1/2 that still covers the request."""
    request = _draft_request(width, height, target)
    if request is None:
        return width, height
    ratio = min(width // request[0], height // request[1])
    s = next(s for s in (8, 4, 2, 1) if ratio >= s)
    return (width + s - 1) // s, (height + s - 1) // s


def _coefficient_bytes(width: int, height: int, sampling: Tuple[Tuple[int, int], ...]) -> int:
    """What libjpeg holds while it decodes a multi-scan JPEG: every DCT
    coefficient (64 of 2 bytes a block) of every component at full size,
    whatever the output scale, block rows and columns rounded up to the
    component's sampling factors (libjpeg's jdcoefct.c)."""
    if not sampling:
        sampling = ((1, 1), (1, 1), (1, 1))  # unknown: count three full-size components
    hmax = max(h for h, _ in sampling)
    vmax = max(v for _, v in sampling)
    total = 0
    for h, v in sampling:
        cols = math.ceil(math.ceil(width * h / hmax) / 8)
        rows = math.ceil(math.ceil(height * v / vmax) / 8)
        total += (-(-cols // h) * h) * (-(-rows // v) * v) * 128
    return total


@dataclass(frozen=True)
class _Cost:
    """What decoding one image holds at once, in Pillow pixels of 4 bytes."""

    format: str
    width: int
    height: int
    #: The size the decoder outputs (a JPEG's drafted size; else the declared one).
    decoded: Tuple[int, int]
    #: A multi-scan JPEG's coefficient buffer, in bytes (0 otherwise).
    coefficients: int = 0

    @property
    def pixels(self) -> int:
        counted = self.decoded[0] * self.decoded[1] + -(-self.coefficients // _PIXEL_BYTES)
        if self.format == "JPEG":
            counted = max(counted, -(-self.width * self.height // _JPEG_READ_SHARE))
        return counted

    def check(self, limit: int, purpose: str = "") -> None:
        """:raises BadImage: when :attr:`pixels` is over ``limit``, saying why."""
        if self.pixels <= limit:
            return
        w, h = self.width, self.height
        mp, lim = w * h / 1e6, limit / 1e6
        tail = f"; the limit is {lim:.1f} megapixels decoded{purpose}"
        dw, dh = self.decoded
        if self.format != "JPEG":
            name = {"WEBP": "WebP"}.get(self.format, self.format)
            message = f"the image is {w}x{h} ({mp:.1f} megapixels){tail}, and a {name} is decoded whole"
        elif -(-w * h // _JPEG_READ_SHARE) >= self.pixels:
            message = (f"the image is {w}x{h} ({mp:.1f} megapixels){tail}, and a JPEG may declare at most"
                       f" {_JPEG_READ_SHARE} times that ({lim * _JPEG_READ_SHARE:.1f} megapixels) even when"
                       " it is decoded small, since every block of it is still read")
        elif self.coefficients:
            message = (f"the image is a {w}x{h} JPEG in several scans (progressive): decoding it at {dw}x{dh}"
                       f" holds every DCT coefficient of the full image meanwhile"
                       f" ({self.coefficients / 2 ** 20:.0f} MiB, as much as {self.pixels / 1e6:.1f} megapixels)"
                       f"{tail}")
        else:
            message = (f"the image is {w}x{h} and would be decoded at {dw}x{dh}"
                       f" ({dw * dh / 1e6:.1f} megapixels){tail}")
        raise BadImage(message, limit=limit)


def _decode_cost(header: ImageHeader, decoded: Optional[Tuple[int, int]] = None) -> Optional[_Cost]:
    """The cost of decoding ``header``'s image at ``decoded`` (a JPEG's drafted
    size; None: whole); None while the header does not tell the size yet.

    JPEG is the one format here Pillow decodes at a reduced scale (``draft``,
    1/2, 1/4 or 1/8 of each side). PNG, GIF, BMP and TIFF are decoded whole; so
    are WebP (Pillow's plugin has libwebp decode the whole canvas) and AVIF
    (libavif decodes the whole frame). Those two also hold copies of the
    frame while it is handed to Pillow: measured with Pillow 13 on a 24 MP
    photo, WebP peaks at about 16 bytes a pixel (two canvases in libwebp, a
    bytes copy, the image) and AVIF at about 9.4, against 4.4 for a PNG. They
    are still counted by their pixels, so that the default accepts the WebP
    and AVIF photos it accepted before this budget (up to 50 MP); a server
    that takes large WebPs from strangers lowers ``max_decode_pixels``.
    """
    w, h = header.width, header.height
    if w is None or h is None:
        return None
    if header.format != "JPEG":
        return _Cost(header.format, w, h, (w, h))
    coefficients = _coefficient_bytes(w, h, header.sampling) if header.multi_scan else 0
    return _Cost("JPEG", w, h, decoded or (w, h), coefficients)


def _sized(header: ImageHeader, im: Image.Image) -> ImageHeader:
    """The header with the size Pillow read (TIFF and AVIF sizes come from it)."""
    if header.width is None or header.height is None:
        return replace(header, width=im.size[0], height=im.size[1])
    return header


def _load(im: ImageFile.ImageFile) -> None:
    try:
        im.load()
    except _DECODE_ERRORS as exc:
        raise BadImage(f"the {im.format} image is corrupt or truncated: {_reason(exc)}") from exc


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1  # unreadable EXIF: treat as upright rather than refuse the photo
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    """Apply EXIF orientation to a decoded (maybe already reduced) image."""
    if orientation == 1:
        return im
    if _orientation(im) == orientation:
        out = ImageOps.exif_transpose(im)
        assert out is not None
        return out
    # The decoded image lost the tag on the way (TIFF keeps it outside
    # ``info``): apply the same transposition exif_transpose would.
    return im.transpose(_TRANSPOSE[orientation])


def _working_mode(im: Image.Image) -> Image.Image:
    """One of L, RGB, CMYK, La, RGBa (alpha premultiplied for resampling)."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    elif mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit samples: scale 0..65535 to 0..255 (a plain convert would clip).
        # 32-bit integer or float images are scaled the same way when their
        # values pass 255.
        im = im.convert("I") if mode != "F" else im
        extrema = im.getextrema()
        hi = extrema[1] if isinstance(extrema[1], (int, float)) else 0
        if mode.startswith("I;16") or hi > 255:
            im = im.point(lambda v: v * (1 / 256))
        im = im.convert("L")
    elif mode in ("RGBX", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        im = im.convert("RGBA" if "A" in mode else "RGB")
    if im.mode in ("LA", "RGBA"):
        im = im.convert({"LA": "La", "RGBA": "RGBa"}[im.mode])
    return im


class _Colour:
    """Converts thumbnails from an embedded ICC profile to sRGB, once per image."""

    def __init__(self, icc: Optional[bytes], policy: str) -> None:
        self.keep: Optional[bytes] = None
        self._profile: Optional[ImageCms.ImageCmsProfile] = None
        self._space = ""
        self._transforms: Dict[Tuple[str, str], Any] = {}
        if not icc:
            return
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            space = profile.profile.xcolor_space.strip()
            description = ImageCms.getProfileDescription(profile) or ""
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            return  # an unreadable profile is ignored: the pixels stay as they are
        if space == "RGB" and policy == "keep":
            self.keep = icc
            return
        if space == "RGB" and "srgb" in description.lower().replace(" ", ""):
            return  # already sRGB: nothing to convert, and browsers assume it
        self._profile, self._space = profile, space

    def apply(self, im: Image.Image) -> Image.Image:
        mode = im.mode
        profile = self._profile
        if profile is not None and (self._space, mode) in (("RGB", "RGB"), ("RGB", "RGBA"),
                                                          ("CMYK", "CMYK"), ("GRAY", "L")):
            out_mode = "RGB" if mode == "CMYK" else mode
            key = (mode, out_mode)
            try:
                transform = self._transforms.get(key)
                if transform is None:
                    srgb = ImageCms.createProfile("sRGB")
                    if mode == "L":
                        return im  # a grey profile: grey stays grey
                    transform = ImageCms.buildTransform(
                        profile, srgb, mode, out_mode,
                        renderingIntent=ImageCms.Intent.PERCEPTUAL)
                    self._transforms[key] = transform
                result = ImageCms.applyTransform(im, transform)
                assert result is not None
                return result
            except ImageCms.PyCMSError:
                pass
        if mode == "CMYK":
            return im.convert("RGB")
        return im


def _encode(im: Image.Image, fmt: str, quality: int, icc: Optional[bytes]) -> bytes:
    # Only pixels are written: ``info`` carries what the source held (comments,
    # EXIF, XMP, text chunks) and some plugins write it back when present.
    im.info = {}
    params: Dict[str, Any] = {}
    if fmt == "JPEG":
        params = {"quality": quality, "optimize": True}
    elif fmt == "WEBP":
        params = {"quality": quality, "method": 4}
    elif fmt == "AVIF":
        params = {"quality": quality}
    if icc:
        params["icc_profile"] = icc
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _flatten(im: Image.Image, color: Color) -> Image.Image:
    """An RGBA/LA image on an opaque background (for JPEG)."""
    base = "RGB" if im.mode == "RGBA" else "L"
    bg = Image.new(base, im.size, color if color is not None else "white")
    bg.paste(im, mask=im.getchannel("A"))
    return bg


# ---------------------------------------------------------------------------
# The Thumbnailer


SizeLike = Union[ThumbnailSpec, Tuple[int, int], Sequence[int]]


class Thumbnailer:
    """Makes thumbnails of uploaded images; configure once, use for every request.

    :param sizes: boxes as ``(width, height)`` tuples or :class:`ThumbnailSpec`
        for per-size options; their ``"WxH"`` keys must be distinct.
    :param mode: ``"fit"``, ``"crop"`` or ``"pad"`` (module docstring).
    :param format: output format for every size (``"JPEG"``, ``"PNG"``,
        ``"WEBP"``, ``"AVIF"``), or None: JPEG for opaque images,
        ``alpha_format`` for images with an alpha channel or transparency.
    :param alpha_format: ``"PNG"`` (default) or ``"WEBP"``/``"AVIF"``.
    :param quality: 1-100 for lossy formats (85).
    :param upscale: enlarge images smaller than the box (False).
    :param pad_color: ``pad`` mode's background; None is transparent. Also the
        background when an image with alpha must become a JPEG (white if None).
    :param color: ``"srgb"`` converts an embedded ICC profile to sRGB;
        ``"keep"`` embeds an RGB profile in the thumbnails unchanged.
    :param max_decode_pixels: refuse images whose decoding would hold more
        than this many pixels at once (50 million, about 200 MiB at Pillow's 4
        bytes a pixel), counted from the header before any pixel is decoded,
        as each format is decoded: a JPEG at the DCT scale its largest
        thumbnail (or crop box, or ``max_original``) allows, 1/2 to 1/8 of
        each side, plus, for a progressive JPEG, its full-size coefficient
        buffer, and never less than 1/16 of its declared pixels (every block
        is still read); every other format whole. So a 200 MP phone JPEG
        (decoded at 1/8: 3 MP) is accepted and a 200 MP PNG is refused.
        Pillow's ``Image.MAX_IMAGE_PIXELS`` is neither used nor changed.
    :param max_pixels: also refuse images that *declare* more pixels than
        this, whatever they are decoded at (None, the default: no such
        bound). Before ``max_decode_pixels`` this was the only bound (50
        million by default), which refused every 50 MP and 200 MP phone photo.
    :param max_original: ``(width, height)``: the handler re-encodes originals
        larger than this box to fit inside it (JPEG, PNG, WebP, AVIF; animated
        images are left alone), orientation applied, ICC and EXIF kept.
    :param original_quality: quality of such re-encoded originals (90).
    :param strip_gps: the handler rewrites originals without location data:
        the EXIF GPS block, and XMP packets that mention GPS. JPEG, PNG and
        WebP are rewritten without touching the pixels; other formats are
        re-encoded.
    :param crop_fields: names of four text fields ``(x, y, w, h)`` (e.g. from
        an avatar cropper): when the request sends them, thumbnails are made
        from that region of each image (in pixels of the upright image).
    :param background: make thumbnails on a worker pool after the response,
        instead of while the request waits (see :class:`ThumbnailHandler`).
    :param workers: size of that pool.
    :param spool_memory: bytes of each image kept in memory while it streams,
        before the spool moves to a temp file in ``tempdir``.
    :param draft_gap: a JPEG is DCT-scaled to at least this many times the
        largest thumbnail (1.0: the smallest scale that still covers it).
    :param reduce_gap: other formats are box-reduced to at least this many
        times the largest thumbnail before resampling (3.0).
    """

    def __init__(
        self,
        sizes: Sequence[SizeLike],
        *,
        mode: str = "fit",
        format: Optional[str] = None,
        alpha_format: str = "PNG",
        quality: int = 85,
        upscale: bool = False,
        pad_color: Color = None,
        color: str = "srgb",
        # What a decode may hold, not what a file declares: a JPEG drafted at
        # 1/8 decodes a 200 MP photo into 3 MP, a PNG must be decoded whole.
        max_decode_pixels: int = 50_000_000,
        max_pixels: Optional[int] = None,
        max_original: Optional[Tuple[int, int]] = None,
        original_quality: int = 90,
        strip_gps: bool = False,
        crop_fields: Optional[Tuple[str, str, str, str]] = None,
        background: bool = False,
        workers: int = 2,
        spool_memory: int = 4 * 1024 * 1024,
        tempdir: Optional[str] = None,
        draft_gap: float = 1.0,
        reduce_gap: float = 3.0,
        resample: Image.Resampling = Image.Resampling.LANCZOS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        _check_quality(quality)
        _check_quality(original_quality)
        if color not in ("srgb", "keep"):
            raise ValueError(f"color must be 'srgb' or 'keep', not {color!r}")
        if not isinstance(max_decode_pixels, int) or isinstance(max_decode_pixels, bool) or max_decode_pixels < 1:
            raise ValueError(f"max_decode_pixels must be a positive int, not {max_decode_pixels!r}")
        if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive int or None, not {max_pixels!r}")
        if draft_gap < 1.0 or reduce_gap < 1.0:
            raise ValueError("draft_gap and reduce_gap must be 1.0 or more")
        if crop_fields is not None and (len(crop_fields) != 4 or len(set(crop_fields)) != 4):
            raise ValueError(f"crop_fields must name four distinct fields (x, y, w, h), not {crop_fields!r}")
        if max_original is not None:
            if len(max_original) != 2 or min(max_original) < 1:
                raise ValueError(f"max_original must be (width, height), not {max_original!r}")
            max_original = (int(max_original[0]), int(max_original[1]))
        self.mode = mode
        self.format = _output_format(format) if format else None
        self.alpha_format = _output_format(alpha_format)
        if self.alpha_format == "JPEG":
            raise ValueError("alpha_format must keep transparency: PNG, WEBP or AVIF")
        self.quality = quality
        self.upscale = upscale
        self.pad_color = pad_color
        self.color = color
        self.max_decode_pixels = max_decode_pixels
        self.max_pixels = max_pixels
        self.max_original = max_original
        self.original_quality = original_quality
        self.strip_gps = strip_gps
        self.crop_fields = tuple(crop_fields) if crop_fields else None
        self.background = background
        self.workers = workers
        self.spool_memory = spool_memory
        self.tempdir = tempdir
        self.draft_gap = draft_gap
        self.reduce_gap = reduce_gap
        self.resample = resample
        self.specs: Tuple[ThumbnailSpec, ...] = tuple(self._resolve(s) for s in sizes)
        if not self.specs:
            raise ValueError("sizes must name at least one thumbnail size")
        keys = [s.key for s in self.specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"thumbnail sizes must be distinct, got {keys}")
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: "set[Future[None]]" = set()
        self._lock = threading.Lock()

    def _resolve(self, size: SizeLike) -> ThumbnailSpec:
        if isinstance(size, ThumbnailSpec):
            spec = size
        else:
            if len(size) != 2:
                raise ValueError(f"a size is (width, height) or a ThumbnailSpec, not {size!r}")
            spec = ThumbnailSpec(size[0], size[1])
        return replace(
            spec,
            mode=spec.mode or self.mode,
            quality=spec.quality if spec.quality is not None else self.quality,
            upscale=spec.upscale if spec.upscale is not None else self.upscale,
            pad_color=spec.pad_color if spec.pad_color is not None else self.pad_color,
        )

    def __repr__(self) -> str:
        return f"Thumbnailer(sizes={[s.key for s in self.specs]}, mode={self.mode!r})"

    # -- the public one-shot API ---------------------------------------

    def make(self, source: Source, *, crop: Optional[Box] = None) -> Dict[str, Thumbnail]:
        """Every configured thumbnail of one image, by ``"WxH"``.

        :param source: a path, or a binary file object (seekable ones are read
            in place, from their start).
        :param crop: ``(x, y, w, h)`` region of the upright image to use.
        :raises BadImage: not an image handled here, a bomb (from the header),
            truncated or corrupt data, or a crop outside the image.
        """
        with _opened(source) as fp:
            header = _read_header(fp)
            if header is None:
                raise BadImage("the file is not an image this server can make thumbnails of "
                               f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
            return self._make(fp, header, crop)

    def _make_as_promised(self, source: Source, crop: Optional[Box], alpha: bool) -> Dict[str, Thumbnail]:
        """``make`` with the alpha decision taken earlier (background mode names
        the keys, extension included, before the pixels are decoded)."""
        with _opened(source) as fp:
            header = _read_header(fp)
            if header is None:
                raise BadImage("the file is no longer an image")
            return self._make(fp, header, crop, alpha)

    def check(self, source: Union[bytes, Source]) -> Optional[ImageHeader]:
        """The header if the image may be processed; None if it is not an image.

        Reads the header only. With bytes (a file's first bytes), a size the
        bytes don't reach yet is not checked.

        :raises BadImage: a bomb (what decoding it would hold, see
            ``max_decode_pixels``) or a corrupt header.
        """
        header = probe(source)
        if header is not None:
            self._check_decoding(header)
        return header

    def _check_decoding(self, header: ImageHeader, orientation: Optional[int] = None,
                        originals: bool = True) -> None:
        """Refuse, from the header, an image this Thumbnailer would decode over
        its budget: for its thumbnails (without a crop box, which is checked
        once it is known) and, with ``originals`` and when ``max_original``
        applies, for the downscaled original. With the orientation unknown
        (before Pillow reads EXIF), the costlier of upright and turned is counted.

        :raises BadImage: naming the sizes and the limit.
        """
        _check_pixels(header.width, header.height, self.max_pixels)
        w, h = header.width, header.height
        if w is None or h is None:
            return
        turns = (1, 6) if orientation is None else (orientation,)
        if header.format == "JPEG":
            target = max(self._thumbnail_target((w, h), o, None) for o in turns)
            cost = _decode_cost(header, _drafted_size(w, h, target))
        else:
            cost = _decode_cost(header)
        assert cost is not None
        cost.check(self.max_decode_pixels)
        if originals and header.format == "JPEG" and self.max_original is not None:
            for o in turns:
                self._original_draft(header, o)

    def _thumbnail_target(self, raw_size: Tuple[int, int], orientation: int, crop: Optional[Box]) -> float:
        """The share of each side the thumbnails need decoded (``draft_gap`` included)."""
        plans, _region = self._plans(raw_size, orientation, crop)
        return max(p[3] for p in plans) * self.draft_gap

    def _original_draft(self, header: ImageHeader, orientation: int) -> Optional[float]:
        """The share of each side a JPEG original is decoded at to fit
        ``max_original`` (None: it fits already): twice the output's size where
        the budget allows, for quality, else the output's size.

        :raises BadImage: when even that is over ``max_decode_pixels``: the
            original cannot be downscaled in bounded memory.
        """
        assert self.max_original is not None and header.width is not None and header.height is not None
        w, h = header.width, header.height
        ow, oh = (h, w) if orientation >= 5 else (w, h)
        bw, bh = self.max_original
        if ow <= bw and oh <= bh:
            return None
        size, _box, _canvas = thumbnail_geometry(ow, oh, bw, bh, "fit")
        scale = max(size[0] / ow, size[1] / oh)
        last: Optional[_Cost] = None
        for target in (scale * 2, scale * self.draft_gap):
            cost = _decode_cost(header, _drafted_size(w, h, target))
            assert cost is not None
            if cost.pixels <= self.max_decode_pixels:
                return target
            last = cost
        assert last is not None
        last.check(self.max_decode_pixels, f" (downscaling the original to fit max_original {bw}x{bh})")
        return None  # not reached: check raised

    def thumbnail_format(self, spec: ThumbnailSpec, alpha: bool) -> str:
        """The output format of ``spec`` for an image with or without alpha."""
        if spec.format:
            return spec.format
        if self.format:
            return self.format
        if spec.mode == "pad" and spec.pad_color is None:
            alpha = True
        return self.alpha_format if alpha else "JPEG"

    # -- the work ---------------------------------------------------------

    def _make(self, fp: IO[bytes], header: ImageHeader, crop: Optional[Box],
              alpha_decided: Optional[bool] = None) -> Dict[str, Thumbnail]:
        self._check_decoding(header, originals=False)
        _check_complete(fp, header)
        im = _open_image(fp, header, self.max_pixels)
        try:
            header = _sized(header, im)  # TIFF, AVIF: counted below, with the size Pillow read
            icc = im.info.get("icc_profile")
            raw_w, raw_h = im.size
            if header.format == "JPEG":
                orientation = _orientation(im)
                plans, region = self._plans(im.size, orientation, crop)
                scale = max(p[3] for p in plans)
                factor = 1.0
                request = _draft_request(raw_w, raw_h, scale * self.draft_gap)
                if request is not None:
                    drafted = im.draft(None, request)
                    if drafted is not None:
                        factor = drafted[1][2] / raw_w
                # The size Pillow will decode at, counted once more before
                # any pixel: a crop box can need more than the header check
                # assumed.
                self._check_cost(header, im.size, crop)
                _load(im)
            else:
                self._check_cost(header, im.size, crop)
                _load(im)
                orientation = _orientation(im)
                plans, region = self._plans(im.size, orientation, crop)
                scale = max(p[3] for p in plans)
                factor = 1.0
            alpha = _has_alpha(im) if alpha_decided is None else alpha_decided
            work = _working_mode(im)
            # Reduce once, by an integer factor, to about reduce_gap times the
            # largest thumbnail: every size then resamples from a small image.
            k = int(1 / (scale / factor * self.reduce_gap)) if scale > 0 else 1
            if k >= 2:
                w, h = work.size
                work = work.reduce(k, box=(0, 0, w - w % k or w, h - h % k or h))
                factor /= k
            work = _transpose(work, orientation)
            colour = _Colour(icc if isinstance(icc, bytes) else None, self.color)
            results: Dict[str, Thumbnail] = {}
            for spec, size, box, _scale, canvas in sorted(plans, key=lambda p: -p[1][0] * p[1][1]):
                results[spec.key] = self._render(work, spec, size, box, canvas, factor, alpha, colour)
            return {s.key: results[s.key] for s in self.specs}
        finally:
            _release(im)

    def _check_cost(self, header: ImageHeader, decoded: Tuple[int, int], crop: Optional[Box]) -> None:
        """:raises BadImage: when decoding at ``decoded`` holds more than the budget."""
        cost = _decode_cost(header, decoded)
        assert cost is not None
        cost.check(self.max_decode_pixels, " (the crop box needs it decoded at that scale)" if crop else "")

    def _plans(self, raw_size: Tuple[int, int], orientation: int, crop: Optional[Box]
               ) -> Tuple[List[Tuple[ThumbnailSpec, Tuple[int, int], Box, float, Optional[Tuple[int, int]]]], Box]:
        w, h = raw_size
        if orientation >= 5:
            w, h = h, w
        region = _check_crop(crop, w, h) if crop is not None else (0.0, 0.0, float(w), float(h))
        rx, ry, rw, rh = region[0], region[1], region[2] - region[0], region[3] - region[1]
        plans = []
        for spec in self.specs:
            size, box, canvas = thumbnail_geometry(rw, rh, spec.width, spec.height,
                                                   spec.mode or self.mode, bool(spec.upscale))
            box = (box[0] + rx, box[1] + ry, box[2] + rx, box[3] + ry)
            scale = max(size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1]))
            plans.append((spec, size, box, scale, canvas))
        return plans, region

    def _render(self, work: Image.Image, spec: ThumbnailSpec, size: Tuple[int, int], box: Box,
                canvas: Optional[Tuple[int, int]], factor: float, alpha: bool,
                colour: _Colour) -> Thumbnail:
        ww, wh = work.size
        sbox = (max(0.0, box[0] * factor), max(0.0, box[1] * factor),
                min(float(ww), box[2] * factor), min(float(wh), box[3] * factor))
        im = work.resize(size, self.resample, box=sbox, reducing_gap=self.reduce_gap)
        if im.mode in ("La", "RGBa"):
            im = im.convert({"La": "LA", "RGBa": "RGBA"}[im.mode])
        im = colour.apply(im)
        fmt = self.thumbnail_format(spec, alpha)
        if canvas is not None:
            offset = ((canvas[0] - im.size[0]) // 2, (canvas[1] - im.size[1]) // 2)
            if spec.pad_color is None:
                # Onto a transparent canvas: a plain copy, alpha included.
                im = im.convert("LA" if im.mode in ("L", "LA") else "RGBA")
                bg = Image.new(im.mode, canvas, (0,) * len(im.mode))
                bg.paste(im, offset)
            else:
                bg = Image.new("RGBA", canvas, spec.pad_color)
                bg.alpha_composite(im.convert("RGBA"), offset)
                if not alpha:
                    bg = bg.convert("RGB")
            im = bg
        if fmt == "JPEG" and im.mode in ("RGBA", "LA"):
            im = _flatten(im, spec.pad_color)
        elif fmt in ("WEBP", "AVIF") and im.mode in ("L", "LA"):
            im = im.convert("RGBA" if im.mode == "LA" else "RGB")
        data = _encode(im, fmt, spec.quality or self.quality, colour.keep)
        ctype, _ext = _OUTPUT[fmt]
        return Thumbnail(size=spec.key, data=data, width=im.size[0], height=im.size[1],
                         format=fmt, content_type=ctype)

    # -- originals --------------------------------------------------------

    def rewrite_original(self, source: Source) -> Optional[bytes]:
        """The original re-encoded as ``max_original`` and ``strip_gps`` ask, or
        None when it can be kept byte for byte.

        :raises BadImage: as :meth:`make`.
        """
        with _opened(source) as fp:
            header = _read_header(fp)
            if header is None:
                return None
            if self.max_original is not None and header.format in ("JPEG", "PNG", "WEBP", "AVIF"):
                smaller = self._downscale_original(fp, header)
                if smaller is not None:
                    return smaller
            if self.strip_gps:
                return strip_location(fp, header.format, min(self.max_decode_pixels,
                                                             self.max_pixels or self.max_decode_pixels))
            return None

    def _downscale_original(self, fp: IO[bytes], header: ImageHeader) -> Optional[bytes]:
        assert self.max_original is not None
        bw, bh = self.max_original
        im = _open_image(fp, header, self.max_pixels)
        try:
            header = _sized(header, im)
            try:
                animated = bool(getattr(im, "is_animated", False))
            except _DECODE_ERRORS as exc:
                raise BadImage(f"the {header.format} image is corrupt: {_reason(exc)}") from exc
            if animated:
                return None  # animation would be lost: leave it alone
            orientation = _orientation(im)
            w, h = im.size
            ow, oh = (h, w) if orientation >= 5 else (w, h)
            if ow <= bw and oh <= bh:
                return None
            _check_complete(fp, header)
            size, _box, _canvas = thumbnail_geometry(ow, oh, bw, bh, "fit")
            exif = _exif_for_original(im, self.strip_gps)
            icc = im.info.get("icc_profile")
            if header.format == "JPEG":
                # Decoded at twice the output's size where the budget allows
                # (quality), else at the output's size; refused when not even that fits.
                target = self._original_draft(header, orientation)
                request = _draft_request(w, h, target) if target is not None else None
                if request is not None:
                    im.draft(None, request)
            self._check_cost(header, im.size, None)
            _load(im)
            alpha = _has_alpha(im)
            # Resampled as stored, then turned upright: the turn copies the
            # small image, not the decoded one.
            stored = (size[1], size[0]) if orientation >= 5 else size
            out = _working_mode(im).resize(stored, self.resample, reducing_gap=self.reduce_gap)
            out = _transpose(out, orientation)
            if out.mode in ("La", "RGBa"):
                out = out.convert({"La": "LA", "RGBa": "RGBA"}[out.mode])
            fmt = header.format
            if fmt == "JPEG" and out.mode not in ("L", "RGB", "CMYK"):
                out = out.convert("RGB")
            elif fmt in ("WEBP", "AVIF") and out.mode not in ("RGB", "RGBA"):
                out = out.convert("RGBA" if alpha else "RGB")
            out.info = {}
            params: Dict[str, Any] = {"exif": exif} if exif else {}
            if isinstance(icc, bytes):
                params["icc_profile"] = icc
            if fmt != "PNG":
                params["quality"] = self.original_quality
            buf = io.BytesIO()
            out.save(buf, fmt, **params)
            return buf.getvalue()
        finally:
            _release(im)

    # -- the middleware -----------------------------------------------------

    def handler(self, storage: Any = None) -> "ThumbnailHandler":
        """A fresh handler for one request; ``storage`` None keeps thumbnails on the files."""
        return ThumbnailHandler(self, storage)

    @property
    def rewrites_originals(self) -> bool:
        return self.max_original is not None or self.strip_gps

    def _submit(self, fn: Callable[[], None]) -> "Future[None]":
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.workers,
                                                    thread_name_prefix="uploadkit-thumbs")
            future = self._executor.submit(fn)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for background thumbnails queued so far; True if all finished."""
        from concurrent.futures import wait as _wait

        with self._lock:
            pending = set(self._futures)
        done, not_done = _wait(pending, timeout=timeout)
        return not not_done

    def shutdown(self, wait: bool = True) -> None:
        """Stop the background pool (it restarts on next use)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _check_crop(crop: Box, width: int, height: int) -> Box:
    """``(x, y, w, h)`` -> a region ``(x0, y0, x1, y1)`` inside the image.

    :raises BadImage: when the values are not finite numbers or leave the image.
    """
    try:
        x, y, w, h = (float(v) for v in crop)
    except (TypeError, ValueError) as exc:
        raise BadImage(f"the crop box {crop!r} is not four numbers") from exc
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BadImage(f"the crop box {crop!r} is not four finite numbers")
    if w <= 0 or h <= 0:
        raise BadImage(f"the crop box {w:g}x{h:g} is empty")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise BadImage(
            f"the crop box {w:g}x{h:g} at ({x:g}, {y:g}) is outside the {width}x{height} image",
            limit=[width, height])
    return (x, y, x + w, y + h)


# ---------------------------------------------------------------------------
# Location metadata: rewriting originals without GPS


def _exif_without_gps(tiff: bytes, prefix: bytes = b"") -> Optional[bytes]:
    """EXIF (TIFF structure) with its GPS IFD removed; None if it had none.

    An EXIF block that cannot be parsed or rewritten gives ``b""``: drop it
    whole, since a more lenient reader might still find a location in it.
    """
    exif = Image.Exif()
    try:
        exif.load(prefix + tiff)
        if _GPS_IFD not in exif:
            return None
        del exif[_GPS_IFD]
        out = exif.tobytes()
    except _DECODE_ERRORS:
        return b""
    return out[6:] if out.startswith(b"Exif\x00\x00") else out


def _exif_for_original(im: Image.Image, strip_gps: bool) -> bytes:
    """A re-encoded original's EXIF: orientation reset (the pixels are upright),
    GPS removed on request; nothing when it cannot be read."""
    try:
        exif = im.getexif()
        if _ORIENTATION in exif:
            exif[_ORIENTATION] = 1
        if strip_gps and _GPS_IFD in exif:
            del exif[_GPS_IFD]
        return exif.tobytes() if len(exif) else b""
    except _DECODE_ERRORS:
        return b""


def _mentions_gps(data: bytes) -> bool:
    return b"GPS" in data or b"exif:GPS" in data


def strip_location(fp: IO[bytes], fmt: str, max_pixels: int = 50_000_000) -> Optional[bytes]:
    """The file without location metadata, or None when it has none.

    JPEG, PNG and WebP are rewritten segment by segment (pixels untouched): the
    EXIF GPS IFD is removed, and XMP that mentions GPS is dropped. Other formats
    with GPS in their EXIF are re-encoded (TIFF losslessly, AVIF at quality 90).

    :param max_pixels: those two are decoded whole: refused above this many pixels.
    :raises BadImage: an image that cannot be read or is over ``max_pixels``.
    """
    if fmt == "JPEG":
        return _strip_jpeg(fp)
    if fmt == "PNG":
        return _strip_png(fp)
    if fmt == "WEBP":
        return _strip_webp(fp)
    if fmt in ("TIFF", "AVIF"):
        header = _read_header(fp)
        assert header is not None
        im = _open_image(fp, header, max_pixels)
        try:
            exif = im.getexif()
            if _GPS_IFD not in exif:
                return None
            _load(im)
            del exif[_GPS_IFD]
            buf = io.BytesIO()
            params: Dict[str, Any] = {"exif": exif.tobytes()}
            if "icc_profile" in im.info:
                params["icc_profile"] = im.info["icc_profile"]
            if fmt == "AVIF":
                params["quality"] = 90
            copy = im.copy()
            copy.info = {}
            copy.save(buf, fmt, **params)
            return buf.getvalue()
        except _DECODE_ERRORS as exc:
            raise BadImage(f"the {fmt} image's metadata cannot be rewritten: {_reason(exc)}") from exc
        finally:
            _release(im)
    return None  # GIF, BMP: no EXIF


def _strip_jpeg(fp: IO[bytes]) -> Optional[bytes]:
    scan = _jpeg_layout(fp).scan
    if scan is None:
        raise BadImage("the JPEG is truncated: it has no image data")
    header = _strip_jpeg_header(fp, scan)
    if header is None:
        return None
    out = io.BytesIO()
    out.write(header)
    fp.seek(scan)
    while True:
        chunk = fp.read(1 << 20)
        if not chunk:
            break
        out.write(chunk)
    return out.getvalue()


def _strip_jpeg_header(fp: IO[bytes], scan: int) -> Optional[bytes]:
    """The segments before ``scan`` without location data, or None if there was none.

    The EXIF segment is rewritten without its GPS IFD; XMP segments that
    mention GPS are dropped; every other byte is copied as is.
    """
    fp.seek(0)
    header = fp.read(scan)
    out = [header[:2]]
    pos, changed = 2, False
    while pos < scan:
        if header[pos] != 0xFF:
            raise BadImage("the JPEG's marker segments are corrupt")
        m = header[pos + 1]
        if m == 0xFF or m == 0xD8 or 0xD0 <= m <= 0xD7 or m == 0x01:
            step = 1 if m == 0xFF else 2
            out.append(header[pos:pos + step])
            pos += step
            continue
        end = pos + 2 + int.from_bytes(header[pos + 2:pos + 4], "big")
        data = header[pos + 4:end]
        if m == 0xE1 and data.startswith(b"Exif\x00\x00"):
            new = _exif_without_gps(data[6:], b"Exif\x00\x00")
            if new is not None:
                if new and len(new) + 8 <= 0xFFFF:
                    out.append(b"\xff\xe1" + (len(new) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + new)
                changed = True
                pos = end
                continue
        elif m == 0xE1 and data.startswith(_XMP_MARKERS) and _mentions_gps(data):
            changed = True
            pos = end
            continue
        out.append(header[pos:end])
        pos = end
    return b"".join(out) if changed else None


def _strip_png(fp: IO[bytes]) -> Optional[bytes]:
    fp.seek(8)
    out = io.BytesIO()
    out.write(_PNG_SIGNATURE)
    changed = False
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        length, ctype = struct.unpack(">I4s", head)
        data = fp.read(length)
        crc = fp.read(4)
        drop = False
        if ctype == b"eXIf":
            new = _exif_without_gps(data, b"Exif\x00\x00")
            if new is not None:
                data = new
                crc = (zlib.crc32(ctype + data) & 0xFFFFFFFF).to_bytes(4, "big")
                changed = True
                drop = not new
        elif ctype in (b"iTXt", b"tEXt", b"zTXt"):
            keyword = data.split(b"\x00", 1)[0]
            body = data
            if ctype == b"zTXt":
                try:
                    body = zlib.decompressobj().decompress(data[len(keyword) + 2:], 1 << 22)
                except zlib.error:
                    body = b""
            if keyword == b"XML:com.adobe.xmp" and _mentions_gps(body):
                drop = True
            elif keyword.lower() in (b"raw profile type exif", b"raw profile type app1"):
                drop = True  # hex-encoded EXIF, which may hold GPS: rarely worth keeping
        if drop:
            changed = True
        else:
            out.write(struct.pack(">I4s", len(data), ctype) + data + crc)
        if ctype == b"IEND":
            break
    return out.getvalue() if changed else None


def _strip_webp(fp: IO[bytes]) -> Optional[bytes]:
    fp.seek(12)
    chunks: List[Tuple[bytes, bytes]] = []
    changed = False
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        ctype, length = head[:4], int.from_bytes(head[4:], "little")
        data = fp.read(length + (length & 1))[:length]
        if ctype == b"EXIF":
            new = _exif_without_gps(data[6:] if data.startswith(b"Exif\x00\x00") else data,
                                    b"Exif\x00\x00")
            if new is not None:
                data, changed = new, True
                if not new:
                    continue
        elif ctype == b"XMP " and _mentions_gps(data):
            changed = True
            continue
        chunks.append((ctype, data))
    if not changed:
        return None
    body = io.BytesIO()
    present = {c for c, _ in chunks}
    for ctype, data in chunks:
        if ctype == b"VP8X" and data:
            # The canvas header's flags announce EXIF (0x08) and XMP (0x04).
            flags = data[0] & ~((0x04 if b"XMP " not in present else 0) | (0x08 if b"EXIF" not in present else 0))
            data = bytes([flags]) + data[1:]
        body.write(ctype + len(data).to_bytes(4, "little") + data + (b"\x00" if len(data) & 1 else b""))
    payload = body.getvalue()
    return b"RIFF" + (len(payload) + 4).to_bytes(4, "little") + b"WEBP" + payload


# ---------------------------------------------------------------------------
# The handler


@dataclass(eq=False)
class _Job:
    info: FileInfo
    header: ImageHeader
    spool: Spool
    #: What happens to the original's bytes (see ThumbnailHandler.receive):
    #: "pass" on at once; "wait" held until the header tells; "strip" held
    #: until a JPEG's image data starts, then its rewritten header and the
    #: rest passed on; "whole" held to the end and rewritten.
    route: str = "pass"
    walk: Optional[_JpegWalk] = None
    #: Background mode: whether the thumbnails' formats were chosen for alpha.
    alpha: bool = False


class ThumbnailHandler(UploadHandler):
    """Makes one request's thumbnails; a fresh instance per request.

    Files that are not raster images (by their magic bytes: PDF, ZIP, SVG...)
    pass through untouched. Each image is spooled (memory up to
    ``spool_memory``, then an anonymous temp file) while every chunk is passed
    on unchanged; its header is checked in ``file_start`` (format, pixel
    count) and, for a JPEG whose frame header lies beyond the first bytes, as
    soon as that header arrives, so a bomb is refused mid-upload.

    Originals that must be rewritten are held back instead: with ``strip_gps``
    a JPEG is held only until its image data starts, then its cleaned header
    and the rest stream on; other formats, and originals larger than
    ``max_original``, are held to the end and handed on in one piece (memory:
    the file's size, once). The file's ``sha256``/``md5`` stay those of the
    bytes the client sent; its stored size is the rewritten one.

    Where thumbnails go:

    * with storage: thumbnails are made in ``request_end`` (a bad image is
      refused before the sink commits the original) and stored in
      ``request_committed``, once the original has its final key (a renamed
      one included), as ``storage.thumbnail_key(file.key, w, h, ext)`` beside
      it; they are removed again if the request aborts after that.
      ``file.thumbnails`` maps ``"WxH"`` to those keys. A stale thumbnail
      under such a key is replaced; under ``collision="dedup"`` the thumbnails
      an identical, already stored original has are kept;
    * without storage (or for a file no storage key was given): the encoded
      :class:`Thumbnail` objects in ``file.extra["thumbnails"]`` (``"WxH"`` ->
      Thumbnail), in memory: thumbnails are small.

    With ``background=True``, the header checks (format, bombs, crop fields)
    still run during the request, but the thumbnails are made on the
    Thumbnailer's worker pool once the response is closed: ``file.thumbnails``
    already lists the keys they will have, and ``file.extra["thumbnails_pending"]``
    is True until they are stored (then False). A background failure is
    logged, leaves those keys absent and sets ``file.extra["thumbnails_error"]``.
    """

    def __init__(self, thumbnailer: Thumbnailer, storage: Any = None) -> None:
        self.thumbnailer = thumbnailer
        self.storage = storage
        self._current: Optional[_Job] = None
        self._jobs: List[_Job] = []
        self._committed: List[str] = []
        self._pending: List[Any] = []
        self._deferred: List[Tuple[_Job, Optional[Box], Dict[str, str]]] = []
        self._made: List[Tuple[UploadedFile, Mapping[str, Thumbnail]]] = []
        self._later: List[Tuple[_Job, Optional[Box]]] = []

    # -- streaming ---------------------------------------------------------

    def file_start(self, info: FileInfo) -> Any:
        self._current = None
        try:
            header = self.thumbnailer.check(info.head)
        except BadImage as exc:
            raise self._name(exc, info) from None
        if header is None:
            return None
        job = _Job(info, header, Spool(self.thumbnailer.spool_memory, self.thumbnailer.tempdir))
        if header.format == "JPEG":
            job.walk = _JpegWalk()
        job.route = self._route(job, header.width, header.height)
        self._current = job
        return None

    def _route(self, job: _Job, width: Optional[int], height: Optional[int]) -> str:
        t = self.thumbnailer
        if not t.rewrites_originals:
            return "pass"
        if width is None or height is None:
            return "wait"
        fmt = job.header.format
        # Orientation is not known yet: compare conservatively (a needless
        # "whole" costs memory, not correctness: unchanged bytes are handed on).
        if (t.max_original is not None and fmt in ("JPEG", "PNG", "WEBP", "AVIF")
                and max(width, height) > min(t.max_original)):
            return "whole"
        if t.strip_gps and fmt not in ("GIF", "BMP"):
            return "strip" if fmt == "JPEG" else "whole"
        return "pass"

    def file_skipped(self, info: FileInfo) -> None:
        if self._current is not None:
            self._current.spool.close()
            self._current = None

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        """Spool every chunk of an image; pass it on unless the original is rewritten.

        A JPEG's size and first scan are found as its bytes arrive, so a bomb
        whose frame header lies beyond the first 8 KiB is refused mid-upload,
        and ``strip_gps`` holds only the header segments, not the whole file.
        """
        job = self._current
        if job is None:
            return chunk
        spool = job.spool
        spool.write(chunk)
        walk = job.walk
        if walk is not None and not walk.done:
            had_size = walk.width is not None
            walk.advance(spool.reader(), spool.size)
            # Checked when the frame header arrives and again at the first
            # scan header, which tells whether the JPEG is decoded from
            # several scans (and holds all its coefficients).
            if walk.width is not None and (not had_size or walk.done):
                try:
                    self.thumbnailer._check_decoding(ImageHeader(
                        "JPEG", _INPUT_TYPES["JPEG"], walk.width, walk.height, walk.scan,
                        walk.sampling, walk.multi_scan))
                except BadImage as exc:
                    raise self._name(exc, info) from None
                if job.route == "wait":
                    job.route = self._route(job, walk.width, walk.height)
                    if job.route == "pass":
                        return spool.read_all()  # what was held, this chunk included
        route = job.route
        if route == "pass":
            return chunk
        if route == "strip" and walk is not None and walk.scan is not None:
            job.route = "pass"
            fp = spool.reader()
            header = _strip_jpeg_header(fp, walk.scan)
            if header is None:
                fp.seek(0)
                header = fp.read(walk.scan)
            fp.seek(walk.scan)
            return header + fp.read(spool.size - walk.scan)
        return None

    def flush(self, info: FileInfo) -> Optional[bytes]:
        job = self._current
        if job is None or job.route == "pass":
            return None
        try:
            rewritten = self.thumbnailer.rewrite_original(job.spool.reader())
        except BadImage as exc:
            raise self._name(exc, info) from None
        return rewritten if rewritten is not None else job.spool.read_all()

    def file_end(self, info: FileInfo) -> Optional[UploadedFile]:
        job, self._current = self._current, None
        if job is not None:
            self._jobs.append(job)
        return None

    # -- the request ---------------------------------------------------------

    def request_end(self, ctx: "RequestContext") -> None:
        crop = self._crop(ctx)
        t = self.thumbnailer
        for job in self._jobs:
            file = job.info.file
            if file is None:
                continue
            if t.background:
                job.alpha = self._check_now(job, crop)
                file.extra["thumbnails_pending"] = True
                self._later.append((job, crop))
                continue
            try:
                thumbs = t.make(job.spool.reader(), crop=crop)
            except BadImage as exc:
                raise self._name(exc, job.info) from None
            self._made.append((file, thumbs))

    def request_committed(self, ctx: "RequestContext") -> None:
        """The originals have their final keys: store thumbnails beside them."""
        t = self.thumbnailer
        for file, thumbs in self._made:
            key = getattr(file, "key", None)
            if self.storage is not None and key:
                self._store_all(key, thumbs, file)
            else:
                file.extra["thumbnails"] = thumbs
        self._made = []
        for job, crop in self._later:
            later = job.info.file
            assert later is not None
            key = getattr(later, "key", None)
            promised: Dict[str, str] = {}
            if self.storage is not None and key:
                for spec in t.specs:
                    ext = _OUTPUT[t.thumbnail_format(spec, job.alpha)][1]
                    promised[spec.key] = self.storage.thumbnail_key(key, spec.width, spec.height, ext)
                later.thumbnails.update(promised)
            self._deferred.append((job, crop, promised))
        self._later = []

    def _store_all(self, key: str, thumbs: Mapping[str, Thumbnail], file: UploadedFile) -> None:
        storage = self.storage
        # A deduplicated original was already stored, with its thumbnails:
        # those are kept (they are not this request's to remove on abort).
        # Otherwise the original's final key is this request's.
        existing = bool(getattr(file, "deduplicated", False))
        for thumb in thumbs.values():
            spec_w, spec_h = (int(v) for v in thumb.size.split("x"))
            tkey = storage.thumbnail_key(key, spec_w, spec_h, thumb.extension)
            if not (existing and storage.exists(tkey)):
                self._store(tkey, thumb)
            file.thumbnails[thumb.size] = tkey

    def _store(self, key: str, thumb: Thumbnail) -> None:
        # "overwrite": the key is derived from the original's, which is this
        # request's; a thumbnail left there by a deleted original is stale.
        pending = self.storage.begin_write(key, collision="overwrite")
        self._pending.append(pending)
        try:
            pending.write(thumb.data)
            pending.commit()
        except BaseException:
            _quietly(pending.discard)
            self._pending.remove(pending)
            raise
        self._pending.remove(pending)
        self._committed.append(key)

    def _crop(self, ctx: "RequestContext") -> Optional[Box]:
        names = self.thumbnailer.crop_fields
        if not names:
            return None
        values: Dict[str, str] = {}
        for name, value in ctx.fields:
            if name in names:
                values[name] = value
        if not values:
            return None
        missing = [n for n in names if n not in values]
        if missing:
            raise BadImage(f"the crop box needs the fields {', '.join(names)}; missing {', '.join(missing)}",
                           field=missing[0])
        numbers: List[float] = []
        for name in names:
            try:
                v = float(values[name].strip())
            except ValueError:
                raise BadImage(f"the crop field {name!r} is {values[name][:40]!r}, not a number",
                               field=name) from None
            if not math.isfinite(v):
                raise BadImage(f"the crop field {name!r} is not a finite number", field=name)
            numbers.append(v)
        return (numbers[0], numbers[1], numbers[2], numbers[3])

    def _check_now(self, job: _Job, crop: Optional[Box]) -> bool:
        """The cheap checks that must answer the request (header, size,
        completeness, crop box), without decoding; returns whether the image
        has alpha, which fixes its thumbnails' formats."""
        fp = job.spool.reader()
        try:
            header = _read_header(fp)
            assert header is not None
            t = self.thumbnailer
            t._check_decoding(header)
            _check_complete(fp, header)
            im = _open_image(fp, header, t.max_pixels)
            try:
                header = _sized(header, im)
                t._check_decoding(header)
                if crop is not None:
                    w, h = im.size
                    orientation = _orientation(im)
                    if orientation >= 5:
                        w, h = h, w
                    _check_crop(crop, w, h)
                    if header.format == "JPEG":
                        target = t._thumbnail_target(im.size, orientation, crop)
                        t._check_cost(header, _drafted_size(im.size[0], im.size[1], target), crop)
                return _has_alpha(im)
            finally:
                _release(im)
        except BadImage as exc:
            raise self._name(exc, job.info) from None

    @staticmethod
    def _name(exc: BadImage, info: FileInfo) -> BadImage:
        if exc.field is None:
            exc.field = info.field_name
        if not exc.message.startswith("file "):
            exc.message = f"file {info.filename!r}: {exc.message}"
            exc.args = (exc.message,)
        return exc

    # -- the end -------------------------------------------------------------

    def close(self, ctx: "RequestContext") -> None:
        deferred, self._deferred = self._deferred, []
        for job, crop, promised in deferred:
            self.thumbnailer._submit(lambda job=job, crop=crop, promised=promised:  # type: ignore[misc]
                                     self._background(job, crop, promised))
        for job in self._jobs:
            if not any(job is d[0] for d in deferred):
                job.spool.close()
        self._jobs = []

    def _background(self, job: _Job, crop: Optional[Box], promised: Dict[str, str]) -> None:
        file = job.info.file
        try:
            thumbs = self.thumbnailer._make_as_promised(job.spool.reader(), crop, job.alpha)
            for size, thumb in thumbs.items():
                if size in promised:
                    self._store(promised[size], thumb)
                    self._committed.remove(promised[size])  # the request is over: keep it
            if not promised and file is not None:
                file.extra["thumbnails"] = thumbs
        except Exception as exc:
            log.exception("uploadkit: background thumbnails of %r failed", job.info.filename)
            if file is not None:
                file.extra["thumbnails_error"] = str(exc)
        finally:
            if file is not None:
                file.extra["thumbnails_pending"] = False
            job.spool.close()

    def abort(self, ctx: "RequestContext", exc: Optional[BaseException]) -> None:
        for pending in self._pending:
            _quietly(pending.discard)
        self._pending = []
        for key in self._committed:
            _quietly(lambda key=key: self.storage.delete(key))  # type: ignore[misc]
        self._committed = []
        jobs = self._jobs + ([self._current] if self._current is not None else [])
        for job in jobs:
            _quietly(job.spool.close)
        self._jobs, self._current, self._deferred = [], None, []


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("uploadkit: cleanup step failed")
