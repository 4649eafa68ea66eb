"""The front-end script shipped in the package parses as JavaScript."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources


def test_uploadkit_js_is_valid_javascript() -> None:
    node = shutil.which("node")
    assert node, "node is needed to check the front-end script (tools/test.sh installs nodejs)"
    script = resources.files("uploadkit") / "static" / "uploadkit.js"
    with resources.as_file(script) as path:
        result = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
