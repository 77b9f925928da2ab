"""A pod's listeners kept in step with the config (loopback mode): a config change that does not
touch a listener keeps it and its live connections; a new app port opens one listener; a pod
removed has its connections cut, saying why; a listener that cannot open is reported by
readiness, the rest of the node is served, and it is retried until it opens; the config watcher
outlives an exception while applying. Every address bound here is in 127.42.0.0/15."""

from __future__ import annotations

import socket
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from ambient import socks5
from ambient.config import load_mesh
from ambient.identity import CertificateAuthority
from ambient.mesh import Mesh
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess
from ambient.ztunnel.reload import ConfigWatcher

CLIENT, SERVER, OUTSIDER, FARAWAY = "127.42.1.1", "127.42.1.2", "127.42.1.9", "192.0.2.10"
APP_IP = "127.43.1.2"

NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: lst, labels: {istio.io/dataplane-mode: ambient}}
"""
CLIENT_POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: lst, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.42.1.1}
"""
OUTSIDER_POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: lst, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 127.42.1.9}
"""
SERVER_POD = """
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: lst
  labels: {app: server, version: VERSION}
  annotations: {ambient.dev/app-address: 127.43.1.2}
spec:
  nodeName: n1
  serviceAccountName: server
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.42.1.2}
"""
SERVICE = """
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: lst}
spec:
  clusterIP: 127.42.100.1
  selector: {app: server}
  ports: [PORTS]
"""
PORT_80 = "{name: web, port: 80, targetPort: 8080}"
PORT_90 = "{name: extra, port: 90, targetPort: 9090}"
# A policy on the server that allows both live connections (it denies an unrelated block).
UNRELATED_DENY = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-elsewhere, namespace: lst}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.99.0.0/16]}}]}]
"""
FARAWAY_POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: faraway, namespace: lst}
spec: {nodeName: n1, serviceAccountName: faraway}
status: {podIP: 192.0.2.10}
"""


def mesh_text(
    *, server: bool = True, version: str = "v1", ports: tuple[str, ...] = (PORT_80,), extra=""
) -> str:
    text = NAMESPACE + CLIENT_POD + OUTSIDER_POD
    if server:
        text += SERVER_POD.replace("VERSION", version)
    text += SERVICE.replace("PORTS", ", ".join(ports))
    return textwrap.dedent(text + extra)


def get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def dump(node: ZtunnelProcess) -> dict:
    return orjson.loads(get(node.admin, "/config_dump")[1])


def reloads(node: ZtunnelProcess) -> int:
    return int(dump(node)["reload"]["reloads"])


def ready(node: ZtunnelProcess) -> tuple[int, bytes]:
    return get(node.readiness, "/healthz/ready")


class Env:
    """One ztunnel (node n1) on a mesh file this test rewrites, and the server pod's apps."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh_file = tmp / "mesh.yaml"
        CertificateAuthority.create().save(tmp / "ca")
        self.apps = {port: App("echo", (APP_IP, port)) for port in (8080, 9090)}
        self.node: ZtunnelProcess | None = None

    def start(self, text: str) -> ZtunnelProcess:
        self.mesh_file.write_text(text)
        self.node = ZtunnelProcess(
            "n1", [self.mesh_file], self.tmp / "ca", self.tmp, "--watch-interval", "0.1"
        ).wait_ready()
        return self.node

    def rewrite(self, text: str) -> None:
        """Write the mesh file and wait until the ztunnel has applied it."""
        assert self.node is not None
        before = reloads(self.node)
        self.mesh_file.write_text(text)
        wait_until(lambda: reloads(self.node) > before, what="the new config to be applied")
        assert dump(self.node)["reload"]["lastError"] is None

    def close(self) -> None:
        if self.node is not None:
            self.node.stop()
        for app in self.apps.values():
            app.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path)
    yield environment
    environment.close()


def held(sock: socket.socket) -> socket.socket:
    sock.settimeout(10)
    check_flows(sock, b"held")
    return sock


def check_flows(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload) and (chunk := sock.recv(len(payload) - len(data))):
        data += chunk
    assert data == payload, "the live connection no longer carries bytes"


def through_app_port(port: int = 8080) -> socket.socket:
    """Plaintext from a pod outside the mesh to the server pod's app port (ztunnel's listener)."""
    return socket.create_connection((SERVER, port), timeout=10, source_address=(OUTSIDER, 0))


def through_hbone() -> socket.socket:
    """From the client pod, SOCKS5, then HBONE into the server pod's 15008."""
    return socks5.connect((CLIENT, 15080), (SERVER, 8080), source=CLIENT)


def claim(node: ZtunnelProcess, match: Callable[[dict], bool], count: int) -> list[dict]:
    """Wait for ``count`` access-log lines matching ``match``; return them."""
    found: list[dict] = []

    def enough() -> bool:
        found.extend(node.claim_entries(match, timeout=0))
        return len(found) >= count

    wait_until(enough, what=f"{count} access-log lines")
    return found


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# --- (a) a config change that does not touch a listener keeps its connections -----------------


def test_adding_a_service_port_opens_its_listener_and_keeps_the_pods_live_connections(env):
    node = env.start(mesh_text())
    plain, tunnelled = held(through_app_port()), held(through_hbone())
    with pytest.raises(ConnectionRefusedError):  # 9090 is no app port yet
        through_app_port(9090)

    env.rewrite(mesh_text(ports=(PORT_80, PORT_90)))

    assert exchange(through_app_port(9090), b"new port") == b"new port"
    by_service = socks5.connect((CLIENT, 15080), ("127.42.100.1", 90), source=CLIENT)
    assert exchange(by_service, b"through the new Service port") == b"through the new Service port"
    check_flows(plain, b"after the reload")
    check_flows(tunnelled, b"after the reload")
    assert not node.claim_entries(lambda e: "error" in e, timeout=0.2)  # nothing was cut
    plain.close()
    tunnelled.close()


def test_a_label_or_policy_change_that_still_allows_keeps_the_pods_live_connections(env):
    node = env.start(mesh_text())
    plain, tunnelled = held(through_app_port()), held(through_hbone())

    env.rewrite(mesh_text(version="v2"))
    check_flows(plain, b"after the label change")
    check_flows(tunnelled, b"after the label change")

    env.rewrite(mesh_text(version="v2", extra=UNRELATED_DENY))
    assert [p["name"] for p in dump(node)["policies"]] == ["deny-elsewhere"]
    check_flows(plain, b"after the policy change")
    check_flows(tunnelled, b"after the policy change")
    assert not node.claim_entries(lambda e: "error" in e, timeout=0.2)  # nothing was cut
    # New connections are served under the new config too.
    assert exchange(through_app_port(), b"new") == b"new"
    plain.close()
    tunnelled.close()


# --- (b) a pod removed from the config ------------------------------------------------------


def test_a_pod_removed_from_the_config_has_its_live_connections_cut_saying_why(env):
    node = env.start(mesh_text())
    plain, tunnelled = held(through_app_port()), held(through_hbone())
    node.forget_entries()

    env.rewrite(mesh_text(server=False))

    assert closed_by_peer(plain) and closed_by_peer(tunnelled)
    wait_until(
        lambda: env.apps[8080].connections_ended == 2, what="the app to see both connections end"
    )
    lines = claim(
        node,
        lambda e: e.get("direction") == "inbound" and e.get("dst.workload") == "server",
        count=2,
    )
    reason = "cut: pod lst/server is no longer served by ztunnel n1"
    assert sorted((e["transport"], e.get("error")) for e in lines) == [
        ("HBONE", reason),
        ("TCP", reason),
    ]
    plain.close()
    tunnelled.close()


# --- (c) a listener that cannot open --------------------------------------------------------


def test_a_pod_whose_ip_cannot_be_bound_is_named_by_readiness_and_the_rest_is_served(env):
    node = env.start(mesh_text(extra=FARAWAY_POD))
    status, body = ready(node)
    assert status == 500
    assert b"lst/faraway" in body and FARAWAY.encode() in body
    assert b"lst/server" not in body and b"lst/client" not in body
    assert exchange(through_hbone(), b"others are served") == b"others are served"
    assert exchange(through_app_port(), b"plain too") == b"plain too"


def test_a_listener_whose_port_is_taken_is_retried_until_it_opens(env):
    squatter = socket.create_server((CLIENT, 15080))  # the client pod's SOCKS5 port, taken
    try:
        node = env.start(mesh_text())
        status, body = ready(node)
        assert status == 500
        assert b"lst/client" in body and f"{CLIENT}:15080".encode() in body
        # The rest of the node is served meanwhile.
        assert exchange(through_app_port(), b"served") == b"served"
    finally:
        squatter.close()
    wait_until(
        lambda: ready(node) == (200, b"ready\n"),
        timeout=30,
        what="the retried listener to open and readiness to say so",
    )
    assert exchange(through_hbone(), b"opened on a retry") == b"opened on a retry"


# --- (d) the config watcher outlives an exception while applying ---------------------------


def test_the_config_watcher_puts_the_previous_snapshot_back_when_applying_raises(tmp_path):
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(mesh_text())
    first = load_mesh([mesh_file])
    applied: list[Mesh] = []
    lock = threading.Lock()
    failures = ["boom while opening a listener"]

    def apply(mesh: Mesh) -> None:
        with lock:
            applied.append(mesh)
            if failures and mesh is not first:
                raise RuntimeError(failures.pop())

    watcher = ConfigWatcher([mesh_file], apply, interval=0.1, current=first)
    watcher.start()
    try:
        mesh_file.write_text(mesh_text(version="v2"))
        wait_until(lambda: watcher.status()["refusals"] == 1, what="the failed apply to count")
        wait_until(lambda: len(applied) == 2, what="the previous snapshot to be applied again")
        status = watcher.status()
        assert status["reloads"] == 0
        assert "RuntimeError" in str(status["lastError"])
        assert "boom while opening a listener" in str(status["lastError"])
        assert applied[1] is first  # put back
        assert watcher.current is first

        mesh_file.write_text(mesh_text(version="v3", extra=UNRELATED_DENY))
        wait_until(lambda: watcher.status()["reloads"] == 1, what="a later change to apply")
        assert watcher.status()["lastError"] is None
        assert watcher.status()["refusals"] == 1
        assert len(applied) == 3
        assert [p.name for p in applied[2].policies] == ["deny-elsewhere"]
        assert watcher.current is applied[2]
    finally:
        watcher.stop()
