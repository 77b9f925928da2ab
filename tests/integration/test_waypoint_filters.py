"""Python filters (WasmPlugin with a ``file://…py`` url) at the waypoint, end to end in loopback
mode: requests from the standard library's ``http.client`` through the client pod's ztunnel,
HBONE and ``ambient waypoint`` to the standard library's HTTP server. The three examples of
``examples/filters`` run here (canary, rate limiter, audit logger), beside filters this test
writes to show the phases' order, the fail strategies and a reload under traffic."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, http_via_ztunnel, pod_yaml, service_yaml, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "filters"
CLIENT = "127.66.1.1"
SERVICES = {
    "canary": "127.66.100.1",
    "limited": "127.66.100.2",
    "audited": "127.66.100.3",
    "closed": "127.66.100.4",
    "open": "127.66.100.5",
    "slow-closed": "127.66.100.6",
    "slow-open": "127.66.100.7",
    "reloaded": "127.66.100.8",
    "ordered": "127.66.100.9",
    "echo-v2": "127.66.100.10",
}

TAG = '''
from ambient.filters import Filter


class Tag(Filter):
    """Appends its name to x-chain: the order filters ran in."""

    def on_request(self, request):
        request.headers.add("x-chain", self.config["name"])
        if self.config.get("see_principal"):
            request.headers["x-seen-principal"] = request.request_principal or "none"
'''

RAISING = """
from ambient.filters import Filter


class Raising(Filter):
    def on_request(self, request):
        raise RuntimeError("the filter broke")
"""

SLOW = """
import time

from ambient.filters import Filter


class Slow(Filter):
    def on_request(self, request):
        time.sleep(1.0)
"""


def versioned(version: str) -> str:
    return f'''
from ambient.filters import Filter


class Versioned(Filter):
    def on_request(self, request):
        request.headers["x-filter-version"] = "{version}"
'''


def plugin(
    name: str,
    url: str,
    service: str | None,
    *,
    phase: str = "STATS",
    priority: int = 0,
    fail: str = "FAIL_CLOSE",
    config: dict[str, Any] | None = None,
    budget: str | None = None,
    class_name: str | None = None,
) -> str:
    target = (
        f"{{kind: Service, group: '', name: {service}}}"
        if service
        else "{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}"
    )
    annotations = f", annotations: {{ambient.dev/filter-budget: {budget}}}" if budget else ""
    return f"""
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, namespace: default{annotations}}}
spec:
  targetRefs: [{target}]
  url: {url}
  {f"pluginName: {class_name}" if class_name else ""}
  phase: {phase}
  priority: {priority}
  failStrategy: {fail}
  pluginConfig: {json.dumps(config or {})}
---"""


pod = pod_yaml


def service(name: str, app: str = "echo") -> str:
    return service_yaml(name, SERVICES[name], app=app)


def mesh(work: Path) -> str:
    return (
        """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---"""
        + pod(
            "waypoint-1",
            "n3",
            "127.66.3.1",
            "waypoint",
            ", labels: {gateway.networking.k8s.io/gateway-name: waypoint, "
            "istio.io/dataplane-mode: none}",
        )
        + pod("client", "n1", CLIENT, "client")
        + pod(
            "echo-1",
            "n2",
            "127.66.2.1",
            "echo",
            ", labels: {app: echo}, annotations: {ambient.dev/app-address: 127.67.2.1}",
        )
        + pod(
            "echo-v2-1",
            "n2",
            "127.66.2.2",
            "echo",
            ", labels: {app: echo-v2}, annotations: {ambient.dev/app-address: 127.67.2.2}",
        )
        + "".join(service(s) for s in SERVICES if s != "echo-v2")
        + service("echo-v2", "echo-v2")
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: canary, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: canary, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-blocked, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: ordered}]
  action: DENY
  rules:
  - to: [{operation: {paths: [/deny-after-filter]}}]
    when: [{key: "request.headers[x-chain]", values: [authn]}]
---"""
        # Relative to the mesh file's directory (work/), and absolute.
        + plugin(
            "canary",
            "file://examples/canary.py",
            "canary",
            config={"percent": 30, "users": ["tester@example.com"]},
        )
        + plugin(
            "rate-limit",
            f"file://{EXAMPLES / 'rate_limit.py'}",
            "limited",
            phase="AUTHZ",
            config={"rate": 0.5, "burst": 3, "tenants": {"gold": {"rate": 100, "burst": 100}}},
        )
        + plugin(
            "audit",
            f"file://{EXAMPLES / 'audit.py'}",
            "audited",
            config={"path": str(work / "audit.log"), "body_limit": 64, "headers": ["x-user"]},
        )
        + plugin("raising-closed", "file://raising.py", "closed")
        + plugin("raising-open", "file://raising.py", "open", fail="FAIL_OPEN")
        + plugin("slow-closed", "file://slow.py", "slow-closed", budget="50ms")
        + plugin("slow-open", "file://slow.py", "slow-open", budget="50ms", fail="FAIL_OPEN")
        + plugin("versioned", "file://versioned.py", "reloaded", budget="1s")
        + plugin("low", "file://tag.py", "ordered", priority=1, config={"name": "low"})
        + plugin("high", "file://tag.py", "ordered", priority=10, config={"name": "high"})
        + plugin(
            "first",
            "file://tag.py",
            "ordered",
            phase="AUTHN",
            config={"name": "authn", "see_principal": True},
        )
        + plugin(
            "last", "file://tag.py", "ordered", phase="UNSPECIFIED_PHASE", config={"name": "last"}
        )
    )


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "examples").mkdir()
        (work / "examples" / "canary.py").write_text((EXAMPLES / "canary.py").read_text())
        for name, text in {
            "tag.py": TAG,
            "raising.py": RAISING,
            "slow.py": SLOW,
            "versioned.py": versioned("v1"),
        }.items():
            (work / name).write_text(text)
        self.mesh_file = work / "mesh.yaml"
        self.mesh_file.write_text(textwrap.dedent(mesh(work)))
        CertificateAuthority.create().save(work / "ca")
        self.echo = HttpEcho("echo-1", ("127.67.2.1", 8080))
        self.echo_v2 = HttpEcho("echo-v2-1", ("127.67.2.2", 8080))
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
        self.echo_v2.close()

    def config_dump(self) -> dict[str, Any]:
        return json.loads(
            urllib.request.urlopen(f"http://{self.waypoint.admin}/config_dump").read()
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-filters"))
    yield e
    e.close()


def send(
    service: str,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    return http_via_ztunnel(CLIENT, SERVICES[service], 80, path, headers, method, body)


def echoed(service: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, _, body = send(service, "/", headers)
    assert status == 200, body
    return json.loads(body)


# --- the examples -------------------------------------------------------------------------


def test_canary_sends_a_stable_share_of_users_to_the_canary(env: Env) -> None:
    users = [f"user{i}@example.com" for i in range(40)]
    first = {u: echoed("canary", {"x-user": u})["pod"] for u in users}
    again = {u: echoed("canary", {"x-user": u})["pod"] for u in users}
    assert first == again, "a user stays on the side the filter put them"
    canary = [u for u, p in first.items() if p == "echo-v2-1"]
    assert 0 < len(canary) < len(users), first
    assert echoed("canary", {"x-user": "tester@example.com"})["pod"] == "echo-v2-1"


def test_canary_ignores_a_mark_the_client_sets_itself(env: Env) -> None:
    stable = next(
        u
        for u in (f"user{i}@example.com" for i in range(40))
        if echoed("canary", {"x-user": u})["pod"] == "echo-1"
    )
    seen = echoed("canary", {"x-user": stable, "x-canary": "true"})
    assert seen["pod"] == "echo-1" and "x-canary" not in seen["headers"]


def test_rate_limiter_answers_429_past_the_tenants_burst(env: Env) -> None:
    statuses = [send("limited", "/", {"x-tenant": "acme"}) for _ in range(6)]
    codes = [s for s, _, _ in statuses]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
    refused = next(r for r in statuses if r[0] == 429)
    assert int(refused[1]["retry-after"]) >= 1 and b"tenant acme" in refused[2]
    # Another tenant has its own bucket; an override gives gold more.
    assert send("limited", "/", {"x-tenant": "other"})[0] == 200
    assert all(send("limited", "/", {"x-tenant": "gold"})[0] == 200 for _ in range(10))


def test_audit_logger_writes_a_line_per_request_with_status_and_body_digest(env: Env) -> None:
    status, headers, _ = send(
        "audited", "/orders?id=7", {"x-user": "bob"}, method="POST", body=b"hello"
    )
    assert status == 200 and headers.get("x-audit-id")
    status, _, _ = send("audited", "/missing", {"x-echo-status": "404"})
    assert status == 404
    lines = [json.loads(line) for line in (env.work / "audit.log").read_text().splitlines()]
    post = next(line for line in lines if line["method"] == "POST")
    assert post["path"] == "/orders?id=7" and post["status"] == 200
    assert post["body_sha256"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert post["headers"] == {"x-user": "bob"} and post["request_id"] == headers["x-audit-id"]
    assert post["source"] == "spiffe://cluster.local/ns/default/sa/client"
    assert any(line["status"] == 404 for line in lines)


def test_a_body_over_the_filters_limit_is_refused_with_413(env: Env) -> None:
    status, _, body = send("audited", "/", method="POST", body=b"x" * 1000)
    assert status == 413 and b"limit of 64 bytes" in body


# --- order, fail strategies, budgets, reloads ---------------------------------------------


def test_filters_run_by_phase_then_priority(env: Env) -> None:
    seen = echoed("ordered")["headers"]
    assert seen["x-chain"] == "authn,high,low,last"
    assert seen["x-seen-principal"] == "none"


def test_authorization_sees_what_an_earlier_filter_did(env: Env) -> None:
    # The DENY policy wants x-chain to be exactly "authn": what the AUTHN filter set before
    # authorization, and before the STATS filters appended theirs.
    status, _, body = send("ordered", "/deny-after-filter")
    assert status == 403 and body == b"RBAC: access denied"


def test_fail_close_answers_500_when_the_filter_raises(env: Env) -> None:
    status, _, body = send("closed")
    assert status == 500 and body == b"filter default/raising-closed failed\n"
    wait_until(lambda: "RuntimeError: the filter broke" in env.waypoint.output(), timeout=5)


def test_fail_open_goes_on_when_the_filter_raises(env: Env) -> None:
    assert echoed("open")["pod"] == "echo-1"


def test_a_filter_over_its_budget_gets_its_fail_strategy(env: Env) -> None:
    status, _, body = send("slow-closed")
    assert status == 500 and b"slow-closed failed" in body
    assert echoed("slow-open")["pod"] == "echo-1"
    failures = {(f["filter"], f["reason"]) for f in env.config_dump()["filterFailures"]}
    assert ("default/slow-closed", "timeout") in failures
    assert ("default/slow-open", "timeout") in failures
    wait_until(lambda: "took longer than its budget of 50ms" in env.waypoint.output(), timeout=5)


def test_failures_are_in_the_access_log(env: Env) -> None:
    assert send("closed")[0] == 500
    entries = env.waypoint.claim_entries(
        lambda e: str(e.get("response_code_details", "")).startswith("python_filter_failed")
    )
    assert entries and entries[0]["response_code"] == 500


def test_a_hot_reload_under_traffic_fails_no_request(env: Env) -> None:
    assert echoed("reloaded")["headers"]["x-filter-version"] == "v1"
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            status, _, body = send("reloaded")
            version = (
                json.loads(body)["headers"].get("x-filter-version", "") if status == 200 else ""
            )
            results.append((status, version))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) > 20, timeout=20)
        write_atomically(env.work / "versioned.py", versioned("v2"))
        wait_until(lambda: any(v == "v2" for _, v in results[-5:]), timeout=20)
        wait_until(lambda: len(results) > 20 + 40, timeout=20)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {s for s, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
    versions = [v for _, v in results]
    assert versions[0] == "v1" and versions[-1] == "v2"
    assert set(versions) == {"v1", "v2"}


def test_a_file_that_does_not_load_keeps_the_last_good_version(env: Env) -> None:
    path = env.work / "versioned.py"
    write_atomically(path, "this is not python(\n")
    wait_until(lambda: (env.config_dump()["filters"]["default/versioned"]["error"] or "") != "")
    error = env.config_dump()["filters"]["default/versioned"]["error"]
    assert f"{path}:1: syntax error" in error
    assert echoed("reloaded")["headers"]["x-filter-version"] in ("v1", "v2")
    write_atomically(path, versioned("v3"))
    wait_until(lambda: echoed("reloaded")["headers"]["x-filter-version"] == "v3", timeout=20)
    assert env.config_dump()["filters"]["default/versioned"]["error"] is None


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
