"""Framework adapters: what Django, Flask and Pyramid share.

Each adapter does three things on top of :class:`~uploadkit.middleware.UploadMiddleware`:

* reads its framework's configuration into the middleware's keyword arguments
  (:func:`middleware_options`, :func:`options_from_flat`);
* hands the streamed files to the framework in the objects its views already
  use (Django ``UploadedFile``, Werkzeug ``FileStorage``, WebOb field storage);
* lets one view ask for other limits (:func:`upload_limits`) and lets the app
  render refusals itself (:class:`AdapterMiddleware`'s ``on_error``).

Nothing here imports a framework: the adapters do, in their own modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Type, TypeVar

from ..errors import UploadError
from ..limits import Limits
from ..middleware import FILES_KEY, ClosingResponse, UploadMiddleware
from ..pipeline import Pipeline

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
F = TypeVar("F", bound=Callable[..., Any])

#: Environ key holding the :class:`~uploadkit.errors.UploadError` of a refused
#: request while the app renders it (see :class:`AdapterMiddleware`).
ERROR_KEY = "uploadkit.error"
#: Attribute :func:`upload_limits` sets on a view: a dict of ``Limits`` overrides.
LIMITS_ATTR = "uploadkit_limits"

_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}
_WEBOB_CACHES = ("webob._parsed_post_vars", "webob._body_file", "webob.is_body_seekable",
                 "werkzeug.request")


# -- per-view limits ------------------------------------------------------------

def _limit_overrides(overrides: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = set(overrides) - _LIMIT_FIELDS
    if unknown:
        raise TypeError(f"unknown upload limit(s) {sorted(unknown)}; known: {sorted(_LIMIT_FIELDS)}")
    out = dict(overrides)
    if out.get("allowed_types") is not None and not isinstance(out["allowed_types"], str):
        out["allowed_types"] = frozenset(out["allowed_types"])
    Limits(**out)  # validate now: a typo fails at import time, not on the first upload
    return out


def upload_limits(**overrides: Any) -> Callable[[F], F]:
    """Give one view other limits than the site's: ``@upload_limits(max_file_size=1 << 20)``.

    The overrides replace those fields of the configured :class:`Limits`; the
    others keep their configured values. The adapters find the view before the
    body is read (each documents how), so the limits apply while streaming.

    :raises TypeError: an unknown field name.
    :raises ValueError: a value :class:`Limits` refuses.
    """
    checked = _limit_overrides(overrides)

    def decorate(view: F) -> F:
        setattr(view, LIMITS_ATTR, checked)
        return view
    return decorate


def view_overrides(view: Any) -> Optional[Dict[str, Any]]:
    """The overrides :func:`upload_limits` left on ``view``, if any.

    Looks through ``functools.wraps`` chains and class-based views (``view_class``).
    """
    seen = 0
    while view is not None and seen < 20:
        found = getattr(view, LIMITS_ATTR, None)
        if found is not None:
            return dict(found)
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            found = getattr(view_class, LIMITS_ATTR, None)
            if found is not None:
                return dict(found)
        view = getattr(view, "__wrapped__", None)
        seen += 1
    return None


def apply_overrides(base: Limits, overrides: Optional[Mapping[str, Any]]) -> Limits:
    return dataclasses.replace(base, **overrides) if overrides else base


def per_view_limits(base: Any, find_view: Callable[[Environ], Any]) -> Callable[[Environ], Limits]:
    """A ``limits=`` callable for :class:`UploadMiddleware`: ``base`` (a :class:`Limits`
    or ``environ -> Limits``) with the overrides of the view ``find_view(environ)`` returns."""

    def limits_for(environ: Environ) -> Limits:
        limits = base(environ) if callable(base) else base
        return apply_overrides(limits, view_overrides(find_view(environ)))
    return limits_for


# -- configuration ----------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any) -> Optional[int]:
    """``10485760``, ``"10 MiB"``, ``"10M"``, ``"512k"`` -> bytes (binary units);
    ``None``/``"none"``/``""`` -> None (unlimited).

    :raises ValueError: anything else.
    """
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError(f"a size must be a number of bytes, not {value!r}")
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none", "null", "unlimited"):
        return None
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{value!r} is not a size like 10485760, '10 MiB' or '512k'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def import_string(path: str) -> Any:
    """``"pkg.module.attr"`` or ``"pkg.module:attr"`` -> the object.

    :raises ImportError: the module or the attribute does not exist.
    """
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{path!r} is not a dotted path to an object")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"{module!r} has no attribute {attr!r}") from None
    return obj


def build_limits(value: Any) -> Any:
    """A :class:`Limits`, a callable ``environ -> Limits``, a dict of fields, or None."""
    if value is None:
        return Limits()
    if isinstance(value, Limits) or callable(value):
        return value
    if isinstance(value, str):
        return import_string(value)
    if isinstance(value, Mapping):
        fields = {k.lower(): v for k, v in value.items()}
        unknown = set(fields) - _LIMIT_FIELDS
        if unknown:
            raise ValueError(f"unknown upload limit(s) {sorted(unknown)}; known: {sorted(_LIMIT_FIELDS)}")
        return Limits(**_limit_overrides(fields))
    raise TypeError(f"limits must be a Limits, a dict or a callable, not {value!r}")


def build_storage(value: Any) -> Any:
    """A storage object (anything with ``handler()``), a URL, or a dict of
    :class:`uploadkit.storage.Storage` arguments (``url`` plus options)."""
    if value is None or hasattr(value, "handler"):
        return value
    from ..storage import Storage
    if isinstance(value, str):
        return Storage(value)
    if isinstance(value, Mapping):
        opts: Dict[str, Any] = {}
        for key, item in value.items():
            head, dot, rest = key.lower().partition(".")
            if dot:  # "storage_options.endpoint_url" from flat settings
                opts.setdefault(head, {})[rest] = item
            else:
                opts[head] = _ini_value(item) if head != "url" else item
        if "url" not in opts:
            raise ValueError("the storage settings need a 'url' (e.g. 'file:///srv/media' or 's3://bucket')")
        return Storage(opts.pop("url"), **opts)
    raise TypeError(f"storage must be a Storage, a URL or a dict, not {value!r}")


def build_thumbnails(value: Any) -> Any:
    """A thumbnailer (anything with ``handler(storage)``) or a dict of
    :class:`uploadkit.imaging.Thumbnailer` arguments."""
    if value is None or hasattr(value, "handler"):
        return value
    if isinstance(value, Mapping):
        from .. import imaging
        opts = {k.lower(): _ini_value(v) for k, v in value.items()}
        if isinstance(opts.get("sizes"), str):
            opts["sizes"] = [_box(s) for s in re.split(r"[\s,]+", opts["sizes"]) if s]
        for name in ("max_original",):
            if isinstance(opts.get(name), str):
                opts[name] = _box(opts[name])
        return imaging.Thumbnailer(**opts)
    raise TypeError(f"thumbnails must be a Thumbnailer or a dict, not {value!r}")


def _box(text: str) -> tuple[int, int]:
    """``"128x96"`` -> ``(128, 96)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size like '128x96'")
    return int(m.group(1)), int(m.group(2))


def _ini_value(value: Any) -> Any:
    """A string from an ini file as the int or bool it spells, else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.lower() in ("true", "false", "yes", "no", "on", "off"):
        return parse_bool(text)
    return text


def build_progress(value: Any) -> Any:
    """``None``/``True`` (the default memory store), ``False`` (off), ``"memory"``,
    ``"memcached://host:port[,host:port]"``, or a store object."""
    if value is None or value is True:
        return None
    if value is False:
        return False
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("false", "off", "no", "0", "none"):
            return False
        if text.lower() in ("true", "on", "yes", "1", "memory", "memory://"):
            return None
        if text.lower().startswith("memcached://"):
            from ..progress import MemcachedStore
            servers = [s for s in text[len("memcached://"):].strip("/").split(",") if s]
            return MemcachedStore(servers)
        return import_string(text)
    return value


#: TusSettings fields as a flat setting spells them, and how each string is read.
_TUS_FLOATS = ("expire_after", "lock_timeout", "lock_wait")
_TUS_IMPORTS = ("authorize", "before_finish")


def build_tus(value: Any) -> Any:
    """A :class:`~uploadkit.tusapp.TusSettings`, ``True``/``"true"`` (the
    defaults), ``False``/``None``/``"false"`` (no tus), or a dict of its fields
    as an ini file spells them (``path``, ``max_size = 2 GiB``,
    ``expire_after = 3600``, ``cors_origins`` space or comma separated,
    ``authorize``/``before_finish`` dotted paths, ``handoff = false``,
    ``lock_store = memcached://host:port``).

    :raises ValueError: an unknown field or a value TusSettings refuses.
    """
    from ..tusapp import TusSettings

    if value is None or isinstance(value, TusSettings):
        return value
    if isinstance(value, (bool, str)):
        return TusSettings() if parse_bool(value) else None
    if not isinstance(value, Mapping):
        raise TypeError(f"tus must be a TusSettings, a boolean or a dict, not {value!r}")
    known = {f.name for f in dataclasses.fields(TusSettings)}
    opts: Dict[str, Any] = {}
    for raw_key, item in value.items():
        key = raw_key.lower()
        if key not in known:
            raise ValueError(f"unknown tus setting {raw_key!r}; known: {sorted(known)}")
        if isinstance(item, str):
            text = item.strip()
            if key == "max_size":
                item = parse_size(text)
            elif key in _TUS_FLOATS:
                item = float(text)
            elif key == "cors_origins":
                item = tuple(o for o in re.split(r"[\s,]+", text) if o)
            elif key in _TUS_IMPORTS:
                item = import_string(text) if text else None
            elif key == "handoff":
                item = parse_bool(text)
            elif key == "directory":
                item = None if text.lower() in ("", "none") else text
            elif key == "lock_store":
                item = build_progress(text) or None
            else:
                item = text
        opts[key] = item
    return TusSettings(**opts)


def _middleware_params() -> List[str]:
    sig = inspect.signature(UploadMiddleware.__init__)
    return [name for name, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


_CALLABLES = ("handlers", "quota", "progress_key")
_SIZES = ("read_size", "memory_threshold", "drain_limit")
_BOOLS = ("hash_sha256", "hash_md5")


def middleware_options(settings: Mapping[str, Any], *, extra: Iterable[str] = ()) -> Dict[str, Any]:
    """Framework settings (any key case) -> :class:`UploadMiddleware` keyword arguments.

    ``LIMITS`` may be a dict of :class:`Limits` fields; ``STORAGE`` a URL or a dict;
    ``THUMBNAILS`` a dict; ``PROGRESS`` ``False``/``"memory"``/``"memcached://..."``;
    ``HANDLERS``/``QUOTA``/``PROGRESS_KEY`` callables or dotted paths. Keys in
    ``extra`` are the adapter's own and are returned untouched.

    :raises ValueError: an unknown key, so a typo never passes silently.
    """
    known = set(_middleware_params())
    extra = set(extra)
    out: Dict[str, Any] = {}
    for raw_key, value in settings.items():
        key = raw_key.lower()
        if key in extra:
            out[key] = value
            continue
        if key not in known:
            raise ValueError(f"unknown uploadkit setting {raw_key!r}; known: {sorted(known | extra)}")
        if key == "limits":
            value = build_limits(value)
        elif key == "storage":
            value = build_storage(value)
        elif key == "thumbnails":
            value = build_thumbnails(value)
        elif key == "progress":
            value = build_progress(value)
        elif key == "tus":
            value = build_tus(value)
        elif key == "progress_settings" and isinstance(value, Mapping):
            from ..progress import ProgressSettings
            value = ProgressSettings(**{k.lower(): v for k, v in value.items()})
        elif key in _CALLABLES and isinstance(value, str):
            value = import_string(value)
        elif key == "paths" and isinstance(value, str):
            value = import_string(value) if not value.startswith("/") else [value]
        elif key in ("progress_path", "tempdir") and isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None
        elif key in _SIZES and value is not None:
            value = parse_size(value)
        elif key in _BOOLS:
            value = parse_bool(value)
        out[key] = value
    return out


def options_from_flat(settings: Mapping[str, Any], prefix: str, *,
                      extra: Iterable[str] = ()) -> Dict[str, Any]:
    """Flat string settings (an ini file, Flask-style config) -> nested settings for
    :func:`middleware_options`.

    ``<prefix>max_file_size = 10 MiB`` and every other :class:`Limits` field go to
    ``limits`` (sizes parsed, ``allowed_types`` split on spaces/commas);
    ``<prefix>storage = s3://bucket`` with ``<prefix>storage.<option> = ...`` build
    the storage; likewise ``thumbnails.<option>`` and ``progress_settings.<option>``.
    """
    nested: Dict[str, Any] = {}
    limits: Dict[str, Any] = {}
    groups: Dict[str, Dict[str, Any]] = {}
    for raw_key, value in settings.items():
        if not raw_key.lower().startswith(prefix.lower()):
            continue
        key = raw_key[len(prefix):].lower()
        head, dot, rest = key.partition(".")
        if dot and head in ("storage", "thumbnails", "progress_settings", "limits", "tus"):
            groups.setdefault(head, {})[rest] = value
            continue
        if key == "tus_path":  # the creation URL, the one tus setting most apps set
            groups.setdefault("tus", {})["path"] = value
            continue
        if key in _LIMIT_FIELDS:
            limits[key] = value
        else:
            nested[key] = value
    limits.update(groups.pop("limits", {}))
    if limits:
        parsed = {k: _parse_limit(k, v) for k, v in limits.items()}
        base = nested.get("limits")
        if isinstance(base, Limits):
            nested["limits"] = dataclasses.replace(base, **_limit_overrides(parsed))
        elif isinstance(base, Mapping):
            nested["limits"] = {**{k.lower(): v for k, v in base.items()}, **parsed}
        elif base is None:
            nested["limits"] = parsed
        else:
            raise ValueError(f"{prefix}limits is {base!r}; per-field limit settings cannot be added to it")
    if "storage" in groups:
        opts = dict(groups.pop("storage"))
        if "storage" in nested:
            opts["url"] = nested["storage"]
        nested["storage"] = opts
    if "tus" in groups:
        nested["tus"] = _tus_group(prefix, nested.get("tus"), groups.pop("tus"))
    for name, opts in groups.items():
        nested[name] = opts
    return middleware_options(nested, extra=extra)


def _tus_group(prefix: str, base: Any, opts: Dict[str, Any]) -> Any:
    """``<prefix>tus_path`` and ``<prefix>tus.<field>`` on top of ``<prefix>tus``:
    they turn tus on, unless ``<prefix>tus`` turns it off."""
    if base is None or (isinstance(base, (bool, str)) and parse_bool(base)):
        return opts
    if isinstance(base, (bool, str)):
        return None
    if isinstance(base, Mapping):
        return {**{k.lower(): v for k, v in base.items()}, **opts}
    from ..tusapp import TusSettings

    if isinstance(base, TusSettings):
        parsed = build_tus(opts)  # each string read as its field's type
        return dataclasses.replace(base, **{k.lower(): getattr(parsed, k.lower()) for k in opts})
    raise ValueError(f"{prefix}tus is {base!r}; tus.<field> settings cannot be added to it")


def _parse_limit(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if name == "allowed_types":
        types = [t for t in re.split(r"[\s,]+", value) if t]
        return frozenset(types) if types and value.strip().lower() != "none" else None
    if name in ("max_header_size", "max_header_count", "max_filename_length"):
        size = parse_size(value)
        if size is None:
            raise ValueError(f"{name} cannot be unlimited")
        return size
    return parse_size(value)


# -- the WSGI layer with an error hook ----------------------------------------------

def error_from_response(status: str, body: bytes) -> UploadError:
    """Rebuild the refusal the middleware answered with, as its own type."""
    try:
        data = json.loads(body.decode("utf-8"))["error"]
    except (ValueError, KeyError, TypeError):
        data = {"code": "upload_error", "message": body.decode("utf-8", "replace")}
    cls = _error_class(str(data.get("code", "")))
    exc = cls(str(data.get("message", "")), field=data.get("field"), limit=data.get("limit"))
    code = int(status.split(" ", 1)[0])
    if code != cls.status:
        exc.status = code  # type: ignore[misc]  # a subclass outside this package
    return exc


def _error_class(code: str) -> Type[UploadError]:
    stack: List[Type[UploadError]] = [UploadError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return UploadError


def _no_write(data: bytes) -> None:
    raise RuntimeError("uploadkit held this response back; write() is not available")


ErrorHook = Callable[[Environ, UploadError], Optional[WSGIApp]]


class AdapterMiddleware(UploadMiddleware):
    """:class:`UploadMiddleware` that can let the app render refusals.

    ``on_error(environ, exc)`` returns a WSGI app to answer a refused upload, or
    None to keep the JSON answer. Adapters return the framework app itself: it
    is called with ``environ["uploadkit.error"]`` set and an empty body, so the
    page is rendered by the framework with its middleware, templates and
    sessions (the adapter short-circuits to an error view before any view runs).
    """

    def __init__(self, app: WSGIApp, *, on_error: Optional[ErrorHook] = None, **options: Any) -> None:
        super().__init__(app, **options)
        self.on_error = on_error

    def serves_progress(self, environ: Environ) -> bool:
        if self.progress_app is None or not self.progress_path:
            return False
        path = environ.get("PATH_INFO", "")
        return bool(path == self.progress_path or path.startswith(self.progress_path + "/"))

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.on_error is None or self.serves_progress(environ) or not self.intercepts(environ):
            return super().__call__(environ, start_response)
        held: List[Any] = []

        def hold(status: str, headers: List[Any], exc_info: Any = None) -> Callable[[bytes], None]:
            # The app runs only after the files were handed over: anything
            # answered before that is a refusal, which is held back here.
            if FILES_KEY in environ:
                return start_response(status, headers, exc_info)  # type: ignore[no-any-return]
            held.append((status, headers))
            return _no_write

        result = super().__call__(environ, hold)
        if not held:
            return result
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = held[0]
        exc = error_from_response(status, body)
        app = self.on_error(environ, exc)
        if app is None:
            start_response(status, headers)
            return [body]
        for key in _WEBOB_CACHES:
            environ.pop(key, None)
        environ[ERROR_KEY] = exc
        environ["wsgi.input"] = io.BytesIO(b"")
        environ["CONTENT_LENGTH"] = "0"
        return app(environ, start_response)


# -- streaming inside a framework ----------------------------------------------------

def stream_upload(engine: UploadMiddleware, environ: Environ, stream: Any,
                  limits: Optional[Limits] = None) -> Pipeline:
    """Stream the multipart body of ``environ`` from ``stream`` with ``engine``'s
    configuration, and hand it over exactly as the middleware does: see
    :meth:`UploadMiddleware.stream`. For adapters that run inside the framework.
    """
    return engine.stream(environ, stream, limits)


#: Kept under the name the adapters use.
ClosingIterator = ClosingResponse


def charset_of(upload: Any) -> Optional[str]:
    """The ``charset`` parameter of a file part's Content-Type header, if any."""
    header = upload.headers.get("Content-Type") if upload.headers is not None else None
    if not header:
        return None
    for param in header.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


__all__ = [
    "AdapterMiddleware", "ERROR_KEY", "LIMITS_ATTR", "upload_limits", "view_overrides",
    "apply_overrides", "per_view_limits", "middleware_options", "options_from_flat", "parse_size",
    "parse_bool", "import_string", "build_tus", "stream_upload", "ClosingIterator", "error_from_response",
]
