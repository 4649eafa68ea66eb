"""The Django avatar example's form in headless Chromium: the AJAX progress bar
(``<form data-uploadkit>`` and ``uploadkit.js``) moves while the file is sent,
the redirect after the post is followed, and the new avatar's thumbnails show;
a file that is not an image gets the server's refusal in words.

The page navigates when the upload is done, so progress is recorded through
the browser console (a MutationObserver logs each change), which outlives the page.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, List

import pytest
from PIL import Image

from tests.support.browser import REPO_ROOT, Command, artifact_path, chromium, page, python_command  # noqa: F401

MiB = 1 << 20

OBSERVER = """() => {
  const bar = document.querySelector('[data-uploadkit-bar]');
  const line = document.querySelector('[data-uploadkit-status]');
  const log = () => console.log('uk-progress|' + (bar.hasAttribute('value') ? bar.value : '') + '|' + bar.max + '|' + line.textContent);
  new MutationObserver(log).observe(bar, {attributes: true});
  new MutationObserver(log).observe(line, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def avatar_site(tmp_path_factory: Any) -> Iterator[Any]:
    data = str(tmp_path_factory.mktemp("django-avatar-browser"))
    with Command(python_command(os.path.join(REPO_ROOT, "examples", "django_avatar", "run.py"),
                                "--port", "0", "--data", data)) as cmd:
        cmd.media = os.path.join(data, "media")  # type: ignore[attr-defined]
        yield cmd


def test_avatar_form_with_progress_bar_in_chromium(avatar_site: Any, page: Any, tmp_path: Any) -> None:  # noqa: F811
    photo = tmp_path / "portrait.jpg"
    noise = Image.effect_noise((2400, 1600), 64).convert("RGB")  # grain: a JPEG of a few MiB
    noise.save(photo, "JPEG", quality=92)
    size = os.path.getsize(photo)
    assert 2 * MiB < size < 10 * MiB

    messages: List[str] = []
    page.on("console", lambda msg: messages.append(msg.text) if msg.text.startswith("uk-progress|") else None)
    page.goto(avatar_site.url + "/profile/grace/")
    assert "No avatar yet" in page.content()
    page.evaluate(OBSERVER)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 2 * MiB})
    page.set_input_files("input[name=avatar]", str(photo))
    with page.expect_navigation(timeout=30_000):
        page.click("button[type=submit]")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    cdp.detach()

    # The bar passed through intermediate values while the file was sent.
    fractions = []
    for m in messages:
        _, value, maximum, _text = m.split("|", 3)
        if value and float(maximum) > 1:
            fractions.append(float(value) / float(maximum))
    assert any(0 < f < 1 for f in fractions), messages[:20]
    assert any(re.search(r"Uploading [1-9][0-9]?%", m) for m in messages), messages[:20]

    # The page the redirect led to shows the new avatar, thumbnails decoded by the browser.
    assert page.url == avatar_site.url + "/profile/grace/"
    for box in (200, 150):
        img = page.locator(f"#avatar-{box}")
        img.wait_for()
        page.wait_for_function("(i) => i.complete && i.naturalWidth > 0", arg=img.element_handle())
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [box, box]
    assert "1024 \u00d7 683" in page.locator("figure", has_text="original").inner_text()
    names = sorted(os.listdir(os.path.join(avatar_site.media, "profile", "grace")))
    assert names == ["portrait.150x150.jpg", "portrait.200x200.jpg", "portrait.jpg"]
    page.screenshot(path=artifact_path("django-avatar.png"), full_page=True)

    # Not an image: the status line says why, in the server's words.
    doc = tmp_path / "resume.pdf"
    doc.write_bytes(b"%PDF-1.4\n" + b"x" * 20_000)
    page.set_input_files("input[name=avatar]", str(doc))
    page.click("button[type=submit]")
    status = page.locator("[data-uploadkit-status]")
    page.wait_for_function("(o) => o.textContent.startsWith('Upload failed')", arg=status.element_handle(),
                           timeout=15_000)
    text = status.inner_text()
    assert "resume.pdf" in text and "application/pdf" in text and "415" in text, text + avatar_site.output
    assert sorted(os.listdir(os.path.join(avatar_site.media, "profile", "grace"))) == names
    assert page.js_errors == []
