from __future__ import annotations

from django.db import models


class Document(models.Model):
    title = models.CharField(max_length=100)
    photo = models.ImageField(upload_to="photos/%Y/")
    attachment = models.FileField(upload_to="docs/", blank=True)


class RemoteDocument(models.Model):
    #: The tests point this field's ``storage`` at an FsspecStorage on S3.
    photo = models.ImageField(upload_to="remote/")
