"""L4 authorization enforced by real ztunnel processes on loopback: allow and deny by principal,
namespace, ipBlock and port; plaintext blocked by a policy that requires an identity; a policy
change closes a live connection within a second."""

from __future__ import annotations

import socket
import textwrap
import time

import pytest

from ambient import socks5
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: prod}
spec: {nodeName: n1, serviceAccountName: sleep}
status: {podIP: 127.24.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: dev}
spec: {nodeName: n1, serviceAccountName: intruder}
status: {podIP: 127.24.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: dev, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 127.24.1.9}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: prod
  labels: {app: web}
  annotations: {ambient.dev/app-address: 127.25.2.1}
spec:
  nodeName: n2
  serviceAccountName: web
  containers: [{name: app, ports: [{containerPort: 8080}, {containerPort: 9090}]}]
status: {podIP: 127.24.2.1}
"""

SLEEP, INTRUDER, LEGACY = "127.24.1.1", "127.24.1.2", "127.24.1.9"
WEB = "127.24.2.1"


def policy(name: str, spec: str) -> str:
    return textwrap.dedent(f"""
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: {name}, namespace: prod}}
    spec:
    """) + textwrap.indent(textwrap.dedent(spec), "  ")


class Env:
    def __init__(self, tmp) -> None:
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(textwrap.dedent(MESH))
        CertificateAuthority.create().save(tmp / "ca")
        self.apps = [App("echo", ("127.25.2.1", 8080)), App("echo", ("127.25.2.1", 9090))]
        self.nodes = [
            ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp, "--watch-interval", "0.1")
            for n in ("n1", "n2")
        ]
        for node in self.nodes:
            node.wait_ready()

    def set_policies(self, *policies: str) -> None:
        """Rewrite the mesh file with these policies and wait until n2 applied them."""
        before = self.reloads()
        self.mesh_file.write_text(textwrap.dedent(MESH) + "".join(policies))
        wait_until(lambda: self.reloads() > before, what="n2 to reload")

    def reloads(self) -> int:
        import urllib.request

        import orjson

        with urllib.request.urlopen(f"http://{self.nodes[1].admin}/config_dump", timeout=5) as r:
            return int(orjson.loads(r.read())["reload"]["reloads"])

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for app in self.apps:
            app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("authz"))
    yield e
    e.close()


def reaches(pod_ip: str, port: int = 8080) -> bool:
    """Whether the pod at ``pod_ip`` gets an answer from web:port through the mesh."""
    try:
        if pod_ip == LEGACY:  # outside the mesh: straight to the pod, in plaintext
            sock = socket.create_connection((WEB, port), timeout=5, source_address=(LEGACY, 0))
        else:
            sock = socks5.connect((pod_ip, 15080), (WEB, port), source=pod_ip)
        return exchange(sock, b"knock") == b"knock"
    except (ConnectionError, OSError):
        return False


CASES = [
    (
        "allow by principal",
        """
     action: ALLOW
     rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/sleep]}}]}]
     """,
        {SLEEP: True, INTRUDER: False, LEGACY: False},
    ),
    (
        "deny by principal",
        """
     action: DENY
     rules: [{from: [{source: {principals: [cluster.local/ns/dev/sa/intruder]}}]}]
     """,
        {SLEEP: True, INTRUDER: False, LEGACY: True},
    ),
    (
        "allow by namespace",
        """
     rules: [{from: [{source: {namespaces: [prod]}}]}]
     """,
        {SLEEP: True, INTRUDER: False, LEGACY: False},
    ),
    (
        "deny by namespace",
        """
     action: DENY
     rules: [{from: [{source: {namespaces: [dev]}}]}]
     """,
        {SLEEP: True, INTRUDER: False, LEGACY: True},
    ),
    (
        "allow by ipBlock",
        """
     rules: [{from: [{source: {ipBlocks: [127.24.1.2/32, 127.24.1.9]}}]}]
     """,
        {SLEEP: False, INTRUDER: True, LEGACY: True},
    ),
    (
        "deny by ipBlock",
        """
     action: DENY
     rules: [{from: [{source: {ipBlocks: [127.24.1.0/30]}}]}]
     """,
        {SLEEP: False, INTRUDER: False, LEGACY: True},
    ),
    (
        "plaintext blocked by a policy requiring any identity",
        """
     rules: [{from: [{source: {principals: ["*"]}}]}]
     """,
        {SLEEP: True, INTRUDER: True, LEGACY: False},
    ),
]


@pytest.mark.parametrize(("rule", "spec", "expected"), CASES, ids=[c[0] for c in CASES])
def test_authorization_at_the_destination_ztunnel(env, rule, spec, expected):
    env.set_policies(policy("p", spec))
    assert {pod: reaches(pod) for pod in expected} == expected


def test_allow_and_deny_by_port(env):
    env.set_policies(policy("only-8080", "rules: [{to: [{operation: {ports: ['8080']}}]}]"))
    assert reaches(SLEEP, 8080) and not reaches(SLEEP, 9090)
    env.set_policies(
        policy(
            "no-8080",
            """
        action: DENY
        rules: [{to: [{operation: {ports: ['8080']}}]}]
        """,
        )
    )
    assert not reaches(SLEEP, 8080) and reaches(SLEEP, 9090)


def test_a_denied_stream_is_answered_401_and_logged_with_the_policy(env):
    env.set_policies(
        policy(
            "no-dev",
            """
        action: DENY
        rules: [{from: [{source: {namespaces: [dev]}}]}]
        """,
        )
    )
    env.nodes[1].new_entries()
    with pytest.raises(socks5.Socks5Error, match="not allowed"):  # SOCKS5 reply for the 401
        socks5.connect((INTRUDER, 15080), (WEB, 8080), source=INTRUDER)
    wait_until(
        lambda: any(e.get("policy") == "prod/no-dev" for e in entries(env)),
        what="the access log line naming the policy",
    )


_seen: list[dict] = []


def entries(env) -> list[dict]:
    _seen.extend(env.nodes[1].new_entries())
    return _seen


def test_a_policy_change_closes_a_live_connection_within_a_second(env):
    env.set_policies()
    live = socks5.connect((SLEEP, 15080), (WEB, 8080), source=SLEEP)
    live.sendall(b"before")
    assert live.recv(100) == b"before"
    changed = time.monotonic()
    env.set_policies(
        policy(
            "no-sleep",
            """
        action: DENY
        rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/sleep]}}]}]
        """,
        )
    )
    live.settimeout(5)
    # Cut by ztunnel: aborted, a reset with no FIN before it, so the client cannot take the cut
    # for a clean end of the conversation.
    with pytest.raises(ConnectionResetError):
        live.recv(100)
    assert time.monotonic() - changed < 1.0 + 0.5  # reload poll (0.1 s, twice) included
    live.close()
    assert not reaches(SLEEP)  # and new connections are refused too
