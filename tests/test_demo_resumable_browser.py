"""The demo page's resumable mode in headless Chromium: ``uploadkit.js`` sends
the file with tus (creation, PATCH in chunks, HEAD to resume) to ``uploadkit
demo``'s ``/upload/tus/``.

* A loopback proxy cuts the second PATCH's body partway: the script asks the
  server (HEAD) how much arrived, goes on from exactly there, and the stored
  file is byte for byte the one picked, with its thumbnails, in the gallery.
  A screenshot of the page is kept in the test's temp directory.
* A page reloaded mid-upload: picking the same file again resumes the upload
  the script remembered in localStorage (HEAD, then PATCH from the offset
  the server holds; no new upload is created). A file over the demo's limit
  is refused at creation, in the server's words.
* A plain ``<form data-uploadkit data-uploadkit-tus=...>`` (the script's form
  mode): its bar and status line follow the upload to "Done: <name> (<size>)".
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List

import pytest
import requests
from PIL import Image

from tests.support.browser import Command, chromium, page, python_command  # noqa: F401
from tests.support.cutproxy import CutProxy, Request

MiB = 1 << 20
CHUNK = 2 * MiB  # the demo page's chunk size (data-chunk-size on its checkbox)
CUT = 700_000  # body bytes of the second PATCH that get through before the connection drops
LIMIT = 6 * MiB  # the demo's file size limit here


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def picture(tmp_path_factory: Any) -> str:
    """A PNG of noise (about 5 MiB, three chunks): decodable, so it gets thumbnails."""
    side = 1300
    path = str(tmp_path_factory.mktemp("resumable") / "dunes.png")
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, "PNG", compress_level=0)
    assert 2 * CHUNK < os.path.getsize(path) < 3 * CHUNK
    return path


@pytest.fixture
def demo(tmp_path: Any) -> Any:
    storage = str(tmp_path / "media")
    os.makedirs(storage)
    with Command(python_command("-m", "uploadkit.cli", "demo", "--port", "0", "--storage",
                                "file://" + storage, "--max-file-size", str(LIMIT))) as cmd:
        cmd.storage = storage  # type: ignore[attr-defined]
        yield cmd


def _stored(demo: Any, page: Any, name: str) -> Dict[str, Any]:
    """The gallery card for ``name`` and its stored original."""
    card = page.locator("#gallery .card", has_text=name)
    card.wait_for(timeout=15_000)
    key = card.get_attribute("data-key")
    return {"card": card, "key": key, "path": os.path.join(demo.storage, key)}


def _wait_done(page: Any, log: Any) -> None:
    """Wait for the queue item to be done; on a timeout, say where it stood."""
    try:
        page.wait_for_selector("#queue li[data-state=done]", timeout=30_000)
    except Exception as exc:
        state = page.evaluate("() => [...document.querySelectorAll('#queue li')].map((li) =>"
                              " [li.dataset.state, li.dataset.percent, li.querySelector('.state').textContent])")
        raise AssertionError(f"not done: {state}; requests: {log()}") from exc


def _tus_keys(page: Any) -> List[str]:
    return page.evaluate("() => Object.keys(localStorage).filter((k) => k.startsWith('uploadkit.tus::'))")


def test_a_dropped_patch_resumes_from_the_servers_offset(demo: Any, page: Any, picture: str,  # noqa: F811
                                                          tmp_path: Any) -> None:
    def cut_second_patch(req: Request) -> Any:
        return CUT if (req.method, req.number) == ("PATCH", 2) else None

    answers: List[Dict[str, Any]] = []  # the tus answers the page got, in order
    page.on("response", lambda r: answers.append({
        "method": r.request.method, "status": r.status, "offset": r.headers.get("upload-offset"),
        "sent_offset": r.request.headers.get("upload-offset")}) if "/upload/tus/" in r.url else None)
    with CutProxy(demo.port, cut=cut_second_patch) as proxy:
        page.goto(proxy.url + "/")
        page.check("#resumable")
        page.set_input_files("#file-input", picture)
        _wait_done(page, lambda: [(r.method, r.path, r.header("Upload-Offset"), r.cut) for r in proxy.requests])
        requests = list(proxy.requests)

    tus = [r for r in requests if r.path.startswith("/upload/tus/")]
    created = [r for r in tus if r.method == "POST"]
    assert len(created) == 1, [(r.method, r.path) for r in tus]
    assert created[0].header("Upload-Length") == str(os.path.getsize(picture))
    assert "filename ZHVuZXMucG5n" in (created[0].header("Upload-Metadata") or "")  # base64("dunes.png")
    patches = [r for r in tus if r.method == "PATCH"]
    cut = [r for r in patches if r.cut is not None]
    assert len(cut) == 1 and cut[0].header("Upload-Offset") == str(CHUNK), \
        [(r.header("Upload-Offset"), r.cut) for r in patches]
    after = tus[tus.index(cut[0]) + 1:]
    assert after and after[0].method == "HEAD", [(r.method, r.header("Upload-Offset")) for r in after]
    # It went on from what the server held when asked: some or all of what got
    # through, depending on how far the server had read the cut body by then.
    resumed = int(next(r for r in after if r.method == "PATCH").header("Upload-Offset") or -1)
    assert CHUNK <= resumed <= CHUNK + CUT, resumed
    # Every PATCH starts at the offset the server last reported, by HEAD or by a PATCH's answer.
    reported = None
    for a in answers:
        if a["method"] == "PATCH" and reported is not None:
            assert a["sent_offset"] == reported, answers
        if a["method"] in ("HEAD", "PATCH", "POST") and a["status"] in (200, 201, 204) and a["offset"]:
            reported = a["offset"]
    assert answers[-1]["method"] == "PATCH" and answers[-1]["status"] == 204, answers
    assert answers[-1]["offset"] == str(os.path.getsize(picture))

    stored = _stored(demo, page, "dunes.png")
    assert _sha256(stored["path"]) == _sha256(picture)
    thumbs = [n for n in os.listdir(os.path.dirname(stored["path"]))
              if n.startswith(os.path.basename(stored["key"]).rsplit(".", 1)[0] + ".")]
    assert len(thumbs) == 3, thumbs  # the original and its two thumbnails
    item = page.locator("#queue li", has_text="dunes.png")
    assert item.get_attribute("data-mode") == "tus"
    assert item.locator(".state").inner_text().startswith("stored")
    assert page.locator("#gallery .card .name").all_inner_texts() == ["dunes.png"]
    page.wait_for_function("() => { const i = document.querySelector('#gallery .card img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
    assert _tus_keys(page) == []  # a finished upload is forgotten

    page.wait_for_timeout(400)  # let the bar's width transition end
    shot = str(tmp_path / "demo-resumable.png")
    page.screenshot(path=shot, full_page=True)
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is blank"
    assert page.js_errors == []


def test_a_reloaded_page_resumes_the_remembered_upload(demo: Any, page: Any, picture: str) -> None:  # noqa: F811
    seen: List[Dict[str, Any]] = []
    page.on("request", lambda r: seen.append({"method": r.method, "url": r.url,
                                               "offset": r.headers.get("upload-offset")})
            if "/upload/tus/" in r.url else None)
    answered: List[Dict[str, Any]] = []
    page.on("response", lambda r: answered.append({"method": r.request.method, "status": r.status,
                                                    "offset": r.headers.get("upload-offset")})
            if "/upload/tus/" in r.url else None)
    page.goto(demo.url + "/")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 2 * MiB})
    page.check("#resumable")
    page.set_input_files("#file-input", picture)
    # Once the first chunk is stored, leave the page in the middle of the second.
    page.wait_for_function("() => +(document.querySelector('#queue li').dataset.percent || 0) >= 50",
                           timeout=20_000)
    assert any(a["method"] == "PATCH" and a["status"] == 204 for a in answered), answered
    remembered = _tus_keys(page)
    assert len(remembered) == 1, remembered
    page.reload()
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    assert _tus_keys(page) == remembered
    before = len(seen)
    page.check("#resumable")
    page.set_input_files("#file-input", picture)
    _wait_done(page, lambda: (seen, answered))

    again = seen[before:]
    assert [r["method"] for r in again][:2] == ["HEAD", "PATCH"], again
    assert not [r for r in again if r["method"] == "POST"], again
    resumed_at = int(again[1]["offset"])
    assert resumed_at >= CHUNK, again
    heads = [a for a in answered if a["method"] == "HEAD"]
    assert heads and int(heads[-1]["offset"]) == resumed_at, heads
    stored = _stored(demo, page, "dunes.png")
    assert _sha256(stored["path"]) == _sha256(picture)
    assert _tus_keys(page) == []

    # Over the limit: refused at creation (413), in words; nothing stored, nothing remembered.
    big = os.path.join(os.path.dirname(picture), "too-big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(LIMIT + 1))
    page.set_input_files("#file-input", big)
    failed = page.locator("#queue li[data-state=error]", has_text="too-big.bin")
    failed.wait_for(timeout=15_000)
    message = failed.locator(".state").inner_text()
    assert "6.0 MiB" in message, message
    assert failed.locator(".state").get_attribute("title").startswith("HTTP 413")
    assert not [n for _, _, names in os.walk(demo.storage) for n in names if n.endswith(".bin")]
    assert _tus_keys(page) == []
    assert page.js_errors == []


FORM = """(chunk) => {
  const f = document.createElement('form');
  f.id = 'plain'; f.method = 'post'; f.action = '/upload'; f.enctype = 'multipart/form-data';
  f.setAttribute('data-uploadkit', ''); f.setAttribute('data-uploadkit-tus', '/upload/tus/');
  f.setAttribute('data-uploadkit-chunk-size', String(chunk));
  f.innerHTML = '<input type="file" name="file"><button type="submit">Send</button>';
  document.body.appendChild(f);
}"""


def test_a_form_marked_for_tus_uploads_resumably(demo: Any, page: Any, picture: str) -> None:  # noqa: F811
    methods: List[str] = []
    page.on("request", lambda r: methods.append(r.method) if "/upload/tus/" in r.url else None)
    page.goto(demo.url + "/")
    page.evaluate(FORM, MiB)
    page.set_input_files("#plain input[type=file]", picture)
    page.click("#plain button")
    line = page.locator("#plain [data-uploadkit-status]")
    page.wait_for_function("(o) => /^(Done|Upload failed)/.test(o.textContent)", arg=line.element_handle(),
                           timeout=30_000)
    assert line.inner_text() == "Done: dunes.png (4.8 MiB)"
    bar = page.locator("#plain [data-uploadkit-bar]")
    assert bar.evaluate("b => [b.value, b.max]") == [os.path.getsize(picture)] * 2
    assert methods.count("POST") == 1 and methods.count("PATCH") == 5, methods
    assert page.url == demo.url + "/"  # no navigation: the form's own action is not posted to
    listed = requests.get(demo.url + "/api/files", timeout=10).json()["files"]
    assert [f["filename"] for f in listed] == ["dunes.png"]
    assert _sha256(os.path.join(demo.storage, listed[0]["key"])) == _sha256(picture)
    assert page.js_errors == []
