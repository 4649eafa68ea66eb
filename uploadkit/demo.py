"""The demo site: uploadkit's whole path on one page.

Drop files, watch each one's server-side progress, see thumbnails appear in a
gallery, open or delete the originals. Embedded defaults: progress in process
memory, files in a local directory named on start-up.

Routes: ``GET /`` the page; ``POST /upload`` (multipart, through the
middleware: stored, hashed, thumbnailed) answers ``{"files": [...]}``;
``GET /api/files`` lists this run's files; ``DELETE /api/files/<key>`` removes
one with its thumbnails; ``GET /media/<key>`` serves stored files (read only);
``/upload/progress`` is the middleware's status route, which also serves
``uploadkit.js``.
"""

from __future__ import annotations

import html
import json
import tempfile
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional

from .limits import Limits
from .middleware import FILES_KEY, UploadMiddleware
from .server import make_threaded_server, serve_until_stopped

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]

MEDIA_PREFIX = "/media/"
TUS_PREFIX = "/upload/tus/"


def _json(start_response: StartResponse, status: str, payload: Any) -> List[bytes]:
    body = json.dumps(payload).encode("utf-8")
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


class DemoApp:
    """The app behind the middleware: it only sees finished, stored files."""

    def __init__(self, storage: Any, allowed_delete: bool = True,
                 max_file_size: Optional[int] = None, max_files: Optional[int] = None) -> None:
        self.storage = storage
        self.page = render_page(max_file_size, max_files)
        self.items: List[Dict[str, Any]] = []
        self.lock = threading.Lock()
        self.allowed_delete = allowed_delete
        # Read only: deletes go through /api/files/<key>, which keeps the list in step.
        self.media = storage.app()

    def describe(self, f: Any) -> Dict[str, Any]:
        return {
            "field": f.field_name, "filename": f.filename, "size": f.size,
            "content_type": f.content_type, "sha256": f.sha256, "key": f.key,
            "url": f.url,
            "deduplicated": bool(getattr(f, "deduplicated", False)),
            "thumbnails": {size: self.storage.url(key) for size, key in sorted(f.thumbnails.items())},
        }

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/" and method in ("GET", "HEAD"):
            body = self.page
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path.startswith(TUS_PREFIX) and environ.get(FILES_KEY) is not None:
            method, path = "POST", "/upload"  # a resumable upload just completed: list it the same way
        if path == "/upload" and method == "POST":
            files = environ.get(FILES_KEY)
            if files is None:
                return _json(start_response, "400 Bad Request", {"error": {
                    "code": "not_multipart", "message": "send the files as multipart/form-data",
                    "field": None, "limit": None}})
            described = [self.describe(f) for f in files.values()]
            with self.lock:
                self.items.extend(d for d in described if d["key"] and not any(
                    i["key"] == d["key"] for i in self.items))
            return _json(start_response, "200 OK", {"files": described})
        if path == "/api/files" and method == "GET":
            with self.lock:
                items = list(reversed(self.items))
            return _json(start_response, "200 OK", {"files": items})
        if path.startswith("/api/files/") and method == "DELETE":
            key = path[len("/api/files/"):]
            if not self.allowed_delete:
                return _json(start_response, "403 Forbidden", {"error": {
                    "code": "forbidden", "message": "deleting is turned off on this demo", "field": None,
                    "limit": None}})
            with self.lock:
                known = [i for i in self.items if i["key"] == key]
                if not known:
                    return _json(start_response, "404 Not Found", {"error": {
                        "code": "not_found", "message": f"no stored file {key!r}", "field": None,
                        "limit": None}})
                self.items = [i for i in self.items if i["key"] != key]
            try:
                self.storage.delete(key)
            except FileNotFoundError:
                pass  # removed behind the demo's back: gone either way
            return _json(start_response, "200 OK", {"deleted": key})
        if path.startswith(MEDIA_PREFIX):
            environ = dict(environ, PATH_INFO=path[len(MEDIA_PREFIX) - 1:], SCRIPT_NAME=MEDIA_PREFIX.rstrip("/"))
            served: Iterable[bytes] = self.media(environ, start_response)
            return served
        return _json(start_response, "404 Not Found", {"error": {
            "code": "not_found", "message": f"nothing at {path}", "field": None, "limit": None}})


def build_demo(storage_url: Optional[str] = None, memcached: Optional[str] = None,
               max_file_size: int = 200 * 2**20, tempdir: Optional[str] = None) -> UploadMiddleware:
    """The demo's WSGI app, fully configured (tests use it too)."""
    from .imaging import Thumbnailer
    from .progress import MemcachedStore, MemoryStore
    from .storage import Storage

    if storage_url is None:
        storage_url = "file://" + tempfile.mkdtemp(prefix="uploadkit-demo-")
    storage = Storage(storage_url, base_url=MEDIA_PREFIX, upload_to="{date:%Y/%m/%d}/{uuid}{ext}")
    store = MemcachedStore(memcached) if memcached else MemoryStore()
    limits = Limits(max_file_size=max_file_size, max_files=20)
    app = DemoApp(storage, max_file_size=limits.max_file_size, max_files=limits.max_files)
    from .tusapp import TusSettings

    mw = UploadMiddleware(
        app, storage=storage, progress=store, progress_path="/upload/progress", tempdir=tempdir,
        thumbnails=Thumbnailer(sizes=[(200, 200), (400, 400)], mode="fit"),
        limits=limits, paths=["/upload"],
        # Resumable uploads (tus 1.0) for tus-js-client, Uppy, tuspy, at /upload/tus/.
        tus=TusSettings(path=TUS_PREFIX, lock_store=store if memcached else None))
    mw.demo_storage_url = storage_url  # type: ignore[attr-defined]
    return mw


def serve(host: str = "127.0.0.1", port: int = 8000, storage_url: Optional[str] = None,
          memcached: Optional[str] = None, max_file_size: int = 200 * 2**20,
          tempdir: Optional[str] = None) -> int:
    app = build_demo(storage_url, memcached, max_file_size, tempdir)
    server = make_threaded_server(app, host, port, verbose=True)
    return serve_until_stopped(server, [
        f"uploadkit demo: http://{host}:{server.server_address[1]}/",
        f"  files are stored in {app.demo_storage_url}",  # type: ignore[attr-defined]
        f"  progress: {'memcached ' + memcached if memcached else 'in process memory'}",
        "  press Ctrl+C to stop",
    ])




def render_page(max_file_size: Optional[int] = None, max_files: Optional[int] = None) -> bytes:
    """The demo page, with the limits it runs under written in the drop zone."""
    from .errors import format_size

    parts = []
    if max_files:
        parts.append(f"up to {max_files} files at once")
    parts.append(f"{format_size(max_file_size)} each" if max_file_size else "any size")
    text = "Any type: " + ", ".join(parts) + "; images get thumbnails."
    return PAGE.replace("__LIMITS__", html.escape(text)).encode("utf-8")


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>uploadkit demo</title>
<link rel="icon" href="data:,">
<style>
  :root { --fg:#1d2330; --muted:#677185; --line:#dfe3ea; --accent:#3d6df2; --ok:#1f9d55; --bad:#d64545; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:#f6f7fb; }
  header, main { max-width:1100px; margin:0 auto; }
  header { padding:28px 32px 8px; }
  h1 { margin:0; font-size:24px; } header p { margin:4px 0 0; color:var(--muted); }
  main { padding:16px 32px 48px; }
  #drop { border:2px dashed #b8c2d6; border-radius:14px; background:#fff; padding:36px; text-align:center; transition:.15s; }
  #drop.over { border-color:var(--accent); background:#eef3ff; }
  #drop label { color:var(--accent); cursor:pointer; font-weight:600; text-decoration:underline; }
  #drop small { display:block; color:var(--muted); margin-top:6px; }
  #queue { list-style:none; padding:0; margin:18px 0; }
  #queue li { background:#fff; border:1px solid var(--line); border-radius:10px; padding:10px 14px; margin-bottom:8px; }
  .row { display:flex; justify-content:space-between; align-items:baseline; gap:16px; }
  .name { font-weight:600; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; min-width:0; }
  .state { color:var(--muted); text-align:right; font-variant-numeric:tabular-nums; }
  .bar { height:8px; background:#edf0f5; border-radius:4px; margin-top:8px; overflow:hidden; }
  .bar > div { height:100%; width:0; background:var(--accent); transition:width .2s; }
  li.done .bar > div { background:var(--ok); } li.error .bar > div { background:var(--bad); }
  li.error .state { color:var(--bad); } li.done .state { color:var(--ok); }
  h2 { font-size:18px; margin:28px 0 10px; }
  #gallery { display:grid; grid-template-columns:repeat(auto-fill, minmax(210px, 1fr)); gap:14px; }
  .card { background:#fff; border:1px solid var(--line); border-radius:12px; overflow:hidden; display:flex; flex-direction:column; }
  .thumb { height:170px; display:flex; align-items:center; justify-content:center; background:#eef0f4; color:var(--muted); font-size:13px; }
  .thumb img { max-width:100%; max-height:100%; }
  .meta { padding:10px 12px; font-size:13px; flex:1; }
  .meta .name { font-size:14px; } .meta code { font-size:11px; color:var(--muted); }
  .meta .problem { color:var(--bad); }
  .actions { display:flex; gap:8px; padding:0 12px 12px; }
  .actions a, .actions button { font:inherit; font-size:13px; padding:4px 10px; border-radius:6px; border:1px solid var(--line); background:#fff; color:var(--fg); text-decoration:none; cursor:pointer; }
  .actions a:hover { border-color:var(--accent); color:var(--accent); }
  .actions button:hover { border-color:var(--bad); color:var(--bad); }
  #empty { color:var(--muted); }
</style>
</head>
<body>
<header>
  <h1>uploadkit demo</h1>
  <p>Files stream through the middleware in constant memory, are hashed, sniffed, stored and thumbnailed before the app sees them.</p>
</header>
<main>
  <form id="upload-form" action="/upload" method="post" enctype="multipart/form-data">
    <div id="drop">
      <strong>Drop files here</strong> or <label for="file-input">choose files</label>
      <input id="file-input" type="file" name="file" multiple hidden>
      <small>__LIMITS__ Each file is uploaded on its own, with the server's progress.</small>
    </div>
  </form>
  <ul id="queue" aria-live="polite"></ul>
  <h2>Gallery</h2>
  <div id="gallery"></div>
  <p id="empty">Nothing uploaded yet.</p>
</main>
<script src="/upload/progress/uploadkit.js"></script>
<script>
(function () {
  "use strict";
  var queue = document.getElementById("queue"), gallery = document.getElementById("gallery");
  var drop = document.getElementById("drop"), input = document.getElementById("file-input");
  var human = window.uploadkit.formatSize;

  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }

  function card(f) {
    var c = el("div", "card"); c.dataset.key = f.key;
    var t = el("div", "thumb"), thumbs = Object.keys(f.thumbnails || {});
    if (thumbs.length) { var img = el("img"); img.src = f.thumbnails[thumbs[0]]; img.alt = f.filename; t.appendChild(img); }
    else t.textContent = f.content_type;
    var m = el("div", "meta"); m.appendChild(el("div", "name", f.filename));
    m.appendChild(el("div", null, human(f.size) + " \u00b7 " + f.content_type + (f.deduplicated ? " \u00b7 already stored" : "")));
    m.appendChild(el("code", null, "sha256 " + (f.sha256 || "").slice(0, 16) + "\u2026"));
    var a = el("div", "actions"), open = el("a", null, "Open original");
    open.href = f.url; open.target = "_blank"; open.rel = "noopener";
    var del = el("button", "delete", "Delete"); del.type = "button";
    del.onclick = function () {
      del.disabled = true;
      fetch("/api/files/" + encodeURI(f.key), { method: "DELETE" }).then(function (r) {
        if (r.ok) { c.remove(); refreshEmpty(); return; }
        return r.json().then(function (j) { throw new Error((j && j.error && j.error.message) || ("HTTP " + r.status)); });
      }).catch(function (e) {
        del.disabled = false;
        var p = m.querySelector(".problem") || m.appendChild(el("div", "problem"));
        p.textContent = "Not deleted: " + e.message;
      });
    };
    a.appendChild(open); a.appendChild(del);
    c.appendChild(t); c.appendChild(m); c.appendChild(a);
    return c;
  }
  function refreshEmpty() { document.getElementById("empty").style.display = gallery.children.length ? "none" : "block"; }
  function addToGallery(files) {
    files.forEach(function (f) {
      if (f.key && !gallery.querySelector('[data-key="' + CSS.escape(f.key) + '"]')) gallery.insertBefore(card(f), gallery.firstChild);
    });
    refreshEmpty();
  }

  function send(file) {
    var li = el("li"), row = el("div", "row"), name = el("span", "name", file.name), state = el("span", "state", "waiting");
    var bar = el("div", "bar"), fill = el("div"), shown = 0;
    bar.setAttribute("role", "progressbar"); bar.setAttribute("aria-valuemin", "0"); bar.setAttribute("aria-valuemax", "100");
    bar.appendChild(fill); row.appendChild(name); row.appendChild(state); li.appendChild(row); li.appendChild(bar);
    queue.insertBefore(li, queue.firstChild);
    // The browser reports bytes sent before the server reports bytes received,
    // and the two do not agree: the bar only ever moves forward.
    function advance(pct) {
      shown = Math.max(shown, Math.min(100, pct));
      fill.style.width = shown + "%"; li.dataset.percent = shown; bar.setAttribute("aria-valuenow", shown);
    }
    var data = new FormData(); data.append("file", file, file.name);
    window.uploadkit.upload(data, {
      url: "/upload",
      progressUrl: "/upload/progress",
      onProgress: function (p) {
        li.dataset.state = p.state;
        if (p.state === "uploading" && p.size) {
          advance(Math.floor(100 * p.received / p.size));
          state.textContent = shown + "% of " + human(p.size) + (p.rate ? " \u00b7 " + human(p.rate) + "/s" : "");
        } else if (p.state === "processing") { advance(100); state.textContent = "processing\u2026"; }
        else if (p.state === "starting") { state.textContent = "starting\u2026"; }
      },
      onDone: function (result) {
        var files = (result && result.json && result.json.files) || [];
        li.className = "done"; li.dataset.state = "done"; advance(100);
        state.textContent = "stored \u00b7 " + human(file.size) + (files.length && files[0].deduplicated ? " \u00b7 already there" : "");
        addToGallery(files);
      },
      onError: function (err) {
        li.className = "error"; li.dataset.state = "error"; advance(100);
        state.textContent = (err && err.message) || "upload failed";
        if (err && err.status) state.title = "HTTP " + err.status + (err.code ? " \u00b7 " + err.code : "");
      }
    });
  }
  function sendAll(files) { Array.prototype.forEach.call(files, send); }

  input.addEventListener("change", function () { sendAll(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach(function (t) { drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); }); });
  ["dragleave", "drop"].forEach(function (t) { drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("over"); }); });
  drop.addEventListener("drop", function (e) { sendAll(e.dataTransfer.files); });
  fetch("/api/files").then(function (r) { return r.json(); }).then(function (j) { addToGallery(j.files.reverse()); });
  refreshEmpty();
})();
</script>
</body>
</html>
"""
