from __future__ import annotations

from django.conf import settings
from django.urls import path, re_path
from django.views.generic import RedirectView
from django.views.static import serve

from avatars import views

urlpatterns = [
    path("", RedirectView.as_view(url="/profile/alice/")),
    path("profile/<slug:username>/", views.profile, name="profile"),
    # The example serves its own media; a real site lets the web server do it.
    re_path(r"^media/(?P<path>.+)$", serve, {"document_root": settings.MEDIA_ROOT}),
]
