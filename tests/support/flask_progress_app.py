"""A Flask app behind uploadkit's Flask adapter, progress in memcached: served by
gunicorn with several workers in tests, so polls cross processes."""

import os
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import webob  # noqa: F401  (imports the deprecated cgi module)

from flask import Flask, request

from uploadkit.contrib.flask import UploadKit

app = Flask(__name__)
app.config["UPLOADKIT_PROGRESS"] = "memcached://" + os.environ["UPLOADKIT_TEST_MEMCACHED"]
app.config["UPLOADKIT_TEMPDIR"] = os.environ["UPLOADKIT_TEST_TMP"]
UploadKit(app)


@app.post("/upload")
def upload() -> dict:
    f = request.files["f"]
    return {"pid": os.getpid(), "sha256": f.uploadkit.sha256, "size": f.uploadkit.size}
