"""A handler of your own: gzip every uploaded file on the fly.

It sits before the sink, hands on compressed bytes instead of the client's,
and flushes the gzip trailer at the end of each file. sha256 is still that of
the original bytes, because the hashing handler runs before it.

    from uploadkit import UploadMiddleware
    from examples.gzip_handler import GzipHandler

    def handlers(environ):
        chain = middleware.default_handlers(environ)
        chain.insert(-2, GzipHandler())          # before the memory and temp file sinks
        return chain

    middleware = UploadMiddleware(app, handlers=handlers)
"""
from __future__ import annotations

import zlib
from typing import Optional

from uploadkit import FileInfo, UploadHandler


class GzipHandler(UploadHandler):
    def __init__(self, level: int = 6) -> None:
        self.level = level

    def file_start(self, info: FileInfo) -> None:
        # wbits=31: a gzip header and trailer, so `gunzip` reads the stored file.
        self.compressor = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        info.extra["encoding"] = "gzip"

    def receive(self, info: FileInfo, chunk: bytes) -> Optional[bytes]:
        return self.compressor.compress(chunk) or None  # None: nothing to pass on yet

    def flush(self, info: FileInfo) -> Optional[bytes]:
        return self.compressor.flush()
