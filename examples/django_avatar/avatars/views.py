from __future__ import annotations

import os
from typing import Dict, Iterable

from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .forms import AvatarForm
from .models import Profile

#: Thumbnail box -> the model field that keeps it.
THUMBNAIL_FIELDS = {"150x150": "avatar_150", "200x200": "avatar_200"}


def profile(request: HttpRequest, username: str) -> HttpResponse:
    """Show a profile and take a new avatar (no login: every name is a demo user)."""
    user, _ = get_user_model().objects.get_or_create(username=username)
    prof, _ = Profile.objects.get_or_create(user=user)
    status = 200
    if request.method == "POST":
        old = [f.name for f in prof.image_fields() if f]
        form = AvatarForm(request.POST, request.FILES, instance=prof)
        if form.is_valid():
            prof = form.save()  # the original, already scaled down by uploadkit, gets its final name
            _save_thumbnails(prof, request.FILES["avatar"].uploadkit.extra.get("thumbnails") or {})
            kept = {f.name for f in prof.image_fields() if f}
            _delete(name for name in old if name not in kept)
            return redirect("profile", username=username)  # post/redirect/get
        status = 400
    else:
        form = AvatarForm(instance=prof)
    return render(request, "avatars/profile.html", {"profile": prof, "form": form}, status=status)


def _save_thumbnails(prof: Profile, thumbnails: Dict[str, object]) -> None:
    """Store each thumbnail beside the original, named after its final name:
    ``profile/alice/me_Ab3dE5f.jpg`` -> ``profile/alice/me_Ab3dE5f.150x150.jpg``."""
    stem = os.path.splitext(os.path.basename(prof.avatar.name))[0]
    for size, field_name in THUMBNAIL_FIELDS.items():
        field = getattr(prof, field_name)
        thumb = thumbnails.get(size)
        if thumb is None:  # not an image uploadkit could read: the page shows the original
            field.name = ""
            continue
        field.save(f"{stem}.{size}.{thumb.extension}", ContentFile(thumb.data), save=False)
    prof.save()


def _delete(names: Iterable[str]) -> None:
    for name in names:
        default_storage.delete(name)
