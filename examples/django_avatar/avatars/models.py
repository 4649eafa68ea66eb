from __future__ import annotations

from django.conf import settings
from django.db import models


def avatar_path(profile: "Profile", filename: str) -> str:
    """``profile/<user>/<name>``: Django's storage renames it if taken (``name_<7 chars>.jpg``)."""
    return f"profile/{profile.user.username}/{filename}"


class Profile(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    avatar = models.ImageField(upload_to=avatar_path, blank=True, width_field="avatar_width",
                               height_field="avatar_height")
    avatar_width = models.PositiveIntegerField(null=True, blank=True)
    avatar_height = models.PositiveIntegerField(null=True, blank=True)
    avatar_150 = models.ImageField(upload_to=avatar_path, blank=True)
    avatar_200 = models.ImageField(upload_to=avatar_path, blank=True)

    def image_fields(self) -> list:
        return [self.avatar, self.avatar_150, self.avatar_200]

    def __str__(self) -> str:
        return f"profile of {self.user.username}"
