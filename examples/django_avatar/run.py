"""The avatar example in one command: creates its database, then serves.

    python examples/django_avatar/run.py            # http://127.0.0.1:8002/

A Django project with one app: a profile with an ``ImageField``, a form whose
upload shows an AJAX progress bar (``uploadkit.js``, served by uploadkit's
progress route), thumbnails of 150x150 and 200x200, originals wider than
1024 px scaled down while they stream in, files saved under
``profile/<user>/`` with Django's own renaming when a name is taken.

There is no login: ``/profile/<name>/`` is the profile of a demo user of that
name, created on first visit (``/`` goes to ``alice``).

Options: ``--port`` (0 picks a free one; the URL is printed first),
``--host``, ``--data DIR`` (database, media and temp files; default: a
directory in the system's temp area, kept between runs).

It serves Django through :func:`uploadkit.contrib.django.get_wsgi_application`
on uploadkit's small threaded server, so bodies stream and the progress route
is answered while an upload arrives. In production, point gunicorn (or any
WSGI server) at that same application.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="uploadkit's Django avatar example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--data", default=None, help="where the database and files go")
    args = parser.parse_args(argv)

    if args.data:
        os.environ["AVATAR_DATA"] = os.path.abspath(args.data)
    # This example always runs with its own settings, whatever the shell says.
    os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
    if HERE not in sys.path:
        sys.path.insert(0, HERE)

    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    for sub in ("media", "tmp"):
        os.makedirs(os.path.join(settings.DATA_DIR, sub), exist_ok=True)
    call_command("migrate", interactive=False, verbosity=0)

    from uploadkit.contrib.django import get_wsgi_application
    from uploadkit.server import make_threaded_server, serve_until_stopped

    application = get_wsgi_application()
    server = make_threaded_server(application, args.host, args.port, verbose=True)
    port = server.server_address[1]
    print(f"django_avatar: http://{args.host}:{port}/", flush=True)
    print(f"  data (sqlite, media, temp files) in {settings.DATA_DIR}", flush=True)
    return serve_until_stopped(server)


if __name__ == "__main__":
    sys.exit(main())
