"""Pyramid adapter: ``config.include("uploadkit.contrib.pyramid")``.

::

    # development.ini
    uploadkit.max_file_size = 10 MiB
    uploadkit.allowed_types = image/png image/jpeg application/pdf
    uploadkit.tempdir = /var/tmp/uploads
    uploadkit.progress = memory

    # views
    @view_config(route_name="upload", renderer="json", upload_limits={"max_file_size": 1 << 20})
    def upload(request):
        f = request.POST["file"]          # FieldStorage-like: .file .filename .type .length
        return {"sha256": f.uploadkit.sha256, "title": request.POST["title"]}

How it hooks in. A view deriver (``uploadkit_view``) wraps every view: when the
request is a multipart upload, it streams the body through uploadkit *before*
the view (and before Pyramid's CSRF check, after the permission check), with
the limits of that view, and fills ``request.POST`` (WebOb's parse cache) with
the text fields as strings and each file as an :class:`UploadKitFieldStorage`.
The body is thus read only by uploadkit, in constant memory. A tween serves
the progress status route (``uploadkit.progress_path``).

Settings (``uploadkit.<name>``, strings from the ini file are parsed): every
:class:`~uploadkit.limits.Limits` field (``max_file_size = 10485760`` or ``10 MiB``,
``allowed_types`` space or comma separated, ``none`` for unlimited), and every
:class:`~uploadkit.middleware.UploadMiddleware` argument (``tempdir``,
``progress = false|memory|memcached://host:port``, ``progress_path``,
``memory_threshold``, ``hash_md5 = true``, ``storage = s3://bucket/prefix`` with
``storage.<option>``, ``thumbnails.<option>``...).

Per-view limits: the ``upload_limits={...}`` view option, or the
:func:`upload_limits` decorator on the view callable.

Refusals are raised as their :class:`~uploadkit.errors.UploadError` type, so an
exception view renders them; the include registers one answering the JSON
error, which an ``@exception_view_config(UploadError)`` of the app overrides.

Resumable uploads (tus): ``uploadkit.tus_path = /upload/tus/`` turns them on,
and ``uploadkit.tus.<field>`` sets any other
:class:`~uploadkit.tusapp.TusSettings` field (``max_size = 2 GiB``,
``expire_after = 3600``, ``cors_origins`` space or comma separated,
``authorize``/``before_finish`` as dotted paths, ``handoff = false``,
``lock_store = memcached://host:port``). A tween serves the tus routes with the
engine's tus driver, before routing. On the request that completes an upload
the driver calls the rest of Pyramid: the view routed at
``<tus_path>{upload_id}`` (for PATCH and POST) finds the file in
``request.POST[field_name]``, and its error answer discards the file. Such a
view's ``upload_limits`` can only judge the whole file: ``max_file_size`` and
``allowed_types`` are checked then, before the view runs.

Caveat: a view *predicate* that reads ``request.POST`` (``request_param=``) runs
before any view deriver and would make WebOb parse the raw body; do not use
such predicates on upload routes.
"""

from __future__ import annotations

from typing import IO, Any, Callable, Dict, Iterable, List, Optional

from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from webob.multidict import MultiDict

from ..errors import FileTooLarge, UnsupportedType, UploadError, format_size
from ..files import UploadedFile
from ..limits import Limits
from ..middleware import FILES_KEY, FORM_KEY, UploadMiddleware
from ..tusapp import UPLOAD_ID_KEY
from . import (ERROR_KEY, ClosingIterator, _limit_overrides, apply_overrides, options_from_flat,
               stream_upload, upload_limits, view_overrides)

__all__ = ["includeme", "UploadKitFieldStorage", "upload_limits", "REGISTRY_KEY", "engine_of"]

#: Where the include keeps the configured :class:`UploadMiddleware` (``request.registry[...]``).
REGISTRY_KEY = "uploadkit"


class UploadKitFieldStorage:
    """One uploaded file as WebOb's ``cgi.FieldStorage`` presents it.

    ``file`` is opened lazily from uploadkit's file; ``filename`` is the
    sanitized name (the client's is ``uploadkit.raw_filename``); ``type`` the
    sniffed type; ``length`` the size in bytes; ``uploadkit`` uploadkit's
    :class:`~uploadkit.files.UploadedFile` (sha256, key, url, thumbnails).
    """

    def __init__(self, upload: UploadedFile) -> None:
        self.uploadkit = upload
        self.name = upload.field_name
        self.filename = upload.filename
        self.type = upload.content_type
        self.length = upload.size
        self.headers = upload.headers
        self.disposition = "form-data"
        self.disposition_options = {"name": upload.field_name, "filename": upload.filename}
        self.type_options: Dict[str, str] = {}
        part_type = upload.headers.get("Content-Type") if upload.headers is not None else None
        for param in (part_type or "").split(";")[1:]:
            key, eq, value = param.partition("=")
            if eq:
                self.type_options[key.strip().lower()] = value.strip().strip('"')
        self._file: Optional[IO[bytes]] = None

    @property
    def file(self) -> IO[bytes]:
        if self._file is None:
            self._file = self.uploadkit.open()
        return self._file

    @property
    def value(self) -> bytes:
        """All the bytes: convenient for small files; read ``file`` for large ones."""
        return self.uploadkit.read()

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        return f"UploadKitFieldStorage({self.name!r}, {self.filename!r}, {self.type!r}, {self.length})"


def engine_of(request: Request) -> UploadMiddleware:
    """The upload engine the include configured (options, progress store)."""
    return request.registry[REGISTRY_KEY]  # type: ignore[no-any-return]


def _install(request: Request) -> List[UploadKitFieldStorage]:
    environ = request.environ
    post: MultiDict = MultiDict()
    for name, value in environ[FORM_KEY].items():
        post.add(name, value)
    fields = []
    for name, upload in environ[FILES_KEY].items():
        field = UploadKitFieldStorage(upload)
        fields.append(field)
        post.add(name, field)
    # WebOb's own parse cache, keyed by the body object it describes.
    environ["webob._parsed_post_vars"] = (post, environ["wsgi.input"])
    return fields


def _close_after_response(request: Request, fields: List[UploadKitFieldStorage],
                          pipeline: Any) -> None:
    """Temp files live until the response body is sent (a view may stream one)."""
    state = {"wrapped": False}

    def release() -> None:
        for f in fields:
            f.close()
        pipeline.close()

    def on_response(req: Request, response: Response) -> None:
        state["wrapped"] = True
        response.app_iter = ClosingIterator(response.app_iter, release)

    def on_finished(req: Request) -> None:
        if not state["wrapped"]:  # no response (an exception went up): release now
            release()
    request.add_response_callback(on_response)
    request.add_finished_callback(on_finished)


def _check_finished(request: Request, limits: Limits) -> None:
    """A tus upload meets its view only once it is whole: the view's own size
    and type limits are checked then, and a refusal (rendered by the exception
    view) discards the file.

    :raises FileTooLarge: a file above the view's ``max_file_size``.
    :raises UnsupportedType: a file whose (sniffed) type the view does not allow.
    """
    for upload in request.environ[FILES_KEY].values():
        if limits.max_file_size is not None and upload.size > limits.max_file_size:
            raise FileTooLarge(f"file {upload.filename!r} is {format_size(upload.size)}; the limit is"
                               f" {format_size(limits.max_file_size)}", field=upload.field_name,
                               limit=limits.max_file_size)
        if not limits.allows_type(upload.content_type):
            raise UnsupportedType(f"file {upload.filename!r} is {upload.content_type}, which is not an"
                                  " allowed type", field=upload.field_name)


def upload_view_deriver(view: Callable[..., Any], info: Any) -> Callable[..., Any]:
    """Streams a multipart body with the view's limits before the view runs."""
    option = info.options.get("upload_limits")
    overrides = _limit_overrides(option) if option else view_overrides(info.original_view)

    def uploadkit_view(context: Any, request: Request) -> Any:
        environ = request.environ
        if FILES_KEY in environ or ERROR_KEY in environ:
            if overrides and UPLOAD_ID_KEY in environ and FILES_KEY in environ:
                _check_finished(request, apply_overrides(engine_of(request).limits_for(environ), overrides))
            return view(context, request)
        engine = engine_of(request)
        if not engine.intercepts(environ):
            return view(context, request)
        limits = apply_overrides(engine.limits_for(environ), overrides)
        try:
            pipeline = stream_upload(engine, environ, environ["wsgi.input"], limits)
        except UploadError as exc:
            environ[ERROR_KEY] = exc
            raise
        _close_after_response(request, _install(request), pipeline)
        return view(context, request)
    return uploadkit_view


upload_view_deriver.options = ("upload_limits",)  # type: ignore[attr-defined]


def progress_tween_factory(handler: Callable[[Request], Response], registry: Any) -> Callable[[Request], Response]:
    """Serves uploadkit's progress status route; other requests pass."""
    engine: UploadMiddleware = registry[REGISTRY_KEY]
    prefix = engine.progress_path
    progress_app = engine.progress_app
    if progress_app is None or not prefix:
        return handler

    def uploadkit_progress_tween(request: Request) -> Response:
        path = request.path_info
        if path == prefix or path.startswith(prefix + "/"):
            return request.get_response(progress_app)
        return handler(request)
    return uploadkit_progress_tween


#: Environ key of the hand-off to the rest of Pyramid, for the tus request in progress.
_HANDOFF_KEY = "uploadkit.pyramid.handoff"


def tus_tween_factory(handler: Callable[[Request], Response], registry: Any) -> Callable[[Request], Response]:
    """Serves tus (``uploadkit.tus_path``) with the engine's tus driver; other requests pass.

    The driver calls the engine's app on the request that completes an
    upload: here that app is the rest of Pyramid (routing, views, exception
    views), reached through ``handler`` with ``request.POST`` filled, so the
    view routed at ``<tus_path>{upload_id}`` gets the file.
    """
    engine: UploadMiddleware = registry[REGISTRY_KEY]
    tus_app = engine.tus_app
    if tus_app is None:
        return handler

    def uploadkit_tus_tween(request: Request) -> Response:
        if not tus_app.handles(request.environ):
            return handler(request)
        request.environ[_HANDOFF_KEY] = lambda: _hand_to_view(handler, request)
        try:
            return request.get_response(tus_app)
        finally:
            request.environ.pop(_HANDOFF_KEY, None)
    return uploadkit_tus_tween


def _hand_to_view(handler: Callable[[Request], Response], request: Request) -> Response:
    """The finished file as ``request.POST[field_name]``, then the view. The
    driver reads the answer whole and closes it, which releases the fields."""
    fields = _install(request)

    def release() -> None:
        for f in fields:
            f.close()
    try:
        response = handler(request)
    except BaseException:
        release()
        raise
    response.app_iter = ClosingIterator(response.app_iter, release)
    return response


def _handoff_app(environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The engine's app: the tus driver hands a finished upload to it."""
    run = environ.pop(_HANDOFF_KEY, None)
    if run is None:
        raise RuntimeError("the Pyramid adapter's upload engine calls the app only through its tus tween")
    response = run()
    return response(environ, start_response)  # type: ignore[no-any-return]


def json_error_view(exc: UploadError, request: Request) -> Response:
    """The default exception view for refusals: uploadkit's JSON error."""
    response = Response(body=exc.to_json(), status=exc.status, content_type="application/json",
                        charset=None)
    response.headers["Cache-Control"] = "no-store"
    return response


def includeme(config: Configurator) -> None:
    """Read ``uploadkit.*`` settings; add the view deriver, the progress and tus
    tweens and the JSON exception view for :class:`~uploadkit.errors.UploadError`."""
    options = options_from_flat(config.get_settings() or {}, "uploadkit.")
    config.registry[REGISTRY_KEY] = UploadMiddleware(_handoff_app, **options)
    config.add_view_deriver(upload_view_deriver, "uploadkit_view", under="secured_view", over="csrf_view")
    config.add_tween("uploadkit.contrib.pyramid.progress_tween_factory")
    config.add_tween("uploadkit.contrib.pyramid.tus_tween_factory")
    config.add_exception_view(json_error_view, context=UploadError)
