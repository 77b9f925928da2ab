"""The core's routing table against the reference: on generated HTTPRoutes and requests, the rule
the core takes (``WaypointTable.route``, matching the table ``ambient.waypoint.table`` compiles)
is the one ``ambient.waypoint.routes.select`` takes — including the 404 when routes are attached
and none matches, and the Service itself when none is attached for the client's namespace.
``AMBIENT_FUZZ_SCALE=10`` runs ten times as many examples."""

from __future__ import annotations

import ipaddress
import os
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient._core import WaypointTable
from ambient.config import kubernetes as k8s
from ambient.config.types import convert
from ambient.mesh import Mesh, Service
from ambient.waypoint.routes import HttpRoute, RequestHead, applies, compile_route, select
from ambient.waypoint.table import table_json

SCALE = int(os.environ.get("AMBIENT_FUZZ_SCALE", "1"))
WAYPOINT = "shop/wp"
SERVICE = Service(
    name="web",
    namespace="shop",
    hostname="web.shop.svc.cluster.local",
    vips=(("", ipaddress.ip_address("10.9.0.1")),),
    ports=MappingProxyType({80: 8080, 81: 8081}),
    waypoint=WAYPOINT,
    app_protocols=MappingProxyType({80: "http", 81: "http"}),
)
SEGMENTS = ["a", "b", "ab", "A", ""]
HEADERS = ["x-a", "x-b"]
VALUES = ["1", "2", "12", ""]

segments = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3)
paths = segments.map(lambda parts: "/" + "/".join(parts))


@st.composite
def path_match(draw: Any) -> dict[str, str]:
    kind = draw(st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]))
    if kind == "RegularExpression":
        value = draw(st.sampled_from(["/a.*", "/[ab]+", "/a/b", "/(a|b)/?", ".*"]))
    else:
        value = draw(paths)
        if kind == "PathPrefix" and draw(st.booleans()):
            value = value.rstrip("/") + "/"
    return {"type": kind, "value": value}


def value_matches(names: list[str]) -> Any:
    one = st.fixed_dictionaries(
        {
            "name": st.sampled_from(names),
            "value": st.sampled_from(VALUES[:3]),
            "type": st.sampled_from(["Exact", "RegularExpression"]),
        }
    ).map(lambda m: m if m["type"] == "Exact" else {**m, "value": "[12]+"})
    return st.lists(one, max_size=2, unique_by=lambda m: m["name"].lower())


# A path in most matches (one without is PathPrefix /, every request): enough requests then
# match no rule for the 404 to be exercised as much as the rules.
match = st.fixed_dictionaries(
    {"path": path_match()},
    optional={
        "headers": value_matches(["x-a", "X-B"]),
        "queryParams": value_matches(["q", "r"]),
        "method": st.sampled_from(["GET", "POST"]),
    },
)
rule = st.fixed_dictionaries(
    {
        # One rule in ten has no matches (every request).
        "matches": st.integers(0, 9).flatmap(
            lambda n: st.just([]) if n == 0 else st.lists(match, min_size=1, max_size=3)
        ),
        "backendRefs": st.just([{"name": "web", "port": 80}]),
    }
)


@st.composite
def http_route(draw: Any, index: int) -> HttpRoute:
    namespace = draw(st.sampled_from(["shop", "shop", "other"]))
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": "web", "namespace": "shop"}
    port = draw(st.sampled_from([None, 80, 81]))
    if port is not None:
        parent["port"] = port
    meta: dict[str, Any] = {"name": f"r{index}", "namespace": namespace}
    created = draw(st.sampled_from([None, "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]))
    if created is not None:
        meta["creationTimestamp"] = created
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {"parentRefs": [parent], "rules": draw(st.lists(rule, min_size=1, max_size=3))},
    }
    return compile_route(convert(doc, k8s.HTTPRoute))


@st.composite
def meshes(draw: Any) -> tuple[HttpRoute, ...]:
    n = draw(st.integers(min_value=0, max_value=4))
    return tuple(draw(http_route(i)) for i in range(n))


requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST"]),
        "path": paths,
        "query": st.one_of(
            st.none(),
            st.lists(
                st.tuples(st.sampled_from(["q", "r", "s"]), st.sampled_from(VALUES)), max_size=3
            ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)),
        ),
        "headers": st.lists(
            st.tuples(st.sampled_from([*HEADERS, "X-A"]), st.sampled_from(VALUES)), max_size=3
        ),
        "client": st.sampled_from(["shop", "other", "elsewhere"]),
        "port": st.sampled_from([80, 81]),
    }
)


def reference(routes: tuple[HttpRoute, ...], req: dict[str, Any]) -> str | None:
    applicable = [r for r in routes if applies(r, ("shop", "web"), req["port"], req["client"])]
    if not applicable:
        return "shop/web (the Service itself)"
    headers: dict[str, str] = {}
    for name, value in req["headers"]:
        k = name.lower()
        headers[k] = f"{headers[k]},{value}" if k in headers else value
    query = parse_qs(req["query"] or "", keep_blank_values=True)
    head = RequestHead(req["method"], req["path"], headers, query)
    selected = select(applicable, head)
    if selected is None:
        return None
    return f"{selected.route.namespace}/{selected.route.name}#{selected.rule_index}"


@settings(
    max_examples=400 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(meshes(), st.lists(requests, min_size=1, max_size=8))
def test_the_core_takes_the_rule_the_reference_selects(routes, reqs):
    table = WaypointTable(table_json(Mesh(services=(SERVICE,), http_routes=routes), WAYPOINT))
    for req in reqs:
        got = table.route(
            f"10.9.0.1:{req['port']}",
            req["method"],
            req["path"],
            req["query"],
            req["headers"],
            req["client"],
        )
        assert got == reference(routes, req), req


def test_a_target_not_bound_is_refused_by_name():
    table = WaypointTable(table_json(Mesh(services=(SERVICE,)), WAYPOINT))
    assert table.route("10.9.0.1:80", "GET", "/") == "shop/web (the Service itself)"
    try:
        table.route("10.9.0.2:80", "GET", "/")
    except ValueError as e:
        assert "10.9.0.2:80 is not a Service port bound to this waypoint" in str(e)
    else:
        raise AssertionError("an unbound target was routed")
