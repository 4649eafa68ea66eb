"""uploadkit: streaming multipart uploads for any WSGI app."""

from .errors import UploadError
from .files import FileInfo, UploadedFile
from .handlers import SKIP, UploadHandler
from .limits import Limits
from .middleware import UploadMiddleware
from .storage import Storage, StorageApp

__all__ = ["Limits", "UploadError", "UploadedFile", "FileInfo", "UploadHandler", "SKIP",
           "UploadMiddleware", "Storage", "StorageApp"]
__version__ = "0.1.0"
