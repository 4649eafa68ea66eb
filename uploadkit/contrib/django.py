"""Django adapter: unchanged views, forms and ``FileField``s get streaming uploads.

Setup, two lines::

    # wsgi.py (and asgi is not supported: uploadkit is a WSGI middleware)
    from uploadkit.contrib.django import get_wsgi_application
    application = get_wsgi_application()

    # settings.py
    MIDDLEWARE = [..., "uploadkit.contrib.django.UploadKitMiddleware", ...]
    UPLOADKIT = {"LIMITS": {"max_file_size": 50 << 20}, "TEMPDIR": "/var/tmp/uploads"}

Why both. Django parses a body lazily, from ``request.META["wsgi.input"]``,
the first time ``request.POST``/``FILES`` is read, so only a layer *below*
Django can stream it before any of Django's code runs: the WSGI wrapper
:func:`get_wsgi_application` reads the body, refuses what breaks a limit
(before URL resolution, middleware or the database are touched), serves the
progress route, and leaves the files in the environ. The middleware then puts
them where Django looks (``request._files``/``request._post``), so Django never
parses the body again.

The middleware also works **alone** (the test ``Client``, ``runserver``, a
deployment whose wsgi.py cannot change): when no WSGI layer ran, it streams
the body itself from the request with the same settings; it then must come
before anything that reads ``request.POST`` in a middleware ``__call__``
(Django's CSRF check reads it later, in ``process_view``, which is fine). Only
the progress status route needs the WSGI wrapper. Set
``UPLOADKIT["STREAM_IN_MIDDLEWARE"] = False`` to turn that off.

``request.FILES`` holds Django ``UploadedFile`` objects built from what uploadkit
kept: a temp file is an :class:`UploadKitTemporaryFile` whose
``temporary_file_path()`` lets ``FileSystemStorage`` *move* it into
``MEDIA_ROOT`` instead of copying; a small file is an
:class:`UploadKitMemoryFile`; a file already kept by uploadkit's storage is an
:class:`UploadKitStoredFile` read from there. ``f.content_type`` is the sniffed
type, and ``f.uploadkit`` is uploadkit's :class:`~uploadkit.files.UploadedFile`
(``sha256``, ``key``, ``url``, ``thumbnails``...).

Settings (``UPLOADKIT``, every key optional; any other
:class:`~uploadkit.middleware.UploadMiddleware` argument in upper case works too):

``LIMITS``
    dict of :class:`~uploadkit.limits.Limits` fields.
``TEMPDIR``
    temp file directory (default: ``FILE_UPLOAD_TEMP_DIR``, else the system's).
``STORAGE``
    URL or dict of :class:`uploadkit.storage.Storage` arguments: files stream
    straight into it.
``THUMBNAILS``
    dict of :class:`uploadkit.imaging.Thumbnailer` arguments.
``PROGRESS``
    ``False``, ``"memory"`` (default) or ``"memcached://host:port"``.
``ERROR_VIEW``
    dotted path to ``view(request, exc) -> HttpResponse`` rendering refusals
    (default: the JSON error). A 200 it returns becomes ``exc.status``.
``STREAM_IN_MIDDLEWARE``
    see above (default True).

Per-view limits: decorate the view with :func:`upload_limits`. The WSGI layer
runs before Django resolves the URL, so it resolves ``PATH_INFO`` itself with
``django.urls.resolve`` against ``ROOT_URLCONF`` and reads the decorator's
attribute (class-based views: decorate the class, or ``dispatch`` with
``method_decorator``). A per-request ``request.urlconf`` is not seen there.

Storing files elsewhere: :class:`FsspecStorage` is a Django ``Storage`` over
uploadkit's fsspec storage, for ``FileField(storage=...)`` on S3 or anything
fsspec reaches.
"""

from __future__ import annotations

import os
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import File
from django.core.files.storage import Storage as DjangoStorage
from django.core.files.uploadedfile import InMemoryUploadedFile, TemporaryUploadedFile
from django.core.files.uploadedfile import UploadedFile as DjangoUploadedFile
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.utils.datastructures import MultiValueDict
from django.utils.deconstruct import deconstructible

from ..errors import UploadError
from ..files import UploadedFile
from ..limits import Limits
from ..middleware import CONTEXT_KEY, FILES_KEY, FORM_KEY, UploadMiddleware
from . import (ERROR_KEY, AdapterMiddleware, charset_of, import_string, middleware_options,
               per_view_limits, stream_upload, upload_limits)

__all__ = [
    "get_wsgi_application", "wrap_wsgi", "UploadKitMiddleware", "upload_limits", "FsspecStorage",
    "UploadKitTemporaryFile", "UploadKitMemoryFile", "UploadKitStoredFile", "to_django_file",
    "MIDDLEWARE_PATH",
]

MIDDLEWARE_PATH = "uploadkit.contrib.django.UploadKitMiddleware"
_ADAPTER_KEYS = ("error_view", "stream_in_middleware")


# -- configuration -----------------------------------------------------------------

def _resolve_view(environ: Dict[str, Any]) -> Any:
    from django.core.handlers.wsgi import get_path_info
    from django.urls import Resolver404, resolve
    try:
        return resolve(get_path_info(environ) or "/").func
    except Resolver404:
        return None


def _options(overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``settings.UPLOADKIT`` (and ``overrides``) as middleware options."""
    raw = dict(getattr(settings, "UPLOADKIT", None) or {})
    raw.update(overrides or {})
    options = middleware_options(raw, extra=_ADAPTER_KEYS)
    if options.get("tempdir") is None and getattr(settings, "FILE_UPLOAD_TEMP_DIR", None):
        options["tempdir"] = settings.FILE_UPLOAD_TEMP_DIR
    options["limits"] = per_view_limits(options.get("limits", Limits()), _resolve_view)
    return options


def _error_view(options: Dict[str, Any]) -> Optional[Callable[[HttpRequest, UploadError], HttpResponse]]:
    view = options.get("error_view")
    if isinstance(view, str):
        view = import_string(view)
    return view


def wrap_wsgi(app: Any, **overrides: Any) -> AdapterMiddleware:
    """Wrap an existing Django WSGI application (``overrides`` beat ``settings.UPLOADKIT``)."""
    options = _options({k.upper(): v for k, v in overrides.items()})
    error_view = options.pop("error_view", None)
    options.pop("stream_in_middleware", None)
    on_error = None
    if error_view is not None:
        if MIDDLEWARE_PATH not in list(getattr(settings, "MIDDLEWARE", None) or ()):
            raise ImproperlyConfigured(
                f"UPLOADKIT['ERROR_VIEW'] needs {MIDDLEWARE_PATH!r} in MIDDLEWARE: the refusal is "
                "rendered by Django through it")

        def on_error(environ: Dict[str, Any], exc: UploadError) -> Any:
            return app  # Django runs with environ["uploadkit.error"]; the middleware answers
    return AdapterMiddleware(app, on_error=on_error, **options)


def get_wsgi_application(**overrides: Any) -> AdapterMiddleware:
    """Django's WSGI application wrapped in uploadkit: use it in ``wsgi.py``."""
    from django.core.wsgi import get_wsgi_application as django_wsgi_application
    return wrap_wsgi(django_wsgi_application(), **overrides)


# -- Django file objects ------------------------------------------------------------

def _content_type_extra(upload: UploadedFile) -> Dict[str, str]:
    header = upload.headers.get("Content-Type") if upload.headers is not None else None
    extra: Dict[str, str] = {}
    for param in (header or "").split(";")[1:]:
        name, eq, value = param.partition("=")
        if eq and name.strip().lower() != "charset":
            extra[name.strip().lower()] = value.strip().strip('"')
    return extra


class _LazyFileMixin:
    """Opens uploadkit's file on first use: building ``request.FILES`` opens nothing."""

    uploadkit: UploadedFile
    _file: Optional[IO[bytes]]

    @property
    def file(self) -> Optional[IO[bytes]]:
        if self._file is None:
            self._file = self.uploadkit.open()
        return self._file

    @file.setter
    def file(self, value: Optional[IO[bytes]]) -> None:
        self._file = value

    @property
    def closed(self) -> bool:
        return self._file is None or bool(self._file.closed)

    def open(self, mode: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        if self._file is None or self._file.closed:
            self._file = self.uploadkit.open()
        else:
            self._file.seek(0)
        return self

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except FileNotFoundError:
                pass


def _init(obj: Any, upload: UploadedFile) -> None:
    obj.uploadkit = upload
    obj._file = None
    obj.field_name = upload.field_name
    DjangoUploadedFile.__init__(obj, None, upload.filename, upload.content_type, upload.size,
                                charset_of(upload), _content_type_extra(upload))


class UploadKitTemporaryFile(_LazyFileMixin, TemporaryUploadedFile):  # type: ignore[misc]
    """A file uploadkit spooled to a temp file. ``temporary_file_path()`` lets
    Django's storages move it rather than copy it; uploadkit removes it (if
    still there) when the response is closed."""

    def __init__(self, upload: UploadedFile) -> None:
        if not upload.path:
            raise ValueError("UploadKitTemporaryFile needs a file kept at a local path")
        _init(self, upload)

    def temporary_file_path(self) -> str:
        assert self.uploadkit.path is not None
        return self.uploadkit.path


class UploadKitMemoryFile(InMemoryUploadedFile):  # type: ignore[misc]
    """A small file uploadkit kept in memory."""

    def __init__(self, upload: UploadedFile) -> None:
        self.uploadkit = upload
        super().__init__(upload.open(), upload.field_name, upload.filename, upload.content_type,
                         upload.size, charset_of(upload), _content_type_extra(upload))


class UploadKitStoredFile(_LazyFileMixin, DjangoUploadedFile):  # type: ignore[misc]
    """A file uploadkit's storage already kept (``f.uploadkit.key``): read from there."""

    def __init__(self, upload: UploadedFile) -> None:
        _init(self, upload)


def to_django_file(upload: UploadedFile) -> DjangoUploadedFile:
    """The Django ``UploadedFile`` for one of uploadkit's files."""
    if upload.key is None and upload.path:
        return UploadKitTemporaryFile(upload)
    if upload.key is None and upload.path is None:
        return UploadKitMemoryFile(upload)
    return UploadKitStoredFile(upload)


# -- the middleware ------------------------------------------------------------------

def _unused_app(environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
    raise RuntimeError("the middleware's upload engine never calls an app")


class UploadKitMiddleware:
    """Gives Django the files uploadkit streamed; renders refusals; streams the
    body itself when no WSGI layer did (see the module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        options = _options()
        self.error_view = _error_view(options)
        self.stream_here = bool(options.pop("stream_in_middleware", True))
        options.pop("error_view", None)
        self._engine_options = options
        self._engine: Optional[UploadMiddleware] = None

    @property
    def engine(self) -> UploadMiddleware:
        """The upload engine used when no WSGI layer ran, built on first use."""
        if self._engine is None:
            self._engine = UploadMiddleware(_unused_app, **self._engine_options)
        return self._engine

    def __call__(self, request: HttpRequest) -> HttpResponse:
        environ = request.META
        exc = environ.get(ERROR_KEY)
        if isinstance(exc, UploadError):
            return self.render_error(request, exc)
        pipeline = None
        if (FILES_KEY not in environ and self.stream_here and not getattr(request, "_read_started", False)
                and not hasattr(request, "_post") and self.engine.intercepts(environ)):
            try:
                pipeline = stream_upload(self.engine, environ, request)
            except UploadError as refused:
                return self.render_error(request, refused)
        if FILES_KEY in environ:
            install(request)
        if pipeline is None:
            return self.get_response(request)
        try:
            response = self.get_response(request)
        except BaseException:
            pipeline.close()
            raise
        _close_with(response, pipeline.close)
        return response

    def render_error(self, request: HttpRequest, exc: UploadError) -> HttpResponse:
        if self.error_view is None:
            response: HttpResponse = JsonResponse(exc.to_dict(), status=exc.status)
            response["Cache-Control"] = "no-store"
            return response
        response = self.error_view(request, exc)
        if response.status_code == 200:
            response.status_code = exc.status
        return response


def _close_with(response: HttpResponse, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the server closes ``response`` (temp files live until then)."""
    close = response.close

    def closing() -> None:
        try:
            close()
        finally:
            callback()
    response.close = closing


def install(request: HttpRequest) -> None:
    """Put the files and text fields the WSGI layer left in the environ on
    ``request``, where Django's ``POST``/``FILES`` look, so the body is never parsed."""
    environ = request.META
    post = QueryDict(mutable=True, encoding=request.encoding)
    for name, value in environ[FORM_KEY].items():
        post.appendlist(name, value)
    post._mutable = False
    files = MultiValueDict()
    for name, upload in environ[FILES_KEY].items():
        files.appendlist(name, to_django_file(upload))
    request._post = post
    request._files = files
    request.uploadkit = environ.get(CONTEXT_KEY)


# -- a Django Storage over fsspec -------------------------------------------------------

@deconstructible(path="uploadkit.contrib.django.FsspecStorage")
class FsspecStorage(DjangoStorage):  # type: ignore[misc]
    """A Django ``Storage`` over :class:`uploadkit.storage.Storage`: S3, GCS,
    memory, local disk, anything fsspec reaches.

    ``FileField(storage=FsspecStorage("s3://bucket/media", base_url="https://cdn/media/",
    storage_options={"endpoint_url": ...}))``. Writes stream (``chunks()``),
    become visible only once complete, and never overwrite: a name taken in
    the meantime gets a ``_<random>`` suffix, like Django's own storage.

    Credentials in ``storage_options`` would be written into migrations: pass a
    callable (``storage=get_media_storage``) or a ready ``storage=`` object then.

    :param url: the root (any fsspec URL), unless ``storage`` is given.
    :param base_url: prefix of ``url(name)``; without it ``url()`` raises ValueError.
    :param storage: an existing :class:`uploadkit.storage.Storage`.
    :param options: further :class:`~uploadkit.storage.Storage` arguments.
    """

    def __init__(self, url: Optional[str] = None, *, base_url: Optional[str] = None,
                 storage_options: Optional[Dict[str, Any]] = None, storage: Any = None,
                 **options: Any) -> None:
        if storage is None:
            if url is None:
                raise ImproperlyConfigured("FsspecStorage needs a url or a storage")
            from ..storage import Storage
            storage = Storage(url, base_url=base_url, storage_options=storage_options, **options)
        elif url is not None or options or storage_options:
            raise ImproperlyConfigured("FsspecStorage takes either a url (and options) or a storage")
        self.storage = storage
        self.base_url = base_url if base_url is not None else getattr(storage, "base_url", None)

    def _open(self, name: str, mode: str = "rb") -> File:
        if "w" in mode or "a" in mode or "+" in mode:
            raise ValueError(f"FsspecStorage opens files for reading only, not {mode!r}: use save()")
        return File(self.storage.open(name), name=name)

    def _save(self, name: str, content: Any) -> str:
        if hasattr(content, "temporary_file_path"):
            with open(content.temporary_file_path(), "rb") as f:
                return str(self.storage.save(f, name, filename=os.path.basename(name), collision="rename"))
        try:
            content.seek(0)
        except (AttributeError, OSError, ValueError):
            pass
        return str(self.storage.save(content, name, filename=os.path.basename(name), collision="rename"))

    def exists(self, name: str) -> bool:
        return bool(self.storage.exists(name))

    def delete(self, name: str) -> None:
        if not name:
            raise ValueError("The name must be given to delete().")
        try:
            self.storage.delete(name)
        except FileNotFoundError:
            pass

    def size(self, name: str) -> int:
        return int(self.storage.size(name))

    def url(self, name: Optional[str]) -> str:
        if self.base_url is None:
            raise ValueError("This file is not accessible via a URL: give FsspecStorage a base_url.")
        from urllib.parse import quote
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        return base + quote((name or "").lstrip("/"), safe="/")

    def path(self, name: str) -> str:
        local = self.storage.path(name)
        if local is None:
            raise NotImplementedError("This backend doesn't support absolute paths.")
        return str(local)

    def listdir(self, path: str) -> Tuple[List[str], List[str]]:
        fs, root = self.storage.fs, self.storage.root
        sub = path.strip("/")
        if sub:
            root = f"{root.rstrip('/')}/{sub}" if root not in ("", "/") else f"{root}{sub}"
        fs.invalidate_cache(root)
        dirs: List[str] = []
        files: List[str] = []
        for entry in fs.ls(root, detail=True):
            name = entry["name"].rstrip("/").rpartition("/")[2]
            if name == self.storage.temp_dir:
                continue
            (dirs if entry.get("type") == "directory" else files).append(name)
        return sorted(dirs), sorted(files)

    def get_modified_time(self, name: str) -> Any:
        mtime = self.storage.info(name).mtime
        if mtime is None:
            raise NotImplementedError("This backend does not record modification times.")
        if not getattr(settings, "USE_TZ", True):
            from django.utils import timezone
            return timezone.make_naive(mtime)
        return mtime
