"""uploadkit: streaming multipart uploads for any WSGI app."""

from typing import Any

from .errors import UploadError
from .files import FileInfo, UploadedFile
from .handlers import SKIP, UploadHandler
from .limits import Limits

__all__ = ["Limits", "UploadError", "UploadedFile", "FileInfo", "UploadHandler", "SKIP",
           "UploadMiddleware", "Storage", "StorageApp"]
__version__ = "0.1.0"

# Imported on first use: fsspec and WebOb cost tens of MB that a script using
# only the parser or the thumbnailer does not need.
_LAZY = {"UploadMiddleware": "middleware", "Storage": "storage", "StorageApp": "storage"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'uploadkit' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
