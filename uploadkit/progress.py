"""Upload progress: the listener the pipeline calls, the stores it writes to,
and the status route that progress bars poll."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .errors import UploadError
    from .files import FileInfo
    from .pipeline import RequestContext


class ProgressListener:
    """Told what happens to one request, in order; the default does nothing.

    ``start`` -> ``advance``/``file_start``/``file_end`` while bytes arrive ->
    ``processing`` after the last byte -> ``done``; or ``error`` at any point.
    Implementations must never raise into the upload and must be cheap: they
    are called once per read from the client.
    """

    def start(self, ctx: "RequestContext") -> None:
        pass

    def advance(self, received: int, total: Optional[int]) -> None:
        """``received`` body bytes so far; ``total`` is CONTENT_LENGTH or None (chunked)."""

    def file_start(self, info: "FileInfo") -> None:
        pass

    def file_end(self, info: "FileInfo") -> None:
        pass

    def processing(self) -> None:
        pass

    def done(self, ctx: "RequestContext") -> None:
        pass

    def error(self, exc: "UploadError") -> None:
        pass


NULL_PROGRESS = ProgressListener()
