"""The ``uploadkit`` command: ``uploadkit demo`` serves the demo upload site;
``uploadkit cleanup`` removes what killed workers left behind."""

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

    clean = sub.add_parser(
        "cleanup", help="remove temp files, temp keys and S3 multipart uploads left by interrupted uploads",
        description="Remove what uploads interrupted without cleanup (a killed worker) left behind: "
                    "uploadkit-*.part files in the tempdirs, pending writes in the storage's temp area, "
                    "and S3 multipart uploads in the storage's temp area that were never completed. "
                    "Only leftovers older than --older-than are touched: make it longer than your "
                    "longest upload.")
    clean.add_argument("--tempdir", action="append", default=[], metavar="DIR",
                       help="a directory where uploadkit writes temp files (repeatable)")
    clean.add_argument("--storage", default=None, metavar="URL",
                       help="the storage root, as given to Storage(): a path, s3://bucket/prefix, ...")
    clean.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an fsspec storage option (repeatable); VALUE is read as JSON when it "
                            "parses, e.g. endpoint_url=http://127.0.0.1:9000 or "
                            "client_kwargs='{\"region_name\": \"eu-west-1\"}'")
    clean.add_argument("--tus-dir", action="append", default=[], metavar="DIR",
                       help="an upload area set with TusSettings(directory=...) (repeatable): its expired "
                            "resumable uploads are removed")
    clean.add_argument("--temp-area", default=".uploadkit-tmp", metavar="NAME",
                       help="the storage's temp_dir (default .uploadkit-tmp)")
    clean.add_argument("--older-than", default="1h", metavar="AGE",
                       help="only leftovers at least this old: 90s, 30m, 1h, 1h30m, 2d (default 1h)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")

    args = parser.parse_args(argv)
    if args.command == "cleanup":
        return _cleanup(parser, args)
    if args.command == "demo":
        from .demo import serve

        return serve(host=args.host, port=args.port, storage_url=args.storage,
                     memcached=args.memcached, max_file_size=args.max_file_size,
                     tempdir=args.tempdir)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _cleanup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .cleanup import cleanup, options_from, parse_duration

    try:
        older_than = parse_duration(args.older_than)
        options = options_from(args.storage_option)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.tempdir and not args.storage and not args.tus_dir:
        parser.error("cleanup needs --tempdir DIR and/or --storage URL (or --tus-dir DIR)")
    if options and not args.storage:
        parser.error("--storage-option needs --storage")
    storage = None
    if args.storage:
        from .storage import Storage

        storage = Storage(args.storage, storage_options=options or None, temp_dir=args.temp_area)
    report = cleanup(tempdirs=args.tempdir, storage=storage, older_than=older_than, dry_run=args.dry_run,
                     tus_dirs=args.tus_dir)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
