"""The tus project's own browser clients against ``uploadkit demo``'s tus
endpoint, in headless Chromium: tus-js-client (its UMD build) and Uppy with
``@uppy/tus`` (bundled by esbuild, as those packages ship ES modules only).

Both come from ``tests/js/node_modules`` (``tools/test.sh`` installs them with
npm from the committed lock file) and are put into the demo page by the test:
nothing is loaded from a CDN. Each finished file is checked byte for byte in
the demo's storage; the uploads that lose their connection go through a
loopback proxy that cuts one PATCH body partway.

Last, ``uploadkit.js``'s own tus client against a server whose silent PATCHes
lose their lock after 3 s (gunicorn, the tus test app's ``/stale/`` endpoint):
its PATCH is cut with the server's side left open, so the server still holds
the upload for it, and the script waits the 423s out until the lock is freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any, Dict, Iterator, List

import pytest
import requests

from tests.support.browser import REPO_ROOT, Command, chromium, page, python_command  # noqa: F401
from tests.support.cutproxy import CutProxy, Request
from tests.support.wsgi import gunicorn

MiB = 1 << 20
JS = os.path.join(REPO_ROOT, "tests", "js")
TUS_JS = os.path.join(JS, "node_modules", "tus-js-client", "dist", "tus.min.js")
UPPY_JS = os.path.join(JS, "build", "uppy-tus.js")
CUT = 300_000  # body bytes of the cut PATCH that get through


@pytest.fixture(scope="module")
def scripts() -> Dict[str, str]:
    """The clients' browser builds; Uppy's bundle is made here (offline) if it is missing."""
    if not os.path.exists(TUS_JS):
        raise RuntimeError("tus-js-client is not installed: npm ci --prefix tests/js (tools/test.sh does it)")
    if not os.path.exists(UPPY_JS):
        result = subprocess.run(["npm", "run", "--silent", "--prefix", JS, "build"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    return {"tus": TUS_JS, "uppy": UPPY_JS}


@pytest.fixture
def demo(tmp_path: Any) -> Iterator[Any]:
    storage = str(tmp_path / "media")
    os.makedirs(storage)
    with Command(python_command("-m", "uploadkit.cli", "demo", "--port", "0", "--storage",
                                "file://" + storage)) as cmd:
        cmd.storage = storage  # type: ignore[attr-defined]
        yield cmd


def _file(tmp_path: Any, name: str, size: int) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def _sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _stored(demo: Any, upload_url: str) -> Dict[str, Any]:
    """The demo's record of the file the upload at ``upload_url`` became, with its stored bytes' sha256."""
    upload_id = upload_url.rstrip("/").rpartition("/")[2]
    listed = requests.get(demo.url + "/api/files", timeout=10).json()["files"]
    mine = [f for f in listed if f.get("upload_id") == upload_id]
    assert len(mine) == 1, (upload_id, listed)
    record = dict(mine[0])
    record["stored_sha256"] = _sha256_of(os.path.join(demo.storage, record["key"]))
    return record


def _open(page: Any, url: str, script: str, *paths: str) -> None:
    """The page at ``url`` with a client script added and ``paths`` in a file input (#probe)."""
    page.goto(url)
    page.add_script_tag(path=script)
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.id = 'probe';"
                  " i.multiple = true; document.body.appendChild(i); }")
    page.set_input_files("#probe", list(paths))


def _log(page: Any) -> List[Dict[str, Any]]:
    """The tus answers the page gets, in order."""
    answers: List[Dict[str, Any]] = []
    page.on("response", lambda r: answers.append({
        "method": r.request.method, "status": r.status, "offset": r.headers.get("upload-offset"),
        "sent_offset": r.request.headers.get("upload-offset"), "concat": r.request.headers.get("upload-concat"),
        "url": r.url}) if "/tus/" in r.url else None)
    return answers


def _throttle_uploads(page: Any, rate: int, cdp: Any = None) -> Any:
    """Chromium sends at most ``rate`` bytes a second (-1: no limit), so a pause lands mid-PATCH."""
    if cdp is None:
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": rate})
    return cdp


# A tus-js-client upload of the n-th picked file; resolves to its URL. ``pauseAt``
# (bytes): abort there, wait, start again.
TUS_UPLOAD = """async ({n, options, pauseAt}) => {
  const file = document.getElementById('probe').files[n];
  window.__events = [];
  return await new Promise((resolve, reject) => {
    let paused = false;
    const upload = new tus.Upload(file, Object.assign({
      endpoint: '/upload/tus/',
      metadata: {filename: file.name, filetype: file.type || 'application/octet-stream'},
      retryDelays: [0, 500, 1000, 2000, 3000],
      onError: (e) => reject(String(e)),
      onSuccess: () => resolve(upload.url),
      onProgress: (sent, total) => {
        if (pauseAt && !paused && sent >= pauseAt) {
          paused = true;
          window.__events.push(['pause', sent]);
          upload.abort().then(() => setTimeout(() => { window.__events.push(['start']); upload.start(); }, 300));
        }
      },
    }, options));
    upload.start();
  });
}"""


def test_tus_js_client_uploads_in_chunks(demo: Any, page: Any, scripts: Dict[str, str],  # noqa: F811
                                         tmp_path: Any) -> None:
    path = _file(tmp_path, "plain.bin", 3 * MiB + 12345)
    answers = _log(page)
    _open(page, demo.url + "/", scripts["tus"], path)
    url = page.evaluate(TUS_UPLOAD, {"n": 0, "options": {"chunkSize": MiB}, "pauseAt": 0})
    stored = _stored(demo, url)
    assert stored["stored_sha256"] == stored["sha256"] == _sha256_of(path)
    assert (stored["filename"], stored["size"]) == ("plain.bin", os.path.getsize(path))
    patches = [a for a in answers if a["method"] == "PATCH"]
    assert [a["sent_offset"] for a in patches] == [str(i * MiB) for i in range(4)], answers
    assert all(a["status"] == 204 for a in patches)
    assert page.js_errors == []


def test_tus_js_client_pauses_and_resumes(demo: Any, page: Any, scripts: Dict[str, str],  # noqa: F811
                                          tmp_path: Any) -> None:
    path = _file(tmp_path, "paused.bin", 6 * MiB)
    answers = _log(page)
    _open(page, demo.url + "/", scripts["tus"], path)
    cdp = _throttle_uploads(page, 4 * MiB)
    # One PATCH for the whole file (tus-js-client's default): the pause cuts it partway.
    url = page.evaluate(TUS_UPLOAD, {"n": 0, "options": {}, "pauseAt": 2 * MiB})
    _throttle_uploads(page, -1, cdp)
    events = page.evaluate("window.__events")
    assert [e[0] for e in events] == ["pause", "start"], events
    stored = _stored(demo, url)
    assert stored["stored_sha256"] == _sha256_of(path)
    # After the pause: HEAD, then the rest from the offset the server reported.
    heads = [i for i, a in enumerate(answers) if a["method"] == "HEAD"]
    assert heads, answers
    held = answers[heads[0]]["offset"]
    assert 0 < int(held) < os.path.getsize(path), answers
    following = [a for a in answers[heads[0]:] if a["method"] == "PATCH" and a["status"] == 204]
    assert following and following[-1]["offset"] == str(os.path.getsize(path)), answers
    assert not [a for a in answers if a["method"] == "POST"][1:], answers  # the same upload, not a new one
    assert page.js_errors == []


def test_tus_js_client_survives_a_dropped_connection(demo: Any, page: Any, scripts: Dict[str, str],  # noqa: F811
                                                     tmp_path: Any) -> None:
    path = _file(tmp_path, "dropped.bin", 3 * MiB)

    def cut_second_patch(req: Request) -> Any:
        return CUT if (req.method, req.number) == ("PATCH", 2) else None

    answers = _log(page)
    with CutProxy(demo.port, cut=cut_second_patch) as proxy:
        _open(page, proxy.url + "/", scripts["tus"], path)
        url = page.evaluate(TUS_UPLOAD, {"n": 0, "options": {"chunkSize": MiB}, "pauseAt": 0})
        cut = [r for r in proxy.requests if r.cut is not None]
    assert len(cut) == 1 and cut[0].header("Upload-Offset") == str(MiB), proxy.requests
    stored = _stored(demo, url.replace(proxy.url, demo.url))
    assert stored["stored_sha256"] == _sha256_of(path)
    assert any(a["method"] == "HEAD" for a in answers), answers
    assert page.js_errors == []


def test_tus_js_client_parallel_uploads_are_concatenated(demo: Any, page: Any,  # noqa: F811
                                                         scripts: Dict[str, str], tmp_path: Any) -> None:
    path = _file(tmp_path, "parallel.bin", 5 * MiB + 7)
    answers = _log(page)
    _open(page, demo.url + "/", scripts["tus"], path)
    url = page.evaluate(TUS_UPLOAD, {"n": 0, "options": {"parallelUploads": 3}, "pauseAt": 0})
    posts = [a for a in answers if a["method"] == "POST"]
    assert [a["concat"] for a in posts[:3]] == ["partial"] * 3, posts
    assert len(posts) == 4 and (posts[3]["concat"] or "").startswith("final;"), posts
    assert len(posts[3]["concat"].split(";", 1)[1].split()) == 3
    stored = _stored(demo, url)
    assert stored["stored_sha256"] == stored["sha256"] == _sha256_of(path)
    assert stored["size"] == os.path.getsize(path)
    assert page.js_errors == []


UPPY_UPLOAD = """async ({options}) => {
  const uppy = new Uppy.Uppy({autoProceed: false});
  uppy.use(Uppy.Tus, Object.assign({endpoint: '/upload/tus/', retryDelays: [0, 500, 1000, 2000, 3000]}, options));
  for (const file of document.getElementById('probe').files) {
    uppy.addFile({name: file.name, type: file.type || 'application/octet-stream', data: file});
  }
  const result = await uppy.upload();
  return {ok: result.successful.map((f) => [f.name, f.uploadURL]),
          failed: result.failed.map((f) => [f.name, String(f.error)])};
}"""


def test_uppy_uploads_several_files(demo: Any, page: Any, scripts: Dict[str, str], tmp_path: Any) -> None:  # noqa: F811
    paths = [_file(tmp_path, "uppy-one.bin", 2 * MiB + 1), _file(tmp_path, "uppy-two.bin", 700_000)]
    _open(page, demo.url + "/", scripts["uppy"], *paths)
    result = page.evaluate(UPPY_UPLOAD, {"options": {"chunkSize": MiB}})
    assert result["failed"] == [] and len(result["ok"]) == 2, result
    for name, url in result["ok"]:
        stored = _stored(demo, url)
        assert stored["filename"] == name
        assert stored["stored_sha256"] == _sha256_of(str(tmp_path / name))
    assert page.js_errors == []


def test_uppy_survives_a_dropped_connection_and_uploads_in_parallel(
        demo: Any, page: Any, scripts: Dict[str, str], tmp_path: Any) -> None:  # noqa: F811
    path = _file(tmp_path, "uppy-dropped.bin", 3 * MiB)

    def cut_second_patch(req: Request) -> Any:
        return CUT if (req.method, req.number) == ("PATCH", 2) else None

    answers = _log(page)
    with CutProxy(demo.port, cut=cut_second_patch) as proxy:
        _open(page, proxy.url + "/", scripts["uppy"], path)
        result = page.evaluate(UPPY_UPLOAD, {"options": {"chunkSize": 512 * 1024, "parallelUploads": 2}})
        cut = [r for r in proxy.requests if r.cut is not None]
    assert result["failed"] == [] and len(result["ok"]) == 1, result
    assert len(cut) == 1, proxy.requests
    posts = [a for a in answers if a["method"] == "POST"]
    assert [a["concat"] for a in posts[:2]] == ["partial"] * 2, posts
    assert any(a["method"] == "HEAD" for a in answers), answers
    stored = _stored(demo, result["ok"][0][1].replace(proxy.url, demo.url))
    assert stored["stored_sha256"] == _sha256_of(path)
    assert page.js_errors == []


# Uppy's own pause button: pauseResume() on a file once ``pauseAt`` bytes are sent,
# and again 300 ms later.
UPPY_PAUSED = """async ({pauseAt}) => {
  const uppy = new Uppy.Uppy({autoProceed: false});
  uppy.use(Uppy.Tus, {endpoint: '/upload/tus/', retryDelays: [0, 500, 1000, 2000, 3000]});
  const file = document.getElementById('probe').files[0];
  const id = uppy.addFile({name: file.name, type: file.type || 'application/octet-stream', data: file});
  window.__events = [];
  let paused = false;
  uppy.on('upload-progress', (f, progress) => {
    if (!paused && progress.bytesUploaded >= pauseAt) {
      paused = true;
      window.__events.push(['pause', uppy.pauseResume(id), progress.bytesUploaded]);
      setTimeout(() => window.__events.push(['resume', uppy.pauseResume(id)]), 300);
    }
  });
  const result = await uppy.upload();
  return {ok: result.successful.map((f) => [f.name, f.uploadURL]),
          failed: result.failed.map((f) => [f.name, String(f.error)])};
}"""


def test_uppy_pauses_and_resumes(demo: Any, page: Any, scripts: Dict[str, str], tmp_path: Any) -> None:  # noqa: F811
    path = _file(tmp_path, "uppy-paused.bin", 6 * MiB)
    answers = _log(page)
    _open(page, demo.url + "/", scripts["uppy"], path)
    _throttle_uploads(page, 4 * MiB)
    result = page.evaluate(UPPY_PAUSED, {"pauseAt": 2 * MiB})
    assert result["failed"] == [] and len(result["ok"]) == 1, result
    # pauseResume() answers whether the file is paused now: first yes, then no.
    events = page.evaluate("window.__events")
    assert [e[:2] for e in events] == [["pause", True], ["resume", False]], events
    stored = _stored(demo, result["ok"][0][1])
    assert stored["stored_sha256"] == stored["sha256"] == _sha256_of(path)
    assert stored["filename"] == "uppy-paused.bin"
    # The pause aborted the one PATCH partway; the resume asked for the offset and sent the rest.
    heads = [i for i, a in enumerate(answers) if a["method"] == "HEAD"]
    assert heads, answers
    held = int(answers[heads[0]]["offset"])
    assert 0 < held < os.path.getsize(path), answers
    rest = [a for a in answers[heads[0]:] if a["method"] == "PATCH" and a["status"] == 204]
    assert rest and rest[0]["sent_offset"] == str(held), answers
    assert rest[-1]["offset"] == str(os.path.getsize(path)), answers
    assert len([a for a in answers if a["method"] == "POST"]) == 1, answers  # the same upload, not a new one
    assert page.js_errors == []


UPLOADKIT_UPLOAD = """async ({endpoint, chunk}) => await new Promise((resolve, reject) => {
  uploadkit.upload(document.getElementById('probe').files[0], {
    tus: endpoint, chunkSize: chunk, retryDelays: [0, 200, 400], progress: false,
    onDone: (r) => resolve(r.uploads[0].url), onError: (e) => reject(new Error(e.message)),
  });
})"""


def test_uploadkit_js_waits_out_the_lock_of_its_own_silent_patch(page: Any, tmp_path: Any) -> None:  # noqa: F811
    root = str(tmp_path / "tus")
    os.makedirs(root)
    path = _file(tmp_path, "stalled.bin", MiB)

    def stall_second_patch(req: Request) -> Any:
        return 100_000 if (req.method, req.number) == ("PATCH", 2) else None

    answers = _log(page)
    env = {"UPLOADKIT_TUS_ROOT": root, "PYTHONPATH": REPO_ROOT}
    with gunicorn("tests.support.tus_app:app", env=env, workers=2) as base, \
            CutProxy(int(base.rsplit(":", 1)[1]), cut=stall_second_patch, stall=True) as proxy:
        page.route(proxy.url + "/page", lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>stalled</title>"))
        _open(page, proxy.url + "/page", os.path.join(REPO_ROOT, "uploadkit", "static", "uploadkit.js"), path)
        url = page.evaluate(UPLOADKIT_UPLOAD, {"endpoint": "/stale/tus/", "chunk": 512 * 1024})
        stalled = [r for r in proxy.requests if r.cut is not None]
    assert len(stalled) == 1, proxy.requests
    statuses = [(a["method"], a["status"]) for a in answers]
    # Locked for longer than the retry delays last (0.6 s): waited out, not given up.
    assert ("PATCH", 423) in statuses, statuses
    assert statuses[-1] == ("PATCH", 204) and answers[-1]["offset"] == str(MiB), answers
    with open(os.path.join(root, "handed", url.rstrip("/").rpartition("/")[2] + ".json")) as f:
        handed = json.load(f)
    assert handed[0]["content_sha256"] == _sha256_of(path)
    assert page.js_errors == []
