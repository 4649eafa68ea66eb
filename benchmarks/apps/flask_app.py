"""Flask's default upload path: ``request.files`` (Werkzeug's parser, spooled temp files).

Served as ``benchmarks.apps.flask_app:app``.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from flask import Flask, request

app = Flask(__name__)


@app.route("/upload", methods=["GET", "POST"])
def upload() -> Dict[str, Any]:
    if request.method != "POST":
        return {"ready": True}
    f = request.files["file"]
    f.stream.seek(0, os.SEEK_END)
    return {"size": f.stream.tell()}
