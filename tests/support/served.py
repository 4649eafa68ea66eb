"""What the apps that gunicorn serves in tests share (kept free of pytest,
which a served app must not import)."""

from __future__ import annotations

import json
from typing import Any, Callable, List

StartResponse = Callable[..., Any]


def json_answer(start_response: StartResponse, payload: Any, status: str = "200 OK") -> List[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
