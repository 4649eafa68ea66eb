"""The app gunicorn serves in tests that need a server which decodes chunked
request bodies. It answers with JSON describing what the app was handed.

Configured by environment variables so each test chooses:
``UPLOADKIT_TEST_TEMPDIR`` (temp files go there; every file is kept in one) and
``UPLOADKIT_TEST_MAX_REQUEST`` (``Limits.max_request_size``, optional),
``UPLOADKIT_TEST_IDLE_TIMEOUT`` and ``UPLOADKIT_TEST_MIN_RATE`` (``Limits.idle_timeout``
and ``Limits.min_rate``, optional).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterable

import webob

from uploadkit.limits import Limits
from uploadkit.middleware import UploadMiddleware


def describe(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    tempdir = os.environ.get("UPLOADKIT_TEST_TEMPDIR")
    files = environ.get("uploadkit.files")
    form = environ.get("uploadkit.form")
    out: Dict[str, Any] = {
        "intercepted": files is not None,
        "input_terminated": bool(environ.get("wsgi.input_terminated")),
        "temp_files_during_call": sorted(os.listdir(tempdir)) if tempdir else None,
    }
    if files is None:
        out["body_sha256"] = hashlib.sha256(environ["wsgi.input"].read()).hexdigest()
    else:
        out["form"] = list(form.items())
        out["files"] = [
            {"field": k, "filename": f.filename, "size": f.size, "sha256": f.sha256,
             "content_sha256": hashlib.sha256(f.read()).hexdigest()}
            for k, f in files.items()
        ]
        out["post"] = list(webob.Request(environ).POST.items())
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _limits() -> Limits:
    raw = os.environ.get("UPLOADKIT_TEST_MAX_REQUEST")
    options: Dict[str, Any] = {"max_request_size": int(raw)} if raw else {}
    for name, key in (("idle_timeout", "UPLOADKIT_TEST_IDLE_TIMEOUT"), ("min_rate", "UPLOADKIT_TEST_MIN_RATE")):
        if os.environ.get(key):
            options[name] = float(os.environ[key])
    return Limits(**options)


app = UploadMiddleware(describe, progress=False, tempdir=os.environ.get("UPLOADKIT_TEST_TEMPDIR"),
                       limits=_limits(), memory_threshold=0)
