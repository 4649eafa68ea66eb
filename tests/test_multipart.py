"""The sans-io decoder: exact events under every chunking, the encoder, limits and errors."""

from __future__ import annotations

import random
import re
from typing import List, Tuple

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uploadkit.errors import (
    FieldTooLarge,
    HeaderTooLarge,
    MalformedMultipart,
    TooManyFiles,
    TooManyParts,
    UploadError,
    format_size,
)
from uploadkit.limits import Limits
from uploadkit.multipart import (
    PREAMBLE_LIMIT,
    Field,
    FileData,
    FileEnd,
    FileStart,
    MultipartDecoder,
    encode_multipart,
    parse_boundary,
)
from tests.support.bodies import (
    BOUNDARY,
    decode,
    end,
    field_part,
    file_part,
    fixed_chunks,
    part,
    random_chunks,
    split_at,
    strip_headers,
)

CD = "Content-Disposition: form-data"

#: A body with every kind of part; data deliberately full of near-boundaries.
TRICKY = b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\r\n\n--\r\n" + b"--" + BOUNDARY.encode()[:5] + b"\r"
CORPUS = {
    "mixed": (
        field_part("title", "Grüße \"quoted\"")
        + file_part("doc", "a.bin", TRICKY, "application/octet-stream")
        + field_part("empty", "")
        + file_part("doc", "b.txt", b"", "text/plain")
        + file_part("pic", "p.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")
        + end()
    ),
    "crlf-only-data": file_part("f", "crlf.bin", b"\r\n" * 50) + field_part("x", "\r\n\r\n") + end(),
    "single-field": field_part("only", "v") + end(),
}
EXPECTED = {
    "mixed": [
        Field("title", "Grüße \"quoted\""),
        FileStart("doc", "a.bin", "application/octet-stream"),
        FileData(TRICKY),
        FileEnd(),
        Field("empty", ""),
        FileStart("doc", "b.txt", "text/plain"),
        FileEnd(),
        FileStart("pic", "p.png", "image/png"),
        FileData(b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        FileEnd(),
    ],
    "crlf-only-data": [
        FileStart("f", "crlf.bin", "application/octet-stream"),
        FileData(b"\r\n" * 50),
        FileEnd(),
        Field("x", "\r\n\r\n"),
    ],
    "single-field": [Field("only", "v")],
}


def test_events_are_exact_including_headers() -> None:
    body = field_part("a", "1") + file_part("f", "x.txt", b"hello", "Text/Plain") + end()
    assert decode([body]) == [
        Field("a", "1", ((("Content-Disposition", 'form-data; name="a"'),))),
        FileStart("f", "x.txt", "text/plain", (
            ("Content-Disposition", 'form-data; name="f"; filename="x.txt"'),
            ("Content-Type", "Text/Plain"),
        )),
        FileData(b"hello"),
        FileEnd(),
    ]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_whole_body(case: str) -> None:
    assert strip_headers(decode([CORPUS[case]])) == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_one_byte_at_a_time(case: str) -> None:
    body = CORPUS[case]
    assert strip_headers(decode(body[i:i + 1] for i in range(len(body)))) == EXPECTED[case]


@pytest.mark.parametrize("size", [2, 3, 5, 7, 13, 64, 4096])
def test_fixed_chunk_sizes(size: int) -> None:
    assert strip_headers(decode(fixed_chunks(CORPUS["mixed"], size))) == EXPECTED["mixed"]


def _boundary_offsets(body: bytes) -> List[int]:
    return [m.start() for m in re.finditer(re.escape(b"--" + BOUNDARY.encode()), body)]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_one_cut_at_every_position_around_each_boundary(case: str) -> None:
    body = CORPUS[case]
    window = len(BOUNDARY) + 8
    for off in _boundary_offsets(body):
        for cut in range(max(0, off - 4), min(len(body), off + window)):
            got = strip_headers(decode(split_at(body, [cut])))
            assert got == EXPECTED[case], f"cut at {cut} (boundary at {off})"


def test_two_cuts_splitting_crlf_and_delimiter() -> None:
    """Every pair of cuts within the CRLF + delimiter of each boundary."""
    body = CORPUS["mixed"]
    for off in _boundary_offsets(body):
        lo, hi = max(0, off - 3), min(len(body), off + len(BOUNDARY) + 5)
        for a in range(lo, hi):
            for b in range(a + 1, hi):
                got = strip_headers(decode(split_at(body, [a, b])))
                assert got == EXPECTED["mixed"], f"cuts at {a}, {b}"


@pytest.mark.parametrize("seed", range(30))
def test_random_chunk_sizes(seed: int) -> None:
    rng = random.Random(seed)
    body = CORPUS["mixed"]
    assert strip_headers(decode(random_chunks(body, rng, max_size=rng.choice([3, 17, 200])))) == EXPECTED["mixed"]


# -- round trips ----------------------------------------------------------------

HYP_BOUNDARY = "hyp0thesis-b0undary"
_bound = HYP_BOUNDARY.encode()
_fragments = st.sampled_from([
    b"\r", b"\n", b"\r\n", b"--", b"\r\n--", b"\r\n-", b"\r\n--" + _bound[:1], b"\r\n--" + _bound[:-1],
    b"--" + _bound, _bound, b"\x00", b"\xff\xfe",
])
# Any bytes but the full delimiter, which no encoder can carry.
_binary = st.lists(st.one_of(_fragments, st.binary(max_size=40)), max_size=8).map(b"".join).filter(
    lambda b: b"\r\n--" + _bound not in b)

_AMBIGUOUS = ("%0D", "%0A", "%22", "%0d", "%0a")


def _header_text(min_size: int) -> st.SearchStrategy[str]:
    # Names are unicode with quotes, backslashes, CR/LF; the encoders escape
    # CR, LF and '"' as %0D %0A %22 (WHATWG), so literal "%22" would be
    # ambiguous and is left out. A leading "X:\" or "\\" is a legacy Windows
    # path that the engine strips to its last component, also left out.
    alphabet = st.one_of(st.characters(blacklist_categories=("Cs", "Cc")), st.sampled_from('"\\\r\n%;= '))
    return st.text(alphabet, min_size=min_size, max_size=24).filter(
        lambda s: not any(a in s for a in _AMBIGUOUS) and s[1:3] != ":\\" and not s.startswith("\\\\"))


_ctype = st.sampled_from(["application/octet-stream", "image/png", "text/plain", "application/x-thing"])
_item = st.one_of(
    st.tuples(st.just("field"), _header_text(1), st.text(max_size=40)),
    st.tuples(st.just("file"), _header_text(1), _header_text(1), _ctype, _binary),
)


def _expected(items: List[Tuple]) -> list:  # type: ignore[type-arg]
    out: list = []  # type: ignore[type-arg]
    for item in items:
        if item[0] == "field":
            out.append(Field(item[1], item[2]))
        else:
            _, name, filename, ctype, data = item
            out.append(FileStart(name, filename, ctype))
            if data:
                out.append(FileData(data))
            out.append(FileEnd())
    return out


def _chunked(body: bytes, data: st.DataObject) -> List[bytes]:
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12), label="cuts")
    if data.draw(st.booleans(), label="bytewise tail"):
        start = data.draw(st.integers(0, len(body)), label="bytewise from")
        cuts += range(start, min(len(body), start + 60))
    return split_at(body, cuts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item, max_size=6), data=st.data())
def test_urllib3_encoded_bodies_decode_exactly(items: List[Tuple], data: st.DataObject) -> None:  # type: ignore[type-arg]
    fields = [(i[1], i[2]) if i[0] == "field" else (i[1], (i[2], i[4], i[3])) for i in items]
    body, ctype = urllib3.encode_multipart_formdata(fields, boundary=HYP_BOUNDARY)
    boundary = parse_boundary(ctype)
    assert strip_headers(decode(_chunked(body, data), boundary)) == _expected(items)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item, max_size=6), data=st.data())
def test_own_encoder_round_trips(items: List[Tuple], data: st.DataObject) -> None:  # type: ignore[type-arg]
    fields = [(i[1], i[2]) for i in items if i[0] == "field"]
    files = [(i[1], i[2], i[3], i[4]) for i in items if i[0] == "file"]
    body, ctype = encode_multipart(fields, files, boundary=HYP_BOUNDARY)
    ordered = [i for i in items if i[0] == "field"] + [i for i in items if i[0] == "file"]
    assert strip_headers(decode(_chunked(body, data), parse_boundary(ctype))) == _expected(ordered)


def test_encoder_picks_a_fresh_boundary_absent_from_the_data() -> None:
    body1, ct1 = encode_multipart([("a", "b")])
    body2, ct2 = encode_multipart([("a", "b")])
    assert ct1 != ct2
    assert decode([body1], parse_boundary(ct1)) == decode([body2], parse_boundary(ct2))


# -- filenames -------------------------------------------------------------------

def _only_filestart(headers: List[str], data: bytes = b"x") -> FileStart:
    events = decode([part(headers, data) + end()])
    assert isinstance(events[0], FileStart), events
    return events[0]


@pytest.mark.parametrize("value, expected", [
    ("UTF-8''%C3%A9t%C3%A9.txt", "été.txt"),
    ("utf-8'en'%E2%82%AC%20rates.pdf", "€ rates.pdf"),
    ("iso-8859-1''caf%E9.txt", "café.txt"),
    ('"UTF-8\'\'quoted%20name.txt"', "quoted name.txt"),
])
def test_filename_star_is_decoded(value: str, expected: str) -> None:
    assert _only_filestart([f'{CD}; name="f"; filename*={value}']).filename == expected


@pytest.mark.parametrize("disposition", [
    f"{CD}; name=\"f\"; filename=\"plain.txt\"; filename*=UTF-8''%C3%A9t%C3%A9.txt",
    f"{CD}; name=\"f\"; filename*=UTF-8''%C3%A9t%C3%A9.txt; filename=\"plain.txt\"",
])
def test_plain_filename_wins_when_both_are_present(disposition: str) -> None:
    assert _only_filestart([disposition]).filename == "plain.txt"


def test_filename_star_inside_a_quoted_name_is_not_a_parameter() -> None:
    name = "x; filename*=UTF-8''evil.php"
    body, ctype = urllib3.encode_multipart_formdata([(name, "hello")], boundary=HYP_BOUNDARY)
    assert strip_headers(decode([body], HYP_BOUNDARY)) == [Field(name, "hello")]


def test_empty_filename_with_empty_body_is_skipped() -> None:
    body = (field_part("a", "1") + part([f'{CD}; name="f"; filename=""', "Content-Type: application/octet-stream"])
            + field_part("b", "2") + end())
    assert strip_headers(decode([body])) == [Field("a", "1"), Field("b", "2")]
    assert strip_headers(decode(body[i:i + 1] for i in range(len(body)))) == [Field("a", "1"), Field("b", "2")]


def test_empty_filename_with_a_body_is_a_text_field() -> None:
    body = part([f'{CD}; name="f"; filename=""'], b"some text") + end()
    assert strip_headers(decode([body])) == [Field("f", "some text")]
    assert strip_headers(decode(body[i:i + 1] for i in range(len(body)))) == [Field("f", "some text")]


def test_field_charset_from_part_content_type() -> None:
    body = part([f'{CD}; name="t"', "Content-Type: text/plain; charset=iso-8859-1"], "café".encode("latin-1")) + end()
    assert strip_headers(decode([body])) == [Field("t", "café")]


# -- malformed bodies ------------------------------------------------------------

@pytest.mark.parametrize("body, words", [
    (part([f"{CD}"], b"x") + end(), "no field name"),
    (part([f'{CD}; name=""'], b"x") + end(), "no field name"),
    (part([f'{CD}; filename="a.txt"'], b"x") + end(), "no field name"),
    (part([f'{CD}; name="a"', f'{CD}; name="b"'], b"x") + end(), "2 Content-Disposition"),
    (part([f'{CD}; name="a"', "Content-Transfer-Encoding: base64"], b"eA==") + end(), "base64"),
    (part([f'{CD}; name="a"; filename="q.bin"', "Content-Transfer-Encoding: quoted-printable"], b"x") + end(),
     "quoted-printable"),
    (part(["Content-Type: text/plain"], b"x") + end(), "Content-Disposition"),
    (part(["Content-Disposition: attachment; name=\"a\""], b"x") + end(), "Content-Disposition"),
    (part([f'{CD}; name="a"'], b"x"), "final boundary"),
    (b"--" + BOUNDARY.encode() + b"\nContent-Disposition: form-data; name=\"a\"\n\nx\n" + end(), "line break"),
    (b"", "before the first part"),
    (b"no boundary in here at all", "final boundary"),
    (field_part("a", "x").replace(b"\r\n\r\n", b"\r\nBad header line\r\n\r\n") + end(), "header"),
])
def test_malformed_bodies(body: bytes, words: str) -> None:
    for chunks in ([body], [body[i:i + 1] for i in range(len(body))]):
        with pytest.raises(MalformedMultipart) as err:
            decode(chunks)
        assert err.value.status == 400 and err.value.code == "malformed_multipart"
        assert words.lower() in err.value.message.lower()


def test_garbage_glued_to_the_first_boundary_is_refused_whole() -> None:
    body = b"garbage" + field_part("a", "x") + end()
    with pytest.raises(MalformedMultipart, match="before the first boundary"):
        decode([body])


def test_garbage_glued_to_the_first_boundary_is_refused_in_any_chunking() -> None:
    body = b"garbage" + field_part("a", "x") + end()
    for size in (1, 2, 3, 5, 7, 20):
        with pytest.raises(MalformedMultipart):
            decode(fixed_chunks(body, size))


def test_body_encoded_for_another_boundary_is_malformed() -> None:
    body = field_part("a", "1", boundary="other") + end("other")
    with pytest.raises(MalformedMultipart):
        decode([body])


@pytest.mark.parametrize("header, words", [
    ("multipart/form-data", "no boundary"),
    ("multipart/form-data; boundary=", "no boundary"),
    ('multipart/form-data; boundary=""', "no boundary"),
    ("multipart/form-data; charset=utf-8", "no boundary"),
    ("text/plain; boundary=abc", "expected multipart/form-data"),
    ("multipart/mixed; boundary=abc", "expected multipart/form-data"),
    ("multipart/form-data; boundary=" + "a" * 200, "invalid multipart boundary"),
    ("multipart/form-data; boundary=caf\u00e9", "invalid multipart boundary"),
    ("multipart/form-data; boundary=ab\x00c", "invalid multipart boundary"),
    ("multipart/form-data; boundary=a\r\nb", "invalid multipart boundary"),
    ("multipart/form-data; boundary=trailing-space ", "no boundary"),
])
def test_missing_or_invalid_boundary(header: str, words: str) -> None:
    if header.endswith("space "):
        # Surrounding whitespace is not part of the value: this one is valid.
        assert parse_boundary(header) == b"trailing-space"
        return
    with pytest.raises(MalformedMultipart) as err:
        parse_boundary(header)
    assert words in err.value.message


@pytest.mark.parametrize("header, boundary", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ('multipart/form-data; boundary="a b:c"', b"a b:c"),
    ("Multipart/Form-Data; charset=utf-8; BOUNDARY=xyz", b"xyz"),
    ("multipart/form-data; boundary=" + "z" * 70, b"z" * 70),
    # Outside RFC 2046's set but sent by real clients (WebTest's "$", long generated ones).
    ("multipart/form-data; boundary=" + "z" * 199, b"z" * 199),
    ("multipart/form-data; boundary=$a$b", b"$a$b"),
])
def test_valid_boundaries(header: str, boundary: bytes) -> None:
    assert parse_boundary(header) == boundary


def test_truncated_at_every_position_is_malformed() -> None:
    body = CORPUS["mixed"]
    complete_at = len(body) - 2  # the CRLF after the final "--" is optional
    for n in range(len(body)):
        if n >= complete_at:
            assert strip_headers(decode([body[:n]])) == EXPECTED["mixed"]
            continue
        dec = MultipartDecoder(BOUNDARY)
        with pytest.raises(MalformedMultipart) as err:
            dec.feed(body[:n])
            dec.close()
        assert "final boundary" in err.value.message or "boundary" in err.value.message, n


def test_missing_final_boundary() -> None:
    body = field_part("a", "1") + file_part("f", "x", b"data")
    with pytest.raises(MalformedMultipart, match="final boundary"):
        decode([body])
    with pytest.raises(MalformedMultipart, match="final boundary"):
        decode([body + b"--" + BOUNDARY.encode()])


def test_small_preamble_and_epilogue_are_ignored() -> None:
    body = b"This is a preamble.\r\n" + field_part("a", "1") + end() + b"epilogue, ignored"
    assert strip_headers(decode([body])) == [Field("a", "1")]


def _preamble_body(extra: int = 1024) -> bytes:
    limit = PREAMBLE_LIMIT + Limits().max_header_size * Limits().max_header_count
    return b"p" * (limit + extra) + b"\r\n" + field_part("a", "1") + end()


def test_preamble_over_the_limit_fed_in_chunks() -> None:
    with pytest.raises(MalformedMultipart, match="no multipart boundary"):
        decode(fixed_chunks(_preamble_body(256 * 1024), 64 * 1024))


def test_preamble_just_over_the_limit_fed_in_chunks() -> None:
    with pytest.raises(MalformedMultipart, match="no multipart boundary"):
        decode(fixed_chunks(_preamble_body(1024), 64 * 1024))


def test_preamble_over_the_limit_fed_at_once() -> None:
    with pytest.raises(MalformedMultipart, match="no multipart boundary"):
        decode([_preamble_body()])


# -- limits -----------------------------------------------------------------------

def _fields(n: int, size: int = 1) -> bytes:
    return b"".join(field_part(f"f{i}", "v" * size) for i in range(n))


def _files(n: int) -> bytes:
    return b"".join(file_part("up", f"{i}.bin", b"d") for i in range(n))


LIMIT_CASES = [
    # id, limits, body, error class, code, limit value, words in the message
    ("max_parts", Limits(max_parts=3), _fields(4) + end(), TooManyParts, "too_many_parts", 3, ["3 parts"]),
    ("max_parts-files", Limits(max_parts=2, max_files=10), _files(3) + end(), TooManyParts, "too_many_parts", 2,
     ["2 parts"]),
    ("max_files", Limits(max_files=2), _files(3) + end(), TooManyFiles, "too_many_files", 2, ["2 files"]),
    ("max_files-zero", Limits(max_files=0), _fields(2) + _files(1) + end(), TooManyFiles, "too_many_files", 0,
     ["0 files"]),
    ("max_field_size", Limits(max_field_size=10), field_part("big", "x" * 11) + end(), FieldTooLarge,
     "field_too_large", 10, ["'big'", "10 bytes"]),
    ("max_form_memory", Limits(max_form_memory=1024, max_field_size=1000), _fields(3, 400) + end(),
     FieldTooLarge, "field_too_large", 1024, ["1.0 KiB"]),
    ("max_header_size-line", Limits(max_header_size=200),
     part([f'{CD}; name="a"', "X-Long: " + "y" * 300], b"x") + end(), HeaderTooLarge, "header_too_large", 200,
     ["200"]),
    ("max_header_size-block", Limits(max_header_size=200),
     part([f'{CD}; name="a"', "X-A: " + "y" * 90, "X-B: " + "y" * 90], b"x") + end(), HeaderTooLarge,
     "header_too_large", 200, ["200"]),
    ("max_header_size-filename", Limits(max_header_size=300),
     file_part("f", "n" * 400 + ".txt", b"x") + end(), HeaderTooLarge, "header_too_large", 300, ["300"]),
    pytest.param("max_header_count", Limits(max_header_count=3),
                 part([f'{CD}; name="a"'] + [f"X-{i}: v" for i in range(3)], b"x") + end(), HeaderTooLarge,
                 "header_too_large", 3, ["3"]),
]


@pytest.mark.parametrize("name, limits, body, cls, code, limit, words", LIMIT_CASES)
def test_limits(name: str, limits: Limits, body: bytes, cls: type, code: str, limit: int, words: List[str]) -> None:
    for chunks in ([body], list(fixed_chunks(body, 1)), list(fixed_chunks(body, 7))):
        with pytest.raises(cls) as err:
            decode(chunks, limits=limits)
        e = err.value
        assert type(e) is cls
        assert e.code == code and e.status == 413
        assert e.limit == limit
        for w in words:
            assert w in e.message, (w, e.message)
        assert e.to_dict()["error"] == {"code": code, "message": e.message, "field": e.field, "limit": limit}


def test_limits_exactly_at_the_edge_pass() -> None:
    limits = Limits(max_parts=4, max_files=2, max_field_size=10, max_form_memory=20)
    body = field_part("a", "x" * 10) + field_part("b", "y" * 10) + _files(2) + end()
    events = decode(fixed_chunks(body, 3), limits=limits)
    assert [type(e) for e in events] == [Field, Field, FileStart, FileData, FileEnd, FileStart, FileData, FileEnd]


def test_field_limit_counts_bytes_not_characters() -> None:
    with pytest.raises(FieldTooLarge):
        decode([field_part("a", "é" * 6) + end()], limits=Limits(max_field_size=11))
    assert decode([field_part("a", "é" * 6) + end()], limits=Limits(max_field_size=12))[0].value == "é" * 6


def test_files_do_not_count_against_field_limits() -> None:
    limits = Limits(max_field_size=10, max_form_memory=10)
    events = decode([file_part("f", "big.bin", b"z" * 10_000) + end()], limits=limits)
    assert events[1] == FileData(b"z" * 10_000)


def test_field_too_large_is_refused_before_the_field_ends() -> None:
    """A huge field is refused while streaming, not after being buffered whole."""
    dec = MultipartDecoder(BOUNDARY, Limits(max_field_size=1000))
    dec.feed(b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\n')
    dec.feed(b"x" * 900)
    with pytest.raises(FieldTooLarge):
        dec.feed(b"x" * 200)


# -- first error kept ---------------------------------------------------------------

@pytest.mark.parametrize("body, limits, cls", [
    (part([f"{CD}"], b"x") + end(), Limits(), MalformedMultipart),
    (_fields(3) + end(), Limits(max_parts=1), TooManyParts),
])
def test_decoder_keeps_its_first_error(body: bytes, limits: Limits, cls: type) -> None:
    dec = MultipartDecoder(BOUNDARY, limits)
    with pytest.raises(cls) as first:
        dec.feed(body)
    assert dec.error is first.value
    for call in (lambda: dec.feed(field_part("ok", "1")), lambda: dec.feed(b"x"), dec.close):
        with pytest.raises(UploadError) as again:
            call()
        assert again.value is first.value


def test_close_error_is_kept_too() -> None:
    dec = MultipartDecoder(BOUNDARY)
    dec.feed(field_part("a", "1"))
    with pytest.raises(MalformedMultipart) as first:
        dec.close()
    with pytest.raises(MalformedMultipart) as again:
        dec.feed(end())
    assert again.value is first.value


def test_data_after_the_end_is_ignored_and_close_is_idempotent() -> None:
    dec = MultipartDecoder(BOUNDARY)
    events = dec.feed(field_part("a", "1") + end())
    assert strip_headers(events) == [Field("a", "1")]
    assert dec.feed(field_part("b", "2") + end()) == []
    assert dec.close() == []
    assert dec.close() == []


def test_format_size_in_messages() -> None:
    assert format_size(10 * 1024 * 1024) == "10.0 MiB"
    with pytest.raises(FieldTooLarge, match=re.escape(format_size(2 * 1024 * 1024))):
        decode([field_part("a", "x" * (2 * 1024 * 1024 + 1)) + end()],
               limits=Limits(max_field_size=2 * 1024 * 1024, max_form_memory=None))


# -- the browsers' header blocks, read without the general loop -----------------------

_DISPOSITIONS = [b' form-data; name="f"; filename="a.bin"', b'form-data; name="f"', b"\tform-data; name=f",
                 b' form-data; name="caf\xc3\xa9"; filename="\xc3\xa9t\xc3\xa9.png"', b"", b" ", b' attachment; name="x"',
                 b' form-data; name="bad\xff"', b' form-data; name="f"; filename="a\rb"']
_SECOND_LINES = [b"Content-Type: image/png", b"Content-Type:image/png", b"Content-Type:\t text/plain; charset=latin-1",
                 b"Content-Type: ", b"Content-Type:", b"content-type: image/png", b"Content-Length: 3",
                 b"Content-Type: caf\xc3\xa9", b"Content-Type: \xff", b" folded", b"X-Extra: 1", b"Content-Type : x"]
# A block never holds an empty line: the parser cuts it at the first CRLF CRLF.
_SEPARATORS = [b"\r\n", b"\n", b"\r", b"\r\n\n", b"\r\r\n"]


def _general_headers(dec: MultipartDecoder, block: bytes) -> object:
    """What the general loop makes of ``block``: its result, or the error it refuses with."""
    try:
        headers = tuple(dec._parse_headers(block))
        disposition, content_type, charset, length = dec._check_headers(headers)
    except UploadError as exc:
        return type(exc), exc.message
    return headers, disposition, content_type, charset, length


@pytest.mark.parametrize("max_header_count", [1, 2, 64])
def test_browser_header_blocks_read_exactly_as_the_general_loop_does(max_header_count: int) -> None:
    dec = MultipartDecoder(BOUNDARY, Limits(max_header_count=max_header_count))
    dec._parts = 1
    blocks = [b"Content-Disposition:" + d for d in _DISPOSITIONS]
    blocks += [first + sep + second for first in blocks for sep in _SEPARATORS for second in _SECOND_LINES]
    blocks += [block + b"\r\nContent-Type: x" for block in blocks[:40]]  # a third line
    two_lines = 0
    for block in blocks:
        quick = dec._browser_headers(block)
        if quick is None:
            continue
        headers, disposition, content_type, charset = quick
        assert _general_headers(dec, block) == (headers, disposition, content_type, charset, None), block
        two_lines += len(headers) == 2
    # It reads what browsers send (a field; a file and its type), and two
    # headers only where the limit allows two.
    for block in (b'Content-Disposition: form-data; name="f"',
                  b'Content-Disposition: form-data; name="f"; filename="a.png"\r\nContent-Type: image/png'):
        assert (dec._browser_headers(block) is not None) is (block.count(b"\r") < max_header_count)
    assert (two_lines > 0) is (max_header_count >= 2)
