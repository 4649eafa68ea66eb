"""Settings of the test project: everything lives under ``UPLOADKIT_DJANGO_DIR``."""

from __future__ import annotations

import os

BASE_DIR = os.environ["UPLOADKIT_DJANGO_DIR"]

SECRET_KEY = "tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.support.django_project.urls"
INSTALLED_APPS = ["tests.support.django_project"]
MIDDLEWARE = [
    "uploadkit.contrib.django.UploadKitMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.path.join(BASE_DIR, "db.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
MEDIA_ROOT = os.path.join(BASE_DIR, "media")
MEDIA_URL = "/media/"
TEMPLATES: list = []
LOGGING_CONFIG = None

UPLOADKIT = {
    "TEMPDIR": os.path.join(BASE_DIR, "tmp"),
    "PROGRESS": False,
    # Files over 1 KiB go to temp files, so a test image exercises the move.
    "MEMORY_THRESHOLD": 1024,
    "LIMITS": {"max_file_size": 4 << 20},
}
