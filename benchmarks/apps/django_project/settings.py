"""Settings of the benchmark's Django project: defaults wherever uploads are concerned."""

from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.apps import bench_tmpdir

SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "benchmarks.apps.django_project.urls"
INSTALLED_APPS: List[str] = []
MIDDLEWARE: List[str] = []
DATABASES: Dict[str, Any] = {}
USE_TZ = True
WSGI_APPLICATION = "benchmarks.apps.django_project.wsgi.application"
# Django's default handlers and FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB): a big
# file goes to a temp file, here in the benchmark's temp dir.
FILE_UPLOAD_TEMP_DIR = bench_tmpdir()
