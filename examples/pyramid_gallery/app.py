"""A photo gallery on Pyramid, with thumbnails, stored on S3 through fsspec:

    python examples/pyramid_gallery/app.py                # http://127.0.0.1:8004/

Settings are read from ``gallery.ini`` beside this file (``--config`` names
another); ``--set key=value`` overrides one. Photos go to S3 when
``uploadkit.storage`` names a bucket, which needs an S3 endpoint, for example::

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... python examples/pyramid_gallery/app.py \\
        --set uploadkit.storage=s3://my-gallery/photos \\
        --set uploadkit.storage.storage_options.endpoint_url=http://127.0.0.1:9000

Without it they go to a local directory (``gallery.local_dir``), so the one
command above works with no S3 at all.

Routes: ``GET /`` the gallery page (an upload form with a progress bar, a grid
of thumbnails); ``POST /upload`` (field ``photo``, several at once) redirects
back to the gallery, or answers JSON ``{"photos": [...]}`` with
``Accept: application/json``; ``GET /api/photos`` the list as JSON;
``GET /media/<key>`` the stored files. Options: ``--port`` (0 picks a free one;
the URL is printed first), ``--host``.
"""

from __future__ import annotations

import argparse
import configparser
import html
import os
import re
import sys
import tempfile
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.request import Request
from pyramid.response import Response
from pyramid.wsgi import wsgiapp2

from uploadkit.contrib.pyramid import REGISTRY_KEY, engine_of

HERE = os.path.dirname(os.path.abspath(__file__))
_THUMB = re.compile(r"(?P<stem>.+)\.(?P<size>[1-9][0-9]*x[1-9][0-9]*)\.[a-z0-9]+")


def read_settings(path: str, overrides: Optional[List[str]] = None) -> Dict[str, str]:
    """The ``[app:main]`` section of an ini file (``%(here)s`` is its directory), then ``overrides``."""
    parser = configparser.ConfigParser(defaults={"here": os.path.dirname(os.path.abspath(path))})
    if not parser.read(path):
        raise SystemExit(f"cannot read the settings file {path!r}")
    settings = {k: v for k, v in parser.items("app:main") if k != "here"}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set takes key=value, not {item!r}")
        settings[key.strip()] = value.strip()
    if not settings.get("uploadkit.storage"):
        local = settings.get("gallery.local_dir") or os.path.join(tempfile.gettempdir(), "uploadkit-gallery")
        os.makedirs(local, exist_ok=True)
        settings["uploadkit.storage"] = "file://" + os.path.abspath(local)
    return settings


def photos(storage: Any) -> List[Dict[str, Any]]:
    """The originals in storage, each with its thumbnails, newest first."""
    fs, root = storage.fs, storage.root
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    names = {e["name"].rstrip("/").rpartition("/")[2]: e for e in entries if e.get("type") == "file"}
    thumbs: Dict[str, Dict[str, str]] = {}
    for name in names:
        m = _THUMB.fullmatch(name)
        if m:
            thumbs.setdefault(m.group("stem"), {})[m.group("size")] = storage.url(name)
    out = []
    for name, entry in names.items():
        if _THUMB.fullmatch(name) or name.startswith("."):
            continue
        stem = name.rsplit(".", 1)[0]
        out.append({"key": name, "url": storage.url(name), "size": entry.get("size"),
                    "modified": _modified(entry),
                    "thumbnails": thumbs.get(stem, {})})
    return sorted(out, key=lambda p: p["modified"], reverse=True)


def _modified(entry: Dict[str, Any]) -> str:
    """An fsspec listing entry's modification time as UTC ISO 8601 (sorts as text)."""
    value = entry.get("LastModified") or entry.get("mtime") or entry.get("created")
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return str(value or "")


def describe(field: Any, storage: Any) -> Dict[str, Any]:
    f = field.uploadkit
    return {"key": f.key, "url": f.url, "filename": f.filename, "size": f.size,
            "content_type": f.content_type, "sha256": f.sha256,
            "thumbnails": {size: storage.url(key) for size, key in sorted(f.thumbnails.items())}}


def upload(request: Request) -> Any:
    fields = [v for v in request.POST.getall("photo") if hasattr(v, "uploadkit")]
    if not fields:
        return Response(json_body={"error": {"code": "no_photo", "message": "send photos as fields named 'photo'",
                                             "field": "photo", "limit": None}}, status=400)
    if request.accept.best_match(["text/html", "application/json"]) == "application/json":
        storage = engine_of(request).storage
        return Response(json_body={"photos": [describe(f, storage) for f in fields]}, status=201)
    return HTTPSeeOther(location=request.route_url("gallery"))


def api_photos(request: Request) -> Any:
    return {"photos": photos(engine_of(request).storage)}


def gallery(request: Request) -> Response:
    cards = []
    for p in photos(engine_of(request).storage):
        thumb = p["thumbnails"].get("240x240") or p["url"]
        big = p["thumbnails"].get("800x800") or p["url"]
        cards.append(f'<a class="card" href="{html.escape(big)}"><img src="{html.escape(thumb)}" alt="" '
                     f'loading="lazy"></a>')
    body = PAGE.replace("__CARDS__", "\n".join(cards) or '<p class="empty">No photos yet.</p>')
    return Response(body, content_type="text/html", charset="utf-8")


def main(global_config: Any = None, **settings: str) -> Any:
    """The WSGI app (also usable as a PasteDeploy ``main`` factory)."""
    config = Configurator(settings=settings)
    config.include("uploadkit.contrib.pyramid")
    storage = config.registry[REGISTRY_KEY].storage
    if storage is None:
        raise SystemExit("the gallery needs uploadkit.storage (or gallery.local_dir)")
    config.add_route("gallery", "/")
    config.add_route("upload", "/upload")
    config.add_route("api_photos", "/api/photos")
    config.add_route("media", "/media/*subpath")
    config.add_view(gallery, route_name="gallery", request_method="GET")
    config.add_view(upload, route_name="upload", request_method="POST")
    config.add_view(api_photos, route_name="api_photos", request_method="GET", renderer="json")
    config.add_view(wsgiapp2(storage.app()), route_name="media")
    return config.make_wsgi_app()


def run(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="uploadkit's Pyramid gallery example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8004)
    parser.add_argument("--config", default=os.path.join(HERE, "gallery.ini"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the ini file")
    args = parser.parse_args(argv)
    settings = read_settings(args.config, args.set)

    from uploadkit.server import make_threaded_server, serve_until_stopped

    app = main({}, **settings)
    server = make_threaded_server(app, args.host, args.port, verbose=True)
    print(f"pyramid_gallery: http://{args.host}:{server.server_address[1]}/", flush=True)
    print(f"  photos in {settings['uploadkit.storage']}", flush=True)
    return serve_until_stopped(server)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Gallery</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; max-width: 1040px; margin: 32px auto; padding: 0 16px; color: #1d2330; }
  form { border: 1px solid #dfe3ea; border-radius: 10px; padding: 14px 16px; margin-bottom: 24px; }
  progress { width: 100%; margin-top: 10px; } output { display: block; color: #677185; min-height: 1.5em; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
  .card { display: flex; align-items: center; justify-content: center; height: 180px; background: #eef0f4; border-radius: 8px; overflow: hidden; }
  .card img { max-width: 100%; max-height: 100%; }
  .empty { color: #677185; }
</style>
</head>
<body>
<h1>Gallery</h1>
<form action="/upload" method="post" enctype="multipart/form-data" data-uploadkit>
  <input type="file" name="photo" accept="image/*" multiple required>
  <button type="submit">Upload</button>
  <progress data-uploadkit-bar max="100" hidden></progress>
  <output data-uploadkit-status role="status" aria-live="polite"></output>
</form>
<div class="grid">
__CARDS__
</div>
<script src="/upload/progress/uploadkit.js"></script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(run())
