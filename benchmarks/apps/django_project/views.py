from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt  # type: ignore[untyped-decorator]
def upload(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"ready": True})
    f = request.FILES["file"]
    return JsonResponse({"size": f.size})
