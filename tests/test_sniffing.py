"""Type sniffing from real file heads (drawn in code) and the allowed_types matrix."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from typing import Any, List, Tuple
from wsgiref.headers import Headers

import pytest
import requests
from PIL import Image

from tests.support.wsgi import wsgi_server  # noqa: F401  (first: imports webob quietly)
from uploadkit.errors import UnsupportedType
from uploadkit.files import FileInfo
from uploadkit.handlers import SniffingHandler
from uploadkit.limits import Limits
from uploadkit.pipeline import RequestContext
from hypothesis import given, settings
from hypothesis import strategies as st

from uploadkit.sniffing import check_type, normalize_type, sniff


def _image(fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    im = Image.new(mode, (6, 4), (200, 30, 30) if mode == "RGB" else 7)
    for x in range(6):
        im.putpixel((x, x % 4), (0, 0, 255) if mode == "RGB" else 1)
    im.save(out, fmt)
    return out.getvalue()


def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("hello.txt", "hello " * 100)
    return out.getvalue()


HEADS = {
    "png": _image("PNG"),
    "jpeg": _image("JPEG"),
    "gif": _image("GIF", "P"),
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "zip": _zip(),
    "text": b"just some text, nothing magic about it\n",
    "empty": b"",
}


@pytest.mark.parametrize("kind, mime", [
    ("png", "image/png"), ("jpeg", "image/jpeg"), ("gif", "image/gif"), ("pdf", "application/pdf"),
    ("zip", "application/zip"), ("text", None), ("empty", None),
])
def test_sniff(kind: str, mime: str | None) -> None:
    assert sniff(HEADS[kind]) == mime


def test_sniff_needs_only_the_head() -> None:
    assert sniff(HEADS["png"][:32]) == "image/png"
    assert sniff(HEADS["jpeg"][:16]) == "image/jpeg"


@pytest.mark.parametrize("raw, norm", [
    ("Image/JPG; q=1", "image/jpeg"), ("image/pjpeg", "image/jpeg"), ("image/x-png", "image/png"),
    ("application/x-zip-compressed", "application/zip"), (" text/plain ; charset=utf-8", "text/plain"),
])
def test_normalize_type(raw: str, norm: str) -> None:
    assert normalize_type(raw) == norm


def _info(filename: str, declared: str = "") -> FileInfo:
    return FileInfo(field_name="f", filename=filename, raw_filename=filename, declared_type=declared,
                    content_type=declared or "application/octet-stream", headers=Headers([]), index=0)


IMAGES_AND_PDF = Limits(allowed_types=frozenset({"image/png", "image/jpeg", "application/pdf"}))
IMAGES = Limits(allowed_types=frozenset({"image/*"}))
ANY = Limits()

MATRIX = [
    # limits, filename, declared type, head, accepted?, words of the refusal
    (IMAGES_AND_PDF, "a.png", "image/png", "png", True, ""),
    (IMAGES_AND_PDF, "a.jpeg", "image/jpeg", "jpeg", True, ""),
    (IMAGES_AND_PDF, "a.JPG", "image/jpeg", "jpeg", True, ""),
    (IMAGES_AND_PDF, "doc.pdf", "application/pdf", "pdf", True, ""),
    (IMAGES_AND_PDF, "noext", "", "png", True, ""),
    # not allowed
    (IMAGES_AND_PDF, "a.gif", "image/gif", "gif", False, "image/gif, which is not an allowed type"),
    (IMAGES_AND_PDF, "a.zip", "application/zip", "zip", False, "application/zip, which is not an allowed"),
    (IMAGES_AND_PDF, "a.txt", "text/plain", "text", False, "text/plain, which is not an allowed type"),
    # unidentifiable bytes declared as a sniffable type
    (IMAGES_AND_PDF, "a.png", "image/png", "text", False, "declared as image/png but its bytes are not"),
    (IMAGES_AND_PDF, "blob", "image/png", "text", False, "declared as image/png"),
    (IMAGES_AND_PDF, "a.png", "", "text", False, "named .png but its bytes are not image/png"),
    # PNG bytes named .jpg
    (IMAGES_AND_PDF, "a.jpg", "image/jpeg", "png", False, "is image/png but its name says image/jpeg"),
    (IMAGES_AND_PDF, "a.jpg", "image/png", "png", False, "is image/png but its name says image/jpeg"),
    # active content refused whatever the bytes
    (IMAGES_AND_PDF, "shell.php", "image/png", "png", False, "'.php' is never accepted"),
    (IMAGES_AND_PDF, "page.html", "", "png", False, "'.html' is never accepted"),
    (IMAGES_AND_PDF, "x.svg", "image/svg+xml", "text", False, "'.svg' is never accepted"),
    (IMAGES_AND_PDF, "app.js", "", "text", False, "'.js' is never accepted"),
    (IMAGES, "shell.PHP", "image/png", "png", False, "'.php' is never accepted"),
    # wildcard
    (IMAGES, "a.png", "image/png", "png", True, ""),
    (IMAGES, "a.gif", "", "gif", True, ""),
    (IMAGES, "a.jpg", "", "jpeg", True, ""),
    (IMAGES, "doc.pdf", "application/pdf", "pdf", False, "application/pdf, which is not an allowed type"),
    (IMAGES, "a.txt", "", "text", False, "text/plain, which is not an allowed type"),
    # no restriction at all
    (ANY, "shell.php", "application/x-php", "text", True, ""),
    (ANY, "a.jpg", "image/jpeg", "png", True, ""),
    (ANY, "a.png", "image/png", "text", True, ""),
    (ANY, "a.exe", "", "zip", True, ""),
]


@pytest.mark.parametrize("limits, filename, declared, head, accepted, words", MATRIX)
def test_check_type_matrix(limits: Limits, filename: str, declared: str, head: str, accepted: bool,
                           words: str) -> None:
    problem = check_type(_info(filename, normalize_type(declared) if declared else ""), sniff(HEADS[head]), limits)
    if accepted:
        assert problem is None
    else:
        assert problem is not None and words in problem, problem
        assert repr(filename) in problem


OCTET = Limits(allowed_types=frozenset({"application/octet-stream", "text/plain"}))


@pytest.mark.parametrize("filename, declared", [
    pytest.param("data.bin", "", id="named-bin"),
    pytest.param("data.dat", "application/octet-stream", id="declared-octet-stream"),
])
def test_octet_stream_is_not_a_sniffable_claim(filename: str, declared: str) -> None:
    assert check_type(_info(filename, declared), sniff(HEADS["text"]), OCTET) is None


def _sniffing_handler(limits: Limits) -> SniffingHandler:
    h = SniffingHandler()
    h.request_start(RequestContext(limits=limits))
    return h


def test_sniffing_handler_sets_content_type_from_bytes() -> None:
    info = _info("photo.jpeg", "application/octet-stream")
    info.head = HEADS["jpeg"]
    assert _sniffing_handler(ANY).file_start(info) is None
    assert info.content_type == "image/jpeg"


def test_sniffing_handler_keeps_declared_type_when_bytes_say_nothing() -> None:
    info = _info("notes.txt", "text/plain")
    info.content_type = "text/plain"
    info.head = HEADS["text"]
    _sniffing_handler(ANY).file_start(info)
    assert info.content_type == "text/plain"


def test_sniffing_handler_refuses_with_415_naming_the_allowed_types() -> None:
    info = _info("a.gif", "image/gif")
    info.head = HEADS["gif"]
    with pytest.raises(UnsupportedType) as err:
        _sniffing_handler(IMAGES_AND_PDF).file_start(info)
    e = err.value
    assert e.status == 415 and e.code == "unsupported_type"
    assert e.field == "f"
    assert e.limit == ["application/pdf", "image/jpeg", "image/png"]
    assert "'a.gif'" in e.message


def test_limits_validate_allowed_types() -> None:
    with pytest.raises(ValueError):
        Limits(allowed_types="image/png")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Limits(allowed_types=frozenset({"png"}))
    assert Limits(allowed_types=frozenset({" Image/PNG "})).allows_type("image/png")
    assert Limits(allowed_types=frozenset({"image/*"})).allows_type("IMAGE/WEBP")
    assert not Limits(allowed_types=frozenset({"image/*"})).allows_type("application/pdf")


# -- the fast path agrees with filetype ---------------------------------------------

_MAGICS = [b"", b"PK\x03\x04", b"\x1a\x45\xdf\xa3", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a",
           b"%PDF-", b"RIFF\x00\x00\x00\x00WEBP", b"\x00\x00\x00\x18ftypavif", b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c"]


@settings(max_examples=300, deadline=None)
@given(magic=st.sampled_from(_MAGICS), inner=st.sampled_from([b"", b"[Content_Types].xml", b"word/",
                                                               b"mimetypeapplication/vnd.oasis.opendocument.text",
                                                               b"\x42\x82\x84webm", b"\x42\x82\x88matroska"]),
       tail=st.binary(max_size=9000))
def test_sniff_gives_filetypes_answer(magic: bytes, inner: bytes, tail: bytes) -> None:
    import filetype as ft

    head = magic + inner + tail
    kind = ft.guess(head[:8192]) if head else None
    expected = None if kind is None else normalize_type(kind.mime)
    assert sniff(head) == expected


# Heads of many formats, magic numbers from the formats' specifications, each
# padded past the lengths the matchers ask for.
_SAMPLES = [
    b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08", b"II*\x00\x10\x00\x00\x00CR", b"BM6\x00\x00\x00",
    b"8BPS\x00\x01", b"\x00\x00\x01\x00\x01\x00", b"ID3\x03\x00", b"\xff\xfb\x90\x00", b"OggS\x00\x02",
    b"fLaC\x00\x00\x00\x22", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"RIFF\x24\x00\x00\x00AVI LIST",
    b"FORM\x00\x00\x00\x00AIFF", b"#!AMR\n", b"MThd\x00\x00\x00\x06", b"\x00\x00\x00\x20ftypisom",
    b"\x00\x00\x00\x18ftypheic", b"\x00\x00\x00\x14ftypqt  ", b"\x00\x00\x00\x1cftypM4V ",
    b"\x00\x00\x01\xba", b"FLV\x01", b"wOFF\x00\x01\x00\x00", b"wOF2\x00\x01\x00\x00",
    b"\x00\x01\x00\x00\x00", b"OTTO\x00", b"Rar!\x1a\x07\x00", b"BZh91AY", b"\xfd7zXZ\x00",
    b"MZ\x90\x00", b"\x7fELF\x02\x01\x01", b"SQLite format 3\x00", b"!<arch>\ndebian-binary",
    b"!<arch>\n", b"\x1f\x9d\x90", b"LZIP\x01", b"\x04\x22\x4d\x18", b"\x28\xb5\x2f\xfd",
    b"\x00asm\x01\x00\x00\x00", b"{\\rtf1\\ansi", b"%!PS-Adobe-3.0", b"Cr24\x02\x00", b"MSCF\x00\x00",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504) + b"\xec\xa5\xc1\x00", b"\xef\xbb\xbf%PDF-1.7", b"gimp xcf v001", b"AC1018",
    b"\xce\xb2\xcf\x81", b"\xed\xab\xee\xdb", b"\xff\xf1\x50\x80", b"CWS\x09", b"NES\x1a",
    b"\x89LZO\x00\r\n\x1a\n", b"0&\xb2u\x8ef\xcf\x11\xa6\xd9", b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ",
    # Magic numbers further in: tar's "ustar" at 257, DICOM's "DICM" after a
    # 128-byte preamble, an EOT font's version at 8 and "LP" at 34, M4A both ways.
    bytes(257) + b"ustar\x0000", bytes(128) + b"DICM", bytes(8) + b"\x02\x00\x01" + bytes(23) + b"LP",
    b"\x00\x00\x00\x20ftypM4A ", b"M4A \x00\x00\x00\x00",
]


@pytest.mark.parametrize("magic", _SAMPLES, ids=lambda m: m[:8].hex())
def test_sniff_agrees_with_filetype_on_every_format_we_know(magic: bytes) -> None:
    """The gates are read from filetype's own matchers: on a real head of each
    format, the format's gate must hold and the answer must be filetype's."""
    import filetype as ft

    from uploadkit import sniffing

    head = magic + bytes(600)
    kind = ft.guess(head)
    assert kind is not None, f"no format recognised: the sample {magic!r} is wrong"
    assert sniff(head) == normalize_type(kind.mime)
    gate = sniffing._gate(kind)
    assert gate is None or any(head[offset] == value for offset, value in gate), gate


def test_sniff_gates_are_read_from_most_matchers() -> None:
    """Most matchers get a gate; if filetype's code changes shape, they fall
    back to always running (slower, never wrong), and this says so."""
    import filetype as ft

    from uploadkit import sniffing

    gated = [k for k in ft.TYPES if sniffing._gate(k) is not None]
    assert len(gated) >= len(ft.TYPES) // 2, [type(k).__name__ for k in ft.TYPES if k not in gated]
    assert sniff(b"\x00" * 64) is None and sniff(b"AC1018" + bytes(64)) == "image/vnd.dwg"
    # Gates at later offsets are read too (a class constant such as Dcm.OFFSET
    # included), and a byte-order mark the matcher skips widens its gate.
    gates = {type(k).__name__: sniffing._gate(k) for k in ft.TYPES}
    assert gates["Tar"] == {(257, 0x75)} and gates["Eot"] == {(34, 0x4C)}
    assert gates["Dcm"] == {(128, 0x44)} and gates["Pdf"] == {(0, 0x25), (0, 0xEF)}


# Every (offset, byte) pair some gate tests: bodies built on them reach the
# matchers behind the gates, and the ones next to them. Read once: it parses
# every matcher's source.
@functools.lru_cache(maxsize=None)
def _gate_pairs() -> List[Tuple[int, int]]:
    import filetype as ft

    from uploadkit import sniffing

    pairs = {pair for k in ft.TYPES for pair in (sniffing._gate(k) or ())} | sniffing._ZSTD_GATE
    return sorted(pairs | {(o + 1, v) for o, v in pairs} | {(o, v ^ 1) for o, v in pairs})


@settings(max_examples=300, deadline=None)
@given(data=st.data(), sample=st.sampled_from([b""] + _SAMPLES), extra=st.integers(min_value=-8, max_value=400))
def test_sniff_gives_filetypes_answer_near_the_gates(data: st.DataObject, sample: bytes, extra: int) -> None:
    """Heads of a known format or of random bytes, cut short or not, with the
    bytes some gates test set (or nearly set): the gated sniff must still give
    filetype's answer."""
    import filetype as ft

    size = max(1, len(sample) + extra)
    head = bytearray((sample + data.draw(st.binary(min_size=size, max_size=size)))[:size])
    for offset, value in data.draw(st.lists(st.sampled_from(_gate_pairs()), max_size=4)):
        if offset < size:
            head[offset] = value
    kind = ft.guess(bytes(head))
    assert sniff(bytes(head)) == (None if kind is None else normalize_type(kind.mime))


# -- Zstandard's skippable frames -------------------------------------------------

_SKIPPABLE = b"\x50\x2a\x4d\x18"  # a skippable frame's magic, little-endian
_ZSTD = b"\x28\xb5\x2f\xfd"
_EMPTY_FRAMES = (_SKIPPABLE + bytes(4)) * 1024  # 8 KiB: one matcher call each, in filetype


def test_a_head_of_skippable_frames_is_walked_not_recursed() -> None:
    """filetype's Zstd matcher calls itself once a frame: a head of 1,024 empty
    frames ran out of stack. Ours walks them and still finds the frame after."""
    assert sniff(_EMPTY_FRAMES) is None
    assert sniff(_EMPTY_FRAMES[:-8] + _ZSTD) == "application/zstd"
    assert sniff((_SKIPPABLE + b"\x05\x00\x00\x00" + b"hello") * 3 + _ZSTD + bytes(8)) == "application/zstd"


@pytest.mark.parametrize("head", [
    bytes([first]) + _ZSTD[1:] + bytes(8) for first in (0x21, 0x22, 0x27, 0x28, 0x29)] + [
    b"\x4f\x2a\x4d\x18" + bytes(4) + _ZSTD,  # not a skippable frame: the walk stops
    b"\x60\x2a\x4d\x18" + bytes(4) + _ZSTD,
    b"\x5f\x2a\x4d\x18" + bytes(4) + _ZSTD,  # the last skippable magic
    _SKIPPABLE + b"\x04\x00\x00\x00" + b"abc" + _ZSTD,  # declared one byte longer than the data
    _SKIPPABLE + b"\x02\x00\x00\x00" + b"abc" + _ZSTD,  # one byte shorter
    _SKIPPABLE + b"\x04\x00\x00\x00" + b"abcd",  # fits, then nothing
], ids=lambda h: h[:12].hex())
def test_the_zstd_stand_in_at_the_edges(head: bytes) -> None:
    import filetype as ft

    from uploadkit import sniffing

    zstd = next(k for k in ft.TYPES if type(k).__name__ == "Zstd")
    assert sniffing._zstd_match(head) is zstd.match(head)


def test_a_head_of_skippable_frames_uploads_through_a_real_server(wsgi_server: Any, tmp_path: Any) -> None:
    """The head that ran filetype's matcher out of stack, through the default
    chain behind a real server: stored whole, typed by what follows it."""
    from uploadkit import UploadMiddleware

    def app(environ: Any, start_response: Any) -> List[bytes]:
        f = environ["uploadkit.files"]["f"]
        body = json.dumps({"type": f.content_type, "size": f.size, "sha256": f.sha256}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    server = wsgi_server(UploadMiddleware(app, progress=False, tempdir=str(tmp_path)))
    for data, expected in ((_EMPTY_FRAMES + b"more", "application/octet-stream"),
                           (_EMPTY_FRAMES[:-8] + _ZSTD + b"more", "application/zstd")):
        r = requests.post(f"http://127.0.0.1:{server.port}/", timeout=10,
                          files={"f": ("data.bin", data, "application/octet-stream")})
        assert r.status_code == 200, r.text
        assert r.json() == {"type": expected, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_matcher_that_fails_counts_as_no_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """With another filetype's Zstd matcher (the stand-in then steps aside),
    filetype's own recursion fails on the deep head: the sniff says nothing
    and the other matchers still answer."""
    import filetype as ft

    from uploadkit import sniffing

    zstd = next(k for k in ft.TYPES if type(k).__name__ == "Zstd")
    with pytest.raises(RecursionError):
        zstd.match(_EMPTY_FRAMES[:-8] + _ZSTD)
    monkeypatch.setattr(sniffing, "_ZSTD_SOURCE", "another filetype")
    monkeypatch.setattr(sniffing, "_CANDIDATES", {})
    assert sniff(_EMPTY_FRAMES[:-8] + _ZSTD) is None
    assert sniff(_ZSTD + bytes(8)) == "application/zstd"
    assert sniff(b"\x89PNG\r\n\x1a\n" + bytes(32)) == "image/png"


# (first byte, data, slack): a first byte outside 0x50-0x5F is no skippable frame.
_frames = st.lists(st.tuples(st.integers(0x48, 0x67), st.binary(max_size=24), st.integers(0, 30)), max_size=30)


@settings(max_examples=400, deadline=None)
@given(frames=_frames, last=st.sampled_from([b"", _ZSTD, b"\x22\xb5\x2f\xfd", b"\x29\xb5\x2f\xfd", b"\x28\xb5\x2f",
                                              _SKIPPABLE, _SKIPPABLE + b"\xff\xff\xff\xff"]),
       tail=st.binary(max_size=16))
def test_the_zstd_stand_in_answers_as_filetypes_matcher(frames: List[Tuple[int, bytes, int]], last: bytes,
                                                        tail: bytes) -> None:
    """Chains of frames, skippable or not, whose declared sizes fit, fall
    short or run past the head, then a frame or not: the loop agrees with
    filetype's own matcher wherever that one has the stack to answer."""
    import filetype as ft

    from uploadkit import sniffing

    head = b"".join(bytes([first]) + b"\x2a\x4d\x18" + (len(data) + slack - 15).to_bytes(4, "little", signed=True)
                    + data for first, data, slack in frames) + last + tail
    zstd = next(k for k in ft.TYPES if type(k).__name__ == "Zstd")
    assert sniffing._zstd_match(head) == zstd.match(head)
    kind = ft.guess(head)
    assert sniff(head) == (None if kind is None else normalize_type(kind.mime))


def test_stored_gates_are_what_filetypes_source_says() -> None:
    """The stored table must be what reading the installed filetype gives; on
    another filetype or Python its fingerprints differ and it is not used."""
    import filetype as ft

    from uploadkit import _magic_gates, sniffing

    fresh = sniffing.derive_gates()
    matching = {k for k, v in _magic_gates.GATES.items() if k in fresh and fresh[k][0] == v[0]}
    if len(matching) < len(fresh):
        pytest.skip(f"the stored table was read from another filetype or Python ({len(matching)} of "
                    f"{len(fresh)} matchers unchanged): regenerate it with tools/magic_gates.py")
    assert {k: _magic_gates.GATES[k] for k in fresh} == fresh
    assert sniffing.render_gates_module().startswith('"""Gates of filetype')
    assert len(fresh) >= len(ft.TYPES) - 2  # the keys name every matcher's class
