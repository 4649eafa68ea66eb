"""Capture multipart bodies from real HTTP clients, byte for byte.

Runs a tiny raw-socket server on 127.0.0.1 that reads one request, saves its
body and headers, and answers 204. Each client (curl, requests, httpx) posts a
few forms to it. For every case the script writes ``<out>/<client>/<case>.body``
(the raw bytes) and ``<case>.json`` (the Content-Type header, the client and its
version, the command used, and the fields and files the form held, with the
sha256 of each file), so a test can check the parser against what real clients
send and anyone can remake the captures:

    python tools/capture.py            # writes tests/data/<client>/
    python tools/capture.py --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "tests", "data")


# -- the forms --------------------------------------------------------------------

def small_png() -> bytes:
    """A 4x4 PNG drawn in code (deterministic: Pillow writes the same bytes each time)."""
    from PIL import Image

    im = Image.new("RGB", (4, 4), (255, 255, 255))
    for i in range(4):
        im.putpixel((i, i), (200, 0, 0))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


Field = Tuple[str, str]
File = Tuple[str, str, str, bytes]  # field, filename, content type, data

CASES: Dict[str, Tuple[List[Field], List[File]]] = {
    "text_unicode": ([("title", "Grüße, 世界"), ("note", "line one\r\nline two"), ("empty", "")], []),
    "small_png": ([("caption", "a dot")], [("image", "dot.png", "image/png", small_png())]),
    "two_files_one_field": ([], [("docs", "a.txt", "text/plain", b"first file\n" * 20),
                                 ("docs", "b.bin", "application/octet-stream", bytes(range(256)) * 4)]),
    "empty_file": ([("before", "x")], [("f", "empty.txt", "text/plain", b"")]),
    "unicode_filename": ([], [("f", "résumé 日本.txt", "text/plain", "contenu été\n".encode())]),
}


# -- the capture server ---------------------------------------------------------------

class Capture:
    """Accepts one connection at a time on 127.0.0.1 and keeps what it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/capture"

    def receive_one(self, result: Dict[str, Any]) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    raise RuntimeError("client closed before the end of its headers")
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "content-length" in headers:
                need = int(headers["content-length"])
                while len(rest) < need:
                    data = conn.recv(65536)
                    if not data:
                        raise RuntimeError("client closed before the end of its body")
                    rest += data
                body = rest[:need]
            else:
                raise RuntimeError("only Content-Length bodies are captured")
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        result.update(request_line=lines[0], headers=headers, body=body)

    def run(self, send: Any) -> Dict[str, Any]:
        result: Dict[str, Any] = {}
        t = threading.Thread(target=self.receive_one, args=(result,))
        t.start()
        send(self.url)
        t.join(15)
        if "body" not in result:
            raise RuntimeError("nothing captured")
        return result

    def close(self) -> None:
        self.sock.close()


# -- the clients ----------------------------------------------------------------------

def curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def send_curl(url: str, fields: List[Field], files: List[File], workdir: str) -> str:
    args = ["curl", "-sS", "--max-time", "10", "-o", os.devnull]
    for name, value in fields:
        # --form-string: the value is sent as is (no @file or <file magic).
        args += ["--form-string", f"{name}={value}"]
    for name, filename, ctype, data in files:
        path = os.path.join(workdir, filename)
        with open(path, "wb") as f:
            f.write(data)
        args += ["-F", f"{name}=@{filename};type={ctype}"]
    args.append(url)
    subprocess.run(args, cwd=workdir, check=True, timeout=20)
    return shlex.join(args[:-1] + ["<url>"])


def send_requests(url: str, fields: List[Field], files: List[File], workdir: str) -> str:
    import requests

    if not files:  # data= alone would be urlencoded: (None, value) parts force multipart
        requests.post(url, files=[(n, (None, v)) for n, v in fields], timeout=10)
        return "requests.post(url, files=[(field, (None, value)), ...])"
    requests.post(url, data=fields, files=[(n, (fn, d, ct)) for n, fn, ct, d in files], timeout=10)
    return ("requests.post(url, data=<fields as a list of pairs>, "
            "files=[(field, (filename, data, content_type)), ...])")


def send_httpx(url: str, fields: List[Field], files: List[File], workdir: str) -> str:
    import httpx

    data: Dict[str, List[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    with httpx.Client(timeout=10) as client:
        if not files:  # data= alone would be urlencoded: (None, value) parts force multipart
            client.post(url, files=[(n, (None, v)) for n, v in fields])
            return "httpx.Client().post(url, files=[(field, (None, value)), ...])"
        client.post(url, data=data, files=[(n, (fn, d, ct)) for n, fn, ct, d in files])
    return ("httpx.Client().post(url, data=<fields as a dict of lists>, "
            "files=[(field, (filename, data, content_type)), ...])")


def client_versions() -> Dict[str, str]:
    import httpx
    import requests

    return {"curl": curl_version(), "requests": requests.__version__, "httpx": httpx.__version__}


SENDERS = {"curl": send_curl, "requests": send_requests, "httpx": send_httpx}


def expected(client: str, fields: List[Field], files: List[File]) -> Dict[str, Any]:
    if client == "httpx" and files:  # a dict of lists: fields grouped by name, in first-seen order
        order: Dict[str, List[str]] = {}
        for n, v in fields:
            order.setdefault(n, []).append(v)
        fields = [(n, v) for n, vs in order.items() for v in vs]
    return {
        "fields": [[n, v] for n, v in fields],
        "files": [{"field": n, "filename": fn, "content_type": ct, "size": len(d),
                   "sha256": hashlib.sha256(d).hexdigest()} for n, fn, ct, d in files],
    }


def capture_all(out: str, clients: Optional[List[str]] = None) -> None:
    versions = client_versions()
    server = Capture()
    try:
        for client in clients or list(SENDERS):
            os.makedirs(os.path.join(out, client), exist_ok=True)
            for case, (fields, files) in CASES.items():
                command: List[str] = []
                with tempfile.TemporaryDirectory() as workdir:
                    got = server.run(lambda url: command.append(SENDERS[client](url, fields, files, workdir)))
                base = os.path.join(out, client, case)
                with open(base + ".body", "wb") as f:
                    f.write(got["body"])
                meta = {
                    "client": client,
                    "client_version": versions[client],
                    "command": command[0],
                    "request_line": got["request_line"],
                    "content_type": got["headers"]["content-type"],
                    "content_length": int(got["headers"]["content-length"]),
                    "user_agent": got["headers"].get("user-agent", ""),
                    "body_sha256": hashlib.sha256(got["body"]).hexdigest(),
                    "expected": expected(client, fields, files),
                }
                with open(base + ".json", "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=2, ensure_ascii=False)
                    f.write("\n")
                print(f"{client}/{case}: {len(got['body'])} bytes")
    finally:
        server.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for <client>/<case>.{body,json}")
    parser.add_argument("--client", action="append", choices=sorted(SENDERS), help="only these clients")
    args = parser.parse_args(argv)
    capture_all(args.out, args.client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
