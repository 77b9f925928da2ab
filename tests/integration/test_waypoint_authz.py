"""AuthorizationPolicy at the waypoint, end to end in loopback mode: real HTTP requests (the
standard library's ``http.client``) from client pods through their ztunnel, HBONE, ``ambient
waypoint``, a second HBONE tunnel and the destination's ztunnel to the standard library's HTTP
server. Every case names the rule of Istio's AuthorizationPolicy it shows; the semantics are in
``ambient/waypoint/authz.py``. A denied request is answered ``403`` ``RBAC: access denied`` by
the waypoint and never reaches the pod."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from dataclasses import dataclass, field

import pytest

from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, http_via_ztunnel, pod_yaml, service_yaml
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

SOURCES = {"client": "127.62.1.1", "admin": "127.62.1.2", "other": "127.62.1.3"}
SERVICES = [
    "open", "paths", "guard", "methods", "hosts", "sources", "headers", "ips", "combo",
    "audit", "denyall", "allowall", "jwtreq", "jwtdeny", "ports", "notfields", "conds",
]  # fmt: skip
VIP = {name: f"127.62.100.{i + 1}" for i, name in enumerate(SERVICES)}


def pod(name: str, namespace: str, node: str, ip: str, account: str, extra: str = "") -> str:
    return pod_yaml(name, node, ip, account, extra, namespace)


def service(name: str) -> str:
    ports = "[{name: http, port: 80, targetPort: 8080}]"
    if name == "ports":
        ports = (
            "[{name: http, port: 80, targetPort: 8080},"
            " {name: http-alt, port: 81, targetPort: 8080}]"
        )
    return service_yaml(name, VIP[name], ports=ports)


def policy(name: str, target: str, spec: str, namespace: str = "default", kind: str = "Service",
           annotations: str = "{}") -> str:  # fmt: skip
    group = "gateway.networking.k8s.io" if kind == "Gateway" else '""'
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}, annotations: {annotations}}}
spec:
  targetRefs: [{{kind: {kind}, group: {group}, name: {target}}}]
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
---"""


MESH = (
    """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---"""
    + pod(
        "waypoint-1",
        "default",
        "n3",
        "127.62.3.1",
        "waypoint",
        ", labels: {gateway.networking.k8s.io/gateway-name: waypoint, "
        "istio.io/dataplane-mode: none}",
    )
    + pod("client", "default", "n1", SOURCES["client"], "client")
    + pod("admin", "default", "n1", SOURCES["admin"], "admin")
    + pod("client", "other", "n1", SOURCES["other"], "client")
    + pod(
        "echo-1",
        "default",
        "n2",
        "127.62.2.1",
        "echo",
        ", labels: {app: echo}, annotations: {ambient.dev/app-address: 127.63.2.1}",
    )
    + "".join(service(s) for s in SERVICES)
    # Every request the waypoint takes, whichever Service.
    + policy(
        "gateway-deny",
        "waypoint",
        """
        action: DENY
        rules: [{to: [{operation: {paths: ["/gateway-blocked*"]}}]}]""",
        kind="Gateway",
    )
    + policy(
        "paths",
        "paths",
        """
        rules:
        - to:
          - operation:
              paths: ["/public/*", "/exact", "*.css", "/users/{*}/profile", "/files/{**}",
                      "/a/{*}/c/{**}"]""",
    )
    + policy(
        "guard",
        "guard",
        """
        action: DENY
        rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]""",
    )
    + policy(
        "methods",
        "methods",
        """
        rules:
        - to: [{operation: {methods: [GET, HEAD]}}]
        - to: [{operation: {methods: [POST], paths: [/submit]}}]""",
    )
    + policy(
        "methods-deny",
        "methods",
        """
        action: DENY
        rules: [{to: [{operation: {notMethods: [GET, HEAD, POST, PUT, DELETE]}}]}]""",
    )
    + policy(
        "hosts",
        "hosts",
        """
        rules:
        - to:
          - operation: {hosts: [echo.example, "*.internal"], notHosts: [secret.internal]}""",
    )
    + policy(
        "sources",
        "sources",
        """
        rules:
        - from:
          - source: {principals: [cluster.local/ns/default/sa/client]}
          - source: {namespaces: [other], notPrincipals: ["*/sa/blocked"]}""",
    )
    + policy(
        "sources-deny",
        "sources",
        """
        action: DENY
        rules: [{from: [{source: {serviceAccounts: [admin]}}]}]""",
    )
    + policy(
        "headers",
        "headers",
        """
        rules:
        - when:
          - key: "request.headers[x-token]"
            values: [secret, "prefix-*"]
            notValues: [prefix-revoked]""",
    )
    + policy(
        "ips",
        "ips",
        """
        rules: [{from: [{source: {ipBlocks: [127.62.1.0/30], notIpBlocks: [127.62.1.2]}}]}]""",
    )
    + policy(
        "ips-remote",
        "ips",
        """
        action: DENY
        rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]""",
    )
    + policy(
        "combo",
        "combo",
        """
        rules:
        - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
          to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
          when: [{key: "request.headers[x-env]", values: [prod]}]
        - from: [{source: {namespaces: [other]}}]
          to: [{operation: {methods: [POST]}}]""",
    )
    + policy(
        "audit",
        "audit",
        """
        action: AUDIT
        rules: [{}]""",
    )
    + policy(
        "dry-deny",
        "audit",
        """
        action: DENY
        rules: [{}]""",
        annotations='{istio.io/dry-run: "true"}',
    )
    + policy("denyall", "denyall", "")  # spec: {} but for its target
    + policy("allowall", "allowall", "rules: [{}]")
    + policy(
        "jwtreq",
        "jwtreq",
        """
        rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]""",
    )
    + policy(
        "jwtdeny",
        "jwtdeny",
        """
        action: DENY
        rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]""",
    )
    + policy(
        "ports",
        "ports",
        """
        rules: [{to: [{operation: {ports: ["80"]}}]}]""",
    )
    + policy(
        "notfields",
        "notfields",
        """
        rules: [{to: [{operation: {notPaths: ["/private*"], notMethods: [DELETE]}}]}]""",
    )
    + policy(
        "conds",
        "conds",
        """
        rules:
        - when:
          - {key: source.namespace, values: [default]}
          - {key: destination.port, values: ["80"]}
          - {key: destination.ip, values: [127.62.100.0/24]}
          - {key: source.principal, notValues: ["*/sa/admin"]}""",
    )
    + policy(
        "conds-sni",
        "conds",
        """
        action: DENY
        rules: [{when: [{key: connection.sni, values: ["*"]}]}]""",
    )
    # A policy of namespace `other` names other/open, which does not exist: not default/open.
    + policy(
        "other-ns",
        "open",
        """
        action: DENY
        rules: [{}]""",
        namespace="other",
    )
)


@dataclass
class Case:
    rule: str  # the rule of Istio's semantics the case shows
    service: str
    path: str
    status: int
    method: str = "GET"
    source: str = "client"
    headers: dict[str, str] = field(default_factory=dict)
    port: int = 80
    seen_path: str | None = None  # the path the pod must see (normalized), when checked


CASES = [
    # --- no policy, and policies of the Gateway -----------------------------------------------
    Case("no policy applies: allowed", "open", "/anything", 200),
    Case("a targetRef names its own namespace: other/open is not default/open", "open", "/x", 200),
    Case("a Gateway-targeted DENY applies to every Service", "open", "/gateway-blocked", 403),
    Case("a Gateway-targeted DENY, prefix", "allowall", "/gateway-blocked/x", 403),
    Case("the Gateway DENY leaves other paths", "allowall", "/gateway", 200),
    # --- paths: exact, prefix, suffix, templates, normalization -------------------------------
    Case("paths prefix 'x*' matches below it", "paths", "/public/x", 200),
    Case("paths prefix '/public/*' needs the slash", "paths", "/public", 403),
    Case("paths prefix matches deep paths", "paths", "/public/a/b/c", 200),
    Case("paths exact", "paths", "/exact", 200),
    Case("paths exact: a trailing slash differs", "paths", "/exact/", 403),
    Case("paths exact: a longer path differs", "paths", "/exactly", 403),
    Case("paths suffix '*.css'", "paths", "/site.css", 200),
    Case("paths suffix, deep", "paths", "/a/b/site.css", 200),
    Case("paths suffix: no match", "paths", "/css", 403),
    Case("template {*} is one segment", "paths", "/users/7/profile", 200),
    Case("template {*} does not span segments", "paths", "/users/7/8/profile", 403),
    Case(
        "template {*} needs a non-empty segment (after merging slashes)",
        "paths",
        "/users//profile",
        403,
    ),
    Case("template {**} takes any remainder", "paths", "/files/a/b/c", 200),
    Case("template {**} takes an empty remainder", "paths", "/files/", 200),
    Case("template {**}: the literal before it must be there", "paths", "/files", 403),
    Case("template {*} then {**}", "paths", "/a/b/c/d/e", 200),
    Case("template {*} then {**}: the literal between must match", "paths", "/a/b/x/d", 403),
    Case("no ALLOW matches: denied", "paths", "/other", 403),
    Case(
        "the query is not part of the path",
        "paths",
        "/public/x?q=1&r=2",
        200,
        seen_path="/public/x?q=1&r=2",
    ),
    Case("the query cannot satisfy a path", "paths", "/other?/public/x", 403),
    Case(
        "dot segments are removed before matching (and upstream)",
        "paths",
        "/public/./x",
        200,
        seen_path="/public/x",
    ),
    Case("dot-dot out of an allowed prefix is denied", "paths", "/public/../admin", 403),
    Case(
        "percent-encoded unreserved characters are decoded",
        "paths",
        "/%70ublic/x",
        200,
        seen_path="/public/x",
    ),
    Case(
        "merged slashes reach the allowed prefix",
        "paths",
        "//public//x",
        200,
        seen_path="/public/x",
    ),
    Case("encoded dots are dot segments", "paths", "/public/%2e%2e/other", 403),
    Case("paths are case-sensitive", "paths", "/PUBLIC/x", 403),
    # --- the usual bypass attempts against a DENY on /admin -----------------------------------
    Case("DENY /admin exact", "guard", "/admin", 403),
    Case("DENY /admin/* prefix", "guard", "/admin/users", 403),
    Case("bypass: /admin/../admin is /admin", "guard", "/admin/../admin", 403),
    Case("bypass: //admin is /admin", "guard", "//admin", 403),
    Case("bypass: /%61dmin is /admin", "guard", "/%61dmin", 403),
    Case("bypass: /./admin is /admin", "guard", "/./admin", 403),
    Case("bypass: /x/../admin is /admin", "guard", "/x/../admin", 403),
    Case("bypass: /%2e%2e/admin is /admin", "guard", "/%2e%2e/admin", 403),
    Case("bypass: ///admin///x is /admin/x", "guard", "///admin///x", 403),
    Case("bypass: /admin/. is /admin/", "guard", "/admin/.", 403),
    Case(
        "bypass: /%41dmin decodes to /Admin, not /admin",
        "guard",
        "/%41dmin",
        200,
        seen_path="/Admin",
    ),
    Case("DENY is case-sensitive: /Admin passes", "guard", "/Admin", 200),
    Case("DENY exact /admin does not cover /administrator", "guard", "/administrator", 200),
    Case(
        "an encoded slash is not decoded (MERGE_SLASHES, as Istio's default)",
        "guard",
        "/admin%2Fx",
        200,
        seen_path="/admin%2Fx",
    ),
    Case("a DENY alone allows everything else", "guard", "/public", 200),
    # --- methods -----------------------------------------------------------------------------
    Case("methods: GET allowed", "methods", "/", 200),
    Case("methods: HEAD allowed", "methods", "/", 200, method="HEAD"),
    Case(
        "methods AND paths in one operation: POST /submit", "methods", "/submit", 200, method="POST"
    ),
    Case("methods AND paths: POST elsewhere is denied", "methods", "/other", 403, method="POST"),
    Case("methods: DELETE matches no ALLOW", "methods", "/", 403, method="DELETE"),
    Case("methods: PUT /submit matches no ALLOW", "methods", "/submit", 403, method="PUT"),
    Case("notMethods DENY: PATCH is denied by the DENY", "methods", "/", 403, method="PATCH"),
    Case("notMethods DENY: OPTIONS is denied by the DENY", "methods", "/", 403, method="OPTIONS"),
    # --- hosts -------------------------------------------------------------------------------
    Case("hosts exact", "hosts", "/", 200, headers={"Host": "echo.example"}),
    Case("hosts ignore case", "hosts", "/", 200, headers={"Host": "ECHO.Example"}),
    Case(
        "a host without a port matches any port",
        "hosts",
        "/",
        200,
        headers={"Host": "echo.example:8080"},
    ),
    Case("hosts suffix '*.internal'", "hosts", "/", 200, headers={"Host": "api.internal"}),
    Case(
        "notHosts excludes within the suffix",
        "hosts",
        "/",
        403,
        headers={"Host": "secret.internal"},
    ),
    Case("hosts: another host is denied", "hosts", "/", 403, headers={"Host": "other.example"}),
    Case(
        "hosts: a longer name is not the host",
        "hosts",
        "/",
        403,
        headers={"Host": "echo.example.evil"},
    ),
    Case("hosts: the VIP itself is not a listed host", "hosts", "/", 403),
    # --- sources: principals, namespaces, serviceAccounts ------------------------------------
    Case("principals exact", "sources", "/", 200, source="client"),
    Case("namespaces, with notPrincipals", "sources", "/", 200, source="other"),
    Case(
        "serviceAccounts DENY names the account of the policy's namespace",
        "sources",
        "/",
        403,
        source="admin",
    ),
    # --- when: request headers ---------------------------------------------------------------
    Case("when request.headers exact", "headers", "/", 200, headers={"x-token": "secret"}),
    Case("when request.headers prefix", "headers", "/", 200, headers={"x-token": "prefix-abc"}),
    Case(
        "when notValues excludes a value",
        "headers",
        "/",
        403,
        headers={"x-token": "prefix-revoked"},
    ),
    Case("when request.headers: another value", "headers", "/", 403, headers={"x-token": "x"}),
    Case("when request.headers: absent header", "headers", "/", 403),
    Case("header names ignore case", "headers", "/", 200, headers={"X-TOKEN": "secret"}),
    Case("header values are case-sensitive", "headers", "/", 403, headers={"x-token": "SECRET"}),
    # --- ipBlocks and remoteIpBlocks (one trusted proxy) ---------------------------------------
    Case("ipBlocks: the client pod's IP in the block", "ips", "/", 200, source="client"),
    Case("notIpBlocks excludes an address in the block", "ips", "/", 403, source="admin"),
    Case("ipBlocks: another pod in the block", "ips", "/", 200, source="other"),
    Case("remoteIpBlocks: no x-forwarded-for, the source IP", "ips", "/", 200),
    Case(
        "remoteIpBlocks DENY: the trusted hop names a denied client",
        "ips",
        "/",
        403,
        headers={"x-forwarded-for": "192.0.2.7"},
    ),
    Case(
        "remoteIpBlocks: another client passes",
        "ips",
        "/",
        200,
        headers={"x-forwarded-for": "198.51.100.1"},
    ),
    Case(
        "remoteIpBlocks: only the trusted hop counts, not what it was told",
        "ips",
        "/",
        200,
        headers={"x-forwarded-for": "192.0.2.7, 198.51.100.1"},
    ),
    Case(
        "remoteIpBlocks: the rightmost (trusted) hop is denied",
        "ips",
        "/",
        403,
        headers={"x-forwarded-for": "198.51.100.1, 192.0.2.7"},
    ),
    Case(
        "remoteIpBlocks: an unparsable hop falls back to the source IP",
        "ips",
        "/",
        200,
        headers={"x-forwarded-for": "not-an-ip"},
    ),
    # --- from x to x when: all must hold; rules OR ----------------------------------------
    Case("rule 1: from, to and when all hold", "combo", "/api/x", 200, headers={"x-env": "prod"}),
    Case("rule 1: when fails", "combo", "/api/x", 403, headers={"x-env": "dev"}),
    Case(
        "rule 1: to fails (method)",
        "combo",
        "/api/x",
        403,
        method="DELETE",
        headers={"x-env": "prod"},
    ),
    Case("rule 1: to fails (path)", "combo", "/web", 403, headers={"x-env": "prod"}),
    Case("rule 1: from fails", "combo", "/api/x", 403, source="admin", headers={"x-env": "prod"}),
    Case(
        "rule 2 (OR): namespace other, POST",
        "combo",
        "/anything",
        200,
        source="other",
        method="POST",
    ),
    Case(
        "rule 2: namespace other, GET matches neither rule",
        "combo",
        "/api/x",
        403,
        source="other",
        headers={"x-env": "prod"},
    ),
    # --- AUDIT and dry-run only log -----------------------------------------------------------
    Case("AUDIT does not deny", "audit", "/", 200),
    Case("a dry-run DENY does not deny", "audit", "/admin", 200),
    # --- empty forms --------------------------------------------------------------------------
    Case("spec: {} (ALLOW, no rules) denies everything", "denyall", "/", 403),
    Case("spec: {} denies every method", "denyall", "/", 403, method="POST"),
    Case("rules: [{}] allows everything", "allowall", "/anything", 200),
    Case("rules: [{}] allows every source", "allowall", "/", 200, source="admin"),
    # --- request principals without RequestAuthentication --------------------------------------
    Case("requestPrincipals ['*'] requires a JWT: none, denied", "jwtreq", "/", 403),
    Case("notRequestPrincipals ['*'] DENY catches a request without a JWT", "jwtdeny", "/", 403),
    # --- ports --------------------------------------------------------------------------------
    Case("ports: the Service port 80", "ports", "/", 200),
    Case("ports: port 81 of the same Service is not allowed", "ports", "/", 403, port=81),
    # --- not... fields ------------------------------------------------------------------------
    Case("notPaths and notMethods: neither excluded", "notfields", "/x", 200),
    Case("notPaths excludes a prefix", "notfields", "/private/x", 403),
    Case("notMethods excludes DELETE", "notfields", "/x", 403, method="DELETE"),
    # --- when on source and destination attributes ------------------------------------------
    Case(
        "when source.namespace, destination.port, destination.ip, source.principal",
        "conds",
        "/",
        200,
    ),
    Case("when source.principal notValues", "conds", "/", 403, source="admin"),
    Case("when source.namespace: other namespace", "conds", "/", 403, source="other"),
    Case(
        "when connection.sni: the waypoint sees no SNI, the DENY never matches",
        "conds",
        "/sni",
        200,
    ),
]

DENIED_BODY = b"RBAC: access denied"


class Env:
    def __init__(self, tmp) -> None:
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(textwrap.dedent(MESH))
        self.ca = CertificateAuthority.create()
        self.ca.save(tmp / "ca")
        self.echo = HttpEcho("echo-1", ("127.63.2.1", 8080))
        self.nodes = [
            ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp).wait_ready() for n in ("n1", "n2")
        ]
        self.waypoint = WaypointProcess(
            "default/waypoint", [self.mesh_file], tmp / "ca", tmp, "--trusted-proxies", "1"
        ).wait_ready()

    def close(self) -> None:
        for proc in [*self.nodes, self.waypoint]:
            proc.stop()
        self.echo.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-authz"))
    yield e
    e.close()


def send(case: Case) -> tuple[int, bytes]:
    status, _, body = http_via_ztunnel(
        SOURCES[case.source], VIP[case.service], case.port, case.path, case.headers, case.method
    )
    return status, body


def test_there_are_at_least_a_hundred_cases() -> None:
    assert len(CASES) >= 100
    assert len({c.rule for c in CASES}) == len(CASES), "each case names its own rule"


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_authorization_at_the_waypoint(env: Env, case: Case) -> None:
    seen_before = env.echo.requests
    status, body = send(case)
    assert status == case.status, (case.rule, body)
    if status == 403:
        assert body == DENIED_BODY
        assert env.echo.requests == seen_before, "a denied request must not reach the pod"
    elif case.method != "HEAD":
        echoed = json.loads(body)
        assert echoed["method"] == case.method
        if case.seen_path is not None:
            assert echoed["path"] == case.seen_path


def test_denied_requests_are_counted_and_named_in_the_access_log(env: Env) -> None:
    status, _ = send(Case("x", "guard", "/admin/../admin", 403))
    assert status == 403
    metrics = urllib.request.urlopen(f"http://{env.waypoint.metrics}/metrics").read().decode()
    denied = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_requests_total{")
        and 'response_code="403"' in line
        and 'destination_service_name="guard"' in line
    ]
    assert denied and float(denied[0].rsplit(" ", 1)[1]) >= 1, metrics
    named = env.waypoint.claim_entries(
        lambda e: (
            e.get("response_code_details") == "rbac_access_denied_matched_policy[default/guard]"
        )
    )
    assert named and named[0]["response_code"] == 403, named
