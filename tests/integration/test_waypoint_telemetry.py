"""Istio's Telemetry API at the waypoint, end to end in loopback mode: access logging turned off
for one Service, filtered on the response code for another, and metrics overrides (a metric
disabled, a label removed) seen on the waypoint's metrics endpoint. The semantics are in
``ambient/waypoint/telemetry_api.py``."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, http_via_ztunnel, pod_yaml, service_yaml
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

CLIENT = "127.70.1.1"
SERVICES = {"logged": "127.70.100.1", "quiet": "127.70.100.2", "errors": "127.70.100.3"}


pod = pod_yaml


def service(name: str) -> str:
    return service_yaml(name, SERVICES[name])


MESH = (
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
        "127.70.3.1",
        "waypoint",
        ", labels: {gateway.networking.k8s.io/gateway-name: waypoint, "
        "istio.io/dataplane-mode: none}",
    )
    + pod("client", "n1", CLIENT, "client")
    + pod(
        "echo-1",
        "n2",
        "127.70.2.1",
        "echo",
        ", labels: {app: echo}, annotations: {ambient.dev/app-address: 127.71.2.1}",
    )
    + "".join(service(s) for s in SERVICES)
    + """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
  metrics:
  - overrides:
    - match: {metric: REQUEST_SIZE}
      disabled: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: waypoint, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  metrics:
  - overrides:
    - match: {metric: REQUEST_DURATION}
      disabled: true
    - match: {metric: REQUEST_COUNT}
      tagOverrides: {request_protocol: {operation: REMOVE}, source_principal: {operation: REMOVE}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: quiet}]
  accessLogging: [{disabled: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: errors, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: errors}]
  accessLogging:
  - filter: {expression: "response.code >= 400 && response.code != 404"}
---"""
)


class Env:
    def __init__(self, work: Path) -> None:
        self.mesh_file = work / "mesh.yaml"
        self.mesh_file.write_text(MESH)
        CertificateAuthority.create().save(work / "ca")
        self.echo = HttpEcho("echo-1", ("127.71.2.1", 8080))
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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-telemetry"))
    yield e
    e.close()


def send(service: str, path: str, status: int = 200) -> int:
    headers = {"x-echo-status": str(status)}
    return http_via_ztunnel(CLIENT, SERVICES[service], 80, path, headers)[0]


def logged_paths(env: Env, marker: str) -> set[str]:
    """The paths logged among the requests whose path has ``marker``; waits for the line of a
    last request to the logged Service, so the ones before it are in too."""
    assert send("logged", f"/{marker}/end") == 200
    entries = env.waypoint.claim_entries(lambda e: f"/{marker}/" in str(e.get("path")))
    assert any(e["path"] == f"/{marker}/end" for e in entries), entries
    return {e["path"] for e in entries}


def test_access_logging_disabled_for_one_service(env: Env) -> None:
    assert send("quiet", "/a/quiet") == 200
    assert send("logged", "/a/logged") == 200
    paths = logged_paths(env, "a")
    assert "/a/logged" in paths and "/a/quiet" not in paths


def test_access_log_filter_on_the_response_code(env: Env) -> None:
    for code in (200, 404, 500, 503):
        assert send("errors", f"/b/{code}", code) == code
    paths = logged_paths(env, "b")
    assert {p for p in paths if p != "/b/end"} == {"/b/500", "/b/503"}


def scrape(env: Env) -> dict[str, Any]:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{env.waypoint.metrics}/metrics", timeout=5).read()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_metrics_overrides_disable_metrics_and_remove_labels(env: Env) -> None:
    for _ in range(3):
        assert send("logged", "/c") == 200
    deadline = time.monotonic() + 5
    while True:
        families = scrape(env)
        requests = families.get("istio_requests")
        if (requests and requests.samples) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert requests is not None and requests.samples
    for sample in requests.samples:
        assert "request_protocol" not in sample.labels and "source_principal" not in sample.labels
        assert sample.labels["reporter"] == "waypoint"
    assert "istio_request_duration_milliseconds" not in families, "disabled at the Gateway"
    assert "istio_request_bytes" not in families, "disabled mesh-wide"
    assert "istio_response_bytes" in families
