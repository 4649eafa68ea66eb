"""Thumbnail benchmark: naive Pillow vs uploadkit's Thumbnailer vs pyvips.

Three thumbnails per image, as a photo site makes them: 150x150 and 200x200
fitted, 400x400 centre-cropped. Images are generated in code (gradients and
shapes plus grain, so they compress like photographs):

* a 24 MP JPEG (6000x4000) and a 100 MP JPEG (12240x8160);
* a 12 MP RGBA PNG (4240x2830).

Variants, each run in a fresh subprocess per measurement so peak memory is the
child's own (its ``VmHWM``):

* ``naive Pillow``: per size, open the file, ``convert("RGB"/"RGBA")``,
  ``thumbnail()`` (or ``ImageOps.fit`` for the crop), encode; the usual code;
* ``uploadkit``: ``Thumbnailer.make(path)``: one decode (JPEG DCT scaling),
  every size from it;
* ``pyvips``: ``pyvips.Image.thumbnail(path, ...)`` per size (libvips'
  shrink-on-load), when ``import pyvips`` works (``apt-get install libvips42``
  and ``pip install pyvips``); otherwise that column says why it is missing.

Wall time is measured inside the child around the work only (not the
interpreter start or imports); the ``import-only`` line gives each variant's
memory floor.

A second table takes today's phone and camera sizes, 24, 50, 100 and 200 MP
JPEGs with EXIF orientation 6 (``--quick``: 24 and 200), and sets the
default ``Thumbnailer()`` beside hand-tuned Pillow: what a careful hand
writes with Pillow alone, ``draft`` to the largest thumbnail's scale,
``exif_transpose``, then ``thumbnail``/``ImageOps.fit`` per size from that one
decode (``Image.MAX_IMAGE_PIXELS = None`` in its process, as it must be for
200 MP). Those photos are built row by row (:func:`tests.support.images.photo_jpeg`:
a 256-row strip of the photo drawing repeated down), so they compress and
decode like photographs while a 200 MP one costs a second to make.

    python benchmarks/bench_imaging.py [--quick] [--repeat N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.abspath(__file__)

SIZES: List[Tuple[int, int, str]] = [(150, 150, "fit"), (200, 200, "fit"), (400, 400, "crop")]

#: name -> (width, height, format)
FULL_IMAGES = {
    "24 MP JPEG": (6000, 4000, "JPEG"),
    "100 MP JPEG": (12240, 8160, "JPEG"),
    "12 MP RGBA PNG": (4240, 2830, "PNG"),
}
QUICK_IMAGES = {
    "6 MP JPEG": (3000, 2000, "JPEG"),
    "24 MP JPEG": (6000, 4000, "JPEG"),
    "3 MP RGBA PNG": (2120, 1415, "PNG"),
}
VARIANTS = ("naive", "uploadkit", "pyvips")
LABELS = {"naive": "naive Pillow", "uploadkit": "uploadkit", "pyvips": "pyvips", "tuned": "hand-tuned Pillow"}

#: name -> (width, height): phone and camera JPEGs, stored landscape, EXIF orientation 6.
PHONE_IMAGES = {
    "24 MP JPEG": (6000, 4000),
    "50 MP JPEG": (8160, 6144),
    "100 MP JPEG": (12240, 8160),
    "200 MP JPEG": (16320, 12240),
}
QUICK_PHONE_IMAGES = {k: PHONE_IMAGES[k] for k in ("24 MP JPEG", "200 MP JPEG")}


# -- the children ----------------------------------------------------------------------


def _naive(path: str) -> int:
    from PIL import Image, ImageOps

    total = 0
    for w, h, mode in SIZES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        alpha = im.mode in ("RGBA", "LA", "P")
        im = im.convert("RGBA" if alpha else "RGB")
        if mode == "crop":
            im = ImageOps.fit(im, (w, h), Image.Resampling.LANCZOS)
        else:
            im.thumbnail((w, h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "PNG" if alpha else "JPEG", **({} if alpha else {"quality": 85}))
        total += len(buf.getvalue())
    return total


def _uploadkit(path: str) -> int:
    from uploadkit.imaging import Thumbnailer, ThumbnailSpec

    t = Thumbnailer([ThumbnailSpec(w, h, mode=m) for w, h, m in SIZES])
    return sum(len(th.data) for th in t.make(path).values())


def _tuned(path: str) -> int:
    """Pillow by a careful hand: one decode, DCT-scaled to what the largest
    thumbnail needs, turned upright, every size from it."""
    import math

    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None  # its own process: 200 MP is a photo, not a bomb
    total = 0
    with Image.open(path) as im:
        width, height = im.size
        need = max(max(w / width, h / height) if mode == "crop" else min(w / width, h / height)
                   for w, h, mode in SIZES)
        im.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
        upright = ImageOps.exif_transpose(im)
    for w, h, mode in SIZES:
        if mode == "crop":
            out = ImageOps.fit(upright, (w, h), Image.Resampling.LANCZOS)
        else:
            out = upright.copy()
            out.thumbnail((w, h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=85)
        total += len(buf.getvalue())
    return total


def _pyvips(path: str) -> int:
    import pyvips  # type: ignore[import-not-found]

    total = 0
    for w, h, mode in SIZES:
        kw: Dict[str, Any] = {"height": h}
        if mode == "crop":
            kw["crop"] = "centre"
        im = pyvips.Image.thumbnail(path, w, **kw)
        suffix = ".png" if im.hasalpha() else ".jpg[Q=85]"
        total += len(im.write_to_buffer(suffix))
    return total


def child(variant: str, path: str) -> None:
    """Run one measurement; print the work's wall time (ms) as JSON."""
    work = {"naive": _naive, "uploadkit": _uploadkit, "pyvips": _pyvips, "tuned": _tuned}[variant]
    if variant == "pyvips":
        import pyvips  # noqa: F401  (imports are outside the timing)
    else:
        import PIL.Image  # noqa: F401
        import uploadkit.imaging  # noqa: F401
    if path == "-":
        print(json.dumps({"ms": 0.0, "bytes": 0, "peak_kib": _peak_kib()}))
        return
    start = time.perf_counter()
    out = work(path)
    ms = (time.perf_counter() - start) * 1000
    print(json.dumps({"ms": ms, "bytes": out, "peak_kib": _peak_kib()}))


def _peak_kib() -> Optional[int]:
    """This process's own peak RSS (Linux ``VmHWM``).

    ``ru_maxrss`` is not used: Linux carries it over from the parent across
    fork and exec, so a child started by a big parent would report the
    parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(variant: str, path: str) -> Tuple[float, float]:
    """(wall ms, peak RSS in KiB) of one run in a fresh process."""
    proc = subprocess.Popen([sys.executable, HERE, "--child", variant, path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {path} failed: {err.decode(errors='replace')[-500:]}")
    result = json.loads(out)
    peak_kib = result["peak_kib"] or usage.ru_maxrss  # ru_maxrss: KiB on Linux, an upper bound
    return result["ms"], float(peak_kib)


# -- the parent -----------------------------------------------------------------------


def make_image(path: str, width: int, height: int, fmt: str) -> None:
    """Draw one test image, in a subprocess so this process stays small."""
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.bench_imaging import _draw; "
            "_draw(%r, %d, %d, %r)" % (os.path.dirname(os.path.dirname(HERE)), path, width, height, fmt))
    subprocess.run([sys.executable, "-c", code], check=True)


def _draw(path: str, width: int, height: int, fmt: str) -> None:
    from tests.support.images import photo, photo_jpeg

    if fmt == "PHONE":
        with open(path, "wb") as f:
            f.write(photo_jpeg(width, height, orientation=6, quality=90))
        return
    im = photo(width, height)
    if fmt == "PNG":
        from PIL import Image

        alpha = Image.radial_gradient("L").resize((width, height)).point(lambda v: 255 - v)
        im.putalpha(alpha)
        im.save(path, "PNG", compress_level=6)
    else:
        im.save(path, "JPEG", quality=90)


def pyvips_status() -> Optional[str]:
    """None when pyvips works, else why not."""
    try:
        subprocess.run([sys.executable, "-c", "import pyvips; pyvips.Image.black(2, 2).avg()"],
                       check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        last = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        return f"pyvips unavailable ({last[0]}); install libvips42 and pyvips to fill this column"
    return None


def phone_table(images: Dict[str, Tuple[int, int]], workdir: str, repeat: int,
                floor: Dict[str, float]) -> None:
    """Today's photo sizes: the default Thumbnailer beside hand-tuned Pillow."""
    from benchmarks import fmt_mib, fmt_ratio, log, md_table, median

    print("### Phone and camera JPEGs: uploadkit's default Thumbnailer vs hand-tuned Pillow\n")
    print("EXIF orientation 6; hand-tuned Pillow: draft to the largest thumbnail, exif_transpose, "
          f"every size from that decode; {repeat} runs per cell, median; peak RSS is the child's VmHWM "
          f"(imports alone: {fmt_mib(floor.get('uploadkit'))})\n")
    rows = []
    for name, (w, h) in images.items():
        path = os.path.join(workdir, f"phone-{w}x{h}.jpg")
        if not os.path.exists(path):
            log(f"[imaging] building {name} ...")
            make_image(path, w, h, "PHONE")
        results: Dict[str, Tuple[float, float]] = {}
        for v in ("tuned", "uploadkit"):
            runs = [measure(v, path) for _ in range(repeat)]
            results[v] = (median([r[0] for r in runs]), max(r[1] for r in runs))
            log(f"[imaging] {name}: {v} {results[v][0]:.0f} ms, {results[v][1] / 1024:.0f} MiB")
        (t_ms, t_kib), (u_ms, u_kib) = results["tuned"], results["uploadkit"]
        rows.append([f"{name} ({w}x{h}, {os.path.getsize(path) / 1e6:.1f} MB)",
                     f"{t_ms:,.0f} ms / {fmt_mib(t_kib)}", f"{u_ms:,.0f} ms / {fmt_mib(u_kib)}",
                     fmt_ratio(t_ms / u_ms), fmt_ratio(u_kib / t_kib)])
    print(md_table(["image", "hand-tuned Pillow (time / peak RSS)", "uploadkit (time / peak RSS)",
                    "time: tuned / uploadkit", "peak RSS: uploadkit / tuned"], rows))
    print("\nA time ratio above 1 means uploadkit is faster; a memory ratio below 1 means it holds less.\n")


def main(argv: Optional[List[str]] = None) -> int:
    from benchmarks import environment_line, fmt_mib, fmt_ratio, log, md_table, median

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    parser.add_argument("--repeat", type=int, default=None, help="runs per variant (default 5, quick 3)")
    parser.add_argument("--workdir", help="where the generated images go (kept if given)")
    args = parser.parse_args(argv)
    images = QUICK_IMAGES if args.quick else FULL_IMAGES
    repeat = args.repeat or (3 if args.quick else 5)
    workdir = args.workdir or tempfile.mkdtemp(prefix="uploadkit-bench-img-")
    os.makedirs(workdir, exist_ok=True)
    vips_problem = pyvips_status()
    variants = [v for v in VARIANTS if v != "pyvips" or vips_problem is None]
    try:
        print(f"## Thumbnails: naive Pillow vs uploadkit vs pyvips ({'quick' if args.quick else 'full'})\n")
        print(environment_line() + f"; {repeat} runs per cell, median; thumbnails "
              + ", ".join(f"{w}x{h} {m}" for w, h, m in SIZES) + "\n")
        if vips_problem:
            print(f"> {vips_problem}\n")
        rows = []
        floor = {v: measure(v, "-")[1] for v in variants}
        rows.append(["(import only)", *[f"- / {fmt_mib(floor[v])}" for v in variants], "", ""])
        verdicts = []
        for name, (w, h, fmt) in images.items():
            path = os.path.join(workdir, f"{w}x{h}.{fmt.lower()}")
            if not os.path.exists(path):
                log(f"[imaging] drawing {name} ...")
                make_image(path, w, h, fmt)
            results: Dict[str, Tuple[float, float]] = {}
            for v in variants:
                runs = [measure(v, path) for _ in range(repeat)]
                results[v] = (median([r[0] for r in runs]), max(r[1] for r in runs))
                log(f"[imaging] {name}: {v} {results[v][0]:.0f} ms, {results[v][1] / 1024:.0f} MiB")
            ours = results["uploadkit"][0]
            vs_naive = results["naive"][0] / ours
            vs_vips = results["pyvips"][0] / ours if "pyvips" in results else None
            size_mb = os.path.getsize(path) / 1e6
            rows.append([f"{name} ({size_mb:.1f} MB)",
                         *[f"{results[v][0]:,.0f} ms / {fmt_mib(results[v][1])}" for v in variants],
                         fmt_ratio(vs_naive), fmt_ratio(vs_vips)])
            verdicts.append((name, vs_naive, vs_vips, results))
        headers = ["image", *[f"{LABELS[v]} (time / peak RSS)" for v in variants],
                   "naive / uploadkit", "pyvips / uploadkit"]
        if "pyvips" not in variants:
            headers = headers[:-1]
            rows = [r[:-1] for r in rows]
        print(md_table(headers, rows))
        print("\nRatios above 1 mean uploadkit is faster. Peak RSS includes the interpreter "
              "and imports (first line).\n")
        for name, vs_naive, vs_vips, results in verdicts:
            mem = results["uploadkit"][1] / 1024
            note = f"- {name}: {vs_naive:.1f}x faster than naive Pillow"
            if vs_vips is not None:
                note += f", {vs_vips:.2f}x pyvips' speed"
            note += f"; peak {mem:.0f} MiB"
            print(note)
        print()
        phone_table(PHONE_IMAGES if not args.quick else QUICK_PHONE_IMAGES, workdir,
                    2 if args.quick else repeat, floor)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
