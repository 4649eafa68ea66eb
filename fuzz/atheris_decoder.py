"""Coverage-guided fuzzing of the multipart decoder with atheris (libFuzzer).

The property is the one tests/test_fuzz.py checks with hypothesis: whatever the
bytes and however they are cut into chunks, the decoder either yields events or
raises an UploadError carrying a 4xx status; any other exception is a bug.

    pip install atheris
    python fuzz/atheris_decoder.py -max_total_time=600 fuzz/corpus

The first input byte picks the chunk size, the next up to 70 bytes the
boundary (up to the first NUL), the rest is the body. Seed the corpus with the
captured bodies from tests/data (see fuzz/README.md).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from uploadkit.errors import UploadError
    from uploadkit.limits import Limits
    from uploadkit.multipart import MultipartDecoder

LIMITS = Limits(max_field_size=4096, max_form_memory=16384, max_parts=64, max_files=16)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    chunk = data[0] + 1
    boundary, sep, body = data[1:72].partition(b"\0")
    if not sep:
        boundary, body = data[1:9], data[9:]
    else:
        body = body + data[72:]
    boundary = bytes(b for b in boundary if 32 < b < 127) or b"x"
    try:
        decoder = MultipartDecoder(boundary, LIMITS)
        for i in range(0, len(body), chunk):
            decoder.feed(body[i:i + chunk])
        decoder.close()
    except UploadError as exc:
        if not 400 <= exc.status < 500:
            raise AssertionError(f"refusal with status {exc.status}: {exc!r}") from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
