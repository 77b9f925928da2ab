"""``ambient testbed up --xds``: the in-pod ztunnels of the testbed take the mesh over delta xDS
and their certificates over Istio's CA API from an ``ambient control-plane`` on the first node,
as from istiod; no mesh file and no CA of their own. Traffic crosses the nodes with what the
control plane served, and a policy added to the file reaches them as a delta."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient import examples
from ambient.testbed import netns
from ambient.testbed.pods import APP_PORT, ask, refused, serve_app
from ambient.testbed.testbed import Testbed, running
from ambient.testing import App, wait_until

S1 = "10.40.2.1"
DENY_C2 = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-c2, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/c2]}}]}]
"""


@pytest.fixture(scope="module")
def mesh_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("xds") / "mesh.yaml"
    path.write_text(examples.read("testbed-mesh.yaml"))
    return path


@pytest.fixture(scope="module")
def bed(mesh_file: Path) -> Iterator[Testbed]:
    with running([mesh_file], mesh_file.parent, xds=True) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def s1(bed: Testbed) -> Iterator[App]:
    app = serve_app("s1", "name:s1")
    yield app
    app.close()


def config_dump(bed: Testbed, node: str) -> dict:
    proxy = bed.proxy(node)
    url = f"http://{proxy.admin}/config_dump"
    out = netns.run(["curl", "-s", url], netns=bed.nodes[node].node.netns)
    return json.loads(out)


def test_the_ztunnels_serve_what_the_control_plane_sent(bed: Testbed, s1: App) -> None:
    assert bed.control_plane is not None
    for node in bed.nodes:
        dump = config_dump(bed, node)
        assert dump["sources"] == [f"xds://{bed.control_plane.address}"], dump["sources"]
        assert dump["reload"]["xds"]["nacks"] == 0
        assert all(c["error"] is None for c in dump["certificates"])
    assert ask("c1", S1) == "s1\nping\n"
    assert ask("c2", S1) == "s1\nping\n"


def test_a_policy_added_to_the_file_reaches_the_ztunnels(
    bed: Testbed, s1: App, mesh_file: Path
) -> None:
    with open(mesh_file, "a") as f:
        f.write(DENY_C2)
    wait_until(lambda: refused("c2", S1, APP_PORT) == "", timeout=15, what="the pushed DENY")
    assert ask("c1", S1) == "s1\nping\n"
