"""Flask adapter: ``request.files`` and ``request.form`` as always, streamed.

::

    from uploadkit.contrib.flask import UploadKit, upload_limits

    app.config["UPLOADKIT_MAX_FILE_SIZE"] = "50 MiB"
    uploadkit = UploadKit(app)            # or UploadKit(); uploadkit.init_app(app)

    @app.post("/avatar")
    @upload_limits(max_file_size=2 << 20, allowed_types={"image/*"})
    def avatar():
        f = request.files["avatar"]       # a Werkzeug FileStorage
        f.save(path)                      # copied from uploadkit's temp file, in the kernel
        return {"sha256": f.uploadkit.sha256}

``UploadKit`` wraps ``app.wsgi_app`` in the upload middleware, so the body is
streamed (limits, sniffing, hashing, storage, thumbnails, progress route)
before Flask sees the request, and installs a request class that fills
``request.files``/``request.form`` from what was streamed instead of parsing.

``request.files[...]`` is an :class:`UploadKitFileStorage`: a ``FileStorage``
whose ``stream`` is opened lazily from uploadkit's file; ``filename`` is the
sanitized name (the client's is ``f.uploadkit.raw_filename``), ``mimetype`` the
sniffed type, ``content_length`` the size. ``request.form`` holds the text
fields only.

Configuration: ``app.config["UPLOADKIT_<NAME>"]`` for every
:class:`~uploadkit.middleware.UploadMiddleware` argument (``UPLOADKIT_TEMPDIR``,
``UPLOADKIT_STORAGE``, ``UPLOADKIT_THUMBNAILS``, ``UPLOADKIT_PROGRESS``...),
``UPLOADKIT_LIMITS`` (a dict or :class:`~uploadkit.limits.Limits`) or any
``Limits`` field on its own (``UPLOADKIT_MAX_FILE_SIZE = "10 MiB"``); keyword
arguments to ``UploadKit`` win over the config. Flask's ``MAX_CONTENT_LENGTH``
is kept as ``max_request_size`` unless one is set.

Refusals: a JSON 4xx by default. With ``UPLOADKIT_ERRORS = "app"`` the refusal is
raised inside Flask, before any view, as the :class:`~uploadkit.errors.UploadError`
subclass it is, so ``@app.errorhandler(UploadError)`` (or ``FileTooLarge``...)
renders the page; a JSON handler is registered when the app has none.

Per-view limits: :func:`upload_limits` (also ``uploadkit.limits(...)``). The
middleware matches the URL with ``app.url_map`` before reading the body.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import IO, Any, Callable, Dict, Optional, Type

from flask import Flask, Response, jsonify
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import HTTPException

from ..errors import UploadError
from ..files import UploadedFile
from ..limits import Limits
from ..middleware import FILES_KEY, FORM_KEY
from . import (ERROR_KEY, AdapterMiddleware, options_from_flat, per_view_limits, upload_limits)

__all__ = ["UploadKit", "UploadKitFileStorage", "upload_limits"]


class UploadKitFileStorage(FileStorage):
    """A Werkzeug ``FileStorage`` backed by uploadkit's file, opened on first use."""

    def __init__(self, upload: UploadedFile) -> None:
        # Set first: FileStorage.__getattr__ forwards unknown names to the stream.
        self._stream: Optional[IO[bytes]] = None
        self.uploadkit = upload
        headers = Headers()
        part_type = upload.headers.get("Content-Type") if upload.headers is not None else None
        super().__init__(stream=None, filename=upload.filename, name=upload.field_name,
                         content_type=upload.content_type if not part_type else None,
                         content_length=upload.size, headers=headers)
        if part_type:
            # keep the part's parameters (charset...) but the sniffed type
            params = part_type.partition(";")[2]
            headers["Content-Type"] = upload.content_type + (f";{params}" if params else "")
        self._stream = None  # FileStorage.__init__ set an empty BytesIO

    @property
    def stream(self) -> IO[bytes]:
        if self._stream is None:
            self._stream = self.uploadkit.open()
        return self._stream

    @stream.setter
    def stream(self, value: IO[bytes]) -> None:
        self._stream = value

    def save(self, dst: Any, buffer_size: int = 1 << 20) -> None:
        """Save to a path or a file object, in ``buffer_size`` pieces.

        A file uploadkit kept at a local path and not read yet is copied with
        :func:`shutil.copyfile` (``copy_file_range``/``sendfile`` where the
        kernel has them); otherwise the stream is copied, never read whole.
        """
        path = self.uploadkit.path
        if self._stream is None and path and isinstance(dst, (str, os.PathLike)):
            shutil.copyfile(path, dst)
            return
        super().save(dst, buffer_size)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


class _UploadKitRequestMixin:
    """Fills ``form``/``files`` from the environ uploadkit left, instead of parsing."""

    environ: Dict[str, Any]
    parameter_storage_class: Any

    def _load_form_data(self) -> None:
        environ = self.environ
        if FILES_KEY in environ and "form" not in self.__dict__:
            store = self.parameter_storage_class
            self.__dict__["form"] = store(list(environ[FORM_KEY].items()))
            self.__dict__["files"] = store(
                [(name, UploadKitFileStorage(upload)) for name, upload in environ[FILES_KEY].items()])
            return
        super()._load_form_data()  # type: ignore[misc]


def _request_class(base: Type[Any]) -> Type[Any]:
    if issubclass(base, _UploadKitRequestMixin):
        return base
    return type(f"UploadKit{base.__name__}", (_UploadKitRequestMixin, base), {})


def _json_error(exc: UploadError) -> Response:
    response = jsonify(exc.to_dict())
    response.status_code = exc.status
    response.headers["Cache-Control"] = "no-store"
    return response


def _view_finder(app: Flask) -> Callable[[Dict[str, Any]], Any]:
    def find_view(environ: Dict[str, Any]) -> Any:
        server_name = app.config.get("SERVER_NAME") if (
            app.url_map.host_matching or app.subdomain_matching) else None
        try:
            endpoint, _ = app.url_map.bind_to_environ(environ, server_name=server_name).match()
        except HTTPException:  # NotFound, MethodNotAllowed, RequestRedirect
            return None
        return app.view_functions.get(endpoint)
    return find_view


class UploadKit:
    """The Flask extension. ``UploadKit(app, **options)`` or ``init_app(app)`` later.

    ``options`` are :class:`~uploadkit.middleware.UploadMiddleware` arguments
    (plus ``errors="json"|"app"``) and win over ``app.config["UPLOADKIT_*"]``.
    """

    def __init__(self, app: Optional[Flask] = None, **options: Any) -> None:
        self.options = options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "uploadkit" in app.extensions:
            raise RuntimeError("uploadkit is already set up on this app")
        raw: Dict[str, Any] = {k: v for k, v in app.config.items() if k.startswith("UPLOADKIT_")}
        raw.update({f"UPLOADKIT_{k.upper()}": v for k, v in self.options.items()})
        options = options_from_flat(raw, "UPLOADKIT_", extra=("errors",))
        errors = str(options.pop("errors", "json")).lower()
        if errors not in ("json", "app"):
            raise ValueError(f"UPLOADKIT_ERRORS must be 'json' or 'app', not {errors!r}")
        base = options.get("limits", Limits())
        max_length = app.config.get("MAX_CONTENT_LENGTH")
        if isinstance(base, Limits) and base.max_request_size is None and max_length:
            base = dataclasses.replace(base, max_request_size=int(max_length))
        options["limits"] = per_view_limits(base, _view_finder(app))

        flask_wsgi = app.wsgi_app
        on_error = None
        if errors == "app":
            def on_error(environ: Dict[str, Any], exc: UploadError) -> Any:
                return flask_wsgi
            app.before_request_funcs.setdefault(None, []).insert(0, _raise_refusal)
            if UploadError not in app.error_handler_spec[None][None]:
                app.register_error_handler(UploadError, _json_error)
        middleware = AdapterMiddleware(flask_wsgi, on_error=on_error, **options)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.request_class = _request_class(app.request_class)
        app.extensions["uploadkit"] = middleware

    @staticmethod
    def limits(**overrides: Any) -> Callable[[Any], Any]:
        """Same as :func:`upload_limits`."""
        return upload_limits(**overrides)

    @staticmethod
    def middleware(app: Flask) -> AdapterMiddleware:
        """The upload middleware installed on ``app`` (its progress store, options...)."""
        return app.extensions["uploadkit"]  # type: ignore[no-any-return]


def _raise_refusal() -> None:
    from flask import request
    exc = request.environ.get(ERROR_KEY)
    if isinstance(exc, UploadError):
        raise exc
