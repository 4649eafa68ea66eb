"""Plain WSGI, no framework: run with `python examples/wsgi_minimal.py`, then
`curl -F file=@README.md http://127.0.0.1:8001/`."""
import json
from wsgiref.simple_server import make_server

from uploadkit import Limits, UploadMiddleware


def app(environ, start_response):
    files = environ.get("uploadkit.files", {})
    body = json.dumps({name: [f.filename, f.size, f.sha256] for name, f in files.items()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


if __name__ == "__main__":
    make_server("127.0.0.1", 8001, UploadMiddleware(app, limits=Limits(max_file_size=10 * 2**20))).serve_forever()
