"""Views as an ordinary Django app writes them."""

from __future__ import annotations

import os
from typing import Any, Dict

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.csrf import csrf_exempt

from uploadkit.contrib.django import upload_limits

from .forms import DocumentForm, RemoteDocumentForm

def describe(f: Any) -> Dict[str, Any]:
    uk = getattr(f, "uploadkit", None)
    return {
        "class": type(f).__name__, "name": f.name, "size": f.size, "content_type": f.content_type,
        "charset": f.charset, "sha256": uk.sha256 if uk else None,
        "key": uk.key if uk else None, "thumbnails": uk.thumbnails if uk else None,
        "temporary_file_path": f.temporary_file_path() if hasattr(f, "temporary_file_path") else None,
        "data": f.read().decode("latin-1") if f.size < 256 else None,
    }


@csrf_exempt
def upload_document(request: HttpRequest) -> HttpResponse:
    form = DocumentForm(request.POST, request.FILES)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
    photo = request.FILES["photo"]
    temp = photo.temporary_file_path() if hasattr(photo, "temporary_file_path") else None
    inode = os.stat(temp).st_ino if temp else None
    doc = form.save()
    return JsonResponse({
        "id": doc.pk, "title": doc.title,
        "photo": doc.photo.name, "photo_path": doc.photo.path, "photo_url": doc.photo.url,
        "photo_size": [doc.photo.width, doc.photo.height],
        "attachment": doc.attachment.name if doc.attachment else None,
        "attachment_path": doc.attachment.path if doc.attachment else None,
        "temp_path": temp, "temp_inode": inode,
        "sha256": photo.uploadkit.sha256, "content_type": photo.content_type,
    }, status=201)


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    return JsonResponse({
        "fields": {k: request.POST.getlist(k) for k in request.POST},
        "files": {k: [describe(f) for f in request.FILES.getlist(k)] for k in request.FILES},
    })


@csrf_exempt
@upload_limits(max_file_size=1024)
def small(request: HttpRequest) -> HttpResponse:
    return echo(request)


def protected(request: HttpRequest) -> HttpResponse:
    """CSRF-protected: the middleware reads the token from request.POST."""
    if request.method == "GET":
        return JsonResponse({"token": get_token(request)})
    return echo(request)


@csrf_exempt
def remote_upload(request: HttpRequest) -> HttpResponse:
    form = RemoteDocumentForm(request.POST, request.FILES)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
    doc = form.save()
    return JsonResponse({"photo": doc.photo.name, "size": doc.photo.size, "url": doc.photo.url}, status=201)


def refused(request: HttpRequest, exc: Any) -> HttpResponse:
    """UPLOADKIT["ERROR_VIEW"] in the tests that set it."""
    return HttpResponse(f"<h1>Upload refused</h1><p>{exc.code}: {exc.message}</p>",
                        content_type="text/html")


#: What tus_finished was handed (tus answers the client itself, not with the view's body).
TUS_SEEN: list = []


@csrf_exempt
def tus_finished(request: HttpRequest, upload_id: str) -> HttpResponse:
    """Called on the request that completes a tus upload (a PATCH)."""
    TUS_SEEN.append({"upload_id": upload_id, "method": request.method,
                     "files": {k: [describe(f) for f in request.FILES.getlist(k)] for k in request.FILES}})
    return JsonResponse(TUS_SEEN[-1])
