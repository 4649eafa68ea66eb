"""What a project's wsgi.py becomes with uploadkit (served by gunicorn in the tests)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.support.django_project.settings")

from uploadkit.contrib.django import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
