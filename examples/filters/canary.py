"""Header-based canary: a share of users, each always the same, gets ``x-canary: true``; an
HTTPRoute rule matching that header sends them to the canary backend.

pluginConfig:
  user_header: the header naming the user (default ``x-user``)
  percent: the share of users sent to the canary, 0 to 100 (default 10)
  mark: the header set on their requests (default ``x-canary``)
  users: users always in the canary (testers), optional

The mark a client sends itself is removed: only this filter decides who is in the canary. Run it
in the STATS phase (after authorization, before routing) so routing sees the mark.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ambient.filters import Filter, Request


class Canary(Filter):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.user_header = str(config.get("user_header", "x-user"))
        self.percent = float(config.get("percent", 10))
        if not 0 <= self.percent <= 100:
            raise ValueError(f"percent must be from 0 to 100, not {self.percent}")
        self.mark = str(config.get("mark", "x-canary"))
        self.users = frozenset(config.get("users", ()))

    def in_canary(self, user: str) -> bool:
        if user in self.users:
            return True
        # Stable per user: the same user lands on the same side on every request and replica.
        bucket = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % 10_000
        return bucket < self.percent * 100

    def on_request(self, request: Request) -> None:
        request.headers.remove(self.mark)
        user = request.headers.get(self.user_header)
        if user and self.in_canary(user):
            request.headers[self.mark] = "true"
