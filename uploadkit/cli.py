"""The ``uploadkit`` command: ``uploadkit demo`` serves the demo upload site."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="uploadkit", description="Streaming uploads for WSGI apps.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve the demo upload site on 127.0.0.1")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    demo.add_argument("--storage", default=None,
                      help="fsspec URL where files go (default: a new local directory, named on start-up)")
    demo.add_argument("--memcached", default=None, metavar="HOST:PORT",
                      help="publish progress to memcached instead of process memory")
    demo.add_argument("--max-file-size", type=int, default=200 * 2**20, metavar="BYTES",
                      help="largest file accepted (default 200 MiB)")
    demo.add_argument("--tempdir", default=None, help="where temp files go")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import serve

        return serve(host=args.host, port=args.port, storage_url=args.storage,
                     memcached=args.memcached, max_file_size=args.max_file_size,
                     tempdir=args.tempdir)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
