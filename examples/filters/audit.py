"""An audit logger: one JSON line per request with who asked what and what was answered,
appended to a file; with ``body_limit``, the SHA-256 of each request body too.

pluginConfig:
  path: the file the lines are appended to (required)
  body_limit: bytes of request body read to digest (default 0: bodies are not read; a larger
    body is refused with 413)
  headers: request headers copied into the line, optional

It looks at the response too (``on_response``), so the line carries the status, and it tags the
response with ``x-audit-id`` (the request's ``x-request-id``) for support to find it again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from ambient.filters import Filter, Request, Response


class AuditLog(Filter):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        if "path" not in config:
            raise ValueError("pluginConfig.path (the audit file) is required")
        self.path = str(config["path"])
        self.request_body_limit = int(config.get("body_limit", 0))
        self.headers = [str(h).lower() for h in config.get("headers", ())]
        self.lock = threading.Lock()

    def on_request(self, request: Request) -> None:
        request.notes["started"] = time.time()

    def on_response(self, request: Request, response: Response) -> None:
        line = {
            "time": request.notes["started"],
            "request_id": request.headers.get("x-request-id"),
            "source": request.source_principal,
            "user": request.request_principal,
            "method": request.method,
            "authority": request.authority,
            "path": request.path,
            "service": request.service,
            "status": response.status,
            "headers": {h: request.headers.get(h) for h in self.headers},
        }
        if request.body is not None:
            line["body_bytes"] = len(request.body)
            line["body_sha256"] = hashlib.sha256(request.body).hexdigest()
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if line["request_id"]:
            response.headers["x-audit-id"] = line["request_id"]
