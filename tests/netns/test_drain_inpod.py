"""Graceful drain of an in-pod ztunnel (SIGTERM) on the testbed, as the source pod's node and as
the destination pod's: readiness says ``draining``, the connection still open at the deadline is
cut (both ends see it close) and logged as cut, and the process exits 0 within the deadline plus
a margin.

One testbed for the file, with its own names (so it can run beside the default testbed): three
nodes, so that each test drains a node the other does not use — a drained ztunnel is gone.
drn-a holds client drn-ca; drn-b holds server drn-sb; drn-c holds client drn-cc and server drn-sc.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from ambient.testbed import netns
from ambient.testbed.pods import APP_PORT, connect, serve_app
from ambient.testbed.testbed import Testbed
from ambient.testing import App, wait_until

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: drn-ca, namespace: default, labels: {app: drn-ca}}
spec: {nodeName: drn-a, serviceAccountName: drn-ca}
status: {podIP: 10.140.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: drn-sb, namespace: default, labels: {app: drn-sb}}
spec:
  nodeName: drn-b
  serviceAccountName: drn-sb
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 10.140.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: drn-cc, namespace: default, labels: {app: drn-cc}}
spec: {nodeName: drn-c, serviceAccountName: drn-cc}
status: {podIP: 10.140.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: drn-sc, namespace: default, labels: {app: drn-sc}}
spec:
  nodeName: drn-c
  serviceAccountName: drn-sc
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 10.140.3.2}
"""
IP = {
    "drn-ca": "10.140.1.1",
    "drn-sb": "10.140.2.1",
    "drn-cc": "10.140.3.1",
    "drn-sc": "10.140.3.2",
}
DEADLINE = 3.0
MARGIN = 5.0
DRAIN_CUT = "cut: the drain deadline passed while the proxy was shutting down"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    workdir = tmp_path_factory.mktemp("drain-testbed")
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(MESH)
    testbed = Testbed(
        [mesh_file],
        workdir,
        underlay="10.254.40.0/24",
        underlay_netns="drn-underlay",
        # The last --drain-deadline wins over the testbed's own.
        ztunnel_args=("--drain-deadline", str(DEADLINE)),
    )
    with testbed:
        yield testbed
    left = [n for n in ("drn-ca", "drn-sb", "node-drn-a", "drn-underlay") if netns.exists(n)]
    assert not left, f"left behind: {left}"


@pytest.fixture
def app_in(bed: Testbed) -> Iterator[Callable[[str], App]]:
    apps: list[App] = []

    def make(pod: str) -> App:
        app = serve_app(pod, "echo")
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def readiness(bed: Testbed, node: str) -> tuple[int, bytes]:
    """The node's ztunnel's readiness answer, asked inside the node's namespace."""
    url = f"http://{bed.proxy(node).readiness}/healthz/ready"

    def ask() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    return netns.in_netns(bed.nodes[node].node.netns, ask)


def held(client: str, server: str) -> socket.socket:
    sock = connect(client, IP[server], APP_PORT)
    sock.settimeout(10)
    sock.sendall(b"held")
    data = b""
    while len(data) < 4 and (chunk := sock.recv(4 - len(data))):
        data += chunk
    assert data == b"held"
    return sock


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


@pytest.mark.parametrize(
    ("client", "server", "drained", "side"),
    [
        ("drn-ca", "drn-sc", "drn-a", "source"),
        ("drn-cc", "drn-sb", "drn-b", "destination"),
    ],
    ids=["source-node", "destination-node"],
)
def test_sigterm_drains_an_inpod_ztunnel_cuts_the_live_connection_and_exits_0(
    bed: Testbed, app_in: Callable[[str], App], client: str, server: str, drained: str, side: str
) -> None:
    app = app_in(server)
    sock = held(client, server)
    proxy = bed.proxy(drained)
    proxy.forget_entries()

    proxy.signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_until(
        lambda: readiness(bed, drained) == (503, b"draining\n"),
        timeout=DEADLINE + MARGIN,
        what="readiness to answer 503 draining",
    )
    assert proxy.process.wait(DEADLINE + MARGIN) == 0
    assert time.monotonic() - stopped < DEADLINE + MARGIN
    assert closed_by_peer(sock), "the pod's connection outlived its drained ztunnel"
    sock.close()
    wait_until(lambda: app.connections_ended == 1, what="the server pod's app to see the close")
    if side == "source":
        (line,) = proxy.claim_entries(
            lambda e: e.get("direction") == "outbound" and e.get("src.workload") == client
        )
    else:
        (line,) = proxy.claim_entries(
            lambda e: e.get("direction") == "inbound" and e.get("dst.workload") == server
        )
    assert line.get("error", "").startswith("cut:"), line
    assert line["error"] == DRAIN_CUT, line
