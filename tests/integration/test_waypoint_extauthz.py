"""CUSTOM AuthorizationPolicies at the waypoint, end to end in loopback mode: the mesh config
(ConfigMap istio-system/istio) names HTTP external authorizers; an authorizer (the standard
library's HTTP server, a pod of the mesh reached over HBONE) decides from the headers it is
sent. Requests go from ``http.client`` through the client's ztunnel, HBONE and
``ambient waypoint`` to an echo server. The semantics are in ``ambient/waypoint/extauthz.py``."""

from __future__ import annotations

import http.client
import http.server
import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, http_via_ztunnel, pod_yaml, service_yaml, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

CLIENT = "127.68.1.1"
AUTHZ_APP = ("127.69.2.9", 8000)
SERVICES = {
    "guarded": "127.68.100.1",
    "lenient": "127.68.100.2",
    "orphan": "127.68.100.3",
    "unknown": "127.68.100.4",
    "ext-authz": "127.68.100.9",
}


class Authorizer:
    """An HTTP ext_authz server: ``x-ext-authz: allow`` → 200, ``deny`` → 403 with a body,
    ``slow`` → waits 2 s, anything else → 401. It keeps every check it was sent."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.checks: list[dict[str, Any]] = []
        authorizer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                authorizer.checks.append(
                    {"method": self.command, "path": self.path, "headers": headers}
                )
                verdict = headers.get("x-ext-authz", "")
                if verdict == "slow":
                    time.sleep(2)
                if verdict == "allow":
                    self.answer(
                        200,
                        b"",
                        {
                            "x-ext-authz-check-result": "allowed",
                            "x-ext-authz-user": headers.get("x-user-id", "nobody"),
                            "x-not-forwarded": "1",
                        },
                    )
                elif verdict == "deny":
                    self.answer(
                        403,
                        b"denied by ext authz\n",
                        {"x-ext-authz-check-result": "denied", "x-extra": "1"},
                    )
                else:
                    self.answer(401, b"who are you?\n", {"www-authenticate": "Basic"})

            do_POST = do_GET

            def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the waypoint's pooled connections are reset when it stops

        self.httpd = Server(address, Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MESH_CONFIG = """
extensionProviders:
- name: ext-authz-http
  envoyExtAuthzHttp:
    service: ext-authz.default.svc.cluster.local
    port: 8000
    timeout: 0.5s
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-ext-authz, "x-user*"]
    includeAdditionalHeadersInCheck: {x-added: from-mesh}
    headersToUpstreamOnAllow: [x-ext-authz-check-result, "*-user"]
    headersToDownstreamOnAllow: [x-ext-authz-check-result]
    headersToDownstreamOnDeny: [x-ext-authz-check-result]
- name: ext-authz-open
  envoyExtAuthzHttp:
    service: default/ext-authz.default.svc.cluster.local
    port: 8000
    timeout: 0.5s
    failOpen: true
    includeRequestHeadersInCheck: [x-ext-authz]
- name: ext-authz-gone
  envoyExtAuthzHttp:
    service: nothing.default.svc.cluster.local
    port: 80
    statusOnError: "503"
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"""


def custom(name: str, service: str, provider: str, rules: str = "[{}]") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: {service}}}]
  action: CUSTOM
  provider: {{name: {provider}}}
  rules: {rules}
---"""


pod = pod_yaml


def service(name: str, app: str = "echo", port: int = 80, target: int = 8080) -> str:
    return service_yaml(
        name,
        SERVICES[name],
        app=app,
        ports=f"[{{name: http, port: {port}, targetPort: {target}}}]",
        waypoint=None if name == "ext-authz" else "waypoint",
    )


def mesh() -> str:
    return (
        """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |"""
        + textwrap.indent(MESH_CONFIG, "    ")
        + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---"""
        + pod(
            "waypoint-1",
            "n3",
            "127.68.3.1",
            "waypoint",
            ", labels: {gateway.networking.k8s.io/gateway-name: waypoint, "
            "istio.io/dataplane-mode: none}",
        )
        + pod("client", "n1", CLIENT, "client")
        + pod(
            "echo-1",
            "n2",
            "127.68.2.1",
            "echo",
            ", labels: {app: echo}, annotations: {ambient.dev/app-address: 127.69.2.1}",
        )
        + pod(
            "ext-authz-1",
            "n2",
            "127.68.2.9",
            "ext-authz",
            f", labels: {{app: ext-authz}}, annotations: "
            f"{{ambient.dev/app-address: {AUTHZ_APP[0]}}}",
        )
        + "".join(service(s) for s in SERVICES if s != "ext-authz")
        + service("ext-authz", "ext-authz", 8000, 8000)
        + custom(
            "ext-authz-api", "guarded", "ext-authz-http", "[{to: [{operation: {paths: [/api/*]}}]}]"
        )
        + custom("lenient", "lenient", "ext-authz-open")
        + custom("orphan", "orphan", "ext-authz-gone")
        + custom("unknown", "unknown", "nope")
        + """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-forbidden, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: guarded}]
  action: DENY
  rules: [{to: [{operation: {paths: [/api/forbidden]}}]}]
---"""
    )


class Env:
    def __init__(self, work: Path) -> None:
        self.mesh_file = work / "mesh.yaml"
        self.mesh_file.write_text(mesh())
        CertificateAuthority.create().save(work / "ca")
        self.echo = HttpEcho("echo-1", ("127.69.2.1", 8080))
        self.authorizer = Authorizer(AUTHZ_APP)
        self.nodes = [
            ZtunnelProcess(n, [self.mesh_file], work / "ca", work).wait_ready()
            for n in ("n1", "n2")
        ]
        self.waypoint = WaypointProcess(
            "default/waypoint", [self.mesh_file], work / "ca", work
        ).wait_ready()

    def close(self) -> None:
        for proc in [*self.nodes, self.waypoint]:
            proc.stop()
        self.echo.close()
        self.authorizer.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-extauthz"))
    yield e
    e.close()


def send(
    service: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return http_via_ztunnel(CLIENT, SERVICES[service], 80, path, headers)


def checks_of(env: Env, path: str) -> list[dict[str, Any]]:
    return [c for c in env.authorizer.checks if c["path"].endswith(path)]


def test_a_request_no_custom_rule_matches_is_not_checked(env: Env) -> None:
    status, _, body = send("guarded", "/public", {"x-ext-authz": "deny"})
    assert status == 200, body
    assert not checks_of(env, "/public")


def test_an_allowed_request_carries_the_authorizers_headers(env: Env) -> None:
    status, headers, body = send(
        "guarded",
        "/api/orders?x=1",
        {"x-ext-authz": "allow", "x-user-id": "alice", "cookie": "secret=1"},
    )
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-ext-authz-check-result"] == "allowed"
    assert seen["x-ext-authz-user"] == "alice"
    assert "x-not-forwarded" not in seen, "only headersToUpstreamOnAllow reach the upstream"
    assert headers["x-ext-authz-check-result"] == "allowed", "headersToDownstreamOnAllow"
    (check,) = checks_of(env, "/api/orders?x=1")
    assert check["method"] == "GET" and check["path"] == "/check/api/orders?x=1"
    sent = check["headers"]
    assert sent["x-ext-authz"] == "allow" and sent["x-user-id"] == "alice"
    assert sent["x-added"] == "from-mesh"
    assert "cookie" not in sent, "only the headers the provider lists are sent"
    assert sent["host"] == seen["host"] == SERVICES["guarded"], "the request's own host"


def test_a_denial_is_returned_to_the_client_as_the_authorizer_made_it(env: Env) -> None:
    status, headers, body = send("guarded", "/api/orders", {"x-ext-authz": "deny"})
    assert status == 403 and body == b"denied by ext authz\n"
    assert headers["x-ext-authz-check-result"] == "denied"
    assert "x-extra" not in headers, "only headersToDownstreamOnDeny"
    status, headers, body = send("guarded", "/api/orders", {"x-ext-authz": "who"})
    assert status == 401 and body == b"who are you?\n"


def test_an_authorizer_that_does_not_answer_in_time_denies_with_status_on_error(env: Env) -> None:
    status, _, _ = send("guarded", "/api/slow", {"x-ext-authz": "slow"})
    assert status == 403


def test_fail_open_lets_the_request_on_when_the_authorizer_does_not_answer(env: Env) -> None:
    status, _, body = send("lenient", "/", {"x-ext-authz": "slow"})
    assert status == 200, body
    assert send("lenient", "/", {"x-ext-authz": "deny"})[0] == 403, "an answer still counts"


def test_an_authorizer_not_in_the_mesh_answers_status_on_error(env: Env) -> None:
    status, _, _ = send("orphan", "/", {"x-ext-authz": "allow"})
    assert status == 503
    wait_until(lambda: "nothing.default.svc.cluster.local" in env.waypoint.output(), timeout=5)


def test_a_provider_the_mesh_config_lacks_denies(env: Env) -> None:
    status, _, body = send("unknown", "/", {"x-ext-authz": "allow"})
    assert status == 403 and body == b"RBAC: access denied"
    assert "CUSTOM provider 'nope' is not an envoyExtAuthzHttp provider" in env.waypoint.output()


def test_deny_policies_still_apply_after_an_allowing_check(env: Env) -> None:
    status, _, body = send("guarded", "/api/forbidden", {"x-ext-authz": "allow"})
    assert status == 403 and body == b"RBAC: access denied"


def test_denials_are_access_logged_as_envoy_does(env: Env) -> None:
    assert send("guarded", "/api/logged", {"x-ext-authz": "deny"})[0] == 403
    entries = env.waypoint.claim_entries(
        lambda e: e.get("response_code_details") == "ext_authz_denied"
    )
    assert entries and entries[0]["response_code"] == 403
    assert entries[0]["response_flags"] == "UAEX"
