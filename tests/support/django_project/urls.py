from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("upload/", views.upload_document),
    path("echo/", views.echo),
    path("small/", views.small),
    path("protected/", views.protected),
    path("remote/", views.remote_upload),
    path("upload/tus/<str:upload_id>", views.tus_finished),
]
