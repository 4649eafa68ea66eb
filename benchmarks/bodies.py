"""Deterministic request bodies for the benchmarks, written to disk once per run.

Every tool parses the very same bytes from the very same file, so the figures
compare parsers, not inputs. Contents come from a seeded PRNG
(``random.Random(seed).randbytes``): reproducible across runs and machines,
and not all zeros, so no layer (page cache compression, a parser's fast path
for runs of equal bytes, a sniffer) gets an unrealistic shortcut.

Beside each body a small JSON file records what it holds (field names, file
sizes and sha256), so a benchmark child can check that a tool did the whole
job, and streaming-form-data can register its targets up front.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

KiB = 1024
MiB = 1024 * KiB
#: Shaped like a browser's boundary; fixed so bodies are byte-for-byte reproducible.
BOUNDARY = "----uploadkitBenchFormBoundaryq7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
SEED = 20240229
_WRITE_CHUNK = 1 * MiB  # big files are generated and hashed in pieces: constant memory


@dataclass(frozen=True)
class BodySpec:
    """What a body holds: ``fields`` short text fields, then ``files`` files of ``file_size`` bytes."""

    key: str
    files: int = 0
    file_size: int = 0
    fields: int = 0

    @property
    def label(self) -> str:
        parts = []
        if self.files:
            parts.append(f"{self.files:,} x {_size_label(self.file_size)} file{'s' if self.files > 1 else ''}")
        if self.fields:
            parts.append(f"{self.fields:,} text fields")
        return " + ".join(parts) or "empty"


@dataclass
class FilePart:
    name: str
    filename: str
    size: int
    sha256: str


@dataclass
class Body:
    """A body on disk and its description."""

    key: str
    label: str
    path: str
    content_type: str
    boundary: str
    size: int
    field_names: List[str] = field(default_factory=list)
    #: Sum of the text fields' values, in bytes (a cheap completeness check).
    field_bytes: int = 0
    files: List[FilePart] = field(default_factory=list)

    @property
    def parts(self) -> int:
        return len(self.field_names) + len(self.files)

    @property
    def meta_path(self) -> str:
        return self.path + ".json"

    def save_meta(self) -> None:
        with open(self.meta_path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, meta_path: str) -> "Body":
        with open(meta_path, encoding="utf-8") as f:
            raw = json.load(f)
        raw["files"] = [FilePart(**p) for p in raw["files"]]
        return cls(**raw)


def _size_label(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def standard_specs(quick: bool = False, big_size: Optional[int] = None) -> List[BodySpec]:
    """The three bodies of the parser comparison. ``quick`` shrinks only the big file:
    the other two are small already and their per-part costs are the point."""
    if big_size is None:
        big_size = 64 * MiB if quick else 256 * MiB
    return [
        BodySpec("big", files=1, file_size=big_size),
        BodySpec("files", files=500, file_size=64 * KiB),
        BodySpec("fields", fields=5000),
    ]


def write_body(directory: str, spec: BodySpec, seed: int = SEED) -> Body:
    """Write ``spec`` as a multipart body into ``directory``; return its description."""
    rng = random.Random(f"{seed}:{spec.key}")
    path = os.path.join(directory, f"body-{spec.key}.bin")
    sep = b"--" + BOUNDARY.encode("ascii")
    body = Body(key=spec.key, label=spec.label, path=path, content_type=CONTENT_TYPE,
                boundary=BOUNDARY, size=0)
    with open(path, "wb") as out:
        buf: List[bytes] = []
        for i in range(spec.fields):
            name = f"field{i:05d}"
            # 8..118 characters of hex text: the size of a typical form value.
            value = rng.randbytes(rng.randrange(4, 60)).hex().encode("ascii")
            buf += [sep, b"\r\n", b'Content-Disposition: form-data; name="', name.encode("ascii"),
                    b'"\r\n\r\n', value, b"\r\n"]
            body.field_names.append(name)
            body.field_bytes += len(value)
        out.write(b"".join(buf))
        for i in range(spec.files):
            name, filename = f"file{i:04d}", f"upload-{i:04d}.bin"
            out.write(sep + b"\r\n" + (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode("ascii"))
            digest = hashlib.sha256()
            left = spec.file_size
            while left > 0:
                piece = rng.randbytes(min(left, _WRITE_CHUNK))
                digest.update(piece)
                out.write(piece)
                left -= len(piece)
            out.write(b"\r\n")
            body.files.append(FilePart(name, filename, spec.file_size, digest.hexdigest()))
        out.write(sep + b"--\r\n")
    body.size = os.path.getsize(path)
    body.save_meta()
    return body


def write_bodies(directory: str, specs: List[BodySpec], seed: int = SEED) -> Dict[str, Body]:
    return {spec.key: write_body(directory, spec, seed) for spec in specs}


def write_payload(directory: str, size: int, seed: int = SEED) -> str:
    """A raw file of ``size`` PRNG bytes (what a client uploads in the end-to-end run)."""
    rng = random.Random(f"{seed}:payload:{size}")
    path = os.path.join(directory, f"payload-{_size_label(size).replace(' ', '')}.bin")
    with open(path, "wb") as out:
        left = size
        while left > 0:
            piece = rng.randbytes(min(left, _WRITE_CHUNK))
            out.write(piece)
            left -= len(piece)
    return path


if __name__ == "__main__":  # pragma: no cover - a manual check of the generator
    import sys
    import tempfile

    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="uploadkit-bodies-")
    for b in write_bodies(target, standard_specs(quick="--quick" in sys.argv)).values():
        print(f"{b.label:<28} {b.size:>12,} bytes  {b.parts:>5} parts  {b.path}")
