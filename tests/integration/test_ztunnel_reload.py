"""Config reload and certificate renewal: new config and new certificates apply to new
connections; live ones are never dropped; an invalid config is refused and the old one stays."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import textwrap
import urllib.request

import orjson
import pytest

from ambient import socks5
from ambient.hbone import Allow, DataPlane, HboneTarget
from ambient.identity import CertificateAuthority
from ambient.identity.manager import CertificateManager
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.22.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: default
  annotations: {ambient.dev/app-address: 127.23.1.2}
  labels: {app: server}
spec: {nodeName: n1, containers: [{name: app, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.22.1.2}
"""
NEWCOMER = """
---
apiVersion: v1
kind: Pod
metadata: {name: newcomer, namespace: default}
spec: {nodeName: n1, serviceAccountName: newcomer}
status: {podIP: 127.22.1.3}
"""


def dump(node: ZtunnelProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.admin}/config_dump", timeout=5) as r:
        return orjson.loads(r.read())


def served_pods(node: ZtunnelProcess) -> list[str]:
    return sorted(dump(node)["servedPods"])


@pytest.fixture
def node(tmp_path):
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(BASE))
    CertificateAuthority.create().save(tmp_path / "ca")
    app = App("echo", ("127.23.1.2", 8080))
    proc = ZtunnelProcess(
        "n1", [tmp_path / "mesh.yaml"], tmp_path / "ca", tmp_path, "--watch-interval", "0.1"
    ).wait_ready()
    yield proc, tmp_path / "mesh.yaml"
    proc.stop()
    app.close()


def open_live(pod_ip: str = "127.22.1.1") -> socket.socket:
    sock = socks5.connect((pod_ip, 15080), ("127.22.1.2", 8080), source=pod_ip)
    sock.sendall(b"before")
    assert sock.recv(100) == b"before"
    return sock


def test_a_changed_file_applies_to_new_connections_and_keeps_live_ones(node):
    proc, mesh_file = node
    live = open_live()
    mesh_file.write_text(textwrap.dedent(BASE + NEWCOMER))
    wait_until(lambda: "default/newcomer" in served_pods(proc), what="the new pod to be served")
    newcomer = socks5.connect(("127.22.1.3", 15080), ("127.22.1.2", 8080), source="127.22.1.3")
    assert exchange(newcomer, b"new pod") == b"new pod"
    live.sendall(b"after")  # the connection made before the reload still flows
    assert live.recv(100) == b"after"
    live.close()


def test_a_removed_pod_loses_its_listeners(node):
    proc, mesh_file = node
    mesh_file.write_text(textwrap.dedent(BASE + NEWCOMER))
    wait_until(lambda: "default/newcomer" in served_pods(proc), what="the new pod")
    mesh_file.write_text(textwrap.dedent(BASE))
    wait_until(lambda: "default/newcomer" not in served_pods(proc), what="the pod to go")
    with pytest.raises(ConnectionRefusedError):
        socks5.connect(("127.22.1.3", 15080), ("127.22.1.2", 8080), source="127.22.1.3")


def test_an_invalid_config_on_sighup_is_refused_and_the_old_one_stays(node):
    proc, mesh_file = node
    live = open_live()
    mesh_file.write_text(textwrap.dedent(BASE).replace("127.22.1.2}", "127.22.1.999}"))
    proc.signal(signal.SIGHUP)
    wait_until(lambda: dump(proc)["reload"]["refusals"] >= 1, what="the refusal")
    assert "127.22.1.999" in dump(proc)["reload"]["lastError"]
    mesh_file.write_text("")  # a truncated file (an editor mid-write) is refused as well
    wait_until(lambda: dump(proc)["reload"]["refusals"] >= 2, what="the second refusal")
    assert "the file is empty" in dump(proc)["reload"]["lastError"]
    # Still serving the old config: both pods, new connections, the live one.
    assert served_pods(proc) == ["default/client", "default/server"]
    assert (
        exchange(
            socks5.connect(("127.22.1.1", 15080), ("127.22.1.2", 8080), source="127.22.1.1"),
            b"still",
        )
        == b"still"
    )
    live.sendall(b"after")
    assert live.recv(100) == b"after"
    live.close()
    assert proc.stop() == 0
    errors = proc.output()
    assert "new configuration refused; keeping the current one" in errors
    assert "status.podIP" in errors and "127.22.1.999" in errors


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_certificates_are_renewed_at_half_life_without_dropping_connections(echo):
    clock = FakeClock()
    ca = CertificateAuthority.create()
    server_id = "spiffe://cluster.local/ns/default/sa/server"
    client_id = "spiffe://cluster.local/ns/default/sa/client"
    with DataPlane(1) as server, DataPlane(1) as client:
        installed: list[str] = []

        def install(cert):
            installed.append(cert.identity)
            server.load_identity(cert)

        # A 10-minute lifetime keeps the renewed certificate valid by the real clock rustls uses
        # (certificates are backdated 5 minutes for skew), while the fake clock jumps ahead.
        manager = CertificateManager(ca, install, clock=clock, ttl=dt.timedelta(minutes=10))
        client.load_identity(ca.issue(client_id))
        try:
            first = manager.ensure(server_id)
            listener = server.serve("127.0.0.1:0", server_id, Allow(echo.address))
            plan = HboneTarget(listener.local_address, echo.address, [server_id], client_id)
            live = client.connect(plan)
            live.sendall(b"1")
            assert live.recv(1) == b"1"
            clock.now = first.renew_at() - dt.timedelta(seconds=1)
            assert manager.renew_due() == []  # not yet
            clock.now = first.renew_at() + dt.timedelta(seconds=1)
            assert manager.renew_due() == [server_id]  # at half of its lifetime
            renewed = manager.ensure(server_id)
            assert renewed.not_after > first.not_after and installed == [server_id] * 2
            live.sendall(b"2")  # the connection made with the old certificate lives on
            assert live.recv(1) == b"2"
            live.close()
            fresh = DataPlane(1)
            fresh.load_identity(ca.issue(client_id))
            assert exchange(fresh.connect(plan), b"new") == b"new"
            fresh.close()
        finally:
            manager.stop()
