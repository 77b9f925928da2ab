"""A per-tenant rate limiter: one token bucket per tenant, refilled at ``rate`` tokens a second up
to ``burst``; a request that finds its bucket empty is answered 429 with ``retry-after``.

pluginConfig:
  tenant_header: the header naming the tenant (default ``x-tenant``)
  rate: tokens per second (default 10)
  burst: the bucket's size (default ``rate``)
  tenants: {tenant: {rate, burst}} overrides, optional
  max_tenants: buckets kept at most; the least recently seen is forgotten (default 10000)

Requests without the header share the bucket of the tenant ``""``. Each waypoint replica
counts on its own (as Envoy's local rate limit does).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ambient.filters import Filter, Reply, Request, respond


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimit(Filter):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.header = str(config.get("tenant_header", "x-tenant"))
        self.rate = float(config.get("rate", 10))
        self.burst = float(config.get("burst", self.rate))
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be above 0 and burst at least 1")
        self.overrides = {
            str(t): (float(o.get("rate", self.rate)), float(o.get("burst", self.burst)))
            for t, o in dict(config.get("tenants", {})).items()
        }
        self.max_tenants = int(config.get("max_tenants", 10_000))
        self.buckets: OrderedDict[str, Bucket] = OrderedDict()
        # Calls run on several threads at once.
        self.lock = threading.Lock()

    def take(self, tenant: str, now: float) -> float:
        """0 if a token was taken, else the seconds until one is there."""
        rate, burst = self.overrides.get(tenant, (self.rate, self.burst))
        with self.lock:
            bucket = self.buckets.pop(tenant, None) or Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            self.buckets[tenant] = bucket
            while len(self.buckets) > self.max_tenants:
                self.buckets.popitem(last=False)
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / rate

    def on_request(self, request: Request) -> Reply | None:
        tenant = request.headers.get(self.header, "") or ""
        wait = self.take(tenant, time.monotonic())
        if wait == 0:
            return None
        return respond(
            429,
            f"tenant {tenant or '(none)'} is over its rate limit\n",
            {"retry-after": str(math.ceil(wait))},
        )
