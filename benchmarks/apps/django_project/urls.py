from __future__ import annotations

from django.urls import path

from .views import upload, upload_sha256

urlpatterns = [path("upload", upload), path("upload-sha256", upload_sha256)]
