"""Istio's own ztunnel fed by ambient's control plane, on the testbed (issue 14, item 4): with
``AMBIENT_ISTIO_ZTUNNEL`` naming an Istio ztunnel binary built from its source (see
docs/interop-istio-ztunnel.md; nothing of Istio's is in this repository), node w2 runs Istio's
ztunnel with ``XDS_ADDRESS`` and ``CA_ADDRESS`` pointing at ``ambient control-plane``, while
node w1 runs ambient's ztunnel as an xDS client of the same server (``testbed up --xds``).
Traffic crosses the nodes both ways, and a DENY policy appended to the mesh file while traffic
runs is enforced by Istio's ztunnel. Without the variable these tests are skipped, saying so."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient import examples
from ambient.testbed import netns
from ambient.testbed.pods import APP_PORT, ask, refused, serve_app
from ambient.testbed.testbed import Testbed, running
from ambient.testing import App, wait_until

BINARY = os.environ.get("AMBIENT_ISTIO_ZTUNNEL", "")
pytestmark = pytest.mark.skipif(
    not BINARY,
    reason="AMBIENT_ISTIO_ZTUNNEL is not set: give it the path of an Istio ztunnel binary built "
    "from istio/ztunnel to check it against ambient's control plane",
)

S1, S2 = "10.40.2.1", "10.40.1.5"
ISTIO_NODE = "w2"
DENY_C1 = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-c1, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/c1]}}]}]
"""


@pytest.fixture(scope="module")
def mesh_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("istio-xds") / "mesh.yaml"
    path.write_text(examples.read("testbed-mesh.yaml"))
    return path


def istio_ready(netns_name: str) -> bool:
    try:
        code = netns.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             "http://127.0.0.1:15021/healthz/ready"],
            netns=netns_name,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError, RuntimeError):
        return False
    return code.strip() == "200"


@pytest.fixture(scope="module")
def bed(mesh_file: Path) -> Iterator[tuple[Testbed, subprocess.Popen[bytes], Path]]:
    with running([mesh_file], mesh_file.parent, xds=True) as testbed:
        assert testbed.control_plane is not None
        node = testbed.nodes[ISTIO_NODE]
        assert node.process is not None
        node.process.stop()  # ambient's ztunnel leaves w2; Istio's takes its pods
        node.process = None
        wait_until(lambda: not node.zds.connected, timeout=10, what="w2's CNI socket to free")
        address = f"https://{testbed.control_plane.address}"
        root = str(mesh_file.parent / "ca" / "root-cert.pem")
        log = mesh_file.parent / "istio-ztunnel.log"
        env = {
            **os.environ,
            "XDS_ADDRESS": address,
            "CA_ADDRESS": address,
            "XDS_ROOT_CA": root,
            "CA_ROOT_CA": root,
            "PROXY_MODE": "shared",
            "INPOD_UDS": str(node.zds.path),
            "NODE_NAME": ISTIO_NODE,
            "CLUSTER_ID": "Kubernetes",
            "POD_NAME": f"ztunnel-{ISTIO_NODE}",
            "POD_NAMESPACE": "istio-system",
            "ISTIO_META_DNS_CAPTURE": "false",
            "RUST_LOG": "info",
        }
        with open(log, "ab") as out:
            istio = subprocess.Popen(
                ["ip", "netns", "exec", node.node.netns, BINARY],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_until(
                lambda: (
                    istio.poll() is None and node.zds.connected and istio_ready(node.node.netns)
                ),
                timeout=60,
                what=f"Istio's ztunnel ready on {ISTIO_NODE} (log: {log})",
            )
            yield testbed, istio, log
        finally:
            istio.terminate()
            try:
                istio.wait(10)
            except subprocess.TimeoutExpired:
                istio.kill()
                istio.wait()


@pytest.fixture(scope="module")
def apps(bed: tuple[Testbed, subprocess.Popen[bytes], Path]) -> Iterator[dict[str, App]]:
    out = {"s1": serve_app("s1", "name:s1"), "s2": serve_app("s2", "name:s2")}
    yield out
    for app in out.values():
        app.close()


def test_istios_ztunnel_serves_pods_with_what_ambient_served(
    bed: tuple[Testbed, subprocess.Popen[bytes], Path], apps: dict[str, App]
) -> None:
    _, _, log = bed
    # c1 (w1, ambient's ztunnel) -> s1 (w2, Istio's): HBONE between the two, both fed by xDS
    # and holding certificates from the same CA API.
    assert ask("c1", S1) == "s1\nping\n", log.read_text()[-3000:]
    # c3 (w2, Istio's) -> s2 (w1, ambient's), the other way.
    assert ask("c3", S2) == "s2\nping\n", log.read_text()[-3000:]
    text = log.read_text()
    assert "NACK" not in text.upper() or "nack" not in text, text[-3000:]


def test_istios_ztunnel_enforces_a_policy_pushed_while_traffic_runs(
    bed: tuple[Testbed, subprocess.Popen[bytes], Path],
    apps: dict[str, App],
    mesh_file: Path,
) -> None:
    _, _, log = bed
    results: list[object] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(refused("c1", S1, APP_PORT))

    runner = threading.Thread(target=traffic)
    runner.start()
    try:
        wait_until(lambda: len(results) > 3, timeout=15)
        with open(mesh_file, "a") as f:
            f.write(DENY_C1)
        wait_until(
            lambda: results[-1] == "",
            timeout=20,
            what=f"Istio's ztunnel to refuse c1 (log: {log})",
        )
    finally:
        stop.set()
        runner.join()
    assert ask("c2", S1) == "s1\nping\n", "other clients still reach s1"
    # ambient's ztunnel, a client of the same server, enforces it on its side too (s2 on w1).
    wait_until(lambda: refused("c1", S2, APP_PORT) == "", timeout=10, what="ambient's refusal")
    assert ask("c2", S2) == "s2\nping\n"
