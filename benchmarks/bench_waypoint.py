"""The waypoint's per-request route decision with 100 HTTPRoutes of 10 rules each on one Service:
the core's table (what the waypoint runs per request, here reached through its Python binding,
so the figure includes that call) against the readable reference (``routes.select``).

Each rule matches a PathPrefix and a header; requests take the first rule, the last rule, or no
rule at all (every match is tried: the worst case, a 404).
"""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from typing import Any

import pytest

from ambient._core import WaypointTable
from ambient.config import kubernetes as k8s
from ambient.config.types import convert
from ambient.mesh import Mesh, Service
from ambient.waypoint.routes import HttpRoute, RequestHead, compile_route, select
from ambient.waypoint.table import table_json

ROUTES, RULES = 100, 10
SERVICE = Service(
    name="web",
    namespace="shop",
    hostname="web.shop.svc.cluster.local",
    vips=(("", ipaddress.ip_address("10.9.0.1")),),
    ports=MappingProxyType({80: 8080}),
    waypoint="shop/wp",
    app_protocols=MappingProxyType({80: "http"}),
)


def route(i: int) -> HttpRoute:
    rules = [
        {
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": f"/r{i}/k{j}"},
                    "headers": [{"name": "x-tenant", "value": f"t{j}"}],
                }
            ],
            "backendRefs": [{"name": "web", "port": 80}],
        }
        for j in range(RULES)
    ]
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": f"r{i}", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": rules,
        },
    }
    return compile_route(convert(doc, k8s.HTTPRoute))


HTTP_ROUTES = tuple(route(i) for i in range(ROUTES))
TABLE = WaypointTable(table_json(Mesh(services=(SERVICE,), http_routes=HTTP_ROUTES), "shop/wp"))
REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "first rule": ("/r0/k0/items", {"x-tenant": "t0"}),
    "last rule": (f"/r{ROUTES - 1}/k{RULES - 1}/items", {"x-tenant": f"t{RULES - 1}"}),
    "no rule (404)": ("/nowhere", {"x-tenant": "t0"}),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_route_decision_in_the_core(benchmark: Any, case: str) -> None:
    path, headers = REQUESTS[case]
    pairs = list(headers.items())
    result = benchmark(TABLE.route, "10.9.0.1:80", "GET", path, None, pairs, "shop")
    assert (result is None) == (case == "no rule (404)")


@pytest.mark.parametrize("case", list(REQUESTS))
def test_route_decision_in_the_python_reference(benchmark: Any, case: str) -> None:
    path, headers = REQUESTS[case]
    head = RequestHead("GET", path, headers, {})
    result = benchmark(select, HTTP_ROUTES, head)
    assert (result is None) == (case == "no rule (404)")
