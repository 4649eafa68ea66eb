from __future__ import annotations

import hashlib

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt  # type: ignore[untyped-decorator]
def upload(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"ready": True})
    f = request.FILES["file"]
    return JsonResponse({"size": f.size})


@csrf_exempt  # type: ignore[untyped-decorator]
def upload_sha256(request: HttpRequest) -> JsonResponse:
    """The same view given what uploadkit does by default: the file's sha256,
    read back from where Django's handlers put it (memory or its temp file)."""
    if request.method != "POST":
        return JsonResponse({"ready": True})
    f = request.FILES["file"]
    h = hashlib.sha256()
    for chunk in f.chunks():
        h.update(chunk)
    return JsonResponse({"size": f.size, "sha256": h.hexdigest()})
