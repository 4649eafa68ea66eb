"""Settings of the avatar example: one app, sqlite, everything under one data directory.

``run.py`` sets ``AVATAR_DATA`` (``--data``); the default is a directory in the
system's temp area, kept between runs.
"""

from __future__ import annotations

import os
import tempfile

DATA_DIR = os.environ.get("AVATAR_DATA") or os.path.join(tempfile.gettempdir(), "uploadkit-django-avatar")

SECRET_KEY = "example-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "urls"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "avatars",
]
MIDDLEWARE = [
    # Puts the files uploadkit streamed where Django's request.FILES looks.
    "uploadkit.contrib.django.UploadKitMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.path.join(DATA_DIR, "db.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
MEDIA_ROOT = os.path.join(DATA_DIR, "media")
MEDIA_URL = "/media/"

#: The widest original kept; wider ones are scaled down while they stream in.
AVATAR_MAX_WIDTH = 1024

UPLOADKIT = {
    "TEMPDIR": os.path.join(DATA_DIR, "tmp"),
    "LIMITS": {
        "max_file_size": 10 << 20,
        "max_files": 1,
        "allowed_types": ["image/jpeg", "image/png", "image/webp", "image/gif"],
    },
    "THUMBNAILS": {
        # Square avatars: scaled to cover the box, then centre-cropped.
        "sizes": [(150, 150), (200, 200)],
        "mode": "crop",
        # Only the width is bounded: 65535 is the tallest side a JPEG can have.
        "max_original": (AVATAR_MAX_WIDTH, 65535),
    },
    # Progress for the AJAX bar, in process memory (a single-process server).
    "PROGRESS": "memory",
}
