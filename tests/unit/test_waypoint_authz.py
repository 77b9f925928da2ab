"""AuthorizationPolicy at the waypoint: the reference semantics (``ambient.waypoint.authz``),
the config errors a policy the waypoint cannot enforce gets, and the core's per-request check
held to the reference on generated policies and requests (a differential test)."""

from __future__ import annotations

import ipaddress
import json
import random
import textwrap
from pathlib import Path

import orjson
import pytest

from ambient._core import WaypointTable, normalize_path
from ambient.config import load_mesh
from ambient.config.errors import ConfigError
from ambient.waypoint import authz
from ambient.waypoint.authz import Check, RequestAuth, WaypointPolicy
from ambient.waypoint.table import compile_table

# --- path normalization ------------------------------------------------------------------------

NORMALIZED = [
    # (raw, normalized, what it shows)
    ("/admin", "/admin", "a normal path is left alone"),
    ("/admin/../admin", "/admin", "dot-dot segments removed (RFC 3986 5.2.4)"),
    ("/public/../admin", "/admin", "dot-dot climbing out of an allowed prefix"),
    ("//admin", "/admin", "merged slashes"),
    ("/a///b//c", "/a/b/c", "every run of slashes merged"),
    ("/%61dmin", "/admin", "percent-encoded unreserved letter decoded"),
    ("/%41%44MIN", "/ADMIN", "upper-case letters decoded, case kept"),
    ("/a/%2e%2e/admin", "/admin", "percent-encoded dots are dots, then removed"),
    ("/a/%2E/b", "/a/b", "an encoded single dot segment removed"),
    ("/a%2Fb", "/a%2Fb", "an encoded slash (reserved) is kept encoded"),
    ("/a%20b", "/a%20b", "an encoded space (not unreserved) kept"),
    ("/%7Euser", "/~user", "tilde is unreserved"),
    ("/a/./b/", "/a/b/", "single dot removed, trailing slash kept"),
    ("/a/.", "/a/", "a final dot leaves a directory"),
    ("/a/..", "/", "a final dot-dot climbs to the root"),
    ("/..", "/", "dot-dot at the root stays at the root"),
    ("/../../etc/passwd", "/etc/passwd", "dot-dots past the root are dropped"),
    ("/.well-known/x", "/.well-known/x", "a segment starting with a dot is not a dot segment"),
    ("/a..b/c", "/a..b/c", "dots inside a segment are kept"),
    ("/%", "/%", "a lone percent kept"),
    ("/%zz", "/%zz", "a bad escape kept"),
    ("/%6", "/%6", "a truncated escape kept"),
    ("*", "*", "OPTIONS *"),
]


@pytest.mark.parametrize(("raw", "want", "why"), NORMALIZED, ids=[c[2] for c in NORMALIZED])
def test_path_normalization(raw: str, want: str, why: str) -> None:
    assert authz.normalize_path(raw) == want, why
    assert normalize_path(raw) == want, f"the core: {why}"


def test_core_normalizes_as_the_reference_on_generated_paths() -> None:
    rng = random.Random(7)
    pieces = ["/", "//", ".", "..", "a", "B", "%2e", "%2E", "%2f", "%41", "%7e", "%", "%zz", "~"]
    for _ in range(3000):
        raw = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert normalize_path(raw) == authz.normalize_path(raw), raw


# --- compiling policies: what a user gets told --------------------------------------------------

HEAD = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.11, selector: {app: echo}, ports: [{name: http, port: 80}]}
---
"""


def policy_yaml(
    spec: str, name: str = "p", namespace: str = "default", annotations: str = "{}"
) -> str:
    return textwrap.dedent(f"""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: {name}, namespace: {namespace}, annotations: {annotations}}}
    spec: {spec}
    ---
    """)


def load(tmp_path: Path, *policies: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "".join(policies))
    return load_mesh([path]), path


ON_ECHO = "{targetRefs: [{kind: Service, name: echo}], "
REFUSED = [
    (
        ON_ECHO + "rules: [{to: [{operation: {paths: ['/a/{*'] }}]}]}",
        "spec.rules[0].to[0].operation.paths[0]",
        "path template",
    ),
    (
        ON_ECHO + "rules: [{to: [{operation: {paths: ['/{**}/a/{*}'] }}]}]}",
        "spec.rules[0].to[0].operation.paths[0]",
        "last operator",
    ),
    (
        ON_ECHO + "rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "CIDR",
    ),
    (
        ON_ECHO + "rules: [{to: [{operation: {notPorts: ['http']}}]}]}",
        "spec.rules[0].to[0].operation.notPorts[0]",
        "port number",
    ),
    (
        ON_ECHO + "rules: [{when: [{key: request.body, values: [x]}]}]}",
        "spec.rules[0].when[0].key",
        "unknown condition key",
    ),
    (
        ON_ECHO + "rules: [{when: [{key: 'request.headers[x-a]'}]}]}",
        "spec.rules[0].when[0]",
        "values or notValues",
    ),
    (
        "{targetRefs: [{kind: Service, name: echo, namespace: other}]}",
        "spec.targetRefs[0].namespace",
        "policy's namespace",
    ),
    (
        "{targetRefs: [{kind: Deployment, group: apps, name: echo}]}",
        "spec.targetRefs[0].kind",
        "expected a Gateway",
    ),
    (
        "{targetRefs: [{kind: GatewayClass, name: istio-waypoint}]}",
        "spec.targetRefs[0]",
        "root namespace",
    ),
    (
        ON_ECHO + "action: CUSTOM}",
        "spec.provider.name",
        "external authorizer",
    ),
    (
        ON_ECHO + "action: ALLOW, provider: {name: ext}}",
        "spec.provider",
        "only a CUSTOM policy",
    ),
    (
        ON_ECHO + "rules: [{to: [{operation: {methods: ['']}}]}]}",
        "spec.rules[0].to[0].operation.methods[0]",
        "empty value",
    ),
]


@pytest.mark.parametrize(("spec", "field", "said"), REFUSED, ids=[r[2] for r in REFUSED])
def test_a_policy_the_waypoint_cannot_enforce_is_refused_naming_the_field(
    tmp_path: Path, spec: str, field: str, said: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, policy_yaml(spec))
    text = str(e.value)
    assert "mesh.yaml" in text and field in text and said in text, text


def test_which_policies_apply_at_the_waypoint(tmp_path: Path) -> None:
    mesh, _ = load(
        tmp_path,
        policy_yaml(
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}",
            "gw",
        ),
        policy_yaml("{targetRefs: [{kind: Service, group: '', name: echo}]}", "svc"),
        policy_yaml("{targetRef: {kind: Service, name: other}}", "single-ref"),
        policy_yaml(
            "{targetRefs: [{kind: GatewayClass, name: istio-waypoint}]}", "class", "istio-system"
        ),
        policy_yaml(
            "{selector: {matchLabels: {app: echo}}, action: DENY, rules: [{}]}", "selector"
        ),
        policy_yaml(
            "{action: DENY, rules: [{to: [{operation: {ports: ['1']}}]}]}", "namespace-wide"
        ),
    )
    assert [p.key for p in mesh.waypoint_policies] == [
        "default/gw", "default/svc", "default/single-ref", "istio-system/class",
    ]  # fmt: skip
    # ztunnel keeps the selector and namespace-wide ones, and none of the targetRefs ones.
    assert sorted(p.key for p in mesh.policies) == ["default/namespace-wide", "default/selector"]
    table = compile_table(mesh, "default/waypoint")
    names = [p["key"] for p in table["policies"]]
    by_service = {s["name"]: sorted(names[i] for i in s["policies"]) for s in table["services"]}
    assert by_service == {
        "default/echo": ["default/gw", "default/svc", "istio-system/class"],
        "default/other": ["default/gw", "default/single-ref", "istio-system/class"],
    }
    assert sorted(names[i] for i in table["workload_policies"]) == [
        "default/gw", "istio-system/class",
    ]  # fmt: skip
    # Another waypoint gets only the class-wide one.
    assert [p["key"] for p in compile_table(mesh, "default/elsewhere")["policies"]] == [
        "istio-system/class"
    ]
    assert authz.applies(mesh.waypoint_policies[3], "x/y", None)


def test_dry_run_annotation_is_read(tmp_path: Path) -> None:
    mesh, _ = load(
        tmp_path,
        policy_yaml(
            "{targetRefs: [{kind: Service, name: echo}], action: DENY, rules: [{}]}",
            annotations='{istio.io/dry-run: "true"}',
        ),
    )
    assert mesh.waypoint_policies[0].dry_run


# --- the core against the reference -------------------------------------------------------------

PRINCIPALS = [
    "cluster.local/ns/default/sa/client",
    "cluster.local/ns/default/sa/admin",
    "cluster.local/ns/other/sa/client",
    "",
]
STRINGS = {
    "source.principal": [
        "cluster.local/ns/default/sa/client",
        "cluster.local/ns/default/*",
        "*/sa/admin",
        "*",
        "cluster.local/ns/other/sa/client",
    ],
    "source.namespace": ["default", "other", "def*", "*"],
    "source.service_account": ["default/client", "other/client", "default/admin"],
    "request.auth.principal": ["https://issuer/alice", "https://issuer/*", "*"],
    "request.auth.audiences": ["api", "web", "*"],
    "request.auth.presenter": ["cli", "*"],
    "request.method": ["GET", "POST", "DELETE", "G*", "*"],
    "request.headers": ["v1", "v2", "v*", "*"],
    "request.auth.claims": ["admins", "dev*", "true", "42"],
    "connection.sni": ["*", "x"],
}
VALUES = {
    **STRINGS,
    "source.ip": ["10.1.0.0/16", "10.1.2.3", "10.2.0.0/15", "0.0.0.0/0"],
    "remote.ip": ["192.0.2.0/24", "10.1.2.3/32", "198.51.100.7"],
    "destination.ip": ["10.96.0.10", "10.96.0.0/24"],
    "destination.port": ["80", "8080"],
    "request.host": ["echo.example", "*.example", "echo.example:80", "ECHO.EXAMPLE", "*"],
    "request.path": ["/admin", "/admin*", "*.css", "/users/{*}/profile", "/files/{**}",
                     "/a/{*}/c/{**}", "*"],
}  # fmt: skip


def random_check(rng: random.Random) -> Check:
    attribute = rng.choice(sorted(VALUES))
    pool = VALUES[attribute]
    values = tuple(rng.sample(pool, rng.randint(0, 2)))
    not_values = tuple(rng.sample(pool, rng.randint(0 if values else 1, 1)))
    key: tuple[str, ...] = ()
    if attribute == "request.headers":
        key = (rng.choice(["x-version", "x-other"]),)
    elif attribute == "request.auth.claims":
        key = rng.choice([("groups",), ("realm", "roles"), ("admin",), ("level",)])
    return Check(attribute, values, not_values, key)


def random_policy(rng: random.Random, n: int) -> WaypointPolicy:
    rules = tuple(
        tuple(
            tuple(
                tuple(random_check(rng) for _ in range(rng.randint(0, 2)))
                for _ in range(rng.randint(1, 2))
            )
            for _ in range(rng.randint(0, 3))
        )
        for _ in range(rng.randint(0, 2))
    )
    return WaypointPolicy(
        "default",
        f"p{n}",
        rng.choice(["ALLOW", "ALLOW", "DENY", "AUDIT"]),
        (),
        rules,
        dry_run=rng.random() < 0.15,
    )


def random_request(rng: random.Random) -> tuple[authz.Request, dict]:
    auth = None
    if rng.random() < 0.5:
        auth = RequestAuth(
            rng.choice(["https://issuer/alice", "https://issuer/bob", "https://other/alice"]),
            tuple(rng.sample(["api", "web", "mobile"], rng.randint(0, 2))),
            rng.choice(["", "cli", "web"]),
            rng.choice([
                {"groups": ["admins", "devs"], "realm": {"roles": ["dev-a"]}, "admin": True},
                {"groups": "admins", "level": 42},
                {"realm": {"roles": "ops"}},
                {},
            ]),
        )  # fmt: skip
    headers: dict[str, list[str]] = {}
    for name in ("x-version", "x-other"):
        if rng.random() < 0.6:
            headers[name] = rng.sample(["v1", "v2", "v3", ""], rng.randint(1, 2))
    xff = rng.choice([None, "192.0.2.9", "198.51.100.7, 10.1.2.3", "bogus"])
    if xff is not None:
        headers["x-forwarded-for"] = [xff]
    source_ip = ipaddress.ip_address(rng.choice(["10.1.2.3", "10.1.9.9", "10.3.0.1"]))
    raw_path = rng.choice([
        "/admin", "/admin/x", "/x/../admin", "//admin", "/%61dmin", "/site.css", "/users/7/profile",
        "/users/7/8/profile", "/files", "/files/", "/files/a/b", "/a/b/c/d", "/a/b/c", "/",
    ])  # fmt: skip
    request = authz.Request(
        method=rng.choice(["GET", "POST", "DELETE", "PUT"]),
        host=rng.choice(
            ["echo.example", "echo.example:80", "Echo.Example:8080", "api.example", ""]
        ),
        path=authz.normalize_path(raw_path),
        headers=headers,
        source_principal=rng.choice(PRINCIPALS),
        source_ip=source_ip,
        destination_ip=ipaddress.ip_address("10.96.0.10"),
        destination_port=80,
        remote_ip=authz.remote_ip(xff, source_ip, 1),
        auth=auth,
    )
    call = {
        "method": request.method,
        "path": raw_path,
        "host": request.host,
        "headers": [(k, v) for k, vs in headers.items() for v in vs],
        "source_principal": request.source_principal,
        "source_ip": str(source_ip),
        "auth": None
        if auth is None
        else (auth.principal, list(auth.audiences), auth.presenter, json.dumps(auth.claims)),
    }
    return request, call


def table_for(policies: list[WaypointPolicy]) -> WaypointTable:
    spec = {
        "targets": {"10.96.0.10": {"kind": "service", "service": 0}},
        "services": [{"name": "default/echo", "ports": {}, "policies": list(range(len(policies)))}],
        "endpoints": [],
        "policies": [authz.policy_json(p) for p in policies],
        "workload_policies": [],
        "trusted_proxies": 1,
    }
    return WaypointTable(orjson.dumps(spec).decode())


def test_core_decides_as_the_reference_on_generated_policies_and_requests() -> None:
    rng = random.Random(20261201)
    verdicts: dict[tuple[bool, bool], int] = {}
    for round_ in range(150):
        policies = [random_policy(rng, n) for n in range(rng.randint(1, 6))]
        table = table_for(policies)
        for _ in range(40):
            request, call = random_request(rng)
            want = authz.evaluate(policies, request)
            allowed, policy, logged = table.authorize("10.96.0.10:80", **call)
            context = f"round {round_}: {policies} {request}"
            assert allowed == want.allowed, context
            assert policy == want.policy, context
            assert sorted(logged) == sorted(
                line.split(" policy ")[1].split(" matched")[0] for line in want.logged
            ), context
            verdicts[(allowed, policy is not None)] = (
                verdicts.get((allowed, policy is not None), 0) + 1
            )
    # The generator reaches every outcome, so the comparison is not vacuous.
    assert all(
        verdicts.get(k, 0) > 100
        for k in [(True, True), (True, False), (False, True), (False, False)]
    ), verdicts
