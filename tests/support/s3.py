"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1.

``s3_server`` (session) starts :class:`moto.server.ThreadedMotoServer` on a free
port with dummy credentials in the environment; failing to start it fails the
test (CI installs ``moto[server]``); its conditional writes are atomic, as on
S3 (see :mod:`tests.support.moto_server`). ``s3_bucket`` creates a fresh bucket per
test. ``s3_options`` are the fsspec ``storage_options`` that reach it, with
s3fs's instance cache skipped so no test sees another's cached listings.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import pytest

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )

    def options(self, **extra: Any) -> Dict[str, Any]:
        """fsspec storage_options for s3fs pointed at this server."""
        opts: Dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": "us-east-1"},
            "skip_instance_cache": True,
            "use_listings_cache": False,
        }
        opts.update(extra)
        return opts

    def pending_uploads(self, bucket: str) -> List[Dict[str, Any]]:
        """Multipart uploads started and neither completed nor aborted."""
        out = self.client().list_multipart_uploads(Bucket=bucket)
        return list(out.get("Uploads", []))

    def keys(self, bucket: str) -> List[str]:
        client = self.client()
        keys: List[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    from tests.support.moto_server import make_conditional_writes_atomic

    make_conditional_writes_atomic()
    saved = {k: os.environ.get(k) for k in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}")
                time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for one test."""
    name = f"uk-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
