"""The mesh config's HTTP external authorizers (CUSTOM policies at the waypoint): what a user is
told about a provider the waypoint cannot take, and how a provider finds its Service. The
checks themselves run end to end in ``tests/integration/test_waypoint_extauthz.py``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.config.errors import ConfigError
from ambient.waypoint.table import compile_table

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
metadata: {name: authz, namespace: tools}
spec: {clusterIP: 10.96.0.11, selector: {app: authz}, ports: [{name: http, port: 8000}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  action: CUSTOM
  provider: {name: ext}
  rules: [{}]
---
"""


def mesh_config(text: str, name: str = "istio", namespace: str = "istio-system") -> str:
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        "data:\n  mesh: |\n" + textwrap.indent(textwrap.dedent(text), "    ") + "---\n"
    )


def load(tmp_path: Path, *docs: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "".join(docs))
    return load_mesh([path])


PROVIDER = "extensionProviders:\n- name: ext\n  envoyExtAuthzHttp: {service: %s, port: 8000%s}\n"

REFUSED = [
    (PROVIDER % ("authz.tools.svc.cluster.local", ", timeout: soon"), "timeout", "duration"),
    (PROVIDER % ("authz.tools.svc.cluster.local", ", statusOnError: nope"), "statusOnError", "403"),
    (PROVIDER % ("authz.tools.svc.cluster.local", ", pathPrefix: check"), "pathPrefix", "with /"),
    (PROVIDER % ("authz.tools.svc.cluster.local", ", port: 0"), "port", ">= 1"),
    (PROVIDER % ("authz", "") + "- name: ext\n  zipkin: {}\n", "[1].name", "duplicate provider"),
    ("extensionProviders: [\n", "data.mesh", "not YAML"),
    ("- a list\n", "data.mesh", "mapping"),
]


@pytest.mark.parametrize(("text", "field", "said"), REFUSED, ids=[r[2] for r in REFUSED])
def test_a_provider_the_waypoint_cannot_take_is_refused_naming_the_field(
    tmp_path: Path, text: str, field: str, said: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, mesh_config(text))
    message = str(e.value)
    assert "ConfigMap istio-system/istio" in message and field in message, message
    assert said in message, message


@pytest.mark.parametrize(
    "service",
    ["authz.tools.svc.cluster.local", "tools/authz.tools.svc.cluster.local", "authz.tools"],
)
def test_a_provider_finds_its_service_by_hostname(tmp_path: Path, service: str) -> None:
    mesh = load(tmp_path, mesh_config(PROVIDER % (service, ", timeout: 250ms, failOpen: true")))
    (provider,) = compile_table(mesh, "default/waypoint")["providers"]
    assert (
        provider["backend"]["service"] == "tools/authz" and provider["backend"]["invalid"] is None
    )
    assert provider["timeout"] == 0.25 and provider["fail_open"]
    assert provider["status_on_error"] == 403


def test_a_provider_without_its_service_is_kept_and_says_why(tmp_path: Path) -> None:
    mesh = load(tmp_path, mesh_config(PROVIDER % ("gone.tools.svc.cluster.local", "")))
    (provider,) = compile_table(mesh, "default/waypoint")["providers"]
    assert provider["backend"]["invalid"] == "no such Service in the mesh"


def test_a_missing_provider_and_another_configmap_are_warnings(tmp_path: Path) -> None:
    mesh = load(tmp_path, mesh_config("{}", name="other", namespace="default"))
    assert any("CUSTOM provider 'ext' is not an envoyExtAuthzHttp" in w for w in mesh.warnings)
    assert any("ConfigMap default/other is not Istio's mesh config" in w for w in mesh.warnings)
    assert compile_table(mesh, "default/waypoint")["providers"] == []
