"""What a file really is, from its first bytes, and whether its name agrees.

Pure functions: :func:`sniff` asks ``filetype`` (magic numbers in the first
8 KiB); :func:`check_type` applies ``Limits.allowed_types``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import mimetypes
import textwrap
from typing import Any, Dict, FrozenSet, List, Optional, Protocol, Tuple

import filetype

from .limits import Limits

log = logging.getLogger("uploadkit")

class FileInfoLike(Protocol):
    @property
    def filename(self) -> str: ...
    @property
    def extension(self) -> str: ...
    @property
    def declared_type(self) -> str: ...


#: Bytes the sniffer looks at: filetype reads at most 8 KiB.
HEAD_SIZE = 8192

# Built-in tables only: the system's /etc/mime.types differs between machines.
_mimes = mimetypes.MimeTypes()

#: Types the sniffer can recognise: a file declared as one of these whose bytes
#: match none is lying about its type.
SNIFFABLE = frozenset(k.mime for k in filetype.TYPES) - {"application/octet-stream"}  # EOT fonts claim it

_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-icon": "image/vnd.microsoft.icon",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "video/x-m4v": "video/mp4",
    "application/x-zip-compressed": "application/zip",
    "image/x-ms-bmp": "image/bmp",
    "application/x-pdf": "application/pdf",
}

#: Extensions a web server or browser may execute or render as active content:
#: refused whatever the bytes say when types are restricted.
ACTIVE_EXTENSIONS = frozenset(
    ".php .php3 .php4 .php5 .php7 .phtml .phar .pht .html .htm .xhtml .shtml .xht "
    ".svg .svgz .xml .xsl .js .mjs .cjs .jsp .jspx .asp .aspx .cer .asa .cgi .pl .py "
    ".rb .sh .bash .exe .dll .bat .cmd .com .scr .msi .hta .vbs .vbe .wsf .ps1 .jar "
    ".htaccess .swf".split()
)

# filetype names one extension per type; these are the other spellings people use.
_EXTRA_EXTENSIONS = {
    "image/jpeg": {".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp"},
    "image/tiff": {".tif", ".tiff"},
    "image/heic": {".heic", ".heif"},
    "image/heif": {".heif", ".heic"},
    "video/mp4": {".mp4", ".m4v"},
    "audio/mpeg": {".mp3", ".mpga"},
    "video/quicktime": {".mov", ".qt"},
    "application/gzip": {".gz", ".tgz"},
    "application/x-tar": {".tar"},
    "audio/mp4": {".m4a", ".mp4"},
    "image/vnd.microsoft.icon": {".ico"},
    "audio/ogg": {".ogg", ".oga", ".opus"},
    "video/ogg": {".ogv", ".ogg"},
}


def normalize_type(content_type: str) -> str:
    """``'Image/JPG; q=1'`` -> ``'image/jpeg'``."""
    t = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(t, t)


# Matchers that can only match bytes starting with a given magic, but look
# through kilobytes first: the office/OpenDocument ones search 6 KB for a ZIP
# header they then require at offset 0, the EBML ones search the whole head.
_ZIP_MAGIC = b"PK\x03\x04"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_ZIP_DOCUMENTS = frozenset([
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.oasis.opendocument.text",
    "application/vnd.oasis.opendocument.spreadsheet",
    "application/vnd.oasis.opendocument.presentation",
])
_EBML_TYPES = frozenset(["video/webm", "video/x-matroska"])


#: A gate: (offset, byte) pairs, one of which a matcher needs to hold
#: (``buf[offset] == byte``) before it can match; None: no gate is known.
Gate = Optional[FrozenSet[Tuple[int, int]]]


def _offset(node: ast.expr, names: Dict[str, Any]) -> Optional[int]:
    """A subscript's index when it is a constant: a number, a class constant
    such as ``Dcm.OFFSET``, or such a constant plus a number."""
    if isinstance(node, ast.Constant):
        value = node.value
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        value = getattr(names.get(node.value.id), node.attr, None)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _offset(node.left, names), _offset(node.right, names)
        value = None if left is None or right is None else left + right
    else:
        return None
    return value if type(value) is int and value >= 0 else None


def _pairs(expr: ast.expr, names: Dict[str, Any]) -> Gate:
    """A gate that must hold for ``expr`` to be true, or None when its shape
    does not tell."""
    if isinstance(expr, ast.BoolOp):
        gates = [_pairs(v, names) for v in expr.values]
        if isinstance(expr.op, ast.And):
            # Every operand must hold: any one's gate will do. The cheapest to
            # check is one on the first byte, then the one with fewest pairs.
            known = [g for g in gates if g is not None]
            return min(known, key=lambda g: (any(o for o, _ in g), len(g))) if known else None
        if any(g is None for g in gates):
            return None
        return frozenset().union(*gates)  # type: ignore[arg-type]
    if isinstance(expr, ast.Compare) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq):
        left, right = expr.left, expr.comparators[0]
        if not (isinstance(left, ast.Subscript) and isinstance(left.value, ast.Name) and left.value.id == "buf"):
            return None
        index = left.slice
        if not isinstance(index, ast.Slice):  # buf[k] == byte
            offset = _offset(index, names)
            if offset is not None and isinstance(right, ast.Constant) and type(right.value) is int:
                return frozenset([(offset, right.value)])
            return None
        # buf[a:b] == b"..." or == bytearray([x, ...]): equal only if buf[a] is the first.
        offset = 0 if index.lower is None else _offset(index.lower, names)
        if offset is None or index.step is not None or index.upper is None:
            return None
        first = _first_of(right)
        return None if first is None else frozenset([(offset, first)])
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "startswith" \
            and isinstance(expr.func.value, ast.Name) and expr.func.value.id == "buf" and len(expr.args) == 1 \
            and not expr.keywords:
        first = _first_of(expr.args[0])
        return None if first is None else frozenset([(0, first)])
    return None


def _first_of(node: ast.expr) -> Optional[int]:
    """The first byte of a literal ``b"..."`` or ``bytearray([x, ...])``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and node.value:
        return node.value[0]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bytearray" \
            and len(node.args) == 1 and isinstance(node.args[0], ast.List) and node.args[0].elts \
            and isinstance(node.args[0].elts[0], ast.Constant) and type(node.args[0].elts[0].value) is int:
        return int(node.args[0].elts[0].value)
    return None


def _match_body(kind: Any) -> Optional[List[ast.stmt]]:
    """The statements of a filetype matcher's own ``match`` (docstring left
    out), or None when it has no source of its own at hand."""
    fn = type(kind).__dict__.get("match")
    if fn is None:
        return None
    try:
        func = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    if not isinstance(func, ast.FunctionDef):
        return None
    return [st for st in func.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]


def _is_false(st: ast.stmt) -> bool:
    return isinstance(st, ast.Return) and isinstance(st.value, ast.Constant) and st.value.value is False


def _gate(kind: Any) -> Gate:
    """The gate of a filetype matcher, read from its source. Three shapes are
    read: a single ``return <test>``; ``if <test>: ...`` then ``return
    False``; and ``if <test>: buf = buf[k:]`` then ``return <test2>`` (skip a
    byte-order mark), which needs one of the two tests' gates. Anything else,
    or no source at hand: None (always run). Reading the matchers instead of
    copying their magic numbers keeps us right when filetype changes."""
    body = _match_body(kind)
    if body is None:
        return None
    names = type(kind).match.__globals__
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return _pairs(body[0].value, names)
    if len(body) != 2 or not isinstance(body[0], ast.If) or body[0].orelse:
        return None
    test, then, last = body[0].test, body[0].body, body[1]
    if _is_false(last):
        return _pairs(test, names)
    if isinstance(last, ast.Return) and last.value is not None and len(then) == 1 \
            and isinstance(then[0], ast.Assign) and len(then[0].targets) == 1 \
            and isinstance(then[0].targets[0], ast.Name) and then[0].targets[0].id == "buf" \
            and isinstance(then[0].value, ast.Subscript) and isinstance(then[0].value.value, ast.Name) \
            and then[0].value.value.id == "buf":
        skipped, rest = _pairs(test, names), _pairs(last.value, names)
        return None if skipped is None or rest is None else skipped | rest
    return None


def _needs_ftyp(kind: Any) -> bool:
    """True for an ISO base media matcher that opens with
    ``if not self._is_isobmff(buf): return False`` (an ``ftyp`` box at 4)."""
    body = _match_body(kind)
    if not body or not isinstance(body[0], ast.If):
        return False
    test, then = body[0].test, body[0].body
    return (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(test.operand, ast.Call)
            and isinstance(test.operand.func, ast.Attribute) and test.operand.func.attr == "_is_isobmff"
            and getattr(type(kind), "_is_isobmff", None) is _IS_ISOBMFF
            and len(then) == 1 and isinstance(then[0], ast.Return)
            and isinstance(then[0].value, ast.Constant) and then[0].value.value is False)


try:  # the helper our ftyp test stands in for
    from filetype.types.isobmff import IsoBmff as _IsoBmff
    _IS_ISOBMFF: Any = _IsoBmff._is_isobmff
except (ImportError, AttributeError):  # pragma: no cover - another filetype layout
    _IS_ISOBMFF = object()

def fingerprint(kind: Any) -> str:
    """A digest of a matcher's compiled code and of the class constants it can
    name (``Dcm.OFFSET``): equal digests, equal behaviour."""
    fn = type(kind).match
    code = fn.__code__
    constants = []
    for name in code.co_names:
        named = fn.__globals__.get(name)
        if isinstance(named, type):
            constants.append((name, sorted((k, v) for k, v in vars(named).items() if type(v) in (int, bytes))))
    return hashlib.sha256(repr((code.co_code, code.co_consts, code.co_names, constants)).encode()).hexdigest()[:16]


StoredGate = Tuple[str, Optional[Tuple[Tuple[int, int], ...]], bool]


def derive_gates() -> Dict[str, StoredGate]:
    """Every matcher's gate, read from filetype's source (tens of milliseconds):
    what :mod:`uploadkit._magic_gates` stores, keyed by the matcher's class."""
    table = {}
    for kind in filetype.TYPES:
        gate = _gate(kind)
        table[_class_key(kind)] = (fingerprint(kind), None if gate is None else tuple(sorted(gate)),
                                   _needs_ftyp(kind))
    return table


def _class_key(kind: Any) -> str:
    return f"{type(kind).__module__}.{type(kind).__qualname__}"


def _load_gates() -> Dict[int, Tuple[Gate, bool]]:
    """Gates from the stored table where the matcher's code is the one it was
    read from; read afresh from the source for any other (a newer filetype)."""
    from ._magic_gates import GATES

    out: Dict[int, Tuple[Gate, bool]] = {}
    for kind in filetype.TYPES:
        stored = GATES.get(_class_key(kind))
        if stored is not None and stored[0] == fingerprint(kind):
            out[id(kind)] = (None if stored[1] is None else frozenset(stored[1]), stored[2])
        else:
            out[id(kind)] = (_gate(kind), _needs_ftyp(kind))
    return out


#: Checks made before a matcher runs: (offset, bytes) pairs, one of which must
#: hold (``head[offset] in bytes``); None: run it.
_Checks = Optional[Tuple[Tuple[int, FrozenSet[int]], ...]]

#: (first byte, ZIP magic, EBML magic, ftyp box) -> the matchers that can match,
#: in filetype's order, each with the checks its gate needs beyond the first
#: byte; filled for all 256 first bytes on the first sniff.
_CANDIDATES: Dict[Tuple[int, bool, bool, bool], Tuple[Tuple[Any, _Checks], ...]] = {}


def _later_checks(gate: FrozenSet[Tuple[int, int]]) -> Tuple[Tuple[int, FrozenSet[int]], ...]:
    """The pairs of ``gate`` past the first byte, grouped by offset."""
    later: Dict[int, set[int]] = {}
    for offset, value in gate:
        if offset:
            later.setdefault(offset, set()).add(value)
    return tuple((offset, frozenset(values)) for offset, values in sorted(later.items()))


# -- filetype's Zstd matcher, without its recursion ------------------------------

#: A digest of the source of the filetype Zstd class :func:`_zstd_match`
#: follows (filetype 1.2.0): the source, not the bytecode, so that it holds on
#: every Python. Another Zstd class runs as it is, like every other matcher.
_ZSTD_SOURCE = "fe8519a87317ee04"
_ZSTD_SKIPPABLE = 0x184D2A50

#: The bytes :func:`_zstd_match` needs first: a Zstandard frame's magic
#: (0xFD2FB522 to 0xFD2FB528, little-endian) or a skippable frame's
#: (0x184D2A50 to 0x184D2A5F).
_ZSTD_GATE = frozenset([(0, b) for b in range(0x22, 0x29)] + [(0, b) for b in range(0x50, 0x60)])


def _zstd_match(buf: bytes) -> bool:
    """filetype's Zstd answer, walking skippable frames with a loop.

    filetype's matcher calls itself once for each skippable frame, so a head
    of 8-byte empty frames (1,024 of them in 8 KiB) ran out of stack, and any
    upload that started so was an internal error.
    """
    pos, size = 0, len(buf)
    while True:
        if size - pos > 3 and 0x22 <= buf[pos] <= 0x28 and buf[pos + 1:pos + 4] == b"\xb5\x2f\xfd":
            return True
        if size - pos < 8 or int.from_bytes(buf[pos:pos + 4], "little") & 0xFFFFFFF0 != _ZSTD_SKIPPABLE:
            return False
        frame = 8 + int.from_bytes(buf[pos + 4:pos + 8], "little")
        if size - pos < frame:
            return False
        pos += frame


class _StandIn:
    """A matcher of ours in a filetype matcher's place: same type, same answers."""

    def __init__(self, kind: Any, match: Any) -> None:
        self.mime = kind.mime
        self.match = match


def _source_digest(cls: type) -> Optional[str]:
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def _stand_in(kind: Any, gate: Gate) -> Tuple[Any, Gate]:
    if _class_key(kind) == "filetype.types.archive.Zstd" and _source_digest(type(kind)) == _ZSTD_SOURCE:
        return _StandIn(kind, _zstd_match), _ZSTD_GATE
    return kind, gate


def _build_candidates() -> None:
    gates = _load_gates()
    table: Dict[Tuple[int, bool, bool, bool], List[Tuple[Any, _Checks]]] = {
        (b, z, e, f): [] for b in range(256) for z in (False, True) for e in (False, True) for f in (False, True)
        if (not z or b == _ZIP_MAGIC[0]) and (not e or b == _EBML_MAGIC[0])}
    for kind in filetype.TYPES:
        gate, isobmff = gates[id(kind)]
        kind, gate = _stand_in(kind, gate)
        needs_zip = kind.mime in _ZIP_DOCUMENTS
        needs_ebml = kind.mime in _EBML_TYPES
        if needs_zip:
            gate = frozenset([(0, _ZIP_MAGIC[0])])
        elif needs_ebml:
            gate = frozenset([(0, _EBML_MAGIC[0])])
        later = () if gate is None else _later_checks(gate)
        for b in range(256):
            # Run it outright when the first byte passes its gate (or it has
            # none); else only when a later byte can pass.
            checks: _Checks = None if gate is None or (0, b) in gate else later
            if checks == ():
                continue
            for zipped in (False, True) if b == _ZIP_MAGIC[0] else (False,):
                for ebml in (False, True) if b == _EBML_MAGIC[0] else (False,):
                    if (needs_zip and not zipped) or (needs_ebml and not ebml):
                        continue
                    entry = (kind, checks)
                    if not isobmff:
                        table[b, zipped, ebml, False].append(entry)
                    table[b, zipped, ebml, True].append(entry)
    _CANDIDATES.update((key, tuple(kinds)) for key, kinds in table.items())


def sniff(head: bytes) -> Optional[str]:
    """The MIME type the bytes declare by their magic number, or None.

    The same answer as ``filetype.guess(head)``, about ten times faster on bytes
    that match nothing: a matcher runs only when the bytes at the offsets it
    tests first (read from its code) can pass. Where a matcher fails on the
    bytes instead of answering, it counts as no match: the client's bytes
    must not turn into a server error.
    """
    if not head:
        return None
    if len(head) > HEAD_SIZE:
        head = head[:HEAD_SIZE]
    size = len(head)
    zipped = head.startswith(_ZIP_MAGIC)
    ebml = head.startswith(_EBML_MAGIC)
    ftyp = head.startswith(b"ftyp", 4)
    if not _CANDIDATES:
        _build_candidates()
    for kind, checks in _CANDIDATES[head[0], zipped, ebml, ftyp]:
        if checks is not None:
            for offset, values in checks:
                if offset < size and head[offset] in values:
                    break
            else:
                continue
        try:
            matched = kind.match(head)
        except Exception:
            log.debug("uploadkit: the %s matcher failed on a file's first bytes", type(kind).__name__,
                      exc_info=True)
            continue
        if matched:
            mime: str = kind.mime
            return _ALIASES.get(mime, mime)
    return None


def extensions_for(mime: str) -> set[str]:
    exts = set(_mimes.guess_all_extensions(mime, strict=False))
    kind = filetype.get_type(mime=mime)
    if kind is not None:
        exts.add("." + kind.extension)
    return exts | _EXTRA_EXTENSIONS.get(mime, set())


def extension_type(ext: str) -> Optional[str]:
    """The type an extension claims, from the built-in tables, or None if unknown."""
    if not ext:
        return None
    t, _ = _mimes.guess_type("x" + ext, strict=False)
    if t:
        return normalize_type(t)
    kind = next((k for k in filetype.TYPES if "." + k.extension == ext), None)
    return kind.mime if kind else None


def check_type(info: FileInfoLike, sniffed: Optional[str], limits: Limits) -> Optional[str]:
    """Why the file's type is refused, or None when it is acceptable.

    Only applies when ``limits.allowed_types`` is set: then the sniffed type must
    be allowed; a file declared as a type the sniffer knows must match it; and
    the extension must neither name active content nor contradict the bytes.
    """
    if limits.allowed_types is None:
        return None
    name = info.filename
    ext = info.extension
    declared = normalize_type(info.declared_type)
    if ext in ACTIVE_EXTENSIONS:
        return f"file {name!r}: the extension {ext!r} is never accepted here"
    if sniffed is None:
        if declared in SNIFFABLE:
            return (f"file {name!r} is declared as {declared} but its bytes are not;"
                    " it may be corrupt or mislabelled")
        claimed = extension_type(ext)
        if claimed in SNIFFABLE:
            return f"file {name!r} is named {ext} but its bytes are not {claimed}"
        effective = declared or claimed or "application/octet-stream"
        if not limits.allows_type(effective):
            return f"file {name!r} is {effective}, which is not an allowed type"
        return None
    if not limits.allows_type(sniffed):
        return f"file {name!r} is {sniffed}, which is not an allowed type"
    if ext and ext not in extensions_for(sniffed):
        claimed = extension_type(ext)
        if claimed is not None and claimed != sniffed:
            return f"file {name!r} is {sniffed} but its name says {claimed}"
    return None



def render_gates_module() -> str:
    """The text of :mod:`uploadkit._magic_gates` for the installed filetype."""
    import sys

    lines = [
        '"""Gates of filetype\'s matchers, read from its source by',
        "``uploadkit.sniffing.derive_gates()``. Generated: when filetype changes, run",
        "``python tools/magic_gates.py > uploadkit/_magic_gates.py``. Each entry: the",
        "fingerprint of the matcher's code it was read from, its gate (the (offset,",
        "byte) pairs one of which must hold before it can match; None: always run it),",
        "and whether it needs an ISO ``ftyp`` box. A matcher whose code differs from",
        'its fingerprint is read afresh, so a stale table is slow, never wrong."""',
        "",
        "from typing import Dict, Optional, Tuple",
        "",
        f"#: Read from filetype {filetype.__version__} on Python {sys.version_info[0]}.{sys.version_info[1]}.",
        "GATES: Dict[str, Tuple[str, Optional[Tuple[Tuple[int, int], ...]], bool]] = {",
    ]
    lines += [f"    {key!r}: {value!r}," for key, value in derive_gates().items()]
    return "\n".join(lines + ["}", ""])

