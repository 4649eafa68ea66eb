"""sanitize_filename against a table of hostile names, and properties that hold for any name."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploadkit.filenames import FALLBACK, sanitize_filename

HOSTILE = [
    # directory parts, either slash
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
    ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
    ("\\\\server\\share\\f.txt", "f.txt"),
    ("/abs/path.txt", "path.txt"),
    ("a/b\\c.txt", "c.txt"),
    ("dir/", FALLBACK),
    ("dir/..", FALLBACK),
    # dot names
    ("..", FALLBACK),
    (".", FALLBACK),
    ("...", FALLBACK),
    (".hidden", "hidden"),
    ("..hidden.txt", "hidden.txt"),
    # NUL and control characters, C1 controls, DEL
    ("a\x00b.txt", "a_b.txt"),
    ("evil.php\x00.jpg", "evil.php_.jpg"),
    ("tab\there.txt", "tab_here.txt"),
    ("line\nbreak.txt", "line_break.txt"),
    ("cr\rlf.txt", "cr_lf.txt"),
    ("del\x7f.txt", "del_.txt"),
    ("\x85c1.txt", "_c1.txt"),
    ("\x1b[31mred.txt", "_[31mred.txt"),
    # characters Windows forbids
    ('a<b>c:d"e|f?g*h.txt', "a_b_c_d_e_f_g_h.txt"),
    # bidi overrides and invisible characters disguising the extension
    ("photo\u202egnp.exe", "photognp.exe"),
    ("in\u200bvisible.png", "invisible.png"),
    ("\ufeffbom.txt", "bom.txt"),
    ("a\u2066b\u2069.txt", "ab.txt"),
    ("x\u200d\u200c.pdf", "x.pdf"),
    # Windows device names, with and without extensions, any case
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("PRN.tar.gz", "_PRN.tar.gz"),
    ("AUX", "_AUX"),
    ("aux.", "_aux"),
    ("NUL.txt", "_NUL.txt"),
    ("COM1", "_COM1"),
    ("com1.log", "_com1.log"),
    ("LPT1.txt", "_LPT1.txt"),
    ("Lpt9", "_Lpt9"),
    ("COM\u00b9.txt", "_COM\u00b9.txt"),
    ("conin$", "_conin$"),
    ("COM10.txt", "COM10.txt"),  # not a device
    ("CONSOLE.txt", "CONSOLE.txt"),  # not a device
    ("icon.png", "icon.png"),
    # trailing dots and spaces (Windows drops them, changing the name)
    ("trailing. . .", "trailing"),
    ("name.txt.", "name.txt"),
    ("name.txt   ", "name.txt"),
    ("  lead.txt", "lead.txt"),
    ("  spaced   out  .txt", "spaced out .txt"),
    # empty and blank
    ("", FALLBACK),
    ("   ", FALLBACK),
    ("\x00", "_"),
    ("\u202e", FALLBACK),
    # NFC normalization
    ("e\u0301te\u0301.txt", "\u00e9t\u00e9.txt"),
    ("A\u030angstro\u0308m.txt", "\u00c5ngstr\u00f6m.txt"),
    # ordinary unicode names are kept
    ("résumé.pdf", "résumé.pdf"),
    ("日本語ファイル.txt", "日本語ファイル.txt"),
    ("file.tar.gz", "file.tar.gz"),
    ("Straße 2024.jpeg", "Straße 2024.jpeg"),
]


@pytest.mark.parametrize("raw, expected", HOSTILE)
def test_hostile_names(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    pytest.param("CON .txt", "_CON .txt", id="device-then-space"),
    pytest.param("nul  .tar.gz", "_nul .tar.gz", id="device-then-spaces-two-exts"),
])
def test_device_names_followed_by_spaces(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_long_extension_of_a_short_name_is_kept_whole() -> None:
    raw = "x." + "e" * 40
    assert sanitize_filename(raw) == raw


def test_very_long_name_keeps_its_extension() -> None:
    out = sanitize_filename("a" * 300 + ".jpg")
    assert out == "a" * 251 + ".jpg"
    assert len(out.encode()) == 255


def test_very_long_multibyte_name_is_cut_on_a_character_boundary() -> None:
    out = sanitize_filename("é" * 200 + ".png")
    assert out.endswith(".png")
    assert len(out.encode()) <= 255
    assert out == "é" * 125 + ".png"  # 250 bytes of "é", an odd byte left over is dropped


def test_long_name_without_extension() -> None:
    assert sanitize_filename("x" * 300) == "x" * 255


@pytest.mark.parametrize("raw, limit, expected", [
    ("a" * 300 + ".jpg", 20, "a" * 16 + ".jpg"),
    ("é" * 10, 5, "éé"),
    ("short.txt", 100, "short.txt"),
    ("abc.txt", 7, "abc.txt"),
    ("abcd.txt", 7, "abc.txt"),
])
def test_max_length(raw: str, limit: int, expected: str) -> None:
    assert sanitize_filename(raw, limit) == expected


def test_cut_never_ends_in_a_dot_before_the_extension() -> None:
    out = sanitize_filename("ab. . . . . . . . . . .png", 10)
    assert ". ." not in out and out.endswith(".png")


# -- properties -------------------------------------------------------------------

_names = st.lists(st.one_of(
    st.text(max_size=8),
    st.sampled_from(["/", "\\", ".", " ", "\x00", "\u202e", "\u200b", "CON", "nul", "..", ".txt", "é", "e\u0301"]),
), max_size=60).map("".join)


def _check(out: str, max_length: int) -> None:
    assert out
    assert "/" not in out and "\\" not in out and "\x00" not in out
    assert not any(unicodedata.category(c) == "Cc" for c in out), repr(out)
    assert out not in (".", "..")
    assert len(out.encode("utf-8", "surrogatepass")) <= max_length
    assert not out.endswith((".", " "))
    assert out == unicodedata.normalize("NFC", out) or len(out.encode("utf-8", "surrogatepass")) == max_length


# From 40 bytes up the fallback stem plus the longest kept extension always fits;
# below that, see the small-limit test after this one.
@settings(max_examples=400, deadline=None)
@given(raw=_names, max_length=st.integers(40, 300))
def test_properties_hold_for_any_name(raw: str, max_length: int) -> None:
    _check(sanitize_filename(raw, max_length), max_length)


def test_fallback_stem_respects_a_small_max_length() -> None:
    out = sanitize_filename("\U00010000.txt0", 8)
    assert len(out.encode()) <= 8 and out.endswith(".txt0")


@settings(max_examples=200, deadline=None)
@given(raw=_names)
def test_sanitizing_is_idempotent_for_default_length(raw: str) -> None:
    once = sanitize_filename(raw)
    assert sanitize_filename(once) == once


@settings(max_examples=200, deadline=None)
@given(stem=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zs", "Zl", "Zp"),
                                  blacklist_characters='/\\.<>:"|?*'), min_size=1, max_size=400),
       ext=st.sampled_from(["jpg", "png", "tar", "pdf"]))
def test_extension_survives_truncation(stem: str, ext: str) -> None:
    out = sanitize_filename(f"{stem}.{ext}", 64)
    assert out.endswith("." + ext)
    assert len(out.encode()) <= 64


@settings(max_examples=500, deadline=None)
@given(raw=st.text(st.sampled_from("abcXYZ019_-. /\\:conCONnulLPT1"), max_size=40),
       max_length=st.integers(1, 60))
def test_the_plain_name_shortcut_agrees_with_the_full_rules(raw: str, max_length: int) -> None:
    from uploadkit.filenames import _sanitize

    assert sanitize_filename(raw, max_length) == _sanitize(raw, max_length)
