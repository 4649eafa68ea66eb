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
LABELS = {"naive": "naive Pillow", "uploadkit": "uploadkit", "pyvips": "pyvips"}


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

    t = Thumbnailer([ThumbnailSpec(w, h, mode=m) for w, h, m in SIZES], max_pixels=150_000_000)
    return sum(len(th.data) for th in t.make(path).values())


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
    work = {"naive": _naive, "uploadkit": _uploadkit, "pyvips": _pyvips}[variant]
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
    from tests.support.images import photo

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
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
