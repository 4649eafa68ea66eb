"""The demo site in a real browser: headless Chromium (Debian's, driven by
Playwright) against ``uploadkit demo`` run as a command on 127.0.0.1.

One page session walks the whole path a user takes: pick files with the file
input, watch the progress bar pass through intermediate values to done, see
the thumbnails appear in the gallery, open an original, delete a file (its
card and its stored files go), and pick a file over the limit (the error shows
in words). Uploads are throttled with Chromium's own network emulation (the
DevTools protocol), so the progress bar has time to move on loopback.

A screenshot of the page is kept as ``artifacts/demo.png``.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from typing import Any, Dict, List

import pytest
import requests
from PIL import Image

from tests.support.browser import Command, artifact_path, chromium, page, python_command  # noqa: F401
from tests.support.images import drawing

MiB = 1 << 20
#: The demo's file size limit in this test: the big PNG fits, the padded JPEG does not.
LIMIT = 24 * MiB
#: Upload speed while the progress bar is watched (bytes per second).
THROTTLE = 6 * MiB

# Records every change of a queue item's data-state / data-percent, with a time.
OBSERVER = """() => {
  window.__seen = [];
  const record = (li) => window.__seen.push({t: performance.now(), name: li.querySelector('.name').textContent,
                                              state: li.dataset.state || '', percent: li.dataset.percent || ''});
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === 'attributes' && m.target.matches('#queue li')) record(m.target);
      for (const n of m.addedNodes || []) if (n.matches && n.matches('#queue li')) record(n);
    }
  }).observe(document.getElementById('queue'), {subtree: true, childList: true, attributes: true,
                                                attributeFilter: ['data-state', 'data-percent']});
}"""


def _stored(root: str) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    return sorted(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory: Any) -> Dict[str, str]:
    """A photo-like JPEG, a ~20 MiB PNG of noise (real, decodable), a JPEG padded past the limit."""
    d = tmp_path_factory.mktemp("demo-files")
    out = {}
    photo = str(d / "harbour.jpg")
    drawing(1600, 1000).save(photo, "JPEG", quality=88)
    out["photo"] = photo
    side = 2600  # 2600 * 2600 * 3 bytes of noise: a PNG that does not compress
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    big = str(d / "noise.png")
    noise.save(big, "PNG", compress_level=0)
    out["big"] = big
    small = io.BytesIO()
    drawing(320, 200).save(small, "JPEG", quality=80)
    huge = str(d / "too-big.jpg")
    with open(huge, "wb") as f:
        f.write(small.getvalue())
        f.write(b"\0" * (LIMIT + 2 * MiB - len(small.getvalue())))
    out["huge"] = huge
    # Far over the limit: more is left unread after the refusal than the
    # middleware drains, so the server answers while the browser still sends.
    far = str(d / "far-too-big.bin")
    with open(far, "wb") as f:
        f.write(os.urandom(MiB) * (LIMIT // MiB + 24))
    out["far"] = far
    return out


@pytest.fixture
def demo(tmp_path: Any) -> Any:
    storage = str(tmp_path / "media")
    os.makedirs(storage)
    with Command(python_command("-m", "uploadkit.cli", "demo", "--port", "0", "--storage",
                                "file://" + storage, "--max-file-size", str(LIMIT))) as cmd:
        cmd.storage = storage  # type: ignore[attr-defined]
        yield cmd


def _throttle(tab: Any, upload_bytes_per_s: float) -> Any:
    cdp = tab.context.new_cdp_session(tab)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1,
        "uploadThroughput": upload_bytes_per_s,
    })
    return cdp


def test_demo_in_chromium(demo: Any, page: Any, files: Dict[str, str]) -> None:  # noqa: F811
    storage = demo.storage
    page.goto(demo.url + "/")
    assert page.title() == "uploadkit demo"
    assert page.locator("#empty").is_visible()
    page.evaluate(OBSERVER)

    # 1. A photo, unthrottled: it lands in the gallery with a real thumbnail.
    page.set_input_files("#file-input", files["photo"])
    page.wait_for_selector("#queue li[data-state=done]", timeout=30_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery .card img');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
    assert not page.locator("#empty").is_visible()

    # 2. The big PNG, throttled: the bar passes intermediate values, then done.
    cdp = _throttle(page, THROTTLE)
    started = time.monotonic()
    page.set_input_files("#file-input", files["big"])
    page.wait_for_selector("#queue li[data-state=uploading][data-percent]", timeout=30_000)
    page.wait_for_function("() => +(document.querySelector('#queue li').dataset.percent) >= 40", timeout=30_000)
    page.screenshot(path=artifact_path("demo-uploading.png"))
    page.wait_for_selector("#queue li[data-state=done] >> text=noise.png", timeout=60_000)
    took = time.monotonic() - started
    seen = [s for s in page.evaluate("window.__seen") if s["name"] == "noise.png"]
    percents = sorted({int(s["percent"]) for s in seen if s["percent"]})
    assert any(0 < p < 100 for p in percents), (percents, seen[:20])
    assert len([p for p in percents if 0 < p < 100]) >= 3, percents
    assert (seen[-1]["state"], seen[-1]["percent"]) == ("done", "100"), seen[-5:]
    states = [s["state"] for s in seen]
    assert "uploading" in states
    # Intermediate values came in order: the bar never went backwards.
    values = [int(s["percent"]) for s in seen if s["percent"]]
    assert values == sorted(values), " ".join(f'{round(s["t"])}:{s["state"]}:{s["percent"]}' for s in seen)
    size = os.path.getsize(files["big"])
    assert took >= 0.5 * size / THROTTLE, f"the throttle did not apply: {took:.2f} s for {size} bytes"
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    big_item = page.locator("#queue li", has_text="noise.png")
    assert big_item.locator(".bar > div").evaluate("e => e.style.width") == "100%"

    # Its thumbnail shows, decoded by the browser.
    card = page.locator("#gallery .card", has_text="noise.png")
    card.locator("img").wait_for()
    page.wait_for_function("(c) => { const i = c.querySelector('img'); return i.complete && i.naturalWidth > 0; }",
                           arg=card.element_handle(), timeout=15_000)
    natural = card.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert max(natural) <= 400 and min(natural) > 0

    # 3. "Open original" serves the very bytes that were picked.
    href = card.locator("a", has_text="Open original").get_attribute("href")
    original = requests.get(demo.url + href, timeout=30)
    assert original.status_code == 200
    with open(files["big"], "rb") as f:
        assert hashlib.sha256(original.content).digest() == hashlib.sha256(f.read()).digest()
    key = card.get_attribute("data-key")
    assert key in _stored(storage)
    thumbs = [k for k in _stored(storage) if k.startswith(key.rsplit(".", 1)[0] + ".")]
    assert len(thumbs) == 3, thumbs  # the original and its two thumbnails

    # 4. Delete: the card goes, and so do the original and its thumbnails.
    card.locator("button", has_text="Delete").click()
    card.wait_for(state="detached", timeout=10_000)
    assert not [k for k in _stored(storage) if k.startswith(key.rsplit(".", 1)[0] + ".")]
    assert requests.get(demo.url + href, timeout=10).status_code == 404
    assert page.locator("#gallery .card").count() == 1  # the photo stays

    # 5. A file over the limit: refused, and said in words in its queue item.
    page.set_input_files("#file-input", files["huge"])
    failed = page.locator("#queue li[data-state=error]", has_text="too-big.jpg")
    failed.wait_for(timeout=30_000)
    message = failed.locator(".state").inner_text()
    assert "too-big.jpg" in message and "24.0 MiB" in message, message
    assert page.locator("#gallery .card").count() == 1
    assert not [k for k in _stored(storage) if "too-big" in k]

    page.set_input_files("#file-input", files["far"])
    failed = page.locator("#queue li[data-state=error]", has_text="far-too-big.bin")
    failed.wait_for(timeout=30_000)
    message = failed.locator(".state").inner_text()
    assert "far-too-big.bin" in message and "24.0 MiB" in message, message
    assert not [k for k in _stored(storage) if "far-too-big" in k]

    # The page after all this, for people to look at.
    page.wait_for_timeout(400)  # let the bars' width transitions end
    page.screenshot(path=artifact_path("demo.png"), full_page=True)
    assert page.js_errors == []
