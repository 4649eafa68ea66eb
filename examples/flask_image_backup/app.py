"""An image backup service on Flask, in one command:

    BACKUP_TOKEN=s3cret python examples/flask_image_backup/app.py     # http://127.0.0.1:8003/

Photos are stored once per content: the key is the file's sha256, so sending
the same bytes twice (from two phones, under two names) keeps one object and
answers with the same hash and URL. Only JPEG, PNG and WebP up to 10 MiB are
accepted, told from the bytes, not the name; anything else is refused with a
JSON 415 or 413 before it is stored.

    POST   /photos            multipart, one or more ``photo`` fields -> 201 {"photos": [...]}
    GET    /photos            -> {"photos": [{"sha256", "url", "size", "content_type"}, ...]}
    GET    /photos/<sha256>   -> the bytes (ETag, Range, conditional requests)
    DELETE /photos/<sha256>   with ``Authorization: Bearer <token>`` -> 204; 401 without

    curl -F photo=@a.jpg -F photo=@b.png http://127.0.0.1:8003/photos
    curl -X DELETE -H "Authorization: Bearer s3cret" http://127.0.0.1:8003/photos/<sha256>

The token comes from ``BACKUP_TOKEN`` (or ``--token``); without one, a random
token is made and printed on start-up. Options: ``--port`` (0 picks a free one;
the URL is printed first), ``--host``, ``--data DIR`` (default: a directory in
the system's temp area, kept between runs).
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import secrets
import sys
import tempfile
from typing import Any, Dict, List, Optional

from flask import Flask, jsonify, request

from uploadkit import Limits, Storage
from uploadkit.contrib.flask import UploadKit

#: What is accepted, by sniffed type, and the extension each is stored with.
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}
MAX_SIZE = 10 << 20
_HASH = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"([0-9a-f]{64})(\.jpg|\.png|\.webp)")


def photo_key(info: Any, environ: Any) -> str:
    """Content-addressed keys: ``<sha256>.<ext of the sniffed type>``."""
    return f"{info.sha256}{EXTENSIONS.get(info.content_type, '')}"


def _error(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> Any:
    response = jsonify({"error": {"code": code, "message": message, "field": None, "limit": None}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def create_app(data_dir: str, token: str) -> Flask:
    app = Flask(__name__)
    storage = Storage("file://" + os.path.join(data_dir, "photos"), collision="dedup",
                      upload_to=photo_key)
    os.makedirs(storage.root, exist_ok=True)
    os.makedirs(os.path.join(data_dir, "tmp"), exist_ok=True)
    UploadKit(app, storage=storage, paths=["/photos"], tempdir=os.path.join(data_dir, "tmp"),
              limits=Limits(max_file_size=MAX_SIZE, max_files=50, allowed_types=frozenset(EXTENSIONS)))
    media = storage.app()  # GET/HEAD only: deletes go through the view below

    def url_of(sha256: str) -> str:
        return f"{request.host_url}photos/{sha256}"

    def find(sha256: str) -> Optional[str]:
        if not _HASH.fullmatch(sha256):
            return None
        return next((sha256 + ext for ext in EXTENSIONS.values() if storage.exists(sha256 + ext)), None)

    @app.post("/photos")
    def upload() -> Any:
        files = request.files.getlist("photo")
        if not files:
            return _error(400, "no_photo", "send the photos as multipart/form-data fields named 'photo'")
        photos = []
        for f in files:
            stored = f.uploadkit
            photos.append({"sha256": stored.sha256, "url": url_of(stored.sha256), "filename": f.filename,
                           "size": stored.size, "content_type": stored.content_type,
                           "deduplicated": bool(stored.deduplicated)})
        return jsonify({"photos": photos}), 201

    @app.get("/photos")
    def listing() -> Any:
        photos: List[Dict[str, Any]] = []
        for entry in sorted(os.scandir(storage.root), key=lambda e: e.name):
            m = _KEY.fullmatch(entry.name)
            if m and entry.is_file():
                photos.append({"sha256": m.group(1), "url": url_of(m.group(1)), "size": entry.stat().st_size,
                               "content_type": {v: k for k, v in EXTENSIONS.items()}[m.group(2)]})
        return jsonify({"photos": photos})

    @app.route("/photos/<sha256>", methods=["GET", "HEAD"])
    def download(sha256: str) -> Any:
        key = find(sha256)
        if key is None:
            return _error(404, "not_found", f"no photo with sha256 {sha256[:64]!r}")
        # A WSGI app is a valid Flask response: the storage app sends the
        # bytes with ETag, Last-Modified and Range support.
        return lambda environ, start_response: media(dict(environ, PATH_INFO="/" + key), start_response)

    @app.delete("/photos/<sha256>")
    def delete(sha256: str) -> Any:
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return _error(401, "unauthorized", "deleting needs 'Authorization: Bearer <token>' with the right token",
                          {"WWW-Authenticate": 'Bearer realm="photos"'})
        key = find(sha256)
        if key is None:
            return _error(404, "not_found", f"no photo with sha256 {sha256[:64]!r}")
        storage.delete(key)
        return "", 204

    return app


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="uploadkit's Flask image backup example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "uploadkit-image-backup"))
    parser.add_argument("--token", default=os.environ.get("BACKUP_TOKEN"))
    args = parser.parse_args(argv)
    token = args.token or secrets.token_urlsafe(18)

    from uploadkit.server import make_threaded_server, serve_until_stopped

    app = create_app(os.path.abspath(args.data), token)
    server = make_threaded_server(app, args.host, args.port, verbose=True)
    print(f"flask_image_backup: http://{args.host}:{server.server_address[1]}/photos", flush=True)
    print(f"  photos in {os.path.abspath(args.data)}", flush=True)
    if not args.token:
        print(f"  DELETE token (set BACKUP_TOKEN to choose one): {token}", flush=True)
    return serve_until_stopped(server)


if __name__ == "__main__":
    sys.exit(main())
