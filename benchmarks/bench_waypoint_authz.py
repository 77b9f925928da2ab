"""The waypoint's per-request authorization with 1,000 AuthorizationPolicies on one Service:
the core's check (what the waypoint runs per request, here reached through its Python binding,
so the figure includes that call) against the readable reference (``authz.evaluate``).

900 ALLOW policies, each for one client (a principal) on its own API prefix and two methods,
and 100 DENY policies on a header value: the mix a large multi-tenant Service accumulates.
Requests: allowed by the first ALLOW policy, by the last, or denied (none matches). The core
files policies under the exact principals they require, so a request tries only its own
client's and the rest; the same 900 ALLOW policies by path only (no principal to file them by)
are all tried in order, the worst case. Target (issue 13): under 20 µs per decision.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
import pytest

from ambient._core import WaypointTable
from ambient.config import kubernetes as k8s
from ambient.config.types import convert
from ambient.waypoint import authz

ALLOWS, DENIES = 900, 100


def policy(name: str, spec: dict[str, Any]) -> authz.WaypointPolicy:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], **spec},
    }
    return authz.compile_policy(convert(doc, k8s.AuthorizationPolicy))


POLICIES = [
    policy(
        f"deny-{i}",
        {
            "action": "DENY",
            "rules": [{"when": [{"key": "request.headers[x-block]", "values": [f"b{i}"]}]}],
        },
    )
    for i in range(DENIES)
] + [
    policy(
        f"allow-{i}",
        {
            "rules": [
                {
                    "from": [{"source": {"principals": [f"cluster.local/ns/t{i}/sa/client"]}}],
                    "to": [{"operation": {"paths": [f"/api/t{i}/*"], "methods": ["GET", "POST"]}}],
                }
            ]
        },
    )
    for i in range(ALLOWS)
]
# The same ALLOW policies without a principal (by path and method only): nothing to index by,
# every policy is tried in order: the worst case.
BY_PATH = POLICIES[:DENIES] + [
    policy(
        f"path-{i}",
        {"rules": [{"to": [{"operation": {"paths": [f"/api/t{i}/*"], "methods": ["GET"]}}]}]},
    )
    for i in range(ALLOWS)
]


def table(policies: list[authz.WaypointPolicy]) -> WaypointTable:
    spec = {
        "targets": {"10.9.0.1": {"kind": "service", "service": 0}},
        "services": [{"name": "shop/web", "ports": {}, "policies": list(range(len(policies)))}],
        "endpoints": [],
        "policies": [authz.policy_json(p) for p in policies],
    }
    return WaypointTable(orjson.dumps(spec).decode())


TABLES = {"per-client policies": table(POLICIES), "path-only policies": table(BY_PATH)}
REQUESTS = {
    "allowed by the first ALLOW": ("t0", "/api/t0/items", True),
    "allowed by the last ALLOW": (f"t{ALLOWS - 1}", f"/api/t{ALLOWS - 1}/items", True),
    "denied, no policy matches": ("t0", "/api/t1/items", False),
}


@pytest.mark.parametrize("policies", list(TABLES))
@pytest.mark.parametrize("case", list(REQUESTS))
def test_authorization_in_the_core(benchmark: Any, case: str, policies: str) -> None:
    tenant, path, allowed = REQUESTS[case]
    principal = f"spiffe://cluster.local/ns/{tenant}/sa/client"
    headers = [("x-request-id", "r"), ("user-agent", "bench")]
    if policies == "path-only policies" and not allowed:
        path = "/api/none/items"  # t1's path is open to anyone here: no principal is required
    result = benchmark(
        TABLES[policies].authorize,
        "10.9.0.1:80",
        "GET",
        path,
        host="web.shop",
        headers=headers,
        source_principal=principal,
        source_ip="10.1.0.7",
    )
    assert result[0] is allowed


@pytest.mark.parametrize("case", list(REQUESTS))
def test_authorization_in_the_python_reference(benchmark: Any, case: str) -> None:
    tenant, path, allowed = REQUESTS[case]
    request = authz.Request(
        method="GET",
        host="web.shop",
        path=path,
        headers={"x-request-id": ["r"], "user-agent": ["bench"]},
        source_principal=f"cluster.local/ns/{tenant}/sa/client",
        source_ip=ipaddress.ip_address("10.1.0.7"),
        destination_ip=ipaddress.ip_address("10.9.0.1"),
        destination_port=80,
    )
    result = benchmark(authz.evaluate, POLICIES, request)
    assert result.allowed is allowed
