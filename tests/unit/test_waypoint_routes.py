"""The waypoint's HTTP routing semantics (ambient.waypoint.routes), table-driven: each case names
the rule of Gateway API's HTTPRoute (GAMMA) it shows. And HTTPRoutes in mesh files: validated,
compiled into the snapshot, refused naming the file and the field."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from ambient.config import ConfigError, load_mesh
from ambient.config import kubernetes as k8s
from ambient.config.types import convert
from ambient.waypoint.routes import (
    HttpRoute,
    RequestHead,
    RouteError,
    applies,
    compile_route,
    select,
)


def route(name: str, rules: list[dict[str, Any]], **meta: Any) -> HttpRoute:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop", **meta},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": rules},
    }
    return compile_route(convert(doc, k8s.HTTPRoute))


def to(backend: str, *matches: dict[str, Any]) -> dict[str, Any]:
    return {"matches": list(matches), "backendRefs": [{"name": backend, "port": 80}]}


def path(kind: str, value: str) -> dict[str, Any]:
    return {"path": {"type": kind, "value": value}}


def chosen(routes: list[HttpRoute], head: RequestHead) -> str | None:
    selected = select(routes, head)
    return None if selected is None else selected.rule.backends[0].name


GET = "GET"

MATCHING = [
    # (spec rule, rules, request path, expected backend or None)
    ("no matches: every path (PathPrefix /)", [to("a")], "/anything", "a"),
    ("Exact is case-sensitive", [to("a", path("Exact", "/Foo"))], "/foo", None),
    ("Exact matches the whole path", [to("a", path("Exact", "/foo"))], "/foo/bar", None),
    ("PathPrefix matches the path itself", [to("a", path("PathPrefix", "/abc"))], "/abc", "a"),
    ("PathPrefix matches below it", [to("a", path("PathPrefix", "/abc"))], "/abc/def", "a"),
    ("PathPrefix is element-wise", [to("a", path("PathPrefix", "/abc"))], "/abcd", None),
    ("a prefix's trailing / is ignored", [to("a", path("PathPrefix", "/abc/"))], "/abc", "a"),
    (
        "RegularExpression: the whole path",
        [to("a", path("RegularExpression", "/v[0-9]+"))],
        "/v12",
        "a",
    ),
    (
        "RegularExpression: not a part of it",
        [to("a", path("RegularExpression", "/v[0-9]"))],
        "/v1/x",
        None,
    ),
    (
        "matches of a rule are alternatives",
        [to("a", path("Exact", "/x"), path("Exact", "/y"))],
        "/y",
        "a",
    ),
]


@pytest.mark.parametrize(
    ("rule", "rules", "request_path", "expected"), MATCHING, ids=[c[0] for c in MATCHING]
)
def test_path_matching(rule, rules, request_path, expected):
    assert chosen([route("r", rules)], RequestHead(GET, request_path)) == expected


def test_conditions_of_one_match_must_all_hold_and_header_names_are_case_insensitive():
    r = route(
        "r",
        [
            to(
                "a",
                {
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "method": "POST",
                    "headers": [
                        {"name": "X-Env", "value": "canary"},
                        {"type": "RegularExpression", "name": "x-user", "value": "u[0-9]+"},
                    ],
                    "queryParams": [{"name": "debug", "value": "1"}],
                },
            )
        ],
    )
    ok = RequestHead("POST", "/api/x", {"x-env": "canary", "x-user": "u42"}, {"debug": ["1"]})
    assert chosen([r], ok) == "a"
    for head in (
        RequestHead("GET", ok.path, ok.headers, ok.query),  # method
        RequestHead("POST", "/other", ok.headers, ok.query),  # path
        RequestHead("POST", ok.path, {"x-env": "canary", "x-user": "bob"}, ok.query),  # regex
        RequestHead("POST", ok.path, {"x-user": "u1"}, ok.query),  # header missing
        RequestHead("POST", ok.path, ok.headers, {"debug": ["0"]}),  # query value
    ):
        assert chosen([r], head) is None, head


PRECEDENCE = [
    (
        "an Exact path beats any prefix",
        [to("prefix", path("PathPrefix", "/foo")), to("exact", path("Exact", "/foo/bar"))],
        RequestHead(GET, "/foo/bar"),
        "exact",
    ),
    (
        "the longest PathPrefix wins",
        [to("short", path("PathPrefix", "/foo")), to("long", path("PathPrefix", "/foo/bar"))],
        RequestHead(GET, "/foo/bar/baz"),
        "long",
    ),
    (
        "with equal paths, a method match wins",
        [
            to("any", path("PathPrefix", "/")),
            to("get", {**path("PathPrefix", "/"), "method": "GET"}),
        ],
        RequestHead(GET, "/x"),
        "get",
    ),
    (
        "then the most header matches",
        [
            to("one", {"headers": [{"name": "a", "value": "1"}]}),
            to("two", {"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}),
        ],
        RequestHead(GET, "/", {"a": "1", "b": "2"}),
        "two",
    ),
    (
        "then the most query param matches",
        [to("none"), to("one", {"queryParams": [{"name": "q", "value": "1"}]})],
        RequestHead(GET, "/", {}, {"q": ["1"]}),
        "one",
    ),
    (
        "a longer prefix beats more headers (path comes first)",
        [
            to("headers", {**path("PathPrefix", "/a"), "headers": [{"name": "h", "value": "1"}]}),
            to("path", path("PathPrefix", "/a/b")),
        ],
        RequestHead(GET, "/a/b", {"h": "1"}),
        "path",
    ),
    (
        "within a route, the first matching rule",
        [to("first", path("PathPrefix", "/a")), to("second", path("PathPrefix", "/a"))],
        RequestHead(GET, "/a"),
        "first",
    ),
]


@pytest.mark.parametrize(
    ("rule", "rules", "head", "expected"), PRECEDENCE, ids=[c[0] for c in PRECEDENCE]
)
def test_precedence_within_a_route(rule, rules, head, expected):
    assert chosen([route("r", rules)], head) == expected


def test_ties_across_routes_go_to_the_oldest_then_by_namespace_and_name():
    newer = route("a-newer", [to("newer")], creationTimestamp="2026-02-01T00:00:00Z")
    older = route("z-older", [to("older")], creationTimestamp="2026-01-01T00:00:00Z")
    head = RequestHead(GET, "/")
    assert chosen([newer, older], head) == "older"
    assert chosen([route("b", [to("b")]), route("a", [to("a")])], head) == "a"


def test_a_route_applies_to_its_services_port_and_to_clients_of_its_namespace_or_all():
    here = route("r", [to("a")])
    assert applies(here, ("shop", "web"), 80, client_namespace="other")
    assert not applies(here, ("shop", "api"), 80, client_namespace="shop")
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "mine", "namespace": "client"},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "web", "namespace": "shop", "port": 80}
            ]
        },
    }
    consumer = compile_route(convert(doc, k8s.HTTPRoute))
    assert applies(consumer, ("shop", "web"), 80, client_namespace="client")
    assert not applies(consumer, ("shop", "web"), 80, client_namespace="elsewhere")
    assert not applies(consumer, ("shop", "web"), 8080, client_namespace="client")


REFUSED = [
    (
        "a bad regular expression",
        [to("a", path("RegularExpression", "/(x"))],
        "spec.rules[0].matches[0].path.value",
        "not a valid regular expression",
    ),
    (
        "a path not starting with /",
        [to("a", path("PathPrefix", "api"))],
        "spec.rules[0].matches[0].path.value",
        "starts with '/'",
    ),
    (
        "a header matched twice",
        [to("a", {"headers": [{"name": "A", "value": "1"}, {"name": "a", "value": "2"}]})],
        "spec.rules[0].matches[0].headers[1].name",
        "matched twice",
    ),
    (
        "redirect with backends",
        [
            {
                **to("a"),
                "filters": [
                    {"type": "RequestRedirect", "requestRedirect": {"hostname": "x.example"}}
                ],
            }
        ],
        "spec.rules[0].backendRefs",
        "has no backends",
    ),
    (
        "redirect and rewrite",
        [
            {
                "filters": [
                    {"type": "RequestRedirect", "requestRedirect": {}},
                    {"type": "URLRewrite", "urlRewrite": {}},
                ]
            }
        ],
        "spec.rules[0].filters",
        "exclude each other",
    ),
    (
        "a filter without its configuration",
        [{**to("a"), "filters": [{"type": "RequestHeaderModifier"}]}],
        "spec.rules[0].filters[0]",
        "holds `requestHeaderModifier`",
    ),
    (
        "a filter twice",
        [{**to("a"), "filters": [{"type": "URLRewrite", "urlRewrite": {}}] * 2}],
        "spec.rules[0].filters[1]",
        "appears twice",
    ),
    (
        "ReplacePrefixMatch on an Exact match",
        [
            {
                **to("a", path("Exact", "/a")),
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}
                        },
                    }
                ],
            }
        ],
        "spec.rules[0].filters[0].urlRewrite.path",
        "needs the rule's paths to be PathPrefix",
    ),
    (
        "a backend that is not a Service",
        [{"backendRefs": [{"kind": "Pod", "name": "p"}]}],
        "spec.rules[0].backendRefs[0]",
        "a backend is a Service",
    ),
]


@pytest.mark.parametrize(
    ("case", "rules", "field", "message"), REFUSED, ids=[c[0] for c in REFUSED]
)
def test_routes_that_cannot_be_followed_are_refused_naming_the_field(case, rules, field, message):
    with pytest.raises(RouteError) as refused:
        route("r", rules)
    assert refused.value.field == field and message in str(refused.value)


def mesh_file(tmp_path, text: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(text))
    return path


SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: default}
spec: {clusterIP: 10.96.0.11, selector: {app: echo, version: v1}, ports: [{port: 80}]}
"""

# The seed's example, as written (no namespace: kubectl applies it to `default`).
SEED_ROUTE = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: echo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - backendRefs:
    - name: echo-v1
      port: 80
"""


def test_the_seeds_route_loads_into_the_snapshot_and_routes_every_request_to_echo_v1(tmp_path):
    mesh = load_mesh([mesh_file(tmp_path, SERVICES + SEED_ROUTE)])
    (echo,) = mesh.http_routes
    assert (echo.namespace, echo.name) == ("default", "echo")
    assert applies(echo, ("default", "echo"), 80, client_namespace="anywhere")
    selected = select([echo], RequestHead("GET", "/any/path"))
    assert selected is not None and selected.rule.backends[0].name == "echo-v1"


def test_a_route_in_a_mesh_file_is_refused_naming_the_file_and_field(tmp_path):
    bad = SEED_ROUTE.replace(
        "  - backendRefs:",
        "  - matches: [{path: {type: RegularExpression, value: '/(x'}}]\n    backendRefs:",
    )
    path = mesh_file(tmp_path, SERVICES + bad)
    with pytest.raises(ConfigError) as refused:
        load_mesh([path])
    (issue,) = refused.value.issues
    assert issue.location.file == str(path) and issue.location.resource == "HTTPRoute echo"
    assert issue.field == "spec.rules[0].matches[0].path.value"


def test_a_route_to_a_service_not_in_the_mesh_is_kept_with_a_warning(tmp_path):
    mesh = load_mesh(
        [
            mesh_file(
                tmp_path,
                SERVICES + SEED_ROUTE.replace("name: echo\n  rules", "name: nope\n  rules"),
            )
        ]
    )
    assert any("parent Service default/nope is not in the mesh" in w for w in mesh.warnings)


def test_a_schema_error_in_a_route_names_the_field(tmp_path):
    path = mesh_file(
        tmp_path, SERVICES + SEED_ROUTE.replace("port: 80", "port: 80\n      weight: -1")
    )
    with pytest.raises(ConfigError) as refused:
        load_mesh([path])
    assert "spec.rules[0].backendRefs[0].weight: expected an integer >= 0, got -1" in str(
        refused.value
    )
